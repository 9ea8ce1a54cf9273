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

from pimc_dist import checks, planning
from pimc_dist import config as config_lib


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


def argument_problem(args: argparse.Namespace) -> str | None:
    """'--flag: value: why' for the first argument the cost model cannot use, else None."""
    for n in args.gpus:
        if n < 1:
            return f"--gpus: {n}: need GPU counts >= 1"
    if not 0.0 < args.mfu <= 1.0:
        return f"--mfu: {args.mfu:g}: need a fraction in (0, 1]"
    if args.inter_node_gbps is not None and not args.inter_node_gbps > 0:
        return f"--inter-node-gbps: {args.inter_node_gbps:g}: need a bandwidth > 0"
    if args.batch is not None and args.batch < 1:
        return f"--batch: {args.batch}: need a batch >= 1"
    if args.json is not None and args.json.is_dir():
        return f"--json: {args.json}: is a folder; give a file name"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = argument_problem(args)
    if problem:  # before the config and the measurement: both take seconds
        print(f"error: {problem}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append("data.root=unused")  # required by data configs; nothing is read
    try:
        cfg = config_lib.load(args.config, overrides)
        # What pretraining checks before work, less its shard set and run folder (not read).
        checks.check_values(cfg)
        checks.check_no_data_config(cfg, "pretraining")
        print(f"measuring activations of {cfg.name} on the CPU ...", flush=True)
        measured = planning.measure(cfg)  # builds the model: a bad encoder fails here
    except (config_lib.ConfigError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
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
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([p.to_dict() for p in plans], indent=2))
        except OSError as exc:
            print(f"error: --json: {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
