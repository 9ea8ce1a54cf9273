"""Write a dataset into WebDataset shards: `python -m pimc_dist.shard --config configs/data/<name>.yaml`.

Inputs (patches) are assigned to shard indices deterministically, so a rerun
skips complete shards and Slurm array tasks can each write a disjoint range
(`data.shard_start`, `data.shard_count`). Shards are built in parallel on all
cores; each appears under its final name only when complete. The manifest is
assembled from the per-shard sidecars once every shard exists.

A patch that cannot be read (missing or corrupt file) is skipped and listed,
with the reason, in `skipped.json` beside the manifest; so are pixels with no
valid observation. The summary line counts both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pimc_dist import config as config_lib
from pimc_dist import samples as samples_lib
from pimc_dist.shardio import ShardError, ShardSetWriter, merge_manifest, shard_name
from pimc_dist.sources import Source, SourceError, open_source


@dataclass
class ShardPlan:
    """Which patches go to which shard."""

    n_patches: int
    patches_per_shard: int
    first: int
    last: int  # exclusive

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_patches / self.patches_per_shard)

    def patches(self, index: int) -> range:
        start = index * self.patches_per_shard
        return range(start, min(start + self.patches_per_shard, self.n_patches))


def plan(cfg: Any, source: Source) -> ShardPlan:
    """Deterministic assignment of patches to shards and this task's shard range."""
    per_patch = cfg.data.pixels_per_patch if source.kind == "pimc" else 1
    per_shard = max(1, cfg.data.max_samples_per_shard // max(1, per_patch))
    n = len(source.reader)
    total = math.ceil(n / per_shard)
    first = cfg.data.shard_start
    last = total if cfg.data.shard_count is None else min(total, first + cfg.data.shard_count)
    if n == 0:
        raise SourceError(
            cfg.data.root or cfg.data.source, "the dataset has no patches (check root/split/folds)"
        )
    if first >= total:
        raise ValueError(f"data.shard_start={first} but the dataset makes only {total} shards")
    return ShardPlan(n, per_shard, first, last)


def pixel_sampling(cfg: Any, source: Source) -> samples_lib.PixelSampling:
    d = cfg.data
    return samples_lib.PixelSampling(
        pixels_per_patch=d.pixels_per_patch,
        stratify=d.stratify,
        exclude_labels=source.exclude_labels,
        grid_step_days=d.grid_step_days,
        grid_start=dt.date.fromisoformat(d.grid_start) if d.grid_start else None,
        grid_length=d.grid_length,
        rp_size=d.rp_size,
        crop_size=d.crop_size,
        crop_source=d.crop_source,
        seed=d.seed,
    )


# Worker state, set once per process by _init_worker (the source is re-opened in
# each worker: readers hold file handles and memory maps that must not be shared).
_WORKER: dict[str, Any] = {}


def _init_worker(cfg_yaml: str) -> None:
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    cfg = config_lib.from_yaml_text(cfg_yaml, "shard worker config")
    source = open_source(cfg.data)
    _WORKER.update(cfg=cfg, source=source, sampling=pixel_sampling(cfg, source))


def _records_to_samples(source: Source, index: int, sampling: samples_lib.PixelSampling):
    record = source.reader[index]
    if source.kind == "pimc":
        return samples_lib.pimc_samples(record, sampling)
    if source.kind == "mosaic":
        return [samples_lib.mosaic_sample(record, source.classes)], []
    return [samples_lib.scene_sample(record, source.classes)], []


def write_shard(index: int) -> tuple[int, int, int, int]:
    """Write shard `index` in this worker; returns (index, samples, skipped inputs, patches)."""
    cfg, source, sampling = _WORKER["cfg"], _WORKER["source"], _WORKER["sampling"]
    shard_plan = plan(cfg, source)
    writer = ShardSetWriter(
        cfg.data.shard_dir,
        max_samples=10**9,
        max_bytes=cfg.data.max_shard_bytes,
        config=OmegaConf.to_container(cfg.data),
        source=source.name,
        classes=source.classes,
        kind=source.kind,
    )
    n_samples = n_skipped = 0
    patches = shard_plan.patches(index)
    with writer.shard(index):
        for i in patches:
            try:
                made, skips = _records_to_samples(source, i, sampling)
            except (SourceError, ValueError, OSError) as exc:
                writer.skip(f"patch{i}", f"{type(exc).__name__}: {exc}")
                n_skipped += 1
                continue
            for key, reason in skips:
                writer.skip(key, reason)
            n_skipped += len(skips)
            for sample in made:
                writer.write(sample)
            n_samples += len(made)
    return index, n_samples, n_skipped, len(patches)


def run(cfg: Any) -> Path:
    """Shard the dataset of `cfg.data`; returns the shard folder."""
    source = open_source(cfg.data)
    shard_plan = plan(cfg, source)
    out = Path(cfg.data.shard_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = ShardSetWriter(out, config=None, source=source.name, kind=source.kind)
    todo = [i for i in range(shard_plan.first, shard_plan.last) if not probe.shard_done(i)]
    done = (shard_plan.last - shard_plan.first) - len(todo)
    print(
        f"sharding {source.name} ({shard_plan.n_patches} patches, {source.kind} samples) into {out}: "
        f"shards {shard_plan.first}..{shard_plan.last - 1} of {shard_plan.n_shards}, "
        f"{done} already complete"
    )
    workers = cfg.data.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(todo)))
    totals = [0, 0]
    if todo:
        from tqdm import tqdm

        cfg_yaml = config_lib.to_yaml(cfg)
        t0 = time.perf_counter()
        bar = tqdm(total=sum(len(shard_plan.patches(i)) for i in todo), unit="patch", disable=None)
        if workers == 1:
            _init_worker(cfg_yaml)
            results = map(write_shard, todo)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(cfg_yaml,)
            )
            results = pool.imap_unordered(write_shard, todo)
        try:
            for _, n_samples, n_skipped, n_patches in results:
                totals[0] += n_samples
                totals[1] += n_skipped
                bar.update(n_patches)
                bar.set_postfix(samples=totals[0], skipped=totals[1], refresh=False)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
        rate = totals[0] / max(time.perf_counter() - t0, 1e-9)
        print(
            f"wrote {len(todo)} shards, {totals[0]} samples ({rate:.0f} samples/s), {totals[1]} skipped inputs"
        )
    missing = [i for i in range(shard_plan.n_shards) if not (out / shard_name(i)).is_file()]
    if missing:
        print(
            f"{len(missing)} shards of {shard_plan.n_shards} are not written yet (other array tasks?); "
            f"the manifest is written by the task that completes the set (or rerun this command)"
        )
        return out
    manifest = merge_manifest(
        out,
        config=OmegaConf.to_container(cfg.data),
        source=source.name,
        kind=source.kind,
        classes=source.classes,
        expected_shards=shard_plan.n_shards,
    )
    print(
        f"manifest: {out / 'manifest.json'} ({manifest.total_samples} samples in {len(manifest.shards)} shards; "
        f"{manifest.skipped} skipped, listed in {out / 'skipped.json'})"
    )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.shard",
        description="Write a dataset into WebDataset tar shards with a manifest.",
        epilog="example: python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS",
    )
    parser.add_argument("--config", required=True, help="data YAML (configs/data/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. data.workers=8"
    )
    return parser.parse_args(argv)


def main(cfg: Any) -> int:
    """Entry used by the launcher: shard with a loaded config; returns an exit code."""
    try:
        run(cfg)
    except (SourceError, ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return main(cfg)


if __name__ == "__main__":
    sys.exit(cli())
