"""Ray Tune sweep over learning rates, unfreeze depth and (optionally) input size; each trial is a
multi-worker TorchTrainer.

Train V2 pattern: a Tune *function trainable* builds the trial's trainer with the shared
:func:`~artifact_core.trainer.build_trainer` and a ``TuneReportCallback``, so every epoch
report reaches Tune and ASHA can stop a bad trial after any epoch. ASHA and the best trial
use the run's selection metric (``--select-metric``, artifact AP by default), never micro
F1 alone, which a model that never finds an artifact wins under class imbalance.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
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
from artifact_core.metrics import SELECT_SCORE, best_report, is_diverged, report_score, selection_key
from artifact_core.raycluster import (check_fits, detect_autoscaler, groups_that_fit, live_nodes, remove_wait_groups,
                                      units)
from artifact_core.run_identity import check_holder, hold_run
from artifact_core.storage import Location, resolve
from artifact_core.train_loop import SCHEDULE_EPOCH
from artifact_core.trainer import (BUNDLE_FOLDER, HEADLINE_METRIC, build_trainer, data_task_cpus, export_bundle,
                                   prepare_run, storage_args)

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
    # A sweep another start took over: its later trials end at once, before they claim a
    # trial folder the new sweep may be training in, or ask for workers. As errors, not
    # finished trials: a restore (the new sweep's) reruns errored trials.
    _check_sweep_held(loop_config)
    # A fixed run name per trial: a restored sweep resumes the trial's Train run.
    claim_trial_run(resolve(shared["trials_path"]).join(trial_id), params)
    trainer = build_trainer(cfg, loop_config, name=trial_id, storage_path=shared["trials_path"],
                            callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except Exception:
        _check_sweep_held(loop_config)  # the takeover, not what it caused, is the trial's error
        raise
    # A trial whose workers stopped for a takeover ends as an error too (see above).
    _check_sweep_held(loop_config)


def _tune_state_readable(tune_dir: Location) -> bool:
    """Whether the newest Tune experiment state under ``tune_dir`` (the one a restore reads)
    is readable JSON. Ray copies it to storage in place: a sweep killed during the copy leaves
    it empty, and a restore from it would run one trial with no parameters. Logs why not."""
    names = sorted(n for n in tune_dir.children() if n.startswith("experiment_state-") and n.endswith(".json"))
    if not names:
        return True  # (Tune decides; nothing of ours to check)
    try:
        text = tune_dir.join(names[-1]).read_text()
        state = json.loads(text) if text.strip() else None
        if isinstance(state, dict) and state:
            return True
        why = "it is empty" if not text.strip() else "it holds no state"
    except (OSError, ValueError) as exc:
        why = f"it cannot be read ({exc})"
    log.warning("Tune's state %s of this sweep cannot be restored: %s (a sweep killed while Ray copied it). "
                "Starting the sweep's trials again; the earlier trials' runs stay under trials/",
                tune_dir.join(names[-1]).uri, why)
    return False


def _check_sweep_held(loop_config: dict[str, Any]) -> None:
    """Raise ``RunTakenOverError`` in a trial of a sweep that another start has taken over."""
    if loop_config.get("run_holder"):
        check_holder(loop_config.get("run_folder"), loop_config["run_holder"])


TRIAL_PARAMS_FILE = "trial_params.json"


def claim_trial_run(run: Location, params: dict[str, Any]) -> None:
    """Record a trial's sampled parameters in its Train run folder; when the folder holds a
    run of other parameters, clear it first.

    Tune restores its search state but not the random draws: a trial created after Tune's
    last save gets its id again on restore, with other parameters, and would otherwise resume
    the old draw's checkpoints under the new draw's name in the table.
    """
    record = run.join(TRIAL_PARAMS_FILE)
    wanted = json.loads(json.dumps(params, default=float))
    try:
        recorded = json.loads(record.read_text()) if record.exists() else None
    except (OSError, ValueError):
        recorded = None
    if recorded == wanted:
        return
    # (no record: a new trial, or a folder from before the record, whose parameters are unknown: kept)
    if recorded is not None:
        log.warning("trial run %s was trained with %s; this draw is %s: starting it afresh", run.uri,
                    recorded, wanted)
        run.remove()
    record.write_text(json.dumps(wanted))


def _concurrency(cfg: SweepConfig) -> int:
    """Trials run at once: as many as fit the cluster (each trial's workers, plus a CPU for
    Ray Data's decode with ``--ingest ray-data``), or, where an autoscaler's node limits are
    reported, as many as fit the largest cluster it may build (at least 1). Waits
    (``--wait-for-resources``) until one trial fits."""
    b = cfg.base
    gpus = 1.0 if b.use_gpu else 0.0
    data_cpus = data_task_cpus(b)
    check_fits(num_workers=b.num_workers, cpus_per_worker=b.cpus_per_worker, gpus_per_worker=gpus,
               reserved_cpus=data_cpus, what="one sweep trial", wait_s=b.wait_for_resources)

    def trials_in(res: dict[str, float]) -> int:
        # in Ray's 1/10000 units: 3 x 0.1 CPU is not 0.30000000000000004
        n = units(res.get("CPU", 0.0)) // (b.num_workers * units(b.cpus_per_worker) + units(data_cpus))
        return min(n, int(res.get("GPU", 0.0) // b.num_workers)) if b.use_gpu else n

    # The nodes alive, packed as placement groups pack them (workers do not span nodes);
    # an autoscaler's limits are totals only.
    fits = max(1, groups_that_fit(live_nodes(), num_workers=b.num_workers, cpus_per_worker=b.cpus_per_worker,
                                  gpus_per_worker=gpus, reserved_cpus=data_cpus))
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


def _warn_restored_concurrency(tuner: tune.Tuner, wanted: int) -> None:
    """Say so when a restored sweep will run another number of trials at once than asked:
    Tune restores its search state whole, trial limit included, and takes no new one."""
    restored = getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None),
                       "max_concurrent_trials", None)
    if restored is not None and restored != wanted:
        log.warning("the restored sweep keeps running at most %d trial(s) at once, as it started (%d now fit "
                    "or were asked for with --max-concurrent-trials); --overwrite starts the sweep anew",
                    restored, wanted)


def _param_space(cfg: SweepConfig) -> dict[str, Any]:
    return {
        "lr": tune.grid_search(cfg.lrs) if cfg.lrs else tune.loguniform(cfg.lr_min, cfg.lr_max),
        "finetune_lr_ratio": tune.loguniform(cfg.finetune_lr_ratio_min, cfg.finetune_lr_ratio_max)
        if cfg.finetune_lr_ratio_max > cfg.finetune_lr_ratio_min else cfg.finetune_lr_ratio_min,
        "unfreeze_depth": tune.choice(cfg.unfreeze_depths),
        **({"image_size": tune.choice(cfg.image_sizes)} if cfg.image_sizes else {}),
    }


def build_scheduler(cfg: SweepConfig) -> ASHAScheduler | None:
    """ASHA on the selection metric, its first rung in phase 2, after the warm-up, by default.

    Rungs sit at grace, 2 x grace, 4 x grace ... epochs (reduction factor 2), counted over
    both phases. With grace 1 and 4 head epochs every rung would fall in phase 1, where
    the swept unfreeze depth and phase-2 LR have not acted yet: trials would be stopped by
    their head-only epochs. The default grace is therefore in phase 2
    (:meth:`SweepConfig.resolved_grace_period`).

    The clock is the loop's ``schedule_epoch``: the epoch as the phases plan it, so a trial
    whose phase 1 patience stopped early still meets the rungs at the same phase-2 epoch as
    the others (the global epoch would put them in another phase, or never reach them).
    """
    if cfg.scheduler != "asha":
        return None
    base = cfg.base
    grace = cfg.resolved_grace_period()
    if grace <= base.head_epochs and base.finetune_epochs > 0:
        log.warning("--grace-period %d puts ASHA's first rung in the head phase (%d epochs): trials are "
                    "then stopped before unfreeze depth and phase-2 LR act", grace, base.head_epochs)
    # The loop's own epoch count, not Tune's training_iteration: a trial restored after a
    # kill restarts its iteration count at 0 while its Train run resumes at epoch k.
    return ASHAScheduler(time_attr=SCHEDULE_EPOCH, max_t=base.head_epochs + base.finetune_epochs,
                         grace_period=grace, reduction_factor=2)


def asha_rungs(scheduler: ASHAScheduler) -> list[int]:
    """The epochs at which ``scheduler`` may stop trials (ascending), read from Ray's brackets."""
    return sorted({int(milestone) for b in scheduler._brackets for milestone, _ in b._rungs})


def results_table(grid: Any, total_epochs: int, metric: str = TrainConfig.select_metric) -> pd.DataFrame:
    """One row per trial: config, the selection metric, micro F1, AP and ``select_score`` of the
    trial's selected epoch (the one its bundle would keep: ``best_epoch``), epochs run and how
    the trial ended; best first, by the selected epoch's
    :func:`~artifact_core.metrics.selection_key` (the ties a run breaks, trials break alike)."""
    shown = list(dict.fromkeys([metric, HEADLINE_METRIC, "val_ap_artifact"]))
    rows, keys = [], []
    for r in grid:
        df = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        reports = df.to_dict("records")
        epochs = int(df["epoch"].max()) if "epoch" in df else 0
        # A diverged epoch's metrics come from NaN scores: never the selected one.
        usable = [row for row in reports if not is_diverged(row)]
        best = usable[best_report(usable, metric)] if usable else {}
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id", ""), **_trial_params(r.config or {}),
            **{f"best_{k}": _number(best.get(k)) for k in shown},
            f"best_{SELECT_SCORE}": report_score(best, metric) if best else math.nan,
            "best_epoch": int(best["epoch"]) if best else 0,
            "epochs": epochs, "status": _status(r, reports, total_epochs),
            "error": error_line(r.error) if r.error is not None else "",
        })
        keys.append(selection_key(best, metric) if best else (-math.inf,) * 3 + (0,))
    order = sorted(range(len(rows)), key=lambda i: keys[i], reverse=True)  # stable: trial order after that
    columns = ["trial_id", *_trial_params({}), *[f"best_{k}" for k in shown], f"best_{SELECT_SCORE}", "best_epoch",
               "epochs", "status", "error"]
    return pd.DataFrame([rows[i] for i in order], columns=columns)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(err: BaseException) -> str:
    """What went wrong in a trial, in one line: the cause inside Ray's wrappers (the task's
    error, Train's worker or controller failure), not the first line of the wrapper, which
    names only the process (``ray::ImplicitFunc.train() (pid=...)``)."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = (getattr(err, "cause", None) or getattr(err, "controller_failure", None)
                 or next(iter((getattr(err, "worker_failures", None) or {}).values()), None))
        if not isinstance(inner, BaseException):
            break
        err = inner
    try:
        text = str(err)
    except Exception:  # noqa: BLE001 - a user's __str__ may fail; the table must still be written
        text = ""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _trial_params(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"lr": cfg.get("lr"), "finetune_lr": (cfg.get("lr") or 0) * (cfg.get("finetune_lr_ratio") or 0),
            "unfreeze_depth": cfg.get("unfreeze_depth"), "image_size": cfg.get("image_size")}


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _status(result: Any, reports: list[dict[str, Any]], total_epochs: int) -> str:
    """"error", "diverged", "completed" (its last phase ran out or patience ended it) or
    "stopped early" (ASHA, or a sweep cut short)."""
    if result.error is not None:
        return "error"
    if any(is_diverged(row) for row in reports):
        return "diverged"
    if not reports:
        return "stopped early"
    last = reports[-1]
    # The planned epoch, not the global one: phase 1 may have stopped early (patience), and
    # the trial then ran all of phase 2 in fewer epochs. Reports from before it: the epoch.
    clock = _number(last.get(SCHEDULE_EPOCH))
    clock = last.get("epoch", 0) if math.isnan(clock) else clock
    if clock >= total_epochs or (bool(last.get("early_stopped")) and last.get("phase") == "finetune"):
        return "completed"
    return "stopped early"


def best_trial_id(table: pd.DataFrame, metric: str) -> str:
    """The trial the sweep exports: the top of :func:`results_table` among trials that did not
    error and reported ``metric``. Tune's own ``get_best_result`` would also consider errored
    trials, and drops a trial whose running maximum a NaN report has turned into NaN.

    Raises:
        NoTrialError: no trial qualifies.
    """
    ok = table[table["status"] != "error"].dropna(subset=[f"best_{metric}", f"best_{SELECT_SCORE}"])
    if ok.empty:
        errors = table[table["status"] == "error"]
        example = (f" (e.g. trial {errors.iloc[0]['trial_id']}: {errors.iloc[0]['error']})"
                   if len(errors) and "error" in errors else "")
        raise NoTrialError(f"every trial failed, diverged or reported no {metric}{example}: lower --lr-max or the "
                           f"fine-tune ratio if they diverged, else see each trial's error in results.csv")
    return str(ok.iloc[0]["trial_id"])


class NoTrialError(ValueError):
    """No trial of a sweep can be its winner (all errored, diverged or reported nothing)."""


def _search_space_identity(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep settings that define a sweep (beside the training fields): another value is another sweep."""
    return {"search_space": {"lr_min": cfg.lr_min, "lr_max": cfg.lr_max, "lrs": cfg.lrs,
                             "finetune_lr_ratio_min": cfg.finetune_lr_ratio_min,
                             "finetune_lr_ratio_max": cfg.finetune_lr_ratio_max,
                             "unfreeze_depths": list(cfg.unfreeze_depths), "image_sizes": cfg.image_sizes,
                             "scheduler": cfg.scheduler, "grace_period": cfg.grace_period,
                             "num_samples": cfg.num_samples},
            # What ASHA judged and the trials' checkpoint keepers kept by: under another metric
            # the finished trials' kept checkpoints may not hold the newly selected epochs.
            # (Top level: a sweep recorded before it compares with its own config's value.)
            "select_metric": cfg.base.select_metric}


def write_results(sweep: Location, table: pd.DataFrame, metric: str) -> None:
    """results.csv and tune_results.png into the sweep folder (local or object storage)."""
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    sweep.join("results.csv").write_text(buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "tune_results.png")
        plots.tune_results(table, metric, local)
        sweep.join("tune_results.png").upload(local)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep and export results, best config and the best bundle.

    Every output may live in object storage (``--storage-path s3://...``).

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
    # Before the sweep folder is touched: a sweep whose trials cannot run must not clear it
    # (--overwrite) or take it from the job that runs it.
    concurrent = _concurrency(cfg)
    loop_config = prepare_run(base, kind="sweep", extra_identity=_search_space_identity(cfg))
    # (the trials read it from the object store, where with_parameters puts it below)
    loop_config["run_holder"] = loop_config["holder"]["id"]
    shared = {"loop_config": loop_config, "trials_path": sweep.join(TRIALS_FOLDER).uri}
    storage = storage_args(sweep_dir)
    fs = storage.get("storage_filesystem")
    # The driver of a trial only waits on its TorchTrainer: it needs no CPU of its own, and
    # taking one would deadlock small clusters ({"cpu": 0} alone is refused by Tune).
    trainable = tune.with_resources(tune.with_parameters(tune_trial, shared=shared), {"cpu": 0, "memory": 1})
    total_epochs = base.head_epochs + base.finetune_epochs
    metric = base.select_metric
    experiment = f"{storage['storage_path']}/tune"
    # Rerunning the same command continues the sweep, as a rerun of jobs/train.py continues
    # its run (claim_run above has checked it is the same sweep); --overwrite cleared it.
    if (not base.overwrite and tune.Tuner.can_restore(experiment, storage_filesystem=fs)
            and _tune_state_readable(sweep.join("tune"))):
        log.info("resuming sweep %s", sweep.join("tune").uri)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        _warn_restored_concurrency(tuner, concurrent)
    else:
        if cfg.resume:
            log.warning("nothing to resume at %s; starting a new sweep", experiment)
        scheduler = build_scheduler(cfg)
        if scheduler is not None:
            log.info("ASHA on %s (select_score), rungs at epochs %s (head phase: epochs 1-%d)", metric,
                     asha_rungs(scheduler), base.head_epochs)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(cfg),
            tune_config=tune.TuneConfig(metric=SELECT_SCORE, mode="max", num_samples=cfg.num_samples,
                                        max_concurrent_trials=concurrent, scheduler=scheduler),
            run_config=tune.RunConfig(name="tune", **storage, failure_config=tune.FailureConfig(max_failures=0)),
        )
    # From here this sweep holds its folder (an earlier one still running stops its trials):
    # the last step before fit(), so a sweep that fails on its way leaves the running one alone.
    hold_run(loop_config["run_folder"], loop_config["holder"], loop_config["record_config"],
             claim=loop_config["claim"])
    try:
        grid = tuner.fit()
    except Exception:
        check_holder(loop_config["run_folder"], loop_config["run_holder"])  # the takeover, if that was it
        raise
    finally:
        # A trial killed while it waited for nodes leaves its stand-in placement group behind
        # (a killed actor runs no cleanup; Ray would remove it only with this job).
        remove_wait_groups()
    # A sweep another start claimed meanwhile (its trials stopped early) writes nothing more.
    check_holder(loop_config["run_folder"], loop_config["run_holder"])
    table = results_table(grid, total_epochs, metric)
    table["image_size"] = table["image_size"].fillna(base.image_size).astype(int)
    write_results(sweep, table, metric)
    try:
        best_id = best_trial_id(table, metric)
    except NoTrialError as exc:
        raise NoTrialError(f"{exc} ({sweep.join('results.csv').uri})") from None
    best = next(r for r in grid if (r.metrics or {}).get("trial_id") == best_id)
    best_cfg = trial_config(loop_config["train"], best.config)
    bundle = sweep.join(BUNDLE_FOLDER)
    best_run = f"{storage_args(shared['trials_path'])['storage_path']}/{best_id}"
    metrics = export_bundle(ray.train.Result.from_path(best_run, storage_filesystem=fs), best_cfg,
                            bundle, extra_metrics={"sweep": base.name, "trial": best_id},
                            weights_source=loop_config["weights_source"], split=loop_config["split"],
                            data_fs=loop_config.get("data_fs"))
    row = table[table["trial_id"] == best_id].iloc[0]
    if int(metrics["best_epoch"]) != int(row["best_epoch"]):
        # Tune saves its record of the trials every few seconds, Train each checkpoint at once:
        # a sweep killed in between lost reports that the trial's checkpoints still hold.
        log.warning("trial %s: results.csv shows epoch %d, but its run kept epoch %d as the best (reports of a "
                    "killed sweep that Tune had not saved yet); best_config.json and the bundle are epoch %d",
                    best_id, int(row["best_epoch"]), int(metrics["best_epoch"]), int(metrics["best_epoch"]))
    # The bundle's epoch and its reported figures (not each column's best over epochs, nor
    # Tune's record): the run's own history, which its checkpoints carry
    chosen = next((h for h in metrics.get("history") or [] if isinstance(h, dict)
                   and h.get("epoch") == metrics["best_epoch"]), {})
    best_config = {"trial_id": best_id, "params": best.config, "train_config": best_cfg.shareable_dict(),
                   "select_metric": metric, "best_epoch": int(metrics["best_epoch"]),
                   f"best_{metric}": _number(chosen.get(metric, metrics["select_value"])),
                   f"best_{HEADLINE_METRIC}": _number(chosen.get(HEADLINE_METRIC)),
                   "validation_at_tuned_threshold": metrics["validation"], "threshold": metrics["threshold"],
                   "wall_seconds": time.time() - t0}
    sweep.join("best_config.json").write_text(json.dumps(best_config, indent=2, default=float))
    return {"results": table, "best_config": best_config, "bundle_dir": bundle.uri, "sweep_dir": sweep_dir}
