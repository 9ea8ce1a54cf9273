"""Numba kernels of the recurrence plots: distances, thresholded, uint8 and resized plots.

Each kernel body is compiled twice (:func:`_compile_pair`): serially and with
``parallel=True``, where prange splits the chunks of a batch over numba's threads (in the
serial build prange is range). The float and uint8 kernels repeat their loops on purpose:
inlined, each inner loop is a whole number of SIMD vectors (see the package docstring).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

# Rows are computed in blocks of this many values; T' up to 64 is one block.
_ROW_BLOCK = 64
# Bins of the 'point' percentile's selection: a few values per bin for T' ~ 61.
_PERCENTILE_BINS = 256
# Binary-plot modes of the threshold kernel.
_POINT, _DISTANCE, _FIXED = 0, 1, 2


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
