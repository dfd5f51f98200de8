"""Driver-side preparation of a run (no Ray needed): split, weights, skipped files, demo data."""

from __future__ import annotations

import argparse
import os

import pytest
from PIL import Image

from artifact_core.config import TrainConfig, add_training_args, config_from_args
from artifact_core.trainer import demo_data_dir, prepare_run
from conftest import make_easy_folder


def test_prepare_decodes_a_few_images_a_class_and_keeps_unreadable_for_the_workers(tmp_path, monkeypatch):
    from artifact_core import data as data_mod
    from artifact_core import images

    data = make_easy_folder(tmp_path / "train", n=20)
    (data / "image_99_1.png").write_bytes(b"broken")
    (data / "image_98_0.png").write_bytes(b"")
    decoded = []
    real = images.decode_image

    def counted(source, **k):
        decoded.append(k.get("name"))
        return real(source, **k)

    monkeypatch.setattr(images, "decode_image", counted)  # (check_classes_readable imports it when called)
    monkeypatch.setattr("artifact_core.dataset.decode_image", counted)
    loop = prepare_run(TrainConfig(data_dir=str(data), storage_path=str(tmp_path), name="x", weights="none"))
    split = loop["split"]
    # the broken files stay in the split: the workers skip them when they load them
    assert len(split["train_paths"]) + len(split["val_paths"]) == 22
    assert not set(split["train_paths"]) & set(split["val_paths"])
    assert loop["counts"]["val"] == {"artifact": 1, "artifact-free": 3}
    assert len(loop["class_weights"]) == 2 and loop["class_weights"][0] > loop["class_weights"][1]
    assert "features.0.0.weight" in loop["initial_state"] and loop["data_fs"] is None
    # only the readability sample: at most READABLE_SAMPLE a class, the first readable ending a class's
    assert 2 <= len(decoded) <= 2 * data_mod.READABLE_SAMPLE


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
    # the multiscale (default) and local heads' trunk has 14 blocks, the global network 19
    with pytest.raises(ValueError, match=r"--unfreeze-depth must be in 1\.\.14 for the multiscale head with phase-2 epochs, got 15"):
        TrainConfig(unfreeze_depth=15).validate()
    TrainConfig(head="global", unfreeze_depth=19).validate()
    with pytest.raises(ValueError, match="--head must be one of multiscale, local, global"):
        TrainConfig(head="patch").validate()


def test_demo_data_dir_generated_once(tmp_path):
    root = demo_data_dir(str(tmp_path), n_train=10, n_test=2)
    first = sorted(p.name for p in (tmp_path / "demo_data" / "train").iterdir())
    assert len(first) == 10
    (tmp_path / "demo_data" / "train" / first[0]).unlink()
    assert demo_data_dir(str(tmp_path), n_train=10, n_test=2) == root  # cached: not regenerated
    assert len(list((tmp_path / "demo_data" / "train").iterdir())) == 9
    with pytest.raises(ValueError, match="local --storage-path"):
        demo_data_dir("s3://bucket/runs")


def test_image_size_auto_follows_the_images_without_decoding(tmp_path, monkeypatch):
    from artifact_core.config import auto_image_size, parse_image_size
    from artifact_core.data import native_short_side

    assert [auto_image_size(s) for s in (None, 64, 256, 300, 1024, 4000)] == [224, 224, 256, 288, 768, 768]
    assert parse_image_size("auto") == "auto" and parse_image_size("320") == 320
    with pytest.raises(argparse.ArgumentTypeError, match="expected 'auto' or a number"):
        parse_image_size("big")
    with pytest.raises(ValueError, match="--image-size must be 'auto' or at least 32"):
        TrainConfig(image_size=16).validate()

    data = tmp_path / "train"
    data.mkdir()
    for i in range(6):  # 900 x 700 photos (short side 700 -> 672), one unreadable file
        Image.new("RGB", (900, 700), (i * 30, 90, 120)).save(data / f"image_{i}_{int(i > 0)}.png")
    (data / "image_9_1.png").write_bytes(b"not an image")
    assert native_short_side(sorted(str(p) for p in data.iterdir())) == 700

    def no_decode(*a, **k):
        raise AssertionError("prepare_run decoded an image")

    monkeypatch.setattr("artifact_core.images.decode_image", no_decode)
    monkeypatch.setattr("artifact_core.dataset.decode_image", no_decode)
    # (the readability sample decodes a few files, tested above: the size comes from headers alone)
    monkeypatch.setattr("artifact_core.trainer.check_classes_readable", lambda *a, **k: None)
    cfg = TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="auto", weights="none",
                      val_fraction=0.3)
    loop = prepare_run(cfg)
    assert cfg.image_size == loop["train"]["image_size"] == 672
    # the resolved size is the run's identity: a rerun with auto resumes, 320 is another run
    prepare_run(TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="auto", weights="none",
                            val_fraction=0.3))
    with pytest.raises(ValueError, match="image_size: 672 before, 320 now"):
        prepare_run(TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="auto", weights="none",
                                val_fraction=0.3, image_size=320))


def test_auto_size_of_a_first_start_counts_each_file_once_as_its_rerun_does(tmp_path, monkeypatch):
    """Links to the large files made them the listing's median (768 px), but the stored split,
    which a rerun measures, holds each file once (288 px): the first start must measure that
    too, or the plain rerun is refused as another image size."""
    data = tmp_path / "train"
    data.mkdir()
    for i in range(12):
        side = 1000 if i >= 8 else 300
        Image.new("RGB", (side, side), (i * 20, 90, 120)).save(data / f"image_{i}_{int(i % 4 > 0)}.png")
    for j in range(10):
        os.symlink(data / f"image_{8 + j % 4}_{int((8 + j % 4) % 4 > 0)}.png",
                   data / f"image_{100 + j}_{int((8 + j % 4) % 4 > 0)}.png")
    monkeypatch.setattr("artifact_core.trainer.check_classes_readable", lambda *a, **k: None)

    def start() -> dict:
        return prepare_run(TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="links",
                                       weights="none", val_fraction=0.25))
    assert start()["train"]["image_size"] == 288
    assert start()["train"]["image_size"] == 288  # the rerun resumes, not refused


def test_test_time_flip_is_on_for_the_trunk_heads_and_can_be_turned_off():
    p = add_training_args(argparse.ArgumentParser())
    assert config_from_args(p.parse_args([])).flips_at_test_time
    assert not config_from_args(p.parse_args(["--no-test-time-flip"])).flips_at_test_time
    # the global head has no mirror pass: the default leaves it as it was
    assert not config_from_args(p.parse_args(["--head", "global"])).flips_at_test_time


def test_head_members_default_to_an_ensemble_for_the_trunk_heads_only():
    p = add_training_args(argparse.ArgumentParser())
    assert config_from_args(p.parse_args([])).ensemble_members == 5
    assert config_from_args(p.parse_args(["--head-members", "1"])).ensemble_members == 1
    assert config_from_args(p.parse_args(["--head", "global"])).ensemble_members == 1
    with pytest.raises(ValueError, match="--head-members must be in 1..64, got 0"):
        config_from_args(p.parse_args(["--head-members", "0"])).validate()


def test_demo_data_never_deletes_a_folder_it_did_not_generate(tmp_path):
    """<storage>/demo_data without the generator's markers (here a run folder named demo_data) is
    refused, nothing deleted; an empty folder is used."""
    run = tmp_path / "demo_data"
    (run / "model").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    (run / "model" / "model.pt").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"demo_data is not demo data this project generated .*nothing was deleted"):
        demo_data_dir(str(tmp_path), n_train=8, n_test=2)
    assert sorted(p.name for p in run.iterdir()) == ["model", "run_config.json"]
    assert (run / "model" / "model.pt").read_bytes() == b"weights"
    empty = tmp_path / "other"
    (empty / "demo_data").mkdir(parents=True)
    demo_data_dir(str(empty), n_train=8, n_test=2)
    assert len(list((empty / "demo_data" / "train").iterdir())) == 8


def test_demo_data_is_generated_again_when_interrupted_or_other_counts_are_asked(tmp_path):
    DEMO_COMPLETE, DEMO_GENERATING = ".complete", ".generating"  # (trainer's names)
    root = tmp_path / "demo_data"
    demo_data_dir(str(tmp_path), n_train=8, n_test=2)
    assert (root / DEMO_COMPLETE).read_text() == "8 2\n" and not (root / DEMO_GENERATING).exists()
    demo_data_dir(str(tmp_path), n_train=12, n_test=2)  # --demo-train-images raised
    assert len(list((root / "train").iterdir())) == 12 and (root / DEMO_COMPLETE).read_text() == "12 2\n"
    # killed midway: the marker written first says the folder is the generator's own
    (root / DEMO_COMPLETE).unlink()
    (root / DEMO_GENERATING).write_text("12 2\n")
    for f in list((root / "train").iterdir())[:5]:
        f.unlink()
    demo_data_dir(str(tmp_path), n_train=12, n_test=2)
    assert len(list((root / "train").iterdir())) == 12 and (root / DEMO_COMPLETE).exists()


def test_training_flags_out_of_range_are_refused_naming_the_flag():
    import math

    for kw, named in [({"weight_decay": -1.0}, "--weight-decay must be 0 or more and finite, got -1.0"),
                      ({"weight_decay": math.nan}, "--weight-decay must be 0 or more and finite, got nan"),
                      ({"lr": math.inf}, "--lr must be above 0 and finite, got inf"),
                      ({"finetune_lr": math.nan}, "--finetune-lr must be above 0 and finite, got nan"),
                      ({"cpus_per_worker": math.inf}, "--cpus-per-worker must be 0.0001 or more and finite, got inf"),
                      ({"loader_workers": -1}, "--loader-workers must be 0 or more, got -1"),
                      ({"seed": -5}, "--seed must be in 0..2**32-1, got -5"),
                      ({"seed": 2**32}, "--seed must be in 0..2**32-1, got 4294967296")]:
        with pytest.raises(ValueError) as err:
            TrainConfig(**kw).validate()
        assert str(err.value) == named
    TrainConfig(weight_decay=0.0, seed=2**32 - 1, loader_workers=0).validate()


def test_a_link_to_generated_demo_data_is_used_and_never_deleted_through(tmp_path):
    from artifact_core.trainer import DEMO_COMPLETE, demo_data_dir

    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / DEMO_COMPLETE).write_text("5 2\n")
    (real / "keep.txt").write_text("x")
    storage = tmp_path / "runs"
    storage.mkdir()
    (storage / "demo_data").symlink_to(real)
    assert demo_data_dir(str(storage), n_train=5, n_test=2) == str(storage / "demo_data")
    with pytest.raises(ValueError, match="is a link"):
        demo_data_dir(str(storage), n_train=6, n_test=2)
    assert (real / "keep.txt").exists()


def test_a_weights_file_of_another_architecture_is_one_line_naming_it(tmp_path):
    import torch


    from artifact_core.errors import WeightsUnavailableError

    data = make_easy_folder(tmp_path / "train", n=12)
    wrong = tmp_path / "resnet_like.pt"
    # MobileNetV2's keys with other shapes (a wider model): load_state_dict raises a long RuntimeError
    from torchvision.models import mobilenet_v2
    torch.save({k: v for k, v in mobilenet_v2(width_mult=1.4).state_dict().items()}, wrong)
    cfg = TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="w", weights=str(wrong),
                      image_size=32)
    with pytest.raises(WeightsUnavailableError) as err:
        prepare_run(cfg)
    assert str(wrong) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "runs" / "w" / "run_config.json").exists()



def test_unfreeze_depth_zero_needs_no_phase_two():
    from artifact_core.config import SweepConfig

    TrainConfig(unfreeze_depth=0, finetune_epochs=0).validate()
    with pytest.raises(ValueError, match="--unfreeze-depth must be in 1..*with phase-2 epochs"):
        TrainConfig(unfreeze_depth=0, finetune_epochs=2).validate()
    with pytest.raises(ValueError, match="--unfreeze-depths must be values in 1"):
        SweepConfig(base=TrainConfig(), unfreeze_depths=[0, 2]).validate()


@pytest.mark.parametrize("job", ["train", "tune"])
@pytest.mark.parametrize("flag", ["--data-dir", "--storage-path", "--weights", "--name"])
def test_an_empty_path_flag_is_one_line_not_the_demo_or_the_working_folder(tmp_path, monkeypatch, capsys, job, flag):
    """``--data-dir "$DATA"`` with DATA unset: an error naming the flag, before Ray starts; not
    the demo data, the working folder or random weights."""
    import logging

    from artifact_core.jobs_common import run_job
    from conftest import load_job

    monkeypatch.chdir(tmp_path)
    module = load_job(job)
    argv = {"--data-dir": ["--data-dir", " "], "--storage-path": ["--storage-path", ""], "--weights": ["--weights", ""],
            "--name": ["--name", ""]}[flag]
    rc = run_job(module.main, module.get_args_parser().parse_args(argv), logging.getLogger("test"))
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {flag} must be" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no demo data, no run folder


def test_a_demo_rerun_with_other_image_counts_is_refused_before_the_demo_data_is_replaced(tmp_path):
    """Regenerating first would delete the run's own split (and the files any job reads)."""
    from artifact_core.run_identity import RunConflictError

    def demo(n: int, **kw) -> dict:
        return prepare_run(TrainConfig(storage_path=str(tmp_path), name="demo", demo_train_images=n, image_size=32,
                                       weights="none", **kw))
    first = demo(40)
    made = sorted(p.name for p in (tmp_path / "demo_data" / "train").iterdir())
    with pytest.raises(RunConflictError, match="trained on demo data of 40 training images; --demo-train-images 48"):
        demo(48)
    assert sorted(p.name for p in (tmp_path / "demo_data" / "train").iterdir()) == made
    assert demo(40)["split"] == first["split"]  # the run resumes as it was
    again = demo(48, overwrite=True)
    assert len(again["split"]["train_paths"]) + len(again["split"]["val_paths"]) == 48
