"""Sweeps: the grid, aggregation of cell results, and real job arrays (local; Slurm under its marker)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from pimc_dist import config as config_lib
from pimc_dist import launch, sweep
from pimc_dist.eval import results

SWEEP_YAML = REPO / "configs" / "sweep" / "demo.yaml"


def load(tmp_path: Path, *overrides: str):
    return config_lib.load(SWEEP_YAML, [f"train.run_dir={tmp_path / 'sweep'}", *overrides])


# --- the grid -------------------------------------------------------------------------------


def test_grid_expands_every_combination_but_linear_cells_take_the_whole_lr_grid():
    cfg = config_lib.load(
        SWEEP_YAML,
        [
            "sweep.grid.task=[pastis_pixel_cls,pastis_forecast]",
            "sweep.grid.protocol=[linear,finetune,cnn1d]",
            "sweep.grid.init=[pretrained,random]",
            "sweep.grid.lr=[1e-3,1e-4]",
            "sweep.grid.label_fraction=[0.1,1.0]",
            "sweep.grid.seed=[0,1,2]",
        ],
    )
    cells = sweep.expand_grid(cfg)
    per_setting = 2 * 2 * 3  # tasks x fractions x seeds
    linear = [c for c in cells if c.protocol == "linear"]
    fine = [c for c in cells if c.protocol == "finetune"]
    cnn = [c for c in cells if c.protocol == "cnn1d"]
    assert len(linear) == per_setting * 2  # x init, not x lr
    assert len(fine) == per_setting * 2 * 2  # x init x lr
    assert len(cnn) == per_setting * 2  # x lr, not x init
    assert all(c.lr is None for c in linear) and {c.init for c in cnn} == {"none"}
    assert len({c.id for c in cells}) == len(cells)
    overrides = fine[0].overrides()
    assert "train.lr=0.001" in overrides and "finetune.protocol=finetune" in overrides
    assert "finetune.init" not in " ".join(cnn[0].overrides())


def test_empty_task_axis_is_a_config_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="sweep.grid.task"):
        sweep.expand_grid(load(tmp_path, "sweep.grid.task=[]"))


def test_cell_config_carries_sweep_overrides_group_resources_and_absolute_paths(tmp_path):
    cfg = load(tmp_path, "sweep.overrides=[finetune.ckpt=runs/tiny,finetune.probe_epochs=7]")
    cell = sweep.expand_grid(cfg)[0]
    cell_cfg = sweep.cell_config(cfg, cell)
    assert cell_cfg.finetune.task == cell.task and cell_cfg.finetune.probe_epochs == 7
    assert cell_cfg.finetune.ckpt == str(Path("runs/tiny").resolve())
    assert Path(cell_cfg.loader.shards).is_absolute()
    assert cell_cfg.train.run_dir == str(tmp_path / "sweep" / "cells" / cell.id)
    assert cell_cfg.finetune.feature_cache == str(tmp_path / "sweep" / "features")
    assert cell_cfg.tracking.group == "sweep_demo"
    assert cell_cfg.launch.tasks_per_node == 1 and cell_cfg.launch.time == "00:30:00"


# --- aggregation ------------------------------------------------------------------------------


def _write_result(cfg, cell, miou: float, val: float, extra: dict | None = None) -> Path:
    folder = sweep.cell_dir(cfg, cell)
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "status": "ok",
        "primary": "miou",
        "lr": cell.lr,
        "metrics": {"oa": miou + 0.2, "macro_f1": miou + 0.1, "miou": miou, "n": 10},
        "val_metrics": {"miou": val},
        "selected": {"lr": 0.1},
        "samples": {"train_labelled": 5},
        "timings": {"total_s": 1.0},
        **(extra or {}),
    }
    (folder / "result.json").write_text(json.dumps(result))
    return folder / "result.json"


def test_aggregate_writes_mean_and_std_over_seeds_lists_failures_and_plots(tmp_path):
    cfg = load(
        tmp_path,
        "sweep.grid.task=[pastis_pixel_cls]",
        "sweep.grid.protocol=[linear]",
        "sweep.grid.init=[pretrained,random]",
        "sweep.grid.label_fraction=[1.0]",
        "sweep.grid.seed=[0,1,2]",
        "tracking.wandb=false",
    )
    cells = sweep.expand_grid(cfg)
    pre = [c for c in cells if c.init == "pretrained"]
    rand = [c for c in cells if c.init == "random"]
    for cell, value in zip(pre, (0.30, 0.40, 0.50), strict=True):
        _write_result(cfg, cell, value, value)
    _write_result(cfg, rand[0], 0.10, 0.1)
    _write_result(cfg, rand[1], 0.20, 0.2)
    failed = sweep.cell_dir(cfg, rand[2])
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"error": "RuntimeError: boom"}))

    summary = sweep.aggregate(cfg, cells)
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert (
        "| linear | pretrained | grid | 1 | 0.6000 ± 0.1000 | 0.5000 ± 0.1000 | 0.4000 ± 0.1000 |"
        in md
    )
    std = math.sqrt(((0.1 - 0.15) ** 2 + (0.2 - 0.15) ** 2) / 1)
    assert f"| linear | random | grid | 1 | 0.3500 ± {std:.4f} |" in md
    assert f"`{rand[2].id}` (failed): RuntimeError: boom" in md
    assert "sweep.rerun_failed=true" in md
    with open(tmp_path / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {"cell", "task", "seed", "miou", "val_primary"} <= set(rows[0])
    failed_list = json.loads((tmp_path / "sweep" / "failed.json").read_text())
    assert [p["cell"] for p in failed_list] == [rand[2].id]
    assert (tmp_path / "sweep" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len(summary["problems"]) == 1


class FakeTracker:
    """Stands in for tracking.Tracker: records what the sweep's summary run is sent."""

    last = None

    def __init__(self, cfg, *, rank, run_dir, **kwargs):
        self.cfg, self.run, self.images = cfg, None, {}
        FakeTracker.last = self

    def log_images(self, images, step):
        self.images.update(images)

    def summary(self, values):
        self.values = values

    def finish(self, exit_code=0):
        pass


def test_tracked_sweep_sends_its_results_plot_to_the_summary_run(tmp_path, monkeypatch):
    from pimc_dist import tracking

    monkeypatch.setattr(tracking, "Tracker", FakeTracker)
    cfg = load(tmp_path, "sweep.grid.task=[pastis_pixel_cls]", "tracking.wandb=true")
    cells = sweep.expand_grid(cfg)
    _write_result(cfg, cells[0], 0.3, 0.3)
    sweep.aggregate(cfg, cells)
    tracker = FakeTracker.last
    assert tracker.cfg.name == "sweep_demo-summary" and tracker.cfg.tracking.group == "sweep_demo"
    image = tracker.images["results_plot"]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert tracker.values == {"cells": len(cells), "failed": len(cells) - 1}


def test_sweep_folder_holding_another_run_is_refused_and_kept(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "encoders.safetensors").write_bytes(b"weights")
    assert sweep.cli(["--config", str(SWEEP_YAML), f"train.run_dir={folder}"]) == 2
    assert "holds a pretraining run" in capsys.readouterr().err
    assert not (folder / "config.yaml").exists()
    (folder / "encoders.safetensors").unlink()
    # A fine-tuning run's config: not a sweep.
    config_lib.save(config_lib.load(None, [f"train.run_dir={folder}"]), folder / "config.yaml")
    with pytest.raises(config_lib.ConfigError, match="holds a run that is not a sweep"):
        sweep.check_sweep_folder(load(tmp_path))
    # Another sweep (another name), then this one with a grown grid and new overrides.
    config_lib.save(load(tmp_path, "name=other"), folder / "config.yaml")
    with pytest.raises(config_lib.ConfigError, match="different run \\(name: other there"):
        sweep.check_sweep_folder(load(tmp_path))
    config_lib.save(load(tmp_path), folder / "config.yaml")
    sweep.check_sweep_folder(
        load(tmp_path, "sweep.grid.seed=[0,1,2]", "sweep.overrides=[finetune.probe_epochs=3]")
    )


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert (
        "examples:" in out and "python -m pimc_dist.sweep --config configs/sweep/demo.yaml" in out
    )


def test_forecast_baselines_become_rows_once_per_seed_and_fraction(tmp_path):
    cfg = load(
        tmp_path,
        "sweep.grid.task=[pastis_forecast]",
        "sweep.grid.protocol=[linear]",
        "sweep.grid.init=[pretrained,random]",
        "sweep.grid.label_fraction=[1.0]",
        "sweep.grid.seed=[0]",
        "tracking.wandb=false",
    )
    cells = sweep.expand_grid(cfg)
    base = {"persistence": {"rmse": 0.2}, "seasonal_naive": {"rmse": 0.3}}
    for cell in cells:
        folder = sweep.cell_dir(cfg, cell)
        folder.mkdir(parents=True)
        result = {
            "status": "ok", "primary": "rmse", "metrics": {"rmse": 0.1}, "val_metrics": {"rmse": 0.1},
            "baselines": base,
        }  # fmt: skip
        (folder / "result.json").write_text(json.dumps(result))
    rows, problems = results.result_rows((c, sweep.cell_dir(cfg, c)) for c in cells)
    assert not problems
    assert sorted(r["protocol"] for r in rows) == [
        "linear",
        "linear",
        "persistence",
        "seasonal_naive",
    ]


def test_cells_with_a_result_are_never_rerun_and_rerun_failed_picks_only_failures(tmp_path):
    grid = [
        "sweep.grid.task=[pastis_pixel_cls]",
        "sweep.grid.protocol=[linear]",
        "sweep.grid.init=[pretrained]",
        "sweep.grid.label_fraction=[1.0]",
        "sweep.grid.seed=[0,1,2]",
    ]
    cfg = load(tmp_path, *grid)
    cells = sweep.expand_grid(cfg)
    assert len(cells) == 3
    _write_result(cfg, cells[0], 0.3, 0.3)
    folder = sweep.cell_dir(cfg, cells[1])
    folder.mkdir(parents=True)
    (folder / "error.json").write_text("{}")
    broken = sweep.cell_dir(cfg, cells[2])
    broken.mkdir(parents=True)
    (broken / "result.json").write_text('{"status": "ok", "metr')  # truncated: not done
    assert [c.id for c in sweep.cells_to_run(cfg, cells)] == [cells[1].id, cells[2].id]
    again = load(tmp_path, *grid, "sweep.rerun_failed=true")
    assert [c.id for c in sweep.cells_to_run(again, cells)] == [cells[1].id]


def test_run_slot_admits_one_holder_per_slot(tmp_path):
    import fcntl

    with sweep.run_slot(tmp_path / "slots", 1):
        with open(tmp_path / "slots" / "slot-0.lock", "a") as f:
            with pytest.raises(OSError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "slots" / "slot-0.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the body


# --- real job arrays --------------------------------------------------------------------------


def _fixture(tmp: Path) -> dict[str, Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ft_helpers", Path(__file__).parent / "test_finetune.py"
    )
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    from pimc_dist.sources.fixtures import write_pastis

    write_pastis(tmp / "raw", n_patches=5, size=24, seed=4)
    shards = helpers.make_shards(
        tmp, "demo.yaml", tmp / "raw",
        "data.source=pastis", "data.pixels_per_patch=16", "data.max_samples_per_shard=40",
    )  # fmt: skip
    run = helpers.make_run(tmp / "pretrain", helpers.PIMC_VIEWS)
    return {"shards": shards, "run": run}


def sweep_args(tmp: Path, fx: dict[str, Path], *extra: str) -> list[str]:
    return [
        "sweep",
        "--config", str(SWEEP_YAML),
        f"train.run_dir={tmp / 'sweep'}",
        "sweep.grid.task=[pastis_pixel_cls,pastis_forecast]",
        "sweep.grid.protocol=[linear]",
        "sweep.grid.init=[pretrained]",
        "sweep.grid.label_fraction=[1.0]",
        "sweep.grid.seed=[0,1]",
        "sweep.parallelism=2",
        "sweep.poll_s=0.5",
        "tracking.wandb=false",
        f"sweep.overrides=[finetune.ckpt={fx['run']},loader.shards={fx['shards']},loader.workers=0,finetune.probe_epochs=5,{','.join(extra)}]",
    ]  # fmt: skip


def test_local_sweep_of_four_cells_then_rerun_of_only_the_failed_ones(
    tmp_path, monkeypatch, capsys
):
    fx = _fixture(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Forecast cells fail: 40 input + 10 forecast steps do not fit the 42-step series.
    code = launch.main([*sweep_args(tmp_path, fx, "finetune.input_steps=40"), "--cluster", "local"])
    out = capsys.readouterr().out
    assert code == 1, out
    folder = tmp_path / "sweep"
    cells = sorted(p.name for p in (folder / "cells").iterdir())
    assert len(cells) == 4
    done = {c for c in cells if (folder / "cells" / c / "result.json").is_file()}
    failed = {c for c in cells if (folder / "cells" / c / "error.json").is_file()}
    assert {c.split("__")[0] for c in done} == {"pastis_pixel_cls"} and len(done) == 2
    assert {c.split("__")[0] for c in failed} == {"pastis_forecast"} and len(failed) == 2
    error = json.loads((folder / "cells" / sorted(failed)[0] / "error.json").read_text())
    assert "cannot hold 40 input + 10 forecast steps" in error["error"]
    assert "as job array" in out and "at most 2 at once" in out
    md = (folder / "results.md").read_text()
    assert "2 of 4 cells finished" in md and "Failed or missing cells" in md
    before = {c: (folder / "cells" / c / "result.json").stat().st_mtime_ns for c in done}

    # Fixed, and only the failed cells run again; the finished ones are left alone.
    code = launch.main(
        [
            *sweep_args(tmp_path, fx, "finetune.input_steps=32"),
            "--cluster",
            "local",
            "sweep.rerun_failed=true",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 cells, 2 finished, 2 to run" in out
    assert {c: (folder / "cells" / c / "result.json").stat().st_mtime_ns for c in done} == before
    assert all((folder / "cells" / c / "result.json").is_file() for c in cells)
    md = (folder / "results.md").read_text()
    assert "4 of 4 cells finished" in md and "## pastis_forecast" in md and "| persistence |" in md
    assert json.loads((folder / "failed.json").read_text()) == []
    # Nothing left to do: a third submission runs nothing.
    assert (
        launch.main([*sweep_args(tmp_path, fx, "finetune.input_steps=32"), "--cluster", "local"])
        == 0
    )
    assert "4 finished, 0 to run" in capsys.readouterr().out


def test_dry_run_lists_the_cells_and_submits_nothing(tmp_path, capsys):
    fx = _fixture(tmp_path)
    args = sweep_args(tmp_path, fx)[1:]
    assert sweep.cli([*args, "--dry-run", "--cluster", "local"]) == 0
    out = capsys.readouterr().out
    assert "4 cells, 0 finished, 4 to run" in out
    assert out.count("finetune.task=pastis_") == 4
    assert not (tmp_path / "sweep" / "cells").exists()


def test_a_cell_with_a_missing_checkpoint_stops_the_sweep_before_submission(tmp_path, capsys):
    fx = {"run": tmp_path / "no_such_run", "shards": _fixture(tmp_path)["shards"]}
    assert launch.main([*sweep_args(tmp_path, fx), "--cluster", "local"]) == 2
    err = capsys.readouterr().err
    assert "nothing submitted" in err and "finetune.ckpt" in err and "does not exist" in err
    assert not (tmp_path / "sweep" / "slurm").exists()


@pytest.mark.slurm
@pytest.mark.skipif(
    shutil.which("sinfo") is None, reason="no Slurm here (slurm/local_cluster.sh start)"
)
@pytest.mark.timeout(600)
def test_slurm_sweep_runs_one_job_array_with_a_parallelism_limit(tmp_path, capsys, monkeypatch):
    fx = _fixture(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = [
        *sweep_args(tmp_path, fx),
        "--cluster",
        "slurm",
        "sweep.grid.seed=[0,1]",
        "sweep.poll_s=1",
    ]
    code = launch.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "as job array" in out
    array_id = out.split("as job array ")[1].split()[0]
    folders = {p.name for p in (tmp_path / "sweep" / "slurm").iterdir()}
    assert {f"{array_id}_{i}" for i in range(4)} <= folders  # one array, four tasks
    # Slurm keeps finished jobs for a while (MinJobAge): the array's throttle is the parallelism.
    info = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True, text=True)
    assert f"ArrayJobId={array_id}" in info.stdout and "ArrayTaskThrottle=2" in info.stdout
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "4 of 4 cells finished" in md
