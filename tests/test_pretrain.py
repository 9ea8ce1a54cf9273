"""DeepSpeed pretraining on 2 CPU ranks (gloo): training, ZeRO stages, resume, faults, tracking.

Every run here is a real multi-process job: `python -m pimc_dist.pretrain` once per
rank with torchrun-style variables, on real shards written by the real sharder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from launch_helpers import build_tiny_shards

from pimc_dist.config import load
from pimc_dist.distributed import free_port
from pimc_dist.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """A small PASTIS-layout shard set (6 patches of 32 px, 64 pixels each)."""
    return build_tiny_shards(tmp_path_factory.mktemp("pretrain_data"))


def start_ranks(run_dir: Path, shards: Path, world: int, overrides: list[str], timeout: int = 60):
    """Start `world` ranks of the tiny pretraining; returns the Popen objects."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            DS_ACCELERATOR="cpu",
            WANDB_MODE="offline",
            PYTHONUNBUFFERED="1",
        )
        args = [
            f"train.run_dir={run_dir}",
            f"loader.shards={shards}",
            f"train.collective_timeout_s={timeout}",
            "loader.workers=1",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pimc_dist.pretrain", "--config", str(TINY), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def run_ranks(run_dir: Path, shards: Path, world: int, overrides: list[str], limit_s: int = 400):
    """Run the ranks to the end; returns [(exit code, output)] per rank."""
    procs = start_ranks(run_dir, shards, world, overrides)
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out))
    return results


def assert_ok(results):
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")}


def test_loss_falls_and_outputs_are_written(tmp_path, shards):
    run = tmp_path / "run"
    assert_ok(run_ranks(run, shards, 2, ["train.total_samples=3072", "train.log_every_steps=2"]))
    values = list(losses(run).values())
    assert len(values) >= 10
    first, last = np.mean(values[:3]), np.mean(values[-3:])
    assert last < first - 0.1, f"loss did not fall: {values}"
    rows = read_metrics(run / "metrics.jsonl")
    for key in ("lr", "grad_norm", "temperature", "samples_per_s", "data_wait_frac", "step_time_s"):
        assert key in rows[-1], key
    assert rows[-1]["samples_seen"] == 3072
    assert (run / "checkpoints" / "latest").read_text() == "step00000048"
    assert (run / "config.yaml").is_file()
    # W&B offline run files under the run folder, holding the logged history.
    wandb_runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_runs, list((run / "wandb").rglob("*"))
    # Consolidated encoder weights load into a fresh model.
    from pimc_dist.models import load_encoder_weights
    from pimc_dist.pretrain import build_model

    model = build_model(load(TINY))
    load_encoder_weights(model.encoder("rp"), run / "encoders.safetensors", view="rp")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains(tmp_path, shards, stage):
    run = tmp_path / f"zero{stage}"
    assert_ok(
        run_ranks(
            run,
            shards,
            2,
            ["train.total_samples=512", f"deepspeed.zero_stage={stage}", "train.log_every_steps=1"],
        )
    )
    values = list(losses(run).values())
    assert len(values) == 8 and all(np.isfinite(values))
    assert (run / "checkpoints" / "step00000008" / "client_state.json").is_file()
    assert (run / "encoders.safetensors").is_file()


def test_resume_gives_same_loss_as_uninterrupted(tmp_path, shards):
    common = [
        "train.total_samples=512",
        "train.ckpt_every_steps=4",
        "train.log_every_steps=1",
        "train.deterministic=true",
    ]
    full = tmp_path / "full"
    assert_ok(run_ranks(full, shards, 2, common))
    split = tmp_path / "split"
    assert_ok(run_ranks(split, shards, 2, [*common, "train.stop_after_steps=4"]))
    assert max(losses(split)) == 4
    assert_ok(run_ranks(split, shards, 2, common))
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_allclose(b[8], a[8], rtol=1e-5)
    np.testing.assert_allclose([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=1e-5)


def test_resume_on_fewer_ranks_uses_universal_checkpoint(tmp_path, shards):
    run = tmp_path / "run"
    common = ["train.total_samples=1024", "train.ckpt_every_steps=4", "train.log_every_steps=1"]
    assert_ok(run_ranks(run, shards, 2, [*common, "train.stop_after_steps=4"]))
    results = run_ranks(run, shards, 1, common)
    assert_ok(results)
    assert "converting to universal" in results[0][1]
    steps = sorted(losses(run))
    # 4 steps of 64 samples on 2 ranks, then 24 steps of 32 on 1 rank: 1024 samples in all.
    assert steps[-1] == 4 + (1024 - 4 * 64) // 32
    state = json.loads(
        (
            run / "checkpoints" / (run / "checkpoints/latest").read_text() / "client_state.json"
        ).read_text()
    )
    assert state["samples_seen"] == 1024 and state["world_size"] == 1


def test_killed_rank_makes_the_job_fail_within_the_timeout(tmp_path, shards):
    run = tmp_path / "run"
    procs = start_ranks(
        run, shards, 2, ["train.total_samples=100000", "train.log_every_steps=1"], timeout=20
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.5)
    try:
        assert metrics.is_file(), procs[0].communicate(timeout=5)[0][-3000:]
        workers = children(procs[1].pid)  # its loader worker (loader.workers=1)
        assert workers
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert time.time() - killed_at < 100
    assert "rank 0" in out and "another rank" in out.lower(), out[-3000:]
    # The killed rank's workers died with it instead of lingering on a full pipe.
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and not is_zombie(pid)]


def children(pid: int) -> list[int]:
    """Live child pids of a process (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_different_run_in_the_folder_is_refused(tmp_path, shards):
    run = tmp_path / "run"
    assert_ok(run_ranks(run, shards, 1, ["train.total_samples=64"]))
    results = run_ranks(run, shards, 1, ["train.total_samples=64", "loss.name=siglip"])
    code, out = results[0]
    assert code == 1 and "already holds a different run" in out and "loss.name" in out


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, shards):
    run = tmp_path / "run"
    results = run_ranks(
        run,
        shards,
        1,
        [
            "train.total_samples=4096",
            "train.lr=1e30",
            "train.grad_clip=0",
            "train.max_nonfinite_in_row=3",
        ],
    )
    code, out = results[0]
    assert code == 1, out[-3000:]
    assert "not finite for 3 steps in a row" in out
