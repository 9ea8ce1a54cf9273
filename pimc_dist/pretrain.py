"""Contrastive pretraining (PIMC or MoSAiC) with DeepSpeed; runs on every rank.

    python -m pimc_dist.pretrain --config configs/pretrain/tiny.yaml train.total_samples=4096

Rank, local rank and world size come from torchrun, Slurm or submitit variables
(`pimc_dist.distributed`); with none set it is a single process. The loop
counts samples seen (identical on every rank); a step is one optimizer step of
`train.grad_accum` micro-batches, and logs, checkpoints (every
`train.ckpt_every_steps` and at the end) and stops happen only between steps.
It resumes from the run folder's latest checkpoint by default. On
SIGTERM/SIGUSR1 it saves a checkpoint and exits with
`distributed.REQUEUE_EXIT_CODE` so the launcher requeues it.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from pimc_dist import checks, distributed, losses, models, run_lock, shardset
from pimc_dist import config as config_lib
from pimc_dist.augment import ViewAugmenter
from pimc_dist.engine import (
    UNIVERSAL_SUFFIX,
    CheckpointError,
    Engine,
    convert_to_universal,
    latest_tag,
    read_client_state,
    rng_state,
    set_rng_state,
)
from pimc_dist.eval.tasks import sample_key
from pimc_dist.label_subset import labelled_mask
from pimc_dist.models import (
    ContrastiveModel,
    count_flops,
    encoder_recipes,
    export_encoder_state,
    save_encoder_weights,
)
from pimc_dist.models.summary import human_count, model_summary
from pimc_dist.shardset import ShardError
from pimc_dist.tracking import Tracker

# Dense bf16 peak FLOP/s per GPU, for MFU, by a part of torch.cuda.get_device_name: the first
# key that matches wins, so the PCIe and NVL H100s (lower clocks) come before the SXM part.
# Unknown devices report no MFU.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


# On SIGTERM/SIGUSR1/2 (and Ctrl-C under the launcher) it saves a checkpoint at the next step
# boundary and exits; pimc_dist.jobs reads this to stop a local run as SIGTERM does on Ctrl-C.
STOPS_ON_SIGNAL = True

# The settings that make a pretraining what it is: a run folder that holds one with other
# values is refused (resuming it would mix two runs); others may change on a resume.
RUN_IDENTITY = (
    "method",
    "model",
    "loss.name",
    "loss.label_fraction",
    "loss.label_seed",
    "data.shard_dir",
)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, a dead rank, a different run in the folder)."""


# Errors whose message says it all, and the exit status they give: 2 for what the user asked
# (a run folder in use or holding another run, a refused config), 1 for what went wrong on the
# way (damaged shards, a checkpoint, a training that cannot go on). The command line and a job
# the launcher runs (pimc_dist.jobs) print the message alone, never a traceback.
USER_ERRORS: dict[type[Exception], int] = {
    run_lock.RunFolderError: 2,
    config_lib.ConfigError: 2,
    TrainingError: 1,
    CheckpointError: 1,
    ShardError: 1,
}


def build_loss(cfg: Any) -> torch.nn.Module:
    """The loss module named by `loss.name`."""
    kw = dict(
        local_loss=cfg.loss.local_loss,
        gather_with_grad=cfg.loss.gather_with_grad,
        max_logit_scale=cfg.loss.max_logit_scale,
    )
    if cfg.loss.name == "clip":
        return losses.ClipLoss(**kw)
    if cfg.loss.name == "siglip":
        return losses.SigLipLoss(**kw)
    if cfg.loss.name == "mosaic":
        return losses.MosaicLoss(
            w_intra=cfg.loss.w_intra,
            w_inter=cfg.loss.w_inter,
            w_sup=cfg.loss.w_sup,
            positives=cfg.loss.sup_positives,
            **kw,
        )
    raise config_lib.ConfigError(
        f"loss.name: unknown loss '{cfg.loss.name}' (clip, siglip, mosaic)"
    )


def build_model(cfg: Any) -> torch.nn.Module:
    """The multi-view contrastive model from `model.*`, its towers started from the views'
    `weights` files where given (on the meta device those are only checked)."""
    if not cfg.model.views:
        raise config_lib.ConfigError("model.views: no view configured (e.g. rp and rsi for PIMC)")
    views = OmegaConf.to_container(cfg.model.views)
    model = models.build_model(
        views=views,
        head=OmegaConf.to_container(cfg.model.head),
        shared_encoder=cfg.model.shared_encoder,
        grad_checkpointing=cfg.model.grad_checkpointing,
        init_temperature=cfg.model.init_temperature,
        init_logit_bias=-10.0 if cfg.loss.name == "siglip" else None,
    )
    models.load_view_weights(model, views)
    return models.compile_encoders(model) if cfg.train.compile else model


def pimc_views(views: Any) -> tuple[str, str]:
    """PIMC's two contrasted views among `views` (names): the plots and the crop ("rp",
    "rsi"), or, with no crop view, the plots and the raw series ("rp", "series": point
    tables, stacks without a useful crop; configs/pretrain/pimc_series.yaml)."""
    return ("rp", "series") if "series" in views and "rsi" not in views else ("rp", "rsi")


def compute_loss(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    batch: dict[str, Any],
    method: str,
    augment: ViewAugmenter | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward both views and the contrastive loss; returns (loss, named terms).
    `augment` draws MoSAiC's two augmentations per modality (default: flips/rotations)."""
    if method == "pimc":
        # The model's views decide the pair (the DeepSpeed engine wraps it as .module).
        a, b = pimc_views(getattr(getattr(model, "module", model), "views", batch))
        out = model({a: batch[a], b: batch[b]})
        if "logit_bias" in out:  # SigLIP
            loss = loss_fn(out[a], out[b], out["logit_scale"], out["logit_bias"])
        else:
            loss = loss_fn(out[a], out[b], out["logit_scale"])
        return loss, {}
    if method == "mosaic":
        # Two augmentations of each modality in one forward per encoder.
        augment = augment or ViewAugmenter()
        views = {v: augment.pair(v, batch[v]) for v in ("s2", "s1")}
        out = model(views)
        s2_a, s2_b = out["s2"].chunk(2)
        s1_a, s1_b = out["s1"].chunk(2)
        loss, terms = loss_fn(
            s2_a, s2_b, s1_a, s1_b, batch["labels"], out["logit_scale"], batch.get("has_label")
        )
        return loss, {k: v.detach() for k, v in terms.items()}
    raise config_lib.ConfigError(f"method: unknown method '{method}' (pimc, mosaic)")


def hide_unlabelled(batch: dict[str, Any], fraction: float, seed: int) -> dict[str, Any]:
    """The batch as the loss may see it at `loss.label_fraction` < 1: the multi-hot labels
    of samples outside the labelled subset (`label_subset`, keyed like the evaluation's
    `sample_key` of each sample's JSON) are zeroed, and `has_label` marks the others, so that
    the SupCon term takes an unlabelled sample as neither anchor, positive nor negative."""
    if float(fraction) >= 1.0 or "labels" not in batch:
        return batch
    if batch.get("meta") is None:
        raise TrainingError(
            "loss.label_fraction < 1 needs each sample's JSON (its key) in the batch; "
            "the shard set has none"
        )
    labels = batch["labels"]
    keys = [sample_key(m) for m in batch["meta"]]
    mask = torch.from_numpy(labelled_mask(keys, fraction, seed)).to(labels.device)
    return {**batch, "labels": labels * mask[:, None].to(labels.dtype), "has_label": mask}


def check_config(cfg: Any) -> None:
    """Checks that need no data or GPU; the launcher runs them before submitting."""
    checks.check_values(cfg)
    checks.check_no_data_config(cfg, "pretraining")
    if cfg.method not in ("pimc", "mosaic"):
        raise config_lib.ConfigError(f"method: unknown method '{cfg.method}' (pimc, mosaic)")
    if cfg.loss.name not in ("clip", "siglip", "mosaic"):
        raise config_lib.ConfigError(
            f"loss.name: unknown loss '{cfg.loss.name}' (clip, siglip, mosaic)"
        )
    if (cfg.method == "mosaic") != (cfg.loss.name == "mosaic"):
        raise config_lib.ConfigError(
            f"loss.name: '{cfg.loss.name}' does not fit method '{cfg.method}'"
        )
    if float(cfg.loss.label_fraction) < 1.0 and cfg.loss.name != "mosaic":
        raise config_lib.ConfigError(
            f"loss.label_fraction: only the mosaic loss reads labels, not '{cfg.loss.name}'"
        )
    needed = {"pimc": set(pimc_views(cfg.model.views)), "mosaic": {"s2", "s1"}}[cfg.method]
    missing = needed - set(cfg.model.views)
    if missing:
        raise config_lib.ConfigError(
            f"model.views: method {cfg.method} needs views {sorted(missing)}"
            + (" (without crops: rp and series)" if cfg.method == "pimc" else "")
        )
    # MoSAiC draws two augmentations per modality; PIMC's crops get the loader's flips only.
    drawn = {"pimc": (), "mosaic": ("s2", "s1")}[cfg.method]
    for view in cfg.augment:
        if view not in drawn:
            raise config_lib.ConfigError(
                f"augment.{view}: method {cfg.method} draws no augmentations of view '{view}' "
                f"({'only of ' + ', '.join(drawn) if drawn else 'PIMC reads no augment section'})"
            )
    _check_model(cfg)
    absent = needed - set(cfg.loader.views)
    if absent and not (absent == {"rp"} and cfg.loader.rp_on_the_fly != "off"):
        raise config_lib.ConfigError(
            f"loader.views: method {cfg.method} needs views {sorted(absent)}"
        )
    checks.check_shards(cfg)  # the manifest parses; method, views, channels and sizes fit
    # Before the launcher rewrites config.yaml.
    config_lib.check_run_folder(cfg, Path(cfg.train.run_dir), RUN_IDENTITY)


def _check_model(cfg: Any) -> None:
    """Build the model on the meta device (no memory, no time), so that a bad encoder name,
    option or shape, or a weights file that is missing or does not fit, fails here, naming the
    view's key, rather than on every rank of a job."""
    try:
        with torch.device("meta"):
            build_model(cfg)
    except config_lib.ConfigError:
        raise
    except ValueError as exc:
        # The registry names the view: "view 'rp': unknown encoder 'resnet19'; ...".
        match = re.fullmatch(r"view '([^']+)': (.*)", str(exc), flags=re.S)
        key, message = (f"model.views.{match[1]}", match[2]) if match else ("model", str(exc))
        raise config_lib.ConfigError(f"{key}: {message}") from None


# What gloo, NCCL and the c10d store say when a peer died, closed its connection or a
# collective ran past its timeout.
_LOST_PEER = re.compile(
    r"closed by peer|connection (reset|refused|closed)|broken pipe|timed out|timeout|"
    r"watchdog|nccl error|socket|peer|rank \d+ (died|exited)",
    re.IGNORECASE,
)
# Where the collectives of each phase live, for the message.
_PHASE_COLLECTIVE = {
    "forward and loss": "feature all-gather",
    "backward": "gradient all-reduce",
}


def _frames(exc: BaseException) -> list[Any]:
    """The frames of `exc`'s traceback, outermost first."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _lost_collective(exc: BaseException) -> bool:
    """Whether `exc` is a collective that timed out or lost a peer (not an error of an op)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    frames = _frames(exc)
    innermost = frames[-1].f_code.co_filename if frames else ""
    in_comm = any(part in innermost for part in ("/torch/distributed/", "/deepspeed/comm/"))
    return bool(_LOST_PEER.search(str(exc))) or (in_comm and "timeout" in str(exc).lower())


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/pimc_dist/"):
        if marker in filename:
            head = "" if marker == "/site-packages/" else "pimc_dist/"
            return head + filename.rsplit(marker, 1)[1]
    return filename


def error_origin(exc: BaseException, modules: dict[str, torch.nn.Module]) -> str:
    """Where in a forward pass `exc` was raised: the innermost module on the stack (its name in
    `modules`: prefix -> root module) and the innermost frame (file:line in function)."""
    names = {
        id(m): f"{prefix}.{name}".strip(".") if name else prefix
        for prefix, root in modules.items()
        for name, m in root.named_modules()
    }
    frames = _frames(exc)
    where = []
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            where.append(f"{names[id(owner)] or 'model'} ({type(owner).__name__})")
            break
    if frames:
        code, line = frames[-1].f_code, frames[-1].f_lineno
        where.append(f"{_short_path(code.co_filename)}:{line} in {code.co_name}")
    return ", ".join(where) or "unknown"


def _failure_message(
    exc: BaseException, rank: int, phase: str, step: int, modules: dict[str, torch.nn.Module]
) -> str:
    """The TrainingError text of `exc`: a lost collective with the another-rank hint, else the
    failed operation and where it was raised."""
    head = f"rank {rank}: {phase} failed at step {step}"
    if _lost_collective(exc):
        what = _PHASE_COLLECTIVE.get(phase, "a collective")
        return (
            f"{head}: {what} timed out or lost a peer: {exc}\n"
            "Another rank probably died or hangs: look at the other ranks' logs "
            "(train.collective_timeout_s sets the wait)."
        )
    if phase in _PHASE_COLLECTIVE:
        origin = error_origin(exc, modules)
        return f"{head} in {origin}: {type(exc).__name__}: {exc}"
    return f"{head}: {type(exc).__name__}: {exc}"


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over ranks (local-form losses are per-rank shares)."""
    if not torch.distributed.is_initialized() or not values:
        return values
    # On the device the backend reduces on: an nccl group has no CPU tensors.
    t = torch.tensor(
        list(values.values()), dtype=torch.float64, device=distributed.collective_device()
    )
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss).all().to(torch.float32).reshape(1)
    if torch.distributed.is_initialized():
        flag = flag.to(distributed.collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def flops_per_sample(cfg: Any, model: torch.nn.Module | None = None) -> float:
    """Analytic training FLOPs per sample: 3x the forward of every view's tower (encoder and
    head, at the configured widths, stems and patch sizes), twice for MoSAiC's two
    augmentations. `model`: the built model of `cfg`, else it is built on the meta device."""
    if model is None:
        with torch.device("meta"):
            model = build_model(cfg)
    augmentations = 2 if cfg.method == "mosaic" else 1
    return 3.0 * augmentations * count_flops(model)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU named `device_name` (PEAK_BF16_FLOPS), None if unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def main(cfg: Any) -> int:
    """Pretrain with `cfg` on this rank; returns the process exit code."""
    check_config(cfg)
    env = distributed.init_distributed(timeout_s=int(cfg.train.collective_timeout_s))
    distributed.install_stop_handlers()
    # One job per run folder, for the job's life (the kernel frees it if the process dies).
    lock = run_lock.acquire_on_rank0(
        cfg.train.run_dir, env.rank, distributed.gather_objects, "pretraining"
    )
    with lock:
        return _train(cfg, env)


def _train(cfg: Any, env: distributed.DistEnv) -> int:
    """The pretraining of `main`, run with the run folder locked."""
    rank, world = env.rank, env.world_size
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    # Resume state is read before DeepSpeed starts: a different world size needs
    # the universal checkpoint format, which is a DeepSpeed config switch. A ZeRO-0
    # checkpoint holds the whole model and optimizer in rank 0's file: it loads as it is.
    tag = latest_tag(ckpt_dir)
    # Metrics with no checkpoint: refused on every rank, or moved aside by rank 0 (restart).
    run_lock.check_metrics_resume(
        run_dir, has_checkpoint=tag is not None, restart=cfg.train.restart, move=rank == 0
    )
    state = read_client_state(ckpt_dir, tag) if tag else None
    load_universal = bool(
        state and state["world_size"] != world and any((ckpt_dir / tag).glob("*optim_states.pt"))
    )
    # A finished run trains nothing more: its config.yaml keeps describing what trained it.
    finished = bool(state and state["samples_seen"] >= int(cfg.train.total_samples))
    if rank == 0:  # check_config above refused a folder that holds a different run
        run_dir.mkdir(parents=True, exist_ok=True)
        if finished:
            print(
                f"{run_dir} finished at step {state['step']} ({state['samples_seen']} samples): "
                "nothing to train, its config.yaml is kept as it is (a larger "
                "train.total_samples trains on)"
            )
        else:
            config_lib.save_run_config(cfg, run_dir)
        if load_universal:
            print(
                f"resuming {tag} saved with {state['world_size']} ranks on {world}: converting to universal"
            )
            convert_to_universal(ckpt_dir, tag)
    if load_universal:
        tag = f"{tag}{UNIVERSAL_SUFFIX}"
    distributed.barrier()

    torch.manual_seed(int(cfg.train.seed) + rank)
    np.random.seed((int(cfg.train.seed) + rank) % 2**32)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    model = build_model(cfg)
    train_flops = flops_per_sample(cfg, model)
    if rank == 0:
        print(model_summary(model))
        print(f"training FLOPs per sample (3x forward): {human_count(train_flops)}")
    loss_fn = build_loss(cfg)
    accum = int(cfg.train.grad_accum)
    total = int(cfg.train.total_samples)
    # "step" is an optimizer step of `accum` micro-batches on every rank: what metrics,
    # checkpoints, stops and the schedule count.
    micro_batch = int(cfg.train.batch_size) * world  # global samples per micro-batch
    engine = Engine(
        cfg,
        model,
        world_size=world,
        rank=rank,
        total_steps=math.ceil(total / (micro_batch * accum)),
        load_universal=load_universal,
    )
    device = engine.device

    step, samples_seen, data_epoch, skipped, run_id = 0, 0, 0, 0, None
    if tag:
        engine.load(tag)
        step, samples_seen, data_epoch = state["step"], state["samples_seen"], state["data_epoch"]
        skipped = state.get("nonfinite_skipped", 0)
        run_id = state.get("wandb_id")
        set_rng_state(state["rng"][str(rank)] if str(rank) in state["rng"] else state["rng"]["0"])
        if rank == 0:
            print(f"resumed from {ckpt_dir / tag} at step {step} ({samples_seen} samples seen)")

    loader = shardset.build_loader(cfg, rank=rank, world_size=world, device=device)
    augment = ViewAugmenter.from_config(cfg, loader.normalisation)  # augment.<view>.*
    tracker = Tracker(
        cfg, rank=rank, run_dir=run_dir, run_id=run_id, config=OmegaConf.to_container(cfg)
    )
    peak = _peak_flops(device)

    saved_step = step if tag else None  # the step of the latest checkpoint

    def save() -> None:
        nonlocal data_epoch, saved_step
        data_epoch += 1
        saved_step = step
        rngs = distributed.gather_objects(rng_state())
        engine.save(
            step,
            {
                "step": step,
                "samples_seen": samples_seen,
                "data_epoch": data_epoch,
                "nonfinite_skipped": skipped,
                "rng": {str(r): s for r, s in enumerate(rngs)},
                "wandb_id": tracker.run_id,
                "config": config_lib.to_yaml(cfg),
            },
        )

    if step == 0 and rank == 0:
        tracker.log_images(loader.sample_images(int(cfg.tracking.log_images)), step=0)

    progress = _Progress(rank, total=total, start=samples_seen)
    nonfinite_in_row = 0
    micro = 0  # micro-batches accumulated towards the next optimizer step
    step_sums: dict[str, torch.Tensor] = {}  # loss terms summed over those micro-batches
    phase = "start"
    exit_code = 0
    loader.set_epoch(data_epoch)
    batches = iter(loader)
    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
    try:
        # Finish a started accumulation even past the total: its gradients are paid for.
        while samples_seen < total or micro:
            phase = "waiting for data"
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                loader.set_epoch(data_epoch := data_epoch + 1)
                batches = iter(loader)
                continue
            batch = engine.model_batch(loader.to_device(batch, device))
            batch = hide_unlabelled(batch, cfg.loss.label_fraction, cfg.loss.label_seed)
            t1 = time.perf_counter()
            window_wait += t1 - t0
            phase = "forward and loss"
            engine.module.train()
            loss, terms = compute_loss(engine.module, loss_fn, batch, cfg.method, augment)
            stepped = False
            if _all_finite(loss):  # the same answer on every rank
                nonfinite_in_row = 0
                phase = "backward"
                engine.module.backward(loss)
                phase = "optimizer step"
                engine.module.step()  # DeepSpeed steps the optimizer every `accum` calls
                micro += 1
                samples_seen += micro_batch
                for name, value in {"loss": loss.detach(), **terms}.items():
                    step_sums[name] = step_sums.get(name, 0.0) + value
                if micro == accum:
                    micro, stepped = 0, True
                    step += 1
                    window_steps += 1
                    step_losses = {k: float(v) / accum for k, v in step_sums.items()}
                    step_sums = {}
                    progress.update(samples_seen, step_losses["loss"])
            else:
                nonfinite_in_row += 1
                skipped += 1
                if nonfinite_in_row >= int(cfg.train.max_nonfinite_in_row):
                    raise TrainingError(
                        f"loss was not finite for {nonfinite_in_row} steps in a row (step {step}); "
                        "lower train.lr, enable train.grad_clip, or check the data"
                    )
                if rank == 0:
                    print(
                        f"warning: non-finite loss after step {step}: batch skipped "
                        f"({nonfinite_in_row} in a row, {skipped} in all)",
                        flush=True,
                    )

            if stepped and (step % int(cfg.train.log_every_steps) == 0 or samples_seen >= total):
                elapsed = time.perf_counter() - window_start
                rate = window_steps * micro_batch * accum / max(elapsed, 1e-9)
                losses = _mean_over_ranks(
                    {
                        "loss": step_losses.pop("loss"),
                        **{f"loss/{k}": v for k, v in step_losses.items()},
                    }
                )
                # The float32 master value (bf16 would show the temperature in 3 digits).
                scale = engine.fp32_param(engine.module.module.logit_scale).exp()
                metrics = {
                    **losses,
                    # A tensor division: a diverged scale gives inf, not ZeroDivisionError.
                    "temperature": float(1.0 / scale.clamp(max=cfg.loss.max_logit_scale)),
                    "lr": engine.lr(),
                    "grad_norm": engine.grad_norm(),
                    "samples_seen": samples_seen,
                    "samples_per_s": rate,
                    "samples_per_s_per_device": rate / world,
                    "step_time_s": elapsed / max(1, window_steps),
                    "data_wait_frac": window_wait / max(elapsed, 1e-9),
                    "nonfinite_skipped": skipped,
                    **loader.counters(),
                }
                if device.type == "cuda":
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if peak:
                        metrics["mfu"] = rate * train_flops / (peak * world)
                tracker.log(metrics, step=step)
                window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0

            if micro:
                continue  # mid-accumulation: saving now would lose the accumulated gradients
            # Polled after every optimizer step and every skipped batch, so that a run
            # stuck on non-finite losses still obeys a stop request.
            phase = "checkpoint save"
            if distributed.any_rank_stop_requested():
                if saved_step != step:
                    save()
                distributed.record_stop(step)
                if rank == 0:
                    then = "exiting for requeue" if distributed.requeue_requested() else "exiting"
                    print(f"stop requested: saved checkpoint at step {step}; {then}", flush=True)
                exit_code = distributed.REQUEUE_EXIT_CODE
                break
            if not stepped:
                continue
            if cfg.train.stop_after_steps is not None and step >= int(cfg.train.stop_after_steps):
                save()
                if rank == 0:
                    print(f"stopped after step {step} (train.stop_after_steps); rerun to resume")
                break
            if step % int(cfg.train.ckpt_every_steps) == 0:
                save()
                loader.set_epoch(data_epoch)
                batches = iter(loader)
        else:
            phase = "final checkpoint save"
            if saved_step != step:
                save()
            if cfg.train.export_on_end:
                phase = "export"
                export_encoders(engine, model, run_dir / "encoders.safetensors", rank)
    except Exception as exc:
        # Errors of the forward pass and the loss (a wrong dtype or shape, a bad option) are
        # reported with their origin, whatever their type; elsewhere only runtime and I/O ones.
        if isinstance(exc, TrainingError) or not (
            isinstance(exc, (RuntimeError, OSError)) or phase in _PHASE_COLLECTIVE
        ):
            raise
        modules = {"": engine.module.module, "loss": loss_fn}
        raise TrainingError(_failure_message(exc, rank, phase, step, modules)) from exc
    finally:
        progress.close()
    tracker.summary({"samples_seen": samples_seen, "steps": step})
    tracker.finish(exit_code=0 if exit_code in (0, distributed.REQUEUE_EXIT_CODE) else exit_code)
    if rank == 0 and exit_code == 0:
        print(f"done: {step} steps, {samples_seen} samples; run folder {run_dir}")
        print(
            f"  checkpoints {ckpt_dir}  metrics {tracker.metrics_path}  W&B files {run_dir / 'wandb'}"
        )
    distributed.cleanup()
    return exit_code


def export_encoders(engine: Engine, model: ContrastiveModel, path: Path, rank: int) -> None:
    """Write consolidated fp32 encoder weights as safetensors (rank 0), with the views and the
    timm recipe of each encoder in the metadata (models/weights.py)."""
    state = engine.full_state_dict()
    if rank == 0:
        views = {view: keys[0] for view, keys in model.views.items()}
        save_encoder_weights(export_encoder_state(state), path, views, encoder_recipes(model))
        print(f"exported encoders to {path}")


class _Progress:
    """tqdm bar with rate and ETA on rank 0 on a terminal; a periodic log line otherwise."""

    def __init__(self, rank: int, total: int, start: int):
        self.rank, self.total = rank, total
        self.bar = None
        self.last_print = time.perf_counter()
        self.t0, self.start = time.perf_counter(), start
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, unit="sample", unit_scale=True, dynamic_ncols=True
            )

    def update(self, seen: int, loss: float) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(seen - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_print >= 10 or seen >= self.total:
            rate = (seen - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - seen) / max(rate, 1e-9)
            print(
                f"[{seen}/{self.total} samples] loss {loss:.4f}  {rate:.0f} samples/s  ETA {eta:.0f}s",
                flush=True,
            )
            self.last_print = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.pretrain",
        description="Contrastive pretraining (PIMC / MoSAiC) with DeepSpeed; run once per rank.",
        epilog="example: python -m pimc_dist.pretrain --config configs/pretrain/tiny.yaml train.lr=3e-4",
    )
    parser.add_argument("--config", required=True, help="job YAML (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        return main(cfg)  # check_config first: values, views, shards; exit 2 naming the key
    except tuple(USER_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in USER_ERRORS.items() if isinstance(exc, kind))


if __name__ == "__main__":
    sys.exit(cli())
