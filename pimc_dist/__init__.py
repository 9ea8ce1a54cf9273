"""pimc_dist: distributed pixel-wise multimodal contrastive pretraining on satellite data.

The library, usable from Python without the runners (`python -m pimc_dist.<job>`):

- `load_encoder(run folder or encoders.safetensors, view)`: a pretrained encoder in eval
  mode and its `EncoderInput` (channels, size, normalisation); call it on a raw batch.
- `index_series`: Sentinel-2 DN -> NDVI/EVI/SAVI -> cleaning, gap filling -> regular grid,
  one step at a time with `ndvi`, `evi`, `savi`, `index_stack`, `observation_validity`,
  `clean_indices`, `regular_grid`, `resample_to_grid`.
- `recurrence_plot_uint8` (the plots the encoders see), `recurrence_plot` (float, pyts
  semantics), `recurrence_plot_torch` (the same on a tensor's device).

Names are imported on first use, so `import pimc_dist` loads neither torch nor numba.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "EncoderInput": "pimc_dist.encoders",
    "EncoderLoadError": "pimc_dist.encoders",
    "LoadedEncoder": "pimc_dist.encoders",
    "load_encoder": "pimc_dist.encoders",
    "clean_indices": "pimc_dist.indices",
    "evi": "pimc_dist.indices",
    "index_series": "pimc_dist.indices",
    "index_stack": "pimc_dist.indices",
    "ndvi": "pimc_dist.indices",
    "observation_validity": "pimc_dist.indices",
    "regular_grid": "pimc_dist.indices",
    "resample_to_grid": "pimc_dist.indices",
    "savi": "pimc_dist.indices",
    "recurrence_plot": "pimc_dist.recurrence",
    "recurrence_plot_torch": "pimc_dist.recurrence",
    "recurrence_plot_uint8": "pimc_dist.recurrence",
    "resize_plot": "pimc_dist.recurrence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): the index functions need only numpy, the plots numba, the encoders torch.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pimc_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
