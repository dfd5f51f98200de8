"""Model bundle write/read round trip and its errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from artifact_core.bundle import BundleConfig, load_bundle, read_bundle_config, save_bundle, weights_sha256
from artifact_core.model import build_model


def test_bundle_round_trip(tmp_path):
    m = build_model(weights="none", dropout=0.1)
    torch.nn.init.normal_(m.classifier[1].weight)
    cfg = BundleConfig(image_size=96, threshold=0.37, dropout=0.1, train_config={"lr": 0.01})
    out = save_bundle(str(tmp_path / "b"), m, cfg, {"validation": {"micro_f1": 0.9}})
    b = load_bundle(out)
    assert b.config.image_size == 96 and b.config.threshold == 0.37
    assert b.config.labels == {"0": "artifact", "1": "artifact-free"}
    assert {"torch", "torchvision", "artifact_core"} <= set(b.config.versions)
    assert b.metrics["validation"]["micro_f1"] == 0.9
    assert not b.model.training
    x = torch.randn(2, 3, 96, 96)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(b.model(x), m(x))
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["architecture"] == "mobilenet_v2" and saved["mean"] == [0.485, 0.456, 0.406]


def test_bundle_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(str(tmp_path / "nope"))
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_bundle(str(tmp_path / "b"))
    save_bundle(str(tmp_path / "c"), build_model(weights="none"), BundleConfig())
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["format"] = 99
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format 99"):
        load_bundle(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        save_bundle(str(tmp_path / "d"), build_model(weights="none"), BundleConfig(architecture="resnet50"))


def test_bundle_round_trip_local_head_and_older_bundles(tmp_path):
    m = build_model(weights="none", head="local").eval()
    out = save_bundle(str(tmp_path / "l"), m, BundleConfig(image_size=64, head="local"))
    b = load_bundle(out)
    assert b.config.head == "local" and len(b.model.features) == 14
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b.model(x), m(x))
    # bundles written before the head was recorded hold the global head
    save_bundle(str(tmp_path / "g"), build_model(weights="none"), BundleConfig())
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    del cfg["head"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    assert load_bundle(str(tmp_path / "g")).config.head == "global"
    cfg["head"] = "patch"
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="head 'patch'"):
        load_bundle(str(tmp_path / "g"))


def test_save_bundle_refuses_a_config_of_the_other_head(tmp_path):
    with pytest.raises(ValueError, match="the model has the local head but the bundle config says 'global'"):
        save_bundle(str(tmp_path / "x"), build_model(weights="none", head="local"), BundleConfig())


def test_bundle_round_trip_multiscale_head(tmp_path):
    m = build_model(weights="none", head="multiscale").eval()
    out = save_bundle(str(tmp_path / "m"), m, BundleConfig(image_size=64, head="multiscale"))
    b = load_bundle(out)
    assert b.config.head == "multiscale" and b.model.classifier[0].num_features == 128
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b.model(x), m(x))
    with pytest.raises(ValueError, match="the model has the multiscale head but the bundle config says 'local'"):
        save_bundle(str(tmp_path / "x"), m, BundleConfig(head="local"))


def test_bundle_with_test_time_flip_round_trips_and_older_readers_refuse_it(tmp_path):
    m = build_model(weights="none", head="multiscale", test_time_flip=True).eval()
    out = save_bundle(str(tmp_path / "m"), m, BundleConfig(image_size=64, head="multiscale", test_time_flip=True))
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    # format 2: a reader of format 1 refuses it instead of scoring without the mirror
    assert raw["test_time_flip"] is True and raw["format"] == 2
    b = load_bundle(out)
    assert b.model.test_time_flip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b.model(x), m(x))
    # a bundle without the flip stays format 1 and loads without it
    plain = build_model(weights="none", head="multiscale").eval()
    save_bundle(str(tmp_path / "p"), plain, BundleConfig(image_size=64, head="multiscale"))
    assert json.loads((tmp_path / "p" / "config.json").read_text())["format"] == 1
    assert not load_bundle(str(tmp_path / "p")).model.test_time_flip
    with pytest.raises(ValueError, match="test_time_flip=True, the model does not"):
        save_bundle(str(tmp_path / "x"), plain, BundleConfig(image_size=64, head="multiscale", test_time_flip=True))


def test_bundle_with_head_members_round_trips_and_states_them(tmp_path):
    m = build_model(weights="none", head="multiscale", test_time_flip=True, members=3).eval()
    out = save_bundle(str(tmp_path / "m"), m, BundleConfig(image_size=64, head="multiscale", test_time_flip=True,
                                                           head_members=3))
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["head_members"] == 3 and raw["format"] == 3  # a format-2 reader could not build it
    b = load_bundle(out)
    assert b.model.members == 3 and b.model.test_time_flip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b.model(x), m(x))
    with pytest.raises(ValueError, match="head_members=1, the model has 3"):
        save_bundle(str(tmp_path / "x"), m, BundleConfig(image_size=64, head="multiscale", test_time_flip=True))


def test_weights_sha256_follows_a_rewritten_model_pt(tmp_path):
    """Scoring compares ONNX files with this hash: a model.pt replaced in place must be hashed again."""
    out = save_bundle(str(tmp_path / "b"), build_model(weights="none"), BundleConfig())
    first = weights_sha256(out)
    assert first == hashlib.sha256((tmp_path / "b" / "model.pt").read_bytes()).hexdigest()
    m = build_model(weights="none")
    torch.nn.init.normal_(m.classifier[1].weight)
    save_bundle(out, m, BundleConfig())  # same size, other weights
    assert weights_sha256(out) == hashlib.sha256((tmp_path / "b" / "model.pt").read_bytes()).hexdigest() != first
    assert read_bundle_config(f"file://{out}").image_size == 224
    with pytest.raises(FileNotFoundError, match="has no model.pt"):
        weights_sha256(str(tmp_path))
