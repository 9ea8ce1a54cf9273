"""One job per run folder: a lock file held by rank 0 for the job's life, and the check that
a folder with metrics but no checkpoint is not silently restarted.

The lock is `fcntl.flock` on `<run_dir>/run.lock`, taken without waiting. The kernel drops
it when the holding process ends however it ends (exit, exception, SIGTERM, SIGKILL, a
crashed node's NFS/Lustre client lease expiring), so a lock left by a dead job is never in
the way: a requeued job (Slurm requeue, the same job's next run) takes it again. The
holder writes who it is into the file (host, pid, process start time, boot id, Slurm job,
since when) for the refusal message, and empties it on release; a file that still names a
holder but whose lock is free was left by a process that has ended, and is taken over
with a note.

On a file system without flock (the call fails with ENOLCK, EOPNOTSUPP, ...) the file's
contents decide, best effort: a holder on this host is alive if its pid runs with the
same start time since the same boot; a holder on another host cannot be checked and is
taken as alive (delete the lock file if that job is gone).

Standard library only (bottom layer).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"

# flock errors that mean "this file system cannot flock", not "someone holds it".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunFolderError(RuntimeError):
    """A run folder this job must not write into as asked (the CLIs exit with status 2)."""


class RunFolderLocked(RunFolderError):
    """The run folder's lock is held by another live process."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclass
class Holder:
    """Who holds (or last held without releasing) a run folder's lock."""

    host: str
    pid: int
    since: float  # time.time() when it took the lock
    what: str = "job"  # pretraining, fine-tuning
    job: str | None = None  # Slurm job id (with the restart count), if any
    start_ticks: int | None = None  # the process's start time, against pid reuse
    boot_id: str | None = None

    @classmethod
    def me(cls, what: str) -> Holder:
        job = os.environ.get("SLURM_JOB_ID")
        if job and os.environ.get("SLURM_RESTART_COUNT"):
            job += f" (restart {os.environ['SLURM_RESTART_COUNT']})"
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=time.time(),
            what=what,
            job=job,
            start_ticks=process_start_ticks(os.getpid()),
            boot_id=_boot_id(),
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder written in a lock file, None for an empty (released) or unreadable one."""
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        job = f" (Slurm job {self.job})" if self.job else ""
        return f"{self.what} pid {self.pid} on host {self.host}{job} since {since}"

    def alive(self) -> bool | None:
        """Whether the process still runs: True/False on this host, None (unknown) elsewhere."""
        if self.host != socket.gethostname():
            return None
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        ticks = process_start_ticks(self.pid)
        if self.start_ticks is not None and ticks is not None and ticks != self.start_ticks:
            return False  # the pid was reused by another process
        return True


class RunLock:
    """A held run-folder lock (or, with `fd` None, the no-op lock of ranks other than 0).

    Released by `release()`, by leaving a `with` block, when garbage collected, and in
    any case by the kernel when the process ends.
    """

    def __init__(
        self,
        path: Path | None,
        fd: int | None,
        holder: Holder | None,
        took_over: Holder | None = None,
    ):
        self.path, self.fd, self.holder, self.took_over = path, fd, holder, took_over

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # nobody reads our name once we let go
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def read_holder(run_dir: str | os.PathLike) -> Holder | None:
    """The holder named in `run_dir`'s lock file (None: no file, or released)."""
    try:
        return Holder.parse((Path(run_dir) / LOCK_FILE).read_text())
    except OSError:
        return None


def _refusal(run_dir: Path, holder: Holder | None, note: str = "") -> RunFolderLocked:
    who = holder.describe() if holder else "another process (its name not written yet)"
    return RunFolderLocked(
        f"run folder {run_dir} is in use by {who}, which holds its lock file "
        f"{run_dir / LOCK_FILE}{note}. "
        "Two jobs writing one folder would mix their metrics and checkpoints: wait for that "
        "job to end (or stop it), or give this one its own folder with train.run_dir=... or name=..."
    )


def acquire(run_dir: str | os.PathLike, what: str = "job") -> RunLock:
    """Take `run_dir`'s lock (creating the folder) without waiting; RunFolderLocked names the
    holder when a live process has it. A lock left by a process that has ended is taken
    over (`RunLock.took_over` names it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            raise _held_by_other(run_dir, path) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            flock = False
        previous = Holder.parse(os.pread(fd, 65536, 0).decode(errors="replace"))
        if not flock and previous is not None and previous.alive() is not False:
            raise _refusal(
                run_dir,
                previous,
                " (this file system has no flock: if that job is gone, delete the lock file)",
            )
        me = Holder.me(what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd, me, took_over=previous)


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise RunFolderLocked when a live process holds `run_dir`'s lock: the launcher's check
    before it submits a job or writes into the folder (the job still takes the lock itself).
    Silent where the file system has no flock: the job's own `acquire` decides then."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no job has used the folder
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when fd closes
    except BlockingIOError:
        raise _held_by_other(run_dir, path) from None
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
    finally:
        os.close(fd)


def _held_by_other(run_dir: Path, path: Path) -> RunFolderLocked:
    """The refusal for a lock held by a live process; waits a moment for its name."""
    holder = None
    for _ in range(10):  # the holder writes its name right after taking the lock
        holder = read_holder(run_dir)
        if holder is not None:
            break
        time.sleep(0.1)
    note = ""
    if holder is not None and holder.alive() is False:
        note = (
            f"; pid {holder.pid} has ended, but a process it started still has the lock file "
            f"open (`fuser -v {path}` names it)"
        )
    return _refusal(run_dir, holder, note)


def acquire_on_rank0(
    run_dir: str | os.PathLike,
    rank: int,
    gather: Callable[[Any], list[Any]],
    what: str = "job",
) -> RunLock:
    """Rank 0 takes the lock; every rank raises RunFolderLocked when it could not.

    `gather(obj)` returns every rank's `obj` in rank order (a collective all ranks call,
    e.g. `pimc_dist.distributed.gather_objects`), so that the other ranks stop with rank
    0's message instead of waiting for it in the next collective.
    """
    lock, problem = RunLock(None, None, None), None
    if rank == 0:
        try:
            lock = acquire(run_dir, what)
        except RunFolderLocked as exc:
            problem = str(exc)
        if lock.took_over is not None:
            print(
                f"note: run folder {run_dir}: taking over the lock of {lock.took_over.describe()}, "
                "a process that has ended",
                flush=True,
            )
    problem = gather(problem)[0]
    if problem is not None:
        lock.release()
        raise RunFolderLocked(problem)
    return lock


def _metrics_summary(path: Path) -> str:
    steps = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            steps.append(int(json.loads(line)["step"]))
    if not steps:
        return f"{METRICS_FILE} ({path.stat().st_size} bytes)"
    return f"{METRICS_FILE} ({len(steps)} rows, steps {min(steps)} to {max(steps)})"


def check_metrics_resume(
    run_dir: str | os.PathLike, *, has_checkpoint: bool, restart: bool, move: bool = True
) -> Path | None:
    """A folder whose metrics have no checkpoint to resume from is not started again silently.

    With a checkpoint (a resume) or no metrics (a new run) there is nothing to do. Otherwise
    RunFolderError, unless `restart` (`train.restart=true`): then the old metrics file is
    moved aside to `metrics.jsonl.<UTC time>` (when `move`: rank 0) and its new path
    returned; it is never deleted.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if has_checkpoint or not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    if not restart:
        raise RunFolderError(
            f"run folder {run_dir} holds {_metrics_summary(metrics)} of an earlier run but no "
            f"checkpoint to resume from ({run_dir / 'checkpoints'} is missing or empty); "
            "starting again would begin at step 0 and append to those metrics. Either start "
            f"over in this folder with train.restart=true (the old {METRICS_FILE} is kept as "
            f"{METRICS_FILE}.<time>), or give this run its own folder with train.run_dir=... "
            "or name=..."
        )
    if not move:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = metrics.with_name(f"{METRICS_FILE}.{stamp}")
    n = 1
    while aside.exists():
        aside = metrics.with_name(f"{METRICS_FILE}.{stamp}.{n}")
        n += 1
    metrics.rename(aside)
    print(f"train.restart: starting over at step 0; the old metrics are in {aside}", flush=True)
    return aside
