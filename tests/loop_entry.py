"""A tiny training-loop stand-in with pretrain's stop/resume contract, for the launcher's tests.

`main(cfg)` runs `train.total_samples` steps of `STEP_S` seconds on every rank,
resumes from `<run_dir>/loop_ckpt.json`, appends one line per step to
`<run_dir>/metrics.jsonl` (rank 0), writes each rank's pid to
`<run_dir>/pids/<rank>` so a test can signal it, and on a stop request saves
the checkpoint and returns `REQUEUE_EXIT_CODE`, as `pimc_dist.pretrain` does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pimc_dist import distributed

STEP_S = 0.25
STOPS_ON_SIGNAL = True  # as pimc_dist.pretrain: Ctrl-C under the launcher is a stop request


def main(cfg) -> int:
    env = distributed.init_distributed(timeout_s=60)
    distributed.install_stop_handlers()
    run = Path(cfg.train.run_dir)
    (run / "pids").mkdir(parents=True, exist_ok=True)
    (run / "pids" / str(env.rank)).write_text(str(os.getpid()))
    ckpt = run / "loop_ckpt.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    distributed.barrier()
    try:
        for step in range(start, cfg.train.total_samples):
            time.sleep(STEP_S)
            if env.rank == 0:
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(
                        json.dumps({"step": step, "pid": os.getpid(), "attempt": attempt}) + "\n"
                    )
            if distributed.any_rank_stop_requested():
                if env.rank == 0:
                    tmp = ckpt.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"step": step + 1}))
                    os.replace(tmp, ckpt)
                    print(f"loop_entry: stop requested, checkpoint at step {step + 1}", flush=True)
                distributed.record_stop(step + 1)
                distributed.barrier()
                return distributed.REQUEUE_EXIT_CODE
        if env.rank == 0:
            print(f"loop_entry: finished {cfg.train.total_samples} steps", flush=True)
        return 0
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    import argparse
    import sys

    from pimc_dist import config

    parser = argparse.ArgumentParser(prog="python -m loop_entry")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.exit(main(config.load(args.config, args.overrides)))
