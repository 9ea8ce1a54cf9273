"""Records every dataset reader yields, and the error readers raise on bad files.

Readers turn one on-disk dataset format into a stream of these records; the
sharder (`pimc_dist.shard`) turns records into WebDataset samples. Keeping the
records format-free means a new dataset needs a reader and nothing else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
