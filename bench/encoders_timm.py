"""Our encoders vs the same models in timm: training-step time and peak memory on the CPU.

    .venv-timm/bin/python bench/encoders_timm.py [--steps 7] [--threads 1]

Needs timm (the `timm` extra, with a torchvision that fits torch: docs/development.md says how
CI's .venv-timm is made). For each of our short names at the sizes the shipped configs use,
timm's model is `create_timm_model(timm_recipe(ours))` with our weights loaded (same outputs,
tests/test_timm.py). A step is forward, a mean-square loss on the features and backward; the
two models alternate step by step so that load on the machine hits both alike. Prints a
table and writes bench/results/encoders_timm.json. This is the measurement behind keeping our
own modules for the short names (docs/usage.md#encoders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import machine_info  # noqa: E402

from pimc_dist.models import build_encoder, create_timm_model, timm_recipe  # noqa: E402
from pimc_dist.planning import peak_memory_bytes  # noqa: E402

RESULT = REPO / "bench" / "results" / "encoders_timm.json"

# (label, encoder name, build arguments, batch): the towers of configs/pretrain/pimc.yaml
# (plots 3 x 48, crops 10 x 32) and a ViT-B/16 at 224 px as a reference shape.
CASES = [
    ("ResNet-18, 10 x 32 x 32 crops", "resnet18", {"in_chans": 10, "img_size": 32}, 32),
    ("ViT-S/8, 3 x 48 x 48 plots", "vit_small_p8", {"in_chans": 3, "img_size": 48}, 32),
    ("ResNet-50, 12 x 120 x 120 (MoSAiC S2)", "resnet50", {"in_chans": 12, "img_size": 120}, 8),
    ("ViT-B/16, 3 x 224 x 224", "vit_base_p16", {"in_chans": 3, "img_size": 224}, 4),
]


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def measure(name: str, kw: dict, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    ours = build_encoder(name, **kw).train()
    theirs = create_timm_model(timm_recipe(ours)).train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"])
    times: dict[str, list[float]] = {"ours": [], "timm": []}
    models = {"ours": ours, "timm": theirs}
    for model in models.values():
        step(model, x)  # warm-up: allocator, kernels
    for _ in range(steps):
        for key, model in models.items():
            t0 = time.perf_counter()
            step(model, x)
            times[key].append(time.perf_counter() - t0)
    out = {
        key: {
            "step_ms": 1e3 * statistics.median(t),
            "peak_mib": peak_memory_bytes(lambda m=model: step(m, x)) / 2**20,
            "params": sum(p.numel() for p in model.parameters()),
        }
        for key, t in times.items()
        for model in [models[key]]
    }
    out["time_ratio_timm_over_ours"] = out["timm"]["step_ms"] / out["ours"]["step_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    try:
        import timm
    except (ImportError, RuntimeError) as err:
        sys.exit(f"this bench needs timm (and a torchvision that fits torch): {err}")
    torch.set_num_threads(args.threads)
    rows = {}
    print(f"training step, batch as listed, {args.threads} thread(s), median of {args.steps}")
    print(
        f"{'model':40} {'batch':>5} {'ours ms':>9} {'timm ms':>9} {'timm/ours':>9} {'MiB ours':>9} {'MiB timm':>9}"
    )
    for label, name, kw, batch in CASES:
        r = measure(name, kw, batch, args.steps)
        rows[label] = {"encoder": name, **kw, "batch": batch, **r}
        print(
            f"{label:40} {batch:5d} {r['ours']['step_ms']:9.1f} {r['timm']['step_ms']:9.1f} "
            f"{r['time_ratio_timm_over_ours']:9.2f} {r['ours']['peak_mib']:9.1f} "
            f"{r['timm']['peak_mib']:9.1f}"
        )
    result = {
        "threads": args.threads,
        "steps": args.steps,
        "cases": rows,
        "machine": machine_info(timm=timm.__version__),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
