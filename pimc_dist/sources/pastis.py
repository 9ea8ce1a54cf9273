"""PASTIS / PASTIS-R reader: Sentinel-2 (and Sentinel-1) patch time series with crop labels.

Dataset facts (VSainteuf/pastis-benchmark `code/dataloader.py`, torchgeo `datasets/pastis.py`):

- 2,433 patches of 128 x 128 px at 10 m over four S2 tiles in France, 2018-09 to 2019-11.
- `metadata.geojson`: a GeoJSON FeatureCollection, one feature per patch; properties
  `ID_PATCH`, `Fold` (1-5), `dates-S2` (dict index -> YYYYMMDD), `TILE`, `N_Parcel`,
  `Parcel_Cover`; PASTIS-R adds `dates-S1A` and `dates-S1D`.
- `DATA_S2/S2_<id>.npy`: T x 10 x 128 x 128 int16 digital numbers, T from 38 to 61, bands
  `S2_BANDS`. Level-2A from before processing baseline 04.00, so reflectance = DN / 10000.
- `DATA_S1A/S1A_<id>.npy`, `DATA_S1D/S1D_<id>.npy` (PASTIS-R): T x 3 x 128 x 128 float
  (`S1_BANDS`), about 70 dates per orbit.
- `ANNOTATIONS/TARGET_<id>.npy`: 3 x 128 x 128, channel 0 is the semantic class (`CLASSES`);
  `ANNOTATIONS/ParcelIDs_<id>.npy`: 128 x 128 parcel ids (0 outside parcels).
- `NORM_S2_patch.json`: `{"Fold_k": {"mean": [10], "std": [10]}}` per fold.
- PASTIS ships no cloud mask. The reader marks a pixel-date invalid only where all bands are 0
  (no data); clouds stay in the data and are the business of the gap filling downstream.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pimc_dist.sources.base import SourceError, TimeSeriesPatch

DATASET = "pastis"

CLASSES = [
    "Background",
    "Meadow",
    "Soft winter wheat",
    "Corn",
    "Winter barley",
    "Winter rapeseed",
    "Spring barley",
    "Sunflower",
    "Grapevine",
    "Beet",
    "Winter triticale",
    "Winter durum wheat",
    "Fruits, vegetables, flowers",
    "Potatoes",
    "Leguminous fodder",
    "Soybeans",
    "Orchard",
    "Mixed cereal",
    "Sorghum",
    "Void label",
]
VOID_LABEL = 19  # parcels mostly outside their patch; ignored in losses and metrics

S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
S1_BANDS = ["VV", "VH", "VV/VH"]
S1_ORBITS = ("S1A", "S1D")  # ascending, descending

FOLDS = (1, 2, 3, 4, 5)
SPLITS = ("train", "val", "test")
# The usual 5-fold rotation (U-TAE paper): rotation k gives (train, val, test) folds.
FOLD_ROTATION: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = (
    ((1, 2, 3), (4,), (5,)),
    ((2, 3, 4), (5,), (1,)),
    ((3, 4, 5), (1,), (2,)),
    ((4, 5, 1), (2,), (3,)),
    ((5, 1, 2), (3,), (4,)),
)
REFERENCE_DATE = dt.date(2018, 9, 1)  # day 0 of the date offsets in U-TAE

METADATA_FILE = "metadata.geojson"
DN_SCALE = 10000.0
DN_OFFSET = 0.0


def folds_for_split(split: str, fold_rotation: int = 0) -> tuple[int, ...]:
    """Folds of `split` ("train", "val" or "test") under rotation `fold_rotation` (0-4)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= fold_rotation < len(FOLD_ROTATION):
        raise ValueError(
            f"fold_rotation must be in 0..{len(FOLD_ROTATION) - 1}, got {fold_rotation}"
        )
    return FOLD_ROTATION[fold_rotation][SPLITS.index(split)]


def parse_yyyymmdd(value: Any) -> dt.date:
    """Turn 20180924 or "20180924" into a date; ValueError otherwise."""
    text = str(value).strip()
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"expected a YYYYMMDD date, got {value!r}")
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _parse_date_dict(raw: Any) -> list[dt.date]:
    """A `dates-*` property ({"0": 20180924, ...}, maybe JSON-encoded) as dates in index order."""
    if isinstance(raw, str):  # some GeoJSON writers store the dict as a JSON string
        raw = json.loads(raw)
    if isinstance(raw, list):
        return [parse_yyyymmdd(v) for v in raw]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"expected a non-empty dict index -> YYYYMMDD, got {type(raw).__name__}")
    keys = sorted(raw, key=int)
    if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"date indices are not 0..{len(keys) - 1}")
    return [parse_yyyymmdd(raw[k]) for k in keys]


def read_metadata(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Read `metadata.geojson` into one dict per patch, sorted by ID_PATCH.

    Each dict holds `id_patch` (int), `fold` (int), `dates_s2` (list of dates), `tile`,
    `n_parcel`, `parcel_cover` (None when absent) and `dates_s1a` / `dates_s1d` when present.
    """
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        raise SourceError(path, "missing: a PASTIS root holds metadata.geojson")
    try:
        collection = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(path, f"not readable as JSON: {err}") from err
    features = collection.get("features") if isinstance(collection, dict) else None
    if not isinstance(features, list):
        raise SourceError(path, "not a GeoJSON FeatureCollection (no 'features' list)")

    patches = []
    seen: set[int] = set()
    for index, feature in enumerate(features):
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict):
            raise SourceError(path, f"feature {index} has no 'properties' object")
        for key in ("ID_PATCH", "Fold", "dates-S2"):
            if key not in props:
                raise SourceError(path, f"feature {index} lacks property '{key}'")
        try:
            id_patch = int(props["ID_PATCH"])
            fold = int(props["Fold"])
        except (TypeError, ValueError) as err:
            raise SourceError(path, f"feature {index}: bad ID_PATCH or Fold ({err})") from err
        if fold not in FOLDS:
            raise SourceError(path, f"patch {id_patch}: Fold {fold} is not in 1..5")
        if id_patch in seen:
            raise SourceError(path, f"patch {id_patch} is listed twice")
        seen.add(id_patch)
        record: dict[str, Any] = {
            "id_patch": id_patch,
            "fold": fold,
            "tile": props.get("TILE"),
            "n_parcel": props.get("N_Parcel"),
            "parcel_cover": props.get("Parcel_Cover"),
        }
        for key in ("dates-S2", "dates-S1A", "dates-S1D"):
            if key not in props:
                continue
            try:
                record["dates_" + key[6:].lower()] = _parse_date_dict(props[key])
            except (ValueError, TypeError) as err:
                raise SourceError(path, f"patch {id_patch}: bad '{key}': {err}") from err
        patches.append(record)
    if not patches:
        raise SourceError(path, "holds no features")
    patches.sort(key=lambda r: r["id_patch"])
    return patches


def read_norm(
    root: str | os.PathLike, folds: Sequence[int] = FOLDS, modality: str = "S2"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) from `NORM_<modality>_patch.json`, averaged over `folds`.

    This is how the PASTIS loaders normalise: the fold statistics are averaged, not pooled.
    """
    path = Path(root) / f"NORM_{modality}_patch.json"
    if not path.is_file():
        raise SourceError(path, "missing")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(path, f"not readable as JSON: {err}") from err
    means, stds = [], []
    for fold in folds:
        entry = stats.get(f"Fold_{fold}") if isinstance(stats, dict) else None
        if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
            raise SourceError(path, f"no 'Fold_{fold}' entry with 'mean' and 'std'")
        try:
            mean = np.asarray(entry["mean"], dtype=np.float64)
            std = np.asarray(entry["std"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise SourceError(path, f"Fold_{fold}: mean/std are not numbers ({err})") from err
        if mean.ndim != 1 or mean.shape != std.shape or (means and mean.shape != means[0].shape):
            raise SourceError(path, f"Fold_{fold}: mean/std have shapes {mean.shape}/{std.shape}")
        if not (np.all(np.isfinite(std)) and np.all(std > 0)):
            raise SourceError(path, f"Fold_{fold}: std must be finite and positive")
        means.append(mean)
        stds.append(std)
    if not means:
        raise ValueError("read_norm needs at least one fold")
    return (
        np.mean(means, axis=0).astype(np.float32),
        np.mean(stds, axis=0).astype(np.float32),
    )


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, and a size check that catches truncated files."""
    if not path.is_file():
        raise SourceError(path, "missing")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # rare format 3.0: let numpy parse it (mmap fails on truncation too)
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                return tuple(array.shape), array.dtype
            data_start = f.tell()
    except (OSError, ValueError, EOFError) as err:
        raise SourceError(path, f"not a readable .npy file: {err}") from err
    if dtype.hasobject:
        raise SourceError(path, f"holds Python objects (dtype {dtype}), not numbers")
    expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise SourceError(path, f"truncated: {size} bytes, the header promises {expected}")
    return tuple(shape), dtype


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SourceError(path, f"not a readable .npy file: {err}") from err


def _check_kind(path: Path, dtype: np.dtype, kinds: str, what: str) -> None:
    if dtype.kind not in kinds:
        names = {"i": "signed int", "u": "unsigned int", "f": "float"}
        allowed = " or ".join(names[k] for k in kinds)
        raise SourceError(path, f"dtype {dtype} is not a valid {what} dtype ({allowed})")


def _as_int_map(path: Path, array: np.ndarray, what: str) -> np.ndarray:
    """An integer (H, W) map; float files are accepted when every value is a whole number."""
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise SourceError(path, f"{what} holds non-integer values")
    return np.asarray(array).astype(np.int64)


class PastisSource:
    """Read PASTIS / PASTIS-R patches as `TimeSeriesPatch` records.

    `folds` (1-5) or `split` ("train"/"val"/"test" under `fold_rotation` 0-4) choose the patches;
    neither means all. `with_s1` also reads DATA_S1A/DATA_S1D into `s1` (and `meta["s1a"]`/
    `meta["s1d"]`; T x 3 x H x W, dates in `meta["dates_s1a"]`/`meta["dates_s1d"]`). With `mmap`, arrays
    are memory-mapped read-only instead of loaded. Files are checked to exist up front; shapes,
    dtypes and truncation are checked when a patch is read (or for all patches by `verify()`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        folds: Sequence[int] | None = None,
        split: str | None = None,
        fold_rotation: int = 0,
        with_s1: bool = False,
        mmap: bool = True,
    ) -> None:
        self.root = Path(root)
        if folds is not None and split is not None:
            raise ValueError("give either folds or split, not both")
        if split is not None:
            folds = folds_for_split(split, fold_rotation)
        if folds is not None:
            folds = tuple(int(f) for f in folds)
            bad = [f for f in folds if f not in FOLDS]
            if bad or not folds:
                raise ValueError(f"folds must be a non-empty subset of {FOLDS}, got {folds}")
        self.folds: tuple[int, ...] = folds if folds is not None else FOLDS
        self.split = split
        self.with_s1 = with_s1
        self.mmap = mmap

        metadata = read_metadata(self.root)
        self._patches = [p for p in metadata if p["fold"] in self.folds]
        if with_s1:
            for patch in self._patches:
                for orbit in S1_ORBITS:
                    if "dates_" + orbit.lower() not in patch:
                        raise SourceError(
                            self.root / METADATA_FILE,
                            f"patch {patch['id_patch']} lacks 'dates-{orbit}' "
                            "(with_s1 needs PASTIS-R)",
                        )
        # Cheap up-front check: a missing file should fail now, not hours into sharding.
        for patch in self._patches:
            for path in self._paths(patch["id_patch"]).values():
                if not path.is_file():
                    raise SourceError(path, f"missing (patch {patch['id_patch']} is in metadata)")

    def _paths(self, id_patch: int) -> dict[str, Path]:
        paths = {
            "s2": self.root / "DATA_S2" / f"S2_{id_patch}.npy",
            "target": self.root / "ANNOTATIONS" / f"TARGET_{id_patch}.npy",
            "parcels": self.root / "ANNOTATIONS" / f"ParcelIDs_{id_patch}.npy",
        }
        if self.with_s1:
            for orbit in S1_ORBITS:
                paths[orbit.lower()] = self.root / f"DATA_{orbit}" / f"{orbit}_{id_patch}.npy"
        return paths

    def __len__(self) -> int:
        return len(self._patches)

    @property
    def patch_ids(self) -> list[str]:
        """Patch ids (ID_PATCH as text) in reading order (ascending ID_PATCH)."""
        return [str(p["id_patch"]) for p in self._patches]

    def norm_s2(self) -> tuple[np.ndarray, np.ndarray]:
        """S2 (mean, std) per band from NORM_S2_patch.json, averaged over this source's folds."""
        return read_norm(self.root, self.folds, "S2")

    def _check_headers(self, patch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Validate every file of one patch from its .npy header alone; return the shapes."""
        paths = self._paths(patch["id_patch"])
        pid = patch["id_patch"]
        shapes = {}

        s2_shape, s2_dtype = _npy_header(paths["s2"])
        _check_kind(paths["s2"], s2_dtype, "iuf", "Sentinel-2")
        if len(s2_shape) != 4 or s2_shape[1] != len(S2_BANDS):
            raise SourceError(paths["s2"], f"shape {s2_shape}, expected (T, 10, H, W)")
        if s2_shape[0] != len(patch["dates_s2"]):
            raise SourceError(
                paths["s2"],
                f"has {s2_shape[0]} dates but {METADATA_FILE} lists {len(patch['dates_s2'])} "
                f"in 'dates-S2' of patch {pid}",
            )
        height, width = s2_shape[2:]
        shapes["s2"] = s2_shape

        target_shape, target_dtype = _npy_header(paths["target"])
        _check_kind(paths["target"], target_dtype, "iuf", "label")
        if len(target_shape) != 3 or target_shape[0] < 1:
            raise SourceError(paths["target"], f"shape {target_shape}, expected (3, H, W)")
        if target_shape[1:] != (height, width):
            raise SourceError(
                paths["target"],
                f"is {target_shape[1:]} px but {paths['s2'].name} is {(height, width)}",
            )
        shapes["target"] = target_shape

        parcel_shape, parcel_dtype = _npy_header(paths["parcels"])
        _check_kind(paths["parcels"], parcel_dtype, "iuf", "parcel id")
        if parcel_shape != (height, width):
            raise SourceError(
                paths["parcels"],
                f"shape {parcel_shape}, expected {(height, width)} like {paths['s2'].name}",
            )
        shapes["parcels"] = parcel_shape

        if self.with_s1:
            for orbit in S1_ORBITS:
                key = orbit.lower()
                shape, dtype = _npy_header(paths[key])
                _check_kind(paths[key], dtype, "iuf", "Sentinel-1")
                if len(shape) != 4 or shape[1] != len(S1_BANDS) or shape[2:] != (height, width):
                    raise SourceError(
                        paths[key], f"shape {shape}, expected (T, 3, {height}, {width})"
                    )
                n_dates = len(patch["dates_" + key])
                if shape[0] != n_dates:
                    raise SourceError(
                        paths[key],
                        f"has {shape[0]} dates but {METADATA_FILE} lists {n_dates} "
                        f"in 'dates-{orbit}' of patch {pid}",
                    )
                shapes[key] = shape
        return shapes

    def verify(self) -> None:
        """Check the headers (shape, dtype, size) of every file of every selected patch."""
        for patch in self._patches:
            self._check_headers(patch)

    def __getitem__(self, index: int) -> TimeSeriesPatch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        patch = self._patches[index]
        self._check_headers(patch)
        paths = self._paths(patch["id_patch"])

        bands = _load_npy(paths["s2"], self.mmap)
        target = _load_npy(paths["target"], mmap=False)
        labels = _as_int_map(paths["target"], target[0], "class channel")
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise SourceError(
                paths["target"],
                f"class values {labels.min()}..{labels.max()} outside 0..{len(CLASSES) - 1}",
            )
        parcels = _as_int_map(
            paths["parcels"], _load_npy(paths["parcels"], mmap=False), "parcel ids"
        )
        # No cloud mask in PASTIS: only all-zero band vectors (no data) are invalid.
        valid = np.any(bands != 0, axis=1)

        dates = patch["dates_s2"]
        meta: dict[str, Any] = {
            "id_patch": patch["id_patch"],
            "tile": patch["tile"],
            "n_parcel": patch["n_parcel"],
            "parcel_cover": patch["parcel_cover"],
            "days": [(d - REFERENCE_DATE).days for d in dates],
            "reference_date": REFERENCE_DATE.isoformat(),
        }
        s1 = None
        if self.with_s1:
            meta["s1_bands"] = list(S1_BANDS)
            s1 = {}
            for orbit in S1_ORBITS:
                key = orbit.lower()
                meta[key] = s1[orbit] = _load_npy(paths[key], self.mmap)
                meta["dates_" + key] = patch["dates_" + key]

        return TimeSeriesPatch(
            patch_id=str(patch["id_patch"]),
            bands=bands,
            band_names=list(S2_BANDS),
            dates=list(dates),
            dataset=DATASET,
            fold=patch["fold"],
            split=self.split,
            labels=labels,
            parcels=parcels,
            valid=valid,
            dn_scale=DN_SCALE,
            dn_offset=DN_OFFSET,
            meta=meta,
            s1=s1,
            s1_bands=list(S1_BANDS) if s1 else [],
        )

    def __iter__(self) -> Iterator[TimeSeriesPatch]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (
            f"PastisSource(root={str(self.root)!r}, folds={self.folds}, split={self.split!r}, "
            f"with_s1={self.with_s1}, patches={len(self)})"
        )
