"""Classification metrics in plain numpy: micro F1 (the headline) with the confusion matrix
beside it, and the ranking metrics of the artifact class (average precision, ROC AUC, the
precision-recall curve) that drive model selection, because a model that never finds an
artifact cannot win them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from artifact_core.config import SELECT_METRICS  # noqa: F401  (re-exported: the allowed set)
from artifact_core.data import ARTIFACT, LABEL_NAMES


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = 2) -> np.ndarray:
    """Counts with rows = true class 0/1 and columns = predicted class 0/1."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries, y_pred {p.size}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Precision/recall of a class never predicted (or absent) is 0, as scikit-learn's
    # zero_division=0: an undefined score must not flatter the model.
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Micro/macro F1, accuracy, per-class precision/recall/F1 and the confusion matrix.

    For single-label classification micro F1 equals accuracy; both are reported because
    users search for either name.
    """
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0).astype(np.float64))
    recall = _safe_div(tp, cm.sum(axis=1).astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = int(cm.sum())
    # Pooled over classes every error is one FP (for the predicted class) and one FN
    # (for the true class): micro F1 = 2TP / (2TP + FP + FN) = TP / total.
    micro_f1 = float(tp.sum() / total) if total else 0.0
    out = {
        "micro_f1": micro_f1,
        "macro_f1": float(f1.mean()),
        "accuracy": micro_f1,
        "confusion_matrix": cm.tolist(),
        "support": total,
    }
    for c, name in LABEL_NAMES.items():
        key = name.replace("-", "_")
        out[f"precision_{key}"] = float(precision[c])
        out[f"recall_{key}"] = float(recall[c])
        out[f"f1_{key}"] = float(f1[c])
    return out


def predict_labels(prob_clean: Sequence[float], threshold: float = 0.5) -> np.ndarray:
    """Class 1 (artifact-free) where its probability reaches ``threshold``, else 0."""
    return (np.asarray(prob_clean, dtype=np.float64) >= threshold).astype(np.int64)


def best_threshold(y_true: Sequence[int], prob_clean: Sequence[float], *,
                   avoid_one_class: bool = True) -> tuple[float, float]:
    """The decision threshold on P(artifact-free) that maximizes micro F1.

    Candidates are midpoints between consecutive distinct scores (plus 0.5), so the
    threshold generalizes better than one sitting exactly on a validation score.
    Ties go to the higher artifact recall (under a 1:9 imbalance "call everything
    clean" often ties with a cut that finds artifacts), then to the candidate closest
    to 0.5.

    With ``avoid_one_class`` (default), a winner that calls every image one class is
    replaced by the two-class cut with the best artifact F1, when one finds at least one
    artifact: the model then has skill that a one-class decision would throw away (micro
    F1 drops a little below the majority share; artifact recall rises above 0).

    Returns:
        (threshold, micro F1 at that threshold).
    """
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(prob_clean, dtype=np.float64)
    if y.size == 0:
        raise ValueError("cannot tune a threshold on an empty validation set")
    u = np.unique(s)
    candidates = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2, [u[0] - 1e-6, u[-1] + 1e-6]])
    candidates = np.clip(candidates, 0.0, 1.0)
    n_art = int(np.sum(y == ARTIFACT))
    rows = []  # (micro F1, artifact recall, -distance to 0.5, artifact F1, both classes called, threshold)
    for t in candidates:
        pred = predict_labels(s, t)
        tp = int(np.sum((pred == ARTIFACT) & (y == ARTIFACT)))
        called = int(np.sum(pred == ARTIFACT))
        recall = tp / n_art if n_art else 0.0
        f1_art = 2 * tp / (called + n_art) if called + n_art else 0.0
        rows.append((round(float(np.mean(pred == y)), 12), recall, -abs(float(t) - 0.5), f1_art,
                     0 < called < y.size, float(t)))
    best = max(rows, key=lambda r: r[:3])
    if avoid_one_class and not best[4]:
        two_class = [r for r in rows if r[4] and r[3] > 0]
        if two_class:
            best = max(two_class, key=lambda r: (r[3], r[:3]))
    return best[5], float(best[0])


def artifact_scores(prob_clean: Sequence[float]) -> np.ndarray:
    """The score of the artifact class (class 0): 1 - P(artifact-free)."""
    return 1.0 - np.asarray(prob_clean, dtype=np.float64)


def _pr_counts(is_pos: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when calling every score >= each distinct threshold positive.

    Tied scores enter together (one point per distinct score), as scikit-learn's
    ``_binary_clf_curve``. Thresholds come out in decreasing order.
    """
    order = np.argsort(-scores, kind="mergesort")
    s, pos = scores[order], is_pos[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(pos)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, s[last_of_tie]


def precision_recall_curve(y_true: Sequence[int], prob_clean: Sequence[float]) -> dict[str, list[float]]:
    """Precision and recall of the artifact class at every distinct artifact score.

    The artifact score is 1 - P(artifact-free); an image counts as called "artifact" when
    its score reaches the threshold. Points run from the strictest threshold to the most
    lenient (recall rising), as scikit-learn's ``precision_recall_curve`` read backwards
    without its appended (recall 0, precision 1) end point.

    Returns:
        {"threshold": [...], "precision": [...], "recall": [...]}; empty lists when the
        input is empty.
    """
    y = np.asarray(y_true, dtype=np.int64)
    scores = artifact_scores(prob_clean)
    if y.shape != scores.shape:
        raise ValueError(f"y_true has {y.size} entries, prob_clean {scores.size}")
    if y.size == 0:
        return {"threshold": [], "precision": [], "recall": []}
    tps, fps, thr = _pr_counts(y == ARTIFACT, scores)
    n_pos = float(np.sum(y == ARTIFACT))
    precision = tps / (tps + fps)
    recall = tps / n_pos if n_pos else np.zeros_like(tps)
    return {"threshold": thr.tolist(), "precision": precision.tolist(), "recall": recall.tolist()}


def average_precision(y_true: Sequence[int], prob_clean: Sequence[float]) -> float:
    """Average precision of the artifact class: sum over thresholds of (R_n - R_{n-1}) P_n.

    scikit-learn's definition (``average_precision_score`` with ``pos_label=0`` on
    1 - P(artifact-free)): a step function, no interpolation, ties entering together.
    A model that ranks at random scores about the artifact share (0.1 at 1:9); a one-class
    model that gives every image the same score scores exactly that share. 0.0 when there
    is no artifact to find.
    """
    curve = precision_recall_curve(y_true, prob_clean)
    if not curve["recall"] or curve["recall"][-1] == 0:
        return 0.0
    recall = np.r_[0.0, curve["recall"]]
    return float(np.sum(np.diff(recall) * np.asarray(curve["precision"])))


def roc_auc(y_true: Sequence[int], prob_clean: Sequence[float]) -> float:
    """Area under the ROC curve of the artifact class (ties count one half).

    The chance that a random artifact image scores above a random clean one, which equals
    scikit-learn's trapezoidal ``roc_auc_score``. 0.5 (no ranking information) when only
    one class is present, where scikit-learn raises: the selection code needs a number.
    """
    y = np.asarray(y_true, dtype=np.int64)
    scores = artifact_scores(prob_clean)
    pos, neg = scores[y == ARTIFACT], scores[y != ARTIFACT]
    if pos.size == 0 or neg.size == 0:
        return 0.5
    # Mann-Whitney U with mid-ranks for ties.
    ranks = _midranks(np.r_[pos, neg])
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sx) != 0) + 1]
    ends = np.r_[starts[1:], x.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2  # mean of 1-based ranks a+1..b
    return ranks


def ranking_metrics(y_true: Sequence[int], prob_clean: Sequence[float]) -> dict[str, float]:
    """Threshold-free metrics of the artifact class: ``ap_artifact``, ``roc_auc`` and
    ``prevalence_artifact`` (the AP of a model without skill)."""
    y = np.asarray(y_true, dtype=np.int64)
    return {"ap_artifact": average_precision(y, prob_clean), "roc_auc": roc_auc(y, prob_clean),
            "prevalence_artifact": float(np.mean(y == ARTIFACT)) if y.size else 0.0}


def thin_curve(curve: dict[str, list[float]], max_points: int = 500) -> dict[str, list[float]]:
    """At most ``max_points`` evenly spaced points of a curve, ends kept (for metrics.json)."""
    n = len(curve["threshold"])
    if n <= max_points:
        return curve
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
    return {k: [v[i] for i in idx] for k, v in curve.items()}


#: Selection metrics that rank images: a model that gives every image the same score, or
#: calls every image one class, cannot win them.
RANKING_SELECT_METRICS = ("val_ap_artifact", "val_roc_auc")
#: How far :func:`selection_score` moves a one-class epoch down: every metric lies in [0, 1].
ONE_CLASS_PENALTY = 2.0
#: The report key that holds :func:`selection_score`: Ray's checkpoint keeper and Tune use it.
SELECT_SCORE = "select_score"
#: The report key naming the metric that ``select_score`` was computed for.
SELECT_SCORE_METRIC = "select_metric"
#: The report key that holds :func:`keep_score`: Ray's checkpoint keeper orders checkpoints by it.
KEEP_SCORE = "keep_score"


def _finite(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else math.nan


def selection_score(metrics: dict[str, Any], metric: str) -> float:
    """The number checkpoint choice, patience, ASHA and the sweep's winner compare for
    ``metric`` (reported as ``select_score``): higher is better, NaN (sorts last) when the
    value is missing or not finite, or the epoch ``diverged``.

    A decision metric (micro F1, macro F1, artifact F1 or recall, all at 0.5) is lowered
    by :data:`ONE_CLASS_PENALTY` for an epoch that called every validation image one class,
    so it sorts below every epoch that called both, in its own order: under a 1:9 imbalance
    "all clean" wins micro F1 and "all artifact" wins recall. The ranking metrics need no
    such care and are the value itself.
    """
    value = _finite(metrics.get(metric))
    if is_diverged(metrics) or math.isnan(value):
        return math.nan
    cm = metrics.get("val_confusion_matrix")
    if metric not in RANKING_SELECT_METRICS and cm is not None:
        called = np.asarray(cm).sum(axis=0)  # columns: predicted class
        if int(np.count_nonzero(called)) < 2:
            return value - ONE_CLASS_PENALTY
    return value


def is_diverged(metrics: dict[str, Any]) -> bool:
    """Whether a report says its epoch diverged (a missing or NaN field, as in a table row of
    an older report, is not a yes)."""
    flag = metrics.get("diverged")
    return isinstance(flag, (bool, np.bool_)) and bool(flag)


def report_score(metrics: dict[str, Any], metric: str) -> float:
    """A report's :func:`selection_score` for ``metric``: the stored ``select_score`` when it was
    computed for ``metric``, else computed now (a report from before ``select_score``, or a
    rerun under another ``--select-metric``)."""
    if SELECT_SCORE in metrics and metrics.get(SELECT_SCORE_METRIC) == metric:
        return _finite(metrics[SELECT_SCORE])
    return selection_score(metrics, metric)


def selection_key(metrics: dict[str, Any], metric: str) -> tuple[float, float, float, int]:
    """Sort key of one epoch's report for ``metric``: higher is better.

    First its :func:`report_score`; ties go to the higher artifact AP, then the higher micro
    F1 at 0.5, then the later epoch (it has seen more data). NaN sorts last. A validation set
    of one class measures no skill (every AP alike) and its micro F1 rewards calling every
    image that class: there the later epoch decides.
    """
    score = report_score(metrics, metric)

    def num(v: float) -> float:
        return -math.inf if math.isnan(v) else v

    cm = metrics.get("val_confusion_matrix")
    one_class = cm is not None and int(np.count_nonzero(np.asarray(cm).sum(axis=1))) < 2  # rows: true class
    micro_f1 = math.nan if one_class else _finite(metrics.get("val_micro_f1"))
    return (num(score), num(_finite(metrics.get("val_ap_artifact"))), num(micro_f1),
            int(metrics.get("epoch", 0) or 0))


def best_report(reports: Sequence[dict[str, Any]], metric: str) -> int:
    """Index of the best report under :func:`selection_key` (first of equals is never preferred
    over a later epoch)."""
    if not reports:
        raise ValueError("no reports to choose from")
    return max(range(len(reports)), key=lambda i: selection_key(reports[i], metric))


def keep_score(metrics: dict[str, Any], metric: str, earlier: Sequence[dict[str, Any]]) -> float:
    """The number Ray's checkpoint keeper compares (reported as ``keep_score``): it orders this
    report among the ``earlier`` reports of the run exactly as :func:`selection_key` does.

    ``select_score`` alone ties (an AP of 1.0 on a small validation set, the same micro F1 at
    two epochs), and Ray breaks ties by age where selection goes on to AP, micro F1 and epoch:
    Ray could delete the checkpoint selection would keep. Ray keeps each report's number as
    reported, so this one is chosen strictly between the ``keep_score`` of the best earlier
    report it beats and of the worst one that beats it: its own ``select_score`` when that lies
    between them, else a number in the gap.

    Args:
        metrics: this epoch's report (with ``epoch``, the validation metrics, ``diverged``).
        metric: the selection metric (``--select-metric``).
        earlier: the run's earlier reports; those without a ``keep_score`` for ``metric`` are
            not compared (a run resumed from them keeps checkpoints by another key).

    Returns:
        NaN (Ray keeps it last) for a diverged epoch or one without a finite score; else a
        finite number.
    """
    key = selection_key(metrics, metric)
    if math.isinf(key[0]):  # NaN select score: selection can never keep it either
        return math.nan
    below, above = -math.inf, math.inf
    for report in earlier:
        kept = _finite(report.get(KEEP_SCORE))
        if math.isnan(kept) or report.get(SELECT_SCORE_METRIC) != metric:
            continue
        if selection_key(report, metric) <= key:  # (an equal key: the newer report counts as better, as in Ray)
            below = max(below, kept)
        else:
            above = min(above, kept)
    if below < key[0] < above:
        return key[0]
    if math.isinf(above):
        return _step_up(below)
    if math.isinf(below):
        return _step_up(above, down=True)
    middle = below + (above - below) / 2
    # Two adjacent floats leave no room (dozens of epochs landing in the same gap): a tie
    # with the report below, which Ray breaks for the newer report, this one.
    return middle if below < middle < above else below


def _step_up(value: float, *, down: bool = False) -> float:
    """A number one above (or below) ``value``: a fixed step, so a long run of new bests grows
    the scores linearly (a step of the value's size would double them to inf within about a
    thousand epochs), and midpoints still leave room between."""
    return value - 1.0 if down else value + 1.0
