"""Result tables of downstream runs: rows from result.json files, mean ± std over seeds,
results.csv, results.md and a plot of the primary metric against the label fraction.

A run is described by an object with `id`, `task`, `protocol`, `init`, `label_fraction`
and `seed` (a sweep cell, `pimc_dist.sweep.Cell`) and the folder its fine-tuning wrote.

Every row carries `pretrain_overlap`: the scored samples the checkpoint's pretraining saw
(`pimc_dist.eval.leakage`; 0, "val 3, test 5" where `finetune.allow_pretrain_overlap` let a
leaking run go on, "unknown", or "" for a result written before the leak guard); baseline
rows use no pretrained weights: 0. Classification and multi-label rows also carry the
cluster coherence of the test embeddings (`knn_acc` / `knn_map`, `silhouette`;
`pimc_dist.eval.metrics.cluster_metrics`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pimc_dist.eval.finetune import RESULT_FILE
from pimc_dist.eval.leakage import record_text
from pimc_dist.eval.tasks import get_task
from pimc_dist.files import write_json_atomic

ERROR_FILE = "error.json"

KEY_METRICS = {
    "pastis_forecast": ["rmse_ndvi", "rmse_evi", "rmse_savi", "rmse"],
    "pixel_cls": ["oa", "macro_f1", "miou", "knn_acc", "silhouette"],
    "pastis_pixel_cls": ["oa", "macro_f1", "miou", "knn_acc", "silhouette"],
    "eurosat_cls": ["oa", "macro_f1", "knn_acc", "silhouette"],
    "reben_multilabel": ["map_macro", "map_micro", "f1_macro", "f1_micro", "knn_map", "silhouette"],
    "sen12ms_multilabel": [
        "map_macro", "map_micro", "f1_macro", "f1_micro", "knn_map", "silhouette"
    ],
}  # fmt: skip


def read_result(path: Path) -> dict[str, Any] | None:
    """A cell's result, or None if missing; an unreadable one counts as missing (rerun)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        print(f"results: {path}: unreadable result ({exc}); the cell counts as not done")
        return None
    if not isinstance(value, dict) or value.get("status") != "ok" or "metrics" not in value:
        print(f"results: {path}: not a finished result (no status ok / metrics); not done")
        return None
    return value


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"
    }


def result_rows(
    runs: Iterable[tuple[Any, Path]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of finished runs and their baselines, failed or missing runs) from (run, folder)."""
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    baseline_seen: set[tuple] = set()
    for cell, folder in runs:
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
                "pretrain_overlap": record_text(result.get("pretrain_overlap")),
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
                    "pretrain_overlap": "0",  # no pretrained weights
                }
            )
    return rows, problems


def _lr_text(cell: Any, result: dict[str, Any]) -> str:
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
    """results.csv: one row per run and baseline, the union of their columns."""
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
    name: str, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n_cells: int, path: Path
) -> Path:
    """results.md: per task, mean ± std over seeds of each setting, then the failed runs."""
    groups = group_rows(rows)
    lines = [f"# Sweep {name}", ""]
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
        header = [
            "protocol", "init", "lr", "label fraction", *metrics, f"val {primary}", "n",
            "pretrain overlap",
        ]  # fmt: skip
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
            overlap = "; ".join(
                dict.fromkeys(str(r.get("pretrain_overlap", "")) or "–" for r in members)
            )
            lines.append(
                "| "
                + " | ".join(
                    [key[1], key[2], str(key[3]), f"{key[4]:g}", *cells, str(len(members)), overlap]
                )
                + " |"
            )
        lines.append("")
    leaking = sorted({r["cell"] for r in rows if _leaks(r)})
    if leaking:
        lines += [
            f"**Pretrain overlap**: {len(leaking)} run(s) scored samples their checkpoint saw "
            "in pretraining (finetune.allow_pretrain_overlap=true); their scores are not "
            "held-out scores: " + ", ".join(f"`{c}`" for c in leaking),
            "",
        ]
    unknown = sorted({r["cell"] for r in rows if str(r.get("pretrain_overlap")) == "unknown"})
    if unknown:
        lines += [
            f"Pretrain overlap unknown for {len(unknown)} run(s) (the checkpoint's pretraining "
            "data could not be found): " + ", ".join(f"`{c}`" for c in unknown),
            "",
        ]
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


def _leaks(row: dict[str, Any]) -> bool:
    return str(row.get("pretrain_overlap", "")) not in ("", "0", "unknown")


def plot_results(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Primary test metric vs label fraction per task; best lr per (protocol, init) by validation."""
    # matplotlib costs half a second to import: only when a plot is drawn (as in viz.py)
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
    if math.isnan(b):
        return True
    return get_task(task).better(a, b)


def write_tables(
    name: str, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n: int, folder: Path
) -> dict[str, Path | None]:
    """results.csv, results.md, results.png (when there are rows) and failed.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(rows, folder / "results.csv"),
        "markdown": write_markdown(name, rows, problems, n, folder / "results.md"),
        "plot": plot_results(rows, folder / "results.png") if rows else None,
        "failed": write_json_atomic(folder / "failed.json", problems),
    }
