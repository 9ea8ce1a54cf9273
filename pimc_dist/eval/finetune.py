"""Downstream evaluation of pretrained encoders: linear probes, full fine-tuning, baselines.

    python -m pimc_dist.finetune --config configs/finetune/pastis_pixel_cls.yaml ckpt=runs/tiny
    python -m pimc_dist.finetune --config configs/finetune/pastis_forecast.yaml ckpt=runs/tiny \\
        finetune.protocol=finetune train.lr=3e-4 finetune.label_fraction=0.1

`ckpt=` (short for `finetune.ckpt=`) is a pretraining run folder (its
`encoders.safetensors` and `config.yaml`, which defines the encoders) or an
encoders file (its folder's config.yaml, else this config's `model.views`,
defines them): `pimc_dist/eval/downstream.py`. Tasks, inputs and splits:
`pimc_dist/eval/tasks.py`. Settings and their checks: `pimc_dist/eval/finetune_config.py`.

Protocols (`finetune.protocol`, with `finetune.init` pretrained | random):
- `linear`: frozen encoders; features of every split computed once and cached
  under `finetune.feature_cache`; one linear head per `finetune.probe_lrs`
  entry, all trained in the same passes over the cached features
  (`pimc_dist/probe.py`); the best on validation is scored on test.
- `finetune`: encoders and a linear head trained end to end through the
  DeepSpeed engine (`pimc_dist.engine.Engine`: AdamW, warmup + cosine,
  `train.lr`, `train.batch_size` per rank, ZeRO from `deepspeed.*`); the test
  score reported is the one of the epoch with the best validation score.
- `cnn1d`: the same training with a 1D CNN on the raw index series in place of
  the encoders (the PIMC tasks' raw-series baseline).
`init=random` builds the same architecture without loading weights: the
random-init baseline of either protocol.

Every split is held in memory in its stored dtypes (uint8 plots, int16 crops):
fine for PASTIS pixel sets up to a few hundred thousand samples, the fixtures
and the low-label regimes; cap larger sets with `finetune.max_samples_per_split`.
The linear protocol encodes each rank's share of the data and gathers the
features on rank 0; fine-tuning reads every split on every rank and gives each
rank a disjoint part of every global batch.

Outputs in the run folder (`train.run_dir`): result.json (metrics, selected
learning rate or epoch, baselines, sample counts, timings, the resolved config),
confusion_matrix.png (classification), curves.png (loss and validation score per
epoch; finetune and cnn1d), heads.safetensors (linear heads), metrics.jsonl and
wandb/ (tracking; W&B group `tracking.group`; the two pictures go there too).
Leak guard (`pimc_dist/eval/leakage.py`): before any work, a checkpoint whose
pretraining shard set holds a val or test sample scored here stops the job
(exit status 2, the overlap per split and the fix);
`finetune.allow_pretrain_overlap=true` runs it anyway, and result.json records
`pretrain_overlap` (0, {split: count}, or "unknown" when the pretraining data
cannot be found). Classification and multi-label results add the k-NN score and
silhouette of the test embeddings (`metrics.cluster_metrics`).

A folder that holds another run (a pretraining, a sweep, or a fine-tuning that
differs in task, protocol, init, ckpt, inputs, label fraction, seed or, when
training, lr) is refused before anything is written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from pimc_dist import config as config_lib
from pimc_dist import distributed, run_lock, tracking, viz
from pimc_dist.augment import random_dihedral
from pimc_dist.distributed import gather_objects
from pimc_dist.engine import Engine, cast_batch
from pimc_dist.eval import leakage
from pimc_dist.eval import metrics as metrics_lib
from pimc_dist.eval.downstream import (
    EncoderSource,
    FinetuneError,
    build_downstream_model,
    owner_view,
    resolve_encoder_source,
)
from pimc_dist.eval.finetune_config import check_config
from pimc_dist.eval.probe import (
    cache_key,
    encode,
    file_identity,
    load_split_features,
    save_split_features,
    train_linear_heads,
)
from pimc_dist.eval.reading import (
    check_shard_sets,
    normalizer_for,
    output_classes,
    read_splits,
    season_steps,
    split_shards,
)
from pimc_dist.eval.tasks import (
    CROP_VIEWS,
    ENCODED_VIEWS,
    SPLITS,
    SplitData,
    Task,
    TaskError,
    get_task,
    label_subset,
)
from pimc_dist.files import write_json_atomic
from pimc_dist.models.weights import WeightsError
from pimc_dist.shardset import ShardError

RESULT_FILE = "result.json"

EXAMPLES = """examples:
  python -m pimc_dist.finetune --config configs/finetune/pastis_pixel_cls.yaml ckpt=runs/tiny
  python -m pimc_dist.finetune --config configs/finetune/pastis_pixel_cls.yaml finetune.init=random
  python -m pimc_dist.finetune --config configs/finetune/pastis_forecast.yaml ckpt=runs/tiny \\
      finetune.protocol=finetune train.lr=1e-3 finetune.epochs=5
  python -m pimc_dist.finetune --config configs/finetune/reben_multilabel.yaml \\
      ckpt=runs/mosaic_reben/encoders.safetensors finetune.label_fraction=0.1
  # on Slurm (or locally through submitit): python -m pimc_dist.launch finetune --config ... finetune.ckpt=...
"""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _cap(data: SplitData, cap: int | None, seed: int) -> SplitData:
    if cap is None or len(data) <= int(cap):
        return data
    rng = np.random.default_rng([int(seed), 104729])
    return data.subset(np.sort(rng.choice(len(data), int(cap), replace=False)))


def _require_splits(splits: dict[str, SplitData | None], report: dict[str, Any]) -> None:
    empty = [s for s in SPLITS if splits.get(s) is None or len(splits[s]) == 0]
    if empty:
        raise FinetuneError(
            f"no sample in split(s) {empty} (samples per split: {report['samples']}; shards "
            f"{report['shards']}); check finetune.fold_rotation / the shard sets' folds or splits"
        )


def _merge_shares(
    shares: list[SplitData | None], features: list[np.ndarray]
) -> tuple[np.ndarray, SplitData]:
    """Per-rank (features, split) shares -> one, sorted by sample key."""
    pairs = [(f, d) for f, d in zip(features, shares, strict=True) if d is not None and len(d)]
    if not pairs:
        return np.zeros((0, 0), np.float32), SplitData({}, np.zeros(0), [], None)
    feats = np.concatenate([f for f, _ in pairs])
    data = SplitData(
        inputs={k: np.concatenate([d.inputs[k] for _, d in pairs]) for k in pairs[0][1].inputs},
        target=np.concatenate([d.target for _, d in pairs]),
        keys=[k for _, d in pairs for k in d.keys],
        base=None if pairs[0][1].base is None else np.concatenate([d.base for _, d in pairs]),
        dropped={k: sum(d.dropped.get(k, 0) for _, d in pairs) for k in pairs[0][1].dropped},
        window=None if pairs[0][1].window is None else np.concatenate([d.window for _, d in pairs]),
    )
    order = np.argsort(np.asarray(data.keys, dtype=object), kind="stable")
    return feats[order], data.subset(order)


# ---------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------


def _cache_info(cfg: Any, task: Task, inputs: list[str], source: EncoderSource) -> dict[str, Any]:
    ft = cfg.finetune
    folders = split_shards(cfg)
    manifests = {}
    for split, folder in folders.items():
        path = Path(folder) / "manifest.json"
        manifests[split] = file_identity(path) if path.is_file() else str(path)
    return {
        "task": task.name,
        "inputs": inputs,
        "weights": file_identity(source.weights) if source.weights else None,
        "random_seed": None if source.weights else int(cfg.train.seed),
        "views": source.views,
        "shared_encoder": source.shared_encoder,
        "encoder_views": OmegaConf.to_container(ft.encoder_views),
        "input_bands": OmegaConf.to_container(ft.input_bands),
        "manifests": manifests,
        "fold_rotation": int(ft.fold_rotation),
        "input_steps": int(ft.input_steps),
        "horizon": int(ft.horizon),
        "rp_size": int(ft.rp_size),
        "forecast_anchor": str(ft.forecast_anchor),
        "max_samples_per_split": ft.max_samples_per_split,
    }


def run_linear(
    cfg: Any, task: Task, inputs: list[str], source: EncoderSource, rank: int, world: int
) -> dict[str, Any] | None:
    """The linear protocol; returns the result on rank 0 (None elsewhere)."""
    ft = cfg.finetune
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    key = cache_key(_cache_info(cfg, task, inputs, source))
    folder = Path(ft.feature_cache) / key
    cached = {s: load_split_features(folder, s) for s in SPLITS} if rank == 0 else {}
    have_all = all(cached.get(s) is not None for s in SPLITS)
    have_all = gather_objects(have_all)[0]
    used = {
        v: owner_view(source, str(ft.encoder_views.get(v, v))) for v in inputs if v in ENCODED_VIEWS
    }
    report: dict[str, Any] = {"feature_cache": str(folder), "cache_hit": bool(have_all)}
    if not have_all:
        splits, read_report = read_splits(cfg, task, inputs, SPLITS, rank, world)
        report.update(read_report)
        timings["read_s"] = time.perf_counter() - t0
        example = next((d for d in splits.values() if d is not None and len(d)), None)
        example = gather_objects(example.subset(np.arange(1)) if example is not None else None)
        example = next((e for e in example if e is not None), None)
        if example is None:
            raise FinetuneError(f"no sample found in {read_report['shards']}")
        model, _ = build_downstream_model(cfg, task, inputs, example, 1, source)
        normalizer = normalizer_for(cfg, task, inputs, read_report["band_names"])
        t1 = time.perf_counter()
        for split in SPLITS:
            data = splits[split]
            label = f"features {split}" + (f" (rank 0 of {world})" if world > 1 else "")
            feats = (
                encode(
                    model, data, normalizer, int(ft.eval_batch_size), label if rank == 0 else None
                )
                if data is not None
                else None
            )
            shares = gather_objects(data)
            feature_shares = gather_objects(feats)
            problem = None
            if rank == 0:
                merged = _merge_shares(shares, feature_shares)
                if len(merged[1]) == 0:
                    problem = (
                        f"no sample in the {split} split (samples per split: "
                        f"{read_report['samples']} on rank 0; shards "
                        f"{read_report['shards'][split]}); check finetune.fold_rotation / the "
                        "shard sets' folds or splits"
                    )
                else:
                    if ft.max_samples_per_split is not None:
                        merged = _cap_pair(merged, ft, cfg)
                    save_split_features(folder, split, *merged)
                    cached[split] = merged
            problem = gather_objects(problem)[0]  # every rank stops together
            if problem:
                raise FinetuneError(problem)
        timings["features_s"] = time.perf_counter() - t1
    report["encoders"] = used
    if rank != 0:
        return None
    counts = {s: len(cached[s][1]) for s in SPLITS}
    x_train, d_train = cached["train"]
    keep = label_subset(d_train.keys, float(ft.label_fraction), int(cfg.loss.label_seed))
    x_train, d_train = x_train[keep], d_train.subset(keep)
    classes = output_classes(cfg, task)
    out_dim = task.output_dim(classes, int(ft.horizon))
    t2 = time.perf_counter()
    result = train_linear_heads(
        task,
        (x_train, d_train),
        cached["val"],
        cached["test"],
        classes,
        out_dim,
        lrs=[float(x) for x in ft.probe_lrs],
        epochs=int(ft.probe_epochs),
        batch_size=int(ft.probe_batch_size),
        weight_decay=float(ft.probe_weight_decay),
        seed=int(cfg.train.seed),
        progress=f"{len(ft.probe_lrs)} linear heads",
    )
    timings["train_s"] = time.perf_counter() - t2
    if ft.save_heads:
        run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in result.heads.items()}, str(run_dir / "heads.safetensors")
        )
    return {
        "metrics": {
            **result.test_metrics,
            **_cluster_metrics(task, *cached["test"], int(cfg.train.seed)),
        },
        "val_metrics": result.val_metrics,
        "selected": {"lr": result.best_lr},
        "per_lr": result.per_lr,
        "loss_curve": result.loss_curve,
        "baselines": task.baselines(d_train, cached["test"][1], ft, season_steps(cfg)),
        "samples": {**counts, "train_labelled": len(d_train)},
        "feature_dim": int(x_train.shape[1]),
        "report": report,
        "timings": timings,
        "class_names": classes,
    }


def _cap_pair(
    pair: tuple[np.ndarray, SplitData], ft: Any, cfg: Any
) -> tuple[np.ndarray, SplitData]:
    feats, data = pair
    if len(data) <= int(ft.max_samples_per_split):
        return pair
    rng = np.random.default_rng([int(cfg.train.seed), 104729])
    idx = np.sort(rng.choice(len(data), int(ft.max_samples_per_split), replace=False))
    return feats[idx], data.subset(idx)


# ---------------------------------------------------------------------------
# Full fine-tuning (DeepSpeed)
# ---------------------------------------------------------------------------


@torch.no_grad()
def predict(
    module: nn.Module,
    data: SplitData,
    normalizer: Any,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    features: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Outputs of a split; with `features`, also appends what the head sees (the embeddings,
    the input of the model's `norm`) to that list, batch by batch."""
    module.eval()
    out = []
    norm = getattr(getattr(module, "module", module), "norm", None)  # DeepSpeed wraps the model
    hook = None
    if features is not None and norm is not None:
        hook = norm.register_forward_pre_hook(
            lambda _m, args: features.append(args[0].float().cpu().numpy())
        )
    try:
        for i in range(0, len(data), batch_size):
            batch = normalizer.batch(data.inputs, slice(i, i + batch_size))
            out.append(module(cast_batch(batch, dtype, device)).float().cpu().numpy())
    finally:
        if hook is not None:
            hook.remove()
    return np.concatenate(out)


def _cluster_metrics(task: Task, features: Any, data: SplitData, seed: int) -> dict[str, Any]:
    """k-NN score and silhouette of the test embeddings (classification, multi-label)."""
    if task.kind not in ("multiclass", "multilabel") or features is None:
        return {}
    x = np.concatenate(features) if isinstance(features, list) else np.asarray(features)
    if len(x) != len(data) or not np.isfinite(x).all():
        return {}
    return metrics_lib.cluster_metrics(x, data.target, task.kind, seed=seed)


def run_finetune(
    cfg: Any,
    task: Task,
    inputs: list[str],
    source: EncoderSource,
    rank: int,
    world: int,
    tracker: Any,
) -> dict[str, Any] | None:
    """The finetune and cnn1d protocols; returns the result on rank 0 (None elsewhere)."""
    ft = cfg.finetune
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    splits, report = read_splits(cfg, task, inputs, SPLITS, 0, 1)  # every rank reads everything
    _require_splits(splits, report)
    cap, seed = ft.max_samples_per_split, int(cfg.train.seed)
    splits = {s: _cap(d, cap, seed) for s, d in splits.items()}
    train = splits["train"].subset(
        label_subset(splits["train"].keys, float(ft.label_fraction), int(cfg.loss.label_seed))
    )
    timings["read_s"] = time.perf_counter() - t0
    classes = output_classes(cfg, task)
    out_dim = task.output_dim(classes, int(ft.horizon))
    model, used = build_downstream_model(cfg, task, inputs, train, out_dim, source)
    normalizer = normalizer_for(cfg, task, inputs, report["band_names"])

    n = len(train)
    per_rank = max(1, min(int(cfg.train.batch_size), n // world if n >= world else 1))
    steps_per_epoch = max(1, n // (per_rank * world))
    epochs = int(ft.epochs)
    total_steps = max(1, epochs * steps_per_epoch)
    engine = Engine(
        config_lib.with_updates(cfg, {"train": {"batch_size": per_rank, "grad_accum": 1}}),
        model,
        world_size=world,
        rank=rank,
        total_steps=total_steps,
    )
    device, dtype = engine.device, engine.compute_dtype
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    target = torch.from_numpy(np.asarray(train.target))
    best: dict[str, Any] | None = None
    history = []
    t1 = time.perf_counter()
    eval_s = 0.0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        engine.module.train()
        losses = []
        for step in range(steps_per_epoch):
            start = (step * world + rank) * per_rank
            idx = order[start : start + per_rank]
            if len(idx) == 0:  # fewer samples than ranks: reuse the first ones
                idx = order[:per_rank]
            batch = normalizer.batch(train.inputs, idx)
            if ft.augment:
                batch = {
                    k: random_dihedral(v, gen) if k in CROP_VIEWS else v for k, v in batch.items()
                }
            out = engine.module(engine.model_batch(batch))
            loss = task.loss(out.float(), target[idx].to(device))
            engine.module.backward(loss)
            engine.module.step()
            losses.append(float(loss.detach()))
        te = time.perf_counter()
        bs = int(ft.eval_batch_size)
        val_out = predict(engine.module, splits["val"], normalizer, bs, dtype, device)
        test_feats: list[np.ndarray] = []
        test_out = predict(engine.module, splits["test"], normalizer, bs, dtype, device, test_feats)
        eval_s += time.perf_counter() - te
        if rank == 0:
            val_m = task.score(val_out, splits["val"], classes)
            row = {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                f"val_{task.primary}": val_m.get(task.primary),
            }
            history.append(row)
            tracker.log(
                {"finetune/loss": row["loss"], f"val/{task.primary}": row[f"val_{task.primary}"]},
                step=epoch + 1,
            )
            print(
                f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}  val {task.primary} {row[f'val_{task.primary}']:.4f}",
                flush=True,
            )
            value = float(val_m.get(task.primary, float("nan")))
            if best is None or task.better(value, best["value"]):
                best = {"value": value, "epoch": epoch + 1, "val": val_m, "test_output": test_out,
                        "test_features": test_feats}  # fmt: skip
    timings["train_s"] = time.perf_counter() - t1 - eval_s
    timings["eval_s"] = eval_s
    if rank != 0:
        return None
    if best is None:  # every epoch non-finite: report the last one
        best = {"epoch": epochs, "val": val_m, "test_output": test_out, "test_features": test_feats}
    return {
        "metrics": {
            **task.score(best["test_output"], splits["test"], classes),
            **_cluster_metrics(task, best["test_features"], splits["test"], seed),
        },
        "val_metrics": best["val"],
        "selected": {"epoch": best["epoch"], "lr": float(cfg.train.lr)},
        "history": history,
        "baselines": task.baselines(train, splits["test"], ft, season_steps(cfg)),
        "samples": {**report["samples"], "train_labelled": n},
        "report": {**report, "encoders": used, "batch_per_rank": per_rank, "steps": total_steps},
        "timings": timings,
        "class_names": classes,
        "_test_output": best["test_output"],
    }


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def main(cfg: Any) -> int:
    """Run one downstream evaluation on this rank; rank 0 writes result.json. Returns 0."""
    check_config(cfg)
    t_start = time.perf_counter()
    ft = cfg.finetune
    task = get_task(ft.task)
    inputs = task.inputs(ft)
    check_shard_sets(cfg, task)
    env = distributed.detect_env()
    if env.world_size > 1 or ft.protocol != "linear":
        env = distributed.init_distributed(timeout_s=int(cfg.train.collective_timeout_s))
    rank, world = env.rank, env.world_size
    try:  # the leak guard (eval/leakage.py), before any work: every rank stops together
        overlap = leakage.guard(cfg, rank)
    except leakage.PretrainOverlapError:
        distributed.cleanup()
        raise
    torch.manual_seed(int(cfg.train.seed))
    source = (
        resolve_encoder_source(cfg)
        if ft.protocol != "cnn1d"
        else EncoderSource(None, {}, False, "")
    )
    run_dir = Path(cfg.train.run_dir)
    # One job per run folder: rank 0 holds its lock until the end (released in `finally`).
    lock = run_lock.acquire_on_rank0(run_dir, rank, gather_objects, "fine-tuning")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULT_FILE).unlink(missing_ok=True)
        config_lib.save_run_config(cfg, run_dir)
    tracker = tracking.Tracker(
        cfg, rank=rank, run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True)
    )
    exit_code = 1
    try:
        if ft.protocol == "linear":
            out = run_linear(cfg, task, inputs, source, rank, world)
        else:
            out = run_finetune(cfg, task, inputs, source, rank, world, tracker)
        if rank == 0:
            out["pretrain_overlap"] = overlap  # 0, {split: count} or "unknown"
            write_result(cfg, task, inputs, source, out, time.perf_counter() - t_start, tracker)
        exit_code = 0
    finally:
        tracker.finish(exit_code=exit_code)
        distributed.cleanup()  # also DeepSpeed's cached groups: a second run here starts clean
        lock.release()
    return 0


def write_result(
    cfg: Any,
    task: Task,
    inputs: list[str],
    source: EncoderSource,
    out: dict[str, Any],
    total_s: float,
    tracker: Any,
) -> Path:
    """result.json (+ confusion matrix PNG) in the run folder; prints where they are."""
    ft = cfg.finetune
    run_dir = Path(cfg.train.run_dir)
    test_output = out.pop("_test_output", None)
    del test_output
    class_names = out.pop("class_names")
    out["timings"]["total_s"] = total_s
    result = {
        "status": "ok",
        "task": task.name,
        "protocol": ft.protocol,
        "init": "none" if ft.protocol == "cnn1d" else ft.init,
        "inputs": inputs,
        "ckpt": ft.ckpt,
        "weights": str(source.weights) if source.weights else None,
        "architecture_from": source.arch_from,
        "label_fraction": float(ft.label_fraction),
        "seed": int(cfg.train.seed),
        "lr": float(cfg.train.lr) if ft.protocol != "linear" else None,
        "probe_lrs": [float(x) for x in ft.probe_lrs] if ft.protocol == "linear" else None,
        "primary": task.primary,
        "higher_is_better": task.higher_is_better,
        **out,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    files = {"result": run_dir / RESULT_FILE}
    cm = result["metrics"].get("confusion_matrix")
    if cm is not None:
        files["confusion matrix"] = metrics_lib.plot_confusion_matrix(
            cm,
            class_names,
            run_dir / "confusion_matrix.png",
            title=f"{task.name} {ft.protocol}/{ft.init} (test)",
        )
    if result.get("history"):  # finetune / cnn1d: loss and validation score per epoch
        val = f"val_{task.primary}"
        rows = [
            {"step": h["epoch"], "finetune/loss": h["loss"], f"val/{task.primary}": h[val]}
            for h in result["history"]
        ]
        files["curves"] = viz.plot_curves(run_dir, run_dir / "curves.png", rows=rows)
    write_json_atomic(files["result"], result)
    # After the last epoch's step: W&B drops rows logged at an earlier step.
    step = len(result.get("history", []))
    summary = {f"test/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    tracker.log(summary, step=step)
    tracker.summary(summary)
    viz.log_pngs(
        tracker,
        {"confusion_matrix": files.get("confusion matrix"), "curves": files.get("curves")},
        step=step,
    )
    value = result["metrics"].get(task.primary)
    print(
        f"{task.name} {ft.protocol}/{ft.init}: test {task.primary} = {value:.4f}"
        + "".join(
            f"  ({name} {b[task.primary]:.4f})" for name, b in result.get("baselines", {}).items()
        )
    )
    for name, path in files.items():
        print(f"  {name}: {path}")
    if "feature_cache" in result.get("report", {}):
        print(f"  features: {result['report']['feature_cache']}")
    return files["result"]


def cli_overrides(overrides: list[str]) -> list[str]:
    """`ckpt=...` is short for `finetune.ckpt=...`."""
    return [f"finetune.{o}" if o.startswith("ckpt=") else o for o in overrides]


def parse_args(argv: list[str] | None = None) -> Any:
    return config_lib.job_parser(
        "python -m pimc_dist.finetune",
        "Evaluate pretrained encoders on a downstream task: linear probe (cached features, a "
        "grid of heads in one pass), full fine-tuning through DeepSpeed, or a baseline. "
        "Writes result.json in the run folder.",
        EXAMPLES,
        "fine-tuning YAML (configs/finetune/*.yaml)",
        "dotted key=value overrides; ckpt=<run folder or encoders file>",
    ).parse_intermixed_args(argv)


# Errors whose message says it all, and their exit status (2: what the user asked, e.g. a
# checkpoint that does not fit; 1: what failed on the way). The command line and a job the
# launcher runs (pimc_dist.jobs) print the message alone, never a traceback.
USER_ERRORS: dict[type[Exception], int] = {
    config_lib.ConfigError: 2,
    run_lock.RunFolderError: 2,
    WeightsError: 2,
    TaskError: 1,
    FinetuneError: 1,
    ShardError: 1,
}


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, cli_overrides(args.overrides))
        return main(cfg)
    except tuple(USER_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in USER_ERRORS.items() if isinstance(exc, kind))


if __name__ == "__main__":
    sys.exit(cli())
