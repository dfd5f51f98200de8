"""Ray Tune sweep over learning rate and unfreeze depth; each trial is a multi-worker TorchTrainer.

Train V2 pattern: a Tune *function trainable* builds the trial's trainer with the shared
:func:`~artifact_core.trainer.build_trainer` and a ``TuneReportCallback``, so every epoch
report reaches Tune and ASHA can stop a bad trial after any epoch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from artifact_core import plots
from artifact_core.config import SweepConfig, TrainConfig
from artifact_core.raycluster import ClusterTooSmallError
from artifact_core.storage import Location, resolve
from artifact_core.trainer import BUNDLE_FOLDER, METRIC, build_trainer, export_bundle, prepare_run, storage_args

log = logging.getLogger(__name__)

TRIALS_FOLDER = "trials"


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    """The training config of one trial: the base with the sampled values applied."""
    cfg = TrainConfig.from_dict(base)
    cfg.lr = float(params["lr"])
    cfg.finetune_lr = float(params["lr"]) * float(params["finetune_lr_ratio"])
    cfg.unfreeze_depth = int(params["unfreeze_depth"])
    return cfg


def tune_trial(params: dict[str, Any], shared: dict[str, Any]) -> None:
    """Tune function trainable: one multi-worker training run reporting every epoch to Tune."""
    cfg = trial_config(shared["loop_config"]["train"], params)
    loop_config = {**shared["loop_config"], "train": cfg.to_dict()}
    trial_id = tune.get_context().get_trial_id()
    # A fixed run name per trial: a restored sweep resumes the trial's Train run.
    trainer = build_trainer(cfg, loop_config, name=trial_id, storage_path=shared["trials_path"],
                            callbacks=[TuneReportCallback()])
    trainer.fit()


def _concurrency(cfg: SweepConfig) -> int:
    per_trial = cfg.base.num_workers * cfg.base.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 0.0)
    fits = int(total // per_trial) if per_trial else 0
    if cfg.base.use_gpu:
        fits = min(fits, int(ray.cluster_resources().get("GPU", 0) // cfg.base.num_workers))
    if fits < 1:
        raise ClusterTooSmallError(
            f"one trial needs {cfg.base.num_workers} worker(s) x {cfg.base.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.base.use_gpu else ''}, but the cluster has {total:g} CPU; "
            f"lower --num-workers or --cpus-per-worker")
    if cfg.max_concurrent_trials:
        if cfg.max_concurrent_trials > fits:
            log.warning("--max-concurrent-trials %d > %d that fit at once; using %d",
                        cfg.max_concurrent_trials, fits, fits)
        return min(cfg.max_concurrent_trials, fits)
    return fits


def _param_space(cfg: SweepConfig) -> dict[str, Any]:
    return {
        "lr": tune.grid_search(cfg.lrs) if cfg.lrs else tune.loguniform(cfg.lr_min, cfg.lr_max),
        "finetune_lr_ratio": tune.loguniform(cfg.finetune_lr_ratio_min, cfg.finetune_lr_ratio_max)
        if cfg.finetune_lr_ratio_max > cfg.finetune_lr_ratio_min else cfg.finetune_lr_ratio_min,
        "unfreeze_depth": tune.choice(cfg.unfreeze_depths),
    }


def results_table(grid: Any, total_epochs: int) -> pd.DataFrame:
    """One row per trial: config, best micro F1, epochs run and how the trial ended."""
    rows = []
    for r in grid:
        df = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        epochs = int(df["epoch"].max()) if "epoch" in df else 0
        if r.error is not None:
            status = "error"
        elif epochs >= total_epochs or (len(df) and bool(df["early_stopped"].iloc[-1]) and df["phase"].iloc[-1] == "finetune"):
            status = "completed"
        else:
            status = "stopped early"
        cfg = r.config or {}
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id", ""), "lr": cfg.get("lr"), "finetune_lr": (cfg.get("lr") or 0) * (cfg.get("finetune_lr_ratio") or 0),
            "unfreeze_depth": cfg.get("unfreeze_depth"),
            f"best_{METRIC}": float(df[METRIC].max()) if METRIC in df else math.nan,
            "epochs": epochs, "status": status,
            "error": str(r.error).splitlines()[0][:300] if r.error is not None else "",
        })
    return pd.DataFrame(rows).sort_values(f"best_{METRIC}", ascending=False, na_position="last")


def _search_space_identity(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep settings that define a sweep (beside the training fields): another value is another sweep."""
    return {"search_space": {"lr_min": cfg.lr_min, "lr_max": cfg.lr_max, "lrs": cfg.lrs,
                             "finetune_lr_ratio_min": cfg.finetune_lr_ratio_min,
                             "finetune_lr_ratio_max": cfg.finetune_lr_ratio_max,
                             "unfreeze_depths": list(cfg.unfreeze_depths), "scheduler": cfg.scheduler,
                             "grace_period": cfg.grace_period, "num_samples": cfg.num_samples}}


def write_results(sweep: Location, table: pd.DataFrame) -> None:
    """results.csv and tune_results.png into the sweep folder (local or object storage)."""
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    sweep.join("results.csv").write_text(buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "tune_results.png")
        plots.tune_results(table, METRIC, local)
        sweep.join("tune_results.png").upload(local)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep and export results, best config and the best bundle.

    Returns:
        {"results": DataFrame, "best_config": dict, "bundle_dir": str, "sweep_dir": str}.
    """
    t0 = time.time()
    cfg.validate()
    base = cfg.base
    if cfg.resume and base.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one of them")
    sweep = resolve(base.storage_path).join(base.name)
    sweep_dir = sweep.uri
    loop_config = prepare_run(base, kind="sweep", extra_identity=_search_space_identity(cfg))
    concurrent = _concurrency(cfg)
    shared = {"loop_config": loop_config, "trials_path": sweep.join(TRIALS_FOLDER).uri}
    storage = storage_args(sweep_dir)
    fs = storage.get("storage_filesystem")
    # The driver of a trial only waits on its TorchTrainer: it needs no CPU of its own, and
    # taking one would deadlock small clusters ({"cpu": 0} alone is refused by Tune).
    trainable = tune.with_resources(tune.with_parameters(tune_trial, shared=shared), {"cpu": 0, "memory": 1})
    total_epochs = base.head_epochs + base.finetune_epochs
    experiment = f"{storage['storage_path']}/tune"
    if cfg.resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming sweep %s", sweep.join("tune").uri)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        if cfg.resume:
            log.warning("nothing to resume at %s; starting a new sweep", experiment)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=total_epochs,
                                   grace_period=min(cfg.grace_period, total_epochs), reduction_factor=2)
                     if cfg.scheduler == "asha" else None)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(cfg),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=cfg.num_samples,
                                        max_concurrent_trials=concurrent, scheduler=scheduler),
            run_config=tune.RunConfig(name="tune", **storage,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    table = results_table(grid, total_epochs)
    write_results(sweep, table)
    ok = table[table["status"] != "error"].dropna(subset=[f"best_{METRIC}"])
    if ok.empty:
        raise RuntimeError(f"every trial failed; see {sweep.join('results.csv').uri}")
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    best_cfg = trial_config(loop_config["train"], best.config)
    best_id = best.metrics.get("trial_id") or os.path.basename(best.path)
    bundle_dir = sweep.join(BUNDLE_FOLDER).uri
    best_run = f"{storage_args(shared['trials_path'])['storage_path']}/{best_id}"
    metrics = export_bundle(ray.train.Result.from_path(best_run, storage_filesystem=fs), best_cfg,
                            bundle_dir, extra_metrics={"sweep": base.name, "trial": best_id},
                            weights_source=loop_config["weights_source"])
    best_config = {"trial_id": best_id, "params": best.config, "train_config": best_cfg.to_dict(),
                   f"best_{METRIC}": float(best.metrics_dataframe[METRIC].max()),
                   "validation_at_tuned_threshold": metrics["validation"], "threshold": metrics["threshold"],
                   "wall_seconds": time.time() - t0}
    sweep.join("best_config.json").write_text(json.dumps(best_config, indent=2, default=float))
    return {"results": table, "best_config": best_config, "bundle_dir": bundle_dir, "sweep_dir": sweep_dir}
