"""Loader stages 1 and 2: which shards and samples each worker reads, reading, shuffling.

Epochs and ranks. With `resampled=True` every rank and worker draws shards
with replacement from its own seeded stream (seed, epoch, rank, worker): an
endless stream, the trainer counts samples. With `resampled=False` each epoch
permutes the shard order (the same permutation on every rank), lays the
samples end to end and gives every (rank, worker) a disjoint contiguous range
(`exact_split`); each rank gets exactly `floor(total / (world_size *
batch_size))` batches, so ranks never wait for one another at the end of an
epoch, whatever the shard sizes.

A corrupt or truncated tar is skipped, counted by reason (`LoaderStats`) and
logged (`SkipLog`); the run goes on. A shard that loses more than a fraction of
its samples (`ShardHealth`, loader.max_shard_loss_fraction) is left out for the
rest of the run by every worker of the rank, instead of losing them again on
every pass.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pimc_dist.shardset.errors import LoaderError, ShardError
from pimc_dist.shardset.tar import iter_shard_samples

log = logging.getLogger(__name__)

SKIP_REASONS = ("tar", "missing", "decode", "shape")
_WARN_FIRST = 20  # skip warnings logged in full per process; then one in every _WARN_EVERY
_WARN_EVERY = 1000


class LoaderStats:
    """Counters summed over all worker processes: samples, batches, bytes, refills, skips by reason.

    Workers add to local counts and flush them into shared memory once per batch.
    """

    FIELDS = ("samples", "batches", "bytes", "refills") + tuple(
        f"skipped_{r}" for r in SKIP_REASONS
    )

    def __init__(self) -> None:
        self._shared = mp.Array("q", len(self.FIELDS))
        self._local = [0] * len(self.FIELDS)
        self._index = {name: i for i, name in enumerate(self.FIELDS)}

    def add(self, name: str, n: int = 1) -> None:
        self._local[self._index[name]] += n

    def flush(self) -> None:
        if not any(self._local):
            return
        with self._shared.get_lock():
            for i, n in enumerate(self._local):
                self._shared[i] += n
        self._local = [0] * len(self.FIELDS)

    def as_dict(self) -> dict[str, int]:
        """Totals so far (flushed counts of all workers, plus this process's unflushed ones)."""
        with self._shared.get_lock():
            totals = list(self._shared)
        return {name: totals[i] + self._local[i] for i, name in enumerate(self.FIELDS)}

    @property
    def skipped(self) -> dict[str, int]:
        counts = self.as_dict()
        return {r: counts[f"skipped_{r}"] for r in SKIP_REASONS}


class SkipLog:
    """Warns about skipped samples: the first few in full, then one in every thousand."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, stats: LoaderStats, reason: str, message: str, n: int = 1) -> None:
        stats.add(f"skipped_{reason}", n)
        self.count += 1
        if self.count <= _WARN_FIRST or self.count % _WARN_EVERY == 0:
            suffix = " (further skips logged once per 1000)" if self.count == _WARN_FIRST else ""
            log.warning("skipped (%s): %s%s", reason, message, suffix)


class ShardHealth:
    """Which shards of a rank's set lose too many samples while read; shared by its workers.

    Each process counts, per shard, the samples its read tasks promised and the samples
    lost (tar errors, undecodable samples). When a shard has lost more than
    `max_loss_fraction` of max(promised, the shard's count), it is marked excluded in
    shared memory: one warning names it and its loss, and every worker of the rank (they
    share the marks) stops reading it at its next task. Other ranks find it on their own
    first read. `max_loss_fraction=None`: nothing is ever left out.
    """

    def __init__(self, paths: list[str], counts: list[int], max_loss_fraction: float | None):
        if max_loss_fraction is not None and not 0.0 <= max_loss_fraction <= 1.0:
            raise LoaderError(
                f"loader.max_shard_loss_fraction must be in [0, 1], got {max_loss_fraction}"
            )
        self.max_loss_fraction = max_loss_fraction
        self.paths = list(paths)
        self.counts = list(counts)
        self._index = {p: i for i, p in enumerate(self.paths)}
        self._marks = mp.Array("b", len(self.paths))
        self._promised = [0] * len(self.paths)  # this process's
        self._lost = [0] * len(self.paths)

    def excluded(self, path: str) -> bool:
        i = self._index.get(path)
        return i is not None and bool(self._marks[i])

    def excluded_paths(self) -> list[str]:
        with self._marks.get_lock():
            marks = list(self._marks.get_obj())
        return [p for p, m in zip(self.paths, marks, strict=True) if m]

    def promised(self, path: str, n: int) -> None:
        i = self._index.get(path)
        if i is not None:
            self._promised[i] += n

    def lost(self, path: str | None, n: int = 1) -> None:
        i = self._index.get(path) if path is not None else None
        if i is None or n <= 0 or self.max_loss_fraction is None:
            return
        self._lost[i] += n
        of = max(self._promised[i], self.counts[i])
        if self._lost[i] <= self.max_loss_fraction * of:
            return
        with self._marks.get_lock():
            if self._marks[i]:
                return
            self._marks[i] = 1
        log.warning(
            "%s: lost %d of %d samples read from it (%.0f%%, more than "
            "loader.max_shard_loss_fraction=%g); left out for the rest of this run "
            "(counted in data/shards_excluded)",
            path,
            self._lost[i],
            of,
            100.0 * self._lost[i] / max(of, 1),
            self.max_loss_fraction,
        )


@dataclass(frozen=True)
class ReadTask:
    """Read `count` samples of shard `path`, after passing over the first `skip`."""

    path: str
    skip: int
    count: int


def seeded_rng(*seed_parts: int) -> random.Random:
    return random.Random(
        int(np.random.SeedSequence([int(s) for s in seed_parts]).generate_state(1)[0])
    )


def exact_split(
    paths: list[str],
    counts: list[int],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool = True,
    order: list[int] | None = None,
) -> tuple[int, list[ReadTask]]:
    """This (rank, worker)'s share of one epoch: (sample count, read tasks).

    Samples are laid end to end in shard `order`. With `drop_last`, every rank
    gets `total // (world_size * batch_size)` whole batches, shared among its
    workers in whole batches; the remainder is not read this epoch. Without
    it, every sample is read once and the last batch of a worker may be short.
    """
    order = list(range(len(counts))) if order is None else order
    total = sum(counts)
    if drop_last:
        per_rank = total // (world_size * batch_size)
        q, r = divmod(per_rank, num_workers)
        before = worker * q + min(worker, r)
        start = (rank * per_rank + before) * batch_size
        end = start + (q + (worker < r)) * batch_size
    else:
        rank_start, rank_end = rank * total // world_size, (rank + 1) * total // world_size
        size = rank_end - rank_start
        start = rank_start + worker * size // num_workers
        end = rank_start + (worker + 1) * size // num_workers
    tasks = []
    offset = 0
    for i in order:
        n = counts[i]
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            tasks.append(ReadTask(paths[i], lo - offset, hi - lo))
        offset += n
    return end - start, tasks


def resampled_tasks(
    paths: list[str],
    counts: list[int],
    rng: random.Random,
    health: ShardHealth | None = None,
) -> Iterator[ReadTask]:
    """Endless shard draws with replacement, weighted by sample count (uniform over samples);
    shards `health` excludes are no longer drawn (LoaderError once none is left)."""
    nonempty = [i for i, n in enumerate(counts) if n > 0]
    weights = [counts[i] for i in nonempty]
    while True:
        i = rng.choices(nonempty, weights=weights)[0]
        if health is not None and health.excluded(paths[i]):
            nonempty = [j for j in nonempty if not health.excluded(paths[j])]
            weights = [counts[j] for j in nonempty]
            if not nonempty:
                raise LoaderError(
                    f"every shard with samples was left out (loader.max_shard_loss_fraction="
                    f"{health.max_loss_fraction}); last: {paths[i]}"
                )
            continue
        yield ReadTask(paths[i], 0, counts[i])


class _CountingFile:
    """A binary file that counts the bytes read from it (for the loader's `bytes` counter)."""

    def __init__(self, path: str):
        self.name = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self.bytes_read += len(data)
        return data

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


def read_samples(
    tasks: Iterable[ReadTask],
    *,
    suffixes: frozenset[str] | None,
    stats: LoaderStats,
    warn: Callable[..., None],
    max_empty: int | None = None,
    health: ShardHealth | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples of each task; a corrupt, truncated or short shard is counted and passed over.

    With `max_empty`, that many tasks in a row without a sample raise LoaderError
    (an endless resampled stream over broken shards would otherwise hang). With
    `health`, tasks of shards it excludes are passed over unread, and losses are told to it.
    """
    empty = 0
    for task in tasks:
        got = 0
        if health is not None:
            if health.excluded(task.path):
                continue
            health.promised(task.path, task.count)
        if max_empty is not None and empty >= max_empty:
            raise LoaderError(f"{empty} shard reads in a row gave no sample; last: {task.path}")
        empty += 1
        try:
            with _CountingFile(task.path) as f:
                for sample in iter_shard_samples(
                    f, skip=task.skip, limit=task.count, suffixes=suffixes
                ):
                    sample["__url__"] = task.path
                    got += 1
                    empty = 0
                    yield sample
                stats.add("bytes", f.bytes_read)
        except (ShardError, OSError) as exc:
            where = "" if isinstance(exc, ShardError) else f"{task.path}: "  # ShardError names it
            warn(stats, "tar", f"{where}{exc}; {task.count - got} sample(s) lost", task.count - got)
            if health is not None:
                health.lost(task.path, task.count - got)
            continue
        if got < task.count:
            warn(
                stats,
                "tar",
                f"{task.path}: {got} sample(s) where the manifest promises {task.count}",
                task.count - got,
            )
            if health is not None:
                health.lost(task.path, task.count - got)


def shuffled(samples: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: fill to `bufsize`, then emit a random element for each one read."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def batched(
    samples: Iterable[Any], batch_size: int, *, partial: bool = False
) -> Iterator[list[Any]]:
    """Lists of `batch_size` samples; a short last list only with `partial`."""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and partial:
        yield batch
