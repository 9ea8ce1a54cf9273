"""bf16 training (the precision of the shipped pretraining configs) on 2 CPU ranks.

DeepSpeed's bf16 mode holds the parameters in bfloat16, keeps buffers (BatchNorm running
statistics) in float32 and the optimizer's master weights in float32. These tests train
PIMC and MoSAiC for a few steps in bf16 under ZeRO 1 and 2, compare the loss curve with a
float32 run of the same seeds and data, resume from a bf16 checkpoint, and fine-tune and
probe in bf16 from the encoders a bf16 run exported.

What a wrong cast looks like, and what catches it:
- a batch or a buffer in another dtype than the weights: the step crashes (every test);
- the loss computed on bfloat16 logits: logged losses sit on bfloat16's 8-bit grid
  (`significant_bits`: the sharp check; the first step's loss, before any update, also
  moves further from float32);
- an export of the rounded bfloat16 weights instead of the masters: the exported floats sit
  on the bfloat16 grid.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_helpers import build_tiny_shards, cpu_rank_env, resumed_at
from safetensors.torch import load_file
from torch import nn

from pimc_dist.distributed import free_port
from pimc_dist.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"
MOSAIC = REPO / "configs/pretrain/mosaic.yaml"
FT = REPO / "configs/finetune"

# Relative to the fp32 loss. Observed on 2 CPU ranks, 4 steps: PIMC (tiny.yaml, ZeRO 1 and
# 2) within 0.5 % per step and < 1e-4 at the first step (no update yet: forward precision
# only); MoSAiC (ZeRO 2) within 0.2 %, 0.13 % at the first step.
CURVE_RTOL = 0.015
FIRST_STEP_RTOL = 3e-3


# ---------------------------------------------------------------------------
# Running jobs
# ---------------------------------------------------------------------------


def run_job(
    config: Path,
    run_dir: Path,
    world: int,
    overrides: list[str],
    *,
    module: str = "pimc_dist.pretrain",
    limit_s: int = 400,
) -> list[tuple[int, str]]:
    """Run `python -m <module> --config <config> ...` on `world` CPU ranks (torchrun variables);
    [(exit code, output)] per rank. Output goes to log files beside the run folder."""
    port = free_port()
    attempt = len(list(run_dir.parent.glob(f"{run_dir.name}.*.rank0.log")))
    procs = []
    for rank in range(world):
        env = cpu_rank_env(rank, world, port)
        log = run_dir.parent / f"{run_dir.name}.{attempt}.rank{rank}.log"
        args = [f"train.run_dir={run_dir}", "train.collective_timeout_s=120", *overrides]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(config), *args],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log = log
        procs.append(proc)
    deadline = time.time() + limit_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        text = procs[0].log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"ranks still running after {limit_s}s:\n{text}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, p.log.read_text(errors="replace")) for p in procs]


def assert_ok(results: list[tuple[int, str]]) -> None:
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"


def losses(run_dir: Path) -> list[float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), rows
    return [r["loss"] for r in rows]


def significant_bits(value: float) -> int:
    """Bits of significand `value` needs (bfloat16 holds 8; a mean of two bfloat16 values 10
    at most; a float32 result almost always more than 12)."""
    mantissa, _ = math.frexp(abs(value))
    bits = 0
    while mantissa != int(mantissa) and bits < 64:
        mantissa *= 2
        bits += 1
    return bits


def assert_float32_values(values, what: str) -> None:
    """Not all of `values` fit bfloat16's (or a 2-rank mean of bfloat16's) precision."""
    values = [float(v) for v in values]
    assert max(significant_bits(v) for v in values) > 12, (
        f"every {what} fits 12 significant bits: computed in bfloat16? {values}"
    )


def assert_follows(curve: list[float], reference: list[float], what: str) -> None:
    curve, reference = np.asarray(curve), np.asarray(reference)
    assert curve.shape == reference.shape and np.isfinite(curve).all()
    gap = np.abs(curve - reference) / np.abs(reference)
    print(f"{what}: bf16 {np.round(curve, 4)}  fp32 {np.round(reference, 4)}  rel. diff {gap}")
    assert gap[0] < FIRST_STEP_RTOL, f"{what}: first step (forward only) off by {gap[0]:.2%}"
    assert gap.max() < CURVE_RTOL, f"{what}: curve off by up to {gap.max():.2%}"


# ---------------------------------------------------------------------------
# Data and shared runs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("bf16_data"))


def write_mosaic_shards(out: Path, n: int = 96, size: int = 16) -> Path:
    """A MoSAiC shard set in reBEN's format (19 classes, 12 S2 + 2 S1 bands), all training."""
    from pimc_dist import shardset
    from pimc_dist.samples import mosaic_sample
    from pimc_dist.sources.base import MultimodalPatch
    from pimc_dist.sources.reben import CLASSES, S1_BANDS, S2_BANDS

    rng = np.random.default_rng(5)
    with shardset.ShardSetWriter(
        out, classes=CLASSES, source="reben", kind="mosaic", max_samples=48
    ) as writer:
        for i in range(n):
            labels = (rng.random(len(CLASSES)) < 0.25).astype(np.uint8)
            s2 = rng.normal(1000, 100, (12, size, size)) + 400.0 * labels[:12, None, None]
            patch = MultimodalPatch(
                patch_id=f"S2A_T33_{i:03d}", s2=s2.astype(np.float32), s2_bands=list(S2_BANDS),
                s1=rng.normal(-12, 2, (2, size, size)).astype(np.float32), s1_bands=list(S1_BANDS),
                labels=labels, dataset="reben", split="train",
            )  # fmt: skip
            writer.write(mosaic_sample(patch, list(CLASSES)))
    return out


@pytest.fixture(scope="module")
def mosaic_shards(tmp_path_factory) -> Path:
    return write_mosaic_shards(tmp_path_factory.mktemp("bf16_mosaic") / "shards")


# 4 optimizer steps of 2 ranks x 32 samples, a checkpoint every 2.
PIMC = [
    "train.total_samples=256",
    "train.log_every_steps=1",
    "train.ckpt_every_steps=2",
    "loader.workers=1",
    "tracking.wandb=false",
]


def pimc_run(folder: Path, shards: Path, *overrides: str) -> Path:
    assert_ok(run_job(TINY, folder, 2, [f"loader.shards={shards}", *PIMC, *overrides]))
    return folder


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, shards) -> Path:
    run = tmp_path_factory.mktemp("fp32") / "run"
    return pimc_run(run, shards, "deepspeed.bf16=false", "deepspeed.zero_stage=1")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, shards) -> Path:
    run = tmp_path_factory.mktemp("bf16") / "run"
    return pimc_run(run, shards, "deepspeed.bf16=true", "deepspeed.zero_stage=1")


# ---------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------


def test_pimc_bf16_zero1_follows_the_fp32_loss_curve_and_exports_float32(fp32_run, bf16_run):
    bf16, fp32 = losses(bf16_run), losses(fp32_run)
    assert len(bf16) == 4
    assert_follows(bf16, fp32, "PIMC ZeRO-1")
    assert_float32_values(bf16, "logged loss")  # the loss ran in float32, not on bf16 logits
    rows = read_metrics(bf16_run / "metrics.jsonl")
    assert_float32_values([r["temperature"] for r in rows], "temperature")  # the fp32 master
    assert (bf16_run / "checkpoints" / "step00000004" / "client_state.json").is_file()
    # The export holds the float32 master weights, not the rounded bfloat16 copies.
    tensors = load_file(str(bf16_run / "encoders.safetensors"))
    floats = [t for t in tensors.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    conv = next(t for k, t in tensors.items() if k.endswith("conv1.weight"))
    assert not torch.equal(conv, conv.bfloat16().float()), "exported weights are bf16-rounded"
    # BatchNorm statistics stayed float32 in the checkpoint beside bfloat16 weights.
    (states,) = (bf16_run / "checkpoints" / "step00000004").glob("*mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module["encoders.rp.bn1.weight"].dtype == torch.bfloat16
    assert module["encoders.rp.bn1.running_var"].dtype == torch.float32


@pytest.mark.slow
def test_pimc_bf16_zero2_checkpoints_and_resumes_like_an_uninterrupted_run(
    tmp_path, shards, fp32_run, bf16_run
):
    """Stopped after 2 of 4 steps and resumed: the 4 logged losses are those of the
    uninterrupted bf16 run. That run is the ZeRO-1 one (one launch fewer): ZeRO 1 and 2 reduce
    the same bf16 gradients into the same float32 masters, bit for bit on CPU."""
    zero2 = ["deepspeed.bf16=true", "deepspeed.zero_stage=2"]
    split = pimc_run(tmp_path / "split", shards, *zero2, "train.stop_after_steps=2")
    assert len(losses(split)) == 2
    assert (split / "checkpoints" / "latest").read_text() == "step00000002"
    results = run_job(TINY, split, 2, [f"loader.shards={shards}", *PIMC, *zero2])
    assert_ok(results)
    assert resumed_at(results[0][1]) == [2]
    resumed, uninterrupted = losses(split), losses(bf16_run)
    assert len(resumed) == 4
    # bf16 weights, float32 masters, optimizer and schedule state all came back.
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-4)
    assert_follows(resumed, losses(fp32_run), "PIMC ZeRO-2, resumed")


@pytest.mark.slow
def test_mosaic_bf16_zero2_follows_the_fp32_loss_curve(tmp_path, mosaic_shards):
    small = [
        f"loader.shards={mosaic_shards}", "data.root=/nowhere", "loader.workers=1",
        "loader.shuffle_buffer=64", "tracking.wandb=false",
        "model.views.s2.encoder=resnet18", "model.views.s1.encoder=resnet18",
        "model.views.s2.width=8", "model.views.s1.width=8",
        "model.views.s2.img_size=16", "model.views.s1.img_size=16",
        "model.head.hidden_dim=32", "model.head.out_dim=16",
        "train.batch_size=12", "train.total_samples=96", "train.log_every_steps=1",
        "train.ckpt_every_steps=100", "train.seed=3", "deepspeed.zero_stage=2",
    ]  # fmt: skip
    curves = {}
    for bf16 in (True, False):
        run = tmp_path / f"mosaic_bf16_{bf16}"
        assert_ok(run_job(MOSAIC, run, 2, [*small, f"deepspeed.bf16={str(bf16).lower()}"]))
        curves[bf16] = losses(run)
        rows = read_metrics(run / "metrics.jsonl")
        assert {"loss/intra_s2", "loss/intra_s1", "loss/inter", "loss/sup"} <= set(rows[-1])
    assert len(curves[True]) == 4
    assert_follows(curves[True], curves[False], "MoSAiC ZeRO-2")
    assert_float32_values(curves[True], "logged MoSAiC loss")


# ---------------------------------------------------------------------------
# Fine-tuning and feature extraction from a bf16 pretraining
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pastis(tmp_path_factory) -> Path:
    """5 PASTIS-layout patches (one per fold) of 32 px, 32 pixels each: 96/32/32 samples."""
    from pimc_dist import config as config_lib
    from pimc_dist import shard
    from pimc_dist.sources.fixtures import write_pastis

    tmp = tmp_path_factory.mktemp("bf16_ft")
    write_pastis(tmp / "raw", n_patches=5, size=32, seed=3)
    cfg = config_lib.load(
        REPO / "configs/data/demo.yaml",
        [
            f"data.root={tmp / 'raw'}", f"data.shard_dir={tmp / 'shards'}", "data.workers=1",
            "data.source=pastis", "data.pixels_per_patch=32", "data.max_samples_per_shard=64",
        ],
    )  # fmt: skip
    assert shard.main(cfg) == 0
    return tmp / "shards"


def finetune_result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


@pytest.mark.slow
def test_finetune_in_bf16_follows_fp32_from_a_bf16_pretraining(tmp_path, bf16_run, pastis):
    common = [
        f"finetune.ckpt={bf16_run}", f"loader.shards={pastis}", "loader.workers=0",
        "tracking.wandb=false", "finetune.inputs=[rp,rsi]", "finetune.epochs=2",
        "train.batch_size=32",
    ]  # fmt: skip
    history = {}
    for bf16 in (True, False):
        run = tmp_path / f"ft_bf16_{bf16}"
        results = run_job(
            FT / "pastis_forecast.yaml", run, 1,
            [*common, "finetune.protocol=finetune", f"deepspeed.bf16={str(bf16).lower()}"],
            module="pimc_dist.finetune",
        )  # fmt: skip
        assert_ok(results)
        result = finetune_result(run)
        assert np.isfinite(result["metrics"]["rmse"])
        history[bf16] = [h["loss"] for h in result["history"]]
    print(f"fine-tuning loss per epoch: bf16 {history[True]}  fp32 {history[False]}")
    # Observed: within 5 % after one epoch, 8.4 % after two (MSE of a small forecast head).
    np.testing.assert_allclose(history[True], history[False], rtol=0.15)
    # Feature extraction for a linear probe from the same bf16-pretrained encoders.
    probe = tmp_path / "probe"
    results = run_job(
        FT / "pastis_forecast.yaml", probe, 1,
        [*common, "finetune.protocol=linear", "finetune.probe_epochs=5"],
        module="pimc_dist.finetune",
    )  # fmt: skip
    assert_ok(results)
    assert np.isfinite(finetune_result(probe)["metrics"]["rmse"])


# ---------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_runs_with_bf16_parameters_and_float32_statistics(training):
    """DeepSpeed bf16: weights bfloat16, running statistics float32 (torch's BatchNorm fails)."""
    from pimc_dist.models import BatchNorm2d

    torch.manual_seed(0)
    reference = nn.BatchNorm2d(4)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    mixed = BatchNorm2d(4)
    mixed.load_state_dict(reference.state_dict())
    assert (
        isinstance(mixed, nn.BatchNorm2d)
        and mixed.state_dict().keys() == reference.state_dict().keys()
    )
    for p in mixed.parameters():
        p.data = p.data.bfloat16()
    reference.train(training), mixed.train(training)
    x = torch.randn(8, 4, 5, 5)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        torch.nn.functional.batch_norm(
            x.bfloat16(), mixed.running_mean, mixed.running_var, mixed.weight, mixed.bias, training
        )
    out = mixed(x.bfloat16())
    assert out.dtype == torch.bfloat16 and mixed.running_var.dtype == torch.float32
    expected = reference(x.bfloat16().float())
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(mixed.running_mean, reference.running_mean, atol=1e-3, rtol=1e-3)
    out.float().sum().backward()
    assert (
        mixed.weight.grad.dtype == torch.bfloat16
        and torch.isfinite(mixed.weight.grad.float()).all()
    )
    # With matching dtypes it is torch's module exactly.
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    plain, torch_bn = BatchNorm2d(4), nn.BatchNorm2d(4)
    plain.load_state_dict(state), torch_bn.load_state_dict(state)
    plain.train(training), torch_bn.train(training)
    assert torch.equal(plain(x), torch_bn(x))
    assert torch.equal(plain.running_var, torch_bn.running_var)
