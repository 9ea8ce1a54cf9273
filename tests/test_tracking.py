"""Tracking: metrics.jsonl and offline W&B on rank 0, resume of the same W&B run, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pimc_dist import config, tracking


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
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


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


def test_wandb_disabled_still_writes_metrics(tmp_path):
    t = tracking.Tracker(cfg_for(tmp_path, "tracking.wandb=false"), rank=0, run_dir=tmp_path)
    t.log({"loss": 3.0}, step=5)
    t.finish()
    assert tracking.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 5, "loss": 3.0}]
    assert not (tmp_path / "wandb").exists()


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
