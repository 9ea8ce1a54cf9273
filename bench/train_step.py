"""Training-step throughput: our DeepSpeed path against a plain torch DDP loop, same model and data.

CPU mode (default): 2 gloo ranks (DS_ACCELERATOR=cpu, 1 intra-op thread per rank), fp32. For
each model and ZeRO stage, one 2-rank job holds, side by side on every rank:

  ddp       torch DistributedDataParallel (its defaults), torch AdamW with our parameter
            groups, the warmup + cosine LambdaLR, torch.nn.utils.clip_grad_norm_
  ds stock  pimc_dist.engine.Engine (deepspeed.initialize, the same AdamW and schedule) with
            every setting our engine.deepspeed_config adds put back to DeepSpeed's default
  ds ours   pimc_dist.engine.Engine exactly as pretrain builds it (engine.deepspeed_config)

all built from the same initial weights and fed the same batch (fixed per rank, so no data
loading is timed). After warm-up steps (not timed), each repetition times one block of
--steps steps of each path, in rotating order, between barriers; the ratio of a path to DDP
is taken within each repetition (so machine load that drifts over the run cancels out) and
the median over repetitions is reported, with the lowest and highest as the spread. Also
reported: the ratio of the best blocks, the process CPU time per step (all threads, mean of
the ranks; less sensitive to other jobs on a shared machine than wall time, but blind to the
overlap of communication with compute that DDP gains), and the largest weight difference to
DDP after the run (every path ran the same steps from the same weights, with the schedule
without warmup, so a difference above float rounding amplified by Adam means the paths do
not compute the same thing). First, the gloo collectives such a step uses are timed alone
at the MLP's size (all-reduce of the gradients, all-gather of the ZeRO-1/2 parameters, ...).

Models: "mlp8m", an 8.4M-parameter MLP (1024-2048-2048-1024, GELU) on MSE, the model of the
DESIGN.md note, batch 64 per rank; "tiny", the PIMC two-tower model of
configs/pretrain/tiny.yaml (ResNet-18 width 16 on 3x42x42 plots and 10x16x16 crops) with its
gathered CLIP loss, batch 32 per rank.

Device mode (--device cuda: one GPU, world size 1 with NCCL): for each workload, bf16, ZeRO 1
and 2, our Engine and a DDP loop under torch.autocast(bf16) with fp32 weights (the same AdamW,
groups, schedule and clipping; fused AdamW on CUDA for both, engine.use_fused_adamw) on the same
model and batch, one after the other (so peak memory is per path): samples/s, MFU (analytic
FLOPs of pimc_dist.models.count_flops, x3 for a training step, against the peak bf16 FLOP/s of
pimc_dist.pretrain.PEAK_BF16_FLOPS) and peak memory (torch.cuda.max_memory_allocated).
Workloads (WORKLOADS):

  pimc          configs/pretrain/pimc.yaml's model as it trains: ViT-B/8 plot tower on 3x48x48
                plots and ResNet-50 crop tower on 10x32x32 crops, heads, gathered CLIP loss
  pimc_rp       the plot tower alone (two augmentations through it: {rsi: {share: rp}})
  pimc_rsi      the crop tower alone, likewise
  vit_l16_224   a standard ViT-L/16 at 3x224x224 (a reference point against published MFUs)
  vit_base, vit_large   ViT-B/8 or ViT-L/8 plot tower with pimc.yaml's crop tower

`--smoke` runs the same code with tiny stand-ins of each workload (tiny.yaml-sized), and with
`--device cpu --smoke` on the CPU with gloo: how bench/gpu_check.py keeps this mode from rotting
on machines without a GPU. samples/s counts pairs: a tower-alone workload runs two images each.

    python bench/train_step.py                      # CPU: both models, ZeRO 0-3
    python bench/train_step.py --models mlp8m --stages 0 1 2 --repeats 9
    python bench/train_step.py --device cuda        # one GPU: every workload, ZeRO 1 and 2
    python bench/train_step.py --device cpu --smoke # the device mode, tiny, on the CPU

Prints a table and writes bench/results/train_step.json (train_step_cuda.json in device mode).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the rank runner the distributed tests use

TINY_CONFIG = ROOT / "configs" / "pretrain" / "tiny.yaml"
PIMC_CONFIG = ROOT / "configs" / "pretrain" / "pimc.yaml"
CPU_MODELS = ("mlp8m", "tiny")
TOTAL_STEPS = 10**6  # length of the LR schedule (the benchmark stays in its warmup)
# Device-mode workloads: name -> (model.views replacing pimc.yaml's, or None to keep them; batch).
PIMC_RSI = {"encoder": "resnet50", "in_chans": 10, "img_size": 32}
PIMC_RP = {"encoder": "vit_base_p8", "in_chans": 3, "img_size": 48}
WORKLOADS: dict[str, tuple[dict | None, int]] = {
    "pimc": (None, 512),
    "pimc_rp": ({"rp": PIMC_RP, "rsi": {"share": "rp"}}, 512),
    "pimc_rsi": ({"rp": PIMC_RSI, "rsi": {"share": "rp"}}, 512),
    "vit_l16_224": (
        {
            "rp": {"encoder": "vit_large_p16", "in_chans": 3, "img_size": 224},
            "rsi": {"share": "rp"},
        },
        64,
    ),
    "vit_base": ({"rp": PIMC_RP, "rsi": PIMC_RSI}, 256),
    "vit_large": ({"rp": {**PIMC_RP, "encoder": "vit_large_p8"}, "rsi": PIMC_RSI}, 256),
}
DEFAULT_WORKLOADS = ("pimc", "pimc_rp", "pimc_rsi", "vit_l16_224")
# --smoke: tiny stand-ins of the same shapes of model (tiny.yaml's towers), a few samples.
TINY_VIT = {"encoder": "vit_tiny_p8", "in_chans": 3, "img_size": 48}
TINY_RESNET = {"encoder": "resnet18", "in_chans": 10, "img_size": 16, "width": 16}
SMOKE_WORKLOADS: dict[str, tuple[dict | None, int]] = {
    "pimc": ({"rp": TINY_VIT, "rsi": TINY_RESNET}, 8),
    "pimc_rp": ({"rp": TINY_VIT, "rsi": {"share": "rp"}}, 8),
    "pimc_rsi": ({"rp": TINY_RESNET, "rsi": {"share": "rp"}}, 8),
    "vit_l16_224": (
        {"rp": {"encoder": "vit_tiny_p16", "in_chans": 3, "img_size": 64}, "rsi": {"share": "rp"}},
        4,
    ),
    "vit_base": ({"rp": TINY_VIT, "rsi": TINY_RESNET}, 8),
    "vit_large": ({"rp": TINY_VIT, "rsi": TINY_RESNET}, 8),
}
# Keys every job sets from its own config; any other key of engine.deepspeed_config is a
# tuning choice, put back to DeepSpeed's default for the "ds stock" path.
JOB_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16",
)


# ---------------------------------------------------------------------------
# Workloads: model, batch and loss, the same for every path


def job_config(model: str, stage: int, run_dir: str, device: str, batch: int | None) -> Any:
    """Our job config for a workload (tiny.yaml's training settings; pimc.yaml's on a device)."""
    from pimc_dist import config as config_lib

    overrides = [f"train.run_dir={run_dir}", f"deepspeed.zero_stage={stage}", "train.grad_clip=1.0"]
    # No warmup: full-size updates make the weight comparison between the paths meaningful.
    overrides += ["train.warmup_fraction=0.0"]
    if device == "cuda":
        return workload_config(model, stage, run_dir, batch, smoke=False)
    overrides += ["deepspeed.bf16=false"]
    if model == "mlp8m":
        overrides += [f"train.batch_size={batch or 64}"]
    elif batch:
        overrides += [f"train.batch_size={batch}"]
    return config_lib.load(TINY_CONFIG, overrides)


def workload_config(name: str, stage: int, run_dir: str, batch: int | None, smoke: bool) -> Any:
    """pimc.yaml (bf16, the given ZeRO stage) with the model of a device-mode workload."""
    from omegaconf import OmegaConf

    from pimc_dist import config as config_lib

    views, default_batch = (SMOKE_WORKLOADS if smoke else WORKLOADS)[name]
    overrides = [f"train.run_dir={run_dir}", f"deepspeed.zero_stage={stage}", "train.grad_clip=1.0"]
    # bf16 on GPUs; the CPU smoke run computes in fp32 (CPU bf16 convolutions crawl), same code.
    overrides += ["train.warmup_fraction=0.0", f"deepspeed.bf16={str(not smoke).lower()}"]
    overrides += [f"data.root={run_dir}"]  # required by pimc.yaml; no data is read
    overrides += [f"train.batch_size={batch or default_batch}"]
    if smoke:
        overrides += ["model.head.hidden_dim=64", "model.head.out_dim=32"]
    cfg = config_lib.load(PIMC_CONFIG, overrides)
    if views is not None:
        OmegaConf.set_readonly(cfg, False)
        # Replace the node: no key of pimc.yaml's views may stay ({share: rp} allows no other).
        cfg.model.views = {v: config_lib.ViewModelConfig(**spec) for v, spec in views.items()}
        OmegaConf.set_readonly(cfg, True)
    return cfg


def mlp8m() -> Any:
    """The 8.4M-parameter MLP of the DESIGN.md note."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 1024)
    )


def build_workload(model: str, cfg: Any, rank: int, device: Any) -> tuple[Any, dict, Any]:
    """(model on CPU, one fixed batch on `device`, loss function of (model, batch)).

    "mlp8m" is the MLP; any other name is the two-tower PIMC model of `cfg` with its loss.
    """
    import torch

    from pimc_dist import pretrain

    gen = torch.Generator().manual_seed(1000 + rank)
    n = int(cfg.train.batch_size)
    torch.manual_seed(0)  # identical initial weights on every rank and for every path
    if model == "mlp8m":
        net = mlp8m()
        batch = {"x": torch.randn(n, 1024, generator=gen), "y": torch.randn(n, 1024, generator=gen)}

        def loss_of(m: Any, b: dict) -> Any:
            return (m(b["x"]) - b["y"]).pow(2).mean()

    else:
        from pimc_dist.planning import random_batch

        net = pretrain.build_model(cfg)
        batch = random_batch(cfg, n, seed=1000 + rank)  # rp and rsi, shaped as the views
        loss_fn = pretrain.build_loss(cfg)

        def loss_of(m: Any, b: dict) -> Any:
            return pretrain.compute_loss(m, loss_fn, b, "pimc")[0]

    return net, {k: v.to(device) for k, v in batch.items()}, loss_of


# ---------------------------------------------------------------------------
# The paths


def stock_overrides(ours: dict[str, Any], stage: int) -> dict[str, Any]:
    """DeepSpeed's own defaults for every key of `ours` that is not a job setting."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero_defaults = DeepSpeedZeroConfig(stage=stage).model_dump(by_alias=True)
    out: dict[str, Any] = {}
    for key, value in ours.items():
        if key in JOB_KEYS:
            continue
        if key == "zero_optimization":
            out[key] = {k: zero_defaults[k] for k in value if k != "stage"}
            # overlap_comm's default depends on the stage; the validator resolves None.
            if "overlap_comm" in out[key]:
                out[key]["overlap_comm"] = stage == 3
            continue
        name = f"{key.upper()}_DEFAULT"
        if not hasattr(constants, name):
            raise KeyError(f"no DeepSpeed default known for config key {key!r}")
        out[key] = getattr(constants, name)  # may be None (steps_per_print: never print)
    return out


def make_ds(cfg: Any, net: Any, world: int, rank: int, extra: dict | None, tmp: Path) -> Any:
    """The Engine as pretrain builds it; `extra` keys (a JSON config file) win key by key."""
    from omegaconf import OmegaConf

    from pimc_dist.engine import Engine

    if extra:
        path = tmp / f"ds_extra_{rank}_{len(list(tmp.glob('ds_extra_*')))}.json"
        path.write_text(json.dumps(extra))
        cfg = copy.deepcopy(cfg)
        OmegaConf.set_readonly(cfg, False)
        cfg.deepspeed.config_file = str(path)
    return Engine(cfg, net, world_size=world, rank=rank, total_steps=TOTAL_STEPS)


def ds_step_fn(eng: Any, batch: dict, loss_of: Any) -> Any:
    """One pretrain-style step: engine forward + loss, engine.backward, engine.step."""
    batch = eng.model_batch(batch)  # inputs in the compute dtype, as pretrain feeds them
    eng.module.train()

    def step() -> None:
        loss = loss_of(eng.module, batch)
        eng.module.backward(loss)
        eng.module.step()

    return step


def make_ddp(cfg: Any, net: Any, device: Any) -> tuple[Any, Any]:
    """Plain DDP with the same optimizer, parameter groups, schedule and clipping as Engine."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pimc_dist.engine import param_groups, use_fused_adamw, warmup_cosine

    net = net.to(device)
    ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(
        param_groups(net, float(cfg.train.weight_decay)),
        lr=float(cfg.train.lr),
        betas=tuple(cfg.train.betas),
        fused=use_fused_adamw(device.type) or None,  # as Engine chooses it
    )
    lr, min_lr = float(cfg.train.lr), float(cfg.train.min_lr)
    warmup = int(round(TOTAL_STEPS * float(cfg.train.warmup_fraction)))  # as Engine computes it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(TOTAL_STEPS, warmup, lr, min_lr))
    return ddp, (opt, sched)


def ddp_step_fn(ddp: Any, opt_sched: tuple, batch: dict, loss_of: Any, cfg: Any, bf16: bool):
    import contextlib

    import torch

    opt, sched = opt_sched
    clip = float(cfg.train.grad_clip)
    params = [p for p in ddp.parameters() if p.requires_grad]
    device_type = next(ddp.parameters()).device.type
    autocast = (
        (lambda: torch.autocast(device_type, dtype=torch.bfloat16))
        if bf16
        else contextlib.nullcontext
    )
    ddp.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of(ddp, batch)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()

    return step


# ---------------------------------------------------------------------------
# CPU: interleaved blocks on 2 gloo ranks


def _timed_block(step: Any, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of `steps` steps."""
    import torch.distributed as dist

    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    cpu = time.process_time() - cpu_start
    dist.barrier()
    return time.perf_counter() - start, cpu


def cpu_rank(rank: int, world: int, options: dict) -> dict:
    """On one rank: build ddp / ds stock / ds ours for one (model, stage), time interleaved blocks."""
    import logging

    import torch

    from pimc_dist.engine import deepspeed_config

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model, stage = options["model"], options["stage"]
    device = torch.device("cpu")
    tmp = Path(options["tmp"])
    cfg = job_config(model, stage, str(tmp / "run"), "cpu", options["batch"])
    ours = deepspeed_config(cfg, world)
    variants = {"ds stock": stock_overrides(ours, stage), "ds ours": None}
    variants |= {name: extra for name, extra in options["variants"].items()}

    steps: dict[str, Any] = {}
    net, batch, loss_of = build_workload(model, cfg, rank, device)
    ddp, opt_sched = make_ddp(cfg, copy.deepcopy(net), device)
    steps["ddp"] = ddp_step_fn(ddp, opt_sched, batch, loss_of, cfg, bf16=False)
    engines = {}
    for name, extra in variants.items():
        engines[name] = make_ds(cfg, copy.deepcopy(net), world, rank, extra, tmp)
        steps[name] = ds_step_fn(engines[name], batch, loss_of)

    for _ in range(options["warmup"]):
        for step in steps.values():
            step()
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(options["repeats"]):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate who goes first
            wall, cpu = _timed_block(steps[name], options["steps"])
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)

    # Same computation? Every path ran the same number of steps from the same weights on the
    # same batch, so the weights must agree up to float rounding (reduction order differs).
    reference = {k: v.detach() for k, v in ddp.module.named_parameters()}
    scale = max(float(v.abs().max()) for v in reference.values())
    weight_diff = {}
    for name, eng in engines.items():
        state = eng.full_state_dict()
        diff = max(float((state[k] - v).abs().max()) for k, v in reference.items())
        weight_diff[name] = diff / scale

    profile = None
    if options["profile"]:
        profile = {name: _profile_steps(steps[name], 3) for name in names}
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "weight_diff_to_ddp": weight_diff,
        "ds_configs": {name: engines[name].ds_config for name in engines},
        "params": sum(p.numel() for p in net.parameters()),
        "profile": profile,
    }


def _profile_steps(step: Any, n: int) -> str:
    """torch.profiler table (CPU ops, by self time) of `n` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22)


def summarize_cpu(per_rank: list[dict], options: dict, global_batch: int) -> list[dict]:
    """One row per path: median samples/s and the per-repetition ratio to DDP.

    Wall time is rank 0's (the blocks end at a barrier); CPU time is the mean over ranks.
    """
    seconds = per_rank[0]["seconds"]
    cpu = {
        name: [statistics.mean(r["cpu_seconds"][name][i] for r in per_rank) for i in range(len(t))]
        for name, t in seconds.items()
    }
    steps = options["steps"]
    rows = []
    for name, times in seconds.items():
        rates = [steps * global_batch / t for t in times]
        ratios = [ddp_t / t for ddp_t, t in zip(seconds["ddp"], times, strict=True)]
        cpu_ratios = [d / c for d, c in zip(cpu["ddp"], cpu[name], strict=True)]
        rows.append(
            {
                "model": options["model"],
                "stage": options["stage"],
                "path": name,
                "samples_per_s": statistics.median(rates),
                "step_ms": 1e3 * statistics.median(times) / steps,
                "ratio_to_ddp": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": ratios,
                # Less sensitive to other processes on the machine than wall time: the work
                # a step costs, without waits (and without the overlap DDP gains from them).
                "cpu_ms_per_step": 1e3 * statistics.median(cpu[name]) / steps,
                "max_weight_diff_to_ddp": per_rank[0]["weight_diff_to_ddp"].get(name, 0.0),
                "cpu_ratio_to_ddp": statistics.median(cpu_ratios),
                "best_block_ratio_to_ddp": min(seconds["ddp"]) / min(times),
            }
        )
    return rows


def collectives_rank(rank: int, world: int, numel: int, repeats: int) -> dict[str, float]:
    """Median ms of the gloo collectives a data-parallel step uses, for `numel` fp32 gradients."""
    import torch
    import torch.distributed as dist

    grads, out = torch.randn(numel), torch.empty(numel)
    part = torch.randn(numel // world)
    ops = {
        "all_reduce (DDP, ZeRO-0/1/2 gradients)": lambda: dist.all_reduce(grads),
        "all_gather_into_tensor (ZeRO-1/2 params)": lambda: dist.all_gather_into_tensor(out, part),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(part, grads),
        "broadcast of one partition": lambda: dist.broadcast(part, 0),
        "copy_ of all gradients (memory)": lambda: out.copy_(grads),
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            dist.barrier()
            start = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------
# GPU: one rank, paths one after the other


def _peak_memory_gib(device: Any) -> float:
    """Peak memory since the last reset: allocated tensors on CUDA, the process' RSS on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_rank(rank: int, world: int, options: dict) -> list[dict]:
    """Device mode on one rank: per workload, DeepSpeed at each ZeRO stage and DDP once (its
    row has stage None), one after the other.

    A path that fails (out of memory, say) gives a row with its error; the others run. Each
    row is also appended to options["partial"] (JSON lines) as soon as it is measured.
    """
    import torch

    from pimc_dist.pretrain import peak_bf16_flops

    if options["device"] == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        name = torch.cuda.get_device_name(device)
    else:
        device, name = torch.device("cpu"), "cpu"
    peak = options["peak_flops"] or peak_bf16_flops(name)
    tmp = Path(options["tmp"])
    rows = []
    for model in options["models"]:
        # DDP does not depend on the ZeRO stage: timed once per model, after the first stage
        # (a time limit then still leaves one DeepSpeed-vs-DDP pair).
        stages = list(options["stages"])
        runs = [("ds", stages[0]), ("ddp", stages[0])] + [("ds", st) for st in stages[1:]]
        for path, stage in runs:
            cfg = workload_config(
                model, stage, str(tmp / "run"), options["batch"], options["smoke"]
            )
            global_batch = int(cfg.train.batch_size) * world
            row = {
                "model": model,
                "encoders": {v: dict(s) for v, s in cfg.model.views.items()},
                "stage": stage if path == "ds" else None,
                "path": _path_label(path, bool(cfg.deepspeed.bf16)),
                "batch_per_gpu": int(cfg.train.batch_size),
                "device_name": name,
            }
            try:
                row |= _time_path(path, cfg, rank, world, device, options, global_batch)
            except Exception as exc:  # one workload's failure must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{model} {row['path']} ZeRO-{stage}: {row['error']}", flush=True)
            else:
                flops = row.pop("flops_per_sample")
                row["train_flops_per_sample"] = flops
                row["mfu"] = row["samples_per_s"] * flops / (peak * world) if peak else None
            rows.append(row)
            if options.get("partial"):  # what a time limit would otherwise lose
                with open(options["partial"], "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return add_ratios_to_ddp(rows)


def add_ratios_to_ddp(rows: list[dict]) -> list[dict]:
    """Give each DeepSpeed row of the device mode its `ratio_to_ddp`: its samples/s over its
    model's DDP row (stage None), where both ran."""
    for row in rows:
        ddp = next((r for r in rows if r["model"] == row["model"] and r["stage"] is None), None)
        if row["stage"] is not None and ddp is not None and "error" not in row | ddp:
            row["ratio_to_ddp"] = row["samples_per_s"] / ddp["samples_per_s"]
    return rows


def _path_label(path: str, bf16: bool) -> str:
    if path == "ds":
        return "ds ours (bf16)" if bf16 else "ds ours (fp32)"
    return "ddp (autocast bf16)" if bf16 else "ddp (fp32)"


def _time_path(
    path: str, cfg: Any, rank: int, world: int, device: Any, options: dict, global_batch: int
) -> dict:
    """Build one path (our Engine or DDP), warm it up and time it: samples/s and peak memory."""
    import torch

    from pimc_dist.models import count_flops

    # Memory an earlier path left allocated (DeepSpeed keeps some references) is not this
    # path's: the peak below is counted above it.
    gc.collect()
    leftover = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    net, batch, loss_of = build_workload("two_tower", cfg, rank, device)
    flops_per_sample = 3.0 * count_flops(net)
    params = sum(p.numel() for p in net.parameters())
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    eng = ddp = None
    if path == "ds":
        eng = make_ds(cfg, net, world, rank, None, Path(options["tmp"]))
        step = ds_step_fn(eng, batch, loss_of)
    else:
        ddp, opt_sched = make_ddp(cfg, net, device)
        step = ddp_step_fn(ddp, opt_sched, batch, loss_of, cfg, bf16=bool(cfg.deepspeed.bf16))
    try:
        for _ in range(options["warmup"]):
            step()
        times = []
        for _ in range(options["repeats"]):
            _sync(device)
            start = time.perf_counter()
            for _ in range(options["steps"]):
                step()
            _sync(device)
            times.append(time.perf_counter() - start)
    finally:
        if eng is not None and hasattr(eng.module, "destroy"):
            eng.module.destroy()
    rate = options["steps"] * global_batch / statistics.median(times)
    return {
        "params": params,
        "samples_per_s": rate,
        "step_ms": 1e3 * statistics.median(times) / options["steps"],
        "spread_samples_per_s": [
            options["steps"] * global_batch / t for t in (max(times), min(times))
        ],
        "flops_per_sample": flops_per_sample,
        "peak_mem_gib": _peak_memory_gib(device) - leftover,
        "leftover_mem_gib": leftover,
    }


# ---------------------------------------------------------------------------
# Entry point


def machine_info(device: str) -> dict:
    import deepspeed
    import torch

    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "load_average_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _error_line(report: str) -> str:
    """The exception line of the first failing rank's traceback in a run_on_ranks report."""
    lines = [line for line in report.splitlines() if line and not line.startswith(" ")]
    errors = [line for line in lines if "Error" in line.split(":", 1)[0]]
    return (errors or lines or [report])[0][:300]


def print_cpu_table(rows: list[dict]) -> None:
    print(f"{'model':>6} {'ZeRO':>4} {'path':>9} {'samples/s':>10} {'ms/step':>8} "
          f"{'vs DDP (median)':>15} {'min..max':>12} {'best':>5} {'CPU ms':>7} {'CPU vs DDP':>10} "
          f"{'weights vs DDP':>14}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:>6} {r['stage']:>4}  failed: {r['error']}")
            continue
        ddp = r["path"] == "ddp"
        ratio = "" if ddp else f"{r['ratio_to_ddp']:.2f}"
        spread = "" if ddp else f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f}"
        best = "" if ddp else f"{r['best_block_ratio_to_ddp']:.2f}"
        cpu_ratio = "" if ddp else f"{r['cpu_ratio_to_ddp']:.2f}"
        print(
            f"{r['model']:>6} {r['stage']:>4} {r['path']:>9} {r['samples_per_s']:>10.0f} "
            f"{r['step_ms']:>8.1f} {ratio:>15} {spread:>12} {best:>5} "
            f"{r['cpu_ms_per_step']:>7.1f} {cpu_ratio:>10} "
            f"{'' if ddp else format(r['max_weight_diff_to_ddp'], '.1e'):>14}"
        )


def print_gpu_table(rows: list[dict]) -> None:
    print(
        f"{'workload':>12} {'ZeRO':>4} {'path':>20} {'samples/s':>10} {'MFU':>6} {'peak GiB':>8} "
        f"{'vs DDP':>6}"
    )
    for r in rows:
        stage = "-" if r["stage"] is None else r["stage"]  # DDP: one row for every stage
        if "error" in r:
            print(f"{r['model']:>12} {stage:>4} {r['path']:>20}  failed: {r['error'][:80]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = f"{r['ratio_to_ddp']:.2f}" if "ratio_to_ddp" in r else ""
        print(
            f"{r['model']:>12} {stage:>4} {r['path']:>20} {r['samples_per_s']:>10.0f} "
            f"{mfu:>6} {r['peak_mem_gib']:>8.2f} {ratio:>6}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--models",
        nargs="+",
        help=f"cpu: {' '.join(CPU_MODELS)}; cuda / --smoke: {' '.join(WORKLOADS)} "
        f"(default {' '.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the device mode with tiny stand-ins of the workloads (--device cpu: on the CPU)",
    )
    parser.add_argument(
        "--stages", type=int, nargs="+", help="ZeRO stages (cpu: 0 1 2 3; cuda: 1 2)"
    )
    parser.add_argument("--batch", type=int, help="per-rank batch (default: per model)")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per path first")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="cpu: an extra DeepSpeed path whose JSON keys override ours, e.g. "
        'overlap=\'{"zero_optimization": {"overlap_comm": true}}\'',
    )
    parser.add_argument(
        "--profile", action="store_true", help="cpu: torch.profiler tables of 3 steps"
    )
    parser.add_argument("--peak-tflops", type=float, help="cuda: peak bf16 TFLOP/s for MFU")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/train_step*.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "error: --device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
                f"here (torch {torch.__version__}); run the CPU mode or use a GPU node",
                file=sys.stderr,
            )
            return 2
        # DeepSpeed picks its accelerator at import; the test environment may have forced cpu.
        os.environ["DS_ACCELERATOR"] = "cuda"
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("WANDB_MODE", "disabled")
    from dist_utils import run_on_ranks

    variants = {}
    for spec in args.variant:
        name, sep, text = spec.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: expected NAME=JSON")
        variants[name] = json.loads(text)
    info = machine_info(args.device)
    device_mode = args.device == "cuda" or args.smoke
    out = args.out or RESULTS / ("train_step_cuda.json" if device_mode else "train_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.jsonl")
    partial.unlink(missing_ok=True)
    started = time.time()
    rows: list[dict] = []
    configs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="train_step-") as tmp:
        if args.device == "cuda" or args.smoke:
            options = {
                "device": args.device,
                "smoke": args.smoke,
                "models": args.models or list(DEFAULT_WORKLOADS),
                "stages": args.stages or [1, 2],
                "batch": args.batch,
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup": args.warmup if args.smoke else max(args.warmup, 5),
                "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else None,
                "tmp": tmp,
                "partial": str(partial),
            }
            unknown = set(options["models"]) - set(WORKLOADS)
            if unknown:
                raise SystemExit(
                    f"--models: unknown for the device mode: {sorted(unknown)} ({list(WORKLOADS)})"
                )
            backend = "nccl" if args.device == "cuda" else "gloo"
            rows = run_on_ranks(device_rank, 1, options, backend=backend, timeout_s=3600)[0]
            print_gpu_table(rows)
        else:
            models = args.models or list(CPU_MODELS)
            unknown = set(models) - set(CPU_MODELS)
            if unknown:
                raise SystemExit(
                    f"--models: unknown for cpu: {sorted(unknown)} ({list(CPU_MODELS)})"
                )
            world = 2
            numel = sum(p.numel() for p in mlp8m().parameters())
            collectives = run_on_ranks(collectives_rank, world, numel, 7, timeout_s=600)[0]
            print(f"gloo collectives, {world} ranks, {numel / 1e6:.1f}M fp32 values (median ms):")
            for name, ms in collectives.items():
                print(f"  {name:42s} {ms:7.1f}")
            info["collectives_ms_8m_fp32"] = collectives
            sys.stdout.flush()
            for model in models:
                for stage in args.stages if args.stages is not None else [0, 1, 2, 3]:
                    options = {
                        "model": model,
                        "stage": stage,
                        "batch": args.batch,
                        "steps": args.steps,
                        "repeats": args.repeats,
                        "warmup": args.warmup,
                        "variants": variants,
                        "profile": args.profile,
                        "tmp": tmp,
                    }
                    try:
                        per_rank = run_on_ranks(cpu_rank, world, options, timeout_s=1800)
                    except (RuntimeError, TimeoutError) as exc:
                        last = _error_line(str(exc))
                        rows.append({"model": model, "stage": stage, "error": last})
                        print(f"{model} ZeRO-{stage}: failed: {last}", flush=True)
                        continue
                    result = per_rank[0]
                    batch = args.batch or (64 if model == "mlp8m" else 32)
                    new = summarize_cpu(per_rank, options, batch * world)
                    for row in new:
                        row["params"] = result["params"]
                    rows += new
                    configs[f"{model}/zero{stage}"] = result["ds_configs"]
                    print_cpu_table(new)
                    if result["profile"]:
                        for name, table in result["profile"].items():
                            print(f"--- {model} ZeRO-{stage} {name}, rank 0, 3 steps\n{table}")
                    sys.stdout.flush()
    info["load_average_end"] = list(os.getloadavg())
    info["seconds"] = round(time.time() - started, 1)
    result = {
        "benchmark": "train_step",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "mode": "device" if device_mode else "cpu",
        "smoke": args.smoke,
        "world_size": 1 if device_mode else 2,
        "options": {k: getattr(args, k) for k in ("steps", "repeats", "warmup", "batch")},
        "argv": sys.argv[1:],
        "machine": info,
        "rows": rows,
        "deepspeed_configs": configs,
    }
    out.write_text(json.dumps(result, indent=2, default=str))
    partial.unlink(missing_ok=True)
    if not device_mode:
        print("\nfull table:")
        print_cpu_table(rows)
    print(f"load average {info['load_average_start']} -> {info['load_average_end']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
