"""Time and peak memory of a gathered contrastive loss against global batch size.

Each world size W runs as W local processes in one gloo group (nccl with --device cuda, one GPU
per rank); each rank feeds ``per-rank batch`` random (B, dim) features to the loss in its local
form (B x B*W logits per rank) and its full form ((B*W)^2 logits per rank) and times
forward + backward. Peak memory per rank is measured, not guessed: on CPU as the peak resident
set size above the level before the step (Linux VmHWM, reset before each step; glibc is told to
return freed memory so a step does not reuse the previous one's), on GPU with
torch.cuda.max_memory_allocated. The size of one logits matrix per rank is shown beside it.

Example:
    python bench/loss.py --world-sizes 1 2 4 --per-rank-batch 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the rank runner the distributed tests use

from dist_utils import run_on_ranks  # noqa: E402

from pimc_dist.losses import ClipLoss, NTXentLoss, SigLipLoss  # noqa: E402

LOSSES = {"clip": ClipLoss, "ntxent": NTXentLoss, "siglip": SigLipLoss}
MIB = 2**20


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def _one_step(loss_fn, a, b, log_scale) -> float:
    args = (a, b, log_scale) if not isinstance(loss_fn, SigLipLoss) else (a, b, log_scale, -10.0)
    value = loss_fn(*args)
    value.backward()
    return value.item()


def _bench_rank(rank: int, world: int, options: dict) -> list[dict]:
    """On one rank: every (form, per-rank batch) configuration, in order."""
    device = torch.device(f"cuda:{rank}" if options["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows_out = []
    for batch in options["per_rank_batch"]:
        for form in options.get("forms", ("local", "full")):
            n_global = batch * world
            logit_rows = batch if form == "local" else n_global
            logits_mib = logit_rows * n_global * 4 / MIB
            row = {"world": world, "per_rank_batch": batch, "global_batch": n_global}
            row |= {"form": form, "logits_mib_per_rank": logits_mib}
            if logits_mib > options["max_logits_mib"]:
                rows_out.append(row | {"skipped": f"logits over {options['max_logits_mib']} MiB"})
                continue
            gen = torch.Generator().manual_seed(rank)
            a = torch.randn(batch, options["dim"], generator=gen).to(device).requires_grad_()
            b = torch.randn(batch, options["dim"], generator=gen).to(device).requires_grad_()
            log_scale = torch.tensor(2.659, device=device, requires_grad=True)
            loss_fn = LOSSES[options["loss"]](local_loss=form == "local")
            try:
                times, peaks, value = _timed_steps(loss_fn, a, b, log_scale, device, options)
            except torch.cuda.OutOfMemoryError as exc:
                # One size too large for this GPU must not lose the other rows of the run.
                rows_out.append(row | {"skipped": f"out of memory: {str(exc)[:160]}"})
                oom = True
            else:
                oom = False
            if oom:
                del a, b, log_scale
                torch.cuda.empty_cache()
                continue
            row |= {
                "ms_per_step": 1e3 * statistics.median(times),
                "peak_mib_per_rank": max(peaks),
                "loss": value,
            }
            rows_out.append(row)
    return rows_out


def _timed_steps(loss_fn, a, b, log_scale, device, options) -> tuple[list, list, float]:
    """One warm-up step, then `repeats` timed steps: (seconds, peak MiB above the start, loss)."""
    _one_step(loss_fn, a, b, log_scale)  # warm-up: gloo buffers, allocator
    times, peaks = [], []
    for _ in range(options["repeats"]):
        a.grad = b.grad = log_scale.grad = None
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _status_kib("VmRSS") * 1024
        start = time.perf_counter()
        value = _one_step(loss_fn, a, b, log_scale)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / MIB)
        else:
            peaks.append((_status_kib("VmHWM") * 1024 - base) / MIB)
        times.append(time.perf_counter() - start)
    return times, peaks, value


def _merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One row per configuration: the slowest rank's time, the largest peak, the mean loss."""
    merged = []
    for rows in zip(*per_rank, strict=True):
        row = dict(rows[0])
        if "skipped" not in row:
            row["ms_per_step"] = max(r["ms_per_step"] for r in rows)
            row["peak_mib_per_rank"] = max(r["peak_mib_per_rank"] for r in rows)
            row["loss"] = sum(r["loss"] for r in rows) / len(rows)
        merged.append(row)
    return merged


def _growth(rows: list[dict]) -> list[dict]:
    """Peak-memory growth with world size at fixed per-rank batch (global batch grows with W)."""
    out = []
    done = [r for r in rows if "skipped" not in r]
    for form in ("local", "full"):
        for batch in sorted({r["per_rank_batch"] for r in done}):
            series = sorted(
                (r["world"], r["peak_mib_per_rank"])
                for r in done
                if r["form"] == form and r["per_rank_batch"] == batch
            )
            if len(series) >= 2:
                (w0, p0), (w1, p1) = series[0], series[-1]
                out.append(
                    {
                        "form": form,
                        "per_rank_batch": batch,
                        "global_batch_ratio": w1 / w0,
                        "peak_ratio": p1 / p0,
                    }
                )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss", choices=sorted(LOSSES), default="clip")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--per-rank-batch", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--max-logits-mib",
        type=float,
        default=512.0,
        help="skip configurations whose logits matrix per rank is larger",
    )
    parser.add_argument(
        "--forms",
        nargs="+",
        choices=["local", "full"],
        default=["local", "full"],
        help="loss forms (on one rank both are the same computation)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loss.json")
    args = parser.parse_args(argv)

    # Fixed mmap threshold: freed blocks go back to the OS, so each step's peak RSS is its own.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    options = {
        "loss": args.loss,
        "per_rank_batch": sorted(args.per_rank_batch),
        "dim": args.dim,
        "repeats": args.repeats,
        "device": args.device,
        "max_logits_mib": args.max_logits_mib,
        "forms": args.forms,
    }
    backend = "nccl" if args.device == "cuda" else "gloo"
    rows = []
    for world in args.world_sizes:
        per_rank = run_on_ranks(_bench_rank, world, options, backend=backend, timeout_s=1800)
        rows += _merge_ranks(per_rank)

    print(f"{args.loss} loss, dim {args.dim}, {args.device}, {os.cpu_count()} cores")
    header = f"{'W':>2} {'B/rank':>6} {'global':>6} {'form':>5} {'logits MiB':>10} "
    header += f"{'peak MiB':>9} {'ms/step':>8} {'loss':>7}"
    print(header)
    for r in rows:
        line = f"{r['world']:>2} {r['per_rank_batch']:>6} {r['global_batch']:>6} {r['form']:>5} "
        line += f"{r['logits_mib_per_rank']:>10.1f} "
        if "skipped" in r:
            print(line + f"  skipped: {r['skipped']}")
            continue
        line += f"{r['peak_mib_per_rank']:>9.1f} {r['ms_per_step']:>8.1f} {r['loss']:>7.4f}"
        print(line)
    growth = _growth(rows)
    if growth:
        print("peak memory per rank vs global batch (fixed per-rank batch, W grows):")
        for g in growth:
            print(
                f"  {g['form']:>5} B/rank {g['per_rank_batch']}: global x{g['global_batch_ratio']:.0f}"
                f" -> peak x{g['peak_ratio']:.1f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
    result = {"options": options, "meta": meta, "rows": rows, "memory_growth": growth}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
