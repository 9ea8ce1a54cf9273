"""Writing shard sets: `ShardSetWriter` and `merge_manifest`.

`ShardSetWriter` writes shards (each under a temporary name, renamed into place
only when complete), accumulates per-channel mean/std of every array view while
writing, and leaves a small `.stats.json` sidecar beside each shard. The
manifest is assembled from the sidecars (`merge_manifest`), so shards written
by different processes or Slurm array tasks combine into one set, and a rerun
can skip the shards that are already complete (`ShardSetWriter.shard_done`).
Each sidecar counts its samples per split and per PASTIS fold; the manifest
sums them (`split_counts`, `fold_counts`, see manifest.py). Beside each shard a
key index (`keys_name`: every sample's key and its JSON patch, fold, split and
group) lets the leak guard list a set's samples without reading the tar.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pimc_dist.files import write_json_atomic
from pimc_dist.shardset.codec import encode_json, encode_member
from pimc_dist.shardset.errors import ShardError
from pimc_dist.shardset.manifest import (
    MANIFEST_NAME,
    REPORT_NAME,
    SCHEMA_VERSION,
    Manifest,
    RunningStats,
    ShardEntry,
    ViewSpec,
    read_manifest,
    resolve_split_counts,
    sample_split_key,
    sha256_file,
    shard_name,
    sidecar_name,
    stale_sidecar,
)
from pimc_dist.shardset.tar import BLOCK, END_OF_ARCHIVE, tar_header, tar_padding


def _plain_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return json.loads(encode_json(dict(config)))


@dataclass
class _OpenShard:
    index: int
    tmp: Path
    file: BinaryIO
    digest: Any = field(default_factory=hashlib.sha256)
    bytes: int = 0
    samples: int = 0
    keys: set[str] = field(default_factory=set)
    # The key index (keys_name): (key, group) per sample; group: (patch, fold, split, group)
    key_rows: list[tuple[str, int]] = field(default_factory=list)
    key_groups: dict[tuple[Any, ...], int] = field(default_factory=dict)
    stats: dict[str, RunningStats] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # meta_tables of the shard
    splits: dict[str, int] = field(default_factory=dict)  # sample_split_key -> samples
    folds: dict[str, int] = field(default_factory=dict)  # PASTIS fold -> samples

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.bytes += len(data)


_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_TABLE_ID_CHARS = 12  # hex digits of sha256: ids of different values never meet in practice
KEYS_VERSION = 1


def keys_name(index: int) -> str:
    """The key index beside shard `index` (shard-000042.keys.json): every sample's `__key__`
    in shard order and its JSON (patch, fold, split, group), so a set's keys and splits are listed
    without reading the tar (pimc_dist.eval.leakage; older sets fall back to a header scan)."""
    return f"shard-{index:06d}.keys.json"


def table_id(value: Any) -> str:
    """The id a shared JSON value goes by in the metadata tables: a hash of its JSON bytes,
    so shards written by different processes name the same value alike."""
    return hashlib.sha256(encode_json(value)).hexdigest()[:_TABLE_ID_CHARS]


def _merge_tables(
    into: dict[str, dict[str, Any]], tables: Mapping[str, Mapping[str, Any]], where: str
) -> list[str]:
    """Add `tables` to `into`; the problems of ids that name two different values."""
    problems = []
    for key, table in tables.items():
        mine = into.setdefault(key, {})
        for id_, value in table.items():
            if mine.setdefault(id_, value) != value:
                problems.append(f"{where}: meta_tables.{key} id {id_} names two different values")
    return problems


class ShardSetWriter:
    """Writes a shard set: tar shards, per-shard sidecars, then the manifest.

    Two ways to use it:

    - automatic: `write(sample)` again and again; a new shard starts every
      `max_samples` samples or `max_bytes` bytes, numbered from `start_index`;
    - explicit: `with writer.shard(index): writer.write(...)`. A sharder that
      assigns inputs to shard indices deterministically can then skip inputs
      whose shard is done (`writer.shard_done(index)`), which makes reruns and
      Slurm array tasks (disjoint index ranges) resumable. The size limits
      apply only to the automatic mode; here the caller decides what a shard holds.

    A sample is a dict: `__key__` plus members by suffix ("rp.png", "rsi.npy",
    "json"); values are arrays (encoded by extension), dicts (JSON) or bytes.
    Every sample must have the same members with the same dtypes and shapes.
    `skip(key, reason)` records an input that made no sample; the skip report
    beside the manifest lists them all. The JSON values under the keys of
    `meta_tables` (e.g. "dates") are stored once, in the manifest, and each
    sample's JSON holds their id (see pimc_dist.shardset.manifest).

    A shard is written under a temporary name and renamed when complete; its
    sidecar is written just before the rename, so a shard file under its final
    name always has its sidecar. A rerun that produces a shard already present
    keeps the file if the bytes agree and raises ShardError if they differ.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_samples: int = 4096,
        max_bytes: int = 256 * 2**20,
        start_index: int = 0,
        config: Any = None,
        source: str = "",
        classes: list[str] | tuple[str, ...] = (),
        kind: str = "pimc",
        png_level: int = 0,
        meta_tables: tuple[str, ...] | list[str] = (),
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.next_index = start_index
        self.config = _plain_config(config)
        self.source = source
        self.classes = [str(c) for c in classes]
        self.kind = kind
        self.png_level = png_level
        self.meta_tables = tuple(meta_tables)
        self._last_ids: dict[str, tuple[str, Any]] = {}
        self.views: dict[str, ViewSpec] | None = None
        self.members: list[str] | None = None
        self.written: list[ShardEntry] = []
        self._open: _OpenShard | None = None
        self._explicit = False

    # -- shard lifecycle ---------------------------------------------------

    def shard_done(self, index: int) -> bool:
        """True if shard `index` is complete: file under its final name with a matching sidecar.

        Raises ShardError for a shard file whose sidecar is missing or disagrees
        with it, rather than guess whether it is complete.
        """
        path = self.out_dir / shard_name(index)
        if not path.is_file():
            return False
        sidecar = self.out_dir / sidecar_name(index)
        try:
            info = json.loads(sidecar.read_text())
            size = int(info["bytes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardError(
                f"{path}: present but its sidecar {sidecar.name} is unreadable ({exc})"
            ) from exc
        if size != path.stat().st_size:
            raise ShardError(
                f"{path}: {path.stat().st_size} bytes but {sidecar.name} says {size}; "
                "remove both to rewrite the shard"
            )
        stale = stale_sidecar(sidecar, info)
        if stale:
            raise ShardError(stale)
        return True

    def begin_shard(self, index: int) -> None:
        """Start shard `index` (explicit mode); removes stale temporary files of that index."""
        if self._open is not None:
            raise ShardError(f"{self.out_dir}: shard {self._open.index} is still open")
        self._explicit = True
        self._start(index)

    def end_shard(self) -> ShardEntry | None:
        """Finish the open shard; returns its entry (None if it was empty and skipped nothing)."""
        shard, self._open = self._open, None
        self._explicit = False
        if shard is None:
            return None
        return self._finish(shard)

    @contextmanager
    def shard(self, index: int) -> Iterator[ShardSetWriter]:
        """`with writer.shard(i): ...` writes shard i; on an exception the partial shard is discarded."""
        self.begin_shard(index)
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.end_shard()

    def abort(self) -> None:
        """Discard the open shard (its temporary file); complete shards stay."""
        shard, self._open = self._open, None
        self._explicit = False
        if shard is not None:
            shard.file.close()
            shard.tmp.unlink(missing_ok=True)

    def _start(self, index: int) -> None:
        final = shard_name(index)
        for pattern in (f".{final}.*.tmp", f".{sidecar_name(index)}.*.tmp"):
            for stale in self.out_dir.glob(pattern):
                stale.unlink(missing_ok=True)  # left by a crashed run; never renamed into place
        tmp = self.out_dir / f".{final}.{os.getpid()}.tmp"
        self._open = _OpenShard(index, tmp, open(tmp, "wb", buffering=1 << 20))  # noqa: SIM115
        self.next_index = index + 1

    def _finish(self, shard: _OpenShard) -> ShardEntry | None:
        shard.write(END_OF_ARCHIVE)
        shard.file.flush()
        os.fsync(shard.file.fileno())
        shard.file.close()
        if shard.samples == 0 and not shard.skipped:
            shard.tmp.unlink(missing_ok=True)
            return None
        name = shard_name(shard.index)
        final = self.out_dir / name
        entry = ShardEntry(name, shard.samples, shard.bytes, shard.digest.hexdigest())
        if final.exists():
            existing = sha256_file(final)
            if existing != entry.sha256:
                shard.tmp.unlink(missing_ok=True)
                raise ShardError(
                    f"{final}: already exists with different content (sha256 {existing[:16]}... != "
                    f"{entry.sha256[:16]}... just written); remove it or write to a new folder"
                )
        sidecar = {
            "schema_version": SCHEMA_VERSION,
            "index": shard.index,
            "name": name,
            "samples": shard.samples,
            "bytes": shard.bytes,
            "sha256": entry.sha256,
            "kind": self.kind,
            "source": self.source,
            "classes": self.classes,
            "members": self.members or [],
            "views": {
                k: {"ext": v.ext, "dtype": v.dtype, "shape": list(v.shape)}
                for k, v in (self.views or {}).items()
            },
            "stats": {k: s.to_json() for k, s in shard.stats.items()},
            "skipped": shard.skipped,
            "meta_tables": shard.tables,
            "split_counts": shard.splits,
            "fold_counts": shard.folds,
        }
        keys = {
            "version": KEYS_VERSION,
            "sha256": entry.sha256,
            "keys": [k for k, _ in shard.key_rows],
            "group": [g for _, g in shard.key_rows],
            "groups": [list(g) for g in shard.key_groups],
        }
        write_json_atomic(self.out_dir / keys_name(shard.index), keys, indent=None)
        write_json_atomic(self.out_dir / sidecar_name(shard.index), sidecar, sort_keys=True)
        if final.exists():
            shard.tmp.unlink(missing_ok=True)  # identical bytes: the rerun changes nothing
        else:
            os.replace(shard.tmp, final)
        self.written.append(entry)
        return entry

    # -- samples -----------------------------------------------------------

    def _ensure_open(self) -> _OpenShard:
        if self._open is None:
            self._start(self.next_index)
        return self._open

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; raises ValueError naming the key on a bad or inconsistent sample."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"sample key {key!r} must be a non-empty str of letters, digits, _ - /"
            )
        members = sorted(k for k in sample if not k.startswith("__"))
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        encoded = []
        arrays = {}
        shared: dict[str, tuple[str, Any]] = {}
        for suffix in members:
            value = sample[suffix]
            if suffix == "json" and self.meta_tables and isinstance(value, Mapping):
                shared = self._table_ids(value)
                value = {**value, **{k: id_ for k, (id_, _) in shared.items()}}
            try:
                data, array = encode_member(suffix, value, self.png_level)
            except ValueError as exc:
                raise ValueError(f"sample {key!r}, member {suffix!r}: {exc}") from exc
            name = f"{key}.{suffix}"
            if len(name.encode()) > 100:
                raise ValueError(f"sample {key!r}: member name {name!r} longer than 100 bytes")
            encoded.append((name, data))
            if array is not None:
                arrays[suffix.split(".", 1)[0]] = (suffix.rsplit(".", 1)[-1], array)
        self._check_consistent(key, members, arrays)
        size = sum(BLOCK + len(d) + len(tar_padding(len(d))) for _, d in encoded)
        if (
            not self._explicit
            and self._open is not None
            and self._open.samples > 0
            and self._open.bytes + size > self.max_bytes
        ):
            self._finish_auto()
        shard = self._ensure_open()
        if key in shard.keys:
            raise ValueError(f"sample key {key!r} appears twice in {shard_name(shard.index)}")
        shard.keys.add(key)
        meta_of = sample.get("json") if isinstance(sample.get("json"), Mapping) else {}
        group = tuple(meta_of.get(k) for k in ("patch", "fold", "split", "group"))
        shard.key_rows.append((key, shard.key_groups.setdefault(group, len(shard.key_groups))))
        for k, (id_, value) in shared.items():
            table = shard.tables.setdefault(k, {})
            if id_ not in table:
                table[id_] = json.loads(encode_json(value))  # as JSON gives it back
        for name, data in encoded:
            shard.write(tar_header(name, len(data)))
            shard.write(data)
            shard.write(tar_padding(len(data)))
        for view, (_, array) in arrays.items():
            shard.stats.setdefault(view, RunningStats()).add(array)
        meta = sample.get("json")
        split = sample_split_key(meta)
        shard.splits[split] = shard.splits.get(split, 0) + 1
        fold = meta.get("fold") if isinstance(meta, Mapping) else None
        if fold is not None and not isinstance(fold, bool):
            shard.folds[str(fold)] = shard.folds.get(str(fold), 0) + 1
        shard.samples += 1
        if not self._explicit and (
            shard.samples >= self.max_samples or shard.bytes >= self.max_bytes
        ):
            self._finish_auto()

    def _table_ids(self, meta: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
        """key -> (id, value) of the values of `meta` stored in the metadata tables."""
        out = {}
        for k in self.meta_tables:
            if k not in meta:
                continue
            value = meta[k]
            last = self._last_ids.get(k)
            # Samples of one patch share the value object: hash it once per patch.
            if last is None or last[1] is not value:
                last = self._last_ids[k] = (table_id(value), value)
            out[k] = last
        return out

    def _finish_auto(self) -> None:
        shard, self._open = self._open, None
        self._finish(shard)

    def _check_consistent(
        self, key: str, members: list[str], arrays: dict[str, tuple[str, np.ndarray]]
    ) -> None:
        for view, (_, array) in arrays.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"sample {key!r}, view {view!r}: contains NaN or infinity")
        views = {
            view: ViewSpec(ext, np.dtype(array.dtype).name, tuple(int(s) for s in array.shape))
            for view, (ext, array) in arrays.items()
        }
        if self.views is None:
            self.views, self.members = views, members
            return
        if members != self.members:
            raise ValueError(
                f"sample {key!r} has members {members}, earlier samples {self.members}"
            )
        for view, spec in views.items():
            if spec != self.views[view]:
                raise ValueError(
                    f"sample {key!r}, view {view!r}: {spec.dtype} {spec.shape}, earlier samples "
                    f"{self.views[view].dtype} {self.views[view].shape}"
                )

    def skip(self, key: str, reason: str) -> None:
        """Record an input that made no sample (listed in the skip report beside the manifest)."""
        self._ensure_open().skipped.append({"key": str(key), "reason": str(reason)})

    def close(
        self, *, manifest: bool = True, expected_shards: int | None = None
    ) -> Manifest | None:
        """Finish the open shard and (by default) write manifest.json from every sidecar in the folder."""
        if self._open is not None:
            self._finish_auto()
        if not manifest:
            return None
        return merge_manifest(
            self.out_dir,
            config=self.config,
            source=self.source,
            kind=self.kind,
            classes=self.classes,
            expected_shards=expected_shards,
        )

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def merge_manifest(
    out_dir: str | os.PathLike,
    *,
    config: Any = None,
    source: str | None = None,
    kind: str | None = None,
    classes: list[str] | tuple[str, ...] | None = None,
    expected_shards: int | None = None,
) -> Manifest:
    """Assemble manifest.json and the skip report from the shard sidecars in `out_dir`.

    Works for shards written by any number of processes. Raises ShardError
    listing every problem: a shard without a sidecar, sidecars that disagree
    (source, kind, classes, views), or with `expected_shards`, missing indices.
    `source`, `kind`, `classes` default to those of the sidecars.
    """
    root = Path(out_dir)
    problems = []
    sidecars = []
    for path in sorted(root.glob("shard-*.stats.json")):
        tar = root / path.name.replace(".stats.json", ".tar")
        if not tar.is_file():
            continue  # written just before a crash, before its shard was renamed into place
        try:
            info = json.loads(path.read_text())
            info["index"] = int(info["index"])
            for key in (
                "name",
                "samples",
                "bytes",
                "sha256",
                "kind",
                "source",
                "classes",
                "views",
                "stats",
                "meta_tables",
            ):
                info[key]  # noqa: B018 (presence check)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path}: unreadable sidecar ({exc!r})")
            continue
        stale = stale_sidecar(path, info)
        if stale:
            problems.append(stale)
            continue
        if tar.stat().st_size != info["bytes"]:
            problems.append(f"{tar}: {tar.stat().st_size} bytes, its sidecar says {info['bytes']}")
        sidecars.append(info)
    for tar in sorted(root.glob("shard-*.tar")):
        sidecar = root / tar.name.replace(".tar", ".stats.json")
        if not sidecar.exists():
            problems.append(f"{tar}: no sidecar {sidecar.name}")
    if not sidecars and not problems:
        raise ShardError(f"{root}: no complete shards to list in a manifest")
    reference = {
        "kind": kind if kind is not None else (sidecars[0]["kind"] if sidecars else ""),
        "source": source if source is not None else (sidecars[0]["source"] if sidecars else ""),
        "classes": list(classes)
        if classes is not None
        else (sidecars[0]["classes"] if sidecars else []),
    }
    views: dict[str, Any] | None = None
    members: list[str] | None = None
    for info in sidecars:
        for field_name, expected in reference.items():
            if info[field_name] != expected:
                problems.append(
                    f"{root / info['name']}: {field_name} {info[field_name]!r}, expected {expected!r}"
                )
        if info["samples"] == 0:
            continue  # an empty shard (only skips) sets no views
        if views is None:
            views, members = info["views"], info.get("members", [])
        elif info["views"] != views or info.get("members", []) != members:
            problems.append(f"{root / info['name']}: views {info['views']} differ from {views}")
    tables: dict[str, dict[str, Any]] = {}
    for info in sorted(sidecars, key=lambda info: info["index"]):
        problems += _merge_tables(tables, info["meta_tables"], str(root / info["name"]))
    indices = {info["index"] for info in sidecars}
    if expected_shards is not None:
        missing = [shard_name(i) for i in range(expected_shards) if i not in indices]
        if missing:
            problems.append(
                f"{root}: {len(missing)} shard(s) not written yet: {', '.join(missing[:10])}"
            )
    if problems:
        lines = "\n  ".join(problems)
        raise ShardError(
            f"{root}: cannot write the manifest, {len(problems)} problem(s):\n  {lines}"
        )
    sidecars.sort(key=lambda info: info["index"])
    stats: dict[str, RunningStats] = {}
    skipped = []
    splits: dict[str, int] = {}
    folds: dict[str, int] = {}
    for info in sidecars:
        for view, data in info["stats"].items():
            stats.setdefault(view, RunningStats()).merge(RunningStats.from_json(data))
        skipped += [{"shard": info["name"], **entry} for entry in info["skipped"]]
        for into, key in ((splits, "split_counts"), (folds, "fold_counts")):
            for name, n in info.get(key, {}).items():  # absent in older sidecars
                into[name] = into.get(name, 0) + int(n)
    plain_config = _plain_config(config)
    shards = [
        {"name": i["name"], "samples": i["samples"], "bytes": i["bytes"], "sha256": i["sha256"]}
        for i in sidecars
    ]
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": reference["kind"],
        "source": reference["source"],
        "config": plain_config,
        "classes": reference["classes"],
        "views": views or {},
        "members": members or [],
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "stats": {
            view: {"mean": s.mean.tolist(), "std": s.std.tolist()}
            for view, s in sorted(stats.items())
            if s.n
        },
        "skipped": len(skipped),
        "report": REPORT_NAME,
        "meta_tables": {k: dict(sorted(t.items())) for k, t in sorted(tables.items())},
        "split_counts": resolve_split_counts(splits, plain_config),
        "fold_counts": dict(sorted(folds.items())),
    }
    write_json_atomic(
        root / REPORT_NAME, {"skipped": skipped, "count": len(skipped)}, sort_keys=True
    )
    write_json_atomic(root / MANIFEST_NAME, data, sort_keys=True)
    return read_manifest(root)
