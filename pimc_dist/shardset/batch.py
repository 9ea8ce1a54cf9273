"""Loader stage 4: a list of decoded samples becomes a batch of arrays.

Everything that can be done once per batch is: samples are copied straight
into the batch arrays (or, for views flipped/rotated, into buffers reused from
batch to batch), PNG filters are undone for the whole batch, and samples are
sorted by their random flip/rotation so that each transform is one slice of the
batch (the order within a batch carries no meaning). Arrays keep their stored
dtypes (uint8 plots, int16 crops): the normalisation from the manifest
statistics runs on the training device (`normalize_views`, called by
ShardLoader.to_device), where it costs nothing next to the step, and the
worker's output, the shared-memory ring and the host-to-device copy are 2-4x
smaller than float32. The JSON travels as raw bytes, parsed when read (MetaList).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pimc_dist.recurrence import recurrence_plot_uint8
from pimc_dist.shardset.codec import unfilter_png_rows
from pimc_dist.shardset.errors import LoaderError
from pimc_dist.shardset.manifest import Manifest, ViewSpec, view_stats_arrays

_RP_FALLBACK_STATS = (127.5, 127.5)  # plots made on the fly, set without rp statistics


def view_normalisation(
    manifest: Manifest, views: list[str], rp_on_the_fly: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, std) of each of `views` that the manifest has statistics for
    (plots made on the fly from a set without plot statistics: 127.5, 127.5)."""
    norm = {}
    for view in views:
        stats = view_stats_arrays(manifest, view)
        if stats is None and view == "rp" and rp_on_the_fly != "off":
            mean, std = _RP_FALLBACK_STATS
            stats = (np.full(3, mean, np.float32), np.full(3, std, np.float32))
        if stats is not None:
            norm[view] = stats
    return norm


def normalize_views(
    batch: dict[str, Any], norm: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """`batch` with each view of `norm` as float32 (x - mean) / std per channel, on the
    device its tensor is on (a new tensor; the stored-dtype one is left as it is)."""
    out = dict(batch)
    for view, (mean, std) in norm.items():
        x = out.get(view)
        if x is None:
            continue
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.as_tensor(1.0 / std, device=x.device).view(shape)
        shift = torch.as_tensor(-mean / std, device=x.device).view(shape)
        # A float32 copy, then two in-place passes: faster on a CPU than one addcmul.
        out[view] = x.to(torch.float32, copy=True).mul_(scale).add_(shift)
    return out


def unfilter_rows(rows: np.ndarray, channels: int, out: np.ndarray | None = None) -> np.ndarray:
    """(N, H, 1 + W*C) PNG rows (filter None, Sub or Up per image) -> contiguous (N, C, H, W) uint8."""
    n, height, stride = rows.shape
    width = (stride - 1) // channels
    if out is None:
        out = np.empty((n, channels, height, width), np.uint8)
    kinds = rows[:, 0, 0]
    if (kinds == 0).all():  # None, stored plots (the writer's default): a transposing copy
        hwc = rows[:, :, 1:].reshape(n, height, width, channels)
        np.copyto(out, hwc.transpose(0, 3, 1, 2))
        return out
    if (kinds == 2).all():
        # Up, our encoder's filter: add each row to the next, rows outermost so each step is
        # one contiguous add over the whole batch (much faster than cumsum along an inner axis).
        x = np.ascontiguousarray(rows[:, :, 1:].transpose(1, 0, 2))
        for h in range(1, height):
            np.add(x[h], x[h - 1], out=x[h])
        np.copyto(out, x.reshape(height, n, width, channels).transpose(1, 3, 0, 2))
        return out
    for kind in np.unique(kinds):
        idx = np.flatnonzero(kinds == kind)
        out[idx] = unfilter_png_rows(rows[idx], channels).transpose(0, 3, 1, 2)
    return out


Array = np.ndarray | torch.Tensor


def dihedral(x: Array, k: int | Any) -> Array:
    """Flips/rotations of the last two axes of a numpy array or torch tensor.

    `k` in 0..7 picks one of the 8: 0 is the identity, 1..3 quarter turns
    (counter-clockwise, as np.rot90 / torch.rot90), 4..7 a left-right flip
    followed by k - 4 quarter turns. With one int, all of `x` is transformed (a
    numpy result may be a view of `x`); with one k per sample along the first
    axis (a sequence, array or tensor), each sample gets its own, into a new
    array. Odd k of non-square samples only with one int (the shape changes).
    """
    if isinstance(k, (int, np.integer)):
        k = int(k)
        if torch.is_tensor(x):
            return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, dims=(-2, -1))
        return np.rot90(x[..., ::-1] if k >= 4 else x, k % 4, axes=(-2, -1))
    ks = np.asarray(k.cpu() if torch.is_tensor(k) else k, dtype=np.int64).reshape(-1)
    if len(ks) != len(x):
        raise ValueError(f"dihedral: {len(ks)} transforms for {len(x)} samples")
    if x.shape[-1] != x.shape[-2] and (ks % 2).any():
        raise ValueError(f"dihedral: quarter turns of non-square samples {tuple(x.shape)}")
    out = x.clone() if torch.is_tensor(x) else x.copy()
    for kind in np.unique(ks[ks != 0]).tolist():
        idx = np.flatnonzero(ks == kind)
        if torch.is_tensor(x):
            idx = torch.as_tensor(idx, device=x.device)
        out[idx] = dihedral(x[idx], kind)
    return out


def random_transforms(n: int, square: bool, rng: np.random.Generator) -> np.ndarray:
    """Per-sample dihedral transform indices: all 8 for square crops, else the 4 flips."""
    choices = np.arange(8) if square else np.array([0, 4, 6, 2])  # 6 = vertical flip, 2 = rot180
    return rng.choice(choices, size=n)


class BatchBuilder:
    """Turns a list of decoded samples into a dict of tensors (see module docstring).

    Batches come in the stored dtypes; views flipped/rotated pass through buffers reused
    from batch to batch (fresh pages cost more than the copy into them); every array
    handed out is new (or a ring slot the consumer copies out of).
    """

    def __init__(
        self,
        specs: dict[str, ViewSpec],
        *,
        views: list[str],
        manifest: Manifest,
        augment_views: list[str],
        rp_on_the_fly: str,
        rp_size: int,
    ):
        self.specs = specs
        self.views = views
        # Crops flipped/rotated together; plots never (see LoaderConfig.augment_views).
        self.augment_views = [v for v in augment_views if v in specs and v in views and v != "rp"]
        self.square = all(specs[v].shape[-1] == specs[v].shape[-2] for v in self.augment_views)
        self.rp_on_the_fly = rp_on_the_fly
        self.rp_size = rp_size or None
        self.meta_tables = manifest.meta_tables
        self._buffers: dict[str, np.ndarray] = {}
        self._rp_fn = None

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(shape, dtype)
        return buf

    def collate(
        self, samples: list[dict[str, Any]], targets: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Raw batch arrays (dtype as stored) of every view read: written into `targets[view]`
        where given (the batch's own arrays), else into buffers reused from batch to batch."""
        n = len(samples)
        arrays = {}
        for view, spec in self.specs.items():
            out = targets.get(view)
            if out is None:
                out = self._buffer(view, (n, *spec.shape), np.dtype(spec.dtype))
            payloads = [sample[view] for sample in samples]
            if spec.ext == "npy":
                _fill(out, payloads)
            else:
                channels, height, width = spec.shape
                rows = self._buffer(f"{view}.rows", (n, height, 1 + width * channels), np.uint8)
                _fill(rows, payloads)
                unfilter_rows(rows, channels, out)
            arrays[view] = out
        return arrays

    def recurrence_plots(self, series: np.ndarray) -> np.ndarray:
        """(N, 3, T) series -> (N, 3, S, S) uint8 plots with pimc_dist.recurrence (CPU)."""
        if self._rp_fn is None:
            self._rp_fn = recurrence_plot_uint8
        plots = np.asarray(self._rp_fn(series.astype(np.float32), size=self.rp_size))
        if plots.dtype != np.uint8 or plots.ndim != 4 or plots.shape[:2] != series.shape[:2]:
            raise LoaderError(
                f"recurrence_plot_uint8 gave {plots.dtype} {plots.shape} for {series.shape}"
            )
        return plots

    def layout(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every array of a batch of `n` samples (labels and meta aside)."""
        out = {}
        for view in self.views:
            if view == "rp" and self.rp_on_the_fly == "gpu":
                out["rp_series"] = ((n, *self.specs["series"].shape), np.dtype(np.float32))
                continue
            if view == "rp" and self.rp_on_the_fly == "cpu":
                channels, steps = self.specs["series"].shape
                size = self.rp_size or steps
                shape, dtype = (channels, size, size), np.dtype(np.uint8)
            else:
                shape, dtype = self.specs[view].shape, np.dtype(self.specs[view].dtype)
            out[view] = ((n, *shape), dtype)
        return out

    def __call__(
        self,
        samples: list[dict[str, Any]],
        rng: np.random.Generator,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The batch of decoded `samples`: the arrays of `layout` (written into `out` where
        given, else new), `label`/`labels` arrays and `meta` (a MetaList) where the samples
        have JSON."""
        n = len(samples)
        if out is None:
            out = {k: np.empty(shape, dtype) for k, (shape, dtype) in self.layout(n).items()}
        groups = []
        if self.augment_views:
            # Samples sorted by their transform, so that each transform applies to one slice
            # of the batch (a view, no gather); the order within a batch carries no meaning.
            transforms = random_transforms(n, self.square, rng)
            order = np.argsort(transforms, kind="stable")
            samples = [samples[i] for i in order]
            bounds = np.searchsorted(transforms[order], np.arange(9)).tolist()
            groups = [(k, bounds[k], bounds[k + 1]) for k in range(8) if bounds[k] < bounds[k + 1]]
        # Views read as stored go straight into the batch; transformed ones via a buffer.
        direct = {v: out[v] for v in self.views if v in self.specs and v not in self.augment_views}
        arrays = self.collate(samples, direct)
        if self.rp_on_the_fly == "cpu" and "rp" in self.views:
            np.copyto(out["rp"], self.recurrence_plots(arrays["series"]))
        elif self.rp_on_the_fly == "gpu" and "rp" in self.views:
            np.copyto(out["rp_series"], arrays["series"])
        for view in self.augment_views:
            for k, a, b in groups:
                np.copyto(
                    out[view][a:b], dihedral(arrays[view][a:b], k) if k else arrays[view][a:b]
                )
        batch: dict[str, Any] = dict(out)
        if samples and "__meta__" in samples[0]:
            metas = [s["__meta__"] for s in samples]
            batch["meta"] = MetaList([s["__json__"] for s in samples], self._tables_of(metas))
            if "label" in metas[0]:
                labels = [m.get("label") for m in metas]
                batch["label"] = np.array([-1 if v is None else int(v) for v in labels], np.int64)
            if "labels" in metas[0]:
                batch["labels"] = np.array([m.get("labels") for m in metas], np.float32)
        return batch

    def _tables_of(self, metas: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The part of the metadata tables that `metas` name (what their MetaList carries)."""
        out = {}
        for key, table in self.meta_tables.items():
            ids = {m[key] for m in metas if key in m}
            if ids:
                out[key] = {i: table[i] for i in ids}
        return out


def as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its numpy arrays as torch tensors (sharing their memory)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class MetaList:
    """The JSON metadata of a batch, one dict per sample, parsed on first use.

    Workers parse every sample's JSON to check it (a sample whose JSON does not parse is
    skipped) and to read its labels, then pass on the raw bytes: a list of dicts costs more
    to pickle through a DataLoader queue and unpickle than parsing it again, and training
    never reads it. Values stored once in the manifest's metadata tables (the grid dates)
    come back from `tables` ({key: {id: value}}, the part this batch names), so each dict
    equals the JSON as written. Not a Sequence subclass, so torch's collate and pin_memory
    leave it alone instead of walking every value.
    """

    def __init__(self, raw: list[bytes], tables: dict[str, dict[str, Any]] | None = None):
        self._raw = raw
        self._tables = tables or {}
        self._items: list[dict[str, Any]] | None = None

    def _parsed(self) -> list[dict[str, Any]]:
        if self._items is None:
            items = [json.loads(r) for r in self._raw]
            for key, table in self._tables.items():
                for meta in items:
                    if key in meta:
                        value = table[meta[key]]
                        meta[key] = list(value) if isinstance(value, list) else value
            self._items = items
        return self._items

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int | slice) -> Any:
        return self._parsed()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._parsed())

    def __repr__(self) -> str:
        return f"MetaList({len(self._raw)} samples)"

    def __reduce__(self) -> tuple[Any, ...]:
        return MetaList, (self._raw, self._tables)

    def pin_memory(self, device: Any = None) -> MetaList:
        return self


def _fill(buf: np.ndarray, payloads: list[Any]) -> None:
    """Copy equal-sized byte payloads one after another into a contiguous array."""
    flat = memoryview(buf).cast("B")
    step = len(flat) // len(payloads)
    for i, payload in enumerate(payloads):
        flat[i * step : (i + 1) * step] = payload
