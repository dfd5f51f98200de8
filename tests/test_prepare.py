"""Driver-side preparation of a run (no Ray needed): split, weights, skipped files, demo data."""

from __future__ import annotations

import pytest

from artifact_core.config import TrainConfig, add_training_args, config_from_args
from artifact_core.trainer import demo_data_dir, prepare_run
from conftest import make_easy_folder, write_image


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=20)
    (data / "image_99_1.png").write_bytes(b"broken")
    (data / "image_98_0.png").write_bytes(b"")
    loop = prepare_run(TrainConfig(data_dir=str(data), storage_path=str(tmp_path), name="x", weights="none"))
    assert sorted(p.split("/")[-1] for p in loop["unreadable"]) == ["image_98_0.png", "image_99_1.png"]
    split = loop["split"]
    assert len(split["train_paths"]) + len(split["val_paths"]) == 20
    assert not set(split["train_paths"]) & set(split["val_paths"])
    assert loop["counts"]["val"] == {"artifact": 1, "artifact-free": 3}
    assert len(loop["class_weights"]) == 2 and loop["class_weights"][0] > loop["class_weights"][1]
    assert "features.0.0.weight" in loop["initial_state"]


def test_only_unreadable_minority_is_an_error(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"image_{i}_1.png")
    (tmp_path / "image_9_0.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="no longer has both classes"):
        prepare_run(TrainConfig(data_dir=str(tmp_path), storage_path=str(tmp_path / "s"), weights="none"))


def test_config_from_args_absolute_paths_and_names(tmp_path, monkeypatch):
    import argparse

    monkeypatch.chdir(tmp_path)
    p = add_training_args(argparse.ArgumentParser())
    cfg = config_from_args(p.parse_args([]))
    assert cfg.storage_path == str(tmp_path / "runs") and cfg.name == "demo" and cfg.data_dir is None
    cfg = config_from_args(p.parse_args(["--data-dir", "faces/", "--storage-path", "s3://bucket/runs"]))
    assert cfg.data_dir == str(tmp_path / "faces") and cfg.name == "faces" and cfg.storage_path == "s3://bucket/runs"
    with pytest.raises(ValueError, match="--lr must be above 0"):
        TrainConfig(lr=0).validate()


def test_demo_data_dir_generated_once(tmp_path):
    root = demo_data_dir(str(tmp_path), n_train=10, n_test=2)
    first = sorted(p.name for p in (tmp_path / "demo_data" / "train").iterdir())
    assert len(first) == 10
    (tmp_path / "demo_data" / "train" / first[0]).unlink()
    assert demo_data_dir(str(tmp_path), n_train=10, n_test=2) == root  # cached: not regenerated
    assert len(list((tmp_path / "demo_data" / "train").iterdir())) == 9
    with pytest.raises(ValueError, match="local --storage-path"):
        demo_data_dir("s3://bucket/runs")
