"""BatchNorm that runs when its parameters are bfloat16/float16 and its statistics float32.

DeepSpeed's bf16 (and fp16) mode casts a model's *parameters* to the low precision and
keeps its floating *buffers* as they are (0.19: "preserve fp32 buffers"), so a plain
`nn.BatchNorm2d` ends up with bfloat16 weight and bias beside float32 running
statistics, a mix `torch.batch_norm` refuses on CPU ("expected scalar type BFloat16
but found Float"). These subclasses normalise with the affine parameters cast to the
statistics' dtype in that case: low-precision input and output, float32 statistics and
affine transform (what autocast does), and the gradient reaches the low-precision
parameters through the cast. With matching dtypes they are the torch modules exactly;
state dicts and `isinstance(m, nn.BatchNorm2d)` are unchanged.

A forward pass that runs inside the autograd engine's backward pass is the recomputation of
activation checkpointing (torch.utils.checkpoint, as timm's `set_grad_checkpointing` uses it):
it normalises with the batch statistics as the first pass did but leaves the running
statistics alone, so a checkpointed model ends a step with the same buffers as a plain one.

`use_mixed_precision_batchnorm(model)` turns every plain torch BatchNorm of a model (a timm
encoder's) into these classes in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (checkpoint recomputation runs
    there); torch.utils.checkpoint asks the same question this way."""
    return torch._C._current_graph_task_id() != -1


class _MixedPrecisionBatchNorm(nn.modules.batchnorm._BatchNorm):
    def forward(self, x: Tensor) -> Tensor:
        stats = self.running_mean
        if self.training and stats is not None and _in_backward():
            weight, bias = self.weight, self.bias
            if weight is not None and weight.dtype != stats.dtype:
                weight = weight.to(stats.dtype)
                bias = None if bias is None else bias.to(stats.dtype)
            # Batch statistics; copies of the running statistics take the update (they were
            # updated once), so the recomputation saves the same tensors as the first pass.
            mean, var = stats.clone(), self.running_var.clone()
            return F.batch_norm(x, mean, var, weight, bias, True, 0.0, self.eps)
        if self.weight is None or stats is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight.to(stats.dtype),
            None if self.bias is None else self.bias.to(stats.dtype),
            self.training,  # running statistics exist here, so eval mode uses them
            factor,
            self.eps,
        )


class BatchNorm1d(_MixedPrecisionBatchNorm, nn.BatchNorm1d):
    """`nn.BatchNorm1d` that also runs with low-precision parameters and float32 statistics."""


class BatchNorm2d(_MixedPrecisionBatchNorm, nn.BatchNorm2d):
    """`nn.BatchNorm2d` that also runs with low-precision parameters and float32 statistics."""


def use_mixed_precision_batchnorm(model: nn.Module) -> nn.Module:
    """Make every plain `nn.BatchNorm1d`/`nn.BatchNorm2d` of `model` one of the classes above,
    in place (same parameters, buffers and state-dict keys); returns `model`. Subclasses with
    a forward of their own (timm's BatchNormAct2d) are left as they are."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = BatchNorm2d
        elif type(module) is nn.BatchNorm1d:
            module.__class__ = BatchNorm1d
    return model
