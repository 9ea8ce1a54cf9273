"""Pictures a person looks at: shard samples, training curves, sweep results.

    python -m pimc_dist.viz samples shards/demo --out samples.png
    python -m pimc_dist.viz curves runs/tiny --out curves.png
    python -m pimc_dist.viz sweep runs/sweep --out sweep.png    # or runs/sweep/results.csv

Each command writes a PNG and prints its path. `samples` draws, per sample,
the NDVI, EVI and SAVI recurrence plots, the crop as RGB (B04, B03, B02) and
the label; `curves` the loss, learning rate, throughput and validation scores
from `metrics.jsonl`; `sweep` a bar chart of a sweep's `results.csv` (each task's
primary test metric per setting, mean and std over seeds).

Tracked runs send their pictures to W&B too (`log_pngs`): a fine-tuning run its
confusion matrix and curves, a sweep's summary run its results plot.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pimc_dist import shardset
from pimc_dist.eval.tasks import TASKS
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
    manifest = shardset.read_manifest(shard_dir)
    out: list[dict[str, Any]] = []
    for path in manifest.shard_paths():
        for raw in shardset.iter_shard_samples(path, limit=n - len(out)):
            sample: dict[str, Any] = {"__key__": raw["__key__"]}
            for name, data in raw.items():
                if name.endswith(".npy"):
                    sample[name[:-4]] = shardset.decode_npy(data)
                elif name.endswith(".png"):
                    sample[name[:-4]] = shardset.decode_png(data)
                elif name == "json":
                    sample["meta"] = shardset.decode_meta(data, manifest)
            out.append(sample)
        if len(out) >= n:
            break
    return out, list(manifest.classes)


def plot_samples(shard_dir: str | Path, out: str | Path, n: int = 8) -> Path:
    """A grid: one row per sample, columns = plot channels, crop / image, label."""
    plt = _pyplot()
    out = _out_path(out, "samples.png")
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


def plot_curves(
    run_dir: str | Path, out: str | Path, rows: list[dict[str, Any]] | None = None
) -> Path:
    """Training curves against step from metrics.jsonl (or from `rows` like its lines): loss
    (and its terms), learning rate, samples/s and validation scores, whichever were logged."""
    plt = _pyplot()
    out = _out_path(out, "curves.png")
    if rows is None:
        metrics = Path(run_dir) / "metrics.jsonl"
        if not Path(run_dir).is_dir():
            raise ValueError(f"{run_dir}: no such run folder")
        if not metrics.is_file():
            raise ValueError(
                f"{run_dir}: no metrics.jsonl in this run folder (is it a run folder?)"
            )
        rows = read_metrics(metrics)
    rows = [r for r in rows if any(_is_loss(k) for k in r)]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl: no training rows to plot")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    panels = [
        ("loss", [k for k in keys if _is_loss(k)]),
        ("lr", [k for k in keys if k == "lr"]),
        ("samples/s", [k for k in keys if k == "samples_per_s"]),
        ("validation", [k for k in keys if k.startswith("val/")]),
    ]
    panels = [(title, names) for title, names in panels if names]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels, strict=True):
        for key in names:
            values = [
                float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in rows
            ]
            ax.plot(steps, values, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(names) > 1 or title == "validation":
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def _is_loss(key: str) -> bool:
    # Pretraining logs loss and loss/<term>; fine-tuning logs finetune/loss per epoch.
    return key == "loss" or key.startswith("loss/") or key.endswith("/loss")


def sweep_groups(
    rows: list[dict[str, str]], metric: str | None = None
) -> dict[str, tuple[str, dict[str, list[float]]]]:
    """Per task: (metric, {setting: values over seeds}) from results.csv rows.

    A setting is every grid axis but the seed (protocol, init, lr, label fraction),
    so pretrained and random-init cells never share a bar. The metric is `metric`,
    else the task's primary test metric (the row's `primary` column, written by
    the sweep; else the task's own).
    """
    out: dict[str, tuple[str, dict[str, list[float]]]] = {}
    for r in rows:
        task = r.get("task", "")
        name = metric or r.get("primary") or (TASKS[task].primary if task in TASKS else None)
        if not name:
            raise ValueError(f"rows of task '{task}' name no primary metric; pass --metric")
        value = r.get(name, "")
        if not _is_number(value) or not math.isfinite(float(value)):
            continue
        setting = f"{r.get('protocol', '?')}/{r.get('init', '-')}"
        if r.get("lr") not in (None, "", "-", "grid"):
            setting += f" lr {r['lr']}"
        if r.get("label_fraction") not in (None, ""):
            setting += f" frac {float(r['label_fraction']):g}"
        out.setdefault(task, (name, {}))[1].setdefault(setting, []).append(float(value))
    return out


def plot_sweep(results_csv: str | Path, out: str | Path, metric: str | None = None) -> Path:
    """Bar chart of a sweep's results.csv (`results_csv` may be the sweep's folder): one panel
    per task, one bar per setting (every grid axis but the seed), the mean test metric over
    seeds with their std."""
    plt = _pyplot()
    results_csv = Path(results_csv)
    if results_csv.is_dir():  # the sweep's folder: its results.csv (what sweep.py writes)
        if not (results_csv / "results.csv").is_file():
            raise ValueError(
                f"{results_csv}: no results.csv in this folder; pass a sweep's folder or its "
                "results.csv (written when the sweep aggregates)"
            )
        results_csv = results_csv / "results.csv"
    elif not results_csv.is_file():
        raise ValueError(f"{results_csv}: no such file; pass a sweep's folder or its results.csv")
    out = _out_path(out, "sweep.png")
    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{results_csv}: no rows")
    try:
        groups = sweep_groups(rows, metric)
    except ValueError as exc:
        raise ValueError(f"{results_csv}: {exc}") from None
    if not groups:
        raise ValueError(f"{results_csv}: no numeric value of {metric or 'the primary metric'}")
    width = max(4.0, max(1.0 * len(g) for _, g in groups.values()))
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), 4.0), squeeze=False)
    for ax, (task, (name, settings)) in zip(axes[0], groups.items(), strict=True):
        labels = list(settings)
        means = [float(np.mean(settings[k])) for k in labels]
        stds = [float(np.std(settings[k], ddof=1)) if len(settings[k]) > 1 else 0.0 for k in labels]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"test {name}")
        ax.set_title(task, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def log_pngs(tracker: Any, images: dict[str, str | Path | None], step: int) -> None:
    """Send PNG files to the tracker's W&B run (a no-op when it has none); None paths are skipped."""
    from PIL import Image

    arrays = {}
    for name, path in images.items():
        if path is not None:
            with Image.open(path) as im:
                arrays[name] = np.asarray(im.convert("RGB"))
    tracker.log_images(arrays, step=step)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _out_path(out: str | Path, name: str) -> Path:
    """Where a picture goes: `out`, `out/name` for a folder, `out` + ".png" without a suffix
    (what matplotlib would write anyway; the path printed must be the file written)."""
    out = Path(out)
    if out.is_dir():
        return out / name
    if not out.suffix:
        return out.with_name(out.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:  # checked before the picture is drawn
        raise ValueError(
            f"{out}: matplotlib cannot write {out.suffix} files; end the name with one of "
            f"{', '.join('.' + f for f in sorted(formats))} (.png when there is no suffix)"
        )
    return out


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
    p.add_argument("results_csv", help="a sweep's results.csv, or the sweep's folder")
    p.add_argument("--metric", default=None, help="default: each task's primary test metric")
    p.add_argument("--out", default="sweep.png")
    args = parser.parse_args(argv)
    try:
        if args.what == "samples":
            path = plot_samples(args.shards, args.out, args.n)
        elif args.what == "curves":
            path = plot_curves(args.run_dir, args.out or Path(args.run_dir) / "curves.png")
        else:
            path = plot_sweep(args.results_csv, args.out, args.metric)
    except (OSError, ValueError, shardset.ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
