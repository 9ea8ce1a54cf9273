"""Does PIMC pretraining help downstream? A real tiny pretraining, then probes, on the demo data.

    python bench/finetune_quality.py [--work /tmp/pimc_quality] [--seeds 0 1 2] [--finetune]

1. The built-in PASTIS-layout dataset (20 patches of 64 px, planted crop phenology,
   clouds, parcels) is sharded twice: the training folds only (1-3, fold rotation 0)
   for pretraining, all folds for evaluation. Pretraining never sees a validation
   or test pixel, nor any test series' forecast horizon.
2. `configs/pretrain/tiny.yaml` pretrains on one CPU rank (4,096 samples).
3. Linear probes (`pimc_dist.finetune`, protocol linear) of the pretrained and of
   random-init encoders (same architecture; one random init per seed) on
   pastis_pixel_cls and pastis_forecast, with several input choices, plus the
   forecasting baselines; `--finetune` adds full fine-tuning and the 1D CNN.

Prints a table and writes bench/results/finetune_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pimc_dist import config as config_lib  # noqa: E402
from pimc_dist import shard  # noqa: E402
from pimc_dist.eval import finetune  # noqa: E402
from pimc_dist.sources.fixtures import write_pastis  # noqa: E402

FT = REPO / "configs" / "finetune"
PROBES = [  # (task, inputs)
    ("pastis_pixel_cls", "[rp]"),
    ("pastis_pixel_cls", "[rp,rsi]"),
    ("pastis_forecast", "[rp]"),
    ("pastis_forecast", "[rp,series]"),
]


def make_data(work: Path) -> dict[str, Path]:
    """Raw demo dataset; shards of the training folds (pretraining) and of all folds (eval)."""
    raw = work / "raw"
    if not (raw / "metadata.geojson").is_file():
        write_pastis(raw, n_patches=20, size=64, seed=0)
    sets = {"pretrain": work / "shards_train_folds", "eval": work / "shards_all"}
    for name, extra in (("pretrain", ["data.split=train"]), ("eval", [])):
        if (sets[name] / "manifest.json").is_file():
            continue
        cfg = config_lib.load(
            REPO / "configs" / "data" / "demo.yaml",
            ["data.source=pastis", f"data.root={raw}", f"data.shard_dir={sets[name]}", *extra],
        )
        assert shard.main(cfg) == 0
    return sets


def training_loop_seconds(run: Path) -> float:
    """Time spent in the training loop, from the run's metrics.jsonl (step time x steps)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    total, previous = 0.0, 0
    for row in rows:
        total += row["step_time_s"] * (row["step"] - previous)
        previous = row["step"]
    return total


def pretrain(work: Path, shards: Path, total_samples: int) -> tuple[Path, float]:
    """One-rank tiny PIMC pretraining; returns the run folder and its training-loop time."""
    run = work / "pretrain"
    if (run / "encoders.safetensors").is_file():
        return run, training_loop_seconds(run)
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "pimc_dist.pretrain",
            "--config", str(REPO / "configs" / "pretrain" / "tiny.yaml"),
            f"loader.shards={shards}", f"train.run_dir={run}", "tracking.wandb=false",
            f"train.total_samples={total_samples}", "loader.workers=1",
        ],
        check=True, env=env, cwd=REPO,
    )  # fmt: skip
    print(f"pretraining: {time.perf_counter() - t0:.0f} s wall")
    return run, training_loop_seconds(run)


def evaluate(
    work: Path, shards: Path, ckpt: Path, task: str, inputs: str, init: str, seed: int,
    protocol: str = "linear", extra: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """One fine-tuning run; returns its result.json."""
    name = f"{task}_{inputs.strip('[]').replace(',', '+')}_{protocol}_{init}_s{seed}"
    run = work / "eval" / name
    cfg = config_lib.load(
        FT / f"{task}.yaml",
        [
            f"loader.shards={shards}", f"train.run_dir={run}", f"finetune.ckpt={ckpt}",
            f"finetune.inputs={inputs}", f"finetune.init={init}", f"finetune.protocol={protocol}",
            f"train.seed={seed}", f"finetune.feature_cache={work / 'features'}",
            "tracking.wandb=false", "loader.workers=0", *extra,
        ],
    )  # fmt: skip
    if not (run / "result.json").is_file():
        finetune.main(cfg)
    return json.loads((run / "result.json").read_text())


def summarize(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "values": a.tolist(),
    }


def run_quality(
    work: Path, seeds: list[int], total_samples: int = 4096, with_finetune: bool = False
) -> dict:
    """Everything above; returns the numbers the table and the JSON hold."""
    work.mkdir(parents=True, exist_ok=True)
    sets = make_data(work)
    ckpt, pretrain_s = pretrain(work, sets["pretrain"], total_samples)
    out: dict = {
        "pretrain_s": pretrain_s,
        "pretrain_samples": total_samples,
        "seeds": seeds,
        "rows": [],
    }
    for task, inputs in PROBES:
        for init in ("pretrained", "random"):
            results = [evaluate(work, sets["eval"], ckpt, task, inputs, init, s) for s in seeds]
            primary = results[0]["primary"]
            keys = (
                ["oa", "macro_f1", "miou"]
                if task == "pastis_pixel_cls"
                else ["rmse", "rmse_ndvi", "rmse_evi", "rmse_savi"]
            )
            row = {
                "task": task,
                "inputs": inputs,
                "protocol": "linear",
                "init": init,
                "primary": primary,
            }
            row.update({k: summarize([r["metrics"][k] for r in results]) for k in keys})
            out["rows"].append(row)
            if task == "pastis_forecast" and init == "pretrained" and inputs == "[rp]":
                for name, b in results[0]["baselines"].items():
                    out["rows"].append(
                        {
                            "task": task,
                            "inputs": "-",
                            "protocol": name,
                            "init": "-",
                            "primary": "rmse",
                        }
                        | {k: summarize([b[k]]) for k in keys}
                    )
    if with_finetune:
        extra = ("finetune.epochs=6",)
        for task in ("pastis_pixel_cls", "pastis_forecast"):
            keys = (
                ["oa", "macro_f1", "miou"]
                if task == "pastis_pixel_cls"
                else ["rmse", "rmse_ndvi", "rmse_evi", "rmse_savi"]
            )
            runs = [
                ("finetune", "pretrained", "[rp]"),
                ("finetune", "random", "[rp]"),
                ("cnn1d", "random", "[series]"),
            ]
            for protocol, init, inputs in runs:
                r = evaluate(
                    work, sets["eval"], ckpt, task, inputs, init, seeds[0], protocol, extra
                )
                row = {
                    "task": task,
                    "inputs": inputs,
                    "protocol": protocol,
                    "init": r["init"],
                    "primary": r["primary"],
                }
                row.update({k: summarize([r["metrics"][k]]) for k in keys})
                out["rows"].append(row)
    return out


def print_table(out: dict) -> None:
    print(
        f"\npretraining: {out['pretrain_samples']} samples, training loop {out['pretrain_s']:.0f} s "
        f"(1 CPU rank); seeds {out['seeds']}"
    )
    print(
        f"{'task':18s} {'inputs':14s} {'protocol':15s} {'init':11s} metrics (mean ± std over seeds)"
    )
    for row in out["rows"]:
        metrics = "  ".join(
            f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in row.items() if isinstance(v, dict)
        )
        print(
            f"{row['task']:18s} {row['inputs']:14s} {row['protocol']:15s} {row['init']:11s} {metrics}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/pimc_quality", help="working folder (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4096, help="pretraining samples")
    parser.add_argument("--finetune", action="store_true", help="also full fine-tuning and cnn1d")
    args = parser.parse_args()
    out = run_quality(Path(args.work), args.seeds, args.samples, args.finetune)
    print_table(out)
    path = REPO / "bench" / "results" / "finetune_quality.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
