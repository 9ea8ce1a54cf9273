"""Which pixels of a patch become samples: spread over the patch along a Hilbert curve.

A Hilbert curve visits every aligned 2^j x 2^j block of a square before leaving it, so k equal
segments of the curve are k compact, equally large regions of the patch. Picking one pixel at
random inside each segment spreads the picks over the patch (no clumps, no empty quadrant) while
staying random, and is deterministic for a seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def hilbert_index(rows: np.ndarray, cols: np.ndarray, order: int) -> np.ndarray:
    """Position along the Hilbert curve of side 2**order of each (row, col), as int64.

    The curve starts at (0, 0), ends at (0, 2**order - 1) and moves one pixel per step.
    """
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    side = 1 << order
    x = np.asarray(cols, dtype=np.int64).copy()
    y = np.asarray(rows, dtype=np.int64).copy()
    if x.shape != y.shape:
        raise ValueError(f"rows and cols differ in shape: {y.shape} vs {x.shape}")
    if x.size and (min(x.min(), y.min()) < 0 or max(x.max(), y.max()) >= side):
        raise ValueError(f"rows/cols outside the {side}x{side} square of order {order}")
    index = np.zeros_like(x)
    s = side >> 1
    while s > 0:
        # Which quadrant of the current s-block, then rotate/flip so the sub-curve is canonical.
        rx = (x & s) > 0
        ry = (y & s) > 0
        index += s * s * ((3 * rx) ^ ry)
        flip = ~ry & rx
        x = np.where(flip, side - 1 - x, x)
        y = np.where(flip, side - 1 - y, y)
        x, y = np.where(ry, x, y), np.where(ry, y, x)
        s >>= 1
    return index


def hilbert_order(height: int, width: int) -> np.ndarray:
    """All (row, col) of a height x width patch in Hilbert-curve order, (height*width, 2) int64.

    Sizes that are not a power of two walk the enclosing power-of-two curve and skip the points
    outside the patch, so neighbours on the list stay neighbours in the patch almost always.
    """
    if height < 0 or width < 0:
        raise ValueError(f"patch size must be non-negative, got {height}x{width}")
    order = (max(height, width, 1) - 1).bit_length()
    rows, cols = np.divmod(np.arange(height * width, dtype=np.int64), max(width, 1))
    position = hilbert_index(rows, cols, order)
    ranking = np.argsort(position, kind="stable")
    return np.stack([rows[ranking], cols[ranking]], axis=1)


def patch_seed(seed: int, patch_id: str) -> int:
    """A per-patch seed from a run seed and a patch id, stable across processes and machines.

    (Python's hash() of a str changes with every interpreter, so it cannot serve.)
    """
    return zlib.crc32(f"{int(seed)}:{patch_id}".encode())


def _spread_pick(candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of `candidates` (already in Hilbert order): one random row in each of k segments."""
    n = candidates.shape[0]
    k = min(k, n)
    if k == 0:
        return candidates[:0]
    bounds = (np.arange(k + 1, dtype=np.int64) * n) // k
    starts, lengths = bounds[:-1], np.diff(bounds)
    picks = starts + (rng.random(k) * lengths).astype(np.int64)
    return candidates[np.minimum(picks, bounds[1:] - 1)]


def class_quotas(counts: Sequence[int], k: int) -> np.ndarray:
    """How many of k picks each class gets: as equal as the class sizes allow (water-filling).

    Small classes give all they have; the rest is split evenly among the larger ones, with any
    remainder going to the largest. The quotas sum to min(k, sum(counts)).
    """
    counts = np.asarray(counts, dtype=np.int64)
    quotas = np.zeros_like(counts)
    remaining = min(int(k), int(counts.sum()))
    by_size = np.argsort(counts, kind="stable")
    for left, cls in zip(range(len(counts), 0, -1), by_size, strict=True):
        quotas[cls] = min(int(counts[cls]), remaining // left)
        remaining -= int(quotas[cls])
    return quotas


def sample_pixels(
    valid: np.ndarray,
    k: int,
    *,
    labels: np.ndarray | None = None,
    stratify: bool = False,
    exclude_labels: Sequence[int] = (),
    seed: int = 0,
) -> np.ndarray:
    """Pick up to k pixels of a patch, spread over it; (k', 2) int64 (row, col) in Hilbert order.

    `valid` (H, W) bool marks the pixels that may be picked (False: no data, clouds all year, ...);
    pixels whose label is in `exclude_labels` (e.g. PASTIS void label 19) are never picked either.
    k' = min(k, number of pickable pixels). The valid pixels in Hilbert order are cut into k'
    equal segments and one pixel is drawn in each. With `stratify`, the k' picks are shared
    among the label classes present as evenly as their sizes allow (see `class_quotas`), and
    each class's picks are spread the same way over that class's pixels. The same inputs and
    seed give the same pixels; use `patch_seed` for a different draw per patch.
    """
    valid = np.asarray(valid)
    if valid.ndim != 2:
        raise ValueError(f"valid must be an (H, W) mask, got shape {valid.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if stratify and labels is None:
        raise ValueError("stratify=True needs labels")
    pickable = valid.astype(bool)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != valid.shape:
            raise ValueError(f"labels has shape {labels.shape}, valid has {valid.shape}")
        if len(exclude_labels):
            pickable = pickable & ~np.isin(labels, list(exclude_labels))
    elif len(exclude_labels):
        raise ValueError("exclude_labels needs labels")

    rng = np.random.default_rng(seed)
    order = hilbert_order(*valid.shape)
    order = order[pickable[order[:, 0], order[:, 1]]]
    if not stratify:
        return _spread_pick(order, k, rng)

    order_labels = labels[order[:, 0], order[:, 1]]
    classes, counts = np.unique(order_labels, return_counts=True)
    quotas = class_quotas(counts, k)
    # Positions on the curve of each class's picks; sorting them restores Hilbert order overall.
    chosen = [np.zeros(0, dtype=np.int64)]
    for cls, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(order_labels == cls)
        chosen.append(_spread_pick(members, int(quota), rng))
    return order[np.sort(np.concatenate(chosen))]
