"""The shard format in one place: WebDataset tar shards, their manifest, and the loader.

Modules, each importing only those listed before it:

- errors:   ShardError, TarError, LoaderError
- codec:    PNG / NPY / JSON bytes of one sample member, both ways
- tar:      deterministic tar members; `iter_shard_samples`, the fast reader
- manifest: names, schema version, `Manifest` (views, statistics, metadata tables),
            `read_manifest`, `verify`
- writer:   `ShardSetWriter` (shards, sidecars), `merge_manifest`
- reader:   loader stages 1-2: which shards and samples each worker reads; reading, shuffling;
            `ShardHealth`, shards left out mid-run for their losses
- decoder:  loader stage 3: check and decode raw samples
- batch:    loader stage 4: batches of arrays (PNG filters, `dihedral` flips); `normalize_views`
- ring:     batches through a shared-memory ring between DataLoader workers and the trainer
- stream:   `ShardStream`, the stages chained for one rank
- loader:   `build_loader` (from a job config), `open_loader` (from arguments), `ShardLoader`: DataLoader workers, start-up checks
"""

from pimc_dist.shardset.batch import (
    BatchBuilder,
    MetaList,
    as_tensors,
    dihedral,
    normalize_views,
    random_transforms,
    unfilter_rows,
    view_normalisation,
)
from pimc_dist.shardset.codec import (
    decode_npy,
    decode_png,
    encode_json,
    encode_member,
    encode_npy,
    encode_png,
)
from pimc_dist.shardset.decoder import SampleDecoder, decode
from pimc_dist.shardset.errors import LoaderError, ShardError, TarError
from pimc_dist.shardset.loader import ShardLoader, build_loader, open_loader, usable_manifest
from pimc_dist.shardset.manifest import (
    MANIFEST_NAME,
    REPORT_NAME,
    SCHEMA_VERSION,
    Manifest,
    RunningStats,
    ShardEntry,
    ViewSpec,
    ViewStats,
    decode_meta,
    ensure_valid,
    read_manifest,
    sha256_file,
    shard_name,
    shard_problems,
    sidecar_name,
    unlisted_shards,
    verify,
    view_stats_arrays,
)
from pimc_dist.shardset.reader import (
    LoaderStats,
    ReadTask,
    ShardHealth,
    batched,
    exact_split,
    read_samples,
    resampled_tasks,
    shuffled,
)
from pimc_dist.shardset.ring import BatchRing, RingBatch
from pimc_dist.shardset.stream import ShardStream, SharedEpoch
from pimc_dist.shardset.tar import iter_shard_samples
from pimc_dist.shardset.writer import ShardSetWriter, merge_manifest

__all__ = [
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SCHEMA_VERSION",
    "BatchBuilder",
    "BatchRing",
    "LoaderError",
    "LoaderStats",
    "Manifest",
    "MetaList",
    "ReadTask",
    "RingBatch",
    "RunningStats",
    "SampleDecoder",
    "ShardEntry",
    "ShardError",
    "ShardHealth",
    "ShardLoader",
    "ShardSetWriter",
    "ShardStream",
    "SharedEpoch",
    "TarError",
    "ViewSpec",
    "ViewStats",
    "as_tensors",
    "batched",
    "build_loader",
    "normalize_views",
    "open_loader",
    "decode",
    "decode_meta",
    "decode_npy",
    "decode_png",
    "dihedral",
    "encode_json",
    "encode_member",
    "encode_npy",
    "encode_png",
    "ensure_valid",
    "exact_split",
    "iter_shard_samples",
    "merge_manifest",
    "random_transforms",
    "read_manifest",
    "read_samples",
    "resampled_tasks",
    "sha256_file",
    "shard_name",
    "shard_problems",
    "shuffled",
    "sidecar_name",
    "unfilter_rows",
    "unlisted_shards",
    "usable_manifest",
    "view_normalisation",
    "verify",
    "view_stats_arrays",
]
