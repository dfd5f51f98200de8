"""Classification metrics in plain numpy (micro F1 first, confusion matrix beside it)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from artifact_core.data import LABEL_NAMES


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


def best_threshold(y_true: Sequence[int], prob_clean: Sequence[float]) -> tuple[float, float]:
    """The decision threshold on P(artifact-free) that maximizes micro F1.

    Candidates are midpoints between consecutive distinct scores (plus 0.5), so the
    threshold generalizes better than one sitting exactly on a validation score.
    Ties go to the candidate closest to 0.5.

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
    best = (0.5, -1.0)
    for t in candidates:
        f = float(np.mean(predict_labels(s, t) == y))
        if f > best[1] + 1e-12 or (abs(f - best[1]) <= 1e-12 and abs(t - 0.5) < abs(best[0] - 0.5)):
            best = (float(t), f)
    return best
