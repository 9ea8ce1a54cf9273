"""Records -> shard samples: crops (centring, padding, source), composites, sample views."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import numpy as np
import pytest

from pimc_dist import indices, recurrence
from pimc_dist import pixel_selection as sampling
from pimc_dist.samples import (
    MAX_KEY_LENGTH,
    META_TABLES,
    PixelSampling,
    centred_crops,
    check_crop_source,
    crop_image,
    median_composite,
    mosaic_sample,
    pimc_samples,
    sample_key,
    scene_sample,
    storage_dtype,
)
from pimc_dist.sources.base import MultimodalPatch, ScenePatch, TimeSeriesPatch
from pimc_dist.sources.fixtures import write_pastis
from pimc_dist.sources.pastis import VOID_LABEL, PastisSource

SAMPLING = PixelSampling(
    pixels_per_patch=12,
    exclude_labels=(VOID_LABEL,),
    grid_start=dt.date(2018, 9, 15),
    grid_length=42,
    crop_size=8,
)


@pytest.fixture(scope="module")
def pastis(tmp_path_factory) -> Path:
    return write_pastis(tmp_path_factory.mktemp("pastis"), n_patches=2, size=24, seed=3)


def _image(channels: int = 2, height: int = 7, width: int = 9) -> np.ndarray:
    return np.arange(channels * height * width, dtype=np.int16).reshape(channels, height, width)


# --- crops --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4, 5, 8])
def test_crop_puts_the_pixel_at_index_size_over_two(size):
    image = _image()
    pixel = np.array([[3, 4]])
    crops, padded = centred_crops(image, pixel, size)
    assert crops.shape == (1, 2, size, size)
    assert (crops[0, :, size // 2, size // 2] == image[:, 3, 4]).all()
    # The crop covers rows r - size//2 .. r + (size-1)//2: for even sizes one more row above.
    top, left = 3 - size // 2, 4 - size // 2
    if top >= 0 and left >= 0 and top + size <= 7 and left + size <= 9:
        assert (crops[0] == image[:, top : top + size, left : left + size]).all()
        assert not padded[0]


@pytest.mark.parametrize("size", [5, 8])
def test_border_pixel_crops_equal_the_edge_padded_image(size):
    image = _image()
    corners = np.array([[0, 0], [6, 8], [0, 8], [6, 0], [3, 0]])
    crops, padded = centred_crops(image, corners, size)
    margin = size  # generous: any pad at least as wide gives the same window
    reference = np.pad(image, ((0, 0), (margin, margin), (margin, margin)), mode="edge")
    for crop, (r, c) in zip(crops, corners, strict=True):
        top, left = r + margin - size // 2, c + margin - size // 2
        assert (crop == reference[:, top : top + size, left : left + size]).all()
        assert crop[0, size // 2, size // 2] == image[0, r, c]
    assert padded.all()


def test_padding_flag_is_exact_at_the_limits():
    image = _image(1, 10, 10)
    # size 6: 3 cells before, 2 after; rows 3..7 need no padding.
    pixels = np.array([[3, 3], [7, 7], [2, 5], [5, 8], [8, 5]])
    _, padded = centred_crops(image, pixels, 6)
    assert padded.tolist() == [False, False, True, True, True]


def test_crop_size_zero_is_refused():
    with pytest.raises(ValueError, match="crop size"):
        centred_crops(_image(), np.array([[1, 1]]), 0)


# --- composites ---------------------------------------------------------------------------


def _nanmedian_reference(bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
    values = np.where(valid[:, None], bands.astype(np.float64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(values, axis=0)
        fallback = np.nanmedian(bands.astype(np.float64), axis=0)
    median = np.where(np.isfinite(median), median, fallback)
    return np.where(np.isfinite(median), median, 0.0)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32])
def test_median_composite_matches_nanmedian_over_valid_dates(dtype):
    rng = np.random.default_rng(0)
    bands = rng.integers(0, 9000, (8, 3, 6, 5)).astype(dtype)
    valid = rng.random((8, 6, 5)) > 0.4
    valid[:, 0, 0] = False  # no valid date: falls back to the median of every date
    valid[:, 1, 1] = False
    valid[3, 1, 1] = True  # exactly one valid date
    if dtype == np.float32:
        bands[2, 1, 4, 4] = np.nan
        bands[:, 2, 5, 0] = np.nan  # never finite: becomes 0
        valid[:, 5, 0] = True
    got = median_composite(bands, valid)
    expected = _nanmedian_reference(bands, valid)
    if dtype != np.float32:
        expected = np.rint(expected)
        assert got.dtype == dtype
    else:
        assert got.dtype == np.float32
    np.testing.assert_array_equal(got.astype(np.float64), expected.astype(got.dtype))
    assert got[:, 1, 1].tolist() == bands[3, :, 1, 1].tolist()
    if dtype == np.float32:
        assert got[2, 5, 0] == 0


def test_median_composite_rounds_even_counts_half_to_even():
    bands = np.array([1, 2, 3, 4], dtype=np.int16).reshape(4, 1, 1, 1)  # median 2.5
    assert median_composite(bands)[0, 0, 0] == 2
    bands = np.array([2, 3, 4, 5], dtype=np.int16).reshape(4, 1, 1, 1)  # median 3.5
    assert median_composite(bands)[0, 0, 0] == 4


def test_uint16_images_are_not_wrapped_into_int16():
    bands = np.full((3, 1, 4, 4), 65535, dtype=np.uint16)  # saturated L1C values
    patch = TimeSeriesPatch("p", bands, ["B02"], [dt.date(2020, 1, d) for d in (1, 2, 3)], "x")
    assert crop_image(patch).dtype == np.uint16
    assert (crop_image(patch) == 65535).all()
    assert crop_image(patch, "date:-1").dtype == np.uint16
    assert storage_dtype(np.int32) == np.float32 and storage_dtype(np.uint8) == np.uint8


def test_crop_source_date_takes_that_acquisition(pastis):
    patch = PastisSource(pastis)[0]
    bands = np.asarray(patch.bands)
    np.testing.assert_array_equal(crop_image(patch, "date:3"), bands[3])
    np.testing.assert_array_equal(crop_image(patch, "date:-1"), bands[-1])
    with pytest.raises(ValueError, match=f"patch {patch.patch_id} has {bands.shape[0]} dates"):
        crop_image(patch, f"date:{bands.shape[0]}")
    for bad in ("mean", "date:", "date:x"):
        with pytest.raises(ValueError, match="crop_source must be"):
            check_crop_source(bad)
    assert check_crop_source("median") is None and check_crop_source("date:-2") == -2


# --- PIMC samples -------------------------------------------------------------------------


def test_pimc_samples_one_per_sampled_pixel_with_all_views(pastis):
    patch = PastisSource(pastis)[1]
    made, notes = pimc_samples(patch, SAMPLING)
    assert notes == []
    result = indices.index_series(
        patch.bands,
        patch.band_names,
        patch.dates,
        valid=patch.valid,
        step_days=10,
        start=dt.date(2018, 9, 15),
        length=42,
    )
    pixels = sampling.sample_pixels(
        ~result.all_invalid,
        12,
        labels=patch.labels,
        stratify=True,
        exclude_labels=(VOID_LABEL,),
        seed=sampling.patch_seed(0, patch.patch_id),
    )
    assert [(s["json"]["row"], s["json"]["col"]) for s in made] == [tuple(p) for p in pixels]
    assert len({s["__key__"] for s in made}) == len(made) == 12
    composite = median_composite(np.asarray(patch.bands), patch.valid)
    padded = np.pad(composite, ((0, 0), (4, 3), (4, 3)), mode="edge")
    grid = [d.isoformat() for d in result.grid_dates]
    for sample in made:
        meta = sample["json"]
        r, c = meta["row"], meta["col"]
        series = result.series[:, :, r, c].astype(np.float16)
        np.testing.assert_array_equal(sample["series.npy"], series)
        assert sample["series.npy"].dtype == np.float16 and series.shape == (3, 42)
        plot = recurrence.recurrence_plot_uint8(series.astype(np.float32)[None])[0]
        np.testing.assert_array_equal(sample["rp.png"], plot)
        assert sample["rp.png"].shape == (3, 42, 42) and sample["rp.png"].dtype == np.uint8
        np.testing.assert_array_equal(sample["rsi.npy"], padded[:, r : r + 8, c : c + 8])
        assert sample["rsi.npy"].dtype == np.int16
        assert meta["patch"] == patch.patch_id and meta["dataset"] == "pastis"
        assert meta["dates"] == grid
        # One list per patch: the writer hashes it once for its metadata table (META_TABLES).
        assert meta["dates"] is made[0]["json"]["dates"] and "dates" in META_TABLES
        assert meta["fold"] == patch.fold
        assert meta["label"] == int(patch.labels[r, c]) != VOID_LABEL
        assert meta["parcel"] == int(patch.parcels[r, c])
        assert meta["crop_padded"] == (r < 4 or c < 4 or r + 3 >= 24 or c + 3 >= 24)
        assert sample["__key__"] == f"{patch.patch_id}_r{r:04d}_c{c:04d}"


def test_pastis_r_samples_add_the_s1_crop_of_each_orbits_median(tmp_path):
    root = write_pastis(tmp_path, n_patches=1, size=24, seed=4, with_s1=True)
    patch = PastisSource(root, with_s1=True)[0]
    made, _ = pimc_samples(patch, SAMPLING)
    plain, _ = pimc_samples(PastisSource(root)[0], SAMPLING)
    assert [s["__key__"] for s in made] == [s["__key__"] for s in plain]  # the same pixels
    raw = [np.load(root / f"DATA_{o}" / f"{o}_{patch.patch_id}.npy") for o in ("S1A", "S1D")]
    for sample in made:
        r, c = sample["json"]["row"], sample["json"]["col"]
        assert sample["s1.npy"].shape == (6, 8, 8) and sample["s1.npy"].dtype == np.float32
        centre = np.concatenate([np.median(a[:, :, r, c], axis=0) for a in raw])
        np.testing.assert_allclose(sample["s1.npy"][:, 4, 4], centre, rtol=1e-6)
        assert sample["json"]["s1_bands"][:3] == ["S1A_VV", "S1A_VH", "S1A_VV/VH"]
        assert sample["json"]["s1_bands"][3] == "S1D_VV"
    assert "s1.npy" not in plain[0]


def test_rp_size_resizes_the_plots(pastis):
    made, _ = pimc_samples(PastisSource(pastis)[0], PixelSampling(pixels_per_patch=3, rp_size=16))
    assert made[0]["rp.png"].shape == (3, 16, 16)


def _float_patch(n_dates: int = 6, size: int = 8) -> TimeSeriesPatch:
    rng = np.random.default_rng(1)
    bands = rng.uniform(500, 4000, (n_dates, 3, size, size)).astype(np.float32)
    dates = [dt.date(2020, 3, 1) + dt.timedelta(days=10 * k) for k in range(n_dates)]
    return TimeSeriesPatch("f1", bands, ["B02", "B04", "B08"], dates, "test")


def test_all_nan_pixel_is_never_sampled_and_counted():
    patch = _float_patch()
    patch.bands[:, :, 2, 3] = np.nan
    made, notes = pimc_samples(patch, PixelSampling(pixels_per_patch=64, crop_size=3))
    assert notes == ["1 of 64 pixels have no valid observation"]
    assert len(made) == 63
    assert (2, 3) not in {(s["json"]["row"], s["json"]["col"]) for s in made}
    for sample in made:  # the NaN pixel's composite became 0, never NaN
        assert np.isfinite(sample["rsi.npy"]).all() and sample["rsi.npy"].dtype == np.float32
    neighbour = next(s for s in made if (s["json"]["row"], s["json"]["col"]) == (2, 2))
    assert (neighbour["rsi.npy"][:, 1, 2] == 0).all()


def test_patch_without_valid_pixel_gives_no_sample_and_a_note():
    patch = _float_patch()
    patch.bands[:] = np.nan
    made, notes = pimc_samples(patch, PixelSampling())
    assert made == [] and notes == ["none of its 64 pixels has a valid observation"]


def test_patch_with_only_excluded_labels_gives_no_sample():
    patch = _float_patch()
    patch.labels = np.full((8, 8), VOID_LABEL)
    made, notes = pimc_samples(patch, PixelSampling(exclude_labels=(VOID_LABEL,)))
    assert made == [] and "no pickable pixel" in notes[-1]


# --- MoSAiC and scene samples -------------------------------------------------------------


def _mosaic(**changes) -> MultimodalPatch:
    rng = np.random.default_rng(2)
    fields = dict(
        patch_id="S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26.57",
        s2=rng.integers(0, 20000, (12, 8, 8), dtype=np.uint16),
        s2_bands=[f"B{i}" for i in range(12)],
        s1=-rng.random((2, 8, 8), dtype=np.float32) * 20,
        s1_bands=["VV", "VH"],
        labels=np.array([0, 1, 0, 1], dtype=np.uint8),
        dataset="reben",
        split="train",
    )
    fields.update(changes)
    return MultimodalPatch(**fields)


@pytest.mark.parametrize("s2_dtype", [np.uint16, np.float32])  # nearest / bilinear resampling
def test_mosaic_sample_keeps_the_reader_arrays_exactly_with_multi_hot_labels(s2_dtype):
    rng = np.random.default_rng(5)
    s2 = rng.integers(0, 20000, (12, 8, 8)).astype(s2_dtype) + (
        0.37 if s2_dtype == np.float32 else 0
    )
    # Values float16 would round: DN above 2048 and dB with more than 3 significant digits.
    patch = _mosaic(s2=s2.astype(s2_dtype), s1=np.full((2, 8, 8), -12.3456, np.float32))
    sample = mosaic_sample(patch, ["a", "b", "c", "d"])
    assert sample["__key__"] == "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57"
    for view, array in (("s2.npy", patch.s2), ("s1.npy", patch.s1)):
        assert sample[view].dtype == array.dtype
        assert sample[view].tobytes() == array.tobytes()
    assert sample["json"]["labels"] == [0, 1, 0, 1]
    assert sample["json"]["label_names"] == ["b", "d"]
    assert sample["json"]["s2_dn_scale"] == 10000.0
    assert sample["json"]["patch"] == patch.patch_id  # the real id, unchanged


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"s1": np.full((2, 8, 8), np.nan, np.float32)}, "s1 has NaN"),
        ({"s2": np.full((12, 8, 8), np.inf, np.float32)}, "s2 has NaN or infinite"),
        ({"labels": np.array([0, 1, 0], np.uint8)}, "labels must be a \\(4,\\) 0/1 vector"),
        ({"labels": np.array([0, 2, 0, 0], np.uint8)}, "0/1 vector"),
    ],
)
def test_mosaic_sample_refuses_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        mosaic_sample(_mosaic(**changes), ["a", "b", "c", "d"])


def test_scene_dtype_does_not_depend_on_the_values():
    dim = ScenePatch("Forest_1", np.full((13, 4, 4), 100, np.uint16), ["B01"] * 13, 1, "eurosat")
    bright = ScenePatch("Forest_2", np.full((13, 4, 4), 60000, np.uint16), ["B01"] * 13, 1, "e")
    a, b = scene_sample(dim, ["x", "Forest"]), scene_sample(bright, ["x", "Forest"])
    assert a["image.npy"].dtype == b["image.npy"].dtype == np.uint16
    assert (b["image.npy"] == 60000).all()
    assert a["json"]["label_name"] == "Forest"
    with pytest.raises(ValueError, match="label 5 outside"):
        scene_sample(ScenePatch("y", dim.image, dim.band_names, 5, "e"), ["x", "Forest"])


def test_sample_keys_are_safe_and_distinct():
    assert sample_key("ROIs1158_spring_1_p30") == "ROIs1158_spring_1_p30"
    assert sample_key("my file.v2") == "my_file_v2"
    long_a, long_b = "a" * 200, "a" * 199 + "b"
    assert len(sample_key(long_a)) == MAX_KEY_LENGTH
    assert sample_key(long_a) != sample_key(long_b)
