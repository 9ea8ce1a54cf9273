"""ResNet-18/50 encoders (v1.5: stride on the 3x3 convolution) for small multi-band inputs.

Two stems:
- ImageNet stem: 7x7 stride-2 convolution, then 3x3 stride-2 max pool (input / 4).
- Small-input stem: one 3x3 stride-1 convolution, no max pool (as CIFAR ResNets),
  so a 32x32 recurrence plot still reaches the last stage at 4x4 instead of 1x1.

By default (`small_input=None`) the small stem is used for inputs of at most
64 px (recurrence plots, 16-64 px crops, EuroSAT) and the ImageNet stem above.
The forward pass returns globally average-pooled features of the last stage.

With `grad_checkpointing` each of the four stages is recomputed in the backward
pass instead of keeping its activations (torch.utils.checkpoint, non-reentrant).
The recomputation runs the stage's BatchNorms in training mode again; they
(models/norm.py) leave their running statistics alone then, so a checkpointed
model ends a step with the same buffers as a plain one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pimc_dist.models.norm import BatchNorm2d

SMALL_INPUT_MAX_SIZE = 64


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv3x3(width, out_ch)
        self.bn2 = BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """Projection shortcut where the residual changes shape, identity (None) otherwise."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), BatchNorm2d(out_ch))


RESNET_LAYERS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet encoder returning (B, out_dim) globally average-pooled features.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage (four stages, widths width, 2w, 4w, 8w).
        in_chans: input channels.
        img_size: the input side the model is built for; only picks the stem when
            `small_input` is None (inputs of any size run).
        small_input: 3x3 stride-1 stem without max pool (True), ImageNet stem (False),
            or choose by `img_size <= 64` (None).
        width: channels of the first stage (64 in the standard models; small in tests).
        zero_init_residual: start each residual branch's last BatchNorm at zero, so every
            block begins as the identity (Goyal et al. 2017; steadier large-batch training).
        grad_checkpointing: recompute each stage in the backward pass instead of keeping
            its activations (see the module docstring): ~1/3 more compute, activation
            memory of about one stage instead of four.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        in_chans: int,
        img_size: int,
        small_input: bool | None = None,
        width: int = 64,
        zero_init_residual: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        if small_input is None:
            small_input = img_size <= SMALL_INPUT_MAX_SIZE
        self.in_chans = in_chans
        self.img_size = img_size
        self.small_input = small_input
        if small_input:
            self.conv1 = conv3x3(in_chans, width)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        stages = []
        in_ch = width
        for i, n_blocks in enumerate(layers):
            stage_width = width * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, stage_width, stride))
                in_ch = stage_width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = in_ch
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = True) -> None:
        """He (fan-out) init for convolutions, BatchNorm at identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> list[nn.Sequential]:
        """The four residual stages in order."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim) pooled features."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x.mean(dim=(2, 3))
