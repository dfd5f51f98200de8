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

import ray.train
import torch
from ray.train.torch import TorchTrainer

from artifact_core import demo_data, plots
from artifact_core.bundle import BundleConfig, save_bundle, upload_bundle
from artifact_core.config import DEMO_DATA_FOLDER, TrainConfig, auto_image_size
from artifact_core.data import (LABEL_NAMES, check_classes_readable, check_split, class_weights, distinct_files,
                                native_short_side, scan_labeled_folder, stratified_split)
from artifact_core.export_onnx import export_onnx_or_log
from artifact_core.metrics import (KEEP_SCORE, SELECT_SCORE, SELECT_SCORE_METRIC, best_report, best_threshold,
                                   classification_metrics, precision_recall_curve, predict_labels, ranking_metrics,
                                   selection_key, thin_curve)
from artifact_core.errors import WeightsUnavailableError
from artifact_core.model import model_for, resolve_weights
from artifact_core.raycluster import check_fits
from artifact_core.run_identity import (SNAPSHOT_FILE, RunConflictError, Split, check_holder, claim_run, hold_run,
                                       new_holder, read_record, stored_split_paths)
from artifact_core.storage import Location, check_apart, is_uri, redact_uri, resolve, uri_without_credentials
from artifact_core.train_loop import (MODEL_FILE, STATE_FILE, LoopState, check_phase_one_growth, read_state,
                                      read_val_scores, train_loop_per_worker)

log = logging.getLogger(__name__)

BUNDLE_FOLDER = "model"
#: The headline metric, reported beside the selection metric (``TrainConfig.select_metric``).
HEADLINE_METRIC = "val_micro_f1"
#: CPUs of each ``--ingest ray-data`` decode task (a run needs one free beside its workers).
DATA_TASK_CPUS = 1.0


@dataclass
class TrainSummary:
    """What a finished run produced."""

    bundle_dir: str
    metrics: dict[str, Any]
    result: Any


#: Written into the demo data folder before generation starts and removed when it ends: a folder
#: with it is an interrupted generation of this project, safe to delete.
DEMO_GENERATING = ".generating"
#: Written when generation ends: "<train images> <test images>".
DEMO_COMPLETE = ".complete"


def demo_data_dir(storage_path: str, *, n_train: int = 400, n_test: int = 100) -> str:
    """The demo data set under ``storage_path``, generated once (deterministic).

    Generated again when the image counts asked for differ from those it was made with.
    Only a folder this project's generator marked (:data:`DEMO_GENERATING` at its start,
    :data:`DEMO_COMPLETE` at its end) is ever deleted.

    Raises:
        ValueError: ``storage_path`` is a URI, or ``<storage>/demo_data`` holds something else.
    """
    if is_uri(storage_path):
        raise ValueError("demo data needs a local --storage-path; pass --data-dir for remote storage")
    root = os.path.join(storage_path, DEMO_DATA_FOLDER)
    done = os.path.join(root, DEMO_COMPLETE)
    # (a link to a generated folder is ours too: used as it is, never deleted through)
    ours = any(os.path.isfile(os.path.join(root, m)) for m in (DEMO_COMPLETE, DEMO_GENERATING))
    if ours and os.path.isfile(done):
        made = _demo_counts(done)
        if made == (n_train, n_test):
            return root
        log.info("demo data in %s was made with %s train and test images, %d and %d are asked for: generating it "
                 "again", root, "unknown" if made is None else f"{made[0]} and {made[1]}", n_train, n_test)
    elif os.path.lexists(root) and not ours and not (os.path.isdir(root) and not os.listdir(root)):
        raise ValueError(f"{root} is not demo data this project generated (it has no {DEMO_COMPLETE} or "
                         f"{DEMO_GENERATING} file) and demo data would replace it; nothing was deleted. Move it "
                         f"away, choose another --storage-path, or pass --data-dir")
    if os.path.islink(root):
        raise ValueError(f"{root} is a link to demo data of other counts (or an interrupted generation); "
                         f"generating again would replace what it points to. Remove the link, or pass the "
                         f"--demo-train-images it was made with")
    log.info("generating demo data (%d train, %d test images) in %s", n_train, n_test, root)
    if ours:
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    # The marker first: a generation killed midway leaves a folder known to be ours.
    with open(os.path.join(root, DEMO_GENERATING), "w") as f:
        f.write(f"{n_train} {n_test}\n")
    demo_data.generate(root, n_train=n_train, n_test=n_test)
    with open(done, "w") as f:
        f.write(f"{n_train} {n_test}\n")
    os.remove(os.path.join(root, DEMO_GENERATING))
    return root


def _demo_counts(done: str) -> tuple[int, int] | None:
    """(train, test) image counts a :data:`DEMO_COMPLETE` file records; None when unreadable."""
    try:
        with open(done) as f:
            n_train, n_test = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return None
    return n_train, n_test


def _check_demo_counts(run: Location, n_train: int) -> None:
    """Refuse, before the demo data is generated again, a rerun of a demo run with another
    ``--demo-train-images``: the new data would delete the files of the run's split (and of
    any job reading them) only for the rerun to be refused."""
    try:
        record = read_record(run)
        made = int(record["config"]["demo_train_images"]) if record else None
    except (OSError, ValueError, KeyError, TypeError):
        return  # claim_run names what is wrong with the record
    if made is not None and made != n_train and _trained_on_demo(record):
        raise RunConflictError(
            f"run {redact_uri(run.uri)} trained on demo data of {made} training images; --demo-train-images "
            f"{n_train} would generate it again and remove that run's images. Pass another --storage-path (it "
            f"gets demo data of its own), or --overwrite to start this run again on the new demo data")


def _trained_on_demo(record: dict[str, Any]) -> bool:
    """Whether a run record's data folder is the demo data's (``<storage>/demo_data/train``)."""
    data = str(record.get("config", {}).get("data_dir") or "")
    return data.rstrip("/").endswith(f"{DEMO_DATA_FOLDER}/train")


def prepare_run(cfg: TrainConfig, *, kind: str = "train",
                extra_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """List and split the data, claim the run folder and load the starting weights, once, on the driver.

    Only a few images of each class are opened here (a class none of which reads is refused):
    unreadable files are skipped by the workers that load them (counted with the epoch metrics). The first start of a named run stores its config and
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
    if not cfg.data_dir and cfg.name and not cfg.overwrite:
        _check_demo_counts(resolve(cfg.storage_path).join(cfg.name), cfg.demo_train_images)
    data_dir = cfg.data_dir or os.path.join(demo_data_dir(cfg.storage_path, n_train=cfg.demo_train_images), "train")
    data = resolve(data_dir)
    # The data folder as runs record and print it: without credentials (the key may rotate;
    # records and logs are read by others). The URI with them stays in memory for reading.
    data_root = uri_without_credentials(data.uri)
    run = resolve(cfg.storage_path).join(cfg.name) if cfg.name else None
    # The run folder (checkpoints, bundle, plots) must not mix with the data it trains on.
    if run is not None:
        check_apart(run, data, output_name="the run folder (--storage-path/--name)", source_name="the training data")
    folder = scan_labeled_folder(data.uri, skip_unlabeled=cfg.skip_unlabeled)
    check_classes_readable(folder.paths, folder.labels, folder.fs)  # before a record: nothing to clear
    prefix = folder.root.rstrip("/") + "/"
    relative = [p[len(prefix):] for p in folder.paths]
    distinct_cache: list[list[int]] = []

    def distinct() -> list[int]:
        # Each file once (local data): a file under two names must not land on both sides.
        if not distinct_cache:
            distinct_cache.append(distinct_files(folder.paths, folder.labels) if folder.fs is None
                                  else list(range(len(folder.paths))))
        return distinct_cache[0]

    if cfg.image_size == "auto":
        # A rerun samples the files its first start did (its stored split): files added since
        # must not change the size, and so the run's identity. A first start samples the
        # files its split is drawn from (each file once), which is what that split stores.
        stored = None if run is None or cfg.overwrite else stored_split_paths(run, data_root, folder.root)
        side = native_short_side(stored or [folder.paths[i] for i in distinct()], folder.fs)
        cfg.image_size = auto_image_size(side)
        log.info("image size: auto -> %d px (the short side of %s is %s)", cfg.image_size,
                 "the run's stored split" if stored else "the images",
                 f"{side} px" if side else "unknown: no sampled header could be read")
    train_dict = {**cfg.to_dict(), "data_dir": data.uri}

    def fresh_split() -> Split:
        # Only here (and for a first start's auto size), when a split is drawn: a stored split
        # keeps the names it was drawn from.
        once = distinct()
        train_idx, val_idx = stratified_split([folder.labels[i] for i in once], val_fraction=cfg.val_fraction,
                                              seed=cfg.seed)
        train_idx, val_idx = [once[i] for i in train_idx], [once[i] for i in val_idx]
        # Refused before the run folder is claimed: a split that cannot train leaves no record.
        for warning in check_split([folder.labels[i] for i in train_idx], [folder.labels[i] for i in val_idx],
                                   cfg.val_fraction):
            log.warning("%s", warning)
        return Split(data_root, [relative[i] for i in train_idx], [folder.labels[i] for i in train_idx],
                     [relative[i] for i in val_idx], [folder.labels[i] for i in val_idx])

    recorded_epochs, resumed_source = None, None
    if run is not None and not cfg.overwrite:
        _check_resumable(run, cfg)
        recorded_epochs = _recorded_epochs(run)
        if kind == "train":
            resumed_source = _resumed_weights_source(run)
    if resumed_source is not None:
        # Ray resumes from a checkpoint that replaces every weight: loading --weights again
        # could only fail (a file deleted since, a head node offline) or record another source
        # (a download now, the shipped copy then) than the one the run trained from.
        weights_state, weights_source = None, resumed_source
        log.info("resuming from a checkpoint: starting weights not loaded again (the run started from %s)",
                 weights_source)
    else:
        # Loading here makes a bad --weights fail before any worker starts, and workers need
        # neither internet nor the file. The source (cache, download, shipped copy) goes into the bundle.
        weights_state, weights_source = resolve_weights(cfg.weights)
    try:
        # --seed is the split's and the initialisation's: the same seed starts from the same head
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            initial_state = model_for(cfg, weights=weights_state).state_dict()
    except (RuntimeError, ValueError, AttributeError, KeyError, TypeError) as exc:
        # torch's first line is often only "Error(s) in loading state_dict for ...": show the first that says what
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        first = next((ln for ln in lines if not ln.startswith("Error(s) in loading")), lines[0])
        raise WeightsUnavailableError(f"--weights {cfg.weights!r} does not fit MobileNetV2 with the {cfg.head} head: "
                                      f"{first[:300]}") from exc
    # (Before the run folder is claimed: a start that fails on --weights leaves no record behind.)
    holder = new_holder()
    # what hold_run checks again before this start trains (the record may change meanwhile)
    claim: dict[str, Any] = {"kind": kind, "extra_identity": extra_identity}
    if run is None:
        stored = fresh_split()
    else:
        stored = claim_run(run, config=train_dict, kind=kind, listed=relative, data_root=data_root,
                           make_split=fresh_split, overwrite=cfg.overwrite, extra_identity=extra_identity,
                           weights_source=weights_source, claim=claim)
    split = stored.absolute(folder.root)
    counts = {part: {LABEL_NAMES[c]: int(sum(1 for y in split[f"{part}_labels"] if y == c)) for c in LABEL_NAMES}
              for part in ("train", "val")}
    log.info("data %s: train %s, val %s", data_root, counts["train"], counts["val"])
    # data_fs: the pyarrow filesystem of data in object storage (None for local files); it
    # pickles to the workers, which read each image through it at its turn.
    return {"train": {**train_dict, "overwrite": False}, "split": split, "data_fs": folder.fs,
            "class_weights": class_weights(split["train_labels"]).tolist(), "initial_state": initial_state,
            "counts": counts, "weights_source": weights_source, "recorded_epochs": recorded_epochs,
            # the workers stop when another start claims the run (run_identity.holder_lost)
            # (the workers check who holds the run once the caller holds it: hold_run)
            "run_folder": run, "run_holder": None, "holder": holder, "record_config": train_dict,
            "claim": claim}


def storage_args(storage_path: str) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem`` for URIs) for Ray's ``RunConfig``.

    Passing the filesystem object keeps settings Ray would not find from the URI alone
    (a custom endpoint from ``AWS_ENDPOINT_URL``, credentials) on the workers as well.
    """
    loc = resolve(storage_path)
    if loc.is_local:
        return {"storage_path": loc.path}
    return {"storage_path": loc.path, "storage_filesystem": loc.fs}


def data_task_cpus(cfg: TrainConfig) -> float:
    """CPUs a run needs beside its workers: one for ``--ingest ray-data``'s decode tasks
    (workers that take every CPU would wait for their data forever), none otherwise."""
    return DATA_TASK_CPUS if cfg.ingest == "ray-data" else 0.0


def _ingest_args(cfg: TrainConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    """``datasets``/``dataset_config`` for ``--ingest ray-data`` (only the training part is split)."""
    if cfg.ingest != "ray-data":
        return {}
    from artifact_core.ingest import train_datasets
    return {"datasets": train_datasets(loop_config, image_size=cfg.image_size, cpus_per_task=DATA_TASK_CPUS),
            "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}


def check_workers_fit(cfg: TrainConfig) -> None:
    """Check that the run's workers fit the cluster, waiting for an autoscaler to add nodes
    (``--wait-for-resources``); raises ``ClusterTooSmallError`` naming what is missing."""
    check_fits(num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
               gpus_per_worker=1.0 if cfg.use_gpu else 0.0, reserved_cpus=data_task_cpus(cfg),
               wait_s=cfg.wait_for_resources)


def build_trainer(cfg: TrainConfig, loop_config: dict[str, Any], *, name: str, storage_path: str,
                  callbacks: Sequence[Any] | None = None) -> TorchTrainer:
    """The one TorchTrainer set-up, shared by the train job and every tune trial.

    Checks first that the workers fit the cluster, waiting for an autoscaler to add
    nodes (``--wait-for-resources``): Ray Train would otherwise wait for them forever.
    """
    check_workers_fit(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}
    score_attribute = checkpoint_score_attribute(resolve(storage_path).join(name), cfg.select_metric)
    num_to_keep = checkpoints_to_keep(score_attribute)
    if num_to_keep is None:
        log.warning("run %s was scored for another --select-metric (or before scores were recorded): keeping "
                    "every checkpoint of this run, since the plain %s can rank a one-class epoch above ones "
                    "with skill", name, score_attribute)
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
                num_to_keep=num_to_keep, checkpoint_score_attribute=score_attribute, checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks or []),
            # Ray logs every report's full metrics dict per rank at INFO; the loop's own
            # one-line epoch summaries (rank 0) say the same readably.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def checkpoint_score_attribute(run: Location, metric: str) -> str:
    """The report key Ray's checkpoint keeper orders the checkpoints of ``run`` by.

    ``keep_score`` (:func:`~artifact_core.metrics.keep_score`) orders them exactly as
    selection does, ties included, so Ray never deletes the checkpoint selection would keep.
    A run resumed from checkpoints whose reports lack it keeps the key they have:
    ``select_score`` when every report has one for ``metric``, else the raw metric (Ray would
    score reports without the key -inf and delete the run's best epochs).
    """
    if _reports_scored_for(run, metric, KEEP_SCORE):
        return KEEP_SCORE
    if _reports_scored_for(run, metric):
        return SELECT_SCORE
    return metric


def checkpoints_to_keep(score_attribute: str) -> int | None:
    """How many checkpoints Ray keeps when ordering them by ``score_attribute``: the best two
    by a selection score; all (None) by a plain metric, since a plain decision metric ranks a
    one-class epoch above epochs with skill (micro F1 0.90 against 0.87 under a 1:9
    imbalance), and Ray would delete exactly those."""
    return 2 if score_attribute in (KEEP_SCORE, SELECT_SCORE) else None


def latest_checkpoint_state(run: Location) -> dict[str, Any] | None:
    """The loop state (``state.json``) of the checkpoint Ray resumes ``run`` from
    (:func:`registered_checkpoint`), else of the newest complete one; None when none.

    Without Ray's list, checkpoint folders are tried newest first: one without a readable
    state file is being (or was, when the job was killed) written, and Ray never registered it.

    Raises:
        OSError: the run folder cannot be listed, or it has checkpoints and none is readable
            (not the same as a new run: callers then take their cautious path).
    """
    registered = registered_checkpoint(run)
    # The one Ray resumes from, when its list says; else newest first by name
    names = [registered] if registered else sorted((n for n in run.children() if n.startswith("checkpoint_")),
                                                   reverse=True)
    for name in names:
        state_file = run.join(name, STATE_FILE)
        try:
            state = json.loads(state_file.read_text()) if state_file.exists() else None
        except (OSError, ValueError) as exc:
            log.warning("skipping checkpoint %s: its %s is not readable (%s)", run.join(name).uri, STATE_FILE, exc)
            continue
        if isinstance(state, dict):
            return state
    if names:
        raise OSError(f"no checkpoint in {run.uri} has a readable {STATE_FILE}")
    return None


def registered_checkpoint(run: Location) -> str | None:
    """The checkpoint folder Ray Train resumes ``run`` from: the latest one its checkpoint list
    (``checkpoint_manager_snapshot.json``) registered, when that folder holds its state; None
    when Ray would start afresh, or the list cannot be read (Ray refuses the run then)."""
    try:
        snapshot = json.loads(run.join(SNAPSHOT_FILE).read_text())
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        if isinstance(name, str) and name and run.join(name, STATE_FILE).exists():
            return name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _resumed_weights_source(run: Location) -> str | None:
    """Where the starting weights of the run in ``run`` came from, when Ray resumes it from a
    checkpoint and its record says (None: this start loads ``--weights``)."""
    if registered_checkpoint(run) is None:
        return None
    try:
        source = (read_record(run) or {}).get("weights_source")
    except (OSError, ValueError):
        return None
    return source if isinstance(source, str) and source else None


def _reports_scored_for(run: Location, metric: str, key: str = SELECT_SCORE) -> bool:
    """Whether every epoch already recorded in ``run`` (its newest complete checkpoint's history)
    carries ``key`` (``select_score`` or ``keep_score``) computed for ``metric``; True for a new run."""
    try:
        history = (latest_checkpoint_state(run) or {}).get("history", [])
    except OSError as exc:
        log.warning("could not read the history of %s (%s); keeping checkpoints by %s", run.uri, exc, metric)
        return False
    return isinstance(history, list) and all(
        isinstance(h, dict) and key in h and h.get(SELECT_SCORE_METRIC) == metric for h in history)


def _recorded_epochs(run: Location) -> dict[str, int] | None:
    """Each phase's epochs as ``run``'s record held them before this start (None: no record):
    what a checkpoint of an older version, which does not record its plan, was run for."""
    try:
        record = read_record(run)
        return {"head": int(record["config"]["head_epochs"]),
                "finetune": int(record["config"]["finetune_epochs"])} if record else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_resumable(run: Location, cfg: TrainConfig) -> None:
    """Refuse, before anything is recorded or trained, a rerun that raises ``--head-epochs``
    above its record although the loop would ignore them (phase 2 has begun)."""
    try:
        record = read_record(run)
        recorded = int(record["config"]["head_epochs"]) if record else None
        if recorded is None or cfg.head_epochs <= recorded:
            return  # not raised now (a record an older version raised is only warned about in the loop)
        state = latest_checkpoint_state(run)
    except (OSError, ValueError, KeyError, TypeError):
        return  # the loop warns at its start
    if state is not None:
        check_phase_one_growth(LoopState.from_dict(state), cfg.head_epochs, run=f"run {run.uri}")


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
        # A ValueError: the job prints it as one line (the fix is the user's: lower rates).
        raise ValueError(f"run at {result.path} has no epoch to keep: every kept checkpoint diverged or reported "
                         f"no finite {metric} (epoch {best[1].get('epoch')}); lower --lr / --finetune-lr")
    return best


def _pruned_best_note(history: list[dict[str, Any]], chosen: dict[str, Any], metric: str) -> str:
    """A note when the run's history holds a better epoch by ``metric`` than the kept checkpoint
    chosen ("" when not): a rerun under another ``--select-metric`` chooses among the
    checkpoints the earlier metric kept, and the others are gone."""
    reports = [h for h in history if isinstance(h, dict) and metric in h]
    if not reports:
        return ""
    best = reports[best_report(reports, metric)]
    if int(best.get("epoch", -1)) == int(chosen.get("epoch", -1)) or \
            selection_key(best, metric) <= selection_key(chosen, metric):
        return ""
    return (f"the best epoch by {metric} in this run's history is {best.get('epoch')} ({metric} "
            f"{best.get(metric)}), but its checkpoint was not kept (checkpoints were kept by another "
            f"--select-metric before); the bundle holds epoch {chosen.get('epoch')} ({chosen.get(metric)}), "
            f"the best of those kept. Retrain under a new --name to select by {metric} from every epoch")


def export_bundle(result: Any, cfg: TrainConfig, out_dir: str | Location, *,
                  extra_metrics: dict[str, Any] | None = None, weights_source: str | None = None,
                  split: dict[str, Any] | None = None, data_fs: Any = None) -> dict[str, Any]:
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
    select_note = _pruned_best_note(history, best_metrics, cfg.select_metric)
    if select_note:
        log.warning("%s", select_note)
    if len(set(int(y) for y in labels)) == 2:
        threshold, _ = best_threshold(labels, probs)
        threshold_source = "tuned on validation (micro F1)"
    else:
        # With one class in validation any cut below (or above) every score is "perfect": a
        # tuned threshold would flag nothing (or everything) on new images. Keep the neutral one.
        threshold, threshold_source = 0.5, "0.5: validation holds one class, nothing to tune on"
        log.warning("threshold left at 0.5: the validation split holds only one class")
    ranking = ranking_metrics(labels, probs)
    at_threshold = {**classification_metrics(labels, predict_labels(probs, threshold)), **ranking}
    curve = precision_recall_curve(labels, probs)
    metrics = {
        "best_epoch": best_metrics["epoch"], "best_phase": best_metrics["phase"],
        "select_metric": cfg.select_metric, "select_value": best_metrics.get(cfg.select_metric),
        "threshold": threshold, "threshold_source": threshold_source,
        "ap_artifact": ranking["ap_artifact"], "roc_auc": ranking["roc_auc"],
        "validation": at_threshold,
        "validation_at_0.5": {**classification_metrics(labels, predict_labels(probs, 0.5)), **ranking},
        "pr_curve": {"class": "artifact (0)", "score": "1 - prob_artifact_free", **thin_curve(curve)},
        "note": "checkpoint chosen and threshold tuned on the same validation set: "
                "validation figures are optimistic; score a held-out set for an unbiased estimate",
        "history": history,
        "resumed_after_epochs": state.get("resumed_after", []),
        **({"select_note": select_note} if select_note else {}),
        **(extra_metrics or {}),
    }
    config = BundleConfig(image_size=cfg.image_size, threshold=threshold, dropout=cfg.dropout, head=cfg.head,
                          train_config=cfg.shareable_dict(), weights_source=weights_source,
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
        # (the split's paths are on the data's filesystem: a bucket's keys for s3:// data)
        metrics["onnx"] = export_onnx_or_log(local, (split or {}).get("val_paths"), (split or {}).get("val_labels"),
                                             fs=data_fs)
        if not dest.is_local:
            upload_bundle(local, dest)
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
    # Before the run folder is touched: a start whose workers cannot run must not clear a
    # run (--overwrite) or take it from the job that trains it.
    check_workers_fit(cfg.validate())
    loop_config = prepare_run(cfg)
    loop_config.update(loop_overrides or {})
    cfg = TrainConfig.from_dict(loop_config["train"])  # with the resolved data folder
    bundle = resolve(cfg.storage_path).join(cfg.name, BUNDLE_FOLDER)
    # (the workers read their config at fit(); they check this id from then on)
    loop_config["run_holder"] = loop_config["holder"]["id"]
    trainer = build_trainer(cfg, loop_config, name=cfg.name, storage_path=cfg.storage_path)
    # From here this start holds the run (an earlier job still running stops at its next epoch):
    # the last step before fit(), so a start that fails on its way leaves the running job alone.
    hold_run(loop_config["run_folder"], loop_config["holder"], loop_config["record_config"],
             claim=loop_config["claim"])
    try:
        result = trainer.fit()
    except Exception:
        # A job taken over can fail on the way out (its checkpoints deleted under a restarted
        # worker group): the takeover is the error to report, not what it caused.
        check_holder(loop_config["run_folder"], loop_config["run_holder"])
        raise
    # A job whose run another start claimed meanwhile exports nothing: the bundle is the new holder's.
    check_holder(loop_config["run_folder"], loop_config["run_holder"])
    bundle_dir = bundle.uri
    unreadable = unreadable_of(result)
    metrics = export_bundle(result, cfg, bundle, extra_metrics={
        "counts": loop_config["counts"], "unreadable_skipped": sorted(unreadable),
        "unreadable_reasons": unreadable, "wall_seconds": time.time() - t0},
        weights_source=loop_config.get("weights_source"), split=loop_config["split"],
        data_fs=loop_config.get("data_fs"))
    return TrainSummary(bundle_dir=bundle_dir, metrics=metrics, result=result)
