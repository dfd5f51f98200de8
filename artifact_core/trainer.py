"""Driver side of training: data preparation, the shared ``build_trainer()``, bundle export.

``jobs/train.py`` calls :func:`run_training`; ``jobs/tune.py`` reuses
:func:`prepare_run` and :func:`build_trainer` for every trial and
:func:`export_bundle` for the winner.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow.fs
import ray.train
import torch
from ray.train.torch import TorchTrainer

from artifact_core import demo_data, plots
from artifact_core.bundle import BundleConfig, save_bundle
from artifact_core.config import DEMO_DATA_FOLDER, TrainConfig
from artifact_core.data import LABEL_NAMES, class_weights, find_unreadable, scan_labeled_folder, stratified_split
from artifact_core.export_onnx import export_onnx_or_log
from artifact_core.metrics import (best_report, best_threshold, classification_metrics, precision_recall_curve,
                                   predict_labels, ranking_metrics, thin_curve)
from artifact_core.model import build_model, resolve_weights
from artifact_core.raycluster import check_fits
from artifact_core.storage import check_apart, resolve
from artifact_core.train_loop import MODEL_FILE, read_state, read_val_scores, train_loop_per_worker

log = logging.getLogger(__name__)

BUNDLE_FOLDER = "model"
#: The headline metric, reported beside the selection metric (``TrainConfig.select_metric``).
HEADLINE_METRIC = "val_micro_f1"


@dataclass
class TrainSummary:
    """What a finished run produced."""

    bundle_dir: str
    metrics: dict[str, Any]
    result: Any


def demo_data_dir(storage_path: str, *, n_train: int = 400, n_test: int = 100) -> str:
    """The demo data set under ``storage_path``, generated once (deterministic)."""
    if "://" in storage_path:
        raise ValueError("demo data needs a local --storage-path; pass --data-dir for remote storage")
    root = os.path.join(storage_path, DEMO_DATA_FOLDER)
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        log.info("generating demo data (%d train, %d test images) in %s", n_train, n_test, root)
        shutil.rmtree(root, ignore_errors=True)
        demo_data.generate(root, n_train=n_train, n_test=n_test)
        with open(done, "w") as f:
            f.write(f"{n_train} {n_test}\n")
    return root


def prepare_run(cfg: TrainConfig) -> dict[str, Any]:
    """Scan, check and split the data and load the starting weights, once, on the driver.

    Unreadable training images are skipped (count in the log, list under
    ``unreadable`` in the returned config) so one bad file does not cost a run.

    Returns:
        The ``train_loop_config`` for :func:`~artifact_core.train_loop.train_loop_per_worker`.
    """
    cfg.validate()
    data_dir = cfg.data_dir or os.path.join(demo_data_dir(cfg.storage_path, n_train=cfg.demo_train_images), "train")
    # The run folder (checkpoints, bundle, plots) must not mix with the data it trains on.
    if cfg.name:
        check_apart(resolve(f"{cfg.storage_path.rstrip('/')}/{cfg.name}"), resolve(data_dir),
                    output_name="the run folder (--storage-path/--name)", source_name="the training data")
    folder = scan_labeled_folder(data_dir, skip_unlabeled=cfg.skip_unlabeled)
    bad = dict(find_unreadable(folder.paths))
    if bad:
        log.warning("skipping %d unreadable image(s) in %s, e.g. %s", len(bad), data_dir,
                    "; ".join(f"{os.path.basename(p)}: {r}" for p, r in list(bad.items())[:3]))
    paths = [p for p in folder.paths if p not in bad]
    labels = [y for p, y in zip(folder.paths, folder.labels) if p not in bad]
    if len(set(labels)) < 2:
        raise ValueError(f"after skipping {len(bad)} unreadable file(s), {data_dir!r} no longer has both classes")
    train_idx, val_idx = stratified_split(labels, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_labels = [labels[i] for i in train_idx]
    split = {"train_paths": [paths[i] for i in train_idx], "train_labels": train_labels,
             "val_paths": [paths[i] for i in val_idx], "val_labels": [labels[i] for i in val_idx]}
    # Loading here makes a bad --weights fail before any worker starts, and workers need
    # neither internet nor the file. The source (cache, download, shipped copy) goes into the bundle.
    weights_state, weights_source = resolve_weights(cfg.weights)
    initial_state = build_model(weights=weights_state, dropout=cfg.dropout).state_dict()
    counts = {part: {LABEL_NAMES[c]: int(sum(1 for y in split[f"{part}_labels"] if y == c)) for c in LABEL_NAMES}
              for part in ("train", "val")}
    log.info("data %s: train %s, val %s, %d unreadable skipped", data_dir, counts["train"], counts["val"], len(bad))
    return {"train": {**cfg.to_dict(), "data_dir": data_dir}, "split": split,
            "class_weights": class_weights(train_labels).tolist(), "initial_state": initial_state,
            "counts": counts, "unreadable": sorted(bad), "weights_source": weights_source}


def build_trainer(cfg: TrainConfig, loop_config: dict[str, Any], *, name: str, storage_path: str,
                  callbacks: Sequence[Any] | None = None) -> TorchTrainer:
    """The one TorchTrainer set-up, shared by the train job and every tune trial.

    Checks first that the workers fit the cluster, waiting for an autoscaler to add
    nodes (``--wait-for-resources``): Ray Train would otherwise wait for them forever.
    """
    check_fits(num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
               gpus_per_worker=1.0 if cfg.use_gpu else 0.0, wait_s=cfg.wait_for_resources)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=cfg.select_metric, checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks or []),
            # Ray logs every report's full metrics dict per rank at INFO; the loop's own
            # one-line epoch summaries (rank 0) say the same readably.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _best_checkpoint(result: Any, metric: str) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint that is best by ``metric`` (ties: higher micro F1, later epoch)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not candidates and metric != HEADLINE_METRIC:
        # A run trained before --select-metric existed reported no AP: fall back to micro F1.
        log.warning("no checkpoint of %s reports %s; choosing by %s", result.path, metric, HEADLINE_METRIC)
        return _best_checkpoint(result, HEADLINE_METRIC)
    if not candidates:
        raise RuntimeError(f"run at {result.path} has no checkpoint with {metric}")
    return candidates[best_report([m for _, m in candidates], metric)]


def export_bundle(result: Any, cfg: TrainConfig, out_dir: str, *,
                  extra_metrics: dict[str, Any] | None = None, weights_source: str | None = None,
                  split: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the best checkpoint of ``result`` as a model bundle with a tuned threshold.

    ``out_dir`` may be local or a URI; plots (learning curves, PR curve, confusion matrix) go
    next to the weights, and ONNX models (fp32, int8 calibrated on ``split``'s validation
    images) too; an ONNX failure is logged and leaves the PyTorch bundle complete.
    ``weights_source`` (from :func:`prepare_run`) says where the starting weights came
    from; config.json records it.

    Returns:
        The metrics written to ``metrics.json``.
    """
    best, best_metrics = _best_checkpoint(result, cfg.select_metric)
    with best.as_directory() as d:
        labels, probs = read_val_scores(d)
        model = build_model(weights="none", dropout=cfg.dropout)
        model.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True))
    latest = result.checkpoint or best
    with latest.as_directory() as d:
        state = read_state(d)
    history = state["history"]
    threshold, _ = best_threshold(labels, probs)
    ranking = ranking_metrics(labels, probs)
    at_threshold = {**classification_metrics(labels, predict_labels(probs, threshold)), **ranking}
    curve = precision_recall_curve(labels, probs)
    metrics = {
        "best_epoch": best_metrics["epoch"], "best_phase": best_metrics["phase"],
        "select_metric": cfg.select_metric, "select_value": best_metrics.get(cfg.select_metric),
        "threshold": threshold,
        "ap_artifact": ranking["ap_artifact"], "roc_auc": ranking["roc_auc"],
        "validation": at_threshold,
        "validation_at_0.5": {**classification_metrics(labels, predict_labels(probs, 0.5)), **ranking},
        "pr_curve": {"class": "artifact (0)", "score": "1 - prob_artifact_free", **thin_curve(curve)},
        "note": "checkpoint chosen and threshold tuned on the same validation set: "
                "validation figures are optimistic; score a held-out set for an unbiased estimate",
        "history": history,
        "resumed_after_epochs": state.get("resumed_after", []),
        **(extra_metrics or {}),
    }
    config = BundleConfig(image_size=cfg.image_size, threshold=threshold, dropout=cfg.dropout,
                          train_config=cfg.to_dict(), weights_source=weights_source)
    with tempfile.TemporaryDirectory() as tmp:
        local = out_dir if "://" not in out_dir else tmp
        save_bundle(local, model, config, metrics)
        plots.learning_curves(history, os.path.join(local, "learning_curves.png"))
        plots.confusion_matrix_plot(at_threshold["confusion_matrix"], os.path.join(local, "confusion_matrix.png"),
                                    title=f"validation, threshold {threshold:.3f}")
        plots.pr_curve(curve, os.path.join(local, "pr_curve.png"), ap=ranking["ap_artifact"],
                       prevalence=ranking["prevalence_artifact"],
                       operating_point=(at_threshold["recall_artifact"], at_threshold["precision_artifact"]))
        metrics["onnx"] = export_onnx_or_log(local, (split or {}).get("val_paths"), (split or {}).get("val_labels"))
        if local != out_dir:
            pyarrow.fs.copy_files(local, out_dir)
    return metrics


def run_training(cfg: TrainConfig, *, loop_overrides: dict[str, Any] | None = None) -> TrainSummary:
    """Train with Ray Train and export the best checkpoint as ``<storage>/<name>/model``.

    Rerunning with the same ``storage_path`` and ``name`` resumes the run.
    """
    t0 = time.time()
    loop_config = prepare_run(cfg)
    loop_config.update(loop_overrides or {})
    cfg = TrainConfig.from_dict(loop_config["train"])  # with the resolved data folder
    run_dir = f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    trainer = build_trainer(cfg, loop_config, name=cfg.name, storage_path=cfg.storage_path)
    result = trainer.fit()
    bundle_dir = f"{run_dir}/{BUNDLE_FOLDER}"
    metrics = export_bundle(result, cfg, bundle_dir, extra_metrics={
        "counts": loop_config["counts"], "unreadable_skipped": loop_config["unreadable"],
        "wall_seconds": time.time() - t0}, weights_source=loop_config.get("weights_source"),
        split=loop_config["split"])
    if "://" not in run_dir:
        cfg.save(os.path.join(run_dir, "run_config.json"))
    return TrainSummary(bundle_dir=bundle_dir, metrics=metrics, result=result)
