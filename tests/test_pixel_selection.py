"""Hilbert-curve pixel order and spread, stratified pixel sampling (pimc_dist.pixel_selection)."""

from __future__ import annotations

import numpy as np
import pytest

from pimc_dist.pixel_selection import (
    class_quotas,
    hilbert_index,
    hilbert_order,
    patch_seed,
    sample_pixels,
)


def as_set(pixels: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in pixels}


# --- Hilbert order --------------------------------------------------------------------------


def test_smallest_hilbert_curves_by_hand():
    assert hilbert_order(1, 1).tolist() == [[0, 0]]
    assert hilbert_order(2, 2).tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]
    # Side 4: four side-2 curves, the first and last turned, joined end to start.
    assert hilbert_order(4, 4).tolist() == [
        [0, 0], [0, 1], [1, 1], [1, 0],
        [2, 0], [3, 0], [3, 1], [2, 1],
        [2, 2], [3, 2], [3, 3], [2, 3],
        [1, 3], [1, 2], [0, 2], [0, 3],
    ]  # fmt: skip


@pytest.mark.parametrize("side", [2, 8, 32, 128])
def test_power_of_two_order_visits_every_pixel_once_in_unit_steps(side):
    order = hilbert_order(side, side)
    assert order.shape == (side * side, 2) and order.dtype == np.int64
    assert len(as_set(order)) == side * side
    assert (np.abs(np.diff(order, axis=0)).sum(axis=1) == 1).all()
    assert order[0].tolist() == [0, 0] and order[-1].tolist() == [0, side - 1]


def test_every_aligned_block_is_one_contiguous_stretch_of_the_curve():
    # The property that makes equal curve segments compact regions of the patch.
    side = 32
    order = hilbert_order(side, side)
    for block in (2, 4, 8, 16):
        block_id = (order[:, 0] // block) * (side // block) + order[:, 1] // block
        changes = np.count_nonzero(np.diff(block_id))
        assert changes == (side // block) ** 2 - 1


@pytest.mark.parametrize("height,width", [(5, 7), (1, 9), (13, 3), (100, 128)])
def test_other_sizes_follow_the_enclosing_curve_without_outside_points(height, width):
    order = hilbert_order(height, width)
    assert len(as_set(order)) == height * width
    assert order[:, 0].max() == height - 1 and order[:, 1].max() == width - 1
    side = 1 << (max(height, width) - 1).bit_length()
    enclosing = hilbert_order(side, side)
    inside = (enclosing[:, 0] < height) & (enclosing[:, 1] < width)
    np.testing.assert_array_equal(order, enclosing[inside])


def test_empty_patch_has_empty_order():
    assert hilbert_order(0, 5).shape == (0, 2)


def test_hilbert_index_is_the_position_in_the_order():
    order = hilbert_order(16, 16)
    positions = hilbert_index(order[:, 0], order[:, 1], 4)
    np.testing.assert_array_equal(positions, np.arange(256))
    with pytest.raises(ValueError, match="outside the 16x16 square"):
        hilbert_index(np.array([16]), np.array([0]), 4)


# --- sampling -------------------------------------------------------------------------------


def test_picks_spread_one_per_block_when_segments_match_blocks():
    valid = np.ones((128, 128), dtype=bool)
    for k, block in ((4, 64), (16, 32), (64, 16)):
        picks = sample_pixels(valid, k, seed=3)
        blocks = as_set(picks // block)
        assert len(picks) == k and len(blocks) == k  # every block of the patch got exactly one


def test_picks_spread_over_quadrants_of_a_partly_valid_patch():
    rng = np.random.default_rng(0)
    valid = rng.random((100, 120)) > 0.5
    picks = sample_pixels(valid, 40, seed=1)
    quadrant = (picks[:, 0] >= 50) * 2 + (picks[:, 1] >= 60)
    counts = np.bincount(quadrant, minlength=4)
    assert counts.min() >= 7, counts  # about 10 each; uniform random draws would often give fewer


def test_same_seed_same_picks_different_seed_different_picks():
    valid = np.ones((64, 64), dtype=bool)
    first = sample_pixels(valid, 32, seed=7)
    np.testing.assert_array_equal(first, sample_pixels(valid, 32, seed=7))
    assert not np.array_equal(first, sample_pixels(valid, 32, seed=8))


def test_picks_are_unique_in_bounds_and_in_hilbert_order():
    valid = np.ones((30, 50), dtype=bool)
    picks = sample_pixels(valid, 100, seed=2)
    assert picks.shape == (100, 2) and picks.dtype == np.int64
    assert len(as_set(picks)) == 100
    assert picks[:, 0].min() >= 0 and picks[:, 0].max() < 30
    assert picks[:, 1].min() >= 0 and picks[:, 1].max() < 50
    rank = {(int(r), int(c)): i for i, (r, c) in enumerate(hilbert_order(30, 50))}
    ranks = [rank[(int(r), int(c))] for r, c in picks]
    assert ranks == sorted(ranks)


def test_invalid_and_excluded_pixels_are_never_picked():
    rng = np.random.default_rng(4)
    valid = rng.random((40, 40)) > 0.3
    labels = rng.integers(0, 20, size=(40, 40))
    for seed in range(5):
        picks = sample_pixels(valid, 200, labels=labels, exclude_labels=(19, 0), seed=seed)
        assert valid[picks[:, 0], picks[:, 1]].all()
        assert not np.isin(labels[picks[:, 0], picks[:, 1]], [0, 19]).any()
        assert len(picks) == 200


def test_k_larger_than_valid_count_returns_every_valid_pixel_once():
    valid = np.zeros((16, 16), dtype=bool)
    valid[3, 4] = valid[10, 1] = valid[15, 15] = True
    picks = sample_pixels(valid, 50)
    assert as_set(picks) == {(3, 4), (10, 1), (15, 15)} and len(picks) == 3


def test_empty_mask_and_zero_k_give_no_pixels():
    assert sample_pixels(np.zeros((8, 8), dtype=bool), 5).shape == (0, 2)
    assert sample_pixels(np.ones((8, 8), dtype=bool), 0).shape == (0, 2)
    labels = np.zeros((8, 8), dtype=int)
    empty = sample_pixels(np.zeros((8, 8), dtype=bool), 5, labels=labels, stratify=True)
    assert empty.shape == (0, 2)


def test_stratified_picks_are_balanced_across_classes_present():
    valid = np.ones((64, 64), dtype=bool)
    labels = np.zeros((64, 64), dtype=int)  # class 0: most of the patch
    labels[:8, :8] = 3  # 64 pixels
    labels[40:, 40:] = 5  # 576 pixels
    labels[20, 20:23] = 7  # 3 pixels: gives all it has
    labels[30:34, 0:4] = 19  # void
    picks = sample_pixels(valid, 30, labels=labels, stratify=True, exclude_labels=(19,), seed=5)
    classes, counts = np.unique(labels[picks[:, 0], picks[:, 1]], return_counts=True)
    assert dict(zip(classes.tolist(), counts.tolist(), strict=True)) == {0: 9, 3: 9, 5: 9, 7: 3}
    unstratified = sample_pixels(valid, 30, labels=labels, exclude_labels=(19,), seed=5)
    assert np.isin(labels[unstratified[:, 0], unstratified[:, 1]], [3, 7]).sum() < 9


def test_stratified_picks_spread_within_a_class():
    valid = np.ones((64, 64), dtype=bool)
    labels = np.zeros((64, 64), dtype=int)
    labels[:, 32:] = 1
    picks = sample_pixels(valid, 8, labels=labels, stratify=True, seed=0)
    # Each class holds two 32x32 quadrants, each a curve stretch: two of its 4 picks in each.
    for cls in (0, 1):
        rows = picks[labels[picks[:, 0], picks[:, 1]] == cls, 0]
        assert np.bincount(rows // 32, minlength=2).tolist() == [2, 2]


def test_class_quotas_water_fill():
    assert class_quotas([100, 100, 100], 10).tolist() == [3, 3, 4]
    assert class_quotas([2, 100, 100], 10).tolist() == [2, 4, 4]
    assert class_quotas([1, 1], 10).tolist() == [1, 1]
    assert class_quotas([], 10).tolist() == []
    rng = np.random.default_rng(6)
    for _ in range(200):
        counts = rng.integers(0, 30, size=rng.integers(1, 8))
        k = int(rng.integers(0, 120))
        quotas = class_quotas(counts, k)
        assert quotas.sum() == min(k, counts.sum())
        assert (quotas <= counts).all()
        # No class below its capacity is more than one pick behind any other class.
        short = quotas < counts
        if short.any():
            assert quotas.max() - quotas[short].min() <= 1


def test_bad_arguments_are_rejected():
    valid = np.ones((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="needs labels"):
        sample_pixels(valid, 3, stratify=True)
    with pytest.raises(ValueError, match=r"labels has shape \(3, 4\)"):
        sample_pixels(valid, 3, labels=np.zeros((3, 4), dtype=int))
    with pytest.raises(ValueError, match=r"\(H, W\) mask"):
        sample_pixels(np.ones((2, 4, 4), dtype=bool), 3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        sample_pixels(valid, -1)
    with pytest.raises(ValueError, match="exclude_labels needs labels"):
        sample_pixels(valid, 3, exclude_labels=(19,))


def test_patch_seed_is_stable_and_differs_between_patches():
    assert patch_seed(0, "10000") == patch_seed(0, "10000")
    assert patch_seed(0, "10000") != patch_seed(0, "10001")
    assert patch_seed(0, "10000") != patch_seed(1, "10000")
    valid = np.ones((32, 32), dtype=bool)
    a = sample_pixels(valid, 16, seed=patch_seed(0, "10000"))
    b = sample_pixels(valid, 16, seed=patch_seed(0, "10001"))
    assert not np.array_equal(a, b)
