"""Stops of local jobs are reported as they are: a rank stopped by SIGTERM, or Ctrl-C on
`launch --wait`, saves a checkpoint, nothing requeues, and the launcher says "stopped at step
N, checkpoint saved; rerun the same command to resume" with a non-zero exit status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import loop_entry
import pytest
from conftest import REPO
from launch_helpers import TINY, build_tiny_shards, metrics_steps

from pimc_dist import config, jobs
from pimc_dist.engine import CheckpointError, latest_tag, read_client_state
from pimc_dist.jobs import EntryJob

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def loop_entry_importable(monkeypatch):
    # The job's tasks (child processes) import tests/loop_entry.py.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), path) if p))


def _wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _submit_local_loop(run_dir: Path, total_samples: int, max_requeues: int):
    """tests/loop_entry.py as a 2-rank local job into `run_dir`; the submitit job."""
    cfg = jobs.load_job_config(
        None,
        [f"train.run_dir={run_dir}", f"train.total_samples={total_samples}",
         "launch.tasks_per_node=2", "launch.time=00:10:00", "launch.signal_delay_s=60",
         f"launch.max_requeues={max_requeues}"],
    )  # fmt: skip
    return jobs.submit(cfg, EntryJob("loop", config.to_yaml(cfg), loop_entry.main), "local")


def test_sigterm_to_one_local_rank_stops_the_job_and_says_how_to_resume(
    tmp_path, capfd, loop_entry_importable
):
    run_dir = tmp_path / "run"
    sub = _submit_local_loop(run_dir, total_samples=200, max_requeues=3)
    _wait_until(lambda: len(metrics_steps(run_dir)) >= 3, 120, "3 steps")
    os.kill(int((run_dir / "pids" / "1").read_text()), signal.SIGTERM)  # rank 1 only
    status = jobs.wait_for(sub, poll_s=0.2)
    out = capfd.readouterr().out
    saved = json.loads((run_dir / "loop_ckpt.json").read_text())["step"]
    assert saved < 200
    assert status == 128 + signal.SIGTERM, out
    assert f"stopped at step {saved} on SIGTERM, checkpoint saved; rerun the same command" in out
    assert "FINISHED" not in out and "requeueing" not in out
    rank1 = sub.log_path(1).read_text()  # the signalled rank says the same, claims no requeue
    assert f"[launch] rank 1 stopped at step {saved} on SIGTERM" in rank1
    assert "rank 0 requeues" not in rank1
    attempts = {json.loads(line)["pid"] for line in (run_dir / "metrics.jsonl").open()}
    assert len(attempts) == 1


def test_sigusr_to_one_rank_still_requeues_on_every_rank_agreeing(
    tmp_path, capfd, loop_entry_importable
):
    run_dir = tmp_path / "run"
    sub = _submit_local_loop(run_dir, total_samples=8, max_requeues=2)
    _wait_until(lambda: len(metrics_steps(run_dir)) >= 2, 120, "2 steps")
    os.kill(int((run_dir / "pids" / "1").read_text()), signal.SIGUSR2)  # rank 1 only
    status = jobs.wait_for(sub, poll_s=0.2)
    out = capfd.readouterr().out
    assert status == 0, out
    rank1 = sub.log_path(1).read_text()
    assert "rank 1 stopped at step" in rank1 and "rank 0 requeues" in rank1
    assert "requeueing (0/2 requeues so far)" in out  # rank 0 did, though not signalled itself
    assert metrics_steps(run_dir) == list(range(8))


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("stops_data"))


def _sigint_as_in_a_terminal() -> None:
    # A command started with `&` by a script (as a CI runner may start pytest) inherits
    # SIGINT ignored, and Python then keeps it ignored: this job would never see the Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_a_followed_local_pretraining_saves_and_says_how_to_resume(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    # Its own process group, as a terminal's foreground job: Ctrl-C signals the whole group.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pimc_dist.launch", "--cluster", "local", "--wait",
         "--tasks-per-node", "2", "--config", str(TINY), f"loader.shards={tiny_shards}",
         f"train.run_dir={run_dir}", "train.total_samples=64000", "train.batch_size=8",
         "train.log_every_steps=1", "train.ckpt_every_steps=100000", "tracking.wandb=false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    try:
        _wait_until(lambda: len(metrics_steps(run_dir)) >= 2, 400, "2 logged steps")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "Ctrl-C: stopping job" in out
    assert "stopped at step" in out and "checkpoint saved; rerun the same command" in out, out
    assert "KeyboardInterrupt" not in out and "Traceback" not in out, out
    step = int(out.split("stopped at step ")[1].split()[0])
    tag = latest_tag(run_dir / "checkpoints")  # the checkpoint the stop saved, complete
    assert step >= 2 and tag == f"step{step:08d}", tag
    assert read_client_state(run_dir / "checkpoints", tag)["step"] == step
    logs = "".join(p.read_text() for p in run_dir.glob("slurm/*/*_log.out"))
    assert "KeyboardInterrupt" not in logs, logs[-3000:]


def _fake_checkpoint(ckpt: Path, step: int, damaged: bool = False) -> str:
    """A checkpoint folder as Engine.save leaves it (a client state and a state file)."""
    tag = f"step{step:08d}"
    (ckpt / tag).mkdir(parents=True)
    (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 64)
    state = {"step": step, "samples_seen": step * 64, "data_epoch": 1, "world_size": 1,
             "rng": {}, "config": ""}  # fmt: skip
    text = json.dumps(state)
    (ckpt / tag / "client_state.json").write_text(text[: len(text) // 2] if damaged else text)
    (ckpt / "latest").write_text(tag)
    return tag


def test_a_damaged_latest_checkpoint_points_at_the_intact_older_one(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    older = _fake_checkpoint(ckpt, 16)
    newest = _fake_checkpoint(ckpt, 32, damaged=True)
    with pytest.raises(CheckpointError) as info:
        read_client_state(ckpt, latest_tag(ckpt))
    message = str(info.value)
    assert f"{ckpt / newest}/client_state.json: not valid JSON" in message
    assert f"older checkpoint looks intact: {ckpt / older} (step 16)" in message
    assert f"echo {older} > {ckpt / 'latest'}" in message
    # What the user sees from the command line: one message, exit status 1, no traceback.
    done = subprocess.run(
        [sys.executable, "-m", "pimc_dist.pretrain", "--config", str(TINY),
         f"loader.shards={tiny_shards}", f"train.run_dir={run_dir}", "tracking.wandb=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "older checkpoint looks intact" in done.stderr and "Traceback" not in done.stderr


def test_a_damaged_only_checkpoint_says_there_is_no_older_one(tmp_path):
    ckpt = tmp_path / "checkpoints"
    tag = _fake_checkpoint(ckpt, 8, damaged=True)
    with pytest.raises(CheckpointError, match="no older complete checkpoint is there"):
        read_client_state(ckpt, tag)
