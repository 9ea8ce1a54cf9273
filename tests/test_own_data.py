"""Own data end to end: a multi-date GeoTIFF stack with repeated dates, nodata and a class
raster whose 0 means "no label" goes shard -> pretrain -> `pixel_cls` probe (pretrained and
random init), with the commands of docs/datasets.md ("Your own data"), run in a user's
folder with a YAML of the user's that starts from configs/pretrain/tiny_geotiff.yaml.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO, run_module

from pimc_dist import config as config_lib
from pimc_dist import shardset
from pimc_dist.eval import reading, tasks
from pimc_dist.sources.base import hash_split

SIZE, PATCH = 48, 16  # 9 patches of 16 x 16 px
BANDS = ["B02", "B03", "B04", "B08"]
CLASSES = ["no label", "early crop", "late crop", "grassland"]  # value 0 = no label
# 13 acquisitions, two of them on one day (two granules): 12 distinct days.
DATES = [dt.date(2021, 3, 1) + dt.timedelta(days=20 * i) for i in range(12)]
DATES = DATES[:5] + [DATES[4]] + DATES[5:]
FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def write_stack(folder: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """stack.tif (date-major int16 DN, nodata 0) and classes.tif; returns the paths, the
    class raster and the per-pixel "has a valid observation" mask."""
    rng = np.random.default_rng(seed)
    # Parcels of 8 x 8 px, each a class; about a quarter unlabelled (0).
    cells = rng.choice(4, size=(SIZE // 8, SIZE // 8), p=[0.25, 0.25, 0.25, 0.25])
    labels = np.kron(cells, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    doy = np.array([d.timetuple().tm_yday for d in DATES], dtype=np.float64)
    peak = {0: 180.0, 1: 140.0, 2: 220.0, 3: 180.0}
    amp = {0: 0.3, 1: 0.6, 2: 0.6, 3: 0.15}
    n_dates = len(DATES)
    stack = np.zeros((n_dates, len(BANDS), SIZE, SIZE), dtype=np.int16)
    for value in range(4):
        where = labels == value
        ndvi = 0.2 + amp[value] * np.exp(-(((doy - peak[value]) / 40.0) ** 2))  # (T,)
        red = 0.08 - 0.05 * ndvi
        nir = red * (1 + ndvi) / (1 - ndvi)
        base = np.stack([0.05 + 0 * ndvi, 0.07 + 0 * ndvi, red, nir], axis=1)  # (T, 4)
        noise = rng.normal(0, 0.004, size=(n_dates, len(BANDS), int(where.sum())))
        stack[:, :, where] = np.clip((base[..., None] + noise) * 10000, 1, 10000).astype(np.int16)
    # Clouds / no data: all bands 0 on random pixel-dates, and a 3 x 3 block with none at all.
    cloud = rng.random((n_dates, SIZE, SIZE)) < 0.15
    stack[:, :, :, :] = np.where(cloud[:, None], 0, stack)
    stack[:, :, 20:23, 20:23] = 0
    valid_any = (stack != 0).any(axis=1).any(axis=0)
    path, lpath = folder / "stack.tif", folder / "classes.tif"
    tifffile.imwrite(
        path, stack.reshape(n_dates * len(BANDS), SIZE, SIZE), photometric="minisblack"
    )
    tifffile.imwrite(lpath, labels)
    return path, lpath, labels, valid_any


def user_yaml(folder: Path, stack: Path, classes: Path, seed: int) -> Path:
    """The user's own config: tiny_geotiff.yaml plus the stack's description."""
    path = folder / "my_stack.yaml"
    path.write_text(
        f"""base: {REPO / "configs/pretrain/tiny_geotiff.yaml"}
data:
  name: my_stack_train
  root: {stack}
  band_names: {json.dumps(BANDS)}
  dates: {json.dumps([d.isoformat() for d in DATES])}
  label_path: {classes}
  class_names: {json.dumps(CLASSES)}
  label_ignore: [0]
  hash_split: {json.dumps(FRACTIONS)}
  split_seed: {seed}
  patch_size: {PATCH}
  pixels_per_patch: 256
  workers: 1
model:
  views:
    rsi: {{in_chans: {len(BANDS)}}}
train:
  total_samples: 128
"""
    )
    return path


def patch_ids() -> list[str]:
    return [
        f"stack_r{r:05d}_c{c:05d}" for r in range(0, SIZE, PATCH) for c in range(0, SIZE, PATCH)
    ]


def pick_seed() -> int:
    """A split seed that puts at least two patches in every split."""
    for seed in range(100):
        splits = [hash_split(p, seed, FRACTIONS) for p in patch_ids()]
        if all(splits.count(s) >= 2 for s in FRACTIONS):
            return seed
    raise AssertionError("no seed splits 9 patches three ways")


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict:
    """The docs' commands in a user's folder: shard (train), pretrain, shard (all)."""
    work = tmp_path_factory.mktemp("own_data")
    stack, classes, labels, valid_any = write_stack(work)
    seed = pick_seed()
    config = user_yaml(work, stack, classes, seed)
    ok(run_module("pimc_dist.shard", "--config", config, cwd=work, env=ENV))
    ok(run_module("pimc_dist.pretrain", "--config", config, "train.run_dir=runs/my_stack",
                  cwd=work, env=ENV, timeout=600))  # fmt: skip
    ok(run_module("pimc_dist.shard", "--config", config, "data.split=null", "data.name=my_stack",
                  cwd=work, env=ENV))  # fmt: skip
    return dict(work=work, config=config, labels=labels, valid_any=valid_any, seed=seed)


def probe(own: dict, init: str) -> dict:
    work = own["work"]
    ok(run_module(
        "pimc_dist.finetune", "--config", REPO / "configs/finetune/pixel_cls.yaml",
        "loader.shards=shards/my_stack", "ckpt=runs/my_stack", f"finetune.init={init}",
        f"train.run_dir=runs/pixel_cls_{init}", "finetune.probe_epochs=10", "loader.workers=0",
        cwd=work, env=ENV, timeout=600,
    ))  # fmt: skip
    return json.loads((work / f"runs/pixel_cls_{init}/result.json").read_text())


def labelled_pixels(own: dict, split: str) -> int:
    """Pixels of `split`'s patches with a label other than 0 and a valid observation."""
    labels, valid = own["labels"], own["valid_any"]
    n = 0
    for pid in patch_ids():
        if hash_split(pid, own["seed"], FRACTIONS) != split:
            continue
        r, c = int(pid.split("_r")[1][:5]), int(pid.split("_c")[1][:5])
        window = (slice(r, r + PATCH), slice(c, c + PATCH))
        n += int(((labels[window] != 0) & valid[window]).sum())
    return n


def test_the_shard_sets_carry_the_class_list_and_the_training_split_only(own):
    work = own["work"]
    train = shardset.read_manifest(work / "shards/my_stack_train")
    full = shardset.read_manifest(work / "shards/my_stack")
    assert train.classes == full.classes == CLASSES
    assert full.config["label_ignore"] == [0] and full.config["hash_split"] == FRACTIONS
    assert set(train.split_counts) == {"train"}
    assert {k for k, v in full.split_counts.items() if v} == {"train", "val", "test"}
    assert train.total_samples == full.split_counts["train"] == labelled_pixels(own, "train")
    assert "rsi.npy" in full.members


def test_the_evaluations_training_split_is_exactly_the_pretraining_set(own):
    work = own["work"]

    def keys(shards: str, wanted: list[str]) -> dict[str, list[str]]:
        cfg = config_lib.load(
            REPO / "configs/finetune/pixel_cls.yaml",
            [f"loader.shards={work / shards}", "loader.workers=0", "tracking.wandb=false"],
        )
        splits, _ = reading.read_splits(cfg, tasks.get_task("pixel_cls"), ["series"], wanted)
        return {s: d.keys for s, d in splits.items()}

    full = keys("shards/my_stack", list(tasks.SPLITS))
    assert keys("shards/my_stack_train", ["train"])["train"] == full["train"]
    assert not set(full["train"]) & (set(full["val"]) | set(full["test"]))


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_pixel_cls_probe_scores_labelled_pixels_only(own, init):
    result = probe(own, init)
    assert result["task"] == "pixel_cls" and result["init"] == init
    assert result["weights"] if init == "pretrained" else not result["weights"]
    names = CLASSES[1:]  # "no label" (0, data.label_ignore) is no class
    metrics = result["metrics"]
    for key in ("oa", "macro_f1", "miou"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert list(metrics["per_class_f1"]) == names
    confusion = np.asarray(metrics["confusion_matrix"])
    assert confusion.shape == (3, 3)
    # Scored: the labelled pixels of the test patches, every one; none with label 0.
    assert confusion.sum() == metrics["n"] == result["samples"]["test"]
    assert result["samples"]["test"] == labelled_pixels(own, "test")
    assert result["samples"]["val"] == labelled_pixels(own, "val")
    assert result["samples"]["train"] == labelled_pixels(own, "train")
    assert (own["work"] / f"runs/pixel_cls_{init}/confusion_matrix.png").is_file()
