"""Write a synthetic PASTIS / PASTIS-R dataset in the exact on-disk layout of the real one.

The real reader (`pimc_dist.sources.pastis`) is what tests and demos run on it. Values are
synthetic but carry planted structure, so that a model trained on them has something to learn
and something to get wrong:

- parcels are Voronoi cells with one crop class each (real-PASTIS-like class frequencies),
  separated by one-pixel background borders; some non-agricultural cells are urban, forest or
  water (all class 0, Background), and a few parcels on the patch edge get the void label;
- each class has its own NDVI phenology (double logistic: green-up, peak, senescence, plus
  autumn emergence for winter crops, a flowering dip for rapeseed, mowing cuts for meadows
  and fodder), jittered per parcel and per pixel; winter cereals share one shape, and so do
  corn / sorghum / soybean, so classes overlap as they do in real data;
- Sentinel-2 reflectances are derived from the target NDVI (NIR from vegetation cover, red
  from NIR and NDVI, blue from red), so NDVI, EVI and SAVI computed from the bands are
  consistent with the planted curve; plus per-pixel noise, clouds (bright in all bands) on
  random areas of random dates, and rare no-data (all-zero) corners;
- each patch has its own irregular date list (a random subset of its tile's 5-day grid
  between 2018-09-01 and 2019-11-01).

Deterministic for a given seed. Quick start:
`python -m pimc_dist.sources.fixtures --out /tmp/PASTIS --patches 10 --size 32`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

import numpy as np

from pimc_dist.sources.pastis import (
    CLASSES,
    FOLDS,
    METADATA_FILE,
    REFERENCE_DATE,
    S1_BANDS,
    S2_BANDS,
    VOID_LABEL,
)

SEASON_END = dt.date(2019, 11, 1)
# Real PASTIS tiles with rough Lambert-93 (EPSG:2154) centres for the patch footprints.
TILES = {
    "T30UXV": (390_000.0, 6_800_000.0),
    "T31TFJ": (860_000.0, 6_300_000.0),
    "T31TFM": (850_000.0, 6_560_000.0),
    "T32ULU": (1_010_000.0, 6_830_000.0),
}
# Rough class frequencies of the real parcels (meadow and wheat dominate).
CLASS_WEIGHTS = {
    1: 0.26, 2: 0.14, 3: 0.12, 4: 0.05, 5: 0.04, 6: 0.02, 7: 0.03, 8: 0.05, 9: 0.01,
    10: 0.03, 11: 0.03, 12: 0.03, 13: 0.01, 14: 0.05, 15: 0.02, 16: 0.02, 17: 0.02, 18: 0.01,
}  # fmt: skip

# NDVI phenology per crop class; days since REFERENCE_DATE (2018-09-01): Jan 1 = 122,
# Mar 1 = 181, May 1 = 242, Jul 1 = 303, Sep 1 = 365. `autumn` = (day, amplitude) of the
# autumn emergence of winter crops, `dip` = (day, depth) of a flowering dip, `cuts` = how many
# mowing cuts a season has (meadows, fodder), `jitter` = per-parcel spread of the dates (days).
_WINTER_CEREAL = dict(base=0.2, amp=0.62, up=182, down=290, autumn=(75, 0.15), jitter=9)
_SUMMER_ROW = dict(base=0.18, amp=0.68, up=272, down=378, jitter=9)
PHENOLOGY: dict[int, dict] = {
    1: dict(base=0.45, amp=0.3, up=195, down=405, cuts=(1, 3), jitter=12),  # meadow
    2: dict(_WINTER_CEREAL),  # soft winter wheat
    3: dict(_SUMMER_ROW, amp=0.72),  # corn
    4: dict(_WINTER_CEREAL, up=170, down=276),  # winter barley: a little earlier
    # winter rapeseed: green from autumn, dip while flowering in April
    5: dict(base=0.2, amp=0.45, up=170, down=285, autumn=(25, 0.35), dip=(228, 0.15), jitter=8),
    6: dict(base=0.18, amp=0.6, up=218, down=300, jitter=9),  # spring barley
    7: dict(base=0.18, amp=0.58, up=258, down=340, jitter=9),  # sunflower
    8: dict(base=0.25, amp=0.3, up=245, down=390, jitter=10),  # grapevine: soil between rows
    9: dict(base=0.18, amp=0.68, up=250, down=405, jitter=10),  # beet: late harvest
    10: dict(_WINTER_CEREAL, up=178, down=286),  # winter triticale
    11: dict(_WINTER_CEREAL, up=176, down=283),  # winter durum wheat
    12: dict(base=0.2, amp=0.5, up=240, down=320, jitter=30),  # fruits, vegetables, flowers
    13: dict(base=0.18, amp=0.62, up=252, down=330, jitter=9),  # potatoes
    14: dict(base=0.4, amp=0.4, up=200, down=400, cuts=(2, 4), jitter=12),  # leguminous fodder
    15: dict(_SUMMER_ROW, amp=0.62, up=282, down=372),  # soybeans
    16: dict(base=0.35, amp=0.35, up=225, down=410, jitter=10),  # orchard
    17: dict(_WINTER_CEREAL, up=180, down=288),  # mixed cereal
    18: dict(_SUMMER_ROW, up=280, down=385),  # sorghum
}
PERENNIAL = {1, 8, 14, 16}  # no autumn-2019 sowing for these
# Non-agricultural cover, all labelled Background: NDVI model and a brightness factor.
BACKGROUND_KINDS = {
    "urban": dict(p=0.5, pheno=dict(base=0.12, amp=0.04, up=220, down=380, jitter=5), bright=1.15),
    "forest": dict(p=0.3, pheno=dict(base=0.55, amp=0.3, up=225, down=410, jitter=8), bright=0.9),
    "water": dict(p=0.2, pheno=dict(base=-0.25, amp=0.0, up=200, down=300, jitter=0), bright=0.15),
}
P_BACKGROUND_CELL = 0.2
P_VOID_EDGE_PARCEL = 0.15
P_CLOUDY_DATE = 0.3
P_OVERCAST_DATE = 0.06
P_NODATA_DATE = 0.03
# Clouds are bright and flat across VNIR, darker in SWIR; scaled by a 0.35-0.6 whiteness.
CLOUD_SPECTRUM = np.array([1.0, 1.0, 1.02, 1.03, 1.04, 1.05, 1.06, 1.06, 0.75, 0.55])
NDVI_PIXEL_NOISE = 0.025  # per pixel and date
REFLECTANCE_NOISE = 0.003  # per band, pixel and date


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ndvi_curves(params: dict[str, np.ndarray], days: np.ndarray) -> np.ndarray:
    """NDVI (n_pixels, T) from per-pixel phenology parameters at `days`."""
    t = days[None, :]
    up, down = params["up"][:, None], params["down"][:, None]
    ndvi = params["base"][:, None] + params["amp"][:, None] * (
        _sigmoid((t - up) / 9.0) - _sigmoid((t - down) / 11.0)
    )
    # Previous season's crop dying off in Sep-Oct 2018, and a possible sowing in autumn 2019.
    ndvi += params["prev_amp"][:, None] * (1.0 - _sigmoid((t - params["prev_end"][:, None]) / 6.0))
    ndvi += params["next_amp"][:, None] * _sigmoid((t - params["next_day"][:, None]) / 8.0)
    ndvi += params["autumn_amp"][:, None] * (
        _sigmoid((t - params["autumn_day"][:, None]) / 8.0) * (1.0 - _sigmoid((t - up) / 9.0))
    )
    # Flowering dip (rapeseed) and mowing cuts: a drop that recovers over a few weeks.
    for key in ("dip", "cut0", "cut1", "cut2", "cut3"):
        day, depth = params[key + "_day"][:, None], params[key + "_depth"][:, None]
        after = np.clip(t - day, 0.0, None)
        ndvi -= depth * (t >= day) * np.exp(-after / 18.0)
    return ndvi


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1) of shape (size, size): bilinear upsampling of a grid."""
    grid = rng.random((cells + 1, cells + 1))
    x = np.linspace(0, cells, size)
    i = np.minimum(x.astype(int), cells - 1)
    f = x - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _tile_grid(offset: int) -> list[dt.date]:
    """Every fifth day from REFERENCE_DATE + offset until SEASON_END (Sentinel-2A+B revisit)."""
    first = REFERENCE_DATE + dt.timedelta(days=offset)
    n_days = (SEASON_END - first).days
    return [first + dt.timedelta(days=d) for d in range(0, n_days + 1, 5)]


def _date_dict(dates: list[dt.date]) -> dict[str, int]:
    return {str(i): int(d.strftime("%Y%m%d")) for i, d in enumerate(dates)}


def _layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells (size, size) and a border mask between cells."""
    n_cells = max(4, round(size * size / 260))
    seeds = rng.random((n_cells, 2)) * size
    weights = rng.random(n_cells) * size * 0.15  # uneven parcel sizes
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy[..., None] + 0.5 - seeds[:, 0], xx[..., None] + 0.5 - seeds[:, 1])
    cells = np.argmin(dist - weights, axis=-1)
    border = np.zeros((size, size), dtype=bool)
    border[:-1, :] |= cells[:-1, :] != cells[1:, :]
    border[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    return cells, border


def _cell_params(rng: np.random.Generator, pheno: dict, n_cuts: int) -> dict[str, float]:
    """Phenology parameters of one parcel: the class model plus parcel-level jitter."""
    jitter = pheno.get("jitter", 0)
    up = pheno["up"] + rng.normal(0, jitter)
    down = pheno["down"] + rng.normal(0, jitter)
    down = max(down, up + 30)
    autumn_day, autumn_amp = pheno.get("autumn", (0.0, 0.0))
    dip_day, dip_depth = pheno.get("dip", (0.0, 0.0))
    params = {
        "base": pheno["base"] + rng.normal(0, 0.03),
        "amp": pheno["amp"] * rng.uniform(0.85, 1.1),
        "up": up,
        "down": down,
        "autumn_day": autumn_day + rng.normal(0, 8),
        "autumn_amp": autumn_amp * rng.uniform(0.7, 1.2),
        "dip_day": dip_day + rng.normal(0, 5),
        "dip_depth": dip_depth * rng.uniform(0.6, 1.2),
        "prev_amp": 0.0,
        "prev_end": 0.0,
        "next_amp": 0.0,
        "next_day": 1000.0,
    }
    cut_days = np.sort(rng.uniform(up + 30, down - 20, size=n_cuts)) if n_cuts else []
    for k in range(4):
        params[f"cut{k}_day"] = float(cut_days[k]) if k < n_cuts else 1000.0
        params[f"cut{k}_depth"] = rng.uniform(0.15, 0.3) if k < n_cuts else 0.0
    return params


def _reflectance(ndvi: np.ndarray, bright: np.ndarray) -> np.ndarray:
    """Ten S2 reflectances (..., 10) whose NDVI is exactly `ndvi`, from a cover fraction."""
    cover = np.clip((ndvi - 0.1) / 0.75, 0.0, 1.0)
    nir = bright * (0.2 + 0.25 * cover)
    red = nir * (1.0 - ndvi) / (1.0 + ndvi)
    blue = 0.55 * red + 0.015 * bright
    green = 0.5 * (blue + red) + 0.03 * cover + 0.005
    span = nir - red
    bands = [
        blue,  # B02
        green,  # B03
        red,  # B04
        red + 0.25 * span,  # B05 red edge
        red + 0.65 * span,  # B06
        red + 0.85 * span,  # B07
        nir,  # B08
        1.03 * nir,  # B8A
        bright * (0.28 - 0.1 * cover),  # B11 SWIR
        bright * (0.2 - 0.11 * cover),  # B12
    ]
    return np.stack(bands, axis=-1)


def _patch(
    rng: np.random.Generator,
    size: int,
    s2_days: np.ndarray,
    s1_days: list[np.ndarray],
    planted: bool,
) -> dict[str, np.ndarray | int | float]:
    """Arrays of one patch: S2 DNs, target, parcel ids (local 1..n), S1 series."""
    cells, border = _layout(rng, size)
    n_cells = int(cells.max()) + 1
    classes = np.zeros(n_cells, dtype=np.int64)
    kinds: list[str] = []
    crop_ids = np.array(sorted(CLASS_WEIGHTS))
    crop_p = np.array([CLASS_WEIGHTS[c] for c in crop_ids])
    crop_p /= crop_p.sum()
    bg_names = list(BACKGROUND_KINDS)
    bg_p = np.array([BACKGROUND_KINDS[k]["p"] for k in bg_names])
    for c in range(n_cells):
        if rng.random() < P_BACKGROUND_CELL:
            kinds.append(str(rng.choice(bg_names, p=bg_p)))
        else:
            kinds.append("crop")
            classes[c] = rng.choice(crop_ids, p=crop_p)

    # A few parcels cut by the patch edge get the void label, as in PASTIS.
    edge = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    void = np.zeros(n_cells, dtype=bool)
    for c in edge:
        void[c] = kinds[c] == "crop" and rng.random() < P_VOID_EDGE_PARCEL

    is_crop = np.array([k == "crop" for k in kinds])
    parcel_of_cell = np.zeros(n_cells, dtype=np.int64)
    parcel_of_cell[is_crop] = np.arange(1, is_crop.sum() + 1)
    label_of_cell = np.where(void, VOID_LABEL, classes)

    labels = label_of_cell[cells]
    parcels = parcel_of_cell[cells]
    labels[border] = 0
    parcels[border] = 0
    counts = {
        "n_parcel": len(np.unique(parcels[parcels > 0])),
        "parcel_cover": float((parcels > 0).mean()),
    }
    T = len(s2_days)

    if not planted:
        s2 = rng.integers(1, 10000, size=(T, len(S2_BANDS), size, size)).astype(np.int16)
        s1 = [
            rng.normal(-15, 4, size=(len(d), len(S1_BANDS), size, size)).astype(np.float32)
            for d in s1_days
        ]
        return dict(s2=s2, labels=labels, parcels=parcels, s1=s1, **counts)

    # Per-cell phenology, then per-pixel jitter around it.
    cell_params = []
    cell_bright = np.empty(n_cells)
    for c in range(n_cells):
        if kinds[c] == "crop":
            pheno = PHENOLOGY[int(classes[c])]
            low, high = pheno.get("cuts", (0, 0))
            p = _cell_params(rng, pheno, int(rng.integers(low, high + 1)) if high else 0)
            p["prev_amp"] = rng.uniform(0.05, 0.45)
            p["prev_end"] = rng.uniform(5, 55)
            if int(classes[c]) not in PERENNIAL and rng.random() < 0.5:
                p["next_amp"], p["next_day"] = rng.uniform(0.05, 0.2), rng.uniform(400, 425)
            cell_bright[c] = rng.uniform(0.85, 1.15)
        else:
            kind = BACKGROUND_KINDS[kinds[c]]
            p = _cell_params(rng, kind["pheno"], 0)
            cell_bright[c] = kind["bright"] * rng.uniform(0.9, 1.1)
        cell_params.append(p)
    flat = cells.ravel()
    params = {k: np.array([p[k] for p in cell_params])[flat] for k in cell_params[0]}
    n_pix = flat.size
    params["base"] = params["base"] + rng.normal(0, 0.02, n_pix)
    params["up"] = params["up"] + rng.normal(0, 2.0, n_pix)
    params["down"] = params["down"] + rng.normal(0, 2.0, n_pix)
    # Roads and hedges between parcels: dull, urban-like.
    on_border = border.ravel()
    params["base"][on_border] = 0.15 + rng.normal(0, 0.03, on_border.sum())
    params["amp"][on_border] *= 0.3
    bright = cell_bright[flat] * rng.uniform(0.95, 1.05, n_pix)

    ndvi = _ndvi_curves(params, s2_days) + rng.normal(0, NDVI_PIXEL_NOISE, (n_pix, T))
    ndvi = np.clip(ndvi, -0.6, 0.95)
    refl = _reflectance(ndvi, bright[:, None])  # (n_pix, T, 10)
    refl += rng.normal(0, REFLECTANCE_NOISE, refl.shape)
    refl = refl.reshape(size, size, T, len(S2_BANDS)).transpose(2, 3, 0, 1)  # T, C, H, W

    # Clouds: bright in all bands over a random blob, sometimes the whole patch.
    nodata = np.zeros((T, size, size), dtype=bool)
    for t in range(T):
        if rng.random() < P_OVERCAST_DATE:
            alpha = np.full((size, size), rng.uniform(0.8, 1.0))
        elif rng.random() < P_CLOUDY_DATE:
            field = _smooth_field(rng, size, int(rng.integers(2, 5)))
            cover = rng.uniform(0.05, 0.7)
            alpha = np.clip((field - np.quantile(field, 1 - cover)) * 6.0, 0.0, 1.0)
        else:
            alpha = None
        if alpha is not None:
            whiteness = 0.35 + 0.25 * _smooth_field(rng, size, 3)
            cloud = CLOUD_SPECTRUM[:, None, None] * whiteness
            refl[t] = (1 - alpha) * refl[t] + alpha * cloud
        if rng.random() < P_NODATA_DATE:  # swath edge: a no-data corner
            yy, xx = np.mgrid[0:size, 0:size]
            nodata[t] = yy + xx < rng.uniform(0.2, 0.8) * size
    s2 = np.clip(np.round(refl * 10000.0), 1, 32767).astype(np.int16)
    s2[np.broadcast_to(nodata[:, None], s2.shape)] = 0

    s1 = []
    cover_bias = {"crop": 0.0, "urban": 8.0, "forest": 2.0, "water": -10.0}
    bias = np.array([cover_bias[k] for k in kinds])[flat][:, None]
    for days in s1_days:
        veg = np.clip((np.clip(_ndvi_curves(params, days), -0.6, 0.95) - 0.1) / 0.75, 0, 1)
        vh = -24.0 + 10.0 * veg + bias + rng.normal(0, 1.5, veg.shape)
        vv = -14.0 + 4.0 * veg + bias + rng.normal(0, 1.5, veg.shape)
        ratio = 10.0 ** ((vv - vh) / 10.0)  # VV/VH in linear power
        arr = np.stack([vv, vh, ratio], axis=-1).reshape(size, size, len(days), len(S1_BANDS))
        s1.append(arr.transpose(2, 3, 0, 1).astype(np.float32))
    return dict(s2=s2, labels=labels, parcels=parcels, s1=s1, **counts)


def _fold_stats(per_patch: list[tuple[int, np.ndarray, np.ndarray]]) -> dict:
    """NORM_*_patch.json content: per fold, the mean over its patches of channel mean/std."""
    stats = {}
    for fold in FOLDS:
        rows = [(m, s) for f, m, s in per_patch if f == fold] or [(m, s) for _, m, s in per_patch]
        stats[f"Fold_{fold}"] = {
            "mean": np.mean([m for m, _ in rows], axis=0).round(4).tolist(),
            "std": np.mean([s for _, s in rows], axis=0).round(4).tolist(),
        }
    return stats


def write_pastis(
    root: str | os.PathLike,
    *,
    n_patches: int = 10,
    size: int = 128,
    n_dates_range: tuple[int, int] = (38, 61),
    with_s1: bool = False,
    seed: int = 0,
    planted: bool = True,
) -> Path:
    """Write a synthetic PASTIS (PASTIS-R with `with_s1`) dataset under `root`; return `root`."""
    lo, hi = n_dates_range
    if n_patches < 1 or size < 8:
        raise ValueError("need n_patches >= 1 and size >= 8")
    if not 1 <= lo <= hi <= len(_tile_grid(4)):
        raise ValueError(
            f"n_dates_range must lie within 1..{len(_tile_grid(4))}, got {n_dates_range}"
        )
    rng = np.random.default_rng(seed)
    root = Path(root)
    for folder in ["DATA_S2", "ANNOTATIONS"] + (["DATA_S1A", "DATA_S1D"] if with_s1 else []):
        (root / folder).mkdir(parents=True, exist_ok=True)

    tile_names = list(TILES)
    tile_offsets = {t: i for i, t in enumerate(tile_names)}
    folds = (rng.permutation(n_patches) % len(FOLDS)) + 1
    id_patch = 10000
    next_parcel = 1
    features = []
    norm_s2: list[tuple[int, np.ndarray, np.ndarray]] = []
    norm_s1: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {"S1A": [], "S1D": []}
    for i in range(n_patches):
        id_patch += int(rng.integers(1, 40))  # real ids are sparse
        tile = tile_names[int(rng.integers(len(tile_names)))]
        grid = _tile_grid(tile_offsets[tile])
        n_dates = int(rng.integers(lo, hi + 1))
        dates = [grid[k] for k in np.sort(rng.choice(len(grid), n_dates, replace=False))]
        s1_dates = {}
        if with_s1:
            for orbit, offset in (("S1A", 1), ("S1D", 4)):
                full = [REFERENCE_DATE + dt.timedelta(days=d) for d in range(offset, 426, 6)]
                n_kept = int(rng.integers(len(full) - 6, len(full) + 1))
                keep = np.sort(rng.choice(len(full), n_kept, replace=False))
                s1_dates[orbit] = [full[k] for k in keep]
        days = np.array([(d - REFERENCE_DATE).days for d in dates], dtype=np.float64)
        s1_days = [
            np.array([(d - REFERENCE_DATE).days for d in s1_dates[o]], float) for o in s1_dates
        ]
        arrays = _patch(rng, size, days, s1_days, planted)

        parcels = arrays["parcels"]
        global_ids = np.where(parcels > 0, parcels + next_parcel - 1, 0).astype(np.int32)
        next_parcel += int(parcels.max())
        target = np.stack([arrays["labels"]] * 3).astype(np.uint8)  # channel 0 is the class
        np.save(root / "DATA_S2" / f"S2_{id_patch}.npy", arrays["s2"])
        np.save(root / "ANNOTATIONS" / f"TARGET_{id_patch}.npy", target)
        np.save(root / "ANNOTATIONS" / f"ParcelIDs_{id_patch}.npy", global_ids)
        s2 = arrays["s2"].astype(np.float64)
        norm_s2.append((int(folds[i]), s2.mean(axis=(0, 2, 3)), s2.std(axis=(0, 2, 3))))
        for orbit, s1 in zip(s1_dates, arrays["s1"], strict=True):
            np.save(root / f"DATA_{orbit}" / f"{orbit}_{id_patch}.npy", s1)
            norm_s1[orbit].append((int(folds[i]), s1.mean(axis=(0, 2, 3)), s1.std(axis=(0, 2, 3))))

        cx, cy = TILES[tile]
        x0 = cx + 1280.0 * int(rng.integers(-40, 40))
        y0 = cy + 1280.0 * int(rng.integers(-40, 40))
        extent = 10.0 * size
        properties = {
            "ID_PATCH": id_patch,
            "N_Parcel": arrays["n_parcel"],
            "Parcel_Cover": round(arrays["parcel_cover"], 6),
            "TILE": tile,
            "dates-S2": _date_dict(dates),
            "Fold": int(folds[i]),
        }
        for orbit, orbit_dates in s1_dates.items():
            properties[f"dates-{orbit}"] = _date_dict(orbit_dates)
        ring = [
            [x0, y0],
            [x0 + extent, y0],
            [x0 + extent, y0 + extent],
            [x0, y0 + extent],
            [x0, y0],
        ]
        features.append(
            {
                "type": "Feature",
                "id": str(i),
                "properties": properties,
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        )

    collection = {
        "type": "FeatureCollection",
        "name": "metadata",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}},
        "features": features,
    }
    (root / METADATA_FILE).write_text(json.dumps(collection), encoding="utf-8")
    (root / "NORM_S2_patch.json").write_text(json.dumps(_fold_stats(norm_s2)), encoding="utf-8")
    for orbit, rows in norm_s1.items():
        if rows:
            (root / f"NORM_{orbit}_patch.json").write_text(json.dumps(_fold_stats(rows)))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.sources.fixtures",
        description="Write a synthetic PASTIS dataset (real layout, planted crop phenology).",
        epilog="example: python -m pimc_dist.sources.fixtures --out /tmp/PASTIS --size 32",
    )
    parser.add_argument("--out", required=True, help="folder to write (becomes the PASTIS root)")
    parser.add_argument("--patches", type=int, default=10, help="number of patches (default 10)")
    parser.add_argument("--size", type=int, default=128, help="patch side in pixels (default 128)")
    parser.add_argument("--min-dates", type=int, default=38, help="fewest S2 dates per patch")
    parser.add_argument("--max-dates", type=int, default=61, help="most S2 dates per patch")
    parser.add_argument("--s1", action="store_true", help="also write PASTIS-R S1A/S1D series")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", action="store_true", help="random values, no planted structure")
    args = parser.parse_args(argv)
    root = write_pastis(
        args.out,
        n_patches=args.patches,
        size=args.size,
        n_dates_range=(args.min_dates, args.max_dates),
        with_s1=args.s1,
        seed=args.seed,
        planted=not args.random,
    )
    print(
        f"wrote {args.patches} PASTIS patches ({CLASSES[0]} + {len(CLASSES) - 2} crops) to {root}"
    )


if __name__ == "__main__":
    main()
