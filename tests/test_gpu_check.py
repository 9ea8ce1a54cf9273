"""bench/gpu_check.sh end to end on the CPU (--device cpu --smoke), so the GPU script cannot rot."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"

# A number the section must report (a dotted path into its result), per section.
NUMBERS = {
    "environment": "machine.cpus",
    "pytest_gpu": "tests",
    "train_step": "rows.0.samples_per_s",
    "loss": "rows.0.ms_per_step",
    "recurrence": "paths.numba_all_cores.plots_per_s",
    "loader_to_gpu": "loader_plus_step_samples_per_s",
    "pretrain": "last_loss",
}


def dig(value, path: str):
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_section_with_numbers(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        # Limits x3: CI machines run other jobs; the report says how long each section took.
        ["bash", str(SCRIPT), "--device", "cpu", "--smoke", "--time-scale", "3"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())},
        timeout=600,
    )
    seconds = time.perf_counter() - start
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == set(NUMBERS), proc.stdout[-3000:]
    for name, path in NUMBERS.items():
        assert sections[name]["ok"], f"{name}: {sections[name].get('error')}\n{proc.stdout[-2000:]}"
        value = dig(sections[name]["result"], path)
        assert isinstance(value, (int, float)) and value >= 0, (name, value)
    assert proc.returncode == 0, proc.stdout[-3000:]
    env = sections["environment"]["result"]
    assert env["machine"]["model"] and "vector_extensions" in env["machine"]
    rows = sections["train_step"]["result"]["rows"]
    # DeepSpeed at each stage, DDP once per workload (stage None), each DeepSpeed row its ratio.
    assert {(r["path"][:3], r["stage"]) for r in rows} == {("ds ", 1), ("ds ", 2), ("ddp", None)}
    assert all(r["ratio_to_ddp"] > 0 for r in rows if r["stage"] is not None)
    # Three files: what a device session brings back (at most 8 files).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
    ]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| train_step | yes |" in markdown and "Training step" in markdown
    assert seconds < 3 * 180 + 60, seconds


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        gpu_check = importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(REPO / "bench"))
    calls = []

    def fake_run_section(name, args, out_dir, limit_s):
        calls.append(name)
        if name == "loss":
            return {"ok": False, "seconds": 1.0, "error": "RuntimeError: boom"}
        return {"ok": True, "seconds": 1.0, "result": {}}

    monkeypatch.setattr(gpu_check, "run_section", fake_run_section)
    monkeypatch.setattr(gpu_check, "markdown", lambda report: "md\n")
    code = gpu_check.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    assert code == 1
    assert calls == list(gpu_check.SECTIONS)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["loss"]["error"] == "RuntimeError: boom"
    assert report["sections"]["recurrence"]["ok"]


def test_a_stopped_training_step_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        gpu_check = importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(REPO / "bench"))
    measured = [
        {"model": "pimc", "stage": 1, "path": "ds ours (bf16)", "samples_per_s": 90.0},
        {"model": "pimc", "stage": None, "path": "ddp (autocast bf16)", "samples_per_s": 100.0},
    ]

    def stopped_bench(cmd, device):  # killed at the limit while writing its third row
        out, model = Path(cmd[cmd.index("--out") + 1]), cmd[cmd.index("--models") + 1]
        lines = [json.dumps(row | {"model": model}) for row in measured] + ['{"model": "pi']
        out.with_suffix(".partial.jsonl").write_text("\n".join(lines))
        raise TimeoutError("bench/train_step.py stopped at this section's time limit")

    monkeypatch.setattr(gpu_check, "_run_bench", stopped_bench)
    result = gpu_check.section_train_step("cpu", True, tmp_path)
    rows = [r for r in result["rows"] if r["model"] == "pimc"]
    assert [r["path"] for r in rows] == ["ds ours (bf16)", "ddp (autocast bf16)", "rest"]
    assert rows[0]["ratio_to_ddp"] == 0.9 and "time limit" in rows[2]["error"]


def test_section_budgets_fit_eight_minutes_on_a_gpu_and_three_in_smoke():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        gpu_check = importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert sum(gpu[0] for gpu in gpu_check.BUDGET_S.values()) <= 480
    assert sum(gpu[1] for gpu in gpu_check.BUDGET_S.values()) <= 180
