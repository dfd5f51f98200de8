"""Where the model sees the artifact: heatmaps and overlays.

The multiscale and local heads decide from per-cell evidence (an artifact logit for each 16 px
cell, the image's score pooled from the strongest cells), so their heatmap is that evidence
itself (:func:`evidence_heatmaps`): each cell's logit, anchored to the image's score, through
a sigmoid centred on the decision threshold; one scale for every image, so a clean image
comes out cold and a flagged one's strongest cells pass the middle.

The global head pools the whole map first, so it has no cells of its own: its heatmap is
Grad-CAM (Captum, :func:`gradcam_heatmaps`) of the artifact class. The bundle's model has one
logit, ``sigmoid(logit) = P(artifact-free)``; evidence for the *artifact* class is the
gradient of the negated logit, so Grad-CAM runs on a wrapper whose output is ``-logit``; only
positive evidence is kept (ReLU), upsampled to the input size and scaled to [0, 1] per image.

In-process use on files or folders::

    python -m artifact_core.explain runs/demo/model faces/ one.png --out explained/
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from artifact_core.bundle import Bundle, load_bundle
from artifact_core.data import IMAGE_EXTENSIONS, LABEL_NAMES, list_images
from artifact_core.decode import decode_array
from artifact_core.images import ImageDecodeError, ImageSource, decode_image
from artifact_core.storage import FileReadError, display_path, read_file_bytes, redact_uri
from artifact_core.transforms import normalize

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.45
DEFAULT_CMAP = "jet"
#: The evidence maps' colours: diverging, white at 0.5 (the decision threshold), so a cell is
#: red only where it reads as artifact (jet would show the threshold itself green).
EVIDENCE_CMAP = "coolwarm"
#: The CLI's overlays keep the image's aspect at most this many px on the longer side.
OVERLAY_MAX_SIDE = 1024


def cell_geometry(layer: nn.Module) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where ``layer``'s output cells sit on its input: ((stride, offset) of rows, of columns),
    cell ``j`` being centred on input pixel ``stride * j + offset``.

    Composed over the convolutions and poolings of ``layer`` in the order they are registered
    (the order a sequential trunk such as MobileNetV2's runs them; residual additions keep the
    geometry). A 3x3 stride-2 convolution with padding 1 centres its output ``j`` on input
    ``2j``, so MobileNetV2's stride-32 cell ``j`` lies on pixel ``32j``, not on the middle of
    the 32 px block ``[32j, 32j + 32)`` that a plain resize of the map assumes.
    """
    def along(value: Any, axis: int) -> int:
        return int(value[axis] if isinstance(value, (tuple, list)) else value)

    geometry = [(1.0, 0.0), (1.0, 0.0)]
    for module in layer.modules():
        if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        for axis in (0, 1):
            kernel = along(module.kernel_size, axis)
            # poolings default their stride to the kernel
            stride = along(kernel if module.stride is None else module.stride, axis)
            dilation = along(getattr(module, "dilation", 1), axis)
            padding = module.padding
            if padding == "valid":
                padding = 0
            elif padding == "same":  # stride 1 only; PyTorch pads an even span's extra pixel at the end
                padding = dilation * (kernel - 1) // 2
            reach = dilation * (kernel - 1) / 2.0 - along(padding, axis)
            step, offset = geometry[axis]
            geometry[axis] = (step * stride, offset + step * reach)
    return geometry[0], geometry[1]


def upsample_cells(cells: torch.Tensor, size: tuple[int, int],
                   geometry: tuple[tuple[float, float], tuple[float, float]]) -> torch.Tensor:
    """A (N, C, h, w) map of cells as (N, C, H, W) pixels: each cell's value at its receptive
    field's centre (``geometry`` from :func:`cell_geometry`), bilinear between centres and
    constant beyond the outermost ones.

    A map whose size does not fit the geometry (a layer that is not a plain chain of
    convolutions) is stretched over the image instead, as a resize would.
    """
    height, width = size
    (step_y, offset_y), (step_x, offset_x) = geometry
    rows, cols = cells.shape[-2:]
    fits = all(math.floor((side - 1) / step) + 1 >= n >= math.ceil(side / step) - 1
               for side, step, n in ((height, step_y, rows), (width, step_x, cols)))
    if not fits:
        return nn.functional.interpolate(cells, size=(height, width), mode="bilinear", align_corners=False)

    def axis(pixels: int, step: float, offset: float, n: int) -> torch.Tensor:
        # pixel -> cell coordinate -> grid_sample's [-1, 1] with align_corners=True (cell centres)
        where = (torch.arange(pixels, dtype=torch.float32, device=cells.device) - offset) / step
        return where * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros_like(where)

    ys, xs = axis(height, step_y, offset_y, rows), axis(width, step_x, offset_x, cols)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, (x, y))
    grid = grid.unsqueeze(0).expand(cells.shape[0], -1, -1, -1)
    return nn.functional.grid_sample(cells.float(), grid, mode="bilinear", padding_mode="border",
                                     align_corners=True)


class _ArtifactLogit(nn.Module):
    """``-logit``: larger means more artifact (the model's logit is for artifact-free)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model(x)


@contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and no test-time flip for the duration; all restored afterwards.

    Grad-CAM needs gradients with respect to a layer's activations only; parameter
    gradients would cost time and memory and leave ``.grad`` tensors behind.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # One view per pass: with a test-time flip the layer would see the image and its mirror
    # in one batch, which Grad-CAM cannot attribute to one image (gradcam_heatmaps picks the view).
    flip = getattr(model, "test_time_flip", None)
    if flip:
        model.test_time_flip = False
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if flip:
            model.test_time_flip = flip
        model.train(was_training)


def gradcam_heatmaps(model: nn.Module, x: torch.Tensor, *, layer: nn.Module | None = None,
                     micro_batch: int = 8) -> np.ndarray:
    """Grad-CAM of the artifact class for a normalized batch.

    Args:
        model: the bundle's MobileNetV2 (one logit for "artifact-free"). With a test-time flip,
            each image's map is of the view (the image or its mirror) that gave its score,
            mirrored back where it was the mirror.
        x: normalized images, (N, 3, H, W) float.
        layer: the layer to explain (default: ``model.features``, the map the head reads: the
            last feature block's output, joined with the stride-8 one for the multiscale head).
        micro_batch: images per backward pass (bounds memory on large batches).

    Returns:
        float32 array (N, H, W) in [0, 1]; each map is scaled by its own maximum.
    """
    from captum.attr import LayerGradCam

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a normalized (N, 3, H, W) batch, got shape {tuple(x.shape)}")
    layer = model.features if layer is None else layer
    geometry = cell_geometry(layer)
    device = next(model.parameters()).device
    height, width = int(x.shape[2]), int(x.shape[3])
    out = []
    flips = bool(getattr(model, "test_time_flip", False))
    with _explaining(model):
        cam = LayerGradCam(_ArtifactLogit(model), layer)
        for chunk in x.split(max(1, micro_batch)):
            # A fresh tensor outside inference mode: tensors made under inference_mode cannot
            # take part in autograd.
            chunk = chunk.detach().clone().to(device).float()
            mirrored = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            if flips:
                # Explain the view whose evidence gave the score (the model keeps the lower
                # artifact-free logit of the image and its mirror), its map mirrored back.
                with torch.no_grad():
                    mirrored = (model(chunk.flip(-1)) < model(chunk))[:, 0]
                chunk = torch.where(mirrored[:, None, None, None], chunk.flip(-1), chunk)
            attr = cam.attribute(chunk, target=0, relu_attributions=True)
            attr = upsample_cells(attr.float(), (height, width), geometry)
            attr = torch.where(mirrored[:, None, None, None], attr.flip(-1), attr)
            out.append(attr[:, 0].detach().float().cpu())
    maps = torch.cat(out).clamp_(min=0)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    maps = torch.where(peak > 1e-12, maps / peak, torch.zeros_like(maps))
    return maps.clamp_(0, 1).numpy().astype(np.float32)


def evidence_heatmaps(model: nn.Module, x: torch.Tensor, *, threshold: float = 0.5,
                      micro_batch: int = 8) -> np.ndarray:
    """The per-cell artifact evidence of a multiscale or local head, as a heatmap.

    Args:
        model: a :class:`~artifact_core.model.LocalEvidenceNet` bundle model. With a test-time
            flip, each image's map is of the view (the image or its mirror) that gave its
            score, mirrored back where it was the mirror.
        x: normalized images, (N, 3, H, W) float.
        threshold: the decision threshold on P(artifact-free) (the bundle's, or scoring's
            ``--threshold``): 0.5 on the map is where an image is flagged.
        micro_batch: images per pass.

    Returns:
        float32 array (N, H, W) in [0, 1]: ``sigmoid(cell logit - decision logit)`` of each cell
        (the members' mean artifact logit, shifted by one constant per image so that the
        mean of its strongest cells, the pooling the score uses, equals the image's own
        artifact logit: with several members the mean map pools a little lower than the
        members do), each cell's value on its receptive field's centre (16 px apart), bilinear
        between them (:func:`upsample_cells`). One scale for all
        images: an image whose strongest cells pass 0.5 is one the threshold flags, and a
        clean image's cells stay low.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a normalized (N, 3, H, W) batch, got shape {tuple(x.shape)}")
    # (--threshold may be 0 or above 1: flags nothing or everything; the scale still needs a middle)
    threshold = min(max(float(threshold), 1e-6), 1.0 - 1e-6)
    device = next(model.parameters()).device
    height, width = int(x.shape[2]), int(x.shape[3])
    flips = bool(getattr(model, "test_time_flip", False))
    geometry = cell_geometry(model.features)
    # P(artifact-free) < threshold flags an image: artifact logit > logit(1 - threshold)
    decision = math.log((1.0 - threshold) / threshold)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for chunk in x.split(max(1, micro_batch)):
                chunk = chunk.to(device).float()
                features = model.trunk(chunk)
                cells = model.classifier(features).mean(dim=1, keepdim=True)  # as evidence_map, one trunk pass
                score = -model.head(features)  # the image's artifact logit (eval: the members' mean)
                mirrored = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                if flips:
                    # The view whose evidence gave the score: the lower artifact-free logit. Its
                    # cells stay in its own frame until they are pixels: a mirrored cell's centre
                    # is not on the unmirrored grid unless the width is a multiple of 16.
                    mirror_features = model.trunk(chunk.flip(-1))
                    mirror_score = -model.head(mirror_features)
                    mirrored = (mirror_score > score)[:, 0]
                    mirror_cells = model.classifier(mirror_features).mean(dim=1, keepdim=True)
                    cells = torch.where(mirrored[:, None, None, None], mirror_cells, cells)
                    score = torch.maximum(score, mirror_score)
                flat = cells.flatten(1).float()
                k = max(1, int(model.top_fraction * flat.shape[1] + 0.5))
                pooled = flat.topk(k, dim=1).values.mean(dim=1)
                cells = cells.float() + (score[:, 0].float() - pooled)[:, None, None, None] - decision
                # Each cell's value on its receptive field's centre (about 16 j px), not on the
                # middle of a 16 px block: a resized map would sit half a cell off.
                heat = torch.sigmoid(upsample_cells(cells, (height, width), geometry))
                heat = torch.where(mirrored[:, None, None, None], heat.flip(-1), heat)
                out.append(heat[:, 0].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).clamp_(0, 1).numpy().astype(np.float32)


def heatmaps(model: nn.Module, x: torch.Tensor, *, threshold: float = 0.5, micro_batch: int = 8) -> np.ndarray:
    """The heatmap of where ``model`` sees the artifact: its own per-cell evidence for the
    multiscale and local heads (:func:`evidence_heatmaps`, 0.5 at ``threshold``), Grad-CAM for
    the global head."""
    from artifact_core.model import LocalEvidenceNet

    if isinstance(model, LocalEvidenceNet):
        return evidence_heatmaps(model, x, threshold=threshold, micro_batch=micro_batch)
    return gradcam_heatmaps(model, x, micro_batch=micro_batch)


def overlay(image: np.ndarray | Image.Image, heatmap: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
            cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Args:
        image: RGB uint8 (H, W, 3) array or PIL image.
        heatmap: (h, w) floats in [0, 1]; resized (bilinear) to the image when sizes differ.
        alpha: weight of the heatmap colours (0 = image only, 1 = heatmap only).
        cmap: a matplotlib colormap name.

    Returns:
        RGB uint8 array (H, W, 3).
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB (H, W, 3) image, got shape {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heat.shape != img.shape[:2]:
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((img.shape[1], img.shape[0]), Image.BILINEAR))
        heat = np.clip(heat, 0.0, 1.0)
    colours = colormaps[cmap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * img.astype(np.float32) + alpha * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


class Explainer:
    """A loaded bundle that returns probabilities and artifact heatmaps for images.

    Uses the same pixels as scoring: the shared decoder at the bundle's size (which shrinks a
    large JPEG in the decoder and box-reduces other large images before the resize, so a
    plain resize of the full image would differ by up to ~20 levels), then the normalization.
    """

    def __init__(self, bundle: Bundle | str, *, device: str | torch.device = "cpu", micro_batch: int = 8,
                 threshold: float | None = None) -> None:
        self.device = torch.device(device)
        self.bundle = load_bundle(bundle, device=self.device) if isinstance(bundle, str) else bundle
        self.model = self.bundle.model.to(self.device).eval()
        cfg = self.bundle.config
        # the decision threshold on P(artifact-free): the bundle's, or the one scoring used
        self.threshold = float(cfg.threshold if threshold is None else threshold)
        self.image_size = int(cfg.image_size)
        self.normalize = normalize(mean=tuple(cfg.mean), std=tuple(cfg.std))
        self.micro_batch = micro_batch
        from artifact_core.model import LocalEvidenceNet

        #: the colours its heatmaps are drawn in (:func:`overlay`'s ``cmap``)
        self.cmap = EVIDENCE_CMAP if isinstance(self.model, LocalEvidenceNet) else DEFAULT_CMAP

    def pixels(self, source: ImageSource, *, name: str | None = None) -> torch.Tensor:
        """A file (path or bytes) -> the uint8 (3, S, S) tensor scoring feeds the model (before
        normalizing): :func:`~artifact_core.decode.decode_array`, the scoring decoder itself.

        Raises:
            ImageDecodeError: the file cannot be decoded.
        """
        return torch.from_numpy(decode_array(source, self.image_size, name=name))

    def explain_uint8(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) uint8 from :meth:`pixels` -> (P(artifact-free) (N,), heatmaps (N, S, S))."""
        x = self.normalize(images).to(self.device)
        with torch.inference_mode():
            prob = torch.sigmoid(self.model(x).squeeze(1).float()).cpu().numpy().astype(np.float64)
        return prob, heatmaps(self.model, x, threshold=self.threshold, micro_batch=self.micro_batch)


def _overlay_png(image: Image.Image, heatmap: np.ndarray, path: str, cmap: str) -> None:
    Image.fromarray(overlay(image, heatmap, cmap=cmap)).save(path)


def explain_paths(bundle_dir: str, paths: Sequence[str], out_dir: str, *, batch_size: int = 16) -> list[dict]:
    """Write ``<name>.heatmap.png`` per image and ``explain.csv`` / ``explain.json`` into ``out_dir``.

    A file that cannot be decoded gets a row with its error and no heatmap.

    Returns:
        One dict per input path: file, heatmap (file name or ""), prob_artifact_free,
        predicted_class (0 artifact, 1 artifact-free, -1 error), confidence, error.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    names = _output_names(paths)
    # What this writes must never replace what it reads: an --out that is an input's folder
    # holds inputs named like the heatmaps (and each rerun would explain the last one's).
    # (by inode where the output exists: a case-insensitive disk names one file two ways)
    def ident(p: str) -> Any:
        try:
            st = os.stat(p)
            return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(p)
        except OSError:
            return os.path.realpath(p)

    inputs = {ident(p) for p in paths} | {os.path.realpath(p) for p in paths}
    written = [os.path.join(out_dir, n) for n in (*(f"{n}.heatmap.png" for n in names), "explain.csv", "explain.json")]
    clash = next((w for w in written if os.path.realpath(w) in inputs or ident(w) in inputs), None)
    if clash is not None:
        raise ValueError(f"--out {out_dir!r}: {os.path.basename(clash)!r} there is an image to explain and would be "
                         f"replaced by an output; choose another folder")
    explainer = Explainer(bundle_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk = list(zip(paths[start:start + batch_size], names[start:start + batch_size]))
        decoded = []
        for path, name in chunk:
            try:
                # Read once; the preview is decoded here too, so a file that fails either way gets its row.
                data = read_file_bytes(path)
                decoded.append((path, name, explainer.pixels(data, name=path),
                                decode_image(data, name=path, max_side=OVERLAY_MAX_SIDE)))
            except (ImageDecodeError, FileReadError) as exc:
                rows.append({"file": path, "heatmap": "", "prob_artifact_free": None, "predicted_class": -1,
                             "confidence": None, "error": exc.reason})
            except OSError as exc:  # (a file that vanished or cannot be read: its row, not the run's end)
                rows.append({"file": path, "heatmap": "", "prob_artifact_free": None, "predicted_class": -1,
                             "confidence": None, "error": f"cannot read: {exc.strerror or exc}"})
        if not decoded:
            continue
        probs, maps = explainer.explain_uint8(torch.stack([x for _, _, x, _ in decoded]))
        for (path, name, _, preview), prob, heat in zip(decoded, probs, maps):
            if not np.isfinite(prob):  # as scoring: an error row, not an "artifact" of NaN confidence
                rows.append({"file": path, "heatmap": "", "prob_artifact_free": None, "predicted_class": -1,
                             "confidence": None, "error": "the model returned a non-finite probability"})
                continue
            pred = int(prob >= explainer.threshold)
            heatmap_file = f"{name}.heatmap.png"
            # Over the image with its aspect kept (the map is resized to it), at most
            # OVERLAY_MAX_SIDE px: a 64 MP original would take gigabytes to blend.
            _overlay_png(preview, heat, os.path.join(out_dir, heatmap_file), explainer.cmap)
            rows.append({"file": path, "heatmap": heatmap_file, "prob_artifact_free": float(prob),
                         "predicted_class": pred, "confidence": float(prob if pred == 1 else 1.0 - prob),
                         "error": ""})
    order = {p: i for i, p in enumerate(paths)}
    rows.sort(key=lambda r: order[r["file"]])
    for r in rows:  # a name with bytes that are not UTF-8 is written as \xNN, as scoring writes it
        r["file"] = display_path(r["file"])
    fields = ["file", "heatmap", "predicted_class", "confidence", "prob_artifact_free", "error"]
    # UTF-8 whatever the locale: a name the locale cannot encode must not fail after the heatmaps
    with open(os.path.join(out_dir, "explain.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "explain.json"), "w", encoding="utf-8") as f:
        # (credentials in a bundle URI blanked out, as in scoring's summary)
        json.dump({"model": redact_uri(explainer.bundle.path), "threshold": explainer.threshold,
                   "labels": {str(k): v for k, v in LABEL_NAMES.items()}, "images": rows}, f, indent=2)
    return rows


#: bytes of an output stem at most: with ".heatmap.png" it stays under the usual 255-byte limit
_MAX_STEM_BYTES = 200


def _output_names(paths: Sequence[str]) -> list[str]:
    """File stems for the outputs, distinct (also ignoring case, for case-insensitive disks):
    a repeated name (same file name in two folders) gets a suffix, an over-long one is cut and
    keeps a hash of its path, undecodable bytes are spelled out as ``\\xNN``."""
    taken: set[str] = set()
    names = []
    for p in paths:
        base = display_path(os.path.basename(p))
        if len(base.encode("utf-8")) > _MAX_STEM_BYTES:
            digest = hashlib.sha1(os.fsencode(p)).hexdigest()[:12]
            base = base.encode("utf-8")[:_MAX_STEM_BYTES - 13].decode("utf-8", "ignore") + "." + digest
        name, n = base, 0
        while name.casefold() in taken:
            n += 1
            name = f"{base}.{n}"
        taken.add(name.casefold())
        names.append(name)
    return names


def expand_inputs(items: Sequence[str], *, exclude: Sequence[str] = ()) -> list[str]:
    """Files as given, folders expanded recursively to their image files (not entering the
    ``exclude`` folders: the CLI's own ``--out``, whose heatmaps are no input).

    Raises:
        FileNotFoundError: an item does not exist.
        ValueError: nothing to explain, or a folder to explain is an ``exclude`` folder itself.
    """
    paths: list[str] = []
    excluded = {os.path.realpath(e) for e in exclude}
    for item in items:
        item = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(item):
            if os.path.realpath(item) in excluded:
                # (its heatmaps would be explained as images on the next run, and could replace one)
                raise ValueError(f"{item!r} is both a folder to explain and the output folder; "
                                 f"choose another --out")
            paths.extend(list_images(item, exclude=exclude))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item!r} does not exist (expected an image file or a folder)")
    if not paths:
        raise ValueError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in {list(items)}")
    return paths


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="model bundle folder")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for <name>.heatmap.png, explain.csv and explain.json")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Explain the given images; prints one line per image."""
    from artifact_core.jobs_common import run_job

    args = get_args_parser().parse_args(argv)

    def _run(a: argparse.Namespace) -> None:
        rows = explain_paths(a.bundle, expand_inputs(a.inputs, exclude=[a.out]), a.out, batch_size=a.batch_size)
        for r in rows:
            if r["error"]:
                print(f"{r['file']}: error: {r['error']}")
            else:
                print(f"{r['file']}: {LABEL_NAMES[r['predicted_class']]} (P(artifact) {1 - r['prob_artifact_free']:.3f}) "
                      f"-> {os.path.join(a.out, r['heatmap'])}")
        print(f"wrote {len(rows)} row(s) to {os.path.join(a.out, 'explain.csv')}")

    return run_job(_run, args, log)


if __name__ == "__main__":
    sys.exit(main())
