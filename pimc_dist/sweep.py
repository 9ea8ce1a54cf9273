"""Sweeps of downstream runs: a YAML grid, one submitit job array, tables and a plot of the results.

    python -m pimc_dist.launch sweep --config configs/sweep/demo.yaml
    python -m pimc_dist.sweep --config configs/sweep/demo.yaml          # the same
    python -m pimc_dist.sweep --config configs/sweep/demo.yaml --aggregate
    python -m pimc_dist.sweep --config configs/sweep/demo.yaml sweep.rerun_failed=true

The grid (`sweep.grid`) spans task, protocol, init, learning rate, label
fraction and seed; each combination is a cell: one `pimc_dist.finetune` run
with the task's YAML (`sweep.configs`, default `configs/finetune/<task>.yaml`)
plus `sweep.overrides` plus the cell's own values. The lr axis sets `train.lr`
of fine-tuning (and cnn1d) cells; a linear-probe cell trains its whole
`finetune.probe_lrs` grid in one run (set it in `sweep.overrides`), so the lr
axis does not multiply linear cells; `cnn1d` cells have no encoder, so the init
axis does not multiply them. Linear cells share one feature cache (`<sweep folder>/features`).

Submission: every cell still to run goes into ONE submitit job array (Slurm:
`--array=0-N%P` with P = `sweep.parallelism`); locally the LocalExecutor starts
them all and each waits for one of P slot locks before it works, so at most P
run at once. Array tasks take their resources from the sweep config's
`launch.*`. The submitting process waits (`sweep.wait`), then aggregates.

Folders, under the sweep folder `train.run_dir`:

    cells/<cell id>/result.json   a finished cell (pimc_dist.finetune's result)
    cells/<cell id>/error.json    a failed cell: the error and its traceback
    slurm/<job id>/               submitit's scripts and logs (one per array task)
    results.csv, results.md, results.png, failed.json

A cell whose result.json exists is never run again. A resubmission runs every
other cell; with `sweep.rerun_failed=true` only the cells that failed (an
error.json, or an array task that ended without a result). `results.md`
gives mean +- std over seeds per (task, protocol, init, lr, label fraction),
the forecasting baselines as rows of their own, and the failed cells; the plot
shows each task's primary metric against the label fraction (best lr per curve
by mean validation score). W&B: every cell logs to the group
`tracking.group` (default: the sweep name), and the aggregation adds a summary
run with the results table and plot to the same group.

A sweep folder that holds another run (a pretraining, a fine-tuning, or a sweep of
another name) is refused before anything is written; the same sweep may be
resubmitted there with a grown grid or changed overrides.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from pimc_dist import config as config_lib
from pimc_dist import jobs, tracking, viz
from pimc_dist.config import quote
from pimc_dist.eval import finetune, leakage
from pimc_dist.eval.results import ERROR_FILE, read_result, result_rows, write_tables
from pimc_dist.files import write_json_atomic
from pimc_dist.jobs import EntryJob, Failed

# The checkout holding the package (relative config paths are also tried against it).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

RESULT_FILE = finetune.RESULT_FILE
PATH_KEYS = (
    "finetune.ckpt",
    "loader.shards",
    "finetune.train_shards",
    "finetune.val_shards",
    "finetune.test_shards",
)
EXAMPLES = """examples:
  python -m pimc_dist.launch sweep --config configs/sweep/demo.yaml
  python -m pimc_dist.sweep --config configs/sweep/demo.yaml sweep.parallelism=2
  python -m pimc_dist.sweep --config configs/sweep/demo.yaml --aggregate
  python -m pimc_dist.sweep --config configs/sweep/demo.yaml sweep.rerun_failed=true
  python -m pimc_dist.sweep --config configs/sweep/demo.yaml --dry-run
"""


# ---------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    task: str
    protocol: str
    init: str
    lr: float | None  # None: the task config's own (linear cells: their probe_lrs grid)
    label_fraction: float
    seed: int
    id: str = field(default="", compare=False)

    def overrides(self) -> list[str]:
        out = [
            f"finetune.task={self.task}",
            f"finetune.protocol={self.protocol}",
            f"finetune.label_fraction={self.label_fraction}",
            f"train.seed={self.seed}",
        ]
        if self.protocol != "cnn1d":
            out.append(f"finetune.init={self.init}")
        if self.lr is not None:
            out.append(f"train.lr={self.lr}")
        return out


def _cell_id(task: str, protocol: str, init: str, lr: str, fraction: float, seed: int) -> str:
    text = f"{task}__{protocol}-{init}__lr-{lr}__frac-{fraction:g}__seed-{seed}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


def expand_grid(cfg: Any) -> list[Cell]:
    """Every cell of `sweep.grid`, in a stable order."""
    grid = cfg.sweep.grid
    if not grid.task:
        raise config_lib.ConfigError("invalid key 'sweep.grid.task': list at least one task")
    for key in ("protocol", "init", "label_fraction", "seed"):
        if not grid[key]:
            raise config_lib.ConfigError(f"invalid key 'sweep.grid.{key}': empty list")
    lrs = [float(x) for x in grid.lr]
    cells: dict[Cell, None] = {}
    for task, protocol, init, fraction, seed in itertools.product(
        grid.task, grid.protocol, grid.init, grid.label_fraction, grid.seed
    ):
        init = "none" if protocol == "cnn1d" else init
        if protocol == "linear":  # its whole finetune.probe_lrs grid in one run
            options: list[tuple[float | None, str]] = [(None, "grid")]
        else:
            options = [(lr, f"{lr:g}") for lr in lrs] or [(None, "cfg")]
        for lr, lr_text in options:
            cell = Cell(
                task=str(task),
                protocol=str(protocol),
                init=str(init),
                lr=lr,
                label_fraction=float(fraction),
                seed=int(seed),
                id=_cell_id(
                    str(task), str(protocol), str(init), lr_text, float(fraction), int(seed)
                ),
            )
            cells.setdefault(cell)
    return list(cells)


def sweep_dir(cfg: Any) -> Path:
    return Path(cfg.train.run_dir)


def cell_dir(cfg: Any, cell: Cell) -> Path:
    return sweep_dir(cfg) / "cells" / cell.id


def task_config_path(cfg: Any, task: str) -> Path:
    """The fine-tuning YAML of a task: sweep.configs[task], else configs/finetune/<task>.yaml.

    Relative paths are tried against the current folder, then the package checkout.
    """
    text = cfg.sweep.configs.get(task) or f"configs/finetune/{task}.yaml"
    path = Path(text)
    for candidate in (path, PACKAGE_ROOT / path) if not path.is_absolute() else (path,):
        if candidate.is_file():
            return candidate.resolve()
    raise config_lib.ConfigError(
        f"invalid key 'sweep.configs.{task}': fine-tuning config {text} not found "
        f"(tried {Path.cwd() / path} and {PACKAGE_ROOT / path})"
    )


def cell_config(cfg: Any, cell: Cell) -> DictConfig:
    """The full fine-tuning config of one cell."""
    group = cfg.tracking.group or cfg.name
    tracking = OmegaConf.to_container(cfg.tracking, resolve=True)
    launch = OmegaConf.to_container(cfg.launch, resolve=True)
    overrides = [
        *cfg.sweep.overrides,
        *cell.overrides(),
        f"name={quote(f'{cfg.name}-{cell.id}')}",
        f"train.run_dir={quote(cell_dir(cfg, cell))}",
        f"finetune.feature_cache={quote(sweep_dir(cfg) / 'features')}",
        f"tracking.group={quote(group)}",
        *(f"tracking.{k}={_yaml_value(v)}" for k, v in tracking.items() if k != "group"),
        *(f"launch.{k}={_yaml_value(v)}" for k, v in launch.items()),
    ]
    path = task_config_path(cfg, cell.task)
    cell_cfg = config_lib.load(path, overrides)
    # Array tasks may start in another folder: relative data and weight paths become absolute.
    fixed = [
        f"{key}={quote(Path(value).resolve())}"
        for key in PATH_KEYS
        if (value := OmegaConf.select(cell_cfg, key)) and not Path(value).is_absolute()
    ]
    return config_lib.load(path, [*overrides, *fixed]) if fixed else cell_cfg


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict, bool, int, float)):
        return json.dumps(value)
    return quote(value)


# ---------------------------------------------------------------------------
# Cell status
# ---------------------------------------------------------------------------


def cell_status(cfg: Any, cell: Cell) -> str:
    """done | failed | pending."""
    folder = cell_dir(cfg, cell)
    if read_result(folder / RESULT_FILE) is not None:
        return "done"
    if (folder / ERROR_FILE).is_file():
        return "failed"
    return "pending"


def cells_to_run(cfg: Any, cells: list[Cell]) -> list[Cell]:
    """Cells without a result; with sweep.rerun_failed only those that failed."""
    status = {c: cell_status(cfg, c) for c in cells}
    if cfg.sweep.rerun_failed:
        return [c for c in cells if status[c] == "failed"]
    return [c for c in cells if status[c] != "done"]


# ---------------------------------------------------------------------------
# The job array
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def run_slot(slots_dir: Path | None, slots: int, poll_s: float = 0.5) -> Iterator[None]:
    """Hold one of `slots` lock files under `slots_dir` while the body runs (no-op without a dir)."""
    if slots_dir is None:
        yield
        return
    slots_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for k in range(slots):
            f = open(slots_dir / f"slot-{k}.lock", "a")  # noqa: SIM115 - closed below
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(poll_s)


class CellJob:
    """One array task: a fine-tuning run (a `jobs.EntryJob`) that records its failure.

    Locally it first takes one of the sweep's slots (the parallelism limit the
    LocalExecutor lacks) before it starts the fine-tuning, so that at most
    `sweep.parallelism` cells train at once (waiting tasks hold only their
    imports). Requeue on timeout or preemption resubmits the cell (submitit
    calls `checkpoint`), up to `launch.max_requeues` times.
    """

    def __init__(
        self,
        cfg_yaml: str,
        requeues: int = 0,
        slots_dir: str | None = None,
        slots: int = 1,
    ):
        self.cfg_yaml = cfg_yaml
        self.requeues = requeues
        self.slots_dir = slots_dir
        self.slots = slots

    def config(self) -> DictConfig:
        return config_lib.from_yaml_text(self.cfg_yaml, "config of a sweep cell")

    def __call__(self) -> int:
        folder = Path(self.config().train.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ERROR_FILE).unlink(missing_ok=True)
        with run_slot(Path(self.slots_dir) if self.slots_dir else None, self.slots):
            try:
                result = EntryJob("finetune", self.cfg_yaml, finetune.main, self.requeues)()
            except BaseException as exc:
                self._record_error(folder, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                raise
            if isinstance(result, Failed):  # an error its message explains: no traceback
                self._record_error(folder, result.message, None)
            return result

    @staticmethod
    def _record_error(folder: Path, error: str, trace: str | None) -> None:
        record = {
            "error": error,
            "traceback": trace,
            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json_atomic(folder / ERROR_FILE, record)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        if self.requeues >= self.config().launch.max_requeues:
            return None
        again = CellJob(self.cfg_yaml, self.requeues + 1, self.slots_dir, self.slots)
        return submitit.helpers.DelayedSubmission(again)

    def __repr__(self) -> str:
        return f"CellJob({self.config().name}, requeues={self.requeues})"


@dataclass
class SubmittedArray:
    cluster: str
    jobs: list[Any]
    cells: list[Cell]
    folder: Path

    @property
    def array_id(self) -> str:
        return str(self.jobs[0].job_id).split("_")[0] if self.jobs else ""


def submit_array(cfg: Any, cells: list[Cell], cluster: str) -> SubmittedArray:
    """Submit the cells as one submitit job array (Slurm) or one batch of local jobs."""
    folder = sweep_dir(cfg) / "slurm"
    configs = [cell_config(cfg, c) for c in cells]  # every cell validated before anything runs
    executor = jobs.make_executor(cfg, "finetune", cluster)  # folder: <sweep>/slurm/%j
    slots_dir = None
    if cluster == "slurm":
        executor.update_parameters(
            array_parallelism=int(cfg.sweep.parallelism), job_name=f"{cfg.name}-sweep"
        )
    else:
        slots_dir = str(sweep_dir(cfg) / ".slots")
        path = os.environ.get("PYTHONPATH")  # local jobs unpickle pimc_dist objects
        os.environ["PYTHONPATH"] = (
            f"{PACKAGE_ROOT}{os.pathsep}{path}" if path else str(PACKAGE_ROOT)
        )
    submitted = []
    with executor.batch():
        for cell_cfg in configs:
            job = CellJob(
                config_lib.to_yaml(cell_cfg), slots_dir=slots_dir, slots=int(cfg.sweep.parallelism)
            )
            submitted.append(executor.submit(job))
    return SubmittedArray(cluster, submitted, cells, folder)


def _job_finished(job: Any, cluster: str) -> bool:
    if cluster == "slurm":
        info = jobs.slurm_job_info(str(job.job_id))
        return info is None or info.get("JobState") in jobs.SLURM_FINAL_STATES
    return job.done()


def wait_array(sub: SubmittedArray, cfg: Any) -> None:
    """Block until every array task ended, printing progress as cells finish."""
    pending = set(range(len(sub.jobs)))
    reported = 0
    while pending:
        for i in list(pending):
            if _job_finished(sub.jobs[i], sub.cluster):
                pending.discard(i)
        done = len(sub.jobs) - len(pending)
        if done != reported:
            print(f"[sweep] {done}/{len(sub.jobs)} array tasks ended", flush=True)
            reported = done
        if pending:
            time.sleep(float(cfg.sweep.poll_s))


def mark_lost_cells(cfg: Any, sub: SubmittedArray) -> None:
    """Array tasks that ended with neither a result nor an error record (killed, timed out,
    out of memory) get an error record, so that they count as failed."""
    for cell, job in zip(sub.cells, sub.jobs, strict=True):
        folder = cell_dir(cfg, cell)
        if cell_status(cfg, cell) == "pending":
            folder.mkdir(parents=True, exist_ok=True)
            record = {
                "error": f"array task {job.job_id} ended without a result (killed, timed out or "
                f"out of memory?); log: {sub.folder}/{job.job_id}/",
                "job_id": str(job.job_id),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            write_json_atomic(folder / ERROR_FILE, record)


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def aggregate(cfg: Any, cells: list[Cell] | None = None) -> dict[str, Any]:
    """Write results.csv, results.md, results.png and failed.json; return a summary."""
    cells = expand_grid(cfg) if cells is None else cells
    rows, problems = result_rows((c, cell_dir(cfg, c)) for c in cells)
    paths = write_tables(cfg.name, rows, problems, len(cells), sweep_dir(cfg))
    _log_to_wandb(cfg, rows, problems, len(cells), paths["plot"])
    return {"rows": rows, "problems": problems, "paths": paths, "cells": len(cells)}


def _log_to_wandb(
    cfg: Any, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n: int, plot: Path | None
) -> None:
    """A summary run with the results table and plot in the sweep's W&B group."""
    if not cfg.tracking.wandb or cfg.tracking.mode == "disabled" or not rows:
        return
    summary_cfg = config_lib.load(
        None,
        [
            f"name={quote(f'{cfg.name}-summary')}",
            f"tracking.group={quote(cfg.tracking.group or cfg.name)}",
            f"tracking.mode={cfg.tracking.mode}",
            f"tracking.project={quote(cfg.tracking.project)}",
            *([f"tracking.entity={quote(cfg.tracking.entity)}"] if cfg.tracking.entity else []),
        ],
    )
    tracker = tracking.Tracker(summary_cfg, rank=0, run_dir=sweep_dir(cfg) / "summary")
    if tracker.run is not None:
        columns = sorted({k for r in rows for k in r})
        table = tracking.wandb_module().Table(
            columns=columns, data=[[r.get(c) for c in columns] for r in rows]
        )
        tracker.run.log({"results": table}, step=0)
    viz.log_pngs(tracker, {"results_plot": plot}, step=0)
    tracker.summary({"cells": n, "failed": len(problems)})
    tracker.finish()


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def check_config(cfg: Any) -> None:
    """Grid, sweep folder, W&B and every cell's config checked before anything is submitted."""
    if int(cfg.sweep.parallelism) < 1:
        raise config_lib.ConfigError("invalid key 'sweep.parallelism': must be at least 1")
    check_sweep_folder(cfg)
    tracking.check_wandb(cfg)
    warned: set[str] = set()  # the leak guard's warnings, once each (cells share checkpoints)
    for cell in expand_grid(cfg):
        try:
            cell_cfg = cell_config(cfg, cell)
            finetune.check_config(cell_cfg)
            # No leaking cell is submitted (eval/leakage.py; listings are cached across cells).
            leakage.enforce(cell_cfg, leakage.pretrain_overlap(cell_cfg), warned.add)
        except config_lib.ConfigError as exc:
            raise config_lib.ConfigError(f"sweep cell {cell.id}: {exc}") from None
    for line in sorted(warned):
        print(f"[sweep] {line}")


def check_sweep_folder(cfg: Any) -> None:
    """Refuse a sweep folder that holds another run, or another sweep (another name).

    The grid, overrides and task configs may change between submissions: cells are
    kept by id, and fixing what made some fail, then rerunning them, is the usual way.
    """
    config_lib.check_run_folder(cfg, sweep_dir(cfg), ("name",), kind="sweep")


def run(cfg: Any, cluster: str, dry_run: bool = False) -> int:
    """Submit the cells still to run as one array, wait, aggregate; 0 when every cell finished."""
    check_config(cfg)
    cells = expand_grid(cfg)
    todo = cells_to_run(cfg, cells)
    done = sum(cell_status(cfg, c) == "done" for c in cells)
    print(
        f"[sweep] {cfg.name}: {len(cells)} cells, {done} finished, {len(todo)} to run"
        + (" (only failed ones: sweep.rerun_failed)" if cfg.sweep.rerun_failed else "")
    )
    if dry_run:
        for cell in todo:
            print(f"  {cell.id}: {' '.join(cell.overrides())}")
        return 0
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config_lib.save_run_config(cfg, folder)
    if todo:
        sub = submit_array(cfg, todo, cluster)
        where = "Slurm" if cluster == "slurm" else "this machine (submitit LocalExecutor)"
        print(
            f"[sweep] submitted {len(todo)} cells as job array {sub.array_id} to {where}, "
            f"at most {cfg.sweep.parallelism} at once"
        )
        print(f"  sweep folder: {folder}\n  logs:         {sub.folder}/<job id>/")
        if not cfg.sweep.wait:
            print(
                f"  aggregate later: python -m pimc_dist.sweep --config {folder / 'config.yaml'} --aggregate"
            )
            return 0
        wait_array(sub, cfg)
        mark_lost_cells(cfg, sub)
    summary = aggregate(cfg, cells)
    paths = summary["paths"]
    print(f"[sweep] {len(cells) - len(summary['problems'])}/{len(cells)} cells finished")
    for name in ("markdown", "csv", "plot", "failed"):
        if paths.get(name):
            print(f"  {name + ':':10s}{paths[name]}")
    if summary["problems"]:
        print(
            f"[sweep] {len(summary['problems'])} cells failed or missing (see failed.json); "
            "rerun them alone with sweep.rerun_failed=true"
        )
        return 1
    return 0


def main(cfg: Any) -> int:
    """Run the sweep from this process (the `launch` job-kind contract): submit, wait, aggregate."""
    return run(cfg, jobs.resolve_cluster(cfg.launch.cluster))


def submit_jobs(cfg: Any, cluster: str, dry_run: bool = False) -> int:
    """Hook for `python -m pimc_dist.launch sweep`: the sweep submits its own job array."""
    return run(cfg, cluster, dry_run=dry_run)


def parse_args(argv: list[str] | None = None) -> Any:
    parser = config_lib.job_parser(
        "python -m pimc_dist.sweep",
        "Run a grid of fine-tuning / linear-probe cells as one submitit job array (Slurm, or "
        "locally with the same code), then aggregate results.csv, results.md and results.png.",
        EXAMPLES,
        "sweep YAML (configs/sweep/*.yaml)",
    )
    parser.add_argument(
        "--cluster", choices=("auto", "slurm", "local"), help="default: launch.cluster"
    )
    parser.add_argument(
        "--aggregate", action="store_true", help="only aggregate the results there are"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the cells to run; submit nothing"
    )
    return parser.parse_intermixed_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.cluster:
            overrides.append(f"launch.cluster={args.cluster}")
        cfg = jobs.load_job_config(args.config, overrides)
        if args.aggregate:
            summary = aggregate(cfg)
            for name, path in summary["paths"].items():
                if path:
                    print(f"{name + ':':10s}{path}")
            return 1 if summary["problems"] else 0
        return run(cfg, jobs.resolve_cluster(cfg.launch.cluster), dry_run=args.dry_run)
    except config_lib.ConfigError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
