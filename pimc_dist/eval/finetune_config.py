"""The settings of a fine-tuning job and the checks that need no data or model
(`check_config`; the launcher and the sweep run them before submitting, `finetune.main`
before any work): protocols and inits, numeric ranges, the checkpoint and the labelled
subset its pretraining used, the shard sets of the splits, and the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pimc_dist import checks
from pimc_dist import config as config_lib
from pimc_dist.eval.reading import split_shards
from pimc_dist.eval.tasks import TaskError, get_task

PROTOCOLS = ("linear", "finetune", "cnn1d")
INITS = ("pretrained", "random")
# The settings that make a fine-tuning run what it is; others may change on a rerun.
RUN_IDENTITY = (
    "finetune.task",
    "finetune.protocol",
    "finetune.init",
    "finetune.ckpt",
    "finetune.inputs",
    "finetune.label_fraction",
    "train.seed",
)


def check_config(cfg: Any) -> None:
    """Checks that need no data or model; the launcher runs them before submitting."""
    ft = cfg.finetune

    def bad(key: str, why: str) -> config_lib.ConfigError:
        return config_lib.ConfigError(f"invalid key 'finetune.{key}': {why}")

    checks.check_values(cfg)
    try:
        task = get_task(ft.task)
    except TaskError as exc:
        raise config_lib.ConfigError(str(exc)) from None
    if ft.protocol not in PROTOCOLS:
        raise bad("protocol", f"'{ft.protocol}' is not one of {', '.join(PROTOCOLS)}")
    if ft.init not in INITS:
        raise bad("init", f"'{ft.init}' is not one of {', '.join(INITS)}")
    if not 0.0 < float(ft.label_fraction) <= 1.0:
        raise bad("label_fraction", f"{ft.label_fraction} is not in (0, 1]")
    if not ft.probe_lrs or any(float(x) <= 0 for x in ft.probe_lrs):
        raise bad("probe_lrs", f"{list(ft.probe_lrs)}: need positive learning rates")
    if not 0 <= int(ft.fold_rotation) < 5:
        raise bad("fold_rotation", f"{ft.fold_rotation} is not in 0..4")
    for key in (
        "input_steps",
        "horizon",
        "epochs",
        "probe_epochs",
        "probe_batch_size",
        "eval_batch_size",
    ):
        if int(ft[key]) < 1:
            raise bad(key, f"{ft[key]} is below 1")
    try:
        task.inputs(ft)
    except TaskError as exc:
        raise config_lib.ConfigError(str(exc)) from None
    if ft.protocol != "cnn1d":
        if ft.ckpt is None and ft.init == "pretrained":
            raise bad(
                "ckpt", "required with finetune.init=pretrained (or set finetune.init=random)"
            )
        if ft.ckpt is not None and not Path(ft.ckpt).exists():
            raise bad("ckpt", f"{ft.ckpt} does not exist")
        if ft.ckpt is not None and ft.init == "pretrained":
            checks.check_weights_file(ft.ckpt)
        if ft.ckpt is not None and ft.init == "pretrained":
            _check_label_regime(cfg)
    for split, folder in split_shards(cfg).items():
        if not (Path(folder) / "manifest.json").is_file():
            raise config_lib.ConfigError(
                f"no shard set for the {split} split at {folder} (no manifest.json); set "
                f"loader.shards or finetune.{split}_shards, or make one with python -m pimc_dist.shard"
            )
        checks.read_shard_manifest(folder, f"finetune.{split}_shards")  # parses, names the file
    lr = ("train.lr",) if ft.protocol != "linear" else ()  # a linear run trains its probe_lrs
    config_lib.check_run_folder(
        cfg, Path(cfg.train.run_dir), (*RUN_IDENTITY, *lr), kind="fine-tuning"
    )


def _check_label_regime(cfg: Any) -> None:
    """A checkpoint pretrained on a labelled subset (`loss.label_fraction` g < 1) is probed at
    the same fraction and `loss.label_seed`, i.e. on the same labelled subset (DESIGN.md,
    Evaluation protocol); anything else would score a low-label row on labels its SupCon
    term never saw, or hide labels it did."""
    ckpt = Path(cfg.finetune.ckpt)
    saved = (ckpt if ckpt.is_dir() else ckpt.parent) / config_lib.CONFIG_FILE
    if not saved.is_file():
        return
    pre = config_lib.from_yaml_text(saved.read_text(), str(saved)).loss
    g, f = float(pre.label_fraction), float(cfg.finetune.label_fraction)
    if g < 1.0 and (g != f or int(pre.label_seed) != int(cfg.loss.label_seed)):
        raise config_lib.ConfigError(
            f"invalid key 'finetune.label_fraction': {f} (loss.label_seed "
            f"{cfg.loss.label_seed}) on a checkpoint pretrained with loss.label_fraction={g} "
            f"(loss.label_seed {pre.label_seed}, {saved}): a low-label row probes on the "
            "labelled subset its pretraining used; set finetune.label_fraction and "
            "loss.label_seed to the pretraining's, or pretrain with this fraction"
        )


__all__ = ["INITS", "PROTOCOLS", "RUN_IDENTITY", "check_config"]
