"""bench/train_step.py: the DeepSpeed-defaults path, the GPU-mode guard, and one tiny CPU run."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pimc_dist import engine
from pimc_dist.config import merge_nested

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    # Importable by name: the ranks it spawns unpickle its functions from the module.
    sys.path.insert(0, str(BENCH.parent))
    try:
        yield importlib.import_module("train_step")
    finally:
        sys.path.remove(str(BENCH.parent))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stock_path_puts_every_tuned_key_back_to_the_deepspeed_default(bench, tmp_path, stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = bench.job_config("mlp8m", stage, str(tmp_path), "cpu", None)
    ours = engine.deepspeed_config(cfg, 2)
    stock = bench.stock_overrides(ours, stage)
    assert not set(stock) & set(bench.JOB_KEYS)
    assert set(stock["zero_optimization"]) == set(ours["zero_optimization"]) - {"stage"}
    defaults = DeepSpeedZeroConfig(stage=stage)
    for key, value in stock["zero_optimization"].items():
        assert value == getattr(defaults, key), key
    # Merged the way Engine merges a config file, the stock config keeps the job's own keys.
    merged = json.loads(json.dumps(ours))
    merge_nested(merged, stock)
    assert merged["zero_optimization"]["stage"] == stage
    assert merged["train_batch_size"] == ours["train_batch_size"]


def test_stock_path_refuses_a_key_without_a_known_default(bench):
    with pytest.raises(KeyError, match="no_such_key"):
        bench.stock_overrides({"zero_optimization": {"stage": 1}, "no_such_key": 1}, 1)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_mode_without_a_gpu_fails_with_a_clear_message(bench, tmp_path, capsys):
    code = bench.main(["--device", "cuda", "--out", str(tmp_path / "out.json")])
    assert code == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_one_cpu_run_reports_ratios_and_identical_weights(bench, tmp_path):
    out = tmp_path / "train_step.json"
    argv = ["--models", "mlp8m", "--stages", "1", "--steps", "1", "--repeats", "2"]
    assert bench.main([*argv, "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"ddp", "ds stock", "ds ours"}
    for name in ("ds stock", "ds ours"):
        assert rows[name]["ratio_to_ddp"] > 0
        assert len(rows[name]["ratios"]) == 2
        # Same weights, batch, optimizer, schedule and clipping: the paths agree closely.
        assert rows[name]["max_weight_diff_to_ddp"] < 1e-4
    assert set(result["deepspeed_configs"]["mlp8m/zero1"]) == {"ds stock", "ds ours"}
    assert result["machine"]["cpu_count"] == os.cpu_count()


@pytest.mark.parametrize("smoke", [False, True], ids=["gpu", "smoke"])
def test_device_workloads_build_the_models_they_name(bench, tmp_path, smoke):
    from pimc_dist import pretrain
    from pimc_dist.models import VisionTransformer, count_flops

    for name in bench.WORKLOADS:
        cfg = bench.workload_config(name, 2, str(tmp_path), None, smoke=smoke)
        assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.bf16 is (not smoke)
        with torch.device("meta"):
            model = pretrain.build_model(cfg)
        assert count_flops(model) > 0
        rp, rsi = model.encoder("rp"), model.encoder("rsi")
        if name in ("pimc_rp", "pimc_rsi", "vit_l16_224"):
            assert rp is rsi  # one tower, two augmentations through it
        if smoke:
            continue
        if name == "pimc":  # configs/pretrain/pimc.yaml's towers at their real input sizes
            assert isinstance(rp, VisionTransformer) and (rp.img_size, rp.patch_size) == (48, 8)
            assert rp.embed_dim == 768 and rsi.img_size == 32 and rsi.in_chans == 10
        if name == "vit_l16_224":
            assert (rp.img_size, rp.patch_size, rp.embed_dim, rp.depth) == (224, 16, 1024, 24)
