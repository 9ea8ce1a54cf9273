"""The config check every entry point runs before any work, and `launch` before submitting.

Each job's `check_config` checks, in order, what a job would otherwise find out only
at its first step (on a cluster: after the queue wait, as a traceback):

- value ranges (`check_values`, every job): batch size and step counts >= 1, lr > 0,
  fractions in [0, 1], choices among their allowed words, the `augment.<view>` ranges,
  and that `deepspeed.config_file` reads as the engine reads it (a JSON object);
- for pretraining, the config against the shard set it reads (`check_shards`):
  the manifest parses (a `shardset.read_manifest` error names the file), it was
  made for the config's method, it holds the views the loader reads, and its
  channels and sizes are those of the model's encoders;
- for fine-tuning, each split's shard set parses and holds the task's inputs.

Every failure is a `config.ConfigError` naming the key (and the file); the CLIs turn
it into one message and exit status 2. Schema, types and interpolations are checked
by `config.load` itself. Nothing heavy is built here (no model, no loader).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from pimc_dist.config import ConfigError
from pimc_dist.encoders import WEIGHTS_FILE, find_weights
from pimc_dist.engine import deepspeed_config
from pimc_dist.shardset import ShardError, read_manifest, usable_manifest

# key -> (low, high, low_inclusive); None = unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "train.batch_size": (1, None, True),
    "train.grad_accum": (1, None, True),
    "train.total_samples": (1, None, True),
    "train.lr": (0, None, False),
    "train.min_lr": (0, None, True),
    "train.weight_decay": (0, None, True),
    "train.warmup_fraction": (0, 1, True),
    "train.grad_clip": (0, None, True),
    "train.ckpt_every_steps": (1, None, True),
    "train.keep_last": (1, None, True),
    "train.log_every_steps": (1, None, True),
    "train.max_nonfinite_in_row": (1, None, True),
    "train.collective_timeout_s": (1, None, True),
    "train.stop_after_steps": (1, None, True),
    "loader.workers": (0, None, True),
    "loader.shuffle_buffer": (0, None, True),
    "loader.prefetch_factor": (1, None, True),
    "loader.max_excluded_fraction": (0, 1, True),
    "loader.max_shard_loss_fraction": (0, 1, True),
    "data.max_skipped_fraction": (0, 1, True),
    "data.max_samples_per_shard": (1, None, True),
    "data.max_shard_bytes": (1, None, True),
    "data.workers": (0, None, True),
    "data.pixels_per_patch": (1, None, True),
    "data.patch_size": (1, None, True),
    "data.crop_size": (1, None, True),
    "data.grid_step_days": (1, None, True),
    "data.rp_size": (0, None, True),
    "data.label_threshold": (0, 1, True),
    "loss.label_fraction": (0, 1, False),
    "loss.max_logit_scale": (0, None, False),
    "model.init_temperature": (0, None, False),
    "finetune.label_fraction": (0, 1, False),
    "deepspeed.zero_stage": (0, 3, True),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("pimc", "mosaic"),
    "loss.name": ("clip", "siglip", "mosaic"),
    "loader.verify": ("none", "size", "sha256"),
    "loader.rp_on_the_fly": ("off", "cpu", "gpu"),
    "tracking.mode": ("offline", "online", "disabled"),
}
# The views each method's training step reads.
METHOD_VIEWS = {"pimc": ("rp", "rsi"), "mosaic": ("s2", "s1")}


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def check_values(cfg: Any) -> None:
    """Value ranges and choices of the keys every job shares; ConfigError naming the key."""
    for key, (low, high, low_inclusive) in _RANGES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        value = float(value)
        if low is not None and (value < low or (value == low and not low_inclusive)):
            bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
            raise ConfigError(f"invalid key '{key}': {value:g} is not {bound}")
        if high is not None and value > high:
            raise ConfigError(f"invalid key '{key}': {value:g} is above {high:g}")
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"invalid key '{key}': '{value}' is not one of {', '.join(allowed)}")
    betas = list(_get(cfg, "train.betas") or [])
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ConfigError(f"invalid key 'train.betas': {betas} is not two values in [0, 1)")
    for view, section in (_get(cfg, "augment") or {}).items():
        check_augment(section, f"augment.{view}")
    if _get(cfg, "deepspeed.config_file"):
        check_deepspeed_file(cfg)


def check_augment(section: Any, prefix: str) -> None:
    """One view's `augment.<view>` section (config.ViewAugmentConfig) against the ranges
    pimc_dist.augment accepts, which it would otherwise refuse only at the first step."""

    def bad(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"invalid key '{prefix}.{key}': {value}: {why}")

    scale = [float(v) for v in section["crop_scale"]]
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise bad("crop_scale", scale, "need [min, max] area fractions, 0 < min <= max <= 1")
    ratio = [float(v) for v in section["crop_ratio"]]
    if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
        raise bad("crop_ratio", ratio, "need [min, max] aspect ratios, 0 < min <= max")
    for key in ("brightness", "contrast", "noise_db"):
        value = float(section[key])
        if value < 0:
            raise bad(key, f"{value:g}", "must be >= 0")


def check_deepspeed_file(cfg: Any) -> None:
    """`deepspeed.config_file` reads as the engine reads it (`engine.deepspeed_config`): a
    JSON object. Otherwise every rank would fail with a traceback after building the model."""
    path = Path(cfg.deepspeed.config_file)
    if path.is_dir():
        raise ConfigError(
            f"invalid key 'deepspeed.config_file': {path}: is a folder, not a JSON file"
        )
    try:
        deepspeed_config(cfg, world_size=1)
    except UnicodeDecodeError as exc:  # a ValueError too: before the engine's own messages
        raise ConfigError(
            f"invalid key 'deepspeed.config_file': {path}: not UTF-8 text (byte {exc.start})"
        ) from None
    except ValueError as exc:  # the engine's messages start with the path
        message = " ".join(str(exc).split())
        raise ConfigError(f"invalid key 'deepspeed.config_file': {message}") from None
    except OSError as exc:
        raise ConfigError(
            f"invalid key 'deepspeed.config_file': {path}: cannot read: {exc.strerror or exc}"
        ) from None


def read_shard_manifest(folder: str | Path, key: str) -> Any:
    """The manifest of the shard set at `folder`, read for the config key `key`; a missing or
    invalid manifest is a ConfigError naming the key and the file."""
    path = Path(folder) / "manifest.json"
    if Path(folder).is_file():
        raise ConfigError(
            f"invalid key '{key}': {folder} is a file; give the shard set's folder (the one "
            "holding manifest.json and the shard-*.tar files)"
        )
    if not path.is_file():
        raise ConfigError(
            f"invalid key '{key}': no shards found at {folder} (no manifest.json); make them "
            "with `python -m pimc_dist.shard --config <your data or pretrain YAML>`"
        )
    try:
        return read_manifest(folder)
    except ShardError as exc:
        raise ConfigError(f"invalid key '{key}': unreadable shard manifest: {exc}") from None


def check_no_data_config(cfg: Any, job: str) -> None:
    """A job that trains a model given a config with no model (a data config): say so."""
    if cfg.model.views:
        return
    raise ConfigError(
        f"invalid key 'model.views': no model is configured; this looks like a data config "
        f"(it sets data.* for `python -m pimc_dist.shard`), not a {job} config: give a "
        "config that names the model's views (e.g. configs/pretrain/tiny.yaml, which starts "
        "from a data config with `base:`)"
    )


def _stored_view(manifest: Any, view: str, cfg: Any) -> tuple[int, int] | None:
    """(channels, size) of the `view` the loader gives the model, from the manifest."""
    if view == "rp" and str(cfg.loader.rp_on_the_fly) != "off":
        series = manifest.views.get("series")
        if series is None:
            return None
        return int(series.shape[0]), int(cfg.data.rp_size) or int(series.shape[-1])
    spec = manifest.views.get(view)
    if spec is None or len(spec.shape) < 3:
        return None
    return int(spec.shape[0]), int(spec.shape[-1])


def check_shards(cfg: Any) -> Any:
    """The pretraining config against its shard set (`loader.shards`); returns the manifest."""
    manifest = read_shard_manifest(cfg.loader.shards, "loader.shards")
    where = manifest.path
    if manifest.kind in METHOD_VIEWS and manifest.kind != cfg.method:
        raise ConfigError(
            f"invalid key 'method': {cfg.method}, but the shards at {cfg.loader.shards} were "
            f"made for {manifest.kind} ({where}: kind {manifest.kind}, views "
            f"{sorted(manifest.views)}); use a {manifest.kind} config or shards made for "
            f"{cfg.method}"
        )
    on_the_fly = str(cfg.loader.rp_on_the_fly) != "off"
    stored = [v for v in cfg.loader.views if not (v == "rp" and on_the_fly)]
    if "rp" in cfg.loader.views and on_the_fly:
        stored.append("series")
    missing = [v for v in stored if v not in manifest.views]
    if missing:
        raise ConfigError(
            f"invalid key 'loader.views': {missing} not in the shard set {where} "
            f"(it has {sorted(manifest.views)})"
        )
    problems = []  # channels first: a model for other bands is the bigger mistake
    sizes = []
    for view, spec in cfg.model.views.items():
        shape = _stored_view(manifest, view, cfg) if view in cfg.loader.views else None
        if shape is None:
            continue
        chans, size = shape
        if spec.get("in_chans") is not None and int(spec.in_chans) != chans:
            problems.append(
                f"invalid key 'model.views.{view}.in_chans': {spec.in_chans}, but view "
                f"'{view}' of the shard set has {chans} channel(s)"
            )
        if spec.get("img_size") is not None and int(spec.img_size) != size:
            sizes.append(
                f"invalid key 'model.views.{view}.img_size': {spec.img_size}, but view "
                f"'{view}' of the shard set is {size} x {size}"
            )
    if problems or sizes:
        raise ConfigError(
            "; ".join(problems + sizes)
            + f" ({where}); the model does not fit these shards: fix model.views or "
            "loader.shards"
        )
    if str(cfg.loader.verify) != "none":
        # The loader's start-up check of the shard files' sizes (sha256 is left to it: too
        # slow here): more damage than loader.max_excluded_fraction would otherwise stop the
        # job only after the queue wait and DeepSpeed's start (ShardError, naming the files).
        usable_manifest(cfg.loader.shards, "size", float(cfg.loader.max_excluded_fraction))
    return manifest


__all__ = [
    "METHOD_VIEWS",
    "check_augment",
    "check_deepspeed_file",
    "check_no_data_config",
    "check_shards",
    "check_values",
    "check_weights_file",
    "read_shard_manifest",
]


def check_weights_file(ckpt: str | Path, key: str = "finetune.ckpt") -> None:
    """The encoder weights named by `key` (a safetensors file, or a run folder holding
    encoders.safetensors) open, every tensor lies inside the file (not truncated), and they
    are encoders as pretraining exports them ('<view>.encoder.<param>' keys)."""
    try:
        path = find_weights(Path(ckpt))
    except FileNotFoundError as exc:
        raise ConfigError(f"invalid key '{key}': {exc}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            for name in names:
                f.get_slice(name).get_shape()
    except Exception as exc:  # safetensors' own SafetensorError, or OSError
        raise ConfigError(
            f"invalid key '{key}': {path} is not a readable safetensors file "
            f"(truncated or corrupt?): {exc}"
        ) from None
    if not names:
        raise ConfigError(f"invalid key '{key}': {path} holds no tensors")
    if not any(".encoder." in name for name in names):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"invalid key '{key}': {path} holds no encoder of a view (no '<view>.encoder.' "
            f"keys; it has {shown}): give a pretraining run folder or its {WEIGHTS_FILE}"
        )
