"""Downstream tasks: what each reads from the shards, what the model sees, what it predicts, how it is scored.

| task               | shards    | inputs (default)         | target                     | primary metric |
|--------------------|-----------|--------------------------|----------------------------|----------------|
| pastis_forecast    | PIMC      | rp of the input window   | the next `horizon` values  | rmse (lower)   |
|                    |           |                          | of NDVI, EVI, SAVI         |                |
| pixel_cls          | PIMC      | rp (as stored)           | the set's classes, its     | miou           |
|                    |           |                          | label_ignore values left out |              |
| pastis_pixel_cls   | PIMC      | rp (as stored)           | crop class, void ignored   | miou           |
| eurosat_cls        | scene     | image                    | one of 10 classes          | accuracy (oa)  |
| reben_multilabel   | MoSAiC    | s2                       | 19 labels, multi-hot       | map_macro      |
| sen12ms_multilabel | MoSAiC    | s2                       | 10 labels, multi-hot       | map_macro      |

Inputs: `rp`, `rsi`, `image`, `s2`, `s1` go through encoders; `series` is the raw
index series (flattened for linear heads, a 1D CNN in the `cnn1d` protocol).
PIMC tasks may add `rsi` (the crop) or `series` to their inputs; point-series sets have
no `rsi` (a point has no image), so there `[rp]`, `[rp, series]` or `[series]`.

Pixel classification (`pixel_cls`: PASTIS, GeoTIFF stacks with a class raster, point
tables). The classes are the shard set's class list (the manifest's `classes`, from
`data.class_names` or the reader's own list): class i names label value i. Values in the
set's `data.label_ignore` (recorded in its manifest) and PASTIS' void label (19, in sets
of source pastis / demo) are no class: they get no output, and samples carrying them, or
no label at all (-1), are left out of training and of every score (`dropped` counts them).
The other classes keep their order; their label values are renumbered 0..K-1 for the head.
`pastis_pixel_cls` is the PASTIS preset of it (void ignored). Metrics: oa, macro-F1,
mIoU, per-class F1 and IoU, confusion matrix.

Forecasting. From the first `input_steps` (32) values of the regular-grid
series the model predicts the next `horizon` (10) of each index. The plots are
made from the input window only (`pimc_dist.recurrence.recurrence_plot_uint8`,
the stored plot spans the horizon too). A recurrence plot keeps distances
between dates, not the level of the series, so by default
(`finetune.forecast_anchor=last`) models predict the change from the last
observed value (the persistence forecast) and the forecast is that value plus
the change; `none` makes them predict the values themselves. The raw window
can be added as an input (`finetune.inputs=[rp,series]`). Reported RMSEs are on
the values themselves.
Baselines scored on the same samples: `persistence` (last value), `climatology`
(the mean training curve of the horizon dates) and `seasonal_naive`: each
forecast step takes the value one season (a year) earlier on the regular grid,
the period being round(365.25 / data.grid_step_days) steps of the shard set
(37 at 10 days). It needs a window that holds a whole season (`input_steps` >= the
period, and `horizon` <= it); the default 32 x 10-day window does not, and then
the result has no seasonal_naive entry.

Splits. Each sample's split comes from its JSON: PASTIS samples by their
`fold` and the official rotation (`sources.pastis.FOLD_ROTATION[fold_rotation]`:
train/val/test folds), others by `split` ("train", "val"/"validation", "test").
Samples with neither get the split the sharder gives such records:
`sources.base.hash_split` of their group (the JSON's `group`, else their patch id),
with the `data.hash_split` fractions and `data.split_seed` recorded in that shard set's
manifest (defaults where it records none). All pixels of a patch share a split, and a
set sharded with `data.split=train` holds exactly the training samples of the same data
sharded whole. The three splits may come from one shard set (filtered here) or from
separate sets (`finetune.{train,val,test}_shards`, filtered the same way, so a set made
with `data.split=train` simply passes through): `pimc_dist.eval.reading`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pimc_dist.eval import metrics as metrics_lib
from pimc_dist.label_subset import labelled_index
from pimc_dist.recurrence import recurrence_plot_uint8
from pimc_dist.shardset import normalize_views
from pimc_dist.sources.base import hash_split
from pimc_dist.sources.pastis import FOLD_ROTATION, VOID_LABEL

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
INDEX_NAMES = ("NDVI", "EVI", "SAVI")
ENCODED_VIEWS = ("rp", "rsi", "image", "s2", "s1")
RAW_VIEWS = ("series",)
CROP_VIEWS = ("rsi", "image", "s2", "s1")  # flipped/rotated when fine-tuning with augment
# Plot statistics when the shard set has none for "rp": the mid-grey of the uint8 scale.


class TaskError(ValueError):
    """A task cannot run on this data or with these settings; the message says why."""


# ---------------------------------------------------------------------------
# Splits in memory
# ---------------------------------------------------------------------------


@dataclass
class SplitData:
    """One split in memory, samples sorted by key.

    `inputs`: view -> array in its stored dtype (normalised per batch, see `Normalizer`);
    `target`: labels (N,), multi-hot (N, K) or forecast residuals (N, C, H);
    `base`: forecasting only, the value (N, C) the residual targets start from (the last
    observed one, or 0 with forecast_anchor none); `window`: forecasting only, the input
    window (N, C, T) as values, for the baselines.
    """

    inputs: dict[str, np.ndarray]
    target: np.ndarray
    keys: list[str]
    base: np.ndarray | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    window: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: np.ndarray | Sequence[int]) -> SplitData:
        index = np.asarray(index, dtype=np.int64)
        return SplitData(
            inputs={k: v[index] for k, v in self.inputs.items()},
            target=self.target[index],
            keys=[self.keys[i] for i in index],
            base=None if self.base is None else self.base[index],
            dropped=dict(self.dropped),
            window=None if self.window is None else self.window[index],
        )


def label_subset(keys: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the labelled samples among `keys` (their `sample_key`s): the same
    subset whose labels a MoSAiC pretraining with this `loss.label_fraction` and
    `loss.label_seed` gave its SupCon term (`pimc_dist.label_subset`); at least one."""
    if not 0.0 < fraction <= 1.0:
        raise TaskError(f"finetune.label_fraction must be in (0, 1], got {fraction}")
    return labelled_index(keys, fraction, seed)


def sample_key(meta: dict[str, Any]) -> str:
    """A sample's identity from its JSON: patch id, plus row and column for pixels."""
    patch = str(meta.get("patch", ""))
    if "row" in meta and "col" in meta:
        return f"{patch}_r{int(meta['row']):05d}_c{int(meta['col']):05d}"
    return patch


@dataclass(frozen=True)
class SplitRule:
    """How a shard set's sharder split records that carry no split of their own: the
    `data.hash_split` fractions ({} = the default) and `data.split_seed` of its manifest."""

    fractions: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def of(cls, manifest: Any) -> SplitRule:
        config = getattr(manifest, "config", None) or {}
        return cls(dict(config.get("hash_split") or {}), int(config.get("split_seed") or 0))


def split_of(meta: dict[str, Any], fold_rotation: int, rule: SplitRule | None = None) -> str:
    """train | val | test for one sample (module docstring: Splits)."""
    fold = meta.get("fold")
    if isinstance(fold, int) and not isinstance(fold, bool) and fold > 0:
        for name, folds in zip(SPLITS, FOLD_ROTATION[fold_rotation], strict=True):
            if fold in folds:
                return name
        raise TaskError(f"sample {sample_key(meta)}: fold {fold} is not one of PASTIS' folds 1-5")
    split = meta.get("split")
    if isinstance(split, str) and split in SPLIT_ALIASES:
        return SPLIT_ALIASES[split]
    rule = rule or SplitRule()
    group = meta.get("group")
    group = group if group not in (None, "") else meta.get("patch", "")
    try:
        name = hash_split(group, rule.seed, rule.fractions or None)
    except ValueError as exc:
        raise TaskError(str(exc)) from None
    if name not in SPLIT_ALIASES:
        raise TaskError(
            f"data.hash_split of the shard set names split {name!r}; the evaluation needs "
            f"{', '.join(SPLITS)}"
        )
    return SPLIT_ALIASES[name]


@dataclass(frozen=True)
class LabelSpace:
    """The output classes of a classification task on a shard set: `names[i]` is the class
    of stored label value `values[i]`; `ignored`: values that are no class."""

    names: list[str]
    values: list[int]
    ignored: list[int]

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Stored label values -> class indices 0..K-1; -1 for the rest (ignored, unlabelled,
        unnamed)."""
        lookup = {v: i for i, v in enumerate(self.values)}
        return np.array([lookup.get(int(v), -1) for v in labels], dtype=np.int64)


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------


class Normalizer:
    """Per-view, per-channel (x - mean) / std into float32 tensors (stats from the shard set)."""

    def __init__(self, stats: dict[str, tuple[np.ndarray, np.ndarray] | None]):
        self.stats = stats

    def __call__(self, view: str, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        stats = self.stats.get(view)
        if stats is None:
            return t.float()
        # The training loader's own normalisation, so that features match pretraining's.
        return normalize_views({view: t}, {view: stats})[view]

    def batch(
        self, inputs: dict[str, np.ndarray], index: np.ndarray | slice
    ) -> dict[str, torch.Tensor]:
        return {view: self(view, arr[index]) for view, arr in inputs.items()}


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What a downstream task reads, predicts and scores (see the module docstring)."""

    name: str
    kind: str  # multiclass | multilabel | forecast
    dataset_kind: str  # the shard set's manifest kind: pimc | scene | mosaic
    default_inputs: tuple[str, ...]
    allowed_inputs: tuple[str, ...]
    primary: str
    higher_is_better: bool
    ignore_label: int | None = None  # multiclass: a label left out of training and scoring
    # multiclass: also leave out the shard set's data.label_ignore values (and PASTIS void)
    set_ignores: bool = False

    # -- what to read ------------------------------------------------------------------

    def inputs(self, ft: Any) -> list[str]:
        """The input views of a run (`finetune.inputs`, the default, or the series for cnn1d)."""
        if ft.protocol == "cnn1d":
            if "series" not in self.allowed_inputs:
                raise TaskError(f"{self.name}: the cnn1d protocol needs index series (PIMC data)")
            return ["series"]
        chosen = list(ft.inputs) or list(self.default_inputs)
        bad = [v for v in chosen if v not in self.allowed_inputs]
        if bad:
            raise TaskError(
                f"finetune.inputs: {bad} not available for {self.name} "
                f"(choose from {list(self.allowed_inputs)})"
            )
        if len(set(chosen)) != len(chosen):
            raise TaskError(f"finetune.inputs lists a view twice: {chosen}")
        return chosen

    def stored_views(self, inputs: Sequence[str]) -> list[str]:
        """Shard views to read for these inputs."""
        if self.kind == "forecast":
            return ["series"] + [v for v in inputs if v not in ("rp", "series")]
        return list(inputs)

    def label_space(self, manifest: Any) -> LabelSpace:
        """Output classes and the label values they stand for, from a shard set's manifest."""
        classes = [str(c) for c in manifest.classes]
        config = manifest.config or {}
        if not classes:
            hint = (
                " (name them when sharding: data.class_names, class_names[i] naming label "
                "value i, and data.label_ignore for the values that mean 'no label')"
                if config.get("source") in ("geotiff_stack", "point_series")
                else ""
            )
            raise TaskError(f"{self.name}: the shard set {manifest.path} lists no classes{hint}")
        ignored = set() if self.ignore_label is None else {int(self.ignore_label)}
        if self.set_ignores:
            ignored |= {int(v) for v in config.get("label_ignore") or ()}
            if manifest.source in ("pastis", "demo"):
                ignored.add(VOID_LABEL)
        values = [v for v in range(len(classes)) if v not in ignored]
        if not values:
            raise TaskError(f"{self.name}: every class of {manifest.path} is ignored")
        return LabelSpace([classes[v] for v in values], values, sorted(ignored))

    def class_names(self, classes: Sequence[str]) -> list[str]:
        """Output classes of a class list, minus the ignored label (of a shard set:
        `output_classes`, which also leaves out the set's label_ignore values)."""
        if self.kind == "forecast":
            return list(INDEX_NAMES)
        names = list(classes)
        if not names:
            raise TaskError(f"{self.name}: the shard set lists no classes")
        if self.ignore_label is not None and self.ignore_label == len(names) - 1:
            names = names[:-1]
        return names

    def output_dim(self, class_names: Sequence[str], horizon: int) -> int:
        return len(INDEX_NAMES) * horizon if self.kind == "forecast" else len(class_names)

    # -- turning decoded batches into a split -------------------------------------------

    def prepare(
        self,
        arrays: dict[str, np.ndarray],
        metas: list[dict[str, Any]],
        ft: Any,
        inputs: Sequence[str],
        band_names: dict[str, list[str]],
        labels: LabelSpace | None = None,
    ) -> SplitData:
        """A SplitData from stored arrays (stacked over samples) and their JSON; `labels`
        (multiclass) maps stored label values to class indices, dropping the others."""
        keys = [sample_key(m) for m in metas]
        order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if keys else np.arange(0)
        keys = [keys[i] for i in order]
        arrays = {k: v[order] for k, v in arrays.items()}
        metas = [metas[i] for i in order]
        selected = {v: select_bands(arrays[v], band_names.get(v), ft.input_bands.get(v), v)
                    for v in arrays}  # fmt: skip
        dropped: dict[str, int] = {}
        base = None
        if self.kind == "forecast":
            series = arrays["series"].astype(np.float32)
            n_in, horizon = int(ft.input_steps), int(ft.horizon)
            if series.shape[-1] < n_in + horizon:
                raise TaskError(
                    f"{self.name}: series of {series.shape[-1]} steps cannot hold "
                    f"{n_in} input + {horizon} forecast steps (finetune.input_steps/horizon; "
                    "shard with data.grid_length >= their sum)"
                )
            window = series[..., :n_in]
            out: dict[str, np.ndarray] = {}
            for view in inputs:
                if view == "rp":
                    out["rp"] = window_plots(window, int(ft.rp_size) or None)
                elif view == "series":
                    out["series"] = window
                else:
                    out[view] = selected[view]
            if ft.forecast_anchor == "last":
                base = window[..., -1].copy()
            elif ft.forecast_anchor == "none":
                base = np.zeros(window.shape[:-1], np.float32)
            else:
                raise TaskError(
                    f"finetune.forecast_anchor: '{ft.forecast_anchor}' is not last or none"
                )
            target = series[..., n_in : n_in + horizon] - base[..., None]
            return SplitData(out, target.astype(np.float32), keys, base, dropped, window)

        out = {view: selected[view] for view in inputs}
        if self.kind == "multiclass":
            stored = np.array([_label_value(m) for m in metas], dtype=np.int64)
            if labels is not None:
                target = labels.targets(stored)
                keep = target >= 0
                dropped["ignored_label"] = int(np.isin(stored, labels.ignored).sum())
                dropped["unlabelled"] = int((~keep).sum()) - dropped["ignored_label"]
            else:
                target, keep = stored, stored >= 0
                if self.ignore_label is not None:
                    keep &= stored != self.ignore_label
                dropped["ignored_label"] = int((~keep).sum())
            data = SplitData(out, target, keys, None, dropped)
            return data.subset(np.flatnonzero(keep)) if not keep.all() else data
        if self.kind == "multilabel":
            rows = [m.get("labels") for m in metas]
            if any(r is None for r in rows):
                raise TaskError(f"{self.name}: samples without 'labels' in their JSON")
            target = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
            return SplitData(out, target, keys, None, dropped)
        raise TaskError(f"unknown task kind {self.kind!r}")

    # -- training and scoring ----------------------------------------------------------

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "multiclass":
            return F.cross_entropy(output, target.long())
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(output, target.float())
        return F.mse_loss(output, target.reshape(output.shape).float())

    def score(
        self,
        output: np.ndarray,
        data: SplitData,
        class_names: Sequence[str],
        threshold: float = 0.5,
    ) -> dict[str, Any]:
        """Metrics of raw model outputs (logits, or forecast residuals) against a split."""
        output = np.asarray(output, dtype=np.float64)
        if not np.isfinite(output).all():
            return {self.primary: float("nan"), "n": len(data), "nonfinite_outputs": True}
        if self.kind == "multiclass":
            pred = output.argmax(axis=1)
            return metrics_lib.classification_metrics(data.target, pred, class_names)
        if self.kind == "multilabel":
            probs = 1.0 / (1.0 + np.exp(-output))
            return metrics_lib.multilabel_metrics(data.target, probs, class_names, threshold)
        return self.score_forecast(output.reshape(data.target.shape), data)

    def score_forecast(self, residual: np.ndarray, data: SplitData) -> dict[str, Any]:
        truth = data.target + data.base[..., None]
        pred = residual + data.base[..., None]
        return metrics_lib.forecast_metrics(truth, pred, INDEX_NAMES)

    def better(self, a: float, b: float) -> bool:
        """Whether primary-metric value a beats b (NaN never beats anything)."""
        if np.isnan(a):
            return False
        if np.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b

    def baselines(
        self, train: SplitData, test: SplitData, ft: Any, season: int | None = None
    ) -> dict[str, dict[str, Any]]:
        """Forecasting: persistence, climatology and (with a `season` of grid steps that the
        input window holds) seasonal naive on `test`; {} for other tasks."""
        if self.kind != "forecast":
            return {}
        horizon = int(ft.horizon)
        out = {}
        if test.window is not None:
            window = test.window
            persistence = np.repeat(window[..., -1:], horizon, axis=-1)
            out["persistence"] = self.score_forecast(persistence - test.base[..., None], test)
            n_in = window.shape[-1]
            if season and n_in >= season >= horizon:
                # Step n_in + h is forecast by step n_in + h - season, inside the window.
                earlier = window[..., n_in - season : n_in - season + horizon]
                out["seasonal_naive"] = self.score_forecast(earlier - test.base[..., None], test)
        if len(train):
            curve = (train.target + train.base[..., None]).mean(axis=0)  # (C, H)
            out["climatology"] = self.score_forecast(curve[None] - test.base[..., None], test)
        return out


def _label_value(meta: dict[str, Any]) -> int:
    label = meta.get("label")
    return -1 if label is None or isinstance(label, bool) else int(label)


def window_plots(window: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 recurrence plots (N, 3, S, S) of (N, 3, T) index windows (values as stored)."""
    # float16 first: the stored precision, so a plot equals what the sharder would make.
    values = np.ascontiguousarray(window.astype(np.float16).astype(np.float32))
    if values.shape[0] == 0:
        s = size or values.shape[-1]
        return np.zeros((0, values.shape[1], s, s), np.uint8)
    return recurrence_plot_uint8(values, size=size)


def select_bands(
    array: np.ndarray, names: list[str] | None, wanted: Sequence[str] | None, view: str
) -> np.ndarray:
    """Channels of (N, C, ...) `array` named `wanted`, in that order; all when none asked for."""
    if not wanted:
        return array
    if not names:
        raise TaskError(
            f"finetune.input_bands.{view}: the samples' JSON names no bands for view {view}"
        )
    missing = [b for b in wanted if b not in names]
    if missing:
        raise TaskError(
            f"finetune.input_bands.{view}: bands {missing} not in the data (it has {names})"
        )
    return array[:, [names.index(b) for b in wanted]]


def band_names_of(meta: dict[str, Any]) -> dict[str, list[str]]:
    """Band names per view from a sample's JSON (scene: "bands"; MoSAiC: "s2_bands", "s1_bands")."""
    out = {}
    if isinstance(meta.get("bands"), list):
        out["image"] = list(meta["bands"])
    for view in ("s2", "s1"):
        if isinstance(meta.get(f"{view}_bands"), list):
            out[view] = list(meta[f"{view}_bands"])
    return out


def _pixel_task(name: str, **preset: Any) -> Task:
    """A PIMC pixel classification: rp by default, the crop (rsi) or the series addable."""
    return Task(
        name, "multiclass", "pimc", ("rp",), ("rp", "rsi", "series"), "miou", True, **preset
    )


def _multilabel_task(name: str) -> Task:
    """A MoSAiC multi-label classification: S2 by default, S1 addable."""
    return Task(name, "multilabel", "mosaic", ("s2",), ("s2", "s1"), "map_macro", True)


# Task(name, kind, dataset_kind, default_inputs, allowed_inputs, primary, higher_is_better)
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "pastis_forecast", "forecast", "pimc", ("rp",), ("rp", "series", "rsi"), "rmse", False
        ),
        _pixel_task("pixel_cls", set_ignores=True),
        _pixel_task("pastis_pixel_cls", ignore_label=VOID_LABEL),  # PASTIS' void label (19)
        Task("eurosat_cls", "multiclass", "scene", ("image",), ("image",), "oa", True),
        _multilabel_task("reben_multilabel"),
        _multilabel_task("sen12ms_multilabel"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"finetune.task: unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = [
    "INDEX_NAMES",
    "SPLITS",
    "TASKS",
    "LabelSpace",
    "Normalizer",
    "SplitData",
    "SplitRule",
    "Task",
    "TaskError",
    "band_names_of",
    "get_task",
    "label_subset",
    "sample_key",
    "select_bands",
    "split_of",
    "window_plots",
]
