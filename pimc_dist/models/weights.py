"""Encoder weights as safetensors (never pickle): export after pretraining, load for downstream.

File layout: one tensor per key "<owner view>.encoder.<state-dict key>", in
float32 (integer buffers such as BatchNorm's step counter keep their dtype),
and the metadata entry "views" = JSON {view: owner view} naming which encoder
each view of the model ran through (views that share an encoder are stored once).
A file of bare encoder keys (no "<view>.encoder." prefix) loads too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pimc_dist.models.two_tower import ContrastiveModel
from pimc_dist.models.vit import VisionTransformer, resize_pos_embed

_PREFIXED_KEY = re.compile(r"^([^.]+)\.encoder\.(.+)$")
_MAX_LISTED = 5


class WeightsError(ValueError):
    """A weights file is unreadable or does not fit the module; the message names the file."""

    def __init__(self, path: os.PathLike | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _export_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t.clone()).contiguous()


def export_encoder_state(
    model: ContrastiveModel | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Encoder tensors keyed "<view>.encoder.<key>", float32 on CPU.

    Takes the model, or its full (consolidated) state dict with keys
    "encoders.<view>.<key>" (a leading "module." as DDP adds is dropped).
    """
    if isinstance(model, ContrastiveModel):
        return {
            f"{view}.encoder.{key}": _export_tensor(t)
            for view, encoder in model.encoders.items()
            for key, t in encoder.state_dict().items()
        }
    out = {}
    for key, t in model.items():
        key = key.removeprefix("module.")
        if key.startswith("encoders."):
            view, _, rest = key[len("encoders.") :].partition(".")
            out[f"{view}.encoder.{rest}"] = _export_tensor(t)
    if not out:
        raise ValueError("state dict has no 'encoders.<view>.' keys: not a ContrastiveModel's")
    return out


def save_encoder_weights(
    state: Mapping[str, torch.Tensor],
    path: os.PathLike | str,
    views: Mapping[str, str] | None = None,
) -> Path:
    """Write `state` (from export_encoder_state) to a safetensors file, atomically.

    `views` ({view: owner view}, e.g. `{v: k[0] for v, k in model.views.items()}`)
    goes into the file's metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "views": json.dumps(dict(views or {}))}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(dict(state), str(tmp), metadata=metadata)
        os.replace(tmp, path)  # a crash mid-write never leaves a half file under `path`
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_weights_file(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; WeightsError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise WeightsError(
            path,
            f"not a readable safetensors file (truncated or corrupt?): {err}. "
            "Weights are read from safetensors only, never from pickle checkpoints.",
        ) from None
    if not tensors:
        raise WeightsError(path, "holds no tensors")
    return tensors, metadata


def _select_view(
    path: Path, tensors: dict[str, torch.Tensor], view: str | None
) -> dict[str, torch.Tensor]:
    """The bare encoder state of one view (or the file itself if it holds bare keys)."""
    matches = {key: _PREFIXED_KEY.match(key) for key in tensors}
    prefixed = [k for k, m in matches.items() if m]
    if not prefixed:
        if view is not None:
            raise WeightsError(path, f"holds one bare encoder, no view {view!r}")
        return tensors
    if len(prefixed) != len(tensors):
        bare = sorted(k for k, m in matches.items() if not m)
        raise WeightsError(path, f"mixes '<view>.encoder.' keys with bare keys: {_listed(bare)}")
    views = sorted({m.group(1) for m in matches.values()})
    if view is None:
        if len(views) > 1:
            raise WeightsError(path, f"holds encoders of views {views}; pass view= to pick one")
        view = views[0]
    if view not in views:
        raise WeightsError(path, f"has no encoder for view {view!r}; it has {views}")
    return {m.group(2): tensors[k] for k, m in matches.items() if m.group(1) == view}


def load_encoder_weights(
    module: nn.Module, path: os.PathLike | str, view: str | None = None
) -> None:
    """Load an encoder's weights from a safetensors file, all or nothing.

    `view` picks the encoder when the file holds several. The file must match the
    module key for key and shape for shape, except a ViT's position embeddings,
    which are resized to the module's patch grid. Raises FileNotFoundError or
    WeightsError (naming the file and the problem); the module is untouched then.
    """
    path = Path(path)
    tensors, _ = read_weights_file(path)
    state = _select_view(path, tensors, view)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise WeightsError(path, f"does not fit {type(module).__name__}: " + "; ".join(parts))

    converted = {}
    wrong_shapes = []
    for key, target in expected.items():
        value = state[key]
        if (
            key == "pos_embed"
            and isinstance(module, VisionTransformer)
            and value.ndim == 3
            and value.shape[-1] == target.shape[-1]
            and value.shape != target.shape
        ):
            try:
                value = resize_pos_embed(value, module.grid)
            except ValueError as err:
                raise WeightsError(path, f"pos_embed: {err}") from None
        if value.shape != target.shape:
            wrong_shapes.append(f"{key} {tuple(value.shape)} (model {tuple(target.shape)})")
        converted[key] = value.to(target.dtype)
    if wrong_shapes:
        raise WeightsError(path, f"wrong shapes: {_listed(wrong_shapes)}")
    module.load_state_dict(converted, strict=True)
