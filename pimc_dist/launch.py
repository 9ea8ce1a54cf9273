"""Run a job on Slurm through submitit, or locally through the same code path.

    python -m pimc_dist.launch --nodes 4 --gpus-per-node 8 --config configs/pretrain/pimc.yaml
    python -m pimc_dist.launch diagnose --nodes 2 --wait          # cluster sanity check
    python -m pimc_dist.launch --cluster local --tasks-per-node 2 --config configs/pretrain/tiny.yaml --wait
    python -m pimc_dist.launch --dry-run --nodes 2 --config ... train.lr=3e-4

The command line of `pimc_dist.jobs` (executor, job folder, requeue, following):
the flags, the job kinds, and the checks made before anything is submitted.
With no arguments at all it runs the built-in quickstart.

Before anything is submitted the launcher checks the config (schema, then the
job's own `check_config`: shards present, a run folder that holds no other run),
a W&B key when `tracking.mode=online`, and, for a local run, that the job fits
this machine (one node, no more GPUs than it has); each error says what to do.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from omegaconf import DictConfig

from pimc_dist import (
    checks,
    config,
    diagnose,
    finetune,  # the runner: its check_config adds the leak guard (pimc_dist/eval/leakage.py)
    jobs,
    pretrain,
    quickstart,
    run_lock,
    shard,
    sweep,
    tracking,
)
from pimc_dist.jobs import SLURM_ONLY_KEYS, EntryJob, LaunchError

# Job kind -> module whose `main(cfg: DictConfig) -> int` runs on every task.
KINDS: dict[str, ModuleType] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "sweep": sweep,
    "shard": shard,
    "diagnose": diagnose,
}
DEFAULT_KIND = "pretrain"

# launch.* keys that have a command-line flag of their own.
FLAG_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "cluster")
# Job kinds that log to W&B.
TRACKED_KINDS = ("pretrain", "finetune", "sweep")
# Job kinds whose run folder (train.run_dir) one job at a time may use (pimc_dist.run_lock).
RUN_FOLDER_KINDS = ("pretrain", "finetune")


def precheck(kind: str, cfg: DictConfig) -> None:
    """The config check every job shares (`checks.check_values`), then the job module's own
    `check_config(cfg)`, if it has one, before anything is submitted."""
    checks.check_values(cfg)
    if kind in RUN_FOLDER_KINDS:
        try:  # before anything is written into a folder another job is using
            run_lock.check_free(cfg.train.run_dir)
        except run_lock.RunFolderLocked as exc:
            raise LaunchError(f"{kind} job refused, nothing submitted: {exc}") from None
    check = getattr(KINDS[kind], "check_config", None)
    if not callable(check):
        return
    try:
        check(cfg)
    except config.ConfigError:
        raise
    except Exception as exc:  # e.g. the run folder holds a different run
        raise LaunchError(f"{kind} job refused, nothing submitted: {exc}") from exc


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Command-line flags as config overrides (they win over the file and key=value)."""
    out = []
    for key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task"):
        if getattr(args, key) is not None:
            out.append(f"launch.{key}={getattr(args, key)}")
    for key in ("cluster", "mem", "time", *SLURM_ONLY_KEYS):
        if getattr(args, key) is not None:
            out.append(f"launch.{key}={config.quote(getattr(args, key))}")
    if args.name is not None:
        out.append(f"name={config.quote(args.name)}")
    return out


def given_on_command_line(args: argparse.Namespace, overrides: list[str]) -> dict[str, str]:
    """launch.* keys set on the command line -> how they were given (the flag wins)."""
    given = {}
    for key in (*FLAG_KEYS, *SLURM_ONLY_KEYS):
        if getattr(args, key) is not None:
            given[key] = f"--{key.replace('_', '-')} {getattr(args, key)}"
    for item in overrides:
        name = item.split("=", 1)[0]
        if name.startswith("launch."):
            given.setdefault(name.removeprefix("launch."), item)
    return given


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.launch",
        description=(
            "Submit a job (pretrain, finetune, sweep, shard or diagnose) to Slurm through "
            "submitit, or run it locally the same way. Flags override the config's launch.* "
            "values; key=value arguments override any config key."
        ),
        epilog=(
            "examples:\n"
            "  python -m pimc_dist.launch --nodes 4 --gpus-per-node 8 "
            "--config configs/pretrain/pimc.yaml\n"
            "  python -m pimc_dist.launch diagnose --nodes 2 --wait\n"
            "  python -m pimc_dist.launch --cluster local --tasks-per-node 2 --wait "
            "--config configs/pretrain/tiny.yaml train.total_samples=2000\n"
            "  python -m pimc_dist.launch --dry-run --nodes 2 --partition gpu "
            "--config configs/pretrain/pimc.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "words",
        nargs="*",
        metavar="[KIND] [key=value ...]",
        help=f"job kind ({', '.join(KINDS)}; default {DEFAULT_KIND}), then config overrides",
    )
    parser.add_argument("--config", help="job YAML (e.g. configs/pretrain/pimc.yaml)")
    parser.add_argument("--nodes", type=int, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    parser.add_argument("--tasks-per-node", type=int, help="CPU ranks per node when no GPUs")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per task (data workers + 1)")
    parser.add_argument("--mem", help="memory per node, e.g. 64G")
    parser.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--qos", help="Slurm quality of service")
    parser.add_argument("--constraint", help="Slurm node features, e.g. a100")
    parser.add_argument("--exclude", help="Slurm nodes to avoid, e.g. gpu[001-002]")
    parser.add_argument("--cluster", choices=("auto", "slurm", "local"), help="default: auto")
    parser.add_argument("--name", help="run name (the run folder is runs/<name> by default)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the config and sbatch script; submit nothing"
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow rank 0's log until the job ends"
    )
    return parser


def split_words(words: list[str]) -> tuple[str, list[str]]:
    """'[kind] key=value ...' -> (kind, overrides)."""
    kind = DEFAULT_KIND
    if words and "=" not in words[0]:
        kind = words[0]
        words = words[1:]
        if kind not in KINDS:
            raise LaunchError(f"unknown job kind '{kind}'; choose one of: {', '.join(KINDS)}")
    for word in words:
        if "=" not in word:
            raise LaunchError(f"'{word}' is not a key=value override")
    return kind, list(words)


def main(argv: list[str] | None = None) -> int:
    if not (sys.argv[1:] if argv is None else argv):
        # No arguments at all: the built-in quickstart (shard, pretrain on 2 local ranks, evaluate).
        return quickstart.main([])
    parser = build_parser()
    # Intermixed: the kind and key=value words may come before, between or after flags.
    args = parser.parse_intermixed_args(argv)
    try:
        kind, overrides = split_words(args.words)
        cfg = jobs.load_job_config(args.config, [*overrides, *flag_overrides(args)])
        if kind in TRACKED_KINDS:
            tracking.check_wandb(cfg)
        precheck(kind, cfg)
        # An explicit --cluster slurm renders its script in a dry run even where Slurm is absent.
        cluster = jobs.resolve_cluster(cfg.launch.cluster)
        jobs.check_cluster_fits(cfg, cluster, given_on_command_line(args, overrides), args.config)
        submit_jobs = getattr(KINDS[kind], "submit_jobs", None)
        if callable(submit_jobs):
            # A kind that submits its own jobs (a sweep: one job array) runs here, not as a job.
            return int(submit_jobs(cfg, cluster, dry_run=args.dry_run))
        if args.dry_run:
            return _dry_run(cfg, kind, cluster)
        sub = jobs.submit(cfg, EntryJob(kind, config.to_yaml(cfg), KINDS[kind].main), cluster)
    except config.ConfigError as exc:
        print(f"launch: invalid config, nothing submitted: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    tracked = kind in TRACKED_KINDS
    jobs.print_submitted(sub, cfg, tracked)
    if not args.wait:
        return 0
    try:
        code = jobs.wait_for(sub)
    except KeyboardInterrupt:
        code = _interrupted(sub)
    if tracked:
        print(f"  W&B:        {jobs.describe_wandb(cfg, sub.run_dir)}")
    return code


def _interrupted(sub: jobs.Submitted) -> int:
    """Ctrl-C while following. A local job that stops at step boundaries is stopped as SIGTERM
    stops it (checkpoint, then exit) and followed to its end; a second Ctrl-C stops following.
    Other local jobs end with the terminal's Ctrl-C; a Slurm job keeps running."""
    if sub.cluster == "slurm":
        print(
            f"\n[launch] stopped following; Slurm job {sub.job_id} keeps running "
            f"(scancel {sub.job_id} stops it)",
            file=sys.stderr,
        )
        return 130
    if not jobs.stop_local_job(sub):
        print(f"\n[launch] Ctrl-C: local job {sub.job_id} interrupted", file=sys.stderr)
        return 130
    print(
        f"\n[launch] Ctrl-C: stopping job {sub.job_id}: each rank saves a checkpoint at its next "
        "step, then exits (Ctrl-C again to stop at once, without one)",
        file=sys.stderr,
        flush=True,
    )
    try:
        code = jobs.wait_for(sub)
    except KeyboardInterrupt:
        print(
            f"\n[launch] stopped following; job {sub.job_id} may still be stopping", file=sys.stderr
        )
        return 130
    return 130 if code else 0  # 0: it had finished before it could stop


def _dry_run(cfg: DictConfig, kind: str, cluster: str) -> int:
    print(f"# resolved config ({kind} job, cluster {cluster}); nothing submitted")
    print(config.to_yaml(cfg))
    if cluster == "slurm":
        print("# sbatch script submitit would submit (%j = job id)")
        print(jobs.render_sbatch(cfg, kind))
        return 0
    if cfg.launch.cluster == "auto":
        print(
            "# --cluster auto: no reachable Slurm here (sbatch/sinfo missing or failing), so this "
            "job would run on this machine, not on Slurm; --cluster slurm --dry-run prints the "
            "sbatch script it would get on a cluster"
        )
    params = jobs.local_parameters(cfg, kind)
    print(
        f"# local run: submitit LocalExecutor, {params['tasks_per_node']} task(s) on this "
        f"machine, time limit {params['timeout_min']} min, job folder {jobs.job_folder(cfg)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
