"""The multi-tower contrastive model: one encoder + projection head per view name.

A *view* is a key of the batch ("rp" and "rsi" for PIMC; "s2", "s1" and their
second augmentations for MoSAiC). Each view maps to an encoder and a head,
stored once under an owner name in `encoders` / `heads`, so views can share:
- a whole tower (two augmentations of one modality must go through the same
  network for NT-Xent), or
- only the encoder, each keeping its own head.

`forward(batch)` embeds every batch entry whose key is a view name (other keys,
such as "label" or "meta", are ignored) and returns L2-normalised embeddings
per view plus "logit_scale": the learnable parameter as CLIP stores it, the
*log* of the multiplier of the cosine similarities (log(1/0.07) at start, a
temperature of 0.07). The losses in `pimc_dist.losses` take it as it is, apply
exp and clamp. With `init_logit_bias` set (SigLIP: log scale log(10), bias
-10) the learnable "logit_bias" is returned too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

RESERVED_OUTPUT_KEYS = ("logit_scale", "logit_bias")


class ContrastiveModel(nn.Module):
    """Encoders + heads per view, a learnable logit scale; see the module docstring.

    Args:
        encoders: owner name -> encoder module (with `out_dim`), returning (B, out_dim).
        heads: owner name -> projection head (with `in_dim`/`out_dim`).
        views: view name -> (encoder owner, head owner). Default: each encoder owner is a
            view using the encoder and head of the same name.
        init_logit_scale: initial log of the similarity multiplier (log(1 / temperature)).
        learn_logit_scale: whether the logit scale is trained.
        init_logit_bias: initial SigLIP logit bias, or None for no bias.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        views: Mapping[str, tuple[str, str]] | None = None,
        *,
        init_logit_scale: float = math.log(1 / 0.07),
        learn_logit_scale: bool = True,
        init_logit_bias: float | None = None,
    ):
        super().__init__()
        if views is None:
            views = {name: (name, name) for name in encoders}
        if not views:
            raise ValueError("a ContrastiveModel needs at least one view")
        embed_dims = set()
        for view, (enc_key, head_key) in views.items():
            if view in RESERVED_OUTPUT_KEYS:
                raise ValueError(f"view name {view!r} is reserved for a model output")
            if enc_key not in encoders:
                raise ValueError(f"view {view!r}: no encoder named {enc_key!r}")
            if head_key not in heads:
                raise ValueError(f"view {view!r}: no head named {head_key!r}")
            enc_dim, head_in = encoders[enc_key].out_dim, heads[head_key].in_dim
            if enc_dim != head_in:
                raise ValueError(
                    f"view {view!r}: encoder {enc_key!r} gives {enc_dim} features "
                    f"but head {head_key!r} takes {head_in}"
                )
            embed_dims.add(heads[head_key].out_dim)
        if len(embed_dims) > 1:
            raise ValueError(f"all views must embed to one dimension, got {sorted(embed_dims)}")

        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict(heads)
        self.views: dict[str, tuple[str, str]] = {v: tuple(k) for v, k in views.items()}
        self.embed_dim = embed_dims.pop()
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte
        # views at start-up, which fails for 0-dim tensors. forward() returns [0].
        self.logit_scale = nn.Parameter(
            torch.tensor([float(init_logit_scale)]), requires_grad=learn_logit_scale
        )
        self.logit_bias = (
            None
            if init_logit_bias is None
            else nn.Parameter(torch.tensor([float(init_logit_bias)]))
        )

    def encoder(self, view: str) -> nn.Module:
        """The encoder module a view runs through."""
        return self.encoders[self._keys(view)[0]]

    def head(self, view: str) -> nn.Module:
        """The projection head a view runs through."""
        return self.heads[self._keys(view)[1]]

    def encode(self, view: str, x: torch.Tensor) -> torch.Tensor:
        """Pre-head features (B, encoder.out_dim) of a view, e.g. for linear probes."""
        return self.encoder(view)(x)

    def embed(self, view: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim) of a view."""
        return F.normalize(self.head(view)(self.encode(view, x)), dim=-1)

    def forward(self, batch: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Embed every view present in `batch`; add "logit_scale" (and "logit_bias")."""
        present = [key for key in batch if key in self.views]
        if not present:
            raise ValueError(
                f"batch has none of the model's views {sorted(self.views)}; "
                f"its keys are {sorted(map(str, batch))}"
            )
        out = {view: self.embed(view, batch[view]) for view in present}
        out["logit_scale"] = self.logit_scale[0]
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias[0]
        return out

    def _keys(self, view: str) -> tuple[str, str]:
        if view not in self.views:
            raise KeyError(f"unknown view {view!r}; the model's views are {sorted(self.views)}")
        return self.views[view]
