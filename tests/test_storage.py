"""artifact_core.storage: paths joined onto URIs stay URIs that name the same object."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from artifact_core.storage import resolve

ODD_NAME = "x?y#z%20.bin"  # '?', '#' and a %-escape: each means something else inside a URI


@pytest.mark.parametrize("base", ["s3://bucket?region=us-east-1", "s3://bucket/a%20b?region=us-east-1&scheme=http",
                                  "s3://bucket/runs/?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"])
def test_a_joined_uri_resolves_to_the_joined_path(base):
    child = resolve(base).join("sub dir", ODD_NAME)
    again = resolve(child.uri)  # as a worker, a trial or a later job gets it: a string
    assert again.path == child.path and again.path.endswith(f"/sub dir/{ODD_NAME}")
    assert child.uri.endswith(base.split("?", 1)[1]), "the URI's options must stay on the joined URI"


def test_storage_options_in_the_uri_reach_the_server(s3_server, monkeypatch, tmp_path):
    """A store given only in the URI (``?endpoint_override=``, no AWS_ENDPOINT_URL) is written and read."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    host = s3_server.removeprefix("http://")
    fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("opts")
    base = f"s3://opts/runs?endpoint_override={host}&scheme=http&region=us-east-1"

    child = resolve(base).join("exp", ODD_NAME)
    child.write_bytes(b"payload")
    with fs.open_input_stream(f"opts/runs/exp/{ODD_NAME}") as f:
        assert f.read() == b"payload"
    with resolve(child.uri).fs.open_input_stream(resolve(child.uri).path) as f:
        assert f.read() == b"payload"
    assert resolve(base).join("exp").children() == [ODD_NAME]
    assert not list(cwd.iterdir()), "a URI was written as a local path"


def test_the_training_config_that_travels_has_no_credentials():
    from artifact_core.config import TrainConfig

    cfg = TrainConfig(data_dir="s3://KEYID:TOPSECRET@faces/train?region=eu-west-1",
                      storage_path="s3://runs?endpoint_override=minio:9000&secret_key=TOPSECRET")
    shared = cfg.shareable_dict()
    assert "TOPSECRET" not in repr(shared) and "KEYID" not in repr(shared)
    assert shared["data_dir"].endswith("@faces/train?region=eu-west-1") and "minio:9000" in shared["storage_path"]
    assert cfg.to_dict()["data_dir"] == cfg.data_dir  # the run's own record keeps the URI as given


def test_the_default_run_name_of_a_data_uri_is_its_folder_not_its_options():
    from artifact_core.storage import folder_name

    assert folder_name("s3://faces/train/?endpoint_override=http://minio:9000&scheme=http") == "train"
    assert folder_name("s3://faces/new%20set") == "new set"
    assert folder_name("/data/faces/train/") == "train"
    assert folder_name("s3://faces-bucket") == folder_name("s3://faces-bucket/?region=x") == "faces-bucket"


def test_onnx_paths_of_a_bundle_uri_keep_its_options():
    from artifact_core.predict import onnx_path

    uri = "s3://models/exp/model?endpoint_override=minio:9000&scheme=http&region=us-east-1"
    assert onnx_path(uri, "int8") == "s3://models/exp/model/model.int8.onnx?endpoint_override=minio:9000&scheme=http&region=us-east-1"
    assert resolve(onnx_path(uri)).path == "models/exp/model/model.onnx"


def test_a_file_that_grew_since_its_size_was_read_is_read_whole_or_refused(tmp_path, monkeypatch):
    from artifact_core import storage

    path = tmp_path / "grows.png"
    path.write_bytes(b"x" * 1000)
    real = storage._open_regular

    def stale_size(p):  # the size as fstat saw it before the writer appended 900 bytes
        fd, st = real(p)
        return fd, os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 100,
                                   st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(storage, "_open_regular", stale_size)
    assert len(storage.read_file_bytes(str(path))) == 1000
    with pytest.raises(storage.FileReadError, match="grew beyond the limit of 500 bytes"):
        storage.read_file_bytes(str(path), max_bytes=500)
