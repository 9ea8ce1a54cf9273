"""Plan a pretraining before renting GPUs: memory, FLOPs, communication, time and GPU-hours.

    python -m pimc_dist.plan --config configs/pretrain/pimc.yaml --gpus 1024 --gpu h100
    python -m pimc_dist.plan --config configs/pretrain/mosaic.yaml --gpus 8 64 1024 --mfu 0.3
    python -m pimc_dist.plan --config configs/pretrain/pimc.yaml --gpus 64 train.batch_size=2048

Measures the model's activation memory on this machine's CPU (a few seconds), then prints the
cost model of `pimc_dist.planning` per GPU count; `--json` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pimc_dist import config as config_lib
from pimc_dist import planning


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pimc_dist.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="pretraining YAML")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8], help="GPU counts to plan")
    parser.add_argument("--gpu", choices=sorted(planning.GPUS), default="h100")
    parser.add_argument(
        "--mfu", type=float, default=planning.DEFAULT_MFU, help="assumed model FLOP utilisation"
    )
    parser.add_argument(
        "--inter-node-gbps",
        type=float,
        help="network bandwidth per GPU between nodes, Gbit/s (default: per GPU model)",
    )
    parser.add_argument("--batch", type=int, help="per-GPU batch (default: train.batch_size)")
    parser.add_argument("--json", type=Path, help="also write the plans here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append("data.root=unused")  # required by data configs; nothing is read
    try:
        cfg = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"measuring activations of {cfg.name} on the CPU ...", flush=True)
    measured = planning.measure(cfg)
    plans = []
    for n in args.gpus:
        plan = planning.plan_job(
            cfg,
            gpus=n,
            gpu=args.gpu,
            mfu=args.mfu,
            inter_node_gbits_s=args.inter_node_gbps,
            batch_per_gpu=args.batch,
            measured=measured,
        )
        plans.append(plan)
        print()
        print(planning.format_plan(plan))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([p.to_dict() for p in plans], indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
