"""Vegetation indices (NDVI, EVI, SAVI) from Sentinel-2 band stacks, cleaned and on a regular grid.

The chain `index_series` runs, one step per function so each can be tested alone:

1. `index_stack`: digital numbers -> reflectance -> raw NDVI/EVI/SAVI, (3, T, ...) float32.
2. `observation_validity`: which (index, date, pixel) values to trust (no-data DN, saturated DN,
   NaN, near-zero denominators, and the caller's per-date cloud/validity mask).
3. `clean_indices`: clip trusted values to [-1, 1], fill the others by linear interpolation in
   time, report pixels with no trusted date at all.
4. `regular_grid` + `resample_to_grid`: irregular acquisition dates (PASTIS has 38 to 61 per
   patch) -> one regular grid, so every pixel's series has the same length.

Formulas (reflectance in [0, 1]): NDVI = (N - R) / (N + R); EVI = 2.5 (N - R) / (N + 6R - 7.5B + 1);
SAVI = (1 + L)(N - R) / (N + R + L). Blue is B02, red B04, NIR B08, found by band name.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

S2_BAND_NAMES = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)
INDEX_NAMES = ("ndvi", "evi", "savi")
BLUE, RED, NIR = "B02", "B04", "B08"

# Sentinel-2 products flag special pixels with these digital numbers (NODATA, SATURATED).
S2_NODATA_DN = 0
S2_SATURATED_DN = 65535
# L2A products from processing baseline 04.00 (deployed 2022-01-25) add 1000 to every DN so that
# dark surfaces may go below zero reflectance: reflectance = (DN - 1000) / 10000.
L2A_OFFSET_START = dt.date(2022, 1, 25)
L2A_DN_OFFSET = 1000.0

# |denominator| below this (in reflectance units, about 10 DN) makes an index value meaningless.
MIN_DENOMINATOR = 1e-3
# Cleaned values live in [-1, 1]: NDVI's own range; EVI and SAVI are clipped to the same range so
# one fixed recurrence-plot scale fits all three indices and all datasets.
INDEX_LIMITS = (-1.0, 1.0)

_BAND_NAME = re.compile(r"^B0*(\d{1,2})(A?)$")


def ndvi(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """NDVI = (N - R) / (N + R), raw: a zero denominator gives nan/inf without a warning."""
    red, nir = np.asarray(red), np.asarray(nir)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (nir - red) / (nir + red)


def evi(blue: np.ndarray, red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """EVI = 2.5 (N - R) / (N + 6R - 7.5B + 1), raw: a zero denominator gives nan/inf silently."""
    blue, red, nir = np.asarray(blue), np.asarray(red), np.asarray(nir)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2.5 * (nir - red) / (nir + 6.0 * red - 7.5 * blue + 1.0)


def savi(red: np.ndarray, nir: np.ndarray, L: float = 0.5) -> np.ndarray:
    """SAVI = (1 + L)(N - R) / (N + R + L), raw: a zero denominator gives nan/inf silently."""
    red, nir = np.asarray(red), np.asarray(nir)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 + L) * (nir - red) / (nir + red + L)


def index_denominators(
    blue: np.ndarray, red: np.ndarray, nir: np.ndarray, L: float = 0.5
) -> np.ndarray:
    """The three denominators (NDVI, EVI, SAVI) stacked on a new axis 0."""
    blue, red, nir = np.asarray(blue), np.asarray(red), np.asarray(nir)
    return np.stack([nir + red, nir + 6.0 * red - 7.5 * blue + 1.0, nir + red + L])


def canonical_band_name(name: str) -> str:
    """'B2', 'b02', ' B02 ' -> 'B02'; 'B8a' -> 'B8A'; names that are no S2 band come back upper-cased."""
    upper = str(name).strip().upper()
    match = _BAND_NAME.match(upper)
    if match is None:
        return upper
    number, suffix = int(match.group(1)), match.group(2)
    return f"B{number}A" if suffix else f"B{number:02d}"


def band_positions(band_names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Positions of the `wanted` bands in `band_names`, matched by canonical name.

    Raises ValueError naming a missing band, or a band named twice (e.g. both "B2" and "B02").
    """
    canonical = [canonical_band_name(name) for name in band_names]
    positions = []
    for name in wanted:
        key = canonical_band_name(name)
        found = [i for i, c in enumerate(canonical) if c == key]
        if not found:
            raise ValueError(f"band {key} missing from band_names {list(band_names)}")
        if len(found) > 1:
            raise ValueError(f"band {key} named more than once in band_names {list(band_names)}")
        positions.append(found[0])
    return positions


def l2a_dn_offset(date: dt.date) -> float:
    """DN offset of a Sentinel-2 L2A acquisition: 1000 from 2022-01-25 (baseline 04.00), else 0.

    The acquisition date stands in for the processing baseline: right for products processed
    when acquired. Reprocessed archives (e.g. a collection reprocessed with baseline 05.00) carry
    the offset for older dates too; their metadata (BOA_ADD_OFFSET) is the authority then.
    """
    if isinstance(date, dt.datetime):
        date = date.date()
    return L2A_DN_OFFSET if date >= L2A_OFFSET_START else 0.0


def _blue_red_nir(bands: np.ndarray, band_names: Sequence[str], band_axis: int) -> np.ndarray:
    """B02, B04 and B08 of `bands` as one (3, T, ...) array in the file's dtype."""
    bands = np.asarray(bands)
    if bands.ndim < 2:
        raise ValueError(f"bands must have a band axis and a time axis, got shape {bands.shape}")
    axis = band_axis % bands.ndim
    if bands.shape[axis] != len(band_names):
        raise ValueError(
            f"bands has {bands.shape[axis]} channels on axis {band_axis} but "
            f"{len(band_names)} band_names {list(band_names)}"
        )
    positions = band_positions(band_names, (BLUE, RED, NIR))
    return np.take(np.moveaxis(bands, axis, 0), positions, axis=0)


def reflectance(
    dn: np.ndarray,
    *,
    dn_scale: float = 10000.0,
    dn_offset: float | Sequence[float] | np.ndarray = 0.0,
) -> np.ndarray:
    """(DN - dn_offset) / dn_scale as float64; `dn` is (T, ...), dn_offset a scalar or (T,)."""
    dn = np.asarray(dn)
    offset = np.asarray(dn_offset, dtype=np.float64)
    if offset.ndim != 0:
        if dn.ndim == 0 or offset.shape != (dn.shape[0],):
            raise ValueError(
                f"dn_offset has shape {offset.shape}; expected a scalar or one value per date "
                f"({dn.shape[0] if dn.ndim else 0},)"
            )
        offset = offset.reshape((-1,) + (1,) * (dn.ndim - 1))
    return (dn.astype(np.float64) - offset) / float(dn_scale)


def _compute_indices(blue: np.ndarray, red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    return np.stack([ndvi(red, nir), evi(blue, red, nir), savi(red, nir)]).astype(np.float32)


def index_stack(
    bands: np.ndarray,
    band_names: Sequence[str],
    *,
    band_axis: int = 1,
    dn_scale: float = 10000.0,
    dn_offset: float | Sequence[float] | np.ndarray = 0.0,
) -> np.ndarray:
    """Raw NDVI/EVI/SAVI, (3, T, ...) float32, from a Sentinel-2 stack such as (T, C, H, W).

    Blue B02, red B04 and NIR B08 are picked by name ("B2"/"B02" alike). Reflectance is
    (DN - dn_offset) / dn_scale; dn_offset is a scalar or one value per date (see
    `l2a_dn_offset`). The result keeps the axes of `bands` without the band axis, in order, the
    first of which is time. Values are raw formula values (nan/inf where a denominator is 0):
    clean them with `clean_indices`.
    """
    dn = _blue_red_nir(bands, band_names, band_axis)
    return _compute_indices(*(reflectance(b, dn_scale=dn_scale, dn_offset=dn_offset) for b in dn))


def _validity(
    dn: np.ndarray,
    refl: np.ndarray,
    valid: np.ndarray | None,
    nodata_dn: float | None,
    saturated_dn: float | None,
    min_denominator: float,
) -> np.ndarray:
    """(3, T, ...) trust mask from the (3, T, ...) blue/red/NIR DN and reflectance."""
    if dn.dtype.kind in "fc":
        trusted = np.all(np.isfinite(dn), axis=0)
    else:
        trusted = np.ones(dn.shape[1:], dtype=bool)
    if nodata_dn is not None:
        trusted &= ~np.any(dn == nodata_dn, axis=0)
    if saturated_dn is not None:
        trusted &= ~np.any(dn >= saturated_dn, axis=0)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != trusted.shape:
            raise ValueError(
                f"valid mask has shape {valid.shape}, expected {trusted.shape} (T, ...)"
            )
        trusted &= valid
    with np.errstate(invalid="ignore"):
        denominator_ok = np.abs(index_denominators(*refl)) >= min_denominator
    return trusted[None] & denominator_ok


def observation_validity(
    bands: np.ndarray,
    band_names: Sequence[str],
    *,
    valid: np.ndarray | None = None,
    band_axis: int = 1,
    dn_scale: float = 10000.0,
    dn_offset: float | Sequence[float] | np.ndarray = 0.0,
    nodata_dn: float | None = S2_NODATA_DN,
    saturated_dn: float | None = S2_SATURATED_DN,
    min_denominator: float = MIN_DENOMINATOR,
) -> np.ndarray:
    """Which index values to trust: (3, T, ...) bool, True where NDVI/EVI/SAVI is usable.

    A date/pixel is untrusted for all three indices when any of B02/B04/B08 is NaN/inf, equals
    `nodata_dn`, or is at or above `saturated_dn` (both compared on the raw DN; None disables
    the check), or where the caller's `valid` mask, (T, ...) bool (clouds, shadows), is False.
    It is untrusted for one index when that index's |denominator| < `min_denominator`
    (reflectance units).
    """
    dn = _blue_red_nir(bands, band_names, band_axis)
    refl = np.stack([reflectance(b, dn_scale=dn_scale, dn_offset=dn_offset) for b in dn])
    return _validity(dn, refl, valid, nodata_dn, saturated_dn, min_denominator)


class CleanedIndices(NamedTuple):
    """Result of `clean_indices`."""

    values: np.ndarray  # (3, T, ...) float32 in [-1, 1]; NaN for every all-invalid pixel
    all_invalid: np.ndarray  # (...) bool: some index of this pixel has no trusted date at all
    n_valid: np.ndarray  # (...) int: trusted dates of the pixel, the least over the 3 indices


def _day_numbers(dates: Sequence[dt.date] | np.ndarray, what: str = "dates") -> np.ndarray:
    """Days since 1970-01-01 (int64) of datetime.date / datetime64 / ISO strings."""
    array = np.asarray(dates)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind in "iufb":
        # A bare number is ambiguous (PASTIS stores YYYYMMDD ints): make the reader convert it.
        raise ValueError(f"{what} must be datetime.date objects, got numbers like {array[:1]}")
    return array.astype("datetime64[D]").astype(np.int64)


def _check_increasing(days: np.ndarray, what: str) -> None:
    steps = np.diff(days)
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        raise ValueError(
            f"{what} must be strictly increasing; entry {i + 1} "
            f"({np.datetime64(int(days[i + 1]), 'D')}) follows {np.datetime64(int(days[i]), 'D')}"
        )


def clean_indices(
    indices: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    dates: Sequence[dt.date] | None = None,
    limits: tuple[float, float] = INDEX_LIMITS,
) -> CleanedIndices:
    """Clip trusted values to `limits` and fill untrusted ones by linear interpolation in time.

    `indices` is (3, T, ...) (any leading size works, time is axis 1). `valid` is (3, T, ...) or
    (T, ...) bool (e.g. from `observation_validity`); NaN/inf values are untrusted regardless.
    A gap between two trusted dates is filled on the straight line between them, positioned by
    `dates` (equally spaced when None); a gap at either end takes the nearest trusted value.
    A pixel where any index has no trusted date gets NaN in all its values and
    `all_invalid=True`: callers skip it (and count it) rather than invent a series.
    """
    indices = np.asarray(indices)
    if indices.ndim < 2 or indices.shape[1] == 0:
        raise ValueError(f"indices must be (K, T, ...) with T >= 1, got shape {indices.shape}")
    n_index, n_time = indices.shape[:2]
    pixel_shape = indices.shape[2:]
    flat_shape = (n_index, n_time, int(np.prod(pixel_shape, dtype=np.int64)))
    values = indices.reshape(flat_shape).astype(np.float32)
    trusted = np.isfinite(values)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape not in (indices.shape, indices.shape[1:]):
            raise ValueError(
                f"valid mask has shape {valid.shape}, expected {indices.shape} or {indices.shape[1:]}"
            )
        trusted &= np.broadcast_to(valid, indices.shape).reshape(flat_shape)
    if dates is None:
        days = np.arange(n_time, dtype=np.float32)
    else:
        day_numbers = _day_numbers(dates)
        if day_numbers.shape != (n_time,):
            raise ValueError(f"got {day_numbers.shape[0]} dates for {n_time} time steps")
        _check_increasing(day_numbers, "dates")
        days = (day_numbers - day_numbers[0]).astype(np.float32)

    # Untrusted values are set to 0 only so no NaN enters the arithmetic; _fill_gaps never reads them.
    values = np.where(trusted, np.clip(values, *limits), 0.0)
    filled = _fill_gaps(values, trusted, days)

    n_valid = trusted.sum(axis=1).min(axis=0)
    all_invalid = n_valid == 0
    filled[:, :, all_invalid] = np.nan
    return CleanedIndices(
        values=filled.reshape(indices.shape).astype(np.float32, copy=False),
        all_invalid=all_invalid.reshape(pixel_shape),
        n_valid=n_valid.reshape(pixel_shape),
    )


def _fill_gaps(values: np.ndarray, trusted: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Linear interpolation over axis 1 between trusted values, nearest at the ends.

    One pass forward carries each pixel's last trusted value and day, one pass backward its next;
    the fill blends the two. A Python loop over the (at most ~100) dates with whole-array steps
    is several times faster than numpy's accumulate along a middle axis.
    """
    n_time = values.shape[1]
    prev_value, prev_day = np.empty_like(values), np.empty_like(values)
    next_value, next_day = np.empty_like(values), np.empty_like(values)
    for order, value_out, day_out, none in (
        (range(n_time), prev_value, prev_day, -np.inf),
        (range(n_time - 1, -1, -1), next_value, next_day, np.inf),
    ):
        carry_value = np.zeros_like(values[:, 0])
        carry_day = np.full_like(values[:, 0], none)
        for t in order:
            # np.where allocates, yet runs about 3x faster than np.copyto(..., where=...).
            carry_value = np.where(trusted[:, t], values[:, t], carry_value)
            carry_day = np.where(trusted[:, t], days[t], carry_day)
            value_out[:, t], day_out[:, t] = carry_value, carry_day

    # weight = (day - prev_day) / (next_day - prev_day). It is not finite exactly where no blend
    # is wanted: on a trusted date (0/0), before the first trusted date (inf/inf), after the
    # last one (x/inf = 0 already) and in all-invalid pixels; those get weight 0.
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = (days.astype(values.dtype).reshape(1, n_time, 1) - prev_day) / (
            next_day - prev_day
        )
    weight[~np.isfinite(weight)] = 0.0
    np.copyto(prev_value, next_value, where=np.isinf(prev_day))  # before the first: nearest is next
    return prev_value + weight * (next_value - prev_value)


def regular_grid(
    dates: Sequence[dt.date],
    step_days: int,
    start: dt.date | None = None,
    end: dt.date | None = None,
    *,
    length: int | None = None,
) -> list[dt.date]:
    """Dates start, start + step, ... up to `end` inclusive, or exactly `length` of them.

    `start` and `end` default to the first and last of `dates`; give `length` instead of `end`
    to fix the series length across patches whose date ranges differ.
    """
    if step_days <= 0:
        raise ValueError(f"step_days must be positive, got {step_days}")
    if end is not None and length is not None:
        raise ValueError("give end or length, not both")
    days = _day_numbers(dates)
    if days.size == 0 and (start is None or (end is None and length is None)):
        raise ValueError("dates is empty: give start and end (or length)")
    first = _day_numbers([start])[0] if start is not None else days.min()
    if length is None:
        last = _day_numbers([end])[0] if end is not None else days.max()
        if last < first:
            first_day, last_day = _dates_of_days([first, last])
            if end is None:
                raise ValueError(f"grid start {first_day} is after the last date {last_day}")
            raise ValueError(f"grid end {last_day} is before its start {first_day}")
        length = int((last - first) // step_days) + 1
    if length <= 0:
        raise ValueError(f"grid length must be positive, got {length}")
    grid = first + step_days * np.arange(length, dtype=np.int64)
    return _dates_of_days(grid)


def _dates_of_days(days: Sequence[int] | np.ndarray) -> list[dt.date]:
    """The dates of day numbers since 1970-01-01 (the inverse of `_day_numbers`)."""
    return [dt.date(1970, 1, 1) + dt.timedelta(days=int(d)) for d in days]


def resample_to_grid(
    values: np.ndarray,
    dates: Sequence[dt.date],
    grid_dates: Sequence[dt.date],
    axis: int = 1,
) -> np.ndarray:
    """Linear interpolation of `values` from irregular `dates` to `grid_dates` along `axis`.

    Grid points before the first or after the last date take that end's value. Every pixel shares
    the dates, so this is one gather and one blend for the whole array. Floating input keeps its
    dtype; other input comes back float64.
    """
    values = np.asarray(values)
    axis = axis % values.ndim
    days = _day_numbers(dates).astype(np.float64)
    grid = _day_numbers(grid_dates, "grid_dates").astype(np.float64)
    if days.shape[0] != values.shape[axis]:
        raise ValueError(
            f"got {days.shape[0]} dates for {values.shape[axis]} values on axis {axis}"
        )
    if days.size == 0:
        raise ValueError("dates is empty")
    _check_increasing(days, "dates")
    if days.size == 1:
        lower = upper = np.zeros(grid.shape, dtype=np.int64)
        weight = np.zeros(grid.shape)
    else:
        lower = np.clip(np.searchsorted(days, grid, side="right") - 1, 0, days.size - 2)
        upper = lower + 1
        weight = np.clip((grid - days[lower]) / (days[upper] - days[lower]), 0.0, 1.0)
    shape = [1] * values.ndim
    shape[axis] = grid.size
    weight = weight.reshape(shape)
    dtype = values.dtype if values.dtype.kind == "f" else np.float64
    low, high = np.take(values, lower, axis=axis), np.take(values, upper, axis=axis)
    return (low + weight * (high.astype(np.float64) - low)).astype(dtype)


class IndexSeries(NamedTuple):
    """Result of `index_series`."""

    series: np.ndarray  # (3, T_grid, ...) float32 NDVI/EVI/SAVI in [-1, 1]; NaN where all_invalid
    grid_dates: list[dt.date]  # the T_grid dates of the regular grid
    all_invalid: np.ndarray  # (...) bool: pixel has an index with no trusted date; skip it
    n_valid: np.ndarray  # (...) int: trusted dates per pixel (least over the 3 indices)


def index_series(
    bands: np.ndarray,
    band_names: Sequence[str],
    dates: Sequence[dt.date],
    *,
    valid: np.ndarray | None = None,
    step_days: int = 10,
    start: dt.date | None = None,
    end: dt.date | None = None,
    length: int | None = None,
    band_axis: int = 1,
    dn_scale: float = 10000.0,
    dn_offset: float | Sequence[float] | np.ndarray = 0.0,
    nodata_dn: float | None = S2_NODATA_DN,
    saturated_dn: float | None = S2_SATURATED_DN,
    min_denominator: float = MIN_DENOMINATOR,
) -> IndexSeries:
    """The whole chain: DN -> reflectance -> indices -> cleaning and gap filling -> regular grid.

    `bands` is (T, C, ...) (band axis `band_axis`), `dates` its T acquisition dates (strictly
    increasing), `valid` an optional (T, ...) cloud/validity mask. See `index_stack`,
    `observation_validity`, `clean_indices`, `regular_grid` and `resample_to_grid`.
    """
    dn = _blue_red_nir(bands, band_names, band_axis)
    if len(dates) != dn.shape[1]:
        raise ValueError(f"got {len(dates)} dates for {dn.shape[1]} time steps in bands")
    refl = np.stack([reflectance(b, dn_scale=dn_scale, dn_offset=dn_offset) for b in dn])
    trusted = _validity(dn, refl, valid, nodata_dn, saturated_dn, min_denominator)
    cleaned = clean_indices(_compute_indices(*refl), trusted, dates=dates)
    grid_dates = regular_grid(dates, step_days, start, end, length=length)
    series = resample_to_grid(cleaned.values, dates, grid_dates, axis=1)
    return IndexSeries(series, grid_dates, cleaned.all_invalid, cleaned.n_valid)
