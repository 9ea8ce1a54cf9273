"""The leak guard (pimc_dist/eval/leakage.py): keys listed from shard sets without decoding,
overlap counted per scored split, fine-tuning refused (exit 2) or, when allowed, recorded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_module
from launch_helpers import TINY

from pimc_dist import config as config_lib
from pimc_dist import shard
from pimc_dist.eval import finetune, leakage
from pimc_dist.eval.results import result_rows, write_markdown
from pimc_dist.shardset import ShardSetWriter, read_manifest
from pimc_dist.sources.fixtures import write_pastis

FT = REPO / "configs" / "finetune"


def write_set(folder: Path, samples: list[dict], source: str = "pastis", per_shard: int = 5):
    with ShardSetWriter(folder, max_samples=per_shard, source=source, kind="pimc") as w:
        for s in samples:
            w.write(s)
    return folder


def pixel(patch: str, row: int, col: int, fold: int | None = None, split: str | None = None):
    return {
        "__key__": f"{patch}_r{row:04d}_c{col:04d}",
        "series.npy": np.zeros((3, 4), np.float16),
        "json": {"patch": patch, "row": row, "col": col, "fold": fold, "split": split},
    }


def patch_grid(folds: dict[str, int], n: int = 3) -> list[dict]:
    """n x n pixels of each patch, its fold from `folds`."""
    return [pixel(p, r, c, f) for p, f in folds.items() for r in range(n) for c in range(n)]


FOLDS = {"10001": 1, "10002": 2, "10003": 3, "10004": 4, "10005": 5}


# --- listing keys ------------------------------------------------------------------------------


def test_writer_leaves_a_key_index_and_keys_and_splits_come_from_it(tmp_path):
    folder = write_set(tmp_path / "s", patch_grid(FOLDS))  # 45 samples, 9 shards
    manifest = read_manifest(folder)
    assert len(manifest.shards) == 9
    for path in manifest.shard_paths():
        index = json.loads(leakage.keys_file(path).read_text())
        assert len(index["keys"]) == len(index["group"]) == 5
    source, keys = leakage.set_keys(folder)
    assert source == "pastis" and len(keys) == 45 and "10003_r0002_c0001" in keys
    source, splits = leakage.split_keys(folder, 0)
    assert {s: len(k) for s, k in splits.items()} == {"train": 27, "val": 9, "test": 9}
    assert all(k.startswith("10005_") for k in splits["test"])
    _, rotated = leakage.split_keys(folder, 1)  # rotation 1: test is fold 1
    assert all(k.startswith("10001_") for k in rotated["test"])


def test_without_a_key_index_the_tar_headers_and_json_give_the_same_answer(tmp_path):
    point = pixel("pt", 0, 0)
    point["json"]["group"] = "field-7"  # a point of a table: its group decides its split
    samples = patch_grid(FOLDS) + [pixel("x1", 0, 0, split="test"), pixel("x2", 0, 0), point]
    indexed = write_set(tmp_path / "a", samples)
    old = write_set(tmp_path / "b", samples)
    paths = read_manifest(old).shard_paths()
    for path in paths[:-1]:  # an older set: no index
        leakage.keys_file(path).unlink()
    truncated = leakage.keys_file(paths[0])  # a cut-off index is not trusted either
    truncated.write_text(
        leakage.keys_file(read_manifest(indexed).shard_paths()[0]).read_text()[:40]
    )
    stale = leakage.keys_file(paths[-1])  # an index of other bytes is not trusted
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "sha256": "0" * 64}))
    assert leakage.set_keys(old)[1] == leakage.set_keys(indexed)[1]
    # Samples with neither fold nor split: the sharder's hash of the patch (manifest's rule).
    assert leakage.split_keys(old, 0) == leakage.split_keys(indexed, 0)
    assert "x1_r0000_c0000" in leakage.split_keys(old, 0)[1]["test"]


def test_a_missing_shard_makes_the_listing_fail_with_its_name(tmp_path):
    folder = write_set(tmp_path / "s", patch_grid(FOLDS))
    path = read_manifest(folder).shard_paths()[2]
    leakage.keys_file(path).unlink()
    path.unlink()
    with pytest.raises(leakage.KeyListingError, match=path.name):
        leakage.set_keys(folder)


# --- the check on configs ------------------------------------------------------------------------


def run_folder(folder: Path, shards: Path | str) -> Path:
    """A pretraining run folder as far as the guard reads it: its config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_lib.load(TINY, [f"loader.shards={shards}", f"train.run_dir={folder}"])
    config_lib.save(cfg, folder / "config.yaml")
    (folder / "encoders.safetensors").write_bytes(b"")
    return folder


def ft_cfg(run: Path, shards: Path, *extra: str):
    return config_lib.load(
        FT / "pastis_pixel_cls.yaml",
        [f"finetune.ckpt={run}", f"loader.shards={shards}", "tracking.wandb=false", *extra],
    )


def test_overlap_is_counted_per_scored_split_and_refused_unless_allowed(tmp_path):
    everything = write_set(tmp_path / "all", patch_grid(FOLDS))
    # The pretraining set holds fold 1-3 patches and two pixels of fold 5 (another set).
    pre = write_set(tmp_path / "pre", patch_grid({k: FOLDS[k] for k in ("10001", "10002")}))
    pre2 = patch_grid({"10003": 3}) + [pixel("10005", 0, 0, 5), pixel("10005", 2, 1, 5)]
    run = run_folder(tmp_path / "run", write_set(tmp_path / "pre2", pre2))
    cfg = ft_cfg(run, everything)
    overlap = leakage.pretrain_overlap(cfg)
    assert overlap.counts == {"val": 0, "test": 2} and overlap.scored == {"val": 9, "test": 9}
    with pytest.raises(leakage.PretrainOverlapError) as err:
        leakage.enforce(cfg, overlap)
    text = str(err.value)
    assert "0 of the 9 val samples, 2 of the 9 test samples" in text
    assert "data.split=train" in text and "finetune.allow_pretrain_overlap=true" in text
    allowed = ft_cfg(run, everything, "finetune.allow_pretrain_overlap=true")
    assert leakage.enforce(allowed, overlap, log=lambda _: None) == {"val": 0, "test": 2}
    # Training-fold pretraining: nothing scored was seen.
    clean = ft_cfg(run_folder(tmp_path / "clean", pre), everything)
    assert leakage.guard(clean) == 0
    # The encoders file beside the run's config.yaml points at the same pretraining.
    assert leakage.pretrain_overlap(ft_cfg(run / "encoders.safetensors", everything)).total == 2
    # Random init and the cnn1d baseline load no pretrained weights: nothing to check.
    assert leakage.guard(ft_cfg(run, everything, "finetune.init=random")) == 0


def test_keys_of_another_source_never_meet(tmp_path):
    everything = write_set(tmp_path / "all", patch_grid(FOLDS))
    demo = write_set(tmp_path / "demo", patch_grid(FOLDS), source="demo")  # same ids
    assert leakage.pretrain_overlap(ft_cfg(run_folder(tmp_path / "r", demo), everything)).total == 0


def test_unknown_pretraining_data_is_recorded_not_refused(tmp_path, capsys):
    everything = write_set(tmp_path / "all", patch_grid(FOLDS))
    lone = tmp_path / "lone" / "encoders.safetensors"  # no config.yaml beside it
    lone.parent.mkdir()
    lone.write_bytes(b"")
    assert leakage.guard(ft_cfg(lone, everything)) == "unknown"
    assert "no config.yaml beside" in capsys.readouterr().out
    moved = run_folder(tmp_path / "moved", tmp_path / "gone")
    assert leakage.guard(ft_cfg(moved, everything)) == "unknown"
    assert "moved or deleted" in capsys.readouterr().out


def leaky_run(tmp_path: Path, shards: Path) -> Path:
    """A run folder with real encoders, pretrained (its config.yaml says) on `shards`."""
    from test_finetune import PIMC_VIEWS, make_run

    run = make_run(tmp_path / "run", PIMC_VIEWS)
    pre = config_lib.load(run / "job.yaml", [f"train.run_dir={run}", f"loader.shards={shards}"])
    config_lib.save(pre, run / "config.yaml")
    return run


def test_the_launcher_submits_no_leaking_job(tmp_path, capsys):
    from pimc_dist import launch

    everything = write_set(tmp_path / "all", patch_grid(FOLDS))
    run = leaky_run(tmp_path, everything)
    code = launch.main(
        [
            "finetune", "--cluster", "local", "--config", str(FT / "pastis_pixel_cls.yaml"),
            f"finetune.ckpt={run}", f"loader.shards={everything}",
            f"train.run_dir={tmp_path / 'ft'}", "tracking.wandb=false",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "nothing submitted" in err and "9 of the 9 test samples" in err
    assert not (tmp_path / "ft").exists()


def test_a_sweep_submits_no_leaking_cell(tmp_path, capsys):
    from pimc_dist import sweep

    everything = write_set(tmp_path / "all", patch_grid(FOLDS))
    run = leaky_run(tmp_path, everything)
    code = sweep.cli(
        [
            "--config", str(REPO / "configs/sweep/demo.yaml"), f"train.run_dir={tmp_path / 'sw'}",
            f"sweep.overrides=[finetune.ckpt={run},loader.shards={everything}]",
            "sweep.grid.task=[pastis_pixel_cls]", "sweep.grid.label_fraction=[1.0]",
            "sweep.grid.seed=[0]", "tracking.wandb=false", "--cluster", "local",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "sweep cell pastis_pixel_cls__linear-pretrained" in err
    assert "9 of the 9 val samples, 9 of the 9 test samples" in err
    assert not (tmp_path / "sw" / "cells").exists()


def test_result_rows_and_markdown_carry_the_overlap(tmp_path):
    class Cell:
        id, task, protocol, init = "c", "pastis_pixel_cls", "linear", "pretrained"
        label_fraction, seed = 1.0, 0

    folder = tmp_path / "c"
    folder.mkdir()
    result = {
        "status": "ok",
        "primary": "miou",
        "metrics": {"miou": 0.5, "oa": 0.6, "knn_acc": 0.7, "silhouette": 0.1},
        "val_metrics": {"miou": 0.4},
        "pretrain_overlap": {"val": 0, "test": 2},
    }
    (folder / "result.json").write_text(json.dumps(result))
    rows, problems = result_rows([(Cell, folder)])
    assert rows[0]["pretrain_overlap"] == "val 0, test 2" and rows[0]["knn_acc"] == 0.7
    text = write_markdown("s", rows, problems, 1, tmp_path / "r.md").read_text()
    assert "pretrain overlap" in text and "val 0, test 2" in text and "`c`" in text
    assert "| knn_acc | silhouette |" in text


# --- end to end: real shards, a real (tiny) pretraining, the fine-tuning job ---------------------


def _shard(raw: Path, out: Path, *extra: str) -> Path:
    cfg = config_lib.load(
        TINY,
        [
            "data.source=pastis", f"data.root={raw}", f"data.shard_dir={out}",
            "data.pixels_per_patch=32", "data.max_samples_per_shard=64", "data.workers=1", *extra,
        ],
    )  # fmt: skip
    assert shard.main(cfg) == 0
    return out


def _pretrain(shards: Path, run: Path) -> Path:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = run_module(
        "pimc_dist.pretrain", "--config", TINY, f"loader.shards={shards}", f"train.run_dir={run}",
        "loader.workers=0", "tracking.wandb=false", "train.batch_size=16",
        "train.total_samples=48", "train.ckpt_every_steps=100", "train.log_every_steps=1",
        "launch.tasks_per_node=1", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "encoders.safetensors").is_file()
    return run


@pytest.mark.timeout(900)
def test_pretraining_on_test_samples_is_refused_with_exit_2_and_allowed_runs_are_recorded(
    tmp_path, capsys
):
    raw = write_pastis(tmp_path / "raw", n_patches=5, size=32, seed=3)
    everything = _shard(raw, tmp_path / "all")  # every fold: what evaluation reads
    train_only = _shard(raw, tmp_path / "train", "data.folds=[1,2,3]")
    leaky = _pretrain(everything, tmp_path / "leaky")
    args = [
        "--config", str(FT / "pastis_pixel_cls.yaml"), f"ckpt={leaky}",
        f"loader.shards={everything}", "loader.workers=0", "tracking.wandb=false",
        "finetune.probe_epochs=3", "finetune.probe_lrs=[0.01]",
    ]  # fmt: skip
    refused = tmp_path / "refused"
    assert finetune.cli([*args, f"train.run_dir={refused}"]) == 2
    err = capsys.readouterr().err
    assert "32 of the 32 val samples, 32 of the 32 test samples" in err, err
    assert not (refused / "result.json").exists() and not (refused / "config.yaml").exists()

    allowed = tmp_path / "allowed"
    allow = "finetune.allow_pretrain_overlap=true"
    assert finetune.cli([*args, f"train.run_dir={allowed}", allow]) == 0
    result = json.loads((allowed / "result.json").read_text())
    assert result["pretrain_overlap"] == {"val": 32, "test": 32}
    # The probe's cached test features are the embeddings of the cluster coherence scores.
    assert 0.0 <= result["metrics"]["knn_acc"] <= 1.0 and -1 <= result["metrics"]["silhouette"] <= 1

    clean = _pretrain(train_only, tmp_path / "clean")
    ok = tmp_path / "ok"
    assert finetune.cli([*args, f"ckpt={clean}", f"train.run_dir={ok}"]) == 0
    assert json.loads((ok / "result.json").read_text())["pretrain_overlap"] == 0


# --- cost ----------------------------------------------------------------------------------------


def million_key_set(folder: Path, folds: dict[str, int]) -> Path:
    """A shard set that lists 1,000,000 pixel keys (1,000 patches x 40 x 25 pixels) in 250
    shards of 4,000, as far as its manifest and key index say: the shards are written with
    one real sample each, then their key index and manifest counts grown to 4,000 (writing a
    million real samples costs minutes; the check reads only the index)."""
    write_set(folder, [pixel(f"{20000 + i}", 0, 0, 1) for i in range(250)], per_shard=1)
    patches = list(folds)
    manifest = json.loads((folder / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"]):
        path = leakage.keys_file(folder / entry["name"])
        index = json.loads(path.read_text())
        mine = patches[4 * i : 4 * i + 4]
        index["groups"] = [[p, folds[p], None, None] for p in mine]
        index["keys"] = [
            f"{p}_r{r:04d}_c{c:04d}" for p in mine for r in range(40) for c in range(25)
        ]
        index["group"] = [g for g in range(4) for _ in range(1000)]
        path.write_text(json.dumps(index))
        entry["samples"] = 4000
    manifest["total_samples"] = 1_000_000
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
def test_the_check_on_a_million_keys_takes_seconds(tmp_path, capsys):
    """The cost of the whole check (both listings, cold cache, the intersections) on a
    pretraining set and an evaluation set of 1,000,000 keys each, all of them shared."""
    folds = {f"{20000 + p}": 1 + p % 5 for p in range(1000)}
    pre = million_key_set(tmp_path / "pre", folds)
    ev = million_key_set(tmp_path / "eval", folds)
    cfg = ft_cfg(run_folder(tmp_path / "run", pre), ev)
    t0 = time.perf_counter()
    overlap = leakage.pretrain_overlap(cfg)
    cold = time.perf_counter() - t0
    assert overlap.counts == {"val": 200_000, "test": 200_000}
    t0 = time.perf_counter()
    assert leakage.pretrain_overlap(cfg).counts == overlap.counts  # the next sweep cell
    warm = time.perf_counter() - t0
    with capsys.disabled():
        print(
            f"\nleak check, 1M + 1M keys from the key index: {cold:.2f} s cold, {warm:.2f} s warm"
        )
    assert cold < 60  # about 3 s on 2 busy cores
