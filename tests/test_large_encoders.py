"""What large encoders need, checked on the CPU: activation checkpointing, torch.compile,
fused AdamW on CUDA, ZeRO-3 with a ViT tower, and resuming onto more ranks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from launch_helpers import VIT_TOWERS, resumed_at
from safetensors.torch import load_file
from test_engine import make_engine, process_group, tiny_cfg  # noqa: F401 (fixture)
from test_pretrain import (  # noqa: F401 (fixture)
    TINY,
    assert_ok,
    latest_state,
    logged_steps,
    losses,
    run_ranks,
    shards,
)

from pimc_dist import config as config_lib
from pimc_dist import engine, planning, pretrain


def load_tiny(*overrides: str):
    return config_lib.load(TINY, ["deepspeed.bf16=false", *overrides])


def step_results(cfg, state: dict, batch: dict) -> tuple[float, dict, dict, int]:
    """(loss, gradients, buffers after the step, peak bytes of forward + backward)."""
    model = pretrain.build_model(cfg).train()
    model.load_state_dict(state)
    loss_fn = pretrain.build_loss(cfg)
    out = {}

    def step() -> None:
        torch.manual_seed(1)  # same stochastic draws (checkpoint replays the RNG state)
        loss, _ = pretrain.compute_loss(model, loss_fn, batch, cfg.method)
        loss.backward()
        out["loss"] = loss.item()

    peak = planning.peak_memory_bytes(step)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out["loss"], grads, buffers, peak


def checkpointing_peaks(*towers: str, batch_size: int = 16) -> tuple[int, int]:
    """Train one step of tiny.yaml with `towers` overrides with and without
    model.grad_checkpointing from the same weights; asserts the same loss, gradients and
    BatchNorm statistics, and returns the two peak memories (plain, checkpointed)."""
    plain_cfg = load_tiny(*towers)
    ckpt_cfg = load_tiny(*towers, "model.grad_checkpointing=true")
    torch.manual_seed(0)
    state = pretrain.build_model(plain_cfg).state_dict()
    batch = planning.random_batch(plain_cfg, batch_size)
    loss0, grads0, buffers0, peak0 = step_results(plain_cfg, state, batch)
    loss1, grads1, buffers1, peak1 = step_results(ckpt_cfg, state, batch)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    # BatchNorm statistics are updated once per step, not again by the recomputation.
    for name in buffers0:
        torch.testing.assert_close(buffers1[name], buffers0[name], rtol=0, atol=0, msg=name)
    return peak0, peak1


@pytest.mark.parametrize("towers", [[], VIT_TOWERS], ids=["resnet", "vit"])
def test_activation_checkpointing_keeps_loss_and_gradients_and_lowers_peak_memory(towers):
    peak0, peak1 = checkpointing_peaks(*towers)
    assert peak1 < 0.8 * peak0, (peak1 / 2**20, peak0 / 2**20)


def _compile_unavailable(exc: Exception) -> str | None:
    text = f"{type(exc).__name__}: {exc}"
    for hint in ("Cxx", "CppCompile", "compiler", "gcc", "g++", "clang", "Python.h"):
        if hint in text:
            return f"the CPU compiler toolchain torch.compile needs is missing: {text[:200]}"
    return None


@pytest.mark.slow
def test_compiled_towers_train_to_the_same_loss():
    eager_cfg = load_tiny()
    compiled_cfg = load_tiny("train.compile=true")
    torch.manual_seed(0)
    eager = pretrain.build_model(eager_cfg).train()
    compiled = pretrain.build_model(compiled_cfg).train()
    # Compiled in place: the same parameter names, so checkpoints and exports do not change.
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    loss_fn = pretrain.build_loss(eager_cfg)
    batch = planning.random_batch(eager_cfg, 16)
    results = []
    for model in (eager, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        values = []
        try:
            for _ in range(2):
                opt.zero_grad()
                loss, _ = pretrain.compute_loss(model, loss_fn, batch, "pimc")
                loss.backward()
                opt.step()
                values.append(loss.item())
        except Exception as exc:  # torch._dynamo wraps the compiler's error in its own types
            reason = _compile_unavailable(exc)
            if reason and model is compiled:
                pytest.skip(reason)
            raise
        results.append(values)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4)


def test_fused_adamw_is_chosen_on_cuda_only():
    assert engine.use_fused_adamw("cuda") is True
    assert engine.use_fused_adamw("cpu") is False


def test_the_engine_on_cpu_keeps_torch_default_adamw(tmp_path, process_group):  # noqa: F811
    eng = make_engine(tiny_cfg(tmp_path, "deepspeed.zero_stage=0"))
    optimizer = getattr(eng.optimizer, "optimizer", eng.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert not optimizer.defaults["fused"]


@pytest.mark.slow
def test_zero3_with_a_vit_tower_saves_and_resumes_exactly(tmp_path, shards):  # noqa: F811
    common = [
        *VIT_TOWERS,
        "deepspeed.zero_stage=3",
        "train.total_samples=256",  # 4 steps of 2 ranks x 32
        "train.ckpt_every_steps=2",
        "train.log_every_steps=1",
        "train.deterministic=true",
        "train.export_on_end=false",
    ]
    full = tmp_path / "full"
    assert_ok(run_ranks(full, shards, 2, common))
    split = tmp_path / "split"
    assert_ok(run_ranks(split, shards, 2, [*common, "train.stop_after_steps=2"]))
    assert logged_steps(split) == [1, 2]
    assert list((split / "checkpoints/step00000002").glob("zero_pp_rank_1_*"))  # ZeRO-3 shards
    results = run_ranks(split, shards, 2, common)
    assert_ok(results)
    assert resumed_at(results[0][1]) == [2]
    a, b = losses(full), losses(split)
    assert sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[3], b[4]], [a[3], a[4]], rtol=1e-5)


@pytest.mark.slow
def test_resume_onto_more_ranks_converts_to_universal(tmp_path, shards):  # noqa: F811
    common = ["deepspeed.zero_stage=2", "train.ckpt_every_steps=4", "train.log_every_steps=1"]
    run = tmp_path / "run"
    assert_ok(run_ranks(run, shards, 1, [*common, "train.total_samples=128"]))  # 4 steps of 32
    trained = load_file(run / "encoders.safetensors")
    # At the same total there is nothing left to train: two ranks load the universal
    # conversion of the one-rank checkpoint and export exactly what they loaded.
    results = run_ranks(run, shards, 2, [*common, "train.total_samples=128"])
    assert_ok(results)
    assert "converting to universal" in results[0][1]
    assert resumed_at(results[0][1]) == [4]
    reloaded = load_file(run / "encoders.safetensors")
    for name, tensor in trained.items():
        assert torch.equal(tensor, reloaded[name]), name
    # Then the two ranks go on: 4 steps of 32 on 1 rank, 4 of 64 on 2 ranks.
    shutil.rmtree(run / "checkpoints" / "step00000004_universal", ignore_errors=True)
    assert_ok(run_ranks(run, shards, 2, [*common, "train.total_samples=384"]))
    assert sorted(losses(run)) == list(range(1, 9))
    state = latest_state(run)
    assert state["samples_seen"] == 384 and state["world_size"] == 2
