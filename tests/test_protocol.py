"""The evaluation protocol of DESIGN.md: pretraining configs read training data only, and the
example commands of the docs and the Slurm scripts use keys that exist."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from pimc_dist import config, shard
from pimc_dist.shardset import iter_shard_samples, read_manifest
from pimc_dist.sources import reben
from pimc_dist.sources.fixtures import write_pastis
from pimc_dist.sources.pastis import FOLD_ROTATION

# A dotted override as written in a command: `train.lr=3e-4`, not `$x.y=` or `{a.b}=`.
OVERRIDE_RE = re.compile(r"(?<![\w.$/{\-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=")


def unknown_override_keys(text: str) -> list[str]:
    """The dotted `key=` overrides in `text` that are not keys of the job config schema."""
    schema = OmegaConf.structured(config.JobConfig)
    unknown = []
    for key in sorted(set(OVERRIDE_RE.findall(text))):
        try:  # "???" merges without a type check: only the key itself is tested
            OmegaConf.merge(schema, OmegaConf.from_dotlist([f"{key}=???"]))
        except ConfigKeyError:
            unknown.append(key)
    return unknown


def example_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "slurm").glob("*.sbatch"))
    files += sorted((REPO / "configs").rglob("*.yaml"))
    return [f for f in files if f.exists()]


def test_the_override_checker_flags_a_key_that_does_not_exist():
    text = "python -m pimc_dist.finetune --config x.yaml train.lr=1e-3 data.fraction=0.1"
    assert unknown_override_keys(text) == ["data.fraction"]
    assert unknown_override_keys("model.views.rp.encoder=vit_large_p8 $data.x=1") == []


def test_every_override_in_the_docs_and_slurm_scripts_is_a_config_key():
    found, bad = 0, {}
    for path in example_files():
        text = path.read_text()
        found += len(OVERRIDE_RE.findall(text))
        unknown = unknown_override_keys(text)
        if unknown:
            bad[str(path.relative_to(REPO))] = unknown
    assert found >= 20, "the scan found almost no example overrides: is the pattern still right?"
    assert not bad, f"example commands use keys the config does not have: {bad}"


def _split_counts(shard_dir: Path, field: str) -> collections.Counter:
    manifest = read_manifest(shard_dir)
    return collections.Counter(
        json.loads(bytes(sample["json"]))[field]
        for path in manifest.shard_paths()
        for sample in iter_shard_samples(path)
    )


@pytest.mark.skipif(
    reben.configilm_mock_root() is None,
    reason="configilm mock data missing: pip install --no-deps configilm==0.7.1",
)
def test_sharding_with_the_mosaic_pretraining_config_writes_train_patches_only(tmp_path):
    out = tmp_path / "shards"
    argv = [
        "--config",
        str(REPO / "configs/pretrain/mosaic.yaml"),
        f"data.root={reben.configilm_mock_root()}",
        f"data.shard_dir={out}",
        "data.workers=1",
    ]
    assert shard.cli(argv) == 0
    splits = _split_counts(out, "split")
    assert set(splits) == {"train"}, splits
    assert splits["train"] > 0


def test_sharding_with_the_pimc_pretraining_config_writes_training_folds_only(tmp_path):
    root = write_pastis(tmp_path / "PASTIS", n_patches=10, size=16, seed=5)
    out = tmp_path / "shards"
    argv = [
        "--config",
        str(REPO / "configs/pretrain/pimc.yaml"),
        f"data.root={root}",
        f"data.shard_dir={out}",
        "data.workers=1",
        "data.pixels_per_patch=4",
        "data.rp_size=16",
        "data.crop_size=8",
    ]
    assert shard.cli(argv) == 0
    folds = _split_counts(out, "fold")
    train_folds = set(FOLD_ROTATION[0][0])
    assert folds and set(folds) <= train_folds, (folds, train_folds)
