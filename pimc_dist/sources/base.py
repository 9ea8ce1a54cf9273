"""Records every dataset reader yields, and the error readers raise on bad files.

Readers turn one on-disk dataset format into a stream of these records; the
sharder (`pimc_dist.shard`) turns records into WebDataset samples. Keeping the
records format-free means a new dataset needs a reader and nothing else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


class SourceError(ValueError):
    """A dataset file is missing, unreadable or of the wrong shape/dtype; the message names it."""

    def __init__(self, path: Any, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.problem))


def expected_image_shape(
    image_size: int | None, paths: Iterable[Any], read_shape: Callable[[Any], tuple[int, int]]
) -> tuple[int, int] | None:
    """The (H, W) every image of a dataset must have: `image_size` square, else that of the
    first of `paths` whose header reads (None if none does: every read then reports itself)."""
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, not {image_size}")
        return image_size, image_size
    for path in paths:
        try:
            return read_shape(path)
        except Exception:  # unreadable: the read of that image reports it
            continue
    return None


@dataclass
class TimeSeriesPatch:
    """One patch of a Sentinel-2 image time series (PIMC input).

    `bands` is (T, C, H, W) in the file's digital numbers (or reflectance when
    `dn_scale` is 1); `band_names` names its C axis (e.g. "B02", "B04", "B08").
    """

    patch_id: str
    bands: np.ndarray
    band_names: list[str]
    dates: list[dt.date]
    dataset: str
    fold: int | None = None
    split: str | None = None
    labels: np.ndarray | None = None  # (H, W) int class map
    parcels: np.ndarray | None = None  # (H, W) int parcel ids
    valid: np.ndarray | None = None  # (T, H, W) bool, False for cloud / no data
    dn_scale: float = 10000.0
    dn_offset: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    # Co-registered SAR series by orbit (PASTIS-R: "S1A", "S1D"), each (T_o, C, H, W) with
    # its own dates; None when not read. `s1_bands` names their C axis.
    s1: dict[str, np.ndarray] | None = None
    s1_bands: list[str] = field(default_factory=list)
    # False for a point of a table (sources/point_series.py): no image around it, so its
    # samples get no crop view; the patch is then 1 x 1 and `patch_id` is the sample id.
    has_image: bool = True


@dataclass
class MultimodalPatch:
    """One optical + SAR patch (MoSAiC input) with multi-hot labels."""

    patch_id: str
    # (C, H, W) digital numbers as stored (uint16), or float32 where resampling interpolated
    # them; reflectance = s2 / s2_dn_scale. Kept as read so that shards lose nothing.
    s2: np.ndarray
    s2_bands: list[str]
    s1: np.ndarray  # (2, H, W) float32 (VV, VH)
    s1_bands: list[str]
    labels: np.ndarray  # (K,) uint8 multi-hot over the dataset's class list
    dataset: str
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    s2_dn_scale: float = 10000.0


@dataclass
class ScenePatch:
    """One single-label image (scene classification, e.g. EuroSAT)."""

    patch_id: str
    image: np.ndarray  # (C, H, W)
    band_names: list[str]
    label: int
    dataset: str
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class UnnamedLabelError(SourceError):
    """A label value that `data.class_names` does not name: stops sharding (never a skip)."""

    fatal = True  # the sharder re-raises it instead of skipping the patch


def check_label_values(
    values: np.ndarray, class_names: Sequence[str], ignore: Iterable[int], path: Any
) -> None:
    """UnnamedLabelError naming `path` and the first label value in `values` that is neither
    0..len(class_names)-1 nor in `ignore` (no check when `class_names` is empty)."""
    if not class_names:
        return
    values = np.unique(np.asarray(values))
    allowed = np.concatenate(
        [np.arange(len(class_names)), np.asarray(list(ignore), dtype=np.int64)]
    )
    bad = values[~np.isin(values, allowed)]
    if bad.size:
        raise UnnamedLabelError(
            path,
            f"label value {int(bad[0])} has no name in data.class_names ({len(class_names)} names "
            f"for values 0..{len(class_names) - 1}); name it, or list it in data.label_ignore",
        )


# ---------------------------------------------------------------------------
# Same-day acquisitions
# ---------------------------------------------------------------------------


class SameDayMerge(NamedTuple):
    """Result of `merge_same_day`."""

    bands: np.ndarray  # (T', C, ...) one acquisition per day, dates increasing
    dates: list[dt.date]  # the T' distinct days
    valid: np.ndarray | None  # (T', ...) bool: some observation of that day was valid
    merged: int  # acquisitions merged into another of their day (T - T')


def merge_same_day(
    bands: np.ndarray, dates: Sequence[dt.date], valid: np.ndarray | None = None
) -> SameDayMerge:
    """One acquisition per day: dates sorted, same-day acquisitions merged per pixel.

    `bands` is (T, C, ...) with one date per entry of axis 0 (two granules or orbits of one
    day are normal in real series); `valid` an optional (T, ...) mask. Each band of a merged
    day is the mean of that day's valid, finite observations (invalid ones ignored); integer
    bands are rounded back to their dtype. Where no observation of the day is valid the
    first observation is kept (as it is: invalid) and `valid` is False. Without duplicates
    the inputs come back unchanged (sorted by date if they were not).
    """
    bands = np.asarray(bands)
    if bands.ndim < 2 or bands.shape[0] != len(dates):
        raise ValueError(f"got {len(dates)} dates for bands of shape {bands.shape} (T, C, ...)")
    days = np.array([d.toordinal() for d in dates], dtype=np.int64)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (bands.shape[0], *bands.shape[2:]):
            raise ValueError(f"valid has shape {valid.shape}, bands {bands.shape}")
    order = np.argsort(days, kind="stable")
    unique, starts = np.unique(days[order], return_index=True)
    if unique.size == days.size:
        if np.all(order == np.arange(order.size)):
            return SameDayMerge(bands, list(dates), valid, 0)
        return SameDayMerge(
            bands[order], [dates[i] for i in order], None if valid is None else valid[order], 0
        )
    groups = np.split(order, starts[1:])
    out = np.empty((unique.size, *bands.shape[1:]), dtype=bands.dtype)
    out_valid = None if valid is None else np.empty((unique.size, *valid.shape[1:]), bool)
    for k, idx in enumerate(groups):
        if out_valid is not None:
            out_valid[k] = valid[idx].any(axis=0)
        if idx.size == 1:
            out[k] = bands[idx[0]]
            continue
        values = bands[idx].astype(np.float64)  # (n, C, ...)
        ok = np.isfinite(values)
        if valid is not None:
            ok &= valid[idx][:, None]
        count = ok.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok, values, 0.0).sum(axis=0) / count
        if out.dtype.kind in "iu":
            info = np.iinfo(out.dtype)
            mean = np.clip(np.rint(np.where(count > 0, mean, 0)), info.min, info.max)
        out[k] = np.where(count > 0, mean, bands[idx[0]])
    return SameDayMerge(
        out, [dt.date.fromordinal(int(d)) for d in unique], out_valid, int(days.size - unique.size)
    )


def same_day_count(dates: Sequence[dt.date]) -> int:
    """How many of `dates` fall on a day already listed (what `merge_same_day` merges)."""
    return len(dates) - len(set(dates))


# ---------------------------------------------------------------------------
# Splits from a seeded hash
# ---------------------------------------------------------------------------

DEFAULT_HASH_SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15}


def split_fractions(fractions: Mapping[str, float] | None) -> dict[str, float]:
    """`fractions` checked (non-negative, summing to 1) in name order; the default if empty."""
    fractions = fractions or DEFAULT_HASH_SPLIT
    out = {str(k): float(v) for k, v in sorted(dict(fractions).items())}
    if any(not v >= 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(
            f"data.hash_split: fractions must be >= 0 and sum to 1, got {dict(fractions)}"
        )
    return out


def hash_split_settings(
    fractions: Mapping[str, float] | None, seed: int, split: str | None
) -> tuple[dict[str, float], int, str | None]:
    """A reader's `data.hash_split` fractions (checked, see `split_fractions`), its
    `data.split_seed`, and the one split it keeps (None: all), which must be one of them."""
    parts = split_fractions(fractions)
    if split is not None and split not in parts:
        raise ValueError(
            f"split {split!r} is not one of the data.hash_split splits {sorted(parts)}"
        )
    return parts, int(seed), split


def hash_split(group_id: Any, seed: int, fractions: Mapping[str, float] | None = None) -> str:
    """The split of a group (patch, parcel, polygon, sample): a seeded hash, so the same group
    always lands in the same split whatever else is in the dataset, and a share `fractions[s]`
    of many groups lands in split `s`. Splits are taken in name order; default
    train 0.7 / val 0.15 / test 0.15."""
    parts = split_fractions(fractions)
    digest = hashlib.blake2b(f"{int(seed)}\x00{group_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    total = 0.0
    name = ""
    for name, share in parts.items():
        total += share
        if u < total:
            return name
    return name  # u just below 1 with rounded fractions: the last split
