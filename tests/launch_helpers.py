"""Shared by the launcher and sharding tests: tiny shards, reading a shard set back, the
environment of a CPU rank, reading a run folder, and the resume check.

`check_logged_steps` is the rule a requeued pretraining must follow in its
metrics.jsonl: every logged step once, in order, except that a run resumed from
a checkpoint re-logs the steps between that checkpoint and where the previous
attempt stopped (at most one checkpoint interval), and nothing else.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from conftest import REPO

from pimc_dist.shardset import (
    Manifest,
    decode_meta,
    decode_npy,
    decode_png,
    iter_shard_samples,
    read_manifest,
)

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
# configs/pretrain/tiny.yaml with ViT towers (42 px plots in 7x7 patches, 16 px crops in 4x4).
VIT_TOWERS = [
    "model.views.rp.encoder=vit_tiny",
    "model.views.rp.patch_size=6",
    "model.views.rp.width=null",
    "model.views.rsi.encoder=vit_tiny",
    "model.views.rsi.patch_size=4",
    "model.views.rsi.width=null",
]

# What every rank prints first (pimc_dist.jobs.EntryJob):
# "[launch] pretrain rank 1/2 (local 0, node 1 n2) from submitit-slurm; ..."
RANK_LINE = re.compile(r"\[launch\] \w+ rank (\d+)/(\d+) \(local \d+, node (\d+) (\S+)\)")


def cpu_rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """This environment plus what torchrun gives rank `rank` of `world` on this machine
    (rendezvous at 127.0.0.1:`port`), on CPU, one thread, W&B offline, output unbuffered."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )


def build_tiny_shards(root: Path) -> Path:
    """A small PASTIS-layout shard set (6 patches of 32 px, 64 pixels each: 384 samples)."""
    from pimc_dist import shard
    from pimc_dist.config import load
    from pimc_dist.sources.fixtures import write_pastis

    write_pastis(root / "raw", n_patches=6, size=32, seed=1)
    cfg = load(
        TINY,
        [
            "data.source=pastis",
            f"data.root={root / 'raw'}",
            f"data.shard_dir={root / 'shards'}",
            "data.pixels_per_patch=64",
            "data.max_samples_per_shard=128",
            "data.workers=1",
        ],
    )
    assert shard.main(cfg) == 0
    return root / "shards"


def read_shard_set(out: Path) -> tuple[Manifest, list[dict]]:
    """A shard set's manifest and every sample, decoded with shardset's reader, in manifest
    order (arrays for .npy / .png members, the JSON as a dict)."""
    manifest = read_manifest(out)
    decoded = []
    for path in manifest.shard_paths():
        for raw in iter_shard_samples(path):
            sample = {"__key__": raw["__key__"]}
            for suffix, data in raw.items():
                if suffix.endswith(".npy"):
                    sample[suffix] = decode_npy(bytes(data))
                elif suffix.endswith(".png"):
                    sample[suffix] = decode_png(bytes(data))
                elif suffix == "json":
                    sample[suffix] = decode_meta(bytes(data), manifest)
            decoded.append(sample)
    return manifest, decoded


def metrics_steps(run_dir: Path) -> list[int]:
    """The `step` of every complete line of <run_dir>/metrics.jsonl, in file order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # A line still being written has no newline yet: read complete lines only.
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line)["step"] for line in lines]


def rank_hosts(job_folder: Path) -> dict[int, set[str]]:
    """Rank -> the node names it reported in its log (one per attempt), from every rank log."""
    hosts: dict[int, set[str]] = {}
    for log in job_folder.glob("*_log.out"):
        for match in RANK_LINE.finditer(log.read_text(errors="replace")):
            hosts.setdefault(int(match.group(1)), set()).add(match.group(4))
    return hosts


def resumed_at(log_text: str) -> list[int]:
    """Steps the run resumed from, in order ('resumed from ... at step N', rank 0)."""
    return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log_text)]


def expected_logged_steps(planned: int, log_every: int) -> list[int]:
    """Steps an uninterrupted pretraining logs: every `log_every`-th, and the last one."""
    return sorted(set(range(log_every, planned + 1, log_every)) | {planned})


def check_logged_steps(
    steps: list[int], *, planned: int, log_every: int, ckpt_every: int, resumes: list[int]
) -> int:
    """Assert `steps` (metrics.jsonl order) is a run of `planned` steps resumed at `resumes`.

    Each row must be the next expected step after the previous row, or, where a
    resumed attempt starts, the next expected step after its resume point r, with
    r no later than the previous row and at most `ckpt_every` steps before it.
    Returns how many rows were re-logged.
    """
    expected = expected_logged_steps(planned, log_every)

    def next_logged(after: int) -> int | None:
        return next((s for s in expected if s > after), None)

    assert steps, "metrics.jsonl is empty"
    assert steps[0] == expected[0], f"first logged step {steps[0]}, expected {expected[0]}"

    def explains_jump(r: int, i: int) -> bool:
        """Resume point r explains row i going back (a re-logging resumed attempt)."""
        return next_logged(r) == steps[i] and r <= steps[i - 1] <= r + ckpt_every

    jumps = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    pending = list(resumes)
    relogged = 0
    for i, (prev, row) in enumerate(zip(steps, steps[1:], strict=False), start=1):
        if row == next_logged(prev):
            # Continuation, also across a resume from a checkpoint at (or after) prev,
            # unless that resume is the one that explains the next row going back.
            later = [j for j in jumps if j > i]
            while (
                pending
                and pending[0] >= prev
                and next_logged(pending[0]) == row
                and not (later and explains_jump(pending[0], later[0]))
            ):
                pending.pop(0)
            continue
        assert row <= prev, f"steps missing between {prev} and {row}: {steps}"
        assert pending, f"step {row} logged again after {prev} with no resume left: {steps}"
        r = pending.pop(0)
        assert next_logged(r) == row, f"resumed at step {r} but the next row is {row}: {steps}"
        assert r <= prev, f"resumed at step {r}, after the last logged step {prev}: {steps}"
        assert prev - r <= ckpt_every, (
            f"resumed at step {r}, {prev - r} steps before the last logged step {prev}: "
            f"more than one checkpoint interval ({ckpt_every}) repeated: {steps}"
        )
        relogged += sum(1 for s in expected if r < s <= prev)
    assert steps[-1] == planned, f"run ended at step {steps[-1]}, planned {planned}"
    assert not pending, f"resumes at {pending} do not show in the metrics: {steps}"
    assert len(steps) == len(expected) + relogged, steps
    return relogged
