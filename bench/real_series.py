"""Quality on real series: recurrence-plot encoders vs raw-series baselines, on real labelled pixels.

    python bench/real_series.py [--work /tmp/pimc_real_series] [--seeds 0 1 2] [--smoke]
                                [--options] [--datasets dl4sits ucr_crop] [--data DIR]

The data is read from `../shared/realdata` (beside the checkout; its README.md) and never
copied into the project; without it the bench stops with a message. Per dataset, the user's
path of docs/point_series.md:

1. The wide files become a long point table (one row per pixel and date, a synthesized
   regular date grid, a split column, the polygon as group): `points.csv`. dl4sits: train
   and test as given, validation = a seeded 20 % of each class's train polygons, and the
   test pixels of polygons that the train file also holds left out; UCR Crop: the given
   files, the test a seeded subset of 5,000 (UCR_TEST_SAMPLES).
2. `python -m pimc_dist.shard`'s library entry shards it twice: the training split only
   (pretraining) and every split (evaluation).
3. PIMC without crops (`configs/pretrain/tiny_series.yaml`: plot `rp` <-> raw `series`) on
   2 local CPU ranks (`python -m pimc_dist.launch --cluster local`), one run per seed.
4. `pixel_cls` (`configs/finetune/pixel_cls.yaml`): linear probes and full fine-tuning of
   the plot encoder, pretrained and at random init; the raw series as input (linear probe;
   the project's `cnn1d` protocol); plot + raw series. The bench adds a random forest on the
   raw series (scikit-learn, the `bench` extra) and a linear probe on both pretrained towers
   (plot embedding + series-encoder embedding), on the same samples and splits.
   `--options` adds what might close the gap (OPTIONS: plot + series fine-tuned, native-size
   plots), at extra cost.

Model selection (probe learning rate, fine-tuning epoch, forest settings) uses the
validation split only; OA and macro-F1 are on the test split, mean ± std over the seeds
(pretraining seed = evaluation seed). Prints a table and writes
bench/results/real_series.json (--smoke: <work>/smoke/real_series_smoke.json).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import machine_info  # noqa: E402

from pimc_dist import config as config_lib  # noqa: E402
from pimc_dist import shard  # noqa: E402
from pimc_dist.encoders import load_encoder  # noqa: E402
from pimc_dist.eval import finetune  # noqa: E402
from pimc_dist.eval import metrics as metrics_lib  # noqa: E402
from pimc_dist.eval.probe import load_split_features, train_linear_heads  # noqa: E402
from pimc_dist.eval.reading import read_splits  # noqa: E402
from pimc_dist.eval.tasks import SPLITS, get_task  # noqa: E402

REALDATA = REPO.parent / "shared" / "realdata"
RESULT = REPO / "bench" / "results" / "real_series.json"
TINY_SERIES = REPO / "configs" / "pretrain" / "tiny_series.yaml"
POINT_SERIES = REPO / "configs" / "data" / "point_series.yaml"
PIXEL_CLS = REPO / "configs" / "finetune" / "pixel_cls.yaml"
DL4SITS_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
DL4SITS_CLASSES = ["Bare Ground", "Canola", "Cereals", "Legumes", "Forest", "Grassland",
                   "Water", "Urban"]  # fmt: skip
GRID_START = dt.date(2017, 1, 1)  # the files hold no dates: a synthesized regular grid
# UCR Crop: the test split is a fixed seeded subset of the given 16,799 test series (the same
# for every method and seed): fine-tuning scores val and test after every epoch.
UCR_TEST_SAMPLES = 5000
VAL_POLYGON_FRACTION = 0.2  # dl4sits: share of each class's train polygons kept for validation
RF_SETTINGS = [{"max_features": "sqrt"}, {"max_features": 0.3}]  # picked on validation
# Rows of the table: (name, what it is); every one is scored on the same test samples.
METHODS = {
    "rp_linear_pretrained": "plot encoder, linear probe, pretrained",
    "rp_linear_random": "plot encoder, linear probe, random init",
    "rp_finetune_pretrained": "plot encoder, fine-tuned, pretrained",
    "rp_finetune_random": "plot encoder, fine-tuned, random init",
    "series_linear": "raw series, linear",
    "series_cnn1d": "raw series, 1D CNN (cnn1d protocol)",
    "series_rf": "raw series, random forest",
    "rp_series_linear_pretrained": "plot encoder (pretrained) + raw series, linear probe",
    "towers_linear_pretrained": "plot + series encoders (pretrained), linear probe",
}
# --options: what might close the gap, at extra cost (not in the main run's budget).
OPTIONS = {
    "rp_series_finetune_pretrained": "plot encoder (pretrained) + raw series, fine-tuned",
    "native_rp_linear_pretrained": "native-size plots, linear probe, pretrained (first seed)",
    "native_rp_linear_random": "native-size plots, linear probe, random init (first seed)",
}


@dataclass(frozen=True)
class Dataset:
    """One real dataset: its grid, its plot and encoder sizes, its training budgets."""

    name: str
    band_names: list[str]  # data.band_names (the indices' inputs, or [NDVI])
    class_names: list[str]
    step_days: int
    length: int  # grid steps (the files' dates)
    rp_size: int  # plot size (0: native length x length)
    pretrain_samples: int
    finetune_epochs: int  # fine-tuning the plot encoder (best epoch on validation)
    cnn1d_epochs: int  # the 1D CNN on the raw series (about 100x cheaper per epoch)

    @property
    def channels(self) -> int:
        return 1 if self.band_names == ["NDVI"] else 3

    @property
    def plot_size(self) -> int:
        return self.rp_size or self.length


DATASETS = {
    # 73 dates, a 5-day grid over one year; plots resized to 36 x 36 (the native 73 x 73
    # costs 4x the compute for each plot).
    "dl4sits": Dataset("dl4sits", ["B02", "B04", "B08"], DL4SITS_CLASSES, 5, 73, 36, 4096, 12, 12),
    # 46 dates, an 8-day grid over one year; NDVI only: one-channel plots, resized to 32 x 32
    # (3x faster than 46 x 46 on CPU). Fine-tuning: one epoch over the 4,607 training plots
    # (the budget); the 1D CNN gets 10.
    "ucr_crop": Dataset(
        "ucr_crop", ["NDVI"], [f"class_{i}" for i in range(1, 25)], 8, 46, 32, 8192, 1, 10
    ),
}


# ---------------------------------------------------------------------------
# 1. Long point tables
# ---------------------------------------------------------------------------


def grid_dates(ds: Dataset) -> list[str]:
    return [
        (GRID_START + dt.timedelta(days=ds.step_days * i)).isoformat() for i in range(ds.length)
    ]


def val_polygons(labels: np.ndarray, polygons: np.ndarray, seed: int = 0) -> set[int]:
    """A seeded share of each class's polygons (at least one where a class has 3 or more)."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label in np.unique(labels):
        polys = np.unique(polygons[labels == label])
        n = max(1, round(VAL_POLYGON_FRACTION * len(polys))) if len(polys) >= 3 else 0
        chosen.update(int(p) for p in rng.choice(polys, n, replace=False))
    return chosen


def dl4sits_table(data: Path, out: Path, limit: int | None = None) -> dict[str, Any]:
    """dl4sits -> long table; returns the split counts and the polygon bookkeeping.

    Train and test as given, with two corrections so that no polygon is split: validation is a
    seeded set of train polygons, and test pixels of polygons that also occur in the train file
    (the given split shares 38 polygon ids, all of the same class) are left out.
    """
    files = {s: data / "dl4sits" / f"{s}_dataset.csv" for s in ("train", "test")}
    raw = {s: np.loadtxt(f, delimiter=",", skiprows=1) for s, f in files.items()}
    train_polys = set(raw["train"][:, 1].astype(int))
    val_polys = val_polygons(raw["train"][:, 0].astype(int), raw["train"][:, 1].astype(int))
    ds = DATASETS["dl4sits"]
    dates = grid_dates(ds)
    counts = {"train": 0, "val": 0, "test": 0, "test_dropped_shared_polygon": 0}
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "date", *DL4SITS_BANDS, "label", "group", "split"])
        for given, rows in raw.items():
            rows = rows if limit is None else rows[:: max(1, len(rows) // limit)]
            for i, row in enumerate(rows):
                label, polygon = int(row[0]), int(row[1])
                if given == "test" and polygon in train_polys:
                    counts["test_dropped_shared_polygon"] += 1
                    continue
                split = "test" if given == "test" else "val" if polygon in val_polys else "train"
                counts[split] += 1
                values = row[2:].reshape(ds.length, len(DL4SITS_BANDS)).astype(int)
                for date, bands in zip(dates, values, strict=True):
                    writer.writerow([f"{given}_{i:04d}", date, *bands, label, f"poly_{polygon}",
                                     split])  # fmt: skip
    test_polys = set(raw["test"][:, 1].astype(int))
    return {
        "samples": counts,
        "polygons": {"train_file": len(train_polys), "val": len(val_polys),
                     "test_file": len(test_polys), "shared": len(train_polys & test_polys)},
    }  # fmt: skip


def ucr_table(data: Path, out: Path, limit: int | None = None) -> dict[str, Any]:
    """UCR Crop (NDVI) -> long table, splits as given (test: UCR_TEST_SAMPLES of it, seeded);
    label 1..24 -> value 0..23."""
    ds = DATASETS["ucr_crop"]
    dates = grid_dates(ds)
    counts = {}
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "date", "NDVI", "label", "split"])
        for split, name in (("train", "TRAIN"), ("val", "VALIDATION"), ("test", "TEST")):
            rows = np.load(data / "ucr_crop" / f"Crop_{name}.npy")
            counts[f"{split}_given"] = len(rows)
            if split == "test":
                keep = np.random.default_rng(0).choice(len(rows), UCR_TEST_SAMPLES, replace=False)
                rows = rows[np.sort(keep)]
            if limit is not None:
                rows = rows[:: max(1, len(rows) // limit)]
            counts[split] = len(rows)
            for i, row in enumerate(rows):
                label = int(row[0]) - 1
                for date, value in zip(dates, row[1:], strict=True):
                    writer.writerow([f"{split}_{i:05d}", date, f"{value:.4f}", label, split])
    return {"samples": counts}


# ---------------------------------------------------------------------------
# 2. Shards
# ---------------------------------------------------------------------------


def data_overrides(ds: Dataset, table: Path) -> list[str]:
    names = ",".join(f'"{c}"' for c in ds.class_names)
    return [
        f"data.root={table}", f"data.band_names=[{','.join(ds.band_names)}]",
        f"data.class_names=[{names}]", f"data.grid_step_days={ds.step_days}",
        f"data.grid_length={ds.length}", f"data.rp_size={ds.rp_size}", "data.workers=1",
    ]  # fmt: skip


def model_overrides(ds: Dataset) -> list[str]:
    c = ds.channels
    return [
        f"model.views.rp.in_chans={c}", f"model.views.rp.img_size={ds.plot_size}",
        f"model.views.series.in_chans={c}", f"model.views.series.seq_len={ds.length}",
    ]  # fmt: skip


def make_shards(ds: Dataset, table: Path, work: Path) -> dict[str, Path]:
    """Shards of the training split (pretraining) and of every split (evaluation)."""
    sets = {"train": work / "shards_train", "all": work / "shards_all"}
    for name, config, split in (("train", TINY_SERIES, "train"), ("all", POINT_SERIES, "null")):
        if (sets[name] / "manifest.json").is_file():
            continue
        overrides = [*data_overrides(ds, table), f"data.shard_dir={sets[name]}",
                     f"data.split={split}"]  # fmt: skip
        if config == TINY_SERIES:
            overrides += model_overrides(ds)
        assert shard.main(config_lib.load(config, overrides)) == 0
    return sets


# ---------------------------------------------------------------------------
# 3. Pretraining
# ---------------------------------------------------------------------------


def job_env() -> dict[str, str]:
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )


def pretrain(
    ds: Dataset, table: Path, shards: Path, run: Path, seed: int, samples: int, *extra: str
) -> float:
    """PIMC (rp <-> series) on the training split, 2 local CPU ranks; returns the wall time."""
    if (run / "encoders.safetensors").is_file():
        return json.loads((run / "bench_wall.json").read_text())["wall_s"]
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable, "-m", "pimc_dist.launch", "--cluster", "local",
            "--tasks-per-node", "2", "--wait", "--config", str(TINY_SERIES),
            *data_overrides(ds, table), *model_overrides(ds), f"loader.shards={shards}",
            f"train.run_dir={run}", f"train.seed={seed}", f"train.total_samples={samples}",
            "train.ckpt_every_steps=1000", "tracking.wandb=false", "tracking.log_images=0",
            *extra,
        ],
        cwd=run.parent, env=job_env(), capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0 or not (run / "encoders.safetensors").is_file():
        raise RuntimeError(f"pretraining {run} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    (run / "bench_wall.json").write_text(json.dumps({"wall_s": wall}))
    return wall


# ---------------------------------------------------------------------------
# 4. Evaluation
# ---------------------------------------------------------------------------


def eval_config(
    work: Path, shards: Path, ckpt: Path, name: str, inputs: str, init: str, protocol: str,
    seed: int, epochs: int,
) -> Any:  # fmt: skip
    return config_lib.load(
        PIXEL_CLS,
        [
            f"loader.shards={shards}", f"train.run_dir={work / 'eval' / name}",
            f"finetune.ckpt={ckpt}", f"finetune.inputs={inputs}", f"finetune.init={init}",
            f"finetune.protocol={protocol}", f"train.seed={seed}",
            f"finetune.feature_cache={work / 'features'}", f"finetune.epochs={epochs}",
            "tracking.wandb=false", "loader.workers=0",
        ],
    )  # fmt: skip


def run_eval(cfg: Any) -> dict[str, Any]:
    """One `pimc_dist.finetune` run (reused when its result.json exists)."""
    result = Path(cfg.train.run_dir) / "result.json"
    if not result.is_file():
        finetune.main(cfg)
    return json.loads(result.read_text())


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {"oa": float(metrics["oa"]), "macro_f1": float(metrics["macro_f1"])}


def raw_splits(cfg: Any) -> dict[str, Any]:
    """Every split's raw index series (as stored, float16 -> float32), samples sorted by key."""
    splits, _ = read_splits(cfg, get_task("pixel_cls"), ["series"])
    return splits


def random_forest(
    x: dict[str, np.ndarray], data: dict[str, Any], seed: int, classes: list[str]
) -> dict[str, Any]:
    """A random forest (300 trees) on the flattened raw series; settings picked on validation
    (mIoU, the task's primary metric)."""
    from sklearn.ensemble import RandomForestClassifier

    best = None
    for settings in RF_SETTINGS:
        forest = RandomForestClassifier(n_estimators=300, n_jobs=2, random_state=seed, **settings)
        forest.fit(x["train"], data["train"].target)
        val = metrics_lib.classification_metrics(
            data["val"].target, forest.predict(x["val"]), classes
        )
        if best is None or val["miou"] > best[0]["miou"]:
            best = (val, forest, settings)
    val, forest, settings = best
    test = metrics_lib.classification_metrics(
        data["test"].target, forest.predict(x["test"]), classes
    )
    return {**scores(test), "val": scores(val), "selected": settings}


def probe_on(
    parts: list[dict[str, np.ndarray]], data: dict[str, Any], cfg: Any, seed: int,
    classes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The project's linear probe (`train_linear_heads`: the lr grid of `finetune.probe_lrs`,
    picked on validation) on the concatenated feature blocks `parts` (split -> (N, D_i))."""
    feats = {s: np.concatenate([p[s] for p in parts], axis=1) for s in SPLITS}
    ft = cfg.finetune
    result = train_linear_heads(
        get_task("pixel_cls"), (feats["train"], data["train"]), (feats["val"], data["val"]),
        (feats["test"], data["test"]), classes, len(classes),
        lrs=[float(x) for x in ft.probe_lrs], epochs=int(ft.probe_epochs),
        batch_size=int(ft.probe_batch_size), weight_decay=float(ft.probe_weight_decay), seed=seed,
    )  # fmt: skip
    return {**scores(result.test_metrics), "val": scores(result.val_metrics),
            "selected": {"lr": result.best_lr}}  # fmt: skip


def series_embeddings(run: Path, raw: dict[str, Any]) -> dict[str, np.ndarray]:
    """The pretrained series tower's embeddings of every split (`load_encoder`: normalised as
    in pretraining)."""
    series = load_encoder(run, "series")
    out = {}
    for split in SPLITS:
        values = raw[split].inputs["series"]
        out[split] = np.concatenate(
            [series(values[i : i + 1024]) for i in range(0, len(values), 1024)]
        )
    return out


def evaluate_seed(
    ds: Dataset, work: Path, sets: dict[str, Path], run: Path, seed: int, epochs: int,
    cnn1d_epochs: int,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every method of METHODS for one seed (`epochs`: of fine-tuning; `cnn1d_epochs`: of the
    1D CNN)."""
    out: dict[str, dict[str, Any]] = {}

    def project(name: str, inputs: str, init: str, protocol: str) -> dict[str, Any]:
        n = cnn1d_epochs if protocol == "cnn1d" else epochs
        cfg = eval_config(work, sets["all"], run, f"{name}_s{seed}", inputs, init, protocol,
                          seed, n)  # fmt: skip
        result = run_eval(cfg)
        assert result["pretrain_overlap"] == 0, result["pretrain_overlap"]
        out[name] = {**scores(result["metrics"]), "val": scores(result["val_metrics"]),
                     "selected": result["selected"], "samples": result["samples"],
                     "seconds": result["timings"]["total_s"]}  # fmt: skip
        return result

    def bench(name: str, fn: Any, *args: Any) -> None:
        t = time.perf_counter()
        out[name] = fn(*args) | {"seconds": time.perf_counter() - t}

    t0 = time.perf_counter()
    rp_pre = project("rp_linear_pretrained", "[rp]", "pretrained", "linear")
    project("rp_linear_random", "[rp]", "random", "linear")
    project("series_linear", "[series]", "random", "linear")
    project("rp_finetune_pretrained", "[rp]", "pretrained", "finetune")
    project("rp_finetune_random", "[rp]", "random", "finetune")
    project("series_cnn1d", "[series]", "random", "cnn1d")
    # The same samples, read once more as raw series for the bench's own rows.
    cfg = eval_config(work, sets["all"], run, "raw", "[series]", "random", "linear", seed, 1)
    raw = raw_splits(cfg)
    cached = {s: load_split_features(Path(rp_pre["report"]["feature_cache"]), s) for s in SPLITS}
    for split in SPLITS:
        assert list(cached[split][1].keys) == list(raw[split].keys), f"{split}: samples differ"
    data = {s: raw[s] for s in SPLITS}
    rp = {s: cached[s][0] for s in SPLITS}
    flat = {s: raw[s].inputs["series"].astype(np.float32).reshape(len(raw[s]), -1) for s in SPLITS}
    classes = list(ds.class_names)
    bench("series_rf", random_forest, flat, data, seed, classes)
    # = finetune.inputs=[rp,series] (its raw branch flattens the series; the probe
    # standardises every feature), without encoding the plots again.
    bench("rp_series_linear_pretrained", probe_on, [rp, flat], data, cfg, seed, classes)
    emb = series_embeddings(run, raw)
    bench("towers_linear_pretrained", probe_on, [rp, emb], data, cfg, seed, classes)
    print(f"{ds.name} seed {seed}: evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------------
# Driver, table
# ---------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": a.tolist()}  # fmt: skip


def summarize_rows(
    per_seed: dict[int, dict[str, dict[str, Any]]], methods: list[str]
) -> dict[str, dict[str, Any]]:
    """Mean ± std over the seeds of each method's test OA and macro-F1."""
    rows = {}
    for method in methods:
        runs = [r[method] for r in per_seed.values() if method in r]
        rows[method] = {k: summarize([r[k] for r in runs]) for k in ("oa", "macro_f1")}
        rows[method]["val_macro_f1"] = summarize([r["val"]["macro_f1"] for r in runs])
        rows[method]["selected"] = [r.get("selected") for r in runs]
    return rows


def project_row(result: dict[str, Any]) -> dict[str, Any]:
    return {**scores(result["metrics"]), "val": scores(result["val_metrics"]),
            "selected": result["selected"], "seconds": result["timings"]["total_s"]}  # fmt: skip


def run_options(
    ds: Dataset, table: Path, work: Path, seeds: list[int], samples: int, epochs: int,
    *extra: str,
) -> dict[str, Any]:  # fmt: skip
    """What might close the gap: plot + raw series fine-tuned (every seed, on the main
    pretrainings), and native-size plots (the first seed: own shards, pretraining, probes)."""
    t0 = time.perf_counter()
    shards = work / "shards_all"
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        name = f"rp_series_finetune_pretrained_s{seed}"
        cfg = eval_config(work, shards, work / f"pretrain_s{seed}", name, "[rp,series]",
                          "pretrained", "finetune", seed, epochs)  # fmt: skip
        per_seed[seed] = {"rp_series_finetune_pretrained": project_row(run_eval(cfg))}
    native = dataclasses.replace(ds, rp_size=0)
    nwork = work / "native_plots"
    sets = make_shards(native, table, nwork)
    seed = seeds[0]
    run = nwork / f"pretrain_s{seed}"
    wall = pretrain(native, table, sets["train"], run, seed, samples, *extra)
    for init in ("pretrained", "random"):
        cfg = eval_config(nwork, sets["all"], run, f"rp_linear_{init}_s{seed}", "[rp]", init,
                          "linear", seed, epochs)  # fmt: skip
        per_seed[seed][f"native_rp_linear_{init}"] = project_row(run_eval(cfg))
    return {
        "rows": summarize_rows(per_seed, list(OPTIONS)),
        "native_plot_size": native.plot_size,
        "native_pretrain_wall_s": wall,
        "total_s": time.perf_counter() - t0,
    }


def run_dataset(
    ds: Dataset, data: Path, work: Path, seeds: list[int], smoke: bool, options: bool = False
) -> dict[str, Any]:
    """Table, shards, one pretraining and one evaluation per seed; the dataset's summary."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = work / "points.csv"
    limit = 100 if smoke else None
    make_table = dl4sits_table if ds.name == "dl4sits" else ucr_table
    info = json.loads((work / "table.json").read_text()) if table.is_file() else None
    if info is None:
        info = make_table(data, table, limit)
        (work / "table.json").write_text(json.dumps(info))
    sets = make_shards(ds, table, work)
    prep_s = time.perf_counter() - t0
    samples = 256 if smoke else ds.pretrain_samples
    epochs, cnn1d_epochs = (2, 2) if smoke else (ds.finetune_epochs, ds.cnn1d_epochs)
    small = ["train.batch_size=16", "loader.shuffle_buffer=64"] if smoke else []
    per_seed, pretrain_s = {}, []
    for seed in seeds:
        run = work / f"pretrain_s{seed}"
        pretrain_s.append(pretrain(ds, table, sets["train"], run, seed, samples, *small))
        per_seed[seed] = evaluate_seed(ds, work, sets, run, seed, epochs, cnn1d_epochs)
    rows = summarize_rows(per_seed, list(METHODS))
    main_s = time.perf_counter() - t0
    extra = run_options(ds, table, work, seeds, samples, epochs, *small) if options else None
    return {
        "dataset": ds.name,
        "grid": {"step_days": ds.step_days, "length": ds.length, "start": GRID_START.isoformat()},
        "plots": {"channels": ds.channels, "size": ds.plot_size},
        "table": info,
        "pretrain": {
            "samples": samples,
            "ranks": 2,
            "config": "configs/pretrain/tiny_series.yaml",
            "wall_s": pretrain_s,
        },  # fmt: skip
        "epochs": {"finetune": epochs, "cnn1d": cnn1d_epochs, "linear_probe": 60},
        "rows": rows,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "options": extra,
        "prep_s": prep_s,
        "total_s": main_s,
    }


def print_table(result: dict[str, Any]) -> None:
    for ds in result["datasets"]:
        print(f"\n{ds['dataset']}: test samples {ds['table']['samples']['test']}, "
              f"seeds {result['seeds']}, {ds['total_s']:.0f} s")  # fmt: skip
        print(f"  {'method':30s} {'OA':>15s} {'macro-F1':>15s}")
        rows = {**ds["rows"], **((ds.get("options") or {}).get("rows") or {})}
        for method, row in rows.items():
            oa, f1 = row["oa"], row["macro_f1"]
            print(f"  {method:30s} {oa['mean']:.3f} ± {oa['std']:.3f}  "
                  f"{f1['mean']:.3f} ± {f1['std']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REALDATA, help="the realdata folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pimc_real_series"),
                        help="working folder (reused: delete it to start over)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny subset, seed 0, short training (a minute or two)")  # fmt: skip
    parser.add_argument("--options", action="store_true",
                        help="also what might close the gap (OPTIONS; about 15 more minutes)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="the result JSON")
    args = parser.parse_args(argv)
    if not (args.data / "README.md").is_file():
        print(f"no real data at {args.data} (the realdata folder beside the checkout, "
              "../shared/realdata, is absent): nothing to measure", file=sys.stderr)  # fmt: skip
        return 2
    seeds = [args.seeds[0]] if args.smoke else args.seeds
    work = args.work / ("smoke" if args.smoke else "full")
    t0 = time.perf_counter()
    result = {
        "smoke": args.smoke,
        "seeds": seeds,
        "methods": METHODS | (OPTIONS if args.options else {}),
        "datasets": [
            run_dataset(DATASETS[d], args.data, work / d, seeds, args.smoke, args.options)
            for d in args.datasets
        ],  # fmt: skip
    }
    result["total_s"] = time.perf_counter() - t0
    result["machine"] = machine_info()
    print_table(result)
    default = work / "real_series_smoke.json" if args.smoke else RESULT
    path = args.out or default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
