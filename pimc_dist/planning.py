"""Cost model of a pretraining job: memory, FLOPs, communication and time per GPU.

What `python -m pimc_dist.plan` prints, as a library: `plan_job(cfg, gpus=1024, gpu="h100")`
returns a `Plan`. The model, per GPU, for a data-parallel DeepSpeed job of `N` ranks with
per-rank batch `b` (global batch `B = N b`):

- Model states, bytes per parameter (the ZeRO paper's accounting, DeepSpeed's layout):
  bf16: weights 2, gradients 2, fp32 master weights + Adam m and v 12; ZeRO-1 splits the 12
  over the ranks, ZeRO-2 also the gradients, ZeRO-3 everything. ZeRO-1/2 keep one more fp32
  gradient partition (4/N). fp32 (no bf16): weights 4, gradients 4, Adam 8.
- Activations: *measured*, not derived. `measure_activations` runs the job's model forward and
  backward with its loss on the CPU at two small batches, reads the peak of the allocator
  through torch.profiler (`peak_memory_bytes`) and fits bytes = fixed + per_sample * batch. The
  measurement is in fp32; under bf16 the stored activations are halved (an approximation:
  normalisation statistics stay fp32).
- Gathered loss: the all-gathered embeddings of every view (B x embed_dim fp32, and their
  gradient) and the logits each rank holds, b x B per matrix in fp32 in the local form; the
  number of b x B matrices alive at the peak (logits, log-softmax, gradient, per loss term) is
  measured once per loss on one CPU process (`measure_loss_matrices`).
- FLOPs per sample: `pimc_dist.pretrain.flops_per_sample`, the count pretrain reports its MFU
  with (3x the analytic forward of `pimc_dist.models.count_flops`).
- Step time: compute at the assumed MFU, plus the collectives of a step, not overlapped
  (an upper bound): the feature all-gather (and its backward), the gradient all-reduce
  (ZeRO-0/1/2; this project's engine all-reduces in place for ZeRO-1/2) or reduce-scatter plus
  parameter all-gathers (ZeRO-3), and the ZeRO-1/2 parameter all-gather after the step. Ring
  algorithms: an all-reduce moves 2 (N-1)/N of the buffer through each GPU, an all-gather or
  reduce-scatter (N-1)/N. Within one node the bandwidth is NVLink's; across nodes the
  per-GPU network bandwidth (`inter_node_gbps`, Gbit/s) bounds it.

It sits beside `pretrain` (it builds the job's model and loss with pretrain's own builders);
only runners import it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from pimc_dist import pretrain

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """What the cost model needs to know about one GPU model."""

    name: str
    memory_gib: float  # as nvidia-smi reports it, roughly
    peak_bf16_flops: float  # dense
    nvlink_gbytes_s: float  # per GPU, one direction
    inter_node_gbits_s: float  # network per GPU (typical cluster build-out)
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("A100-SXM4-80GB", 80.0, 312e12, 300.0, 200.0),
    "h100": GpuSpec("H100-SXM5-80GB", 80.0, 989e12, 450.0, 400.0),
    "h200": GpuSpec("H200-SXM-141GB", 141.0, 989e12, 450.0, 400.0),
}

# Memory the job cannot use for tensors: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers,
# allocator fragmentation. An assumption (typical of one H100 rank), stated in the output.
RUNTIME_RESERVE_GIB = 3.0
DEFAULT_MFU = 0.35
MEASURE_BATCHES = (2, 6)
LOSS_PROBE_BATCH = 256


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensor memory that `fn()` allocates above what was live before.

    Reads the allocation and free events of torch.profiler (profile_memory) in time order.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------
# Measurements on the CPU


def random_batch(cfg: Any, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random inputs with the shapes of the job's views (and labels for MoSAiC)."""
    gen = torch.Generator().manual_seed(seed)
    views = pretrain.pimc_views(cfg.model.views) if cfg.method == "pimc" else ("s2", "s1")
    out = {}
    for view in views:
        spec = cfg.model.views[view]
        owner = spec
        while owner.get("share") or owner.get("share_encoder"):
            owner = cfg.model.views[owner.share or owner.share_encoder]
        chans = int(spec.in_chans or owner.in_chans)
        if owner.get("seq_len"):  # a 1D series encoder: (C, T)
            out[view] = torch.randn(batch, chans, int(owner.seq_len), generator=gen)
            continue
        size = int(spec.img_size or owner.img_size)
        out[view] = torch.randn(batch, chans, size, size, generator=gen)
    if cfg.method == "mosaic":
        classes = len(cfg.data.get("classes") or []) or 19
        out["labels"] = (torch.rand(batch, classes, generator=gen) < 0.2).float()
    return out


def _train_step_fn(cfg: Any, model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    loss_fn = pretrain.build_loss(cfg)

    def step() -> None:
        loss, _ = pretrain.compute_loss(model, loss_fn, batch, cfg.method)
        loss.backward()

    return step


def measure_activations(cfg: Any, batches: tuple[int, int] = MEASURE_BATCHES) -> dict[str, float]:
    """Fit the fp32 activation memory of a training step: bytes = fixed + per_sample * batch.

    Gradients are allocated before the measured step (kept between steps, as the engine's
    buffers are), so the peak is activations and temporaries only.
    """
    torch.manual_seed(0)
    model = pretrain.build_model(cfg).train()
    peaks = []
    for b in batches:
        batch = random_batch(cfg, b)
        step = _train_step_fn(cfg, model, batch)
        step()  # allocates the gradients; lazy initialisations
        peaks.append(peak_memory_bytes(step))
    (b0, b1), (p0, p1) = batches, peaks
    per_sample = max(0.0, (p1 - p0) / (b1 - b0))
    return {
        "per_sample_bytes": per_sample,
        "fixed_bytes": max(0.0, p0 - per_sample * b0),
        "measured_at": list(batches),
        "peaks_bytes": peaks,
    }


def measure_loss_matrices(cfg: Any, batch: int = LOSS_PROBE_BATCH) -> float:
    """How many batch x batch fp32 matrices the loss holds at its peak (forward + backward).

    Measured on one process at `batch`: its peak divided by one logits matrix. In the local
    form on N ranks each of those matrices is b x N*b.
    """
    views = ["rp", "rsi"] if cfg.method == "pimc" else ["s2", "s1"]
    dim = int(cfg.model.head.out_dim)
    gen = torch.Generator().manual_seed(0)
    loss_fn = pretrain.build_loss(cfg)
    n = 2 * batch if cfg.method == "mosaic" else batch  # two augmentations per modality
    feats = {v: torch.randn(n, dim, generator=gen).requires_grad_() for v in views}
    scale = torch.tensor(2.659, requires_grad=True)

    def step() -> None:
        if cfg.method == "mosaic":
            s2_a, s2_b = feats["s2"].chunk(2)
            s1_a, s1_b = feats["s1"].chunk(2)
            labels = (torch.rand(batch, 19, generator=gen) < 0.2).float()
            loss, _ = loss_fn(s2_a, s2_b, s1_a, s1_b, labels, scale)
        elif cfg.loss.name == "siglip":
            loss = loss_fn(feats["rp"], feats["rsi"], scale, torch.tensor(-10.0))
        else:
            loss = loss_fn(feats["rp"], feats["rsi"], scale)
        loss.backward()

    step()
    return peak_memory_bytes(step) / (batch * batch * 4)


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Plan:
    """Per-GPU figures of one job on one GPU model (bytes, FLOPs, seconds)."""

    config_name: str
    gpu: str
    gpus: int
    nodes: int
    zero_stage: int
    bf16: bool
    batch_per_gpu: int
    global_batch: int
    params: int
    mfu: float
    inter_node_gbits_s: float
    memory: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by part
    memory_total: float = 0.0
    memory_usable: float = 0.0
    fits: bool = True
    max_batch_per_gpu: int = 0
    flops_per_sample: float = 0.0
    compute_s: float = 0.0
    comm_bytes: dict[str, float] = field(default_factory=dict)  # per GPU per step
    comm_s: dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0
    samples_per_s: float = 0.0
    samples_per_s_per_gpu: float = 0.0
    total_samples: int = 0
    steps: int = 0
    wall_hours: float = 0.0
    gpu_hours: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_state_bytes(params: int, stage: int, world: int, bf16: bool) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU at a ZeRO stage (see the docstring)."""
    n = max(1, world)
    if bf16:
        weights, grads, optim = 2.0, 2.0, 12.0
    else:
        weights, grads, optim = 4.0, 4.0, 8.0
    fp32_grad_partition = 4.0 / n if stage in (1, 2) and n > 1 else 0.0
    return {
        "weights": params * (weights / n if stage >= 3 else weights),
        "gradients": params * ((grads / n if stage >= 2 else grads) + fp32_grad_partition),
        "optimizer_states": params * (optim / n if stage >= 1 else optim),
    }


def _views_gathered(cfg: Any) -> int:
    # PIMC gathers two views; MoSAiC four (two augmentations of two modalities).
    return 2 if cfg.method == "pimc" else 4


def _ring_time(nbytes: float, world: int, factor: float, gpu: GpuSpec, inter: float) -> float:
    """Seconds of a ring collective moving `factor` * (N-1)/N * nbytes through each GPU."""
    if world <= 1:
        return 0.0
    gbytes_s = gpu.nvlink_gbytes_s if world <= gpu.gpus_per_node else inter / 8.0
    return factor * (world - 1) / world * nbytes / (gbytes_s * 1e9)


def plan_job(
    cfg: Any,
    *,
    gpus: int,
    gpu: str = "h100",
    mfu: float = DEFAULT_MFU,
    inter_node_gbits_s: float | None = None,
    batch_per_gpu: int | None = None,
    measured: dict[str, Any] | None = None,
    reserve_gib: float = RUNTIME_RESERVE_GIB,
) -> Plan:
    """The cost model of `cfg` on `gpus` GPUs of kind `gpu` (see the module docstring).

    `measured`: the result of `measure(cfg)`, to reuse between calls (it takes seconds).
    """
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    spec = GPUS[gpu]
    inter = float(spec.inter_node_gbits_s if inter_node_gbits_s is None else inter_node_gbits_s)
    b = int(cfg.train.batch_size if batch_per_gpu is None else batch_per_gpu)
    # Zero or negative inputs would divide by zero or print negative times and costs.
    if gpus < 1 or b < 1 or not 0.0 < mfu <= 1.0 or not inter > 0:
        raise ValueError(
            f"plan_job: need gpus >= 1, batch >= 1, 0 < mfu <= 1 and a bandwidth > 0; got "
            f"gpus={gpus}, batch={b}, mfu={mfu:g}, inter_node_gbits_s={inter:g}"
        )
    measured = measured if measured is not None else measure(cfg)
    stage, bf16 = int(cfg.deepspeed.zero_stage), bool(cfg.deepspeed.bf16)
    params = int(measured["params"])
    flops = float(pretrain.flops_per_sample(cfg))

    def memory(batch: int) -> dict[str, float]:
        parts = model_state_bytes(params, stage, gpus, bf16)
        act = measured["activations"]
        scale = 0.5 if bf16 else 1.0
        parts["activations"] = scale * (act["fixed_bytes"] + act["per_sample_bytes"] * batch)
        dim = int(cfg.model.head.out_dim)
        global_batch = batch * gpus
        # Gathered embeddings of every view and their gradients, fp32.
        parts["loss_features"] = 2 * _views_gathered(cfg) * global_batch * dim * 4.0
        parts["loss_logits"] = measured["loss_matrices"] * batch * global_batch * 4.0
        return parts

    usable = spec.memory_gib * GIB - reserve_gib * GIB
    parts = memory(b)
    total = sum(parts.values())
    max_b = 0
    lo, hi = 0, 1
    while sum(memory(hi).values()) <= usable and hi < 2**24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sum(memory(mid).values()) <= usable else (lo, mid)
    max_b = lo

    dtype_bytes = 2.0 if bf16 else 4.0
    global_batch = b * gpus
    feat = _views_gathered(cfg) * global_batch * int(cfg.model.head.out_dim) * 4.0
    comm_bytes = {"feature_all_gather": feat, "feature_grad_reduce_scatter": feat}
    comm_time = {
        "feature_all_gather": _ring_time(feat, gpus, 1.0, spec, inter),
        "feature_grad_reduce_scatter": _ring_time(feat, gpus, 1.0, spec, inter),
    }
    grad_bytes = params * dtype_bytes
    if stage <= 2:
        comm_bytes["gradient_all_reduce"] = grad_bytes
        comm_time["gradient_all_reduce"] = _ring_time(grad_bytes, gpus, 2.0, spec, inter)
        if stage >= 1:
            comm_bytes["param_all_gather_after_step"] = grad_bytes
            comm_time["param_all_gather_after_step"] = _ring_time(
                grad_bytes, gpus, 1.0, spec, inter
            )
    else:
        comm_bytes["gradient_reduce_scatter"] = grad_bytes
        comm_time["gradient_reduce_scatter"] = _ring_time(grad_bytes, gpus, 1.0, spec, inter)
        comm_bytes["param_all_gather_fwd_bwd"] = 2 * grad_bytes
        comm_time["param_all_gather_fwd_bwd"] = _ring_time(2 * grad_bytes, gpus, 1.0, spec, inter)
    # Bytes through each GPU's link: what the ring moves, not the buffer size.
    link_bytes = {
        k: v * (2.0 if "all_reduce" in k else 1.0) * (gpus - 1) / gpus
        for k, v in comm_bytes.items()
    }
    compute_s = flops * b / (spec.peak_bf16_flops * mfu)
    step_s = compute_s + sum(comm_time.values())
    rate = global_batch / step_s
    total_samples = int(cfg.train.total_samples)
    steps = math.ceil(total_samples / global_batch)
    wall_h = steps * step_s / 3600.0
    notes = [
        f"activations measured on CPU in fp32 at batches {measured['activations']['measured_at']}"
        + (", halved for bf16" if bf16 else ""),
        f"{reserve_gib:g} GiB per GPU held back for CUDA context, workspaces, NCCL, fragmentation",
        "communication is added to compute, not overlapped: an upper bound on the step time",
    ]
    if total > usable:
        notes.append(
            f"does NOT fit: {total / GIB:.1f} GiB needed, {usable / GIB:.1f} GiB usable; "
            f"largest batch per GPU that fits: {max_b}"
        )
    return Plan(
        config_name=str(cfg.name),
        gpu=spec.name,
        gpus=gpus,
        nodes=math.ceil(gpus / spec.gpus_per_node),
        zero_stage=stage,
        bf16=bf16,
        batch_per_gpu=b,
        global_batch=global_batch,
        params=params,
        mfu=mfu,
        inter_node_gbits_s=inter,
        memory=parts,
        memory_total=total,
        memory_usable=usable,
        fits=total <= usable,
        max_batch_per_gpu=max_b,
        flops_per_sample=flops,
        compute_s=compute_s,
        comm_bytes=link_bytes,
        comm_s=comm_time,
        step_s=step_s,
        samples_per_s=rate,
        samples_per_s_per_gpu=rate / gpus,
        total_samples=total_samples,
        steps=steps,
        wall_hours=wall_h,
        gpu_hours=wall_h * gpus,
        measured=measured,
        notes=notes,
    )


def measure(cfg: Any) -> dict[str, Any]:
    """The CPU measurements the cost model scales from (activations, loss matrices, params)."""
    cpu_cfg = _fp32_copy(cfg)
    with torch.device("meta"):
        params = sum(p.numel() for p in pretrain.build_model(cpu_cfg).parameters())
    return {
        "params": params,
        "activations": measure_activations(cpu_cfg),
        "loss_matrices": measure_loss_matrices(cpu_cfg),
    }


def _fp32_copy(cfg: Any) -> Any:
    """`cfg` with compilation off: the measurement runs the eager model."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    if "compile" in cfg.train:
        cfg.train.compile = False
    return cfg


def predicted_peak_bytes(cfg: Any, measured: dict[str, Any] | None = None) -> float:
    """Predicted peak tensor memory of one training step on one process (world 1), in bytes.

    What `tests/test_plan.py` checks against a measured step on the CPU.
    """
    measured = measured if measured is not None else measure(cfg)
    stage, bf16 = int(cfg.deepspeed.zero_stage), bool(cfg.deepspeed.bf16)
    parts = model_state_bytes(int(measured["params"]), stage, 1, bf16)
    act = measured["activations"]
    b = int(cfg.train.batch_size)
    parts["activations"] = act["fixed_bytes"] + act["per_sample_bytes"] * b
    parts["loss_logits"] = measured["loss_matrices"] * b * b * 4.0
    return sum(parts.values())


def format_plan(plan: Plan) -> str:
    """A human-readable report of one plan."""
    gib = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        f"{plan.config_name}: {plan.gpus} x {plan.gpu} ({plan.nodes} nodes), ZeRO-{plan.zero_stage}, "
        f"{'bf16' if plan.bf16 else 'fp32'}, batch {plan.batch_per_gpu}/GPU "
        f"(global {plan.global_batch:,}), {plan.params / 1e6:.1f} M parameters",
        "memory per GPU:",
    ]
    for name, value in plan.memory.items():
        lines.append(f"  {name:<28} {gib(value)}")
    lines.append(f"  {'total':<28} {gib(plan.memory_total)}  of {gib(plan.memory_usable)} usable")
    lines.append(f"  largest batch per GPU that fits: {plan.max_batch_per_gpu:,}")
    lines.append(
        f"FLOPs per sample (train, 3x forward): {plan.flops_per_sample / 1e9:.2f} GFLOP; "
        f"compute per step at MFU {plan.mfu:.0%}: {plan.compute_s * 1e3:.1f} ms"
    )
    lines.append(f"communication per step (bytes through each GPU, time at "
                 f"{plan.inter_node_gbits_s:g} Gbit/s between nodes):")  # fmt: skip
    for name, value in plan.comm_bytes.items():
        lines.append(f"  {name:<28} {value / 2**20:10.1f} MiB  {plan.comm_s[name] * 1e3:8.2f} ms")
    lines.append(
        f"step {plan.step_s * 1e3:.1f} ms -> {plan.samples_per_s:,.0f} samples/s "
        f"({plan.samples_per_s_per_gpu:,.0f} per GPU)"
    )
    lines.append(
        f"pretraining {plan.total_samples:,} samples: {plan.steps:,} steps, "
        f"{plan.wall_hours * 60:,.1f} min wall, {plan.gpu_hours:,.1f} GPU-hours"
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
