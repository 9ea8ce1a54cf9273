"""Projection heads: the MLP between an encoder's features and the contrastive embedding.

`ProjectionHead(in_dim, out_dim, depth, hidden_dim, norm, act)`:
- depth 0: identity (features are the embedding; out_dim must equal in_dim or be None);
- depth 1: one linear layer (CLIP);
- depth n >= 2: (n - 1) x [Linear(hidden_dim) -> norm -> activation], then Linear(out_dim)
  (SimCLR: depth 2; MoCo v3 / DINO use 3).

Normalisation defaults to LayerNorm ("ln"): it needs no batch statistics, so a
head behaves the same with one sample per rank and cannot leak which samples
share a GPU (per-rank BatchNorm gives contrastive learning that shortcut; MoCo
works around it with shuffled BN). "bn" (BatchNorm1d, as SimCLR) and "none"
are available.
"""

from __future__ import annotations

import torch
from torch import nn

from pimc_dist.models.norm import BatchNorm1d

HEAD_NORMS = ("ln", "bn", "none")
HEAD_ACTS = ("gelu", "relu")


class ProjectionHead(nn.Module):
    """MLP projection head (B, in_dim) -> (B, out_dim); see the module docstring."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = 128,
        *,
        depth: int = 2,
        hidden_dim: int = 2048,
        norm: str = "ln",
        act: str = "gelu",
    ):
        super().__init__()
        if depth < 0:
            raise ValueError(f"head depth must be >= 0, got {depth}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"unknown head norm {norm!r}; known: {', '.join(HEAD_NORMS)}")
        if act not in HEAD_ACTS:
            raise ValueError(f"unknown head activation {act!r}; known: {', '.join(HEAD_ACTS)}")
        if depth == 0:
            if out_dim not in (None, in_dim):
                raise ValueError(f"a depth-0 (identity) head keeps in_dim {in_dim}, not {out_dim}")
            out_dim = in_dim
        if out_dim is None:
            raise ValueError("out_dim is required for a head of depth >= 1")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.depth = depth

        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(depth - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=norm != "bn"))
            if norm == "ln":
                layers.append(nn.LayerNorm(hidden_dim))
            elif norm == "bn":
                layers.append(BatchNorm1d(hidden_dim))
            layers.append(nn.GELU() if act == "gelu" else nn.ReLU(inplace=True))
            dim = hidden_dim
        if depth >= 1:
            layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
