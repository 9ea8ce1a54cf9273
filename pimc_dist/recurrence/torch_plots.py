"""The torch twin of :func:`~pimc_dist.recurrence.recurrence_plot_uint8`: the same plots from a
tensor on its own device (plots inside the training step from stored float16 series)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from pimc_dist.recurrence.plots import (
    _area_taps,
    _check_max_distance,
    _check_size,
    _resolve_embedding,
)


@functools.lru_cache(maxsize=32)
def _torch_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_area_taps` as tensors on ``device``, made once per (sizes, device)."""
    taps, weights = _area_taps(n_in, n_out)
    return torch.from_numpy(taps).to(device), torch.from_numpy(weights).to(device)


def _distances_torch(x: torch.Tensor, rows: torch.Tensor, dim: int, delay: int) -> torch.Tensor:
    """float32 distances (..., T', R) between every trajectory and the trajectories ``rows``.

    The same operations in the same order as the kernels: |x_k - x_a| for dimension 1, else
    sqrt(diff_0^2 + diff_1^2 + ...) with diff_d = x_{k + d tau} - x_{a + d tau}.
    """
    n_traj = x.shape[-1] - (dim - 1) * delay
    if dim == 1:
        return (x[..., :n_traj, None] - x[..., None, rows]).abs_()
    total = None
    for d in range(dim):
        part = x[..., d * delay : d * delay + n_traj]
        square = (part[..., :, None] - x[..., None, rows + d * delay]).square_()
        total = square if total is None else total.add_(square)
    # torch's float32 sqrt on CPU (Sleef) is not always correctly rounded; a float64 sqrt
    # rounded to float32 is, and equals the kernels' float32 sqrt.
    return total.double().sqrt_().float()


def recurrence_plot_torch(
    series: torch.Tensor,
    *,
    dimension: int | float = 1,
    time_delay: int | float = 1,
    max_distance: float | None = None,
    size: int | None = None,
    out_dtype: torch.dtype = torch.uint8,
) -> torch.Tensor:
    """Recurrence plots (B, [C,] S, S) of a (B, [C,] T) tensor on its own device.

    With ``out_dtype=torch.uint8`` the values equal :func:`recurrence_plot_uint8`'s (same float32
    operations in the same order); with a float dtype the (resized) float32 distance plot is
    returned in that dtype. Series must be finite: nothing data-dependent is checked here, so
    that the call never synchronises a GPU stream.
    """
    if not isinstance(series, torch.Tensor):
        raise TypeError(f"series must be a torch.Tensor, got {type(series).__name__}")
    if series.ndim not in (2, 3):
        raise ValueError(
            f"series must have shape (B, T) or (B, C, T), got {series.ndim} dims {tuple(series.shape)}"
        )
    if series.is_complex() or series.dtype == torch.bool:
        raise TypeError(f"series must hold real numbers, got dtype {series.dtype}")
    _check_size(size)
    n_timestamps = series.shape[-1]
    if n_timestamps < 1:
        raise ValueError(f"series must have at least one time step, got {tuple(series.shape)}")
    dim, delay = _resolve_embedding(n_timestamps, dimension, time_delay)
    n_traj = n_timestamps - (dim - 1) * delay
    limit = _check_max_distance(max_distance, dim)

    with torch.no_grad():
        x = series.to(torch.float32)
        if size is None or size == n_traj:
            plots = _distances_torch(x, torch.arange(n_traj, device=x.device), dim, delay)
        else:
            # The kernels' fused resize: the columns pass reads the plot's entries for the K
            # input columns of each output column straight from the series, then the rows pass.
            taps, weights = _torch_taps(n_traj, size, x.device)
            cols = None
            for t in range(taps.shape[1]):
                term = _distances_torch(x, taps[:, t], dim, delay).mul_(weights[:, t])
                cols = term if cols is None else cols.add_(term)
            plots = None
            for t in range(taps.shape[1]):
                term = cols.index_select(-2, taps[:, t]).mul_(weights[:, t, None])
                plots = term if plots is None else plots.add_(term)
        if out_dtype != torch.uint8:
            return plots.to(out_dtype)
        # A Python scalar enters a float32 kernel as float32 (torch's opmath), like the kernels'
        # np.float32 scale, without a host-to-device copy. Truncating v + 0.5 >= 0 to an
        # integer is floor(v + 0.5), as in the kernels.
        scale = float(np.float32(255.0 / limit))
        return plots.mul_(scale).clamp_(max=255.0).add_(0.5).to(torch.uint8)
