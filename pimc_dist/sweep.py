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

import argparse
import contextlib
import csv
import fcntl
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pimc_dist import config as config_lib

# The checkout holding the package (relative config paths are also tried against it).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

RESULT_FILE = "result.json"
PATH_KEYS = (
    "finetune.ckpt",
    "loader.shards",
    "finetune.train_shards",
    "finetune.val_shards",
    "finetune.test_shards",
)
ERROR_FILE = "error.json"
KEY_METRICS = {
    "pastis_forecast": ["rmse_ndvi", "rmse_evi", "rmse_savi", "rmse"],
    "pastis_pixel_cls": ["oa", "macro_f1", "miou"],
    "eurosat_cls": ["oa", "macro_f1"],
    "reben_multilabel": ["map_macro", "map_micro", "f1_macro", "f1_micro"],
    "sen12ms_multilabel": ["map_macro", "map_micro", "f1_macro", "f1_micro"],
}
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


def _quote(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def cell_config(cfg: Any, cell: Cell) -> DictConfig:
    """The full fine-tuning config of one cell."""
    group = cfg.tracking.group or cfg.name
    tracking = OmegaConf.to_container(cfg.tracking, resolve=True)
    launch = OmegaConf.to_container(cfg.launch, resolve=True)
    overrides = [
        *cfg.sweep.overrides,
        *cell.overrides(),
        f"name={_quote(f'{cfg.name}-{cell.id}')}",
        f"train.run_dir={_quote(cell_dir(cfg, cell))}",
        f"finetune.feature_cache={_quote(sweep_dir(cfg) / 'features')}",
        f"tracking.group={_quote(group)}",
        *(f"tracking.{k}={_yaml_value(v)}" for k, v in tracking.items() if k != "group"),
        *(f"launch.{k}={_yaml_value(v)}" for k, v in launch.items()),
    ]
    path = task_config_path(cfg, cell.task)
    cell_cfg = config_lib.load(path, overrides)
    # Array tasks may start in another folder: relative data and weight paths become absolute.
    fixed = [
        f"{key}={_quote(Path(value).resolve())}"
        for key in PATH_KEYS
        if (value := OmegaConf.select(cell_cfg, key)) and not Path(value).is_absolute()
    ]
    return config_lib.load(path, [*overrides, *fixed]) if fixed else cell_cfg


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict, bool, int, float)):
        return json.dumps(value)
    return _quote(value)


# ---------------------------------------------------------------------------
# Cell status
# ---------------------------------------------------------------------------


def read_result(path: Path) -> dict[str, Any] | None:
    """A cell's result, or None if missing; an unreadable one counts as missing (rerun)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        print(f"sweep: {path}: unreadable result ({exc}); the cell counts as not done")
        return None
    if not isinstance(value, dict) or value.get("status") != "ok" or "metrics" not in value:
        print(f"sweep: {path}: not a finished result (no status ok / metrics); not done")
        return None
    return value


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
    """One array task: a fine-tuning run (a `launch.EntryJob`) that records its failure.

    Locally it first takes one of the sweep's slots (the parallelism limit the
    LocalExecutor lacks), before importing anything heavy, so that waiting tasks
    cost nothing. Requeue on timeout or preemption resubmits the cell (submitit
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
                from pimc_dist.launch import EntryJob

                return EntryJob("finetune", self.cfg_yaml, self.requeues)()
            except BaseException as exc:
                record = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                    "job_id": os.environ.get("SLURM_JOB_ID")
                    or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
                    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                (folder / ERROR_FILE).write_text(json.dumps(record, indent=1))
                raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

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
    from pimc_dist import launch

    folder = sweep_dir(cfg) / "slurm"
    configs = [cell_config(cfg, c) for c in cells]  # every cell validated before anything runs
    executor = launch.make_executor(cfg, "finetune", cluster)  # folder: <sweep>/slurm/%j
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
    jobs = []
    with executor.batch():
        for cell_cfg in configs:
            job = CellJob(
                config_lib.to_yaml(cell_cfg), slots_dir=slots_dir, slots=int(cfg.sweep.parallelism)
            )
            jobs.append(executor.submit(job))
    return SubmittedArray(cluster, jobs, cells, folder)


def _job_finished(job: Any, cluster: str) -> bool:
    if cluster == "slurm":
        from pimc_dist.launch import SLURM_FINAL_STATES, slurm_job_info

        info = slurm_job_info(str(job.job_id))
        return info is None or info.get("JobState") in SLURM_FINAL_STATES
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
            (folder / ERROR_FILE).write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"
    }


def result_rows(cfg: Any, cells: list[Cell]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of finished cells and their baselines, failed or missing cells)."""
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    baseline_seen: set[tuple] = set()
    for cell in cells:
        folder = cell_dir(cfg, cell)
        result = read_result(folder / RESULT_FILE)
        if result is None:
            error_path = folder / ERROR_FILE
            if error_path.is_file():
                try:
                    error = json.loads(error_path.read_text()).get("error", "?")
                except (OSError, json.JSONDecodeError):
                    error = f"unreadable {error_path}"
                problems.append(
                    {"cell": cell.id, "status": "failed", "error": error, "folder": str(folder)}
                )
            else:
                problems.append(
                    {
                        "cell": cell.id,
                        "status": "missing",
                        "error": "no result (not run, killed or timed out)",
                        "folder": str(folder),
                    }
                )
            continue
        primary = result.get("primary")
        base = {
            "cell": cell.id,
            "task": cell.task,
            "protocol": cell.protocol,
            "init": cell.init,
            "lr": _lr_text(cell, result),
            "label_fraction": cell.label_fraction,
            "seed": cell.seed,
        }
        val = result.get("val_metrics", {}).get(primary, float("nan"))
        rows.append(
            {
                **base,
                "primary": primary,
                f"val_{primary}": val,
                "val_primary": val,
                **_scalar_metrics(result["metrics"]),
                "selected_lr": result.get("selected", {}).get("lr"),
                "selected_epoch": result.get("selected", {}).get("epoch"),
                "train_samples": result.get("samples", {}).get("train_labelled"),
                "total_s": result.get("timings", {}).get("total_s"),
            }
        )
        for name, metrics in (result.get("baselines") or {}).items():
            key = (cell.task, name, cell.label_fraction, cell.seed)
            if key in baseline_seen:
                continue
            baseline_seen.add(key)
            rows.append(
                {
                    **base,
                    "cell": f"{cell.id}:{name}",
                    "protocol": name,
                    "init": "-",
                    "lr": "-",
                    "primary": primary,
                    **_scalar_metrics(metrics),
                }
            )
    return rows, problems


def _lr_text(cell: Cell, result: dict[str, Any]) -> str:
    if cell.protocol == "linear":
        return "grid"
    lr = result.get("lr")
    return f"{lr:g}" if isinstance(lr, (int, float)) else "-"


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    mean = sum(finite) / len(finite)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1) if len(finite) > 1 else 0.0
    return mean, math.sqrt(var), len(finite)


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by (task, protocol, init, lr, label_fraction): the seeds of one setting."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["task"], row["protocol"], row["init"], row["lr"], row["label_fraction"])
        groups.setdefault(key, []).append(row)
    return groups


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def write_markdown(
    cfg: Any, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n_cells: int, path: Path
) -> Path:
    groups = group_rows(rows)
    lines = [f"# Sweep {cfg.name}", ""]
    done = n_cells - len(problems)
    lines += [f"{done} of {n_cells} cells finished; mean ± std over seeds (n = seeds).", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        metrics = KEY_METRICS.get(task) or sorted(
            {k for r in rows if r["task"] == task for k in _scalar_metrics(r)}
        )
        primary = next((r["primary"] for r in rows if r["task"] == task), "")
        lines += [
            f"## {task}",
            "",
            f"Test metrics; cells pick lr/epoch by validation {primary}.",
            "",
        ]
        header = ["protocol", "init", "lr", "label fraction", *metrics, f"val {primary}", "n"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        keys = sorted(
            (k for k in groups if k[0] == task),
            key=lambda k: (
                k[4],
                k[1] in ("persistence", "seasonal_naive", "climatology"),
                k[1],
                k[2],
                str(k[3]),
            ),
        )
        for key in keys:
            members = groups[key]
            cells = []
            for m in metrics:
                mean, std, _ = _mean_std([r.get(m, float("nan")) for r in members])
                cells.append("–" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
            vmean, vstd, _ = _mean_std([r.get("val_primary", float("nan")) for r in members])
            cells.append("–" if math.isnan(vmean) else f"{vmean:.4f}")
            lines.append(
                "| "
                + " | ".join(
                    [key[1], key[2], str(key[3]), f"{key[4]:g}", *cells, str(len(members))]
                )
                + " |"
            )
        lines.append("")
    if problems:
        lines += ["## Failed or missing cells", ""]
        lines += [
            f"- `{p['cell']}` ({p['status']}): {p['error']} — {p['folder']}" for p in problems
        ]
        lines += [
            "",
            "Rerun only these: add `sweep.rerun_failed=true` (finished cells are kept).",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


def plot_results(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Primary test metric vs label fraction per task; best lr per (protocol, init) by validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 3.8), squeeze=False)
    groups = group_rows(rows)
    for ax, task in zip(axes[0], tasks, strict=True):
        primary = next(r["primary"] for r in rows if r["task"] == task)
        curves: dict[tuple[str, str], dict[float, tuple]] = {}
        for (t, protocol, init, _lr, fraction), members in groups.items():
            if t != task:
                continue
            mean, std, _ = _mean_std([r.get(primary, float("nan")) for r in members])
            vmean, _, _ = _mean_std([r.get("val_primary", float("nan")) for r in members])
            current = curves.setdefault((protocol, init), {}).get(fraction)
            better = current is None or _val_better(vmean, current[2], task)
            if better:
                curves[(protocol, init)][fraction] = (mean, std, vmean)
        for (protocol, init), points in sorted(curves.items()):
            xs = sorted(points)
            label = protocol if init == "-" else f"{protocol}/{init}"
            style = "--" if init == "-" else "-"
            ax.errorbar(
                xs,
                [points[x][0] for x in xs],
                yerr=[points[x][1] for x in xs],
                marker="o",
                linestyle=style,
                capsize=3,
                label=label,
            )
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_ylabel(f"test {primary}")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _val_better(a: float, b: float, task: str) -> bool:
    from pimc_dist.eval.tasks import get_task

    if math.isnan(b):
        return True
    return get_task(task).better(a, b)


def aggregate(cfg: Any, cells: list[Cell] | None = None) -> dict[str, Any]:
    """Write results.csv, results.md, results.png and failed.json; return a summary."""
    cells = expand_grid(cfg) if cells is None else cells
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    rows, problems = result_rows(cfg, cells)
    paths = {
        "csv": write_csv(rows, folder / "results.csv"),
        "markdown": write_markdown(cfg, rows, problems, len(cells), folder / "results.md"),
        "plot": plot_results(rows, folder / "results.png") if rows else None,
    }
    (folder / "failed.json").write_text(json.dumps(problems, indent=1))
    paths["failed"] = folder / "failed.json"
    _log_to_wandb(cfg, rows, problems, len(cells), paths["plot"])
    return {"rows": rows, "problems": problems, "paths": paths, "cells": len(cells)}


def _log_to_wandb(
    cfg: Any, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n: int, plot: Path | None
) -> None:
    """A summary run with the results table and plot in the sweep's W&B group."""
    if not cfg.tracking.wandb or cfg.tracking.mode == "disabled" or not rows:
        return
    from pimc_dist.tracking import Tracker

    summary_cfg = config_lib.load(
        None,
        [
            f"name={_quote(f'{cfg.name}-summary')}",
            f"tracking.group={_quote(cfg.tracking.group or cfg.name)}",
            f"tracking.mode={cfg.tracking.mode}",
            f"tracking.project={_quote(cfg.tracking.project)}",
            *([f"tracking.entity={_quote(cfg.tracking.entity)}"] if cfg.tracking.entity else []),
        ],
    )
    tracker = Tracker(summary_cfg, rank=0, run_dir=sweep_dir(cfg) / "summary")
    if tracker.run is not None:
        import wandb

        columns = sorted({k for r in rows for k in r})
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        tracker.run.log({"results": table}, step=0)
    from pimc_dist import viz

    viz.log_pngs(tracker, {"results_plot": plot}, step=0)
    tracker.summary({"cells": n, "failed": len(problems)})
    tracker.finish()


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def check_config(cfg: Any) -> None:
    """Grid, sweep folder, W&B and every cell's config checked before anything is submitted."""
    from pimc_dist import tracking
    from pimc_dist.eval import finetune

    if int(cfg.sweep.parallelism) < 1:
        raise config_lib.ConfigError("invalid key 'sweep.parallelism': must be at least 1")
    check_sweep_folder(cfg)
    tracking.check_wandb(cfg)
    for cell in expand_grid(cfg):
        try:
            finetune.check_config(cell_config(cfg, cell))
        except config_lib.ConfigError as exc:
            raise config_lib.ConfigError(f"sweep cell {cell.id}: {exc}") from None


def check_sweep_folder(cfg: Any) -> None:
    """Refuse a sweep folder that holds another run, or another sweep (another name).

    The grid, overrides and task configs may change between submissions: cells are
    kept by id, and fixing what made some fail, then rerunning them, is the usual way.
    """
    from pimc_dist.eval import finetune

    folder = sweep_dir(cfg)
    saved = folder / "config.yaml"
    if (
        saved.is_file()
        and not config_lib.from_yaml_text(saved.read_text(), str(saved)).sweep.grid.task
    ):
        raise config_lib.ConfigError(
            f"invalid key 'train.run_dir': {folder} holds a run that is not a sweep (its "
            "config.yaml has no sweep.grid.task); give the sweep its own folder with "
            "train.run_dir=... or name=..."
        )
    finetune.check_run_folder(cfg, folder, "sweep", ("name",))


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
    config_lib.save(cfg, folder / "config.yaml")
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
    from pimc_dist import launch

    return run(cfg, launch.resolve_cluster(cfg.launch.cluster))


def submit_jobs(cfg: Any, cluster: str, dry_run: bool = False) -> int:
    """Hook for `python -m pimc_dist.launch sweep`: the sweep submits its own job array."""
    return run(cfg, cluster, dry_run=dry_run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.sweep",
        description=(
            "Run a grid of fine-tuning / linear-probe cells as one submitit job array (Slurm, or "
            "locally with the same code), then aggregate results.csv, results.md and results.png."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="sweep YAML (configs/sweep/*.yaml)")
    parser.add_argument(
        "--cluster", choices=("auto", "slurm", "local"), help="default: launch.cluster"
    )
    parser.add_argument(
        "--aggregate", action="store_true", help="only aggregate the results there are"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the cells to run; submit nothing"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    from pimc_dist import launch as launch_lib

    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.cluster:
            overrides.append(f"launch.cluster={args.cluster}")
        cfg = launch_lib.load_job_config(args.config, overrides)
        if args.aggregate:
            summary = aggregate(cfg)
            for name, path in summary["paths"].items():
                if path:
                    print(f"{name + ':':10s}{path}")
            return 1 if summary["problems"] else 0
        return run(cfg, launch_lib.resolve_cluster(cfg.launch.cluster), dry_run=args.dry_run)
    except config_lib.ConfigError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
