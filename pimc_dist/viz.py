"""Pictures a person looks at: shard samples, training curves, sweep results.

    python -m pimc_dist.viz samples shards/demo --out samples.png
    python -m pimc_dist.viz curves runs/tiny --out curves.png
    python -m pimc_dist.viz sweep runs/sweep/results.csv --out sweep.png

Each command writes a PNG and prints its path. `samples` draws, per sample,
the NDVI, EVI and SAVI recurrence plots, the crop as RGB (B04, B03, B02) and
the label; `curves` the loss, learning rate and throughput from
`metrics.jsonl`; `sweep` a bar chart of a sweep's `results.csv`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pimc_dist import shardio
from pimc_dist.tracking import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _stretch(x: np.ndarray) -> np.ndarray:
    """Percentile stretch to [0, 1] for display."""
    x = x.astype(np.float32)
    lo, hi = np.percentile(x, [2, 98])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)


def read_samples(shard_dir: str | Path, n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The first `n` decoded samples of a shard set, and its class list."""
    manifest = shardio.read_manifest(shard_dir)
    out: list[dict[str, Any]] = []
    for path in manifest.shard_paths():
        for raw in shardio.iter_shard_samples(path, limit=n - len(out)):
            sample: dict[str, Any] = {"__key__": raw["__key__"]}
            for name, data in raw.items():
                if name.endswith(".npy"):
                    sample[name[:-4]] = shardio.decode_npy(data)
                elif name.endswith(".png"):
                    sample[name[:-4]] = shardio.decode_png(data)
                elif name == "json":
                    import json

                    sample["meta"] = json.loads(data)
            out.append(sample)
        if len(out) >= n:
            break
    return out, list(manifest.classes)


def plot_samples(shard_dir: str | Path, out: str | Path, n: int = 8) -> Path:
    """A grid: one row per sample, columns = plot channels, crop / image, label."""
    plt = _pyplot()
    samples, classes = read_samples(shard_dir, n)
    if not samples:
        raise ValueError(f"{shard_dir}: the shard set holds no samples")
    columns = []
    if "rp" in samples[0]:
        columns += [("rp", 0, "NDVI plot"), ("rp", 1, "EVI plot"), ("rp", 2, "SAVI plot")]
    for view in ("rsi", "s2", "image", "s1"):
        if view in samples[0]:
            columns.append(
                (
                    view,
                    None,
                    {"rsi": "crop (RGB)", "s2": "S2 (RGB)", "image": "image", "s1": "S1 VV"}[view],
                )
            )
    fig, axes = plt.subplots(
        len(samples), len(columns), figsize=(2.2 * len(columns), 2.2 * len(samples)), squeeze=False
    )
    for row, sample in enumerate(samples):
        meta = sample.get("meta", {})
        label = meta.get("label_name") or meta.get("label_names")
        if (
            label is None
            and isinstance(meta.get("label"), int)
            and 0 <= meta["label"] < len(classes)
        ):
            label = classes[meta["label"]]
        for col, (view, channel, title) in enumerate(columns):
            ax = axes[row][col]
            x = sample[view]
            if channel is not None:
                ax.imshow(x[channel], cmap="viridis", vmin=0, vmax=255)
            elif x.shape[0] >= 3:
                ax.imshow(_stretch(x[[2, 1, 0]].transpose(1, 2, 0)))
            else:
                ax.imshow(_stretch(x[0]), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        axes[row][0].set_ylabel(f"{label}", fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_curves(run_dir: str | Path, out: str | Path) -> Path:
    """Loss (and its terms), learning rate and samples/s against step, from metrics.jsonl."""
    plt = _pyplot()
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    rows = [r for r in rows if "loss" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl: no training rows to plot")
    steps = [r["step"] for r in rows]
    panels = [
        ("loss", [k for k in rows[-1] if k == "loss" or k.startswith("loss/")]),
        ("lr", ["lr"]),
        ("samples/s", ["samples_per_s"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            values = [
                float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in rows
            ]
            ax.plot(steps, values, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def plot_sweep(results_csv: str | Path, out: str | Path, metric: str | None = None) -> Path:
    """Bar chart of a sweep's results.csv: mean metric per (task, protocol, ...) with std over seeds."""
    plt = _pyplot()
    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{results_csv}: no rows")
    numeric = [
        k for k in rows[0] if _is_number(rows[0][k]) and k not in ("seed", "lr", "label_fraction")
    ]
    metric = metric or next((k for k in numeric if not k.endswith("_s")), None)
    if metric is None:
        raise ValueError(f"{results_csv}: no numeric metric column")
    groups: dict[str, list[float]] = {}
    for r in rows:
        key = " / ".join(r[k] for k in ("task", "protocol", "label_fraction") if k in r)
        if _is_number(r.get(metric, "")):
            groups.setdefault(key, []).append(float(r[metric]))
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.bar(
        range(len(names)),
        [np.mean(groups[k]) for k in names],
        yerr=[np.std(groups[k]) for k in names],
    )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    fig.tight_layout()
    return _save(fig, out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _save(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.viz",
        description="PNG pictures of shard samples, training curves and sweep results.",
        epilog="example: python -m pimc_dist.viz samples shards/demo --out samples.png",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("samples", help="grid of samples from a shard set")
    p.add_argument("shards", help="shard folder (holds manifest.json)")
    p.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--out", default="samples.png")
    p = sub.add_parser("curves", help="training curves from <run_dir>/metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default <run_dir>/curves.png")
    p = sub.add_parser("sweep", help="bar chart of a sweep's results.csv")
    p.add_argument("results_csv")
    p.add_argument("--metric", default=None)
    p.add_argument("--out", default="sweep.png")
    args = parser.parse_args(argv)
    try:
        if args.what == "samples":
            path = plot_samples(args.shards, args.out, args.n)
        elif args.what == "curves":
            path = plot_curves(args.run_dir, args.out or Path(args.run_dir) / "curves.png")
        else:
            path = plot_sweep(args.results_csv, args.out, args.metric)
    except (OSError, ValueError, shardio.ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
