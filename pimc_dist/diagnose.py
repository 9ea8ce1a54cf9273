"""Cluster sanity check: every rank joins the process group and reports where it runs.

Run it first on a new cluster or allocation:

    python -m pimc_dist.launch diagnose --nodes 2 --gpus-per-node 4 --wait
    srun --ntasks-per-node=4 python -m pimc_dist.diagnose      # inside an allocation
    torchrun --nproc-per-node=2 -m pimc_dist.diagnose          # one machine

Rank 0 prints one row per rank (rank, node, host, local rank, device, pid) and
checks an all_reduce of the ranks against its known sum. Exit 0 when every rank
took part and the sum is right.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from pimc_dist import config, distributed


def _where_am_i(env: distributed.DistEnv) -> dict[str, object]:
    device = "cpu"
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        device = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return {
        "rank": env.rank,
        # On a real cluster node and host are the same; several slurmd on one
        # machine (slurm/local_cluster.sh) share a host name but not a node name.
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "host": socket.gethostname(),
        "local_rank": env.local_rank,
        "device": device,
        "pid": os.getpid(),
    }


def format_table(rows: list[dict[str, object]]) -> str:
    """Rows of equal keys as an aligned text table."""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(cfg: DictConfig) -> int:
    """Join the job's process group, gather who runs where, check an all_reduce; 0 when all is well."""
    env = distributed.init_distributed(timeout_s=cfg.train.collective_timeout_s)
    try:
        total = torch.tensor([float(env.rank)], device=distributed.collective_device())
        dist.all_reduce(total)
        expected = env.world_size * (env.world_size - 1) / 2
        rows = distributed.gather_objects(_where_am_i(env))
        ok = total.item() == expected and all(r is not None for r in rows)
        if env.rank == 0:
            nodes = sorted({str(r["node"]) for r in rows})
            print(f"diagnose: {env.world_size} ranks on {len(nodes)} node(s): {', '.join(nodes)}")
            print(f"backend {dist.get_backend()}, master {env.master_addr}:{env.master_port}")
            print(format_table(rows))
            verdict = "OK" if ok else "WRONG"
            print(f"all_reduce(sum of ranks) = {total.item():g}, expected {expected:g}: {verdict}")
            sys.stdout.flush()
        distributed.barrier()
        return 0 if ok else 1
    finally:
        distributed.cleanup()


def cli(argv: list[str] | None = None) -> int:
    parser = config.job_parser(
        "python -m pimc_dist.diagnose",
        __doc__,
        "example: srun --nodes=2 --ntasks-per-node=4 python -m pimc_dist.diagnose",
        "job YAML (only train.collective_timeout_s is used)",
        config_required=False,
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as exc:
        parser.error(str(exc))
    return main(cfg)


if __name__ == "__main__":
    sys.exit(cli())
