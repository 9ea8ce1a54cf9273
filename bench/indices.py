"""Time `index_series` (DN -> cleaned NDVI/EVI/SAVI on a regular grid) and `sample_pixels`.

One PASTIS-sized patch (61 dates x 10 bands x 128 x 128, int16 DN, 30 % cloudy pixel-dates) runs
through the vectorised chain; the reference is the same chain written per pixel (Python loop,
np.interp), timed on a subset of pixels and scaled to the patch. Both run in the same process.

    python bench/indices.py [--repeats 5] [--reference-pixels 256]

Prints a table and writes bench/results/indices.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

from pimc_dist.indices import index_series
from pimc_dist.pixel_selection import sample_pixels

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
RESULTS = Path(__file__).resolve().parent / "results" / "indices.json"


def reference_pixel(dn: np.ndarray, valid: np.ndarray, days: np.ndarray, grid: np.ndarray):
    """The chain for one pixel's (T, C) DN, without vectorisation across pixels."""
    blue, red, nir = dn[:, 0] / 1e4, dn[:, 2] / 1e4, dn[:, 6] / 1e4
    usable = valid & (dn[:, [0, 2, 6]] != 0).all(axis=1)
    out = []
    for value, denominator in (
        ((nir - red) / (nir + red), nir + red),
        (2.5 * (nir - red) / (nir + 6 * red - 7.5 * blue + 1), nir + 6 * red - 7.5 * blue + 1),
        (1.5 * (nir - red) / (nir + red + 0.5), nir + red + 0.5),
    ):
        ok = usable & (np.abs(denominator) >= 1e-3)
        if not ok.any():
            return None
        filled = np.interp(days, days[ok], np.clip(value[ok], -1, 1))
        out.append(np.interp(grid, days, filled))
    return np.stack(out)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-pixels", type=int, default=256)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n_dates, size = 61, 128
    gaps = rng.integers(2, 12, size=n_dates - 1)
    days = np.concatenate([[0], np.cumsum(gaps)]).astype(np.float64)
    dates = [dt.date(2018, 9, 24) + dt.timedelta(days=int(d)) for d in days]
    bands = rng.integers(1, 7000, size=(n_dates, 10, size, size)).astype(np.int16)
    valid = rng.random((n_dates, size, size)) > 0.3

    ours = best_time(lambda: index_series(bands, BANDS, dates, valid=valid), args.repeats)
    result = index_series(bands, BANDS, dates, valid=valid)
    grid = np.array([(g - dates[0]).days for g in result.grid_dates], dtype=np.float64)

    flat_bands = bands.reshape(n_dates, 10, -1).astype(np.float64)
    flat_valid = valid.reshape(n_dates, -1)
    pixels = rng.choice(size * size, args.reference_pixels, replace=False)

    def run_reference():
        return [reference_pixel(flat_bands[:, :, p], flat_valid[:, p], days, grid) for p in pixels]

    reference = best_time(run_reference, max(1, args.repeats // 2)) * size * size / len(pixels)
    flat_series = result.series.reshape(3, len(grid), -1)
    max_diff = max(
        float(np.abs(flat_series[:, :, p] - want).max())
        for p, want in zip(pixels, run_reference(), strict=True)
        if want is not None
    )

    mask = np.ones((size, size), dtype=bool)
    labels = rng.integers(0, 20, size=(size, size))
    sample_s = best_time(lambda: sample_pixels(mask, 64, seed=1), args.repeats)
    stratified_s = best_time(
        lambda: sample_pixels(mask, 64, labels=labels, stratify=True, exclude_labels=(19,)),
        args.repeats,
    )

    rows = [
        ("index_series, 61x10x128x128 patch", ours),
        ("per-pixel reference (scaled)", reference),
        ("sample_pixels k=64", sample_s),
        ("sample_pixels k=64 stratified", stratified_s),
    ]
    print(f"{'step':40s} {'seconds':>10s}")
    for name, seconds in rows:
        print(f"{name:40s} {seconds:10.4f}")
    print(f"index_series speed-up over per-pixel reference: {reference / ours:.1f}x")
    print(f"max |ours - reference| on {len(pixels)} pixels: {max_diff:.2e}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "patch": [n_dates, 10, size, size],
                "index_series_s": ours,
                "per_pixel_reference_s": reference,
                "speedup": reference / ours,
                "max_abs_diff": max_diff,
                "sample_pixels_s": sample_s,
                "sample_pixels_stratified_s": stratified_s,
            },
            indent=2,
        )
    )
    print(f"results written to {RESULTS}")


if __name__ == "__main__":
    main()
