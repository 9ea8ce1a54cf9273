"""Tests for the gloo rank runner in tests/dist_utils.py."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from dist_utils import run_on_ranks


def _rank_one_raises_while_rank_zero_waits(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # never completes: the runner must stop this rank, not hang
    return rank


def test_a_failing_rank_fails_the_call_naming_the_rank_and_error():
    with pytest.raises(
        RuntimeError, match=r"failed on rank 1(.|\n)*ValueError: rank one is broken"
    ):
        run_on_ranks(_rank_one_raises_while_rank_zero_waits, 2, timeout_s=60)
