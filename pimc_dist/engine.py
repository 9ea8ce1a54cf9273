"""DeepSpeed engine: configuration from our config, checkpoints, resume and export.

Every training path goes through `Engine`: it builds the DeepSpeed config
(ZeRO stage, bf16, accumulation, clipping), the AdamW optimizer (no weight
decay on norms, biases and the logit scale) and the warmup + cosine schedule,
and owns the checkpoint folder:

    <run_dir>/checkpoints/
        step00000200/            DeepSpeed files of every rank + client_state.json
        step00000400/
        step00000400_universal/  made on resume with another world size
        latest                   tag of the newest COMPLETE checkpoint

Rank 0 writes client_state.json and then `latest` (temp file + rename) only after
a barrier that every rank reaches once its files are written, so the client state
marks a complete checkpoint and a crash during a save (of any rank) leaves the
previous checkpoint in charge. Keep-last-K counts complete step folders only;
universal conversions go with the folder they came from. The client state (step,
samples seen, data epoch, RNG states, W&B id, resolved config) is JSON, never
pickle. DeepSpeed's own files, also when converted to the universal format, are
read back through `torch.load(weights_only=True)` with an allowlist of the few
DeepSpeed classes they hold (see `_safe_torch_load`).

Precision: in bf16 mode DeepSpeed holds the parameters in bfloat16, keeps buffers
(BatchNorm statistics, see `pimc_dist.models.norm`) and the optimizer's master weights
in float32. Every batch reaches the model through `Engine.model_batch` (`cast_batch`:
floating inputs in the compute dtype, targets untouched); the losses compute in float32;
`full_state_dict` and `fp32_param` read the float32 masters, so exports and logged
values stay float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pimc_dist.config import merge_nested
from pimc_dist.files import write_atomic

CLIENT_STATE = "client_state.json"  # written last: its presence marks a complete checkpoint
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"
_STEP_TAG = re.compile(r"step\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a job; a JSON file in `deepspeed.config_file` wins key by key."""
    micro = int(cfg.train.batch_size)
    accum = int(cfg.train.grad_accum)
    stage = int(cfg.deepspeed.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        # DeepSpeed 0.19's ZeRO-1/2 "reduce_scatter" path all-reduces anyway (it is
        # use_multi_rank_bucket_allreduce's default) but first copies the already
        # contiguous gradient bucket into a new flat tensor and copies slices back; without
        # it the bucket is all-reduced in place: same traffic, two full-size copies fewer
        # (bench/train_step.py: 0.58x -> 0.63x DDP on the 8M MLP, 2 CPU ranks).
        zero["reduce_scatter"] = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.deepspeed.bf16)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.config_file:
        path = Path(cfg.deepspeed.config_file)
        try:
            extra = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: DeepSpeed config file not found") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise ValueError(f"{path}: DeepSpeed config must be a JSON object")
        merge_nested(ds, extra)
    return ds


# Batch keys that are targets, not model inputs: they keep their dtype when a batch is cast
# to the model's compute dtype (multi-hot or soft labels stay exact float32).
TARGET_KEYS = frozenset({"label", "labels", "target", "targets"})


def cast_batch(
    batch: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    *,
    keep: frozenset[str] | set[str] = TARGET_KEYS,
) -> dict[str, Any]:
    """The batch for a model that computes in `dtype`: floating tensors cast to it (and moved
    to `device` when given), except the targets named in `keep`; integer and boolean tensors
    keep their dtype, other values (`meta`) pass through.

    DeepSpeed's bf16 mode holds the model in bfloat16 while the loader and the fine-tuning
    normaliser produce float32; every path that runs a DeepSpeed model feeds it through here
    (`Engine.model_batch`), so that no path can forget the cast."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and key not in keep:
                value = value.to(device=device, dtype=dtype)
            elif device is not None:
                value = value.to(device)
        out[key] = value
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices and kernels only, not on norms, biases or scales."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (
            param.ndim <= 1
            or name.endswith(".bias")
            or "logit_scale" in name
            or "pos_embed" in name
        ):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def use_fused_adamw(device_type: str) -> bool:
    """Whether AdamW runs fused (one kernel over all tensors): on CUDA, where it is fastest.

    Elsewhere torch's default (foreach) is kept: the CPU tests and their reference
    losses were recorded with it.
    """
    return device_type == "cuda"


def warmup_cosine(total_steps: int, warmup_steps: int, lr: float, min_lr: float):
    """LambdaLR factor: linear warmup to `lr`, then cosine decay to `min_lr`."""
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """Tag of the newest complete checkpoint under `ckpt_dir`, or None when there is none."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (Path(ckpt_dir) / tag / CLIENT_STATE).is_file():
        raise CheckpointError(
            f"{path}: points to '{tag}' but {Path(ckpt_dir) / tag / CLIENT_STATE} is missing; "
            "the checkpoint folder was edited by hand or copied incompletely"
            + older_checkpoint_hint(ckpt_dir, tag)
        )
    return tag


_CLIENT_KEYS = ("step", "samples_seen", "data_epoch", "world_size", "rng", "config")


def read_client_state(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Any]:
    """The JSON client state of one checkpoint, validated for the keys resume needs."""
    path = Path(ckpt_dir) / tag / CLIENT_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing" + older_checkpoint_hint(ckpt_dir, tag)) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: not valid JSON (truncated?): {exc}" + older_checkpoint_hint(ckpt_dir, tag)
        ) from exc
    for key in _CLIENT_KEYS:
        if key not in state:
            raise CheckpointError(
                f"{path}: missing key '{key}'" + older_checkpoint_hint(ckpt_dir, tag)
            )
    return state


def older_checkpoint_hint(ckpt_dir: str | os.PathLike, damaged: str) -> str:
    """For the message of a damaged checkpoint `damaged`: the newest older checkpoint that
    looks complete (a valid client state, state files that are not empty) and how to resume
    from it; "" when there is none."""
    ckpt_dir = Path(ckpt_dir)
    match = re.fullmatch(r"step(\d+)", damaged or "")
    limit = int(match[1]) if match else None
    candidates = []
    for folder in ckpt_dir.glob("step*"):
        found = re.fullmatch(r"step(\d+)", folder.name)
        if not found or folder.name == damaged or (limit is not None and int(found[1]) >= limit):
            continue
        try:
            state = json.loads((folder / CLIENT_STATE).read_text())
        except (OSError, ValueError):
            continue
        files = list(folder.glob("*.pt"))
        if (
            all(k in state for k in _CLIENT_KEYS)
            and files
            and all(f.stat().st_size > 0 for f in files)
        ):
            candidates.append((int(found[1]), folder.name))
    if not candidates:
        return "; no older complete checkpoint is there: delete the folder to start over"
    step, tag = max(candidates)
    return (
        f". An older checkpoint looks intact: {ckpt_dir / tag} (step {step}). To resume from "
        f"it, move the damaged one aside and point {LATEST} at it: "
        f"mv {ckpt_dir / damaged} {ckpt_dir / damaged}.damaged && "
        f"echo {tag} > {ckpt_dir / LATEST}; then rerun the same command"
    )


# The only non-tensor classes DeepSpeed 0.19 pickles into its checkpoint files (ZeRO
# 0-3, bf16 or not, and the universal format): the loss scaler, the ZeRO stage enum and
# the fragment addresses of ZeRO-1/2. Plain containers, tensors and dtypes are already
# admitted by weights_only. Anything else (os.system, builtins.open, any torch or
# DeepSpeed class whose construction has side effects) makes the load fail instead of
# running it; a newer DeepSpeed that pickles another class needs it added here.
_ALLOWED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)

# What a torn, truncated or foreign checkpoint file raises from inside DeepSpeed.
_READ_ERRORS = (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError)


def _restricted_load(original: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
    """`torch.load(weights_only=True)` that also admits the DeepSpeed classes of `_ALLOWED_GLOBALS`."""
    import importlib

    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    bad = sorted(set(names) - _ALLOWED_GLOBALS)
    if bad:
        raise CheckpointError(
            f"{path}: refuses to unpickle {', '.join(bad)} (not a DeepSpeed checkpoint type)"
        )
    safe = []
    for name in names:
        module, _, attr = name.rpartition(".")
        safe.append(getattr(importlib.import_module(module), attr))
    kwargs["weights_only"] = True
    with torch.serialization.safe_globals(safe):
        return original(path, *args, **kwargs)


@contextlib.contextmanager
def _safe_torch_load() -> Iterator[None]:
    """Route every `torch.load` (DeepSpeed's checkpoint reads) through `_restricted_load`.

    DeepSpeed 0.19 calls `torch.load(..., weights_only=False)` from its checkpoint
    engine, its universal-checkpoint loader and its `ds_to_universal` converter, which
    would run any object pickled into a checkpoint file. They all look `torch.load` up
    at call time, so replacing the attribute reaches every one of them (in this
    process: the converter runs with one worker, no subprocesses).
    """
    original = torch.load

    def load(path: Any, *args: Any, **kwargs: Any) -> Any:
        return _restricted_load(original, path, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert one ZeRO checkpoint to DeepSpeed's universal format (rank 0 only); returns the new tag.

    Reads the checkpoint through the same restricted loader as `Engine.load`.
    """
    from deepspeed.checkpoint import ds_to_universal

    out_tag = f"{tag}{UNIVERSAL_SUFFIX}"
    out = ckpt_dir / out_tag
    if (out / CLIENT_STATE).is_file():
        return out_tag
    tmp = ckpt_dir / f".{out_tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = type(
        "Args",
        (),
        {
            "input_folder": str(ckpt_dir / tag),
            "output_folder": str(tmp),
            "num_extract_workers": 1,  # in this process, so that _safe_torch_load applies
            "num_merge_workers": 1,
            "keep_temp_folder": False,
            "strict": True,
            "inject_missing_state": False,
        },
    )()
    with _safe_torch_load():
        try:
            ds_to_universal.main(args)
        except CheckpointError:
            raise
        except _READ_ERRORS as exc:
            raise CheckpointError(
                f"{ckpt_dir / tag}: cannot convert to a universal checkpoint: {exc}"
            ) from exc
    # ds_to_universal also leaves a `latest_universal` pointer naming the temporary folder;
    # `latest` and explicit tags are this folder's pointers.
    (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    shutil.copy(ckpt_dir / tag / CLIENT_STATE, tmp / CLIENT_STATE)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out_tag


class Engine:
    """A DeepSpeed engine for one model, with our checkpoint layout."""

    def __init__(
        self,
        cfg: Any,
        model: torch.nn.Module,
        *,
        world_size: int,
        rank: int,
        total_steps: int,
        load_universal: bool = False,
    ):
        import deepspeed

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.ckpt_dir = Path(cfg.train.run_dir) / "checkpoints"
        ds_config = deepspeed_config(cfg, world_size)
        if load_universal:
            ds_config["checkpoint"] = {"load_universal": True}
        optimizer = torch.optim.AdamW(
            param_groups(model, float(cfg.train.weight_decay)),
            lr=float(cfg.train.lr),
            betas=tuple(cfg.train.betas),
            fused=use_fused_adamw(deepspeed.get_accelerator().device_name()) or None,
        )
        warmup = int(round(total_steps * float(cfg.train.warmup_fraction)))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            warmup_cosine(total_steps, warmup, float(cfg.train.lr), float(cfg.train.min_lr)),
        )
        self.ds_config = ds_config
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype DeepSpeed holds the model in (bf16 / fp16 modes), else float32."""
        if self.module.bfloat16_enabled():
            return torch.bfloat16
        if self.module.fp16_enabled():
            return torch.float16
        return torch.float32

    def model_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` on the engine's device with its inputs in the compute dtype (`cast_batch`)."""
        return cast_batch(batch, self.compute_dtype, self.device)

    def fp32_param(self, param: torch.nn.Parameter) -> torch.Tensor:
        """A parameter's float32 value: the optimizer's master copy in bf16/fp16 mode (a
        collective under ZeRO: call it on every rank), else the parameter itself, detached."""
        if self.compute_dtype != torch.float32:
            from deepspeed.utils import safe_get_full_fp32_param

            master = safe_get_full_fp32_param(param)
            if master is not None:
                return master.detach().float().reshape(param.shape)
        return param.detach().float()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float:
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        """Save on every rank; the checkpoint counts as complete, and `latest` moves to it,
        only after all ranks finished writing."""
        import torch.distributed as dist

        tag = f"step{step:08d}"
        folder = self.ckpt_dir / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            # A folder of this tag left by an earlier attempt must not look complete
            # while it is being overwritten.
            (folder / CLIENT_STATE).unlink(missing_ok=True)
        # Pure data parallelism: no tensor/pipeline patterns, only the version key that
        # DeepSpeed's universal-checkpoint converter requires (to resume on another world size).
        from deepspeed.checkpoint import constants

        uc_info = {
            constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
        self.module.save_checkpoint(
            str(self.ckpt_dir),
            tag=tag,
            client_state={constants.UNIVERSAL_CHECKPOINT_INFO: uc_info},
            save_latest=False,
        )
        if dist.is_initialized():
            dist.barrier()  # every rank's files are written; a rank that died never gets here
        if self.rank == 0:
            state = dict(client_state, tag=tag, world_size=self.world_size)
            write_atomic(folder / CLIENT_STATE, json.dumps(state))
            write_atomic(self.ckpt_dir / LATEST, tag)
            self._prune(keep=int(self.cfg.train.keep_last), current=tag)
        if dist.is_initialized():
            dist.barrier()
        return folder

    def _prune(self, keep: int, current: str) -> None:
        """Keep the newest `keep` complete checkpoints (and their universal conversions).

        Only `stepNNNNNNNN` folders with a client state count; an incomplete folder
        older than `current` is debris of a crashed save and goes too.
        """
        tags = sorted(p.name for p in self.ckpt_dir.iterdir() if _STEP_TAG.fullmatch(p.name))
        complete = [t for t in tags if (self.ckpt_dir / t / CLIENT_STATE).is_file()]
        kept = {current, *complete[max(0, len(complete) - keep) :]}
        for tag in tags:
            if tag in kept or (tag not in complete and tag > current):
                continue
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
        for path in self.ckpt_dir.glob(f"step*{UNIVERSAL_SUFFIX}"):
            if path.name.removesuffix(UNIVERSAL_SUFFIX) not in kept:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, tag: str) -> None:
        """Load model, optimizer and schedule state of `tag` on every rank."""
        universal = bool(self.ds_config.get("checkpoint", {}).get("load_universal"))
        with _safe_torch_load():
            try:
                path, _ = self.module.load_checkpoint(str(self.ckpt_dir), tag=tag)
                if path is not None and universal:
                    self._load_buffers(self.ckpt_dir / tag)
            except CheckpointError:
                raise
            except _READ_ERRORS as exc:
                raise CheckpointError(
                    f"{self.ckpt_dir / tag}: cannot load checkpoint: {exc}"
                    + older_checkpoint_hint(self.ckpt_dir, tag.removesuffix(UNIVERSAL_SUFFIX))
                ) from exc
        if path is None:
            raise CheckpointError(f"{self.ckpt_dir / tag}: DeepSpeed found no checkpoint to load")

    def _load_buffers(self, folder: Path) -> None:
        """Restore module buffers (BatchNorm running statistics) after a universal load.

        DeepSpeed 0.19's universal load restores parameters only, from `zero/`, and skips
        the module state dict, so buffers would silently restart from their initial
        values. They come from rank 0's model-states file, as a normal load takes them.
        """
        files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise CheckpointError(f"{folder}: no mp_rank_00_model_states.pt to read buffers from")
        saved = torch.load(files[0], map_location="cpu")["module"]
        module = self.module.module
        names = set(dict(module.named_buffers())) & set(module.state_dict())  # persistent ones
        missing = sorted(names - set(saved))
        if missing:
            raise CheckpointError(f"{files[0]}: holds no buffer {missing[0]}")
        module.load_state_dict({name: saved[name] for name in names}, strict=False)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights of the whole model (gathers ZeRO-3 partitions); on every rank.

        In bf16/fp16 mode the parameters are the optimizer's float32 master weights, not the
        rounded low-precision copies the model computes with; buffers (BatchNorm statistics,
        kept float32 by DeepSpeed) as they are. Integer buffers keep their dtype.
        """
        state = self._module_state()
        if self.compute_dtype != torch.float32:
            from deepspeed.utils import safe_get_full_fp32_param

            # A collective under ZeRO (the fragments live on different ranks): every rank
            # runs it, in the same parameter order.
            for name, param in self.module.module.named_parameters():
                master = safe_get_full_fp32_param(param)
                if master is not None and name in state:
                    shape = state[name].shape
                    state[name] = master.detach().float().cpu().reshape(shape).clone()
        return state

    def _module_state(self) -> dict[str, torch.Tensor]:
        import deepspeed

        module = self.module.module
        params = list(module.parameters())
        stage3 = self.ds_config["zero_optimization"]["stage"] == 3
        ctx = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if stage3
            else contextlib.nullcontext()
        )
        with ctx:
            return {
                k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()
            }
