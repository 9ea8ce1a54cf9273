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
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _MixedPrecisionBatchNorm(nn.modules.batchnorm._BatchNorm):
    def forward(self, x: Tensor) -> Tensor:
        stats = self.running_mean
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
