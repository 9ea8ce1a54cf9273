"""Tracking: metrics.jsonl and offline W&B on rank 0, resume of the same W&B run, bad files,
one console line from W&B unless tracking.verbose."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from wandb.proto import wandb_internal_pb2

from pimc_dist import config, tracking


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline W&B run logs (run-<id>.wandb) under a run folder, oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))


def wandb_history(path: Path, timeout_s: float = 60) -> tuple[str, list[dict]]:
    """(run id, history rows with their step) of an offline W&B run log, once it is complete.

    W&B's writer is a process of its own that flushes the log after `finish()` returns,
    so the log is read again until it holds the run's exit record (or `timeout_s`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        run_id, rows, complete = _read_wandb_log(Path(path))
        if complete or time.monotonic() > deadline:
            assert complete, f"{path}: no exit record after {timeout_s} s"
            return run_id, rows
        time.sleep(0.2)


def _read_wandb_log(path: Path) -> tuple[str | None, list[dict], bool]:
    """(run id, history rows, whether the exit record is there) of what the log holds now.

    The log is a LevelDB-style record file (W&B's "transaction log"): a 7-byte
    header, then 32 KiB blocks of records, each a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last) and a piece of a protobuf `Record`.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run log"
    pos, block, pending, run_id, rows, complete = 7, 32768, b"", None, [], False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record.FromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "exit":
            complete = True
        elif record.WhichOneof("record_type") == "run":
            run_id = record.run.run_id
        elif record.WhichOneof("record_type") == "history":
            row = {"step": record.history.step.num}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)  # an image's fields are nested
                if not key.startswith("_"):  # _step, _runtime, _timestamp
                    row[key] = json.loads(item.value_json)
            rows.append(row)
    return run_id, rows, complete


def cfg_for(tmp_path, *overrides):
    return config.load(None, [f"train.run_dir={tmp_path}", "name=trk", *overrides])


def test_rank0_writes_metrics_and_offline_wandb_files(tmp_path):
    cfg = cfg_for(tmp_path)
    t = tracking.Tracker(cfg, rank=0, run_dir=tmp_path, config={"a": 1})
    t.log({"loss": 1.5, "lr": 0.1}, step=1)
    t.log({"loss": float("nan")}, step=2)
    t.log_images({"rp": np.zeros((8, 8, 3), np.uint8)}, step=2)
    run_id = t.run_id
    t.finish()
    rows = tracking.read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 1.5, "lr": 0.1}, {"step": 2, "loss": "nan"}]
    runs = wandb_runs(tmp_path)
    assert [p.name for p in runs] == [f"run-{run_id}.wandb"]
    logged_id, history = wandb_history(runs[0])
    assert logged_id == run_id
    assert history[0] == {"step": 1, "loss": 1.5, "lr": 0.1}
    assert history[1]["step"] == 2 and math.isnan(history[1]["loss"])
    assert history[1]["rp/_type"] == "image-file"  # the image, logged at step 2 as well


def test_other_ranks_write_nothing(tmp_path):
    t = tracking.Tracker(cfg_for(tmp_path), rank=1, run_dir=tmp_path / "r1")
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert not (tmp_path / "r1").exists()


def test_resumed_tracker_continues_the_same_run_and_file(tmp_path):
    cfg = cfg_for(tmp_path)
    first = tracking.Tracker(cfg, rank=0, run_dir=tmp_path)
    first.log({"loss": 2.0}, step=1)
    first.finish()
    again = tracking.Tracker(cfg, rank=0, run_dir=tmp_path, run_id=first.run_id)
    again.log({"loss": 1.0}, step=2)
    again.finish()
    assert again.run_id == first.run_id
    assert [r["step"] for r in tracking.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    histories = [wandb_history(p) for p in wandb_runs(tmp_path)]
    assert histories == [
        (first.run_id, [{"step": 1, "loss": 2.0}]),
        (first.run_id, [{"step": 2, "loss": 1.0}]),
    ]


def test_wandb_disabled_still_writes_metrics(tmp_path):
    t = tracking.Tracker(cfg_for(tmp_path, "tracking.wandb=false"), rank=0, run_dir=tmp_path)
    t.log({"loss": 3.0}, step=5)
    t.finish()
    assert tracking.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 5, "loss": 3.0}]
    assert not (tmp_path / "wandb").exists()


def test_wandb_asked_for_but_not_installed_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(tracking.TrackingError, match="'tracking.wandb'.*pip install wandb"):
        tracking.Tracker(cfg_for(tmp_path), rank=0, run_dir=tmp_path)
    tracking.check_wandb(config.load(None, ["tracking.wandb=false"]))  # off: nothing needed


def test_online_without_a_key_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(tracking.TrackingError, match="wandb login"):
        tracking.Tracker(cfg_for(tmp_path, "tracking.mode=online"), rank=0, run_dir=tmp_path)


def test_read_metrics_ignores_a_torn_last_line_but_not_a_corrupt_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert tracking.read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        tracking.read_metrics(path)


TRACKED_RUN = """
import sys
from pimc_dist import config, tracking
cfg = config.load(None, [f"train.run_dir={sys.argv[1]}", "name=quiet", *sys.argv[2:]])
tracker = tracking.Tracker(cfg, rank=0, run_dir=sys.argv[1])
tracker.log({"loss": 1.0}, step=1)
tracker.log_images({"rp": __import__("numpy").zeros((8, 8, 3), "uint8")}, step=1)
tracker.summary({"steps": 1})
tracker.finish()
"""


def tracked_run_output(run_dir: Path, *overrides: str) -> list[str]:
    """Console lines (stdout and stderr) of a process that tracks a short offline run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_MODE"] = "offline"
    done = subprocess.run(
        [sys.executable, "-c", TRACKED_RUN, str(run_dir), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_a_tracked_run_prints_one_wandb_line_naming_its_files(tmp_path):
    lines = tracked_run_output(tmp_path)
    wandb_lines = [line for line in lines if "wandb" in line.lower() or "W&B" in line]
    assert len(wandb_lines) == 1, lines
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert str(run_folder) in wandb_lines[0] and "wandb sync" in wandb_lines[0]
    assert (run_folder / f"run-{run_folder.name.rsplit('-', 1)[1]}.wandb").is_file()


def test_tracking_verbose_restores_wandbs_own_output(tmp_path):
    lines = tracked_run_output(tmp_path, "tracking.verbose=true")
    assert sum(line.startswith("wandb:") for line in lines) > 1, lines
