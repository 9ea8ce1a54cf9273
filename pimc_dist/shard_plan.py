"""The shard plan: which patches of a dataset go to which shard, fixed by the first run.

The plan assigns patches to shard indices in reading order, a fixed number per
shard (from `data.max_samples_per_shard` and `data.max_shard_bytes`, the sample
size measured on the first readable patch). It is written to `plan.json` by the
first run and reused by every later run and array task; a run whose config or
dataset differs from the plan stops before any work. Also here: the checks of
the `data` section the schema cannot make, and how a record becomes samples.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pimc_dist import config as config_lib
from pimc_dist import samples as samples_lib
from pimc_dist.samples import PixelSampling, check_crop_source
from pimc_dist.shardset import ShardError, encode_member
from pimc_dist.sources import SOURCES, SourceError, geotiff_stack, reben
from pimc_dist.sources.base import split_fractions

PLAN_NAME = "plan.json"
PLAN_SCHEMA = 2  # 2: the data.* reader options (with_s1, eurosat_bands, ...) in the config
# data.* fields that say how or where a run works, not what the shards hold: they may
# differ between reruns and array tasks, and are left out of the plan and the manifest.
RUN_ONLY_FIELDS = ("shard_dir", "workers", "shard_start", "shard_count", "max_skipped_fraction")
HASH_SPLIT_SOURCES = ("geotiff_stack", "point_series")  # their splits: data.hash_split's names
PROBE_PATCHES = 8  # patches tried when measuring the sample size for the plan
BYTES_MARGIN = 1.25  # samples vary in size (PNG, JSON); keep shards under the byte limit


def _fail(key: str, problem: str) -> None:
    raise config_lib.ConfigError(f"data.{key}: {problem}")


def check_data(data: Any) -> None:
    """Check the values of the `data` section that the schema cannot; ConfigError naming the key."""
    if data.source not in SOURCES:
        _fail("source", f"unknown source {data.source!r} (known: {', '.join(SOURCES)})")
    if data.source != "demo" and not data.root:
        _fail("root", f"required for source {data.source!r}: the dataset's folder or file")
    minimum = {
        "pixels_per_patch": 1,
        "crop_size": 1,
        "rp_size": 0,
        "grid_step_days": 1,
        "patch_size": 1,
        "s2_size": 1,
        "max_samples_per_shard": 1,
        "max_shard_bytes": 1,
        "workers": 0,
        "shard_start": 0,
    }
    for key, low in minimum.items():
        if data[key] < low:
            _fail(key, f"must be >= {low}, got {data[key]}")
    for key in ("shard_count", "grid_length"):
        if data[key] is not None and data[key] < 1:
            _fail(key, f"must be >= 1 or null, got {data[key]}")
    if not 0.0 <= data.max_skipped_fraction <= 1.0:
        _fail("max_skipped_fraction", f"must be in [0, 1], got {data.max_skipped_fraction}")
    if not 0.0 < data.label_threshold <= 1.0:
        _fail("label_threshold", f"must be in (0, 1], got {data.label_threshold}")
    choices = {
        "eurosat_bands": ("ms", "rgb"),
        "eurosat_band_order": ("file", "standard"),
        "reben_encoding": ("auto", "lmdb", "geotiff"),
        "reben_resample": ("nearest", "bilinear"),
    }
    for key, allowed in choices.items():
        if data[key] not in allowed:
            _fail(key, f"must be one of {', '.join(allowed)}, got {data[key]!r}")
    if data.image_size is not None and data.image_size < 1:
        _fail("image_size", f"must be >= 1 or null, got {data.image_size}")
    if not data.dn_scale > 0:
        _fail("dn_scale", f"must be > 0, got {data.dn_scale}")
    try:
        check_crop_source(data.crop_source)
    except ValueError as exc:
        _fail("crop_source", str(exc))
    if data.grid_start is not None:
        try:
            dt.date.fromisoformat(data.grid_start)
        except ValueError:
            _fail("grid_start", f"must be an ISO date (YYYY-MM-DD), got {data.grid_start!r}")
    _check_splits(data)
    if data.source == "geotiff_stack":
        _check_geotiff(data)


def _check_splits(data: Any) -> None:
    """data.hash_split's fractions, and data.split one of the splits the source knows."""
    try:
        fractions = split_fractions(dict(data.hash_split) or None)
    except ValueError as exc:  # its message names data.hash_split
        raise config_lib.ConfigError(str(exc)) from None
    if data.split is None:
        return
    if data.source in HASH_SPLIT_SOURCES:
        allowed = list(fractions)
    elif data.source == "reben":
        allowed = list(reben.SPLIT_ALIASES)
    else:
        allowed = ["train", "val", "test"]
    if data.split not in allowed:
        _fail("split", f"{data.split!r} is not one of {', '.join(allowed)}")


def _check_geotiff(data: Any) -> None:
    """The GeoTIFF stack keys a reader would otherwise reject without naming them."""
    if data.band_order not in geotiff_stack.ORDERS:
        _fail(
            "band_order",
            f"must be one of {', '.join(geotiff_stack.ORDERS)}, got {data.band_order!r}",
        )
    if not data.dates:
        _fail("dates", "required for source 'geotiff_stack': the date of each acquisition")
    for value in data.dates:
        try:
            geotiff_stack.parse_date(value)
        except (TypeError, ValueError) as exc:
            _fail("dates", f"{value!r} is not a date (YYYY-MM-DD or YYYYMMDD): {exc}")


def check_grid(data: Any, source: Any) -> None:
    """data.grid_start against the dataset's dates, where the reader knows them up front: a
    grid entirely after (or, with data.grid_length, before) them makes no series."""
    if data.grid_start is None or source.date_range is None:
        return
    start = dt.date.fromisoformat(data.grid_start)
    first, last = source.date_range
    span = f"the data's dates run {first} .. {last}"
    if start > last:
        _fail("grid_start", f"{start} is after every date: {span}")
    if data.grid_length is not None:
        end = start + dt.timedelta(days=data.grid_step_days * (data.grid_length - 1))
        if end < first:
            _fail(
                "grid_start",
                f"the grid {start} .. {end} (data.grid_length={data.grid_length} steps of "
                f"data.grid_step_days={data.grid_step_days}) ends before every date: {span}",
            )


def content_config(data: Any) -> dict[str, Any]:
    """The `data` section without the run-only fields: what the plan and the manifest record."""
    plain = OmegaConf.to_container(data, resolve=True) if hasattr(data, "_metadata") else dict(data)
    return {k: v for k, v in plain.items() if k not in RUN_ONLY_FIELDS}


@dataclass(frozen=True)
class ShardPlan:
    """Which patches go to which shard; the same for every run and array task of a set."""

    source: str
    kind: str
    n_patches: int
    patch_ids_sha256: str
    samples_per_patch: int  # at most
    sample_bytes: int  # measured on one patch (0: no patch could be read to measure)
    patches_per_shard: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_patches / self.patches_per_shard)

    def patches(self, index: int) -> range:
        start = index * self.patches_per_shard
        return range(start, min(start + self.patches_per_shard, self.n_patches))

    def identity(self) -> dict[str, Any]:
        """What must agree between runs writing into one shard set."""
        return {
            "source": self.source,
            "kind": self.kind,
            "n_patches": self.n_patches,
            "patch_ids_sha256": self.patch_ids_sha256,
            "config": self.config,
        }


def patch_ids(reader: Any) -> list[str]:
    """Ids of a reader's records in reading order (`patch_ids` or `ids`, else positions)."""
    ids = getattr(reader, "patch_ids", None)
    if ids is None:
        ids = getattr(reader, "ids", None)
    if ids is None:
        ids = [f"#{i}" for i in range(len(reader))]
    return [str(i) for i in ids]


def pixel_sampling(data: Any, source: Any) -> Any:
    """`samples.PixelSampling` from the `data` config section and the opened source."""
    return PixelSampling(
        pixels_per_patch=data.pixels_per_patch,
        stratify=data.stratify,
        exclude_labels=tuple(source.exclude_labels),
        grid_step_days=data.grid_step_days,
        grid_start=dt.date.fromisoformat(data.grid_start) if data.grid_start else None,
        grid_length=data.grid_length,
        rp_size=data.rp_size,
        crop_size=data.crop_size,
        crop_source=data.crop_source,
        seed=data.seed,
    )


def build_samples(source: Any, index: int, sampling: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of record `index` of `source`, and notes on what was left out.

    Raises what the reader raises for a bad file (SourceError naming it).
    """
    record = source.reader[index]
    if source.kind == "pimc":
        return samples_lib.pimc_samples(record, sampling)
    if source.kind == "mosaic":
        return [samples_lib.mosaic_sample(record, source.classes)], []
    return [samples_lib.scene_sample(record, source.classes)], []


def _encoded_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header plus padded payload per member."""
    total = 0
    for suffix, value in sample.items():
        if not suffix.startswith("__"):
            data, _ = encode_member(suffix, value)
            total += 512 + -(-len(data) // 512) * 512
    return total


def _measure_sample_bytes(source: Any, sampling: Any) -> int:
    """Bytes of the largest sample of the first readable patch (0 if none reads)."""
    for index in range(min(PROBE_PATCHES, len(source.reader))):
        try:
            made, _ = build_samples(source, index, sampling)
        except (SourceError, ValueError, OSError) as exc:
            if getattr(exc, "fatal", False):  # e.g. a label without a name: stop before a plan
                raise
            continue
        if made:
            return max(_encoded_bytes(s) for s in made)
    return 0


def _new_plan(data: Any, source: Any, ids: list[str], identity_only: bool = False) -> ShardPlan:
    per_patch = source.samples_per_record or (data.pixels_per_patch if source.kind == "pimc" else 1)
    sample_bytes = 0
    per_shard = max(1, data.max_samples_per_shard // per_patch)
    if not identity_only:
        sample_bytes = _measure_sample_bytes(source, pixel_sampling(data, source))
        if sample_bytes:
            patch_bytes = math.ceil(sample_bytes * BYTES_MARGIN) * per_patch
            per_shard = max(1, min(per_shard, data.max_shard_bytes // patch_bytes))
    return ShardPlan(
        source=source.name,
        kind=source.kind,
        n_patches=len(ids),
        patch_ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        samples_per_patch=per_patch,
        sample_bytes=sample_bytes,
        patches_per_shard=per_shard,
        config=content_config(data),
    )


def _read_plan(path: Path) -> ShardPlan:
    try:
        info = json.loads(path.read_text())
        if info.pop("schema_version") != PLAN_SCHEMA:
            raise ValueError(f"schema_version is not {PLAN_SCHEMA}")
        info.pop("n_shards", None)
        plan = ShardPlan(**info)
        if plan.patches_per_shard < 1:
            raise ValueError("patches_per_shard must be >= 1")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(
            f"{path}: unreadable shard plan ({exc}); remove the folder to start over"
        ) from None
    return plan


def plan_text(plan: ShardPlan) -> str:
    """plan.json's text: the plan, its schema version and its number of shards."""
    info = {"schema_version": PLAN_SCHEMA, **asdict(plan), "n_shards": plan.n_shards}
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


def load_or_create_plan(data: Any, source: Any, out: Path) -> ShardPlan:
    """The plan in `out/plan.json` if it matches this config and dataset, else a new one.

    Raises ShardError when the folder holds a plan (or shards) of another config or dataset.
    """
    ids = patch_ids(source.reader)
    if not ids:
        raise SourceError(
            data.root or data.source, "the dataset has no patches (check split/folds)"
        )
    path = out / PLAN_NAME
    if not path.is_file():
        leftovers = sorted(p.name for p in out.glob("shard-*.tar"))
        if leftovers:
            raise ShardError(
                f"{out}: holds shards ({leftovers[0]}, ...) but no {PLAN_NAME}, so they cannot be "
                "matched to this config; remove them or write to a new data.shard_dir"
            )
        plan = _new_plan(data, source, ids)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{PLAN_NAME}.{os.getpid()}.tmp"
        tmp.write_text(plan_text(plan))
        try:
            os.link(tmp, path)  # atomic create-if-absent: concurrent array tasks agree on one plan
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system: same inputs give the same plan
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    stored = _read_plan(path)
    wanted = _new_plan(data, source, ids, identity_only=True).identity()
    if stored.identity() != wanted and _holds_no_sample(out):
        # Nothing was made under that plan (every patch skipped, e.g. for a config mistake
        # such as band_names without B08): it binds nothing; this config plans afresh.
        print(
            f"{path}: planned with another config ({_config_keys(stored, wanted)}) under which "
            "no sample was written; discarding it and its empty shards, planning anew"
        )
        _discard_empty_set(out)
        return load_or_create_plan(data, source, out)
    if stored.identity() != wanted:
        differ = [k for k in wanted if stored.identity()[k] != wanted[k]]
        if "config" in differ:
            keys = sorted(
                k
                for k in set(wanted["config"]) | set(stored.config)
                if wanted["config"].get(k) != stored.config.get(k)
            )
            differ[differ.index("config")] = "config (data." + ", data.".join(keys) + ")"
        raise ShardError(
            f"{path}: this shard set was planned with another {' and '.join(differ)}; "
            "rerun with the same settings, or write to a new data.shard_dir"
        )
    return stored


def _config_keys(stored: ShardPlan, wanted: dict[str, Any]) -> str:
    """The data.* keys (or plan fields) in which a stored plan differs from the wanted one."""
    keys = sorted(
        f"data.{k}"
        for k in set(wanted["config"]) | set(stored.config)
        if wanted["config"].get(k) != stored.config.get(k)
    )
    keys += [k for k in wanted if k != "config" and stored.identity()[k] != wanted[k]]
    return ", ".join(keys) or "?"


def _holds_no_sample(out: Path) -> bool:
    """True when the set's folder holds no manifest and no shard with a sample in it."""
    if (out / "manifest.json").exists():
        return False
    for sidecar in out.glob("shard-*.stats.json"):
        try:
            if int(json.loads(sidecar.read_text()).get("samples", 1)) > 0:
                return False
        except (OSError, ValueError, TypeError):
            return False
    sidecars = {p.name.removesuffix(".stats.json") for p in out.glob("shard-*.stats.json")}
    # A shard file without a sidecar cannot be told empty: keep the plan binding.
    return all(p.name.removesuffix(".tar") in sidecars for p in out.glob("shard-*.tar"))


def _discard_empty_set(out: Path) -> None:
    """Remove a plan, its empty shards, their sidecars and the skip report."""
    for pattern in ("shard-*.tar", "shard-*.stats.json", "skipped.json", PLAN_NAME):
        for item in out.glob(pattern):
            item.unlink(missing_ok=True)


def task_range(data: Any, plan: ShardPlan, rank: int = 0, world: int = 1) -> list[int]:
    """Shard indices this process writes: `data.shard_start/shard_count`, split among ranks."""
    first = data.shard_start
    if first >= plan.n_shards:
        raise ValueError(
            f"data.shard_start={first}, but the set has only {plan.n_shards} shards "
            f"(0..{plan.n_shards - 1}); size the Slurm array to match"
        )
    last = (
        plan.n_shards if data.shard_count is None else min(plan.n_shards, first + data.shard_count)
    )
    return [i for i in range(first, last) if (i - first) % world == rank]
