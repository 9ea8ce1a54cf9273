"""Write a dataset into WebDataset shards: `python -m pimc_dist.shard --config <data.yaml>`.

What comes out, in `data.shard_dir`:

    shard-000000.tar ...   the samples (keys and views: pimc_dist/samples.py)
    shard-000000.stats.json ...  per-shard counts, sha256, statistics, skips
    plan.json              which patches go to which shard, and the config that made them
    manifest.json          written once every shard of the set exists
    skipped.json           every input left out, with the reason, beside the manifest

How a run proceeds:

- The plan assigns patches to shard indices in reading order, a fixed number
  per shard (from `data.max_samples_per_shard` and `data.max_shard_bytes`, the
  sample size measured on the first readable patch). It is written to
  `plan.json` by the first run and reused by every later run and array task;
  a run whose config or dataset differs from the plan stops before any work.
- Shards are built in a pool of `data.workers` processes (0 = every core this
  process may use), forked from a server that imported the sharding code once
  (see `_pool_context`). A shard is written under a temporary name and
  renamed only when complete, so a killed run leaves no partial shard under a
  final name, and a rerun skips complete shards and writes the same bytes.
- `data.shard_start` / `data.shard_count` restrict a run to a range of shard
  indices (Slurm array tasks, `slurm/shard_array.sbatch`); several ranks of one
  launch (srun, submitit) split the range among themselves. Whichever run
  finds every shard present writes the manifest.

Bad input (decided policy): the reader's checks name the file and the problem.
A dataset that cannot be opened at all (missing root, metadata or listed file)
fails before any work. A patch that fails to read (truncated, wrong shape or
dtype, unreadable image) or yields no sample is skipped: `skipped.json` lists
it with a reason starting "patch skipped"; pixels with no valid observation are
never sampled and listed per patch ("pixels skipped"). If more than
`data.max_skipped_fraction` of the patches are skipped, or no sample is left at
all, the set is refused: no manifest, exit status 1 and a message that points
at `skipped.json`. Fix the files and rerun with `--retry-skipped`, or accept the
losses with `data.max_skipped_fraction=1`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pimc_dist import config as config_lib

PLAN_NAME = "plan.json"
PLAN_SCHEMA = 2  # 2: the data.* reader options (with_s1, eurosat_bands, ...) in the config
PATCH_SKIP = "patch skipped"  # skipped.json reason prefix: the input made no sample
PIXEL_SKIP = "pixels skipped"  # the input made samples, some of its pixels were left out
# data.* fields that say how or where a run works, not what the shards hold: they may
# differ between reruns and array tasks, and are left out of the plan and the manifest.
RUN_ONLY_FIELDS = ("shard_dir", "workers", "shard_start", "shard_count", "max_skipped_fraction")
PROBE_PATCHES = 8  # patches tried when measuring the sample size for the plan
BYTES_MARGIN = 1.25  # samples vary in size (PNG, JSON); keep shards under the byte limit

EXAMPLES = """examples:
  python -m pimc_dist.shard --config configs/data/demo.yaml
  python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS data.workers=16
  python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS --plan
  # Slurm array task i writes shards [8i, 8i + 8); the last task to finish writes the manifest:
  sbatch --array=0-9 slurm/shard_array.sbatch data.root=/data/PASTIS
  python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS \\
      data.shard_start=$((SLURM_ARRAY_TASK_ID * 8)) data.shard_count=8
"""


# ---------------------------------------------------------------------------
# Config checks and the plan
# ---------------------------------------------------------------------------


def _fail(key: str, problem: str) -> None:
    raise config_lib.ConfigError(f"data.{key}: {problem}")


def check_config(data: Any) -> None:
    """Check the values of the `data` section that the schema cannot; ConfigError naming the key."""
    import datetime as dt

    from pimc_dist.samples import check_crop_source
    from pimc_dist.sources import SOURCES

    if data.source not in SOURCES:
        _fail("source", f"unknown source {data.source!r} (known: {', '.join(SOURCES)})")
    if data.source != "demo" and not data.root:
        _fail("root", f"required for source {data.source!r}: the dataset's folder or file")
    minimum = {
        "pixels_per_patch": 1,
        "crop_size": 1,
        "rp_size": 0,
        "grid_step_days": 1,
        "patch_size": 1,
        "s2_size": 1,
        "max_samples_per_shard": 1,
        "max_shard_bytes": 1,
        "workers": 0,
        "shard_start": 0,
    }
    for key, low in minimum.items():
        if data[key] < low:
            _fail(key, f"must be >= {low}, got {data[key]}")
    for key in ("shard_count", "grid_length"):
        if data[key] is not None and data[key] < 1:
            _fail(key, f"must be >= 1 or null, got {data[key]}")
    if not 0.0 <= data.max_skipped_fraction <= 1.0:
        _fail("max_skipped_fraction", f"must be in [0, 1], got {data.max_skipped_fraction}")
    if not 0.0 < data.label_threshold <= 1.0:
        _fail("label_threshold", f"must be in (0, 1], got {data.label_threshold}")
    choices = {
        "eurosat_bands": ("ms", "rgb"),
        "eurosat_band_order": ("file", "standard"),
        "reben_encoding": ("auto", "lmdb", "geotiff"),
        "reben_resample": ("nearest", "bilinear"),
    }
    for key, allowed in choices.items():
        if data[key] not in allowed:
            _fail(key, f"must be one of {', '.join(allowed)}, got {data[key]!r}")
    if data.image_size is not None and data.image_size < 1:
        _fail("image_size", f"must be >= 1 or null, got {data.image_size}")
    if not data.dn_scale > 0:
        _fail("dn_scale", f"must be > 0, got {data.dn_scale}")
    try:
        check_crop_source(data.crop_source)
    except ValueError as exc:
        _fail("crop_source", str(exc))
    if data.grid_start is not None:
        try:
            dt.date.fromisoformat(data.grid_start)
        except ValueError:
            _fail("grid_start", f"must be an ISO date (YYYY-MM-DD), got {data.grid_start!r}")


def content_config(data: Any) -> dict[str, Any]:
    """The `data` section without the run-only fields: what the plan and the manifest record."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(data, resolve=True) if hasattr(data, "_metadata") else dict(data)
    return {k: v for k, v in plain.items() if k not in RUN_ONLY_FIELDS}


@dataclass(frozen=True)
class ShardPlan:
    """Which patches go to which shard; the same for every run and array task of a set."""

    source: str
    kind: str
    n_patches: int
    patch_ids_sha256: str
    samples_per_patch: int  # at most
    sample_bytes: int  # measured on one patch (0: no patch could be read to measure)
    patches_per_shard: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_patches / self.patches_per_shard)

    def patches(self, index: int) -> range:
        start = index * self.patches_per_shard
        return range(start, min(start + self.patches_per_shard, self.n_patches))

    def identity(self) -> dict[str, Any]:
        """What must agree between runs writing into one shard set."""
        return {
            "source": self.source,
            "kind": self.kind,
            "n_patches": self.n_patches,
            "patch_ids_sha256": self.patch_ids_sha256,
            "config": self.config,
        }


def patch_ids(reader: Any) -> list[str]:
    """Ids of a reader's records in reading order (`patch_ids` or `ids`, else positions)."""
    ids = getattr(reader, "patch_ids", None)
    if ids is None:
        ids = getattr(reader, "ids", None)
    if ids is None:
        ids = [f"#{i}" for i in range(len(reader))]
    return [str(i) for i in ids]


def pixel_sampling(data: Any, source: Any) -> Any:
    """`samples.PixelSampling` from the `data` config section and the opened source."""
    import datetime as dt

    from pimc_dist.samples import PixelSampling

    return PixelSampling(
        pixels_per_patch=data.pixels_per_patch,
        stratify=data.stratify,
        exclude_labels=tuple(source.exclude_labels),
        grid_step_days=data.grid_step_days,
        grid_start=dt.date.fromisoformat(data.grid_start) if data.grid_start else None,
        grid_length=data.grid_length,
        rp_size=data.rp_size,
        crop_size=data.crop_size,
        crop_source=data.crop_source,
        seed=data.seed,
    )


def build_samples(source: Any, index: int, sampling: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of record `index` of `source`, and notes on what was left out.

    Raises what the reader raises for a bad file (SourceError naming it).
    """
    from pimc_dist import samples as samples_lib

    record = source.reader[index]
    if source.kind == "pimc":
        return samples_lib.pimc_samples(record, sampling)
    if source.kind == "mosaic":
        return [samples_lib.mosaic_sample(record, source.classes)], []
    return [samples_lib.scene_sample(record, source.classes)], []


def _encoded_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header plus padded payload per member."""
    from pimc_dist.shardset import encode_member

    total = 0
    for suffix, value in sample.items():
        if not suffix.startswith("__"):
            data, _ = encode_member(suffix, value)
            total += 512 + -(-len(data) // 512) * 512
    return total


def _measure_sample_bytes(source: Any, sampling: Any) -> int:
    """Bytes of the largest sample of the first readable patch (0 if none reads)."""
    from pimc_dist.sources import SourceError

    for index in range(min(PROBE_PATCHES, len(source.reader))):
        try:
            made, _ = build_samples(source, index, sampling)
        except (SourceError, ValueError, OSError):
            continue
        if made:
            return max(_encoded_bytes(s) for s in made)
    return 0


def _new_plan(data: Any, source: Any, ids: list[str], identity_only: bool = False) -> ShardPlan:
    per_patch = data.pixels_per_patch if source.kind == "pimc" else 1
    sample_bytes = 0
    per_shard = max(1, data.max_samples_per_shard // per_patch)
    if not identity_only:
        sample_bytes = _measure_sample_bytes(source, pixel_sampling(data, source))
        if sample_bytes:
            patch_bytes = math.ceil(sample_bytes * BYTES_MARGIN) * per_patch
            per_shard = max(1, min(per_shard, data.max_shard_bytes // patch_bytes))
    return ShardPlan(
        source=source.name,
        kind=source.kind,
        n_patches=len(ids),
        patch_ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        samples_per_patch=per_patch,
        sample_bytes=sample_bytes,
        patches_per_shard=per_shard,
        config=content_config(data),
    )


def _read_plan(path: Path) -> ShardPlan:
    from pimc_dist.shardset import ShardError

    try:
        info = json.loads(path.read_text())
        if info.pop("schema_version") != PLAN_SCHEMA:
            raise ValueError(f"schema_version is not {PLAN_SCHEMA}")
        info.pop("n_shards", None)
        plan = ShardPlan(**info)
        if plan.patches_per_shard < 1:
            raise ValueError("patches_per_shard must be >= 1")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(
            f"{path}: unreadable shard plan ({exc}); remove the folder to start over"
        ) from None
    return plan


def _plan_text(plan: ShardPlan) -> str:
    info = {"schema_version": PLAN_SCHEMA, **asdict(plan), "n_shards": plan.n_shards}
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


def load_or_create_plan(data: Any, source: Any, out: Path) -> ShardPlan:
    """The plan in `out/plan.json` if it matches this config and dataset, else a new one.

    Raises ShardError when the folder holds a plan (or shards) of another config or dataset.
    """
    from pimc_dist.shardset import ShardError

    ids = patch_ids(source.reader)
    if not ids:
        from pimc_dist.sources import SourceError

        raise SourceError(
            data.root or data.source, "the dataset has no patches (check split/folds)"
        )
    path = out / PLAN_NAME
    if not path.is_file():
        leftovers = sorted(p.name for p in out.glob("shard-*.tar"))
        if leftovers:
            raise ShardError(
                f"{out}: holds shards ({leftovers[0]}, ...) but no {PLAN_NAME}, so they cannot be "
                "matched to this config; remove them or write to a new data.shard_dir"
            )
        plan = _new_plan(data, source, ids)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{PLAN_NAME}.{os.getpid()}.tmp"
        tmp.write_text(_plan_text(plan))
        try:
            os.link(tmp, path)  # atomic create-if-absent: concurrent array tasks agree on one plan
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system: same inputs give the same plan
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    stored = _read_plan(path)
    wanted = _new_plan(data, source, ids, identity_only=True).identity()
    if stored.identity() != wanted:
        differ = [k for k in wanted if stored.identity()[k] != wanted[k]]
        if "config" in differ:
            keys = sorted(
                k
                for k in set(wanted["config"]) | set(stored.config)
                if wanted["config"].get(k) != stored.config.get(k)
            )
            differ[differ.index("config")] = "config (data." + ", data.".join(keys) + ")"
        raise ShardError(
            f"{path}: this shard set was planned with another {' and '.join(differ)}; "
            "rerun with the same settings, or write to a new data.shard_dir"
        )
    return stored


def task_range(data: Any, plan: ShardPlan, rank: int = 0, world: int = 1) -> list[int]:
    """Shard indices this process writes: `data.shard_start/shard_count`, split among ranks."""
    first = data.shard_start
    if first >= plan.n_shards:
        raise ValueError(
            f"data.shard_start={first}, but the set has only {plan.n_shards} shards "
            f"(0..{plan.n_shards - 1}); size the Slurm array to match"
        )
    last = (
        plan.n_shards if data.shard_count is None else min(plan.n_shards, first + data.shard_count)
    )
    return [i for i in range(first, last) if (i - first) % world == rank]


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) when several tasks of one launch (srun, submitit) run this."""
    from pimc_dist.distributed import detect_env

    env = detect_env()
    return env.rank, env.world_size


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask: Slurm's --cpus-per-task)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Writing one shard (in a worker process, or in this one)
# ---------------------------------------------------------------------------


@dataclass
class ShardResult:
    """What writing one shard produced."""

    index: int
    samples: int = 0
    bytes: int = 0
    patches: int = 0
    patches_skipped: int = 0
    pixel_notes: int = 0  # patches that made samples but left some pixels out
    pid: int = 0  # the process that wrote it
    cpu_seconds: float = 0.0  # CPU time of that process so far, start-up included


# Per-process state set by _init_worker: the source is opened in each worker (readers
# hold file handles, memory maps and LMDB environments that must not be shared).
_WORKER: dict[str, Any] = {}


def _init_worker(cfg_yaml: str, plan_text: str, progress: Any = None) -> None:
    """Open the source in this process; `progress` (a queue) gets one item per patch done."""
    _WORKER.clear()
    try:
        if progress is not None:  # a pool worker per core: numba's threads would oversubscribe
            import numba

            numba.set_num_threads(1)
        from pimc_dist.sources import open_source

        cfg = config_lib.from_yaml_text(cfg_yaml, "shard worker config")
        source = open_source(cfg.data)
        info = json.loads(plan_text)
        info.pop("schema_version")
        info.pop("n_shards")
        _WORKER.update(
            cfg=cfg,
            source=source,
            sampling=pixel_sampling(cfg.data, source),
            plan=ShardPlan(**info),
            ids=patch_ids(source.reader),
            progress=progress.put if progress is not None else None,
        )
    except Exception as exc:  # reported by write_shard: a failing initializer breaks the pool
        _WORKER["init_error"] = f"{type(exc).__name__}: {exc}"


def write_shard(index: int) -> ShardResult:
    """Write shard `index` with the worker state; ShardError (picklable) on failure."""
    from pimc_dist.shardset import ShardError

    if "init_error" in _WORKER:
        raise ShardError(f"shard {index}: worker set-up failed: {_WORKER['init_error']}")
    try:
        return _write_shard(index, **_WORKER)
    except ShardError:
        raise
    except Exception as exc:  # re-raised as a plain ShardError: any exception pickles back
        raise ShardError(f"shard {index}: {type(exc).__name__}: {exc}") from None


def _write_shard(
    index: int, *, cfg: Any, source: Any, sampling: Any, plan: ShardPlan, ids: list[str], progress
) -> ShardResult:
    """Samples of the patches of shard `index`, their skips listed in its sidecar."""
    from pimc_dist.shardset import ShardError, ShardSetWriter
    from pimc_dist.sources import SourceError

    writer = ShardSetWriter(
        cfg.data.shard_dir, source=source.name, classes=source.classes, kind=source.kind
    )
    result = ShardResult(index)
    with writer.shard(index):
        for i in plan.patches(index):
            pid = ids[i]
            try:
                made, notes = build_samples(source, i, sampling)
            except (SourceError, ValueError, OSError) as exc:
                made, notes = [], [f"{type(exc).__name__}: {exc}"]
            if not made:
                writer.skip(pid, f"{PATCH_SKIP}: {'; '.join(notes) or 'no sample'}")
                result.patches_skipped += 1
            for note in notes if made else ():
                writer.skip(pid, f"{PIXEL_SKIP}: {note}")
            result.pixel_notes += bool(made and notes)
            for sample in made:
                try:
                    writer.write(sample)
                except ValueError as exc:
                    hint = ""
                    if source.kind == "pimc" and cfg.data.grid_length is None:
                        hint = " (patches with other date ranges? set data.grid_length)"
                    raise ShardError(f"{source.name} patch {pid}: {exc}{hint}") from None
            result.samples += len(made)
            result.patches += 1
            if progress is not None:
                progress(1)
    entry = writer.written[-1] if writer.written else None
    result.bytes = entry.bytes if entry is not None else 0
    result.pid, result.cpu_seconds = os.getpid(), time.process_time()
    return result


# ---------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one run did (for callers and benchmarks)."""

    out_dir: Path
    plan: ShardPlan
    shards: list[int]  # indices this run was responsible for
    written: list[ShardResult]  # shards written now (the rest were complete)
    seconds: float  # the whole run
    write_seconds: float = 0.0  # writing the shards (process pool start-up included)
    manifest: Any = None  # shardset.Manifest once the set is complete, else None

    @property
    def samples_written(self) -> int:
        return sum(r.samples for r in self.written)

    @property
    def bytes_written(self) -> int:
        return sum(r.bytes for r in self.written)

    @property
    def worker_cpu_seconds(self) -> float:
        """CPU time of the pool's worker processes, start-up included (0 without a pool)."""
        last: dict[int, float] = {}
        for r in self.written:
            if r.pid != os.getpid():
                last[r.pid] = max(last.get(r.pid, 0.0), r.cpu_seconds)
        return sum(last.values())


def _drain(queue: Any, bar: Any) -> None:
    import queue as queue_lib

    while True:
        try:
            bar.update(queue.get_nowait())
        except queue_lib.Empty:
            return


# Imported once by the fork server instead of by every worker: torch (through
# pimc_dist.recurrence), numba and the readers cost about 1.2 CPU-s a process.
POOL_PRELOAD = (
    "pimc_dist.shard",
    "pimc_dist.samples",
    "pimc_dist.sources.pastis",
    "pimc_dist.sources.geotiff_stack",
    "pimc_dist.sources.eurosat",
    "pimc_dist.sources.reben",
    "pimc_dist.sources.sen12ms",
)


def _pool_context() -> Any:
    """Where shard workers come from: a fork server with `POOL_PRELOAD` imported, else spawn.

    Not a plain fork of this process: that would copy open LMDB handles and thread
    pools (numba's OpenMP layer aborts a child forked after it ran). The fork server
    is a fresh process that only imports modules, so its children start clean, in
    milliseconds instead of the seconds a spawned interpreter takes to import.
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():  # Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(POOL_PRELOAD))  # read when the server first starts
    return ctx


def _write_shards(cfg: Any, plan: ShardPlan, todo: list[int], workers: int, bar: Any) -> list:
    """Write the shards `todo` with `workers` processes, updating `bar` per patch."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from pimc_dist.shardset import ShardError

    cfg_yaml, plan_text = config_lib.to_yaml(cfg), _plan_text(plan)
    results: list[ShardResult] = []

    def done(result: ShardResult) -> None:
        results.append(result)
        bar.set_postfix(samples=sum(r.samples for r in results), refresh=False)

    if workers == 1:
        _init_worker(cfg_yaml, plan_text)
        _WORKER["progress"] = bar.update
        try:
            for index in todo:
                done(write_shard(index))
        finally:
            _WORKER.clear()
        return results
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker killed by the kernel (out
    # of memory) breaks the executor with an error, where a Pool would wait forever.
    ctx = _pool_context()
    progress = ctx.Queue()
    executor = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg_yaml, plan_text, progress)
    )
    try:
        pending = {executor.submit(write_shard, index) for index in todo}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress, bar)
            for future in finished:
                done(future.result())  # raises the worker's ShardError
    except BrokenProcessPool as exc:
        raise ShardError(
            f"a shard worker process died ({exc}); out of memory? try fewer data.workers"
        ) from None
    finally:
        # On an error, shards not started are cancelled and running ones finish (complete
        # shards are kept by a rerun), so no worker is killed in the middle of a file.
        executor.shutdown(wait=True, cancel_futures=True)
    _drain(progress, bar)
    return results


def _skip_counts(out: Path) -> tuple[int, int]:
    """(patches skipped, patches with pixels skipped) listed in the set's skip report."""
    from pimc_dist.shardset import REPORT_NAME

    entries = json.loads((out / REPORT_NAME).read_text())["skipped"]
    patches = sum(str(e["reason"]).startswith(PATCH_SKIP) for e in entries)
    return patches, sum(str(e["reason"]).startswith(PIXEL_SKIP) for e in entries)


def _finish_set(cfg: Any, source: Any, plan: ShardPlan, out: Path) -> Any:
    """Write the manifest if every shard exists; refuse a set that lost too much."""
    from pimc_dist.shardset import (
        MANIFEST_NAME,
        REPORT_NAME,
        ShardError,
        merge_manifest,
        shard_name,
    )

    missing = [i for i in range(plan.n_shards) if not (out / shard_name(i)).is_file()]
    if missing:
        print(
            f"{len(missing)} of {plan.n_shards} shards are not written yet "
            f"(e.g. {shard_name(missing[0])}: other array tasks?); "
            "the run that completes the set writes the manifest"
        )
        return None
    manifest = merge_manifest(
        out,
        config=content_config(cfg.data),
        source=source.name,
        kind=source.kind,
        classes=source.classes,
        expected_shards=plan.n_shards,
    )
    report = out / REPORT_NAME
    skipped, _ = _skip_counts(out)
    limit = cfg.data.max_skipped_fraction
    problem = None
    if manifest.total_samples == 0:
        problem = f"no sample was written: all {plan.n_patches} patches were skipped"
    elif skipped > limit * plan.n_patches:
        problem = (
            f"{skipped} of {plan.n_patches} patches ({skipped / plan.n_patches:.1%}) were "
            f"skipped, more than data.max_skipped_fraction={limit}"
        )
    if problem:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # no loader may take this set as complete
        entries = json.loads(report.read_text())["skipped"]
        first = next((e for e in entries if str(e["reason"]).startswith(PATCH_SKIP)), None)
        example = f"\n  e.g. patch {first['key']}: {first['reason']}" if first else ""
        raise ShardError(
            f"{out}: {problem}; no manifest written. Reasons per patch in {report}.{example}\n"
            "  Fix the inputs and rerun with --retry-skipped (complete shards are kept), or "
            "accept the losses with data.max_skipped_fraction=1."
        )
    return manifest


def _retry_skipped(out: Path, indices: list[int]) -> list[int]:
    """Remove the complete shards among `indices` that skipped a patch; return their indices."""
    from pimc_dist.shardset import shard_name, sidecar_name

    removed = []
    for index in indices:
        sidecar = out / sidecar_name(index)
        if not (out / shard_name(index)).is_file() or not sidecar.is_file():
            continue
        skipped = json.loads(sidecar.read_text()).get("skipped", [])
        if any(str(e.get("reason", "")).startswith(PATCH_SKIP) for e in skipped):
            (out / shard_name(index)).unlink()
            sidecar.unlink()
            removed.append(index)
    return removed


def run(cfg: Any, *, retry_skipped: bool = False, plan_only: bool = False) -> RunResult:
    """Shard the dataset of `cfg.data` (see the module docstring); returns what was done."""
    from pimc_dist.progress import progress_bar
    from pimc_dist.shardset import MANIFEST_NAME, REPORT_NAME, ShardSetWriter, shard_name
    from pimc_dist.sources import open_source

    t_start = time.perf_counter()
    check_config(cfg.data)
    source = open_source(cfg.data)
    out = Path(cfg.data.shard_dir)
    plan = load_or_create_plan(cfg.data, source, out)
    rank, world = _launch_rank()
    mine = task_range(cfg.data, plan, rank, world)
    task = "" if world == 1 else f" (rank {rank} of {world})"
    print(
        f"sharding {source.name}: {plan.n_patches} patches -> {source.kind} samples, "
        f"{plan.n_shards} shards of {plan.patches_per_shard} patches in {out}/"
    )
    if plan_only:
        print(f"plan: {out / PLAN_NAME}")
        return RunResult(out, plan, mine, [], time.perf_counter() - t_start)
    retried = _retry_skipped(out, mine) if retry_skipped else []
    probe = ShardSetWriter(out, kind=source.kind)
    todo = [i for i in mine if not probe.shard_done(i)]
    workers = cfg.data.workers or available_cpus()
    workers = max(1, min(workers, len(todo)))
    span = f"shards {mine[0]}..{mine[-1]} ({len(mine)})" if mine else "no shard"
    print(
        f"this run{task}: {span}, "
        f"{len(mine) - len(todo)} already complete, {len(todo)} to write"
        + (f" ({len(retried)} with skipped patches removed to retry)" if retried else "")
        + (f", {workers} worker process(es)" if todo else "")
    )
    written: list[ShardResult] = []
    t0 = time.perf_counter()
    if todo:
        # A manifest claims a complete set; with shards to (re)write it is stale.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        n_patches = sum(len(plan.patches(i)) for i in todo)
        # Always on (a label): Slurm logs are not terminals, and still get a bar every 30 s.
        with progress_bar(n_patches, "", unit="patch") as bar:
            written = _write_shards(cfg, plan, todo, workers, bar)
    seconds = time.perf_counter() - t0
    if written:
        samples = sum(r.samples for r in written)
        size = sum(r.bytes for r in written)
        skipped = sum(r.patches_skipped for r in written)
        notes = sum(r.pixel_notes for r in written)
        print(
            f"wrote {len(written)} shards in {seconds:.1f} s: {samples} samples "
            f"({samples / max(seconds, 1e-9):.0f} samples/s), {size / 1e6:.1f} MB "
            f"({size / 1e6 / max(seconds, 1e-9):.1f} MB/s); {skipped} patches skipped, "
            f"{notes} with pixels skipped"
        )
    if len(mine) > 0:
        names = f"{shard_name(mine[0])}" + (f" .. {shard_name(mine[-1])}" if len(mine) > 1 else "")
        print(f"shards: {out}/{names}")
    manifest = _finish_set(cfg, source, plan, out)
    if manifest is not None:
        skipped, notes = _skip_counts(out)
        print(
            f"manifest: {out / MANIFEST_NAME} ({manifest.total_samples} samples in "
            f"{len(manifest.shards)} shards)\n"
            f"skipped:  {out / REPORT_NAME} "
            f"({skipped} patches skipped, {notes} with pixels skipped)"
        )
    return RunResult(out, plan, mine, written, time.perf_counter() - t_start, seconds, manifest)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.shard",
        description="Write a dataset into WebDataset tar shards with a manifest.json.\n"
        "Resumable (a rerun skips complete shards); splits across Slurm array tasks.\n"
        "Outputs, the plan and the bad-input policy: the docstring of pimc_dist/shard.py.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="data YAML (configs/data/*.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. data.root=/data/PASTIS data.workers=8 "
        "data.shard_dir=/scratch/shards/pastis data.shard_start=0 data.shard_count=8",
    )
    parser.add_argument(
        "--retry-skipped",
        action="store_true",
        help="rewrite this run's complete shards that skipped a patch (after fixing the files)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only write/check plan.json and print the number of shards (to size a Slurm array)",
    )
    return parser.parse_args(argv)


def main(cfg: Any, *, retry_skipped: bool = False, plan_only: bool = False) -> int:
    """Shard with a loaded config (also the entry `pimc_dist.launch` calls); an exit status."""
    from pimc_dist.shardset import ShardError

    try:
        run(cfg, retry_skipped=retry_skipped, plan_only=plan_only)
    except (ShardError, ValueError) as exc:  # SourceError and ConfigError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: complete shards are kept; rerun the same command to go on",
            file=sys.stderr,
        )
        return 130
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m pimc_dist.shard` with `argv` (default: the command line); an exit status."""
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        check_config(cfg.data)
    except config_lib.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return main(cfg, retry_skipped=args.retry_skipped, plan_only=args.plan)


if __name__ == "__main__":
    sys.exit(cli())
