"""build_loader: the loader of one rank from a job config, DataLoader workers included.

Speed comes from doing per sample only what must be done per sample (header
checks, inflating the PNG, parsing the JSON) and everything else once per
batch on contiguous arrays (see stream.py for the stages). Between a
DataLoader worker and the trainer, what costs is fresh shared memory and
pickled Python objects, so `build_loader` gives its workers a ring of reused
shared-memory batch buffers (BatchRing) and batches carry their JSON as raw
bytes, parsed when read (MetaList). bench/loader.py measures it, in one process
and through build_loader's workers.

Bad shards. A corrupt or truncated tar, or an undecodable sample, is skipped,
counted by reason and logged; the run goes on. At start-up `loader.verify`
compares the shard files with the manifest (size, or size and sha256): a shard
that is missing or differs is left out on every rank (so all ranks still agree
on the batch count), logged with its file name and counted in
`data/shards_excluded`, unless such shards hold more than
`loader.max_excluded_fraction` of the samples: then the set is refused. A shard
that passes that check but loses more than `loader.max_shard_loss_fraction` of
its samples while read (bytes flipped in place) is left out for the rest of the
run by the rank's workers, warned about once and counted in the same counter.

`build_loader(cfg, rank=..., world_size=...)` returns a `ShardLoader`: iterate
it for batches; it also carries the manifest, the batch count per epoch, the
counters and `to_device`.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import signal
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pimc_dist.recurrence import recurrence_plot_torch
from pimc_dist.shardset.batch import normalize_views, view_normalisation
from pimc_dist.shardset.codec import decode_npy, decode_png
from pimc_dist.shardset.errors import LoaderError, ShardError
from pimc_dist.shardset.manifest import (
    Manifest,
    read_manifest,
    shard_problems,
    unlisted_shards,
)
from pimc_dist.shardset.ring import BatchRing, RingBatch, layout_bytes, shared_memory_free
from pimc_dist.shardset.stream import ShardStream, SharedEpoch
from pimc_dist.shardset.tar import iter_shard_samples

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _close_at_exit(ref: weakref.ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class ShardLoader:
    """What the trainer holds: iterate it for batches (one epoch per `iter`, endless if resampled).

    `batches_per_epoch` is the batch count each rank yields per epoch (exact
    mode; in resampled mode the count that makes one nominal epoch).
    `set_epoch(e)` chooses the epoch of the next iteration (on resume); each
    iteration otherwise advances it by one. Batches come in the stored dtypes;
    `to_device(batch, device)` moves one, builds recurrence plots there when
    `rp_on_the_fly == "gpu"`, and normalises it (`loader.normalize`).
    """

    def __init__(
        self,
        stream: ShardStream,
        dataloader: DataLoader,
        *,
        rp_size: int,
        epoch: int,
        norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        excluded: list[str] | None = None,
        pin: bool = False,
    ):
        self.stream = stream
        self.norm = dict(norm or {})  # applied by to_device
        self.pin = pin  # copy ring batches into pinned memory (CUDA)
        self.excluded = list(excluded or [])  # problems of the shards left out at start-up
        self.dataloader = dataloader
        self.manifest = stream.manifest
        self.stats = stream.stats
        self.batch_size = stream.batch_size
        self.resampled = stream.resampled
        self.batches_per_epoch = stream.batches_per_epoch(max(1, dataloader.num_workers))
        self.rp_size = rp_size
        self._next_epoch = epoch
        self._rp_torch = None
        # Registered after multiprocessing's own exit handler, so it runs first: that
        # handler SIGTERMs and joins daemon children, and our workers ignore SIGTERM
        # (see _worker_init), so a loader still alive at exit would hang it forever.
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def views(self) -> list[str]:
        return self.stream.views

    @property
    def normalisation(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-channel (mean, std) of each view that `to_device` turns into (x - mean) / std."""
        return dict(self.norm)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is freed)."""
        iterator = getattr(self.dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.dataloader._iterator = None

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def counters(self) -> dict[str, int]:
        """The loader counters summed over workers, keyed "data/<name>" for metric logs,
        and the number of shards left out, at start-up or since (`data/shards_excluded`)."""
        counts = {f"data/{k}": v for k, v in self.stats.as_dict().items()}
        counts["data/shards_excluded"] = len(self.excluded) + len(
            self.stream.health.excluded_paths()
        )
        return counts

    def sample_images(self, n: int) -> dict[str, np.ndarray]:
        """Up to `n` samples of the first shard as uint8 HxW or HxWx3 images per view, for a glance.

        Plots show their three index channels as RGB; crops with three or more
        channels show channels 2, 1, 0 (B04, B03, B02 in Sentinel-2 order),
        each image stretched between its 2nd and 98th percentiles.
        """
        images: dict[str, np.ndarray] = {}
        specs = {v: s for v, s in self.stream.specs.items() if len(s.shape) == 3}
        if n <= 0 or not specs:
            return images
        samples = iter_shard_samples(self.manifest.shard_paths()[0], limit=n)
        for i, sample in enumerate(samples):
            for view, spec in specs.items():
                data = sample.get(f"{view}.{spec.ext}")
                if data is None:
                    continue
                decode_one = decode_npy if spec.ext == "npy" else decode_png
                images[f"{view}/{i}"] = _display_image(np.asarray(decode_one(data), np.float32))
        return images

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.epoch.set(self._next_epoch)
        self._next_epoch += 1
        batches = iter(self.dataloader)
        ring = self.stream.ring
        if ring is None:
            return batches
        layout = self.stream.builder.layout
        return (
            ring.take(b, layout(b.n), self.pin) if isinstance(b, RingBatch) else b for b in batches
        )

    def __len__(self) -> int:
        if self.resampled:
            raise TypeError(
                "a resampled loader is endless; use batches_per_epoch for a nominal epoch"
            )
        return self.batches_per_epoch

    def to_device(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Move tensors to `device`, then, there: with rp_on_the_fly == "gpu" turn `rp_series`
        into plots, and normalise the views of `normalisation` (batches leave the workers in
        their stored dtypes, 2-4x fewer bytes than float32; see batch.py)."""
        out = {
            k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        series = out.pop("rp_series", None)
        if series is not None:
            if self._rp_torch is None:
                self._rp_torch = recurrence_plot_torch
            out["rp"] = self._rp_torch(series, size=self.rp_size or None)
        return normalize_views(out, self.norm)


def _display_image(x: np.ndarray) -> np.ndarray:
    """A (C, H, W) array as a uint8 image: RGB from channels 2, 1, 0 (or 0, 1, 2 for 3), else grey."""
    if x.shape[0] == 3:
        x = x.transpose(1, 2, 0)
    elif x.shape[0] > 3:
        x = x[[2, 1, 0]].transpose(1, 2, 0)
    else:
        x = x[0]
    lo, hi = np.percentile(x, [2, 98])
    return (np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the trainer that forked it dies.

    A trainer killed outright (OOM killer, SIGKILL) leaves its workers blocked on a full
    result pipe forever, and they ignore SIGTERM (above); this ends them with it.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the trainer died before prctl took effect
        os._exit(1)


def _worker_init(rp_on_the_fly: str, worker_id: int) -> None:
    # Slurm's SIGTERM reaches every process of a job: the trainer saves a checkpoint
    # first, so its workers must keep serving batches until the main process exits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if rp_on_the_fly == "cpu":  # one numba thread per worker: the workers are the parallelism
        import numba

        numba.set_num_threads(1)


def build_loader(
    cfg: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    device: torch.device | str | None = None,
    train: bool = True,
) -> ShardLoader:
    """The loader of one rank from a job config (`cfg.loader`, `cfg.train.batch_size`, `cfg.data.rp_size`).

    `train=False` gives an evaluation loader: shard order kept, no shuffling or
    augmentation, every sample once (the last batch of a worker may be short).
    Shard files are checked against the manifest first (see `usable_manifest`).
    """
    lc = cfg.loader
    return open_loader(
        lc.shards,
        views=list(lc.views),
        batch_size=int(cfg.train.batch_size),
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        device=device,
        train=train,
        seed=int(cfg.train.seed),
        rp_size=int(cfg.data.rp_size),
        workers=int(lc.workers),
        prefetch_factor=int(lc.prefetch_factor),
        shuffle_buffer=int(lc.shuffle_buffer),
        resampled=bool(lc.resampled),
        augment_views=list(lc.augment_views) if lc.augment else [],
        normalize=bool(lc.normalize),
        rp_on_the_fly=str(lc.rp_on_the_fly),
        verify=str(lc.verify),
        max_excluded_fraction=float(lc.max_excluded_fraction),
        max_shard_loss_fraction=float(lc.max_shard_loss_fraction),
    )


def open_loader(
    shards: str | Path,
    *,
    views: list[str],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    device: torch.device | str | None = None,
    train: bool = True,
    seed: int = 0,
    rp_size: int = 0,
    workers: int = 0,
    prefetch_factor: int = 4,
    shuffle_buffer: int = 2000,
    resampled: bool = False,
    augment_views: list[str] | tuple[str, ...] = (),
    normalize: bool = True,
    rp_on_the_fly: str = "off",
    verify: str = "size",
    max_excluded_fraction: float = 0.1,
    max_shard_loss_fraction: float | None = 0.05,
) -> ShardLoader:
    """The loader of one rank from explicit arguments (`build_loader` reads them from a job
    config; evaluation passes its own). `train=False`: as in `build_loader`, and no shard is
    left out for its losses (`max_shard_loss_fraction` applies to training only)."""
    manifest, excluded = usable_manifest(Path(shards), verify, max_excluded_fraction)
    stream = ShardStream(
        manifest,
        views=list(views),
        batch_size=int(batch_size),
        rank=rank,
        world_size=world_size,
        resampled=resampled and train,
        shuffle=train,
        shuffle_buffer=int(shuffle_buffer),
        drop_last=train,
        augment_views=list(augment_views) if train else [],
        rp_on_the_fly=rp_on_the_fly,
        rp_size=int(rp_size),
        seed=int(seed),
        epoch=SharedEpoch(epoch),
        # Evaluation reads every sample once and counts every loss: nothing to leave out.
        max_shard_loss_fraction=max_shard_loss_fraction if train else None,
    )
    pin = device is not None and torch.device(device).type == "cuda"
    if workers > 0:
        # One slot more than the batches a worker may have in flight (prefetch_factor).
        batch_bytes = layout_bytes(stream.builder.layout(stream.batch_size))
        slots = int(prefetch_factor) + 1
        ring_bytes = batch_bytes * workers * slots
        shm_free = shared_memory_free()
        if ring_bytes <= shm_free // 2:
            stream.ring = BatchRing(batch_bytes, workers, slots)
        else:
            # tmpfs pages are only taken when touched: a ring larger than /dev/shm would
            # die of SIGBUS mid-run instead of failing here. Batches then travel as torch's
            # DataLoader sends them (slower, but within what the machine has).
            log.warning(
                "loader: no shared-memory batch ring (%.0f MiB for %d worker(s) x %d slots; "
                "/dev/shm has %.0f MiB free); lower loader.prefetch_factor or train.batch_size, "
                "or give the job more /dev/shm",
                ring_bytes / 2**20,
                workers,
                slots,
                shm_free / 2**20,
            )
    dataloader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin and workers == 0,  # with workers, the ring's copy pins (ShardLoader)
        collate_fn=_as_is,  # batches are ready; default_convert would walk every value
        prefetch_factor=int(prefetch_factor) if workers > 0 else None,
        worker_init_fn=functools.partial(_worker_init, str(rp_on_the_fly)) if workers > 0 else None,
    )
    return ShardLoader(
        stream,
        dataloader,
        rp_size=int(rp_size),
        epoch=epoch,
        norm=view_normalisation(manifest, list(views), rp_on_the_fly) if normalize else {},
        excluded=excluded,
        pin=pin,
    )


def _as_is(batch: Any) -> Any:
    return batch


def usable_manifest(
    root: str | Path, verify: str = "size", max_excluded_fraction: float = 0.1
) -> tuple[Manifest, list[str]]:
    """The manifest of the set at `root` without the shards that fail `verify`, and their problems.

    `verify`: none (no check) | size (file sizes) | sha256 (sizes and checksums). A
    listed shard that is missing or differs is left out and logged, naming the file;
    if such shards hold more than `max_excluded_fraction` of the samples, ShardError
    listing every one. Every rank sees the same files, so all leave out the same shards.
    """
    if verify not in ("none", "size", "sha256"):
        raise LoaderError(f"loader.verify must be none, size or sha256, got {verify!r}")
    if not 0.0 <= max_excluded_fraction <= 1.0:
        raise LoaderError(
            f"loader.max_excluded_fraction must be in [0, 1], got {max_excluded_fraction}"
        )
    manifest = read_manifest(root)
    if verify == "none":
        return manifest, []
    for path in unlisted_shards(manifest):
        log.warning("%s: shard file not listed in %s; not read", path, manifest.path.name)
    problems = shard_problems(manifest, checksums=verify == "sha256")
    if not problems:
        return manifest, []
    lost = sum(s.samples for s in manifest.shards if s.name in problems)
    share = lost / max(manifest.total_samples, 1)
    what = (
        f"{len(problems)} of {len(manifest.shards)} shard(s) disagree with "
        f"{manifest.path.name} (loader.verify={verify}), holding {lost} of "
        f"{manifest.total_samples} samples ({share:.1%})"
    )
    lines = "\n  ".join(problems.values())
    if share > max_excluded_fraction:
        raise ShardError(
            f"{root}: {what}, more than loader.max_excluded_fraction={max_excluded_fraction}; "
            f"re-shard or restore them:\n  {lines}"
        )
    log.warning("%s: %s; left out of this run:\n  %s", root, what, lines)
    return manifest.without(frozenset(problems)), list(problems.values())
