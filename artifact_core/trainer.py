"""Driver side of training: data preparation, the shared ``build_trainer()``, bundle export.

``jobs/train.py`` calls :func:`run_training`; ``jobs/tune.py`` reuses
:func:`prepare_run` and :func:`build_trainer` for every trial and
:func:`export_bundle` for the winner.
"""

from __future__ import annotations

import json
import logging
import math
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
from artifact_core.config import DEMO_DATA_FOLDER, TrainConfig, auto_image_size
from artifact_core.data import LABEL_NAMES, class_weights, native_short_side, scan_labeled_folder, stratified_split
from artifact_core.export_onnx import export_onnx_or_log
from artifact_core.metrics import (SELECT_SCORE, SELECT_SCORE_METRIC, best_report, best_threshold,
                                   classification_metrics, precision_recall_curve, predict_labels, ranking_metrics,
                                   selection_key, thin_curve)
from artifact_core.model import model_for, resolve_weights
from artifact_core.raycluster import check_fits
from artifact_core.run_identity import Split, claim_run
from artifact_core.storage import Location, check_apart, resolve
from artifact_core.train_loop import MODEL_FILE, STATE_FILE, read_state, read_val_scores, train_loop_per_worker

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


def prepare_run(cfg: TrainConfig, *, kind: str = "train",
                extra_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """List and split the data, claim the run folder and load the starting weights, once, on the driver.

    No image is opened here: unreadable files are skipped by the workers that load them
    (counted with the epoch metrics). The first start of a named run stores its config and
    split in the run folder; a rerun resumes with the stored split, or is refused when it
    would train something else (:mod:`artifact_core.run_identity`).

    Args:
        cfg: the training config (``data_dir`` and ``storage_path`` may be URIs).
        kind: "train", or "sweep" when a sweep claims the folder (its trials sample the LRs).
        extra_identity: more fields that define the run (a sweep's search space).

    Returns:
        The ``train_loop_config`` for :func:`~artifact_core.train_loop.train_loop_per_worker`.
    """
    cfg.validate()
    data_dir = cfg.data_dir or os.path.join(demo_data_dir(cfg.storage_path, n_train=cfg.demo_train_images), "train")
    data = resolve(data_dir)
    run = resolve(cfg.storage_path).join(cfg.name) if cfg.name else None
    # The run folder (checkpoints, bundle, plots) must not mix with the data it trains on.
    if run is not None:
        check_apart(run, data, output_name="the run folder (--storage-path/--name)", source_name="the training data")
    folder = scan_labeled_folder(data.uri, skip_unlabeled=cfg.skip_unlabeled)
    prefix = folder.root.rstrip("/") + "/"
    relative = [p[len(prefix):] for p in folder.paths]
    if cfg.image_size == "auto":
        side = native_short_side(folder.paths, folder.fs)
        cfg.image_size = auto_image_size(side)
        log.info("image size: auto -> %d px (the images' short side is %s)", cfg.image_size,
                 f"{side} px" if side else "unknown: no sampled header could be read")
    train_dict = {**cfg.to_dict(), "data_dir": data.uri}

    def fresh_split() -> Split:
        train_idx, val_idx = stratified_split(folder.labels, val_fraction=cfg.val_fraction, seed=cfg.seed)
        return Split(data.uri, [relative[i] for i in train_idx], [folder.labels[i] for i in train_idx],
                     [relative[i] for i in val_idx], [folder.labels[i] for i in val_idx])

    # Loading here makes a bad --weights fail before any worker starts, and workers need
    # neither internet nor the file. The source (cache, download, shipped copy) goes into the bundle.
    weights_state, weights_source = resolve_weights(cfg.weights)
    initial_state = model_for(cfg, weights=weights_state).state_dict()
    # (Before the run folder is claimed: a start that fails on --weights leaves no record behind.)
    if run is None:
        stored = fresh_split()
    else:
        stored = claim_run(run, config=train_dict, kind=kind, listed=relative, data_root=data.uri,
                           make_split=fresh_split, overwrite=cfg.overwrite, extra_identity=extra_identity)
    split = stored.absolute(folder.root)
    counts = {part: {LABEL_NAMES[c]: int(sum(1 for y in split[f"{part}_labels"] if y == c)) for c in LABEL_NAMES}
              for part in ("train", "val")}
    log.info("data %s: train %s, val %s", data.uri, counts["train"], counts["val"])
    # data_fs: the pyarrow filesystem of data in object storage (None for local files); it
    # pickles to the workers, which read each image through it at its turn.
    return {"train": {**train_dict, "overwrite": False}, "split": split, "data_fs": folder.fs,
            "class_weights": class_weights(split["train_labels"]).tolist(), "initial_state": initial_state,
            "counts": counts, "weights_source": weights_source}


def storage_args(storage_path: str) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem`` for URIs) for Ray's ``RunConfig``.

    Passing the filesystem object keeps settings Ray would not find from the URI alone
    (a custom endpoint from ``AWS_ENDPOINT_URL``, credentials) on the workers as well.
    """
    loc = resolve(storage_path)
    if loc.is_local:
        return {"storage_path": loc.path}
    return {"storage_path": loc.path, "storage_filesystem": loc.fs}


def _ingest_args(cfg: TrainConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    """``datasets``/``dataset_config`` for ``--ingest ray-data`` (only the training part is split)."""
    if cfg.ingest != "ray-data":
        return {}
    from artifact_core.ingest import train_datasets
    return {"datasets": train_datasets(loop_config, image_size=cfg.image_size),
            "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}


def build_trainer(cfg: TrainConfig, loop_config: dict[str, Any], *, name: str, storage_path: str,
                  callbacks: Sequence[Any] | None = None) -> TorchTrainer:
    """The one TorchTrainer set-up, shared by the train job and every tune trial.

    Checks first that the workers fit the cluster, waiting for an autoscaler to add
    nodes (``--wait-for-resources``): Ray Train would otherwise wait for them forever.
    """
    check_fits(num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
               gpus_per_worker=1.0 if cfg.use_gpu else 0.0, wait_s=cfg.wait_for_resources)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}
    # select_score: the selection metric with one-class and diverged epochs ranked last
    # (metrics.selection_score), so Ray never deletes the checkpoint selection would keep. A
    # run resumed from checkpoints whose reports lack it (or were scored for another metric)
    # keeps the raw metric: Ray would score those reports -inf and delete its best epochs.
    score_attribute = (SELECT_SCORE if _reports_scored_for(resolve(storage_path).join(name), cfg.select_metric)
                       else cfg.select_metric)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        **_ingest_args(cfg, loop_config),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            **storage_args(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=score_attribute, checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks or []),
            # Ray logs every report's full metrics dict per rank at INFO; the loop's own
            # one-line epoch summaries (rank 0) say the same readably.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _reports_scored_for(run: Location, metric: str) -> bool:
    """Whether every epoch already recorded in ``run`` (its latest checkpoint's history) carries a
    ``select_score`` for ``metric``; True for a new run."""
    try:
        names = sorted(n for n in run.children() if n.startswith("checkpoint_"))
        if not names:
            return True
        history = json.loads(run.join(names[-1], STATE_FILE).read_text()).get("history", [])
    except (OSError, ValueError) as exc:
        log.warning("could not read the history of %s (%s); keeping checkpoints by %s", run.uri, exc, metric)
        return False
    return all(SELECT_SCORE in h and h.get(SELECT_SCORE_METRIC) == metric for h in history)


def _best_checkpoint(result: Any, metric: str) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint that is best by ``metric`` (ties: higher micro F1, later epoch)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not candidates and metric != HEADLINE_METRIC:
        # A run trained before --select-metric existed reported no AP: fall back to micro F1.
        log.warning("no checkpoint of %s reports %s; choosing by %s", result.path, metric, HEADLINE_METRIC)
        return _best_checkpoint(result, HEADLINE_METRIC)
    if not candidates:
        raise RuntimeError(f"run at {result.path} has no checkpoint with {metric}")
    best = candidates[best_report([m for _, m in candidates], metric)]
    if math.isinf(selection_key(best[1], metric)[0]):
        raise RuntimeError(f"run at {result.path} has no epoch to keep: every kept checkpoint diverged or reported "
                           f"no finite {metric} (epoch {best[1].get('epoch')}); lower --lr / --finetune-lr")
    return best


def export_bundle(result: Any, cfg: TrainConfig, out_dir: str | Location, *,
                  extra_metrics: dict[str, Any] | None = None, weights_source: str | None = None,
                  split: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the best checkpoint of ``result`` as a model bundle with a tuned threshold.

    ``out_dir`` may be local or a URI (a :class:`~artifact_core.storage.Location` is never
    parsed again, so a run name with a space reaches object storage intact); plots (learning curves, PR curve, confusion matrix) go
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
        model = model_for(cfg)
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
    config = BundleConfig(image_size=cfg.image_size, threshold=threshold, dropout=cfg.dropout, head=cfg.head,
                          train_config=cfg.to_dict(), weights_source=weights_source,
                          test_time_flip=cfg.flips_at_test_time, head_members=cfg.ensemble_members)
    dest = out_dir if isinstance(out_dir, Location) else resolve(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        local = dest.path if dest.is_local else tmp
        save_bundle(local, model, config, metrics)
        plots.learning_curves(history, os.path.join(local, "learning_curves.png"))
        plots.confusion_matrix_plot(at_threshold["confusion_matrix"], os.path.join(local, "confusion_matrix.png"),
                                    title=f"validation, threshold {threshold:.3f}")
        plots.pr_curve(curve, os.path.join(local, "pr_curve.png"), ap=ranking["ap_artifact"],
                       prevalence=ranking["prevalence_artifact"],
                       operating_point=(at_threshold["recall_artifact"], at_threshold["precision_artifact"]))
        metrics["onnx"] = export_onnx_or_log(local, (split or {}).get("val_paths"), (split or {}).get("val_labels"))
        if not dest.is_local:
            pyarrow.fs.copy_files(local, dest.path, destination_filesystem=dest.fs)
    return metrics


def unreadable_of(result: Any) -> dict[str, str]:
    """Files the workers skipped as unreadable (path -> reason), from the run's latest checkpoint."""
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return {}
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{STATE_FILE}") as f:
            return dict(json.loads(f.read().decode("utf-8")).get("unreadable", {}))
    except (OSError, ValueError):
        return {}


def run_training(cfg: TrainConfig, *, loop_overrides: dict[str, Any] | None = None) -> TrainSummary:
    """Train with Ray Train and export the best checkpoint as ``<storage>/<name>/model``.

    Rerunning with the same ``storage_path`` and ``name`` resumes the run with its stored
    split; other training settings or data are refused (see :mod:`artifact_core.run_identity`).
    """
    t0 = time.time()
    loop_config = prepare_run(cfg)
    loop_config.update(loop_overrides or {})
    cfg = TrainConfig.from_dict(loop_config["train"])  # with the resolved data folder
    bundle = resolve(cfg.storage_path).join(cfg.name, BUNDLE_FOLDER)
    trainer = build_trainer(cfg, loop_config, name=cfg.name, storage_path=cfg.storage_path)
    result = trainer.fit()
    bundle_dir = bundle.uri
    unreadable = unreadable_of(result)
    metrics = export_bundle(result, cfg, bundle, extra_metrics={
        "counts": loop_config["counts"], "unreadable_skipped": sorted(unreadable),
        "unreadable_reasons": unreadable, "wall_seconds": time.time() - t0},
        weights_source=loop_config.get("weights_source"), split=loop_config["split"])
    return TrainSummary(bundle_dir=bundle_dir, metrics=metrics, result=result)
