"""BigEarthNet v2 / reBEN (Clasen et al. 2024; CDLA-Permissive-1.0).

549,488 pairs of Sentinel-2 L2A (12 bands, no B10) and Sentinel-1 GRD (VV, VH)
patches of 1.2 km x 1.2 km with multi-labels from CORINE 2018 in the
19-class nomenclature.

Files under `root`:

- `metadata.parquet`: one row per patch: `patch_id` (the S2 patch name),
  `labels` (list of class names), `split` ("train", "validation", "test"),
  `country`, `s1_name`, `s2v1_name`, `contains_seasonal_snow`,
  `contains_cloud_or_shadow`.
- `metadata_for_patches_with_snow_cloud_or_shadow.parquet`: the same columns
  for the patches the reBEN authors set apart for seasonal snow, cloud or
  shadow (read when present; `drop_snow_cloud=True` leaves them out, which is
  what the official reBEN benchmark and configilm's default do).
- images, in one of two encodings:

  * "lmdb": an LMDB (default folder `BigEarthNet-V2-LMDB/`, as configilm and
    the rico-hdl encoder write it); key = patch name (`patch_id` for S2,
    `s1_name` for S1), value = a safetensors blob of one 2-D array per band,
    keyed by band name: S2 "B01".."B12" (uint16 DN at native size: 120 px for
    B02 B03 B04 B08, 60 px for B05 B06 B07 B8A B11 B12, 20 px for B01 B09),
    S1 "VV", "VH" (float32 backscatter in dB, 120 px).
  * "geotiff": the release archives: `BigEarthNet-S2/<tile>/<patch_id>/
    <patch_id>_<band>.tif` with `<tile>` the patch id without its last two
    `_` fields, and `BigEarthNet-S1/<scene>/<s1_name>/<s1_name>_{VV,VH}.tif`
    with `<scene>` the S1 name without its last three fields (torchgeo's
    BigEarthNetV2 layout). One single-band GeoTIFF per band.

Records hold S2 as the stored digital numbers (reflectance = DN / 10000, the
record's `s2_dn_scale`; reBEN predates the processing baseline 04.00 offset)
in the standard band order `S2_BANDS`, all bands resampled to one `s2_size`
grid (120 px = 10 m by default), and S1 in dB (float32) on the same grid.
With "nearest" resampling S2 stays uint16, exactly the stored values; with
"bilinear" it is float32 DN.

Resampling: "nearest" (default) repeats pixels when upsampling by the
integer factors 2 and 6 (identical to configilm's BENv2 pipeline, whose
published band statistics are "120_nearest"); "bilinear" uses pixel-area
geometry (`align_corners=False`, as GDAL/rasterio and torchgeo do; configilm's
bilinear uses `align_corners=True`) and antialiasing when shrinking.

Classes: `CLASSES` is the order of the BigEarthNet 19-class nomenclature paper
as torchgeo lists it. configilm sorts the names alphabetically by default
(`NEW_LABELS`); we always map by NAME, so label vectors mean the same thing
whatever order another tool uses -- convert with `CLASSES.index(name)`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors

from pimc_dist.sources.base import MultimodalPatch, SourceError
from pimc_dist.sources.tiff_io import read_tiff

CLASSES: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)  # fmt: skip
S1_BANDS: tuple[str, ...] = ("VV", "VH")
# Native patch width in pixels of each band (1.2 km at 10, 20 or 60 m).
NATIVE_SIZE: dict[str, int] = {
    **{b: 120 for b in ("B02", "B03", "B04", "B08", "VV", "VH")},
    **{b: 60 for b in ("B05", "B06", "B07", "B8A", "B11", "B12")},
    **{b: 20 for b in ("B01", "B09")},
}
DN_SCALE = 10000.0

METADATA_FILE = "metadata.parquet"
SNOW_CLOUD_FILE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
LMDB_DIR = "BigEarthNet-V2-LMDB"
S2_DIR = "BigEarthNet-S2"
S1_DIR = "BigEarthNet-S1"
METADATA_COLUMNS: tuple[str, ...] = (
    "patch_id",
    "labels",
    "split",
    "country",
    "s1_name",
    "s2v1_name",
    "contains_seasonal_snow",
    "contains_cloud_or_shadow",
)
# Split names in the metadata, and the short names records carry (as EuroSAT/PASTIS).
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}
RECORD_SPLIT: dict[str, str] = {"train": "train", "validation": "val", "test": "test"}
RESAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear")


def configilm_mock_root() -> Path | None:
    """Folder of the 24 real reBEN patches shipped in the configilm wheel, or None.

    Found through the import system without importing configilm (its import pulls
    in dependencies this project does not install).
    """
    spec = importlib.util.find_spec("configilm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "extra" / "mock_data" / "BENv2"
    return root if (root / METADATA_FILE).is_file() else None


def s2_tile_dir(patch_id: str) -> str:
    """Folder of an S2 patch inside `BigEarthNet-S2/`: the id without its last two fields."""
    return "_".join(patch_id.split("_")[:-2])


def s1_scene_dir(s1_name: str) -> str:
    """Folder of an S1 patch inside `BigEarthNet-S1/`: the name without its last three fields."""
    return "_".join(s1_name.split("_")[:-3])


def geotiff_band_paths(root: str | os.PathLike, patch_id: str, s1_name: str) -> dict[str, Path]:
    """Band name -> GeoTIFF path of one S2/S1 pair in the release layout under `root`."""
    s2 = Path(root) / S2_DIR / s2_tile_dir(patch_id) / patch_id
    s1 = Path(root) / S1_DIR / s1_scene_dir(s1_name) / s1_name
    paths = {b: s2 / f"{patch_id}_{b}.tif" for b in S2_BANDS}
    paths.update({b: s1 / f"{s1_name}_{b}.tif" for b in S1_BANDS})
    return paths


def labels_to_multi_hot(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """(19,) uint8 multi-hot vector over `CLASSES` for a list of class names."""
    vector = np.zeros(len(CLASSES), dtype=np.uint8)
    for name in names:
        vector[CLASSES.index(name)] = 1  # ValueError for an unknown name
    return vector


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source pixel of each output pixel, pixel centres aligned (torch "nearest-exact")."""
    return np.minimum(
        np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1
    )


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of bilinear resampling along one axis, pixel-area geometry.

    Same values as torch `interpolate(mode="bilinear", align_corners=False,
    antialias=True)`: plain linear interpolation when enlarging, a triangle
    filter widened by the scale (antialiasing) when shrinking.
    """
    scale = n_in / n_out
    out = np.arange(n_out)
    weights = np.zeros((n_out, n_in))
    if scale <= 1.0:
        src = np.maximum((out + 0.5) * scale - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        np.add.at(weights, (out, lo), 1.0 - frac)
        np.add.at(weights, (out, hi), frac)
    else:
        centre = (out + 0.5) * scale
        weights = np.maximum(1.0 - np.abs(np.arange(n_in)[None] + 0.5 - centre[:, None]) / scale, 0)
        weights /= weights.sum(axis=1, keepdims=True)
    return weights


def resample_bands(
    bands: dict[str, np.ndarray],
    order: tuple[str, ...] | list[str],
    size: int,
    mode: str = "nearest",
) -> np.ndarray:
    """Stack `bands[name]` for `name` in `order` on one (size x size) grid -> (C, size, size).

    "nearest" copies pixels, so the result keeps the bands' dtype (uint16 DN stay
    exact); "bilinear" interpolates and gives float32.
    Pure numpy on purpose: torch ops in a worker forked after the parent used
    torch's thread pool can deadlock, and sharding forks workers.
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"resample mode must be one of {RESAMPLE_MODES}, not {mode!r}")
    dtype = np.result_type(*(bands[name] for name in order)) if mode == "nearest" else np.float32
    out = np.empty((len(order), size, size), dtype=dtype)
    # Bands of the same native size are resampled together.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, name in enumerate(order):
        groups.setdefault(bands[name].shape, []).append(i)
    for (height, width), indices in groups.items():
        stack = np.stack([bands[order[i]] for i in indices]).astype(dtype)
        if (height, width) == (size, size):
            out[indices] = stack
        elif mode == "nearest":
            out[indices] = stack[:, nearest_index(height, size)][:, :, nearest_index(width, size)]
        else:
            out[indices] = bilinear_matrix(height, size) @ stack @ bilinear_matrix(width, size).T
    return out


# One handle per LMDB file per process: py-lmdb refuses to open an environment twice in
# a process, and a forked child inherits the parent's registry. Read-only with
# lock=False there is no reader lock table, so a handle inherited across fork()
# reads safely; spawned workers open their own on first read.
_LMDB_HANDLES: dict[str, Any] = {}


def open_lmdb(path: str | os.PathLike):
    """Read-only handle on the LMDB folder `path`, opened once per process and checked."""
    key = os.path.realpath(path)
    if key in _LMDB_HANDLES:
        return _LMDB_HANDLES[key]
    try:
        import lmdb
    except ImportError as exc:
        raise ImportError(
            "reading the reBEN LMDB needs lmdb: pip install pimc_dist[reben]"
        ) from exc
    data = Path(path) / "data.mdb"
    if not data.is_file():
        raise SourceError(data, "LMDB data file not found")
    try:
        env = lmdb.open(key, readonly=True, lock=False, readahead=False)
        info, stat = env.info(), env.stat()
    except lmdb.Error as exc:
        raise SourceError(data, f"unreadable LMDB ({exc})") from exc
    # LMDB maps the file into memory: reading a page past the end of a truncated
    # file kills the process with SIGBUS, so check the size before any read.
    needed = (info["last_pgno"] + 1) * stat["psize"]
    have = data.stat().st_size
    if have < needed:
        env.close()
        raise SourceError(data, f"truncated LMDB: {have} bytes, its pages need {needed}")
    _LMDB_HANDLES[key] = env
    return env


def close_lmdb(path: str | os.PathLike) -> None:
    """Close this process's handle on the LMDB folder `path`, if open."""
    env = _LMDB_HANDLES.pop(os.path.realpath(path), None)
    if env is not None:
        env.close()


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # optional dependency, see pyproject extra "reben"
        raise ImportError(
            "reading reBEN metadata needs pyarrow: pip install pimc_dist[reben]"
        ) from exc
    if not path.is_file():
        raise SourceError(path, "metadata file not found")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise SourceError(path, f"unreadable parquet ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in METADATA_COLUMNS if c not in table.column_names]
    if missing:
        raise SourceError(path, f"missing columns {missing}")
    return table.select(list(METADATA_COLUMNS)).to_pylist()


def read_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a reBEN metadata parquet, each label checked against `CLASSES`."""
    path = Path(path)
    rows = _read_parquet(path)
    for i, row in enumerate(rows):
        if not isinstance(row["patch_id"], str) or not isinstance(row["s1_name"], str):
            raise SourceError(path, f"row {i}: patch_id and s1_name must be strings")
        for name in row["labels"] or []:
            if name not in CLASSES:
                raise SourceError(path, f"row {i} ({row['patch_id']}): unknown label {name!r}")
        if row["split"] not in RECORD_SPLIT:
            raise SourceError(path, f"row {i} ({row['patch_id']}): unknown split {row['split']!r}")
    return rows


class BigEarthNetV2Source:
    """reBEN patches as `MultimodalPatch` records (random access and iteration).

    `encoding="auto"` uses the LMDB when `lmdb_path` (default
    `root/BigEarthNet-V2-LMDB`) holds a `data.mdb`, else the GeoTIFF folders.
    Patches are ordered by `patch_id`. The LMDB is opened on the first read,
    once per process (`open_lmdb`); a source pickles without it, so it can be
    handed to spawned or forked workers.
    """

    dataset = "reben"
    classes = CLASSES

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str | None = None,
        drop_snow_cloud: bool = False,
        s2_size: int = 120,
        encoding: str = "auto",
        resample: str = "nearest",
        lmdb_path: str | os.PathLike | None = None,
    ) -> None:
        if split is not None and split not in SPLIT_ALIASES:
            raise ValueError(
                f"unknown reBEN split {split!r}; expected one of {sorted(SPLIT_ALIASES)}"
            )
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, not {resample!r}")
        if s2_size < 1:
            raise ValueError(f"s2_size must be positive, not {s2_size}")
        self.root = Path(root)
        self.split = split
        self.s2_size = int(s2_size)
        self.resample = resample
        self.lmdb_path = Path(lmdb_path) if lmdb_path is not None else self.root / LMDB_DIR
        self.encoding = self._pick_encoding(encoding)
        self.rows = self._load_rows(drop_snow_cloud)
        self.ids: list[str] = [row["patch_id"] for row in self.rows]

    def _pick_encoding(self, encoding: str) -> str:
        has_lmdb = (self.lmdb_path / "data.mdb").is_file()
        if encoding == "auto":
            if has_lmdb:
                return "lmdb"
            if (self.root / S2_DIR).is_dir():
                return "geotiff"
            raise SourceError(
                self.root, f"no reBEN images: neither {self.lmdb_path}/data.mdb nor {S2_DIR}/"
            )
        if encoding == "lmdb":
            if not has_lmdb:
                raise SourceError(self.lmdb_path, "LMDB not found (no data.mdb)")
            return encoding
        if encoding == "geotiff":
            for folder in (S2_DIR, S1_DIR):
                if not (self.root / folder).is_dir():
                    raise SourceError(self.root / folder, "GeoTIFF folder not found")
            return encoding
        raise ValueError(f"encoding must be 'auto', 'lmdb' or 'geotiff', not {encoding!r}")

    def _load_rows(self, drop_snow_cloud: bool) -> list[dict[str, Any]]:
        main = self.root / METADATA_FILE
        rows = read_metadata(main)
        seen = {row["patch_id"]: main for row in rows}
        extra = self.root / SNOW_CLOUD_FILE
        if extra.is_file() and not drop_snow_cloud:
            for row in read_metadata(extra):
                if row["patch_id"] in seen:
                    raise SourceError(extra, f"patch {row['patch_id']} also listed in {main.name}")
                seen[row["patch_id"]] = extra
                rows.append(row)
        if drop_snow_cloud:
            rows = [
                r
                for r in rows
                if not (r["contains_seasonal_snow"] or r["contains_cloud_or_shadow"])
            ]
        if self.split is not None:
            rows = [r for r in rows if r["split"] == SPLIT_ALIASES[self.split]]
        return sorted(rows, key=lambda r: r["patch_id"])

    # -- LMDB ---------------------------------------------------------------------------------

    def _read_lmdb(self, key: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        env = open_lmdb(self.lmdb_path)
        data = self.lmdb_path / "data.mdb"
        try:
            with env.begin(buffers=False) as txn:
                blob = txn.get(key.encode())
        except Exception as exc:
            raise SourceError(data, f"key {key!r}: LMDB read failed ({exc})") from exc
        if blob is None:
            raise SourceError(data, f"key {key!r} not in the LMDB")
        try:
            arrays = load_safetensors(blob)
        except Exception as exc:
            raise SourceError(data, f"key {key!r}: corrupt safetensors blob ({exc})") from exc
        missing = [b for b in names if b not in arrays]
        if missing:
            raise SourceError(data, f"key {key!r}: bands {missing} missing (has {sorted(arrays)})")
        return {b: arrays[b] for b in names}

    # -- GeoTIFF ------------------------------------------------------------------------------

    def band_paths(self, index: int) -> dict[str, Path]:
        """GeoTIFF file of every S2 and S1 band of record `index` (GeoTIFF encoding)."""
        row = self.rows[index]
        return geotiff_band_paths(self.root, row["patch_id"], row["s1_name"])

    def _read_geotiff(self, index: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        paths = self.band_paths(index)
        s2 = {b: read_tiff(paths[b], bands=1)[0] for b in S2_BANDS}
        s1 = {b: read_tiff(paths[b], bands=1)[0] for b in S1_BANDS}
        return s2, s1

    # -- records ------------------------------------------------------------------------------

    def read_bands(self, index: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Native-resolution S2 and S1 arrays of record `index`, checked, keyed by band name."""
        row = self.rows[index]
        if self.encoding == "lmdb":
            s2 = self._read_lmdb(row["patch_id"], S2_BANDS)
            s1 = self._read_lmdb(row["s1_name"], S1_BANDS)
            where = {b: f"{self.lmdb_path / 'data.mdb'} key {row['patch_id']!r}" for b in S2_BANDS}
            where.update(
                {b: f"{self.lmdb_path / 'data.mdb'} key {row['s1_name']!r}" for b in S1_BANDS}
            )
        else:
            s2, s1 = self._read_geotiff(index)
            where = {b: str(p) for b, p in self.band_paths(index).items()}
        for name, array in {**s2, **s1}.items():
            n = NATIVE_SIZE[name]
            if array.shape != (n, n):
                raise SourceError(where[name], f"band {name} is {array.shape}, expected ({n}, {n})")
        for name, array in s2.items():
            if array.dtype != np.uint16:
                raise SourceError(
                    where[name], f"band {name} has dtype {array.dtype}, expected uint16"
                )
        for name, array in s1.items():
            if array.dtype != np.float32:
                raise SourceError(
                    where[name], f"band {name} has dtype {array.dtype}, expected float32"
                )
            if not np.isfinite(array).all():
                raise SourceError(where[name], f"band {name} holds NaN or infinite values")
        return s2, s1

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> MultimodalPatch:
        row = self.rows[index]
        s2, s1 = self.read_bands(index)
        s2_grid = resample_bands(s2, S2_BANDS, self.s2_size, self.resample)
        s1_grid = resample_bands(s1, S1_BANDS, self.s2_size, self.resample)
        return MultimodalPatch(
            patch_id=row["patch_id"],
            s2=s2_grid,
            s2_bands=list(S2_BANDS),
            s2_dn_scale=DN_SCALE,
            s1=s1_grid,
            s1_bands=list(S1_BANDS),
            labels=labels_to_multi_hot(row["labels"] or []),
            dataset=self.dataset,
            split=RECORD_SPLIT[row["split"]],
            meta={
                "s1_name": row["s1_name"],
                "s2v1_name": row["s2v1_name"],
                "country": row["country"],
                "label_names": list(row["labels"] or []),
                "contains_seasonal_snow": bool(row["contains_seasonal_snow"]),
                "contains_cloud_or_shadow": bool(row["contains_cloud_or_shadow"]),
            },
        )

    def __iter__(self) -> Iterator[MultimodalPatch]:
        for index in range(len(self)):
            yield self[index]

    def close(self) -> None:
        """Close the LMDB handle of this source's `lmdb_path` (reopened on the next read)."""
        close_lmdb(self.lmdb_path)
