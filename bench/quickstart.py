"""Time the quickstart (`python -m pimc_dist.launch` with no arguments) and keep its results.

Runs it twice in a fresh working folder: cold (writes the built-in dataset, shards it,
pretrains) and warm (reuses the shards and the finished pretraining, re-runs the probes).
numba's compiled kernels are cached beside the package, so "cold" excludes the one-time
compile of a brand-new checkout (about a minute on 2 cores).

    python bench/quickstart.py [--keep DIR]

Prints the timings and the quality table, and writes bench/results/quickstart.json, the
source of the README's quality-on-the-built-in-dataset table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "quickstart.json"


def run_once(cwd: Path) -> float:
    """One quickstart run in `cwd`; returns its wall time in seconds."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pimc_dist.launch"], cwd=cwd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart failed with exit code {proc.returncode} in {cwd}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="pimc-quickstart-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cold = run_once(folder)
        warm = run_once(folder)
        results = json.loads((folder / "runs/quickstart/results.json").read_text())
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    out = {
        "meta": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "wall_s": {"cold": round(cold, 1), "warm": round(warm, 1)},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nquickstart wall time: cold {cold:.0f} s, warm {warm:.0f} s")
    for task, entry in results["tasks"].items():
        primary = entry["primary"]
        baselines = ", ".join(
            f"{name} {vals.get(primary, float('nan')):.3f}"
            for name, vals in entry.get("baselines", {}).items()
        )
        print(
            f"{task:18s} {primary}: pretrained {entry['pretrained'][primary]:.3f}  "
            f"random {entry['random'][primary]:.3f}  {baselines}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
