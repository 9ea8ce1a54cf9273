"""Dataset readers, one module per on-disk format, and the registry the sharder uses.

`open_source(cfg.data)` returns a `Source`: the reader (indexable records), the
class list and the sample kind its records make. Names in `data.source`:

- `pastis`: PASTIS / PASTIS-R (`sources/pastis.py`), time series -> PIMC samples
- `geotiff_stack`: a user's multi-date GeoTIFF stack (`sources/geotiff_stack.py`)
- `point_series`: a table of labelled point time series, one row per sample and date
  (CSV / parquet, `sources/point_series.py`) -> PIMC samples without a crop view
- `eurosat`: EuroSAT RGB or 13-band (`sources/eurosat.py`) -> scene samples
- `reben`: BigEarthNet v2 (`sources/reben.py`) -> MoSAiC samples
- `sen12ms`: SEN12MS (`sources/sen12ms.py`) -> MoSAiC samples
- `demo`: the built-in dataset: a small PASTIS-layout dataset with planted crop
  phenology, written once under `data.root` (default `shards/_raw/demo`), then
  read by the PASTIS reader like real data.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pimc_dist.sources import eurosat, fixtures, geotiff_stack, pastis, point_series, reben, sen12ms
from pimc_dist.sources.base import MultimodalPatch, ScenePatch, SourceError, TimeSeriesPatch

SOURCES = ("demo", "pastis", "geotiff_stack", "point_series", "eurosat", "reben", "sen12ms")
DEMO_ROOT = Path("shards/_raw/demo")
DEMO_PATCHES = 20  # 4 per fold
DEMO_SIZE = 64
DEMO_SEED = 0


@dataclass
class Source:
    """An opened dataset: indexable records plus what the sharder needs to know."""

    name: str
    reader: Sequence[Any]
    classes: list[str]
    kind: str  # pimc | mosaic | scene
    exclude_labels: tuple[int, ...] = ()
    # Samples one record makes at most; None = data.pixels_per_patch (pimc) or 1.
    samples_per_record: int | None = None
    # Acquisitions merged into another of their day (sources.base.merge_same_day), over the
    # whole dataset: the sharder prints it once.
    same_day_merged: int = 0
    # First and last acquisition of the whole dataset where the reader knows them up front
    # (GeoTIFF stacks, point tables): the sharder checks data.grid_start against them.
    date_range: tuple[dt.date, dt.date] | None = None


def ensure_demo_dataset(root: str | os.PathLike = DEMO_ROOT) -> Path:
    """Write the built-in PASTIS-layout dataset under `root` unless it is already complete."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    fixtures.write_pastis(tmp, n_patches=DEMO_PATCHES, size=DEMO_SIZE, seed=DEMO_SEED)
    (tmp / ".complete").write_text("written by pimc_dist.sources.ensure_demo_dataset\n")
    if root.exists():
        import shutil

        shutil.rmtree(root)
    tmp.rename(root)
    return root


def label_paths(pattern: str | None, paths: list[str]) -> list[str] | None:
    """Class raster of each GeoTIFF stack in `paths`: `pattern` with {stem} replaced by the
    stack's file name without extension, or `pattern` itself for a single stack."""
    if not pattern:
        return None
    if "{stem}" in pattern:
        return [pattern.replace("{stem}", Path(p).stem) for p in paths]
    if len(paths) > 1:
        raise SourceError(
            pattern, f"one label raster for {len(paths)} stacks; put {{stem}} in data.label_path"
        )
    return [pattern]


def _paths(root: str) -> list[str]:
    """The files `root` names: itself, or what its glob matches, folders left out (a
    `data/*` beside the stacks' label folder means the stacks)."""
    if not any(ch in root for ch in "*?["):
        return [root]
    matches = sorted(glob.glob(root))  # glob.glob, not Path.glob: the pattern may be absolute
    paths = [p for p in matches if not Path(p).is_dir()]
    if not paths:
        only = f" (only folders: {', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''})"
        raise SourceError(root, "no file matches this pattern" + (only if matches else ""))
    return paths


def _split_options(data: Any) -> dict[str, Any]:
    """Class list, ignored label values and split options of GeoTIFF stacks and point tables."""
    return dict(
        class_names=list(data.class_names),
        label_ignore=list(data.label_ignore),
        split=data.split,
        hash_fractions=dict(data.hash_split) or None,
        split_seed=data.split_seed,
    )


def open_source(data: Any) -> Source:
    """Open the reader named by `data.source` with the options of the `data` config section."""
    name = data.source
    if name in ("demo", "pastis"):
        if name == "demo":
            root = ensure_demo_dataset(data.root or DEMO_ROOT)
        else:
            root = Path(data.root)
        reader = pastis.PastisSource(
            root,
            folds=list(data.folds) if data.folds else None,
            split=None if data.folds else data.split,
            fold_rotation=data.fold_rotation,
            with_s1=data.with_s1,
        )
        return Source(name, reader, list(pastis.CLASSES), "pimc", (pastis.VOID_LABEL,))
    if name == "geotiff_stack":
        paths = _paths(data.root)
        reader = geotiff_stack.GeoTiffStackSource(
            paths,
            band_names=list(data.band_names),
            dates=list(data.dates),
            order=data.band_order,
            patch_size=data.patch_size,
            nodata=data.nodata,
            dn_scale=data.dn_scale,
            dn_offset=data.dn_offset,
            label_path=label_paths(data.label_path, paths),
            # Edge patches keep their real extent: PIMC samples need no fixed patch size,
            # and crops near the image edge are then edge-padded instead of showing nodata.
            pad_edges=False,
            **_split_options(data),
        )
        return Source(
            name,
            reader,
            list(reader.class_names),
            "pimc",
            reader.label_ignore,
            same_day_merged=reader.same_day_merged,
            date_range=(min(reader.dates), max(reader.dates)),
        )
    if name == "point_series":
        reader = point_series.PointSeriesSource(
            _paths(data.root),
            band_names=list(data.band_names),
            id_column=data.id_column,
            date_column=data.date_column,
            label_column=data.label_column,
            split_column=data.split_column,
            group_column=data.group_column,
            nodata=data.nodata,
            dn_scale=data.dn_scale,
            dn_offset=data.dn_offset,
            # Without a fixed grid length every sample spans the table's dates (one grid).
            common_range=data.grid_length is None,
            **_split_options(data),
        )
        # Samples with an ignored label are left out by the reader: nothing to exclude here.
        return Source(
            name,
            reader,
            list(reader.classes),
            "pimc",
            samples_per_record=1,
            same_day_merged=reader.same_day_merged,
            date_range=(reader.first_date, reader.last_date),
        )
    if name == "eurosat":
        reader = eurosat.EuroSATSource(
            data.root,
            split=data.split,
            multispectral=data.eurosat_bands == "ms",
            band_order=data.eurosat_band_order,
            image_size=data.image_size,
        )
        return Source(name, reader, list(eurosat.CLASSES), "scene")
    if name == "reben":
        reader = reben.BigEarthNetV2Source(
            data.root,
            split=data.split,
            drop_snow_cloud=data.drop_snow_cloud,
            s2_size=data.s2_size,
            encoding=data.reben_encoding,
            resample=data.reben_resample,
        )
        return Source(name, reader, list(reben.CLASSES), "mosaic")
    if name == "sen12ms":
        reader = sen12ms.Sen12MSSource(
            data.root,
            label_threshold=data.label_threshold,
            split=data.split,
            image_size=data.image_size,
        )
        return Source(name, reader, list(sen12ms.CLASSES), "mosaic")
    raise ValueError(f"data.source: unknown source '{name}' (known: {', '.join(SOURCES)})")


__all__ = [
    "SOURCES",
    "MultimodalPatch",
    "ScenePatch",
    "Source",
    "SourceError",
    "TimeSeriesPatch",
    "ensure_demo_dataset",
    "open_source",
]
