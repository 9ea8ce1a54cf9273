"""Reading a task's splits from shard sets: which set each split comes from
(`finetune.<split>_shards`, else `loader.shards`), checks that the sets suit the task, the
splits in memory (`read_splits`, samples routed by `tasks.split_of`) and the per-channel
statistics that normalise them (`normalizer_for`). Tasks and splits: `pimc_dist.eval.tasks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pimc_dist import shardset
from pimc_dist.eval.tasks import (
    INDEX_NAMES,
    SPLITS,
    Normalizer,
    SplitData,
    SplitRule,
    Task,
    TaskError,
    band_names_of,
    split_of,
)

RP_FALLBACK_STATS = (127.5, 127.5)


def split_shards(cfg: Any) -> dict[str, str]:
    """Shard folder per split: finetune.<split>_shards, else loader.shards."""
    ft = cfg.finetune
    return {s: str(ft[f"{s}_shards"] or cfg.loader.shards) for s in SPLITS}


def iter_decoded(
    cfg: Any,
    shards: str,
    views: list[str],
    rank: int = 0,
    world_size: int = 1,
    counters: dict[str, int] | None = None,
) -> Iterable[tuple[dict[str, np.ndarray], list[dict[str, Any]]]]:
    """Decoded eval batches of one shard set (every sample of this rank's share once).

    `counters`, if given, receives the loader's counts (samples, skips by reason) at the end.
    """
    loader = shardset.open_loader(
        shards,
        views=views,
        batch_size=int(cfg.finetune.eval_batch_size),
        rank=rank,
        world_size=world_size,
        train=False,
        workers=int(cfg.loader.workers),
        prefetch_factor=int(cfg.loader.prefetch_factor),
        verify=str(cfg.loader.verify),
        normalize=False,  # stored dtypes in memory; Normalizer works per batch
        # Scores are only comparable on the whole split: a shard that fails its manifest
        # check stops the evaluation instead of silently shrinking the test set.
        max_excluded_fraction=0.0,
    )
    if "json" not in loader.manifest.members:
        raise TaskError(f"{loader.manifest.path}: samples carry no JSON (labels, folds)")
    for batch in loader:
        yield {v: batch[v].numpy() for v in views}, batch["meta"]
    if counters is not None:
        counters.update(loader.stats.as_dict())


def read_manifest_for(shards: str) -> Any:
    return shardset.read_manifest(shards)


def season_steps(cfg: Any) -> int | None:
    """One year in steps of the regular grid of the test shard set (its data.grid_step_days),
    or None when its manifest does not record one."""
    step = read_manifest_for(split_shards(cfg)["test"]).config.get("grid_step_days")
    return round(365.25 / float(step)) if step else None


def check_shard_sets(cfg: Any, task: Task, views: Sequence[str] = ()) -> None:
    """Every split's shard set is readable, holds the kind of samples the task needs and
    the stored `views` it reads."""
    for folder in dict.fromkeys(split_shards(cfg).values()):
        manifest = read_manifest_for(folder)
        if manifest.kind != task.dataset_kind:
            raise TaskError(
                f"{manifest.path}: a '{manifest.kind}' shard set; {task.name} needs "
                f"'{task.dataset_kind}' samples"
            )
        stored = {m.split(".", 1)[0] for m in manifest.members}
        missing = [v for v in views if v not in stored]
        if missing:
            raise TaskError(
                f"{manifest.path}: its samples have no {missing} view (they hold "
                f"{sorted(stored - {'json'})}); choose finetune.inputs among those"
                + (" (point tables have no rsi crop)" if "rsi" in missing else "")
            )


def output_classes(cfg: Any, task: Task) -> list[str]:
    """The task's output classes (forecast: the index names) on the training shard set."""
    if task.kind == "forecast":
        return list(INDEX_NAMES)
    manifest = read_manifest_for(split_shards(cfg)["train"])
    if task.kind == "multiclass":
        return task.label_space(manifest).names
    return task.class_names(list(manifest.classes))


def read_splits(
    cfg: Any,
    task: Task,
    inputs: Sequence[str],
    wanted: Sequence[str] = SPLITS,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict[str, SplitData], dict[str, Any]]:
    """The `wanted` splits in memory (this rank's share when world_size > 1), and a report.

    Each distinct shard set is read once and its samples routed to the splits
    that come from it. The report holds per-split counts, loader skips and the
    band names seen.
    """
    ft = cfg.finetune
    views = task.stored_views(inputs)
    check_shard_sets(cfg, task, views)
    folders = split_shards(cfg)
    labels = (
        task.label_space(read_manifest_for(folders["train"])) if task.kind == "multiclass" else None
    )
    by_folder: dict[str, list[str]] = {}
    for split in wanted:
        by_folder.setdefault(folders[split], []).append(split)
    collected: dict[str, tuple[dict[str, list[np.ndarray]], list[dict[str, Any]]]] = {
        s: ({v: [] for v in views}, []) for s in wanted
    }
    report: dict[str, Any] = {"shards": {s: folders[s] for s in wanted}, "skipped": {}}
    band_names: dict[str, list[str]] = {}
    for folder, splits in by_folder.items():
        counters: dict[str, int] = {}
        rule = SplitRule.of(read_manifest_for(folder))
        for arrays, metas in iter_decoded(cfg, folder, views, rank, world_size, counters):
            if not band_names and metas:
                band_names = band_names_of(metas[0])
            routes = np.array([split_of(m, int(ft.fold_rotation), rule) for m in metas])
            for split in splits:
                idx = np.flatnonzero(routes == split)
                if idx.size:
                    for v in views:
                        collected[split][0][v].append(arrays[v][idx])
                    collected[split][1].extend(metas[i] for i in idx)
        report["skipped"][folder] = {
            k: v for k, v in counters.items() if k.startswith("skipped_") and v
        }
    out = {}
    for split in wanted:
        parts, metas = collected[split]
        arrays = {
            v: np.concatenate(p) if p else np.zeros((0,), np.float32) for v, p in parts.items()
        }
        if not metas:
            out[split] = None
            continue
        out[split] = task.prepare(arrays, metas, ft, inputs, band_names, labels)
    report["band_names"] = band_names
    report["samples"] = {s: (len(d) if d is not None else 0) for s, d in out.items()}
    report["dropped"] = {s: dict(d.dropped) for s, d in out.items() if d is not None and d.dropped}
    return out, report


def normalizer_for(
    cfg: Any, task: Task, inputs: Sequence[str], band_names: dict[str, list[str]]
) -> Normalizer:
    """Per-channel statistics of each input from the training shard set's manifest."""
    manifest = read_manifest_for(split_shards(cfg)["train"])
    stats: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for view in inputs:
        got = shardset.view_stats_arrays(manifest, view)
        if view == "rp" and got is None:
            mean, std = RP_FALLBACK_STATS
            got = (np.full(3, mean, np.float32), np.full(3, std, np.float32))
        wanted = cfg.finetune.input_bands.get(view)
        if got is not None and wanted:
            names = band_names.get(view) or []
            idx = [names.index(b) for b in wanted if b in names]
            if len(idx) == len(wanted):
                got = (got[0][idx], got[1][idx])
        stats[view] = got
    return Normalizer(stats)


__all__ = [
    "RP_FALLBACK_STATS",
    "check_shard_sets",
    "iter_decoded",
    "normalizer_for",
    "output_classes",
    "read_manifest_for",
    "read_splits",
    "season_steps",
    "split_shards",
]
