"""Damaged compressed (Geo)TIFFs say they are truncated or corrupt, naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pimc_dist.sources import SourceError
from pimc_dist.sources.geotiff_stack import GeoTiffStackSource
from pimc_dist.sources.tiff_io import read_tiff, write_geotiff

BANDS = 16


def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 3000, (BANDS, 32, 32)).astype(np.uint16)


def one_page_per_band(path) -> list[int]:
    """A deflate TIFF written by tifffile with one page per band; returns the page offsets."""
    tifffile.imwrite(path, image(), compression="deflate", photometric="minisblack", metadata=None)
    with tifffile.TiffFile(path) as tif:
        return [page.offset for page in tif.pages]


def cut(path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


@pytest.mark.parametrize("interleave", ["pixel", "band"])
@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_a_truncated_deflate_geotiff_says_truncated(tmp_path, interleave, keep):
    path = write_geotiff(tmp_path / "s2.tif", image(), compression="deflate", interleave=interleave)
    assert np.array_equal(read_tiff(path, bands=BANDS), image())
    cut(path, int(path.stat().st_size * keep))
    with pytest.raises(SourceError, match=r"s2\.tif: truncated TIFF: data runs to byte"):
        read_tiff(path, bands=BANDS)


def test_a_multipage_tiff_cut_between_pages_says_truncated_not_one_band(tmp_path):
    path = tmp_path / "stack.tif"
    offsets = one_page_per_band(path)
    cut(path, offsets[1])  # page 0 whole, the chain to the next 15 pages cut off
    with pytest.raises(SourceError, match=r"stack\.tif: truncated or corrupt TIFF: invalid page"):
        read_tiff(path, bands=BANDS)
    # The GeoTIFF stack source said "has 1 bands, expected 16" here.
    with pytest.raises(SourceError, match=r"stack\.tif: truncated or corrupt TIFF: invalid page"):
        GeoTiffStackSource(
            path, dates=[f"2020-01-{d:02d}" for d in range(1, 9)], band_names=["B4", "B8"]
        )


def test_corrupt_compressed_data_says_corrupt_naming_the_file(tmp_path):
    path = write_geotiff(tmp_path / "s2.tif", image(), compression="deflate")
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 256] = bytes(b ^ 0xFF for b in raw[mid : mid + 256])  # same size
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"s2\.tif: truncated or corrupt TIFF, image data does"):
        read_tiff(path, bands=BANDS)
