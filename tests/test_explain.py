"""Grad-CAM heatmaps of the artifact class: shape, range, the sign of the evidence, overlays, the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from artifact_core.bundle import BundleConfig, save_bundle
from artifact_core.images import decode_image
from artifact_core.explain import (Explainer, cell_geometry, explain_paths, gradcam_heatmaps, overlay,
                                   upsample_cells)
from conftest import REPO, calibrated_model, make_easy_folder, write_image


class RedDetector(nn.Module):
    """A model laid out like MobileNetV2 (``features``, pooled, ``classifier``) whose only
    feature is "red here": with ``sign=-1`` red lowers the artifact-free logit (red = artifact)."""

    def __init__(self, sign: float = -1.0) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 1, kernel_size=4, stride=4)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.weight[0, 1:] = -0.5
            conv.bias.fill_(-0.5)
        self.features = nn.Sequential(conv, nn.ReLU())
        self.classifier = nn.Linear(1, 1)
        with torch.no_grad():
            self.classifier.weight.fill_(sign * 10.0)
            self.classifier.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def red_square(y: int, x: int, size: int = 64) -> torch.Tensor:
    img = torch.full((1, 3, size, size), -1.0)
    img[:, 0, y:y + 16, x:x + 16] = 2.0
    return img


def test_heatmap_marks_the_region_that_drives_the_artifact_logit():
    model = RedDetector(sign=-1.0)
    for y, x in [(0, 0), (40, 8), (24, 44)]:
        heat = gradcam_heatmaps(model, red_square(y, x))
        assert heat.shape == (1, 64, 64) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
        inside = heat[0, y:y + 16, x:x + 16].mean()
        outside = (heat[0].sum() - heat[0, y:y + 16, x:x + 16].sum()) / (64 * 64 - 256)
        assert inside > 0.5 > 0.1 > outside, (y, x, inside, outside)
        py, px = np.unravel_index(heat[0].argmax(), heat[0].shape)
        assert y - 4 <= py < y + 20 and x - 4 <= px < x + 20


@pytest.mark.parametrize("head,size", [("multiscale", 384), ("global", 512)])
def test_cell_geometry_is_where_each_cells_receptive_field_is_centred(head, size):
    """The support of a middle cell's input gradient (symmetric kernels: its middle is the
    cell's centre) is centred on ``stride * j + offset``: 16 j and 32 j px for MobileNetV2, half
    a cell before the middle of the block a resized map would put it on."""
    from artifact_core.model import build_model

    torch.manual_seed(0)
    model = build_model(weights="none", head=head).eval()
    x = torch.randn(1, 3, size, size).requires_grad_(True)
    cells = model.features(x)
    j = cells.shape[-1] // 2
    cells[0, :, j, j].sum().backward()
    support = x.grad[0].abs().sum(0) > 0
    assert 0 < int(support.sum()) < size * size, "the receptive field must lie inside the input"
    (step_y, offset_y), (step_x, offset_x) = cell_geometry(model.features)
    assert (step_y, step_x) == ((16.0, 16.0) if head == "multiscale" else (32.0, 32.0))
    for along, (step, offset) in ((support.any(1), (step_y, offset_y)), (support.any(0), (step_x, offset_x))):
        where = torch.nonzero(along)[:, 0]
        assert (int(where.min()) + int(where.max())) / 2 == step * j + offset
    # A layer with no padding (RedDetector's 4 px blocks) is centred on each block's middle.
    assert cell_geometry(RedDetector().features) == ((4.0, 1.5), (4.0, 1.5))


def test_upsampled_cells_sit_on_their_centres():
    cells = torch.zeros(1, 1, 16, 16)
    cells[0, 0, 5, 15] = 1.0
    heat = upsample_cells(cells, (500, 500), ((32.0, 0.0), (32.0, 0.0)))[0, 0]
    assert heat.shape == (500, 500) and float(heat[160, 480]) == pytest.approx(1.0)
    assert np.unravel_index(int(heat.argmax()), heat.shape) == (160, 480)
    # halfway to the next cell, half; past the outermost centre, the outermost cell's own value
    assert float(heat[160, 464]) == pytest.approx(0.5) and float(heat[160, 499]) == pytest.approx(1.0)
    assert float(heat[176, 480]) == pytest.approx(0.5) and float(heat[192, 480]) == 0.0
    # No padding: the same as resizing the map (its cells are the blocks' middles).
    cells = torch.rand(2, 1, 16, 16)
    np.testing.assert_allclose(upsample_cells(cells, (64, 64), ((4.0, 1.5), (4.0, 1.5))),
                               nn.functional.interpolate(cells, size=(64, 64), mode="bilinear"), atol=1e-5)
    # A map the geometry does not describe is stretched over the image.
    np.testing.assert_allclose(upsample_cells(cells, (300, 300), ((32.0, 0.0), (32.0, 0.0))),
                               nn.functional.interpolate(cells, size=(300, 300), mode="bilinear"), atol=1e-5)


def test_heatmap_is_evidence_for_the_artifact_class_not_against_it():
    # Here red makes an image *artifact-free*: no artifact evidence anywhere, an all-zero map.
    heat = gradcam_heatmaps(RedDetector(sign=+1.0), red_square(8, 8))
    assert np.all(heat == 0.0)


def test_heatmaps_on_mobilenet_vary_and_restore_the_model():
    model = calibrated_model()
    torch.manual_seed(0)
    # leaning to "artifact" so that every image has some evidence to map
    torch.nn.init.normal_(model.classifier[1].weight, mean=-0.02, std=0.05)
    model.features[3].requires_grad_(False)  # a partly frozen model keeps its mix
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    x = torch.randn(3, 3, 128, 128) * 1.5
    with torch.inference_mode():  # as callers in inference code would hold it
        heat = gradcam_heatmaps(model, x, micro_batch=2)
    assert heat.shape == (3, 128, 128) and 0.0 <= heat.min() and heat.max() <= 1.0
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # The maps are images, not constants, and depend on the image.
    nonzero = [h for h in heat if h.max() > 0]
    assert nonzero, "no artifact evidence at all: the test would prove nothing"
    assert all(h.std() > 0.01 for h in nonzero)
    assert np.abs(heat[0] - heat[1]).mean() > 0.01 or np.abs(heat[1] - heat[2]).mean() > 0.01
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        gradcam_heatmaps(model, torch.zeros(3, 64, 64))


def test_overlay_blends_and_resizes():
    img = np.full((30, 40, 3), 100, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:4, :4] = 1.0
    out = overlay(img, heat, alpha=0.5)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[2, 2], out[28, 38])  # hot corner differs from the cold one
    assert np.array_equal(overlay(img, heat, alpha=0.0), img)
    assert np.array_equal(overlay(Image.fromarray(img), heat, alpha=0.0), img)
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, heat, alpha=1.5)


@pytest.fixture(scope="module")
def bundle64(tmp_path_factory) -> str:
    model = calibrated_model()
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    return save_bundle(str(tmp_path_factory.mktemp("bundle") / "model"), model, BundleConfig(image_size=64))


def _large_files(folder):
    """Files the scoring decoder shrinks before its resize (a JPEG in the DCT domain, a PNG
    with alpha box-reduced): a plain resize of the full image gives other pixels."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(0, 256, (300, 520, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "wide.jpg", quality=90)
    alpha = np.dstack([noise[:, :400], rng.integers(0, 256, (300, 400, 1), dtype=np.uint8)])
    Image.fromarray(alpha, "RGBA").save(folder / "alpha.png")
    return [str(folder / "wide.jpg"), str(folder / "alpha.png")]


def test_explainer_and_report_use_the_scoring_pixels(bundle64, tmp_path):
    from artifact_core.predict import ArtifactPredictor, predict_paths
    from artifact_core.report import HeatmapActor

    folder = make_easy_folder(tmp_path / "imgs", n=4, size=50)
    paths = sorted(str(p) for p in folder.iterdir()) + _large_files(tmp_path / "large")
    ex = Explainer(bundle64)
    plain = torch.stack([torch.from_numpy(np.array(decode_image(p).resize((64, 64), Image.BILINEAR)))
                         .permute(2, 0, 1) for p in paths[-2:]])
    assert (plain.int() - torch.stack([ex.pixels(p) for p in paths[-2:]]).int()).abs().max() > 5  # not the same input
    prob, maps = ex.explain_uint8(torch.stack([ex.pixels(p) for p in paths]))
    assert maps.shape == (6, 64, 64)
    scored = predict_paths(ArtifactPredictor(bundle64), paths)
    assert np.allclose(prob, scored, atol=1e-5)
    # the review page's actor: the scored probability, thumbnails with the image's aspect
    out = HeatmapActor(bundle64, thumb_size=96)({"path": np.asarray(paths, dtype=object)})
    assert np.allclose(out["prob_artifact_free"], scored, atol=1e-5) and not any(out["error"])
    assert Image.open(io.BytesIO(out["thumb"][-2])).size == (96, 55)  # 520 x 300 -> 96 x 55
    assert Image.open(io.BytesIO(out["overlay"][-1])).size == (96, 72)  # 400 x 300


def test_preview_decode_keeps_the_aspect_and_never_grows(tmp_path):
    files = _large_files(tmp_path)
    assert decode_image(files[0], max_side=128).size == (128, 74)
    assert decode_image(files[1], max_side=100).size == (100, 75)
    assert decode_image(files[1], max_side=1000).size == (400, 300)  # smaller than asked: as it is
    with pytest.raises(ValueError, match="not both"):
        decode_image(files[0], max_side=64, target_size=64)


def test_cli_writes_overlays_and_table(bundle64, tmp_path):
    folder = make_easy_folder(tmp_path / "imgs", n=3, size=50)
    single = write_image(tmp_path / "one" / "face.jpg", size=70, fmt="JPEG")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "artifact_core.explain", bundle64, str(folder), str(single),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "explain.csv")))
    assert len(rows) == 5
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 4 and [r["file"] for r in rows if r["error"]] == [str(folder / "broken.png")]
    for r in ok:
        png = Image.open(out / r["heatmap"])
        src = Image.open(r["file"])
        assert png.size == src.size and png.mode == "RGB"  # over the original image, aspect kept
        assert r["predicted_class"] in ("0", "1") and 0.0 <= float(r["prob_artifact_free"]) <= 1.0
    meta = json.loads((out / "explain.json").read_text())
    assert meta["threshold"] == 0.5 and len(meta["images"]) == 5
    assert "face.jpg.heatmap.png" in proc.stdout or (out / "face.jpg.heatmap.png").exists()
    # direct call: same rows
    rows2 = explain_paths(bundle64, [str(single)], str(tmp_path / "out2"))
    assert rows2[0]["prob_artifact_free"] == pytest.approx(float([r for r in rows if r["file"] == str(single)][0]["prob_artifact_free"]), abs=1e-6)


def test_cli_user_errors(bundle64, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "artifact_core.explain", bundle64, str(tmp_path / "nope.png"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "nope.png" in proc.stderr and "does not exist" in proc.stderr
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        explain_paths(bundle64, [str(tmp_path / "nope.png")], str(tmp_path / "o"), batch_size=0)


def _calibrated(model, x):
    model.classifier[0].momentum = None  # the head's BatchNorm statistics from x: the cells differ
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("seed,size", [(0, 128), (1, 128), (2, 200)])
def test_heatmaps_of_the_trunk_heads_are_their_evidence_on_one_scale(seed, size):
    """The multiscale head as shipped (5 members, test-time flip): each cell shows the evidence
    of the view that scored, anchored so that its strongest cells pool to the image's own
    artifact logit, with 0.5 at the decision threshold; each cell on its receptive field's centre
    (200 px: 13 cells, 16 px apart); the same images with the evidence lowered come out cold
    (a per-image scale would not change)."""
    from artifact_core.explain import heatmaps
    from artifact_core.model import build_model

    torch.manual_seed(seed)
    model = build_model(weights="bundled", head="multiscale", dropout=0.0, members=5, test_time_flip=True)
    x = torch.randn(3, 3, size, size)
    model = _calibrated(model, x)
    with torch.no_grad():
        artifact_logit = -model(x)[:, 0]  # the score, flip included
        model.test_time_flip = False
        use_mirror = (model(x.flip(-1)) < model(x))[:, 0]
        cells = torch.where(use_mirror[:, None, None], model.evidence_map(x.flip(-1))[:, 0].flip(-1),
                            model.evidence_map(x)[:, 0])
        model.test_time_flip = True
    assert float(cells.flatten(1).std(1).min()) > 1e-3, "no evidence to follow: the check would prove nothing"
    k = max(1, int(model.top_fraction * cells[0].numel() + 0.5))
    anchored = cells + (artifact_logit - cells.flatten(1).topk(k, dim=1).values.mean(1))[:, None, None]
    for threshold in (0.5, 0.8):
        heat = heatmaps(model, x, threshold=threshold)
        assert heat.shape == (3, size, size) and 0.0 <= heat.min() and heat.max() <= 1.0 and model.test_time_flip
        decision = float(np.log((1 - threshold) / threshold))
        for i in range(len(x)):
            for cy, cx in [np.unravel_index(int(cells[i].argmax()), cells[i].shape), (cells.shape[1] - 1, 0)]:
                # a cell's receptive-field centre: its own value (a mirrored view's centres are
                # the mirror images of its own grid's)
                column = size - 1 - 16 * (cells.shape[2] - 1 - cx) if use_mirror[i] else 16 * cx
                centre = heat[i, cy * 16, column]
                want = float(torch.sigmoid(anchored[i, cy, cx] - decision))
                assert abs(float(centre) - want) < 0.03, (i, (cy, cx), float(centre), want)
            # flagged at this threshold exactly when the strongest cells pool past the middle
            flagged = float(torch.sigmoid(-artifact_logit[i])) < threshold
            pooled = float((anchored[i].flatten().topk(k).values - decision).mean())
            assert (pooled > 0) == flagged
    with torch.no_grad():
        model.classifier[-1].bias.sub_(8.0)  # every cell says "clean" much more strongly
        prob_artifact = 1 - torch.sigmoid(model(x)[:, 0])
    cold = heatmaps(model, x)
    assert float(prob_artifact.max()) < 0.01 and cold.max() < 0.05


def test_evidence_maps_are_drawn_white_at_the_threshold_and_grad_cam_in_jet(bundle64, tmp_path):
    """The evidence maps' middle is the decision threshold: neutral there, red above, blue
    below; Grad-CAM (scaled per image, no threshold) keeps its rainbow."""
    from matplotlib import colormaps

    from artifact_core.explain import DEFAULT_CMAP, EVIDENCE_CMAP

    grey = np.full((8, 8, 3), 128, np.uint8)
    for heat, want in ((0.5, "neutral"), (1.0, "red"), (0.0, "blue")):
        r, g, b = overlay(grey, np.full((8, 8), heat, np.float32), cmap=EVIDENCE_CMAP)[0, 0].astype(int)
        if want == "neutral":
            assert max(r, g, b) - min(r, g, b) < 12, (r, g, b)
        elif want == "red":
            assert r > b + 60 and r > g + 60, (r, g, b)
        else:
            assert b > r + 40 and b > g + 20, (r, g, b)
    r, g, b = (np.asarray(colormaps[DEFAULT_CMAP](0.5)[:3]) * 255).astype(int)
    assert g > r and g > b  # jet's middle is green: no place for a threshold
    assert Explainer(bundle64).cmap == DEFAULT_CMAP  # a global-head bundle: Grad-CAM
    from artifact_core.model import build_model

    evidence = save_bundle(str(tmp_path / "multiscale"), build_model(weights="none", head="multiscale").eval(),
                           BundleConfig(image_size=64, head="multiscale"))
    assert Explainer(evidence).cmap == EVIDENCE_CMAP


def test_a_global_head_is_explained_by_grad_cam():
    from artifact_core.explain import heatmaps
    from artifact_core.model import build_model

    torch.manual_seed(0)
    model = build_model(weights="bundled", head="global", dropout=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    np.testing.assert_allclose(heatmaps(model, x), gradcam_heatmaps(model, x), atol=1e-6)


def test_heatmaps_of_a_flipping_model_explain_the_view_that_scored_and_restore_the_flip():
    from artifact_core.explain import heatmaps
    from artifact_core.model import build_model

    torch.manual_seed(0)
    a = torch.randn(1, 3, 64, 64)
    x = torch.cat([a, a.flip(-1)])  # one image and its mirror: exactly one scores by its mirror view
    model = _calibrated(build_model(weights="bundled", head="multiscale", dropout=0.0, test_time_flip=True),
                        torch.randn(4, 3, 64, 64))
    for explain in (heatmaps, gradcam_heatmaps):
        heat = explain(model, x)
        assert heat.shape == (2, 64, 64) and model.test_time_flip
        model.test_time_flip = False
        with torch.no_grad():
            use_mirror = (model(x.flip(-1)) < model(x))[:, 0].tolist()
        assert sorted(use_mirror) == [False, True]
        plain, mirror = explain(model, x), explain(model, x.flip(-1))[..., ::-1]
        model.test_time_flip = True
        for i, m in enumerate(use_mirror):
            assert np.allclose(heat[i], mirror[i] if m else plain[i], atol=1e-5), explain.__name__
        assert np.allclose(heat[0], heat[1][..., ::-1], atol=1e-5)  # both maps point at the same place


def test_cli_names_odd_long_and_clashing_files_and_skips_its_own_output(bundle64, tmp_path):
    from artifact_core.explain import _output_names

    folder = tmp_path / "in"
    odd = os.fsdecode(os.fsencode(str(folder)) + b"/bad\xff.png")
    write_image(Path(odd), size=40)
    write_image(folder / ("x" * 246 + ".png"), size=40)
    write_image(folder / "d1" / "a.png", size=40)
    write_image(folder / "d2" / "a.png", size=40)
    write_image(folder / "d0" / "a.png.1", size=40, fmt="PNG")  # not an image name: listed only if given
    out = folder / "explained"  # inside the input: its heatmaps must not become inputs on a rerun
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "artifact_core.explain", bundle64, str(folder), "--out", str(out)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "explain.csv", encoding="utf-8")))
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert any(r["file"].endswith("bad\\xff.png") for r in rows)
    assert len({r["heatmap"] for r in rows}) == 4 and all(len(r["heatmap"].encode()) <= 255 for r in rows)
    names = _output_names(["/p/A.png", "/q/a.png", "/r/a.png.1", "/s/a.png"])
    assert len({n.casefold() for n in names}) == 4


def test_the_cli_gives_a_non_finite_probability_an_error_row_as_scoring_does(tmp_path):
    from artifact_core.bundle import BundleConfig, save_bundle

    model = calibrated_model()
    with torch.no_grad():
        model.classifier[1].bias.fill_(float("nan"))
    bundle = save_bundle(str(tmp_path / "nan"), model, BundleConfig(image_size=32, threshold=0.5))
    write_image(tmp_path / "in" / "a.png", size=40)
    rows = explain_paths(bundle, [str(tmp_path / "in" / "a.png")], str(tmp_path / "out"))
    assert rows[0]["predicted_class"] == -1 and rows[0]["error"] == "the model returned a non-finite probability"
    json.loads((tmp_path / "out" / "explain.json").read_text())  # valid JSON: no bare NaN


def test_the_output_folder_is_never_an_input_folder_nor_replaces_an_input(bundle64, tmp_path):
    from artifact_core.explain import expand_inputs, explain_paths

    folder = tmp_path / "in"
    write_image(folder / "a.png", size=40)
    write_image(folder / "a.png.heatmap.png", size=40)  # an image named like a.png's heatmap
    with pytest.raises(ValueError, match="both a folder to explain and the output folder"):
        expand_inputs([str(folder)], exclude=[str(folder)])
    # given as files, an output would still replace one of them
    with pytest.raises(ValueError, match="'a.png.heatmap.png' there is an image to explain"):
        explain_paths(bundle64, [str(folder / "a.png"), str(folder / "a.png.heatmap.png")], str(folder))
    assert (folder / "a.png.heatmap.png").read_bytes()[:4] == b"\x89PNG"
    rows = explain_paths(bundle64, [str(folder / "a.png")], str(tmp_path / "out"))
    assert len(rows) == 1 and (tmp_path / "out" / rows[0]["heatmap"]).is_file()
