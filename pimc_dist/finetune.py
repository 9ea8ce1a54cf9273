"""`python -m pimc_dist.finetune`: the command line of the fine-tuning job (pimc_dist.eval.finetune)."""

from pimc_dist.eval.finetune import check_config, cli, main

__all__ = ["check_config", "cli", "main"]

if __name__ == "__main__":
    raise SystemExit(cli())
