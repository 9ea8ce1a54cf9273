"""The streaming loader: exact round trips, rank/worker splits, equal steps, skips and counters."""

from __future__ import annotations

import datetime as dt
import json
import logging
import pickle
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO
from torch.utils.data import DataLoader

from pimc_dist import config as config_lib
from pimc_dist import shardset
from pimc_dist.shardset import (
    BatchRing,
    LoaderError,
    MetaList,
    RingBatch,
    ShardError,
    ShardSetWriter,
    ShardStream,
    build_loader,
    dihedral,
    exact_split,
    resampled_tasks,
)
from pimc_dist.shardset.reader import seeded_rng

VIEWS = ("rp", "series", "rsi")


def grid_dates(patch: int, steps: int) -> list[str]:
    """A patch's grid dates (patches start on different days, so a set has several grids)."""
    start = dt.date(2019, 1, 1) + dt.timedelta(days=patch % 3)
    return [(start + dt.timedelta(days=10 * k)).isoformat() for k in range(steps)]


def pimc_sample(i: int, rng: np.random.Generator, steps: int = 12, rsi_dtype=np.int16) -> dict:
    t = np.linspace(0, 1, steps)
    series = 0.3 + 0.4 * np.sin(2 * np.pi * (t[None] + rng.random((3, 1))))
    series += rng.normal(0, 0.05, (3, steps))
    return {
        "__key__": f"p{i:05d}",
        "rp.png": rng.integers(0, 256, (3, 12, 12), dtype=np.uint8),
        "series.npy": np.clip(series, -1, 1).astype(np.float16),
        # int16 reflectance x 10000, or float16 reflectance: both are stored as given.
        "rsi.npy": (
            rng.integers(0, 6000, (4, 6, 6)) / (1 if rsi_dtype == np.int16 else 1e4)
        ).astype(rsi_dtype),
        "json": {
            "dataset": "demo",
            "patch": i // 10,
            "row": i,
            "col": 0,
            "label": i % 5,
            "fold": 1,
            "dates": grid_dates(i // 10, steps),
        },
    }


def write_pimc(
    out, sizes: list[int], seed: int = 0, steps: int = 12, rsi_dtype=np.int16, png_level=0
) -> dict[str, dict]:
    """A shard set with the given number of samples per shard; returns the samples by key."""
    rng = np.random.default_rng(seed)
    samples = {}
    writer = ShardSetWriter(
        out,
        source="demo",
        classes=[f"c{k}" for k in range(5)],
        meta_tables=("dates",),
        png_level=png_level,
    )
    i = 0
    for index, size in enumerate(sizes):
        with writer.shard(index):
            for _ in range(size):
                s = pimc_sample(i, rng, steps, rsi_dtype)
                samples[s["__key__"]] = s
                writer.write(s)
                i += 1
    writer.close()
    return samples


def stream(out, **kw) -> ShardStream:
    kw.setdefault("views", list(VIEWS))
    kw.setdefault("batch_size", 8)
    kw.setdefault("resampled", False)
    kw.setdefault("shuffle_buffer", 16)
    return ShardStream(shardset.read_manifest(out), **kw)


def keys_of(batches) -> list[str]:
    return [f"p{m['row']:05d}" for b in batches for m in b["meta"]]


@pytest.mark.parametrize(
    ("rsi_dtype", "png_level"), [(np.int16, 0), (np.float16, 0), (np.int16, 1)]
)
def test_round_trip_is_bit_exact_in_the_stored_dtypes(tmp_path, rsi_dtype, png_level):
    samples = write_pimc(tmp_path, [20, 20, 8], rsi_dtype=rsi_dtype, png_level=png_level)
    batches = list(stream(tmp_path))
    assert len(batches) == 6
    for batch in batches:
        assert batch["rp"].dtype == torch.uint8 and batch["rp"].shape == (8, 3, 12, 12)
        assert batch["series"].dtype == torch.float16
        assert batch["rsi"].numpy().dtype == rsi_dtype
        for j, meta in enumerate(batch["meta"]):
            original = samples[f"p{meta['row']:05d}"]
            for view, suffix in (("rp", "rp.png"), ("series", "series.npy"), ("rsi", "rsi.npy")):
                np.testing.assert_array_equal(batch[view][j].numpy(), original[suffix])
            assert meta == original["json"] and batch["label"][j] == original["json"]["label"]
    assert sorted(keys_of(batches)) == sorted(samples)


def test_meta_read_back_equals_what_was_written_dates_included(tmp_path):
    samples = write_pimc(tmp_path, [20, 20, 8])
    manifest = shardset.read_manifest(tmp_path)
    # Each grid is stored once, in the manifest; a sample's JSON carries only its id.
    assert sorted(manifest.meta_tables["dates"].values()) == sorted(
        grid_dates(p, 12) for p in range(3)
    )
    raw = next(shardset.iter_shard_samples(manifest.shard_paths()[0]))
    stored = json.loads(raw["json"])
    assert stored["dates"] in manifest.meta_tables["dates"] and len(raw["json"]) < 150
    assert shardset.decode_meta(raw["json"], manifest) == samples[raw["__key__"]]["json"]
    # Through DataLoader workers (MetaList pickled with its part of the tables).
    loader = build_loader(loader_cfg(tmp_path, "loader.workers=2"), train=False)
    metas = [m for batch in loader for m in batch["meta"]]
    loader.close()
    assert len(metas) == len(samples)
    for meta in metas:
        assert meta == samples[f"p{meta['row']:05d}"]["json"]
    metas[0]["dates"].append("x")  # each sample's list is its own
    assert metas[1]["dates"] == samples[f"p{metas[1]['row']:05d}"]["json"]["dates"]


def test_a_sample_naming_a_table_id_the_manifest_lacks_is_skipped(tmp_path, caplog):
    write_pimc(tmp_path, [8])
    path = tmp_path / "manifest.json"
    info = json.loads(path.read_text())
    info["meta_tables"]["dates"] = {}
    path.write_text(json.dumps(info))
    got = stream(tmp_path, batch_size=1, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pimc_dist.shardset"):
        with pytest.raises(LoaderError, match="no decodable sample"):
            list(got)
    assert got.stats.skipped["decode"] >= 8
    assert "json: dates id" in caplog.text and "not in the manifest" in caplog.text


def test_batches_keep_their_stored_dtypes_and_to_device_normalises_them(tmp_path):
    write_pimc(tmp_path, [16])
    manifest = shardset.read_manifest(tmp_path)
    views = "loader.views=[rp,series,rsi]"
    loader = build_loader(loader_cfg(tmp_path, "loader.workers=0", views), train=False)
    raw = next(iter(loader))
    assert (raw["rp"].dtype, raw["series"].dtype, raw["rsi"].dtype) == (
        torch.uint8,
        torch.float16,
        torch.int16,
    )
    moved = loader.to_device(raw, "cpu")
    assert sorted(loader.normalisation) == sorted(VIEWS)
    for view in VIEWS:
        mean = torch.tensor(manifest.stats[view].mean).view(1, -1, *[1] * (raw[view].ndim - 2))
        std = torch.tensor(manifest.stats[view].std).view(1, -1, *[1] * (raw[view].ndim - 2))
        assert moved[view].dtype == torch.float32
        torch.testing.assert_close(
            moved[view], ((raw[view].double() - mean) / std).float(), rtol=1e-5, atol=1e-5
        )
    off = build_loader(loader_cfg(tmp_path, "loader.workers=0", "loader.normalize=false"))
    assert off.normalisation == {}
    assert off.to_device(raw, "cpu")["rsi"].dtype == torch.int16


def test_exact_epoch_splits_ranks_and_workers_disjointly_and_covers_everything(tmp_path):
    samples = write_pimc(tmp_path, [13, 29, 6, 16])  # 64 = 2 ranks x 4 batches x 8
    seen = []
    for rank in range(2):
        loader = DataLoader(
            stream(tmp_path, rank=rank, world_size=2), batch_size=None, num_workers=2
        )
        batches = list(loader)
        assert len(batches) == 4
        seen.append(keys_of(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(samples)


def test_exact_split_gives_every_worker_disjoint_whole_batches():
    counts = [13, 29, 6, 16, 1]  # 65 samples; 2 ranks x 3 workers, batches of 4
    paths = [f"s{i}" for i in range(len(counts))]
    samples = []  # (shard, index in shard) of every sample handed out
    per_rank = Counter()
    for rank in range(2):
        for worker in range(3):
            n, tasks = exact_split(
                paths,
                counts,
                rank=rank,
                world_size=2,
                worker=worker,
                num_workers=3,
                batch_size=4,
                order=[4, 2, 0, 3, 1],
            )
            assert n % 4 == 0 and sum(t.count for t in tasks) == n
            per_rank[rank] += n // 4
            samples += [(t.path, t.skip + k) for t in tasks for k in range(t.count)]
    assert per_rank == {0: 8, 1: 8}  # 65 // (2 * 4) batches on each rank
    assert len(samples) == len(set(samples)) == 64
    assert all(k < counts[int(path[1:])] for path, k in samples)


@pytest.mark.parametrize("workers", [(1, 1), (1, 2)])
def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(tmp_path, workers):
    write_pimc(tmp_path, [37, 2, 11, 1, 23])  # 74 samples; rank 0 would get most of them by shard
    counts = []
    for rank, num_workers in enumerate(workers):
        s = stream(tmp_path, rank=rank, world_size=2, batch_size=6)
        loader = DataLoader(s, batch_size=None, num_workers=num_workers if num_workers > 1 else 0)
        for epoch in range(2):
            s.epoch.set(epoch)
            counts.append(sum(1 for _ in loader))
    assert counts == [74 // 12] * 4


def test_epochs_reshuffle_but_keep_the_split(tmp_path):
    write_pimc(tmp_path, [10, 10, 10, 10])
    s = stream(tmp_path, batch_size=5)
    s.epoch.set(0)
    first = keys_of(s)
    s.epoch.set(1)
    second = keys_of(s)
    s.epoch.set(0)
    assert keys_of(s) == first and first != second and sorted(first) == sorted(second)


def test_resampled_streams_differ_per_rank_and_repeat_with_the_seed(tmp_path):
    samples = write_pimc(tmp_path, [10, 10, 10])

    def first_keys(rank, seed=0):
        it = iter(stream(tmp_path, resampled=True, rank=rank, world_size=2, seed=seed))
        return keys_of(next(it) for _ in range(8))  # 64 samples: more than one pass

    a = first_keys(0)
    # Whole shards are drawn: 64 samples come from more than one of the three shards.
    assert len(a) == 64 and set(a) <= set(samples) and len({int(k[1:]) // 10 for k in a}) > 1
    assert a == first_keys(0) and a != first_keys(1) and a != first_keys(0, seed=1)


def test_resampled_shard_draws_are_weighted_by_sample_count():
    draws = resampled_tasks(["a", "b", "c", "d"], [10, 30, 0, 60], seeded_rng(0))
    counts = Counter(next(draws).path for _ in range(4000))
    assert counts["c"] == 0  # an empty shard is never drawn
    for path, share in (("a", 0.1), ("b", 0.3), ("d", 0.6)):
        assert abs(counts[path] / 4000 - share) < 0.03, counts


def test_resampled_streams_differ_per_worker_and_per_epoch(tmp_path):
    write_pimc(tmp_path, [10, 10, 10, 10, 10, 10])
    s = stream(tmp_path, resampled=True, batch_size=10, shuffle_buffer=0)

    def first_keys(epoch):
        # The DataLoader takes batches from its workers in turn: even ones from worker 0.
        s.epoch.set(epoch)
        batches = iter(DataLoader(s, batch_size=None, num_workers=2))
        first = [next(batches) for _ in range(8)]
        return keys_of(first[0::2]), keys_of(first[1::2])

    worker0, worker1 = first_keys(0)
    assert worker0 != worker1
    assert first_keys(0) == (worker0, worker1)  # the same seed, epoch and worker: the same draws
    assert first_keys(1)[0] != worker0


def test_corrupt_and_truncated_shards_are_skipped_counted_and_logged(tmp_path, caplog):
    write_pimc(tmp_path, [16, 16, 16])
    path = tmp_path / "shard-000001.tar"
    raw = bytearray(path.read_bytes())
    header = raw.index(b"p00020.json")
    raw[header : header + 512] = b"\x01" * 512  # garbage where a header should be
    path.write_bytes(bytes(raw))
    cut = tmp_path / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[:9000])
    s = stream(tmp_path, views=["rsi"])
    with caplog.at_level(logging.WARNING, logger="pimc_dist.shardset"):
        batches = list(s)
    assert len(batches) == 6  # the epoch still has its batch count (the good samples are re-read)
    stats = s.stats.as_dict()
    assert stats["refills"] == 2 and stats["batches"] == 6  # 22 good samples per pass, 48 needed
    assert "shard-000001.tar" in caplog.text and "corrupt tar header" in caplog.text
    assert "shard-000002.tar" in caplog.text and "truncated" in caplog.text
    # One evaluation pass counts each lost sample once: p00020..31, and 14 of shard 2 after the cut.
    once = stream(tmp_path, views=["rsi"], drop_last=False, shuffle=False)
    assert sum(len(b["meta"]) for b in once) == 22
    assert once.stats.skipped == {"tar": 12 + 14, "missing": 0, "decode": 0, "shape": 0}


def patch_member(path, name: str, edit) -> None:
    """Edit the payload (or, with edit=None, the name) of one tar member in place."""
    raw = bytearray(path.read_bytes())
    at = raw.index(name.encode() + b"\0")
    if edit is None:
        key, suffix = name.split(".", 1)
        raw[at : at + len(name)] = f"{key}.x{suffix[1:]}".encode()  # an unknown member now
    else:
        size = int(raw[at + 124 : at + 135], 8)
        raw[at + 512 : at + 512 + size] = edit(bytes(raw[at + 512 : at + 512 + size]))
    path.write_bytes(bytes(raw))


def test_undecodable_samples_are_skipped_by_reason_and_the_run_goes_on(tmp_path, caplog):
    write_pimc(tmp_path, [24])
    path = tmp_path / "shard-000000.tar"
    patch_member(
        path, "p00001.rp.png", lambda b: b[:60] + bytes(len(b) - 60)
    )  # broken deflate stream
    patch_member(path, "p00002.rsi.npy", lambda b: b"\x00" * 6 + b[6:])  # bad .npy magic
    patch_member(path, "p00003.json", lambda b: b"[" + b[1:])  # not JSON
    patch_member(path, "p00004.series.npy", None)  # member missing
    patch_member(
        path, "p00005.rsi.npy", lambda b: b.replace(b"(4, 6, 6)", b"(6, 4, 6)")
    )  # wrong shape
    once = stream(tmp_path, shuffle=False, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="pimc_dist.shardset"):
        delivered = keys_of(once)
    assert once.stats.skipped == {"tar": 0, "missing": 1, "decode": 3, "shape": 1}
    bad = {"p00001", "p00002", "p00003", "p00004", "p00005"}
    assert delivered == [f"p{i:05d}" for i in range(24) if f"p{i:05d}" not in bad]
    for key in sorted(bad):
        assert f"shard-000000.tar: sample '{key}'" in caplog.text
    # Training keeps its batch count: the range is topped up from the good samples.
    train = stream(tmp_path)
    assert len(list(train)) == 3 and train.stats.as_dict()["refills"] == 1


def mosaic_set(out, n=32, size=6) -> dict[int, dict]:
    rng = np.random.default_rng(3)
    samples = {}
    with ShardSetWriter(out, kind="mosaic", classes=["x", "y", "z"]) as w:
        for i in range(n):
            s2 = rng.normal(size=(4, size, size)).astype(np.float32)
            samples[i] = {
                "__key__": f"m{i}",
                "s2.npy": s2,
                "s1.npy": s2[:2] * 2,  # co-registered with s2, so flips must match
                "rp.png": rng.integers(0, 256, (3, 5, 5), dtype=np.uint8),
                "json": {"i": i, "labels": [i % 2, 1, 0], "names": ["x", "y"]},
            }
            w.write(samples[i])
    return samples


def test_augmentation_flips_aligned_views_together_and_never_the_plots(tmp_path):
    samples = mosaic_set(tmp_path)
    views = ["s2", "s1", "rp"]
    s = stream(
        tmp_path,
        views=views,
        batch_size=32,
        shuffle=False,
        augment_views=views,
    )
    batch = next(iter(s))
    used = []
    for j, meta in enumerate(batch["meta"]):
        original = samples[meta["i"]]
        assert batch["labels"][j].tolist() == original["json"]["labels"]
        matches = []
        for k in range(8):
            expected = {v: dihedral(original[f"{v}.npy"], k) for v in ("s2", "s1")}
            expected["rp"] = original["rp.png"]  # never transformed
            if all(np.array_equal(batch[v][j].numpy(), expected[v]) for v in views):
                matches.append(k)
        assert len(matches) == 1, f"sample {meta['i']}: transforms {matches} match"
        used.append(matches[0])
    assert len(set(used)) >= 5  # 32 draws from 8 transforms


def test_uint16_dn_views_come_back_exactly_and_normalise_from_the_manifest(tmp_path):
    rng = np.random.default_rng(4)
    s2 = {f"m{i}": rng.integers(0, 30000, (3, 4, 4)).astype(np.uint16) for i in range(16)}
    with ShardSetWriter(tmp_path, kind="mosaic", classes=["x"]) as w:
        for key, array in s2.items():
            w.write({"__key__": key, "s2.npy": array, "json": {"key": key, "labels": [1]}})
    stats = shardset.read_manifest(tmp_path).stats["s2"]
    raw = next(iter(stream(tmp_path, views=["s2"], batch_size=16, shuffle=False)))
    norm = shardset.normalize_views(raw, {"s2": (np.array(stats.mean), np.array(stats.std))})
    for j, meta in enumerate(raw["meta"]):
        assert raw["s2"].dtype == torch.uint16
        np.testing.assert_array_equal(raw["s2"][j].numpy(), s2[meta["key"]])
    mean, std = (np.array(v).reshape(1, -1, 1, 1) for v in (stats.mean, stats.std))
    expected = (raw["s2"].numpy().astype(np.float64) - mean) / std
    np.testing.assert_allclose(norm["s2"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dihedral_covers_the_eight_symmetries_of_a_square():
    x = np.arange(9).reshape(1, 3, 3)
    images = {np.ascontiguousarray(dihedral(x, k)).tobytes() for k in range(8)}
    assert len(images) == 8


def test_dihedral_is_the_same_on_tensors_and_per_sample():
    x = np.arange(5 * 2 * 4 * 4, dtype=np.int16).reshape(5, 2, 4, 4)
    ks = [0, 3, 4, 7, 3]
    for k in range(8):  # k % 4 counter-clockwise quarter turns after a left-right flip if k >= 4
        expected = np.rot90(x[..., ::-1] if k >= 4 else x, k % 4, axes=(-2, -1))
        np.testing.assert_array_equal(dihedral(x, k), expected)
        np.testing.assert_array_equal(dihedral(torch.from_numpy(x), k).numpy(), expected)
    for got in (dihedral(x, ks), dihedral(torch.from_numpy(x), torch.tensor(ks)).numpy()):
        for i, k in enumerate(ks):
            np.testing.assert_array_equal(got[i], dihedral(x[i], k))
    oblong = np.zeros((2, 1, 3, 4))
    assert dihedral(oblong, [4, 6]).shape == oblong.shape
    with pytest.raises(ValueError, match="quarter turns of non-square"):
        dihedral(oblong, [1, 0])


def test_plots_made_on_the_fly_equal_the_recurrence_module(tmp_path):
    recurrence = pytest.importorskip("pimc_dist.recurrence")
    samples = write_pimc(tmp_path, [16])
    s = stream(tmp_path, views=["rp", "rsi"], rp_on_the_fly="cpu", shuffle=False)
    batch = next(iter(s))
    series = np.stack([samples[f"p{m['row']:05d}"]["series.npy"] for m in batch["meta"]])
    expected = recurrence.recurrence_plot_uint8(series.astype(np.float32))
    np.testing.assert_array_equal(batch["rp"].numpy(), expected)
    # The same plots built at the device from the raw series ("gpu" mode, here on the CPU).
    cfg = config_lib.load(
        None,
        [
            f"loader.shards={tmp_path}",
            "loader.views=[rp,rsi]",
            "loader.workers=0",
            "loader.rp_on_the_fly=gpu",
        ],
    )
    loader = build_loader(cfg, train=False)
    moved = loader.to_device(next(iter(loader)), "cpu")  # all 16 samples, in shard order
    mean, std = (v[None, :, None, None] for v in loader.normalisation["rp"])
    all_series = np.stack([samples[k]["series.npy"] for k in sorted(samples)]).astype(np.float32)
    all_plots = recurrence.recurrence_plot_uint8(all_series).astype(np.float32)
    np.testing.assert_allclose(moved["rp"].numpy(), (all_plots - mean) / std, rtol=1e-6, atol=1e-6)
    assert "rp_series" not in moved


def test_build_loader_from_config_with_workers_counters_and_epochs(tmp_path):
    write_pimc(tmp_path / "set", [20, 20, 20, 4])
    cfg = config_lib.load(
        None,
        [
            f"loader.shards={tmp_path / 'set'}",
            "loader.views=[rp,rsi]",
            "loader.workers=2",
            "loader.resampled=false",
            "loader.verify=sha256",
            "train.batch_size=8",
        ],
    )
    loader = build_loader(cfg, rank=1, world_size=2)
    assert len(loader) == loader.batches_per_epoch == 4
    epoch0 = [b for b in loader]
    loader.set_epoch(0)
    again = [b for b in loader]
    assert keys_of(epoch0) == keys_of(again) and len(epoch0) == 4
    batch = epoch0[0]
    assert set(batch) == {"rp", "rsi", "label", "meta"}
    assert batch["rp"].shape == (8, 3, 12, 12) and batch["rsi"].dtype == torch.int16
    assert loader.to_device(batch, "cpu")["rsi"].dtype == torch.float32
    counters = loader.counters()
    assert (
        counters["data/samples"] == 64
        and counters["data/batches"] == 8
        and counters["data/bytes"] > 0
    )
    images = loader.sample_images(2)
    assert set(images) == {"rp/0", "rp/1", "rsi/0", "rsi/1"} and images["rsi/0"].shape == (6, 6, 3)
    assert images["rp/0"].dtype == np.uint8


def loader_cfg(shards, *overrides: str):
    """A job config reading `shards` with the default loader settings but the ones given."""
    return config_lib.load(
        None, [f"loader.shards={shards}", "loader.views=[rp,rsi]", "train.batch_size=8", *overrides]
    )


def test_build_loader_refuses_a_shard_set_that_disagrees_with_its_manifest(tmp_path):
    write_pimc(tmp_path, [8, 8, 8])
    (tmp_path / "shard-000001.tar").unlink()
    raw = bytearray((tmp_path / "shard-000002.tar").read_bytes())
    raw[1000] ^= 1
    (tmp_path / "shard-000002.tar").write_bytes(bytes(raw))
    cfg = loader_cfg(tmp_path, "loader.verify=sha256", "loader.workers=0")
    with pytest.raises(ShardError) as err:  # 2 of 3 shards: more than max_excluded_fraction
        build_loader(cfg)
    message = str(err.value)
    assert "2 of 3 shard(s) disagree with manifest.json (loader.verify=sha256)" in message
    assert "holding 16 of 24 samples" in message and "loader.max_excluded_fraction=0.1" in message
    assert "shard-000001.tar: listed in manifest.json but missing" in message
    assert "shard-000002.tar: sha256" in message
    # With the size check alone the changed byte goes unseen; the missing shard is still named.
    with pytest.raises(ShardError, match="shard-000001.tar: listed in manifest.json but missing"):
        build_loader(loader_cfg(tmp_path, "loader.workers=0"))


def test_build_loader_leaves_out_a_truncated_shard_and_ranks_keep_equal_batch_counts(
    tmp_path, caplog
):
    samples = write_pimc(tmp_path, [8] * 10)
    cut = tmp_path / "shard-000003.tar"
    cut.write_bytes(cut.read_bytes()[:5000])
    lost = {f"p{i:05d}" for i in range(24, 32)}
    cfg = loader_cfg(tmp_path, "loader.resampled=false")  # default verify=size, 2 workers
    seen, lengths = [], []
    for rank in range(2):
        with caplog.at_level(logging.WARNING, logger="pimc_dist.shardset"):
            loader = build_loader(cfg, rank=rank, world_size=2)
        batches = list(loader)
        lengths.append((len(batches), loader.batches_per_epoch))
        seen.append(keys_of(batches))
        counters = loader.counters()
        assert counters["data/shards_excluded"] == 1 and counters["data/skipped_tar"] == 0
    assert lengths == [(4, 4), (4, 4)]  # 72 good samples // (2 ranks x 8)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0] + seen[1]) <= set(samples) - lost and len(seen[0] + seen[1]) == 64
    assert f"{cut}: 5000 bytes, manifest.json says" in caplog.text
    assert "1 of 10 shard(s) disagree" in caplog.text and "left out of this run" in caplog.text
    # Strict: no shard may be left out.
    with pytest.raises(ShardError, match="more than loader.max_excluded_fraction=0.0"):
        build_loader(loader_cfg(tmp_path, "loader.max_excluded_fraction=0"))
    # The default resampled stream never draws it either.
    resampled = build_loader(loader_cfg(tmp_path, "loader.workers=0"))
    batches = iter(resampled)
    assert not set(keys_of(next(batches) for _ in range(20))) & lost
    assert resampled.stats.skipped["tar"] == 0


def test_a_rank_whose_whole_range_is_a_damaged_shard_tops_up_from_the_others(tmp_path, caplog):
    samples = write_pimc(tmp_path, [16, 16])  # each rank's 2 batches are one whole shard
    damaged = tmp_path / "shard-000001.tar"
    raw = bytearray(damaged.read_bytes())
    raw[:512] = b"\x01" * 512  # same size, so verify=size passes; nothing in it is readable
    damaged.write_bytes(bytes(raw))
    cfg = loader_cfg(tmp_path, "loader.resampled=false", "loader.workers=0")
    counts, refills = [], []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2)
        with caplog.at_level(logging.WARNING, logger="pimc_dist.shardset"):
            keys = keys_of(loader)
        counts.append(len(keys) // 8)
        assert set(keys) <= {f"p{i:05d}" for i in range(16)} <= set(samples)
        refills.append(loader.counters()["data/refills"])
    assert counts == [2, 2] and sorted(refills) == [0, 1]
    assert "shard-000001.tar: corrupt tar header" in caplog.text
    assert "topping up from the shards after shard-000001.tar" in caplog.text


def test_loader_refuses_shards_of_an_older_schema_naming_the_manifest(tmp_path):
    write_pimc(tmp_path, [8])
    path = tmp_path / "manifest.json"
    # The previous schema (2): dates in every sample's JSON, no metadata tables.
    old = json.loads(path.read_text())
    old.pop("meta_tables")
    path.write_text(json.dumps({**old, "schema_version": shardset.SCHEMA_VERSION - 1}))
    previous = shardset.SCHEMA_VERSION - 1
    with pytest.raises(
        ShardError, match=rf"manifest.json: key 'schema_version' is {previous}, this code "
    ):
        build_loader(loader_cfg(tmp_path, "loader.workers=0"))
    with pytest.raises(ShardError, match=r"shard it again \(python -m pimc_dist.shard\)"):
        build_loader(loader_cfg(tmp_path, "loader.workers=0"))


def test_loader_errors_name_the_problem(tmp_path):
    write_pimc(tmp_path, [8])
    with pytest.raises(LoaderError, match=r"view\(s\) \['s2'\] not in this shard set"):
        stream(tmp_path, views=["s2"])
    with pytest.raises(
        LoaderError, match="8 samples cannot fill one batch of 8 on each of 2 ranks"
    ):
        stream(tmp_path, world_size=2, rank=0)


def test_a_resampled_stream_over_broken_shards_fails_instead_of_hanging(tmp_path):
    write_pimc(tmp_path, [8, 8])
    for path in tmp_path.glob("*.tar"):
        path.write_bytes(b"\x07" * path.stat().st_size)
    with pytest.raises(LoaderError, match="shard reads in a row gave no sample"):
        next(iter(stream(tmp_path, resampled=True)))


def test_exact_epoch_with_nothing_decodable_in_the_whole_set_raises(tmp_path):
    write_pimc(tmp_path, [8, 8])
    for i in range(16):  # p00000..07 in shard 0, p00008..15 in shard 1
        patch_member(
            tmp_path / f"shard-00000{i // 8}.tar", f"p{i:05d}.json", lambda b: b"!" + b[1:]
        )
    with pytest.raises(LoaderError, match=r"no decodable sample in any of the 2 shard\(s\) of "):
        list(stream(tmp_path))


def test_evaluation_mode_reads_every_sample_once_in_order(tmp_path):
    samples = write_pimc(tmp_path, [7, 6])
    s = stream(tmp_path, shuffle=False, drop_last=False, batch_size=4)
    batches = list(s)
    assert [len(b["meta"]) for b in batches] == [4, 4, 4, 1] and s.batches_per_epoch() == 4
    assert keys_of(batches) == sorted(samples)
    assert Counter(keys_of(batches)).most_common(1)[0][1] == 1


def by_key(batches) -> dict[str, dict]:
    """Every sample of `batches` by key: its view tensors and its meta."""
    out = {}
    for batch in batches:
        for j, meta in enumerate(batch["meta"]):
            views = {v: batch[v][j] for v in batch if torch.is_tensor(batch[v])}
            out[f"p{meta['row']:05d}"] = {**views, "meta": meta}
    return out


def test_workers_deliver_through_the_ring_exactly_what_one_process_builds(tmp_path):
    samples = write_pimc(tmp_path, [13, 11, 9])  # 33: partial last batches per worker

    def cfg(workers: int):
        views = "loader.views=[rp,series,rsi]"
        return loader_cfg(tmp_path, f"loader.workers={workers}", views)

    inline = by_key(build_loader(cfg(0), train=False))
    loader = build_loader(cfg(2), train=False)
    assert loader.stream.ring is not None and loader.stream.ring.workers == 2
    batches = list(loader)
    assert all(isinstance(b["meta"], MetaList) for b in batches)
    through = by_key(batches)
    assert sorted(through) == sorted(inline) == sorted(samples)
    for key, sample in through.items():
        assert sample["meta"] == samples[key]["json"] == inline[key]["meta"]
        for view in ("rp", "series", "rsi", "label"):
            assert sample[view].dtype == inline[key][view].dtype
            torch.testing.assert_close(sample[view], inline[key][view], rtol=0, atol=0)
        np.testing.assert_array_equal(sample["rsi"].numpy(), samples[key]["rsi.npy"])
        np.testing.assert_array_equal(sample["rp"].numpy(), samples[key]["rp.png"])


def test_without_room_in_shared_memory_the_loader_runs_without_a_ring(
    tmp_path, monkeypatch, caplog
):
    samples = write_pimc(tmp_path, [13, 11])
    monkeypatch.setattr(
        "pimc_dist.shardset.loader.shared_memory_free", lambda path="/dev/shm": 1024
    )
    with caplog.at_level("WARNING", logger="pimc_dist.shardset"):
        loader = build_loader(
            loader_cfg(tmp_path, "loader.workers=1", "loader.normalize=false"), train=False
        )
    assert loader.stream.ring is None
    assert "no shared-memory batch ring" in caplog.text and "/dev/shm" in caplog.text
    through = by_key(list(loader))
    assert sorted(through) == sorted(samples)
    for key, sample in through.items():
        np.testing.assert_array_equal(sample["rp"].numpy(), samples[key]["rp.png"])


def test_a_process_that_exits_with_its_loader_alive_does_not_hang(tmp_path):
    """Workers ignore SIGTERM (they serve batches while the trainer saves on a Slurm stop);
    multiprocessing's exit handler would SIGTERM and join them forever."""
    write_pimc(tmp_path, [13, 11])
    script = textwrap.dedent(
        f"""
        from pimc_dist import config
        from pimc_dist.shardset import build_loader
        cfg = config.load(None, ["loader.shards={tmp_path}", "loader.views=[rp,rsi]",
                                 "train.batch_size=8", "loader.workers=2"])
        LOADER = build_loader(cfg, train=True)  # resampled: endless
        batches = iter(LOADER)
        next(batches)
        print("got a batch", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0 and "got a batch" in proc.stdout, proc.stderr[-2000:]


def test_a_worker_whose_ring_is_full_builds_batches_in_new_memory_and_nothing_is_overwritten(
    tmp_path,
):
    samples = write_pimc(tmp_path, [40])
    loader = build_loader(
        loader_cfg(tmp_path, "loader.workers=1", "loader.normalize=false"), train=False
    )
    stream = loader.stream
    ring = stream.ring = BatchRing(stream.ring.buffers[0][0].numel(), workers=1, slots=1)
    kinds, batches = [], []
    for i, item in enumerate(loader.dataloader):
        if i == 0:
            time.sleep(1.0)  # slot 0 stays taken while the worker builds the next batches
        kinds.append(type(item).__name__)
        if isinstance(item, RingBatch):
            item = ring.take(item, stream.builder.layout(item.n), pin=False)
        batches.append(item)
    assert kinds[0] == "RingBatch" and "dict" in kinds and len(batches) == 5
    for key, sample in by_key(batches).items():
        np.testing.assert_array_equal(sample["rsi"].numpy(), samples[key]["rsi.npy"])
        np.testing.assert_array_equal(sample["rp"].numpy(), samples[key]["rp.png"])


def test_batch_ring_hands_out_slots_in_turn_and_only_when_free():
    layout = {"x": ((4, 3), np.dtype(np.float32)), "y": ((4,), np.dtype(np.int16))}
    ring = BatchRing(128, workers=1, slots=2)
    assert [ring.acquire(0, layout), ring.acquire(0, layout), ring.acquire(0, layout)] == [
        0,
        1,
        None,
    ]
    ring.free[0].release()  # the trainer copied batch 0 out
    assert ring.acquire(0, layout) == 0
    too_big = {"x": ((64,), np.dtype(np.float32))}
    ring.free[0].release()
    assert ring.acquire(0, too_big) is None and ring.acquire(0, layout) == 1  # no slot spent
    arrays = ring.arrays(0, 1, layout)
    arrays["x"][:] = 1.5
    arrays["y"][:] = 7
    batch = ring.take(RingBatch(0, 1, 4, {"label": np.arange(4)}), layout, pin=False)
    arrays["x"][:] = 0  # the slot is reused; the trainer's copy is its own
    assert batch["x"].tolist() == [[1.5] * 3] * 4 and batch["y"].tolist() == [7] * 4
    assert batch["label"].tolist() == [0, 1, 2, 3]


def test_meta_list_parses_on_first_use_pickles_as_raw_bytes_and_torch_leaves_it_alone():
    from torch.utils.data._utils.collate import default_convert
    from torch.utils.data._utils.pin_memory import pin_memory

    raw = [b'{"label": 1, "dates": ["2020-01-01"]}', b' {"label": 2} ']
    metas = MetaList(raw)
    copy = pickle.loads(pickle.dumps(metas))
    assert copy._items is None and copy._raw == raw  # sent as bytes, not parsed
    assert len(copy) == 2 and copy[1] == {"label": 2} and copy[:1] == [json.loads(raw[0])]
    assert [m["label"] for m in copy] == [1, 2]
    assert default_convert(metas) is metas and pin_memory(metas) is metas


def flip_middle(path, n: int = 1024) -> None:
    """Invert `n` bytes in the middle of a file (same size: loader.verify=size cannot see it)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_with_flipped_bytes_is_left_out_after_its_first_loss_not_read_every_pass(
    tmp_path, caplog, workers
):
    write_pimc(tmp_path, [64, 64, 64, 64])
    bad = tmp_path / "shard-000001.tar"
    flip_middle(bad)
    cfg = loader_cfg(tmp_path, "loader.resampled=false", f"loader.workers={workers}")
    with caplog.at_level(logging.WARNING, logger="pimc_dist.shardset"):
        loader = build_loader(cfg)  # verify=size: same size, so not left out at start-up
        assert loader.counters()["data/shards_excluded"] == 0
        per_epoch = []
        for _ in range(4):
            keys = keys_of(loader)
            assert len(keys) == loader.batches_per_epoch * 8 == 256  # epochs keep their length
            per_epoch.append(loader.counters()["data/skipped_tar"])
    lost_once = per_epoch[0]
    assert 0 < lost_once < 64  # the samples after the flipped bytes, in the first pass only
    assert per_epoch == [lost_once] * 4  # then the shard is no longer read
    assert loader.counters()["data/shards_excluded"] == 1  # both workers learnt it
    if workers:
        return  # the warning is logged by a worker process, out of caplog's reach
    warnings = [r.getMessage() for r in caplog.records if "left out for the rest" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    assert f"lost {lost_once} of 64 samples" in warnings[0]
    assert "loader.max_shard_loss_fraction=0.05" in warnings[0]
    # Evaluation leaves nothing out: each pass reads every sample it can and counts each loss.
    evaluation = shardset.open_loader(tmp_path, views=["rsi"], batch_size=8, train=False)
    assert len(keys_of(evaluation)) == len(keys_of(evaluation)) == 256 - lost_once - 1
    assert evaluation.counters()["data/shards_excluded"] == 0
    assert evaluation.stats.skipped["tar"] == 2 * lost_once


def test_a_shard_losing_a_few_samples_stays_and_resampled_draws_skip_an_excluded_one(tmp_path):
    write_pimc(tmp_path, [64, 64, 64])
    patch_member(tmp_path / "shard-000000.tar", "p00003.json", lambda b: b"!" + b[1:])
    flip_middle(tmp_path / "shard-000002.tar")
    loader = build_loader(loader_cfg(tmp_path, "loader.workers=0"))  # resampled
    batches = iter(loader)
    keys = keys_of(next(batches) for _ in range(60))  # ~20 draws of each shard
    skipped = loader.counters()
    assert skipped["data/shards_excluded"] == 1  # shard 2; shard 0 loses 1 of 64 per pass
    assert skipped["data/skipped_tar"] < 64 and skipped["data/skipped_decode"] >= 2
    from_bad = [k for k in keys if int(k[1:]) >= 128]
    assert len(from_bad) == len(set(from_bad)) < 64  # its good samples were read once
    # With the limit at 1 no shard is ever left out.
    keep = build_loader(
        loader_cfg(tmp_path, "loader.workers=0", "loader.max_shard_loss_fraction=1")
    )
    batches = iter(keep)
    for _ in range(60):
        next(batches)
    assert keep.counters()["data/shards_excluded"] == 0 and keep.stats.skipped["tar"] > 64
