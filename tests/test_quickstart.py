"""The quickstart (`python -m pimc_dist.launch` with no arguments), end to end; slow (~3 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_pretrains_evaluates_and_writes_results():
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "pimc_dist.launch"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((REPO / "runs/quickstart/results.json").read_text())
    assert set(results["tasks"]) == {"pastis_pixel_cls", "pastis_forecast"}
    for task in results["tasks"].values():
        assert set(task["pretrained"]) == set(task["random"])
    forecast = results["tasks"]["pastis_forecast"]
    assert forecast["pretrained"]["rmse"] < forecast["baselines"]["persistence"]["rmse"]
    assert "results" in proc.stdout and "checkpoints" in proc.stdout


def test_launch_with_arguments_does_not_start_the_quickstart():
    proc = subprocess.run(
        [sys.executable, "-m", "pimc_dist.launch", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--nodes" in proc.stdout
