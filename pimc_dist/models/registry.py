"""Build encoders, heads and the contrastive model by name from plain dicts (the YAML config).

Encoder names: "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base",
"vit_large", "vit_huge", "vit_giant"; a ViT name may carry its patch size as a
suffix ("vit_large_p8"). Without one, `default_patch_size(img_size)` picks it.
1D encoders of index series (the `series` view, models/series.py): "cnn1d_small",
"resnet1d18"; they take `in_chans` (the number of indices) and `seq_len` (the grid
length) instead of `img_size`. Any other name is a timm model ("convnext_tiny",
"vit_base_patch14_dinov2"; models/timm_encoders.py, the optional `timm` extra), built with
the view's in_chans, img_size, patch_size, pool and options, and `timm_args`.

A model config, as `build_model` takes it::

    views:
      rp:  {encoder: vit_small, in_chans: 3, img_size: 48, pool: mean}
      rsi: {encoder: resnet18, in_chans: 10, img_size: 32}
      # or, without crops: series: {encoder: cnn1d_small, in_chans: 3, seq_len: 36}
    head: {out_dim: 128, depth: 2, hidden_dim: 2048, norm: ln}

A view may instead reuse another view's network: `{share: s2}` runs the same
encoder and head (a second augmentation of "s2"); `{share_encoder: s2}` runs
the same encoder with a head of its own (optionally `head: {...}` overrides).
Any other key of a view goes to the encoder (ResNet: small_input, width,
zero_init_residual, grad_checkpointing; ViT: pool, drop_path_rate, grad_checkpointing, embed_dim,
depth, num_heads, mlp_ratio, qkv_bias; 1D: width, and positions / zero_init_residual; timm:
keyword arguments of timm.create_model), except `weights`: a local timm / torchgeo weights
file that `load_view_weights` (weights.py) starts the encoder from after the build.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from pimc_dist.models.heads import ProjectionHead
from pimc_dist.models.resnet import RESNET_LAYERS, ResNet
from pimc_dist.models.series import SERIES_ENCODERS, build_series_encoder
from pimc_dist.models.timm_encoders import TIMM_HINT, build_timm_encoder, import_timm
from pimc_dist.models.two_tower import ContrastiveModel
from pimc_dist.models.vit import VIT_SIZES, VisionTransformer, default_patch_size

ENCODER_NAMES: tuple[str, ...] = (
    tuple(RESNET_LAYERS) + tuple(f"vit_{s}" for s in VIT_SIZES) + SERIES_ENCODERS
)

RESNET_OPTIONS = frozenset({"small_input", "width", "zero_init_residual", "grad_checkpointing"})
VIT_OPTIONS = frozenset(
    {
        "pool",
        "drop_path_rate",
        "grad_checkpointing",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
    }
)
HEAD_OPTIONS = frozenset({"out_dim", "depth", "hidden_dim", "norm", "act"})
VIEW_KEYS = frozenset({"encoder", "in_chans", "img_size", "seq_len", "patch_size", "head"})

_VIT_NAME = re.compile(r"^vit_([a-z]+)(?:_p(\d+))?$")


def _unknown_name(name: str, timm_missing: bool) -> ValueError:
    timm_part = TIMM_HINT if timm_missing else "nor is it a timm model (timm.list_models())"
    return ValueError(
        f"unknown encoder {name!r}; ours: {', '.join(ENCODER_NAMES)} "
        f"(a ViT name may end in _p<patch size>, e.g. vit_base_p8); {timm_part}"
    )


def is_own_encoder(name: str) -> bool:
    """Whether `name` is one of ours (a ResNet, ViT or 1D short name); any other is timm's."""
    match = _VIT_NAME.match(name)
    return (
        name in RESNET_LAYERS
        or name in SERIES_ENCODERS
        or (match is not None and match.group(1) in VIT_SIZES)
    )


def _check_options(what: str, given: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {what}; known: {', '.join(sorted(allowed))}"
        )


def build_encoder(
    name: str,
    *,
    in_chans: int,
    img_size: int | None = None,
    patch_size: int | None = None,
    seq_len: int | None = None,
    **kw: Any,
) -> nn.Module:
    """Build the encoder `name` for `in_chans` x `img_size` x `img_size` inputs, or for a 1D
    encoder (`SERIES_ENCODERS`) `in_chans` x `seq_len` series.

    Every encoder has `out_dim` and maps (B, in_chans, H, W), or (B, in_chans, T), to
    (B, out_dim). Raises ValueError for an unknown name or option or a missing size.
    """
    if name in SERIES_ENCODERS:
        if seq_len is None:
            raise ValueError(f"{name}: a 1D series encoder needs seq_len (the series length)")
        if img_size is not None or patch_size is not None:
            raise ValueError(
                f"{name}: a 1D series encoder takes seq_len, not img_size or patch_size"
            )
        return build_series_encoder(name, in_chans=in_chans, seq_len=seq_len, **kw)
    if seq_len is not None:
        raise ValueError(f"{name}: seq_len applies to 1D series encoders only ({SERIES_ENCODERS})")
    if img_size is None:
        raise ValueError(f"{name}: needs img_size")
    if name in RESNET_LAYERS:
        _check_options(name, kw, RESNET_OPTIONS)
        if patch_size is not None:
            raise ValueError(f"{name}: patch_size applies to ViT encoders only")
        block, layers = RESNET_LAYERS[name]
        return ResNet(block, layers, in_chans=in_chans, img_size=img_size, **kw)

    if not is_own_encoder(name):
        timm = import_timm()
        if timm is None or not timm.is_model(name):
            raise _unknown_name(name, timm_missing=timm is None)
        return build_timm_encoder(
            name, in_chans=in_chans, img_size=img_size, patch_size=patch_size, **kw
        )
    _check_options(name, kw, VIT_OPTIONS)
    match = _VIT_NAME.match(name)
    size, name_patch = VIT_SIZES[match.group(1)], match.group(2)
    if name_patch is not None:
        if patch_size is not None and patch_size != int(name_patch):
            raise ValueError(
                f"{name}: patch_size {patch_size} contradicts the name's _p{name_patch}"
            )
        patch_size = int(name_patch)
    if patch_size is None:
        patch_size = default_patch_size(img_size)
    shape = {
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "num_heads": size.num_heads,
        "mlp_ratio": size.mlp_ratio,
    }
    shape.update(kw)
    return VisionTransformer(in_chans=in_chans, img_size=img_size, patch_size=patch_size, **shape)


def build_head(in_dim: int, **cfg: Any) -> ProjectionHead:
    """Projection head from a config dict (out_dim, depth, hidden_dim, norm, act)."""
    _check_options("the projection head", cfg, HEAD_OPTIONS)
    return ProjectionHead(in_dim, **cfg)


def build_model(
    views: Mapping[str, Mapping[str, Any]],
    head: Mapping[str, Any] | None = None,
    *,
    shared_encoder: bool = False,
    grad_checkpointing: bool = False,
    init_temperature: float = 0.07,
    learn_logit_scale: bool = True,
    init_logit_bias: float | None = None,
) -> ContrastiveModel:
    """ContrastiveModel from per-view dicts and one head dict (see the module docstring).

    Keys whose value is None count as absent (structured configs carry every field).
    `shared_encoder`: every view runs the first view's encoder (their encoder settings
    must agree), each with its own head. `grad_checkpointing`: turn activation
    checkpointing on for every encoder (ViT blocks, ResNet stages). The logit scale starts at
    log(1 / init_temperature).
    """
    head_cfg = {k: v for k, v in dict(head or {}).items() if v is not None}
    views = {v: {k: x for k, x in dict(s).items() if x is not None} for v, s in views.items()}
    if shared_encoder:
        views = _share_first_encoder(views)
    if grad_checkpointing:
        for spec in views.values():
            if "encoder" in spec:
                spec.setdefault("grad_checkpointing", True)
    encoders: dict[str, nn.Module] = {}
    heads: dict[str, nn.Module] = {}
    view_keys: dict[str, tuple[str, str]] = {}
    owners = {v: s for v, s in views.items() if "share" not in s and "share_encoder" not in s}

    for view, spec in owners.items():
        spec = dict(spec)
        if "encoder" not in spec:
            raise ValueError(f"view {view!r}: needs 'encoder' (or 'share' / 'share_encoder')")
        size_key = "seq_len" if spec["encoder"] in SERIES_ENCODERS else "img_size"
        missing = [k for k in ("in_chans", size_key) if k not in spec]
        if missing:
            raise ValueError(f"view {view!r}: missing {', '.join(missing)}")
        name = spec.pop("encoder")
        spec.pop("weights", None)  # read by load_view_weights once the model is built
        in_chans = spec.pop("in_chans")
        sizes = {k: spec.pop(k) for k in ("img_size", "seq_len", "patch_size") if k in spec}
        view_head = {**head_cfg, **dict(spec.pop("head", None) or {})}
        try:
            encoders[view] = build_encoder(name, in_chans=in_chans, **sizes, **spec)
            heads[view] = build_head(encoders[view].out_dim, **view_head)
        except ValueError as err:
            raise ValueError(f"view {view!r}: {err}") from None
        view_keys[view] = (view, view)

    for view, spec in views.items():
        if view in owners:
            continue
        spec = dict(spec)
        kind = "share" if "share" in spec else "share_encoder"
        target = spec.pop(kind)
        if target not in owners:
            raise ValueError(
                f"view {view!r}: {kind} target {target!r} is not a view with its own encoder "
                f"(those are {sorted(owners)})"
            )
        allowed = set() if kind == "share" else {"head"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ValueError(
                f"view {view!r}: {kind} allows no other key than {sorted(allowed)}, got {extra}"
            )
        if kind == "share":
            view_keys[view] = (target, target)
        else:
            view_head = {**head_cfg, **dict(spec.get("head") or {})}
            try:
                heads[view] = build_head(encoders[target].out_dim, **view_head)
            except ValueError as err:
                raise ValueError(f"view {view!r}: {err}") from None
            view_keys[view] = (target, view)

    return ContrastiveModel(
        encoders,
        heads,
        view_keys,
        init_logit_scale=math.log(1 / init_temperature),
        learn_logit_scale=learn_logit_scale,
        init_logit_bias=init_logit_bias,
    )


def compile_encoders(model: ContrastiveModel, **options: Any) -> ContrastiveModel:
    """`torch.compile` every encoder's forward in place (`train.compile`); returns `model`.

    `nn.Module.compile` keeps the module and its state-dict keys as they are (no
    `_orig_mod.` prefix), so checkpoints and exported weights do not change. Heads are
    left eager: two or three small matmuls, not worth a graph. Compilation happens at
    the first forward; `options` go to `torch.compile`.
    """
    for encoder in model.encoders.values():
        encoder.compile(**options)
    return model


def _share_first_encoder(views: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rewrite views so that all run the first view's encoder, each keeping its head."""
    names = list(views)
    first = names[0]
    encoder_spec = {k: v for k, v in views[first].items() if k != "head"}
    out = {first: views[first]}
    for view in names[1:]:
        spec = views[view]
        if "share" in spec:
            out[view] = spec
            continue
        mine = {k: v for k, v in spec.items() if k not in ("head", "share_encoder")}
        if mine and mine != encoder_spec:
            raise ValueError(
                f"view {view!r}: shared_encoder needs the same encoder settings as view "
                f"{first!r} ({encoder_spec}), got {mine}"
            )
        out[view] = {"share_encoder": first, **({"head": spec["head"]} if "head" in spec else {})}
    return out
