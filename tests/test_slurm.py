"""The launcher and sbatch scripts on a real Slurm cluster (slurm/local_cluster.sh: nodes n1, n2).

Run with `bash dev.sh test -m slurm` after `sudo bash slurm/local_cluster.sh start`.
A requeued job starts again once its old credential expired (10 s on the local
cluster, AuthInfo=cred_expire=10; 120 s by default on real clusters).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pimc_dist import config, launch
from pimc_dist.launch import EntryJob

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sinfo") is None,
        reason="no Slurm here (sinfo not found); start one with: sudo bash slurm/local_cluster.sh start",
    ),
    pytest.mark.timeout(420),
]


@pytest.fixture(autouse=True)
def cluster_up():
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    assert nodes.returncode == 0, f"Slurm not reachable: {nodes.stderr.strip()}"
    assert {"n1", "n2"} <= set(nodes.stdout.split()), (
        f"expected nodes n1, n2; sinfo: {nodes.stdout}"
    )


@pytest.fixture
def test_env(monkeypatch):
    """Jobs inherit this environment (sbatch --export=ALL): make tests/loop_entry.py importable."""
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), str(TESTS), path) if p))


def job_info(job_id: str) -> dict[str, str]:
    info = launch.slurm_job_info(job_id)
    assert info is not None, f"Slurm does not know job {job_id}"
    return info


def wait_until(predicate, what: str, timeout_s: float = 180, poll_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def wait_final(job_id: str, timeout_s: float = 240) -> dict[str, str]:
    return wait_until(
        lambda: (i := job_info(job_id))["JobState"] in launch.SLURM_FINAL_STATES and i,
        f"job {job_id} to end",
        timeout_s,
    )


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # A line still being written has no newline yet: read complete lines only.
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line)["step"] for line in lines]


# ---------------------------------------------------------------------------
# submitit path: python -m pimc_dist.launch --cluster slurm


def test_diagnose_on_two_nodes_exits_zero_and_both_nodes_take_part(tmp_path, test_env):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pimc_dist.launch", "diagnose", "--nodes", "2"]
        + ["--cluster", "slurm", "--wait", "--time", "00:05:00", f"train.run_dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "diagnose: 4 ranks on 2 node(s): n1, n2" in out
    assert "all_reduce(sum of ranks) = 6, expected 6: OK" in out
    assert "master n1:" in out  # first host of the job
    nodes = {line.split()[1] for line in out.splitlines() if re.match(r"\d+\s+n[12]\s", line)}
    assert nodes == {"n1", "n2"}
    assert "ended: COMPLETED, exit status 0" in out


def test_srun_started_ranks_read_slurm_variables(tmp_path, test_env):
    # No submitit: plain srun, as in slurm/pretrain.sbatch.
    result = subprocess.run(
        ["srun", "--nodes=2", "--ntasks-per-node=2", "--time=5"]
        + [sys.executable, "-m", "pimc_dist.diagnose", f"train.run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "diagnose: 4 ranks on 2 node(s): n1, n2" in result.stdout
    assert "expected 6: OK" in result.stdout


def test_bad_config_is_rejected_before_anything_reaches_slurm(tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    code = launch.main(["diagnose", "--cluster", "slurm", "--nodes", "2", "launch.time=never"])
    assert code == 2
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())


def _submit_loop(run_dir: Path, steps: int) -> launch.Submitted:
    cfg = launch.load_job_config(
        None,
        [
            f"train.run_dir={run_dir}",
            f"train.total_samples={steps}",
            "launch.nodes=2",
            "launch.tasks_per_node=1",
            "launch.time=00:10:00",
            "launch.signal_delay_s=60",
            "launch.max_requeues=2",
        ],
    )
    job = EntryJob("loop", config.to_yaml(cfg), module="loop_entry")
    return launch.submit(cfg, "loop", "slurm", job=job)


def test_preemption_signal_saves_requeues_and_resumes_without_repeating_steps(
    tmp_path, test_env, capsys
):
    run_dir = tmp_path / "run"
    steps = 24
    sub = _submit_loop(run_dir, steps)
    wait_until(lambda: len(metrics_steps(run_dir)) >= 3, "the first steps")
    # What Slurm sends signal_delay_s before the time limit (submitit: USR2).
    subprocess.run(["scancel", "--signal=USR2", sub.job_id], check=True)
    status = launch.wait_for(sub, poll_s=0.5)
    out = capsys.readouterr().out
    assert status == 0, out
    info = job_info(sub.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"
    assert "requeueing (0/2 requeues so far)" in out and "requeues 1, Slurm restarts 1" in out
    assert metrics_steps(run_dir) == list(range(steps))
    attempts = [
        json.loads(x)["attempt"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert attempts[0] == 0 and attempts[-1] == 1


def test_scontrol_requeue_stops_at_a_step_and_resumes_from_checkpoint(tmp_path, test_env):
    run_dir = tmp_path / "run"
    steps = 24
    sub = _submit_loop(run_dir, steps)
    wait_until(lambda: len(metrics_steps(run_dir)) >= 3, "the first steps")
    # Slurm sends SIGTERM to the tasks and requeues the job itself.
    subprocess.run(["scontrol", "requeue", sub.job_id], check=True)
    info = wait_final(sub.job_id)
    assert info["JobState"] == "COMPLETED", info
    assert metrics_steps(run_dir) == list(range(steps))


# ---------------------------------------------------------------------------
# Plain sbatch scripts (no submitit)


def _sbatch(tmp_path: Path, *args: str, export: dict[str, str]) -> str:
    """Submit with sbatch as a user would, CPU only; returns the job id."""
    env = {"REPO": str(REPO), "PYTHON": sys.executable, **export}
    exports = ",".join(["ALL"] + [f"{k}={v}" for k, v in env.items()])
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--export={exports}",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=00:10:00",
            f"--output={tmp_path}/slurm-%j.out",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def test_pretrain_sbatch_requeues_itself_after_usr1_and_resumes(tmp_path, test_env):
    run_dir = tmp_path / "run"
    steps = 24
    cfg = tmp_path / "job.yaml"
    config.save(
        config.load(None, [f"train.run_dir={run_dir}", f"train.total_samples={steps}"]), cfg
    )
    script_args = ["--nodes=2", "--ntasks-per-node=1", str(REPO / "slurm" / "pretrain.sbatch")]
    job_id = _sbatch(
        tmp_path,
        *script_args,
        export={"ENTRY": "loop_entry", "CONFIG": str(cfg), "MAX_REQUEUES": "2"},
    )
    wait_until(lambda: len(metrics_steps(run_dir)) >= 3, "the first steps")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # what --signal=USR1@120 sends
    info = wait_final(job_id)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "requeueing (1/2)" in log and "finished with status 0" in log
    assert metrics_steps(run_dir) == list(range(steps))


def test_finetune_sweep_array_runs_one_task_per_override_line(tmp_path, test_env):
    sweep = tmp_path / "sweep.txt"
    runs = [tmp_path / f"run{i}" for i in range(3)]
    sweep.write_text(
        "# one line per array task\n"
        + "\n".join(f"train.run_dir={r} train.total_samples={i + 1}" for i, r in enumerate(runs))
        + "\n"
    )
    cfg = tmp_path / "base.yaml"
    cfg.write_text("name: sweep\n")
    job_id = _sbatch(
        tmp_path,
        "--array=0-2",
        str(REPO / "slurm" / "finetune_sweep.sbatch"),
        export={"ENTRY": "loop_entry", "CONFIG": str(cfg), "SWEEP_FILE": str(sweep)},
    )
    for i in range(3):
        info = wait_final(f"{job_id}_{i}")
        assert info["JobState"] == "COMPLETED", info
    for i, run in enumerate(runs):
        assert metrics_steps(run) == list(range(i + 1))
