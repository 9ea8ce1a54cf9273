"""Which training samples are labelled in a low-label regime, decided per sample key.

A sample is labelled when a seeded hash of its key, read as a number in [0, 1), is below the
label fraction. The decision needs nothing but the key, the fraction and the seed, so it is
the same on every rank, in every DataLoader worker, across requeues and between pretraining
(which hides the labels of the other samples from the SupCon term) and the evaluation's
probe (which trains on the labelled ones only): both hash the key of
`pimc_dist.eval.tasks.sample_key` (the patch id, plus row and column for pixels) with the
fraction and `loss.label_seed` of their configs. The hash is BLAKE2b, not Python's `hash()`
(which is salted per process).

The share of labelled samples is the fraction in expectation (binomial around it), not
exactly: with 10,000 keys and fraction 0.1, within about +-0.01.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_SCALE = float(2**64)


def key_unit(sample_key: str, seed: int) -> float:
    """The key's seeded position in [0, 1): the first 8 bytes of BLAKE2b(seed, key)."""
    digest = hashlib.blake2b(
        str(sample_key).encode(), digest_size=8, person=b"pimc-labels", salt=_salt(seed)
    ).digest()
    return int.from_bytes(digest, "big") / _SCALE


def _salt(seed: int) -> bytes:
    return int(seed).to_bytes(16, "big", signed=True)


def _check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return fraction


def is_labelled(sample_key: str, fraction: float, seed: int) -> bool:
    """Whether the sample with this key keeps its labels at this label fraction."""
    fraction = _check_fraction(fraction)
    return fraction >= 1.0 or key_unit(sample_key, seed) < fraction


def labelled_mask(sample_keys: Iterable[str], fraction: float, seed: int) -> np.ndarray:
    """`is_labelled` of every key, as a boolean array."""
    fraction = _check_fraction(fraction)
    keys = list(sample_keys)
    if fraction >= 1.0:
        return np.ones(len(keys), dtype=bool)
    return np.fromiter((key_unit(k, seed) < fraction for k in keys), dtype=bool, count=len(keys))


def labelled_index(
    sample_keys: Iterable[str], fraction: float, seed: int, at_least_one: bool = True
) -> np.ndarray:
    """Sorted indices of the labelled keys. With `at_least_one`, a set in which no key falls
    under the fraction (a tiny split at 1 %) keeps the one key nearest to it, so that a probe
    still has a sample to train on (it then sees one label pretraining did not)."""
    keys = list(sample_keys)
    index = np.flatnonzero(labelled_mask(keys, fraction, seed))
    if index.size == 0 and at_least_one and keys:
        index = np.array([int(np.argmin([key_unit(k, seed) for k in keys]))])
    return index
