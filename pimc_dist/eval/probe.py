"""Linear probes on frozen features: a feature cache and a grid of heads trained in one pass.

Features of a frozen encoder are computed once per (weights, task inputs, data)
and cached as safetensors, one file per split, under a folder named by a hash
of everything that determines them (`cache_key`). Later runs, and other cells of
a sweep pointing at the same cache folder, read them instead of encoding again.

`train_linear_heads` then trains one linear head per learning rate (as
DINOv2's eval/linear.py trains its grid of classifiers), all in the same pass
over the cached features: every batch updates every head, each with its own
learning rate (SGD, momentum 0.9, cosine decay); the heads are one batched
weight, so the whole grid costs one matmul per batch. Features are standardised
with the training split's mean and std first, so one learning-rate grid suits
encoders whose features differ in scale (a random-init encoder's, say). The
head with the best validation score is the one reported on the test split.
A head whose loss stops being finite is dropped from training (its score is NaN).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

from pimc_dist.eval.downstream import DownstreamModel
from pimc_dist.eval.tasks import SplitData, Task
from pimc_dist.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1


# ---------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------


def cache_key(info: dict[str, Any]) -> str:
    """A short stable hash of what determines the features (weights, inputs, data, ...)."""
    text = json.dumps({"schema": CACHE_SCHEMA, **info}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path, size and modification time of a file (cheap stand-in for its content hash)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@torch.no_grad()
def encode(
    model: DownstreamModel,
    data: SplitData,
    normalizer: Any,
    batch_size: int,
    progress: str | None = None,
) -> np.ndarray:
    """Frozen features (N, D) of a split, in batches, model in eval mode.

    `progress`: a label for a progress bar (rate and ETA, on stderr); None shows none.
    """
    model.eval()
    out = []
    with progress_bar(len(data), progress, unit="sample") as bar:
        for i in range(0, len(data), batch_size):
            batch = normalizer.batch(data.inputs, slice(i, i + batch_size))
            out.append(model.features(batch).float().numpy())
            bar.update(min(batch_size, len(data) - i))
    return np.concatenate(out) if out else np.zeros((0, model.feature_dim), np.float32)


def save_split_features(folder: Path, split: str, features: np.ndarray, data: SplitData) -> Path:
    """Write one split's features, targets (and forecast extras) atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "features": np.ascontiguousarray(features, dtype=np.float32),
        "target": np.ascontiguousarray(data.target),
    }
    if data.base is not None:
        tensors["base"] = np.ascontiguousarray(data.base)
    if data.window is not None:
        tensors["window"] = np.ascontiguousarray(data.window, dtype=np.float32)
    metadata = {"keys": json.dumps(data.keys), "dropped": json.dumps(data.dropped)}
    path = folder / f"{split}.safetensors"
    tmp = folder / f".{split}.safetensors.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_split_features(folder: Path, split: str) -> tuple[np.ndarray, SplitData] | None:
    """Cached (features, split) or None when absent; a corrupt file is reported and ignored."""
    path = folder / f"{split}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        keys = json.loads(meta["keys"])
        dropped = json.loads(meta.get("dropped", "{}"))
        features, target = tensors["features"], tensors["target"]
        if features.ndim != 2 or len(features) != len(target) or len(keys) != len(target):
            raise ValueError(
                f"inconsistent lengths: features {features.shape}, target {target.shape}, "
                f"{len(keys)} keys"
            )
    except Exception as exc:  # truncated or foreign file: recompute rather than fail
        log.warning("%s: unreadable feature cache (%s); computing the features again", path, exc)
        print(f"warning: {path}: unreadable feature cache ({exc}); computing again", flush=True)
        return None
    data = SplitData({}, target, keys, tensors.get("base"), dropped, tensors.get("window"))
    return features, data


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """The grid's outcome: per-lr validation scores, the chosen head and its test metrics."""

    per_lr: list[dict[str, Any]]
    best_lr: float
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    test_output: np.ndarray
    heads: dict[str, torch.Tensor]
    loss_curve: list[float]


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Features scaled by the training split's per-dimension mean and std (std 0 -> 1)."""
    mean = train.mean(axis=0, keepdims=True)
    std = train.std(axis=0, keepdims=True)
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in (train, *others))


def _flat_target(task: Task, data: SplitData) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(data.target))
    if task.kind == "forecast":
        return t.reshape(len(t), -1).float()
    return t.long() if task.kind == "multiclass" else t.float()


def _per_head_loss(task: Task, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(H,) mean loss of each head's (H, B, K) outputs."""
    h, b, k = out.shape
    if task.kind == "multiclass":
        flat = F.cross_entropy(out.reshape(h * b, k), target.repeat(h), reduction="none")
        return flat.reshape(h, b).mean(dim=1)
    if task.kind == "multilabel":
        full = F.binary_cross_entropy_with_logits(out, target.expand(h, b, k), reduction="none")
        return full.mean(dim=(1, 2))
    return ((out - target) ** 2).mean(dim=(1, 2))


class LinearHeads(nn.Module):
    """H independent linear heads D -> K as one (H, D, K) weight: one matmul for all of them."""

    def __init__(self, n_heads: int, in_dim: int, out_dim: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(n_heads, in_dim, out_dim, generator=generator) * 0.01
        )
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (H, B, K)."""
        return torch.einsum("bd,hdk->hbk", x, self.weight) + self.bias


def _single_threaded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with one torch thread (restored after)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        # Small matmuls: more threads only add synchronisation (20-80x slower on a busy machine).
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


@_single_threaded
def train_linear_heads(
    task: Task,
    train: tuple[np.ndarray, SplitData],
    val: tuple[np.ndarray, SplitData],
    test: tuple[np.ndarray, SplitData],
    class_names: list[str],
    out_dim: int,
    *,
    lrs: list[float],
    epochs: int,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: str | None = None,
) -> ProbeResult:
    """Train one linear head per lr in the same passes over `train`; pick by `val`, score `test`.

    SGD with momentum 0.9 and a cosine decay, written out so that each head keeps
    its own learning rate while all heads share one batched forward and backward.
    `progress`: a label for a progress bar over the steps (None: no bar).
    """
    if not lrs:
        raise ValueError("finetune.probe_lrs is empty")
    (x_train, d_train), (x_val, d_val), (x_test, d_test) = train, val, test
    if len(d_train) == 0:
        raise ValueError("no training sample left for the probe")
    xt, xv, xs = standardize(x_train, x_val, x_test)
    yt = _flat_target(task, d_train)
    gen = torch.Generator().manual_seed(int(seed))
    heads = LinearHeads(len(lrs), xt.shape[1], out_dim, gen)
    base_lr = torch.tensor(lrs, dtype=torch.float32)
    momentum = {name: torch.zeros_like(p) for name, p in heads.named_parameters()}
    alive = torch.ones(len(lrs), dtype=torch.bool)
    n = len(xt)
    bs = max(1, min(int(batch_size), n))
    total = max(1, math.ceil(n / bs) * int(epochs))
    curve = []
    step = 0
    with progress_bar(total, progress, unit="step") as bar:
        for _ in range(int(epochs)):
            order = torch.randperm(n, generator=gen)
            epoch_loss, batches = 0.0, 0
            for i in range(0, n, bs):
                idx = order[i : i + bs]
                losses = _per_head_loss(task, heads(xt[idx]), yt[idx])
                alive &= torch.isfinite(losses).detach()  # a diverged head stops training
                if not alive.any():
                    break
                heads.zero_grad(set_to_none=True)
                losses[alive].sum().backward()
                lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total)) * alive
                with torch.no_grad():
                    for name, p in heads.named_parameters():
                        grad = torch.nan_to_num(p.grad) + weight_decay * p
                        momentum[name].mul_(0.9).add_(grad)
                        p.sub_(lr.view(-1, 1, 1) * momentum[name])
                epoch_loss += float(losses.detach()[alive].mean())
                batches += 1
                step += 1
                bar.update(1)
            curve.append(epoch_loss / max(1, batches))
            bar.set_postfix(loss=f"{curve[-1]:.4f}", refresh=False)

    per_lr = []
    best = None
    with torch.no_grad():
        out_val = heads(xv).numpy() if len(xv) else np.zeros((len(lrs), 0, out_dim))
        out_test = heads(xs).numpy()
    for j, lr in enumerate(lrs):
        ok = bool(alive[j])
        head_val = out_val[j] if ok else np.full_like(out_val[j], np.nan)
        val_metrics = task.score(head_val, d_val, class_names) if len(d_val) else {}
        value = float(val_metrics.get(task.primary, float("nan")))
        per_lr.append({"lr": lr, f"val_{task.primary}": value, "diverged": not ok})
        if best is None or task.better(value, best[1]):
            best = (j, value, val_metrics)
    j, _, val_metrics = best
    test_output = out_test[j] if bool(alive[j]) else np.full_like(out_test[j], np.nan)
    test_metrics = task.score(test_output, d_test, class_names)
    state = {
        f"lr_{lr:g}.{name}": p[k].detach().clone()
        for k, lr in enumerate(lrs)
        for name, p in heads.named_parameters()
    }
    return ProbeResult(per_lr, lrs[j], val_metrics, test_metrics, test_output, state, curve)


__all__ = [
    "LinearHeads",
    "ProbeResult",
    "cache_key",
    "file_identity",
    "load_split_features",
    "save_split_features",
    "standardize",
    "train_linear_heads",
]
