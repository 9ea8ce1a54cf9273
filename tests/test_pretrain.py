"""DeepSpeed pretraining on 2 CPU ranks (gloo): training, ZeRO stages, resume, faults, tracking.

Every run here is a real multi-process job: `python -m pimc_dist.pretrain` once per
rank with torchrun-style variables, on real shards written by the real sharder (one
test wraps the same entry point to inject a NaN loss, see ONE_NAN_ON_RANK_1).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from launch_helpers import build_tiny_shards, cpu_rank_env, resumed_at
from safetensors.torch import load_file
from test_tracking import wandb_history, wandb_runs

from pimc_dist import pretrain
from pimc_dist.config import ConfigError, load
from pimc_dist.distributed import REQUEUE_EXIT_CODE, free_port
from pimc_dist.engine import read_client_state
from pimc_dist.tracking import read_metrics

TINY = REPO / "configs/pretrain/tiny.yaml"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """A small PASTIS-layout shard set (6 patches of 32 px, 64 pixels each)."""
    return build_tiny_shards(tmp_path_factory.mktemp("pretrain_data"))


PRETRAIN = ["-m", "pimc_dist.pretrain"]

# `python -c` entry that runs the pretraining with one NaN loss on rank 1 only, at its
# third batch. A hook is unavoidable here: the shards hold uint8 plots and int16 crops,
# which cannot make a loss non-finite, and a diverging run (huge lr) never recovers.
ONE_NAN_ON_RANK_1 = [
    "-c",
    """
import os, sys
from pimc_dist import pretrain

real, calls = pretrain.compute_loss, []

def compute_loss(*args, **kwargs):
    loss, terms = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1":
        loss = loss * float("nan")
    return loss, terms

pretrain.compute_loss = compute_loss
sys.exit(pretrain.cli())
""",
]


def start_ranks(
    run_dir: Path,
    shards: Path,
    world: int,
    overrides: list[str],
    timeout: int = 60,
    entry: list[str] = PRETRAIN,
) -> list[subprocess.Popen]:
    """Start `world` ranks of the tiny pretraining; returns the Popen objects.

    Each rank's output goes to a log file beside the run folder (`proc.log`, read it
    with `output`), not a pipe: nobody has to drain it while the ranks run.
    """
    port = free_port()
    attempt = len(list(run_dir.parent.glob(f"{run_dir.name}.*.rank0.log")))
    procs = []
    for rank in range(world):
        env = cpu_rank_env(rank, world, port)
        args = [
            f"train.run_dir={run_dir}",
            f"loader.shards={shards}",
            f"train.collective_timeout_s={timeout}",
            "loader.workers=1",
            "tracking.wandb=false",  # W&B's service start and end: a second per run
            *overrides,
        ]
        log = run_dir.parent / f"{run_dir.name}.{attempt}.rank{rank}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, *entry, "--config", str(TINY), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log = log
        procs.append(proc)
    return procs


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def wait_ranks(procs: list[subprocess.Popen], limit_s: int = 400) -> list[tuple[int, str]]:
    """Wait for the ranks to exit (killing them all past `limit_s`); [(exit code, output)] per rank."""
    deadline = time.time() + limit_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"ranks still running after {limit_s}s:\n{output(procs[0])[-3000:]}"
        ) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, output(p)) for p in procs]


def run_ranks(
    run_dir: Path,
    shards: Path,
    world: int,
    overrides: list[str],
    limit_s: int = 400,
    entry: list[str] = PRETRAIN,
):
    """Run the ranks to the end; returns [(exit code, output)] per rank."""
    return wait_ranks(start_ranks(run_dir, shards, world, overrides, entry=entry), limit_s)


def wait_until(condition, procs: list[subprocess.Popen], what: str, limit_s: int = 300) -> None:
    """Poll `condition()` while every rank is still running; fail if one exits or time runs out."""
    deadline = time.time() + limit_s
    while not condition():
        exited = [p for p in procs if p.poll() is not None]
        if exited or time.time() > deadline:
            for p in procs:
                p.kill()
            state = f"exited {exited[0].returncode}" if exited else f"no {what} in {limit_s}s"
            raise AssertionError(f"waiting for {what}: {state}:\n{output(procs[0])[-3000:]}")
        time.sleep(0.2)


def assert_ok(results):
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-4000:]}"


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [row["step"] for row in read_metrics(path)] if path.is_file() else []


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per logged step; fails if a step was logged twice (a re-trained step)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert len(set(steps)) == len(steps), f"steps logged more than once: {steps}"
    return {row["step"]: row["loss"] for row in rows}


def latest_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    return read_client_state(ckpt, (ckpt / "latest").read_text())


def test_loss_falls_and_outputs_are_written(tmp_path, shards):
    run = tmp_path / "run"
    common = ["train.total_samples=3072", "train.log_every_steps=2", "tracking.wandb=true"]
    results = run_ranks(run, shards, 2, common)
    assert_ok(results)
    logged = losses(run)
    values = list(logged.values())
    assert len(values) >= 10
    first, last = np.mean(values[:3]), np.mean(values[-3:])
    assert last < first - 0.1, f"loss did not fall: {values}"
    rows = read_metrics(run / "metrics.jsonl")
    for key in ("lr", "grad_norm", "temperature", "samples_per_s", "data_wait_frac", "step_time_s"):
        assert key in rows[-1], key
    assert rows[-1]["samples_seen"] == 3072
    assert (run / "checkpoints" / "latest").read_text() == "step00000048"
    assert (run / "config.yaml").is_file()
    # The model summary (parameters per tower) on rank 0, before training.
    assert "encoders.rp" in results[0][1] and "trainable:" in results[0][1]
    # The offline W&B run holds the same metrics, and the sample images at step 0.
    (wandb_run,) = wandb_runs(run)
    run_id, history = wandb_history(wandb_run)
    assert run_id == latest_state(run)["wandb_id"]
    assert history[0]["step"] == 0 and "image-file" in history[0].values()
    logged_in_wandb = {row["step"]: row["loss"] for row in history if "loss" in row}
    assert logged_in_wandb == pytest.approx(logged)
    assert history[-1]["samples_seen"] == 3072
    # Consolidated encoder weights load into a fresh model.
    from pimc_dist.models import load_encoder_weights

    model = pretrain.build_model(load(TINY))
    load_encoder_weights(model.encoder("rp"), run / "encoders.safetensors", view="rp")
    # Run again with another learning rate: nothing to train, and the folder's record of
    # what trained it stays as it was.
    saved = (run / "config.yaml").read_text()
    again = run_ranks(run, shards, 2, ["train.total_samples=3072", "train.lr=1e-5"])
    assert_ok(again)
    assert "finished at step 48 (3072 samples): nothing to train" in again[0][1]
    assert (run / "config.yaml").read_text() == saved
    assert not list(run.glob("config.*.yaml"))


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


# accum=2 covers accum=1 in the default suite; accum=1 is a long test of its own.
@pytest.mark.parametrize("accum", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_resume_gives_same_loss_as_uninterrupted(tmp_path, shards, accum):
    steps = 512 // (2 * 32 * accum)  # optimizer steps: 2 ranks x 32 samples x accum micro-batches
    half = steps // 2
    common = [
        "train.total_samples=512",
        f"train.grad_accum={accum}",
        f"train.ckpt_every_steps={half}",
        "train.log_every_steps=1",
        "train.deterministic=true",
        "tracking.wandb=true",
    ]
    full = tmp_path / "full"
    assert_ok(run_ranks(full, shards, 2, common))
    assert logged_steps(full) == list(range(1, steps + 1))
    split = tmp_path / "split"
    assert_ok(run_ranks(split, shards, 2, [*common, f"train.stop_after_steps={half}"]))
    assert logged_steps(split) == list(range(1, half + 1))
    results = run_ranks(split, shards, 2, common)
    assert_ok(results)
    assert resumed_at(results[0][1]) == [half]
    # Each step once: the second run went on from the checkpoint instead of starting over.
    assert logged_steps(split) == list(range(1, steps + 1))
    a, b = losses(full), losses(split)
    np.testing.assert_allclose(b[steps], a[steps], rtol=1e-5)
    np.testing.assert_allclose(
        [b[s] for s in range(half + 1, steps + 1)],
        [a[s] for s in range(half + 1, steps + 1)],
        rtol=1e-5,
    )
    # Both attempts logged to one W&B run: the id came back from the checkpoint.
    first, second = (wandb_history(p) for p in wandb_runs(split))
    assert first[0] == second[0] == latest_state(split)["wandb_id"]
    assert [row["step"] for row in second[1] if "loss" in row] == list(range(half + 1, steps + 1))


@pytest.mark.slow  # the default suite converts to universal in the next test
def test_universal_checkpoint_restores_weights_and_optimizer_state(tmp_path, shards):
    """A resume through DeepSpeed's universal format continues the run exactly."""
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
    # As if saved with another world size: the 2-rank resume converts to universal and
    # loads that, where the weights, Adam moments and schedule must all come back.
    path = split / "checkpoints" / "step00000004" / "client_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "world_size": 1}))
    results = run_ranks(split, shards, 2, common)
    assert_ok(results)
    assert "converting to universal" in results[0][1]
    assert "step00000004_universal at step 4" in results[0][1]
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=1e-5)


@pytest.mark.parametrize("stage", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_resume_on_fewer_ranks_uses_universal_checkpoint(tmp_path, shards, stage):
    run = tmp_path / "run"
    common = [
        f"deepspeed.zero_stage={stage}",
        "train.ckpt_every_steps=4",
        "train.log_every_steps=1",
    ]
    assert_ok(run_ranks(run, shards, 2, [*common, "train.total_samples=256"]))
    trained = load_file(run / "encoders.safetensors")
    # At the same total there is nothing left to train: one rank loads the universal
    # conversion of the 2-rank checkpoint and exports what it loaded, BatchNorm
    # statistics included. (A ZeRO-0 checkpoint is whole in rank 0's file: no conversion.)
    results = run_ranks(run, shards, 1, [*common, "train.total_samples=256"])
    assert_ok(results)
    assert ("converting to universal" in results[0][1]) == (stage > 0)
    assert resumed_at(results[0][1]) == [4]
    reloaded = load_file(run / "encoders.safetensors")
    assert trained.keys() == reloaded.keys()
    for name, tensor in trained.items():
        assert torch.equal(tensor, reloaded[name]), name
    # Then a longer run on one rank goes on from there.
    results = run_ranks(run, shards, 1, [*common, "train.total_samples=1024"])
    assert_ok(results)
    # 4 steps of 64 samples on 2 ranks, then 24 steps of 32 on 1 rank: 1024 samples in all.
    assert sorted(losses(run)) == list(range(1, 4 + (1024 - 4 * 64) // 32 + 1))
    state = latest_state(run)
    assert state["samples_seen"] == 1024 and state["world_size"] == 1
    # The conversion went with its checkpoint when keep-last pruned that.
    assert not list((run / "checkpoints").glob("step*_universal"))


@pytest.mark.parametrize(
    ("sig", "signalled"),
    # One rank signalled alone: the default suite has it in test_stops.py, on a launched job.
    [(signal.SIGTERM, [0, 1]), pytest.param(signal.SIGUSR1, [1], marks=pytest.mark.slow)],
    ids=["sigterm-every-rank", "sigusr1-one-rank"],
)
def test_stop_signal_saves_a_checkpoint_and_exits_for_requeue(tmp_path, shards, sig, signalled):
    run = tmp_path / "run"
    common = ["train.total_samples=2048", "train.log_every_steps=1"]  # 32 steps
    procs = start_ranks(run, shards, 2, common)
    wait_until(lambda: len(logged_steps(run)) >= 2, procs, "two logged steps")
    for rank in signalled:
        procs[rank].send_signal(sig)
    results = wait_ranks(procs, 120)
    for rank, (code, out) in enumerate(results):
        assert code == REQUEUE_EXIT_CODE, f"rank {rank} exited {code}:\n{out[-3000:]}"
    stopped = latest_state(run)["step"]
    assert 2 <= stopped < 32
    assert f"stop requested: saved checkpoint at step {stopped}" in results[0][1]
    # The requeued job resumes from that checkpoint and runs to the planned end.
    results = run_ranks(run, shards, 2, common)
    assert_ok(results)
    assert resumed_at(results[0][1]) == [stopped]
    assert logged_steps(run) == list(range(1, 33))
    assert latest_state(run)["samples_seen"] == 2048


def test_stop_signal_is_obeyed_while_losses_are_not_finite(tmp_path, shards):
    run = tmp_path / "run"
    # With lr 1e30 only step 1 is finite; skipped batches do not count towards the
    # total, so this run can end only by a stop (or max_nonfinite_in_row).
    overrides = [
        "train.total_samples=128",
        "train.lr=1e30",
        "train.grad_clip=0",
        "train.max_nonfinite_in_row=1000000",
        "train.log_every_steps=1",
    ]
    procs = start_ranks(run, shards, 1, overrides)
    wait_until(lambda: "batch skipped (3 in a row" in output(procs[0]), procs, "skipped batches")
    procs[0].send_signal(signal.SIGTERM)
    ((code, out),) = wait_ranks(procs, 120)
    assert code == REQUEUE_EXIT_CODE, out[-3000:]
    assert "stop requested: saved checkpoint at step 1" in out
    assert (run / "checkpoints" / "latest").read_text() == "step00000001"


def test_a_non_finite_step_is_skipped_counted_and_training_recovers(tmp_path, shards):
    run = tmp_path / "run"
    overrides = ["train.total_samples=512", "train.log_every_steps=1"]
    results = run_ranks(run, shards, 2, overrides, entry=ONE_NAN_ON_RANK_1)
    assert_ok(results)
    # Rank 0's loss was finite, yet it skipped the batch with rank 1.
    assert "non-finite loss after step 2: batch skipped (1 in a row, 1 in all)" in results[0][1]
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 9))  # a skipped batch is no step
    assert [row["nonfinite_skipped"] for row in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(np.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["samples_seen"] == 512


def test_killed_rank_makes_the_job_fail_within_the_timeout(tmp_path, shards):
    run = tmp_path / "run"
    procs = start_ranks(
        run, shards, 2, ["train.total_samples=100000", "train.log_every_steps=1"], timeout=20
    )
    wait_until(lambda: len(logged_steps(run)) >= 2, procs, "two logged steps")
    try:
        workers = children(procs[1].pid)  # its loader worker (loader.workers=1)
        assert workers
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        procs[0].wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
    out = output(procs[0])
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
    # A config error (pimc_dist.checks): exit 2 naming the key.
    assert code == 2 and "already holds a different run" in out and "loss.name" in out


def test_shards_of_an_older_format_stop_with_a_clear_message(tmp_path, shards):
    old = tmp_path / "old_shards"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, out = run_ranks(tmp_path / "run", old, 1, ["train.total_samples=64"])[0]
    # The manifest is checked with the config: exit 2 naming the key and the file.
    assert code == 2 and "error:" in out and "shard it again" in out, out[-3000:]
    assert "'loader.shards'" in out and str(old / "manifest.json") in out
    assert "Traceback" not in out


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


def test_the_loops_own_collectives_use_the_backends_device(monkeypatch):
    """An nccl group reduces only CUDA tensors: the loss-finiteness flag and the metric means
    go where `distributed.collective_device()` says (the CPU under gloo, as here)."""
    from pimc_dist import distributed

    class Reduced(Exception):
        pass

    devices = []

    def all_reduce(tensor, op=None):
        devices.append(tensor.device)
        raise Reduced

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    with pytest.raises(Reduced):
        pretrain._all_finite(torch.tensor(1.0))
    with pytest.raises(Reduced):
        pretrain._mean_over_ranks({"loss": 1.0})
    assert devices == [torch.device("meta")] * 2


def test_flops_per_sample_is_three_forwards_of_the_built_model():
    from pimc_dist.models import count_flops

    cfg = load(TINY)
    assert pretrain.flops_per_sample(cfg) == 3 * count_flops(pretrain.build_model(cfg))
    # A view that runs another view's encoder (with a head of its own) costs that encoder.
    own = ("encoder", "in_chans", "img_size", "width")
    cfg = load(
        TINY, ["model.views.rsi.share_encoder=rp", *(f"model.views.rsi.{k}=null" for k in own)]
    )
    shared = pretrain.build_model(cfg)
    assert shared.encoder("rsi") is shared.encoder("rp")
    assert pretrain.flops_per_sample(cfg) == 3 * count_flops(shared)
    assert count_flops(shared) == 2 * (
        count_flops(shared.encoder("rp")) + count_flops(shared.head("rp"))
    )
    # MoSAiC forwards two augmentations of each modality.
    mosaic = load(REPO / "configs/pretrain/mosaic.yaml", ["data.root=/nowhere"])
    with torch.device("meta"):
        model = pretrain.build_model(mosaic)
    assert pretrain.flops_per_sample(mosaic) == 6 * count_flops(model)


def test_an_augment_view_mosaic_does_not_have_is_refused(tmp_path):
    cfg = load(
        REPO / "configs/pretrain/mosaic.yaml",
        ["data.root=/nowhere", f"train.run_dir={tmp_path}", "augment.s3.flips=false"],
    )
    with pytest.raises(ConfigError, match=r"augment.s3: method mosaic .* \(only of s2, s1\)"):
        pretrain.check_config(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.views.rp.encoder=resnet19", "model.views.rp: unknown encoder 'resnet19'"),
        ("model.views.rsi.in_chans=null", "model.views.rsi: missing in_chans"),
        ("model.views.rp.patch_size=8", "model.views.rp: resnet18: patch_size applies to ViT"),
        # An augment section the job would silently ignore.
        ("augment.rsi.flips=false", "augment.rsi: method pimc draws no augmentations"),
    ],
)
def test_check_config_builds_the_model_and_names_the_bad_key(tmp_path, override, message):
    # No shards: the model check comes first, before anything needs data.
    cfg = load(TINY, [f"train.run_dir={tmp_path / 'run'}", f"loader.shards={tmp_path}", override])
    with pytest.raises(ConfigError) as err:
        pretrain.check_config(cfg)
    assert str(err.value).startswith(message), err.value


def _forward_error(model, loss_fn, batch) -> BaseException:
    try:
        pretrain.compute_loss(model, loss_fn, batch, "pimc")
    except RuntimeError as exc:
        return exc
    raise AssertionError("the forward pass did not fail")


def test_an_error_in_the_forward_pass_names_its_module_and_op_not_a_collective():
    cfg = load(TINY)
    model, loss_fn = pretrain.build_model(cfg), pretrain.build_loss(cfg)
    # One convolution in another dtype than its input: what a missing batch cast does.
    conv = model.encoders["rsi"].conv1
    conv.weight.data = conv.weight.data.double()
    batch = {"rp": torch.randn(2, 3, 42, 42), "rsi": torch.randn(2, 10, 16, 16)}
    exc = _forward_error(model, loss_fn, batch)
    message = pretrain._failure_message(exc, 1, "forward and loss", 7, {"": model, "loss": loss_fn})
    assert message.startswith(
        "rank 1: forward and loss failed at step 7 in encoders.rsi.conv1 (Conv2d)"
    )
    assert "torch/nn/modules/conv.py" in message and "RuntimeError: " in message
    assert "another rank" not in message.lower() and "all-gather" not in message


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40212"),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete"),
        torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error"),
    ],
)  # fmt: skip
def test_a_lost_peer_or_timed_out_collective_says_another_rank_died(exc):
    message = pretrain._failure_message(exc, 0, "forward and loss", 3, {})
    assert message.startswith("rank 0: forward and loss failed at step 3: feature all-gather")
    assert "Another rank probably died or hangs" in message
    message = pretrain._failure_message(exc, 0, "backward", 3, {})
    assert "gradient all-reduce timed out or lost a peer" in message
