"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

import numpy as np

from artifact_core.metrics import (ONE_CLASS_PENALTY, SELECT_METRICS, average_precision, best_report, best_threshold,
                                   classification_metrics, confusion_matrix, precision_recall_curve, predict_labels,
                                   ranking_metrics, roc_auc, selection_score, thin_curve)


def test_confusion_matrix_orientation():
    # rows true 0/1, cols predicted 0/1
    assert confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]).tolist() == [[1, 1], [1, 2]]
    with pytest.raises(ValueError):
        confusion_matrix([0], [0, 1])


def test_classification_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    p = [0, 0, 1, 1, 1, 1, 1, 1, 0, 1]
    m = classification_metrics(y, p)
    # cm [[2,1],[1,6]]; class 0: P=2/3 R=2/3 F1=2/3; class 1: P=6/7 R=6/7 F1=6/7
    assert m["confusion_matrix"] == [[2, 1], [1, 6]]
    assert m["micro_f1"] == pytest.approx(0.8) and m["accuracy"] == pytest.approx(0.8)
    assert m["precision_artifact"] == pytest.approx(2 / 3) and m["recall_artifact_free"] == pytest.approx(6 / 7)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 6 / 7) / 2)
    assert m["support"] == 10


def test_never_predicted_class_scores_zero_not_nan():
    m = classification_metrics([0, 1, 1, 1], [1, 1, 1, 1])
    assert m["precision_artifact"] == 0.0 and m["f1_artifact"] == 0.0
    assert m["micro_f1"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((0 + 2 * 0.75 / 1.75) / 2)


def test_predict_labels_threshold_inclusive():
    assert predict_labels([0.2, 0.5, 0.7], 0.5).tolist() == [0, 1, 1]


def test_best_threshold_maximizes_micro_f1():
    y = [0, 0, 1, 1, 1]
    s = [0.1, 0.62, 0.6, 0.8, 0.9]
    t, f = best_threshold(y, s)
    # 0.5 gives 4/5 with artifact recall 1/2; the cut between 0.62 and 0.8 gives 4/5 too
    # (the clean image at 0.6 lost) and finds both artifacts: ties go to artifact recall.
    assert f == pytest.approx(0.8) and t == pytest.approx(0.71)
    t, f = best_threshold([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.9])
    assert f == 1.0 and 0.7 < t < 0.8
    assert classification_metrics([0, 0, 1, 1], predict_labels([0.6, 0.7, 0.8, 0.9], t))["micro_f1"] == 1.0
    with pytest.raises(ValueError):
        best_threshold([], [])


# Artifact (class 0) is the positive class; its score is 1 - P(artifact-free). Artifact scores
# 0.9 0.8 0.8 0.6 0.3 0.3 0.1 with artifacts at 0.9, one 0.8 and one 0.3 (ties across classes).
TIED_SCORES = [0.9, 0.8, 0.8, 0.6, 0.3, 0.3, 0.1]
TIED_Y = [0, 0, 1, 1, 0, 1, 1]
TIED_P = [1 - v for v in TIED_SCORES]


def test_pr_curve_ties_enter_together():
    c = precision_recall_curve(TIED_Y, TIED_P)
    # one point per distinct score, strictest first (scikit-learn's precision_recall_curve
    # with pos_label=0, reversed, without its appended (recall 0, precision 1) point)
    assert c["threshold"] == pytest.approx([0.9, 0.8, 0.6, 0.3, 0.1])
    assert c["precision"] == pytest.approx([1, 2 / 3, 1 / 2, 1 / 2, 3 / 7])
    assert c["recall"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1, 1])


def test_average_precision_by_hand():
    # sum (R_n - R_{n-1}) P_n = 1/3*1 + 1/3*2/3 + 0 + 1/3*1/2 + 0 = 13/18 (scikit-learn's
    # average_precision_score gives the same; a trapezoid would give more)
    assert average_precision(TIED_Y, TIED_P) == pytest.approx(13 / 18)
    assert average_precision([0, 1, 1, 1], [0.1, 0.6, 0.7, 0.8]) == pytest.approx(1.0)
    # the artifact ranked last: precision 1/4 when it is found
    assert average_precision([0, 1, 1, 1], [0.9, 0.6, 0.7, 0.8]) == pytest.approx(0.25)
    # a one-class model scoring every image the same: AP = the artifact share, not more
    assert average_precision([0] * 3 + [1] * 27, [0.9] * 30) == pytest.approx(0.1)
    assert average_precision([1, 1], [0.2, 0.3]) == 0.0  # nothing to find


def test_roc_auc_by_hand_with_ties():
    # 12 (artifact, clean) pairs: 0.9 beats 4; 0.8 beats 3 and ties 1 (1/2); 0.3 beats 1, ties 1
    assert roc_auc(TIED_Y, TIED_P) == pytest.approx(9 / 12)
    assert roc_auc([0, 1, 1, 1], [0.1, 0.6, 0.7, 0.8]) == 1.0
    assert roc_auc([0, 1, 1, 1], [0.9, 0.6, 0.7, 0.8]) == 0.0
    assert roc_auc([0] * 3 + [1] * 27, [0.9] * 30) == 0.5
    assert roc_auc([1, 1], [0.2, 0.3]) == 0.5  # one class: no ranking information


def test_ranking_metrics_and_thin_curve():
    m = ranking_metrics(TIED_Y, TIED_P)
    assert m == pytest.approx({"ap_artifact": 13 / 18, "roc_auc": 0.75, "prevalence_artifact": 3 / 7})
    rng = np.random.default_rng(0)
    y = (rng.random(3000) > 0.1).astype(int)
    c = precision_recall_curve(y, rng.random(3000))
    t = thin_curve(c, max_points=100)
    assert len(t["threshold"]) == 100 and t["recall"][-1] == c["recall"][-1] and t["threshold"][0] == c["threshold"][0]


def test_threshold_does_not_throw_away_a_skilled_model():
    # 1 artifact in 10: catching it costs two false alarms, so "all clean" has the best
    # micro F1 (0.9); the two-class cut with the best artifact F1 is taken instead.
    y = [0] + [1] * 9
    p = [0.3, 0.2, 0.25] + [0.9] * 7
    t, f = best_threshold(y, p)
    pred = predict_labels(p, t)
    assert pred[0] == 0 and f == pytest.approx(0.8) and 0.3 < t < 0.9
    t, f = best_threshold(y, p, avoid_one_class=False)
    assert f == pytest.approx(0.9) and (predict_labels(p, t) == 1).all()


def _epoch_report(epoch, y, p):
    m = {**classification_metrics(y, predict_labels(p, 0.5)), **ranking_metrics(y, p)}
    return {"epoch": epoch, **{f"val_{k}": v for k, v in m.items()}}


def test_selection_keeps_the_only_epoch_with_skill():
    # A run like the issue's: 12 artifacts in 120 validation images; seven epochs call
    # everything clean at 0.5 without ranking skill; one epoch (5) ranks artifacts high
    # but, at 0.5, calls many clean images artifacts too (micro F1 below the majority share).
    rng = np.random.default_rng(1)
    y = np.array([0] * 12 + [1] * 108)
    reports = [_epoch_report(e, y, rng.uniform(0.55, 0.95, 120)) for e in (1, 2, 3, 4)]
    skilled = np.where(y == 0, rng.uniform(0.05, 0.35, 120), rng.uniform(0.3, 1.0, 120))
    reports.append(_epoch_report(5, y, skilled))
    reports += [_epoch_report(e, y, rng.uniform(0.55, 0.95, 120)) for e in (6, 7, 8)]
    assert all(r["val_recall_artifact"] == 0 for i, r in enumerate(reports) if i != 4)
    assert reports[4]["val_micro_f1"] < 0.9  # micro F1 alone would keep a one-class epoch
    assert max(r["val_micro_f1"] for r in reports) == 0.9
    for metric in SELECT_METRICS:  # micro F1 too: a one-class epoch sorts below every two-class one
        assert best_report(reports, metric) == 4, metric
    # an epoch that calls everything an artifact wins recall (1.0) and still loses to epoch 5
    everything = _epoch_report(9, y, np.full(120, 0.2))
    assert everything["val_recall_artifact"] == 1.0
    assert best_report([*reports, everything], "val_recall_artifact") == 4
    assert selection_score(everything, "val_recall_artifact") == pytest.approx(1.0 - ONE_CLASS_PENALTY)
    assert selection_score(everything, "val_ap_artifact") == everything["val_ap_artifact"]  # ranking: as is
    # the threshold tuned on the kept epoch finds artifacts
    t, _ = best_threshold(y, skilled)
    assert classification_metrics(y, predict_labels(skilled, t))["recall_artifact"] > 0.5
    assert set(SELECT_METRICS) >= {"val_ap_artifact", "val_micro_f1"}


def test_selection_ties_and_missing_values():
    reports = [{"epoch": 1, "val_ap_artifact": 1.0, "val_micro_f1": 0.9},
               {"epoch": 2, "val_ap_artifact": 1.0, "val_micro_f1": 0.95},
               {"epoch": 3, "val_ap_artifact": 1.0, "val_micro_f1": 0.95},
               {"epoch": 4, "val_ap_artifact": float("nan"), "val_micro_f1": 1.0},
               {"epoch": 5, "val_micro_f1": 1.0}]
    assert best_report(reports, "val_ap_artifact") == 2  # higher micro F1, then the later epoch
    # a diverged epoch (non-finite loss or scores) sorts last whatever its metrics say, and a
    # reported select_score is what counts
    diverged = {"epoch": 6, "val_ap_artifact": 1.0, "val_micro_f1": 1.0, "diverged": True}
    assert math.isnan(selection_score(diverged, "val_ap_artifact"))
    assert best_report([*reports, diverged], "val_ap_artifact") == 2
    assert best_report([{**reports[0], "select_score": 2.0, "select_metric": "val_ap_artifact"}, *reports[1:]],
                       "val_ap_artifact") == 0
    # a score stored for another metric (a rerun under a new --select-metric) is computed again
    old = {"epoch": 7, "val_ap_artifact": 0.3, "val_micro_f1": 0.9, "select_score": 0.9, "select_metric": "val_micro_f1"}
    new = {"epoch": 8, "val_ap_artifact": 0.7, "val_micro_f1": 0.8, "select_score": 0.7, "select_metric": "val_ap_artifact"}
    assert best_report([new, old], "val_ap_artifact") == 0 and best_report([old, new], "val_micro_f1") == 0
    # ties on the metric go to the higher AP before micro F1
    tied = [{"epoch": 1, "val_micro_f1": 0.95, "val_ap_artifact": 0.9, "val_confusion_matrix": [[5, 5], [5, 85]]},
            {"epoch": 2, "val_micro_f1": 0.95, "val_ap_artifact": 0.7, "val_confusion_matrix": [[5, 5], [5, 85]]}]
    assert best_report(tied, "val_micro_f1") == 0
    with pytest.raises(ValueError):
        best_report([], "val_ap_artifact")
