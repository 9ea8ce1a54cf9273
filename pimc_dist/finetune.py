"""`python -m pimc_dist.finetune`: the command line of the fine-tuning job (pimc_dist.eval.finetune)."""

from typing import Any

from pimc_dist.eval import finetune as _job
from pimc_dist.eval import leakage
from pimc_dist.eval.finetune import cli, main


def check_config(cfg: Any) -> None:
    """What the launcher checks before it submits: the job's own checks, then the leak guard
    (a checkpoint pretrained on samples this run scores is refused here, not after queueing)."""
    _job.check_config(cfg)
    leakage.enforce(cfg, leakage.pretrain_overlap(cfg))


__all__ = ["check_config", "cli", "main"]

if __name__ == "__main__":
    raise SystemExit(cli())
