"""Pretrained encoders from Python: `load_encoder(run folder or encoders file, view)`.

A pretraining run folder holds `encoders.safetensors` (every encoder's fp32 weights, keyed
"<view>.encoder.<key>", see `pimc_dist.models.weights`) and `config.yaml` (the resolved config:
`model.views` defines each encoder and its input, `loader.shards` the shard set whose manifest
holds the per-channel mean/std the loader normalised with). `load_encoder` rebuilds the encoder
of one view from both, loads its weights and returns it in eval mode with what its input must
be (`EncoderInput`: channels, size, normalisation).

    enc = load_encoder("runs/quickstart/pretrain", view="rp")
    embedding = enc(plots)  # (N, 3, S, S) uint8 plots -> (N, D) float32, normalised as in training
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from pimc_dist import config as config_lib
from pimc_dist.models import WeightsError, build_model, load_encoder_weights
from pimc_dist.shardset import (
    MANIFEST_NAME,
    ShardError,
    normalize_views,
    read_manifest,
    view_stats_arrays,
)

WEIGHTS_FILE = "encoders.safetensors"
# What the loader divides plots by when the shard set has no plot statistics (plots made on the
# fly from stored series): the same constants as pimc_dist.shardset's batch stage.
_RP_FALLBACK_STATS = (127.5, 127.5)


class EncoderLoadError(ValueError):
    """A run folder or encoders file cannot give the encoder asked for; the message says why."""


@dataclass(frozen=True)
class EncoderInput:
    """What an encoder's input must be: (N, channels, size, size), normalised per channel.

    `mean`/`std` are the training loader's per-channel statistics (None: the loader fed the
    stored values unnormalised, as float). `stored_as` is the dtype the shards keep the view
    in (uint8 for recurrence plots, int16/uint16/float for crops).
    """

    view: str
    channels: int
    size: int  # the image side; for a 1D series encoder the series length (inputs (N, C, T))
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    stored_as: str | None = None
    series: bool = False  # a 1D series encoder's input: (N, channels, size) index series

    def normalize(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float32 (x - mean) / std per channel of a (N, C, H, W) batch (a series view:
        (N, C, T)), as the training loader."""
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        ndim = 3 if self.series else 4
        if t.ndim != ndim or t.shape[1] != self.channels:
            shape = "T" if ndim == 3 else "H, W"
            raise ValueError(
                f"view {self.view!r} takes (N, {self.channels}, {shape}) inputs, got {tuple(t.shape)}"
            )
        if self.mean is None or self.std is None:
            return t.to(torch.float32)
        stats = (np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32))
        return normalize_views({self.view: t}, {self.view: stats})[self.view]


@dataclass
class LoadedEncoder:
    """A pretrained encoder in eval mode and the input it expects; call it on a raw batch."""

    module: nn.Module
    input: EncoderInput
    owner: str  # the view whose weights it holds (differs from input.view for shared encoders)
    weights: Path

    @property
    def out_dim(self) -> int:
        return int(self.module.out_dim)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embeddings (N, out_dim) of a raw batch (N, C, H, W): normalised, no gradient."""
        batch = self.input.normalize(x).to(self.device)
        with torch.no_grad():
            return self.module(batch)


def find_weights(path: Path) -> Path:
    """The encoders file of a pretraining run folder (its `encoders.safetensors`), or `path`
    itself when it is a file; FileNotFoundError, saying which, when there is none."""
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path} holds no {WEIGHTS_FILE} (did the pretraining finish? it exports the "
                "encoders at the end)"
            )
        return weights
    if path.is_file():
        return path
    raise FileNotFoundError(f"{path} does not exist (no run folder or encoders file)")


def _weights_and_config(path: Path) -> tuple[Path, Path]:
    weights = find_weights(path)
    run_config = weights.parent / config_lib.CONFIG_FILE
    if not run_config.is_file():
        raise FileNotFoundError(
            f"{run_config}: not found; the run's config.yaml, beside {weights.name}, defines "
            "the encoders (model.views) and their inputs"
        )
    return weights, run_config


def _manifest_dir(shards: str, run_dir: Path) -> Path | None:
    """The shard set `shards` as given, or relative to the run folder's ancestors: a relative
    `loader.shards` was relative to where the run was launched, usually above `runs/<name>`."""
    candidate = Path(shards)
    places = (
        [candidate]
        if candidate.is_absolute()
        else [candidate, *(p / candidate for p in run_dir.resolve().parents)]
    )
    for place in places:
        if (place / MANIFEST_NAME).is_file():
            return place
    return None


def _normalisation(
    cfg: Any, view: str, run_dir: Path, shards: str | os.PathLike | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, str | None]:
    """(mean, std, stored dtype) of `view` as the run's loader saw it."""
    source = str(shards) if shards is not None else str(cfg.loader.shards)
    folder = _manifest_dir(source, run_dir)
    if folder is None:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} for loader.shards={source!r} of {run_dir / config_lib.CONFIG_FILE} "
            f"(tried it from here and from the run folder's parents): its per-channel statistics "
            f"normalise the inputs; pass shards= the shard set's folder"
        )
    try:
        manifest = read_manifest(folder)
    except ShardError as exc:
        raise EncoderLoadError(f"cannot read the statistics of view {view!r}: {exc}") from exc
    spec = manifest.views.get(view)
    stored = spec.dtype if spec is not None else None
    if not cfg.loader.normalize:
        return None, None, stored
    stats = view_stats_arrays(manifest, view)
    if stats is None and view == "rp" and cfg.loader.rp_on_the_fly != "off":
        mean, std = _RP_FALLBACK_STATS
        channels = int(cfg.model.views[view].in_chans or 3)
        stats = (np.full(channels, mean, np.float32), np.full(channels, std, np.float32))
        stored = "uint8"  # plots made from the stored series, as uint8
    if stats is None:
        return None, None, stored
    return tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1]), stored


def load_encoder(
    path: str | os.PathLike,
    view: str,
    *,
    device: str | torch.device = "cpu",
    shards: str | os.PathLike | None = None,
) -> LoadedEncoder:
    """The pretrained encoder of `view` from a run folder or its `encoders.safetensors`.

    The architecture and input come from the run's `config.yaml` (beside the weights); the
    normalisation from the manifest of its `loader.shards` (or of `shards`, a shard set
    folder, when the run's shards have moved). Returns the module in eval mode on `device`
    with its `EncoderInput`. Raises FileNotFoundError or EncoderLoadError (naming the file).
    """
    weights, config_path = _weights_and_config(Path(path))
    cfg = config_lib.from_yaml_text(config_path.read_text(), str(config_path))
    views = OmegaConf.to_container(cfg.model.views, resolve=True) or {}
    if view not in views:
        raise EncoderLoadError(
            f"{config_path}: no view {view!r} in model.views; it has {sorted(views)}"
        )
    try:
        model = build_model(
            views,
            head=OmegaConf.to_container(cfg.model.head),
            shared_encoder=cfg.model.shared_encoder,
        )
    except ValueError as exc:
        raise EncoderLoadError(f"{config_path}: cannot build the encoders: {exc}") from exc
    owner = model.views[view][0]
    module = model.encoder(view)
    try:
        load_encoder_weights(module, weights, view=owner)
    except WeightsError as exc:
        raise EncoderLoadError(f"{exc} (architecture from {config_path})") from exc
    spec = {k: v for k, v in views[owner].items() if v is not None}
    mean, std, stored = _normalisation(cfg, view, weights.parent, shards)
    spec_input = EncoderInput(
        view=view,
        channels=int(spec["in_chans"]),
        size=int(spec.get("img_size") or spec["seq_len"]),
        series="seq_len" in spec and "img_size" not in spec,
        mean=mean,
        std=std,
        stored_as=stored,
    )
    return LoadedEncoder(module.to(device).eval(), spec_input, owner, weights)
