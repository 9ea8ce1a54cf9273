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
fails before any work; of several GeoTIFF stacks (a glob), one that cannot be
read is skipped and listed as one input, within `data.max_skipped_fraction`.
A patch that fails to read (truncated, wrong shape or dtype, unreadable image)
or yields no sample is skipped: `skipped.json` lists
it with a reason starting "patch skipped"; pixels with no valid observation are
never sampled and listed per patch ("pixels skipped"). If more than
`data.max_skipped_fraction` of the patches are skipped, or no sample is left at
all, the set is refused: no manifest, exit status 1 and a message that points
at `skipped.json`. Fix the files and rerun with `--retry-skipped`, or accept the
losses with `data.max_skipped_fraction=1`. A plan under which no sample was
written (every patch skipped, e.g. for a config mistake) binds nothing: a rerun
with the corrected config replaces it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_lib
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba

from pimc_dist import checks
from pimc_dist import config as config_lib
from pimc_dist import samples as samples_lib
from pimc_dist.distributed import detect_env
from pimc_dist.progress import progress_bar
from pimc_dist.shard_plan import (
    PLAN_NAME,
    ShardPlan,
    build_samples,
    check_data,
    check_grid,
    content_config,
    load_or_create_plan,
    patch_ids,
    pixel_sampling,
    plan_text,
    task_range,
)
from pimc_dist.shardset import (
    MANIFEST_NAME,
    REPORT_NAME,
    ShardError,
    ShardSetWriter,
    merge_manifest,
    shard_name,
    sidecar_name,
)
from pimc_dist.sources import SourceError, open_source

PATCH_SKIP = "patch skipped"  # skipped.json reason prefix: the input made no sample
PIXEL_SKIP = "pixels skipped"  # the input made samples, some of its pixels were left out

EXAMPLES = """examples:
  python -m pimc_dist.shard --config configs/data/demo.yaml
  python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS data.workers=16
  python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS --plan
  # Slurm array task i writes shards [8i, 8i + 8); the last task to finish writes the manifest:
  sbatch --array=0-9 slurm/shard_array.sbatch data.root=/data/PASTIS
  python -m pimc_dist.shard --config configs/data/pastis.yaml data.root=/data/PASTIS \\
      data.shard_start=$((SLURM_ARRAY_TASK_ID * 8)) data.shard_count=8
"""


def check_config(cfg: Any) -> None:
    """What the launcher checks before submitting a shard job: value ranges, the `data` section."""
    checks.check_values(cfg)
    check_data(cfg.data)


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) when several tasks of one launch (srun, submitit) run this."""
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
            numba.set_num_threads(1)
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
    writer = ShardSetWriter(
        cfg.data.shard_dir,
        source=source.name,
        classes=source.classes,
        kind=source.kind,
        meta_tables=samples_lib.META_TABLES,
    )
    result = ShardResult(index)
    with writer.shard(index):
        for i in plan.patches(index):
            pid = ids[i]
            try:
                made, notes = build_samples(source, i, sampling)
            except (SourceError, ValueError, OSError) as exc:
                if getattr(exc, "fatal", False):  # e.g. a label value without a name: stop
                    raise
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
    "pimc_dist.sources.point_series",
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
    if "forkserver" not in mp.get_all_start_methods():  # Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(POOL_PRELOAD))  # read when the server first starts
    return ctx


def _write_shards(cfg: Any, plan: ShardPlan, todo: list[int], workers: int, bar: Any) -> list:
    """Write the shards `todo` with `workers` processes, updating `bar` per patch."""
    cfg_yaml, plan_json = config_lib.to_yaml(cfg), plan_text(plan)
    results: list[ShardResult] = []

    def done(result: ShardResult) -> None:
        results.append(result)
        bar.set_postfix(samples=sum(r.samples for r in results), refresh=False)

    if workers == 1:
        _init_worker(cfg_yaml, plan_json)
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
        workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg_yaml, plan_json, progress)
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
    entries = json.loads((out / REPORT_NAME).read_text())["skipped"]
    patches = sum(str(e["reason"]).startswith(PATCH_SKIP) for e in entries)
    return patches, sum(str(e["reason"]).startswith(PIXEL_SKIP) for e in entries)


def _finish_set(cfg: Any, source: Any, plan: ShardPlan, out: Path) -> Any:
    """Write the manifest if every shard exists; refuse a set that lost too much."""
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
            "  Fix the inputs and rerun with --retry-skipped (complete shards are kept); after "
            "a config mistake that left no sample, just rerun with the corrected config (a "
            "plan under which nothing was written binds nothing); or accept the losses with "
            "data.max_skipped_fraction=1."
        )
    return manifest


def _retry_skipped(out: Path, indices: list[int]) -> list[int]:
    """Remove the complete shards among `indices` that skipped a patch; return their indices."""
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
    t_start = time.perf_counter()
    check_data(cfg.data)
    source = open_source(cfg.data)
    check_grid(cfg.data, source)
    if source.same_day_merged:
        print(
            f"{source.name}: {source.same_day_merged} same-day acquisitions merged into another "
            "of their day (per pixel, the mean of that day's valid observations)"
        )
    for note in getattr(source.reader, "notes", ()):  # silent oddities of a point table
        print(f"warning: {source.name}: {note}")
    for why in getattr(source.reader, "unreadable", ()):
        print(f"{PATCH_SKIP} (unreadable input, listed in {REPORT_NAME}): {why}")
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
            f"splits:   {manifest.split_summary()}\n"
            f"skipped:  {out / REPORT_NAME} "
            f"({skipped} patches skipped, {notes} with pixels skipped)"
        )
    return RunResult(out, plan, mine, written, time.perf_counter() - t_start, seconds, manifest)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Any:
    parser = config_lib.job_parser(
        "python -m pimc_dist.shard",
        "Write a dataset into WebDataset tar shards with a manifest.json.\n"
        "Resumable (a rerun skips complete shards); splits across Slurm array tasks.\n"
        "Outputs, the plan and the bad-input policy: the docstring of pimc_dist/shard.py.",
        EXAMPLES,
        "data YAML (configs/data/*.yaml)",
        "dotted overrides, e.g. data.root=/data/PASTIS data.workers=8 "
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
    return parser.parse_intermixed_args(argv)


def main(cfg: Any, *, retry_skipped: bool = False, plan_only: bool = False) -> int:
    """Shard with a loaded config (also the entry `pimc_dist.launch` calls); an exit status."""
    try:
        run(cfg, retry_skipped=retry_skipped, plan_only=plan_only)
    except config_lib.ConfigError as exc:  # a config mistake found once the data is open
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
        check_config(cfg)
    except config_lib.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return main(cfg, retry_skipped=args.retry_skipped, plan_only=args.plan)


if __name__ == "__main__":
    sys.exit(cli())
