"""Dataset readers, one module per on-disk format, and the registry the sharder uses.

`open_source(cfg.data)` returns a `Source`: the reader (indexable records), the
class list and the sample kind its records make. Names in `data.source`:

- `pastis`: PASTIS / PASTIS-R (`sources/pastis.py`), time series -> PIMC samples
- `geotiff_stack`: a user's multi-date GeoTIFF stack (`sources/geotiff_stack.py`)
- `eurosat`: EuroSAT RGB or 13-band (`sources/eurosat.py`) -> scene samples
- `reben`: BigEarthNet v2 (`sources/reben.py`) -> MoSAiC samples
- `sen12ms`: SEN12MS (`sources/sen12ms.py`) -> MoSAiC samples
- `demo`: the built-in dataset: a small PASTIS-layout dataset with planted crop
  phenology, written once under `data.root` (default `shards/_raw/demo`), then
  read by the PASTIS reader like real data.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pimc_dist.sources.base import MultimodalPatch, ScenePatch, SourceError, TimeSeriesPatch

SOURCES = ("demo", "pastis", "geotiff_stack", "eurosat", "reben", "sen12ms")
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


def ensure_demo_dataset(root: str | os.PathLike = DEMO_ROOT) -> Path:
    """Write the built-in PASTIS-layout dataset under `root` unless it is already complete."""
    from pimc_dist.sources.fixtures import write_pastis

    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    write_pastis(tmp, n_patches=DEMO_PATCHES, size=DEMO_SIZE, seed=DEMO_SEED)
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


def open_source(data: Any) -> Source:
    """Open the reader named by `data.source` with the options of the `data` config section."""
    name = data.source
    if name in ("demo", "pastis"):
        from pimc_dist.sources import pastis

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
        from pimc_dist.sources.geotiff_stack import GeoTiffStackSource

        # glob.glob, not Path.glob: the pattern may be absolute.
        paths = (
            sorted(glob.glob(data.root)) if any(ch in data.root for ch in "*?[") else [data.root]
        )
        if not paths:
            raise SourceError(data.root, "no file matches this pattern")
        reader = GeoTiffStackSource(
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
        )
        return Source(name, reader, [], "pimc")
    if name == "eurosat":
        from pimc_dist.sources.eurosat import CLASSES, EuroSATSource

        reader = EuroSATSource(
            data.root,
            split=data.split,
            multispectral=data.eurosat_bands == "ms",
            band_order=data.eurosat_band_order,
            image_size=data.image_size,
        )
        return Source(name, reader, list(CLASSES), "scene")
    if name == "reben":
        from pimc_dist.sources.reben import CLASSES, BigEarthNetV2Source

        reader = BigEarthNetV2Source(
            data.root,
            split=data.split,
            drop_snow_cloud=data.drop_snow_cloud,
            s2_size=data.s2_size,
            encoding=data.reben_encoding,
            resample=data.reben_resample,
        )
        return Source(name, reader, list(CLASSES), "mosaic")
    if name == "sen12ms":
        from pimc_dist.sources.sen12ms import CLASSES, Sen12MSSource

        reader = Sen12MSSource(
            data.root,
            label_threshold=data.label_threshold,
            split=data.split,
            image_size=data.image_size,
        )
        return Source(name, reader, list(CLASSES), "mosaic")
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
