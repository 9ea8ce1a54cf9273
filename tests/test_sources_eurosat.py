"""EuroSAT reader on fixtures written in the real archive layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from fixtures_scenes import write_eurosat
from PIL import Image

from pimc_dist.sources import eurosat
from pimc_dist.sources.base import SourceError
from pimc_dist.sources.tiff_io import read_tiff, write_geotiff


@pytest.fixture(scope="module")
def eurosat_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eurosat")
    splits = write_eurosat(root, per_class=3, size=32, seed=1)
    return root, splits


@pytest.fixture
def fresh_root(tmp_path):
    """A private copy the test may damage."""
    write_eurosat(tmp_path, per_class=3, size=16, seed=2)
    return tmp_path


def test_fixture_has_the_real_file_layout_dtypes_and_georeferencing(eurosat_root):
    root, splits = eurosat_root
    tif = root / "ds/images/remote_sensing/otherDatasets/sentinel_2/tif/Forest/Forest_2.tif"
    jpg = root / "2750/Forest/Forest_2.jpg"
    with tifffile.TiffFile(tif) as f:
        page = f.pages[0]
        assert (page.imagelength, page.imagewidth, page.samplesperpixel) == (32, 32, 13)
        assert page.dtype == np.uint16
        geo = f.geotiff_metadata
    assert geo["ModelPixelScale"][:2] == [10.0, 10.0]
    assert 32601 <= int(geo["ProjectedCSTypeGeoKey"]) <= 32660  # a UTM zone, as the real files
    with Image.open(jpg) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    for split in ("train", "val", "test"):
        lines = (root / f"eurosat-{split}.txt").read_text().split()
        assert lines == splits[split]
        assert all(line.endswith(".jpg") for line in lines)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [10, 10, 10]


def test_multispectral_records_keep_file_band_order_with_b8a_last(eurosat_root):
    root, _ = eurosat_root
    src = eurosat.EuroSATSource(root, split="train")
    record = src[0]
    assert record.band_names[-1] == "B8A" and record.band_names[8:12] == [
        "B09",
        "B10",
        "B11",
        "B12",
    ]
    assert record.image.shape == (13, 32, 32) and record.image.dtype == np.uint16
    raw = tifffile.imread(src.path(0))  # (H, W, 13) as the file stores it
    np.testing.assert_array_equal(record.image, np.moveaxis(raw, -1, 0))
    assert record.dataset == "eurosat" and record.split == "train"
    assert record.label == eurosat.CLASSES.index(record.patch_id.split("_")[0])


def test_standard_band_order_moves_b8a_between_b08_and_b09(eurosat_root):
    root, _ = eurosat_root
    file_order = eurosat.EuroSATSource(root, split="val")[3]
    standard = eurosat.EuroSATSource(root, split="val", band_order="standard")[3]
    assert standard.band_names == list(eurosat.STANDARD_BANDS)
    assert standard.band_names[7:10] == ["B08", "B8A", "B09"]
    np.testing.assert_array_equal(standard.image[8], file_order.image[12])  # B8A
    np.testing.assert_array_equal(standard.image[12], file_order.image[11])  # B12
    back = eurosat.reorder_bands(standard.image, eurosat.STANDARD_BANDS, eurosat.FILE_BANDS)
    np.testing.assert_array_equal(back, file_order.image)


def test_rgb_records_are_uint8_b04_b03_b02(eurosat_root):
    root, _ = eurosat_root
    src = eurosat.EuroSATSource(root, split="test", multispectral=False)
    record = src[0]
    assert record.image.shape == (3, 32, 32) and record.image.dtype == np.uint8
    assert record.band_names == ["B04", "B03", "B02"]
    with Image.open(src.path(0)) as img:
        np.testing.assert_array_equal(record.image, np.asarray(img).transpose(2, 0, 1))


def test_splits_partition_all_images_with_labels_from_class_names(eurosat_root):
    root, splits = eurosat_root
    everything = eurosat.EuroSATSource(root)
    by_split = {s: eurosat.EuroSATSource(root, split=s) for s in eurosat.SPLITS}
    ids = [i for s in eurosat.SPLITS for i in by_split[s].ids]
    assert sorted(ids) == sorted(everything.ids) and len(set(ids)) == 30
    for s, src in by_split.items():
        assert src.ids == [name.removesuffix(".jpg") for name in splits[s]]
        for pid, label in zip(src.ids, src.labels, strict=True):
            assert eurosat.CLASSES[label] == pid.split("_")[0]


def test_without_split_classes_are_alphabetical_and_numbers_sort_numerically(fresh_root):
    folder = fresh_root / eurosat.MS_DIR / "Forest"
    shutil.copy(folder / "Forest_1.tif", folder / "Forest_10.tif")
    src = eurosat.EuroSATSource(fresh_root)
    forest = [i for i in src.ids if i.startswith("Forest_")]
    assert forest == ["Forest_1", "Forest_2", "Forest_3", "Forest_10"]
    assert src.ids[0] == "AnnualCrop_1" and src.ids[-1] == "SeaLake_3"
    assert sorted(set(src.labels)) == list(range(10))


def test_image_dir_reads_repackaged_copies(fresh_root):
    shutil.move(fresh_root / eurosat.MS_DIR, fresh_root / "EuroSAT_MS")
    src = eurosat.EuroSATSource(fresh_root, split="val", image_dir="EuroSAT_MS")
    assert len(src) == 10 and src[0].image.shape == (13, 16, 16)


def test_split_lines_naming_tif_files_are_accepted(fresh_root):
    (fresh_root / "eurosat-val.txt").write_text("Forest_1.tif\nRiver_2.tif\n")
    src = eurosat.EuroSATSource(fresh_root, split="val")
    assert src.ids == ["Forest_1", "River_2"]
    assert src.labels == [1, 8]


def test_fixture_images_carry_a_class_signal(tmp_path):
    # A nearest-centroid classifier on per-band means separates the classes.
    write_eurosat(tmp_path, per_class=5, rgb=False, size=16, seed=3)

    def features(split):
        src = eurosat.EuroSATSource(tmp_path, split=split)
        records = list(src)
        return np.array([r.image.mean(axis=(1, 2)) for r in records]), np.array(src.labels)

    x_train, y_train = features("train")
    x_test, y_test = features("test")
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y_test).mean() >= 0.9


def test_band_and_pixel_interleaved_tiffs_read_the_same(tmp_path):
    data = np.arange(13 * 5 * 7, dtype=np.uint16).reshape(13, 5, 7)
    write_geotiff(tmp_path / "pixel.tif", data, interleave="pixel")
    write_geotiff(tmp_path / "band.tif", data, interleave="band", compression="zlib")
    np.testing.assert_array_equal(read_tiff(tmp_path / "pixel.tif"), data)
    np.testing.assert_array_equal(read_tiff(tmp_path / "band.tif"), data)


# -- bad input ------------------------------------------------------------------------------


def test_missing_split_file_is_named(fresh_root):
    (fresh_root / "eurosat-val.txt").unlink()
    with pytest.raises(SourceError, match=r"eurosat-val\.txt.*not found"):
        eurosat.EuroSATSource(fresh_root, split="val")


def test_listed_but_missing_image_is_named_with_its_split_file(fresh_root):
    name = (fresh_root / "eurosat-train.txt").read_text().split()[0].removesuffix(".jpg")
    cls = name.split("_")[0]
    (fresh_root / eurosat.MS_DIR / cls / f"{name}.tif").unlink()
    with pytest.raises(SourceError, match=rf"{name}\.tif: listed in eurosat-train\.txt line 1"):
        eurosat.EuroSATSource(fresh_root, split="train")


def test_garbage_line_in_split_file_is_named_with_line_number(fresh_root):
    (fresh_root / "eurosat-test.txt").write_text("Forest_1.jpg\nnot an image\n")
    with pytest.raises(SourceError, match=r"eurosat-test\.txt: line 2"):
        eurosat.EuroSATSource(fresh_root, split="test")


def test_truncated_tif_is_named(fresh_root):
    src = eurosat.EuroSATSource(fresh_root)
    path = src.path(4)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(SourceError, match=rf"{path.name}: (truncated|unreadable|corrupt)"):
        src[4]
    src[5]  # the others still read


def test_tif_with_wrong_band_count_is_named(fresh_root):
    src = eurosat.EuroSATSource(fresh_root)
    write_geotiff(src.path(0), np.zeros((12, 16, 16), np.uint16))
    with pytest.raises(SourceError, match=r"AnnualCrop_1\.tif: expected 13 bands, found 12"):
        src[0]


def test_tif_with_wrong_dtype_is_named(fresh_root):
    src = eurosat.EuroSATSource(fresh_root)
    write_geotiff(src.path(0), np.zeros((13, 16, 16), np.float32))
    with pytest.raises(SourceError, match=r"AnnualCrop_1\.tif: expected dtype uint16"):
        src[0]


@pytest.mark.parametrize("multispectral", [True, False])
def test_image_of_another_size_than_the_first_is_named_with_its_shape(fresh_root, multispectral):
    src = eurosat.EuroSATSource(fresh_root, multispectral=multispectral)
    assert src.image_shape == (16, 16)  # from the first image, AnnualCrop_1
    path = src.path(3)
    if multispectral:
        write_geotiff(path, np.zeros((13, 24, 16), np.uint16))
    else:
        Image.fromarray(np.zeros((24, 16, 3), np.uint8)).save(path)
    with pytest.raises(SourceError, match=rf"{path.name}: expected 16x16 pixels, found \(24, 16\)"):
        src[3]
    src[4]  # the others still read


def test_explicit_image_size_checks_every_image(fresh_root):
    src = eurosat.EuroSATSource(fresh_root, image_size=64)
    with pytest.raises(SourceError, match=r"AnnualCrop_1\.tif: expected 64x64 pixels, found"):
        src[0]
    assert eurosat.EuroSATSource(fresh_root, image_size=16)[0].image.shape == (13, 16, 16)


def test_truncated_jpeg_is_named(fresh_root):
    src = eurosat.EuroSATSource(fresh_root, multispectral=False)
    path = src.path(2)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SourceError, match=rf"{path.name}: unreadable image"):
        src[2]


def test_missing_image_folder_is_named(tmp_path):
    with pytest.raises(SourceError, match=r"2750: EuroSAT image folder not found"):
        eurosat.EuroSATSource(tmp_path, multispectral=False)


def test_unknown_split_name_is_rejected(eurosat_root):
    with pytest.raises(ValueError, match="unknown EuroSAT split"):
        eurosat.EuroSATSource(eurosat_root[0], split="validation")


def test_fixture_command_writes_a_readable_dataset_and_says_where(tmp_path, capsys):
    from fixtures_scenes import main

    main(["eurosat", "--out", str(tmp_path / "e"), "--per-class", "3", "--size", "16"])
    assert f"to {tmp_path / 'e'}" in capsys.readouterr().out
    assert len(eurosat.EuroSATSource(tmp_path / "e", split="train")) == 10
