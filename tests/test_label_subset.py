"""Low-label MoSAiC: one labelled subset, decided by a hash of each sample's key, for the SupCon
term of pretraining and for the probe (DESIGN.md, Evaluation protocol)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pimc_dist import config as config_lib
from pimc_dist import pretrain
from pimc_dist.eval import finetune, tasks
from pimc_dist.label_subset import is_labelled, key_unit, labelled_index, labelled_mask
from pimc_dist.losses import MosaicLoss, SupConLoss

REPO = Path(__file__).resolve().parents[1]
KEYS = [f"S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_{i:02d}_{j:02d}" for i in range(100)
        for j in range(100)]  # fmt: skip
LOG_SCALE = math.log(1 / 0.1)


def test_the_subset_is_a_keyed_hash_not_pythons_salted_hash():
    code = (
        "from pimc_dist.label_subset import labelled_mask\n"
        "keys = [f'patch_{i}' for i in range(2000)]\n"
        "print(''.join('1' if b else '0' for b in labelled_mask(keys, 0.1, 3)))"
    )
    outputs = set()
    for hash_seed in ("1", "2"):  # another process, another str-hash salt: the same subset
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(proc.stdout.strip())
    here = labelled_mask([f"patch_{i}" for i in range(2000)], 0.1, 3)
    assert outputs == {"".join("1" if b else "0" for b in here)}
    # Pinned values: a change of the hash would silently change every low-label row.
    assert key_unit("patch_0", 0) == pytest.approx(0.3122374869452789, abs=1e-15)
    assert is_labelled("patch_0", 1.0, 0) and labelled_mask([], 0.5, 0).shape == (0,)


def test_the_fraction_is_honoured_nested_and_seeded_on_10k_keys():
    for fraction in (0.01, 0.1, 0.5):
        mask = labelled_mask(KEYS, fraction, seed=0)
        # binomial: 4 standard deviations
        assert abs(mask.mean() - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / len(KEYS))
        assert mask[:300].tolist() == [is_labelled(k, fraction, 0) for k in KEYS[:300]]
    # A smaller fraction labels a subset of a larger one's samples (one threshold on one hash).
    small, large = labelled_mask(KEYS, 0.01, 0), labelled_mask(KEYS, 0.1, 0)
    assert not (small & ~large).any()
    assert (labelled_mask(KEYS, 0.1, 1) != large).any()  # the seed draws another subset
    assert labelled_mask(KEYS, 1.0, 0).all()
    with pytest.raises(ValueError, match="fraction"):
        labelled_mask(KEYS, 0.0, 0)


def test_ranks_see_the_same_subset_whatever_the_split_of_the_keys():
    whole = labelled_mask(KEYS, 0.1, 0)
    for world in (2, 3, 8):
        per_rank = [labelled_mask(KEYS[r::world], 0.1, 0) for r in range(world)]
        merged = np.empty(len(KEYS), dtype=bool)
        for r, part in enumerate(per_rank):
            merged[r::world] = part
        np.testing.assert_array_equal(merged, whole)


def test_a_tiny_probe_set_keeps_at_least_one_labelled_sample():
    keys = [f"p{i}" for i in range(24)]
    assert not labelled_mask(keys, 0.001, 0).any()
    index = labelled_index(keys, 0.001, 0)
    assert len(index) == 1 and index[0] == np.argmin([key_unit(k, 0) for k in keys])
    assert len(labelled_index(keys, 0.001, 0, at_least_one=False)) == 0


# --------------------------------------------------------------------------- the loss


def _mosaic_inputs(n=12, dim=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(4)]
    labels = (torch.rand(n, classes, generator=g) < 0.4).double()
    labels[:, 0] = 1  # every sample labelled with something: positives everywhere
    return feats, labels


def test_the_supcon_term_is_the_supcon_loss_of_the_labelled_subset_only():
    (s2a, s2b, s1a, s1b), labels = _mosaic_inputs()
    has = torch.tensor([i % 3 != 0 for i in range(len(labels))])
    loss = MosaicLoss(w_intra=1.0, w_inter=1.0, w_sup=0.5)
    total, terms = loss(s2a, s2b, s1a, s1b, labels, LOG_SCALE, has_label=has)
    subset = SupConLoss()(
        torch.cat([s2a[has], s1a[has]]), torch.cat([labels[has], labels[has]]), LOG_SCALE
    )
    torch.testing.assert_close(terms["sup"], subset, rtol=1e-12, atol=1e-12)
    # The other terms see every sample, labelled or not.
    _, full = loss(s2a, s2b, s1a, s1b, labels, LOG_SCALE)
    for name in ("intra_s2", "intra_s1", "inter"):
        assert torch.equal(terms[name], full[name])
    assert not torch.equal(terms["sup"], full["sup"])


def test_no_label_outside_the_subset_reaches_supcon():
    (s2a, s2b, s1a, s1b), labels = _mosaic_inputs(seed=1)
    has = torch.tensor([i % 2 == 0 for i in range(len(labels))])
    other = labels.clone()
    other[~has] = 1.0 - other[~has]  # every label of the unlabelled samples flipped
    loss = MosaicLoss(w_sup=1.0)
    grads = []
    outs = []
    for lab in (labels, other):
        xs = [x.clone().requires_grad_() for x in (s2a, s2b, s1a, s1b)]
        total, terms = loss(*xs, lab, LOG_SCALE, has_label=has)
        total.backward()
        outs.append((total.detach(), terms["sup"]))
        grads.append([x.grad for x in xs])
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def _batch(keys, labels):
    return {"labels": labels, "meta": [{"patch": k, "split": "train"} for k in keys]}


def test_pretraining_hides_the_labels_of_unlabelled_samples_from_the_loss():
    keys = KEYS[:64]
    (s2a, s2b, s1a, s1b), labels = _mosaic_inputs(n=64, seed=2)
    seen = pretrain.hide_unlabelled(_batch(keys, labels.clone()), 0.3, 0)
    mask = labelled_mask(keys, 0.3, 0)
    assert 0 < mask.sum() < 64
    np.testing.assert_array_equal(seen["has_label"].numpy(), mask)
    assert (seen["labels"][~torch.from_numpy(mask)] == 0).all()
    torch.testing.assert_close(seen["labels"][torch.from_numpy(mask)], labels[mask])
    # Whatever the unlabelled samples' labels, the loss is bit-identical.
    scrambled = labels.clone()
    scrambled[~torch.from_numpy(mask)] = 1.0
    other = pretrain.hide_unlabelled(_batch(keys, scrambled), 0.3, 0)
    loss = MosaicLoss()
    a, _ = loss(s2a, s2b, s1a, s1b, seen["labels"], LOG_SCALE, seen["has_label"])
    b, _ = loss(s2a, s2b, s1a, s1b, other["labels"], LOG_SCALE, other["has_label"])
    assert torch.equal(a, b)
    full = {"labels": labels, "meta": None}
    assert pretrain.hide_unlabelled(full, 1.0, 0) is full  # all labels: nothing to do


def test_pretraining_without_sample_json_refuses_a_low_label_fraction():
    with pytest.raises(pretrain.TrainingError, match="label_fraction"):
        pretrain.hide_unlabelled({"labels": torch.zeros(2, 3)}, 0.5, 0)


# --------------------------------------------------------------------------- the probe


@pytest.mark.parametrize("pixels", [False, True])
def test_the_probe_labels_the_same_samples_as_pretraining(pixels):
    if pixels:  # PIMC-style metas: the key is patch, row and column
        metas = [{"patch": f"p{i // 50}", "row": i % 50, "col": 7} for i in range(5000)]
    else:
        metas = [{"patch": k} for k in KEYS]
    keys = [tasks.sample_key(m) for m in metas]
    n = len(keys)
    labels = torch.ones(n, 3)
    for fraction in (0.01, 0.1):
        batch = pretrain.hide_unlabelled({"labels": labels, "meta": metas}, fraction, 5)
        pretraining = np.flatnonzero(batch["has_label"].numpy())
        probe = tasks.label_subset(keys, fraction, 5)
        np.testing.assert_array_equal(probe, pretraining)
        assert len(probe) > 0


def _pretrained_folder(tmp_path: Path, *overrides: str) -> Path:
    folder = tmp_path / "pre"
    folder.mkdir()
    cfg = config_lib.load(REPO / "configs/pretrain/mosaic.yaml", ["data.root=/nowhere", *overrides])
    config_lib.save_run_config(cfg, folder)
    save_file({"s2.encoder.stub": torch.zeros(1)}, str(folder / "encoders.safetensors"))
    return folder


def _probe(ckpt: Path, tmp_path: Path, *overrides: str):
    return config_lib.load(
        REPO / "configs/finetune/reben_multilabel.yaml",
        [f"finetune.ckpt={ckpt}", f"train.run_dir={tmp_path / 'probe'}",
         f"loader.shards={tmp_path / 'no_shards'}", *overrides],
    )  # fmt: skip


def test_a_probe_at_another_fraction_than_its_low_label_pretraining_is_refused(tmp_path, capsys):
    ckpt = _pretrained_folder(tmp_path, "loss.label_fraction=0.01")
    for overrides in (
        ["finetune.label_fraction=0.1"],
        ["finetune.label_fraction=1.0"],
        ["finetune.label_fraction=0.01", "loss.label_seed=1"],
    ):
        with pytest.raises(config_lib.ConfigError, match="loss.label_fraction=0.01"):
            finetune.check_config(_probe(ckpt, tmp_path, *overrides))
    # The same fraction and seed pass this check (and stop at the next: no shards here).
    with pytest.raises(config_lib.ConfigError, match="no shard set"):
        finetune.check_config(_probe(ckpt, tmp_path, "finetune.label_fraction=0.01"))
    # Random init reads no pretrained weights: no constraint.
    with pytest.raises(config_lib.ConfigError, match="no shard set"):
        finetune.check_config(_probe(ckpt, tmp_path, "finetune.init=random"))
    code = finetune.cli(
        ["--config", str(REPO / "configs/finetune/reben_multilabel.yaml"), f"ckpt={ckpt}",
         f"train.run_dir={tmp_path / 'probe'}", "finetune.label_fraction=0.1"]
    )  # fmt: skip
    assert code == 2 and "labelled subset its pretraining used" in capsys.readouterr().err


def test_a_full_label_pretraining_may_be_probed_at_any_fraction(tmp_path):
    ckpt = _pretrained_folder(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="no shard set"):
        finetune.check_config(_probe(ckpt, tmp_path, "finetune.label_fraction=0.01"))


def test_pretraining_config_checks_the_label_fraction():
    base = REPO / "configs/pretrain/mosaic.yaml"
    for value in ("0", "1.5"):
        cfg = config_lib.load(base, ["data.root=/nowhere", f"loss.label_fraction={value}"])
        with pytest.raises(config_lib.ConfigError, match="loss.label_fraction"):
            pretrain.check_config(cfg)
    pimc = config_lib.load(
        REPO / "configs/pretrain/pimc.yaml", ["data.root=/nowhere", "loss.label_fraction=0.1"]
    )
    with pytest.raises(config_lib.ConfigError, match="only the mosaic loss"):
        pretrain.check_config(pimc)


class _Towers(torch.nn.Module):
    """A stand-in MoSAiC model: a fixed linear map of each view."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.s2 = torch.randn(2 * 4 * 4, 8, generator=g)
        self.s1 = torch.randn(2 * 4 * 4, 8, generator=g)

    def forward(self, views):
        return {
            "s2": views["s2"].flatten(1) @ self.s2,
            "s1": views["s1"].flatten(1) @ self.s1,
            "logit_scale": torch.tensor(LOG_SCALE),
        }


def test_the_training_step_gives_the_loss_the_mask_and_not_the_hidden_labels():
    keys = KEYS[:32]
    g = torch.Generator().manual_seed(3)
    views = {v: torch.randn(32, 2, 4, 4, generator=g) for v in ("s2", "s1")}
    labels = (torch.rand(32, 5, generator=g) < 0.5).float()
    labels[:, 0] = 1
    hidden = ~torch.from_numpy(labelled_mask(keys, 0.3, 0))
    scrambled = labels.clone()
    scrambled[hidden] = 1.0 - scrambled[hidden]
    losses = []
    for lab in (labels, scrambled):
        batch = pretrain.hide_unlabelled({**views, **_batch(keys, lab)}, 0.3, 0)
        torch.manual_seed(0)  # the same two augmentations
        loss, terms = pretrain.compute_loss(_Towers(), MosaicLoss(), batch, "mosaic")
        losses.append((loss, terms["sup"]))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    torch.manual_seed(0)
    everything = {**views, **_batch(keys, labels)}
    _, full = pretrain.compute_loss(_Towers(), MosaicLoss(), everything, "mosaic")
    assert not torch.equal(full["sup"], losses[0][1])  # the hidden labels would have counted


def test_a_pretraining_folder_is_not_resumed_with_another_labelled_subset(tmp_path):
    # Across requeues the subset must stay the same: its fraction and seed are part of the run.
    base = REPO / "configs/pretrain/mosaic.yaml"
    saved = config_lib.load(base, ["data.root=/nowhere", "loss.label_fraction=0.1"])
    config_lib.save_run_config(saved, tmp_path)
    config_lib.check_run_folder(saved, tmp_path, pretrain.RUN_IDENTITY)  # the same run: fine
    for override, key in (
        ("loss.label_fraction=0.01", "label_fraction"),
        ("loss.label_seed=3", "label_seed"),
    ):
        other = config_lib.load(base, ["data.root=/nowhere", "loss.label_fraction=0.1", override])
        with pytest.raises(config_lib.ConfigError, match=f"loss.{key}"):
            config_lib.check_run_folder(other, tmp_path, pretrain.RUN_IDENTITY)
