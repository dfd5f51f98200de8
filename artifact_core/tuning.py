"""Ray Tune sweep over learning rates, unfreeze depth and (optionally) input size; each trial is a
multi-worker TorchTrainer.

Train V2 pattern: a Tune *function trainable* builds the trial's trainer with the shared
:func:`~artifact_core.trainer.build_trainer` and a ``TuneReportCallback``, so every epoch
report reaches Tune and ASHA can stop a bad trial after any epoch. ASHA and the best trial
use the run's selection metric (``--select-metric``, artifact AP by default), never micro
F1 alone, which a model that never finds an artifact wins under class imbalance.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from artifact_core import plots
from artifact_core.config import SweepConfig, TrainConfig
from artifact_core.raycluster import check_fits, detect_autoscaler
from artifact_core.trainer import BUNDLE_FOLDER, HEADLINE_METRIC, build_trainer, export_bundle, prepare_run

log = logging.getLogger(__name__)

TRIALS_FOLDER = "trials"


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    """The training config of one trial: the base with the sampled values applied."""
    cfg = TrainConfig.from_dict(base)
    cfg.lr = float(params["lr"])
    cfg.finetune_lr = float(params["lr"]) * float(params["finetune_lr_ratio"])
    cfg.unfreeze_depth = int(params["unfreeze_depth"])
    if params.get("image_size") is not None:
        cfg.image_size = int(params["image_size"])
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
    """Trials run at once: as many as fit the cluster, or, with an autoscaler, the largest
    cluster it may build (at least 1). Waits (``--wait-for-resources``) until one trial fits."""
    b = cfg.base
    gpus = 1.0 if b.use_gpu else 0.0
    check_fits(num_workers=b.num_workers, cpus_per_worker=b.cpus_per_worker, gpus_per_worker=gpus,
               what="one sweep trial", wait_s=b.wait_for_resources)

    def trials_in(res: dict[str, float]) -> int:
        n = int(res.get("CPU", 0.0) // (b.num_workers * b.cpus_per_worker))
        return min(n, int(res.get("GPU", 0.0) // b.num_workers)) if b.use_gpu else n

    fits = max(1, trials_in(ray.cluster_resources()))
    scaler = detect_autoscaler()
    if scaler is not None:
        most = scaler.max_resources()
        fits = max(fits, trials_in(most)) if most else fits
    if cfg.max_concurrent_trials:
        # with an autoscaler the user's number stands: trials beyond the nodes alive wait for new ones
        if scaler is None and cfg.max_concurrent_trials > fits:
            log.warning("--max-concurrent-trials %d > %d that fit at once; using %d",
                        cfg.max_concurrent_trials, fits, fits)
            return fits
        return cfg.max_concurrent_trials
    return fits


def _param_space(cfg: SweepConfig) -> dict[str, Any]:
    return {
        "lr": tune.grid_search(cfg.lrs) if cfg.lrs else tune.loguniform(cfg.lr_min, cfg.lr_max),
        "finetune_lr_ratio": tune.loguniform(cfg.finetune_lr_ratio_min, cfg.finetune_lr_ratio_max)
        if cfg.finetune_lr_ratio_max > cfg.finetune_lr_ratio_min else cfg.finetune_lr_ratio_min,
        "unfreeze_depth": tune.choice(cfg.unfreeze_depths),
        **({"image_size": tune.choice(cfg.image_sizes)} if cfg.image_sizes else {}),
    }


def build_scheduler(cfg: SweepConfig) -> ASHAScheduler | None:
    """ASHA on the selection metric, its first rung after one phase-2 epoch by default.

    Rungs sit at grace, 2 x grace, 4 x grace ... epochs (reduction factor 2), counted over
    both phases. With grace 1 and 4 head epochs every rung would fall in phase 1, where
    the swept unfreeze depth and phase-2 LR have not acted yet: trials would be stopped by
    their head-only epochs. The default grace is therefore ``head_epochs + 1``
    (:meth:`SweepConfig.resolved_grace_period`); the time unit stays the global epoch so
    ``--grace-period`` keeps its plain meaning.
    """
    if cfg.scheduler != "asha":
        return None
    base = cfg.base
    grace = cfg.resolved_grace_period()
    if grace <= base.head_epochs and base.finetune_epochs > 0:
        log.warning("--grace-period %d puts ASHA's first rung in the head phase (%d epochs): trials are "
                    "then stopped before unfreeze depth and phase-2 LR act", grace, base.head_epochs)
    return ASHAScheduler(time_attr="training_iteration", max_t=base.head_epochs + base.finetune_epochs,
                         grace_period=grace, reduction_factor=2)


def asha_rungs(scheduler: ASHAScheduler) -> list[int]:
    """The epochs at which ``scheduler`` may stop trials (ascending), read from Ray's brackets."""
    return sorted({int(milestone) for b in scheduler._brackets for milestone, _ in b._rungs})


def results_table(grid: Any, total_epochs: int, metric: str = TrainConfig.select_metric) -> pd.DataFrame:
    """One row per trial: config, best selection metric, best micro F1 and AP beside it,
    epochs run and how the trial ended; sorted by the selection ``metric``."""
    shown = list(dict.fromkeys([metric, HEADLINE_METRIC, "val_ap_artifact"]))
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
            "unfreeze_depth": cfg.get("unfreeze_depth"), "image_size": cfg.get("image_size"),
            **{f"best_{k}": float(df[k].max()) if k in df else math.nan for k in shown},
            "epochs": epochs, "status": status,
            "error": str(r.error).splitlines()[0][:300] if r.error is not None else "",
        })
    return pd.DataFrame(rows).sort_values(f"best_{metric}", ascending=False, na_position="last")


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep and export results, best config and the best bundle.

    Returns:
        {"results": DataFrame, "best_config": dict, "bundle_dir": str, "sweep_dir": str}.
    """
    t0 = time.time()
    cfg.validate()
    base = cfg.base
    sweep_dir = os.path.join(base.storage_path, base.name)
    loop_config = prepare_run(base)
    concurrent = _concurrency(cfg)
    shared = {"loop_config": loop_config, "trials_path": os.path.join(sweep_dir, TRIALS_FOLDER)}
    # The driver of a trial only waits on its TorchTrainer: it needs no CPU of its own, and
    # taking one would deadlock small clusters ({"cpu": 0} alone is refused by Tune).
    trainable = tune.with_resources(tune.with_parameters(tune_trial, shared=shared), {"cpu": 0, "memory": 1})
    total_epochs = base.head_epochs + base.finetune_epochs
    metric = base.select_metric
    experiment = os.path.join(sweep_dir, "tune")
    if cfg.resume and tune.Tuner.can_restore(experiment):
        log.info("resuming sweep %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        if cfg.resume:
            log.warning("nothing to resume at %s; starting a new sweep", experiment)
        scheduler = build_scheduler(cfg)
        if scheduler is not None:
            log.info("ASHA on %s, rungs at epochs %s (head phase: epochs 1-%d)", metric,
                     asha_rungs(scheduler), base.head_epochs)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(cfg),
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=cfg.num_samples,
                                        max_concurrent_trials=concurrent, scheduler=scheduler),
            run_config=tune.RunConfig(name="tune", storage_path=sweep_dir,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    table = results_table(grid, total_epochs, metric)
    table["image_size"] = table["image_size"].fillna(base.image_size).astype(int)
    os.makedirs(sweep_dir, exist_ok=True)
    table.to_csv(os.path.join(sweep_dir, "results.csv"), index=False)
    plots.tune_results(table, metric, os.path.join(sweep_dir, "tune_results.png"))
    ok = table[table["status"] != "error"].dropna(subset=[f"best_{metric}"])
    if ok.empty:
        raise RuntimeError(f"every trial failed; see {os.path.join(sweep_dir, 'results.csv')}")
    best = grid.get_best_result(metric=metric, mode="max", scope="all")
    best_cfg = trial_config(loop_config["train"], best.config)
    best_id = best.metrics.get("trial_id") or os.path.basename(best.path)
    bundle_dir = os.path.join(sweep_dir, BUNDLE_FOLDER)
    metrics = export_bundle(ray.train.Result.from_path(os.path.join(shared["trials_path"], best_id)), best_cfg,
                            bundle_dir, extra_metrics={"sweep": base.name, "trial": best_id},
                            weights_source=loop_config["weights_source"], split=loop_config["split"])
    best_config = {"trial_id": best_id, "params": best.config, "train_config": best_cfg.to_dict(),
                   "select_metric": metric, f"best_{metric}": float(best.metrics_dataframe[metric].max()),
                   f"best_{HEADLINE_METRIC}": float(best.metrics_dataframe[HEADLINE_METRIC].max()),
                   "validation_at_tuned_threshold": metrics["validation"], "threshold": metrics["threshold"],
                   "wall_seconds": time.time() - t0}
    with open(os.path.join(sweep_dir, "best_config.json"), "w") as f:
        json.dump(best_config, f, indent=2)
    return {"results": table, "best_config": best_config, "bundle_dir": bundle_dir, "sweep_dir": sweep_dir}
