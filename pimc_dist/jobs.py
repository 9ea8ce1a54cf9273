"""Submitit jobs: the job every task runs, the executor, submission and following a job.

Everything about submitit lives here (as in DINOv2's run/submit.py): the executor
parameters, the job folder, requeueing. Each job is an `EntryJob` that, on every
task, calls the same `main(cfg)` a local run calls, and whose `checkpoint()`
returns a resubmission of itself. The command line is `pimc_dist.launch`; the
sweep and the quickstart submit through this module too.

One task per GPU (`launch.gpus_per_node`), or `launch.tasks_per_node` CPU ranks
where there is no GPU. Rank, world size, master address (first host of the job)
and port (derived from the job id) are read inside each task by
`pimc_dist.distributed`. Outputs: the run folder `train.run_dir` holds
config.yaml (saved before submission), slurm/<job id>/ (submitit's scripts,
pickles and one log per rank), checkpoints and wandb/.

Requeue on timeout or preemption: Slurm sends submitit's signal (USR2 by default)
`launch.signal_delay_s` before the time limit. Every rank's stop handler
(`distributed.install_stop_handlers`) only sets a flag; the training loop sees
it at its next step through `distributed.any_rank_stop_requested()`, saves a
checkpoint and returns `REQUEUE_EXIT_CODE`; `EntryJob` then hands over to
submitit's handler on rank 0, which calls `checkpoint()` (a resubmission, or
None after `launch.max_requeues` requeues) and requeues the job. The requeued
job runs `main(cfg)` again, which resumes from the latest checkpoint.

The ranks agree on which signals arrived (on any rank) when they stop, so they take one
decision. SIGTERM and Ctrl-C (SIGINT, a job module with `STOPS_ON_SIGNAL = True`) requeue
nothing: every rank returns a `Stopped` result, and `wait_for` reports "stopped at step N,
checkpoint saved; rerun the same command to resume" with exit status 128 + the signal.
Ctrl-C on `launch --wait` of a local job stops it that way (`stop_local_job`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch
from omegaconf import DictConfig
from submitit import LocalExecutor, SlurmExecutor
from submitit.core.utils import FailedJobError, pickle_load

from pimc_dist import config, distributed
from pimc_dist.distributed import REQUEUE_EXIT_CODE

# launch.* keys that only mean something to Slurm.
SLURM_ONLY_KEYS = ("partition", "account", "qos", "constraint", "exclude")

# Slurm states after which a job will not run again by itself. (PREEMPTED is left
# out: a preempted job that Slurm requeues passes through it.)
SLURM_FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    """The job cannot be submitted as asked (bad flags, missing Slurm, unknown job kind)."""


@dataclass(frozen=True)
class Stopped:
    """A task's result when its job stopped on a signal that asks for no requeue (SIGTERM,
    Ctrl-C): it saved a checkpoint at `step` and exited; rerunning the command resumes."""

    rank: int
    step: int | None
    signals: tuple[str, ...]

    def describe(self) -> str:
        at = f"at step {self.step}" if self.step is not None else "at a step boundary"
        on = ", ".join(self.signals) or "a signal"
        return f"stopped {at} on {on}, checkpoint saved; rerun the same command to resume"


@dataclass(frozen=True)
class Failed:
    """A task's result when its job stopped on an error whose message says it all (its
    module's USER_ERRORS: a run folder in use, a refused config, damaged shards): the message
    and the exit status the job's own command line gives, instead of a traceback."""

    rank: int
    message: str
    status: int


def user_error_status(main: Callable[..., Any], exc: BaseException) -> int | None:
    """The exit status of `exc` when `main`'s module lists it in USER_ERRORS, else None."""
    table = getattr(sys.modules.get(main.__module__), "USER_ERRORS", {})
    return next((code for kind, code in table.items() if isinstance(exc, kind)), None)


def handles_stops(main: Callable[..., Any]) -> bool:
    """Whether a job's main stops at a step boundary on SIGTERM/SIGINT, saving a checkpoint
    (its module sets `STOPS_ON_SIGNAL = True`); other jobs are simply ended by Ctrl-C."""
    return bool(getattr(sys.modules.get(main.__module__), "STOPS_ON_SIGNAL", False))


# ---------------------------------------------------------------------------
# The job every task runs


class EntryJob:
    """One submitted job: runs `main(cfg)` on each task; requeues itself after a stop.

    Picklable (submitit ships it to the tasks): it holds the resolved config as YAML
    text, so a requeued job runs exactly the config that was validated at submission,
    and `main` (a job module's `main`, e.g. `pimc_dist.pretrain.main`) by its name.
    """

    def __init__(
        self, kind: str, cfg_yaml: str, main: Callable[[DictConfig], int], requeues: int = 0
    ):
        self.kind = kind
        self.main = main  # a module-level function: pickled by name, imported by the task
        self.cfg_yaml = cfg_yaml
        self.requeues = requeues

    def config(self) -> DictConfig:
        return config.from_yaml_text(self.cfg_yaml, f"config of the {self.kind} job")

    def __call__(self) -> int:
        cfg = self.config()
        dropped = distributed.forget_inherited_ranks()
        if dropped:
            print(f"[launch] ignoring inherited {', '.join(dropped)}: submitit places this task")
        env = distributed.detect_env()
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        # Slurm's node name (several slurmd may share one host); the host name elsewhere.
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(
            f"[launch] {self.kind} rank {env.rank}/{env.world_size} (local {env.local_rank}, "
            f"node {env.node_rank} {host}) from {env.source}; requeues {self.requeues}, "
            f"Slurm restarts {restarts}",
            flush=True,
        )
        # After submitit's own handlers, so that ours defer its requeue to a step boundary.
        # A job that stops at step boundaries takes Ctrl-C (SIGINT) as a stop request too.
        extra = (signal.SIGINT,) if handles_stops(self.main) else ()
        distributed.install_stop_handlers((*distributed.STOP_SIGNALS, *extra))
        try:
            code = int(self.main(cfg) or 0)
        except Exception as exc:
            status = user_error_status(self.main, exc)
            if status is None:  # unexpected: submitit keeps the traceback
                raise
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return Failed(env.rank, str(exc), status)
        if code == REQUEUE_EXIT_CODE:
            return self._after_stop(env.rank, cfg)
        if code != 0:
            raise RuntimeError(
                f"{self.main.__module__}.main exited with status {code} on rank {env.rank}"
            )
        return 0

    def _after_stop(self, rank: int, cfg: DictConfig) -> Any:
        """main() saved a checkpoint and stopped on a signal. Every rank sees the same signals
        (agreed over ranks when they stopped): a requeue signal makes rank 0 requeue the job;
        SIGTERM or Ctrl-C alone requeue nothing, and each rank returns a `Stopped` result."""
        received = distributed.job_stop_signals()
        names = tuple(signal.Signals(s).name for s in received)
        step = distributed.stopped_at_step()
        at = f" at step {step}" if step is not None else ""
        if not distributed.requeue_requested():
            # SIGTERM/SIGINT: a local stop (nothing requeues a local job), or Slurm itself
            # ending (scancel) or requeueing (scontrol requeue, preemption) this job.
            stopped = Stopped(rank, step, names)
            print(f"[launch] rank {rank} {stopped.describe()}", flush=True)
            return stopped
        if rank != 0:
            print(
                f"[launch] rank {rank} stopped{at} (signals: {', '.join(names)}); rank 0 requeues",
                flush=True,
            )
            return REQUEUE_EXIT_CODE
        print(
            f"[launch] stopped{at} on {', '.join(names)} after saving a checkpoint; requeueing "
            f"({self.requeues}/{cfg.launch.max_requeues} requeues so far)",
            flush=True,
        )
        # submitit's handler calls self.checkpoint(), requeues the job and exits; or raises
        # when checkpoint() returned None (cap reached) or the job timed out too often.
        usr_sig = submitit.JobEnvironment._usr_sig()
        if not distributed.run_previous_handler(usr_sig):
            raise RuntimeError(
                f"cannot requeue: no submitit handler for {signal.Signals(usr_sig).name}; "
                "resubmit the same command to resume from the latest checkpoint"
            )
        return REQUEUE_EXIT_CODE

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on requeue: this job again (it resumes), or None past the cap."""
        max_requeues = self.config().launch.max_requeues
        if self.requeues >= max_requeues:
            print(
                f"[launch] not requeueing: {self.requeues} requeues done "
                f"(launch.max_requeues={max_requeues}); resubmit to resume",
                flush=True,
            )
            return None
        again = type(self)(self.kind, self.cfg_yaml, self.main, self.requeues + 1)
        return submitit.helpers.DelayedSubmission(again)

    def __repr__(self) -> str:
        return f"EntryJob({self.kind}, requeues={self.requeues})"


# ---------------------------------------------------------------------------
# Resolving what to run where


def parse_time_minutes(text: str) -> int:
    """Slurm time limit ('M', 'M:S', 'H:M:S', 'D-H', 'D-H:M', 'D-H:M:S') in whole minutes."""
    raw = str(text).strip()
    days = 0
    rest = raw
    if "-" in raw:
        day_text, rest = raw.split("-", 1)
        if not day_text.isdigit():
            raise ValueError(f"bad time limit '{raw}'")
        days = int(day_text)
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise ValueError(f"bad time limit '{raw}' (use HH:MM:SS, MM, or D-HH:MM:SS)")
    values = [int(p) for p in parts]
    if "-" in raw:  # D-H, D-H:M, D-H:M:S
        values += [0] * (3 - len(values))
        hours, minutes, seconds = values
    elif len(values) == 1:
        hours, minutes, seconds = 0, values[0], 0
    elif len(values) == 2:
        hours, (minutes, seconds) = 0, values
    else:
        hours, minutes, seconds = values
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"time limit '{raw}' must be positive")
    return math.ceil(total / 60)


def validate_launch(cfg: DictConfig) -> None:
    """Check the launch section beyond types; a ConfigError names the key."""
    launch = cfg.launch

    def bad(key: str, why: str) -> config.ConfigError:
        return config.ConfigError(f"invalid key 'launch.{key}': {why}")

    if launch.cluster not in ("auto", "slurm", "local"):
        raise bad("cluster", f"'{launch.cluster}' is not one of auto, slurm, local")
    for key, low in (
        ("nodes", 1),
        ("gpus_per_node", 0),
        ("tasks_per_node", 1),
        ("cpus_per_task", 1),
        ("max_requeues", 0),
        ("signal_delay_s", 0),
    ):
        if launch[key] < low:
            raise bad(key, f"{launch[key]} is below {low}")
    try:
        minutes = parse_time_minutes(launch.time)
    except ValueError as exc:
        raise bad("time", str(exc)) from None
    if launch.signal_delay_s >= minutes * 60:
        raise bad("signal_delay_s", f"{launch.signal_delay_s} s is not shorter than the time limit")
    if launch.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(launch.mem), re.IGNORECASE):
        raise bad("mem", f"'{launch.mem}' is not a Slurm memory size like 64G or 4000M")


def slurm_available() -> bool:
    """sbatch is on PATH and the controller answers."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def resolve_cluster(requested: str) -> str:
    """'auto' -> 'slurm' when a reachable Slurm is here, else 'local'."""
    if requested == "auto":
        return "slurm" if slurm_available() else "local"
    return requested


def tasks_per_node(cfg: DictConfig) -> int:
    """One task per GPU, or launch.tasks_per_node CPU ranks."""
    return cfg.launch.gpus_per_node or cfg.launch.tasks_per_node


def load_job_config(
    config_path: str | None, overrides: list[str], cwd: Path | None = None
) -> DictConfig:
    """config.load plus launch checks; a relative run folder becomes absolute (jobs may start elsewhere)."""
    cfg = config.load(config_path, overrides)
    validate_launch(cfg)
    run_dir = Path(cfg.train.run_dir)
    if not run_dir.is_absolute():
        run_dir = (cwd or Path.cwd()) / run_dir
        cfg = config.load(config_path, [*overrides, f"train.run_dir={config.quote(run_dir)}"])
    return cfg


def slurm_parameters(cfg: DictConfig, kind: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names) for this job."""
    launch = cfg.launch
    params: dict[str, Any] = {
        "job_name": f"{cfg.name}-{kind}",
        "time": parse_time_minutes(launch.time),
        "nodes": launch.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": launch.cpus_per_task,
        "signal_delay_s": launch.signal_delay_s,
        "stderr_to_stdout": True,
        # Tasks unpickle pimc_dist objects: make the package importable even when it is
        # used from a checkout rather than installed.
        # OpenMP threads per task: its own cores, not the whole node's (torch's default),
        # unless the user set OMP_NUM_THREADS.
        "setup": [
            f"export PYTHONPATH={PACKAGE_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
        ],
        "additional_parameters": {"requeue": True},
    }
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    for key in ("mem", *SLURM_ONLY_KEYS):
        if launch[key] is not None:
            params[key] = str(launch[key])
    return params


def local_parameters(cfg: DictConfig, kind: str) -> dict[str, Any]:
    """submitit LocalExecutor parameters for this job."""
    launch = cfg.launch
    return {
        "timeout_min": parse_time_minutes(launch.time),
        "tasks_per_node": tasks_per_node(cfg),
        "gpus_per_node": launch.gpus_per_node,
        "signal_delay_s": launch.signal_delay_s,
        "stderr_to_stdout": True,
    }


def _origin(cfg: DictConfig, key: str, given: dict[str, str], config_path: str | None) -> str:
    """Where a launch value came from, as the user would write it."""
    value = cfg.launch[key]
    if key in given:
        return f"{given[key]} (command line)"
    return f"launch.{key}: {value} in {config_path}" if config_path else f"launch.{key}={value}"


def check_cluster_fits(
    cfg: DictConfig, cluster: str, given: dict[str, str], config_path: str | None = None
) -> None:
    """Refuse Slurm-only options, several nodes and absent GPUs when running locally.

    `given`: the launch keys set on the command line (`given_on_command_line`), so that
    an error names where a value came from: a flag, a key=value, or the config file.
    """
    if cluster == "slurm":
        return
    why_local = f"--cluster {cfg.launch.cluster}" + (
        ", no reachable Slurm here" if cfg.launch.cluster == "auto" else ""
    )
    explicit = [k for k in SLURM_ONLY_KEYS if k in given and cfg.launch[k] is not None]
    from_file = [k for k in SLURM_ONLY_KEYS if k not in given and cfg.launch[k] is not None]
    if from_file:
        keys = ", ".join(f"launch.{k}" for k in from_file)
        print(f"launch: note: {keys} from the config do not apply to a local run", file=sys.stderr)
    if explicit:
        flags = ", ".join(f"--{k}" for k in explicit)
        raise LaunchError(f"{flags} only apply to Slurm, but the job runs locally ({why_local})")
    if cfg.launch.nodes > 1:
        raise LaunchError(
            f"{_origin(cfg, 'nodes', given, config_path)}: a local run uses one node "
            f"({why_local}); use --nodes 1 --tasks-per-node N for N ranks here, or run where "
            "Slurm is"
        )
    if cfg.launch.gpus_per_node:
        have = torch.cuda.device_count()
        if cfg.launch.gpus_per_node > have:
            raise LaunchError(
                f"{_origin(cfg, 'gpus_per_node', given, config_path)}: this machine has {have} "
                f"GPU(s) and the job runs here ({why_local}). Run on CPU ranks with "
                f"--gpus-per-node 0 --tasks-per-node {cfg.launch.tasks_per_node} (in a YAML: "
                "launch.gpus_per_node: 0), or submit with --cluster slurm where there are GPUs"
            )


def job_folder(cfg: DictConfig) -> Path:
    """submitit's folder for this run's jobs; %j becomes the job id."""
    return Path(cfg.train.run_dir) / "slurm" / "%j"


def _slurm_executor(folder: Path, render_only: bool) -> Any:
    if render_only and shutil.which("srun") is None:
        # SlurmExecutor refuses to exist without srun; rendering a script does not need it.
        class _Renderer(SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:
                return 2

        return _Renderer(folder=folder)
    return SlurmExecutor(folder=folder)


def make_executor(cfg: DictConfig, kind: str, cluster: str, render_only: bool = False) -> Any:
    """The submitit executor for this job, parameters set."""
    folder = job_folder(cfg)
    if cluster == "slurm":
        executor = _slurm_executor(folder, render_only)
        executor.max_num_timeout = cfg.launch.max_requeues
        executor.update_parameters(**slurm_parameters(cfg, kind))
    else:
        executor = LocalExecutor(folder=folder)
        executor.max_num_timeout = cfg.launch.max_requeues
        executor.update_parameters(**local_parameters(cfg, kind))
    return executor


def render_sbatch(cfg: DictConfig, kind: str) -> str:
    """The sbatch script submitit would submit for this job."""
    executor = make_executor(cfg, kind, "slurm", render_only=True)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ---------------------------------------------------------------------------
# Submission and following


@dataclass
class Submitted:
    """Where a submitted job and its outputs are."""

    kind: str
    cluster: str
    job_id: str
    num_tasks: int
    run_dir: Path
    config_path: Path
    folder: Path
    job: Any  # the submitit Job
    graceful: bool = False  # its ranks stop at a step boundary on SIGTERM/Ctrl-C (handles_stops)

    def log_path(self, rank: int = 0) -> Path:
        return self.folder / f"{self.job_id}_{rank}_log.out"


def submit(cfg: DictConfig, job: EntryJob, cluster: str) -> Submitted:
    """Save the config in the run folder and submit the job; returns where everything goes."""
    kind = job.kind
    if cluster not in ("slurm", "local"):
        raise LaunchError(f"cluster must be slurm or local here, got '{cluster}'")
    if cluster == "slurm" and not slurm_available():
        raise LaunchError(
            "--cluster slurm: no reachable Slurm here (sbatch/sinfo missing or failing)"
        )
    run_dir = Path(cfg.train.run_dir)
    config_path = config.save_run_config(cfg, run_dir)
    executor = make_executor(cfg, kind, cluster)
    if cluster == "local":
        # The local controller inherits this environment; tasks unpickle pimc_dist objects.
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = (
            f"{PACKAGE_ROOT}{os.pathsep}{path}" if path else str(PACKAGE_ROOT)
        )
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.launch.cpus_per_task))
        # A port known free now, rather than one derived from the local job id (a pid),
        # which can land on a port another process on this machine holds.
        os.environ["MASTER_PORT"] = str(distributed.free_port())
    try:
        if cluster == "local" and handles_stops(job.main):
            # Ctrl-C reaches the whole terminal process group. submitit's local controller
            # would die of it and SIGKILL the ranks mid-step; it ignores SIGINT instead (an
            # ignored signal stays ignored across fork and exec), the ranks take it as a
            # stop request, and `stop_local_job` stops them as SIGTERM does.
            with _sigint_ignored():
                submitted = executor.submit(job)
        else:
            submitted = executor.submit(job)
    except FailedJobError as exc:  # sbatch refused the job (e.g. no such GPU resource)
        raise LaunchError(_sbatch_refusal(cfg, str(exc))) from None
    folder = Path(str(job_folder(cfg)).replace("%j", str(submitted.job_id)))
    return Submitted(
        kind=kind,
        cluster=cluster,
        job_id=str(submitted.job_id),
        num_tasks=cfg.launch.nodes * tasks_per_node(cfg),
        run_dir=run_dir,
        config_path=config_path,
        folder=folder,
        job=submitted,
        graceful=handles_stops(job.main),
    )


@contextlib.contextmanager
def _sigint_ignored() -> Any:
    """SIGINT ignored in this process meanwhile (children started now inherit that)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_local_job(sub: Submitted) -> bool:
    """Stop a local job as SIGTERM does (each rank saves a checkpoint at its next step, then
    exits): SIGTERM to submitit's controller, which passes it on to the ranks. False if the
    job does not stop that way (its ranks were ended with the controller by Ctrl-C)."""
    process = getattr(sub.job, "_process", None)
    if sub.cluster != "local" or not sub.graceful or process is None or process.poll() is not None:
        return False
    process.send_signal(signal.SIGTERM)
    return True


def _sbatch_refusal(cfg: DictConfig, message: str) -> str:
    """One line for a submission sbatch refused, naming the launch key it most likely is."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    said = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
    low = message.lower()
    if "generic resource" in low or "gres" in low:
        key = "launch.gpus_per_node"
        hint = (
            f"{cfg.launch.gpus_per_node} GPU(s) per node asked for, but the partition "
            f"({cfg.launch.partition or 'default'}) has no such GPUs; use --gpus-per-node 0 "
            "for CPU ranks or pick a GPU partition with --partition"
        )
    elif "partition" in low:
        key, hint = "launch.partition", "pick a partition that exists (sinfo lists them)"
    elif "account" in low or "qos" in low:
        key, hint = "launch.account", "check --account and --qos (sacctmgr show assoc user=$USER)"
    elif "time limit" in low:
        key, hint = "launch.time", "ask for less time than the partition's limit"
    else:
        key, hint = "launch", "check the launch.* settings (--dry-run prints the sbatch script)"
    return (
        f"sbatch refused the job, nothing submitted: invalid key '{key}': {hint} (sbatch: {said})"
    )


def slurm_job_info(job_id: str) -> dict[str, str] | None:
    """scontrol's fields for a job (state, exit code, restarts), or None once Slurm forgot it."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "JobState=" not in out.stdout:
        return None
    info = {}
    for item in out.stdout.split():
        key, sep, value = item.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def task_outcomes(sub: Submitted) -> list[tuple[str, Any]]:
    """Per task: ('success', value), ('error', traceback) or ('missing', None) from submitit's pickles."""
    outcomes = []
    for rank in range(sub.num_tasks):
        path = sub.folder / f"{sub.job_id}_{rank}_result.pkl"
        try:
            outcomes.append(tuple(pickle_load(path)))
        except FileNotFoundError:
            outcomes.append(("missing", None))
        except Exception as exc:  # a truncated pickle from a killed task
            outcomes.append(("error", f"unreadable result file {path}: {exc}"))
    return outcomes


class LogFollower:
    """Prints what a growing log file gained since the last call."""

    def __init__(self, path: Path, out: Any = None):
        self.path = path
        self.offset = 0
        self.out = out or sys.stdout

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.out.write(data.decode(errors="replace"))
            self.out.flush()


def wait_for(sub: Submitted, poll_s: float = 1.0) -> int:
    """Follow rank 0's log until the job ends; its exit status (0 = every task succeeded)."""
    follower = LogFollower(sub.log_path(0))
    state = "PENDING"
    while True:
        follower.poll()
        if sub.cluster == "slurm":
            info = slurm_job_info(sub.job_id)
            if info is None:
                state = "GONE"
                break
            state = info.get("JobState", "UNKNOWN")
            if state in SLURM_FINAL_STATES:
                break
        else:
            state = sub.job.get_info().get("jobState", "UNKNOWN")
            if state in ("FINISHED", "INTERRUPTED", "NO PROCESS AND NO RESULT"):
                break
        time.sleep(poll_s)
    time.sleep(poll_s)
    follower.poll()
    if sub.cluster == "local":
        # submitit's local controller also creates the job folder with a literal %j; drop it.
        literal = sub.folder.parent / "%j"
        if literal.is_dir() and not any(literal.iterdir()):
            literal.rmdir()
    outcomes = task_outcomes(sub)
    failed = [r for r, (kind, _) in enumerate(outcomes) if kind != "success"]
    stopped = [v for kind, v in outcomes if kind == "success" and isinstance(v, Stopped)]
    refused = [v for kind, v in outcomes if kind == "success" and isinstance(v, Failed)]
    if sub.cluster == "slurm" and info is not None:
        code, _, sig = info.get("ExitCode", "0:0").partition(":")
        status = int(code) or (128 + int(sig) if sig.isdigit() and int(sig) else 0)
        if state != "COMPLETED" and status == 0:
            status = 1
    else:
        status = 1 if failed else 0
    for rank in failed:
        kind, detail = outcomes[rank]
        if kind == "error":
            print(f"--- rank {rank} failed:\n{str(detail)[-3000:]}", file=sys.stderr)
        elif status:
            print(f"--- rank {rank} left no result; see {sub.log_path(rank)}", file=sys.stderr)
    if refused:
        # Rank 0's message is in the log followed above; another rank's alone is not.
        for other in {f.message: f for f in refused if f.rank != 0}.values():
            print(f"--- rank {other.rank}: error: {other.message}", file=sys.stderr)
        status = max(status, *(f.status for f in refused))
        print(f"[launch] job {sub.job_id} failed (exit status {status})")
        return status
    if stopped:
        # No requeue follows (SIGTERM, Ctrl-C): the run is unfinished, whatever the state.
        first = stopped[0]
        sig = first.signals[0] if first.signals else "SIGTERM"
        status = status or 128 + int(getattr(signal.Signals, sig, signal.SIGTERM))
        print(f"[launch] job {sub.job_id} {first.describe()} (exit status {status})")
        return status
    print(f"[launch] job {sub.job_id} ended: {state}, exit status {status}")
    return status


def wandb_runs(run_dir: Path) -> list[Path]:
    """The W&B run folders under <run_dir>/wandb (offline-run-<time>-<id>, run-<time>-<id>), oldest first."""
    folder = run_dir / "wandb"
    runs = [*folder.glob("offline-run-*"), *folder.glob("run-*")]
    return sorted((p for p in runs if p.is_dir()), key=lambda p: p.name.split("run-", 1)[1])


def describe_wandb(cfg: DictConfig, run_dir: Path) -> str:
    """The run's W&B run as far as it is known: its id and path, or where it will be."""
    if not cfg.tracking.wandb or cfg.tracking.mode == "disabled":
        return (
            "off (tracking.wandb=false or tracking.mode=disabled); metrics.jsonl in the run folder"
        )
    runs = wandb_runs(run_dir)
    if not runs:
        return (
            f"{run_dir / 'wandb'} ({cfg.tracking.mode}; the run id is chosen when the job "
            "starts, and a requeued job continues the same run)"
        )
    latest = runs[-1]
    run_id = latest.name.rsplit("-", 1)[1]
    if latest.name.startswith("offline-"):
        return f"offline run {run_id} (the latest there): {latest} (upload: wandb sync {latest})"
    entity = cfg.tracking.entity or "<your default entity>"
    return f"run {entity}/{cfg.tracking.project}/{run_id} (files: {latest})"


def print_submitted(sub: Submitted, cfg: DictConfig, tracked: bool) -> None:
    """Where the job went: run folder, config, logs, W&B, and how to watch or cancel it."""
    where = "Slurm" if sub.cluster == "slurm" else "this machine (submitit LocalExecutor)"
    print(f"[launch] submitted {sub.kind} job {sub.job_id} to {where}: {sub.num_tasks} task(s)")
    print(f"  run folder: {sub.run_dir}")
    print(f"  config:     {sub.config_path}")
    print(f"  logs:       {sub.log_path(0)} (rank 0; rank r: {sub.job_id}_<r>_log.out)")
    if tracked:
        print(f"  W&B:        {describe_wandb(cfg, sub.run_dir)}")
    if sub.cluster == "slurm":
        print(f"  watch:      squeue -j {sub.job_id}; tail -f {sub.log_path(0)}")
        print(f"  cancel:     scancel {sub.job_id}")
    sys.stdout.flush()
