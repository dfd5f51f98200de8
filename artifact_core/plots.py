"""PNG figures for runs and scoring (matplotlib's object API: no global backend state)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from artifact_core.labels import LABEL_NAMES


def learning_curves(history: Sequence[dict[str, Any]], path: str) -> str:
    """Train/val loss, and per epoch val micro/macro F1 and artifact recall (at 0.5) with the
    artifact class's average precision, the phase switch marked."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_f1 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="class-weighted BCE", title="loss")
    ax_f1.plot(epochs, [h["val_micro_f1"] for h in history], "o-", label="micro F1")
    ax_f1.plot(epochs, [h["val_macro_f1"] for h in history], "o-", label="macro F1")
    # Histories of runs from before these keys existed lack them: plot what is there.
    for key, label, style in (("val_recall_artifact", "artifact recall", "s--"),
                              ("val_ap_artifact", "artifact AP (threshold-free)", "^-")):
        if all(key in h for h in history):
            ax_f1.plot(epochs, [h[key] for h in history], style, label=label)
    ax_f1.set(xlabel="epoch", ylabel="at threshold 0.5 (AP: any threshold)", title="validation", ylim=(0, 1.02))
    switch = next((h["epoch"] - 0.5 for h in history if h["phase"] != history[0]["phase"]), None)
    for ax in (ax_loss, ax_f1):
        if switch is not None:
            ax.axvline(switch, color="grey", ls="--", lw=1, label="fine-tune starts")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def pr_curve(curve: dict[str, Sequence[float]], path: str, *, ap: float, prevalence: float,
             operating_point: tuple[float, float] | None = None) -> str:
    """Precision-recall curve of the artifact class, the no-skill level and the chosen
    threshold's (recall, precision) marked.

    Args:
        curve: ``{"recall": [...], "precision": [...]}`` as from
            :func:`artifact_core.metrics.precision_recall_curve`.
    """
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    # A step plot, as average precision integrates it (no interpolation between points).
    recall = [0.0, *curve["recall"]]
    precision = [curve["precision"][0] if curve["precision"] else 1.0, *curve["precision"]]
    ax.step(recall, precision, where="pre", label=f"model (AP {ap:.3f})")
    ax.axhline(prevalence, color="grey", ls="--", lw=1, label=f"no skill (AP {prevalence:.3f})")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="red", label="tuned threshold")
    ax.set(xlabel="artifact recall", ylabel="artifact precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="validation precision-recall, class 0 (artifact)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def confusion_matrix_plot(cm: Sequence[Sequence[int]], path: str, *, title: str = "confusion matrix") -> str:
    """Rows = true 0/1, columns = predicted 0/1, counts annotated."""
    cm_arr = np.asarray(cm)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ax.imshow(cm_arr, cmap="Blues")
    names = [f"{k}: {v}" for k, v in LABEL_NAMES.items()]
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title)
    for (i, j), v in np.ndenumerate(cm_arr):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm_arr.max() / 2 else "black", fontsize=14)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def confidence_histogram(confidence: Sequence[float], predicted: Sequence[int], path: str) -> str:
    """Confidence overall, and overlaid per predicted class."""
    conf = np.asarray(confidence, dtype=float)
    pred = np.asarray(predicted)
    fig = Figure(figsize=(10, 4))
    ax_all, ax_cls = fig.subplots(1, 2)
    # With a tuned threshold the predicted class can have probability below 0.5.
    bins = np.linspace(0.0, 1.0, 41)
    ax_all.hist(conf, bins=bins, color="grey")
    ax_all.set(xlabel="confidence (probability of the predicted class)", ylabel="images", title=f"all ({conf.size})")
    for c, name in LABEL_NAMES.items():
        sel = conf[pred == c]
        ax_cls.hist(sel, bins=bins, alpha=0.6, label=f"{c}: {name} ({sel.size})")
    ax_cls.set(xlabel="confidence", title="by predicted class")
    ax_cls.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def tune_results(table: Any, metric: str, path: str) -> str:
    """Best validation ``metric`` of each trial against its learning rate, coloured by unfreeze depth."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    col = f"best_{metric}"
    for depth, group in sorted(table.groupby("unfreeze_depth"), key=lambda kv: kv[0]):
        stopped = group["status"] != "completed"
        ax.scatter(group.loc[~stopped, "lr"], group.loc[~stopped, col], label=f"K={depth}", s=50)
        ax.scatter(group.loc[stopped, "lr"], group.loc[stopped, col], marker="x", s=50,
                   color=ax.collections[-1].get_facecolor()[0] if len(ax.collections) else None)
    ax.set(xscale="log", xlabel="phase-1 learning rate", ylabel=f"best {metric}",
           title="sweep (x = stopped early or failed)")
    ax.legend(title="unfreeze depth")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
