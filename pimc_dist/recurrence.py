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
loop a whole number of SIMD vectors for T' <= 64.
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
# Series per chunk for the float64 distances behind thresholded plots (bounds memory).
_THRESHOLD_CHUNK = 1024


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
    """The batch as an ndarray of shape (N, T) or (N, C, T) of finite real numbers."""
    array = np.asarray(series)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"series must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(
            f"series must have shape (N, T) or (N, C, T), got {array.ndim} dims {array.shape}"
        )
    if array.shape[-1] < 1:
        raise ValueError(f"series must have at least one time step, got shape {array.shape}")
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"series contains NaN or infinite values (first at index {tuple(int(i) for i in bad)}); "
            "fill gaps before computing recurrence plots"
        )
    return array


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


def _padded_series(flat: np.ndarray, dtype: type, n_traj: int, dim: int, delay: int) -> np.ndarray:
    """Series zero-padded on the right so that a full row block can be read past T'."""
    row_width = -(-n_traj // _ROW_BLOCK) * _ROW_BLOCK
    padded = np.zeros((flat.shape[0], row_width + (dim - 1) * delay), dtype=dtype)
    padded[:, : flat.shape[1]] = flat
    return padded


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


def _distance_rows_body(padded, n_traj, dim, delay, n_chunks, out):
    """Distances in the arithmetic of ``padded`` (float64 gives pyts' values) into flat ``out``.

    ``out`` is (N, T'*T'); row j is written ``row_width`` wide from j*T' where that stays inside
    the series' plot (the overhang lands in later rows, written afterwards), else exactly T'
    wide, so a series never writes outside its own plot.
    The sum over the embedding dimension runs in pyts' order: 0 + diff_0^2 + diff_1^2 + ...
    """
    n_series = padded.shape[0]
    row_width = padded.shape[1] - (dim - 1) * delay
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        acc = np.zeros_like(padded[0])  # scratch row in the series' dtype
        for m in range(start, stop):
            # Views indexed by range variables keep numba from emitting negative-index
            # wrap-around code, which turns contiguous SIMD loads into gathers.
            x = padded[m]
            series_out = out[m]
            for j in range(n_traj):
                length = row_width if j * n_traj + row_width <= n_traj * n_traj else n_traj
                row = series_out[j * n_traj :]
                if dim == 1:
                    xj = x[j]
                    for k in range(length):
                        row[k] = abs(xj - x[k])
                    continue
                xj = x[j]
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


def _uint8_rows_body(padded, n_traj, dim, delay, scale, n_chunks, out):
    """float32 distances quantised to uint8 (see the module docstring) into flat ``out``."""
    n_series = padded.shape[0]
    row_width = padded.shape[1] - (dim - 1) * delay
    cap = np.float32(255.0)
    half = np.float32(0.5)
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        acc = np.zeros(row_width, dtype=np.float32)
        for m in range(start, stop):
            x = padded[m]
            series_out = out[m]
            for j in range(n_traj):
                length = row_width if j * n_traj + row_width <= n_traj * n_traj else n_traj
                row = series_out[j * n_traj :]
                if dim == 1:
                    xj = x[j]
                    for k in range(length):
                        v = abs(xj - x[k]) * scale
                        row[k] = np.uint8(min(v, cap) + half)
                    continue
                xj = x[j]
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
    padded, n_traj, dim, delay, scale, taps, weights, taps_t, weights_t, n_chunks, out
):
    """float32 plots area-resized to S x S and quantised to uint8 into ``out`` (N, S, S).

    The plot is never formed: the columns pass reads its entries M[k, a] = dist(v_k, v_a)
    straight from the series, for the K input columns a = taps[i, t] of each output column i,
    gathered once per series -- so every inner loop runs over S contiguous values.
    """
    n_series = padded.shape[0]
    size, n_taps = taps.shape
    width = taps_t.shape[1]
    cap = np.float32(255.0)
    half = np.float32(0.5)
    for chunk in prange(n_chunks):
        start = chunk * n_series // n_chunks
        stop = (chunk + 1) * n_series // n_chunks
        gathered = np.zeros((n_taps, dim, width), dtype=np.float32)
        cols = np.zeros((n_traj, width), dtype=np.float32)
        dist = np.zeros(width, dtype=np.float32)
        result = np.zeros((size, width), dtype=np.float32)
        for m in range(start, stop):
            # Plain 2-d indexing by range variables here: views made inside these loops would
            # cost a reference-count update each.
            for t in range(n_taps):
                for d in range(dim):
                    offset = d * delay
                    for i in range(width):
                        gathered[t, d, i] = padded[m, taps_t[t, i] + offset]
            for k in range(n_traj):
                for t in range(n_taps):
                    xk = padded[m, k]
                    if dim == 1:
                        for i in range(width):
                            dist[i] = abs(xk - gathered[t, 0, i])
                    else:
                        for i in range(width):
                            diff = xk - gathered[t, 0, i]
                            dist[i] = diff * diff
                        for d in range(1, dim):
                            xk = padded[m, k + d * delay]
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


_rows_pass = numba.njit(cache=True, nogil=True)(_rows_pass)


def _compile_pair(body):
    # nogil: Python threads (e.g. a threaded loader) can run kernels side by side.
    serial = numba.njit(cache=True, nogil=True)(body)
    return serial, numba.njit(cache=True, nogil=True, parallel=True)(body)


_DISTANCE_ROWS = _compile_pair(_distance_rows_body)
_UINT8_ROWS = _compile_pair(_uint8_rows_body)
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


def _distances_float(
    flat: np.ndarray, n_traj: int, dim: int, delay: int, out: np.ndarray
) -> np.ndarray:
    """Distance plots from float64 arithmetic into ``out`` (M, T', T') of a float dtype."""
    padded = _padded_series(flat.astype(np.float64, copy=False), np.float64, n_traj, dim, delay)
    parallel, n_chunks = _chunks(flat.shape[0])
    rows_out = out.reshape(len(out), n_traj * n_traj)
    _DISTANCE_ROWS[parallel](padded, n_traj, dim, delay, n_chunks, rows_out)
    return out


def _binary_plots(
    flat: np.ndarray,
    n_traj: int,
    dim: int,
    delay: int,
    threshold: object,
    percentage: float,
    out: np.ndarray,
) -> np.ndarray:
    """Thresholded plots as 0/1 into float32 ``out``, with pyts' float64 distances and tests."""
    for start in range(0, flat.shape[0], _THRESHOLD_CHUNK):
        part = flat[start : start + _THRESHOLD_CHUNK]
        dist = np.empty((len(part), n_traj, n_traj), dtype=np.float64)
        _distances_float(part, n_traj, dim, delay, dist)
        # The same expressions as pyts' transform, so that ties fall the same way.
        if threshold == "point":
            limit = np.percentile(dist.reshape(len(part), -1), percentage, axis=1)[:, None, None]
        elif threshold == "distance":
            limit = percentage / 100 * np.max(dist, axis=(1, 2))[:, None, None]
        else:
            limit = threshold
        np.less(dist, limit, out=out[start : start + len(part)])
    return out


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
    array of the result's shape, is filled and returned instead of a new array.
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
        _distances_float(flat, n_traj, dim, delay, flat_out)
    else:
        _binary_plots(flat, n_traj, dim, delay, threshold, percentage, flat_out)
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
    of the result's shape, is filled and returned instead of a new array.
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
        _binary_plots(flat, n_traj, dim, delay, threshold, percentage, binary)
        _quantise(resize_plot(binary, size), 255.0, flat_out)
    elif size == n_traj:
        padded = _padded_series(flat, np.float32, n_traj, dim, delay)
        rows_out = flat_out.reshape(n_series, n_traj * n_traj)
        _UINT8_ROWS[parallel](padded, n_traj, dim, delay, scale, n_chunks, rows_out)
    else:
        padded = _padded_series(flat, np.float32, n_traj, dim, delay)
        taps, weights = _area_taps(n_traj, size)
        taps_t, weights_t = _columns_taps(taps, weights)
        _UINT8_RESIZED[parallel](
            padded, n_traj, dim, delay, scale, taps, weights, taps_t, weights_t, n_chunks, flat_out
        )
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
