"""The quickstart (`python -m pimc_dist.launch` with no arguments), end to end; slow (~3 min)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, run_module

# The least margin (pretrained better than random init, primary metric) the quickstart must show;
# docs/quality.md gives the measured ones.
MARGIN = {"pastis_pixel_cls": 0.02, "pastis_forecast": 0.01}


@pytest.mark.slow
def test_quickstart_pretrains_evaluates_and_writes_results():
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    proc = run_module("pimc_dist.launch", env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((REPO / "runs/quickstart/results.json").read_text())
    assert set(results["tasks"]) == {"pastis_pixel_cls", "pastis_forecast"}
    for task in results["tasks"].values():
        assert set(task["pretrained"]) == set(task["random"])
    # The claim (docs/quality.md): the pretrained encoder beats the random-init one on both
    # tasks, by a margin on the primary metric. (Beating persistence is no claim: random init
    # does too.)
    pixel, forecast = results["tasks"]["pastis_pixel_cls"], results["tasks"]["pastis_forecast"]
    assert (pixel["primary"], forecast["primary"]) == ("miou", "rmse")
    assert pixel["margin"] == pytest.approx(pixel["pretrained"]["miou"] - pixel["random"]["miou"])
    assert forecast["margin"] == pytest.approx(
        forecast["random"]["rmse"] - forecast["pretrained"]["rmse"]
    )
    assert pixel["margin"] >= MARGIN["pastis_pixel_cls"], pixel
    assert forecast["margin"] >= MARGIN["pastis_forecast"], forecast
    assert pixel["pretrained"]["oa"] > pixel["random"]["oa"]
    assert "margin" in proc.stdout
    assert "results" in proc.stdout and "checkpoints" in proc.stdout


def test_launch_with_arguments_does_not_start_the_quickstart():
    proc = run_module("pimc_dist.launch", "--help", timeout=120)
    assert proc.returncode == 0 and "--nodes" in proc.stdout


def test_quickstart_help_shows_an_example_and_other_arguments_are_refused():
    proc = run_module("pimc_dist.quickstart", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "example:" in proc.stdout and "python -m pimc_dist.launch" in proc.stdout
    proc = run_module("pimc_dist.quickstart", "now", timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: now" in proc.stderr


def test_stage_lines_show_elapsed_time_and_an_eta_at_the_pace_so_far(monkeypatch, capsys):
    from pimc_dist import quickstart

    now = [0.0]
    monkeypatch.setattr(quickstart.time, "perf_counter", lambda: now[0])
    stages = quickstart.Stages([10.0, 60.0, 30.0])
    stages.start("shards")
    assert "=== 1/3 shards (elapsed 0:00, ETA ~1:40) ===" in capsys.readouterr().out
    now[0] = 20.0  # the first stage does not set the pace: the rest keeps its typical 90 s
    stages.done()
    assert "(stage 0:20; elapsed 0:20, ETA ~1:30 for the rest)" in capsys.readouterr().out
    stages.start("pretraining")
    assert "=== 2/3 pretraining (elapsed 0:20, ETA ~1:30) ===" in capsys.readouterr().out
    now[0] = 110.0  # 90 s for 60 s of typical work: the rest is expected 1.5x slower too
    stages.done()
    assert "(stage 1:30; elapsed 1:50, ETA ~0:45 for the rest)" in capsys.readouterr().out
    stages.start("evaluation")
    now[0] = 150.0
    stages.done()
    assert capsys.readouterr().out.splitlines()[-1] == "    (stage 0:40; elapsed 2:30)"  # no ETA


def test_console_scripts_in_pyproject_resolve_to_callables():
    import importlib
    import importlib.metadata
    import re

    # The [project.scripts] table (tomllib is not in Python 3.10).
    text = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1]
    table = text.split("\n[", 1)[0]
    declared = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', table, flags=re.MULTILINE))
    assert {"pimc-launch", "pimc-shard", "pimc-pretrain", "pimc-finetune"} <= set(declared)
    for name, target in declared.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name in declared
    }
    # The installed package declares the same scripts (reinstall after changing pyproject.toml).
    assert installed == declared


def test_cached_built_in_shards_of_an_older_format_are_rebuilt(tmp_path, capsys):
    from pimc_dist import shard_plan as shard
    from pimc_dist import shardset
    from pimc_dist.quickstart import drop_stale_cache

    current = tmp_path / "current"
    current.mkdir()
    (current / shard.PLAN_NAME).write_text(json.dumps({"schema_version": shard.PLAN_SCHEMA}))
    (current / shardset.MANIFEST_NAME).write_text(
        json.dumps({"schema_version": shardset.SCHEMA_VERSION})
    )
    assert not drop_stale_cache(current) and current.is_dir()
    assert not drop_stale_cache(tmp_path / "never_written")

    old = tmp_path / "old"
    old.mkdir()
    (old / shard.PLAN_NAME).write_text(json.dumps({"schema_version": shard.PLAN_SCHEMA - 1}))
    (old / "shard-000000.tar").write_bytes(b"x" * 10)
    assert drop_stale_cache(old) and not old.exists()
    assert "older format" in capsys.readouterr().out

    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / shardset.MANIFEST_NAME).write_text("{not json")
    assert drop_stale_cache(garbled) and not garbled.exists()
