"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest

from artifact_core.metrics import best_threshold, classification_metrics, confusion_matrix, predict_labels


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
    # 0.5 gives 4/5; the best cut lies between 0.62 and 0.8 (y=1 at 0.6 lost): 4/5 as well,
    # or between 0.1 and 0.6 (0.62 lost): 4/5. Ties go to the candidate nearest 0.5.
    assert f == pytest.approx(0.8) and t == pytest.approx(0.5)
    t, f = best_threshold([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.9])
    assert f == 1.0 and 0.7 < t < 0.8
    assert classification_metrics([0, 0, 1, 1], predict_labels([0.6, 0.7, 0.8, 0.9], t))["micro_f1"] == 1.0
    with pytest.raises(ValueError):
        best_threshold([], [])
