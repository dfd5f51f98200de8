"""Ray Train runs of the real loop, small: two phases, bundle, fault tolerance, resume, bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from artifact_core.bundle import load_bundle
from artifact_core.config import TrainConfig
from artifact_core.model import build_model, set_trainable
from artifact_core.trainer import run_training

pytestmark = pytest.mark.ray


def small_config(data_dir, storage, name, weights="none", **kw) -> TrainConfig:
    base = dict(weights=weights, data_dir=str(data_dir), storage_path=str(storage), name=name, num_workers=2, cpus_per_worker=1,
                batch_size=8, image_size=32, head_epochs=2, finetune_epochs=2, lr=1e-2, finetune_lr=2e-3,
                unfreeze_depth=2, patience=0, max_failures=1, val_fraction=0.25)
    base.update(kw)
    return TrainConfig(**base)


def test_two_phases_bundle_and_learning(ray_session, easy_folder, backbone_weights, tmp_path):
    # the default (multiscale) head; the global one runs end to end in tests/test_cluster.py
    head = "multiscale"
    cfg = small_config(easy_folder, tmp_path / "runs", "basic", weights=backbone_weights, head=head)
    summary = run_training(cfg)
    hist = summary.metrics["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert [h["phase"] for h in hist] == ["head", "head", "finetune", "finetune"]
    assert all(h["world_size"] == 2 for h in hist)
    # trainable parameters follow K: head only, then head + last 2 blocks
    assert cfg.ensemble_members == 5  # the default: five per-cell classifiers side by side
    m = build_model(weights="none", head=head, members=5)
    # BatchNorm 2 x 128, then 128 -> 5 x 64 and 5 x (64 -> 1) with biases (one member: 8577)
    assert hist[0]["trainable_params"] == set_trainable(m, unfreeze_depth=0) == 256 + 128 * 320 + 320 + 320 + 5 == 41861
    assert hist[2]["trainable_params"] == set_trainable(m, unfreeze_depth=2)
    # phase 1 trained the head on cached trunk features, phase 2 on images
    assert [h["features_cached"] for h in hist] == [True, True, False, False]
    # something was learned on the easy set: loss falls, validation beats the majority class
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    majority = 9 / 12  # validation: 3 artifact, 9 clean
    assert summary.metrics["validation"]["support"] == 12
    assert max(h["val_micro_f1"] for h in hist) > majority
    # the bundle reloads and reproduces the validation scores it was tuned on
    bundle = load_bundle(summary.bundle_dir)
    assert bundle.config.image_size == 32 and 0.0 <= bundle.config.threshold <= 1.0 and bundle.config.head == head
    assert bundle.config.head_members == 5 and bundle.model.members == 5 and bundle.config.format == 3
    assert bundle.config.train_config["unfreeze_depth"] == 2
    saved = json.loads(open(os.path.join(summary.bundle_dir, "metrics.json")).read())
    assert saved["best_epoch"] in (1, 2, 3, 4) and saved["validation"]["support"] == 12
    # selection by artifact AP (default); AP, ROC AUC and the PR curve reported
    assert saved["select_metric"] == "val_ap_artifact"
    assert saved["select_value"] == max(h["val_ap_artifact"] for h in hist)
    assert all({"val_ap_artifact", "val_roc_auc", "val_micro_f1"} <= set(h) for h in hist)
    assert 0 <= saved["ap_artifact"] <= 1 and 0 <= saved["roc_auc"] <= 1
    assert saved["validation"]["ap_artifact"] == saved["ap_artifact"]
    curve = saved["pr_curve"]
    assert len(curve["threshold"]) == len(curve["precision"]) == len(curve["recall"]) >= 1 and curve["recall"][-1] == 1.0
    assert {"learning_curves.png", "confusion_matrix.png", "pr_curve.png", "model.pt", "model.onnx",
            "model.int8.onnx", "calibration.json"} <= set(os.listdir(summary.bundle_dir))
    # ONNX checked against the torch model; int8 evaluated on the validation images
    assert saved["onnx"]["max_abs_logit_diff"] < 1e-3 and saved["onnx"]["int8"]["evaluated_on"] == 12
    assert set(saved["onnx"]["int8"]["validation"]) == {"micro_f1", "macro_f1", "recall_artifact"}
    assert os.path.exists(tmp_path / "runs" / "basic" / "run_config.json")
    out = bundle.model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 1) and torch.isfinite(out).all()
    # the exported weights are the kept checkpoint's: scored again in process, the validation
    # images give the scores the threshold was tuned on (gathered over the ranks: compared as sets)
    from artifact_core.predict import ArtifactPredictor, predict_paths
    from artifact_core.run_identity import SPLIT_JSON, read_split
    from artifact_core.storage import resolve
    from artifact_core.train_loop import read_val_scores

    split = read_split(resolve(str(tmp_path / "runs" / "basic")), SPLIT_JSON)
    rescored = predict_paths(ArtifactPredictor(summary.bundle_dir, engine="torch"),
                             [os.path.join(split.root, f) for f in split.val_files])
    kept = [d for d in os.listdir(tmp_path / "runs" / "basic") if d.startswith("checkpoint_")
            and os.path.isdir(tmp_path / "runs" / "basic" / d)
            and json.load(open(tmp_path / "runs" / "basic" / d / "state.json"))["history"][-1]["epoch"]
            == saved["best_epoch"]]
    assert len(kept) == 1, kept
    _, tuned_on = read_val_scores(str(tmp_path / "runs" / "basic" / kept[0]))
    assert rescored.std() > 1e-4, "scores do not vary: the comparison would prove nothing"
    np.testing.assert_allclose(np.sort(rescored), np.sort(tuned_on), atol=1e-4)


def test_worker_failure_resumes_and_rerun_continues(ray_session, easy_folder, tmp_path):
    marker = tmp_path / "failed-once"
    cfg = small_config(easy_folder, tmp_path / "runs", "ft")
    # the last rank raises once at the start of epoch 4 (phase 2, second epoch)
    summary = run_training(cfg, loop_overrides={"fail_at_epoch": 3, "fail_marker": str(marker)})
    assert marker.exists(), "the failure drill did not fire"
    assert summary.metrics["resumed_after_epochs"] == [3], "the group restarted from scratch, not from epoch 3"
    assert [h["epoch"] for h in summary.metrics["history"]] == [1, 2, 3, 4]
    # the resumed epoch ran as it would have without the failure: the same augmentations,
    # dropout and order (seeded by seed, epoch and rank), so the same loss and scores
    straight = run_training(small_config(easy_folder, tmp_path / "runs", "ft-straight"))
    for resumed, plain in zip(summary.metrics["history"], straight.metrics["history"]):
        assert resumed["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5), (resumed, plain)
        assert resumed["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-5), (resumed, plain)

    # the same name again, one more fine-tune epoch: continues at epoch 5, not from 1
    cfg2 = small_config(easy_folder, tmp_path / "runs", "ft", finetune_epochs=3)
    again = run_training(cfg2)
    assert again.metrics["resumed_after_epochs"] == [3, 4]
    assert [h["epoch"] for h in again.metrics["history"]] == [1, 2, 3, 4, 5]
    assert again.metrics["history"][-1]["phase"] == "finetune"


def test_selection_keeps_the_one_epoch_with_skill(ray_session, easy_folder, tmp_path):
    # Scripted validation scores (the loop's selection drill): epochs 1, 2 and 4 call every
    # image clean (micro F1 9/12 = the majority share, no ranking skill); epoch 3 ranks every
    # artifact first but at 0.5 calls everything an artifact (micro F1 3/12). Micro F1 would
    # keep a one-class epoch; the default selection must keep epoch 3, and its threshold
    # must then separate the classes.
    # Epoch 4 then diverges (NaN scores, whose "AP" would only reflect the list's order): it
    # must rank last, and training must stop there instead of running epoch 5.
    one_class, skilled, nan = [0.9, 0.9], [0.3, 0.4], [float("nan")] * 2  # P(artifact-free) for label 0, label 1
    drill = {"1": one_class, "2": one_class, "3": skilled, "4": nan, "5": one_class}
    # (trained with artifact oversampling, which runs the DDP-aware sampler for real)
    cfg = small_config(easy_folder, tmp_path / "runs", "sel", oversample=0.4, finetune_epochs=3)
    summary = run_training(cfg, loop_overrides={"val_prob_drill": drill})
    hist = summary.metrics["history"]
    assert [h["val_micro_f1"] for h in hist[:3]] == [0.75, 0.75, 0.25]
    assert len(hist) == 4 and [h["diverged"] for h in hist] == [False, False, False, True]
    assert math.isnan(hist[3]["select_score"]) and [h["select_score"] for h in hist[:3]] == \
        [h["val_ap_artifact"] for h in hist[:3]]
    assert summary.metrics["best_epoch"] == 3 and summary.metrics["select_value"] == 1.0
    assert summary.metrics["validation"]["recall_artifact"] == 1.0 and summary.metrics["validation"]["micro_f1"] == 1.0
    assert 0.3 < summary.metrics["threshold"] < 0.4


def test_unreadable_images_are_skipped_by_the_workers(ray_session, tmp_path, backbone_weights):
    from conftest import make_easy_folder

    data = make_easy_folder(tmp_path / "train", n=32)
    good = (data / "image_1_1.png").read_bytes()
    (data / "image_90_1.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (data / "image_91_0.png").write_text("this is a text file, not a picture")
    # batch 16 >= a rank's share of the training files: no batch is dropped, every epoch meets every file
    cfg = small_config(data, tmp_path / "runs", "bad", weights=backbone_weights, head_epochs=1, finetune_epochs=1,
                       batch_size=16)
    summary = run_training(cfg)
    hist = summary.metrics["history"]
    # every epoch meets both files again (summed across the two ranks, train + val)
    assert [h["unreadable_skipped"] for h in hist] == [2, 2]
    saved = json.loads(open(os.path.join(summary.bundle_dir, "metrics.json")).read())
    assert sorted(os.path.basename(p) for p in saved["unreadable_skipped"]) == ["image_90_1.png", "image_91_0.png"]
    assert all(saved["unreadable_reasons"].values())
    assert saved["counts"]["train"]["artifact"] + saved["counts"]["val"]["artifact"] == 9
