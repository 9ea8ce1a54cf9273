"""Encoder weights as safetensors (never pickle): export after pretraining, load for downstream;
and a user's timm / torchgeo weights file to start a tower from.

File layout: one tensor per key "<owner view>.encoder.<state-dict key>", in
float32 (integer buffers such as BatchNorm's step counter keep their dtype),
and the metadata entries "views" = JSON {view: owner view} naming which encoder
each view of the model ran through (views that share an encoder are stored once) and
"encoders" = JSON {owner view: timm recipe}, what rebuilds each image encoder in plain
timm with the same outputs (timm_encoders.timm_recipe; the state-dict keys are timm's).
A file of bare encoder keys (no "<view>.encoder." prefix) loads too.

`load_pretrained_weights(encoder, path)` reads a state dict as timm and torchgeo ship them
(e.g. SSL4EO-S12 Sentinel-2 weights: .pth / .pt / .ckpt read with torch.load(weights_only=True),
or .safetensors, from a local path; nothing is fetched): it unwraps a "state_dict" /
"model" entry and a prefix that all keys share ("module.", "backbone.", MoCo's
"encoder_q.", ...), drops a classifier the encoder lacks ("fc.*", "head.*") and loads the
rest all or nothing. `load_view_weights(model, views)` does so for every view whose
config names `weights`.
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

from pimc_dist.models.timm_encoders import timm_recipe
from pimc_dist.models.two_tower import ContrastiveModel
from pimc_dist.models.vit import resize_pos_embed

_PREFIXED_KEY = re.compile(r"^([^.]+)\.encoder\.(.+)$")
_MAX_LISTED = 5
_WRAPPER_KEYS = ("state_dict", "model", "module")  # checkpoint dicts that hold the weights
_KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "encoder_q.")  # q: MoCo
_CLASSIFIERS = ("fc.", "head.", "classifier.")  # timm's classifier names


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


def encoder_recipes(model: ContrastiveModel) -> dict[str, dict]:
    """{owner view: timm recipe} of the model's image encoders (timm_encoders.timm_recipe)."""
    recipes = {view: timm_recipe(encoder) for view, encoder in model.encoders.items()}
    return {view: recipe for view, recipe in recipes.items() if recipe is not None}


def save_encoder_weights(
    state: Mapping[str, torch.Tensor],
    path: os.PathLike | str,
    views: Mapping[str, str] | None = None,
    recipes: Mapping[str, Mapping] | None = None,
) -> Path:
    """Write `state` (from export_encoder_state) to a safetensors file, atomically.

    `views` ({view: owner view}, e.g. `{v: k[0] for v, k in model.views.items()}`) and
    `recipes` (from encoder_recipes) go into the file's metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "views": json.dumps(dict(views or {})),
        "encoders": json.dumps(dict(recipes or {})),
    }
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
            raise WeightsError(
                path,
                f"has no '{view}.encoder.' keys for view {view!r}: its keys are bare "
                f"({_listed(sorted(tensors))}), as in a single encoder's state dict",
            )
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
    _load_fitting(module, _select_view(path, tensors, view), path)


def load_pretrained_weights(module: nn.Module, path: os.PathLike | str) -> None:
    """Start an encoder from a timm / torchgeo state dict file (module docstring).

    Raises FileNotFoundError, or WeightsError naming the file and the missing, unexpected
    or misshapen keys (with both shapes); the module is untouched then.
    """
    path = Path(path)
    state = _read_state_dict(path)
    expected = module.state_dict()
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in expected
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = {
        k: v
        for k, v in state.items()
        if k in expected or not any(k.startswith(c) for c in _CLASSIFIERS)
    }
    _load_fitting(module, state, path)


def load_view_weights(model: ContrastiveModel, views: Mapping[str, Mapping]) -> list[str]:
    """Start the encoder of every view whose config (`views`, as build_model takes them)
    names `weights` from that file; returns those views. On a model on the meta device
    this only checks that each file fits. Raises ValueError naming the view and the file."""
    started = []
    for view, spec in views.items():
        path = (spec or {}).get("weights")
        if not path:
            continue
        if view not in model.encoders:
            raise ValueError(
                f"view {view!r}: weights applies to a view with an encoder of its own "
                f"(those are {sorted(model.encoders)})"
            )
        try:
            load_pretrained_weights(model.encoders[view], path)
        except (WeightsError, FileNotFoundError) as err:
            raise ValueError(f"view {view!r}: weights: {err}") from None
        started.append(view)
    return started


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a torch.save'd state dict (read with
    weights_only=True: tensors and plain containers, no code), unwrapped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return read_weights_file(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and "unsupported global" errors
        raise WeightsError(
            path, f"not a readable torch state dict file (truncated, corrupt or code?): {err}"
        ) from None
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(path, f"holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(path, "holds no tensors")
    return tensors


def _load_fitting(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load `state` into `module` if it fits key for key and shape for shape (a ViT's
    position embeddings are resized to its patch grid; BatchNorm step counters may be
    absent); else WeightsError and the module is untouched."""
    expected = module.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
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
        if key not in state:
            continue
        value = state[key]
        if key == "pos_embed" and value.ndim == 3 and value.shape != target.shape:
            value = _resized_pos_embed(module, value, target, path)
        if value.shape != target.shape:
            wrong_shapes.append(f"{key}: file {tuple(value.shape)}, model {tuple(target.shape)}")
        converted[key] = value.to(target.dtype)
    if wrong_shapes:
        hints = _first_conv_hints(state, expected)
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise WeightsError(path, f"wrong shapes: {_listed(wrong_shapes)}{hint}")
    if not any(t.is_meta for t in expected.values()):  # a meta module was only checked
        module.load_state_dict(converted, strict=False)


def _first_conv_hints(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> list[str]:
    """What to change when the first convolution (a ResNet's conv1, a ViT's patch embedding)
    takes another band count or has another kernel than the file's."""
    for key in ("conv1.weight", "patch_embed.proj.weight"):
        file, model = state.get(key), expected.get(key)
        if file is None or model is None or file.ndim != 4 or model.ndim != 4:
            continue
        hints = []
        if file.shape[1] != model.shape[1]:
            hints.append(f"the file's first convolution takes {file.shape[1]} bands: set in_chans")
        if file.shape[2:] != model.shape[2:] and key == "conv1.weight":
            stem = "small_input: false" if file.shape[-1] == 7 else "small_input: true"
            hints.append(f"its stem is {file.shape[-2]}x{file.shape[-1]}: set {stem}")
        elif file.shape[2:] != model.shape[2:]:
            hints.append(f"its patch size is {file.shape[-1]}: set patch_size")
        return hints
    return []


def _resized_pos_embed(
    module: nn.Module, value: torch.Tensor, target: torch.Tensor, path: Path
) -> torch.Tensor:
    """(1, 1 + N, D) position embeddings (class token first) of another square patch grid,
    resized to the module's; returned unchanged when the layout is another."""
    patch_embed = getattr(module, "patch_embed", None)
    grid = getattr(module, "grid", None) or getattr(patch_embed, "grid_size", None)
    if grid is None or value.shape[-1] != target.shape[-1]:
        return value
    if target.shape[1] != 1 + grid[0] * grid[1]:
        return value  # another prefix layout (registers, no class token): a shape error
    try:
        return resize_pos_embed(value, tuple(grid))
    except ValueError as err:
        raise WeightsError(path, f"pos_embed: {err}") from None
