"""PASTIS reader on the fixture generator's real layout; bad files; the planted structure."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from pimc_dist.sources.base import SourceError
from pimc_dist.sources.fixtures import main, write_pastis
from pimc_dist.sources.pastis import (
    CLASSES,
    FOLD_ROTATION,
    REFERENCE_DATE,
    S1_BANDS,
    S2_BANDS,
    VOID_LABEL,
    PastisSource,
    folds_for_split,
    read_metadata,
    read_norm,
)

WINTER_CEREALS = [2, 4, 10, 11, 17]
SUMMER_CROPS = [3, 7, 9, 13, 15, 18]


@pytest.fixture(scope="module")
def pastis(tmp_path_factory) -> Path:
    """Six 32 px PASTIS-R patches with real-length date lists."""
    return write_pastis(tmp_path_factory.mktemp("pastis"), n_patches=6, size=32, with_s1=True)


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A throw-away three-patch PASTIS-R copy for the bad-input tests to damage."""
    return write_pastis(
        tmp_path / "PASTIS", n_patches=3, size=16, n_dates_range=(5, 8), with_s1=True, seed=1
    )


def _features(root: Path) -> list[dict]:
    return json.loads((root / "metadata.geojson").read_text())["features"]


def _first_id(root: Path) -> int:
    return min(f["properties"]["ID_PATCH"] for f in _features(root))


def _edit_metadata(root: Path, edit) -> None:
    collection = json.loads((root / "metadata.geojson").read_text())
    edit(collection["features"][0]["properties"])
    (root / "metadata.geojson").write_text(json.dumps(collection))


# --- reading ------------------------------------------------------------------------------


def test_reader_yields_every_patch_with_real_shapes_dtypes_and_dates(pastis):
    source = PastisSource(pastis)
    assert len(source) == 6
    assert source.patch_ids == sorted(source.patch_ids, key=int)
    for patch in source:
        T = len(patch.dates)
        assert 38 <= T <= 61
        assert patch.bands.shape == (T, 10, 32, 32) and patch.bands.dtype == np.int16
        assert patch.band_names == S2_BANDS
        assert all(isinstance(d, dt.date) for d in patch.dates)
        assert patch.dates == sorted(patch.dates)
        assert REFERENCE_DATE <= patch.dates[0] and patch.dates[-1] <= dt.date(2019, 11, 1)
        assert patch.meta["days"] == [(d - REFERENCE_DATE).days for d in patch.dates]
        assert patch.labels.shape == (32, 32) and patch.labels.dtype == np.int64
        assert 0 <= patch.labels.min() and patch.labels.max() < len(CLASSES)
        assert patch.parcels.shape == (32, 32)
        assert patch.valid.shape == (T, 32, 32) and patch.valid.dtype == bool
        assert (patch.dn_scale, patch.dn_offset) == (10000.0, 0.0)
        assert patch.dataset == "pastis" and patch.fold in (1, 2, 3, 4, 5)
        assert patch.meta["tile"].startswith("T")


def test_records_match_the_files_and_metadata_on_disk(pastis):
    features = {f["properties"]["ID_PATCH"]: f["properties"] for f in _features(pastis)}
    for patch in PastisSource(pastis):
        props = features[int(patch.patch_id)]
        assert patch.fold == props["Fold"]
        raw_dates = [props["dates-S2"][str(i)] for i in range(len(props["dates-S2"]))]
        assert [int(d.strftime("%Y%m%d")) for d in patch.dates] == raw_dates
        target = np.load(pastis / "ANNOTATIONS" / f"TARGET_{patch.patch_id}.npy")
        assert target.shape == (3, 32, 32)
        np.testing.assert_array_equal(patch.labels, target[0])
        parcels = np.load(pastis / "ANNOTATIONS" / f"ParcelIDs_{patch.patch_id}.npy")
        np.testing.assert_array_equal(patch.parcels, parcels)
        np.testing.assert_array_equal(
            patch.bands, np.load(pastis / "DATA_S2" / f"S2_{patch.patch_id}.npy")
        )
        assert patch.meta["n_parcel"] == props["N_Parcel"]


def test_labelled_parcels_carry_ids_and_background_does_not(pastis):
    for patch in PastisSource(pastis):
        crop = (patch.labels > 0) & (patch.labels != VOID_LABEL)
        assert np.all(patch.parcels[crop] > 0)
        assert np.all(patch.parcels[patch.labels == 0] == 0)
        # one class per parcel
        for pid in np.unique(patch.parcels[patch.parcels > 0]):
            assert len(np.unique(patch.labels[patch.parcels == pid])) == 1


def test_fold_rotation_splits_are_disjoint_and_cover_everything(pastis):
    all_ids = set(PastisSource(pastis).patch_ids)
    for k, (train, val, test) in enumerate(FOLD_ROTATION):
        parts = {
            s: PastisSource(pastis, split=s, fold_rotation=k) for s in ("train", "val", "test")
        }
        ids = {s: set(src.patch_ids) for s, src in parts.items()}
        assert ids["train"] | ids["val"] | ids["test"] == all_ids
        assert not (
            ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"]
        )
        for split, folds in zip(("train", "val", "test"), (train, val, test), strict=True):
            assert parts[split].folds == folds
            assert all(p.fold in folds and p.split == split for p in parts[split])


def test_folds_select_patches_and_bad_selections_are_rejected(pastis):
    by_fold = {p.patch_id: p.fold for p in PastisSource(pastis)}
    chosen = PastisSource(pastis, folds=[2, 5])
    assert set(chosen.patch_ids) == {i for i, f in by_fold.items() if f in (2, 5)}
    assert folds_for_split("val", 3) == (2,)
    with pytest.raises(ValueError, match="either folds or split"):
        PastisSource(pastis, folds=[1], split="train")
    with pytest.raises(ValueError, match="split"):
        PastisSource(pastis, split="validation")
    with pytest.raises(ValueError, match="fold_rotation"):
        PastisSource(pastis, split="train", fold_rotation=5)
    with pytest.raises(ValueError, match="folds"):
        PastisSource(pastis, folds=[0, 1])


def test_with_s1_reads_both_orbits_with_their_own_dates(pastis):
    for patch in PastisSource(pastis, with_s1=True):
        assert patch.meta["s1_bands"] == S1_BANDS == patch.s1_bands
        assert list(patch.s1) == ["S1A", "S1D"]
        for orbit in ("s1a", "s1d"):
            series, dates = patch.meta[orbit], patch.meta["dates_" + orbit]
            assert series.shape == (len(dates), 3, 32, 32) and series.dtype.kind == "f"
            assert 60 <= len(dates) <= 75
            assert patch.s1[orbit.upper()] is series
    assert PastisSource(pastis)[0].s1 is None


def test_mmap_false_loads_the_same_values_into_memory(pastis):
    mapped = PastisSource(pastis, mmap=True)[0]
    loaded = PastisSource(pastis, mmap=False)[0]
    assert isinstance(mapped.bands, np.memmap) and not isinstance(loaded.bands, np.memmap)
    np.testing.assert_array_equal(mapped.bands, loaded.bands)


def test_all_zero_pixels_are_invalid_and_nothing_else(tiny):
    pid = _first_id(tiny)
    path = tiny / "DATA_S2" / f"S2_{pid}.npy"
    s2 = np.load(path)
    s2[2, :, 3, 4] = 0
    s2[0, :5, 0, 0] = 0  # some bands zero is still data
    np.save(path, s2)
    patch = PastisSource(tiny)[0]
    assert not patch.valid[2, 3, 4]
    assert patch.valid[0, 0, 0]
    np.testing.assert_array_equal(patch.valid, np.any(s2 != 0, axis=1))


def test_norm_averages_the_statistics_of_the_folds_in_use(pastis):
    stats = json.loads((pastis / "NORM_S2_patch.json").read_text())
    source = PastisSource(pastis, split="train", fold_rotation=1)
    mean, std = source.norm_s2()
    expected_mean = np.mean([stats[f"Fold_{f}"]["mean"] for f in (2, 3, 4)], axis=0)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    assert mean.shape == std.shape == (10,) and np.all(std > 0)
    # statistics describe the data: blue is darker than NIR on vegetated land
    assert mean[S2_BANDS.index("B02")] < mean[S2_BANDS.index("B08")]
    s1_mean, _ = read_norm(pastis, (1, 2, 3, 4, 5), "S1A")
    assert s1_mean.shape == (3,)


# --- bad input ----------------------------------------------------------------------------


def test_missing_metadata_is_named(tmp_path):
    with pytest.raises(SourceError, match="metadata.geojson"):
        PastisSource(tmp_path)


def test_malformed_geojson_is_named(tiny):
    text = (tiny / "metadata.geojson").read_text()
    (tiny / "metadata.geojson").write_text(text[: len(text) // 2])
    with pytest.raises(SourceError, match=r"metadata\.geojson.*not readable as JSON"):
        PastisSource(tiny)


def test_geojson_without_features_is_rejected(tiny):
    (tiny / "metadata.geojson").write_text(json.dumps({"type": "Feature"}))
    with pytest.raises(SourceError, match="FeatureCollection"):
        PastisSource(tiny)


def test_feature_missing_a_key_is_named(tiny):
    _edit_metadata(tiny, lambda props: props.pop("Fold"))
    with pytest.raises(SourceError, match="lacks property 'Fold'"):
        PastisSource(tiny)


def test_unparseable_date_is_named(tiny):
    _edit_metadata(tiny, lambda props: props["dates-S2"].update({"1": "2019-13-45"}))
    with pytest.raises(SourceError, match="dates-S2"):
        PastisSource(tiny)


def test_fold_out_of_range_is_named(tiny):
    _edit_metadata(tiny, lambda props: props.update({"Fold": 7}))
    with pytest.raises(SourceError, match="Fold 7"):
        PastisSource(tiny)


def test_missing_npy_fails_up_front(tiny):
    pid = _first_id(tiny)
    (tiny / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy").unlink()
    with pytest.raises(SourceError, match=f"ParcelIDs_{pid}.npy: missing"):
        PastisSource(tiny)


def test_truncated_npy_is_named_when_read_and_by_verify(tiny):
    pid = _first_id(tiny)
    path = tiny / "DATA_S2" / f"S2_{pid}.npy"
    path.write_bytes(path.read_bytes()[:-100])
    source = PastisSource(tiny)  # existence check passes: validation is lazy
    with pytest.raises(SourceError, match=f"S2_{pid}.npy: truncated"):
        source[0]
    with pytest.raises(SourceError, match="truncated"):
        source.verify()
    source[1]  # the other patches still read


def test_garbage_npy_is_named(tiny):
    pid = _first_id(tiny)
    (tiny / "ANNOTATIONS" / f"TARGET_{pid}.npy").write_bytes(b"not a numpy file at all" * 4)
    with pytest.raises(SourceError, match=f"TARGET_{pid}.npy: not a readable .npy"):
        PastisSource(tiny)[0]


def test_date_count_mismatch_is_named(tiny):
    pid = _first_id(tiny)
    path = tiny / "DATA_S2" / f"S2_{pid}.npy"
    np.save(path, np.load(path)[1:])
    with pytest.raises(SourceError, match=f"S2_{pid}.npy: has .* dates but metadata.geojson lists"):
        PastisSource(tiny)[0]


def test_wrong_band_count_is_named(tiny):
    pid = _first_id(tiny)
    path = tiny / "DATA_S2" / f"S2_{pid}.npy"
    np.save(path, np.load(path)[:, :9])
    with pytest.raises(SourceError, match=r"expected \(T, 10, H, W\)"):
        PastisSource(tiny)[0]


def test_image_size_mismatch_between_files_is_named(tiny):
    pid = _first_id(tiny)
    path = tiny / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    np.save(path, np.load(path)[:, :15])
    with pytest.raises(SourceError, match=f"TARGET_{pid}.npy: is \\(15, 16\\) px"):
        PastisSource(tiny)[0]
    parcels = tiny / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy"
    np.save(path, np.zeros((3, 16, 16), np.uint8))
    np.save(parcels, np.zeros((16, 17), np.int32))
    with pytest.raises(SourceError, match=f"ParcelIDs_{pid}.npy: shape"):
        PastisSource(tiny)[0]


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, "<U4"])
def test_wrong_dtype_is_named(tiny, dtype):
    pid = _first_id(tiny)
    path = tiny / "DATA_S2" / f"S2_{pid}.npy"
    np.save(path, np.load(path).astype(dtype))
    with pytest.raises(SourceError, match=f"S2_{pid}.npy: dtype"):
        PastisSource(tiny)[0]


def test_object_array_is_rejected_without_unpickling(tiny):
    pid = _first_id(tiny)
    np.save(tiny / "DATA_S2" / f"S2_{pid}.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(SourceError, match="Python objects"):
        PastisSource(tiny)[0]


def test_class_values_out_of_range_are_named(tiny):
    pid = _first_id(tiny)
    path = tiny / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    target = np.load(path)
    target[0, 0, 0] = 25
    np.save(path, target)
    with pytest.raises(SourceError, match=f"TARGET_{pid}.npy: class values"):
        PastisSource(tiny)[0]


def test_s1_date_mismatch_is_named(tiny):
    pid = _first_id(tiny)
    path = tiny / "DATA_S1D" / f"S1D_{pid}.npy"
    np.save(path, np.load(path)[:-2])
    PastisSource(tiny)[0]  # S2-only reading does not touch S1
    with pytest.raises(SourceError, match=f"S1D_{pid}.npy: has .* in 'dates-S1D'"):
        PastisSource(tiny, with_s1=True)[0]


def test_with_s1_on_plain_pastis_is_rejected(tmp_path):
    root = write_pastis(tmp_path, n_patches=2, size=16, n_dates_range=(5, 6))
    with pytest.raises(SourceError, match="dates-S1A"):
        PastisSource(root, with_s1=True)


def test_norm_file_missing_a_fold_is_named(tiny):
    path = tiny / "NORM_S2_patch.json"
    stats = json.loads(path.read_text())
    del stats["Fold_3"]
    path.write_text(json.dumps(stats))
    with pytest.raises(SourceError, match="NORM_S2_patch.json: no 'Fold_3'"):
        read_norm(tiny, (1, 2, 3))
    np.testing.assert_allclose(read_norm(tiny, (1, 2))[0], read_norm(tiny, (2, 1))[0])


# --- the fixture generator ----------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_fixture_is_deterministic_for_a_seed(tmp_path):
    kwargs = dict(n_patches=3, size=16, n_dates_range=(6, 9), with_s1=True)
    a = _tree(write_pastis(tmp_path / "a", seed=3, **kwargs))
    b = _tree(write_pastis(tmp_path / "b", seed=3, **kwargs))
    c = _tree(write_pastis(tmp_path / "c", seed=4, **kwargs))
    assert a == b
    assert a != c


def test_fixture_writes_the_real_layout(pastis):
    names = {p.name for p in pastis.iterdir()}
    assert {
        "metadata.geojson",
        "NORM_S2_patch.json",
        "DATA_S2",
        "ANNOTATIONS",
        "DATA_S1A",
        "DATA_S1D",
    } <= names
    collection = json.loads((pastis / "metadata.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        props = feature["properties"]
        assert {
            "ID_PATCH",
            "Fold",
            "TILE",
            "N_Parcel",
            "Parcel_Cover",
            "dates-S2",
            "dates-S1A",
            "dates-S1D",
        } <= set(props)
        assert feature["geometry"]["type"] == "Polygon"
        assert all(
            isinstance(v, int) and 20180901 <= v <= 20191101 for v in props["dates-S2"].values()
        )
        pid = props["ID_PATCH"]
        assert np.load(pastis / "ANNOTATIONS" / f"TARGET_{pid}.npy").dtype == np.uint8
    records = read_metadata(pastis)
    assert len({len(r["dates_s2"]) for r in records}) > 1  # irregular date lists


def test_planted_phenology_separates_winter_from_summer_crops(pastis):
    """Winter cereals peak in April-May and are harvested by August; summer crops the reverse."""
    spring, summer = (212, 273), (320, 365)  # days since 2018-09-01
    ndvi_by_group: dict[str, dict[str, list[float]]] = {"winter": {}, "summer": {}}
    for patch in PastisSource(pastis):
        b = patch.bands.astype(np.float64)
        ndvi = (b[:, 6] - b[:, 2]) / (b[:, 6] + b[:, 2] + 1e-9)
        days = np.array(patch.meta["days"])
        clear = b[:, 0] < 1500  # clouds are bright in blue
        for group, classes in (("winter", WINTER_CEREALS), ("summer", SUMMER_CROPS)):
            pixels = np.isin(patch.labels, classes)
            for window, (lo, hi) in (("spring", spring), ("summer", summer)):
                at = (days >= lo) & (days < hi)
                sel = clear[at][:, pixels]
                values = ndvi[at][:, pixels][sel]
                ndvi_by_group[group].setdefault(window, []).extend(values.tolist())
    med = {g: {w: np.median(v) for w, v in d.items()} for g, d in ndvi_by_group.items()}
    assert med["winter"]["spring"] > med["summer"]["spring"] + 0.3
    assert med["summer"]["summer"] > med["winter"]["summer"] + 0.3


def test_planted_clouds_and_void_labels_are_present(pastis):
    source = PastisSource(pastis)
    bright = sum(int(np.sum(p.bands[:, 0] > 2500)) for p in source)
    assert bright > 0  # cloudy pixel-dates, bright in blue
    labels = np.concatenate([p.labels.ravel() for p in source])
    assert np.any(labels == VOID_LABEL)
    assert len(np.unique(labels)) >= 6


def test_unplanted_fixture_still_reads(tmp_path):
    root = write_pastis(tmp_path, n_patches=2, size=16, n_dates_range=(4, 4), planted=False)
    patches = list(PastisSource(root))
    assert [p.bands.shape for p in patches] == [(4, 10, 16, 16)] * 2


def test_fixture_command_line_writes_a_readable_dataset(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path / "P"),
            "--patches",
            "2",
            "--size",
            "16",
            "--min-dates",
            "4",
            "--max-dates",
            "5",
            "--s1",
        ]
    )
    assert str(tmp_path / "P") in capsys.readouterr().out
    assert len(PastisSource(tmp_path / "P", with_s1=True)) == 2


def test_fixture_rejects_impossible_date_counts(tmp_path):
    with pytest.raises(ValueError, match="n_dates_range"):
        write_pastis(tmp_path, n_patches=1, size=16, n_dates_range=(10, 500))
