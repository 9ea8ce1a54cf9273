"""ShardStream: the chain of loader stages for one rank, as an IterableDataset.

    shard tasks (resampled, or an exact split over ranks and workers)   reader.py
      -> read_samples   fast tar reader; corrupt or short shards skipped and counted
      -> shuffled       a shuffle buffer of raw samples
      -> decode         validate every member, parse .npy headers, inflate PNG rows,
                        parse the JSON; undecodable samples skipped and counted   decoder.py
      -> batched        lists of `batch_size` samples
      -> BatchBuilder   collate into batch arrays in their stored dtypes, undo PNG
                        filters for the whole batch, optional recurrence plots from the
                        series, flips/rotations of crops, torch tensors (in a DataLoader
                        worker of build_loader: into a BatchRing slot)   batch.py
    (normalisation from the manifest runs on the training device: ShardLoader.to_device)

A shard that loses more than `max_shard_loss_fraction` of its samples is left
out for the rest of the run by all workers of the rank (ShardHealth, reader.py).

A range that comes up short in exact mode (corrupt samples, or a damaged shard)
is topped up from the epoch's shards that follow it (wrapping around), counted
in `refills`: a few samples are then read twice in that epoch, but no rank
falls short and leaves the others waiting at their next collective.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pimc_dist.shardset.batch import BatchBuilder, as_tensors
from pimc_dist.shardset.decoder import SampleDecoder, decode
from pimc_dist.shardset.errors import LoaderError
from pimc_dist.shardset.manifest import Manifest, ViewSpec
from pimc_dist.shardset.reader import (
    LoaderStats,
    ReadTask,
    ShardHealth,
    SkipLog,
    batched,
    exact_split,
    read_samples,
    resampled_tasks,
    seeded_rng,
    shuffled,
)
from pimc_dist.shardset.ring import BatchRing, RingBatch

log = logging.getLogger(__name__)


class SharedEpoch:
    """An epoch number every DataLoader worker reads when a new pass starts."""

    def __init__(self, epoch: int = 0):
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


class ShardStream(IterableDataset):
    """Yields ready batches (dicts of tensors) for one rank; see the module docstring.

    Use it with `DataLoader(stream, batch_size=None, num_workers=...)`.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        views: list[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = True,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        drop_last: bool = True,
        augment_views: list[str] | tuple[str, ...] = (),
        rp_on_the_fly: str = "off",
        rp_size: int = 0,
        seed: int = 0,
        epoch: SharedEpoch | None = None,
        stats: LoaderStats | None = None,
        max_shard_loss_fraction: float | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise LoaderError(f"batch_size must be positive, got {batch_size}")
        if rp_on_the_fly not in ("off", "cpu", "gpu"):
            raise LoaderError(
                f"loader.rp_on_the_fly must be off, cpu or gpu, got {rp_on_the_fly!r}"
            )
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} outside world size {world_size}")
        self.manifest = manifest
        self.views = list(views)
        self.specs = self._read_specs(manifest, self.views, rp_on_the_fly)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.resampled = resampled
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = epoch or SharedEpoch()
        self.stats = stats or LoaderStats()
        self.paths = [str(p) for p in manifest.shard_paths()]
        self.counts = [s.samples for s in manifest.shards]
        self.health = ShardHealth(self.paths, self.counts, max_shard_loss_fraction)
        if manifest.total_samples == 0:
            raise LoaderError(f"{manifest.path}: the shard set holds no (usable) samples")
        if drop_last and self.batches_per_epoch() == 0:
            raise LoaderError(
                f"{manifest.path}: {manifest.total_samples} samples cannot fill one batch of "
                f"{batch_size} on each of {world_size} ranks"
            )
        self.builder = BatchBuilder(
            self.specs,
            views=self.views,
            manifest=manifest,
            augment_views=list(augment_views),
            rp_on_the_fly=rp_on_the_fly,
            rp_size=rp_size,
        )
        self.decoder = SampleDecoder(
            self.specs, meta="json" in manifest.members, tables=manifest.meta_tables
        )
        self.ring: BatchRing | None = None  # set by build_loader for its DataLoader workers

    @staticmethod
    def _read_specs(
        manifest: Manifest, views: list[str], rp_on_the_fly: str
    ) -> dict[str, ViewSpec]:
        """The stored views to read: those asked for, with the series instead of plots made on the fly."""
        wanted = [v for v in views if not (v == "rp" and rp_on_the_fly != "off")]
        if "rp" in views and rp_on_the_fly != "off" and "series" not in wanted:
            wanted.append("series")
        missing = [v for v in wanted if v not in manifest.views]
        if missing:
            raise LoaderError(
                f"{manifest.path}: view(s) {missing} not in this shard set (it has {sorted(manifest.views)})"
            )
        return {v: manifest.views[v] for v in wanted}

    def batches_per_epoch(self, num_workers: int = 1) -> int:
        """Batches this rank yields per epoch: with drop_last the same on every rank,
        total // (world_size * batch_size); without, each worker's share, rounded up."""
        if self.drop_last:
            return self.manifest.total_samples // (self.world_size * self.batch_size)
        shares = (
            exact_split(
                self.paths,
                self.counts,
                rank=self.rank,
                world_size=self.world_size,
                worker=w,
                num_workers=num_workers,
                batch_size=self.batch_size,
                drop_last=False,
            )[0]
            for w in range(num_workers)
        )
        return sum(-(-n // self.batch_size) for n in shares)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        epoch = self.epoch.get()
        warn = SkipLog()
        rng = seeded_rng(self.seed, epoch, self.rank, worker)
        aug_rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        suffixes = self.decoder.member_suffixes()
        if self.resampled:
            tasks = resampled_tasks(self.paths, self.counts, rng, self.health)
            max_empty = max(10, 2 * len(self.paths))
            raw = read_samples(
                tasks,
                suffixes=suffixes,
                stats=self.stats,
                warn=warn,
                max_empty=max_empty,
                health=self.health,
            )
            samples = decode(
                shuffled(raw, self.shuffle_buffer, rng),
                self.decoder,
                stats=self.stats,
                warn=warn,
                health=self.health,
            )
        else:
            samples = self._exact_samples(epoch, worker, num_workers, rng, suffixes, warn)
        ring = self.ring
        if ring is not None and (get_worker_info() is None or ring.workers != num_workers):
            ring = None  # iterated in the trainer itself, or by another DataLoader
        for group in batched(samples, self.batch_size, partial=not self.drop_last):
            batch = self._build(group, aug_rng, ring, worker)
            self.stats.add("samples", len(group))
            self.stats.add("batches")
            self.stats.flush()
            yield batch
        self.stats.flush()

    def _build(
        self,
        samples: list[dict[str, Any]],
        rng: np.random.Generator,
        ring: BatchRing | None,
        worker: int,
    ) -> dict[str, Any] | RingBatch:
        """A batch of tensors, or in a worker with a ring, a batch built in a ring slot."""
        if ring is not None:
            layout = self.builder.layout(len(samples))
            slot = ring.acquire(worker, layout)
            if slot is not None:
                batch = self.builder(samples, rng, ring.arrays(worker, slot, layout))
                extras = {k: v for k, v in batch.items() if k not in layout}
                return RingBatch(worker, slot, len(samples), extras)
        return as_tensors(self.builder(samples, rng))

    def _exact_samples(
        self,
        epoch: int,
        worker: int,
        num_workers: int,
        rng: random.Random,
        suffixes: frozenset[str],
        warn: SkipLog,
    ) -> Iterator[dict[str, Any]]:
        order = list(range(len(self.counts)))
        if self.shuffle:
            seeded_rng(self.seed, epoch).shuffle(order)  # the same order on every rank and worker
        needed, tasks = exact_split(
            self.paths,
            self.counts,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            order=order,
        )
        if needed == 0:
            return
        reads = tasks
        produced = 0
        while True:
            got = 0
            raw = read_samples(
                reads, suffixes=suffixes, stats=self.stats, warn=warn, health=self.health
            )
            for sample in decode(
                shuffled(raw, self.shuffle_buffer, rng),
                self.decoder,
                stats=self.stats,
                warn=warn,
                health=self.health,
            ):
                yield sample
                got += 1
                produced += 1
                if produced == needed:
                    return
            if not self.drop_last:
                return  # evaluation: every readable sample once, no top-up
            if got == 0 and reads is not tasks:
                raise LoaderError(
                    f"rank {self.rank} worker {worker}: no decodable sample in any of the "
                    f"{len(self.paths)} shard(s) of {self.manifest.root}"
                )
            # Top up from the shards after this range: a rank that yielded fewer batches
            # than the others would leave them waiting forever at the next collective.
            reads = self._top_up_tasks(order, tasks)
            self.stats.add("refills")
            log.warning(
                "rank %d worker %d: %d of %d samples this epoch after skips; "
                "topping up from the shards after %s",
                self.rank,
                worker,
                produced,
                needed,
                Path(tasks[-1].path).name,
            )

    def _top_up_tasks(self, order: list[int], tasks: list[ReadTask]) -> list[ReadTask]:
        """Every shard of the epoch, whole, starting with the one after the range of `tasks`."""
        start = order.index(self.paths.index(tasks[-1].path)) + 1
        rotated = order[start:] + order[:start]
        return [ReadTask(self.paths[i], 0, self.counts[i]) for i in rotated if self.counts[i] > 0]
