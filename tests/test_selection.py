"""Selection without Ray: the flag, patience on the selection metric, old loop states, ASHA rungs."""

from __future__ import annotations

import argparse
import json
import logging
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from artifact_core.config import SELECT_METRICS, SweepConfig, TrainConfig, add_training_args, config_from_args
from artifact_core.train_loop import LoopState, update_patience
from artifact_core.tuning import asha_rungs, best_trial_id, build_scheduler, results_table


def test_select_metric_flag_and_validation():
    args = add_training_args(argparse.ArgumentParser()).parse_args([])
    assert config_from_args(args).select_metric == "val_ap_artifact" == TrainConfig().select_metric
    args = add_training_args(argparse.ArgumentParser()).parse_args(["--select-metric", "val_roc_auc"])
    assert config_from_args(args).select_metric == "val_roc_auc"
    with pytest.raises(SystemExit):
        add_training_args(argparse.ArgumentParser()).parse_args(["--select-metric", "val_loss"])
    with pytest.raises(ValueError, match=r"--select-metric must be one of val_ap_artifact, .*val_micro_f1.*got 'ap'"):
        TrainConfig(select_metric="ap").validate()
    for m in SELECT_METRICS:
        TrainConfig(select_metric=m).validate()


def test_patience_follows_the_selection_metric():
    state = LoopState()
    for ap, f1 in ((0.3, 0.9), (0.5, 0.9), (0.5, 0.95), (0.4, 0.99)):
        update_patience(state, {"val_ap_artifact": ap, "val_micro_f1": f1}, "val_ap_artifact")
    # micro F1 rose in epochs 3 and 4, AP did not: two epochs without gain
    assert state.phase_best_score == 0.5 and state.bad_epochs == 2 and state.phase_best_metric == "val_ap_artifact"


def test_patience_counts_a_one_class_epoch_below_every_two_class_one():
    state = LoopState()
    one_class, two_class = [[0, 10], [0, 90]], [[6, 4], [8, 82]]
    update_patience(state, {"val_micro_f1": 0.9, "val_confusion_matrix": one_class}, "val_micro_f1")
    assert state.bad_epochs == 0 and state.phase_best_score == pytest.approx(0.9 - 2.0)  # the first epoch sets it
    update_patience(state, {"val_micro_f1": 0.88, "val_confusion_matrix": two_class}, "val_micro_f1")
    assert state.bad_epochs == 0 and state.phase_best_score == 0.88
    update_patience(state, {"val_micro_f1": 0.95, "val_confusion_matrix": one_class}, "val_micro_f1")
    update_patience(state, {"val_micro_f1": 1.0, "diverged": True}, "val_micro_f1")
    assert state.bad_epochs == 2 and state.phase_best_score == 0.88


def test_checkpoints_kept_by_select_score_only_when_every_report_has_it(tmp_path):
    from artifact_core.storage import resolve
    from artifact_core.trainer import _reports_scored_for

    run = tmp_path / "run"
    assert _reports_scored_for(resolve(str(run)), "val_ap_artifact")  # a new run
    for name, history in (("checkpoint_2026-01-01_00-00-01.000000", [{"epoch": 1}]),
                          ("checkpoint_2026-01-01_00-00-02.000000",
                           [{"epoch": 1, "select_score": 0.5, "select_metric": "val_ap_artifact"},
                            {"epoch": 2, "select_score": 0.6, "select_metric": "val_ap_artifact"}])):
        (run / name).mkdir(parents=True)
        (run / name / "state.json").write_text(json.dumps({"history": history}))
    assert _reports_scored_for(resolve(str(run)), "val_ap_artifact")  # the latest checkpoint's history
    assert not _reports_scored_for(resolve(str(run)), "val_micro_f1")  # scored for another metric
    (run / "checkpoint_2026-01-01_00-00-03.000000").mkdir()
    (run / "checkpoint_2026-01-01_00-00-03.000000" / "state.json").write_text(json.dumps({"history": [{"epoch": 1}]}))
    assert not _reports_scored_for(resolve(str(run)), "val_ap_artifact")  # written before select_score


def test_old_loop_state_loads_and_resets_its_best_for_a_new_metric():
    old = {"phase_index": 1, "phase_epoch": 2, "global_epoch": 6, "phase_best_f1": 0.92, "bad_epochs": 1,
           "stopped_early": False, "history": [{"epoch": 1}], "resumed_after": [3], "some_future_key": 1}
    state = LoopState.from_dict(old)
    assert (state.phase_index, state.global_epoch, state.bad_epochs, state.resumed_after) == (1, 6, 1, [3])
    assert state.phase_best_score == 0.92 and state.phase_best_metric == "val_micro_f1"
    # resumed under AP: a micro-F1 best of 0.92 must not make an AP of 0.6 look like no gain
    update_patience(state, {"val_ap_artifact": 0.6}, "val_ap_artifact")
    assert state.phase_best_score == 0.6 and state.bad_epochs == 0
    assert LoopState.from_dict({}) == LoopState()


@pytest.mark.parametrize("head,finetune,schedule,expected", [
    (4, 4, "cosine", [6]),        # after the warm-up epoch (phase 2's first ramps its rate up from 0)
    (60, 4, "cosine", [62]),      # the defaults
    (60, 4, "constant", [61]),    # no warm-up: the first phase-2 epoch runs at the full rate
    (2, 2, "cosine", [3]),        # no third epoch would be left to run after the second
    (4, 12, "cosine", [6, 12]),
    (0, 4, "cosine", [2, 4]),
])
def test_asha_rungs_fall_in_phase_two_at_its_full_rate_by_default(head, finetune, schedule, expected):
    cfg = SweepConfig(base=TrainConfig(head_epochs=head, finetune_epochs=finetune, finetune_schedule=schedule))
    assert asha_rungs(build_scheduler(cfg)) == expected


def test_asha_clock_is_the_planned_epoch():
    # A trial whose phase 1 patience stopped after 1 of 2 epochs reports global epoch 3 in its
    # last phase-2 epoch: the rungs count the epoch as planned (4 = max_t), so it meets them
    # in the same phase-2 epoch as every other trial. Tune's training_iteration restarts at 0
    # when a killed sweep restores a trial, so neither counts that.
    from artifact_core.train_loop import SCHEDULE_EPOCH, schedule_epoch

    base = TrainConfig(head_epochs=2, finetune_epochs=2)
    assert [schedule_epoch(base, 0, 1), schedule_epoch(base, 1, 1), schedule_epoch(base, 1, 2)] == [1, 3, 4]
    scheduler = build_scheduler(SweepConfig(base=base))
    scheduler.set_search_properties("select_score", "max")
    trial = SimpleNamespace(trial_id="t")
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 1, "epoch": 3, SCHEDULE_EPOCH: 4,
                                                   "select_score": 0.5}) == "STOP"
    assert scheduler._time_attr == SCHEDULE_EPOCH


def _trial(trial_id, rows, error=None, lr=1e-3):
    return SimpleNamespace(metrics_dataframe=pd.DataFrame(rows), error=error, metrics={"trial_id": trial_id},
                           config={"lr": lr, "finetune_lr_ratio": 0.1, "unfreeze_depth": 2})


def test_sweep_winner_is_never_errored_one_class_or_diverged():
    one_class, two_class = [[0, 10], [0, 90]], [[6, 4], [8, 82]]
    grid = [
        _trial("errored", [{"epoch": 1, "phase": "head", "early_stopped": False, "val_micro_f1": 0.97,
                            "val_ap_artifact": 0.9, "val_confusion_matrix": two_class, "select_score": 0.97}],
               error=RuntimeError("worker died")),
        # reports from before select_score: computed from the metrics (one class: lowered)
        _trial("all_clean", [{"epoch": e, "phase": "finetune", "early_stopped": False, "val_micro_f1": 0.9,
                              "val_ap_artifact": 0.12, "val_confusion_matrix": one_class} for e in (1, 2)]),
        _trial("skilled", [{"epoch": 1, "phase": "head", "early_stopped": False, "val_micro_f1": 0.88,
                            "val_ap_artifact": 0.6, "val_confusion_matrix": two_class, "select_score": 0.88},
                           {"epoch": 2, "phase": "finetune", "early_stopped": False, "val_micro_f1": float("nan"),
                            "val_ap_artifact": 1.0, "val_confusion_matrix": two_class, "select_score": float("nan"),
                            "diverged": True}]),
        _trial("diverged", [{"epoch": 1, "phase": "head", "early_stopped": False, "val_micro_f1": 0.99,
                             "val_ap_artifact": 1.0, "val_confusion_matrix": two_class,
                             "select_score": float("nan"), "diverged": True}]),
    ]
    table = results_table(grid, total_epochs=2, metric="val_micro_f1")
    assert table["trial_id"].tolist()[:2] == ["errored", "skilled"]
    # the diverged epoch's AP of 1.0 (from NaN scores) is not the trial's best
    assert table.set_index("trial_id").loc["skilled", "best_val_ap_artifact"] == 0.6
    assert table.set_index("trial_id").loc["all_clean", "best_select_score"] == pytest.approx(0.9 - 2.0)
    assert best_trial_id(table, "val_micro_f1") == "skilled"
    with pytest.raises(ValueError, match="every trial failed, diverged"):
        best_trial_id(table[table["trial_id"].isin(["errored", "diverged"])], "val_micro_f1")


def test_sweep_table_shows_the_selected_epoch_and_breaks_ties_as_a_run_does():
    one_class, two_class = [[0, 10], [0, 90]], [[6, 4], [8, 82]]

    def row(epoch, phase, f1, ap, cm=two_class, **extra):
        return {"epoch": epoch, "phase": phase, "early_stopped": False, "val_micro_f1": f1, "val_ap_artifact": ap,
                "val_confusion_matrix": cm, **extra}

    grid = [
        # selected by micro F1: the all-clean epoch 1 (0.90) loses to the two-class epoch 2 (0.88),
        # and the table must show epoch 2's figures, not each column's best over the epochs
        _trial("first", [row(1, "head", 0.90, 0.95, one_class), row(2, "finetune", 0.88, 0.70)]),
        # the same selection score; the higher AP breaks the tie, as within a run, whatever the trial order
        _trial("second", [row(1, "head", 0.80, 0.60), row(2, "finetune", 0.88, 0.80)]),
    ]
    table = results_table(grid, total_epochs=2, metric="val_micro_f1").set_index("trial_id")
    assert table.index.tolist() == ["second", "first"]
    assert table.loc["first", "best_val_micro_f1"] == 0.88 and table.loc["first", "best_val_ap_artifact"] == 0.70
    assert table.loc["first", "best_epoch"] == 2 and table.loc["second", "best_val_ap_artifact"] == 0.80
    assert best_trial_id(table.reset_index(), "val_micro_f1") == "second"


def test_sweep_status_follows_the_planned_epochs():
    from artifact_core.train_loop import SCHEDULE_EPOCH

    two_class = [[6, 4], [8, 82]]

    def row(epoch, phase, planned, early=False, **extra):
        return {"epoch": epoch, "phase": phase, SCHEDULE_EPOCH: planned, "early_stopped": early,
                "val_micro_f1": 0.9, "val_ap_artifact": 0.5, "val_confusion_matrix": two_class, **extra}

    grid = [
        # patience ended phase 1 after 1 of 4 epochs; phase 2 then ran all 2 of its epochs (global epoch 3 of 6)
        _trial("short_head", [row(1, "head", 1, early=True), row(2, "finetune", 5), row(3, "finetune", 6)]),
        _trial("asha", [row(e, "head", e) for e in (1, 2, 3, 4)] + [row(5, "finetune", 5)]),
        _trial("patience", [row(e, "head", e) for e in (1, 2, 3, 4)] + [row(5, "finetune", 5, early=True)]),
        _trial("nan", [row(1, "head", 1), row(2, "head", 2, diverged=True)]),
        _trial("old", [{k: v for k, v in row(e, "finetune", e).items() if k != SCHEDULE_EPOCH} for e in (5, 6)]),
    ]
    status = results_table(grid, total_epochs=6).set_index("trial_id")["status"].to_dict()
    assert status == {"short_head": "completed", "asha": "stopped early", "patience": "completed",
                      "nan": "diverged", "old": "completed"}


def test_asha_explicit_grace_period_in_head_phase_warns(caplog):
    cfg = SweepConfig(base=TrainConfig(head_epochs=4, finetune_epochs=4), grace_period=1)
    with caplog.at_level(logging.WARNING, logger="artifact_core.tuning"):
        rungs = asha_rungs(build_scheduler(cfg))
    assert rungs == [1, 2, 4, 8] and "head phase" in caplog.text
    assert build_scheduler(SweepConfig(base=TrainConfig(), scheduler="none")) is None
    with pytest.raises(ValueError, match="--image-sizes"):
        SweepConfig(base=TrainConfig(), image_sizes=[16]).validate()


def test_sweep_searches_the_image_size():
    from ray import tune

    from artifact_core.config import add_sweep_args, sweep_from_args
    from artifact_core.tuning import _param_space, trial_config

    p = add_training_args(add_sweep_args(argparse.ArgumentParser()))
    args = p.parse_args(["--image-sizes", "224", "320", "448"])
    sweep = sweep_from_args(args, config_from_args(args))
    assert sweep.image_sizes == [224, 320, 448] and sweep.validate() is sweep
    assert sweep.base.name == "demo-sweep"  # apart from the training run's folder
    named = p.parse_args(["--name", "grid"])
    assert sweep_from_args(named, config_from_args(named)).base.name == "grid"
    space = _param_space(sweep)
    assert isinstance(space["image_size"], tune.search.sample.Categorical)
    assert space["image_size"].categories == [224, 320, 448]
    cfg = trial_config(TrainConfig().to_dict(), {"lr": 1e-3, "finetune_lr_ratio": 0.1, "unfreeze_depth": 2, "image_size": 320})
    assert cfg.image_size == 320 and cfg.finetune_lr == pytest.approx(1e-4)
    # without --image-sizes the size is not a searched parameter
    assert "image_size" not in _param_space(SweepConfig(base=TrainConfig()))
    assert trial_config(TrainConfig(image_size=288).to_dict(),
                        {"lr": 1e-3, "finetune_lr_ratio": 0.1, "unfreeze_depth": 2}).image_size == 288


def test_oversampling_sampler_shares_and_ranks():
    from artifact_core.train_loop import OversamplingSampler, loss_weights

    labels = [0] * 10 + [1] * 90
    ranks = [OversamplingSampler(labels, share=0.4, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    assert [len(s) for s in ranks] == [50, 50]
    draws = {}
    for epoch in range(20):
        for r, s in enumerate(ranks):
            s.set_epoch(epoch)
            draws[(epoch, r)] = list(s)
    pooled = [i for d in draws.values() for i in d]
    assert abs(sum(labels[i] == 0 for i in pooled) / len(pooled) - 0.4) < 0.04  # 2,000 draws
    assert draws[(0, 0)] != draws[(0, 1)] and draws[(0, 0)] != draws[(1, 0)]  # own stream per rank and epoch
    again = OversamplingSampler(labels, share=0.4, num_replicas=2, rank=1, seed=3)
    again.set_epoch(7)
    assert list(again) == draws[(7, 1)]  # reproducible (a resumed run draws the same)
    with pytest.raises(ValueError, match="both classes"):
        OversamplingSampler([1, 1, 1], share=0.5)
    assert loss_weights(TrainConfig(oversample=0.5), [5.0, 0.55]) == [1.0, 1.0]
    assert loss_weights(TrainConfig(), [5.0, 0.55]) == [5.0, 0.55]
    with pytest.raises(ValueError, match="--oversample"):
        TrainConfig(oversample=1.0).validate()


def _loop_reports(rows: list[dict], metric: str) -> list[dict]:
    """Reports as the loop makes them: select_score, then keep_score against the history so far."""
    from artifact_core.metrics import KEEP_SCORE, SELECT_SCORE, SELECT_SCORE_METRIC, keep_score, selection_score

    history: list[dict] = []
    for row in rows:
        report = {**row, SELECT_SCORE: selection_score(row, metric), SELECT_SCORE_METRIC: metric}
        report[KEEP_SCORE] = keep_score(report, metric, history)
        history.append(report)
    return history


def test_rays_checkpoint_keeper_keeps_what_selection_would_choose(tmp_path):
    """Tied select scores: Ray breaks them by age, selection by AP, micro F1, epoch; keep_score
    carries selection's order to Ray, so the checkpoint selection wants is never deleted."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from artifact_core.metrics import KEEP_SCORE, best_report, selection_key

    metric = "val_ap_artifact"
    # (epoch, AP, micro F1): AP 1.0 five times, as on a small validation set; epoch 6 diverged
    rows = [dict(epoch=e, val_ap_artifact=ap, val_micro_f1=f1, diverged=e == 6)
            for e, ap, f1 in ((1, 1.0, 0.97), (2, 1.0, 0.90), (3, 1.0, 0.91), (4, 0.8, 0.99), (5, 1.0, 0.97),
                              (6, 1.0, 0.99), (7, 0.9, 0.95), (8, 1.0, 0.96))]
    reports = _loop_reports(rows, metric)
    assert math.isnan(reports[5][KEEP_SCORE])  # diverged: kept last
    finite = [r for r in reports if not math.isnan(r[KEEP_SCORE])]
    assert sorted(finite, key=lambda r: r[KEEP_SCORE]) == sorted(finite, key=lambda r: selection_key(r, metric))
    assert reports[0][KEEP_SCORE] == 1.0  # the select score itself where it is free

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=KEEP_SCORE,
                                                  checkpoint_score_order="max"))
    for r in reports:
        d = tmp_path / f"ckpt{r['epoch']}"
        d.mkdir()
        (d / "x").write_text("x")
        manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint.from_directory(str(d)), metrics=r))
    kept = [c.metrics for c in manager.best_checkpoint_results]
    best = reports[best_report(reports, metric)]
    assert best["epoch"] == 5 and kept[best_report(kept, metric)]["epoch"] == 5
    assert sorted(m["epoch"] for m in kept) == [1, 5]  # the two best by selection


def test_keep_score_finds_room_between_close_reports():
    from artifact_core.metrics import KEEP_SCORE, keep_score

    metric = "val_micro_f1"
    lower = {"epoch": 1, "val_micro_f1": 0.5, "val_ap_artifact": 0.1, "select_metric": metric, KEEP_SCORE: 0.5}
    upper = {**lower, "epoch": 2, "val_ap_artifact": 0.3, KEEP_SCORE: math.nextafter(0.5, 1)}
    between = {"epoch": 3, "val_micro_f1": 0.5, "val_ap_artifact": 0.2}
    # no float between two adjacent ones: a tie with the lower report, which Ray breaks for the newer one
    assert keep_score(between, metric, [lower, upper]) == 0.5
    upper[KEEP_SCORE] = 0.75
    assert 0.5 < keep_score(between, metric, [lower, upper]) < 0.75
    assert keep_score({"epoch": 4, "val_micro_f1": 0.6}, metric, [lower, upper]) > 0.75
    # reports without a keep_score for this metric (an older run) are not compared
    assert keep_score(between, metric, [{**upper, "select_metric": "val_ap_artifact"}]) == 0.5


def test_checkpoints_keep_by_keep_score_and_resumed_runs_by_what_they_reported(tmp_path):
    from artifact_core.storage import resolve
    from artifact_core.trainer import checkpoint_score_attribute

    run = tmp_path / "run"
    metric = "val_ap_artifact"
    assert checkpoint_score_attribute(resolve(str(run)), metric) == "keep_score"  # a new run

    def checkpoint(name: str, history: list[dict]) -> None:
        (run / name).mkdir(parents=True)
        (run / name / "state.json").write_text(json.dumps({"history": history}))

    checkpoint("checkpoint_2026-01-01_00-00-01.000000", [{"epoch": 1}])
    assert checkpoint_score_attribute(resolve(str(run)), metric) == metric  # reported neither score
    checkpoint("checkpoint_2026-01-01_00-00-02.000000",
               [{"epoch": 1, "select_score": 0.5, "select_metric": metric}])
    assert checkpoint_score_attribute(resolve(str(run)), metric) == "select_score"  # before keep_score
    checkpoint("checkpoint_2026-01-01_00-00-03.000000",
               [{"epoch": 1, "select_score": 0.5, "keep_score": 0.5, "select_metric": metric}])
    assert checkpoint_score_attribute(resolve(str(run)), metric) == "keep_score"
    assert checkpoint_score_attribute(resolve(str(run)), "val_micro_f1") == "val_micro_f1"


def test_a_rerun_under_another_metric_keeps_every_checkpoint_with_skill(tmp_path):
    """Reports scored for another --select-metric are ordered by the plain metric. Ray's own
    keeper, configured as the trainer configures it, must not delete the epochs with skill
    because all-clean epochs have the higher micro F1."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from artifact_core.metrics import KEEP_SCORE, SELECT_SCORE
    from artifact_core.trainer import checkpoints_to_keep

    assert checkpoints_to_keep(KEEP_SCORE) == 2 and checkpoints_to_keep(SELECT_SCORE) == 2
    metric = "val_micro_f1"  # the reports were scored for val_ap_artifact; the rerun asks for micro F1
    # epochs 2 and 3 find artifacts (micro F1 0.87, 0.88); the others call everything clean (0.90)
    f1s = {1: 0.90, 2: 0.87, 3: 0.88, 4: 0.90, 5: 0.90, 6: 0.90, 7: 0.90}
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=checkpoints_to_keep(metric),
                                                  checkpoint_score_attribute=metric, checkpoint_score_order="max"))
    for epoch, f1 in f1s.items():
        d = tmp_path / f"ckpt{epoch}"
        d.mkdir()
        (d / "x").write_text("x")
        manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint.from_directory(str(d)),
                                                    metrics={"epoch": epoch, metric: f1}))
    assert sorted(c.metrics["epoch"] for c in manager.best_checkpoint_results) == list(f1s)
    assert (tmp_path / "ckpt2").is_dir() and (tmp_path / "ckpt3").is_dir()


def test_a_half_written_newest_checkpoint_is_skipped(tmp_path):
    """A job killed while Ray wrote a checkpoint leaves a folder without state.json: the newest
    complete checkpoint tells how the run's reports were scored."""
    from artifact_core.storage import resolve
    from artifact_core.trainer import _reports_scored_for

    run = tmp_path / "run"
    done = run / "checkpoint_2025-01-01_10-00-00.000000"
    done.mkdir(parents=True)
    (done / "state.json").write_text(json.dumps({"history": [{"epoch": 1, "select_score": 0.5,
                                                              "select_metric": "val_micro_f1"}]}))
    for name, files in (("checkpoint_2025-01-01_10-05-00.000000", {"model.pt": b"\0" * 10}),
                        ("checkpoint_2025-01-01_10-06-00.000000", {"state.json": b'{"history": [{"ep'})):
        (run / name).mkdir()
        for f, data in files.items():
            (run / name / f).write_bytes(data)
    assert _reports_scored_for(resolve(str(run)), "val_micro_f1")
    from artifact_core.trainer import latest_checkpoint_state
    assert latest_checkpoint_state(resolve(str(run)))["history"][0]["epoch"] == 1


def test_a_run_whose_every_kept_epoch_diverged_is_a_user_error(tmp_path):
    from artifact_core.jobs_common import _user_error
    from artifact_core.trainer import _best_checkpoint

    result = SimpleNamespace(path=str(tmp_path), best_checkpoints=[
        (object(), {"epoch": 1, "val_ap_artifact": math.nan, "diverged": True}),
        (object(), {"epoch": 2, "val_ap_artifact": 0.9, "diverged": True})])
    with pytest.raises(ValueError, match="has no epoch to keep: every kept checkpoint diverged.*lower --lr") as err:
        _best_checkpoint(result, "val_ap_artifact")
    assert _user_error(err.value) is err.value  # printed as one line, no traceback


def test_checkpoints_that_cannot_be_read_keep_the_cautious_key(tmp_path):
    """A run with checkpoints but no readable state is not a new run: its older reports may lack
    the keys, so Ray keeps checkpoints by the plain metric (it would score them -inf otherwise)."""
    from artifact_core.storage import resolve
    from artifact_core.trainer import checkpoint_score_attribute

    run = tmp_path / "run"
    (run / "checkpoint_2026-01-01_00-00-01.000000").mkdir(parents=True)
    (run / "checkpoint_2026-01-01_00-00-01.000000" / "state.json").write_text("{not json")
    assert checkpoint_score_attribute(resolve(str(run)), "val_ap_artifact") == "val_ap_artifact"
    assert checkpoint_score_attribute(resolve(str(tmp_path / "new")), "val_ap_artifact") == "keep_score"


def test_sweep_concurrency_leaves_a_cpu_per_trial_for_ray_data_decode(monkeypatch):
    from artifact_core import tuning

    asked = []
    monkeypatch.setattr(tuning, "check_fits", lambda **kw: asked.append(kw))
    monkeypatch.setattr(tuning, "live_nodes", lambda: [{"CPU": 4.0}])
    monkeypatch.setattr(tuning, "detect_autoscaler", lambda: None)
    loader = TrainConfig(num_workers=2, cpus_per_worker=0.5)
    assert tuning._concurrency(SweepConfig(base=loader)) == 4 and asked[-1]["reserved_cpus"] == 0
    # each trial's workers take 1 CPU, its Ray Data decode tasks 1 more: 2 trials, not 4 that would wait forever
    streamed = TrainConfig(num_workers=2, cpus_per_worker=0.5, ingest="ray-data")
    assert tuning._concurrency(SweepConfig(base=streamed)) == 2 and asked[-1]["reserved_cpus"] == 1.0


def test_a_restored_sweep_says_it_keeps_its_concurrency(caplog):
    from artifact_core.tuning import _warn_restored_concurrency

    tuner = SimpleNamespace(_local_tuner=SimpleNamespace(_tune_config=SimpleNamespace(max_concurrent_trials=1)))
    with caplog.at_level(logging.WARNING, logger="artifact_core.tuning"):
        _warn_restored_concurrency(tuner, 1)
        assert not caplog.records
        _warn_restored_concurrency(tuner, 3)
    assert "keeps running at most 1 trial(s) at once" in caplog.text


def test_training_with_ray_data_asks_for_a_cpu_beside_its_workers(monkeypatch):
    from artifact_core import trainer

    class Asked(Exception):
        pass

    def fake_check_fits(**kw):
        raise Asked(kw)

    monkeypatch.setattr(trainer, "check_fits", fake_check_fits)
    for ingest, reserved in (("dataloader", 0.0), ("ray-data", 1.0)):
        with pytest.raises(Asked) as info:
            trainer.build_trainer(TrainConfig(ingest=ingest), {}, name="r", storage_path="/tmp/unused")
        assert info.value.args[0]["reserved_cpus"] == reserved


def test_a_sweep_without_results_has_a_table_with_its_columns_and_no_winner():
    from artifact_core.tuning import NoTrialError

    table = results_table([], total_epochs=4)
    assert table.empty and {"trial_id", "image_size", "status", "best_val_ap_artifact", "best_epoch"} <= set(table)
    with pytest.raises(NoTrialError):
        best_trial_id(table, "val_ap_artifact")


def test_a_trials_error_is_its_cause_in_one_line_not_rays_wrapper():
    """Tune wraps a trial's error in a RayTaskError whose first line names only the process
    (in colour); Train wraps a worker's in a WorkerGroupError. The table shows the cause."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from artifact_core.raycluster import ClusterTooSmallError
    from artifact_core.tuning import NoTrialError, error_line

    cause = ClusterTooSmallError("training needs 2 workers of 2 CPUs; the cluster has 1\nmore detail")
    try:
        raise cause
    except ClusterTooSmallError:
        wrapped = RayTaskError("ImplicitFunc.train", "Traceback ...", cause,
                               proctitle="\x1b[36mray::ImplicitFunc.train()\x1b[39m")
    wrapped = wrapped.as_instanceof_cause()
    assert error_line(wrapped) == "ClusterTooSmallError: training needs 2 workers of 2 CPUs; the cluster has 1"
    workers = WorkerGroupError("rank 0 failed", {0: MemoryError("out of memory at 768 px")})
    assert error_line(workers) == "MemoryError: out of memory at 768 px"
    assert error_line(ControllerError(ValueError("bad \x1b[31mthing\x1b[0m"))) == "ValueError: bad thing"
    table = pd.DataFrame([{"trial_id": "t1", "status": "error", "error": error_line(workers),
                           "best_val_ap_artifact": math.nan, "best_select_score": math.nan}])
    with pytest.raises(NoTrialError, match="e.g. trial t1: MemoryError: out of memory"):
        best_trial_id(table, "val_ap_artifact")


def test_a_trial_id_drawn_again_with_other_parameters_starts_its_run_afresh(tmp_path):
    """Tune restores its search state but not its random draws: a trial id reused with other
    parameters must not resume the old draw's checkpoints."""
    from artifact_core.storage import resolve
    from artifact_core.tuning import TRIAL_PARAMS_FILE, claim_trial_run

    run = resolve(str(tmp_path / "trials" / "t1"))
    first = {"lr": 1e-3, "finetune_lr_ratio": 0.3, "unfreeze_depth": 4, "image_size": None}
    claim_trial_run(run, first)
    (tmp_path / "trials" / "t1" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    claim_trial_run(run, dict(first))  # the same draw (a restart): its checkpoints stay
    assert (tmp_path / "trials" / "t1" / "checkpoint_2026-01-01_00-00-00.000000").is_dir()
    claim_trial_run(run, {**first, "lr": 2e-3})  # the id drawn again with another lr
    assert sorted(p.name for p in (tmp_path / "trials" / "t1").iterdir()) == [TRIAL_PARAMS_FILE]
    # a folder from before the record: kept as it is
    legacy = tmp_path / "trials" / "t2" / "checkpoint_x"
    legacy.mkdir(parents=True)
    claim_trial_run(resolve(str(tmp_path / "trials" / "t2")), first)
    assert legacy.is_dir()


def test_an_error_whose_text_cannot_be_made_is_named_by_its_type():
    from artifact_core.tuning import error_line

    class Odd(Exception):
        def __str__(self):
            raise AttributeError("no message")

    assert error_line(Odd()) == "Odd: "


def test_a_rerun_under_another_metric_says_when_that_metrics_best_epoch_was_pruned():
    """Checkpoints kept by AP, then a rerun selecting by recall: the bundle is the best kept one,
    and metrics.json says which better epoch is gone."""
    from artifact_core.trainer import _pruned_best_note

    metric = "val_recall_artifact"
    history = [{"epoch": e, metric: r, "val_ap_artifact": ap, "val_micro_f1": 0.9}
               for e, r, ap in ((1, 0.2, 0.5), (2, 0.9, 0.6), (3, 0.5, 0.8), (4, 0.6, 0.85))]
    kept = history[3]  # AP kept epochs 3 and 4; recall's best is epoch 2
    note = _pruned_best_note(history, kept, metric)
    assert "best epoch by val_recall_artifact in this run's history is 2" in note and "holds epoch 4" in note
    assert _pruned_best_note(history, history[1], metric) == ""
    assert _pruned_best_note(history, kept, "val_ap_artifact") == ""
    assert _pruned_best_note([{"epoch": 1}], {"epoch": 1}, metric) == ""  # reports without the metric


def test_a_validation_of_one_class_keeps_the_last_epoch_not_the_one_that_calls_everything_that_class():
    """No artifact in validation (a folder with one artifact image): every AP is alike, and
    micro F1 rewards the epoch that calls every image clean; the later epoch decides, and Ray's
    keeper orders the checkpoints the same way."""
    from artifact_core.metrics import best_report, keep_score

    def report(epoch: int, false_alarms: int) -> dict:
        return {"epoch": epoch, "val_ap_artifact": 0.0, "val_micro_f1": (40 - false_alarms) / 40,
                "val_confusion_matrix": [[0, 0], [false_alarms, 40 - false_alarms]], "diverged": False}
    history = [report(1, 6), report(2, 0), report(3, 2)]
    assert best_report(history, "val_ap_artifact") == 2
    from artifact_core.metrics import KEEP_SCORE, SELECT_SCORE_METRIC

    kept = []
    for h in history:
        kept.append({**h, SELECT_SCORE_METRIC: "val_ap_artifact", KEEP_SCORE: keep_score(h, "val_ap_artifact", kept)})
    assert max(range(3), key=lambda i: kept[i][KEEP_SCORE]) == 2
    # with both classes in validation, micro F1 still breaks AP's ties
    two = [{**h, "val_confusion_matrix": [[4, 0], h["val_confusion_matrix"][1]]} for h in history]
    assert best_report(two, "val_ap_artifact") == 1


def test_a_trial_of_a_sweep_taken_over_ends_as_an_error_before_it_claims_its_folder(tmp_path, monkeypatch):
    """The earlier sweep, still running after a rerun took its folder: a trial it starts raises
    before it writes into trials/<id> (where the new sweep may train that id) or asks for
    workers, and one whose workers stopped for the takeover ends as an error (which the new
    sweep's restore reruns), not as a finished trial."""
    from artifact_core import tuning
    from artifact_core.run_identity import RunTakenOverError
    from conftest import held_run, make_easy_folder

    data = make_easy_folder(tmp_path / "d", n=16, size=32)
    base = TrainConfig(data_dir=str(data), storage_path=str(tmp_path), name="sweep", image_size=32, weights="none",
                       head_epochs=1, finetune_epochs=1, val_fraction=0.25)

    def start() -> dict:
        return held_run(base, kind="sweep")
    fits = []

    class Trainer:
        def fit(self):
            fits.append(1)
            start()  # another sweep takes the folder while this trial trains

    monkeypatch.setattr(tuning.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(tuning, "build_trainer", lambda *a, **k: Trainer())
    monkeypatch.setattr(tuning, "TuneReportCallback", lambda: None)
    params = {"lr": 1e-3, "finetune_lr_ratio": 0.3, "unfreeze_depth": 4, "image_size": None}
    old = start()
    shared = {"loop_config": old, "trials_path": str(tmp_path / "sweep" / "trials")}
    with pytest.raises(RunTakenOverError, match="was taken over"):
        tuning.tune_trial(params, shared)  # trained, then lost the folder
    assert fits == [1] and (tmp_path / "sweep" / "trials" / "t1" / tuning.TRIAL_PARAMS_FILE).exists()
    (tmp_path / "sweep" / "trials" / "t1" / tuning.TRIAL_PARAMS_FILE).unlink()
    with pytest.raises(RunTakenOverError, match="was taken over"):
        tuning.tune_trial(params, shared)  # a later trial of the old sweep
    assert fits == [1] and not (tmp_path / "sweep" / "trials" / "t1" / tuning.TRIAL_PARAMS_FILE).exists()


def test_a_sweep_whose_tune_state_was_cut_off_is_not_restored_from_it(tmp_path, caplog):
    """Ray copies its experiment state to storage in place: a sweep killed then leaves an empty
    file, from which a restore runs one trial with no parameters."""
    import logging

    from artifact_core.storage import resolve
    from artifact_core.tuning import _tune_state_readable

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    assert _tune_state_readable(resolve(str(tune_dir)))  # nothing to check: Tune decides
    (tune_dir / "experiment_state-2026-01-01_10-00-00.json").write_text('{"trial_data": []}')
    assert _tune_state_readable(resolve(str(tune_dir)))
    (tune_dir / "experiment_state-2026-01-01_11-00-00.json").write_text("")  # the newest, cut off
    with caplog.at_level(logging.WARNING, logger="artifact_core.tuning"):
        assert not _tune_state_readable(resolve(str(tune_dir)))
    assert "it is empty" in caplog.text and "Starting the sweep's trials again" in caplog.text
    (tune_dir / "experiment_state-2026-01-01_11-00-00.json").write_text('{"trial_da')
    assert not _tune_state_readable(resolve(str(tune_dir)))
