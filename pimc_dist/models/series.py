"""1D encoders of index series: (B, C, T) -> (B, out_dim), for the `series` view.

PIMC without crops (configs/pretrain/pimc_series.yaml, tiny_series.yaml) contrasts a
pixel's or point's recurrence plots with its raw series (`rp` <-> `series`), so point
tables and stacks without a useful crop can be pretrained on. C is the number of indices
(3 for NDVI/EVI/SAVI, 1 for NDVI alone), T the grid length (`seq_len`: what the model is
built and its FLOPs counted for; global pooling runs any length).

Names (`model.views.series.encoder`):

- `cnn1d_small`: three Conv1d-BatchNorm-ReLU blocks (kernels 5, 5, 3; widths w, 2w, 2w;
  `width` w = 32 by default), then average pooling to `positions` steps, flattened. The
  downstream raw-series baseline (`finetune.protocol=cnn1d`) is this model with 4
  positions; as an encoder it pools globally (1 position, out_dim 2w).
- `resnet1d18`: ResNet-18 with 1D convolutions (kernel 3, stride-1 stem, no max pool, as
  the small-input 2D ResNet: a 36-step series reaches the last stage at 5 steps), stages of
  width w, 2w, 4w, 8w (`width` 64 by default), global average pooling (out_dim 8w).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pimc_dist.models.norm import BatchNorm1d

SERIES_ENCODERS = ("cnn1d_small", "resnet1d18")
# grad_checkpointing (model.grad_checkpointing sets it on every encoder) is accepted and
# not applied: a series' activations are a few KiB per sample, recomputing them saves nothing.
SERIES_OPTIONS = {
    "cnn1d_small": frozenset({"width", "positions", "grad_checkpointing"}),
    "resnet1d18": frozenset({"width", "zero_init_residual", "grad_checkpointing"}),
}


def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [
        nn.Conv1d(cin, cout, k, padding=k // 2, bias=False),
        BatchNorm1d(cout),  # also under DeepSpeed bf16 (models/norm.py)
        nn.ReLU(),
    ]


class SeriesCNN(nn.Module):
    """`cnn1d_small`: three conv blocks, pooled to `positions` steps, flattened; (B, C, T) ->
    (B, 2 * width * positions)."""

    def __init__(self, in_chans: int, width: int = 32, positions: int = 1, seq_len: int = 0):
        super().__init__()
        self.in_chans, self.seq_len = in_chans, seq_len
        self.net = nn.Sequential(
            *_conv_bn_relu(in_chans, width, 5),
            *_conv_bn_relu(width, 2 * width, 5),
            *_conv_bn_relu(2 * width, 2 * width, 3),
            nn.AdaptiveAvgPool1d(positions),
            nn.Flatten(),
        )
        self.out_dim = 2 * width * positions

    def convs(self) -> list[nn.Conv1d]:
        return [m for m in self.net if isinstance(m, nn.Conv1d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} series channels, got {x.shape[1]}")
        return self.net(x)


class BasicBlock1d(nn.Module):
    """Two kernel-3 Conv1d with a residual connection (projection where the shape changes)."""

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = BatchNorm1d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != width:
            self.downsample = nn.Sequential(
                nn.Conv1d(in_ch, width, 1, stride=stride, bias=False), BatchNorm1d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet1d(nn.Module):
    """`resnet1d18`: (B, C, T) -> (B, 8 * width) globally average-pooled features."""

    def __init__(
        self,
        in_chans: int,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        *,
        width: int = 64,
        seq_len: int = 0,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        self.in_chans, self.seq_len = in_chans, seq_len
        self.conv1 = nn.Conv1d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = BatchNorm1d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], width
        for i, n_blocks in enumerate(layers):
            blocks = []
            for j in range(n_blocks):
                blocks.append(BasicBlock1d(in_ch, width * 2**i, 2 if (i > 0 and j == 0) else 1))
                in_ch = width * 2**i
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock1d):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} series channels, got {x.shape[1]}")
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=2)


def build_series_encoder(name: str, *, in_chans: int, seq_len: int, **kw: Any) -> nn.Module:
    """The 1D encoder `name` (see the module docstring) for (in_chans, seq_len) series."""
    unknown = sorted(set(kw) - SERIES_OPTIONS[name])
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {name}; "
            f"known: {', '.join(sorted(SERIES_OPTIONS[name]))}"
        )
    kw.pop("grad_checkpointing", None)
    if name == "cnn1d_small":
        return SeriesCNN(in_chans, seq_len=seq_len, **kw)
    return ResNet1d(in_chans, seq_len=seq_len, **kw)


def conv1d_flops(conv: nn.Conv1d, t: int) -> tuple[int, int]:
    """FLOPs of one Conv1d on a length-t input, and its output length."""
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    t_out = (t + 2 * p - k) // s + 1
    return 2 * t_out * conv.out_channels * (conv.in_channels // conv.groups) * k, t_out


def series_flops(model: nn.Module, t: int) -> int:
    """Forward FLOPs of a 1D series encoder for one length-t series."""
    if isinstance(model, SeriesCNN):
        total = 0
        for conv in model.convs():
            f, t = conv1d_flops(conv, t)
            total += f
        return total
    if isinstance(model, ResNet1d):
        total, t = conv1d_flops(model.conv1, t)
        for stage in model.stages:
            for block in stage:
                if block.downsample is not None:
                    total += conv1d_flops(block.downsample[0], t)[0]
                f1, t = conv1d_flops(block.conv1, t)
                f2, t = conv1d_flops(block.conv2, t)
                total += f1 + f2
        return total
    raise TypeError(f"no FLOP formula for {type(model).__name__}")
