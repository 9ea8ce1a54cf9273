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
- Cluster coherence of embeddings (`cluster_metrics`, as MoSAiC reports it), on
  the test embeddings (the frozen features of a linear probe; the features the
  head of a fine-tuned model sees, at the selected epoch):
  - k-NN (`knn_acc`, `knn_map`): leave-one-out within the test set (the
    reference set is the other test samples; no training sample is used),
    k = 20 nearest by cosine similarity (fewer when the set is smaller).
    Single-label: the majority label of the k neighbours, ties to the label
    whose neighbours are the more similar in sum; `knn_acc` is its accuracy.
    Multi-label: each label's score is the share of the k neighbours that carry
    it; `knn_map` is the macro mAP of those scores (as `multilabel_metrics`).
  - `silhouette`: mean silhouette with cosine distance (1 - cosine similarity)
    w.r.t. the single label, or for multi-label the dominant label (a sample's
    positive label that is most frequent in the set, ties to the lower index;
    samples with none left out), on a seeded random subsample of at most
    `max_points` (5,000) samples; a sample alone in its cluster scores 0
    (sklearn's convention, whose `silhouette_score(metric="cosine")` it equals).
    NaN with fewer than two clusters.
  Both work in chunks of `chunk` query rows (a chunk x N similarity block at a
  time), so 100k embeddings need no N x N matrix; the answer does not depend on
  the chunk size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


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
# Cluster coherence of embeddings
# ---------------------------------------------------------------------------

KNN_K = 20
SILHOUETTE_MAX_POINTS = 5000
CHUNK = 1024


def _unit(embeddings: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"need (N, D) embeddings, got shape {tuple(x.shape)}")
    return F.normalize(x, dim=1)


def knn_neighbours(
    embeddings: np.ndarray, k: int = KNN_K, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities), each (N, k'), of every sample's k' = min(k, N - 1)
    nearest other samples, most similar first (leave-one-out), `chunk` rows at a time."""
    x = _unit(embeddings)
    n = x.shape[0]
    k = min(int(k), n - 1)
    if k < 1:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    idx = np.empty((n, k), np.int64)
    sim = np.empty((n, k), np.float32)
    for start in range(0, n, max(1, int(chunk))):
        block = x[start : start + chunk] @ x.T  # (c, N)
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -float("inf")  # not its own neighbour
        top = torch.topk(block, k, dim=1)
        idx[start : start + block.shape[0]] = top.indices.numpy()
        sim[start : start + block.shape[0]] = top.values.numpy()
    return idx, sim


def knn_accuracy(
    embeddings: np.ndarray, labels: np.ndarray, k: int = KNN_K, chunk: int = CHUNK
) -> float:
    """Leave-one-out k-NN accuracy (cosine, majority vote; module docstring)."""
    labels = np.asarray(labels).ravel()
    if len(labels) < 2:
        return float("nan")
    classes, y = np.unique(labels, return_inverse=True)
    idx, sim = knn_neighbours(embeddings, k, chunk)
    votes = np.zeros((len(y), len(classes)))
    rows = np.repeat(np.arange(len(y)), idx.shape[1])
    np.add.at(votes, (rows, y[idx].ravel()), 1.0)
    # Ties to the more similar neighbours: |sum of similarities| <= count <= k < k + 1.
    np.add.at(votes, (rows, y[idx].ravel()), sim.ravel().astype(np.float64) / (idx.shape[1] + 1))
    return float(np.mean(votes.argmax(axis=1) == y))


def knn_map(
    embeddings: np.ndarray, target: np.ndarray, k: int = KNN_K, chunk: int = CHUNK
) -> float:
    """Leave-one-out k-NN macro mAP of multi-hot `target` (N, K): label scores are the share
    of the k neighbours carrying each label (module docstring)."""
    target = np.asarray(target).astype(bool)
    if target.ndim != 2 or len(target) < 2:
        return float("nan")
    idx, _ = knn_neighbours(embeddings, k, chunk)
    scores = target[idx].mean(axis=1)  # (N, K)
    return _nanmean([average_precision(target[:, j], scores[:, j]) for j in range(target.shape[1])])


def dominant_label(target: np.ndarray) -> np.ndarray:
    """Per sample of multi-hot `target` (N, K), its positive label most frequent in the set
    (ties to the lower index); -1 for a sample with no positive label."""
    target = np.asarray(target).astype(bool)
    freq = target.sum(axis=0).astype(np.float64)
    ranked = np.where(target, freq[None, :] - np.arange(target.shape[1])[None, :] * 1e-9, -1.0)
    return np.where(target.any(axis=1), ranked.argmax(axis=1), -1)


def silhouette_cosine(
    embeddings: np.ndarray,
    labels: np.ndarray,
    max_points: int = SILHOUETTE_MAX_POINTS,
    seed: int = 0,
    chunk: int = CHUNK,
) -> float:
    """Mean silhouette, cosine distance, on a seeded subsample of at most `max_points`
    samples (labels < 0 left out first); NaN with fewer than two clusters."""
    labels = np.asarray(labels).ravel()
    keep = np.flatnonzero(labels >= 0) if labels.dtype.kind in "iu" else np.arange(len(labels))
    if len(keep) > max_points:
        rng = np.random.default_rng([int(seed), 7919])
        keep = np.sort(rng.choice(keep, int(max_points), replace=False))
    classes, y = np.unique(labels[keep], return_inverse=True)
    if len(classes) < 2:
        return float("nan")
    x = _unit(np.asarray(embeddings)[keep]).double()
    onehot = torch.zeros((len(y), len(classes)), dtype=torch.float64)
    onehot[torch.arange(len(y)), torch.as_tensor(y)] = 1.0
    counts = onehot.sum(dim=0).numpy()
    values = np.empty(len(y))
    for start in range(0, len(y), max(1, int(chunk))):
        dist = (1.0 - x[start : start + chunk] @ x.T).clamp_(min=0.0)
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = 0.0
        sums = (dist @ onehot).numpy()  # (c, C): summed distance to each cluster
        own = y[start : start + dist.shape[0]]
        r = np.arange(len(own))
        n_own = counts[own]
        a = np.divide(sums[r, own], n_own - 1, out=np.zeros(len(own)), where=n_own > 1)
        mean_other = sums / counts[None, :]
        mean_other[r, own] = np.inf
        b = mean_other.min(axis=1)
        top = np.maximum(a, b)
        s = np.divide(b - a, top, out=np.zeros(len(own)), where=top > 0)
        values[start : start + len(own)] = np.where(n_own > 1, s, 0.0)
    return float(values.mean())


def cluster_metrics(
    embeddings: np.ndarray,
    target: np.ndarray,
    kind: str,
    *,
    k: int = KNN_K,
    max_points: int = SILHOUETTE_MAX_POINTS,
    seed: int = 0,
    chunk: int = CHUNK,
) -> dict[str, Any]:
    """k-NN score and silhouette of test embeddings (module docstring): `knn_acc` (kind
    multiclass, `target` labels) or `knn_map` (multilabel, multi-hot `target`), and
    `silhouette` w.r.t. the label or the dominant label; {} for other kinds."""
    if kind == "multiclass":
        labels = np.asarray(target).ravel().astype(np.int64)
        knn = {"knn_acc": knn_accuracy(embeddings, labels, k, chunk)}
    elif kind == "multilabel":
        labels = dominant_label(target)
        knn = {"knn_map": knn_map(embeddings, target, k, chunk)}
    else:
        return {}
    n = int(np.sum(labels >= 0))
    return {
        **knn,
        "silhouette": silhouette_cosine(embeddings, labels, max_points, seed, chunk),
        "knn_k": int(min(k, max(len(labels) - 1, 0))),
        "silhouette_n": int(min(n, max_points)),
    }


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
    "cluster_metrics",
    "dominant_label",
    "knn_accuracy",
    "knn_map",
    "knn_neighbours",
    "silhouette_cosine",
    "confusion_matrix",
    "forecast_metrics",
    "multilabel_metrics",
    "plot_confusion_matrix",
    "scores_from_confusion",
]
