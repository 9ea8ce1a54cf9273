"""One job per run folder (pimc_dist/run_lock.py): the lock alone, then real pretrainings.

The lock: a second job into a live folder is refused naming the holder; a holder that
ends (released, crashed, SIGKILLed) frees it; a lock file left by a dead process (a
requeued job's previous run) is taken over. A folder whose metrics have no checkpoint
is refused unless train.restart=true, which moves the old metrics aside.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import build_tiny_shards
from test_pretrain import output, run_ranks, start_ranks, wait_ranks

from pimc_dist import run_lock
from pimc_dist.run_lock import Holder, RunFolderError, RunFolderLocked
from pimc_dist.tracking import read_metrics

# A holder in another process that imports only the lock module (no torch: starts fast).
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", {str(Path(run_lock.__file__))!r})
run_lock = importlib.util.module_from_spec(spec)
sys.modules["run_lock"] = run_lock
spec.loader.exec_module(run_lock)
lock = run_lock.acquire(sys.argv[1], "pretraining")
print("held", flush=True)
time.sleep(600)
"""


def dead_pid() -> int:
    """The pid of a process that has ended (reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def write_lock_file(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "since": time.time() - 3600, "what": "pretraining"}
    (run_dir / run_lock.LOCK_FILE).write_text(json.dumps({**holder, **fields}) + "\n")


# ---------------------------------------------------------------------------
# The lock alone


def test_acquire_writes_the_holder_and_a_second_acquire_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    lock = run_lock.acquire(run, "pretraining")
    holder = run_lock.read_holder(run)
    assert (holder.pid, holder.host, holder.what) == (
        os.getpid(),
        socket.gethostname(),
        "pretraining",
    )
    assert abs(holder.since - time.time()) < 60
    since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(holder.since))
    # A second acquire, even from this process, is refused: flock locks per open file.
    with pytest.raises(RunFolderLocked) as refused:
        run_lock.acquire(run, "pretraining")
    message = str(refused.value)
    for part in (str(run), f"pid {os.getpid()}", f"host {socket.gethostname()}", since, "run_dir"):
        assert part in message
    lock.release()
    assert run_lock.read_holder(run) is None  # released: the file names nobody
    run_lock.acquire(run).release()


def test_the_lock_is_released_on_leaving_a_with_block_by_an_exception(tmp_path):
    with pytest.raises(ZeroDivisionError), run_lock.acquire(tmp_path, "fine-tuning"):
        1 / 0  # noqa: B018
    with run_lock.acquire(tmp_path) as lock:
        assert lock.held and lock.took_over is None


def test_check_free_refuses_a_held_folder_and_passes_a_free_or_released_one(tmp_path):
    run_lock.check_free(tmp_path / "never_used")  # no lock file
    lock = run_lock.acquire(tmp_path, "pretraining")
    with pytest.raises(run_lock.RunFolderLocked, match=f"is in use by .*pid {os.getpid()}"):
        run_lock.check_free(tmp_path)
    lock.release()
    run_lock.check_free(tmp_path)
    run_lock.acquire(tmp_path, "pretraining").release()  # the check took nothing


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    """What a requeued job finds when its previous run was killed without releasing."""
    gone = dead_pid()
    write_lock_file(tmp_path, pid=gone, job="1234")
    with run_lock.acquire(tmp_path, "pretraining") as lock:
        assert lock.took_over.pid == gone and lock.took_over.job == "1234"
        assert run_lock.read_holder(tmp_path).pid == os.getpid()


def test_another_process_holds_the_lock_until_it_is_killed(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunFolderLocked, match=f"pretraining pid {holder.pid} on host"):
            run_lock.acquire(tmp_path)
        holder.send_signal(signal.SIGKILL)  # a crash: no release, the file still names it
        holder.wait()
        assert run_lock.read_holder(tmp_path).pid == holder.pid
        with run_lock.acquire(tmp_path) as lock:  # the kernel dropped the dead one's lock
            assert lock.took_over.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_other_ranks_raise_rank_0s_refusal(tmp_path):
    held = run_lock.acquire(tmp_path, "pretraining")
    try:
        with pytest.raises(RunFolderLocked, match=f"pid {os.getpid()}"):
            run_lock.acquire_on_rank0(tmp_path, 0, lambda x: [x, None], "pretraining")
        # Rank 1 takes no lock and learns rank 0's refusal from the gather.
        refusal = "run folder x is in use: pretraining pid 1 on host h"
        with pytest.raises(RunFolderLocked, match="pid 1 on host h"):
            run_lock.acquire_on_rank0(tmp_path / "other", 1, lambda x: [refusal, x])
        assert not run_lock.acquire_on_rank0(tmp_path / "other", 1, lambda x: [None, x]).held
    finally:
        held.release()
    assert run_lock.acquire_on_rank0(tmp_path, 0, lambda x: [x], "pretraining").held


@pytest.fixture
def no_flock(monkeypatch):
    """A file system whose flock fails (some NFS / Lustre mounts)."""

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)


def test_without_flock_the_file_decides_a_dead_pid_is_stale_a_live_one_is_not(tmp_path, no_flock):
    write_lock_file(tmp_path, pid=dead_pid())
    run_lock.acquire(tmp_path).release()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock_file(tmp_path, pid=live.pid, start_ticks=run_lock.process_start_ticks(live.pid))
        with pytest.raises(RunFolderLocked, match=f"pid {live.pid}.*no flock"):
            run_lock.acquire(tmp_path)
        # The same pid started at another time is another process: the holder is gone.
        write_lock_file(tmp_path, pid=live.pid, start_ticks=1)
        run_lock.acquire(tmp_path).release()
    finally:
        live.kill()
        live.wait()
    # Another host's holder cannot be checked: it is taken as alive.
    write_lock_file(tmp_path, pid=os.getpid(), host="elsewhere")
    with pytest.raises(RunFolderLocked, match="host elsewhere"):
        run_lock.acquire(tmp_path)


def test_holder_parse_ignores_a_released_or_torn_file():
    assert Holder.parse("") is None and Holder.parse('{"host": "a", "pi') is None
    assert Holder.parse('{"host": "a", "pid": 3, "since": 0, "extra": 1}').pid == 3


# ---------------------------------------------------------------------------
# Metrics without a checkpoint


def test_metrics_without_checkpoint_are_refused_or_moved_aside_with_restart(tmp_path):
    check = run_lock.check_metrics_resume
    assert check(tmp_path, has_checkpoint=False, restart=False) is None  # a new run
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (4, 8, 12))
    (tmp_path / "metrics.jsonl").write_text(rows)
    assert check(tmp_path, has_checkpoint=True, restart=False) is None  # a resume
    assert check(tmp_path, has_checkpoint=True, restart=True) is None  # a requeued restart
    with pytest.raises(RunFolderError) as refused:
        check(tmp_path, has_checkpoint=False, restart=False)
    for part in ("3 rows, steps 4 to 12", "no checkpoint", "train.restart=true", "train.run_dir="):
        assert part in str(refused.value)
    assert check(tmp_path, has_checkpoint=False, restart=True, move=False) is None  # rank > 0
    aside = check(tmp_path, has_checkpoint=False, restart=True)
    assert aside.name.startswith("metrics.jsonl.") and aside.read_text() == rows
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------
# Real pretrainings (python -m pimc_dist.pretrain on tiny shards)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small PASTIS-layout shard set (6 patches of 32 px, 64 pixels each)."""
    return build_tiny_shards(tmp_path_factory.mktemp("run_lock_data"))


def test_two_pretrainings_into_one_folder_one_is_refused_naming_the_holder(tmp_path, shards):
    run = tmp_path / "run"
    common = ["train.total_samples=128", "train.log_every_steps=1"]  # 4 steps of 32
    a = start_ranks(run, shards, 1, common)[0]
    b = start_ranks(run, shards, 1, common)[0]
    try:
        deadline = time.time() + 300
        while (holder := run_lock.read_holder(run)) is None or holder.pid not in (a.pid, b.pid):
            assert time.time() < deadline and a.poll() is None and b.poll() is None, output(a)
            time.sleep(0.05)
        winner, loser = (a, b) if holder.pid == a.pid else (b, a)
        # Keep the winner inside its run while the other reaches the lock, on any machine load.
        winner.send_signal(signal.SIGSTOP)
        code, out = wait_ranks([loser], limit_s=300)[0]
        assert code == 2, out[-3000:]
        assert f"run folder {run} is in use by pretraining pid {winner.pid} on host" in out
        winner.send_signal(signal.SIGCONT)
        code, out = wait_ranks([winner], limit_s=300)[0]
        assert code == 0, out[-3000:]
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert run_lock.read_holder(run) is None  # released at the end


def test_a_refused_two_rank_job_stops_on_every_rank_without_waiting(tmp_path, shards):
    run = tmp_path / "run"
    with run_lock.acquire(run, "pretraining"):
        # A rank left waiting for rank 0 would hang until the 600 s collective timeout.
        results = run_ranks(run, shards, 2, ["train.total_samples=64"], limit_s=240)
    for code, out in results:
        assert code == 2 and f"pretraining pid {os.getpid()} on host" in out, out[-3000:]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_metrics_without_checkpoints_refuse_a_restart_unless_asked(tmp_path, shards):
    run = tmp_path / "run"
    common = ["train.total_samples=64", "train.log_every_steps=1"]  # 2 steps
    code, out = run_ranks(run, shards, 1, common)[0]
    assert code == 0, out[-3000:]
    shutil.rmtree(run / "checkpoints")
    old = (run / "metrics.jsonl").read_text()

    code, out = run_ranks(run, shards, 1, common)[0]
    assert code == 2, out[-3000:]
    assert "holds metrics.jsonl (2 rows, steps 1 to 2)" in out and "train.restart=true" in out
    assert (run / "metrics.jsonl").read_text() == old and not (run / "checkpoints").exists()

    # The refused job released the lock; a lock file of a dead process (a requeued job's
    # killed run) is taken over with a note.
    write_lock_file(run, pid=dead_pid(), job="77")
    code, out = run_ranks(run, shards, 1, [*common, "train.restart=true"])[0]
    assert code == 0, out[-3000:]
    assert "taking over the lock of pretraining pid" in out and "Slurm job 77" in out
    (aside,) = run.glob("metrics.jsonl.*")
    assert aside.read_text() == old
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [1, 2]
