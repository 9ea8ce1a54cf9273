"""The launcher without Slurm: dry runs, config checks before submission, local jobs, requeue."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import loop_entry
import pytest
from conftest import REPO, run_module
from launch_helpers import (
    TINY,
    build_tiny_shards,
    check_logged_steps,
    expected_logged_steps,
    metrics_steps,
    rank_hosts,
)

from pimc_dist import config, diagnose, jobs, launch
from pimc_dist.jobs import EntryJob, LaunchError, parse_time_minutes

TESTS = Path(__file__).resolve().parent


def run_cli(
    *args: str, cwd: Path, timeout: int = 180, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return run_module("pimc_dist.launch", *args, cwd=cwd, env=env, timeout=timeout)


# ---------------------------------------------------------------------------
# Dry run and validation (nothing submitted)


def test_dry_run_prints_sbatch_directives_and_resolved_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = launch.main(
        [
            "diagnose",
            "--cluster",
            "slurm",
            "--dry-run",
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--cpus-per-task",
            "8",
            "--time",
            "2-00:00:00",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--exclude",
            "gpu[001-002]",
            "--mem",
            "64G",
            f"train.run_dir={run_dir}",
            "train.lr=3e-4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for directive in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=2880",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --exclude='gpu[001-002]'",
        "#SBATCH --mem=64G",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        f"#SBATCH --output={run_dir}/slurm/%j/%j_0_log.out",
    ):
        assert directive in out
    assert "srun --unbuffered" in out and "submitit.core._submit" in out
    cfg = out.split("# sbatch script")[0]
    assert "lr: 0.0003" in cfg and "gpus_per_node: 4" in cfg and "time: 2-00:00:00" in cfg
    assert not run_dir.exists()  # a dry run writes nothing


def test_dry_run_cpu_ranks_use_tasks_per_node_and_no_gpus(tmp_path, capsys):
    code = launch.main(
        ["diagnose", "--cluster", "slurm", "--dry-run", "--tasks-per-node", "3"]
        + [f"train.run_dir={tmp_path}/r"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --ntasks-per-node=3" in out and "gpus-per-node" not in out


def test_pretrain_is_the_default_kind():
    assert launch.split_words(["train.lr=1"]) == ("pretrain", ["train.lr=1"])
    assert launch.split_words([]) == ("pretrain", [])
    assert launch.split_words(["diagnose", "a.b=1"]) == ("diagnose", ["a.b=1"])
    with pytest.raises(LaunchError, match="unknown job kind 'pretrian'"):
        launch.split_words(["pretrian"])
    with pytest.raises(LaunchError, match="'train.lr' is not a key=value"):
        launch.split_words(["diagnose", "train.lr"])


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["train.lr=fast"], "train.lr"),
        (["launch.nodes=two"], "launch.nodes"),
        (["train.no_such_key=1"], "train.no_such_key"),
        (["--time", "soon"], "launch.time"),
        (["--mem", "lots"], "launch.mem"),
        (["--time", "00:01:00", "launch.signal_delay_s=120"], "launch.signal_delay_s"),
        (["--nodes", "0"], "launch.nodes"),
    ],
)
def test_bad_config_is_rejected_before_submission_naming_the_key(tmp_path, capsys, args, key):
    run_dir = tmp_path / "run"
    code = launch.main(["diagnose", "--cluster", "local", f"train.run_dir={run_dir}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "nothing submitted" in err and f"'{key}'" in err
    assert not run_dir.exists()


def test_bad_yaml_file_is_rejected_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: many\n")
    code = launch.main(["diagnose", "--config", str(bad), f"train.run_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "train.batch_size" in err
    truncated = tmp_path / "cut.yaml"
    truncated.write_text("train:\n  batch_size: [1, 2\n")
    assert launch.main(["diagnose", "--config", str(truncated)]) == 2
    assert str(truncated) in capsys.readouterr().err


@pytest.mark.parametrize("flag", jobs.SLURM_ONLY_KEYS)
def test_slurm_option_with_local_cluster_is_an_error(tmp_path, capsys, flag):
    code = launch.main(
        ["diagnose", "--cluster", "local", f"--{flag}", "x", f"train.run_dir={tmp_path}/run"]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"--{flag} only apply to Slurm" in err
    assert not (tmp_path / "run").exists()


def test_several_nodes_with_local_cluster_is_an_error(tmp_path, capsys):
    assert launch.main(["diagnose", "--cluster", "local", "--nodes", "2"]) == 2
    assert "a local run uses one node" in capsys.readouterr().err


def test_gpus_asked_for_where_there_are_none_name_their_origin_and_the_fix(
    tmp_path, monkeypatch, capsys
):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    yaml = tmp_path / "job.yaml"
    yaml.write_text("launch:\n  gpus_per_node: 4\n")
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    assert launch.main(["diagnose", "--cluster", "local", "--config", str(yaml), run_dir]) == 2
    err = capsys.readouterr().err
    assert f"launch.gpus_per_node: 4 in {yaml}: this machine has 0 GPU(s)" in err
    assert "--gpus-per-node 0 --tasks-per-node 2" in err and "launch.gpus_per_node: 0" in err
    assert "--cluster slurm" in err
    assert launch.main(["diagnose", "--cluster", "local", "--gpus-per-node", "2", run_dir]) == 2
    assert "--gpus-per-node 2 (command line): this machine has 0 GPU(s)" in capsys.readouterr().err
    assert launch.main(["diagnose", "--cluster", "local", "launch.gpus_per_node=1", run_dir]) == 2
    assert "launch.gpus_per_node=1 (command line)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_a_key_is_refused_before_submission(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    run_dir = tmp_path / "run"
    code = launch.main(
        ["pretrain", "--cluster", "local", "tracking.mode=online", f"train.run_dir={run_dir}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nothing submitted" in err and "'tracking.mode'" in err
    assert "wandb login" in err and "WANDB_API_KEY" in err and "tracking.mode=offline" in err
    assert not run_dir.exists()
    # With a key it gets past this check, to the next one (no shards there).
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    code = launch.main(
        ["pretrain", "--cluster", "local", "--config", str(TINY), "tracking.mode=online"]
        + [f"train.run_dir={run_dir}", f"loader.shards={tmp_path / 'nowhere'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no shards found" in err and "tracking.mode" not in err
    # Jobs that log nothing to W&B are not held to it.
    monkeypatch.delenv("WANDB_API_KEY")
    code = launch.main(
        [
            "diagnose",
            "--cluster",
            "local",
            "--dry-run",
            "tracking.mode=online",
            f"train.run_dir={run_dir}",
        ]
    )
    assert code == 0


def test_cluster_auto_without_slurm_dry_run_says_it_would_run_locally(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(jobs, "slurm_available", lambda: False)
    args = ["diagnose", "--dry-run", "--tasks-per-node", "1", f"train.run_dir={tmp_path / 'run'}"]
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert "# resolved config (diagnose job, cluster local)" in out
    assert "--cluster auto: no reachable Slurm here" in out and "would run on this machine" in out
    assert "--cluster slurm --dry-run prints the sbatch script" in out
    assert "# local run: submitit LocalExecutor, 1 task(s) on this machine" in out
    assert "#SBATCH" not in out
    monkeypatch.setattr(jobs, "slurm_available", lambda: True)
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert "cluster slurm" in out and "#SBATCH --ntasks-per-node=1" in out
    assert not (tmp_path / "run").exists()


def test_module_check_config_runs_before_submission(tmp_path, monkeypatch, capsys):
    module = tmp_path / "checked_entry.py"
    module.write_text(
        "from pimc_dist.config import ConfigError\n"
        "def check_config(cfg):\n"
        "    if cfg.train.batch_size > 8:\n"
        "        raise ConfigError('invalid key train.batch_size: at most 8 here')\n"
        "def main(cfg):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launch.KINDS, "checked", importlib.import_module("checked_entry"))
    code = launch.main(["checked", "--cluster", "local", f"train.run_dir={tmp_path}/run"])
    assert code == 2 and "train.batch_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),
        ("01:00:00", 60),
        ("00:00:30", 1),
        ("10:30", 11),
        ("1-00", 1440),
        ("2-01:30", 2970),
        ("1-00:00:01", 1441),
    ],
)
def test_slurm_time_limits_convert_to_minutes(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "0", "1:2:3:4", "ab:cd", "x-01:00", "00:00:00"])
def test_bad_time_limits_are_rejected(text):
    with pytest.raises(ValueError, match="time limit"):
        parse_time_minutes(text)


def test_run_folder_becomes_absolute_and_flags_override_file(tmp_path):
    yaml = tmp_path / "job.yaml"
    yaml.write_text("name: exp\nlaunch:\n  nodes: 8\n  time: '04:00:00'\n")
    args = launch.build_parser().parse_intermixed_args(
        ["--config", str(yaml), "--nodes", "2", "--time", "01:00:00", "launch.nodes=3"]
    )
    cfg = jobs.load_job_config(args.config, launch.flag_overrides(args), cwd=tmp_path)
    assert cfg.launch.nodes == 2  # the flag wins over the file and over key=value
    assert cfg.launch.time == "01:00:00"
    assert cfg.train.run_dir == str(tmp_path / "runs" / "exp")


def test_save_config_keeps_an_earlier_different_config(tmp_path):
    first = jobs.load_job_config(None, [f"train.run_dir={tmp_path}", "train.lr=0.1"])
    second = jobs.load_job_config(None, [f"train.run_dir={tmp_path}", "train.lr=0.2"])
    config.save_run_config(first, tmp_path)
    config.save_run_config(first, tmp_path)  # same config: nothing to keep
    assert [p.name for p in tmp_path.glob("config*.yaml")] == ["config.yaml"]
    path = config.save_run_config(second, tmp_path)
    assert config.load(path).train.lr == 0.2
    kept = [p for p in tmp_path.glob("config.*.yaml")]
    assert len(kept) == 1 and config.load(kept[0]).train.lr == 0.1


def test_checkpoint_resubmits_itself_until_the_requeue_cap():
    cfg = jobs.load_job_config(None, ["launch.max_requeues=2", "train.run_dir=/tmp/x"])
    job = EntryJob("diagnose", config.to_yaml(cfg), diagnose.main)
    again = job.checkpoint()
    assert isinstance(again.function, EntryJob) and again.function.requeues == 1
    assert again.function.cfg_yaml == job.cfg_yaml
    assert again.function.checkpoint().function.requeues == 2
    assert EntryJob("diagnose", job.cfg_yaml, diagnose.main, requeues=2).checkpoint() is None


def test_help_shows_flags_and_an_example():
    out = launch.build_parser().format_help()
    for text in ("--nodes", "--gpus-per-node", "--dry-run", "--wait", "--cluster", "examples:"):
        assert text in out


def test_pretrain_help_shows_an_example(capsys):
    from pimc_dist import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert (
        "example: python -m pimc_dist.pretrain --config configs/pretrain/"
        in capsys.readouterr().out
    )


def test_wandb_line_names_the_run_where_it_is_known(tmp_path):
    cfg = jobs.load_job_config(None, [f"train.run_dir={tmp_path}"])
    before = jobs.describe_wandb(cfg, tmp_path)
    assert before.startswith(str(tmp_path / "wandb")) and "chosen when the job starts" in before
    older = tmp_path / "wandb" / "offline-run-20250101_120000-abc123"
    newer = tmp_path / "wandb" / "offline-run-20250102_090000-def456"
    for folder in (newer, older):
        folder.mkdir(parents=True)
    assert jobs.describe_wandb(cfg, tmp_path) == (
        f"offline run def456 (the latest there): {newer} (upload: wandb sync {newer})"
    )
    (tmp_path / "wandb" / "run-20250103_080000-0a1b2c3d").mkdir()
    online = jobs.load_job_config(
        None, [f"train.run_dir={tmp_path}", "tracking.mode=online", "tracking.entity=lab"]
    )
    assert jobs.describe_wandb(online, tmp_path).startswith("run lab/pimc_dist/0a1b2c3d ")
    off = jobs.load_job_config(None, [f"train.run_dir={tmp_path}", "tracking.wandb=false"])
    assert jobs.describe_wandb(off, tmp_path).startswith("off ")


# ---------------------------------------------------------------------------
# Real local jobs (submitit LocalExecutor, same code path as Slurm)


def test_local_diagnose_with_two_ranks_reports_both(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "diagnose",
        "--cluster",
        "local",
        "--nodes",
        "1",
        "--tasks-per-node",
        "2",
        "--wait",
        f"train.run_dir={run_dir}",
        cwd=tmp_path,
        # Launched from inside another job's rank: the tasks must not take its place.
        extra_env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ignoring inherited RANK, WORLD_SIZE, LOCAL_RANK" in out
    assert "submitted diagnose job" in out and f"run folder: {run_dir}" in out
    assert "diagnose: 2 ranks on 1 node(s)" in out
    assert "all_reduce(sum of ranks) = 1, expected 1: OK" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit() and "cpu" in line]
    assert sorted(int(r[0]) for r in rows) == [0, 1]
    assert (run_dir / "config.yaml").is_file()
    job_id = out.split("submitted diagnose job ")[1].split()[0]
    for rank in (0, 1):  # one log per rank in the job folder under the run folder
        assert (run_dir / "slurm" / job_id / f"{job_id}_{rank}_log.out").is_file()


def _submit_loop(
    run_dir: Path, cluster: str, nodes: int, tasks: int, steps: int, max_requeues: int
):
    cfg = jobs.load_job_config(
        None,
        [
            f"train.run_dir={run_dir}",
            f"train.total_samples={steps}",
            f"launch.nodes={nodes}",
            f"launch.tasks_per_node={tasks}",
            "launch.time=00:10:00",
            "launch.signal_delay_s=60",
            f"launch.max_requeues={max_requeues}",
        ],
    )
    job = EntryJob("loop", config.to_yaml(cfg), loop_entry.main)
    return jobs.submit(cfg, job, cluster)


def _wait_for_steps(run_dir: Path, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(metrics_steps(run_dir)) < count:
        assert time.monotonic() < deadline, f"no {count} steps in {run_dir}/metrics.jsonl"
        time.sleep(0.1)


def _signal_ranks(run_dir: Path, sig: int) -> None:
    for pid_file in (run_dir / "pids").iterdir():
        os.kill(int(pid_file.read_text()), sig)


@pytest.fixture
def loop_entry_importable(monkeypatch):
    # The job's tasks (child processes) import tests/loop_entry.py.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), path) if p))


def test_local_job_stopped_by_signal_saves_requeues_and_resumes(
    tmp_path, capfd, loop_entry_importable
):
    run_dir = tmp_path / "run"
    sub = _submit_loop(run_dir, "local", nodes=1, tasks=2, steps=14, max_requeues=2)
    _wait_for_steps(run_dir, 3)
    # What submitit's local controller sends before the time limit (Slurm: --signal).
    _signal_ranks(run_dir, signal.SIGUSR2)
    status = jobs.wait_for(sub, poll_s=0.2)
    out = capfd.readouterr().out
    assert status == 0, out
    assert "requeueing (0/2 requeues so far)" in out
    assert "requeues 1" in out  # the resubmitted job ran
    assert metrics_steps(run_dir) == list(range(14))  # resumed: no step missing or repeated
    pids = {
        json.loads(line)["pid"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    }
    assert len(pids) == 2  # two attempts


def test_local_job_past_the_requeue_cap_fails_and_keeps_its_checkpoint(
    tmp_path, capfd, loop_entry_importable
):
    run_dir = tmp_path / "run"
    sub = _submit_loop(run_dir, "local", nodes=1, tasks=2, steps=200, max_requeues=0)
    _wait_for_steps(run_dir, 2)
    _signal_ranks(run_dir, signal.SIGUSR1)
    status = jobs.wait_for(sub, poll_s=0.2)
    captured = capfd.readouterr()
    assert status != 0
    assert "not requeueing: 0 requeues done (launch.max_requeues=0)" in captured.out
    saved = json.loads((run_dir / "loop_ckpt.json").read_text())["step"]
    assert saved == len(metrics_steps(run_dir)) < 200


# ---------------------------------------------------------------------------
# Pretraining through the launcher (no Slurm: submitit LocalExecutor)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("launch_pretrain_data"))


def test_dry_run_of_pretrain_shows_sbatch_script_and_resolved_config(tmp_path, tiny_shards, capsys):
    run_dir = tmp_path / "run"
    overrides = [f"train.run_dir={run_dir}", f"loader.shards={tiny_shards}", "train.lr=5e-4"]
    code = launch.main(
        ["--cluster", "slurm", "--dry-run", "--nodes", "2", "--config", str(TINY), *overrides]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    head, script = out.split("# sbatch script submitit would submit (%j = job id)\n")
    assert head.startswith("# resolved config (pretrain job, cluster slurm); nothing submitted\n")
    # The printed config is the whole resolved job: it loads back to what the job would run.
    printed = config.from_yaml_text(head.split("\n", 1)[1], "dry-run output")
    assert printed == jobs.load_job_config(
        str(TINY), [*overrides, "launch.nodes=2", "launch.cluster='slurm'"]
    )
    assert printed.loader.shards == str(tiny_shards) and printed.train.lr == 5e-4
    assert printed.model.views.rp.encoder == "resnet18"  # from tiny.yaml
    for line in (
        "#SBATCH --job-name=tiny-pretrain",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",  # tiny.yaml: 2 CPU ranks per node
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        f"#SBATCH --output={run_dir}/slurm/%j/%j_0_log.out",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
    ):
        assert line in script, line
    assert "srun --unbuffered" in script and f"{run_dir}/slurm/%j" in script
    assert not run_dir.exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loader.shards={missing}", "loader.shards"),  # pretrain.check_config: no shards there
        ("method=simclr", "method"),
        ("loss.name=mosaic", "loss.name"),  # does not fit method pimc
        ("train.batch_size=many", "train.batch_size"),  # schema type
        ("model.views.rp.no_such_key=1", "no_such_key"),  # schema key
    ],
)
def test_bad_pretrain_config_is_rejected_before_submission_naming_the_key(
    tmp_path, tiny_shards, capsys, override, key
):
    run_dir = tmp_path / "run"
    override = override.format(missing=tmp_path / "no_shards")
    code = launch.main(
        ["--cluster", "local", "--config", str(TINY), f"train.run_dir={run_dir}"]
        + [f"loader.shards={tiny_shards}", override]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "invalid config, nothing submitted" in err and key in err, err
    assert not run_dir.exists()


def test_resubmitting_a_different_run_into_a_run_folder_is_refused(tmp_path, tiny_shards, capsys):
    run_dir = tmp_path / "run"
    common = ["--cluster", "local", "--config", str(TINY), f"train.run_dir={run_dir}"]
    common += [f"loader.shards={tiny_shards}"]
    earlier = jobs.load_job_config(str(TINY), common[4:])
    saved = config.save_run_config(earlier, run_dir)  # what the first submission left there
    before = saved.read_text()
    assert launch.main([*common, "loss.name=siglip"]) == 2
    err = capsys.readouterr().err
    assert "already holds a different run" in err and "loss.name" in err, err
    assert saved.read_text() == before and not (run_dir / "slurm").exists()
    # The same run with another learning rate may resume there.
    assert launch.main([*common, "--dry-run", "train.lr=1e-4"]) == 0


def test_a_run_folder_in_use_is_refused_before_anything_is_written_into_it(
    tmp_path, tiny_shards, capsys
):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(  # another job's rank 0: holds the folder's lock
        [sys.executable, "-c", "import sys, time; from pimc_dist import run_lock; "
         "lock = run_lock.acquire(sys.argv[1], 'pretraining'); print('held', flush=True); "
         "time.sleep(60)", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run_dir.iterdir())
        code = launch.main(
            ["--cluster", "local", "--config", str(TINY), f"train.run_dir={run_dir}"]
            + [f"loader.shards={tiny_shards}"]
        )
        err = capsys.readouterr().err
        assert code == 2, err
        assert "pretrain job refused, nothing submitted" in err and "is in use by" in err, err
        assert f"pid {holder.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in run_dir.iterdir()) == before  # no config.yaml, no slurm/
    finally:
        holder.kill()
        holder.wait()


# An error class the job below raises, listed as its module's USER_ERRORS (as pretrain.py
# and eval/finetune.py list theirs): its message says it all.
class RefusedByTheJob(ValueError):
    pass


USER_ERRORS = {RefusedByTheJob: 2}


def refusing_main(cfg) -> int:
    raise RefusedByTheJob(f"{cfg.train.run_dir}: not for this job")


def unexpected_main(cfg) -> int:
    raise KeyError("a bug")


def test_a_job_error_its_module_lists_is_a_result_with_its_message_not_a_traceback(
    tmp_path, capsys
):
    cfg = jobs.load_job_config(str(TINY), [f"train.run_dir={tmp_path}"])
    result = EntryJob("pretrain", config.to_yaml(cfg), refusing_main)()
    assert result == jobs.Failed(0, f"{tmp_path}: not for this job", 2)
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not for this job"
    with pytest.raises(KeyError):  # anything else stays a traceback for submitit to keep
        EntryJob("pretrain", config.to_yaml(cfg), unexpected_main)()


def test_a_launched_finetune_with_a_checkpoint_that_does_not_fit_fails_with_one_message(
    tmp_path, tiny_shards, capsys
):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"  # a run folder whose encoders file lacks the plot encoder
    config.save_run_config(config.load(TINY, [f"loader.shards={tiny_shards}"]), ckpt)
    save_file({"rsi.encoder.w": torch.zeros(2)}, str(ckpt / "encoders.safetensors"))
    code = launch.main(
        ["finetune", "--cluster", "local", "--wait", "--tasks-per-node", "1"]
        + ["--config", str(REPO / "configs/finetune/pixel_cls.yaml")]
        + [f"loader.shards={tiny_shards}", f"finetune.ckpt={ckpt}"]
        + ["finetune.allow_pretrain_overlap=true", f"train.run_dir={tmp_path / 'ft'}"]
    )
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "has no encoder for view 'rp'; it has ['rsi']" in out + err
    assert "Traceback" not in out + err and "exit status 2" in out


def test_cluster_auto_without_slurm_runs_the_job_locally(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jobs, "slurm_available", lambda: False)
    run_dir = tmp_path / "run"
    code = launch.main(["diagnose", "--wait", "--tasks-per-node", "1", f"train.run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "to this machine (submitit LocalExecutor): 1 task(s)" in out
    assert "diagnose: 1 ranks on 1 node(s)" in out and "ended: FINISHED, exit status 0" in out


def test_pretrain_without_shards_names_the_command_that_makes_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = launch.main(
        ["--cluster", "local", "--config", str(TINY), f"train.run_dir={run_dir}"]
        + [f"loader.shards={tmp_path / 'nowhere'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"no shards found at {tmp_path / 'nowhere'}" in err
    assert "python -m pimc_dist.shard --config" in err and not run_dir.exists()


def test_local_pretrain_with_two_ranks_writes_checkpoint_metrics_and_wandb(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--cluster",
        "local",
        "--nodes",
        "1",
        "--tasks-per-node",
        "2",
        "--wait",
        "--config",
        str(TINY),
        f"train.run_dir={run_dir}",
        f"loader.shards={tiny_shards}",
        "train.total_samples=256",  # 4 steps of 2 x 32 samples
        "train.ckpt_every_steps=2",
        "train.log_every_steps=1",
        cwd=tmp_path,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "ended: FINISHED, exit status 0" in out
    assert metrics_steps(run_dir) == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["samples_seen"] == 256  # 64 per step: both ranks took part
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"
    state = json.loads((run_dir / "checkpoints/step00000004/client_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 256
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("run-*.wandb"))
    run_id = wandb_runs[0].name.rsplit("-", 1)[1]
    assert f"W&B:        offline run {run_id} (the latest there): {wandb_runs[0]}" in out
    assert (run_dir / "encoders.safetensors").is_file()
    job_id = out.split("submitted pretrain job ")[1].split()[0]
    assert rank_hosts(run_dir / "slurm" / job_id).keys() == {0, 1}
    assert sorted(p.name for p in (run_dir / "slurm").iterdir()) == [job_id]  # no stray %j


# ---------------------------------------------------------------------------
# The resume rule the Slurm tests apply to metrics.jsonl


def test_logged_steps_check_allows_exactly_the_steps_after_the_last_checkpoint():
    kw = {"planned": 12, "log_every": 2, "ckpt_every": 4}
    assert check_logged_steps([2, 4, 6, 8, 10, 12], resumes=[], **kw) == 0
    # Stopped on a signal after step 7 with a checkpoint there: nothing repeated.
    assert check_logged_steps([2, 4, 6, 8, 10, 12], resumes=[7], **kw) == 0
    # Killed after logging step 6: resumed from the checkpoint at 4, step 6 logged again.
    assert check_logged_steps([2, 4, 6, 6, 8, 10, 12], resumes=[4], **kw) == 1
    assert check_logged_steps([2, 4, 6, 8, 6, 8, 10, 12], resumes=[4], **kw) == 2
    bad = [
        ([2, 4, 8, 10, 12], [], "steps missing between 4 and 8"),
        ([2, 4, 6, 8, 10], [], "ended at step 10"),
        ([2, 4, 6, 4, 6, 8, 10, 12], [], "no resume left"),
        ([2, 4, 6, 8, 2, 4, 6, 8, 10, 12], [0], "more than one checkpoint interval"),
        ([2, 4, 6, 8, 6, 8, 10, 12], [1], "resumed at step 1 but the next row is 6"),
        ([2, 4, 6, 8, 6, 8, 10, 12], [6], "no resume left"),  # 6 resumes without repeating
        ([2, 4, 6, 8, 10, 12], [1], "do not show"),  # a resume at 1 would re-log 2
        ([4, 6, 8, 10, 12], [], "first logged step 4"),
    ]
    for steps, resumes, message in bad:
        with pytest.raises(AssertionError, match=message):
            check_logged_steps(steps, resumes=resumes, **kw)
    assert expected_logged_steps(10, 4) == [4, 8, 10]
