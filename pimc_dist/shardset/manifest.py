"""The manifest of a shard set: names, schema, statistics, read and verify.

A shard set is one folder::

    shard-000000.tar  shard-000000.stats.json
    shard-000001.tar  shard-000001.stats.json
    ...
    manifest.json     skipped.json

`read_manifest` validates the manifest; `verify` checks the shard files
against it. `RunningStats` accumulates the per-channel mean/std of every array
view while shards are written; the manifest holds the merged result.

Metadata tables. JSON values that many samples share (a PIMC sample's 61 grid
dates, the band names) are stored once, in the manifest's `meta_tables`
(`{key: {id: value}}`, the id a hash of the value), and each sample's JSON
holds only the id under the same key. The loader puts the values back
(`Manifest.restore_meta`, `decode_meta`), so consumers see the JSON as written.

Splits. `split_counts` says how many samples of each split the set holds (from
each sample's JSON `split`; PASTIS samples without one by their `fold`, mapped
to train/val/test with the set's `fold_rotation`; "other": no split known), and
`fold_counts` how many of each PASTIS fold. `Manifest.split_summary` prints them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pimc_dist.shardset.errors import ShardError
from pimc_dist.sources.pastis import FOLD_ROTATION, SPLITS

# 2: MoSAiC samples store S2 as the reader's digital numbers (uint16; float32 when
#    resampled bilinearly) and S1 as float32, where schema 1 stored both as float16.
# 3: shared JSON values (grid dates, band names) live in the manifest's meta_tables;
#    a sample's JSON holds their ids (see the module docstring).
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "skipped.json"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
ARRAY_EXTS = ("npy", "png")


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-000042.tar."""
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    """File name of the per-shard statistics written beside shard `index`."""
    return f"shard-{index:06d}.stats.json"


@dataclass
class RunningStats:
    """Per-channel count, mean and sum of squared deviations (Chan et al. merge).

    Channels are the first axis of a view; all other axes are pooled.
    """

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, array: np.ndarray) -> None:
        """Fold one array of shape (C, ...) into the statistics."""
        x = np.asarray(array, np.float64)
        x = x.reshape(x.shape[0] if x.ndim else 1, -1)
        count = x.shape[1]
        if count == 0:
            return
        mean = x.mean(axis=1)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        self.merge(RunningStats(count, mean, m2))

    def merge(self, other: RunningStats) -> None:
        """Fold another set of statistics over the same channels into this one."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.copy(), other.m2.copy()
            return
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"channel counts differ: {self.mean.shape} vs {other.mean.shape}")
        total = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunningStats:
        return cls(
            int(data["n"]), np.asarray(data["mean"], np.float64), np.asarray(data["m2"], np.float64)
        )


@dataclass(frozen=True)
class ViewSpec:
    """Name, file extension, dtype and shape of one array view (e.g. rp: png uint8 3x48x48)."""

    ext: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ViewStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Manifest:
    """What a shard set holds; the loader trusts nothing else."""

    path: Path  # the manifest file
    schema_version: int
    kind: str
    source: str
    config: dict[str, Any]
    classes: list[str]
    views: dict[str, ViewSpec]
    members: list[str]  # member suffixes of every sample, e.g. ["json", "rp.png", "rsi.npy"]
    shards: list[ShardEntry]
    total_samples: int
    stats: dict[str, ViewStats]
    skipped: int = 0
    report: str = REPORT_NAME
    # JSON key -> {id: value}: shared values each sample's JSON names by id
    meta_tables: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # samples per split (train, val, test, other) and per PASTIS fold ("1".."5")
    split_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    fold_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent

    def shard_paths(self) -> list[Path]:
        return [self.root / s.name for s in self.shards]

    def restore_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """`meta` (a sample's parsed JSON) with table ids replaced by their values, in place.

        Raises KeyError naming the key and the id when an id is not in the tables.
        """
        for key, table in self.meta_tables.items():
            if key in meta:
                try:
                    meta[key] = table[meta[key]]
                except (KeyError, TypeError):
                    raise KeyError(f"{key} id {meta[key]!r} not in {self.path.name}") from None
        return meta

    def split_summary(self) -> str:
        """'train 1200, val 300' (and ' (folds 1: 500, 2: 500, 3: 500)' where samples have folds)."""
        splits = ", ".join(f"{k} {n}" for k, n in _split_order(self.split_counts))
        folds = ", ".join(f"{k}: {n}" for k, n in sorted(self.fold_counts.items()))
        return (splits or "splits not recorded") + (f" (folds {folds})" if folds else "")

    def without(self, names: set[str] | frozenset[str]) -> Manifest:
        """This manifest with the shards named in `names` left out (totals follow)."""
        shards = [s for s in self.shards if s.name not in names]
        return dataclasses.replace(
            self, shards=shards, total_samples=sum(s.samples for s in shards)
        )


_RESHARD = (
    "the set was written by another pimc_dist version; shard it again (python -m pimc_dist.shard)"
)


def _split_order(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    known = [(k, counts[k]) for k in SPLITS if k in counts]
    return known + sorted((k, n) for k, n in counts.items() if k not in SPLITS)


FOLD_KEY = "fold "  # sidecar split_counts key prefix of samples known only by their fold
OTHER_SPLIT = "other"


def sample_split_key(meta: Any) -> str:
    """How a sample's JSON counts in a shard sidecar's split_counts: its `split`, else
    "fold <k>" (PASTIS, resolved when the manifest is merged), else "other"."""
    if isinstance(meta, Mapping):
        split = meta.get("split")
        if isinstance(split, str) and split:
            return split
        fold = meta.get("fold")
        if fold is not None and not isinstance(fold, bool):
            return f"{FOLD_KEY}{fold}"
    return OTHER_SPLIT


def resolve_split_counts(counts: Mapping[str, int], config: Mapping[str, Any]) -> dict[str, int]:
    """Sidecar split counts with "fold <k>" keys mapped to train/val/test by the fold
    rotation of `config` (the set's data config: `fold_rotation`, or `data.fold_rotation`);
    without one (or for a fold outside it) they count as "other" (fold_counts keep them)."""
    rotation = config.get("fold_rotation")
    if rotation is None and isinstance(config.get("data"), Mapping):
        rotation = config["data"].get("fold_rotation")
    split_of: dict[str, str] = {}
    if isinstance(rotation, int) and 0 <= rotation < len(FOLD_ROTATION):
        for split, folds in zip(SPLITS, FOLD_ROTATION[rotation], strict=True):
            split_of.update({str(f): split for f in folds})
    out: dict[str, int] = {}
    for key, n in counts.items():
        if key.startswith(FOLD_KEY):
            key = split_of.get(key[len(FOLD_KEY) :], OTHER_SPLIT)
        out[key] = out.get(key, 0) + int(n)
    return dict(_split_order(out))


def stale_sidecar(path: Path, info: dict[str, Any]) -> str | None:
    """The problem of a shard sidecar written in another schema, or None."""
    if info.get("schema_version") == SCHEMA_VERSION:
        return None
    return (
        f"{path}: schema_version {info.get('schema_version')}, this code writes "
        f"{SCHEMA_VERSION}: {_RESHARD} into a new folder"
    )


def _check(cond: bool, path: Path, key: str, problem: str) -> None:
    if not cond:
        raise ShardError(f"{path}: key '{key}' {problem}")


def _typed(
    data: Mapping[str, Any], key: str, types: type | tuple[type, ...], path: Path, where: str = ""
) -> Any:
    full = f"{where}{key}"
    _check(isinstance(data, Mapping), path, where.rstrip(".") or "<top>", "must be a mapping")
    _check(key in data, path, full, "is missing")
    value = data[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    names = "/".join(t.__name__ for t in _as_tuple(types))
    _check(ok, path, full, f"must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate `<directory>/manifest.json` (or a manifest path).

    Raises ShardError naming the file and the key on a missing file, bad JSON,
    a missing key, a wrong type or inconsistent totals.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path}: manifest not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: not valid JSON: {exc}") from exc
    version = _typed(data, "schema_version", int, path)
    _check(
        version == SCHEMA_VERSION,
        path,
        "schema_version",
        f"is {version}, this code reads {SCHEMA_VERSION}: {_RESHARD}",
    )
    views = {}
    for name, spec in _typed(data, "views", dict, path).items():
        where = f"views.{name}."
        shape = _typed(spec, "shape", list, path, where)
        _check(
            all(isinstance(s, int) and s >= 0 for s in shape),
            path,
            where + "shape",
            "must list sizes",
        )
        views[name] = ViewSpec(
            _typed(spec, "ext", str, path, where),
            _typed(spec, "dtype", str, path, where),
            tuple(shape),
        )
        try:
            np.dtype(views[name].dtype)
        except TypeError:
            _check(False, path, where + "dtype", f"is not a numpy dtype: {views[name].dtype!r}")
    shards = []
    for i, entry in enumerate(_typed(data, "shards", list, path)):
        where = f"shards[{i}]."
        shards.append(
            ShardEntry(
                _typed(entry, "name", str, path, where),
                _typed(entry, "samples", int, path, where),
                _typed(entry, "bytes", int, path, where),
                _typed(entry, "sha256", str, path, where),
            )
        )
    total = _typed(data, "total_samples", int, path)
    counted = sum(s.samples for s in shards)
    _check(total == counted, path, "total_samples", f"is {total} but the shards hold {counted}")
    stats = {}
    for name, entry in _typed(data, "stats", dict, path).items():
        where = f"stats.{name}."
        mean = _typed(entry, "mean", list, path, where)
        std = _typed(entry, "std", list, path, where)
        _check(len(mean) == len(std), path, where + "std", "must have as many values as mean")
        _check(
            all(isinstance(v, (int, float)) for v in mean + std),
            path,
            where + "mean",
            "must be numbers",
        )
        stats[name] = ViewStats(tuple(map(float, mean)), tuple(map(float, std)))
    config = _typed(data, "config", dict, path)
    classes = _typed(data, "classes", list, path)
    members = _typed(data, "members", list, path)
    tables = _typed(data, "meta_tables", dict, path)
    for key, table in tables.items():
        _check(isinstance(table, dict), path, f"meta_tables.{key}", "must be a mapping")
    return Manifest(
        path=path,
        schema_version=version,
        kind=_typed(data, "kind", str, path),
        source=_typed(data, "source", str, path),
        config=config,
        classes=[str(c) for c in classes],
        views=views,
        members=[str(m) for m in members],
        shards=shards,
        total_samples=total,
        stats=stats,
        skipped=_typed(data, "skipped", int, path),
        report=_typed(data, "report", str, path),
        meta_tables=tables,
        split_counts=_counts(data, "split_counts", path),
        fold_counts=_counts(data, "fold_counts", path),
    )


def _counts(data: Mapping[str, Any], key: str, path: Path) -> dict[str, int]:
    """An optional {name: count} of the manifest (sets written before it was recorded lack it)."""
    counts = data.get(key, {})
    _check(
        isinstance(counts, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) for n in counts.values()),
        path,
        key,
        "must map names to sample counts",
    )
    return {str(k): int(n) for k, n in counts.items()}


def decode_meta(data: bytes, manifest: Manifest) -> dict[str, Any]:
    """A sample's JSON member as written: parsed, table ids replaced by their values."""
    return manifest.restore_meta(json.loads(data))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problems(manifest: Manifest, *, checksums: bool = True) -> dict[str, str]:
    """Listed shards that disagree with `manifest`: name -> problem (missing, resized, changed).

    Each problem names the file. Sizes are always compared; sha256 with `checksums`.
    """
    problems = {}
    for entry in manifest.shards:
        path = manifest.root / entry.name
        if not path.is_file():
            problems[entry.name] = f"{path}: listed in {manifest.path.name} but missing"
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems[entry.name] = f"{path}: {size} bytes, {manifest.path.name} says {entry.bytes}"
            continue
        if checksums:
            digest = sha256_file(path)
            if digest != entry.sha256:
                problems[entry.name] = (
                    f"{path}: sha256 {digest[:16]}... differs from {manifest.path.name} "
                    f"{entry.sha256[:16]}..."
                )
    return problems


def unlisted_shards(manifest: Manifest) -> list[Path]:
    """Shard files in the manifest's folder that it does not list (never read by a loader)."""
    listed = {entry.name for entry in manifest.shards}
    return [p for p in sorted(manifest.root.glob("shard-*.tar")) if p.name not in listed]


def verify(directory: str | os.PathLike, *, checksums: bool = True) -> list[str]:
    """Problems of a shard set against its manifest: missing, resized, changed or unlisted shards.

    Each problem names the file. An empty list means the set is intact.
    Raises ShardError when the manifest itself is missing or invalid.
    """
    manifest = read_manifest(directory)
    problems = list(shard_problems(manifest, checksums=checksums).values())
    for path in unlisted_shards(manifest):
        problems.append(f"{path}: shard file not listed in {manifest.path.name}")
    return problems


def ensure_valid(directory: str | os.PathLike, *, checksums: bool = True) -> Manifest:
    """The manifest of a shard set, after `verify` found no problem; ShardError listing them all otherwise."""
    problems = verify(directory, checksums=checksums)
    if problems:
        lines = "\n  ".join(problems)
        raise ShardError(f"{directory}: {len(problems)} problem(s) with the shard set:\n  {lines}")
    return read_manifest(directory)


def view_stats_arrays(manifest: Manifest, view: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (mean, std) of a view as float32 arrays; std 0 becomes 1 (constant channel)."""
    stats = manifest.stats.get(view)
    if stats is None:
        return None
    mean = np.asarray(stats.mean, np.float32)
    std = np.asarray(stats.std, np.float32)
    std = np.where((std > 0) & np.isfinite(std), std, 1.0).astype(np.float32)
    return mean, std
