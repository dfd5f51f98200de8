"""Starting weights offline: torchvision cache -> download -> the ImageNet copy shipped in the package."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time

import pytest
import torch
from torchvision.models import mobilenet_v2

from artifact_core import model as model_mod
from artifact_core.model import (BUNDLED_WEIGHTS_SHA256, WeightsUnavailableError, build_model, bundled_weights_path,
                                 resolve_weights)

#: sha256 over sorted keys, dtype, shape and bytes of the shipped file's tensors (weights/README.md).
BUNDLED_CONTENT_SHA256 = "c3c0b84d1f5b44957e5d6971ee7eedb83dce64e0fdc85d261a162b4e8de545f7"
#: Top-5 ImageNet logits of the float32 original (google-coral conversion) on :func:`_synthetic_images`:
#: concentric rings -> maze, coil, zebra, croquet ball, potter's wheel;
#: an orange disc -> ping-pong ball, balloon, face powder, gong, shower cap.
FP32_TOP5 = [
    ([646, 506, 340, 522, 739], [12.267, 6.844, 5.618, 5.567, 4.780]),
    ([722, 417, 551, 577, 793], [9.857, 8.323, 6.557, 5.999, 5.765]),
]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that refuses (a proxy on a closed port)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    return tmp_path / "torch"


def _content_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _synthetic_images() -> torch.Tensor:
    """Two fixed 224 px images, normalized as torchvision expects: concentric rings, an orange disc."""
    s = 224
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    d = ((yy - s // 2) ** 2 + (xx - s // 2) ** 2).float().sqrt()
    rings = ((d // 10) % 2).expand(3, s, s).clone()
    disc = torch.ones(3, s, s)
    disc[1][d < 70] = 0.55
    disc[2][d < 70] = 0.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.stack([rings, disc]) - mean) / std


def test_imagenet_falls_back_to_the_shipped_copy_offline(offline, caplog):
    caplog.set_level(logging.INFO, logger="artifact_core")
    t0 = time.time()
    state, source = resolve_weights("imagenet")
    assert time.time() - t0 < 10, "an offline download attempt must fail fast"
    assert source.startswith("bundled fp16") and BUNDLED_WEIGHTS_SHA256 in source
    assert "not available" in caplog.text and "shipped with artifact-core" in caplog.text
    assert f"starting weights: {source}" in caplog.text
    assert not os.listdir(offline / "hub" / "checkpoints")  # no partial download left behind
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # fp16 cast on load


def test_download_that_never_answers_is_bounded(tmp_path, monkeypatch, caplog):
    """A proxy that accepts the connection and then stays silent (a dropping firewall)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("https_proxy", proxy)
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        t0 = time.time()
        _, source = resolve_weights("imagenet", download_timeout=1.0)
    assert time.time() - t0 < 10
    assert source.startswith("bundled fp16")
    assert "timed out" in caplog.text


def test_shipped_weights_checksums():
    path = bundled_weights_path()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == BUNDLED_WEIGHTS_SHA256
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert len(raw) == 314 and raw["classifier.1.weight"].shape == (1000, 1280)
    assert _content_sha256(raw) == BUNDLED_CONTENT_SHA256


def test_shipped_weights_are_imagenet_features():
    """The 1000-class net built from the shipped file recognises fixed synthetic images as the original does."""
    state, _ = resolve_weights("bundled")
    net = mobilenet_v2(weights=None)
    net.load_state_dict(state)  # strict: every key, ImageNet head included
    with torch.no_grad():
        logits = net.eval()(_synthetic_images())
    for row, (classes, expected) in zip(logits, FP32_TOP5):
        assert int(row.argmax()) == classes[0]
        assert torch.allclose(row[classes], torch.tensor(expected), atol=0.3), row[classes]
    assert logits[0].softmax(0)[646] > 0.95  # rings: "maze"
    assert logits[1].softmax(0)[722] > 0.6  # orange disc: "ping-pong ball"


def test_torchvision_forced_offline_says_how_to_fix(offline):
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights("torchvision")
    msg = str(err.value)
    assert "cannot load ImageNet weights" in msg and "mobilenet_v2-7ebf99e0.pth" in msg
    assert str(offline) in msg and "--weights bundled" in msg and "state-dict file path" in msg


def test_bundled_forced_and_built_into_the_binary_model(offline):
    m = build_model(weights="bundled", dropout=0.1)
    raw = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    assert m.features[18][0].weight.dtype == torch.float32
    assert torch.equal(m.features[18][0].weight, raw["features.18.0.weight"].float())
    assert m.classifier[-1].out_features == 1
    assert not (offline / "hub").exists()  # forced: the network was not even tried


def test_torchvision_cache_wins_over_the_shipped_copy(offline):
    ref = mobilenet_v2(weights=None)
    cached = offline / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    for weights in ("imagenet", "torchvision"):
        state, source = resolve_weights(weights)
        assert source == f"torchvision cache {cached}"
        assert torch.equal(state["features.0.0.weight"], ref.features[0][0].weight)


def test_a_damaged_shipped_copy_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "w.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), bad)
    monkeypatch.setattr(model_mod, "bundled_weights_path", lambda: str(bad))
    with pytest.raises(WeightsUnavailableError, match="reinstall artifact-core"):
        resolve_weights("bundled")


def test_fp16_file_through_weights_path(tmp_path):
    ref = mobilenet_v2(weights=None)
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}, path)
    state, source = resolve_weights(str(path))
    assert source == f"file {path}" and state["features.1.conv.0.0.weight"].dtype == torch.float32
    assert torch.equal(build_model(weights=str(path)).features[1].conv[0][0].weight,
                       ref.features[1].conv[0][0].weight.half().float())


@pytest.mark.ray
def test_demo_training_offline_records_the_shipped_weights(ray_session, offline, tmp_path):
    from artifact_core.bundle import load_bundle
    from artifact_core.config import TrainConfig
    from artifact_core.trainer import run_training

    cfg = TrainConfig(storage_path=str(tmp_path / "runs"), name="demo", demo_train_images=40, image_size=64,
                      head_epochs=1, finetune_epochs=0, num_workers=1, batch_size=16)  # weights: the default
    assert cfg.weights == "imagenet" and cfg.data_dir is None
    summary = run_training(cfg)
    with open(os.path.join(summary.bundle_dir, "config.json")) as f:
        recorded = json.load(f)["weights_source"]
    assert recorded.startswith("bundled fp16") and BUNDLED_WEIGHTS_SHA256 in recorded
    assert load_bundle(summary.bundle_dir).config.weights_source == recorded
    assert summary.metrics["history"][0]["phase"] == "head"
