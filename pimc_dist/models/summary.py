"""Parameter counts and a per-module summary table (works on meta-device models too)."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def human_count(n: int | float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def model_summary(model: nn.Module, max_depth: int = 2) -> str:
    """Table of modules down to `max_depth` levels with their parameter counts, then totals."""
    rows = [("(total)", type(model).__name__, count_params(model))]
    for name, module in model.named_modules():
        if not name or name.count(".") >= max_depth:
            continue
        n = count_params(module)
        if n:
            rows.append(("  " * name.count(".") + name, type(module).__name__, n))
    width_name = max(len(r[0]) for r in rows)
    width_type = max(len(r[1]) for r in rows)
    lines = [f"{'module':<{width_name}}  {'type':<{width_type}}  {'params':>14}  {'':>8}"]
    for name, kind, n in rows:
        lines.append(f"{name:<{width_name}}  {kind:<{width_type}}  {n:>14,}  {human_count(n):>8}")
    trainable = count_params(model, trainable_only=True)
    lines.append(f"trainable: {trainable:,} ({human_count(trainable)})")
    return "\n".join(lines)
