"""Rank detection from each launcher's variables, process-group setup on gloo, stop requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from pimc_dist import distributed
from pimc_dist.distributed import (
    REQUEUE_EXIT_CODE,
    detect_env,
    expand_nodelist,
    expand_tasks_per_node,
    free_port,
    port_from_job_id,
)

LAUNCHER_PREFIXES = ("SLURM_", "SUBMITIT_")
LAUNCHER_NAMES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables, whatever the shell running pytest had set."""
    for name in list(os.environ):
        if name in LAUNCHER_NAMES or name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


# ---------------------------------------------------------------------------
# Environment detection


def test_no_launcher_means_single_process(clean_env):
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")


def test_torchrun_variables_are_read(clean_env):
    for k, v in dict(
        RANK="5",
        LOCAL_RANK="1",
        WORLD_SIZE="8",
        LOCAL_WORLD_SIZE="4",
        GROUP_RANK="1",
        MASTER_ADDR="host-a",
        MASTER_PORT="23456",
    ).items():
        clean_env.setenv(k, v)
    env = detect_env()
    assert env.source == "torchrun"
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert (env.node_rank, env.master_addr, env.master_port, env.num_nodes) == (
        1,
        "host-a",
        23456,
        2,
    )


def _set_slurm_step(monkeypatch, procid: int, localid: int, nodeid: int) -> None:
    for k, v in dict(
        SLURM_JOB_ID="4242",
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(localid),
        SLURM_NODEID=str(nodeid),
        SLURM_NTASKS="6",
        SLURM_STEP_ID="0",
        SLURM_STEP_NUM_TASKS="6",
        SLURM_STEP_TASKS_PER_NODE="4,2",
        SLURM_JOB_NODELIST="gpu[007-008]",
        SLURM_STEP_NODELIST="gpu[007-008]",
    ).items():
        monkeypatch.setenv(k, v)


def test_slurm_step_variables_give_rank_master_and_port(clean_env):
    _set_slurm_step(clean_env, procid=5, localid=1, nodeid=1)
    env = detect_env()
    assert env.source == "slurm"
    assert (env.rank, env.local_rank, env.world_size, env.node_rank) == (5, 1, 6, 1)
    assert env.local_world_size == 2  # second node runs 2 of the 6 tasks
    assert env.master_addr == "gpu007"
    assert env.master_port == port_from_job_id("4242")


def test_torchrun_variables_win_over_slurm(clean_env):
    _set_slurm_step(clean_env, procid=5, localid=1, nodeid=1)
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    env = detect_env()
    assert (env.source, env.rank, env.world_size) == ("torchrun", 0, 1)


def test_slurm_batch_script_without_srun_step_is_single_process(clean_env):
    # The batch script of a 6-task allocation is one process: SLURM_NTASKS=6 must not
    # make it wait for 5 peers that will never come.
    _set_slurm_step(clean_env, procid=0, localid=0, nodeid=0)
    for name in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE"):
        clean_env.delenv(name)
    env = detect_env()
    assert (env.source, env.world_size) == ("single", 1)


def test_submitit_local_job_variables(clean_env):
    for k, v in dict(
        SUBMITIT_EXECUTOR="local",
        SUBMITIT_LOCAL_JOB_ID="777",
        SUBMITIT_LOCAL_NTASKS="3",
        SUBMITIT_LOCAL_JOB_NUM_NODES="1",
        SUBMITIT_LOCAL_NODEID="0",
        SUBMITIT_LOCAL_GLOBALID="2",
        SUBMITIT_LOCAL_LOCALID="2",
    ).items():
        clean_env.setenv(k, v)
    env = detect_env()
    assert env.source == "submitit-local"
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (2, 2, 3, 3)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", port_from_job_id("777"))


def test_submitit_slurm_job_takes_master_from_first_host(clean_env):
    _set_slurm_step(clean_env, procid=3, localid=3, nodeid=0)
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    clean_env.setenv("SLURM_JOB_NUM_NODES", "2")
    env = detect_env()
    assert env.source == "submitit-slurm"
    assert (env.rank, env.world_size, env.node_rank, env.local_world_size) == (3, 6, 0, 3)
    assert env.master_addr == "gpu007"
    assert env.master_port == port_from_job_id("4242")


def test_non_integer_rank_variable_is_named_in_the_error(clean_env):
    clean_env.setenv("RANK", "zero")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK='zero'"):
        detect_env()


# ---------------------------------------------------------------------------
# Slurm string formats


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
        ("n[1-2],gpu[001-002]", ["n1", "n2", "gpu001", "gpu002"]),
        ("a1,b[3,5],c", ["a1", "b3", "b5", "c"]),
        ("r[1-2]-n[8-9]", ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]),
        ("node[09-11].ib", ["node09.ib", "node10.ib", "node11.ib"]),
    ],
)
def test_nodelist_expands_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[1-2-3]"])
def test_malformed_nodelist_is_rejected_naming_it(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_tasks_per_node_expands_repeats():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("2(x)")


def test_port_from_job_id_is_stable_in_range_and_differs_between_jobs():
    ports = {port_from_job_id(j) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(
        distributed.PORT_BASE <= p < distributed.PORT_BASE + distributed.PORT_SPAN for p in ports
    )
    assert port_from_job_id("1234") == port_from_job_id(1234)
    assert distributed.PORT_BASE <= port_from_job_id("1234_7") < 32000  # array job ids


# ---------------------------------------------------------------------------
# Stop requests in this process


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in distributed.STOP_SIGNALS}
    distributed.clear_stop_request()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    distributed._previous.clear()
    distributed.clear_stop_request()


def test_stop_signal_sets_flag_and_keeps_previous_handler(restore_signals):
    seen = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    assert distributed.install_stop_handlers()
    assert distributed.install_stop_handlers()  # idempotent: ours is not its own predecessor
    assert not distributed.stop_requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert distributed.stop_requested()
    assert distributed.stop_signals() == [signal.SIGUSR2]
    assert seen == []  # deferred: the previous handler (submitit's) runs only when asked
    assert distributed.run_previous_handler(signal.SIGUSR2)
    assert seen == [signal.SIGUSR2]
    assert distributed.any_rank_stop_requested()  # single process: the local flag


def test_sigterm_requests_a_stop_instead_of_killing(restore_signals):
    distributed.install_stop_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    assert distributed.stop_signals() == [signal.SIGTERM]
    assert not distributed.run_previous_handler(signal.SIGTERM)  # default action: not callable


def test_requeue_exit_code_matches_submitit_local_requeue():
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    assert REQUEUE_EXIT_CODE == LOCAL_REQUEUE_RETURN_CODE


# ---------------------------------------------------------------------------
# Real process groups (gloo, separate processes)

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch, torch.distributed as dist
    from pimc_dist import distributed as d

    mode = sys.argv[1]
    d.install_stop_handlers()
    env = d.init_distributed(timeout_s=int(os.environ["TEST_TIMEOUT_S"]), backend="gloo")
    out = {"rank": env.rank, "world": env.world_size, "source": env.source,
           "exported": [os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]]}
    if mode == "sum":
        x = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(x)
        out["sum"] = x.item()
        out["main"] = d.is_main()
        out["stop_before"] = d.any_rank_stop_requested()
        if env.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told to stop
        out["stop_local"] = d.stop_requested()
        out["stop_all"] = d.any_rank_stop_requested()
        d.barrier()
        d.init_distributed(timeout_s=5)  # already joined: a no-op
        d.cleanup()
        out["after_cleanup"] = d.is_initialized()
    elif mode == "straggler":
        if env.rank == 0:
            t0 = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1))
                out["error"] = None
            except Exception as exc:
                out["error"] = str(exc)[:300]
            out["waited_s"] = time.monotonic() - t0
        else:
            time.sleep(float(os.environ["TEST_TIMEOUT_S"]) + 2)  # never joins the collective
    elif mode == "straggler_in_new_group":
        # A group made after init without a timeout, as DeepSpeed clones the world group
        # for its gradient reduction.
        group = dist.new_group(ranks=list(range(env.world_size)))
        if env.rank == 0:
            t0 = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1), group=group)
                out["error"] = None
            except Exception as exc:
                out["error"] = str(exc)[:300]
            out["waited_s"] = time.monotonic() - t0
        else:
            time.sleep(float(os.environ["TEST_TIMEOUT_S"]) + 2)
    print("RESULT " + json.dumps(out), flush=True)
    if mode.startswith("straggler"):
        # A group whose collective timed out cannot be torn down cleanly (gloo may abort
        # in its destructors): leave without running them.
        os._exit(0)
    """
)


def _launch_ranks(tmp_path: Path, mode: str, ranks: list[int], world: int, timeout_s: int):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in ranks:
        env = {
            k: v
            for k, v in os.environ.items()
            if not (k in LAUNCHER_NAMES or k.startswith(LAUNCHER_PREFIXES))
        }
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TEST_TIMEOUT_S=str(timeout_s),
            PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        results.append((proc.returncode, json.loads(lines[-1][7:]) if lines else None, stderr))
    return results


def test_two_gloo_ranks_all_reduce_and_agree_on_a_stop(tmp_path):
    results = _launch_ranks(tmp_path, "sum", [0, 1], world=2, timeout_s=60)
    for code, out, stderr in results:
        assert code == 0, stderr
        assert out["sum"] == 3.0
        assert out["world"] == 2 and out["source"] == "torchrun"
        assert out["stop_before"] is False
        assert out["stop_all"] is True  # rank 0 agrees although only rank 1 got the signal
        assert out["after_cleanup"] is False
    (_, r0, _), (_, r1, _) = results
    assert (r0["main"], r1["main"]) == (True, False)
    assert (r0["stop_local"], r1["stop_local"]) == (False, True)
    assert r0["exported"] == ["0", "2", "0"] and r1["exported"] == ["1", "2", "1"]


def test_collective_fails_after_timeout_when_a_rank_never_joins_it(tmp_path):
    results = _launch_ranks(tmp_path, "straggler", [0, 1], world=2, timeout_s=2)
    code, out, stderr = results[0]
    assert code == 0, stderr
    assert out["error"] is not None and "Timed out" in out["error"]
    assert out["waited_s"] < 30


def test_groups_made_after_init_time_out_like_the_world_group(tmp_path):
    results = _launch_ranks(tmp_path, "straggler_in_new_group", [0, 1], world=2, timeout_s=2)
    code, out, stderr = results[0]
    assert code == 0, stderr
    assert out["error"] is not None and "Timed out" in out["error"]
    assert out["waited_s"] < 30


def test_init_fails_after_timeout_when_a_rank_never_starts(tmp_path):
    [(code, out, stderr)] = _launch_ranks(tmp_path, "sum", [0], world=2, timeout_s=3)
    assert code != 0 and out is None
    assert "1/2 clients joined" in stderr or "Timed out" in stderr
