"""Metrics tracking: a local `metrics.jsonl` always, Weights & Biases from rank 0.

W&B runs offline by default, its files under `<run_dir>/wandb`; `tracking.mode=online`
needs a key (`wandb login` or WANDB_API_KEY). The W&B run id is kept in the
checkpoint's client state, so a requeued job continues the same W&B run
(`wandb.init(id=..., resume="allow")`).

W&B is silent on the console: rank 0 prints one line saying where its files are (and, offline,
how to upload them), and W&B's own messages go to `<run_dir>/wandb/debug.log`;
`tracking.verbose=true` lets W&B print its banner, warnings and summary again.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from pimc_dist.config import ConfigError


def wandb_module() -> Any:
    """The wandb module, or None where it is not installed. Imported on first use: it takes
    a third of a second, which every start with W&B off (and every check) would pay."""
    try:
        import wandb
    except ImportError:  # optional; required only when tracking.wandb is true
        return None
    return wandb


class TrackingError(ConfigError):
    """W&B was asked for in a way that cannot work here; the message names the key and says
    what to do. A ConfigError, so the launcher refuses it before submitting anything."""


def has_wandb_key() -> bool:
    """A W&B API key is set here (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry)."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )


def check_wandb(cfg: Any) -> None:
    """W&B as configured can start here: installed when asked for, a key when online."""
    if not cfg.tracking.wandb or cfg.tracking.mode == "disabled":
        return
    if wandb_module() is None:
        raise TrackingError(
            "invalid key 'tracking.wandb': true, but wandb is not installed: pip install wandb, "
            "or set tracking.wandb=false"
        )
    if cfg.tracking.mode == "online" and not has_wandb_key():
        raise TrackingError(
            "invalid key 'tracking.mode': online needs a W&B key and none is set here: run "
            "`wandb login` (or export WANDB_API_KEY=...), or use tracking.mode=offline and "
            "`wandb sync <run folder>/wandb/offline-run-*` later"
        )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (crash mid-write) is ignored, others must parse."""
    path = Path(path)
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {exc}") from exc
    return rows


def wandb_line(files_dir: str | os.PathLike, mode: str, url: str | None = None) -> str:
    """The one console line of a quiet W&B run: where its files are, and how to upload them."""
    run_folder = Path(files_dir).parent  # wandb's files/ lives inside the run's folder
    if mode == "offline":
        return f"W&B (offline): {run_folder}; upload later with `wandb sync {run_folder}`"
    return f"W&B ({mode}): {url or '-'}; files in {run_folder}"


class Tracker:
    """Logs metrics on rank 0 to metrics.jsonl and (optionally) W&B; a no-op elsewhere."""

    def __init__(
        self,
        cfg: Any,
        *,
        rank: int,
        run_dir: str | os.PathLike,
        run_id: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.active = rank == 0
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.run = None
        self.run_id = run_id
        if not self.active:
            return
        check_wandb(cfg)  # before the metrics file is opened: a refusal leaves nothing open
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a")  # noqa: SIM115 - closed in finish()
        if not cfg.tracking.wandb or cfg.tracking.mode == "disabled":
            return
        mode = cfg.tracking.mode
        verbose = bool(getattr(cfg.tracking, "verbose", False))
        self.run_id = run_id or secrets.token_hex(4)
        self._wandb = wandb = wandb_module()
        self.run = wandb.init(
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            group=cfg.tracking.group,
            tags=list(cfg.tracking.tags),
            name=cfg.name,
            id=self.run_id,
            resume="allow",
            mode=mode,
            dir=str(self.run_dir),
            config=config,
            settings=wandb.Settings(
                console="off",
                x_disable_stats=True,
                silent=not verbose,  # W&B's own messages then go to its debug log only
            ),
        )
        if not verbose:
            url = self.run.url if mode == "online" else None  # offline: W&B warns on .url
            print(wandb_line(self.run.dir, mode, url), flush=True)

    @property
    def wandb_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._wandb_call(lambda: self.run.log(metrics, step=step))

    def _wandb_call(self, call: Any) -> None:
        """Run a W&B call; if its service died (e.g. SIGTERM to the whole job) keep going without it."""
        if self.run is None:
            return
        try:
            call()
        except (OSError, RuntimeError, ConnectionError) as exc:
            print(
                f"warning: W&B logging stopped ({exc}); metrics.jsonl keeps every row", flush=True
            )
            self.run = None

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Log a few HxW or HxWx3 uint8 images (sample plots and crops) to W&B."""
        if not self.active or self.run is None or not images:
            return
        self._wandb_call(
            lambda: self.run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=step)
        )

    def summary(self, values: dict[str, Any]) -> None:
        if self.active and self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = _jsonable(value)

    def finish(self, exit_code: int = 0) -> None:
        if not self.active:
            return
        self._file.close()
        self._wandb_call(lambda: self.run.finish(exit_code=exit_code))
        self.run = None
