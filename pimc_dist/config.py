"""Structured job configs: one YAML per job, merged with dotted command-line overrides.

`load("configs/pretrain/pimc.yaml", ["train.lr=3e-4"])` returns a typed, fully
resolved OmegaConf `DictConfig` of `JobConfig`. Unknown keys, wrong types and
missing required values fail here, before any work starts, with a
`ConfigError` naming the key and where it came from (file or command line).

A YAML file may start from other files with `base: <path>` (or a list of
paths), relative to itself; later files and then the overrides win.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pimc_dist.files import write_atomic

CONFIG_FILE = "config.yaml"  # the resolved config of a run, in its run folder


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its origin."""


@dataclass
class DataConfig:
    """What to shard: the raw dataset, how samples are made, where shards go."""

    name: str = "demo"  # shard set name; shards land in shards/<name>
    source: str = "demo"  # demo | pastis | geotiff_stack | point_series | eurosat | reben | sen12ms
    root: str = ""  # raw dataset folder (a file or glob for geotiff_stack); demo: where to write it
    shard_dir: str = "shards/${data.name}"
    split: str | None = None  # train | val | test; None = everything
    folds: list[int] | None = None  # PASTIS folds (1-5); None = from split + fold_rotation
    fold_rotation: int = 0
    # Generic GeoTIFF stack: band names and ISO dates of the file's bands.
    band_names: list[str] = field(default_factory=list)
    dates: list[str] = field(default_factory=list)
    band_order: str = "date_major"
    patch_size: int = 128
    nodata: float | None = 0.0  # a pixel-date whose bands all equal it is invalid; None = none
    dn_scale: float = 10000.0  # reflectance = (DN + dn_offset) / dn_scale
    dn_offset: float = 0.0  # -1000 for L2A of processing baseline 04.00 (after 2022-01-25)
    # Class raster of each stack (one band, same size): a path, or a pattern in which
    # {stem} is the stack's file name without extension (for a glob in data.root).
    label_path: str | None = None
    # GeoTIFF stacks and point tables: class_names[i] names label value i (a value with no
    # name stops sharding); label_ignore: values that are no class (not sampled).
    class_names: list[str] = field(default_factory=list)
    label_ignore: list[int] = field(default_factory=list)
    # Their split (data.split): the split column, else a seeded hash of the group (patch,
    # `group` column, else sample) with these fractions; {} = train 0.7, val 0.15, test 0.15.
    hash_split: dict[str, float] = field(default_factory=dict)
    split_seed: int = 0
    # Point tables (source point_series, long format): column names.
    id_column: str = "sample_id"
    date_column: str = "date"
    label_column: str = "label"
    split_column: str = "split"
    group_column: str = "group"
    # PASTIS-R: also crop the Sentinel-1 series (per-orbit median) into an s1.npy view.
    with_s1: bool = False
    # EuroSAT: ms (13-band GeoTIFF, uint16 DN) | rgb (the JPEGs, uint8 B04 B03 B02);
    # band order of ms: file (B8A last, as distributed) | standard (B8A after B08).
    eurosat_bands: str = "ms"
    eurosat_band_order: str = "file"
    # EuroSAT and SEN12MS: height = width every image must have (64 and 256 in the
    # releases); None = that of the first image in reading order. Others are skipped.
    image_size: int | None = None
    # reBEN: image encoding (auto | lmdb | geotiff) and how the 20/60 m bands are brought
    # to the s2_size grid (nearest: DN kept as uint16 | bilinear: float32).
    reben_encoding: str = "auto"
    reben_resample: str = "nearest"
    # PIMC samples.
    pixels_per_patch: int = 64
    stratify: bool = True
    grid_step_days: int = 10
    grid_start: str | None = None  # ISO date; None = first acquisition
    grid_length: int | None = None  # None = up to the last acquisition
    rp_size: int = 0  # 0 = native T' x T'
    crop_size: int = 16
    crop_source: str = "median"  # median (cloud-free composite) | date:<index>
    # MoSAiC samples.
    s2_size: int = 120
    label_threshold: float = 0.1
    drop_snow_cloud: bool = False
    # Output.
    seed: int = 0
    max_samples_per_shard: int = 4096
    max_shard_bytes: int = 256 * 2**20
    workers: int = 0  # 0 = all cores
    shard_start: int = 0  # first shard index this task writes (Slurm array tasks)
    shard_count: int | None = None  # None = all remaining
    # Inputs (patches) that may fail to read before the set is refused (no manifest, exit 1).
    max_skipped_fraction: float = 0.05


@dataclass
class LoaderConfig:
    """How training reads shards."""

    shards: str = "${data.shard_dir}"
    views: list[str] = field(default_factory=lambda: ["rp", "rsi"])
    workers: int = 2
    shuffle_buffer: int = 2000
    resampled: bool = True  # sample shards with replacement (training); False = exact epochs
    augment: bool = True  # flips and 90-degree rotations of crops
    # Views flipped/rotated together (co-registered crops get the same transform per sample);
    # recurrence plots never are (a transpose is their only symmetry, and they are symmetric).
    augment_views: list[str] = field(default_factory=lambda: ["rsi", "s2", "s1", "image"])
    # (x - mean) / std per channel from the manifest, float32, on the training device
    normalize: bool = True
    rp_on_the_fly: str = "off"  # off | cpu | gpu: build plots from stored series
    verify: str = "size"  # none | size | sha256: check shard files against the manifest at start
    # Shards that fail that check are left out (logged, counted in data/shards_excluded);
    # if they hold more than this fraction of the samples the loader refuses the set.
    max_excluded_fraction: float = 0.1
    # A shard that loses more than this fraction of its samples while read (corrupt bytes
    # the size check cannot see) is left out for the rest of the run, counted the same way.
    max_shard_loss_fraction: float = 0.05
    prefetch_factor: int = 4  # batches each worker prepares ahead


@dataclass
class ViewAugmentConfig:
    """`augment.<view>`: the augmentations the training step draws of one view (MoSAiC's
    two per modality; pimc_dist.augment). The defaults are flips and rotations only."""

    crop_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # area fraction; 1: off
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # box aspect
    flips: bool = True  # flips and 90-degree rotations
    brightness: float = 0.0  # per-band factor 1 +- this (physical values, e.g. reflectance)
    contrast: float = 0.0  # per-band contrast factor 1 +- this, around the crop's band mean
    noise_db: float = 0.0  # sigma of additive Gaussian noise in dB (SAR backscatter in dB)


@dataclass
class ViewModelConfig:
    """The encoder of one view; None means "not set" (the encoder's own default)."""

    # resnet18 | resnet50 | vit_{tiny,small,base,large,huge,giant}[_p<N>], or any timm model
    # name with the timm extra (models/timm_encoders.py); for the series view a 1D encoder:
    # cnn1d_small | resnet1d18 (models/series.py)
    encoder: str | None = None
    in_chans: int | None = None  # series: the number of indices (3, or 1 for NDVI alone)
    img_size: int | None = None
    seq_len: int | None = None  # 1D encoders (instead of img_size): the series grid length
    patch_size: int | None = None  # ViT only
    share: str | None = None  # reuse this other view's whole tower
    share_encoder: str | None = None  # reuse only its encoder, with an own head
    pool: str | None = None  # ViT: cls | mean
    small_input: bool | None = None  # ResNet: 3x3 stem without max pool (default for <= 64 px)
    width: int | None = None  # ResNet base width (64 in the standard models)
    drop_path_rate: float | None = None
    # A local timm / torchgeo weights file (.pth, .safetensors) that starts the encoder, e.g.
    # SSL4EO-S12 Sentinel-2 weights; never downloaded (docs/usage.md#encoders).
    weights: str | None = None
    timm_args: dict[str, Any] | None = None  # timm models: more timm.create_model arguments
    head: dict[str, Any] | None = None  # per-view head overrides


@dataclass
class HeadConfig:
    depth: int = 2
    hidden_dim: int = 512
    out_dim: int = 128
    # LayerNorm, not BatchNorm: BN breaks with one sample per rank and leaks which
    # samples share a device into the contrastive task.
    norm: str = "ln"
    act: str = "gelu"


@dataclass
class ModelConfig:
    # View name -> encoder. Empty in the schema (a YAML names the views) because
    # OmegaConf merges dicts key by key: defaults here could not be removed by a file.
    views: dict[str, ViewModelConfig] = field(default_factory=dict)
    head: HeadConfig = field(default_factory=HeadConfig)
    shared_encoder: bool = False
    grad_checkpointing: bool = False
    init_temperature: float = 0.07


@dataclass
class LossConfig:
    name: str = "clip"  # clip | siglip | mosaic
    local_loss: bool = True
    gather_with_grad: bool = True
    max_logit_scale: float = 100.0
    w_intra: float = 1.0
    w_inter: float = 1.0
    w_sup: float = 1.0
    sup_positives: str = "any"  # any | weighted
    # Low-label MoSAiC: the SupCon term sees the labels of this share of the training samples
    # only (pimc_dist.label_subset: a hash of each sample's key with label_seed); the probe of
    # a low-label row uses the same fraction and seed, hence the same subset.
    label_fraction: float = 1.0
    label_seed: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/${name}"
    total_samples: int = 20_000  # global samples seen; the loop counts these, not epochs
    batch_size: int = 64  # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    deterministic: bool = False
    ckpt_every_steps: int = 200
    keep_last: int = 2
    log_every_steps: int = 10
    max_nonfinite_in_row: int = 5
    collective_timeout_s: int = 600
    export_on_end: bool = True
    compile: bool = False  # torch.compile the encoders (models.compile_encoders)
    # Save a checkpoint and exit 0 once this many steps are done (the run resumes
    # later with the same total); for time-sliced allocations. None = run to the end.
    stop_after_steps: int | None = None
    # Start over at step 0 in a run folder that holds metrics.jsonl but no checkpoint (its
    # checkpoints were deleted, or it died before the first): the old metrics.jsonl is moved
    # to metrics.jsonl.<time>. Without it such a folder is refused. With a checkpoint the
    # run resumes as usual (a requeued restart=true job resumes).
    restart: bool = False


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    bf16: bool = False
    config_file: str | None = None  # a JSON under configs/deepspeed/; its keys win


@dataclass
class TrackingConfig:
    wandb: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "pimc_dist"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_images: int = 8
    verbose: bool = (
        False  # let W&B print its banner and summary (else one line: where its files are)
    )


@dataclass
class LaunchConfig:
    cluster: str = "auto"  # auto | slurm | local
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU ranks
    tasks_per_node: int = 2  # ranks per node when there are no GPUs
    cpus_per_task: int = 1
    mem: str | None = None
    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    max_requeues: int = 3
    signal_delay_s: int = 120


@dataclass
class FinetuneConfig:
    """Downstream evaluation of pretrained encoders (pimc_dist/finetune.py, pimc_dist/tasks.py)."""

    # pastis_forecast | pixel_cls | pastis_pixel_cls | eurosat_cls | reben_multilabel | sen12ms_multilabel
    task: str = "pastis_pixel_cls"
    # linear: frozen encoder, features cached, a grid of linear heads (probe_lrs) in one pass;
    # finetune: the whole model through DeepSpeed (train.lr, train.batch_size, ...);
    # cnn1d: a 1D CNN on the raw index series instead of the encoders (PIMC tasks' baseline).
    protocol: str = "linear"
    init: str = "pretrained"  # pretrained (weights from ckpt) | random (same architecture)
    # encoders.safetensors, or a pretraining run folder holding it and config.yaml (which then
    # defines the encoder architecture; without one, model.views of this config does).
    ckpt: str | None = None
    inputs: list[str] = field(default_factory=list)  # [] = the task's default inputs
    # Input view -> the pretrained view whose encoder it runs through (e.g. image: rsi).
    encoder_views: dict[str, str] = field(default_factory=dict)
    # Input view -> band names to keep, in this order (to match a pretrained encoder's bands).
    input_bands: dict[str, list[str]] = field(default_factory=dict)
    # Shard sets per split; None = loader.shards. Every sample's split comes from its JSON
    # (PASTIS: fold + fold_rotation; others: "split"; neither: the sharder's hash of its
    # group, with the data.hash_split / data.split_seed recorded in the set's manifest).
    train_shards: str | None = None
    val_shards: str | None = None
    test_shards: str | None = None
    fold_rotation: int = 0
    label_fraction: float = 1.0  # share of the training split with labels (see loss.label_seed)
    max_samples_per_split: int | None = None  # cap (seeded random subset); None = all
    probe_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    probe_epochs: int = 60
    probe_batch_size: int = 256
    probe_weight_decay: float = 0.0
    epochs: int = 10  # full fine-tuning and cnn1d epochs
    augment: bool = True  # flips/rotations of crop views while fine-tuning
    eval_batch_size: int = 256
    feature_cache: str = "${train.run_dir}/features"
    # pastis_forecast: the first input_steps grid steps in, the next horizon steps out.
    input_steps: int = 32
    horizon: int = 10
    rp_size: int = 0  # size of the plots made from the input window; 0 = input_steps
    # last: models predict the change from the last observed value (a plot is blind to the
    # series level); none: they predict the values themselves.
    forecast_anchor: str = "last"
    save_heads: bool = True
    # Run even if the checkpoint's pretraining saw val/test samples scored here (the leak
    # guard, pimc_dist/eval/leakage.py); the overlap is recorded in result.json and every row.
    allow_pretrain_overlap: bool = False


@dataclass
class SweepGridConfig:
    """The axes of a sweep; every combination is one cell (linear cells share the lr axis)."""

    task: list[str] = field(default_factory=list)
    protocol: list[str] = field(default_factory=lambda: ["linear"])
    init: list[str] = field(default_factory=lambda: ["pretrained"])
    lr: list[float] = field(default_factory=list)  # [] = each task config's own
    label_fraction: list[float] = field(default_factory=lambda: [1.0])
    seed: list[int] = field(default_factory=lambda: [0])


@dataclass
class SweepConfig:
    """A grid of fine-tuning runs submitted as one job array (pimc_dist/sweep.py)."""

    # Task name -> fine-tuning YAML; a task not listed uses configs/finetune/<task>.yaml.
    configs: dict[str, str] = field(default_factory=dict)
    grid: SweepGridConfig = field(default_factory=SweepGridConfig)
    overrides: list[str] = field(default_factory=list)  # key=value for every cell
    parallelism: int = 4  # array tasks running at once (Slurm %N; local: as many slots)
    rerun_failed: bool = False  # submit only the cells that failed before
    wait: bool = True  # wait for the array, then aggregate
    poll_s: float = 5.0


@dataclass
class JobConfig:
    name: str = "run"
    method: str = "pimc"  # pimc | mosaic
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: dict[str, ViewAugmentConfig] = field(default_factory=dict)  # by view name
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def _error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    return ConfigError(f"{origin}: invalid key '{key}': {msg}")


def _duplicate_key(node: yaml.Node, prefix: str = "", seen: set[int] | None = None) -> str | None:
    """'<dotted key>' (lines a and b) of the first mapping key written twice under `node`.

    YAML loaders keep the last of two equal keys without a word, so a second `train:`
    block would silently drop the first's settings. `<<` merge keys may be overridden."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in lines:
                return f"'{prefix}{key}' (lines {lines[key]} and {line})"
            lines[key] = line
            found = _duplicate_key(value, f"{prefix}{key}.", seen)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix}{i}.", seen)
            if found:
                return found
    return None


def _parse_yaml(text: str, origin: str) -> Any:
    """The YAML document in `text` (None if empty); ConfigError naming `origin` if it is not
    valid YAML or writes a key twice."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicate = _duplicate_key(node) if node is not None else None
        if duplicate:
            raise ConfigError(
                f"{origin}: key {duplicate} is written twice; YAML would keep only the "
                "last: write it once"
            )
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(
            f"{origin}: not valid YAML: {' '.join(str(problem).split())}{where}"
        ) from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """The text of the config file at `path`; ConfigError naming it if it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); is it a YAML config?"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML at `path` preceded by its `base:` files, each with its own path."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = _parse_yaml(_read_text(path), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{path}: invalid key 'base': {bases!r} is not a path or a list of paths "
            "(relative to this file)"
        )
    layers: list[tuple[Path, dict[str, Any]]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path,))
    layers.append((path, data))
    return layers


def _pop_missing(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Remove `???` leaves from a YAML mapping and return their dotted keys."""
    keys = []
    for key in list(data):
        value = data[key]
        if isinstance(value, dict):
            keys += _pop_missing(value, f"{prefix}{key}.")
        elif value == MISSING:
            keys.append(f"{prefix}{key}")
            del data[key]
    return keys


def load(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """Load a job config: schema defaults, then the YAML (with its bases), then overrides."""
    cfg = OmegaConf.structured(JobConfig)
    if path is not None:
        for layer_path, data in _read_yaml(Path(path)):
            required = _pop_missing(data)
            try:
                cfg = OmegaConf.merge(cfg, data)
                # A merge never replaces a value with "???"; mark required keys explicitly.
                for key in required:
                    OmegaConf.update(cfg, key, MISSING)
            except OmegaConfBaseException as exc:
                raise _error(exc, str(layer_path)) from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _error(exc, f"command line override '{item}'") from exc
        except yaml.YAMLError as exc:  # e.g. an unclosed list: loader.views=[rp,rsi
            key = item.split("=", 1)[0]
            why = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(
                f"command line override '{item}': invalid key '{key}': not valid YAML ({why})"
            ) from None
    origin = str(path) if path is not None else "defaults"
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as exc:  # an interpolation to a key that is not there
        raise _error(exc, origin) from None
    if missing:
        raise ConfigError(f"{origin}: missing required value(s): {', '.join(missing)}")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _error(exc, origin) from exc
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (temp file, then rename) and return its path."""
    return write_atomic(path, to_yaml(cfg))


def save_run_config(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write `<run_dir>/config.yaml`; an earlier, different one is kept beside it, stamped."""
    path = Path(run_dir) / CONFIG_FILE
    text = to_yaml(cfg)
    if path.exists() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(path.with_name(f"config.{stamp}.yaml"))
    return write_atomic(path, text)


def from_yaml_text(text: str, origin: str) -> DictConfig:
    """Validate a resolved config saved earlier (e.g. inside a checkpoint) against the schema."""
    data = _parse_yaml(text, origin)
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), data)
    except OmegaConfBaseException as exc:
        raise _error(exc, origin) from exc
    OmegaConf.set_readonly(cfg, True)
    return cfg


# What a run folder holds, told by what each kind of run leaves in it.
RUN_MARKERS = (
    ("checkpoints", "pretraining"),
    ("encoders.safetensors", "pretraining"),
    ("result.json", "fine-tuning"),
    ("cells", "sweep"),
)


def check_run_folder(
    cfg: DictConfig, run_dir: str | os.PathLike, keys: tuple[str, ...], kind: str | None = None
) -> None:
    """Refuse a run folder that holds a different run; the same run may run there again
    (resume, or replace its outputs).

    Different: its saved config.yaml differs from `cfg` in `keys`; with `kind` (pretraining,
    fine-tuning, sweep) also a folder holding another kind's outputs (`RUN_MARKERS`), or,
    for a sweep, a config.yaml that is not a sweep's.
    """
    run_dir = Path(run_dir)
    for name, other in RUN_MARKERS if kind is not None else ():
        if other != kind and (run_dir / name).exists():
            raise ConfigError(
                f"invalid key 'train.run_dir': {run_dir} holds a {other} run ({name} is there); "
                f"give this {kind} run its own folder with train.run_dir=... or name=..."
            )
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        return
    old = from_yaml_text(_read_text(saved), str(saved))
    if kind == "sweep" and not old.sweep.grid.task:
        raise ConfigError(
            f"invalid key 'train.run_dir': {run_dir} holds a run that is not a sweep (its "
            "config.yaml has no sweep.grid.task); give the sweep its own folder with "
            "train.run_dir=... or name=..."
        )
    for key in keys:
        a, b = (OmegaConf.select(c, key) for c in (old, cfg))
        if a != b:
            differ = "; ".join(_differences(key, a, b))
            raise ConfigError(
                f"invalid key 'train.run_dir': {run_dir} already holds a different run "
                f"({differ}); choose another train.run_dir or name=, or delete the folder to "
                "start over"
            )


def _differences(key: str, a: Any, b: Any, limit: int = 6) -> list[str]:
    """'<dotted key>: <there> there, <now> now' for each leaf in which `a` and `b` differ."""
    plain = [OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for v in (a, b)]

    def leaves(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict) and value:
            out: dict[str, Any] = {}
            for k, v in value.items():
                out.update(leaves(v, f"{prefix}.{k}"))
            return out
        return {prefix: value}

    there, now = (leaves(v, key) for v in plain)
    missing = object()
    lines = [
        f"{k}: {there.get(k, '(not set)')} there, {now.get(k, '(not set)')} now"
        for k in sorted(set(there) | set(now))
        if there.get(k, missing) != now.get(k, missing)
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"and {len(lines) - limit} more"]
    return lines or [f"{key}: {a} there, {b} now"]


def with_updates(cfg: DictConfig, updates: dict[str, Any]) -> DictConfig:
    """A copy of a (read-only) config with nested `updates` merged in."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    merge_nested(plain, updates)
    return OmegaConf.create(plain)


def merge_nested(base: dict, extra: dict) -> dict:
    """Merge `extra` into `base` in place, key by key through nested dicts; returns `base`."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_nested(base[key], value)
        else:
            base[key] = value
    return base


def quote(value: Any) -> str:
    """`value` as a single-quoted YAML scalar for a key=value override ('01:00:00' stays text)."""
    return "'" + str(value).replace("'", "''") + "'"


def job_parser(
    prog: str,
    description: str,
    epilog: str,
    config_help: str | None = None,
    overrides_help: str = "dotted overrides, e.g. train.lr=3e-4",
    config_required: bool = True,
) -> argparse.ArgumentParser:
    """The command line every job shares: `--config <yaml>` and dotted key=value overrides.

    Without `config_help` the parser has neither (a job that takes no config)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config_help is not None:
        parser.add_argument("--config", required=config_required, help=config_help)
        parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    return parser


__all__ = [
    "MISSING",
    "ConfigError",
    "JobConfig",
    "CONFIG_FILE",
    "check_run_folder",
    "job_parser",
    "load",
    "merge_nested",
    "quote",
    "save",
    "save_run_config",
    "with_updates",
    "to_yaml",
    "from_yaml_text",
]
