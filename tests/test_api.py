"""The public API from Python: the README's example runs as written, load_encoder's contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

import pimc_dist
from pimc_dist import config as config_lib
from pimc_dist.models import build_model, export_encoder_state, save_encoder_weights
from pimc_dist.recurrence import recurrence_plot_uint8
from pimc_dist.shardset import ShardSetWriter

RUN = Path("runs/quickstart/pretrain")  # where `bash dev.sh demo` leaves its pretraining


def readme_example() -> str:
    """The first ```python block of README.md."""
    match = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert match, "README.md has no ```python block"
    return match.group(1)


def make_run(root: Path, seed: int = 0) -> tuple[Path, object]:
    """A tiny pretraining run folder under `root` as pretraining leaves it: config.yaml and
    encoders.safetensors (a randomly initialised tiny model), plus its shard set's manifest."""
    cfg = config_lib.load(
        REPO / "configs/pretrain/tiny.yaml",
        [f"train.run_dir={RUN}", "data.shard_dir=shards/demo_train"],
    )
    rng = np.random.default_rng(seed)
    series = rng.uniform(-1, 1, size=(8, 3, 61)).astype(np.float32)
    plots = recurrence_plot_uint8(series, size=cfg.model.views.rp.img_size)
    with ShardSetWriter(root / cfg.loader.shards, source="demo") as writer:
        for i in range(8):
            crop = rng.integers(0, 3000, size=(10, 16, 16)).astype(np.int16)
            writer.write({"__key__": f"p{i:05d}", "rp.png": plots[i], "rsi.npy": crop, "json": {}})
    torch.manual_seed(seed)
    views = OmegaConf.to_container(cfg.model.views)
    views = {v: {k: x for k, x in s.items() if x is not None} for v, s in views.items()}
    model = build_model(views, OmegaConf.to_container(cfg.model.head))
    run_dir = root / RUN
    # As pretraining exports: from the full state dict, "encoders.<view>.<key>" keys.
    save_encoder_weights(export_encoder_state(model.state_dict()), run_dir / "encoders.safetensors")
    config_lib.save(cfg, run_dir / "config.yaml")
    return run_dir, model


def test_the_readme_python_example_runs_as_written(tmp_path):
    make_run(tmp_path)
    code = readme_example() + "\nprint('embedding', tuple(embedding.shape))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "embedding (1, " in done.stdout


def test_load_encoder_gives_the_pretrained_module_in_eval_mode_and_its_input(tmp_path, monkeypatch):
    run_dir, model = make_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    enc = pimc_dist.load_encoder(RUN, view="rp")
    assert not enc.module.training and enc.owner == "rp"
    assert (enc.input.channels, enc.input.size, enc.input.stored_as) == (3, 42, "uint8")
    assert len(enc.input.mean) == len(enc.input.std) == 3
    plots = np.random.default_rng(1).integers(0, 256, size=(4, 3, 42, 42), dtype=np.uint8)
    reference = model.encoder("rp").eval()
    with torch.no_grad():
        expected = reference(enc.input.normalize(plots))
    torch.testing.assert_close(enc(plots), expected)
    # The weights file alone works too (its folder's config.yaml defines the encoder).
    crop = pimc_dist.load_encoder(run_dir / "encoders.safetensors", view="rsi")
    assert (crop.input.channels, crop.input.size, crop.input.stored_as) == (10, 16, "int16")


def test_load_encoder_finds_the_shards_from_the_run_folder_or_an_explicit_path(
    tmp_path, monkeypatch
):
    run_dir, _ = make_run(tmp_path / "project")
    monkeypatch.chdir(tmp_path)  # not where the run was launched: shards/demo_train is not here
    assert pimc_dist.load_encoder(run_dir, "rp").input.mean is not None
    moved = tmp_path / "elsewhere"
    (tmp_path / "project/shards/demo_train").rename(moved)
    with pytest.raises(FileNotFoundError, match="pass shards="):
        pimc_dist.load_encoder(run_dir, "rp")
    assert pimc_dist.load_encoder(run_dir, "rp", shards=moved).input.std is not None


def test_load_encoder_names_what_is_wrong(tmp_path):
    run_dir, _ = make_run(tmp_path)
    with pytest.raises(pimc_dist.EncoderLoadError, match=r"no view 's2'.*\['rp', 'rsi'\]"):
        pimc_dist.load_encoder(run_dir, "s2", shards=tmp_path / "shards/demo_train")
    with pytest.raises(FileNotFoundError, match="holds no encoders.safetensors"):
        pimc_dist.load_encoder(tmp_path, "rp")
    (run_dir / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        pimc_dist.load_encoder(run_dir, "rp")


def test_import_pimc_dist_loads_neither_torch_nor_numba():
    code = "import sys, pimc_dist; pimc_dist.ndvi; print(sorted({'torch', 'numba'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
