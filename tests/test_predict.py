"""Engines: ONNX export matches PyTorch, int8 export and its metrics, engine choice (stale ONNX
files and bundles in object storage included), GPU dtype."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from artifact_core import export_onnx as export_mod
from artifact_core.bundle import ONNX_SOURCE_KEY, BundleConfig, read_bundle_config, save_bundle
from artifact_core.data import list_images, parse_label
from artifact_core.decode import decode_paths
from artifact_core.model import build_model
from artifact_core.predict import (ArtifactPredictor, DecodingPredictor, OnnxEngine, StaleOnnxError,
                                   predict_paths, resolve_engine)
from conftest import calibrated_model, make_easy_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Labelled images of several sizes and formats (real decode: JPEG draft, PNG reduce)."""
    root = make_easy_folder(tmp_path_factory.mktemp("imgs"), n=16, size=40)
    rng = np.random.default_rng(1)
    for i in range(4):
        arr = rng.normal(120, 40, (300 + 40 * i, 260, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"photo_{i}_{i % 2}.jpg", quality=85)
    return list_images(root)


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory) -> str:
    model = calibrated_model()
    torch.nn.init.normal_(model.classifier[1].weight, std=0.02)  # varied, unsaturated scores
    return save_bundle(str(tmp_path_factory.mktemp("b") / "model"), model, BundleConfig(image_size=32, threshold=0.5))


@pytest.fixture(scope="module")
def onnx_bundle(torch_bundle, images, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("onnx") / "model")
    shutil.copytree(torch_bundle, path)
    export_mod.export_onnx(path, images, [parse_label(p) for p in images], int8=True)
    return path


def test_onnx_fp32_equals_torch_on_decoded_images(onnx_bundle, images):
    metrics = json.load(open(os.path.join(onnx_bundle, "metrics.json")))["onnx"]
    assert metrics["opset"] == export_mod.OPSET and metrics["max_abs_logit_diff"] < 1e-3
    torch_p = predict_paths(ArtifactPredictor(onnx_bundle, engine="torch"), images)
    onnx_pred = ArtifactPredictor(onnx_bundle, engine="onnx", num_threads=1)
    assert onnx_pred.engine_name == "onnx" and onnx_pred.precision == "fp32"
    onnx_p = predict_paths(onnx_pred, images, batch_size=5)
    assert torch_p.std() > 1e-3, "scores do not vary: the comparison would prove nothing"
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-4, rtol=0)
    # the actor's batch contract: uint8 images with error rows
    batch = {"image": np.zeros((2, 3, 32, 32), dtype=np.uint8), "error": np.array(["", "broken"], dtype=object),
             "path": np.array(["a", "b"], dtype=object), "filename": np.array(["a", "b"], dtype=object)}
    out = onnx_pred(batch)
    assert out["predicted_class"][1] == -1 and np.isnan(out["prob_artifact_free"][1])
    assert out["predicted_class"][0] in (0, 1)


def test_onnx_actor_and_scoring_driver_start_without_torch(onnx_bundle, images):
    """The fused ONNX actor (decode + ONNX Runtime) never imports torch (~0.9 GB and seconds per
    actor), nor does the scoring job's driver: its entry script, the library and the stage-cost probe."""
    root = os.path.dirname(images[0])
    code = ("import importlib.util, os, sys, numpy as np\n"
            "spec = importlib.util.spec_from_file_location('score_job', 'jobs/score.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "from artifact_core.config import ScoreConfig\n"
            "from artifact_core.scoring import measure_stage_costs\n"
            f"decode_ms, infer_ms = measure_stage_costs(ScoreConfig(model={onnx_bundle!r}, input={root!r}, output='o'), "
            f"{images!r}, None, 32)\n"
            "assert decode_ms > 0 and infer_ms > 0, (decode_ms, infer_ms)\n"
            "from artifact_core.predict import DecodingPredictor\n"
            f"p = DecodingPredictor({onnx_bundle!r}, image_size=32, root={root!r}, engine='auto', lanes=2, chunk=2, num_threads=1)\n"
            f"raw = np.array([os.fsencode(x) for x in {images[:6]!r}] + [b'{root}/gone.png'], dtype=object)\n"
            "out = p({'raw_path': raw})\n"
            "assert p.predictor.engine_name == 'onnx' and p.predictor.engine.session.get_session_options().intra_op_num_threads == 1\n"
            "assert (out['predicted_class'][:6] >= 0).all() and out['predicted_class'][6] == -1, out\n"
            "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print(' '.join(f'{x:.6f}' for x in out['prob_artifact_free'][:6]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = predict_paths(ArtifactPredictor(onnx_bundle, engine="torch"), images[:6])
    np.testing.assert_allclose([float(v) for v in out.stdout.split()], expected, atol=1e-4)
    # lanes are single-threaded ONNX sessions; torch's thread pool is per process
    with pytest.raises(ValueError, match="lanes > 1 needs the ONNX engine"):
        DecodingPredictor(onnx_bundle, image_size=32, root=root, engine="torch", lanes=2)


@pytest.mark.parametrize("head, flip, members", [("local", False, 1), ("multiscale", False, 1), ("multiscale", True, 3)])
def test_trunk_head_onnx_equals_torch(images, tmp_path, head, flip, members):
    """ONNX equals torch, the test-time flip (image and mirror in one batch) and head members included."""
    torch.manual_seed(0)
    model = build_model(weights="bundled", head=head, test_time_flip=flip, members=members)  # ImageNet trunk: varied features
    # Head BatchNorm statistics from these images, so the logits are neither all huge nor
    # all alike (saturated probabilities would make the comparison prove nothing).
    model.classifier[0].momentum = None
    model.train()
    with torch.no_grad():
        x = torch.from_numpy(decode_paths(images, 64)).float() / 255
        model(((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)))
    model.eval()
    path = save_bundle(str(tmp_path / head), model, BundleConfig(image_size=64, head=head, test_time_flip=flip,
                                                                  head_members=members))
    export_mod.export_onnx(path, images, [parse_label(p) for p in images])
    torch_p = predict_paths(ArtifactPredictor(path, engine="torch"), images)
    onnx_p = predict_paths(ArtifactPredictor(path, engine="onnx", num_threads=1), images, batch_size=5)
    assert torch_p.std() > 1e-4, "scores do not vary: the comparison would prove nothing"
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-4, rtol=0)


def test_int8_export_reports_metrics_and_scores(onnx_bundle, images):
    metrics = json.load(open(os.path.join(onnx_bundle, "metrics.json")))["onnx"]
    int8 = metrics["int8"]
    assert int8["file"] == "model.int8.onnx" and int8["evaluated_on"] == len(images)
    for part in (int8["validation"], metrics["fp32_validation"]):
        assert set(part) == {"micro_f1", "macro_f1", "recall_artifact"} and 0 <= part["micro_f1"] <= 1
    calibration = json.load(open(os.path.join(onnx_bundle, "calibration.json")))
    assert calibration["paths"] == images and len(calibration["calibrated_on"]) == int8["calibration_images"]
    p8 = predict_paths(ArtifactPredictor(onnx_bundle, precision="int8"), images)
    p32 = predict_paths(ArtifactPredictor(onnx_bundle), images)  # auto: ONNX fp32 on CPU
    assert np.abs(p8 - p32).max() < 0.2 and not np.array_equal(p8, p32)
    assert np.isclose(np.abs(p8 - p32).max(), int8["max_abs_prob_diff_vs_fp32"], atol=1e-4)
    # the figures reported are those of these scores at the bundle's threshold
    from artifact_core.metrics import classification_metrics, predict_labels

    labels, threshold = [parse_label(p) for p in images], read_bundle_config(onnx_bundle).threshold
    for probs, part in ((p8, int8["validation"]), (p32, metrics["fp32_validation"])):
        expected = classification_metrics(labels, predict_labels(probs, threshold))
        assert part["micro_f1"] == pytest.approx(expected["micro_f1"]) and part["macro_f1"] == pytest.approx(expected["macro_f1"])


def test_cli_for_an_older_bundle_uses_named_calibration_images(onnx_bundle, tmp_path, capsys):
    old = str(tmp_path / "old")
    shutil.copytree(onnx_bundle, old)
    for name in ("model.onnx", "model.int8.onnx"):
        os.remove(os.path.join(old, name))
    args = export_mod.get_args_parser().parse_args([old, "--int8", "--max-calibration-images", "8"])
    assert export_mod.main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["int8"]["calibration_images"] == 8 and os.path.isfile(os.path.join(old, "model.int8.onnx"))
    assert _recorded_source(os.path.join(old, "model.onnx")) == _sha256(os.path.join(old, "model.pt"))
    assert _recorded_source(os.path.join(old, "model.int8.onnx")) == _sha256(os.path.join(old, "model.pt"))
    # an fp32-only re-export keeps the int8 model's figures beside it
    assert export_mod.main(export_mod.get_args_parser().parse_args([old])) == 0
    metrics = json.loads(open(os.path.join(old, "metrics.json")).read())
    assert metrics["onnx"]["int8"]["calibration_images"] == 8
    # bad arguments: one line, exit status 2, nothing written
    capsys.readouterr()
    for argv, said in (([str(tmp_path / "nope")], "does not exist"), (["s3://bucket/model"], "local copy"),
                       ([old, "--max-calibration-images", "0"], "at least 1")):
        assert export_mod.main(export_mod.get_args_parser().parse_args(argv)) == 2
        assert said in capsys.readouterr().err


def test_export_failures_keep_the_torch_bundle(torch_bundle, images, tmp_path, monkeypatch):
    b = str(tmp_path / "b")
    shutil.copytree(torch_bundle, b)

    def broken(*a, **k):
        raise RuntimeError("quantization unsupported here")

    monkeypatch.setattr(export_mod, "_quantize_int8", broken)
    info = export_mod.export_onnx_or_log(b, images[:4], [parse_label(p) for p in images[:4]])
    assert "quantization unsupported" in info["int8"]["error"]
    assert os.path.isfile(os.path.join(b, "model.onnx")) and not os.path.exists(os.path.join(b, "model.int8.onnx"))
    # an exporter that fails outright: recorded, not raised; model.pt untouched
    monkeypatch.setattr(export_mod, "_export_fp32", broken)
    c = str(tmp_path / "c")
    shutil.copytree(torch_bundle, c)
    shutil.copy(os.path.join(b, "model.onnx"), c)  # left from an earlier model: must not survive
    info = export_mod.export_onnx_or_log(c, images[:4])
    assert "quantization unsupported" in info["error"] and not os.path.exists(os.path.join(c, "model.onnx"))
    assert json.load(open(os.path.join(c, "metrics.json")))["onnx"] == info
    assert ArtifactPredictor(c).engine_name == "torch"
    monkeypatch.undo()
    # int8 asked for without a calibration image: refused, after the fp32 model is written
    with pytest.raises(ValueError, match="calibration.*model.onnx was written"):
        export_mod.export_onnx(c, None, int8=True)
    assert os.path.isfile(os.path.join(c, "model.onnx")) and not os.path.exists(os.path.join(c, "model.int8.onnx"))
    # training's export: no calibration image decodes (moved since): fp32 all the same, int8 skipped and said so
    d = str(tmp_path / "d")
    shutil.copytree(torch_bundle, d)
    info = export_mod.export_onnx_or_log(d, [str(tmp_path / "gone.png")], [0])
    assert os.path.isfile(os.path.join(d, "model.onnx")) and "decodes" in info["int8"]["skipped"]


def test_resolve_engine(torch_bundle, onnx_bundle):
    assert resolve_engine(torch_bundle) == "torch"  # auto without model.onnx
    assert resolve_engine(onnx_bundle) == "onnx"
    assert resolve_engine(onnx_bundle, use_gpu=True) == "torch"
    assert resolve_engine(onnx_bundle, "torch") == "torch"
    assert resolve_engine(onnx_bundle, "auto", "int8") == "onnx"
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        resolve_engine(torch_bundle, "onnx")
    with pytest.raises(FileNotFoundError, match="model.int8.onnx"):
        resolve_engine(torch_bundle, "auto", "int8")
    with pytest.raises(ValueError, match="int8"):
        resolve_engine(onnx_bundle, "torch", "int8")
    with pytest.raises(ValueError, match="--use-gpu"):
        resolve_engine(onnx_bundle, "onnx", use_gpu=True)
    with pytest.raises(ValueError, match="--engine must be one of"):
        resolve_engine(onnx_bundle, "tensorrt")
    with pytest.raises(ValueError, match="--precision"):
        resolve_engine(onnx_bundle, "auto", "fp16")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _recorded_source(path: str) -> str | None:
    return {p.key: p.value for p in onnx.load(path).metadata_props}.get(ONNX_SOURCE_KEY)


@pytest.fixture
def stale_bundle(onnx_bundle, tmp_path) -> str:
    """The ONNX bundle with another model.pt, its ONNX files as they were: new weights copied or
    uploaded into it by hand (save_bundle itself deletes the ONNX files before new weights)."""
    path = str(tmp_path / "stale")
    shutil.copytree(onnx_bundle, path)
    save_bundle(path, calibrated_model(seed=1), read_bundle_config(path))
    # (what an earlier export derived from the old weights goes before the new weights are written)
    assert not any(os.path.exists(os.path.join(path, n)) for n in ("model.onnx", "model.int8.onnx", "calibration.json"))
    for name in ("model.onnx", "model.int8.onnx", "calibration.json"):
        shutil.copy(os.path.join(onnx_bundle, name), path)
    return path


def test_onnx_files_record_the_model_pt_they_were_made_from(onnx_bundle):
    weights = _sha256(os.path.join(onnx_bundle, "model.pt"))
    assert _recorded_source(os.path.join(onnx_bundle, "model.onnx")) == weights
    assert _recorded_source(os.path.join(onnx_bundle, "model.int8.onnx")) == weights


def test_onnx_of_other_weights_is_never_run(stale_bundle, images, caplog):
    """auto falls back to torch with a warning naming the file; ONNX asked for is an error."""
    with caplog.at_level(logging.WARNING, logger="artifact_core.predict"):
        assert resolve_engine(stale_bundle) == "torch"
        assert ArtifactPredictor(stale_bundle, num_threads=1).engine_name == "torch"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"{stale_bundle}/model.onnx was exported from another model.pt" in warned[0]
    assert f"python -m artifact_core.export_onnx {stale_bundle}" in warned[0]
    with pytest.raises(StaleOnnxError, match=r"model\.onnx was exported from another model\.pt.*export_onnx"):
        resolve_engine(stale_bundle, "onnx")
    with pytest.raises(StaleOnnxError, match=r"model\.int8\.onnx was exported .*--int8"):
        resolve_engine(stale_bundle, "auto", "int8")  # int8 exists only as ONNX: no fallback
    with pytest.raises(StaleOnnxError, match=r"model\.onnx"):
        OnnxEngine(stale_bundle)  # the engine checks the bytes it runs, whoever resolved it
    export_mod.export_onnx(stale_bundle)  # fp32 re-exported; int8 still from the old weights
    assert resolve_engine(stale_bundle) == "onnx"
    with pytest.raises(StaleOnnxError, match=r"model\.int8\.onnx"):
        resolve_engine(stale_bundle, "onnx", "int8")
    np.testing.assert_allclose(predict_paths(ArtifactPredictor(stale_bundle, num_threads=1), images),
                               predict_paths(ArtifactPredictor(stale_bundle, engine="torch"), images), atol=1e-4)


def test_onnx_without_a_recorded_source_is_used_only_in_bundles_from_before_it_was_recorded(onnx_bundle, tmp_path,
                                                                                          caplog):
    """Bundles exported before the source was recorded (their config.json has no weights hash
    either) keep scoring with ONNX; in a bundle whose config records the weights, an ONNX file
    without its source was replaced or rewritten since, and is not run for that model.pt."""
    old = str(tmp_path / "old")
    shutil.copytree(onnx_bundle, old)
    model = onnx.load(os.path.join(old, "model.onnx"))
    del model.metadata_props[:]
    save_bundle(old, calibrated_model(seed=1), read_bundle_config(old))  # another model.pt: unknowable to ONNX
    onnx.save(model, os.path.join(old, "model.onnx"))  # (put back by hand: save_bundle deletes it)
    with caplog.at_level(logging.WARNING, logger="artifact_core.predict"):
        assert resolve_engine(old) == "torch"
    assert "does not record the model.pt" in caplog.text
    with pytest.raises(StaleOnnxError, match="replaced or rewritten"):
        resolve_engine(old, "onnx")
    # the bundle as an older version wrote it: no weights hash in its config
    config = json.load(open(os.path.join(old, "config.json")))
    del config["weights_sha256"]
    json.dump(config, open(os.path.join(old, "config.json"), "w"))
    with caplog.at_level(logging.INFO, logger="artifact_core.predict"):
        assert resolve_engine(old) == "onnx" and resolve_engine(old, "onnx") == "onnx"
        assert ArtifactPredictor(old, num_threads=1).engine_name == "onnx"
    assert "an older export" in caplog.text


S3_BUCKET = "artifact-core-predict"


def test_bundle_in_object_storage_runs_onnx_like_a_local_one(onnx_bundle, stale_bundle, images, s3_server,
                                                             tmp_path, monkeypatch):
    """s3:// bundles: auto picks ONNX, int8 is found, every lane's session reads the bucket's files."""
    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a local path would show up here as ./s3:
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(S3_BUCKET)
    pafs.copy_files(onnx_bundle, f"{S3_BUCKET}/runs/x/model", destination_filesystem=fs)
    pafs.copy_files(stale_bundle, f"{S3_BUCKET}/runs/stale/model", destination_filesystem=fs)
    uri = f"s3://{S3_BUCKET}/runs/x/model"

    assert resolve_engine(uri) == "onnx" and resolve_engine(uri, "onnx", "int8") == "onnx"
    assert read_bundle_config(uri).image_size == 32
    remote = ArtifactPredictor(uri, num_threads=1)
    assert remote.engine_name == "onnx"
    np.testing.assert_allclose(predict_paths(remote, images),
                               predict_paths(ArtifactPredictor(onnx_bundle, num_threads=1), images), atol=1e-6)
    root = os.path.dirname(images[0])
    lanes = DecodingPredictor(uri, image_size=32, root=root, precision="int8", lanes=2, chunk=2, num_threads=1)
    out = lanes({"raw_path": np.array([os.fsencode(p) for p in images[:6]], dtype=object)})
    np.testing.assert_allclose(out["prob_artifact_free"],
                               predict_paths(ArtifactPredictor(onnx_bundle, precision="int8"), images[:6]), atol=1e-6)

    stale = f"s3://{S3_BUCKET}/runs/stale/model"
    assert resolve_engine(stale) == "torch"
    with pytest.raises(StaleOnnxError, match=f"{stale}/model.onnx was exported from another model.pt"):
        resolve_engine(stale, "onnx")
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir()), "a URI was read as a local path"


def test_fused_actor_on_a_gpu_runs_the_whole_batch_at_once(bundle_dir, images, monkeypatch):
    """Decode runs in chunks side by side; a GPU engine then gets the batch in one call (on
    CPU the chunks go one by one). Emulated here: the engine is marked as on a GPU."""
    root = os.path.dirname(images[0])
    raw = np.array([os.fsencode(x) for x in images[:7]] + [os.fsencode(f"{root}/gone.png")], dtype=object)
    cpu = DecodingPredictor(bundle_dir, image_size=32, root=root, engine="torch", chunk=2, decode_threads=2)
    expected = cpu({"raw_path": raw})
    gpu = DecodingPredictor(bundle_dir, image_size=32, root=root, engine="torch", chunk=2, decode_threads=2)
    gpu.predictor.device = "cuda"
    sizes = []
    predict = gpu.predictor.engine.predict
    monkeypatch.setattr(gpu.predictor.engine, "predict", lambda x: (sizes.append(len(x)), predict(x))[1])
    out = gpu({"raw_path": raw})
    assert sizes == [7], sizes  # the 7 decoded images in one call (the missing file is an error row)
    assert list(out["path"]) == list(expected["path"]) and out["predicted_class"][7] == -1
    np.testing.assert_allclose(out["prob_artifact_free"], expected["prob_artifact_free"], atol=1e-6)


def test_a_non_finite_probability_is_an_error_row_not_an_artifact(tmp_path):
    model = calibrated_model()
    with torch.no_grad():
        model.classifier[1].bias.fill_(float("nan"))
    bundle = save_bundle(str(tmp_path / "nan"), model, BundleConfig(image_size=32, threshold=0.5))
    predictor = ArtifactPredictor(bundle, engine="torch", num_threads=1)
    batch = {"image": np.zeros((2, 3, 32, 32), dtype=np.uint8), "error": np.array(["", "cannot read"], dtype=object),
             "filename": np.array(["a", "b"], dtype=object), "path": np.array(["a", "b"], dtype=object)}
    out = predictor(batch)
    assert out["predicted_class"].tolist() == [-1, -1]
    assert out["error"].tolist() == ["the model returned a non-finite probability", "cannot read"]


def test_calibration_images_are_read_from_the_datas_filesystem(torch_bundle, images, tmp_path):
    # s3:// training data: the split holds the bucket's keys, readable only through its filesystem
    root = os.path.dirname(images[0])
    keys = [os.path.basename(p) for p in images[:4]]
    fs = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())
    b = str(tmp_path / "b")
    shutil.copytree(torch_bundle, b)
    info = export_mod.export_onnx_or_log(b, keys, [parse_label(p) for p in keys], fs=fs)
    assert info["checked_on"] == "4 calibration images" and info["int8"]["calibration_images"] == 4
    assert os.path.isfile(os.path.join(b, "model.int8.onnx"))


def test_onnx_whose_input_size_is_not_the_configs_is_refused_when_the_engine_is_made(onnx_bundle, tmp_path):
    edited = str(tmp_path / "edited")
    shutil.copytree(onnx_bundle, edited)
    config = json.load(open(os.path.join(edited, "config.json")))
    config["image_size"] *= 2  # the graph keeps the training size
    json.dump(config, open(os.path.join(edited, "config.json"), "w"))
    with pytest.raises(StaleOnnxError, match=f"takes .* images but the bundle's config.json says image_size "
                                             f"{config['image_size']}"):
        OnnxEngine(edited)


def test_a_big_calibration_set_is_checked_on_an_evenly_spaced_subset(torch_bundle, images, tmp_path, monkeypatch):
    """Training passes its whole validation set: decoded at once at the model's size, a big
    one would not fit in memory. The export takes an evenly spaced subset, end to end."""
    path = str(tmp_path / "model")
    shutil.copytree(torch_bundle, path)
    monkeypatch.setattr(export_mod, "MAX_CHECK_IMAGES", 6)
    info = export_mod.export_onnx(path, images, [parse_label(p) for p in images], int8=True)
    calibration = json.load(open(os.path.join(path, "calibration.json")))
    assert len(images) > 6 and info["int8"]["evaluated_on"] == 6 and info["checked_on"] == "6 calibration images"
    assert calibration["paths"] == [images[i] for i in np.linspace(0, len(images) - 1, 6).round().astype(int)]


def test_a_predictor_refuses_a_bundle_exported_again_since_the_run_began(torch_bundle, onnx_bundle):
    """Scoring actors that start late load the bundle themselves: one holding other weights
    than the run recorded must not score part of its rows."""
    from artifact_core.predict import BundleChangedError

    for bundle in (torch_bundle, onnx_bundle):
        recorded = read_bundle_config(bundle).weights_sha256
        assert recorded and ArtifactPredictor(bundle, expected_weights_sha256=recorded).config.weights_sha256 == recorded
        with pytest.raises(BundleChangedError, match="holds other weights .* than this scoring run began with"):
            ArtifactPredictor(bundle, expected_weights_sha256="0" * 64)
