"""Every shipped pretraining config takes optimizer steps, at reduced size, in its own precision.

`configs/pretrain/*.yaml` are what users launch on clusters (pimc.yaml and mosaic.yaml in
bf16 under ZeRO 2); a config that cannot take a step must fail here, not after a job
waited for its GPUs. Each runs on one CPU rank for 2 steps with the config's own method,
loss, encoder kinds, ZeRO stage and `deepspeed.bf16`, only smaller: narrower encoders and
heads, smaller images where the data allows, small batches, one loader worker. The shards
are written with the config's own data settings (plot and crop sizes) from the PASTIS
fixture, or in reBEN's layout for MoSAiC.

The fine-tuning configs (configs/finetune) run the linear protocol, plain torch without
DeepSpeed or bf16; tests/test_finetune.py and tests/test_bf16.py cover them and the
DeepSpeed fine-tuning protocol.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_bf16 import assert_ok, losses, run_job, write_mosaic_shards

from pimc_dist import config as config_lib

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain"

SMALL_HEAD = ["model.head.hidden_dim=32", "model.head.out_dim=16"]
COMMON = [
    "train.batch_size=8", "train.total_samples=16", "train.grad_accum=1",
    "train.log_every_steps=1", "train.ckpt_every_steps=100", "loader.workers=1",
    "loader.shuffle_buffer=64", "tracking.wandb=false", "tracking.log_images=0",
]  # fmt: skip

# Per shipped config: the data it shards from ("pastis" fixture or "mosaic" reBEN-like) and
# the reductions. Encoder names, ZeRO stage and precision stay the config's own.
REDUCED = {
    "tiny": ("pastis", []),
    "tiny_series": ("pastis", []),
    # tiny.yaml's model on a GeoTIFF stack's settings (10 bands like PASTIS); on a real
    # stack end to end: tests/test_own_data.py.
    "tiny_geotiff": ("pastis", []),
    "pimc_series": (
        "pastis",
        [
            # pimc.yaml's plot tower reduced the same way; the 1D ResNet-18 at width 8.
            "model.views.rp.encoder=vit_tiny_p8",
            "model.views.series.width=8",
            *SMALL_HEAD,
        ],
    ),  # fmt: skip
    "pimc": (
        "pastis",
        [
            # ViT-B/8 -> ViT-Ti/8 (the config has no ViT width/depth keys) on the configured
            # 48 px plots; ResNet-50 at width 8 on the configured 32 px crops.
            "model.views.rp.encoder=vit_tiny_p8",
            "model.views.rsi.width=8",
            *SMALL_HEAD,
        ],
    ),  # fmt: skip
    "mosaic": (
        "mosaic",
        [
            "model.views.s2.width=8",
            "model.views.s1.width=8",
            "model.views.s2.img_size=16",
            "model.views.s1.img_size=16",
            *SMALL_HEAD,
        ],
    ),  # fmt: skip
}


def shipped() -> list[str]:
    return sorted(p.stem for p in PRETRAIN.glob("*.yaml"))


def test_every_shipped_pretraining_config_has_a_reduced_run():
    missing = set(shipped()) - set(REDUCED)
    assert not missing, f"add the reduced-size overrides of {sorted(missing)} to REDUCED"


def pastis_shards(out: Path, config: Path) -> Path:
    """Shards of the PASTIS fixture written with `config`'s own data settings."""
    from pimc_dist import shard
    from pimc_dist.sources.fixtures import write_pastis

    write_pastis(out / "raw", n_patches=6, size=32, seed=1)
    overrides = [
        "data.source=pastis", f"data.root={out / 'raw'}", f"data.shard_dir={out / 'shards'}",
        "data.pixels_per_patch=16", "data.max_samples_per_shard=64", "data.workers=1",
    ]  # fmt: skip
    if config_lib.load(config, overrides).data.grid_length is None:
        # A GeoTIFF stack's config: its patches share one date list, PASTIS patches do not.
        overrides.append("data.grid_length=30")
    cfg = config_lib.load(config, overrides)
    assert shard.main(cfg) == 0
    return out / "shards"


@pytest.mark.parametrize("name", shipped())
def test_shipped_pretraining_config_takes_steps_in_its_own_precision(tmp_path, name):
    config = PRETRAIN / f"{name}.yaml"
    data, reductions = REDUCED[name]
    if data == "pastis":
        shards = pastis_shards(tmp_path / "data", config)
    else:
        shards = write_mosaic_shards(tmp_path / "data" / "shards", n=32)
    root = [f"data.root={tmp_path / 'data' / 'raw'}"]  # what the config requires of a user
    cfg = config_lib.load(config, root)
    run = tmp_path / "run"
    results = run_job(config, run, 1, [*root, f"loader.shards={shards}", *COMMON, *reductions])
    assert_ok(results)
    values = losses(run)
    assert len(values) == 2 and all(v == v and abs(v) < 1e3 for v in values), values
    assert (run / "encoders.safetensors").is_file()
    saved = config_lib.load(run / "config.yaml")
    # It ran in the config's own precision and ZeRO stage.
    assert saved.deepspeed.bf16 == cfg.deepspeed.bf16
    assert saved.deepspeed.zero_stage == cfg.deepspeed.zero_stage
    assert OmegaConf.select(saved, "method") == cfg.method
    for view, spec in cfg.model.views.items():  # the same kind of encoder (ViT patch size too)
        family = spec.encoder.replace("vit_base", "vit_tiny")
        assert saved.model.views[view].encoder == family
