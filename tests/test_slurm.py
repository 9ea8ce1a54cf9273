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

import loop_entry
import pytest
from conftest import REPO, run_module
from launch_helpers import (
    TINY,
    build_tiny_shards,
    check_logged_steps,
    metrics_steps,
    rank_hosts,
    resumed_at,
)

from pimc_dist import config, jobs, launch
from pimc_dist.jobs import EntryJob

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
    info = jobs.slurm_job_info(job_id)
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
        lambda: (i := job_info(job_id))["JobState"] in jobs.SLURM_FINAL_STATES and i,
        f"job {job_id} to end",
        timeout_s,
    )


# ---------------------------------------------------------------------------
# submitit path: python -m pimc_dist.launch --cluster slurm


def test_diagnose_on_two_nodes_exits_zero_and_both_nodes_take_part(tmp_path, test_env):
    run_dir = tmp_path / "run"
    result = run_module(
        "pimc_dist.launch", "diagnose", "--nodes", "2", "--cluster", "slurm", "--wait",
        "--time", "00:05:00", f"train.run_dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
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


def _submit_loop(run_dir: Path, steps: int) -> jobs.Submitted:
    cfg = jobs.load_job_config(
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
    job = EntryJob("loop", config.to_yaml(cfg), loop_entry.main)
    return jobs.submit(cfg, job, "slurm")


def test_preemption_signal_saves_requeues_and_resumes_without_repeating_steps(
    tmp_path, test_env, capsys
):
    run_dir = tmp_path / "run"
    steps = 24
    sub = _submit_loop(run_dir, steps)
    wait_until(lambda: len(metrics_steps(run_dir)) >= 3, "the first steps")
    # What Slurm sends signal_delay_s before the time limit (submitit: USR2).
    subprocess.run(["scancel", "--signal=USR2", sub.job_id], check=True)
    status = jobs.wait_for(sub, poll_s=0.5)
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
# Pretraining: python -m pimc_dist.launch --nodes 2 --cluster slurm --config tiny.yaml

STEP_SAMPLES = 64  # 2 ranks x train.batch_size 32 (tiny.yaml)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("slurm_pretrain_data"))


def launch_pretrain(run_dir: Path, shards: Path, steps: int, *extra: str) -> subprocess.Popen:
    """The launcher CLI with --wait on 2 nodes, one CPU rank each; it follows rank 0's log."""
    return subprocess.Popen(
        [sys.executable, "-m", "pimc_dist.launch", "--nodes", "2", "--tasks-per-node", "1"]
        + ["--cluster", "slurm", "--wait", "--time", "00:10:00", "--config", str(TINY)]
        + [f"train.run_dir={run_dir}", f"loader.shards={shards}"]
        + [f"train.total_samples={steps * STEP_SAMPLES}", *extra],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout_s: float = 330) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(
            f"launcher still waiting after {timeout_s} s:\n{out[-5000:]}"
        ) from None
    return proc.returncode, out


def submitted_job_id(run_dir: Path) -> str:
    """The job id, from the job folder the launcher creates at submission (run_dir/slurm/<id>)."""
    return wait_until(
        lambda: next((p.name for p in (run_dir / "slurm").glob("*") if p.name.isdigit()), None),
        "the job folder",
        timeout_s=60,
    )


def final_state(run_dir: Path) -> dict:
    """client_state.json of the latest checkpoint."""
    ckpt = run_dir / "checkpoints"
    return json.loads((ckpt / (ckpt / "latest").read_text() / "client_state.json").read_text())


def test_pretrain_on_two_nodes_exits_zero_with_checkpoint_metrics_and_wandb(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    code, out = finish(launch_pretrain(run_dir, tiny_shards, 4, "train.log_every_steps=1"))
    assert code == 0, out[-5000:]
    job_id = out.split("submitted pretrain job ")[1].split()[0]
    assert f"[launch] job {job_id} ended: COMPLETED, exit status 0" in out
    assert job_info(job_id)["NumNodes"] == "2"
    # Both nodes took part: each rank's log names its node, and the job's global batch
    # and checkpoint shards come from 2 ranks.
    assert rank_hosts(run_dir / "slurm" / job_id) == {0: {"n1"}, 1: {"n2"}}
    assert metrics_steps(run_dir) == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples_seen"] for r in rows] == [64, 128, 192, 256]
    state = final_state(run_dir)
    assert state["step"] == 4 and state["world_size"] == 2
    for rank in (0, 1):
        assert (
            run_dir
            / "checkpoints"
            / state["tag"]
            / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        ).is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), offline
    assert (run_dir / "encoders.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_pretrain_requeued_by_submitit_signal_resumes_without_repeating_a_step(
    tmp_path, tiny_shards
):
    run_dir = tmp_path / "run"
    steps = 8
    proc = launch_pretrain(
        run_dir, tiny_shards, steps, "train.ckpt_every_steps=4", "train.log_every_steps=1"
    )
    job_id = submitted_job_id(run_dir)
    wait_until(lambda: len(metrics_steps(run_dir)) >= 2, "the first steps", timeout_s=240)
    # What Slurm sends signal_delay_s before the time limit (submitit: USR2).
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    code, out = finish(proc)
    assert code == 0, out[-5000:]
    assert job_info(job_id)["Restarts"] == "1"
    log = (run_dir / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    stops = [int(m) for m in re.findall(r"stop requested: saved checkpoint at step (\d+)", log)]
    assert len(stops) == 1 and 2 <= stops[0] < steps, log[-5000:]
    assert "requeueing (0/3 requeues so far)" in log and "requeues 1, Slurm restarts 1" in log
    assert resumed_at(log) == stops
    # Stopped at a step boundary with a checkpoint there: every step logged exactly once.
    assert metrics_steps(run_dir) == list(range(1, steps + 1))
    check_logged_steps(
        metrics_steps(run_dir), planned=steps, log_every=1, ckpt_every=4, resumes=stops
    )
    state = final_state(run_dir)
    assert state["step"] == steps and state["samples_seen"] == steps * STEP_SAMPLES
    assert rank_hosts(run_dir / "slurm" / job_id) == {0: {"n1"}, 1: {"n2"}}
    # The resumed attempt continues the same W&B run (same id, a second offline folder).
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {state["wandb_id"]}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2


def test_pretrain_requeued_by_scontrol_resumes_from_its_checkpoint(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    steps, ckpt_every, log_every = 8, 4, 1
    proc = launch_pretrain(
        run_dir,
        tiny_shards,
        steps,
        f"train.ckpt_every_steps={ckpt_every}",
        f"train.log_every_steps={log_every}",
    )
    job_id = submitted_job_id(run_dir)
    # Interrupt between checkpoints: after the one at step 4, before the one at 8.
    wait_until(
        lambda: (run_dir / "checkpoints" / "latest").is_file() and 5 in metrics_steps(run_dir),
        "the checkpoint at step 4",
        timeout_s=240,
    )
    interrupted_after = max(metrics_steps(run_dir))
    # Slurm sends SIGTERM to every process of the job, then SIGKILL, and requeues it itself.
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    code, out = finish(proc)
    assert code == 0, out[-5000:]
    assert job_info(job_id)["Restarts"] == "1"
    log = (run_dir / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    resumes = resumed_at(log)
    assert len(resumes) == 1 and ckpt_every <= resumes[0] < steps, log[-5000:]
    logged = metrics_steps(run_dir)
    assert interrupted_after < steps and logged[:interrupted_after] == list(
        range(1, interrupted_after + 1)
    )
    # Every step once, except those between the checkpoint it resumed from and the
    # interruption, which the resumed attempt logs again (at most one interval).
    check_logged_steps(
        logged, planned=steps, log_every=log_every, ckpt_every=ckpt_every, resumes=resumes
    )
    state = final_state(run_dir)
    assert state["step"] == steps and state["samples_seen"] == steps * STEP_SAMPLES


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loader.shards={missing}", "loader.shards"),
        ("train.warmup_fraction=most", "train.warmup_fraction"),
    ],
)
def test_bad_pretrain_config_is_rejected_before_anything_reaches_slurm(
    tmp_path, tiny_shards, capsys, override, key
):
    run_dir = tmp_path / "run"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    code = launch.main(
        ["--nodes", "2", "--cluster", "slurm", "--config", str(TINY), f"train.run_dir={run_dir}"]
        + [f"loader.shards={tiny_shards}", override.format(missing=tmp_path / "none")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nothing submitted" in err and key in err, err
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())
    assert not run_dir.exists()


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
