"""Turn reader records into shard samples (the DESIGN.md sample contract).

- PIMC (`TimeSeriesPatch`): one sample per sampled pixel: `rp.png` (3 x S x S
  uint8 NDVI/EVI/SAVI recurrence plots), `series.npy` (3 x T float16 index
  series on the regular grid), `rsi.npy` (C x P x P int16 crop centred on the
  pixel) and `json` metadata.
- MoSAiC (`MultimodalPatch`): one sample per patch: `s2.npy`, `s1.npy` (float16)
  and `json` with the multi-hot labels.
- Scene (`ScenePatch`): `image.npy` and `json` with the class.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np

from pimc_dist import indices, recurrence, sampling
from pimc_dist.sources.base import MultimodalPatch, ScenePatch, TimeSeriesPatch


@dataclass(frozen=True)
class PixelSampling:
    """How PIMC samples are made from a patch (the `data.*` config fields)."""

    pixels_per_patch: int = 64
    stratify: bool = True
    exclude_labels: tuple[int, ...] = ()
    grid_step_days: int = 10
    grid_start: dt.date | None = None
    grid_length: int | None = None
    rp_size: int = 0
    crop_size: int = 16
    crop_source: str = "median"
    seed: int = 0


def _crop_image(patch: TimeSeriesPatch, source: str) -> np.ndarray:
    """(C, H, W) image the crops come from: cloud-free median composite or one date."""
    bands = np.asarray(patch.bands)
    if source.startswith("date:"):
        index = int(source.split(":", 1)[1])
        if not -bands.shape[0] <= index < bands.shape[0]:
            raise ValueError(
                f"crop_source {source}: patch {patch.patch_id} has {bands.shape[0]} dates"
            )
        return bands[index]
    if source != "median":
        raise ValueError(f"crop_source must be 'median' or 'date:<index>', not {source!r}")
    values = bands.astype(np.float32)
    if patch.valid is not None:
        values = np.where(patch.valid[:, None], values, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: filled below
            composite = np.nanmedian(values, axis=0)
    fallback = np.median(bands.astype(np.float32), axis=0)
    composite = np.where(np.isfinite(composite), composite, fallback)
    return np.rint(composite).astype(bands.dtype if bands.dtype.kind in "iu" else np.float32)


def centred_crops(
    image: np.ndarray, pixels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, size, size) crops centred on `pixels` (N, 2); border crops are edge-padded.

    Returns the crops and a bool (N,) flag of the crops that needed padding.
    """
    c, h, w = image.shape
    before = size // 2
    after = size - before
    padded = np.pad(image, ((0, 0), (before, after), (before, after)), mode="edge")
    crops = np.empty((len(pixels), c, size, size), dtype=image.dtype)
    for i, (r, col) in enumerate(pixels):
        crops[i] = padded[:, r : r + size, col : col + size]
    needs_pad = (
        (pixels[:, 0] < before)
        | (pixels[:, 1] < before)
        | (pixels[:, 0] + after > h)
        | (pixels[:, 1] + after > w)
    )
    return crops, needs_pad


def pimc_samples(
    patch: TimeSeriesPatch, cfg: PixelSampling
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """PIMC samples of one patch, and (key, reason) for each input pixel skipped."""
    result = indices.index_series(
        patch.bands,
        patch.band_names,
        patch.dates,
        valid=patch.valid,
        step_days=cfg.grid_step_days,
        start=cfg.grid_start,
        length=cfg.grid_length,
        dn_scale=patch.dn_scale,
        dn_offset=patch.dn_offset,
    )
    h, w = result.all_invalid.shape
    skips: list[tuple[str, str]] = []
    n_bad = int(result.all_invalid.sum())
    if n_bad == h * w:
        return [], [(patch.patch_id, "no pixel has a valid observation")]
    pickable = ~result.all_invalid
    pixels = sampling.sample_pixels(
        pickable,
        cfg.pixels_per_patch,
        labels=patch.labels,
        stratify=cfg.stratify and patch.labels is not None,
        exclude_labels=cfg.exclude_labels if patch.labels is not None else (),
        seed=sampling.patch_seed(cfg.seed, patch.patch_id),
    )
    if n_bad:
        skips.append(
            (patch.patch_id, f"{n_bad} of {h * w} pixels have no valid observation (never sampled)")
        )
    if len(pixels) == 0:
        return [], skips + [(patch.patch_id, "no pickable pixel (all void or invalid)")]
    rows, cols = pixels[:, 0], pixels[:, 1]
    series = np.ascontiguousarray(result.series[:, :, rows, cols].transpose(2, 0, 1))  # (N, 3, T)
    plots = recurrence.recurrence_plot_uint8(series, size=cfg.rp_size or None)
    crops, padded = centred_crops(_crop_image(patch, cfg.crop_source), pixels, cfg.crop_size)
    crops = crops.astype(np.int16) if crops.dtype.kind in "iu" else crops.astype(np.float16)
    grid = [d.isoformat() for d in result.grid_dates]
    samples = []
    for i, (r, c) in enumerate(pixels):
        label = int(patch.labels[r, c]) if patch.labels is not None else -1
        parcel = int(patch.parcels[r, c]) if patch.parcels is not None else -1
        samples.append(
            {
                "__key__": f"{patch.patch_id}_r{r:04d}_c{c:04d}",
                "rp.png": plots[i],  # (3, S, S): NDVI, EVI, SAVI as the R, G, B planes
                "series.npy": series[i].astype(np.float16),
                "rsi.npy": crops[i],
                "json": {
                    "dataset": patch.dataset,
                    "patch": patch.patch_id,
                    "row": int(r),
                    "col": int(c),
                    "dates": grid,
                    "fold": patch.fold,
                    "split": patch.split,
                    "label": label,
                    "parcel": parcel,
                    "crop_padded": bool(padded[i]),
                    "n_valid": int(result.n_valid[r, c]),
                },
            }
        )
    return samples, skips


def mosaic_sample(patch: MultimodalPatch, classes: list[str]) -> dict[str, Any]:
    """The MoSAiC sample of one optical + SAR patch."""
    for name, arr in (("s2", patch.s2), ("s1", patch.s1)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{patch.patch_id}: {name} has non-finite values")
    labels = np.asarray(patch.labels, dtype=np.uint8)
    return {
        "__key__": patch.patch_id.replace(".", "_"),
        "s2.npy": patch.s2.astype(np.float16),
        "s1.npy": patch.s1.astype(np.float16),
        "json": {
            "dataset": patch.dataset,
            "patch": patch.patch_id,
            "split": patch.split,
            "labels": labels.tolist(),
            "label_names": [classes[i] for i in np.flatnonzero(labels)],
            "s2_bands": list(patch.s2_bands),
            "s1_bands": list(patch.s1_bands),
        },
    }


def scene_sample(patch: ScenePatch, classes: list[str]) -> dict[str, Any]:
    """The sample of one single-label scene."""
    image = patch.image
    image = (
        image.astype(np.int16)
        if image.dtype.kind in "iu" and image.max() < 32768
        else image.astype(np.float16)
    )
    return {
        "__key__": patch.patch_id.replace(".", "_"),
        "image.npy": image,
        "json": {
            "dataset": patch.dataset,
            "patch": patch.patch_id,
            "split": patch.split,
            "label": int(patch.label),
            "label_name": classes[int(patch.label)],
            "bands": list(patch.band_names),
        },
    }
