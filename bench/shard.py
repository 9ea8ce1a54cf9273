"""Shard write rate of `python -m pimc_dist.shard` on the built-in demo dataset.

Rows, all on the same demo dataset (20 PASTIS-layout patches of 64 px, 128 pixels each:
2,560 PIMC samples of about 11.7 KiB), in one process run:

  cli, 1 worker          pimc_dist.shard.run with data.workers=1 (in this process)
  cli, N workers         data.workers=0: a process pool, one worker per core, forked
                         from a server that imported the sharding code once
  (both with the demo's 128 pixels per patch: 3 shards, so N = 2 workers share them 2:1;
  and with 1024 pixels per patch: 20 shards, 20,480 samples, which amortise the pool's
  start-up: the server's imports once, about 0.5 CPU-s per worker after that)
  build samples (1 core) reader + indices + recurrence plots + crops (pimc_dist.samples)
  write: ShardSetWriter  encoding, per-view statistics, sha256 and tar of built samples
  write: wds.TarWriter   webdataset's TarWriter on the same samples (reference)

The cli rows time the writing (pool start-up included, plan and dataset opening not);
samples/s and MB/s of shard bytes; samples/cpu-s divides by the CPU time of this process
and of the pool's workers (each reports its own), a figure that other load on a shared
machine disturbs less than wall time. --repeats keeps the best of each.

    python bench/shard.py [--repeats 2]

Prints a table and writes bench/results/shard.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "shard.json"


def cli_rate(work: Path, workers: int, pixels: int) -> dict:
    from pimc_dist import config, shard

    out = work / f"shards_w{workers}_p{pixels}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"data.root={work / 'raw'}", f"data.shard_dir={out}", f"data.workers={workers}"]
    overrides.append(f"data.pixels_per_patch={pixels}")
    cfg = config.load("configs/data/demo.yaml", overrides)
    cpu0 = time.process_time()
    result = shard.run(cfg)
    return {
        "samples": result.samples_written,
        "bytes": result.bytes_written,
        "seconds": result.write_seconds,
        # The workers are forked by the pool's server, not by this process: each reports
        # its CPU time with its shards (resource.RUSAGE_CHILDREN would not see them).
        "cpu_seconds": time.process_time() - cpu0 + result.worker_cpu_seconds,
        "workers": min(workers or shard.available_cpus(), len(result.written)),
    }


def build_and_write(work: Path) -> tuple[dict, dict, dict]:
    import webdataset as wds

    from pimc_dist import config, shard
    from pimc_dist.shardset import ShardSetWriter
    from pimc_dist.sources import open_source

    cfg = config.load("configs/data/demo.yaml", [f"data.root={work / 'raw'}"])
    source = open_source(cfg.data)
    sampling = shard.pixel_sampling(cfg.data, source)
    shard.build_samples(source, 0, sampling)  # numba and caches warm
    t0 = time.perf_counter()
    made = []
    for index in range(len(source.reader)):
        made += shard.build_samples(source, index, sampling)[0]
    build = time.perf_counter() - t0

    t0 = time.perf_counter()
    writer = ShardSetWriter(work / "writer", kind="pimc")
    with writer.shard(0):
        for sample in made:
            writer.write(sample)
    ours = time.perf_counter() - t0
    size = writer.written[-1].bytes

    # webdataset encodes .png from (H, W, C) arrays with PIL, .npy with np.save, json with json.
    reference = [{**s, "rp.png": s["rp.png"].transpose(1, 2, 0), "json": s["json"]} for s in made]
    t0 = time.perf_counter()
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        for sample in reference:
            sink.write(sample)
    theirs = time.perf_counter() - t0
    n = len(made)
    return (
        {"samples": n, "bytes": size, "seconds": build},
        {"samples": n, "bytes": size, "seconds": ours},
        {"samples": n, "bytes": buffer.getbuffer().nbytes, "seconds": theirs},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])
    from pimc_dist import shard
    from pimc_dist.sources import ensure_demo_dataset

    rows: dict[str, dict] = {}

    def keep(name: str, row: dict) -> None:
        if name not in rows or row["seconds"] < rows[name]["seconds"]:
            rows[name] = row

    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        work = Path(tmp)
        ensure_demo_dataset(work / "raw")
        cores = shard.available_cpus()
        for _ in range(args.repeats):
            for pixels in (128, 1024):  # the demo config; 8x the pixels (start-up amortised)
                keep(f"cli, {pixels} px/patch, 1 worker", cli_rate(work, 1, pixels))
                keep(f"cli, {pixels} px/patch, {cores} workers", cli_rate(work, 0, pixels))
            build, ours, theirs = build_and_write(work)
            keep("build samples (1 core)", build)
            keep("write: ShardSetWriter", ours)
            keep("write: wds.TarWriter (ref)", theirs)

    header = f"{'':34s} {'samples':>8s} {'samples/s':>10s} {'MB/s':>8s} {'KiB/sample':>11s}"
    print(f"{header} {'samples/cpu-s':>14s}")
    for name, row in rows.items():
        row["samples_per_s"] = row["samples"] / row["seconds"]
        row["mb_per_s"] = row["bytes"] / 1e6 / row["seconds"]
        row["kib_per_sample"] = row["bytes"] / 1024 / row["samples"]
        print(
            f"{name:34s} {row['samples']:8d} {row['samples_per_s']:10.0f} {row['mb_per_s']:8.1f} "
            f"{row['kib_per_sample']:11.2f}"
            + (f" {row['samples'] / row['cpu_seconds']:14.0f}" if "cpu_seconds" in row else "")
        )
    ratio = (
        rows["write: ShardSetWriter"]["samples_per_s"]
        / rows["write: wds.TarWriter (ref)"]["samples_per_s"]
    )
    print(f"ShardSetWriter / wds.TarWriter write rate: {ratio:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "rows": rows,
                "writer_vs_wds": ratio,
                "cpus": shard.available_cpus(),
                "machine": platform.platform(),
                "note": "shared, loaded machine: compare rows of one run only",
            },
            indent=1,
        )
        + "\n"
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
