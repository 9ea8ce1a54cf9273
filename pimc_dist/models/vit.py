"""Vision Transformer encoder in plain torch, sized for small satellite inputs.

Pre-norm blocks (LayerNorm, multi-head self-attention through
`torch.nn.functional.scaled_dot_product_attention`, GELU MLP), a learnable
class token and learnable position embeddings sized from `img_size //
patch_size`. Inputs of another size get the position embeddings resized by
bicubic interpolation on the fly, so an encoder pretrained on 48x48 plots runs
on 64x64 ones. The forward pass returns one pooled vector per image: the
normalised class token (`pool="cls"`) or the mean of the normalised patch
tokens (`pool="mean"`).

Standard sizes (width / depth / heads, MLP ratio 4) are in `VIT_SIZES`; the
"giant" is DINOv2's `vit_giant2` shape (1536 / 40 / 24) with a GELU MLP
instead of SwiGLU: about 1.13 B parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ViTSize:
    """Width, depth and heads of one named ViT size."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


# Parameters at 224 px, patch 16, 3 channels: tiny 5.5 M, small 21.7 M, base 85.8 M,
# large 303 M, huge 631 M (patch 14 or 16), giant 1.13 B (patch 14).
VIT_SIZES: dict[str, ViTSize] = {
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
    "huge": ViTSize(1280, 32, 16),
    "giant": ViTSize(1536, 40, 24),  # DINOv2 vit_giant2 shape, GELU MLP
}

POOLS = ("cls", "mean")


def default_patch_size(img_size: int) -> int:
    """Largest of 16, 8, 4, 2, 1 that divides `img_size` and leaves >= 6 patches per side.

    32 -> 4 (8x8 tokens), 48 -> 8 (6x6), 64 -> 8 (8x8), 120 -> 8 (15x15), 224 -> 16 (14x14).
    """
    for p in (16, 8, 4, 2):
        if img_size % p == 0 and img_size // p >= 6:
            return p
    return 1


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize (1, 1 + gh*gw, D) position embeddings (class token first) to a new patch grid.

    The source grid must be square (it is whenever it came from this module);
    the patch part is resized bicubically, the class-token part is kept.
    """
    n_old = pos_embed.shape[1] - 1
    side = math.isqrt(n_old)
    if side * side != n_old:
        raise ValueError(f"position embeddings of {n_old} patch tokens are not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    # Interpolate in float32: bicubic is not implemented for every low-precision dtype.
    patch_pos = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, D) tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """Two linear layers with GELU between them."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens (one strided convolution)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input of {h}x{w} px is not divisible by the ViT patch size {self.patch_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT encoder returning (B, out_dim) pooled features.

    Args:
        in_chans: input channels (3 for recurrence plots, 10-13 optical bands, 2 SAR bands).
        img_size: the side of the square input the position embeddings are sized for.
        patch_size: patch side; `img_size` must be a multiple of it.
        embed_dim, depth, num_heads, mlp_ratio: the transformer's shape.
        pool: "cls" (normalised class token) or "mean" (mean of normalised patch tokens).
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        grad_checkpointing: recompute each block in the backward pass instead of keeping its
            activations (torch.utils.checkpoint, non-reentrant): ~1/3 more compute, activation
            memory of one block instead of all of them.
    """

    def __init__(
        self,
        *,
        in_chans: int,
        img_size: int,
        patch_size: int,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pool: str = "cls",
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown ViT pool {pool!r}; known: {', '.join(POOLS)}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(embed_dim * mlp_ratio)
        self.pool = pool
        self.grad_checkpointing = grad_checkpointing
        self.out_dim = embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm/DINOv2-style init: truncated normal (std 0.02) weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) normalised tokens, class token first."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]}")
        tokens = self.patch_embed(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + resize_pos_embed(self.pos_embed, grid)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim) pooled features."""
        tokens = self.forward_tokens(x)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
