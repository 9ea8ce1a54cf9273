"""Recurrence plots from numpy arrays: parameters as pyts reads them, area-resize weights,
and the public numpy API (:func:`recurrence_plot`, :func:`recurrence_plot_uint8`,
:func:`resize_plot`) over the kernels of :mod:`pimc_dist.recurrence.kernels`.
"""

from __future__ import annotations

import math
import numbers

import numba
import numpy as np

from pimc_dist.recurrence.kernels import (
    _BINARY_PLOTS,
    _DISTANCE,
    _DISTANCE_PLOTS,
    _FIXED,
    _POINT,
    _RESIZE_PLOTS,
    _ROW_BLOCK,
    _UINT8_PLOTS,
    _UINT8_RESIZED,
)

THRESHOLDS = ("point", "distance")
# Below this many series the parallel kernel's thread start-up costs more than it saves.
_MIN_SERIES_PER_THREAD = 32

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
