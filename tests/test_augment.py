"""Augmentations of crops on tensors: flips/rotations (pretraining and fine-tuning), and the
per-view crops, band jitter and dB noise of MoSAiC's two views (augment.<view>.*)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO

from pimc_dist import config as config_lib
from pimc_dist.augment import (
    ViewAugment,
    ViewAugmenter,
    band_jitter,
    db_noise,
    random_dihedral,
    random_resized_crop,
)
from pimc_dist.shardset import dihedral


def test_square_crops_get_each_of_the_eight_transforms_of_the_loader():
    x = torch.arange(9.0).reshape(1, 1, 3, 3).repeat(400, 1, 1, 1)
    out = random_dihedral(x, torch.Generator().manual_seed(0))
    seen = {tuple(o.flatten().tolist()) for o in out}
    expected = {tuple(dihedral(x[0].numpy(), k).flatten().tolist()) for k in range(8)}
    assert seen == expected


def test_oblong_crops_keep_their_shape_and_the_generator_makes_it_repeatable():
    x = torch.randn(64, 2, 3, 5)
    a = random_dihedral(x, torch.Generator().manual_seed(1))
    b = random_dihedral(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    allowed = [dihedral(x.numpy(), k) for k in (0, 2, 4, 6)]
    for i in range(len(x)):
        assert any(np.array_equal(a[i].numpy(), t[i]) for t in allowed)


# --- per-view augmentations (augment.<view>.*): crops, band jitter, noise in dB ---------------

MOSAIC = ViewAugmenter(
    {
        "s2": ViewAugment(crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2),
        "s1": ViewAugment(crop_scale=(0.5, 1.0), noise_db=0.5),
    }
)
OFF = ViewAugment(crop_scale=(1.0, 1.0), flips=False)


def s2_batch(n=16, bands=12, size=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, bands, size, size, generator=g)


def test_two_draws_of_one_batch_differ_for_every_sample_and_keep_shape_and_finite_values():
    for view, bands in (("s2", 12), ("s1", 2)):
        x = s2_batch(bands=bands)
        pair = MOSAIC.pair(view, x, torch.Generator().manual_seed(0))
        a, b = pair.chunk(2)
        assert pair.shape == (32, bands, 24, 24) and pair.dtype == x.dtype
        assert torch.isfinite(pair).all()
        assert all(not torch.equal(a[i], b[i]) for i in range(len(x)))
        assert not torch.equal(a, x) and not torch.equal(b, x)


def test_with_every_augmentation_off_the_draws_are_the_input():
    x = s2_batch()
    off = ViewAugmenter({"s2": OFF})
    a, b = off.pair("s2", x).chunk(2)
    assert torch.equal(a, x) and torch.equal(b, x)
    assert random_resized_crop(x, (1.0, 1.0)) is x
    assert band_jitter(x, 0.0, 0.0) is x and db_noise(x, 0.0) is x


def test_a_view_without_settings_gets_flips_and_rotations_only_as_before():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 3, 1, 1)
    out = ViewAugmenter()("s2", x, torch.Generator().manual_seed(0))
    allowed = [dihedral(x[0].numpy(), k) for k in range(8)]
    assert all(any(np.array_equal(o.numpy(), t) for t in allowed) for o in out)


def test_from_config_reads_the_augment_section_of_the_shipped_mosaic_config():
    cfg = config_lib.load(REPO / "configs/pretrain/mosaic.yaml", ["data.root=/nowhere"])
    aug = ViewAugmenter.from_config(cfg)
    assert aug.views["s2"].crop_scale == (0.5, 1.0) and aug.views["s2"].brightness == 0.2
    assert aug.views["s1"].noise_db == 0.5 and aug.views["s1"].brightness == 0.0
    assert ViewAugmenter.from_config(config_lib.load(None, [])).views == {}  # PIMC: none


@pytest.mark.parametrize("size", [(24, 24), (16, 30)])
def test_random_resized_crop_keeps_the_input_size_and_magnifies_a_part_of_it(size):
    h, w = size
    ramp = torch.linspace(0, 1, w).expand(8, 1, h, w).contiguous()
    out = random_resized_crop(ramp, (0.25, 0.25), (1.0, 1.0), torch.Generator().manual_seed(2))
    assert out.shape == ramp.shape and torch.isfinite(out).all()
    # A quarter of the area, square in pixels: sqrt(0.25 * h / w) of the width, so each row
    # spans that much of the ramp (half of it for a square crop).
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert torch.allclose(span, torch.full_like(span, (0.25 * h / w) ** 0.5), atol=0.06)
    assert (out >= 0).all() and (out <= 1).all()
    assert len({round(float(v), 3) for v in out[:, 0, 0, 0]}) > 1  # boxes at different places


def test_brightness_and_contrast_are_drawn_per_band_on_physical_values():
    mean = np.array([1000.0, 2000.0, 3000.0], np.float32)
    std = np.array([100.0, 200.0, 300.0], np.float32)
    raw = torch.tensor(mean).view(1, 3, 1, 1).expand(32, 3, 8, 8).contiguous()
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = band_jitter(x, 0.2, 0.0, torch.Generator().manual_seed(0), norm=(mean, std))
    back = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    factor = back / raw  # one factor per sample and band, applied to the reflectance
    per_band = factor[:, :, 0, 0]
    assert torch.allclose(factor, per_band[..., None, None].expand_as(factor), atol=1e-4)
    assert (per_band >= 0.8 - 1e-4).all() and (per_band <= 1.2 + 1e-4).all()
    assert (per_band.std(dim=1) > 0).all()  # the bands of one sample get different factors
    # Contrast scales each band around its own mean and leaves that mean.
    y = s2_batch(n=32, bands=3, size=8)
    c = band_jitter(y, 0.0, 0.2, torch.Generator().manual_seed(1))
    assert torch.allclose(c.mean(dim=(2, 3)), y.mean(dim=(2, 3)), atol=1e-5)
    ratio = (c - c.mean(dim=(2, 3), keepdim=True)).std(dim=(2, 3)) / y.std(dim=(2, 3))
    assert (ratio > 0.8 - 1e-3).all() and (ratio < 1.2 + 1e-3).all() and ratio.std(dim=1).min() > 0


def test_s1_noise_is_in_db_whatever_the_normalisation():
    x = torch.zeros(64, 2, 32, 32)
    raw = db_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert abs(float(raw.std()) - 0.5) < 0.01 and abs(float(raw.mean())) < 0.01
    std = np.array([2.0, 4.0], np.float32)  # normalised data: 0.5 dB is 0.25 and 0.125 std
    normed = db_noise(x, 0.5, torch.Generator().manual_seed(0), norm=(np.zeros(2), std))
    got = normed.std(dim=(0, 2, 3))
    assert torch.allclose(got, torch.tensor([0.25, 0.125]), rtol=0.03)


def test_draws_repeat_with_the_generator_and_keep_a_bf16_dtype():
    x = s2_batch()
    a = MOSAIC.pair("s2", x, torch.Generator().manual_seed(5))
    b = MOSAIC.pair("s2", x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    half = MOSAIC("s1", x[:, :2].bfloat16(), torch.Generator().manual_seed(5))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


def test_the_augmenter_uses_each_views_loader_normalisation():
    std = np.array([2.0, 4.0], np.float32)
    aug = ViewAugmenter({"s1": ViewAugment(flips=False, noise_db=0.5)}, {"s1": (np.zeros(2), std)})
    out = aug("s1", torch.zeros(64, 2, 32, 32), torch.Generator().manual_seed(0))
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.tensor([0.25, 0.125]), rtol=0.03)
    raw = ViewAugmenter({"s1": ViewAugment(flips=False, noise_db=0.5)})  # not normalised
    assert abs(float(raw("s1", torch.zeros(64, 2, 32, 32)).std()) - 0.5) < 0.01
