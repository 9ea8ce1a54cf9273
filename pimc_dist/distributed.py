"""Who am I in the job, process-group setup, and stop requests for requeue.

One process per GPU (or per CPU rank). Rank, local rank and world size come
from whichever launcher started the process:

- torchrun / DeepSpeed / a previous `init_distributed` (RANK, WORLD_SIZE, ...),
- a submitit job (SUBMITIT_EXECUTOR, read through `submitit.JobEnvironment`),
- a Slurm step started by `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS, ...),
- nothing: a single process, rank 0 of 1.

Stop requests: Slurm sends a signal some time before a job's time limit or a
preemption (`--signal=USR1@120`; submitit uses USR2). The handlers installed by
`install_stop_handlers` only set a flag; the training loop polls
`any_rank_stop_requested()` at every step boundary so that all ranks stop at
the same step, save a checkpoint and return `REQUEUE_EXIT_CODE`. Whoever
started the process then requeues the job (the sbatch scripts in slurm/, or
`pimc_dist.launch`, which hands over to submitit's own requeue handler).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import zlib
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Exit status of a process that stopped on request after saving a checkpoint and
# wants to be requeued. 144 is submitit's LocalExecutor requeue code too, so a
# local submitit controller restarts such a process as Slurm would.
REQUEUE_EXIT_CODE = 144

# Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the
# well-known and registered services people usually run, below the Linux ephemeral range.
PORT_BASE = 20000
PORT_SPAN = 12000


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # which launcher's variables were read: torchrun | submitit | slurm | single

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


# ---------------------------------------------------------------------------
# Slurm string formats


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: 'n[1-2],gpu[001-002,010]' -> ['n1', 'n2', 'gpu001', ...].

    Zero padding is kept ('gpu[001-002]' -> 'gpu001', 'gpu002'); several bracket
    groups in one name expand as a product ('r[1-2]-n[1-2]' -> 'r1-n1', 'r1-n2', ...).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts += _expand_host(item, nodelist)
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_host(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"unbalanced brackets in Slurm node list {whole!r}")
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    out = []
    for piece in match.group(1).split(","):
        bounds = piece.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            lo, hi = int(bounds[0]), int(bounds[1])
            if hi < lo:
                raise ValueError(f"descending range '{piece}' in Slurm node list {whole!r}")
            width = len(bounds[0])
            values = [str(v).zfill(width) for v in range(lo, hi + 1)]
        else:
            raise ValueError(f"bad range '{piece}' in Slurm node list {whole!r}")
        for value in values:
            out += _expand_host(prefix + value + suffix, whole)
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"bad Slurm tasks-per-node value {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def port_from_job_id(job_id: str | int) -> int:
    """A rendezvous port every task of a job derives alike, different for neighbouring jobs."""
    text = str(job_id)
    number = int(text) if text.isdigit() else zlib.crc32(text.encode())
    return PORT_BASE + number % PORT_SPAN


# ---------------------------------------------------------------------------
# Environment detection


def _int_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _from_torchrun() -> DistEnv:
    world = _int_env("WORLD_SIZE")
    local_world = _int_env("LOCAL_WORLD_SIZE", world)
    rank = _int_env("RANK")
    return DistEnv(
        rank=rank,
        local_rank=_int_env("LOCAL_RANK", rank % local_world),
        world_size=world,
        local_world_size=local_world,
        node_rank=_int_env("GROUP_RANK", _int_env("NODE_RANK", rank // local_world)),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env("MASTER_PORT", 29500),
        source="torchrun",
    )


def _from_submitit() -> DistEnv:
    import submitit

    job = submitit.JobEnvironment()
    world = job.num_tasks
    local_world = max(1, world // max(1, job.num_nodes))
    # A local submitit job runs all tasks on this host; Slurm ones list their hosts.
    master = "127.0.0.1" if job.cluster == "local" else job.hostnames[0]
    return DistEnv(
        rank=job.global_rank,
        local_rank=job.local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=job.node,
        master_addr=os.environ.get("MASTER_ADDR", master),
        master_port=_int_env("MASTER_PORT", port_from_job_id(job.job_id)),
        source=f"submitit-{job.cluster}",
    )


def _from_slurm() -> DistEnv:
    # Step variables describe the srun step this process belongs to; the job-wide
    # ones (SLURM_NTASKS, SLURM_JOB_NODELIST) may describe a larger allocation.
    world = _int_env("SLURM_STEP_NUM_TASKS", _int_env("SLURM_NTASKS", 1))
    node_rank = _int_env("SLURM_NODEID", 0)
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(per_node) if per_node else [world]
    local_world = counts[node_rank] if node_rank < len(counts) else counts[-1]
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    master = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    job_id = os.environ.get("SLURM_JOB_ID", "0")
    return DistEnv(
        rank=_int_env("SLURM_PROCID"),
        local_rank=_int_env("SLURM_LOCALID", 0),
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=os.environ.get("MASTER_ADDR", master),
        master_port=_int_env("MASTER_PORT", port_from_job_id(job_id)),
        source="slurm",
    )


# What torchrun (and export_env) set to place one process; a job's own launcher replaces them.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")


def forget_inherited_ranks() -> list[str]:
    """Drop torchrun rank variables a submitit task inherited from the shell that submitted it.

    Slurm and submitit's local executor pass the submitter's environment on; a launcher run
    from inside another job (or a test that joined a group) would otherwise make every task
    believe it is that job's rank. Returns the names dropped.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return []
    dropped = [name for name in RANK_VARIABLES if name in os.environ]
    for name in dropped:
        del os.environ[name]
    return dropped


def detect_env() -> DistEnv:
    """Rank, world size and rendezvous address of this process, from whichever launcher set them.

    Order: torchrun-style variables (RANK and WORLD_SIZE) win, then a submitit job,
    then a Slurm step started by srun, else a single process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _from_torchrun()
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return _from_submitit()
    # SLURM_STEP_ID tells an srun task from the batch script itself, whose SLURM_NTASKS
    # counts the whole allocation although it is one process.
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return _from_slurm()
    return DistEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        node_rank=0,
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        # A lone process needs a port only for its own store: take a free one, so two
        # single-process runs on one machine never collide on a fixed default.
        master_port=_int_env("MASTER_PORT", 0) or free_port(),
        source="single",
    )


# ---------------------------------------------------------------------------
# Process group


def default_backend() -> str:
    """nccl where CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def export_env(env: DistEnv) -> None:
    """Write the torchrun-style variables that DeepSpeed and torch read."""
    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        GROUP_RANK=str(env.node_rank),
    )


def init_distributed(timeout_s: int = 600, backend: str | None = None) -> DistEnv:
    """Join the job's process group (no-op if already joined) and return this process's place.

    `timeout_s` bounds every collective: a rank that died or never joined makes the
    others fail with an error after that long instead of hanging until the time limit.
    """
    env = detect_env()
    export_env(env)
    if dist.is_available() and dist.is_initialized():
        return env
    backend = backend or default_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    log.info(
        "init_distributed: rank %d/%d (local %d, node %d) backend=%s master=%s:%d from %s",
        env.rank,
        env.world_size,
        env.local_rank,
        env.node_rank,
        backend,
        env.master_addr,
        env.master_port,
        env.source,
    )
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    _bound_later_groups(timedelta(seconds=timeout_s))
    return env


def _bound_later_groups(timeout: timedelta) -> None:
    """Give groups created after init (DeepSpeed's clone of the world group) the same timeout.

    `dist.new_group()` without a timeout takes torch's 30-minute default, not the one the
    world group was given, and DeepSpeed reduces gradients on such a clone: a dead rank
    would otherwise hang its peers in backward for half an hour. torch has no public
    setting for that default, so the module value it reads is replaced here.
    """
    from torch.distributed import distributed_c10d

    if not isinstance(getattr(distributed_c10d, "default_pg_timeout", None), timedelta):
        log.warning("torch.distributed has no default_pg_timeout: later groups keep their default")
        return
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (from the process group, or the environment before init)."""
    return dist.get_rank() if is_initialized() else detect_env().rank


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else detect_env().world_size


def is_main() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU with nccl, else CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op if not joined), so this process may join another."""
    if is_initialized():
        dist.destroy_process_group()
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """Drop the groups DeepSpeed cached on the group just destroyed.

    DeepSpeed keeps module-level clones of the world group (and expert, model and data
    parallel groups) for the life of the process; after a new `init_process_group` they
    would name a destroyed group ("Group ... is not registered"). Running two jobs in one
    process (a notebook, a benchmark, tests) needs them gone.
    """
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, empty in (
        ("_WORLD_GROUP", None),
        ("_ZERO_PARAM_INTRA_PARALLEL_GROUP", None),
        ("_TENSOR_MODEL_PARALLEL_GROUP", None),
        ("_MODEL_PARALLEL_GROUP", None),
        ("_DATA_PARALLEL_GROUP", None),
        ("_EXPERT_PARALLEL_GROUP", {}),
        ("_EXPERT_PARALLEL_GROUP_RANKS", {}),
        ("_EXPERT_DATA_PARALLEL_GROUP", {}),
        ("_EXPERT_DATA_PARALLEL_GROUP_RANKS", {}),
        ("_ALL_TO_ALL_GROUP", {}),
    ):
        if hasattr(groups, name):
            setattr(groups, name, empty)


# ---------------------------------------------------------------------------
# Stop requests

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# The stop signals that ask for a requeue (Slurm's and submitit's warning before the time
# limit or a preemption); SIGTERM and SIGINT (Ctrl-C) only stop: nothing requeues the job.
REQUEUE_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2)
# Every signal a job may handle as a stop request, in the order of the agreement vector.
_AGREED_ORDER: tuple[signal.Signals, ...] = (*STOP_SIGNALS, signal.SIGINT)

_received: list[int] = []  # signal numbers received, in order
_agreed: list[int] = []  # the union over ranks of _received, at the last collective poll
_stop_step: list[int] = []  # the step a stopped run saved its checkpoint at (record_stop)
_previous: dict[int, Any] = {}  # handler that was installed before ours, per signal


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # Only record: the training loop saves a checkpoint at its next step boundary.
    # Calling submitit's handler here would requeue and exit in the middle of a step.
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    _received.append(signum)


def install_stop_handlers(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> bool:
    """Make the given signals request a stop instead of killing or requeuing at once.

    Idempotent. The handlers that were there before (submitit's requeue handler, for
    instance) are kept and can be run later with `run_previous_handler`. Returns False
    (and installs nothing) outside the main thread, where Python cannot set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("install_stop_handlers: not the main thread, stop signals not handled")
        return False
    for sig in signals:
        current = signal.getsignal(sig)
        if current is _on_stop_signal:
            continue
        _previous[int(sig)] = current
        signal.signal(sig, _on_stop_signal)
    return True


def stop_requested() -> bool:
    """True once this process received a stop signal."""
    return bool(_received)


def stop_signals() -> list[int]:
    """The stop signals this process received, in order."""
    return list(_received)


def request_stop(signum: int = signal.SIGUSR1) -> None:
    """Record a stop request as if `signum` had arrived (for tests and for code that decides to stop)."""
    _received.append(int(signum))


def clear_stop_request() -> None:
    """Forget received stop signals (after they were acted on)."""
    _received.clear()
    _agreed.clear()
    _stop_step.clear()


def any_rank_stop_requested() -> bool:
    """True on every rank when any rank received a stop signal (a collective: call on all ranks).

    Also agrees on which signals arrived, on any rank (`job_stop_signals`), so that every rank
    takes the same decision (requeue or not) after one rank alone was signalled."""
    if not is_initialized():
        _agreed[:] = sorted(set(_received))
        return stop_requested()
    flags = [1 if _received else 0] + [1 if s in _received else 0 for s in _AGREED_ORDER]
    flag = torch.tensor(flags, dtype=torch.int32, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    values = flag.tolist()
    _agreed[:] = [int(s) for s, on in zip(_AGREED_ORDER, values[1:], strict=True) if on]
    return bool(values[0])


def job_stop_signals() -> list[int]:
    """The stop signals any rank received, as agreed at the last `any_rank_stop_requested`
    (this process's own before any such poll)."""
    return list(_agreed) if _agreed else sorted(set(_received))


def requeue_requested() -> bool:
    """Whether the job's stop asks for a requeue (a requeue signal reached some rank)."""
    return any(s in REQUEUE_SIGNALS for s in job_stop_signals())


def record_stop(step: int) -> None:
    """Note the step at which a stopped run saved its checkpoint (the launcher reports it)."""
    _stop_step[:] = [int(step)]


def stopped_at_step() -> int | None:
    """The step `record_stop` noted, or None."""
    return _stop_step[0] if _stop_step else None


def previous_handler(sig: int) -> Any:
    """The handler that `install_stop_handlers` replaced for `sig` (None if it replaced none)."""
    return _previous.get(int(sig))


def run_previous_handler(sig: int) -> bool:
    """Call the handler that was installed for `sig` before ours; False if it is not callable."""
    handler = previous_handler(sig)
    if not callable(handler):
        return False
    handler(int(sig), None)
    return True


def free_port() -> int:
    """A TCP port that is free on this host right now (single-host jobs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = [
    "REQUEUE_EXIT_CODE",
    "REQUEUE_SIGNALS",
    "STOP_SIGNALS",
    "DistEnv",
    "any_rank_stop_requested",
    "barrier",
    "cleanup",
    "clear_stop_request",
    "collective_device",
    "default_backend",
    "detect_env",
    "expand_nodelist",
    "expand_tasks_per_node",
    "export_env",
    "forget_inherited_ranks",
    "free_port",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "install_stop_handlers",
    "is_initialized",
    "is_main",
    "job_stop_signals",
    "record_stop",
    "requeue_requested",
    "stopped_at_step",
    "port_from_job_id",
    "previous_handler",
    "request_stop",
    "run_previous_handler",
    "stop_requested",
    "stop_signals",
]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one outside a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
