"""The leak guard: a fine-tuning refuses a checkpoint whose pretraining saw a sample it scores.

DESIGN.md, "Evaluation protocol": pretraining reads training samples only, and a score on
a validation or test sample that the encoder saw while pretraining is not a score. Before
any work, `guard` compares

- the samples the checkpoint was pretrained on: the shard set named by `loader.shards` in
  the `config.yaml` of the pretraining run (`finetune.ckpt` is the run folder, or an
  encoders file beside that config.yaml), every sample of it (pretraining reads them all);
- with the samples scored: those of the val and test splits of the evaluation's shard sets
  (`finetune.{val,test}_shards`, else `loader.shards`), each sample's split decided as the
  evaluation decides it (`pimc_dist.eval.tasks.split_of`: PASTIS fold and
  `finetune.fold_rotation`, else the JSON `split`, else the sharder's hash of the patch id).

Identity. A sample is its shard `__key__` (`pimc_dist.samples`: the sanitised patch id,
plus `_r<row>_c<col>` for a pixel), within the dataset source of its set (the manifest's
`source`): two PIMC samples are the same when they are the same pixel (patch, row, col) of
the same source, whatever shard set, sampling or shard order they come from; a MoSAiC or
scene sample is its patch. Keys of different sources never meet (the built-in demo's patch
ids are PASTIS-like numbers that real PASTIS ids would otherwise match). The count is over
every sample of a scored split, before `finetune.max_samples_per_split` or an ignored label
drops any (an upper bound of the scored overlap).

Cost. Keys and splits come from the key index the shard writer leaves beside each shard
(`shard-NNNNNN.keys.json`: keys, and per sample an index into its shard's (patch, fold,
split, group) tuples; `pimc_dist.shardset.writer.keys_name`), trusted when its sha256 matches
the manifest's; a set written before that index existed falls back to one pass over its
tar headers (pretraining set) or its JSON members only (evaluation sets), with no image
decode. Listings are cached per process by manifest identity, so a sweep's cells share
them. Measured on 1M keys: see tests/test_leakage.py and docs/quality.md.

Outcome (`guard`): no overlap: 0; overlap and `finetune.allow_pretrain_overlap=false`:
`PretrainOverlapError` (a ConfigError: `python -m pimc_dist.finetune` exits with status
2), its message giving the count per scored split and the fix; with the flag: {split:
count}, which fine-tuning writes into result.json as `pretrain_overlap` (and the results
tables into every row). A checkpoint whose pretraining data cannot be known (no
config.yaml beside it, its shard set moved or deleted) is not refused: `pretrain_overlap`
is "unknown" and a warning says why. `init=random` and the `cnn1d` protocol load no
pretrained weights: 0, nothing checked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pimc_dist import config as config_lib
from pimc_dist import shardset
from pimc_dist.distributed import gather_objects
from pimc_dist.eval.reading import split_shards
from pimc_dist.eval.tasks import SplitRule, split_of
from pimc_dist.shardset.writer import KEYS_VERSION

SCORED_SPLITS = ("val", "test")
# The JSON fields of a sample's group in the key index: all that `split_of` reads.
INDEX_FIELDS = ("patch", "fold", "split", "group")
UNKNOWN = "unknown"


class PretrainOverlapError(config_lib.ConfigError):
    """The checkpoint's pretraining saw samples this evaluation scores (exit status 2)."""


class KeyListingError(RuntimeError):
    """A shard set's keys cannot be listed (missing or unreadable shard, bad JSON)."""


# ---------------------------------------------------------------------------
# Listing keys
# ---------------------------------------------------------------------------


def keys_file(shard_path: Path) -> Path:
    """The key index the writer leaves beside `shard_path` (shard-000042.keys.json)."""
    return shard_path.with_name(shard_path.name.removesuffix(".tar") + ".keys.json")


def _read_index(shard_path: Path, entry: Any) -> dict[str, Any] | None:
    """The shard's key index if it is there and belongs to these bytes, else None."""
    path = keys_file(shard_path)
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(index, dict)
        and index.get("version") == KEYS_VERSION
        and index.get("sha256") == entry.sha256
        and len(index.get("keys", ())) == entry.samples == len(index.get("group", ()))
    )
    return index if ok else None


def _scan(shard_path: Path, suffixes: frozenset[str]) -> Iterable[dict[str, Any]]:
    try:
        yield from shardset.iter_shard_samples(shard_path, suffixes=suffixes)
    except (OSError, shardset.TarError) as exc:
        raise KeyListingError(f"{shard_path}: cannot list its keys ({exc})") from exc


def _manifest(folder: str | Path) -> Any:
    try:
        return shardset.read_manifest(folder)
    except (OSError, shardset.ShardError) as exc:
        raise KeyListingError(f"{folder}: no readable shard set ({exc})") from exc


def _identity(folder: str | Path) -> tuple[str, int, int]:
    path = (Path(folder) / shardset.MANIFEST_NAME).resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyListingError(f"{folder}: no shard set (no {shardset.MANIFEST_NAME})") from exc
    return str(path), st.st_mtime_ns, st.st_size


def set_keys(folder: str | Path) -> tuple[str, frozenset[str]]:
    """(source, every sample key) of a shard set: from the key index, else the tar headers."""
    return _set_keys(*_identity(folder))


@lru_cache(maxsize=8)
def _set_keys(manifest_path: str, _mtime: int, _size: int) -> tuple[str, frozenset[str]]:
    manifest = _manifest(Path(manifest_path).parent)
    keys: set[str] = set()
    for entry, path in zip(manifest.shards, manifest.shard_paths(), strict=True):
        index = _read_index(path, entry)
        if index is not None:
            keys.update(index["keys"])
        else:
            keys.update(s["__key__"] for s in _scan(path, frozenset()))
    return manifest.source, frozenset(keys)


def split_keys(folder: str | Path, fold_rotation: int) -> tuple[str, dict[str, frozenset[str]]]:
    """(source, split -> sample keys) of a shard set, each sample's split as the evaluation
    decides it (`tasks.split_of`); from the key index, else the JSON members only."""
    return _split_keys(*_identity(folder), int(fold_rotation))


@lru_cache(maxsize=16)
def _split_keys(
    manifest_path: str, _mtime: int, _size: int, fold_rotation: int
) -> tuple[str, dict[str, frozenset[str]]]:
    manifest = _manifest(Path(manifest_path).parent)
    out: dict[str, set[str]] = {}
    rule = SplitRule.of(manifest)  # the set's data.hash_split / split_seed

    def split(meta: dict[str, Any]) -> str:
        return split_of(meta, fold_rotation, rule)

    for entry, path in zip(manifest.shards, manifest.shard_paths(), strict=True):
        index = _read_index(path, entry)
        if index is not None:
            names = [split(dict(zip(INDEX_FIELDS, g, strict=False))) for g in index["groups"]]
            for key, g in zip(index["keys"], index["group"], strict=True):
                out.setdefault(names[g], set()).add(key)
            continue
        for sample in _scan(path, frozenset({"json"})):
            try:
                meta = json.loads(bytes(sample["json"]))
            except (KeyError, ValueError) as exc:
                raise KeyListingError(
                    f"{path}: sample {sample['__key__']} has no readable JSON ({exc})"
                ) from exc
            out.setdefault(split(meta), set()).add(sample["__key__"])
    return manifest.source, {k: frozenset(v) for k, v in out.items()}


# ---------------------------------------------------------------------------
# What the checkpoint was pretrained on
# ---------------------------------------------------------------------------


def pretrain_shard_sets(ckpt: str | Path) -> tuple[list[Path], str]:
    """The shard set(s) a checkpoint was pretrained on, and "" or why they are unknown."""
    ckpt = Path(ckpt)
    saved = (ckpt if ckpt.is_dir() else ckpt.parent) / config_lib.CONFIG_FILE
    if not saved.is_file():
        return [], f"no {config_lib.CONFIG_FILE} beside {ckpt}: its pretraining data is not known"
    try:
        pre = config_lib.from_yaml_text(saved.read_text(), str(saved))
    except (OSError, config_lib.ConfigError) as exc:
        return [], f"{saved}: unreadable ({exc})"
    folder = Path(str(pre.loader.shards))
    if not (folder / shardset.MANIFEST_NAME).is_file():
        return [], (
            f"{saved} says it pretrained on loader.shards={pre.loader.shards}, and there is no "
            f"shard set there (from {Path.cwd()}): moved or deleted?"
        )
    return [folder], ""


# ---------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------


@dataclass
class Overlap:
    """Scored samples seen in pretraining: `counts` per scored split (None: not known)."""

    counts: dict[str, int] | None
    scored: dict[str, int] = field(default_factory=dict)  # samples per scored split
    pretrain_shards: list[str] = field(default_factory=list)
    eval_shards: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # why the counts are not known, or why nothing was checked
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum((self.counts or {}).values())

    def record(self) -> int | dict[str, int] | str:
        """What result.json and the result rows hold: 0, {split: count} or "unknown"."""
        if self.counts is None:
            return UNKNOWN
        return dict(self.counts) if self.total else 0


def needs_check(cfg: Any) -> bool:
    """Whether the run loads pretrained weights (init=pretrained, not cnn1d, a ckpt)."""
    ft = cfg.finetune
    return ft.protocol != "cnn1d" and ft.init == "pretrained" and ft.ckpt is not None


def pretrain_overlap(cfg: Any) -> Overlap:
    """Count the scored (val, test) samples of `cfg`'s evaluation that its checkpoint's
    pretraining saw (module docstring)."""
    t0 = time.perf_counter()
    if not needs_check(cfg):
        return Overlap({}, reason="no pretrained weights (init=random or cnn1d)")
    ft = cfg.finetune
    folders, why = pretrain_shard_sets(ft.ckpt)
    eval_folders = {s: f for s, f in split_shards(cfg).items() if s in SCORED_SPLITS}
    if not folders:
        return Overlap(None, eval_shards=eval_folders, reason=why)
    try:
        pre_ids = tuple(_identity(f) for f in folders)
        counts, scored = {}, {}
        for split, folder in eval_folders.items():
            counts[split], scored[split] = _count(
                pre_ids, _identity(folder), int(ft.fold_rotation), split
            )
    except KeyListingError as exc:
        return Overlap(None, eval_shards=eval_folders, reason=str(exc))
    return Overlap(
        counts,
        scored,
        [str(f) for f in folders],
        eval_folders,
        seconds=time.perf_counter() - t0,
    )


@lru_cache(maxsize=64)
def _count(
    pre_ids: tuple[tuple[str, int, int], ...],
    eval_id: tuple[str, int, int],
    fold_rotation: int,
    split: str,
) -> tuple[int, int]:
    """(scored samples of `split` in the pretraining sets, samples of `split`); cached, so
    that the cells of a sweep that share a checkpoint and a shard set count once."""
    source, by_split = _split_keys(*eval_id, fold_rotation)
    keys = by_split.get(split, frozenset())
    seen = 0
    for pre_id in pre_ids:
        pre_source, pre_keys = _set_keys(*pre_id)
        if pre_source == source:
            seen += len(keys & pre_keys)  # keys are unique within a set
    return seen, len(keys)


def overlap_message(cfg: Any, overlap: Overlap) -> str:
    per_split = ", ".join(
        f"{n} of the {overlap.scored.get(s, 0)} {s} samples" for s, n in overlap.counts.items()
    )
    return (
        f"finetune.ckpt={cfg.finetune.ckpt} was pretrained on {', '.join(overlap.pretrain_shards)}, "
        f"which holds {per_split} scored here "
        f"({', '.join(f'{s}: {f}' for s, f in overlap.eval_shards.items())}): scores on samples "
        "the encoder saw in pretraining are not scores. Fix: pretrain on training samples only "
        "(shard with data.split=train, or data.folds=[the training folds of the rotation], and "
        "pretrain on that set), or score other samples (finetune.val_shards / "
        "finetune.test_shards, finetune.fold_rotation); finetune.allow_pretrain_overlap=true "
        "runs anyway and records pretrain_overlap in result.json and every results row"
    )


def enforce(cfg: Any, overlap: Overlap, log: Callable[[str], None] = print) -> Any:
    """The record of `overlap` (see `Overlap.record`); raises PretrainOverlapError for an
    overlap unless finetune.allow_pretrain_overlap."""
    if overlap.counts is None:
        log(f"warning: leak guard: pretrain_overlap unknown: {overlap.reason}")
    elif overlap.total:
        if not bool(cfg.finetune.get("allow_pretrain_overlap", False)):
            raise PretrainOverlapError(overlap_message(cfg, overlap))
        log(
            f"warning: leak guard: pretrain_overlap {overlap.counts} (allowed by "
            "finetune.allow_pretrain_overlap=true; recorded in result.json)"
        )
    return overlap.record()


def guard(cfg: Any, rank: int = 0) -> Any:
    """Rank 0 checks (`pretrain_overlap`), every rank gets the outcome: the record on every
    rank, or PretrainOverlapError raised on every rank. Call it on all ranks together."""
    outcome: tuple[str, Any] | None = None
    if rank == 0:
        try:
            outcome = ("ok", enforce(cfg, pretrain_overlap(cfg)))
        except PretrainOverlapError as exc:
            outcome = ("refused", str(exc))
    outcome = gather_objects(outcome)[0]
    if outcome[0] == "refused":
        raise PretrainOverlapError(outcome[1])
    return outcome[1]


def record_text(value: Any) -> str:
    """A result's pretrain_overlap for a table cell: 0, "val 3, test 5", "unknown" or ""."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return str(value)


__all__ = [
    "SCORED_SPLITS",
    "UNKNOWN",
    "KeyListingError",
    "Overlap",
    "PretrainOverlapError",
    "enforce",
    "guard",
    "keys_file",
    "needs_check",
    "overlap_message",
    "pretrain_overlap",
    "pretrain_shard_sets",
    "record_text",
    "set_keys",
    "split_keys",
]
