"""Point time-series tables (source point_series): long-format CSV / csv.gz / parquet written
here in their real on-disk formats, bad tables, same-day merging, hash splits, and sharding
end to end; plus slices of the real dl4sits and UCR Crop series when ../shared/realdata is
there."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_module
from launch_helpers import read_shard_set

from pimc_dist import config as config_lib
from pimc_dist import samples
from pimc_dist.shard import cli
from pimc_dist.sources import open_source
from pimc_dist.sources.base import (
    SourceError,
    UnnamedLabelError,
    hash_split,
    merge_same_day,
    split_fractions,
)
from pimc_dist.sources.point_series import PointSeriesSource

CONFIG = REPO / "configs" / "data" / "point_series.yaml"
REALDATA = REPO.parent / "shared" / "realdata"
HEADER = ["sample_id", "date", "B02", "B04", "B08", "label", "group", "note"]
# Sample a: 2021-01-11 twice (one row empty: a gap), 2021-01-21 twice (both valid: mean).
# Sample b: rows out of order. Sample c: a NaN cell and an empty label.
ROWS = [
    ["a", "2021-01-01", "400", "300", "3000", "wheat", "g1", "x"],
    ["a", "2021-01-11", "410", "310", "3100", "wheat", "g1", "x"],
    ["a", "2021-01-11", "", "", "", "wheat", "g1", "cloud"],
    ["a", "2021-01-21", "420", "320", "3200", "wheat", "g1", "x"],
    ["a", "2021-01-21", "440", "340", "3400", "wheat", "g1", "x"],
    ["a", "2021-02-10", "430", "330", "3300", "wheat", "g1", "x"],
    ["b", "2021-02-10", "500", "600", "1000", "bare", "g2", "x"],
    ["b", "2021-01-01", "500", "600", "1100", "bare", "g2", "x"],
    ["b", "2021-01-21", "500", "600", "1200", "bare", "g2", "x"],
    ["c", "2021-01-01", "450", "350", "2000", "", "g1", "x"],
    ["c", "2021-01-21", "450", "NaN", "2100", "", "g1", "x"],
    ["c", "2021-02-10", "450", "350", "2200", "", "g1", "x"],
]


def write_table(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    """`rows` as a CSV, gzipped CSV or parquet file (by the name), as a user would write it."""
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {}
        for j, name in enumerate(header):
            values = [row[j] for row in rows]
            if name in ("B02", "B04", "B08", "NDVI"):  # numeric columns with nulls for gaps
                columns[name] = pa.array([float(v) if v != "" else None for v in values])
            elif name == "date":  # a real date column
                columns[name] = pa.array([dt.date.fromisoformat(v) for v in values])
            else:
                columns[name] = pa.array(values)
        pq.write_table(pa.table(columns), path)
        return path
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _source(path: Path, **kwargs) -> PointSeriesSource:
    return PointSeriesSource(path, band_names=["B02", "B04", "B08"], **kwargs)


# --- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["points.csv", "points.csv.gz", "points.parquet"])
def test_tables_in_every_format_read_alike(tmp_path, name):
    source = _source(write_table(tmp_path / name, ROWS))
    assert source.patch_ids == ["a", "b", "c"]
    assert source.classes == ["bare", "wheat"]  # names found, sorted
    assert source.same_day_merged == 2
    a, b, c = source[0], source[1], source[2]
    assert a.has_image is False and a.bands.shape == (4, 3, 1, 1)
    assert a.dates == [dt.date(2021, 1, d) for d in (1, 11, 21)] + [dt.date(2021, 2, 10)]
    # the empty row of 2021-01-11 is ignored, the two valid rows of 2021-01-21 averaged
    np.testing.assert_allclose(a.bands[1, :, 0, 0], [410, 310, 3100])
    np.testing.assert_allclose(a.bands[2, :, 0, 0], [430, 330, 3300])
    assert a.valid.all() and a.meta["same_day_merged"] == 2 and a.meta["group"] == "g1"
    assert int(a.labels[0, 0]) == 1 and int(b.labels[0, 0]) == 0 and c.labels is None
    assert b.dates == [dt.date(2021, 1, 1), dt.date(2021, 1, 21), dt.date(2021, 2, 10)]
    np.testing.assert_allclose(b.bands[:, 2, 0, 0], [1100, 1200, 1000])  # sorted by date
    assert np.isnan(c.bands[1, 1, 0, 0]) and not c.valid[1, 0, 0] and c.valid[0, 0, 0]
    assert a.dn_scale == 10000.0


def test_column_names_are_configurable_and_other_columns_ignored(tmp_path):
    header = ["pid", "when", "B02", "B04", "B08", "crop", "fold", "parcel", "comment"]
    rows = [["p1", "2020-05-01", "1", "300", "3000", "2", "test", "7", "-"]]
    rows += [["p1", "2020-05-11", "1", "310", "3100", "2", "test", "7", "-"]]
    path = write_table(tmp_path / "t.csv", rows, header)
    source = PointSeriesSource(
        path,
        band_names=["B02", "B04", "B08"],
        id_column="pid",
        date_column="when",
        label_column="crop",
        split_column="fold",
        group_column="parcel",
        class_names=["a", "b", "c"],
    )
    patch = source[0]
    assert patch.patch_id == "p1" and patch.split == "test" and patch.meta["group"] == "7"
    assert int(patch.labels[0, 0]) == 2 and source.classes == ["a", "b", "c"]
    assert open_source  # the registry opens it too (test_cli_* below)


def test_semicolon_tables_read_too(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("sample_id;date;B02;B04;B08\ns;2020-01-01;1;2;3\ns;2020-01-05;1;2;4\n")
    assert _source(path)[0].bands.shape == (2, 3, 1, 1)


def test_index_columns_are_taken_as_given_and_ndvi_alone_makes_one_channel(tmp_path):
    header = ["sample_id", "date", "NDVI"]
    rows = [["s", f"2020-01-{d:02d}", v] for d, v in ((1, "0.2"), (11, ""), (21, "0.6"))]
    rows.append(["s", "2020-01-31", "0.0"])  # 0 is an NDVI value, not data.nodata=0
    path = write_table(tmp_path / "ndvi.csv", rows, header)
    source = PointSeriesSource(path, band_names=["NDVI"], nodata=0)
    patch = source[0]
    assert patch.valid[:, 0, 0].tolist() == [True, False, True, True]
    cfg = samples.PixelSampling(pixels_per_patch=1, grid_step_days=5, stratify=False)
    made, notes = samples.pimc_samples(patch, cfg)
    assert notes == [] and len(made) == 1
    sample = made[0]
    assert sample["__key__"] == "s" and "rsi.npy" not in sample  # no crop view
    series = sample["series.npy"].astype(np.float32)
    assert series.shape == (1, 7) and sample["rp.png"].shape == (1, 7, 7)
    np.testing.assert_allclose(series[0], [0.2, 0.3, 0.4, 0.5, 0.6, 0.3, 0.0], atol=2e-3)
    assert sample["json"]["label"] == -1 and sample["json"]["group"] is None


def test_band_samples_match_the_pixel_path(tmp_path):
    """A point's series is what the pixel path makes of a 1 x 1 patch of the same values."""
    from pimc_dist import indices

    patch = _source(write_table(tmp_path / "p.csv", ROWS))[0]
    cfg = samples.PixelSampling(pixels_per_patch=1, grid_step_days=10, stratify=False)
    made, _ = samples.pimc_samples(patch, cfg)
    expected = indices.index_series(
        patch.bands, patch.band_names, patch.dates, valid=patch.valid, step_days=10
    )
    np.testing.assert_array_equal(
        made[0]["series.npy"], expected.series[:, :, 0, 0].astype(np.float16)
    )
    assert made[0]["series.npy"].shape == (3, 5) and made[0]["rp.png"].shape == (3, 5, 5)
    assert made[0]["json"]["split"] == patch.split and made[0]["json"]["label"] == 1


def test_samples_of_other_date_ranges_share_one_grid(tmp_path):
    """Without data.grid_length each sample spans the table's dates, so every series has
    the same grid; with common_range=False each keeps its own dates (multi-season tables)."""
    rows = [["early", f"2021-01-{d:02d}", "400", "300", "3000"] for d in (1, 11, 21)]
    rows += [["late", f"2021-01-{d:02d}", "400", "300", "2000"] for d in (16, 26, 31)]
    path = write_table(tmp_path / "r.csv", rows, HEADER[:5])
    source = _source(path)
    late = source[1]
    assert late.dates[0] == dt.date(2021, 1, 1) and not late.valid[0, 0, 0]
    cfg = samples.PixelSampling(pixels_per_patch=1, grid_step_days=5, stratify=False)
    made = [samples.pimc_samples(p, cfg)[0][0] for p in source]
    assert [m["series.npy"].shape for m in made] == [(3, 7), (3, 7)]
    assert made[0]["json"]["dates"] == made[1]["json"]["dates"]
    np.testing.assert_array_equal(made[1]["series.npy"][:, 0], made[1]["series.npy"][:, 3])
    own = _source(path, common_range=False)
    assert own[1].dates[0] == dt.date(2021, 1, 16) and own[1].valid.all()


# --- same-day merging ---------------------------------------------------------------------


def test_merge_same_day_takes_the_mean_of_valid_observations():
    dates = [dt.date(2020, 1, d) for d in (5, 1, 5, 9, 5)]
    bands = np.array([10, 20, 30, 40, 0], dtype=np.int16).reshape(5, 1, 1, 1) * np.ones(
        (1, 2, 1, 2), np.int16
    )
    bands[2, :, 0, 1] = 0  # pixel 1: the second acquisition of the day is nodata
    valid = bands[:, 0] != 0
    out = merge_same_day(bands, dates, valid)
    assert out.dates == [dt.date(2020, 1, 1), dt.date(2020, 1, 5), dt.date(2020, 1, 9)]
    assert out.merged == 2 and out.bands.dtype == np.int16
    assert out.bands[:, 0, 0, 0].tolist() == [20, 20, 40]  # mean(10, 30); the 0 is invalid
    assert out.bands[:, 0, 0, 1].tolist() == [20, 10, 40]  # only 10 is valid that day
    assert out.valid.all()
    nothing_valid = merge_same_day(bands[[0, 4]], [dates[0], dates[4]], np.zeros((2, 1, 2), bool))
    assert not nothing_valid.valid.any() and nothing_valid.bands[0, 0, 0, 0] == 10
    floats = merge_same_day(np.array([[1.0], [np.nan], [3.0]]), [dates[0]] * 3)
    assert floats.bands.tolist() == [[2.0]] and floats.valid is None  # NaN ignored
    same = merge_same_day(bands[:2], dates[:2])  # no duplicate: sorted, nothing merged
    assert same.merged == 0 and same.dates == [dates[1], dates[0]]


# --- splits -------------------------------------------------------------------------------


def test_hash_split_is_stable_and_honours_the_fractions():
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    ids = [f"sample-{i}" for i in range(20000)]
    first = [hash_split(i, 0, fractions) for i in ids]
    assert first == [hash_split(i, 0, dict(reversed(fractions.items()))) for i in ids]
    counts = Counter(first)
    for name, share in fractions.items():
        assert abs(counts[name] / len(ids) - share) < 0.015, counts
    other_seed = [hash_split(i, 1, fractions) for i in ids]
    assert 0.4 < np.mean([a == b for a, b in zip(first, other_seed, strict=True)]) < 0.7
    # pinned: the same group lands in the same split in every release and process
    pinned = [hash_split(f"g{i}", 0, None) for i in range(8)]
    assert pinned == [hash_split(f"g{i}", 0, fractions) for i in range(8)]
    out = subprocess.run(
        [sys.executable, "-c", "from pimc_dist.sources.base import hash_split as h;"
         "print([h(f'g{i}', 0, None) for i in range(8)])"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"},
    )  # fmt: skip
    assert out.stdout.strip() == str(pinned)
    assert hash_split("x", 0, {"a": 1.0, "b": 0.0}) == "a"
    with pytest.raises(ValueError, match="hash_split"):
        split_fractions({"train": 0.7, "test": 0.2})


def test_split_column_wins_else_group_else_sample(tmp_path):
    rows = []
    for k in range(60):
        group = f"field{k // 6}"
        split = "Validation" if k < 6 else ""
        rows += [[f"s{k}", f"2020-0{m}-01", "1", "300", "3000", "", group, split] for m in (1, 2)]
    header = ["sample_id", "date", "B02", "B04", "B08", "label", "group", "split"]
    path = write_table(tmp_path / "s.csv", rows, header)
    source = _source(path, split_seed=3)
    splits = {p.patch_id: p.split for p in source}
    assert all(splits[f"s{k}"] == "val" for k in range(6))  # the column
    for g in range(1, 10):  # one split per group, the group's hash
        members = {splits[f"s{k}"] for k in range(6 * g, 6 * g + 6)}
        assert members == {hash_split(f"field{g}", 3, None)}
    train = _source(path, split_seed=3, split="train")
    assert train.patch_ids == [k for k, v in splits.items() if v == "train"]
    assert all(p.split == "train" for p in train)
    no_group = write_table(tmp_path / "n.csv", [r[:6] for r in rows], header[:6])
    assert _source(no_group)[7].split == hash_split("s7", 0, None)


# --- labels -------------------------------------------------------------------------------


def test_integer_labels_index_class_names_and_ignored_values_leave_samples_out(tmp_path):
    rows = [[f"s{k}", "2020-01-01", "1", "300", "3000", str(k % 3)] for k in range(6)]
    path = write_table(tmp_path / "i.csv", rows, HEADER[:6])
    source = _source(path, class_names=["none", "maize", "soy"], label_ignore=[0])
    assert source.patch_ids == ["s1", "s2", "s4", "s5"] and source.ignored == 2
    assert [int(p.labels[0, 0]) for p in source] == [1, 2, 1, 2]
    assert _source(path).classes == ["0", "1", "2"]  # no names given: the values
    assert _source(path, label_ignore=[2]).classes == ["0", "1"]


def test_unnamed_label_value_names_the_value_and_the_file(tmp_path):
    rows = [[f"s{k}", "2020-01-01", "1", "300", "3000", str(k)] for k in range(4)]
    path = write_table(tmp_path / "u.csv", rows, HEADER[:6])
    with pytest.raises(UnnamedLabelError, match=r"u\.csv: sample 's3': label value '3'"):
        _source(path, class_names=["a", "b", "c"])
    names = write_table(tmp_path / "n.csv", [r[:5] + ["rye"] for r in rows], HEADER[:6])
    with pytest.raises(UnnamedLabelError, match="'rye' .* no name"):
        _source(names, class_names=["wheat", "maize"])


# --- bad tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bad.csv", "bad.csv.gz", "bad.parquet"])
def test_missing_column_is_named(tmp_path, name):
    path = write_table(tmp_path / name, [r[:4] + r[5:] for r in ROWS], HEADER[:4] + HEADER[5:])
    with pytest.raises(SourceError, match=rf"{name}: missing column\(s\) 'B08'"):
        _source(path)


def test_bad_date_bad_number_and_empty_id_name_the_row(tmp_path):
    bad_date = [r[:] for r in ROWS]
    bad_date[3][1] = "21/01/2021"
    with pytest.raises(SourceError, match=r"row 4 \(line 5\): '21/01/2021' in column 'date'"):
        _source(write_table(tmp_path / "d.csv", bad_date))
    bad_number = [r[:] for r in ROWS]
    bad_number[5][3] = "1,2"
    with pytest.raises(SourceError, match=r"row 6 \(line 7\): '1,2' in column 'B04'"):
        _source(write_table(tmp_path / "n.csv", bad_number))
    no_id = [r[:] for r in ROWS]
    no_id[1][0] = ""
    with pytest.raises(SourceError, match=r"row 2 \(line 3\): empty 'sample_id'"):
        _source(write_table(tmp_path / "i.csv", no_id))


def test_sample_without_a_valid_date_is_named(tmp_path):
    rows = [r[:] for r in ROWS]
    rows += [["d", "2021-01-01", "", "", "", "bare", "g3", "x"]]
    rows += [["d", "2021-01-11", "5", "", "7", "bare", "g3", "x"]]  # B04 missing: no index
    with pytest.raises(SourceError, match="sample 'd' has no valid date"):
        _source(write_table(tmp_path / "v.csv", rows))


def test_rows_disagreeing_on_a_label_and_missing_files_are_named(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[1][5] = "maize"
    with pytest.raises(SourceError, match="sample 'a': its rows disagree on label"):
        _source(write_table(tmp_path / "l.csv", rows))
    with pytest.raises(SourceError, match="nope.csv: missing"):
        _source(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(SourceError, match="unknown table format"):
        _source(tmp_path / "x.xlsx")


# --- sharding end to end ------------------------------------------------------------------


def test_cli_shards_a_table_into_a_readable_set(tmp_path):
    table = write_table(tmp_path / "points.csv.gz", ROWS)
    out = tmp_path / "shards"
    proc = run_module(
        "pimc_dist.shard", "--config", CONFIG, f"data.root={table}", f"data.shard_dir={out}",
        "data.workers=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("2 same-day acquisitions merged") == 1
    manifest, decoded = read_shard_set(out)
    assert manifest.classes == ["bare", "wheat"] and manifest.total_samples == 3
    assert sorted(s["__key__"] for s in decoded) == ["a", "b", "c"]
    assert all("rsi.npy" not in s for s in decoded)
    by_key = {s["__key__"]: s for s in decoded}
    assert by_key["a"]["json"]["label"] == 1 and by_key["c"]["json"]["label"] == -1
    assert by_key["a"]["json"]["split"] == hash_split("g1", 0, None)
    assert by_key["a"]["series.npy"].shape == (3, 5) and by_key["a"]["rp.png"].shape == (3, 5, 5)
    assert json.loads((out / "manifest.json").read_text())["config"]["source"] == "point_series"


def test_cli_stops_on_an_unnamed_label(tmp_path, capsys):
    table = write_table(tmp_path / "points.parquet", ROWS)
    code = cli(
        ["--config", str(CONFIG), f"data.root={table}", f"data.shard_dir={tmp_path / 'o'}",
         "data.class_names=[wheat]", "data.workers=1"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "points.parquet" in err and "'bare'" in err and "no name" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_example_config_loads():
    cfg = config_lib.load(CONFIG, ["data.root=x.csv"])
    assert cfg.data.source == "point_series" and list(cfg.data.band_names) == ["B02", "B04", "B08"]


# --- real series (../shared/realdata), converted to the long format -----------------------


def _realdata(name: str) -> Path:
    path = REALDATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real series live beside the project, not in it)")
    return path


def test_dl4sits_slice_converted_to_long_format_shards(tmp_path, capsys):
    """dl4sits: one row per pixel, 73 dates x 10 bands (B2 ... B12), regular 5-day grid."""
    root = _realdata("dl4sits")
    bands = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    start = dt.date(2017, 1, 1)
    rows = []
    with open(root / "train_dataset.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert len(header) == 2 + 73 * 10
        for k, row in enumerate(reader):
            if k % 25:  # 16 of the 400 pixels, 2 per class
                continue
            for d in range(73):
                date = (start + dt.timedelta(days=5 * d)).isoformat()
                values = row[2 + 10 * d : 12 + 10 * d]
                rows.append([f"px{k}", date, *values, row[0], row[1]])
    long_header = ["sample_id", "date", *bands, "label", "group"]
    table = write_table(tmp_path / "dl4sits.csv", rows, long_header)
    classes = "Bare Ground,Canola,Cereals,Legumes,Forest,Grassland,Water,Urban"
    out = tmp_path / "shards"
    code = cli(
        ["--config", str(CONFIG), f"data.root={table}", f"data.shard_dir={out}",
         f"data.band_names=[{','.join(bands)}]", f"data.class_names=[{classes}]",
         "data.workers=1", "data.grid_step_days=5"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest, decoded = read_shard_set(out)
    assert manifest.classes[2] == "Cereals" and manifest.total_samples == 16
    assert {s["json"]["label"] for s in decoded} == set(range(8))
    series = np.stack([s["series.npy"] for s in decoded]).astype(np.float32)
    assert series.shape == (16, 3, 73) and np.isfinite(series).all()
    assert np.median(series[:, 0]) > 0.1  # NDVI of real land cover, not noise around 0


def test_ucr_crop_ndvi_slice_converted_to_long_format_shards(tmp_path, capsys):
    """UCR Crop: NDVI only (46 dates), class 1..24 in column 0: one-channel plots."""
    root = _realdata("ucr_crop")
    data = np.load(root / "Crop_TRAIN.npy")[::200][:20]
    start = dt.date(2010, 1, 1)
    rows = []
    for k, row in enumerate(data):
        for d, value in enumerate(row[1:]):
            date = (start + dt.timedelta(days=8 * d)).isoformat()
            rows.append([f"crop{k}", date, f"{value:.6f}", str(int(row[0]) - 1)])
    table = write_table(tmp_path / "crop.parquet", rows, ["sample_id", "date", "NDVI", "label"])
    out = tmp_path / "shards"
    code = cli(
        ["--config", str(CONFIG), f"data.root={table}", f"data.shard_dir={out}",
         "data.band_names=[NDVI]", "data.workers=1", "data.grid_step_days=8"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest, decoded = read_shard_set(out)
    assert manifest.total_samples == len(data)
    assert decoded[0]["series.npy"].shape == (1, 46) and decoded[0]["rp.png"].shape == (1, 46, 46)
    k = int(decoded[0]["__key__"][4:])
    np.testing.assert_allclose(
        decoded[0]["series.npy"].astype(np.float32)[0], np.clip(data[k, 1:], -1, 1), atol=1e-3
    )


# --- config mistakes and warnings in the sharder's summary --------------------------------


def _shard(tmp_path: Path, capsys, root, *extra: str) -> tuple[int, str, str]:
    code = cli(
        ["--config", str(CONFIG), f"data.root={root}", f"data.shard_dir={tmp_path / 'o'}",
         "data.workers=1", *extra]
    )  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_folder_as_root_says_what_to_pass(tmp_path, capsys):
    write_table(tmp_path / "points.csv", ROWS)
    code, _, err = _shard(tmp_path, capsys, tmp_path)
    assert code == 1 and "is a folder" in err and "missing" not in err, err
    assert "a glob of tables" in err and f"{tmp_path}/*.csv" in err


def test_grid_start_after_every_date_stops_naming_the_key_and_the_dates(tmp_path, capsys):
    table = write_table(tmp_path / "points.csv", ROWS)
    code, _, err = _shard(tmp_path, capsys, table, "data.grid_start=2030-01-01")
    assert code == 2 and "data.grid_start" in err and "2030-01-01" in err, err
    assert "2021-01-01 .. 2021-02-10" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "plan.json").exists()
    # With data.grid_length: a grid that ends before the first date is the same mistake.
    code, _, err = _shard(
        tmp_path, capsys, table, "data.grid_start=2020-01-01", "data.grid_length=3"
    )
    assert code == 2 and "data.grid_start" in err and "data.grid_length" in err, err


def test_empty_classes_are_warned_naming_them(tmp_path, capsys):
    rows = [[f"s{k}", "2020-01-01", "400", "300", "3000", str(k % 3)] for k in range(6)]
    rows[0][5] = "99"  # a typo: 100 classes, most of them empty
    path = write_table(tmp_path / "t.csv", rows, HEADER[:6])
    notes = _source(path).notes
    assert len(notes) == 1 and "classes 3..98 have no sample" in notes[0], notes
    only_three = write_table(tmp_path / "3.csv", [r[:5] + ["3"] for r in rows], HEADER[:6])
    assert "classes 0..2 have no sample" in _source(only_three).notes[0]
    assert _source(write_table(tmp_path / "ok.csv", ROWS)).notes == []
    code, printed, err = _shard(tmp_path, capsys, path)
    assert code == 0, err
    assert "warning: point_series: classes 3..98 have no sample" in printed


def test_negative_digital_numbers_are_warned_unless_few_and_small(tmp_path, capsys):
    rows = [[s, f"2021-0{m}-01", "400", "300", "3000"] for s in "abcd" for m in (3, 4, 5)]
    rows[0][4] = "-9999"  # an unlisted nodata value
    path = write_table(tmp_path / "t.csv", rows, HEADER[:5])
    (note,) = _source(path).notes
    assert "1 of 36 band values are negative (most in B08, lowest -9999)" in note
    assert "data.nodata" in note
    assert _source(path, nodata=-9999).notes == []  # listed: a gap, not a value
    # One dark pixel after L2A's offset among 120 values: not worth a word.
    dark = [[f"s{k}", f"2021-0{m}-01", "400", "300", "3000"] for k in range(20) for m in (3, 4)]
    dark[0][2] = "-30"
    assert _source(write_table(tmp_path / "dark.csv", dark, HEADER[:5])).notes == []
    code, printed, err = _shard(tmp_path, capsys, path)
    assert code == 0, err
    assert "warning: point_series: 1 of 36 band values are negative" in printed


def test_a_sample_far_from_the_others_is_named_when_it_stretches_the_grid(tmp_path, capsys):
    rows = [[s, f"2021-0{m}-01", "400", "300", "3000"] for s in "abcd" for m in (3, 4, 5)]
    rows += [["late", f"2030-0{m}-01", "400", "300", "3000"] for m in (3, 4)]
    path = write_table(tmp_path / "t.csv", rows, HEADER[:5])
    (note,) = _source(path).notes
    assert "2021-03-01 .. 2030-04-01" in note and "'late'" in note and "'a'" not in note
    assert "data.grid_length" in note
    assert _source(path, common_range=False).notes == []  # own grids: nothing stretched
    code, printed, err = _shard(tmp_path, capsys, path)
    assert code == 0, err
    assert "warning: point_series: the common time grid" in printed
