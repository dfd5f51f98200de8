"""A bundle is one model: config.json names its model.pt, is written last and is checked on read."""

from __future__ import annotations

import json
import math
import os
import re

import pyarrow.fs as pafs
import pytest
import torch

from artifact_core import bundle as bundle_mod
from artifact_core.bundle import (CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, BundleConfig, load_bundle, read_bundle_config,
                                  save_bundle)
from artifact_core.model import build_model
from artifact_core.storage import resolve


def _model(seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(weights="none", **kw)


def _edit_config(path, **changes) -> None:
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


def test_an_export_killed_after_model_pt_leaves_a_bundle_that_refuses_to_load(tmp_path, monkeypatch):
    out = tmp_path / "b"
    save_bundle(str(out), _model(0), BundleConfig(threshold=0.12), {"best_epoch": 3})
    assert json.loads((out / CONFIG_FILE).read_text())["weights_sha256"] == bundle_mod.weights_sha256(str(out))

    def killed(path, obj):
        if path.endswith(CONFIG_FILE):
            raise KeyboardInterrupt("killed after model.pt was replaced")
        return original(path, obj)

    original = bundle_mod.write_json_atomic
    monkeypatch.setattr(bundle_mod, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(str(out), _model(1), BundleConfig(threshold=0.87), {"best_epoch": 9})
    monkeypatch.undo()
    # never the new weights with the old threshold
    with pytest.raises(FileNotFoundError, match=r"has no config\.json .*interrupted.*--name"):
        load_bundle(str(out))


def test_model_pt_of_other_weights_beside_a_config_is_refused(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    save_bundle(str(old), _model(0), BundleConfig(threshold=0.12))
    save_bundle(str(new), _model(1), BundleConfig(threshold=0.87))
    (old / WEIGHTS_FILE).write_bytes((new / WEIGHTS_FILE).read_bytes())  # e.g. a copy cut short
    for read in (read_bundle_config, load_bundle):
        with pytest.raises(ValueError, match=rf"model bundle '{re.escape(str(old))}': its model\.pt .* is not the one "
                                             r"its config\.json was written with .*: an export was interrupted.*"
                                             r"Export it again"):
            read(str(old))
    # bundles written before the hash was recorded load as before
    cfg = json.loads((old / CONFIG_FILE).read_text())
    del cfg["weights_sha256"]
    (old / CONFIG_FILE).write_text(json.dumps(cfg))
    assert load_bundle(str(old)).config.threshold == 0.12


def test_weights_replaced_between_the_config_check_and_the_load_are_refused(tmp_path, monkeypatch):
    """Another export of the same run may replace model.pt while a bundle loads: the weights
    loaded are the bytes that were hashed, checked against the config read."""
    old, new = tmp_path / "old", tmp_path / "new"
    save_bundle(str(old), _model(0), BundleConfig(threshold=0.12))
    save_bundle(str(new), _model(1), BundleConfig(threshold=0.87))
    recorded = json.loads((old / CONFIG_FILE).read_text())["weights_sha256"]

    def hash_then_replaced(uri):  # the config check saw the old weights; then they were replaced
        (old / WEIGHTS_FILE).write_bytes((new / WEIGHTS_FILE).read_bytes())
        return recorded

    monkeypatch.setattr(bundle_mod, "weights_sha256", hash_then_replaced)
    with pytest.raises(ValueError, match=r"its model\.pt .* is not the one its config\.json was written with"):
        load_bundle(str(old))


@pytest.mark.parametrize("field, value, named", [
    ("threshold", math.nan, "threshold must be a finite number in [0, 1], got nan"),
    ("threshold", None, "threshold must be a finite number in [0, 1], got None"),
    ("threshold", "high", "threshold must be a finite number in [0, 1], got 'high'"),
    ("threshold", 7, "threshold must be a finite number in [0, 1], got 7"),
    ("image_size", 0, "image_size must be a whole number of pixels, at least 32, got 0"),
    ("image_size", "224", "image_size must be a whole number of pixels, at least 32, got '224'"),
    ("mean", [0.5], "mean must be a list of 3 finite numbers"),
    ("std", [0.2, 0.2, 0.0], "std must be a list of 3 finite numbers above 0"),
    ("dropout", "x", "dropout must be a number in [0, 1), got 'x'"),
    ("num_outputs", 2, "num_outputs must be 1"),
    ("head_members", 0, "head_members must be a whole number in 1..64"),
    ("test_time_flip", True, "test_time_flip must be false for the global head, got True"),
    ("head_members", 3, "head_members must be a whole number in 1..64 (1 for the global head), got 3"),
])
def test_config_values_are_checked_naming_the_file_and_field(tmp_path, field, value, named):
    out = tmp_path / "b"
    save_bundle(str(out), _model(0), BundleConfig(image_size=64))
    _edit_config(out, **{field: value})
    for read in (read_bundle_config, load_bundle):
        with pytest.raises(ValueError) as err:
            read(str(out))
        assert f"{out}/config.json: {named}" in str(err.value)


def test_unreadable_config_and_weights_errors_name_the_file(tmp_path):
    out = tmp_path / "b"
    save_bundle(str(out), _model(0), BundleConfig())
    good = (out / CONFIG_FILE).read_text()
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{out}/config\.json is not readable JSON"):
        read_bundle_config(str(out))
    (out / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{out}/config\.json holds a list, expected an object"):
        load_bundle(str(out))
    (out / CONFIG_FILE).write_text(good)
    _edit_config(out, format="3")
    with pytest.raises(ValueError, match="bundle format '3'"):
        read_bundle_config(str(out))
    # weights that do not fit the model the config describes (a bundle without the recorded hash)
    (out / CONFIG_FILE).write_text(good)
    _edit_config(out, weights_sha256=None)
    state = torch.load(out / WEIGHTS_FILE, weights_only=True)
    for broken in ({k: v for i, (k, v) in enumerate(state.items()) if i},  # a key missing
                   {k: (v[:1] if v.dim() else v) for k, v in state.items()},  # wrong shapes
                   [1, 2]):  # not a state dict
        torch.save(broken, out / WEIGHTS_FILE)
        with pytest.raises(ValueError, match=rf"{out}/model\.pt is not the model its config\.json describes"):
            load_bundle(str(out))


def test_upload_replaces_a_remote_bundle_config_last_and_drops_stale_onnx(tmp_path, s3_server, monkeypatch):
    from artifact_core.bundle import upload_bundle

    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("bundles")
    uri = "s3://bundles/run/model"
    first, second = tmp_path / "first", tmp_path / "second"
    save_bundle(str(first), _model(0), BundleConfig(threshold=0.12))
    (first / ONNX_FILE).write_bytes(b"onnx of the first model")
    upload_bundle(str(first), resolve(uri))
    assert read_bundle_config(uri).threshold == 0.12

    save_bundle(str(second), _model(1), BundleConfig(threshold=0.87))  # its ONNX export failed: no model.onnx
    order = []
    upload = bundle_mod.Location.upload
    monkeypatch.setattr(bundle_mod.Location, "upload", lambda self, f: (order.append(os.path.basename(f)),
                                                                         upload(self, f)))
    upload_bundle(str(second), resolve(uri))
    assert order[-1] == CONFIG_FILE and sorted(order) == sorted(os.listdir(second))
    assert not resolve(uri).join(ONNX_FILE).exists(), "the first model's ONNX file outlived the re-export"
    assert load_bundle(uri).config.threshold == 0.87

    # a remote model.pt of other weights beside the config: refused as locally
    resolve(uri).join(WEIGHTS_FILE).upload(str(first / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=rf"model bundle '{uri}': its model\.pt"):
        read_bundle_config(uri)
    with pytest.raises(ValueError, match=rf"model bundle '{uri}': its model\.pt"):
        load_bundle(uri)


def test_a_model_pt_of_pickled_objects_is_refused_naming_it(tmp_path):
    out = tmp_path / "b"
    save_bundle(str(out), _model(0), BundleConfig(threshold=0.5))
    torch.save(_model(0), out / WEIGHTS_FILE)  # a whole module, not a state dict
    _edit_config(out, weights_sha256=None)  # (as a bundle from before the weights were hashed)
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / WEIGHTS_FILE))} holds pickled objects") as err:
        load_bundle(str(out))
    assert "weights_only=False" not in str(err.value)
