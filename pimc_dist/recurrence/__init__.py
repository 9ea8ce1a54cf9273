"""Recurrence plots of index series: pyts-compatible values, fast numba kernels, a torch twin.

A recurrence plot of a series x_1..x_T is the matrix of distances between its delay-embedded
trajectories v_i = (x_i, x_{i+tau}, ..., x_{i+(m-1)tau}), i = 1..T' with T' = T - (m-1) tau,
m the ``dimension`` and tau the ``time_delay`` (Eckmann et al. 1987; pyts.image.RecurrencePlot).

Three entry points, all taking a batch (N, T) or (N, C, T) and returning (N, [C,] ., .):

- :func:`recurrence_plot` -- float32 plots with exactly the semantics of pyts 0.14
  ``RecurrencePlot(dimension, time_delay, threshold, percentage).transform`` applied to every
  series: distances are computed in float64 like pyts, so the result equals pyts' output cast to
  float32 (bit for bit), and binary plots (``threshold`` given) are identical.
- :func:`recurrence_plot_uint8` -- plots for storage (PNG in the shards), on a FIXED scale so
  that grey levels mean the same distance in every pixel and every dataset (see below).
- :func:`recurrence_plot_torch` -- the same uint8 (or float) plots from a torch tensor on any
  device, to compute plots inside the training step from stored float16 series.

uint8 scale. Index series are cleaned to [-1, 1] upstream (``pimc_dist.indices``), so the
distance between two m-dimensional trajectories lies in [0, 2 sqrt(m)]. A distance d maps to
``floor(min(d * (255 / max_distance), 255) + 0.5)``, i.e. round-half-up of
``255 * min(d / max_distance, 1)``, with ``max_distance = 2 sqrt(m)`` unless given. This
arithmetic is done in float32 (both here and in torch, in the same order), so the numpy and
torch uint8 plots are equal; against pyts' float64 distances a value may differ by one step
where d sits on a rounding boundary. Binary plots (``threshold`` given) store 0 and 255.

Resize. ``size=S`` resamples the float plot to S x S before quantising, with area (box-filter)
weights: output cell i covers input coordinates [i T'/S, (i+1) T'/S) and averages the input
cells it overlaps, weighted by the overlap length -- the filter of OpenCV's INTER_AREA and PIL's
BOX, valid for shrinking and for enlarging. It is applied along columns, then along rows
(R = A (M A^T)), in float32, the same way in numpy and torch.

Speed. The kernels are numba functions compiled on first use (one to a few seconds each, then
cached on disk under ``__pycache__`` for later processes). Each series is one independent task.
With ``numba.get_num_threads() > 1`` a batch is split over numba's threads; with one thread
(``numba.set_num_threads(1)`` or ``NUMBA_NUM_THREADS=1``) a serial build of the same kernel runs
and no thread pool is touched -- use that in forked data-loader workers, since numba's OpenMP
layer must not be used on both sides of a fork. Rows are written 64 values at a time into the
flat output (a row's overhang is overwritten by the rows after it), which keeps every inner
loop a whole number of SIMD vectors for T' <= 64. Each series is first copied into a small
zero-padded scratch row rather than the batch into a padded copy: a new array of the batch's
size can come as fresh pages, whose faults cost more than the plots (0.85 ms of 2.9 ms for
4096 series on a 2-core VM). Thresholded plots keep one series' float64 distances in scratch
and take the 'point' percentile by a selection among the upper triangle
(:func:`_percentile_of_plot`), about 7x faster than ``np.percentile`` over the batch.

Layout: :mod:`~pimc_dist.recurrence.kernels` (the numba kernels), :mod:`~pimc_dist.recurrence.plots`
(parameters, area-resize weights and the numpy API), :mod:`~pimc_dist.recurrence.torch_plots`
(the torch twin). Import the public names from here.
"""

from pimc_dist.recurrence.plots import (
    THRESHOLDS,
    default_max_distance,
    plot_size,
    recurrence_plot,
    recurrence_plot_uint8,
    resize_plot,
)
from pimc_dist.recurrence.torch_plots import recurrence_plot_torch

__all__ = [
    "THRESHOLDS",
    "default_max_distance",
    "plot_size",
    "recurrence_plot",
    "recurrence_plot_torch",
    "recurrence_plot_uint8",
    "resize_plot",
]
