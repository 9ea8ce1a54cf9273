"""Shard sets: deterministic tar shards, streaming statistics, manifests, resumable writing."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pimc_dist import shardset
from pimc_dist.shardset import ShardError, ShardSetWriter, TarError


def make_sample(i: int, rng: np.random.Generator) -> dict:
    return {
        "__key__": f"p{i:05d}",
        "rp.png": rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
        "series.npy": rng.normal(0.3, 0.2, (3, 10)).astype(np.float16),
        "rsi.npy": rng.integers(0, 6000, (4, 6, 6)).astype(np.int16),
        "json": {
            "dataset": "demo",
            "row": i,
            "col": 2 * i,
            "label": i % 3,
            "dates": [20180101, 20180111],
        },
    }


def write_set(out, n=25, max_samples=10, seed=0, **kwargs) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = [make_sample(i, rng) for i in range(n)]
    with ShardSetWriter(
        out, max_samples=max_samples, source="demo", classes=["a", "b", "c"], **kwargs
    ) as w:
        for s in samples:
            w.write(s)
    return samples


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_shards_are_standard_tar_with_fixed_member_metadata(tmp_path):
    samples = write_set(tmp_path, n=12, max_samples=5)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == [
            "p00000.json",
            "p00000.rp.png",
            "p00000.rsi.npy",
            "p00000.series.npy",
        ]
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {
            (1577836800, 0, 0, 0o644, "")
        }
        rsi = np.load(io.BytesIO(tar.extractfile("p00001.rsi.npy").read()))
        np.testing.assert_array_equal(rsi, samples[1]["rsi.npy"])
        png = np.asarray(Image.open(io.BytesIO(tar.extractfile("p00001.rp.png").read())))
        np.testing.assert_array_equal(png.transpose(2, 0, 1), samples[1]["rp.png"])
    keys = [
        s["__key__"] for s in wds.WebDataset(str(tmp_path / "shard-000001.tar"), shardshuffle=False)
    ]
    assert keys == [f"p{i:05d}" for i in range(5, 10)]


def test_same_samples_give_identical_shard_bytes(tmp_path):
    write_set(tmp_path / "a", n=15, max_samples=4)
    # Same samples, members given in another order: still the same bytes.
    rng = np.random.default_rng(0)
    with ShardSetWriter(tmp_path / "b", max_samples=4, source="demo", classes=["a", "b", "c"]) as w:
        for i in range(15):
            w.write(dict(reversed(list(make_sample(i, rng).items()))))
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert a == b and len(a) == 4
    manifest = shardset.read_manifest(tmp_path / "a")
    assert [s.sha256 for s in manifest.shards] == [
        hashlib.sha256(v).hexdigest() for v in a.values()
    ]


def test_manifest_totals_views_and_streaming_stats_match_numpy(tmp_path):
    samples = write_set(tmp_path, n=23, max_samples=10)
    m = shardset.read_manifest(tmp_path)
    assert m.total_samples == 23 and [s.samples for s in m.shards] == [10, 10, 3]
    assert m.kind == "pimc" and m.source == "demo" and m.classes == ["a", "b", "c"]
    assert m.views["rp"] == shardset.ViewSpec("png", "uint8", (3, 8, 8))
    assert m.views["rsi"] == shardset.ViewSpec("npy", "int16", (4, 6, 6))
    assert m.members == ["json", "rp.png", "rsi.npy", "series.npy"]
    for view, suffix in (("rp", "rp.png"), ("rsi", "rsi.npy"), ("series", "series.npy")):
        stacked = np.stack([s[suffix] for s in samples]).astype(np.float64)
        channels = np.moveaxis(stacked, 1, 0).reshape(stacked.shape[1], -1)
        np.testing.assert_allclose(m.stats[view].mean, channels.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(m.stats[view].std, channels.std(axis=1), rtol=1e-10)


def test_png_codec_round_trips_and_reads_foreign_pngs():
    rng = np.random.default_rng(1)
    for shape, level in [((3, 7, 9), 0), ((3, 7, 9), 1), ((1, 5, 5), 0), ((4, 3, 2), 6)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        data = shardset.encode_png(image, level)
        np.testing.assert_array_equal(shardset.decode_png(data), image)
        pil = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(
            pil if pil.ndim == 2 else pil.transpose(2, 0, 1),
            image.squeeze(0) if shape[0] == 1 else image,
        )
    # A PNG written by PIL (adaptive filters) takes the fallback path.
    smooth = np.add.outer(np.arange(20), np.arange(20)).astype(np.uint8)
    image = np.stack([smooth, smooth.T, 255 - smooth])
    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="PNG")
    np.testing.assert_array_equal(shardset.decode_png(buf.getvalue()), image)
    with pytest.raises(ValueError, match="not a PNG"):
        shardset.decode_png(b"GIF89a" + bytes(40))


def test_npy_decoder_rejects_bad_magic_and_wrong_length():
    data = shardset.encode_npy(np.arange(12, dtype=np.int16).reshape(3, 4))
    np.testing.assert_array_equal(shardset.decode_npy(data), np.arange(12).reshape(3, 4))
    with pytest.raises(ValueError, match="bad magic"):
        shardset.decode_npy(b"XX" + data[2:])
    with pytest.raises(ValueError, match="data bytes"):
        shardset.decode_npy(data[:-2])


def test_writer_rejects_inconsistent_or_invalid_samples(tmp_path):
    rng = np.random.default_rng(0)
    with ShardSetWriter(tmp_path) as w:
        w.write(make_sample(0, rng))
        bad_shape = make_sample(1, rng)
        bad_shape["rsi.npy"] = bad_shape["rsi.npy"][:, :5]
        with pytest.raises(ValueError, match=r"p00001.*rsi.*\(4, 5, 6\)"):
            w.write(bad_shape)
        missing = make_sample(2, rng)
        del missing["series.npy"]
        with pytest.raises(ValueError, match="'p00002' has members"):
            w.write(missing)
        nan = make_sample(3, rng)
        nan["series.npy"][0, 0] = np.nan
        with pytest.raises(ValueError, match="p00003.*NaN"):
            w.write(nan)
        with pytest.raises(ValueError, match="key"):
            w.write({**make_sample(4, rng), "__key__": "has.dot"})
        with pytest.raises(ValueError, match="twice"):
            w.write(make_sample(0, rng))
    assert shardset.read_manifest(tmp_path).total_samples == 1


def test_skip_report_lists_skipped_inputs_beside_the_manifest(tmp_path):
    rng = np.random.default_rng(0)
    with ShardSetWriter(tmp_path, max_samples=2) as w:
        w.write(make_sample(0, rng))
        w.skip("patch7/px3", "all-NaN pixel")
        w.write(make_sample(1, rng))
        w.skip("patch9", "unreadable tif: S2_9.npy")
    m = shardset.read_manifest(tmp_path)
    assert m.skipped == 2 and m.report == "skipped.json"
    report = json.loads((tmp_path / "skipped.json").read_text())
    assert report["skipped"] == [
        {"shard": "shard-000000.tar", "key": "patch7/px3", "reason": "all-NaN pixel"},
        {"shard": "shard-000001.tar", "key": "patch9", "reason": "unreadable tif: S2_9.npy"},
    ]
    assert m.shards[1].samples == 0  # a shard holding only a skip record is still listed


def explicit_writer(out, **kw) -> ShardSetWriter:
    return ShardSetWriter(out, source="demo", classes=["a", "b", "c"], **kw)


def write_explicit(writer, index, samples):
    with writer.shard(index):
        for s in samples:
            writer.write(s)


def test_rerun_skips_complete_shards_and_removes_stale_temp_files(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(i, rng) for i in range(9)]
    groups = [samples[0:3], samples[3:6], samples[6:9]]
    first = explicit_writer(tmp_path)
    write_explicit(first, 0, groups[0])
    write_explicit(first, 1, groups[1])
    stale = tmp_path / ".shard-000002.tar.4242.tmp"
    stale.write_bytes(b"half a shard from a crashed run")
    before = shard_bytes(tmp_path)

    rerun = explicit_writer(tmp_path)
    todo = [i for i in range(3) if not rerun.shard_done(i)]
    assert todo == [2]
    write_explicit(rerun, 2, groups[2])
    m = rerun.close(expected_shards=3)
    assert not stale.exists() and not list(tmp_path.glob(".*tmp"))
    assert {k: v for k, v in shard_bytes(tmp_path).items() if k in before} == before
    assert m.total_samples == 9
    assert m.stats == write_reference_stats(tmp_path / "ref", groups)


def write_reference_stats(out, groups):
    w = explicit_writer(out)
    for i, g in enumerate(groups):
        write_explicit(w, i, g)
    return w.close().stats


def test_rewriting_a_shard_with_other_content_raises_and_keeps_the_original(tmp_path):
    rng = np.random.default_rng(0)
    w = explicit_writer(tmp_path)
    write_explicit(w, 0, [make_sample(0, rng), make_sample(1, rng)])
    original = (tmp_path / "shard-000000.tar").read_bytes()
    # Same content again: accepted, nothing changes.
    rng = np.random.default_rng(0)
    write_explicit(w, 0, [make_sample(0, rng), make_sample(1, rng)])
    with pytest.raises(
        ShardError, match=r"shard-000000.tar: already exists with different content"
    ):
        write_explicit(w, 0, [make_sample(5, rng)])
    assert (tmp_path / "shard-000000.tar").read_bytes() == original
    assert not list(tmp_path.glob(".*tmp"))


def test_crash_inside_a_shard_leaves_no_file_under_the_final_name(tmp_path):
    rng = np.random.default_rng(0)
    w = explicit_writer(tmp_path)
    with pytest.raises(RuntimeError, match="reader died"):
        with w.shard(0):
            w.write(make_sample(0, rng))
            raise RuntimeError("reader died")
    assert list(tmp_path.iterdir()) == []
    assert not w.shard_done(0)


def test_shard_file_without_matching_sidecar_is_reported_not_trusted(tmp_path):
    write_set(tmp_path, n=4, max_samples=2)
    (tmp_path / "shard-000001.stats.json").unlink()
    w = explicit_writer(tmp_path)
    with pytest.raises(ShardError, match="shard-000001.tar: present but its sidecar"):
        w.shard_done(1)
    with pytest.raises(ShardError, match=r"shard-000001.tar: no sidecar shard-000001.stats.json"):
        shardset.merge_manifest(tmp_path)


def test_merge_manifest_combines_shards_of_separate_array_tasks(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(i, rng) for i in range(12)]
    groups = [samples[i : i + 3] for i in range(0, 12, 3)]
    task_a, task_b = explicit_writer(tmp_path), explicit_writer(tmp_path)
    write_explicit(task_b, 2, groups[2])
    write_explicit(task_b, 3, groups[3])
    task_b.close(manifest=False)
    with pytest.raises(
        ShardError, match=r"2 shard\(s\) not written yet: shard-000000.tar, shard-000001.tar"
    ):
        shardset.merge_manifest(tmp_path, expected_shards=4)
    write_explicit(task_a, 0, groups[0])
    write_explicit(task_a, 1, groups[1])
    m = shardset.merge_manifest(tmp_path, config={"data": {"name": "demo"}}, expected_shards=4)
    assert [s.name for s in m.shards] == [shardset.shard_name(i) for i in range(4)]
    assert m.config == {"data": {"name": "demo"}}
    assert m.stats == write_reference_stats(tmp_path / "ref", groups)
    assert shardset.verify(tmp_path) == []


def test_shared_json_values_are_stored_once_and_named_alike_by_separate_writers(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(i, rng) for i in range(6)]
    samples[4]["json"]["dates"] = [20190101]  # a second grid
    task_a, task_b = (explicit_writer(tmp_path, meta_tables=("dates",)) for _ in range(2))
    write_explicit(task_a, 0, samples[:3])
    write_explicit(task_b, 1, samples[3:])
    m = shardset.merge_manifest(tmp_path, expected_shards=2)
    assert sorted(m.meta_tables["dates"].values()) == [[20180101, 20180111], [20190101]]
    got = [
        (raw["__key__"], raw["json"])
        for path in m.shard_paths()
        for raw in shardset.iter_shard_samples(path)
    ]
    for (key, data), sample in zip(got, samples, strict=True):
        assert key == sample["__key__"] and b"2018" not in data  # only the id is in the tar
        assert shardset.decode_meta(data, m) == sample["json"]
    # An id that names two different values (it never happens by chance) is refused.
    sidecar = tmp_path / "shard-000001.stats.json"
    info = json.loads(sidecar.read_text())
    for id_ in info["meta_tables"]["dates"]:
        info["meta_tables"]["dates"][id_] = [1]
    sidecar.write_text(json.dumps(info))
    with pytest.raises(ShardError, match=r"shard-000001.tar: meta_tables.dates id \w+ names two"):
        shardset.merge_manifest(tmp_path)


def test_merge_manifest_refuses_shards_from_different_sources(tmp_path):
    rng = np.random.default_rng(0)
    write_explicit(explicit_writer(tmp_path), 0, [make_sample(0, rng)])
    other = ShardSetWriter(tmp_path, source="pastis", classes=["a", "b", "c"])
    write_explicit(other, 1, [make_sample(1, rng)])
    with pytest.raises(ShardError, match=r"shard-000001.tar: source 'pastis', expected 'demo'"):
        shardset.merge_manifest(tmp_path, source="demo")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("shards"), "key 'shards' is missing"),
        (
            lambda d: d["shards"][1].update(sha256=5),
            r"key 'shards\[1\].sha256' must be str, got int",
        ),
        (lambda d: d.update(total_samples=99), "key 'total_samples' is 99 but the shards hold 5"),
        (
            lambda d: d["stats"]["rp"].update(std=[1.0]),
            "key 'stats.rp.std' must have as many values",
        ),
        (
            lambda d: d["views"]["rsi"].update(dtype="int77"),
            "key 'views.rsi.dtype' is not a numpy dtype",
        ),
        (lambda d: d.update(schema_version=7), "key 'schema_version' is 7"),
        (lambda d: d.pop("meta_tables"), "key 'meta_tables' is missing"),
        (lambda d: d["meta_tables"].update(dates=[1]), "key 'meta_tables.dates' must be a mapping"),
    ],
)
def test_read_manifest_names_file_and_key_of_a_bad_manifest(tmp_path, edit, message):
    write_set(tmp_path, n=5, max_samples=3)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=rf"{path}: {message}"):
        shardset.read_manifest(tmp_path)


def test_read_manifest_reports_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ShardError, match=rf"{tmp_path / 'manifest.json'}: manifest not found"):
        shardset.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema_version": 1,')
    with pytest.raises(ShardError, match="manifest.json: not valid JSON"):
        shardset.read_manifest(tmp_path)


def test_verify_lists_every_missing_resized_changed_and_unlisted_shard(tmp_path):
    write_set(tmp_path, n=20, max_samples=4)  # five shards
    (tmp_path / "shard-000000.tar").unlink()
    with open(tmp_path / "shard-000001.tar", "ab") as f:
        f.write(bytes(512))
    data = bytearray((tmp_path / "shard-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (tmp_path / "shard-000002.tar").write_bytes(bytes(data))
    (tmp_path / "shard-000009.tar").write_bytes(bytes(1024))
    problems = shardset.verify(tmp_path)
    assert len(problems) == 4
    assert "shard-000000.tar: listed in manifest.json but missing" in problems[0]
    assert "shard-000001.tar: " in problems[1] and "bytes, manifest.json says" in problems[1]
    assert "shard-000002.tar: sha256" in problems[2]
    assert "shard-000009.tar: shard file not listed" in problems[3]
    assert len(shardset.verify(tmp_path, checksums=False)) == 3
    with pytest.raises(ShardError, match=r"4 problem\(s\)") as err:
        shardset.ensure_valid(tmp_path)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000009.tar"):
        assert name in str(err.value)


def test_shard_problems_name_each_bad_listed_shard_and_without_drops_them(tmp_path):
    write_set(tmp_path, n=20, max_samples=4)  # five shards of 4
    with open(tmp_path / "shard-000001.tar", "ab") as f:
        f.write(bytes(512))
    (tmp_path / "shard-000004.tar").unlink()
    (tmp_path / "shard-000009.tar").write_bytes(bytes(1024))
    manifest = shardset.read_manifest(tmp_path)
    problems = shardset.shard_problems(manifest, checksums=False)
    assert sorted(problems) == ["shard-000001.tar", "shard-000004.tar"]
    assert problems["shard-000004.tar"].startswith(str(tmp_path / "shard-000004.tar"))
    assert shardset.unlisted_shards(manifest) == [tmp_path / "shard-000009.tar"]
    kept = manifest.without(frozenset(problems))
    assert [s.name for s in kept.shards] == [
        "shard-000000.tar",
        "shard-000002.tar",
        "shard-000003.tar",
    ]
    assert kept.total_samples == 12 and manifest.total_samples == 20  # the original is unchanged


def test_sidecars_of_an_older_schema_are_refused_on_resume_and_merge(tmp_path):
    write_set(tmp_path, n=10, max_samples=5)
    sidecar = tmp_path / "shard-000001.stats.json"
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "schema_version": 1}))
    with pytest.raises(ShardError, match=r"shard-000001.stats.json: schema_version 1, this code"):
        ShardSetWriter(tmp_path).shard_done(1)
    with pytest.raises(
        ShardError, match=r"shard-000001.stats.json: schema_version 1.*shard it again"
    ):
        shardset.merge_manifest(tmp_path)


def test_reader_skip_limit_and_member_selection(tmp_path):
    samples = write_set(tmp_path, n=10, max_samples=10)
    path = tmp_path / "shard-000000.tar"
    got = list(
        shardset.iter_shard_samples(path, skip=3, limit=4, suffixes={"rsi.npy"}, chunk_bytes=1000)
    )
    assert [g["__key__"] for g in got] == ["p00003", "p00004", "p00005", "p00006"]
    assert all(set(g) == {"__key__", "rsi.npy"} for g in got)
    np.testing.assert_array_equal(shardset.decode_npy(got[0]["rsi.npy"]), samples[3]["rsi.npy"])
    with open(path, "rb") as f:  # file objects work too, including non-seekable streams
        stream = io.BufferedReader(io.BytesIO(f.read()))
    stream.seekable = lambda: False
    assert len(list(shardset.iter_shard_samples(stream, chunk_bytes=700))) == 10


def test_truncated_or_corrupt_tar_raises_naming_file_and_offset(tmp_path):
    write_set(tmp_path, n=6, max_samples=6)
    path = tmp_path / "shard-000000.tar"
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    keys = []
    with pytest.raises(TarError, match=rf"{cut}: truncated at byte"):
        for s in shardset.iter_shard_samples(cut):
            keys.append(s["__key__"])
    assert 2 <= len(keys) <= 4  # samples before the damage still come out
    garbage = bytearray(data)
    second = data.index(b"p00002.json")
    garbage[second : second + 512] = b"\x17" * 512
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(garbage))
    with pytest.raises(TarError, match=rf"{bad}: corrupt tar header at byte {second}"):
        list(shardset.iter_shard_samples(bad))
    no_end = tmp_path / "noend.tar"
    no_end.write_bytes(data[:-1024])
    with pytest.raises(TarError, match="no end-of-archive marker"):
        list(shardset.iter_shard_samples(no_end))


def test_reader_reads_tars_from_python_tarfile_with_long_names(tmp_path):
    long_key = "d" * 120 + "/k1"
    members = {
        f"{long_key}.x.npy": shardset.encode_npy(np.arange(3)),
        f"{long_key}.json": b"{}",
        "k2.json": b"[1]",
    }
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"foreign{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        got = list(shardset.iter_shard_samples(path))
        assert [g["__key__"] for g in got] == [long_key, "k2"]
        assert got[0]["x.npy"] == members[f"{long_key}.x.npy"] and got[1]["json"] == b"[1]"


def with_meta(sample: dict, **meta) -> dict:
    return {**sample, "json": {**sample["json"], **meta}}


def test_the_manifest_counts_samples_per_split_across_shards_and_writers(tmp_path):
    rng = np.random.default_rng(0)
    splits = ["train"] * 7 + ["val"] * 3 + ["test"] * 2 + ["extra"]
    samples = [with_meta(make_sample(i, rng), split=s) for i, s in enumerate(splits)]
    samples.append(make_sample(99, rng))  # names no split
    a, b = explicit_writer(tmp_path), explicit_writer(tmp_path)
    write_explicit(a, 0, samples[:6])
    write_explicit(b, 1, samples[6:])
    b.close(manifest=False)
    m = a.close()
    assert m.split_counts == {"train": 7, "val": 3, "test": 2, "extra": 1, "other": 1}
    assert m.fold_counts == {} and sum(m.split_counts.values()) == m.total_samples
    assert shardset.read_manifest(tmp_path).split_counts == m.split_counts
    assert m.split_summary() == "train 7, val 3, test 2, extra 1, other 1"


@pytest.mark.parametrize(
    "config, splits",
    [
        ({"source": "pastis", "fold_rotation": 0}, {"train": 9, "val": 3, "test": 3}),
        ({"data": {"fold_rotation": 1}}, {"train": 9, "val": 3, "test": 3}),
        ({}, {"other": 15}),  # no rotation known: the fold counts tell
    ],
)
def test_pastis_samples_count_by_fold_mapped_with_the_sets_fold_rotation(tmp_path, config, splits):
    rng = np.random.default_rng(0)
    samples = [with_meta(make_sample(i, rng), fold=1 + i % 5, split=None) for i in range(15)]
    with ShardSetWriter(tmp_path, max_samples=4, source="demo", classes=["a", "b", "c"]) as w:
        for s in samples:
            w.write(s)
    m = shardset.merge_manifest(tmp_path, config=config)
    assert m.split_counts == splits
    assert m.fold_counts == {str(f): 3 for f in range(1, 6)}
    assert m.split_summary().endswith("(folds 1: 3, 2: 3, 3: 3, 4: 3, 5: 3)")
    # A sample that names its split counts by it, whatever its fold.
    named = [with_meta(make_sample(i, rng), fold=5, split="train") for i in range(20, 22)]
    with ShardSetWriter(tmp_path / "named", source="demo", classes=["a", "b", "c"]) as w:
        for s in named:
            w.write(s)
    m = shardset.read_manifest(tmp_path / "named")
    assert m.split_counts == {"train": 2} and m.fold_counts == {"5": 2}


def test_a_manifest_without_split_counts_still_reads(tmp_path):
    write_set(tmp_path, n=5)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    data.pop("split_counts"), data.pop("fold_counts")
    path.write_text(json.dumps(data))
    m = shardset.read_manifest(tmp_path)
    assert m.split_counts == {} and m.split_summary() == "splits not recorded"
    data["split_counts"] = {"train": "many"}
    path.write_text(json.dumps(data))
    with pytest.raises(ShardError, match="key 'split_counts' must map names to sample counts"):
        shardset.read_manifest(tmp_path)
