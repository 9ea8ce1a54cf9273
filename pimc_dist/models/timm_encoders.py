"""Encoders from timm (the optional `timm` extra), and the timm recipe of our own encoders.

`model.views.<view>.encoder` takes our short names (registry.py), built by our own
ResNet and ViT, or any other timm model name ("convnext_tiny", "vit_base_patch14_dinov2",
"resnet101", ...), built by `timm.create_model(name, pretrained=False, num_classes=0,
in_chans=..., img_size=..., patch_size=..., **options, **timm_args)`: nothing is ever
downloaded, the output is the pooled feature vector (B, out_dim).

Our ResNet and ViT are timm's models with timm's parameter names. `timm_recipe(encoder)`
says how plain timm rebuilds one with the same outputs: the timm name, the keyword
arguments, and the `stem` that replaces a ResNet's first convolution ("small": a 3x3
stride-1 convolution and no max pool, our default for inputs of at most 64 px; "7x7": the
ImageNet stem at another width than 64, in place of the deep stem timm builds for it;
None: timm's own). Exports store it (weights.py), `create_timm_model(recipe)` builds it.

Why our short names keep our own modules (docs/usage.md#encoders): a training step of
timm's ResNet-18 and ViT-S/8 takes the same time and memory as ours, but timm imports
torchvision at import time, and torchvision's wheels are built for one torch release
each: beside a CPU-only torch they fail to import, so a hard timm dependency would force
a multi-GB CUDA torch onto every install (and could replace a cluster's own torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from pimc_dist.models.norm import use_mixed_precision_batchnorm
from pimc_dist.models.resnet import RESNET_LAYERS, ResNet
from pimc_dist.models.vit import VIT_SIZES, VisionTransformer

TIMM_HINT = (
    "any other name is taken as a timm model, which needs timm: pip install 'pimc_dist[timm]' "
    "(timm imports torchvision, so install the torchvision built for your torch first)"
)
POOLS = {"cls": "token", "mean": "avg"}  # our `pool` -> timm's `global_pool`


def import_timm() -> Any:
    """The timm module, or None when it is not installed (or its torchvision is broken)."""
    try:
        return importlib.import_module("timm")
    except (ImportError, RuntimeError):  # a torchvision of another torch raises RuntimeError
        return None


def build_timm_encoder(
    name: str,
    *,
    in_chans: int,
    img_size: int,
    patch_size: int | None = None,
    grad_checkpointing: bool = False,
    pool: str | None = None,
    timm_args: Mapping[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """The timm model `name` as an encoder for `in_chans` x `img_size` x `img_size` inputs.

    `pool` (cls | mean) becomes timm's `global_pool`; `options` (e.g. drop_path_rate) and
    then `timm_args` go to `timm.create_model` as they are. The model's plain BatchNorms
    become models/norm.py's (DeepSpeed bf16, checkpoint recomputation); it gains `out_dim`,
    `in_chans`, `img_size` and `timm_recipe`. Raises ValueError when timm is missing, the
    name is not a timm model or timm refuses an argument.
    """
    timm = import_timm()
    if timm is None:
        raise ValueError(f"unknown encoder {name!r}; {TIMM_HINT}")
    if not timm.is_model(name):
        raise ValueError(
            f"unknown encoder {name!r}: not ours and not a timm model (timm.list_models())"
        )
    kwargs: dict[str, Any] = {"in_chans": in_chans, "num_classes": 0, "img_size": img_size}
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if pool is not None:
        if pool not in POOLS:
            raise ValueError(f"{name}: unknown pool {pool!r}; known: {', '.join(POOLS)}")
        kwargs["global_pool"] = POOLS[pool]
    kwargs.update(options)
    kwargs.update(timm_args or {})
    model, kwargs = _create(timm, name, kwargs)
    use_mixed_precision_batchnorm(model)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.out_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model.in_chans, model.img_size = in_chans, img_size
    model.timm_recipe = {"timm": name, "kwargs": kwargs, "stem": None}
    return model


def _create(timm: Any, name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """`timm.create_model(name, pretrained=False, **kwargs)` and the arguments it took: a
    model without an `img_size` argument (a CNN) is built without it."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs), kwargs
    except TypeError as err:
        if "img_size" not in str(err):
            raise ValueError(f"{name}: timm refused the arguments {kwargs}: {err}") from None
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    try:
        return timm.create_model(name, pretrained=False, **kwargs), kwargs
    except TypeError as err:
        raise ValueError(f"{name}: timm refused the arguments {kwargs}: {err}") from None


def timm_recipe(encoder: nn.Module) -> dict[str, Any] | None:
    """{"timm": name, "kwargs": {...}, "stem": "small" | None}: what rebuilds `encoder` in
    plain timm with the same state-dict keys and outputs; None for a 1D series encoder."""
    recipe = getattr(encoder, "timm_recipe", None)
    if recipe is not None:
        return recipe
    if isinstance(encoder, ResNet):
        return _resnet_recipe(encoder)
    if isinstance(encoder, VisionTransformer):
        return _vit_recipe(encoder)
    return None


def _resnet_recipe(model: ResNet) -> dict[str, Any]:
    layers = [len(stage) for stage in model.stages()]
    block = type(model.layer1[0])
    name = next(n for n, (b, lay) in RESNET_LAYERS.items() if b is block and list(lay) == layers)
    width = model.bn1.num_features
    kwargs: dict[str, Any] = {"in_chans": model.in_chans, "num_classes": 0}
    stem = "small" if model.small_input else None
    if width != 64:
        # timm's single-convolution stem is 64 wide; its deep stem ends in a BatchNorm of
        # 2 x stem_width, which takes ours once its three convolutions become one.
        kwargs.update(
            stem_type="deep", stem_width=width // 2, channels=[width * 2**i for i in range(4)]
        )
        stem = stem or "7x7"
    return {"timm": name, "kwargs": kwargs, "stem": stem}


def _vit_recipe(model: VisionTransformer) -> dict[str, Any]:
    shape = (model.embed_dim, model.depth, model.num_heads)
    size = next(
        (s for s, v in VIT_SIZES.items() if (v.embed_dim, v.depth, v.num_heads) == shape), "base"
    )
    kwargs = {
        "in_chans": model.in_chans,
        "img_size": model.img_size,
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_hidden_dim / model.embed_dim,
        "qkv_bias": model.blocks[0].attn.qkv.bias is not None,
        "global_pool": POOLS[model.pool],
        "fc_norm": False,  # ours normalises the tokens before pooling them, also for "mean"
        "num_classes": 0,
    }
    return {"timm": f"vit_{size}_patch16_224", "kwargs": kwargs, "stem": None}


def create_timm_model(recipe: Mapping[str, Any]) -> nn.Module:
    """Plain timm's model of a `timm_recipe` (needs timm): `timm.create_model(recipe["timm"],
    **recipe["kwargs"])`, then for stem "small" `conv1 = Conv2d(in_chans, bn1.num_features,
    3, 1, 1, bias=False)` and `maxpool = Identity()`, for "7x7" `conv1 = Conv2d(in_chans,
    bn1.num_features, 7, 2, 3, bias=False)`. Load the exported weights into it."""
    timm = import_timm()
    if timm is None:
        raise ValueError(f"create_timm_model: {TIMM_HINT}")
    model = timm.create_model(recipe["timm"], pretrained=False, **recipe["kwargs"])
    stem, in_chans = recipe.get("stem"), recipe["kwargs"].get("in_chans", 3)
    if stem == "small":
        model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif stem == "7x7":
        model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, 7, 2, 3, bias=False)
    return model
