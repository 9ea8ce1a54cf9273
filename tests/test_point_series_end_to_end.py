"""A labelled point table end to end, as docs/point_series.md tells a user to run it:

long-format table (CSV and parquet: labels, groups, a split column) -> shards of the training
split (`configs/pretrain/tiny_series.yaml`, `data.split=train`) -> PIMC pretraining without
crops (rp <-> series) on 2 local CPU ranks (`python -m pimc_dist.launch --cluster local`) ->
shards of every split -> `pixel_cls` linear probes (configs/finetune/pixel_cls.yaml) of the
pretrained encoders and of the same encoders at random init, each scoring OA and macro-F1
on non-empty val and test splits.

The table has four classes with a planted phenology (the NDVI peak's date and height differ
per class), 40 dates at 9-day steps, cloud gaps, points in groups of four that share a split.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_module
from test_bf16 import assert_ok, losses, run_job

from pimc_dist import config as config_lib
from pimc_dist import shard
from pimc_dist.encoders import load_encoder
from pimc_dist.shardset import decode_npy, iter_shard_samples, read_manifest

TINY_SERIES = REPO / "configs" / "pretrain" / "tiny_series.yaml"
PIXEL_CLS = REPO / "configs" / "finetune" / "pixel_cls.yaml"
CLASSES = ["bare", "maize", "meadow", "wheat"]
# Per class: NDVI peak day of year, peak height, peak width (days); bare soil stays low.
PHENOLOGY = {"bare": (180, 0.05, 60), "maize": (220, 0.65, 35), "meadow": (150, 0.35, 90),
             "wheat": (130, 0.7, 30)}  # fmt: skip
N_POINTS, N_DATES, STEP_DAYS, GROUP = 320, 40, 9, 4
COLUMNS = ["sample_id", "date", "B02", "B04", "B08", "label", "group", "split"]


def point_rows(seed: int = 0) -> list[list[object]]:
    """Rows of the long-format table (module docstring); gaps are None."""
    rng = np.random.default_rng(seed)
    start = dt.date(2021, 1, 5)
    dates = [start + dt.timedelta(days=STEP_DAYS * i) for i in range(N_DATES)]
    doy = np.array([d.timetuple().tm_yday for d in dates], np.float64)
    splits = ("train", "train", "train", "val", "test")  # per group of GROUP points: 60/20/20
    rows: list[list[object]] = []
    for i in range(N_POINTS):
        label = CLASSES[i % len(CLASSES)]
        group = i // GROUP  # GROUP consecutive points: one of each class
        peak, height, width = PHENOLOGY[label]
        peak += rng.normal(0, 8)
        ndvi = 0.15 + height * np.exp(-(((doy - peak) / width) ** 2)) + rng.normal(0, 0.02, N_DATES)
        ndvi = np.clip(ndvi, 0.02, 0.95)
        nir = rng.uniform(0.25, 0.35) * np.ones(N_DATES)
        red = nir * (1 - ndvi) / (1 + ndvi)
        blue = 0.8 * red
        cloudy = rng.random(N_DATES) < 0.08
        for t, date in enumerate(dates):
            bands = (
                [None] * 3 if cloudy[t] else [round(v * 10000) for v in (blue[t], red[t], nir[t])]
            )
            rows.append([f"p{i:04d}", date.isoformat(), *bands, label, f"g{group:03d}",
                         splits[group % len(splits)]])  # fmt: skip
    return rows


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def write_parquet(path: Path, rows: list[list[object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(zip(*rows, strict=True))
    arrays = {name: list(values) for name, values in zip(COLUMNS, columns, strict=True)}
    for band in ("B02", "B04", "B08"):
        arrays[band] = pa.array(arrays[band], pa.float64())
    arrays["date"] = pa.array([dt.date.fromisoformat(d) for d in arrays["date"]], pa.date32())
    pq.write_table(pa.table(arrays), path)
    return path


def shard_table(table: Path, out: Path, *overrides: str) -> Path:
    cfg = config_lib.load(
        TINY_SERIES,
        [f"data.root={table}", f"data.shard_dir={out}", "data.workers=1", *overrides],
    )
    assert shard.main(cfg) == 0
    return out


def env() -> dict[str, str]:
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )


def probe(run: Path, shards: Path, ckpt: Path, init: str, inputs: str) -> dict:
    out = run_module(
        "pimc_dist.finetune",
        "--config", PIXEL_CLS, f"ckpt={ckpt}", f"loader.shards={shards}",
        f"finetune.init={init}", f"finetune.inputs={inputs}", f"train.run_dir={run}",
        "finetune.probe_epochs=20", "finetune.probe_lrs=[0.01,0.1]", "tracking.wandb=false",
        env=env(), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((run / "result.json").read_text())


def scores(result: dict, split: str) -> dict:
    """The metrics of `split` in a result.json: "metrics" scores the test split."""
    return result["val_metrics" if split == "val" else "metrics"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_point_table_shards_pretrains_on_two_ranks_and_probes(tmp_path):
    rows = point_rows()
    csv_table = write_csv(tmp_path / "points.csv", rows)
    parquet_table = write_parquet(tmp_path / "points.parquet", rows)

    # Pretraining shards: the training split only (tiny_series.yaml has data.split=train).
    train = shard_table(csv_table, tmp_path / "shards" / "train")
    manifest = read_manifest(train)
    n_train = sum(1 for r in rows if r[-1] == "train") // N_DATES
    assert manifest.total_samples == n_train
    assert set(manifest.split_counts) == {"train"}, manifest.split_counts
    assert set(manifest.views) >= {"rp", "series"} and "rsi" not in manifest.views
    assert manifest.views["series"].shape == (3, 36)

    # Evaluation shards: every split, from the parquet copy of the same table.
    everything = shard_table(parquet_table, tmp_path / "shards" / "all", "data.split=null")
    whole = read_manifest(everything)
    assert whole.total_samples == N_POINTS
    assert {k: v for k, v in whole.split_counts.items() if v} == {
        "train": n_train, "val": N_POINTS // 5, "test": N_POINTS // 5,
    }  # fmt: skip
    assert list(whole.classes) == CLASSES

    # PIMC without crops on 2 local CPU ranks, a few steps.
    run = tmp_path / "runs" / "tiny_series"
    out = run_module(
        "pimc_dist.launch", "--cluster", "local", "--tasks-per-node", "2", "--wait",
        "--config", TINY_SERIES, f"data.root={csv_table}", f"loader.shards={train}",
        f"train.run_dir={run}", "train.total_samples=256", "train.batch_size=16",
        "train.log_every_steps=2", "train.ckpt_every_steps=100", "tracking.wandb=false",
        "tracking.log_images=0", "loader.shuffle_buffer=64",
        cwd=tmp_path, env=env(), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (run / "encoders.safetensors").is_file()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4, 6, 8]
    assert all(np.isfinite(m["loss"]) for m in logged)
    # The series tower from Python, normalised with the training shards' statistics.
    series = load_encoder(run, "series")
    assert (series.input.channels, series.input.size, series.input.series) == (3, 36, True)
    assert series.input.mean == pytest.approx(manifest.stats["series"].mean)
    stored = iter_shard_samples(manifest.shard_paths()[0], limit=5)
    raw = np.stack([decode_npy(sample["series.npy"]) for sample in stored])  # float16 (5, 3, 36)
    assert series(raw).shape == (5, 64)

    # pixel_cls probes on every split: the pretrained encoders and the same ones at random init.
    results: dict[str, dict] = {}
    for init in ("pretrained", "random"):
        for inputs in ("[rp]", "[rp,series]"):
            name = f"{init}_{inputs.strip('[]').replace(',', '_')}"
            result = probe(tmp_path / "probes" / name, everything, run, init, inputs)
            assert result["status"] == "ok" and result["init"] == init
            assert result["inputs"] == inputs.strip("[]").split(",")
            assert {k: result["samples"][k] for k in ("train", "val", "test")} == {
                "train": n_train,
                "val": N_POINTS // 5,
                "test": N_POINTS // 5,
            }
            assert result["pretrain_overlap"] == 0  # pretraining saw training points only
            for split in ("val", "test"):
                got = scores(result, split)
                assert got["n"] == N_POINTS // 5
                assert 0.0 <= got["oa"] <= 1.0 and 0.0 <= got["macro_f1"] <= 1.0, got
            results[name] = result
    # The planted phenology is learnable from the plots: well above chance (0.25).
    assert results["pretrained_rp"]["metrics"]["oa"] > 0.5, results["pretrained_rp"]["metrics"]


def test_ndvi_alone_gives_one_channel_plots_and_series_that_pretrain(tmp_path):
    """A table of NDVI values (no bands): one-channel plots and series, in_chans 1 towers."""
    rows = point_rows()[: 64 * N_DATES]
    ndvi = []
    for row in rows:
        blue, red, nir = row[2:5]
        value = None if red is None else round((nir - red) / (nir + red), 4)
        ndvi.append([row[0], row[1], value, *row[5:]])
    table = tmp_path / "ndvi.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "date", "NDVI", "label", "group", "split"])
        writer.writerows([["" if v is None else v for v in row] for row in ndvi])
    one = ["data.band_names=[NDVI]", "model.views.rp.in_chans=1", "model.views.series.in_chans=1"]
    shards = shard_table(table, tmp_path / "shards", *one)
    manifest = read_manifest(shards)
    assert manifest.views["rp"].shape == (1, 36, 36)
    assert manifest.views["series"].shape == (1, 36)

    run = tmp_path / "run"
    results = run_job(
        TINY_SERIES, run, 1,
        [f"data.root={table}", f"loader.shards={shards}", *one, "train.total_samples=32",
         "train.batch_size=16", "train.log_every_steps=1", "tracking.wandb=false",
         "tracking.log_images=2", "loader.shuffle_buffer=32"],
    )  # fmt: skip
    assert_ok(results)
    assert len(losses(run)) == 2 and all(np.isfinite(losses(run)))
    assert (run / "encoders.safetensors").is_file()
