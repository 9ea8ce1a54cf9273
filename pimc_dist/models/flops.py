"""Analytic forward FLOPs of the encoders, heads and contrastive model (for MFU); timm
encoders other than ours are counted by `FlopCounterMode` on the meta device.

Convention (the one of `torch.utils.flop_counter.FlopCounterMode` and of MFU
reports such as PaLM's): only matrix multiplications, convolutions and the two
attention products (Q K^T and A V) count, one multiply-add = 2 FLOPs; biases,
normalisation, activations, softmax, pooling and residual additions are left
out (they are a few percent at most and not tensor-core work). A training step
costs about 3x the forward FLOPs (backward = 2x forward); activation
checkpointing adds another forward of hardware work, which MFU, by
definition, does not count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pimc_dist.models.heads import ProjectionHead
from pimc_dist.models.registry import build_encoder
from pimc_dist.models.resnet import BasicBlock, Bottleneck, ResNet
from pimc_dist.models.series import ResNet1d, SeriesCNN, series_flops
from pimc_dist.models.timm_encoders import create_timm_model
from pimc_dist.models.two_tower import ContrastiveModel
from pimc_dist.models.vit import VisionTransformer


def conv_flops(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    """FLOPs of one Conv2d on an h x w input, and its output height and width."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    h_out = (h + 2 * ph - kh) // sh + 1
    w_out = (w + 2 * pw - kw) // sw + 1
    macs = h_out * w_out * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return 2 * macs, h_out, w_out


def resnet_flops(model: ResNet, h: int, w: int) -> int:
    """Forward FLOPs of a ResNet encoder for one h x w image."""
    flops, h, w = conv_flops(model.conv1, h, w)
    if isinstance(model.maxpool, nn.MaxPool2d):
        k, s, p = model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    for stage in model.stages():
        for block in stage:
            convs = [block.conv1, block.conv2]
            if isinstance(block, Bottleneck):
                convs.append(block.conv3)
            elif not isinstance(block, BasicBlock):
                raise TypeError(f"no FLOP formula for ResNet block {type(block).__name__}")
            if block.downsample is not None:
                flops += conv_flops(block.downsample[0], h, w)[0]
            bh, bw = h, w
            for conv in convs:
                f, bh, bw = conv_flops(conv, bh, bw)
                flops += f
            h, w = bh, bw
    return flops


def vit_flops(model: VisionTransformer, h: int, w: int) -> int:
    """Forward FLOPs of a ViT encoder for one h x w image."""
    p, d = model.patch_size, model.embed_dim
    n_patches = (h // p) * (w // p)
    t = n_patches + 1  # class token
    patch_embed = 2 * n_patches * model.in_chans * p * p * d
    qkv, proj = 2 * t * d * 3 * d, 2 * t * d * d
    attention = 2 * 2 * t * t * d  # Q K^T and A V, summed over heads
    mlp = 2 * 2 * t * d * model.mlp_hidden_dim
    return patch_embed + model.depth * (qkv + attention + proj + mlp)


def head_flops(head: ProjectionHead) -> int:
    """Forward FLOPs of a projection head for one sample."""
    return sum(
        2 * m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear)
    )


def timm_flops(model: nn.Module, img_size: int) -> int:
    """Forward FLOPs of a timm encoder (timm_encoders.py) for one image, counted by
    `FlopCounterMode` (the convention above) on a copy built on the meta device."""
    with torch.device("meta"):
        copy = create_timm_model(model.timm_recipe)
        x = torch.zeros(1, model.in_chans, img_size, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.eval()(x)
    return int(counter.get_total_flops())


def _encoder_flops(model: nn.Module, img_size: int) -> int:
    """`img_size`: the image side, or a 1D encoder's series length."""
    if isinstance(model, (SeriesCNN, ResNet1d)):
        return series_flops(model, img_size)
    if isinstance(model, VisionTransformer):
        return vit_flops(model, img_size, img_size)
    if isinstance(model, ResNet):
        return resnet_flops(model, img_size, img_size)
    if hasattr(model, "timm_recipe"):
        return timm_flops(model, img_size)
    raise TypeError(f"no FLOP formula for {type(model).__name__}")


def count_flops(
    name_or_model: str | nn.Module,
    in_chans: int | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    batch: int = 1,
    seq_len: int | None = None,
    **kw: Any,
) -> int:
    """Forward FLOPs (multiply-add = 2) for `batch` square images (or series); see the module
    docstring.

    Takes an encoder name (with `in_chans`, `img_size` or a 1D encoder's `seq_len`,
    optional `patch_size` and encoder options in `kw`; the encoder is built on the meta
    device, so no memory is used), an encoder module (at `img_size`, default its own
    img_size or seq_len), a ProjectionHead, or a ContrastiveModel (every view once, each at
    its encoder's img_size or seq_len).
    """
    if isinstance(name_or_model, str):
        size = seq_len if seq_len is not None else img_size
        if in_chans is None or size is None:
            raise ValueError("count_flops by encoder name needs in_chans and img_size (or seq_len)")
        with torch.device("meta"):
            model = build_encoder(
                name_or_model,
                in_chans=in_chans,
                img_size=img_size,
                patch_size=patch_size,
                seq_len=seq_len,
                **kw,
            )
        return batch * _encoder_flops(model, size)
    model = name_or_model
    if isinstance(model, ProjectionHead):
        return batch * head_flops(model)
    if isinstance(model, ContrastiveModel):
        total = 0
        for view in model.views:
            encoder = model.encoder(view)
            total += _encoder_flops(encoder, _own_size(encoder)) + head_flops(model.head(view))
        return batch * total
    return batch * _encoder_flops(model, img_size or _own_size(model))


def _own_size(encoder: nn.Module) -> int:
    """The size an encoder was built for: its img_size, or a 1D encoder's seq_len."""
    return encoder.seq_len if isinstance(encoder, (SeriesCNN, ResNet1d)) else encoder.img_size
