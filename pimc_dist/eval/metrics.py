"""Downstream metrics in numpy: classification, multi-label ranking, forecasting; a confusion plot.

Conventions (tests/test_metrics.py pins each one down):

- Single-label classification (`classification_metrics`): targets equal to
  `ignore_index` (PASTIS' void label) are left out before anything is counted.
  Overall accuracy is over the samples left. Per-class F1 and IoU come from the
  confusion matrix; a class that neither occurs in the targets nor is ever
  predicted has no F1 or IoU (NaN) and is left out of macro-F1 and mIoU, as in
  sklearn's `f1_score(average="macro")` (whose labels are those present in
  y_true or y_pred). A class predicted but absent from the targets counts,
  with F1 = IoU = 0.
- Multi-label (`multilabel_metrics`): scores are probabilities (or any
  monotone score for the AP part); predictions are `score >= threshold`.
  Average precision per class is sklearn's `average_precision_score`: the
  sum over distinct score thresholds, highest first, of (R_k - R_{k-1}) P_k,
  tied scores forming one threshold. A class with no positive target has no
  AP (it is undefined: recall is 0/0): it is left out of the macro mean and
  reported as NaN, and `n_classes_scored` says how many classes the mean
  covers. Micro AP ranks every (sample, class) pair together. Macro F1 at the
  threshold leaves out classes with no positive target and no positive
  prediction (0/0); a class with false positives only counts with F1 = 0.
  Micro F1 pools the counts of every class. Any mean over nothing is NaN.
- Forecasting (`forecast_metrics`): RMSE per index over every sample and
  horizon step, the RMSE over all indices together, and the RMSE per step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ---------------------------------------------------------------------------
# Single-label classification
# ---------------------------------------------------------------------------


def confusion_matrix(
    target: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class; ignored targets dropped."""
    target = np.asarray(target, dtype=np.int64).ravel()
    pred = np.asarray(pred, dtype=np.int64).ravel()
    if target.shape != pred.shape:
        raise ValueError(f"target {target.shape} and pred {pred.shape} differ in length")
    keep = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    target, pred = target[keep], pred[keep]
    bad = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"class index outside 0..{num_classes - 1}: target {target[i]}, pred {pred[i]}"
        )
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1, IoU and support (NaN where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # true count
    predicted = cm.sum(axis=0)
    fp, fn = predicted - tp, support - tp
    present = (support + predicted) > 0
    f1 = np.where(present, _safe_div(2 * tp, 2 * tp + fp + fn), np.nan)
    iou = np.where(present, _safe_div(tp, tp + fp + fn), np.nan)
    return {
        "precision": _safe_div(tp, predicted),
        "recall": _safe_div(tp, support),
        "f1": f1,
        "iou": iou,
        "support": support,
    }


def classification_metrics(
    target: np.ndarray,
    pred: np.ndarray,
    class_names: Sequence[str],
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """OA, macro-F1, mIoU, per-class F1/IoU and the confusion matrix (see the module docstring)."""
    k = len(class_names)
    cm = confusion_matrix(target, pred, k, ignore_index)
    n = int(cm.sum())
    scores = scores_from_confusion(cm)
    return {
        "oa": float(np.trace(cm) / n) if n else float("nan"),
        "macro_f1": _nanmean(scores["f1"]),
        "miou": _nanmean(scores["iou"]),
        "n": n,
        "per_class_f1": {name: float(v) for name, v in zip(class_names, scores["f1"], strict=True)},
        "per_class_iou": {
            name: float(v) for name, v in zip(class_names, scores["iou"], strict=True)
        },
        "confusion_matrix": cm.tolist(),
    }


# ---------------------------------------------------------------------------
# Multi-label
# ---------------------------------------------------------------------------


def average_precision(target: np.ndarray, scores: np.ndarray) -> float:
    """AP of one ranking (sklearn's definition, ties grouped); NaN when there is no positive."""
    target = np.asarray(target).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if target.shape != scores.shape:
        raise ValueError(f"target {target.shape} and scores {scores.shape} differ in length")
    n_pos = int(target.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, target = scores[order], target[order]
    # The last index of each run of equal scores: one threshold per distinct score.
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = np.cumsum(target)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(
    target: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    threshold: float = 0.5,
) -> dict[str, Any]:
    """mAP (macro, micro), F1 at `threshold` (macro, micro), per-class AP and F1."""
    target = np.asarray(target)
    scores = np.asarray(scores, dtype=np.float64)
    if target.ndim != 2 or target.shape != scores.shape:
        raise ValueError(f"need (N, K) target and scores, got {target.shape} and {scores.shape}")
    if target.shape[1] != len(class_names):
        raise ValueError(f"{target.shape[1]} classes in the data, {len(class_names)} names")
    if not np.isin(target, (0, 1)).all():
        raise ValueError("multi-label targets must be 0 or 1")
    truth = target.astype(bool)
    ap = np.array([average_precision(truth[:, j], scores[:, j]) for j in range(truth.shape[1])])
    predicted = scores >= threshold
    tp = (truth & predicted).sum(axis=0).astype(np.float64)
    fp = (~truth & predicted).sum(axis=0).astype(np.float64)
    fn = (truth & ~predicted).sum(axis=0).astype(np.float64)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)  # NaN for no positive target and no prediction
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "map_macro": _nanmean(ap),
        "map_micro": average_precision(truth, scores),
        "f1_macro": _nanmean(f1),
        "f1_micro": float(2 * tp.sum() / micro_den) if micro_den else float("nan"),
        "n": int(truth.shape[0]),
        "n_classes_scored": int(np.sum(~np.isnan(ap))),
        "per_class_ap": {name: float(v) for name, v in zip(class_names, ap, strict=True)},
        "per_class_f1": {name: float(v) for name, v in zip(class_names, f1, strict=True)},
    }


# ---------------------------------------------------------------------------
# Forecasting
# ---------------------------------------------------------------------------


def forecast_metrics(
    target: np.ndarray, pred: np.ndarray, index_names: Sequence[str]
) -> dict[str, Any]:
    """RMSE per index (`rmse_<name>`), over everything (`rmse`), and per horizon step.

    `target` and `pred` are (N, C, H): samples, indices, horizon steps.
    """
    target = np.asarray(target, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if target.shape != pred.shape or target.ndim != 3:
        raise ValueError(f"need equal (N, C, H) target and pred, got {target.shape}, {pred.shape}")
    if target.shape[1] != len(index_names):
        raise ValueError(f"{target.shape[1]} index channels, {len(index_names)} names")
    if target.shape[0] == 0:
        raise ValueError("no samples to score")
    sq = (pred - target) ** 2
    out: dict[str, Any] = {
        f"rmse_{name.lower()}": float(np.sqrt(sq[:, c].mean()))
        for c, name in enumerate(index_names)
    }
    out["rmse"] = float(np.sqrt(sq.mean()))
    out["rmse_by_step"] = np.sqrt(sq.mean(axis=(0, 1))).tolist()
    out["n"] = int(target.shape[0])
    return out


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def plot_confusion_matrix(
    cm: np.ndarray | list[list[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Row-normalised confusion matrix as a PNG (counts in the cells); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    side = max(4.0, 0.45 * k + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), [str(n)[:18] for n in class_names], rotation=90, fontsize=7)
    ax.set_yticks(range(k), [str(n)[:18] for n in class_names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=5, color=color
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "average_precision",
    "classification_metrics",
    "confusion_matrix",
    "forecast_metrics",
    "multilabel_metrics",
    "plot_confusion_matrix",
    "scores_from_confusion",
]
