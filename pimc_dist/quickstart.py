"""The embedded default job: `python -m pimc_dist.launch` with no arguments.

On one machine, no Slurm, no GPU:

1. writes the built-in dataset (a small PASTIS-layout time series with planted
   crop phenology) once under `shards/_raw/demo` and shards it into `shards/demo`;
2. pretrains PIMC (configs/pretrain/tiny.yaml) with DeepSpeed on 2 local CPU
   ranks through the launcher's local executor, the same path Slurm jobs take;
3. evaluates the pretrained encoder and a random-init one on pixel
   classification (linear probe) and forecasting (linear probe, with the
   persistence / seasonal baselines);
4. prints a results table and writes `runs/quickstart/results.json`.

Every step resumes: a second run reuses the shards and the finished pretraining.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pimc_dist import config as config_lib

REPO = Path(__file__).resolve().parents[1]
RUN_ROOT = Path("runs/quickstart")
TASKS = ("pastis_pixel_cls", "pastis_forecast")
INITS = ("pretrained", "random")
TRAIN_ONLY = ["data.name=demo_train", "data.folds=[1,2,3]"]  # the train folds of rotation 0


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)


def run(run_root: Path = RUN_ROOT) -> dict[str, Any]:
    """All four steps; returns what results.json holds."""
    from pimc_dist import finetune, launch, shard

    configs = REPO / "configs"
    pretrain_dir = (run_root / "pretrain").resolve()

    # Pretraining sees only the training folds, so no test pixel (nor its forecast
    # horizon) reaches the encoder; evaluation reads every fold and splits by fold.
    t0 = _step("1/4 built-in dataset -> shards/demo (all folds), shards/demo_train (folds 1-3)")
    for overrides in ([], TRAIN_ONLY):
        if shard.main(config_lib.load(configs / "data/demo.yaml", overrides)) != 0:
            raise RuntimeError("sharding the built-in dataset failed (see above)")
    _done(t0)

    t0 = _step("2/4 PIMC pretraining: DeepSpeed, 2 local CPU ranks")
    code = launch.main(
        [
            "pretrain",
            "--cluster",
            "local",
            "--nodes",
            "1",
            "--tasks-per-node",
            "2",
            "--config",
            str(configs / "pretrain/tiny.yaml"),
            "--wait",
            f"train.run_dir={pretrain_dir}",
            *TRAIN_ONLY,
        ]
    )
    if code != 0:
        raise RuntimeError(
            f"pretraining failed with exit code {code}; its logs are under {pretrain_dir}/slurm"
        )
    _done(t0)

    results: dict[str, Any] = {"pretrain_run": str(pretrain_dir), "tasks": {}}
    for i, task in enumerate(TASKS):
        t0 = _step(f"{3 + i}/4 {task}: linear probe, pretrained vs random-init encoder")
        per_init: dict[str, Any] = {}
        for init in INITS:
            run_dir = (run_root / f"{task}_{init}").resolve()
            cfg = config_lib.load(
                configs / f"finetune/{task}.yaml",
                [
                    f"finetune.ckpt={pretrain_dir}",
                    f"finetune.init={init}",
                    f"train.run_dir={run_dir}",
                ],
            )
            if finetune.main(cfg) != 0:
                raise RuntimeError(f"{task} ({init}) failed; see {run_dir}")
            per_init[init] = json.loads((run_dir / finetune.RESULT_FILE).read_text())
        first = per_init["pretrained"]
        results["tasks"][task] = {
            "primary": first["primary"],
            "higher_is_better": first["higher_is_better"],
            **{init: _metrics(per_init[init]) for init in INITS},
            "baselines": first.get("baselines", {}),
        }
        _done(t0)
    return results


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}


def table(results: dict[str, Any]) -> str:
    """The results as a fixed-width text table."""
    lines = [f"{'task':<18} {'metric':<12} {'pretrained':>11} {'random init':>11}  baselines"]
    for task, r in results["tasks"].items():
        key = r["primary"]
        baselines = ", ".join(
            f"{name} {b[key]:.4f}" for name, b in r["baselines"].items() if key in b
        )
        lines.append(
            f"{task:<18} {key:<12} {r['pretrained'][key]:>11.4f} {r['random'][key]:>11.4f}  {baselines}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; prints the table and where everything went."""
    if argv:
        print(
            "usage: python -m pimc_dist.launch   (no arguments: the built-in quickstart)",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    try:
        results = run()
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    out = RUN_ROOT / "results.json"
    out.write_text(json.dumps(results, indent=1))
    pretrain = Path(results["pretrain_run"])
    print("\n" + table(results))
    print(f"\nquickstart done in {time.perf_counter() - start:.0f} s")
    print(f"  results      {out.resolve()}")
    print(
        f"  checkpoints  {pretrain / 'checkpoints'}  (encoders: {pretrain / 'encoders.safetensors'})"
    )
    print(f"  logs         {pretrain / 'slurm'}  metrics {pretrain / 'metrics.jsonl'}")
    print(f"  W&B files    {pretrain / 'wandb'}  (wandb sync {pretrain / 'wandb'}/offline-run-*)")
    print(
        f"  plots        {(RUN_ROOT / 'pastis_pixel_cls_pretrained' / 'confusion_matrix.png').resolve()}"
    )
    print("  more         python -m pimc_dist.viz curves " + str(pretrain))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
