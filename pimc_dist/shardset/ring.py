"""Batches through shared memory: a ring of reused buffers between DataLoader workers
and the trainer (see BatchRing)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pimc_dist.shardset.batch import as_tensors


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


def layout_bytes(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
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
        if layout_bytes(layout) > self.buffers[worker][0].numel():
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
