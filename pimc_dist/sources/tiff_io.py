"""Read and write (Geo)TIFF rasters with tifffile, without GDAL.

Readers return arrays as (bands, height, width) whatever the file's band
interleave (pixel-interleaved "YXS" as GDAL writes by default, band-separate
"SYX", or one page per band). Every failure becomes a `SourceError` naming the
file: a truncated TIFF can otherwise come back from tifffile as a wrongly
shaped array with only a logged warning. `checked_tiff` opens a TIFF so that
what tifffile only logs (an IFD chain cut off, so a 16-band file reads as one
band; a series that fails to reshape) raises "truncated or corrupt TIFF".

`write_geotiff` writes the minimal GeoTIFF tags (ModelPixelScale,
ModelTiepoint and a GeoKey directory with the EPSG code) so fixtures look like
the real files to any GeoTIFF reader.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile

from pimc_dist.sources.base import SourceError

# GeoTIFF tag codes and GeoKey ids (GeoTIFF 1.0 specification).
MODEL_PIXEL_SCALE_TAG = 33550
MODEL_TIEPOINT_TAG = 33922
GEO_KEY_DIRECTORY_TAG = 34735
GT_MODEL_TYPE_KEY = 1024
GT_RASTER_TYPE_KEY = 1025
GEOGRAPHIC_TYPE_KEY = 2048
PROJECTED_CS_TYPE_KEY = 3072


class _ThreadErrors(logging.Handler):
    """Collects the tifffile log records of level ERROR and above of one thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def checked_tiff(path: str | os.PathLike) -> Iterator[tifffile.TiffFile]:
    """`tifffile.TiffFile(path)`, with the errors tifffile only logs raised as SourceError.

    Every page is loaded before the body runs (a cut-off IFD chain shows there), and
    errors tifffile logs within the body (a series that fails to reshape) raise
    SourceError(path, "truncated or corrupt TIFF: ...") when it ends.
    """
    logger = logging.getLogger("tifffile")
    errors = _ThreadErrors()
    logger.addHandler(errors)
    try:
        with tifffile.TiffFile(path) as tif:
            len(tif.pages)  # walks the whole IFD chain
            yield tif
    finally:
        logger.removeHandler(errors)
    if errors.messages:
        detail = re.sub(r"^<[^>]*>\s*", "", errors.messages[0])  # "<tifffile.TiffPages @8> "
        raise SourceError(Path(path), f"truncated or corrupt TIFF: {detail}")


def tiff_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of a TIFF's first page, from its header alone."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return int(page.imagelength), int(page.imagewidth)


def read_tiff(
    path: str | os.PathLike,
    *,
    bands: int | None = None,
    dtype: np.dtype | type | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a TIFF as a (C, H, W) array; check band count, dtype and size when given."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(path, "file not found")
    first_page_read = False
    try:
        file_size = path.stat().st_size
        with checked_tiff(path) as tif:
            if not tif.pages or not tif.series:
                raise SourceError(path, "TIFF holds no image")
            for page in tif.pages:
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]
                if ends and max(ends) > file_size:
                    raise SourceError(
                        path, f"truncated TIFF: data runs to byte {max(ends)}, file has {file_size}"
                    )
            first = tif.pages[0]
            first_page_read = True
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes
    except SourceError:
        raise
    except Exception as exc:  # tifffile raises many types (ValueError, TiffFileError, codec errors)
        what = "unreadable TIFF"
        if first_page_read:  # the header was fine: the image data is not
            what = "truncated or corrupt TIFF, image data does not decode"
        raise SourceError(path, f"{what} ({type(exc).__name__}: {exc})") from exc

    height, width = first.imagelength, first.imagewidth
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and axes.endswith("S"):
        array = np.moveaxis(array, -1, 0)
    elif array.ndim != 3:
        raise SourceError(path, f"expected a 2-D or 3-D raster, got shape {array.shape} ({axes})")
    if array.shape[1:] != (height, width):
        raise SourceError(
            path, f"corrupt TIFF: read shape {array.shape}, pages say {height}x{width}"
        )
    if bands is not None and array.shape[0] != bands:
        raise SourceError(path, f"expected {bands} bands, found {array.shape[0]}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise SourceError(path, f"expected dtype {np.dtype(dtype)}, found {array.dtype}")
    if size is not None and array.shape[1:] != tuple(size):
        raise SourceError(path, f"expected {size[0]}x{size[1]} pixels, found {array.shape[1:]}")
    return np.ascontiguousarray(array)


def geotiff_tags(
    epsg: int, origin: tuple[float, float], pixel_size: float | tuple[float, float]
) -> list[tuple]:
    """tifffile `extratags` for a north-up raster: pixel scale, tie point, GeoKeys."""
    sx, sy = (pixel_size, pixel_size) if np.isscalar(pixel_size) else pixel_size
    projected = epsg != 4326
    crs_key = PROJECTED_CS_TYPE_KEY if projected else GEOGRAPHIC_TYPE_KEY
    # Header (version 1.1.0, 3 keys), then (key id, tag location 0 = value inline, count, value).
    geokeys = [1, 1, 0, 3]
    geokeys += [GT_MODEL_TYPE_KEY, 0, 1, 1 if projected else 2]
    geokeys += [GT_RASTER_TYPE_KEY, 0, 1, 1]  # RasterPixelIsArea
    geokeys += [crs_key, 0, 1, int(epsg)]
    return [
        (MODEL_PIXEL_SCALE_TAG, "d", 3, (float(sx), float(sy), 0.0), True),
        (
            MODEL_TIEPOINT_TAG,
            "d",
            6,
            (0.0, 0.0, 0.0, float(origin[0]), float(origin[1]), 0.0),
            True,
        ),
        (GEO_KEY_DIRECTORY_TAG, "H", len(geokeys), geokeys, True),
    ]


def write_geotiff(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    epsg: int = 32633,
    origin: tuple[float, float] = (500000.0, 5000000.0),
    pixel_size: float | tuple[float, float] = 10.0,
    interleave: str = "pixel",
    compression: str | None = None,
) -> Path:
    """Write a (C, H, W) or (H, W) array as a GeoTIFF; `interleave` is "pixel" or "band"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 2:
        data, planar = array, None
    elif array.ndim == 3 and interleave == "pixel":
        data, planar = np.moveaxis(array, 0, -1), "contig"
    elif array.ndim == 3 and interleave == "band":
        data, planar = array, "separate"
    else:
        raise ValueError(f"cannot write shape {array.shape} with interleave={interleave!r}")
    tifffile.imwrite(
        path,
        np.ascontiguousarray(data),
        photometric="minisblack",
        planarconfig=planar,
        compression=compression,
        extratags=geotiff_tags(epsg, origin, pixel_size),
        metadata=None,
    )
    return path
