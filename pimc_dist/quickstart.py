"""The embedded default job: `python -m pimc_dist.launch` with no arguments.

On one machine, no Slurm, no GPU:

1. writes the built-in dataset (a small PASTIS-layout time series with planted
   crop phenology) once under `shards/_raw/demo` and shards it into `shards/demo`;
2. pretrains PIMC (configs/pretrain/tiny.yaml) with DeepSpeed on 2 local CPU
   ranks through the launcher's local executor, the same path Slurm jobs take;
3. evaluates the pretrained encoder and a random-init one on pixel
   classification (linear probe) and forecasting (linear probe, with the
   persistence, seasonal-naive (where the window holds a year) and climatology
   baselines);
4. prints a results table and writes `runs/quickstart/results.json`.

What it claims is what it measures: on both tasks the pretrained encoder against the random-init
one (same architecture, same probe), with the margin on the task's primary metric (`margin`:
positive when pretrained is better). The baselines are context, not evidence for pretraining
(a random-init encoder beats persistence too).

Every step resumes: a second run reuses the shards and the finished pretraining.
Each stage prints the time elapsed and an ETA for the rest; the sharding,
pretraining, feature extraction and probe training show progress bars of their own.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pimc_dist import config as config_lib
from pimc_dist import jobs, pretrain, shard, shard_plan, shardset
from pimc_dist.eval import finetune
from pimc_dist.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
RUN_ROOT = Path("runs/quickstart")
TASKS = ("pastis_pixel_cls", "pastis_forecast")
INITS = ("pretrained", "random")
TRAIN_ONLY = ["data.name=demo_train", "data.folds=[1,2,3]"]  # the train folds of rotation 0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class Stages:
    """Stage lines with the time elapsed and an ETA for the rest of the quickstart.

    The ETA starts from typical stage times on 2 cores (`estimates`) and is scaled by
    how fast this machine went through the stages so far, except the first: writing
    the dataset (or finding it cached) says little about the pace of training.
    """

    def __init__(self, estimates: list[float]):
        self.estimates = estimates
        self.taken: list[float] = []
        self.t0 = time.perf_counter()
        self.stage_t0 = self.t0

    def eta(self) -> float:
        done = len(self.taken)
        expected = sum(self.estimates[1:done])
        pace = sum(self.taken[1:done]) / expected if expected else 1.0
        return pace * sum(self.estimates[done:])

    def start(self, title: str) -> None:
        n = len(self.taken) + 1
        elapsed = time.perf_counter() - self.t0
        print(
            f"\n=== {n}/{len(self.estimates)} {title} "
            f"(elapsed {_clock(elapsed)}, ETA ~{_clock(self.eta())}) ===",
            flush=True,
        )
        self.stage_t0 = time.perf_counter()

    def done(self) -> None:
        self.taken.append(time.perf_counter() - self.stage_t0)
        elapsed = time.perf_counter() - self.t0
        rest = (
            f", ETA ~{_clock(self.eta())} for the rest"
            if len(self.taken) < len(self.estimates)
            else ""
        )
        print(f"    (stage {_clock(self.taken[-1])}; elapsed {_clock(elapsed)}{rest})", flush=True)


def _estimates(cached_shards: bool) -> list[float]:
    """Typical seconds per stage on 2 busy cores: shards, pretraining, pixel cls, forecasting."""
    return [3.0 if cached_shards else 20.0, 50.0, 35.0, 20.0]


def run(run_root: Path = RUN_ROOT) -> dict[str, Any]:
    """All four steps; returns what results.json holds."""
    configs = REPO / "configs"
    pretrain_dir = (run_root / "pretrain").resolve()
    data = [config_lib.load(configs / "data/demo.yaml", o) for o in ([], TRAIN_ONLY)]
    cached = all((Path(d.data.shard_dir) / "manifest.json").is_file() for d in data)
    stages = Stages(_estimates(cached))

    # Pretraining sees only the training folds, so no test pixel (nor its forecast
    # horizon) reaches the encoder; evaluation reads every fold and splits by fold.
    stages.start("built-in dataset -> shards/demo (all folds), shards/demo_train (folds 1-3)")
    for cfg in data:
        drop_stale_cache(Path(cfg.data.shard_dir))
        if shard.main(cfg) != 0:
            raise RuntimeError("sharding the built-in dataset failed (see above)")
    stages.done()

    stages.start("PIMC pretraining: DeepSpeed, 2 local CPU ranks")
    code = run_pretraining(configs / "pretrain/tiny.yaml", pretrain_dir)
    if code != 0:
        raise RuntimeError(
            f"pretraining failed with exit code {code}; its logs are under {pretrain_dir}/slurm"
        )
    stages.done()

    results: dict[str, Any] = {"pretrain_run": str(pretrain_dir), "tasks": {}}
    for task in TASKS:
        stages.start(f"{task}: linear probe, pretrained vs random-init encoder")
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
        results["tasks"][task]["margin"] = margin(results["tasks"][task])
        stages.done()
    return results


def run_pretraining(config_path: Path, run_dir: Path) -> int:
    """Pretrain on 2 local CPU ranks through the launcher's local executor; its exit status."""
    overrides = [
        "launch.cluster=local",
        "launch.nodes=1",
        "launch.tasks_per_node=2",
        f"train.run_dir={config_lib.quote(run_dir)}",
        *TRAIN_ONLY,
    ]
    try:
        cfg = jobs.load_job_config(str(config_path), overrides)
        pretrain.check_config(cfg)
        jobs.check_cluster_fits(cfg, "local", {})
        sub = jobs.submit(
            cfg, jobs.EntryJob("pretrain", config_lib.to_yaml(cfg), pretrain.main), "local"
        )
    except (config_lib.ConfigError, jobs.LaunchError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    jobs.print_submitted(sub, cfg, tracked=True)
    return jobs.wait_for(sub)


def drop_stale_cache(shard_dir: Path) -> bool:
    """Remove a cached built-in shard set written by an older format; True if removed.

    The built-in set is ours to rebuild, so an upgrade does not leave the newcomer with
    a "shard it again" error; user shard sets are never touched this way.
    """
    current = {
        shard_plan.PLAN_NAME: shard_plan.PLAN_SCHEMA,
        shardset.MANIFEST_NAME: shardset.SCHEMA_VERSION,
    }
    for name, version in current.items():
        path = shard_dir / name
        try:
            found = json.loads(path.read_text()).get("schema_version")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError):
            found = None
        if found != version:
            print(f"{shard_dir}: cached shards of an older format ({name}); rebuilding them")
            shutil.rmtree(shard_dir)
            return True
    return False


def margin(task: dict[str, Any]) -> float:
    """How much better the pretrained encoder scored than the random-init one on the primary
    metric (negative: worse)."""
    key = task["primary"]
    diff = task["pretrained"][key] - task["random"][key]
    return diff if task["higher_is_better"] else -diff


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}


def table(results: dict[str, Any]) -> str:
    """The results as a fixed-width text table."""
    lines = [
        f"{'task':<18} {'metric':<12} {'pretrained':>11} {'random init':>11} {'margin':>8}"
        "  baselines"
    ]
    for task, r in results["tasks"].items():
        key = r["primary"]
        baselines = ", ".join(
            f"{name} {b[key]:.4f}" for name, b in r["baselines"].items() if key in b
        )
        lines.append(
            f"{task:<18} {key:<12} {r['pretrained'][key]:>11.4f} {r['random'][key]:>11.4f} "
            f"{margin(r):>+8.4f}  {baselines}"
        )
    lines.append("margin: how much better pretrained scored than random init (+ = better)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> None:
    """The quickstart takes no arguments; `--help` says what it does."""
    config_lib.job_parser(
        "python -m pimc_dist.quickstart",
        "The built-in quickstart, on one machine with no Slurm and no GPU: shard a small\n"
        "PASTIS-layout dataset, pretrain PIMC with DeepSpeed on 2 local CPU ranks, evaluate\n"
        "the pretrained and a random-init encoder, print a results table and write\n"
        f"{RUN_ROOT / 'results.json'}. Every step resumes. It takes no arguments.",
        "example:\n  python -m pimc_dist.launch        # the same, as the launcher's default\n"
        "  python -m pimc_dist.quickstart",
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; prints the table and where everything went."""
    parse_args(argv)
    start = time.perf_counter()
    try:
        results = run()
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    out = write_json_atomic(RUN_ROOT / "results.json", results)
    pretrain = Path(results["pretrain_run"])
    print("\n" + table(results))
    print(f"\nquickstart done in {results['elapsed_s']:.0f} s")
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
