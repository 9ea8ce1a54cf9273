"""Downstream models: pretrained (or random-init) encoders per input view, raw-input branches,
a 1D CNN baseline, and a linear head on their concatenated features.

`finetune.ckpt` is a pretraining run folder (its `encoders.safetensors` and
`config.yaml`, which defines the encoders) or an encoders file (its folder's
config.yaml, else the fine-tuning config's `model.views`, defines them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from pimc_dist import config as config_lib
from pimc_dist.encoders import find_weights
from pimc_dist.eval.tasks import ENCODED_VIEWS, SplitData, Task, TaskError
from pimc_dist.models import SeriesCNN, build_encoder, is_own_encoder, load_encoder_weights


class FinetuneError(RuntimeError):
    """The run cannot go on (bad checkpoint, no data for a split, ...); the message says why."""


@dataclass
class EncoderSource:
    """Where encoder weights come from and the architecture of each pretrained view."""

    weights: Path | None  # None: random init
    views: dict[str, dict[str, Any]]  # view -> model.views entry (None fields dropped)
    shared_encoder: bool
    arch_from: str  # the config file (or "finetune config") that defined the views


def _plain_views(model_cfg: Any) -> dict[str, dict[str, Any]]:
    views = OmegaConf.to_container(model_cfg.views, resolve=True) or {}
    return {v: {k: x for k, x in (s or {}).items() if x is not None} for v, s in views.items()}


def resolve_encoder_source(cfg: Any) -> EncoderSource:
    """Weights file and encoder architecture for `finetune.ckpt` / `finetune.init`."""
    ft = cfg.finetune
    ckpt = Path(ft.ckpt) if ft.ckpt else None
    weights = None
    run_config = None
    if ckpt is not None:
        try:
            weights = find_weights(ckpt)
        except FileNotFoundError as exc:
            raise FinetuneError(f"finetune.ckpt: {exc}") from None
        candidate = weights.parent / config_lib.CONFIG_FILE
        if candidate.is_file():
            run_config = config_lib.from_yaml_text(candidate.read_text(), str(candidate))
    elif ft.init == "pretrained":
        raise FinetuneError(
            "finetune.ckpt is required with finetune.init=pretrained (a pretraining run folder "
            "or its encoders.safetensors); use finetune.init=random for the random-init baseline"
        )
    if run_config is not None and run_config.model.views:
        views = _plain_views(run_config.model)
        shared = bool(run_config.model.shared_encoder)
        arch_from = str(weights.parent / config_lib.CONFIG_FILE)
    else:
        views = _plain_views(cfg.model)
        shared = bool(cfg.model.shared_encoder)
        arch_from = "model.views of the fine-tuning config"
    return EncoderSource(
        weights=weights if ft.init == "pretrained" else None,
        views=views,
        shared_encoder=shared,
        arch_from=arch_from,
    )


def owner_view(source: EncoderSource, view: str) -> str:
    """The pretrained view whose encoder `view` runs through (following share keys)."""
    if view not in source.views:
        raise FinetuneError(
            f"no encoder for view '{view}' in {source.arch_from} (it has {sorted(source.views)}); "
            "map it with finetune.encoder_views (e.g. image: rsi)"
        )
    if source.shared_encoder:
        return next(iter(source.views))
    spec = source.views[view]
    for key in ("share", "share_encoder"):
        if key in spec:
            return owner_view(source, spec[key])
    return view


def build_view_encoder(
    source: EncoderSource, view: str, in_chans: int, height: int, width: int
) -> tuple[nn.Module, str]:
    """The encoder of pretrained `view` for inputs (in_chans, height, width); weights loaded if any."""
    owner = owner_view(source, view)
    spec = dict(source.views[owner])
    name = spec.pop("encoder", None)
    if name is None:
        raise FinetuneError(f"view '{owner}' in {source.arch_from} names no encoder")
    want_chans = int(spec.pop("in_chans"))
    img_size = int(spec.pop("img_size"))
    patch_size = spec.pop("patch_size", None)
    # weights: a user's file started pretraining; the pretrained weights below (or none:
    # random init) take its place.
    for key in ("head", "share", "share_encoder", "weights"):
        spec.pop(key, None)
    if in_chans != want_chans:
        raise TaskError(
            f"the data has {in_chans} channels for this input, the '{owner}' encoder takes "
            f"{want_chans}: pick bands with finetune.input_bands"
        )
    if view == "rp" and (height, width) != (img_size, img_size):
        # Another plot size is another time grid: the encoder never saw such plots.
        print(
            f"warning: the shards' recurrence plots are {height} x {width}, the '{owner}' "
            f"encoder was pretrained on {img_size} x {img_size} plots: shard the evaluation "
            "data with the pretraining's grid (data.grid_length, data.rp_size), or its scores "
            "say little about the pretraining",
            file=sys.stderr,
        )
    own = is_own_encoder(name)
    if own and name.startswith("vit"):
        if height != width:
            raise TaskError(f"a ViT encoder needs square inputs, got {height} x {width}")
        img_size = height  # position embeddings are resized to this grid when loading
    elif not own and height == width:
        img_size = height  # a timm model built for the data's size (a ViT's grid is resized)
    try:
        encoder = build_encoder(
            name, in_chans=in_chans, img_size=img_size, patch_size=patch_size, **spec
        )
    except ValueError as exc:
        raise FinetuneError(
            f"cannot build the '{owner}' encoder ({source.arch_from}): {exc}"
        ) from exc
    if source.weights is not None:
        load_encoder_weights(encoder, source.weights, view=owner)
    return encoder, owner


class Flatten(nn.Module):
    """Raw inputs as features: (B, ...) -> (B, prod(...))."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class FeatureNorm(nn.BatchNorm1d):
    """Per-feature BatchNorm without affine parameters; a batch of one uses the running stats
    (a 1 % label regime can leave a single labelled sample)."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False)
        return super().forward(x)


class DownstreamModel(nn.Module):
    """Encoders (and raw-input branches) per input view, concatenated, then a linear head.

    `features(batch)` is what a linear probe sees; `forward(batch)` adds the head,
    behind a per-feature BatchNorm without affine parameters (as MAE's linear probe),
    since encoder features and raw values differ in scale.
    """

    def __init__(self, branches: dict[str, nn.Module], out_dim: int):
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        self.feature_dim = sum(int(b.out_dim) for b in branches.values())
        self.norm = FeatureNorm(self.feature_dim)
        self.head = nn.Linear(self.feature_dim, out_dim)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([branch(batch[v]) for v, branch in self.branches.items()], dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Normalised in float32, then in the head's dtype (bfloat16 under DeepSpeed bf16).
        return self.head(self.norm(self.features(batch).float()).to(self.head.weight.dtype))


def build_downstream_model(
    cfg: Any, task: Task, inputs: list[str], example: SplitData, out_dim: int, source: EncoderSource
) -> tuple[DownstreamModel, dict[str, str]]:
    """The model for `inputs` (shapes from `example`), and input view -> pretrained view used."""
    ft = cfg.finetune
    torch.manual_seed(int(cfg.train.seed))
    branches: dict[str, nn.Module] = {}
    used: dict[str, str] = {}
    for view in inputs:
        shape = example.inputs[view].shape[1:]
        if view in ENCODED_VIEWS:
            if len(shape) != 3:
                raise TaskError(f"input '{view}' has shape {shape}, an encoder needs (C, H, W)")
            pretrained_view = str(ft.encoder_views.get(view, view))
            branches[view], used[view] = build_view_encoder(source, pretrained_view, *shape)
        elif ft.protocol == "cnn1d":
            # The 1D CNN baseline: the `cnn1d_small` series encoder, pooled to 4 positions.
            branches[view] = SeriesCNN(int(shape[0]), positions=4)
        else:
            branches[view] = Flatten(int(np.prod(shape)))
    return DownstreamModel(branches, out_dim), used
