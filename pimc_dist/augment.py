"""Augmentations of image crops as whole-batch torch ops (any device, optional seeded generator).

Per sample, each op draws its own parameters; none loops over samples:

- `random_resized_crop`: a random box (area fraction in `scale`, aspect in `ratio`) resampled
  bilinearly back to the input's size (one `affine_grid` + `grid_sample` for the batch);
- `random_dihedral`: flips and 90-degree rotations (the loader's numpy twin:
  `pimc_dist.shardset.dihedral`, with the same transform numbering);
- `band_jitter`: brightness (a factor 1 +- b) and contrast (around the crop's mean, 1 +- c),
  drawn per sample and per band, on the data's physical values (reflectance);
- `db_noise`: additive Gaussian noise with sigma given in dB (SAR backscatter stored in dB).

Crops usually arrive normalised ((x - mean) / std per band, from the manifest): the jitter
and the noise then take `mean`/`std` so that their parameters keep their physical meaning.

`ViewAugmenter` chains them per view from the job config's `augment.<view>.*`
(`config.ViewAugmentConfig`); pretraining draws MoSAiC's two augmentations of each
modality with `ViewAugmenter.pair` on the training device, where they cost least (the
loader's workers would otherwise build and ship two copies of every crop; on one CPU thread
the mosaic.yaml settings cost about as much per sample as five times the loader's own work,
bench/loader.py). A view with no `augment.<view>` entry gets flips and rotations only (what
MoSAiC drew before).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# k in 0..7: k % 4 quarter turns, after a horizontal flip when k >= 4 (as shardset.dihedral).
SQUARE_TRANSFORMS = (0, 1, 2, 3, 4, 5, 6, 7)
# Non-square crops keep their shape: identity, horizontal flip, vertical flip, half turn.
OBLONG_TRANSFORMS = (0, 4, 6, 2)

Norm = tuple[Any, Any]  # per-band (mean, std) of a normalised view


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random flip/rotation of (B, C, H, W) crops: all 8 when square, else 4."""
    choices = SQUARE_TRANSFORMS if x.shape[-1] == x.shape[-2] else OBLONG_TRANSFORMS
    pick = torch.randint(0, len(choices), (x.shape[0],), generator=generator)
    ks = torch.tensor(choices)[pick]
    out = x.clone()
    for k in ks.unique().tolist():
        if k == 0:
            continue
        # Indices found on the CPU: a boolean mask on the device would sync it per transform.
        idx = torch.nonzero(ks == k).flatten().to(x.device, non_blocking=True)
        part = x[idx].flip(-1) if k >= 4 else x[idx]
        out[idx] = torch.rot90(part, k % 4, dims=(-2, -1))
    return out


def _uniform(
    shape: tuple[int, ...],
    lo: float,
    hi: float,
    generator: torch.Generator | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """U(lo, hi) float32 numbers on `like`'s device, from `generator` (on its own device) if given."""
    device = like.device if generator is None else generator.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(like.device, non_blocking=True)


def _normal(
    shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    device = like.device if generator is None else generator.device
    z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return z.to(like.device, non_blocking=True)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def random_resized_crop(
    x: torch.Tensor,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random box of each (B, C, H, W) crop, resampled (bilinear) to H x W.

    The box covers a fraction in `scale` of the crop's area with a width/height ratio in
    `ratio` (log-uniform), clipped to the crop, at a uniform position. Returns the input's
    dtype; `scale == (1, 1)` (the whole crop) returns `x` itself.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    r_lo, r_hi = float(ratio[0]), float(ratio[1])
    if not 0.0 < r_lo <= r_hi:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    if lo == 1.0:
        return x
    n, _, height, width = x.shape
    area = _uniform((n,), lo, hi, generator, x)
    log_ratio = _uniform((n,), math.log(r_lo), math.log(r_hi), generator, x)
    aspect = torch.exp(log_ratio) * (height / width)  # box width/height in units of the crop's
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the crop's width and height
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1.0 - w) * _uniform((n,), -1.0, 1.0, generator, x)  # centre, in [-1, 1] coordinates
    cy = (1.0 - h) * _uniform((n,), -1.0, 1.0, generator, x)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], -1), torch.stack([zero, h, cy], -1)], 1)
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    out = F.grid_sample(
        _float(x), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.to(x.dtype)


def _band_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _per_band(values: Any, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(values):
        values = torch.as_tensor(np.asarray(values, np.float32))
    return values.to(x.device, torch.float32).view(_band_shape(x))


def band_jitter(
    x: torch.Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    generator: torch.Generator | None = None,
    norm: Norm | None = None,
) -> torch.Tensor:
    """Brightness and contrast jitter drawn per sample and per band of (B, C, ...) crops.

    On physical values v (reflectance): v' = c * (b * v - m) + m, where b ~ U(1 - brightness,
    1 + brightness), c ~ U(1 - contrast, 1 + contrast) and m is the crop's mean of b * v in
    that band. With `norm` = per-band (mean, std), `x` is taken as (v - mean) / std and the
    result is returned the same way.
    """
    if brightness < 0 or contrast < 0:
        raise ValueError(f"brightness and contrast must be >= 0, got {brightness}, {contrast}")
    if brightness == 0 and contrast == 0:
        return x
    y = _float(x)
    offset = None
    if norm is not None:
        offset = _per_band(norm[0], y) / _per_band(norm[1], y)
        y = y + offset  # v / std
    shape = tuple(y.shape[:2]) + (1,) * (y.ndim - 2)
    if brightness:
        y = y * _uniform(shape, 1.0 - brightness, 1.0 + brightness, generator, y)
    if contrast:
        mean = y.mean(dim=tuple(range(2, y.ndim)), keepdim=True)
        y = (y - mean) * _uniform(shape, 1.0 - contrast, 1.0 + contrast, generator, y) + mean
    if offset is not None:
        y = y - offset
    return y.to(x.dtype)


def db_noise(
    x: torch.Tensor,
    sigma_db: float,
    generator: torch.Generator | None = None,
    norm: Norm | None = None,
) -> torch.Tensor:
    """Additive Gaussian noise, sigma `sigma_db` in dB, on crops of backscatter in dB.

    With `norm` = per-band (mean, std), `x` is (dB - mean) / std: the noise is scaled by
    1 / std per band so that it is `sigma_db` dB on the data's own scale.
    """
    if sigma_db < 0:
        raise ValueError(f"noise sigma must be >= 0 dB, got {sigma_db}")
    if sigma_db == 0:
        return x
    y = _float(x)
    noise = _normal(tuple(y.shape), generator, y) * sigma_db
    if norm is not None:
        noise = noise / _per_band(norm[1], y)
    return (y + noise).to(x.dtype)


@dataclass(frozen=True)
class ViewAugment:
    """The augmentations of one view (see config.ViewAugmentConfig, which fills it)."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flips: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    noise_db: float = 0.0

    @classmethod
    def from_config(cls, section: Any) -> ViewAugment:
        return cls(
            crop_scale=(float(section.crop_scale[0]), float(section.crop_scale[1])),
            crop_ratio=(float(section.crop_ratio[0]), float(section.crop_ratio[1])),
            flips=bool(section.flips),
            brightness=float(section.brightness),
            contrast=float(section.contrast),
            noise_db=float(section.noise_db),
        )

    def apply(
        self, x: torch.Tensor, generator: torch.Generator | None = None, norm: Norm | None = None
    ) -> torch.Tensor:
        """One draw for a (B, C, H, W) batch: crop, flips/rotations, band jitter, noise."""
        x = random_resized_crop(x, self.crop_scale, self.crop_ratio, generator)
        if self.flips:
            x = random_dihedral(x, generator)
        x = band_jitter(x, self.brightness, self.contrast, generator, norm)
        return db_noise(x, self.noise_db, generator, norm)


class ViewAugmenter:
    """The augmentations of every view, with the normalisation the loader applied to each.

    `views`: {view: ViewAugment}; a view not named gets the default (flips and rotations).
    `norm`: {view: (mean, std)} of the views the loader normalised (ShardLoader.normalisation).
    """

    def __init__(
        self,
        views: Mapping[str, ViewAugment] | None = None,
        norm: Mapping[str, Norm] | None = None,
    ):
        self.views = dict(views or {})
        self.norm = dict(norm or {})
        self._norm_on: dict[tuple[str, torch.device], Norm] = {}  # norm as tensors per device

    @classmethod
    def from_config(cls, cfg: Any, norm: Mapping[str, Norm] | None = None) -> ViewAugmenter:
        """From a job config's `augment` section ({view: ViewAugmentConfig})."""
        section = cfg.get("augment") or {}
        return cls({v: ViewAugment.from_config(s) for v, s in section.items()}, norm)

    def __call__(
        self, view: str, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        norm = self.norm.get(view)
        if norm is not None:
            key = (view, x.device)
            if key not in self._norm_on:  # one copy to the device, not one per batch
                self._norm_on[key] = tuple(
                    torch.as_tensor(np.asarray(v, np.float32)).to(x.device) for v in norm
                )
            norm = self._norm_on[key]
        return self.views.get(view, ViewAugment()).apply(x, generator, norm)

    def pair(
        self, view: str, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Two independent draws of batch `x`, concatenated along the batch axis (2B, ...)."""
        return torch.cat([self(view, x, generator), self(view, x, generator)])
