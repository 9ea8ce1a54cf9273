"""Streaming loader for shard sets: tar shards in, batches of tensors out.

The pipeline is a chain of small generator stages, as in webdataset and
open_clip's data.py, each testable alone:

    shard tasks (resampled, or an exact split over ranks and workers)
      -> read_samples   fast tar reader; corrupt or short shards skipped and counted
      -> shuffled       a shuffle buffer of raw samples
      -> decode         validate every member, parse .npy headers, inflate PNG rows,
                        parse the JSON; undecodable samples skipped and counted
      -> batched        lists of `batch_size` samples
      -> BatchBuilder   collate into batch arrays, undo PNG filters for the whole batch,
                        optional recurrence plots from the series, flips/rotations of
                        crops, normalisation from the manifest, torch tensors (in a
                        DataLoader worker of build_loader: into a BatchRing slot)

Speed comes from doing per sample only what must be done per sample (header
checks, inflating the PNG, parsing the JSON) and everything else once per
batch on contiguous arrays: buffers reused across batches, PNG filters undone
for the whole batch, and samples sorted by their random flip/rotation so that
each transform is one slice of the batch (the order within a batch carries no
meaning). Between a DataLoader worker and the trainer, what costs is fresh
shared memory and pickled Python objects, so `build_loader` gives its workers a
ring of reused shared-memory batch buffers (BatchRing) and batches carry their
JSON as raw bytes, parsed when read (MetaList). bench/loader.py measures it, in
one process and through build_loader's workers.

Epochs and ranks. With `resampled=True` every rank and worker draws shards
with replacement from its own seeded stream (seed, epoch, rank, worker): an
endless stream, the trainer counts samples. With `resampled=False` each epoch
permutes the shard order (the same permutation on every rank), lays the
samples end to end and gives every (rank, worker) a disjoint contiguous range;
each rank gets exactly `floor(total / (world_size * batch_size))` batches, so
ranks never wait for one another at the end of an epoch, whatever the shard
sizes. A range that comes up short (corrupt samples, or a damaged shard) is
topped up from the epoch's shards that follow it (wrapping around), counted in
`refills`: a few samples are then read twice in that epoch, but no rank falls
short and leaves the others waiting at their next collective.

Bad shards. A corrupt or truncated tar, or an undecodable sample, is skipped,
counted by reason and logged; the run goes on. At start-up `loader.verify`
compares the shard files with the manifest (size, or size and sha256): a shard
that is missing or differs is left out on every rank (so all ranks still agree
on the batch count), logged with its file name and counted in
`data/shards_excluded`, unless such shards hold more than
`loader.max_excluded_fraction` of the samples: then the set is refused.

`build_loader(cfg, rank=..., world_size=...)` returns a `ShardLoader`: iterate
it for batches; it also carries the manifest, the batch count per epoch, the
counters and `to_device`.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import sys
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pimc_dist.shardset import format as shard_format
from pimc_dist.shardset.format import Manifest, ShardError, ViewSpec

try:  # libdeflate through imagecodecs inflates about 1.6x faster than zlib
    from imagecodecs import deflate_decode as _deflate_decode
except ImportError:  # pragma: no cover - imagecodecs is a dependency
    _deflate_decode = None

log = logging.getLogger(__name__)

SKIP_REASONS = ("tar", "missing", "decode", "shape")
_WARN_FIRST = 20  # skip warnings logged in full per process; then one in every _WARN_EVERY
_WARN_EVERY = 1000
_RP_FALLBACK_STATS = (127.5, 127.5)  # plots made on the fly, set without rp statistics
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_JSON = json.JSONDecoder()  # raw_decode on text: json.loads without its per-call checks


class LoaderError(RuntimeError):
    """The loader cannot produce batches (bad config for this shard set, nothing decodable)."""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------
# Counters shared by the DataLoader workers
# ---------------------------------------------------------------------------


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


class _SkipLog:
    """Warns about skipped samples: the first few in full, then one in every thousand."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, stats: LoaderStats, reason: str, message: str, n: int = 1) -> None:
        stats.add(f"skipped_{reason}", n)
        self.count += 1
        if self.count <= _WARN_FIRST or self.count % _WARN_EVERY == 0:
            suffix = " (further skips logged once per 1000)" if self.count == _WARN_FIRST else ""
            log.warning("skipped (%s): %s%s", reason, message, suffix)


# ---------------------------------------------------------------------------
# Stage 1: which shards, which samples
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadTask:
    """Read `count` samples of shard `path`, after passing over the first `skip`."""

    path: str
    skip: int
    count: int


def _rng(*seed_parts: int) -> random.Random:
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


def resampled_tasks(paths: list[str], counts: list[int], rng: random.Random) -> Iterator[ReadTask]:
    """Endless shard draws with replacement, weighted by sample count (uniform over samples)."""
    nonempty = [i for i, n in enumerate(counts) if n > 0]
    weights = [counts[i] for i in nonempty]
    while True:
        i = rng.choices(nonempty, weights=weights)[0]
        yield ReadTask(paths[i], 0, counts[i])


# ---------------------------------------------------------------------------
# Stage 2: read, shuffle
# ---------------------------------------------------------------------------


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
) -> Iterator[dict[str, Any]]:
    """Raw samples of each task; a corrupt, truncated or short shard is counted and passed over.

    With `max_empty`, that many tasks in a row without a sample raise LoaderError
    (an endless resampled stream over broken shards would otherwise hang).
    """
    empty = 0
    for task in tasks:
        got = 0
        if max_empty is not None and empty >= max_empty:
            raise LoaderError(f"{empty} shard reads in a row gave no sample; last: {task.path}")
        empty += 1
        try:
            with _CountingFile(task.path) as f:
                for sample in shard_format.iter_shard_samples(
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
            continue
        if got < task.count:
            warn(
                stats,
                "tar",
                f"{task.path}: {got} sample(s) where the manifest promises {task.count}",
                task.count - got,
            )


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


# ---------------------------------------------------------------------------
# Stage 3: decode
# ---------------------------------------------------------------------------


def _inflate(data: bytes, size: int) -> bytes:
    if _deflate_decode is not None:
        return _deflate_decode(
            data, out=size + 1
        )  # one spare byte: more data shows as a wrong size
    return zlib.decompress(data, bufsize=size + 1)


class SampleDecoder:
    """Checks and decodes one raw sample; cheap because every sample of a view looks alike.

    Returns a dict: for .npy views a memoryview of the data (header checked),
    for PNG views the inflated filtered rows (bytes), "__meta__" the parsed JSON
    and "__json__" its raw bytes (what batches carry, see MetaList).
    Raises _Skip(reason, detail) for a sample that cannot be used.
    """

    def __init__(self, specs: dict[str, ViewSpec], meta: bool):
        self.specs = specs
        self.meta = meta
        self.suffixes = {view: f"{view}.{spec.ext}" for view, spec in specs.items()}
        self._npy_headers: dict[bytes, int] = {}
        self._png: dict[str, tuple[bytes, int, int]] = {}
        self._png_filters: dict[str, dict[int, bytes]] = {}
        for view, spec in specs.items():
            if spec.ext == "png":
                channels, height, width = spec.shape
                color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
                ihdr = np.array([width, height], ">u4").tobytes() + bytes([8, color, 0, 0, 0])
                stride = 1 + width * channels
                self._png[view] = (ihdr, height, stride)
                self._png_filters[view] = {k: bytes([k]) * height for k in (0, 1, 2)}

    def member_suffixes(self) -> frozenset[str]:
        return frozenset(self.suffixes.values()) | ({"json"} if self.meta else frozenset())

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": sample["__key__"]}
        for view, suffix in self.suffixes.items():
            data = sample.get(suffix)
            if data is None:
                raise _Skip("missing", f"no member '{suffix}'")
            if self.specs[view].ext == "npy":
                out[view] = self._npy(view, data)
            else:
                out[view] = self._png_rows(view, data)
        if self.meta:
            data = sample.get("json")
            if data is None:
                raise _Skip("missing", "no member 'json'")
            try:
                text = data.decode()
                if text[:1].isspace():
                    text = text.strip()
                meta, end = _JSON.raw_decode(text)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Skip("decode", f"json: {exc}") from None
            if end != len(text) and text[end:].strip():
                raise _Skip("decode", f"json: extra data at char {end}")
            if not isinstance(meta, dict):
                raise _Skip("decode", "json: not an object")
            out["__meta__"] = meta
            out["__json__"] = data
        return out

    def _npy(self, view: str, data: bytes) -> memoryview:
        try:
            length = shard_format.npy_header_length(data)
        except ValueError as exc:
            raise _Skip("decode", f"{view}.npy: {exc}") from None
        header = data[:length]
        nbytes = self._npy_headers.get(header)
        if nbytes is None:
            spec = self.specs[view]
            try:
                parsed = shard_format.parse_npy_header(header)
            except ValueError as exc:
                raise _Skip("decode", f"{view}.npy: {exc}") from None
            if parsed.dtype != np.dtype(spec.dtype) or parsed.shape != spec.shape:
                raise _Skip(
                    "shape",
                    f"{view}.npy: {parsed.dtype} {parsed.shape}, manifest says {spec.dtype} {spec.shape}",
                )
            nbytes = parsed.nbytes
            if len(self._npy_headers) < 64:
                self._npy_headers[header] = nbytes
        if len(data) - length != nbytes:
            raise _Skip(
                "decode", f"{view}.npy: {len(data) - length} data bytes, header says {nbytes}"
            )
        return memoryview(data)[length:]

    def _png_rows(self, view: str, data: bytes) -> bytes:
        ihdr, height, stride = self._png[view]
        size = height * stride
        # Our own PNGs: IHDR as expected, then a single IDAT chunk.
        if data[16:29] == ihdr and data[:8] == b"\x89PNG\r\n\x1a\n" and data[37:41] == b"IDAT":
            length = int.from_bytes(data[33:37], "big")
            try:
                raw = _inflate(data[41 : 41 + length], size)
            except Exception as exc:  # zlib.error / DeflateError: corrupt stream
                raise _Skip("decode", f"{view}.png: {exc}") from None
            if len(raw) != size:
                raise _Skip("decode", f"{view}.png: {len(raw)} bytes of rows, expected {size}")
            kind = raw[0]
            if kind <= 2 and raw[::stride] == self._png_filters[view][kind]:
                return raw
        return self._png_slow(view, data)

    def _png_slow(self, view: str, data: bytes) -> bytes:
        """Any other PNG: decode fully, re-express as unfiltered rows."""
        try:
            image = shard_format.decode_png(data)
        except Exception as exc:  # PIL raises many kinds
            raise _Skip("decode", f"{view}.png: {exc}") from None
        spec = self.specs[view]
        if image.shape != spec.shape:
            raise _Skip("shape", f"{view}.png: {image.shape}, manifest says {spec.shape}")
        channels, height, width = image.shape
        rows = np.zeros((height, 1 + width * channels), np.uint8)
        rows[:, 1:] = image.transpose(1, 2, 0).reshape(height, -1)
        return rows.tobytes()


def decode(
    samples: Iterable[dict[str, Any]],
    decoder: SampleDecoder,
    *,
    stats: LoaderStats,
    warn: Callable[..., None],
    max_failures: int = 10_000,
) -> Iterator[dict[str, Any]]:
    """Decoded samples; undecodable ones are counted and logged with their shard and key.

    `max_failures` undecodable samples in a row raise LoaderError: that is a
    broken shard set, not a few bad samples.
    """
    failures = 0
    for sample in samples:
        try:
            out = decoder(sample)
        except _Skip as skip:
            warn(
                stats, skip.reason, f"{sample.get('__url__')}: sample '{sample['__key__']}': {skip}"
            )
            failures += 1
            if failures >= max_failures:
                raise LoaderError(
                    f"{failures} undecodable samples in a row; last: {skip}"
                ) from None
            continue
        failures = 0
        yield out


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


# ---------------------------------------------------------------------------
# Stage 4: batches
# ---------------------------------------------------------------------------


def unfilter_rows(rows: np.ndarray, channels: int, out: np.ndarray | None = None) -> np.ndarray:
    """(N, H, 1 + W*C) PNG rows (filter None, Sub or Up per image) -> contiguous (N, C, H, W) uint8."""
    n, height, stride = rows.shape
    width = (stride - 1) // channels
    if out is None:
        out = np.empty((n, channels, height, width), np.uint8)
    kinds = rows[:, 0, 0]
    if (kinds == 2).all():
        # Up, our encoder's filter: add each row to the next, rows outermost so each step is
        # one contiguous add over the whole batch (much faster than cumsum along an inner axis).
        x = np.ascontiguousarray(rows[:, :, 1:].transpose(1, 0, 2))
        for h in range(1, height):
            np.add(x[h], x[h - 1], out=x[h])
        np.copyto(out, x.reshape(height, n, width, channels).transpose(1, 3, 0, 2))
        return out
    for kind in np.unique(kinds):
        idx = np.flatnonzero(kinds == kind)
        out[idx] = shard_format.unfilter_png_rows(rows[idx], channels).transpose(0, 3, 1, 2)
    return out


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of the last two axes (k in 0..7; 0 is the identity)."""
    if k >= 4:
        x = x[..., ::-1]
    return np.rot90(x, k % 4, axes=(-2, -1))


def random_transforms(n: int, square: bool, rng: np.random.Generator) -> np.ndarray:
    """Per-sample dihedral transform indices: all 8 for square crops, else the 4 flips."""
    choices = np.arange(8) if square else np.array([0, 4, 6, 2])  # 6 = vertical flip, 2 = rot180
    return rng.choice(choices, size=n)


class BatchBuilder:
    """Turns a list of decoded samples into a dict of tensors (see module docstring).

    The raw batch arrays live in buffers reused from batch to batch (fresh
    pages cost more than the copy into them); every tensor handed out is new.
    """

    def __init__(
        self,
        specs: dict[str, ViewSpec],
        *,
        views: list[str],
        manifest: Manifest,
        normalize: bool,
        augment_views: list[str],
        rp_on_the_fly: str,
        rp_size: int,
    ):
        self.specs = specs
        self.views = views
        # Crops flipped/rotated together; plots never (see LoaderConfig.augment_views).
        self.augment_views = [v for v in augment_views if v in specs and v in views and v != "rp"]
        self.square = all(specs[v].shape[-1] == specs[v].shape[-2] for v in self.augment_views)
        self.rp_on_the_fly = rp_on_the_fly
        self.rp_size = rp_size or None
        self.norm: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for view in views:
            stats = shard_format.view_stats_arrays(manifest, view)
            if stats is None and view == "rp" and rp_on_the_fly != "off":
                mean, std = _RP_FALLBACK_STATS
                stats = (np.full(3, mean, np.float32), np.full(3, std, np.float32))
            if stats is not None and normalize:
                self.norm[view] = stats
        self._buffers: dict[str, np.ndarray] = {}
        self._rp_fn = None

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(shape, dtype)
        return buf

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Raw batch arrays (dtype as stored) of every view read, in reused buffers."""
        n = len(samples)
        arrays = {}
        for view, spec in self.specs.items():
            if spec.ext == "npy":
                buf = self._buffer(view, (n, *spec.shape), np.dtype(spec.dtype))
                _fill(buf, [sample[view] for sample in samples])
                arrays[view] = buf
            else:
                channels, height, width = spec.shape
                rows = self._buffer(f"{view}.rows", (n, height, 1 + width * channels), np.uint8)
                _fill(rows, [sample[view] for sample in samples])
                out = self._buffer(view, (n, *spec.shape), np.uint8)
                arrays[view] = unfilter_rows(rows, channels, out)
        return arrays

    def recurrence_plots(self, series: np.ndarray) -> np.ndarray:
        """(N, 3, T) series -> (N, 3, S, S) uint8 plots with pimc_dist.recurrence (CPU)."""
        if self._rp_fn is None:
            from pimc_dist.recurrence import recurrence_plot_uint8

            self._rp_fn = recurrence_plot_uint8
        plots = np.asarray(self._rp_fn(series.astype(np.float32), size=self.rp_size))
        if plots.dtype != np.uint8 or plots.ndim != 4 or plots.shape[:2] != series.shape[:2]:
            raise LoaderError(
                f"recurrence_plot_uint8 gave {plots.dtype} {plots.shape} for {series.shape}"
            )
        return plots

    def layout(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every array of a batch of `n` samples (labels and meta aside)."""
        out = {}
        for view in self.views:
            if view == "rp" and self.rp_on_the_fly == "gpu":
                out["rp_series"] = ((n, *self.specs["series"].shape), np.dtype(np.float32))
                continue
            if view == "rp" and self.rp_on_the_fly == "cpu":
                channels, steps = self.specs["series"].shape
                size = self.rp_size or steps
                shape, dtype = (channels, size, size), np.dtype(np.uint8)
            else:
                shape, dtype = self.specs[view].shape, np.dtype(self.specs[view].dtype)
            out[view] = ((n, *shape), np.dtype(np.float32) if view in self.norm else dtype)
        return out

    def finish(
        self, view: str, x: np.ndarray, groups: list[tuple[int, int, int]], out: np.ndarray
    ) -> None:
        """Fill `out` from batch array `x`: rows a:b transformed by dihedral k for (k, a, b) in
        `groups`, then (x - mean) / std per channel if the view has statistics."""
        for k, a, b in groups:
            np.copyto(out[a:b], dihedral(x[a:b], k) if k else x[a:b])  # casts while copying
        norm = self.norm.get(view)
        if norm is not None:
            tensor = torch.from_numpy(out)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            # torch's kernels run these two passes about twice as fast as numpy's.
            tensor.sub_(torch.from_numpy(norm[0]).view(shape))
            tensor.mul_(torch.from_numpy(1.0 / norm[1]).view(shape))

    def __call__(
        self,
        samples: list[dict[str, Any]],
        rng: np.random.Generator,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The batch of decoded `samples`: the arrays of `layout` (written into `out` where
        given, else new), `label`/`labels` arrays and `meta` (a MetaList) where the samples
        have JSON."""
        n = len(samples)
        if out is None:
            out = {k: np.empty(shape, dtype) for k, (shape, dtype) in self.layout(n).items()}
        plain = [(0, 0, n)]
        groups = plain
        if self.augment_views:
            # Samples sorted by their transform, so that each transform applies to one slice
            # of the batch (a view, no gather); the order within a batch carries no meaning.
            transforms = random_transforms(n, self.square, rng)
            order = np.argsort(transforms, kind="stable")
            samples = [samples[i] for i in order]
            bounds = np.searchsorted(transforms[order], np.arange(9)).tolist()
            groups = [(k, bounds[k], bounds[k + 1]) for k in range(8) if bounds[k] < bounds[k + 1]]
        arrays = self.collate(samples)
        if self.rp_on_the_fly == "cpu" and "rp" in self.views:
            arrays["rp"] = self.recurrence_plots(arrays["series"])
        elif self.rp_on_the_fly == "gpu" and "rp" in self.views:
            np.copyto(out["rp_series"], arrays["series"])
        for view in self.views:
            if view in arrays:  # else "rp", built on the device from rp_series
                aligned = groups if view in self.augment_views else plain
                self.finish(view, arrays[view], aligned, out[view])
        batch: dict[str, Any] = dict(out)
        if samples and "__meta__" in samples[0]:
            metas = [s["__meta__"] for s in samples]
            batch["meta"] = MetaList([s["__json__"] for s in samples])
            if "label" in metas[0]:
                labels = [m.get("label") for m in metas]
                batch["label"] = np.array([-1 if v is None else int(v) for v in labels], np.int64)
            if "labels" in metas[0]:
                batch["labels"] = np.array([m.get("labels") for m in metas], np.float32)
        return batch


def as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its numpy arrays as torch tensors (sharing their memory)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class MetaList:
    """The JSON metadata of a batch, one dict per sample, parsed on first use.

    Workers parse every sample's JSON to check it (a sample whose JSON does not parse is
    skipped) and to read its labels, then pass on the raw bytes: a list of dicts costs more
    to pickle through a DataLoader queue and unpickle (about 14 us per PIMC sample with 61
    dates) than parsing it again, and training never reads it. Not a Sequence subclass, so
    torch's collate and pin_memory leave it alone instead of walking every value.
    """

    def __init__(self, raw: list[bytes]):
        self._raw = raw
        self._items: list[dict[str, Any]] | None = None

    def _parsed(self) -> list[dict[str, Any]]:
        if self._items is None:
            self._items = [json.loads(r) for r in self._raw]
        return self._items

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int | slice) -> Any:
        return self._parsed()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._parsed())

    def __repr__(self) -> str:
        return f"MetaList({len(self._raw)} samples)"

    def __reduce__(self) -> tuple[Any, ...]:
        return MetaList, (self._raw,)

    def pin_memory(self, device: Any = None) -> MetaList:
        return self


def _fill(buf: np.ndarray, payloads: list[Any]) -> None:
    """Copy equal-sized byte payloads one after another into a contiguous array."""
    flat = memoryview(buf).cast("B")
    step = len(flat) // len(payloads)
    for i, payload in enumerate(payloads):
        flat[i * step : (i + 1) * step] = payload


# ---------------------------------------------------------------------------
# Batches through shared memory
# ---------------------------------------------------------------------------


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _carve(buffer: np.ndarray, layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict:
    """Arrays of `layout` laid one after another (64-byte aligned) in the uint8 `buffer`."""
    arrays, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        nbytes = _nbytes(shape, dtype)
        arrays[key] = buffer[offset : offset + nbytes].view(dtype).reshape(shape)
        offset += _aligned(nbytes)
    return arrays


def _layout_bytes(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """The bytes `_carve` lays `layout` out in."""
    return sum(_aligned(_nbytes(shape, dtype)) for shape, dtype in layout.values())


@dataclass(frozen=True)
class RingBatch:
    """What a worker sends for a batch built in its ring: where it is, and the small parts."""

    worker: int
    slot: int
    n: int
    extras: dict[str, Any]  # label/labels arrays, meta


def shared_memory_free(path: str = "/dev/shm") -> int:
    """Bytes free in the shared-memory file system (a large number where there is none)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 2**62
    return st.f_bavail * st.f_frsize


class BatchRing:
    """Batch buffers in shared memory, `slots` per DataLoader worker, reused batch after batch.

    A tensor that a worker hands to the trainer travels through shared memory, and fresh
    shared memory is slow to fault in (4 KiB pages, no huge pages for shmem): about 55 us
    per PIMC sample of float32 batch, as long as building the batch. So the trainer allocates
    this ring before its workers start; a worker builds its i-th ring batch in slot
    i % slots, sends only the slot number (RingBatch), and the trainer copies the batch into
    its own memory (pinned for CUDA: the copy that pin_memory would make anyway) and frees
    the slot (`take`). Batches of one worker arrive in the order it built them, so when the
    semaphore lets a worker take its i-th slot, batch i - slots has been copied out. With no
    free slot the worker builds the batch in new memory (never waits, never overwrites); a
    batch dropped unread (an iterator abandoned mid-epoch) only costs the ring that slot.
    """

    def __init__(self, nbytes: int, workers: int, slots: int):
        self.slots = slots
        self.buffers = [
            [torch.empty(nbytes, dtype=torch.uint8).share_memory_() for _ in range(slots)]
            for _ in range(workers)
        ]
        self.free = [mp.Semaphore(slots) for _ in range(workers)]
        self._taken = 0  # in a worker process: ring slots taken so far

    @property
    def workers(self) -> int:
        return len(self.free)

    def acquire(
        self, worker: int, layout: dict[str, tuple[tuple[int, ...], np.dtype]]
    ) -> int | None:
        """A worker's next slot for a batch of `layout`; None when it does not fit or all the
        worker's slots hold batches not copied out yet. A taken slot must be sent (or lost
        with an exception): freeing one unsent would break the order `take` relies on."""
        if _layout_bytes(layout) > self.buffers[worker][0].numel():
            return None
        if not self.free[worker].acquire(block=False):
            return None
        slot = self._taken % self.slots
        self._taken += 1
        return slot

    def arrays(
        self, worker: int, slot: int, layout: dict[str, tuple[tuple[int, ...], np.dtype]]
    ) -> dict[str, np.ndarray]:
        """The arrays of `layout` in a slot."""
        return _carve(self.buffers[worker][slot].numpy(), layout)

    def take(
        self, batch: RingBatch, layout: dict[str, tuple[tuple[int, ...], np.dtype]], pin: bool
    ) -> dict[str, Any]:
        """The trainer's copy of a ring batch, as tensors; frees the slot."""
        out: dict[str, Any] = {}
        for key, view in self.arrays(batch.worker, batch.slot, layout).items():
            # numpy's new arrays get huge pages where torch.empty's do not (10x faster here)
            out[key] = torch.from_numpy(view).pin_memory() if pin else torch.from_numpy(view.copy())
        self.free[batch.worker].release()
        out.update(as_tensors(batch.extras))
        return out


# ---------------------------------------------------------------------------
# The dataset and the loader
# ---------------------------------------------------------------------------


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
        normalize: bool = True,
        rp_on_the_fly: str = "off",
        rp_size: int = 0,
        seed: int = 0,
        epoch: SharedEpoch | None = None,
        stats: LoaderStats | None = None,
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
            normalize=normalize,
            augment_views=list(augment_views),
            rp_on_the_fly=rp_on_the_fly,
            rp_size=rp_size,
        )
        self.decoder = SampleDecoder(self.specs, meta="json" in manifest.members)
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
        warn = _SkipLog()
        rng = _rng(self.seed, epoch, self.rank, worker)
        aug_rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        suffixes = self.decoder.member_suffixes()
        if self.resampled:
            tasks = resampled_tasks(self.paths, self.counts, rng)
            max_empty = max(10, 2 * len(self.paths))
            raw = read_samples(
                tasks, suffixes=suffixes, stats=self.stats, warn=warn, max_empty=max_empty
            )
            samples = decode(
                shuffled(raw, self.shuffle_buffer, rng), self.decoder, stats=self.stats, warn=warn
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
        warn: _SkipLog,
    ) -> Iterator[dict[str, Any]]:
        order = list(range(len(self.counts)))
        if self.shuffle:
            _rng(self.seed, epoch).shuffle(order)  # the same order on every rank and worker
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
            raw = read_samples(reads, suffixes=suffixes, stats=self.stats, warn=warn)
            for sample in decode(
                shuffled(raw, self.shuffle_buffer, rng), self.decoder, stats=self.stats, warn=warn
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


def _close_at_exit(ref: weakref.ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class ShardLoader:
    """What the trainer holds: iterate it for batches (one epoch per `iter`, endless if resampled).

    `batches_per_epoch` is the batch count each rank yields per epoch (exact
    mode; in resampled mode the count that makes one nominal epoch).
    `set_epoch(e)` chooses the epoch of the next iteration (on resume); each
    iteration otherwise advances it by one. `to_device(batch, device)` moves a
    batch and builds recurrence plots there when `rp_on_the_fly == "gpu"`.
    """

    def __init__(
        self,
        stream: ShardStream,
        dataloader: DataLoader,
        *,
        rp_size: int,
        epoch: int,
        excluded: list[str] | None = None,
        pin: bool = False,
    ):
        self.stream = stream
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
        and the number of shards left out at start-up (`data/shards_excluded`)."""
        counts = {f"data/{k}": v for k, v in self.stats.as_dict().items()}
        counts["data/shards_excluded"] = len(self.excluded)
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
        samples = shard_format.iter_shard_samples(self.manifest.shard_paths()[0], limit=n)
        for i, sample in enumerate(samples):
            for view, spec in specs.items():
                data = sample.get(f"{view}.{spec.ext}")
                if data is None:
                    continue
                decode_one = shard_format.decode_npy if spec.ext == "npy" else shard_format.decode_png
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
        """Move tensors to `device`; with rp_on_the_fly == "gpu", turn `rp_series` into normalised `rp`."""
        out = {
            k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        series = out.pop("rp_series", None)
        if series is not None:
            if self._rp_torch is None:
                from pimc_dist.recurrence import recurrence_plot_torch

                self._rp_torch = recurrence_plot_torch
            plots = self._rp_torch(series, size=self.rp_size or None)
            norm = self.stream.builder.norm.get("rp")
            if norm is None:  # normalisation off: the uint8 plots, as the CPU path gives them
                out["rp"] = plots
            else:
                shape = (1, -1, 1, 1)
                mean = torch.as_tensor(norm[0], device=plots.device).view(shape)
                inv_std = torch.as_tensor(1.0 / norm[1], device=plots.device).view(shape)
                out["rp"] = (plots.float() - mean) * inv_std
        return out


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
    manifest, excluded = usable_manifest(
        Path(lc.shards), str(lc.verify), float(lc.max_excluded_fraction)
    )
    stream = ShardStream(
        manifest,
        views=list(lc.views),
        batch_size=int(cfg.train.batch_size),
        rank=rank,
        world_size=world_size,
        resampled=bool(lc.resampled) and train,
        shuffle=train,
        shuffle_buffer=int(lc.shuffle_buffer),
        drop_last=train,
        augment_views=list(lc.augment_views) if lc.augment and train else [],
        normalize=bool(lc.normalize),
        rp_on_the_fly=str(lc.rp_on_the_fly),
        rp_size=int(cfg.data.rp_size),
        seed=int(cfg.train.seed),
        epoch=SharedEpoch(epoch),
    )
    workers = int(lc.workers)
    pin = device is not None and torch.device(device).type == "cuda"
    if workers > 0:
        # One slot more than the batches a worker may have in flight (prefetch_factor).
        batch_bytes = _layout_bytes(stream.builder.layout(stream.batch_size))
        slots = int(lc.prefetch_factor) + 1
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
        prefetch_factor=int(lc.prefetch_factor) if workers > 0 else None,
        worker_init_fn=functools.partial(_worker_init, str(lc.rp_on_the_fly))
        if workers > 0
        else None,
    )
    return ShardLoader(
        stream,
        dataloader,
        rp_size=int(cfg.data.rp_size),
        epoch=epoch,
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
    manifest = shard_format.read_manifest(root)
    if verify == "none":
        return manifest, []
    for path in shard_format.unlisted_shards(manifest):
        log.warning("%s: shard file not listed in %s; not read", path, manifest.path.name)
    problems = shard_format.shard_problems(manifest, checksums=verify == "sha256")
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


__all__ = [
    "BatchBuilder",
    "BatchRing",
    "LoaderError",
    "LoaderStats",
    "MetaList",
    "ReadTask",
    "RingBatch",
    "SampleDecoder",
    "SharedEpoch",
    "as_tensors",
    "ShardLoader",
    "ShardStream",
    "batched",
    "build_loader",
    "decode",
    "dihedral",
    "exact_split",
    "random_transforms",
    "read_samples",
    "resampled_tasks",
    "shuffled",
    "usable_manifest",
]
