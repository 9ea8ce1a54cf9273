"""Recurrence plots of index series: pyts-compatible values, fast numba kernels, a torch twin.

A recurrence plot of a series x_1..x_T is the matrix of distances between its delay-embedded
trajectories v_i = (x_i, x_{i+tau}, ..., x_{i+(m-1)tau}), i = 1..T' with T' = T - (m-1) tau,
m the ``dimension`` and tau the ``time_delay`` (Eckmann et al. 1987; pyts.image.RecurrencePlot).

Three entry points, all taking a batch (N, T) or (N, C, T) and returning (N, [C,] ., .):

- :func:`recurrence_plot` -- float32 plots with exactly the semantics of pyts 0.14
  ``RecurrencePlot(dimension, time_delay, threshold, percentage).transform`` applied to every
  series: distances are computed in float64 like pyts, so the result equals pyts' output cast to
  float32 (bit for bit), and binary plots (``threshold`` given) are identical.
- :func:`recurrence_plot_uint8` -- plots for storage (PNG in the shards), on a FIXED scale so
  that grey levels mean the same distance in every pixel and every dataset (see below).
- :func:`recurrence_plot_torch` -- the same uint8 (or float) plots from a torch tensor on any
  device, to compute plots inside the training step from stored float16 series.

uint8 scale. Index series are cleaned to [-1, 1] upstream (``pimc_dist.indices``), so the
distance between two m-dimensional trajectories lies in [0, 2 sqrt(m)]. A distance d maps to
``floor(min(d * (255 / max_distance), 255) + 0.5)``, i.e. round-half-up of
``255 * min(d / max_distance, 1)``, with ``max_distance = 2 sqrt(m)`` unless given. This
arithmetic is done in float32 (both here and in torch, in the same order), so the numpy and
torch uint8 plots are equal; against pyts' float64 distances a value may differ by one step
where d sits on a rounding boundary. Binary plots (``threshold`` given) store 0 and 255.

Resize. ``size=S`` resamples the float plot to S x S before quantising, with area (box-filter)
weights: output cell i covers input coordinates [i T'/S, (i+1) T'/S) and averages the input
cells it overlaps, weighted by the overlap length -- the filter of OpenCV's INTER_AREA and PIL's
BOX, valid for shrinking and for enlarging. It is applied along columns, then along rows
(R = A (M A^T)), in float32, the same way in numpy and torch.

Speed. The kernels are numba functions compiled on first use (one to a few seconds each, then
cached on disk under ``__pycache__`` for later processes). Each series is one independent task.
With ``numba.get_num_threads() > 1`` a batch is split over numba's threads; with one thread
(``numba.set_num_threads(1)`` or ``NUMBA_NUM_THREADS=1``) a serial build of the same kernel runs
and no thread pool is touched -- use that in forked data-loader workers, since numba's OpenMP
layer must not be used on both sides of a fork. Rows are written 64 values at a time into the
flat output (a row's overhang is overwritten by the rows after it), which keeps every inner
loop a whole number of SIMD vectors for T' <= 64. Each series is first copied into a small
zero-padded scratch row rather than the batch into a padded copy: a new array of the batch's
size can come as fresh pages, whose faults cost more than the plots (0.85 ms of 2.9 ms for
4096 series on a 2-core VM). Thresholded plots keep one series' float64 distances in scratch
and take the 'point' percentile by a selection among the upper triangle
(:func:`_percentile_of_plot`), about 7x faster than ``np.percentile`` over the batch.
"""

from __future__ import annotations

import functools
import math
import numbers

import numba
import numpy as np
import torch
from numba import prange

__all__ = [
    "default_max_distance",
    "plot_size",
    "recurrence_plot",
    "recurrence_plot_torch",
    "recurrence_plot_uint8",
    "resize_plot",
]

THRESHOLDS = ("point", "distance")
# Rows are computed in blocks of this many values; T' up to 64 is one block.
_ROW_BLOCK = 64
# Below this many series the parallel kernel's thread start-up costs more than it saves.
_MIN_SERIES_PER_THREAD = 32
# Bins of the 'point' percentile's selection: a few values per bin for T' ~ 61.
_PERCENTILE_BINS = 256
# Binary-plot modes of the threshold kernel.
_POINT, _DISTANCE, _FIXED = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Parameters and validation
# --------------------------------------------------------------------------------------------


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _resolve_length_param(name: str, value: object, n_timestamps: int) -> int:
    """An int in [1, T], or a fraction in (0, 1] of T rounded up, as pyts reads it."""
    if isinstance(value, (bool, np.bool_)) or not _is_real(value):
        raise TypeError(f"'{name}' must be an int or a float, got {value!r}")
    if isinstance(value, numbers.Integral):
        if not 1 <= value <= n_timestamps:
            raise ValueError(
                f"'{name}' as an int must be in [1, n_timestamps={n_timestamps}], got {value}"
            )
        return int(value)
    if not 0 < value <= 1:
        raise ValueError(
            f"'{name}' as a float is a fraction of T and must be in (0, 1], got {value}"
        )
    return math.ceil(value * n_timestamps)


def _resolve_embedding(n_timestamps: int, dimension: object, time_delay: object) -> tuple[int, int]:
    dim = _resolve_length_param("dimension", dimension, n_timestamps)
    delay = _resolve_length_param("time_delay", time_delay, n_timestamps)
    if n_timestamps - (dim - 1) * delay < 1:
        raise ValueError(
            f"no trajectory fits: T - (dimension - 1) * time_delay = {n_timestamps} - "
            f"({dim} - 1) * {delay} < 1; use a smaller dimension or time_delay"
        )
    return dim, delay


def plot_size(n_timestamps: int, dimension: int | float = 1, time_delay: int | float = 1) -> int:
    """Side T' = T - (dimension - 1) * time_delay of the plot of a length-T series."""
    dim, delay = _resolve_embedding(n_timestamps, dimension, time_delay)
    return n_timestamps - (dim - 1) * delay


def default_max_distance(dimension: int) -> float:
    """Largest distance between m-dimensional trajectories of a series in [-1, 1]: 2 sqrt(m)."""
    return 2.0 * math.sqrt(dimension)


def _check_threshold(threshold: object, percentage: object) -> None:
    if threshold is None or (isinstance(threshold, str) and threshold in THRESHOLDS):
        pass
    elif isinstance(threshold, str) or not _is_real(threshold):
        raise TypeError(
            f"'threshold' must be None, 'point', 'distance' or a positive number, got {threshold!r}"
        )
    elif not threshold > 0:  # also rejects NaN
        raise ValueError(f"'threshold' as a number must be > 0, got {threshold}")
    if not _is_real(percentage):
        raise TypeError(f"'percentage' must be a number, got {percentage!r}")
    if not 0 <= percentage <= 100:
        raise ValueError(f"'percentage' must be in [0, 100], got {percentage}")


def _check_series(series: object) -> np.ndarray:
    """The batch as an ndarray of shape (N, T) or (N, C, T) of real numbers.

    That the values are finite is checked by the kernels as they read each series (a separate
    pass over the batch would cost ~3% of the uint8 plots), then by :func:`_check_finite`.
    """
    array = np.asarray(series)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"series must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(
            f"series must have shape (N, T) or (N, C, T), got {array.ndim} dims {array.shape}"
        )
    if array.shape[-1] < 1:
        raise ValueError(f"series must have at least one time step, got shape {array.shape}")
    return array


def _check_finite(n_bad: int, array: np.ndarray) -> None:
    """Raise if the kernels found ``n_bad`` > 0 series with NaN or infinite values (they left
    those plots unwritten, so an ``out`` array holds garbage there)."""
    if n_bad:
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"series contains NaN or infinite values (first at index {tuple(int(i) for i in bad)}); "
            "fill gaps before computing recurrence plots"
        )


def _check_size(size: object) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
        raise TypeError(f"'size' must be None or an int, got {size!r}")
    if size is not None and size < 1:
        raise ValueError(f"'size' must be >= 1, got {size}")


def _check_max_distance(max_distance: object, dimension: int) -> float:
    if max_distance is None:
        return default_max_distance(dimension)
    if not _is_real(max_distance) or not (0 < max_distance < math.inf):
        raise ValueError(f"'max_distance' must be a finite number > 0, got {max_distance!r}")
    return float(max_distance)


def _kernel_series(flat: np.ndarray, dtype: type) -> np.ndarray:
    """The (M, T) series C-contiguous, as float32 or float64 (which the kernels convert to
    their arithmetic, exactly as numpy's cast would) or else cast to ``dtype`` here."""
    if flat.dtype != np.float32 and flat.dtype != np.float64:
        flat = flat.astype(dtype)
    return np.ascontiguousarray(flat)


def _chunks(n_series: int) -> tuple[bool, int]:
    """Whether to run the parallel kernel, and how many chunks to split the batch into."""
    threads = numba.get_num_threads()
    if threads > 1 and n_series >= 2 * _MIN_SERIES_PER_THREAD:
        return True, min(4 * threads, n_series // _MIN_SERIES_PER_THREAD)
    return False, 1


# --------------------------------------------------------------------------------------------
# Numba kernels. Each is compiled twice from one body: serially and with parallel=True, where
# prange splits the chunks over numba's threads (in the serial build prange is range).
# --------------------------------------------------------------------------------------------


def _load_series(series, m, x):
    """Series ``m`` into the scratch row ``x``, cast to its dtype (the zero tail stays); whether
    all its values are finite (v - v is 0 for finite v, NaN for NaN and infinities)."""
    finite = True
    for t in range(series.shape[1]):
        value = series[m, t]
        x[t] = value
        finite &= value - value == 0.0  # an AND over the row: vectorised, no add chain
    return finite


def _distance_rows(x, n_traj, dim, delay, acc, dest):
    """Distances between the trajectories of the series in ``x`` into the flat plot ``dest``.

    The arithmetic is that of ``x`` (float64 gives pyts' values); ``acc`` is a scratch row of
    the row width. Row j is written a full row width wide from j*T' where that stays inside
    ``dest`` (the overhang lands in later rows, written afterwards), else exactly T' wide.
    The sum over the embedding dimension runs in pyts' order: 0 + diff_0^2 + diff_1^2 + ...
    """
    row_width = acc.shape[0]
    for j in range(n_traj):
        length = row_width if j * n_traj + row_width <= n_traj * n_traj else n_traj
        # Views indexed by range variables keep numba from emitting negative-index
        # wrap-around code, which turns contiguous SIMD loads into gathers.
        row = dest[j * n_traj :]
        xj = x[j]
        if dim == 1:
            for k in range(length):
                row[k] = abs(xj - x[k])
            continue
        for k in range(length):
            diff = xj - x[k]
            acc[k] = diff * diff
        for d in range(1, dim - 1):
            shifted = x[d * delay :]
            xj = shifted[j]
            for k in range(length):
                diff = xj - shifted[k]
                acc[k] = acc[k] + diff * diff
        shifted = x[(dim - 1) * delay :]
        xj = shifted[j]
        for k in range(length):
            diff = xj - shifted[k]
            row[k] = np.sqrt(acc[k] + diff * diff)


def _distance_plots_body(series, n_traj, dim, delay, n_chunks, out):
    """float64 distances (pyts' values) of every series into the flat float ``out`` (N, T'*T')."""
    n_series = series.shape[0]
    row_width = -(-n_traj // _ROW_BLOCK) * _ROW_BLOCK
    n_bad = 0
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        bad = 0
        x = np.zeros(row_width + (dim - 1) * delay, dtype=np.float64)
        acc = np.zeros(row_width, dtype=np.float64)
        for m in range(start, stop):
            if not _load_series(series, m, x):
                bad += 1
                continue
            _distance_rows(x, n_traj, dim, delay, acc, out[m])
        n_bad += bad
    return n_bad


def _select(values, k):
    """Reorder ``values`` in place so that values[k] is its k-th smallest (0-based), with no
    larger value before it and no smaller one after (Hoare's FIND, median-of-three pivot)."""
    lo = 0
    hi = values.shape[0] - 1
    while lo < hi:
        a = values[lo]
        b = values[(lo + hi) // 2]
        c = values[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i = lo
        j = hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while pivot < values[j]:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        # Now values[lo..j] <= pivot <= values[i..hi], and the ones between equal the pivot.
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


def _bin_of(value, lo, scale):
    """Bin of ``value`` for :func:`_order_statistics`: never decreasing as the value grows,
    since each float operation rounds monotonically."""
    return int((value - lo) * scale)


def _order_statistics(values, rank, next_rank, counts, picked):
    """The ``rank``-th and ``next_rank``-th smallest of ``values`` (0-based; next_rank is rank
    or rank + 1), reordering ``values``; ``counts`` and ``picked`` are scratch.

    The values are binned over their range [lo, hi] into len(counts) bins; as the bin never
    decreases with the value, bin b holds exactly the ranks [below, below + counts[b]), and a
    selection runs over that bin's few values only. Without a finite, positive bin scale (all
    values equal, an infinite value, or a subnormal range) a selection runs over all values.
    """
    lo = values.min()
    hi = values.max()
    scale = (counts.shape[0] - 1) / (hi - lo) if hi > lo else 0.0
    if not (scale > 0.0 and np.isfinite(scale)):
        _select(values, rank)
        first = values[rank]
        return first, first if next_rank == rank else values[rank + 1 :].min()
    counts[:] = 0
    for i in range(values.shape[0]):
        counts[_bin_of(values[i], lo, scale)] += 1
    below = 0
    b = 0
    while below + counts[b] <= rank:
        below += counts[b]
        b += 1
    count = 0
    for i in range(values.shape[0]):
        if _bin_of(values[i], lo, scale) == b:
            picked[count] = values[i]
            count += 1
    in_bin = picked[:count]
    _select(in_bin, rank - below)
    first = in_bin[rank - below]
    if next_rank == rank:
        return first, first
    if rank - below + 1 < count:
        return first, in_bin[rank - below + 1 :].min()
    # rank was the last of its bin: the next value is the least of the next non-empty bin.
    b += 1
    while counts[b] == 0:
        b += 1
    second = hi
    for i in range(values.shape[0]):
        if _bin_of(values[i], lo, scale) == b:
            second = min(second, values[i])
    return first, second


def _percentile_of_plot(dist, n_traj, upper, counts, picked, lo, hi, gamma, one_minus_gamma):
    """``np.percentile(dist, q)`` (linear method) of one flat plot of T'^2 distances.

    numpy interpolates between the order statistics ``lo`` <= ``hi`` of the plot with weight
    ``gamma`` (both from :func:`_percentile_weights`). A plot is symmetric with a zero diagonal,
    exactly, so its sorted values are T' zeros followed by every upper-triangle distance twice:
    the order statistics are found among the T'(T'-1)/2 upper-triangle values (copied into the
    scratch ``upper``; ``counts`` and ``picked`` are scratch for :func:`_order_statistics`),
    then interpolated with numpy's float64 formula.
    """
    count = 0
    for j in range(n_traj - 1):
        row = dist[j * n_traj + j + 1 :]
        length = n_traj - 1 - j
        segment = upper[count:]
        for k in range(length):  # a loop by range variables: a vectorised copy
            segment[k] = row[k]
        count += length
    a = 0.0
    b = 0.0
    if hi >= n_traj:
        rank_hi = (hi - n_traj) // 2
        if lo >= n_traj:
            a, b = _order_statistics(upper, (lo - n_traj) // 2, rank_hi, counts, picked)
        else:
            b = upper.min()  # hi is T': the least value after the zeros
    diff = b - a
    if gamma >= 0.5:
        return b - diff * one_minus_gamma
    return a + diff * gamma


def _binary_plots_body(
    series, n_traj, dim, delay, mode, limit, lo, hi, gamma, one_minus_gamma, n_chunks, out
):
    """Thresholded plots (1 where distance < threshold, else 0) into the flat float ``out``.

    Distances in float64 like pyts; the threshold of each plot: for mode _POINT its percentile
    (:func:`_percentile_of_plot`), for _DISTANCE ``limit`` times its largest distance, for
    _FIXED ``limit`` itself -- pyts' expressions, so ties fall the same way.
    """
    n_series = series.shape[0]
    row_width = -(-n_traj // _ROW_BLOCK) * _ROW_BLOCK
    n_values = n_traj * n_traj
    n_bad = 0
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        bad = 0
        x = np.zeros(row_width + (dim - 1) * delay, dtype=np.float64)
        acc = np.zeros(row_width, dtype=np.float64)
        dist = np.zeros(n_values, dtype=np.float64)
        upper = np.zeros(n_traj * (n_traj - 1) // 2, dtype=np.float64)
        picked = np.zeros_like(upper)
        counts = np.zeros(_PERCENTILE_BINS, dtype=np.int64)
        for m in range(start, stop):
            if not _load_series(series, m, x):
                bad += 1
                continue
            _distance_rows(x, n_traj, dim, delay, acc, dist)
            if mode == _POINT:
                threshold = _percentile_of_plot(
                    dist, n_traj, upper, counts, picked, lo, hi, gamma, one_minus_gamma
                )
            elif mode == _DISTANCE:
                threshold = limit * dist.max()
            else:
                threshold = limit
            plot = out[m]
            for p in range(n_values):
                plot[p] = 1.0 if dist[p] < threshold else 0.0
        n_bad += bad
    return n_bad


def _uint8_plots_body(series, n_traj, dim, delay, scale, n_chunks, out):
    """float32 distances quantised to uint8 (see the module docstring) into flat ``out``."""
    n_series = series.shape[0]
    row_width = -(-n_traj // _ROW_BLOCK) * _ROW_BLOCK
    cap = np.float32(255.0)
    half = np.float32(0.5)
    n_bad = 0
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        bad = 0
        x = np.zeros(row_width + (dim - 1) * delay, dtype=np.float32)
        acc = np.zeros(row_width, dtype=np.float32)
        for m in range(start, stop):
            if not _load_series(series, m, x):
                bad += 1
                continue
            series_out = out[m]
            for j in range(n_traj):
                length = row_width if j * n_traj + row_width <= n_traj * n_traj else n_traj
                row = series_out[j * n_traj :]
                xj = x[j]
                if dim == 1:
                    for k in range(length):
                        v = abs(xj - x[k]) * scale
                        row[k] = np.uint8(min(v, cap) + half)
                    continue
                for k in range(length):
                    diff = xj - x[k]
                    acc[k] = diff * diff
                for d in range(1, dim - 1):
                    shifted = x[d * delay :]
                    xj = shifted[j]
                    for k in range(length):
                        diff = xj - shifted[k]
                        acc[k] = acc[k] + diff * diff
                shifted = x[(dim - 1) * delay :]
                xj = shifted[j]
                for k in range(length):
                    diff = xj - shifted[k]
                    v = np.sqrt(acc[k] + diff * diff) * scale
                    row[k] = np.uint8(min(v, cap) + half)

        # The area resize of a plot M is R = A (M A^T), A the sparse (S, n) area matrix held as
        # ``taps`` (S, K) input indices and ``weights`` (S, K) (and their transposes, (K, S)):
        #   columns pass  Q[k, i] = sum_t M[k, taps[i, t]] * weights[i, t]
        #   rows pass     R[j, i] = sum_t weights[j, t] * Q[taps[j, t], i]
        # each sum starting from its t = 0 term and adding in t order. The torch twin does the same
        # operations in the same order, so the two agree bit for bit.
        n_bad += bad
    return n_bad


def _resize_plots_body(plots, taps, weights, taps_t, weights_t, n_chunks, out):
    """Area-resize float32 plots (N, n, n) into ``out`` (N, S, S)."""
    n_series, n_rows, _ = plots.shape
    size, n_taps = taps.shape
    width = taps_t.shape[1]
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        cols = np.zeros((n_rows, width), dtype=np.float32)
        result = np.zeros((size, width), dtype=np.float32)
        for m in range(start, stop):
            plot = plots[m]
            for k in range(n_rows):
                in_row = plot[k]
                q = cols[k]
                tap = taps_t[0]
                w = weights_t[0]
                for i in range(width):
                    q[i] = in_row[tap[i]] * w[i]
                for t in range(1, n_taps):
                    tap = taps_t[t]
                    w = weights_t[t]
                    for i in range(width):
                        q[i] = q[i] + in_row[tap[i]] * w[i]
            _rows_pass(cols, taps, weights, result)
            out[m] = result[:, :size]


def _rows_pass(cols, taps, weights, result):
    """result[j, :] = sum_t weights[j, t] * cols[taps[j, t], :] over the padded width."""
    size, n_taps = taps.shape
    width = cols.shape[1]
    for j in range(size):
        r = result[j]
        q = cols[taps[j, 0]]
        w = weights[j, 0]
        for i in range(width):
            r[i] = w * q[i]
        for t in range(1, n_taps):
            q = cols[taps[j, t]]
            w = weights[j, t]
            for i in range(width):
                r[i] = r[i] + w * q[i]


def _uint8_resized_body(
    series, n_traj, dim, delay, scale, taps, weights, taps_t, weights_t, n_chunks, out
):
    """float32 plots area-resized to S x S and quantised to uint8 into ``out`` (N, S, S).

    The plot is never formed: the columns pass reads its entries M[k, a] = dist(v_k, v_a)
    straight from the series, for the K input columns a = taps[i, t] of each output column i,
    gathered once per series -- so every inner loop runs over S contiguous values.
    """
    n_series, n_timestamps = series.shape
    size, n_taps = taps.shape
    width = taps_t.shape[1]
    cap = np.float32(255.0)
    half = np.float32(0.5)
    n_bad = 0
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        bad = 0
        x = np.zeros(n_timestamps, dtype=np.float32)
        gathered = np.zeros((n_taps, dim, width), dtype=np.float32)
        cols = np.zeros((n_traj, width), dtype=np.float32)
        dist = np.zeros(width, dtype=np.float32)
        result = np.zeros((size, width), dtype=np.float32)
        for m in range(start, stop):
            if not _load_series(series, m, x):
                bad += 1
                continue
            # Plain indexing by range variables here: views made inside these loops would
            # cost a reference-count update each.
            for t in range(n_taps):
                for d in range(dim):
                    offset = d * delay
                    for i in range(width):
                        gathered[t, d, i] = x[taps_t[t, i] + offset]
            for k in range(n_traj):
                for t in range(n_taps):
                    xk = x[k]
                    if dim == 1:
                        for i in range(width):
                            dist[i] = abs(xk - gathered[t, 0, i])
                    else:
                        for i in range(width):
                            diff = xk - gathered[t, 0, i]
                            dist[i] = diff * diff
                        for d in range(1, dim):
                            xk = x[k + d * delay]
                            for i in range(width):
                                diff = xk - gathered[t, d, i]
                                dist[i] = dist[i] + diff * diff
                        for i in range(width):
                            dist[i] = np.sqrt(dist[i])
                    if t == 0:
                        for i in range(width):
                            cols[k, i] = dist[i] * weights_t[t, i]
                    else:
                        for i in range(width):
                            cols[k, i] = cols[k, i] + dist[i] * weights_t[t, i]
            _rows_pass(cols, taps, weights, result)
            for j in range(size):
                for i in range(size):
                    v = result[j, i] * scale
                    out[m, j, i] = np.uint8(min(v, cap) + half)
        n_bad += bad
    return n_bad


# Helpers the kernels call, compiled before them.
_load_series = numba.njit(cache=True, nogil=True)(_load_series)
_distance_rows = numba.njit(cache=True, nogil=True)(_distance_rows)
_select = numba.njit(cache=True, nogil=True)(_select)
_bin_of = numba.njit(cache=True, nogil=True, inline="always")(_bin_of)
_order_statistics = numba.njit(cache=True, nogil=True)(_order_statistics)
_percentile_of_plot = numba.njit(cache=True, nogil=True)(_percentile_of_plot)
_rows_pass = numba.njit(cache=True, nogil=True)(_rows_pass)


def _compile_pair(body):
    # nogil: Python threads (e.g. a threaded loader) can run kernels side by side.
    serial = numba.njit(cache=True, nogil=True)(body)
    return serial, numba.njit(cache=True, nogil=True, parallel=True)(body)


_DISTANCE_PLOTS = _compile_pair(_distance_plots_body)
_BINARY_PLOTS = _compile_pair(_binary_plots_body)
_UINT8_PLOTS = _compile_pair(_uint8_plots_body)
_UINT8_RESIZED = _compile_pair(_uint8_resized_body)
_RESIZE_PLOTS = _compile_pair(_resize_plots_body)


# --------------------------------------------------------------------------------------------
# Area resize weights
# --------------------------------------------------------------------------------------------


def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse area-resampling matrix: input indices (n_out, K) int64 and weights float32.

    Output cell i covers [i n_in / n_out, (i+1) n_in / n_out); each input cell it overlaps gets
    weight overlap / (n_in / n_out). Rows with fewer than K taps repeat their last index with
    weight 0.
    """
    span = n_in / n_out
    rows = []
    for i in range(n_out):
        lo = i * n_in / n_out
        hi = (i + 1) * n_in / n_out
        taps = []
        for t in range(math.floor(lo), min(math.ceil(hi), n_in)):
            overlap = min(hi, t + 1) - max(lo, t)
            if overlap > 1e-9:
                taps.append((t, overlap / span))
        rows.append(taps)
    n_taps = max(len(r) for r in rows)
    index = np.zeros((n_out, n_taps), dtype=np.int64)
    weight = np.zeros((n_out, n_taps), dtype=np.float32)
    for i, taps in enumerate(rows):
        for t in range(n_taps):
            index[i, t] = taps[min(t, len(taps) - 1)][0]
            weight[i, t] = taps[t][1] if t < len(taps) else 0.0
    return index, weight


def _columns_taps(taps: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The taps transposed to (K, S'), S' = S rounded up to whole row blocks (padding: index 0,
    weight 0), so that the columns pass runs over full SIMD vectors."""
    size, n_taps = taps.shape
    width = -(-size // _ROW_BLOCK) * _ROW_BLOCK
    taps_t = np.zeros((n_taps, width), dtype=np.int64)
    weights_t = np.zeros((n_taps, width), dtype=np.float32)
    taps_t[:, :size] = taps.T
    weights_t[:, :size] = weights.T
    return taps_t, weights_t


# --------------------------------------------------------------------------------------------
# numpy API
# --------------------------------------------------------------------------------------------


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """``out`` checked against the result's shape and dtype, or a new array."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"'out' must be a numpy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"'out' must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, got "
            f"{out.dtype.name} {out.shape}{'' if out.flags.c_contiguous else ' (not contiguous)'}"
        )
    if not out.flags.writeable:
        raise ValueError("'out' is read-only")
    return out


def _distances_float(flat: np.ndarray, n_traj: int, dim: int, delay: int, out: np.ndarray) -> int:
    """Distance plots from float64 arithmetic into float32 ``out`` (M, T', T'); returns the
    number of series with non-finite values (left unwritten)."""
    parallel, n_chunks = _chunks(flat.shape[0])
    rows_out = out.reshape(len(out), n_traj * n_traj)
    return _DISTANCE_PLOTS[parallel](
        _kernel_series(flat, np.float64), n_traj, dim, delay, n_chunks, rows_out
    )


def _percentile_weights(n_values: int, percentage: float) -> tuple[int, int, float, float]:
    """What ``np.percentile(values, percentage)`` (linear method) interpolates, for any
    ``n_values`` values: order statistics lo <= hi and the weights gamma, 1 - gamma.

    numpy's own expressions and dtypes (numpy 2 ``_quantile``), so a float32 percentage gives
    its float32 gamma, and a percentage of 100 the largest value (lo = hi = n_values - 1).
    """
    q = np.true_divide(percentage, 100)
    virtual = np.asanyarray((n_values - 1) * q)
    if virtual >= n_values - 1:
        previous = -1  # numpy's index of the largest value, which enters gamma as -1
        lo = hi = n_values - 1
    else:
        previous = int(np.floor(virtual))
        lo, hi = previous, previous + 1
    gamma = np.asanyarray(virtual - np.asarray(previous, dtype=np.intp), dtype=virtual.dtype)
    if type(percentage) in (int, float):  # numpy's weak promotion of a Python scalar
        gamma = float(gamma)
    return lo, hi, float(gamma), float(1 - gamma)


def _binary_plots(
    flat: np.ndarray,
    n_traj: int,
    dim: int,
    delay: int,
    threshold: object,
    percentage: float,
    out: np.ndarray,
) -> int:
    """Thresholded plots as 0/1 into float32 ``out`` (M, T', T'), with pyts' float64 distances
    and pyts' thresholds: np.percentile's ('point'), ``percentage / 100 * max`` ('distance').
    Returns the number of series with non-finite values (left unwritten)."""
    lo = hi = 0
    gamma = one_minus_gamma = limit = 0.0
    if isinstance(threshold, str) and threshold == "point":
        mode = _POINT
        lo, hi, gamma, one_minus_gamma = _percentile_weights(n_traj * n_traj, percentage)
    elif isinstance(threshold, str):
        mode = _DISTANCE
        limit = float(percentage / 100)
    else:
        mode = _FIXED
        limit = float(threshold)
    parallel, n_chunks = _chunks(flat.shape[0])
    return _BINARY_PLOTS[parallel](
        _kernel_series(flat, np.float64),
        n_traj,
        dim,
        delay,
        mode,
        limit,
        lo,
        hi,
        gamma,
        one_minus_gamma,
        n_chunks,
        out.reshape(len(out), n_traj * n_traj),
    )


def recurrence_plot(
    series: np.ndarray,
    *,
    dimension: int | float = 1,
    time_delay: int | float = 1,
    threshold: str | float | None = None,
    percentage: float = 10,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """float32 recurrence plots (N, [C,] T', T') with pyts RecurrencePlot's semantics.

    threshold None gives distances; 'point' marks the ``percentage`` % smallest distances of each
    plot (pyts' percentile rule), 'distance' the distances below ``percentage`` % of the plot's
    largest, a number the distances below it (binary plots hold 0 and 1). ``out``, a float32
    array of the result's shape, is filled and returned instead of a new array (ValueError for
    non-finite series leaves it partly written).
    """
    array = _check_series(series)
    _check_threshold(threshold, percentage)
    n_timestamps = array.shape[-1]
    dim, delay = _resolve_embedding(n_timestamps, dimension, time_delay)
    n_traj = n_timestamps - (dim - 1) * delay
    result = _output(out, (*array.shape[:-1], n_traj, n_traj), np.float32)
    flat = array.reshape(-1, n_timestamps)
    flat_out = result.reshape(-1, n_traj, n_traj)
    if threshold is None:
        n_bad = _distances_float(flat, n_traj, dim, delay, flat_out)
    else:
        n_bad = _binary_plots(flat, n_traj, dim, delay, threshold, percentage, flat_out)
    _check_finite(n_bad, array)
    return result


def resize_plot(plots: np.ndarray, size: int) -> np.ndarray:
    """Area-resize float plots (..., n, n) to float32 (..., size, size) (module docstring)."""
    _check_size(size)
    array = np.asarray(plots)
    if array.ndim < 2 or array.shape[-1] != array.shape[-2] or array.shape[-1] < 1:
        raise ValueError(f"plots must have shape (..., n, n) with n >= 1, got {array.shape}")
    if array.dtype.kind not in "iuf":
        raise TypeError(f"plots must hold real numbers, got dtype {array.dtype}")
    n = array.shape[-1]
    flat = np.ascontiguousarray(array.reshape(-1, n, n), dtype=np.float32)
    if size == n:
        return flat.reshape(array.shape)
    taps, weights = _area_taps(n, size)
    out = np.empty((flat.shape[0], size, size), dtype=np.float32)
    parallel, n_chunks = _chunks(flat.shape[0])
    _RESIZE_PLOTS[parallel](flat, taps, weights, *_columns_taps(taps, weights), n_chunks, out)
    return out.reshape(*array.shape[:-2], size, size)


def _quantise(values: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
    """floor(min(v * scale, 255) + 0.5) in float32, as the kernels and the torch twin do."""
    scaled = np.minimum(values * np.float32(scale), np.float32(255.0))
    np.add(scaled, np.float32(0.5), out=scaled)
    out[...] = scaled  # the cast truncates, and scaled + 0.5 >= 0
    return out


def recurrence_plot_uint8(
    series: np.ndarray,
    *,
    size: int | None = None,
    dimension: int | float = 1,
    time_delay: int | float = 1,
    max_distance: float | None = None,
    threshold: str | float | None = None,
    percentage: float = 10,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 recurrence plots (N, [C,] S, S) on the fixed scale of the module docstring.

    Distance d maps to round(255 min(d / max_distance, 1)), max_distance defaulting to
    2 sqrt(dimension) (series in [-1, 1]); with a ``threshold`` the binary plot maps to 0/255.
    ``size`` (default T') area-resizes the float plot before quantising. ``out``, a uint8 array
    of the result's shape, is filled and returned instead of a new array (ValueError for
    non-finite series leaves it partly written).
    """
    array = _check_series(series)
    _check_threshold(threshold, percentage)
    _check_size(size)
    n_timestamps = array.shape[-1]
    dim, delay = _resolve_embedding(n_timestamps, dimension, time_delay)
    n_traj = n_timestamps - (dim - 1) * delay
    limit = _check_max_distance(max_distance, dim)
    size = n_traj if size is None else int(size)
    result = _output(out, (*array.shape[:-1], size, size), np.uint8)
    flat = array.reshape(-1, n_timestamps)
    flat_out = result.reshape(-1, size, size)
    n_series = flat.shape[0]
    parallel, n_chunks = _chunks(n_series)
    scale = np.float32(255.0 / limit)

    if threshold is not None:
        binary = np.empty((n_series, n_traj, n_traj), dtype=np.float32)
        n_bad = _binary_plots(flat, n_traj, dim, delay, threshold, percentage, binary)
        _check_finite(n_bad, array)
        _quantise(resize_plot(binary, size), 255.0, flat_out)
    elif size == n_traj:
        rows_out = flat_out.reshape(n_series, n_traj * n_traj)
        n_bad = _UINT8_PLOTS[parallel](
            _kernel_series(flat, np.float32), n_traj, dim, delay, scale, n_chunks, rows_out
        )
    else:
        taps, weights = _area_taps(n_traj, size)
        taps_t, weights_t = _columns_taps(taps, weights)
        n_bad = _UINT8_RESIZED[parallel](
            _kernel_series(flat, np.float32),
            n_traj,
            dim,
            delay,
            scale,
            taps,
            weights,
            taps_t,
            weights_t,
            n_chunks,
            flat_out,
        )
    _check_finite(n_bad, array)
    return result


# --------------------------------------------------------------------------------------------
# torch twin
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _torch_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_area_taps` as tensors on ``device``, made once per (sizes, device)."""
    taps, weights = _area_taps(n_in, n_out)
    return torch.from_numpy(taps).to(device), torch.from_numpy(weights).to(device)


def _distances_torch(x: torch.Tensor, rows: torch.Tensor, dim: int, delay: int) -> torch.Tensor:
    """float32 distances (..., T', R) between every trajectory and the trajectories ``rows``.

    The same operations in the same order as the kernels: |x_k - x_a| for dimension 1, else
    sqrt(diff_0^2 + diff_1^2 + ...) with diff_d = x_{k + d tau} - x_{a + d tau}.
    """
    n_traj = x.shape[-1] - (dim - 1) * delay
    if dim == 1:
        return (x[..., :n_traj, None] - x[..., None, rows]).abs_()
    total = None
    for d in range(dim):
        part = x[..., d * delay : d * delay + n_traj]
        square = (part[..., :, None] - x[..., None, rows + d * delay]).square_()
        total = square if total is None else total.add_(square)
    # torch's float32 sqrt on CPU (Sleef) is not always correctly rounded; a float64 sqrt
    # rounded to float32 is, and equals the kernels' float32 sqrt.
    return total.double().sqrt_().float()


def recurrence_plot_torch(
    series: torch.Tensor,
    *,
    dimension: int | float = 1,
    time_delay: int | float = 1,
    max_distance: float | None = None,
    size: int | None = None,
    out_dtype: torch.dtype = torch.uint8,
) -> torch.Tensor:
    """Recurrence plots (B, [C,] S, S) of a (B, [C,] T) tensor on its own device.

    With ``out_dtype=torch.uint8`` the values equal :func:`recurrence_plot_uint8`'s (same float32
    operations in the same order); with a float dtype the (resized) float32 distance plot is
    returned in that dtype. Series must be finite: nothing data-dependent is checked here, so
    that the call never synchronises a GPU stream.
    """
    if not isinstance(series, torch.Tensor):
        raise TypeError(f"series must be a torch.Tensor, got {type(series).__name__}")
    if series.ndim not in (2, 3):
        raise ValueError(
            f"series must have shape (B, T) or (B, C, T), got {series.ndim} dims {tuple(series.shape)}"
        )
    if series.is_complex() or series.dtype == torch.bool:
        raise TypeError(f"series must hold real numbers, got dtype {series.dtype}")
    _check_size(size)
    n_timestamps = series.shape[-1]
    if n_timestamps < 1:
        raise ValueError(f"series must have at least one time step, got {tuple(series.shape)}")
    dim, delay = _resolve_embedding(n_timestamps, dimension, time_delay)
    n_traj = n_timestamps - (dim - 1) * delay
    limit = _check_max_distance(max_distance, dim)

    with torch.no_grad():
        x = series.to(torch.float32)
        if size is None or size == n_traj:
            plots = _distances_torch(x, torch.arange(n_traj, device=x.device), dim, delay)
        else:
            # The kernels' fused resize: the columns pass reads the plot's entries for the K
            # input columns of each output column straight from the series, then the rows pass.
            taps, weights = _torch_taps(n_traj, size, x.device)
            cols = None
            for t in range(taps.shape[1]):
                term = _distances_torch(x, taps[:, t], dim, delay).mul_(weights[:, t])
                cols = term if cols is None else cols.add_(term)
            plots = None
            for t in range(taps.shape[1]):
                term = cols.index_select(-2, taps[:, t]).mul_(weights[:, t, None])
                plots = term if plots is None else plots.add_(term)
        if out_dtype != torch.uint8:
            return plots.to(out_dtype)
        # A Python scalar enters a float32 kernel as float32 (torch's opmath), like the kernels'
        # np.float32 scale, without a host-to-device copy. Truncating v + 0.5 >= 0 to an
        # integer is floor(v + 0.5), as in the kernels.
        scale = float(np.float32(255.0 / limit))
        return plots.mul_(scale).clamp_(max=255.0).add_(0.5).to(torch.uint8)
