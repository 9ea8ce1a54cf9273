"""SEN12MS reader on fixtures written in the real ROIs*/s1_*|s2_*|lc_* layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from fixtures_scenes import write_sen12ms

from pimc_dist.sources import sen12ms
from pimc_dist.sources.base import SourceError
from pimc_dist.sources.tiff_io import write_geotiff

# DATASETS.md: forest (1-5), shrubland (6-7), savanna (8-9), grassland (10), wetland (11),
# cropland (12, 14), urban (13), snow/ice (15), barren (16), water (17).
SIMPLIFIED = {
    "Forest": (1, 2, 3, 4, 5),
    "Shrubland": (6, 7),
    "Savanna": (8, 9),
    "Grassland": (10,),
    "Wetland": (11,),
    "Cropland": (12, 14),
    "Urban/Built-up": (13,),
    "Snow/Ice": (15,),
    "Barren": (16,),
    "Water": (17,),
}


@pytest.fixture(scope="module")
def sen_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sen12ms")
    ids = write_sen12ms(root, patches_per_scene=2, size=32, seed=0)
    return root, ids


@pytest.fixture
def fresh_root(tmp_path):
    write_sen12ms(tmp_path, scenes=(("ROIs1158_spring", 5),), patches_per_scene=2, size=16)
    return tmp_path


def _write_triplet(root, season, scene, patch, igbp, *, s1=None, s2=None):
    size = igbp.shape[0]
    paths = sen12ms.triplet_paths(root, season, scene, patch)
    s2 = np.full((13, size, size), 1000, np.uint16) if s2 is None else s2
    s1 = np.full((2, size, size), -12.0, np.float32) if s1 is None else s1
    lc = np.stack([igbp, igbp, igbp, igbp]).astype(np.uint16)
    write_geotiff(paths["s2"], s2)
    write_geotiff(paths["s1"], s1)
    write_geotiff(paths["lc"], lc)
    return paths


def test_fixture_has_the_real_layout_dtypes_and_band_counts(sen_root):
    root, ids = sen_root
    assert ids[0] == "ROIs1158_spring_1_p1" and len(ids) == 8
    expected = {"s2": (13, np.uint16), "s1": (2, np.float32), "lc": (4, np.uint16)}
    for modality, (bands, dtype) in expected.items():
        path = root / "ROIs1970_fall" / f"{modality}_3" / f"ROIs1970_fall_{modality}_3_p4.tif"
        with tifffile.TiffFile(path) as f:
            page = f.pages[0]
            assert (page.samplesperpixel, page.dtype) == (bands, dtype)
            assert f.geotiff_metadata["ModelPixelScale"][:2] == [10.0, 10.0]
    igbp = tifffile.imread(root / "ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p1.tif")[..., 0]
    assert igbp.min() >= 1 and igbp.max() <= 17


def test_reads_every_triplet_in_season_scene_patch_order(sen_root):
    root, ids = sen_root
    src = sen12ms.Sen12MSSource(root)
    assert src.ids == ids
    record = src[5]
    assert record.s2.shape == (13, 32, 32) and record.s2.dtype == np.uint16
    assert record.s1.shape == (2, 32, 32) and record.s1.dtype == np.float32
    assert record.s2_bands[8] == "B8A" and record.s2_bands[10] == "B10"
    assert record.s1_bands == ["VV", "VH"]
    paths = src.paths(5)
    raw_s2 = np.moveaxis(tifffile.imread(paths["s2"]), -1, 0)
    np.testing.assert_array_equal(record.s2, raw_s2)  # the L1C DN as stored
    assert record.s2_dn_scale == 10000.0
    np.testing.assert_array_equal(record.s1, np.moveaxis(tifffile.imread(paths["s1"]), -1, 0))
    assert record.dataset == "sen12ms" and record.meta["season"] == "ROIs1970_fall"


def test_labels_are_simplified_igbp_fractions_at_or_above_threshold(sen_root):
    root, _ = sen_root
    src = sen12ms.Sen12MSSource(root, label_threshold=0.1)
    for index, record in enumerate(src):
        igbp = tifffile.imread(src.paths(index)["lc"])[..., 0]
        fractions = {c: np.isin(igbp, v).mean() for c, v in SIMPLIFIED.items()}
        expected = [c for c in sen12ms.CLASSES if fractions[c] >= 0.1]
        assert record.meta["label_names"] == expected
        assert [sen12ms.CLASSES[i] for i in np.flatnonzero(record.labels)] == expected
        assert record.labels.dtype == np.uint8 and record.labels.shape == (10,)


def test_threshold_is_inclusive_and_configurable(tmp_path):
    igbp = np.full(400, 12)
    igbp[:40] = 17  # water: exactly 10 %
    igbp[40:79] = 13  # urban: 9.75 %
    igbp[79:200] = 14  # cropland mosaic, summed with croplands (12)
    _write_triplet(tmp_path, "ROIs2017_winter", 9, 3, igbp.reshape(20, 20))
    record = sen12ms.Sen12MSSource(tmp_path)[0]
    assert record.meta["label_names"] == ["Cropland", "Water"]
    assert record.meta["class_fractions"][5] == pytest.approx(0.8025)
    strict = sen12ms.Sen12MSSource(tmp_path, label_threshold=0.2)[0]
    assert strict.meta["label_names"] == ["Cropland"]


def test_pixels_outside_igbp_range_are_counted_not_labelled(tmp_path):
    igbp = np.full((10, 10), 16)
    igbp[:5] = 0
    _write_triplet(tmp_path, "ROIs1158_spring", 1, 1, igbp)
    record = sen12ms.Sen12MSSource(tmp_path)[0]
    assert record.meta["igbp_invalid_pixels"] == 50
    assert record.meta["label_names"] == ["Barren"]


def test_seasons_filter_accepts_short_and_full_names(sen_root):
    root, _ = sen_root
    spring = sen12ms.Sen12MSSource(root, seasons=["spring"])
    assert spring.ids == ["ROIs1158_spring_1_p1", "ROIs1158_spring_1_p4"]
    two = sen12ms.Sen12MSSource(root, seasons=["ROIs2017_winter", "fall"])
    assert {i.split("_")[1] for i in two.ids} == {"winter", "fall"}
    with pytest.raises(ValueError, match="unknown SEN12MS season"):
        sen12ms.Sen12MSSource(root, seasons=["monsoon"])


def test_split_file_of_s2_names_selects_patches(sen_root, tmp_path):
    root, _ = sen_root
    listing = tmp_path / "test_list.txt"
    listing.write_text("ROIs1868_summer_s2_2_p4.tif\nROIs1158_spring_s2_1_p1.tif\n")
    src = sen12ms.Sen12MSSource(root, split_file=listing, split="test")
    assert src.ids == ["ROIs1158_spring_1_p1", "ROIs1868_summer_2_p4"]
    assert src[0].split == "test"
    listing.write_text("ROIs1868_summer_s2_2_p99.tif\n")
    with pytest.raises(SourceError, match=r"test_list\.txt: 1 listed patches not found"):
        sen12ms.Sen12MSSource(root, split_file=listing)


def test_split_names_read_the_authors_lists_and_train_is_the_rest(sen_root, tmp_path):
    root, ids = sen_root
    root = shutil.copytree(root, tmp_path / "copy")
    (root / "val_list.txt").write_text("ROIs1970_fall_s2_3_p1.tif\n")
    (root / "test_list.txt").write_text(
        "ROIs1158_spring_s2_1_p4.tif\nROIs2017_winter_s2_4_p1.tif\n"
    )
    val = sen12ms.Sen12MSSource(root, split="val")
    test = sen12ms.Sen12MSSource(root, split="test")
    train = sen12ms.Sen12MSSource(root, split="train")
    assert val.ids == ["ROIs1970_fall_3_p1"] and val[0].split == "val"
    assert test.ids == ["ROIs1158_spring_1_p4", "ROIs2017_winter_4_p1"]
    assert sorted(train.ids + val.ids + test.ids) == sorted(ids) and len(train) == 5
    (root / "train_list.txt").write_text("ROIs1868_summer_s2_2_p1.tif\n")
    assert sen12ms.Sen12MSSource(root, split="train").ids == ["ROIs1868_summer_2_p1"]
    # A list naming patches of other seasons is fine when those seasons are not read.
    assert sen12ms.Sen12MSSource(root, split="test", seasons=["winter"]).ids == [
        "ROIs2017_winter_4_p1"
    ]
    (root / "val_list.txt").unlink()
    with pytest.raises(SourceError, match=r"val_list\.txt: split file not found"):
        sen12ms.Sen12MSSource(root, split="val")
    (root / "train_list.txt").unlink()
    with pytest.raises(SourceError, match=r"train_list\.txt: split list not found"):
        sen12ms.Sen12MSSource(root, split="train")


def test_known_broken_patch_is_left_out_unless_asked(fresh_root):
    igbp = np.full((16, 16), 10)
    _write_triplet(fresh_root, "ROIs1868_summer", 146, 202, igbp)
    assert "ROIs1868_summer_146_p202" not in sen12ms.Sen12MSSource(fresh_root).ids
    keep = sen12ms.Sen12MSSource(fresh_root, drop_known_broken=False)
    assert "ROIs1868_summer_146_p202" in keep.ids


def test_authors_normalisation_helpers():
    s1 = np.array([-30.0, -25.0, -12.5, 0.0, 3.0, np.nan], np.float32)
    np.testing.assert_allclose(sen12ms.normalize_s1(s1), [0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    s2 = np.array([-0.01, 0.0, 0.25, 1.0, 1.5], np.float32)
    np.testing.assert_allclose(sen12ms.normalize_s2(s2), [0.0, 0.0, 0.25, 1.0, 1.0])


def test_fixture_carries_a_class_signal(sen_root):
    root, _ = sen_root
    src = sen12ms.Sen12MSSource(root)
    ndvi_by_class: dict[int, list[float]] = {}
    vv_by_class: dict[int, list[float]] = {}
    for index, record in enumerate(src):
        igbp = tifffile.imread(src.paths(index)["lc"])[..., 0]
        simple = sen12ms.IGBP_TO_SIMPLIFIED[igbp]
        red, nir = record.s2[[3, 7]].astype(np.float32)  # uint16 DN: no wrapping differences
        ndvi = (nir - red) / (nir + red)
        for c in np.unique(simple):
            ndvi_by_class.setdefault(int(c), []).append(float(ndvi[simple == c].mean()))
            vv_by_class.setdefault(int(c), []).append(float(record.s1[0][simple == c].mean()))
    means = {c: np.mean(v) for c, v in ndvi_by_class.items()}
    # The seed-0 fixture holds forest, cropland, snow and water pixels (among others).
    assert min(means[0], means[5]) > max(means[7], means[9])  # vegetation has higher NDVI
    vv = {c: np.mean(v) for c, v in vv_by_class.items()}
    assert vv[0] > vv[9] + 5.0  # forest backscatters more than calm water


# -- bad input ------------------------------------------------------------------------------


def test_missing_s1_counterpart_is_named(fresh_root):
    path = fresh_root / "ROIs1158_spring/s1_5/ROIs1158_spring_s1_5_p4.tif"
    path.unlink()
    with pytest.raises(SourceError, match=r"ROIs1158_spring_s1_5_p4\.tif: s1 file of"):
        sen12ms.Sen12MSSource(fresh_root)


def test_truncated_s2_is_named(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    path = src.paths(1)["s2"]
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SourceError, match=rf"{path.name}: (truncated|unreadable|corrupt)"):
        src[1]
    src[0]


def test_s2_with_wrong_band_count_is_named(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    write_geotiff(src.paths(0)["s2"], np.zeros((12, 16, 16), np.uint16))
    with pytest.raises(SourceError, match=r"_s2_5_p1\.tif: expected 13 bands, found 12"):
        src[0]


def test_s2_of_another_size_is_named_not_its_s1_counterpart(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    assert src.image_shape == (16, 16)
    write_geotiff(src.paths(1)["s2"], np.zeros((13, 8, 8), np.uint16))
    path = src.paths(1)["s2"]
    with pytest.raises(SourceError, match=rf"{path.name}: expected 16x16 pixels, found \(8, 8\)"):
        src[1]
    src[0]
    with pytest.raises(SourceError, match=r"_s2_5_p1\.tif: expected 256x256 pixels"):
        sen12ms.Sen12MSSource(fresh_root, image_size=256)[0]


def test_s1_with_wrong_dtype_is_named(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    write_geotiff(src.paths(0)["s1"], np.zeros((2, 16, 16), np.uint16))
    with pytest.raises(SourceError, match=r"_s1_5_p1\.tif: expected dtype float32"):
        src[0]


def test_land_cover_of_another_size_is_named(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    write_geotiff(src.paths(0)["lc"], np.ones((4, 8, 8), np.uint16))
    with pytest.raises(SourceError, match=r"_lc_5_p1\.tif: expected 16x16 pixels"):
        src[0]


def test_nan_in_s1_is_named(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    s1 = np.full((2, 16, 16), -10.0, np.float32)
    s1[1, 3, 4] = np.nan
    write_geotiff(src.paths(1)["s1"], s1)
    with pytest.raises(SourceError, match=r"_s1_5_p4\.tif: holds NaN"):
        src[1]


def test_land_cover_without_igbp_values_is_named(fresh_root):
    src = sen12ms.Sen12MSSource(fresh_root)
    write_geotiff(src.paths(0)["lc"], np.zeros((4, 16, 16), np.uint16))
    with pytest.raises(SourceError, match=r"_lc_5_p1\.tif: IGBP layer has no value in 1-17"):
        src[0]


def test_root_without_patches_is_named(tmp_path):
    (tmp_path / "ROIs1158_spring").mkdir()
    with pytest.raises(SourceError, match="no SEN12MS s2 patches"):
        sen12ms.Sen12MSSource(tmp_path)
    shutil.rmtree(tmp_path / "ROIs1158_spring")
    with pytest.raises(SourceError, match="season folder not found"):
        sen12ms.Sen12MSSource(tmp_path, seasons=["spring"])


def test_fixture_command_writes_a_readable_dataset_and_says_where(tmp_path, capsys):
    from fixtures_scenes import main

    main(["sen12ms", "--out", str(tmp_path / "s"), "--size", "16", "--patches-per-scene", "1"])
    assert f"wrote 4 SEN12MS triplets to {tmp_path / 's'}" in capsys.readouterr().out
    assert len(sen12ms.Sen12MSSource(tmp_path / "s")) == 4
