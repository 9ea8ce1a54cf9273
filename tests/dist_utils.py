"""Run a function on W local ranks joined in a process group (gloo), for tests and benchmarks.

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` fresh processes, each calling
``fn(rank, world_size, *args)`` after joining a gloo group on a free localhost port, and returns
the per-rank return values in rank order. ``fn`` must be importable by the children (a
module-level function) and its return value saveable with ``torch.save``. A rank that raises
fails the call with its traceback; a rank stuck past ``timeout_s`` is killed.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A localhost TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    result_dir: str,
    args: tuple,
    init_group: bool,
    backend: str,
    threads: int,
    timeout_s: float,
) -> None:
    # The variables torchrun sets, so that fn may also call deepspeed.init_distributed() itself.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    if init_group:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    except BaseException:
        # Recorded with the time so the parent can name the rank that failed first: the other
        # ranks then fail too, with connection errors that hide the cause.
        error = f"{time.time():.6f}\n{traceback.format_exc()}"
        (Path(result_dir) / f"rank{rank}.error").write_text(error)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure_report(name: str, result_dir: Path, error: Exception) -> str:
    """The traceback of the rank that failed first, and the last line of the others'."""
    failures = []
    for path in result_dir.glob("rank*.error"):
        stamp, _, trace = path.read_text().partition("\n")
        failures.append((float(stamp), int(path.stem.removeprefix("rank")), trace))
    if not failures:  # killed without a Python traceback (signal, os._exit)
        return f"{name} failed on rank {error.error_index}: {error}"
    failures.sort()
    _, first_rank, first_trace = failures[0]
    report = f"{name} failed on rank {first_rank}:\n{first_trace}"
    for _, rank, trace in failures[1:]:
        report += f"\n(then rank {rank} failed: {trace.strip().splitlines()[-1]})"
    return report


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_group: bool = True,
    backend: str = "gloo",
    threads: int = 1,
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; per-rank results.

    ``init_group=False`` only sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK and leaves
    initialisation to ``fn``. ``backend="nccl"`` suits one GPU per rank (``fn`` picks its
    device). ``threads`` is torch's intra-op thread count per rank.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    with tempfile.TemporaryDirectory(prefix="dist_utils-") as result_dir:
        context = mp.start_processes(
            _rank_main,
            args=(
                fn,
                world_size,
                free_port(),
                result_dir,
                args,
                init_group,
                backend,
                threads,
                timeout_s,
            ),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s + 60.0  # spawning and imports take a while
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} on {world_size} ranks ran past {timeout_s:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            raise RuntimeError(_failure_report(name, Path(result_dir), error)) from error
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)
        results = []
        for rank in range(world_size):
            path = Path(result_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"{name}: rank {rank} exited without a result ({path.name})")
            results.append(torch.load(path, weights_only=False))
        return results
