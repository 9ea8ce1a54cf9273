"""Loader throughput per worker: our shard pipeline against plain webdataset and raw reads.

Writes a realistic PIMC shard set to a temporary folder (by default 20,000 samples like the
sharder's: a 3x48x48 recurrence-plot PNG made by pimc_dist.recurrence from a 3x61 index
series, stored (zlib level 0, the writer's default), the float16 series, an int16 10x32x32
crop, the JSON metadata with 61 grid dates, stored once in the manifest as the sharder does
(pimc_dist.samples.META_TABLES); about 31 KiB per sample), the same with the PNG deflated at
level 1 (about 27 KiB), and a set without the plots. Then, in this one process
(= one data-loader worker), one full pass each of:

  raw file read          the tar files read in 4 MiB chunks, nothing parsed
  raw tar (ours)         our tar reader: samples as dicts of member bytes
  wds raw                webdataset.WebDataset(urls): samples as dicts of bytes
  wds .decode()          webdataset.WebDataset(urls).decode()  (leaves PNG bytes undecoded)
  wds .decode("rgb8")    the same with the PNG decoded to uint8 arrays
  ours png               ShardStream: shuffle buffer 2000, decode, flips/rotations of the
                         crop, batches of dicts of tensors in the stored dtypes (views rp,
                         rsi), what a worker hands the trainer; the normalisation runs
                         on the training device (ShardLoader.to_device)
  ours png, normalised   the same, normalised on this CPU thread as well (what a CPU-only
                         trainer pays in its own process)
  ours png + series      the same with the series view too
  ours png deflated      plots deflated at zlib level 1 (smaller files, inflated per sample)
  ours rp on the fly     series-only shards, plots computed in the loader (CPU, 1 thread)
  ours via build_loader  "ours png" the way training gets it: pimc_dist.shardset.build_loader
                         with 1 and 2 DataLoader workers, so the hop from worker to trainer
                         (shared memory, pickling) counts; per worker = total / workers,
                         and on a 2-core machine 2 workers share the cores with the trainer

plus the shard write rate (encoding, statistics, sha256, tar), and for MoSAiC (a reBEN-like
sample: uint16 S2 12x120x120, float32 S1 2x120x120 in dB, JSON with 19 multi-hot labels;
about 450 KiB, --mosaic-samples of them):

  ours mosaic            ShardStream over s2+s1 as configs/pretrain/mosaic.yaml reads them
                         (stored dtypes, no flips in the loader)

and what MoSAiC's augmentations (two draws of s2 and s1 with the augment.* settings of
configs/pretrain/mosaic.yaml, pimc_dist.augment) cost on one CPU thread per sample, i.e.
what they would take from a loader worker; pretraining draws them on the training device.
--repeats rounds over all pipelines; the best pass of each counts.

    python bench/loader.py [--samples 20000] [--mosaic-samples 1000] [--batch-size 256] [--repeats 3]

Prints a table and writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_info  # bench/machine.py (this script's folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "loader.json"
T, PLOT, CROP, BANDS = 61, 48, 32, 10
BAND_LEVELS = np.array([600, 900, 800, 1400, 2400, 2800, 3000, 3100, 2000, 1200], np.float32)


def make_samples(first: int, n: int, rng: np.random.Generator) -> list[dict]:
    """`n` PIMC samples shaped like pimc_dist.samples.pimc_samples output."""
    from pimc_dist.recurrence import recurrence_plot_uint8

    t = np.linspace(0, 1, T, dtype=np.float32)
    peak = rng.uniform(0.3, 0.7, (n, 1))
    width = rng.uniform(0.08, 0.25, (n, 1))
    height = rng.uniform(0.0, 0.7, (n, 1))  # 0: bare soil / urban, flat series
    ndvi = 0.15 + height * np.exp(-(((t - peak) / width) ** 2)) + rng.normal(0, 0.03, (n, T))
    series = np.stack([ndvi, 0.65 * ndvi, 0.7 * ndvi], axis=1).clip(-1, 1).astype(np.float32)
    plots = recurrence_plot_uint8(series, size=PLOT)
    # Crops: a few parcels (constant reflectance per band) plus sensor noise.
    yy, xx = np.mgrid[0:CROP, 0:CROP]
    start = dt.date(2018, 9, 24)
    dates = [(start + dt.timedelta(days=10 * k)).isoformat() for k in range(T)]
    samples = []
    for i in range(n):
        angle = rng.uniform(0, np.pi)
        side = (np.cos(angle) * (xx - 16) + np.sin(angle) * (yy - 16)) > rng.normal(0, 6)
        parcel = np.where(side, 1.0, rng.uniform(0.6, 1.4))
        crop = BAND_LEVELS[:, None, None] * parcel[None] * rng.uniform(0.7, 1.3, (BANDS, 1, 1))
        crop += rng.normal(0, 40, crop.shape)
        key = first + i
        samples.append(
            {
                "__key__": f"{10000 + key // 64}_r{key % 128:04d}_c{(key * 7) % 128:04d}",
                "rp.png": plots[i],
                "series.npy": series[i].astype(np.float16),
                "rsi.npy": crop.clip(0, 10000).astype(np.int16),
                "json": {
                    "dataset": "pastis",
                    "patch": str(10000 + key // 64),
                    "row": key % 128,
                    "col": (key * 7) % 128,
                    "dates": dates,
                    "fold": 1 + key % 5,
                    "split": "train",
                    "label": int(rng.integers(0, 20)),
                    "parcel": int(rng.integers(0, 5000)),
                    "crop_padded": False,
                    "n_valid": 40,
                },
            }
        )
    return samples


MOSAIC_S2, MOSAIC_S1, MOSAIC_SIZE = 12, 2, 120
MOSAIC_CLASSES = [f"class{k}" for k in range(19)]
MOSAIC_ROW = "ours mosaic: s2+s1 batches"


def write_mosaic_set(root: Path, n: int, shard_samples: int) -> float:
    """A reBEN-like MoSAiC shard set (uint16 S2 DN, float32 S1 in dB); returns the write time."""
    from pimc_dist.samples import META_TABLES
    from pimc_dist.shardset import ShardSetWriter

    rng = np.random.default_rng(1)
    writer = ShardSetWriter(
        root,
        max_samples=shard_samples,
        source="bench",
        kind="mosaic",
        classes=MOSAIC_CLASSES,
        meta_tables=META_TABLES,
    )
    size = MOSAIC_SIZE
    levels = np.linspace(300, 3000, MOSAIC_S2, dtype=np.float32)[:, None, None]
    seconds = 0.0
    for i in range(n):
        s2 = levels * rng.uniform(0.7, 1.3, (MOSAIC_S2, 1, 1)) + rng.normal(0, 50, (size, size))
        s1 = np.array([-12.0, -19.0], np.float32)[:, None, None] + rng.normal(0, 2, (2, size, size))
        labels = (rng.random(len(MOSAIC_CLASSES)) < 0.15).astype(int)
        sample = {
            "__key__": f"S2A_{i:07d}",
            "s2.npy": s2.clip(0, 10000).astype(np.uint16),
            "s1.npy": s1.astype(np.float32),
            "json": {
                "dataset": "reben",
                "patch": f"S2A_{i:07d}",
                "split": "train",
                "labels": labels.tolist(),
                "label_names": [MOSAIC_CLASSES[k] for k in np.flatnonzero(labels)],
                "s2_bands": [f"B{k:02d}" for k in range(MOSAIC_S2)],
                "s1_bands": ["VV", "VH"],
                "s2_dn_scale": 10000.0,
            },
        }
        t0 = time.perf_counter()
        writer.write(sample)
        seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.close()
    return seconds + time.perf_counter() - t0


def mosaic_augment_rate(manifest, batch_size: int, repeats: int) -> dict[str, float]:
    """Samples/s of two draws of s2 and s1 (configs/pretrain/mosaic.yaml's augment.*) on one
    CPU thread, on normalised float32 batches like the loader's; best of `repeats`."""
    import torch

    from pimc_dist import config as config_lib
    from pimc_dist.augment import ViewAugmenter
    from pimc_dist.shardset import view_stats_arrays

    repo = Path(__file__).resolve().parents[1]
    cfg = config_lib.load(repo / "configs/pretrain/mosaic.yaml", ["data.root=/nowhere"])
    norm = {v: view_stats_arrays(manifest, v) for v in ("s2", "s1")}
    augment = ViewAugmenter.from_config(cfg, norm)
    flips_only = ViewAugmenter()
    g = torch.Generator().manual_seed(0)
    batch = {
        "s2": torch.randn(batch_size, MOSAIC_S2, MOSAIC_SIZE, MOSAIC_SIZE, generator=g),
        "s1": torch.randn(batch_size, MOSAIC_S1, MOSAIC_SIZE, MOSAIC_SIZE, generator=g),
    }
    out = {}
    for name, aug in (("mosaic.yaml augment", augment), ("flips/rotations only", flips_only)):
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for view in ("s2", "s1"):
                aug.pair(view, batch[view], g)
            best = max(best, batch_size / (time.perf_counter() - t0))
        out[name] = best
    return out


VIA = {w: f"ours png via build_loader, {w} worker{'s' * (w > 1)}" for w in (1, 2)}
SETS = {  # name: (PNG zlib level, keep the plots)
    "png": (0, True),  # the writer's default: stored, nothing to inflate
    "png1": (1, True),  # deflated: 16 % smaller, about 20 us per sample to inflate
    "series": (1, False),
}


def write_sets(root: Path, n: int, shard_samples: int) -> dict[str, float]:
    """Write the shard sets of SETS from the same samples; returns each one's write time."""
    from pimc_dist.samples import META_TABLES
    from pimc_dist.shardset import ShardSetWriter

    rng = np.random.default_rng(0)
    classes = [f"class{k}" for k in range(20)]
    writers = {
        name: ShardSetWriter(
            root / name,
            max_samples=shard_samples,
            source="bench",
            classes=classes,
            png_level=level,
            meta_tables=META_TABLES,
        )
        for name, (level, _) in SETS.items()
    }
    seconds = dict.fromkeys(SETS, 0.0)
    for first in range(0, n, 1000):
        chunk = make_samples(first, min(1000, n - first), rng)
        for name, writer in writers.items():
            keep_plots = SETS[name][1]
            samples = (
                chunk
                if keep_plots
                else [{k: v for k, v in s.items() if k != "rp.png"} for s in chunk]
            )
            t0 = time.perf_counter()
            for sample in samples:
                writer.write(sample)
            seconds[name] += time.perf_counter() - t0
    for name, writer in writers.items():
        t0 = time.perf_counter()
        writer.close()
        seconds[name] += time.perf_counter() - t0
    return seconds


def rate_of(fn) -> tuple[float, float]:
    """Samples/s of one call of fn() -> number of samples: per wall-clock second and per CPU
    second of this process (on a shared machine the second moves less with other load)."""
    t0, c0 = time.perf_counter(), time.process_time()
    count = fn()
    return count / (time.perf_counter() - t0), count / (time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shard-samples", type=int, default=4096)
    parser.add_argument("--mosaic-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the shards here and keep them"
    )
    parser.add_argument("--note", default="", help="a note stored with the results")
    args = parser.parse_args()

    import numba
    import torch
    import webdataset as wds

    from pimc_dist import config as config_lib
    from pimc_dist import shardset
    from pimc_dist.shardset import ShardStream, build_loader

    numba.set_num_threads(1)  # one worker = one core, as inside a DataLoader worker
    torch.set_num_threads(1)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        write_seconds = write_sets(root, args.samples, args.shard_samples)
        mosaic_write = write_mosaic_set(root / "mosaic", args.mosaic_samples, 256)
        sets = {name: shardset.read_manifest(root / name) for name in SETS}
        sets["mosaic"] = shardset.read_manifest(root / "mosaic")
        urls = {name: [str(p) for p in m.shard_paths()] for name, m in sets.items()}
        total_bytes = {name: sum(s.bytes for s in m.shards) for name, m in sets.items()}
        n = args.samples

        def raw_file_read(name: str) -> int:
            for url in urls[name]:
                with open(url, "rb") as f:
                    while f.read(4 << 20):
                        pass
            return n

        def ours_raw() -> int:
            return sum(1 for url in urls["png"] for _ in shardset.iter_shard_samples(url))

        def wds_pipeline(*decode) -> int:
            dataset = wds.WebDataset(urls["png"], shardshuffle=False, empty_check=False)
            if decode:
                dataset = dataset.decode(*[d for d in decode if d])
            return sum(1 for _ in dataset)

        def ours(
            name: str, views: list[str], rp_on_the_fly: str = "off", normalise: bool = False
        ) -> int:
            stream = ShardStream(
                sets[name],
                views=views,
                batch_size=args.batch_size,
                resampled=False,
                shuffle=True,
                shuffle_buffer=2000,
                augment_views=["rsi"],
                rp_on_the_fly=rp_on_the_fly,
                rp_size=PLOT,
            )
            norm = shardset.view_normalisation(sets[name], views, rp_on_the_fly)
            count = 0
            for batch in stream:
                if normalise:
                    batch = shardset.normalize_views(batch, norm)
                count += len(batch["meta"])
            return count

        def ours_mosaic() -> int:
            stream = ShardStream(
                sets["mosaic"],
                views=["s2", "s1"],
                batch_size=args.batch_size,
                resampled=False,
                shuffle=True,
                shuffle_buffer=500,
                augment_views=[],  # as configs/pretrain/mosaic.yaml: drawn in the training step
            )
            return sum(len(batch["meta"]) for batch in stream)

        loaders = {}

        def via_loader(workers: int) -> int:
            """One exact epoch of the training loader (shuffle, flips, normalisation)."""
            if workers not in loaders:
                overrides = [
                    f"loader.shards={root / 'png'}",
                    "loader.views=[rp,rsi]",
                    f"loader.workers={workers}",
                    "loader.resampled=false",
                    "loader.verify=none",
                    "loader.shuffle_buffer=2000",
                    f"train.batch_size={args.batch_size}",
                ]
                loaders[workers] = build_loader(config_lib.load(None, overrides))
                sum(1 for _ in loaders[workers])  # start the (persistent) workers untimed
            return sum(len(batch["label"]) for batch in loaders[workers])

        raw_file_read("png")  # warm the page cache: every row reads from memory
        raw_file_read("series")
        raw_file_read("png1")
        raw_file_read("mosaic")
        ours("series", ["rp", "rsi"], "cpu")  # compile the numba kernels outside the timings
        rows = {}
        plans = [
            ("raw file read (4 MiB chunks)", "png", lambda: raw_file_read("png")),
            ("raw tar (ours, member bytes)", "png", ours_raw),
            ("wds raw (WebDataset, no decode)", "png", lambda: wds_pipeline()),
            ("wds .decode()", "png", lambda: wds_pipeline(None)),
            ('wds .decode("rgb8")', "png", lambda: wds_pipeline("rgb8")),
            ("ours png: rp+rsi batches", "png", lambda: ours("png", ["rp", "rsi"])),
            (
                "ours png, normalised on this CPU",
                "png",
                lambda: ours("png", ["rp", "rsi"], normalise=True),
            ),
            ("ours png: rp+series+rsi", "png", lambda: ours("png", ["rp", "series", "rsi"])),
            ("ours png deflated (level 1): rp+rsi", "png1", lambda: ours("png1", ["rp", "rsi"])),
            (
                "ours series-only: rp on the fly (CPU)",
                "series",
                lambda: ours("series", ["rp", "rsi"], "cpu"),
            ),
            *[(label, "png", lambda w=w: via_loader(w)) for w, label in VIA.items()],
            (MOSAIC_ROW, "mosaic", ours_mosaic),
        ]
        workers_of = {label: w for w, label in VIA.items()}
        # Rounds over all pipelines, best per pipeline: a busy spell of a shared machine
        # then slows every pipeline of one round rather than one pipeline's every pass.
        best = dict.fromkeys([label for label, _, _ in plans], 0.0)
        best_cpu = dict.fromkeys(best, 0.0)
        for round_ in range(args.repeats):
            for label, _, fn in plans:
                wall, cpu = rate_of(fn)
                best[label] = max(best[label], wall)
                best_cpu[label] = max(best_cpu[label], cpu)
            print(f"  round {round_ + 1}/{args.repeats} done", flush=True)
        loaders.clear()  # stops the workers
        augment_rates = mosaic_augment_rate(sets["mosaic"], args.batch_size, args.repeats)
        for label, name, _ in plans:
            per_sample = total_bytes[name] / (args.mosaic_samples if name == "mosaic" else n)
            workers = workers_of.get(label, 1)
            rows[label] = {
                "samples_per_s": best[label] / workers,  # per worker
                "bytes_per_sample": per_sample,
                "MB_per_s": best[label] / workers * per_sample / 1e6,
            }
            if label not in workers_of:  # workers' CPU time is not this process's
                rows[label]["samples_per_cpu_s"] = best_cpu[label]
            if label in workers_of:
                rows[label]["workers"] = workers
                rows[label]["total_samples_per_s"] = best[label]
        for name in SETS:
            rate = n / write_seconds[name]
            rows[f"shard writing ({name} set)"] = {
                "samples_per_s": rate,
                "bytes_per_sample": total_bytes[name] / n,
                "MB_per_s": rate * total_bytes[name] / n / 1e6,
            }
        mosaic_bytes = total_bytes["mosaic"] / args.mosaic_samples
        rows["shard writing (mosaic set)"] = {
            "samples_per_s": args.mosaic_samples / mosaic_write,
            "bytes_per_sample": mosaic_bytes,
            "MB_per_s": args.mosaic_samples / mosaic_write * mosaic_bytes / 1e6,
        }
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    plain = rows["wds .decode()"]["samples_per_s"]
    plain_cpu = rows["wds .decode()"]["samples_per_cpu_s"]
    rgb8 = rows['wds .decode("rgb8")']["samples_per_s"]
    raw = rows["raw file read (4 MiB chunks)"]["samples_per_s"]
    print(
        f"\n{n} samples, batch {args.batch_size}, one process (= one worker) unless said, "
        f"best of {args.repeats}; samples/s per worker, per wall-clock and per CPU second"
    )
    print(
        f"{'pipeline':40s} {'samples/s':>11s} {'bytes/sample':>13s} {'MB/s':>8s} {'x .decode()':>12s} "
        f"{'x rgb8':>8s} {'/ raw read':>11s} {'per CPU-s':>10s} {'x .decode()':>12s}"
    )
    for label, row in rows.items():
        rate = row["samples_per_s"]
        cpu = row.get("samples_per_cpu_s")
        cpu_cols = f" {cpu:10,.0f} {cpu / plain_cpu:12.2f}" if cpu else ""
        print(
            f"{label:40s} {rate:11,.0f} {row['bytes_per_sample']:13,.0f} {row['MB_per_s']:8.1f} "
            f"{rate / plain:12.2f} {rate / rgb8:8.2f} {rate / raw:11.3f}{cpu_cols}"
        )
    result = {
        "benchmark": "loader",
        "samples": n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "sample": {
            "rp": [3, PLOT, PLOT],
            "series": [3, T],
            "rsi": [BANDS, CROP, CROP],
            "json_dates": T,
        },
        "machine": machine_info(
            webdataset=getattr(wds, "__version__", "?"), torch=torch.__version__
        ),
        "rows": rows,
        "mosaic": {
            "samples": args.mosaic_samples,
            "sample": {
                "s2": [MOSAIC_S2, MOSAIC_SIZE, MOSAIC_SIZE, "uint16"],
                "s1": [MOSAIC_S1, MOSAIC_SIZE, MOSAIC_SIZE, "float32"],
                "labels": len(MOSAIC_CLASSES),
            },
            "loader_samples_per_s_per_worker": rows[MOSAIC_ROW]["samples_per_s"],
            "augment_two_draws_cpu_one_thread_samples_per_s": augment_rates,
        },
        "ratios": {
            "ours_png_vs_wds_decode": rows["ours png: rp+rsi batches"]["samples_per_s"] / plain,
            "ours_png_vs_wds_decode_cpu_time": rows["ours png: rp+rsi batches"]["samples_per_cpu_s"]
            / plain_cpu,
            "ours_png_vs_wds_decode_rgb8": rows["ours png: rp+rsi batches"]["samples_per_s"] / rgb8,
            "ours_png_vs_raw_file_read": rows["ours png: rp+rsi batches"]["samples_per_s"] / raw,
            **{
                f"ours_via_{w}_workers_per_worker_vs_wds_decode": rows[label]["samples_per_s"]
                / plain
                for w, label in VIA.items()
            },
            "ours_on_the_fly_vs_wds_decode": rows["ours series-only: rp on the fly (CPU)"][
                "samples_per_s"
            ]
            / plain,
        },
    }
    if args.note:
        result["note"] = args.note
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(
        "\nMoSAiC augmentations, two draws of s2 and s1 per sample, one CPU thread "
        "(what a loader worker would pay; pretraining draws them on the training device):"
    )
    for name, rate in augment_rates.items():
        print(f"  {name:30s} {rate:11,.0f} samples/s")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
