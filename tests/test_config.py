"""Config loading: merging, validation errors that name the key and the file, saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO

from pimc_dist import config
from pimc_dist.files import write_json_atomic


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_overrides_win_over_file_and_file_over_defaults(tmp_path):
    path = write(tmp_path / "job.yaml", "train:\n  lr: 0.5\n  batch_size: 7\n")
    cfg = config.load(path, ["train.lr=3e-4"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 7
    assert cfg.train.weight_decay == config.TrainConfig.weight_decay


def test_interpolations_are_resolved(tmp_path):
    path = write(tmp_path / "job.yaml", "name: myrun\ndata:\n  name: pastis\n")
    cfg = config.load(path)
    assert cfg.train.run_dir == "runs/myrun"
    assert cfg.loader.shards == "shards/pastis"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path / "job.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "train.lrr" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_on_command_line_names_key(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["train.batch_size=many"])
    assert "train.batch_size" in str(err.value) and "command line" in str(err.value)


def test_unknown_nested_view_key_is_rejected():
    with pytest.raises(config.ConfigError, match="model.views.rp.encoderx"):
        config.load(None, ["model.views.rp.encoderx=vit_tiny"])


def test_override_without_equals_is_rejected():
    with pytest.raises(config.ConfigError, match="not key=value"):
        config.load(None, ["train.lr"])


def test_missing_file_and_bad_yaml_and_non_mapping_name_the_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "absent.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [1,\n")
    with pytest.raises(config.ConfigError, match="not valid YAML") as err:
        config.load(bad)
    assert str(bad) in str(err.value)
    scalar = write(tmp_path / "scalar.yaml", "42\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load(scalar)


def test_truncated_yaml_is_rejected(tmp_path):
    good = (REPO / "configs/pretrain/tiny.yaml").read_text()
    cut = write(tmp_path / "cut.yaml", good[: len(good) // 2] + "\n  : [\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(cut)
    assert str(cut) in str(err.value)


def test_missing_required_value_is_reported(tmp_path):
    path = write(tmp_path / "job.yaml", "name: ???\n")
    with pytest.raises(config.ConfigError, match="missing required value.*name"):
        config.load(path)


def test_base_files_are_merged_in_order(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  lr: 0.1\n  batch_size: 3\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n  lr: 0.2\n")
    cfg = config.load(child)
    assert (cfg.train.lr, cfg.train.batch_size) == (pytest.approx(0.2), 3)


def test_base_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(config.ConfigError, match="cycle"):
        config.load(tmp_path / "a.yaml")


def test_views_come_only_from_the_file(tmp_path):
    path = write(
        tmp_path / "job.yaml", "model:\n  views:\n    s2: {encoder: resnet50, in_chans: 12}\n"
    )
    cfg = config.load(path)
    assert list(cfg.model.views) == ["s2"]
    assert cfg.model.views.s2.img_size == config.ViewModelConfig.img_size


def test_saved_config_round_trips_and_is_validated(tmp_path):
    cfg = config.load(None, ["train.lr=0.25", "name=x"])
    out = config.save(cfg, tmp_path / "run" / "config.yaml")
    again = config.from_yaml_text(out.read_text(), str(out))
    assert again.train.lr == pytest.approx(0.25) and again.name == "x"
    assert not list(out.parent.glob("*.tmp"))
    with pytest.raises(config.ConfigError, match="checkpoint.yaml"):
        config.from_yaml_text("train:\n  nope: 1\n", "checkpoint.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    # Configs for real datasets require data.root (???); the built-in ones need nothing.
    config.load(path, ["data.root=/data/x"])


def test_real_dataset_config_requires_its_root():
    with pytest.raises(config.ConfigError, match="missing required value.*data.root"):
        config.load(REPO / "configs/pretrain/pimc.yaml")


def test_run_folder_check_names_the_differing_key_and_a_garbled_saved_config(tmp_path):
    cfg = config.load(None, [f"train.run_dir={tmp_path}", "loss.name=clip"])
    config.check_run_folder(cfg, tmp_path, ("loss.name",))  # no config.yaml: a new folder
    config.save(cfg, tmp_path / "config.yaml")
    config.check_run_folder(cfg, tmp_path, ("loss.name",))  # the same run again
    other = config.load(None, [f"train.run_dir={tmp_path}", "loss.name=siglip"])
    with pytest.raises(
        config.ConfigError, match=r"different run \(loss.name: clip there, siglip now\)"
    ):
        config.check_run_folder(other, tmp_path, ("loss.name",))
    (tmp_path / "config.yaml").write_text("train: [unclosed")
    with pytest.raises(config.ConfigError, match="config.yaml: not valid YAML"):
        config.check_run_folder(cfg, tmp_path, ("loss.name",))


def test_quoted_override_values_stay_text(tmp_path):
    quoted = [f"launch.time={config.quote('01:00:00')}", "name=" + config.quote("it's")]
    cfg = config.load(None, quoted)
    assert cfg.launch.time == "01:00:00" and cfg.name == "it's"


def test_nested_merge_keeps_the_keys_it_does_not_touch():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert config.merge_nested(base, {"a": {"b": 5}, "e": {"f": 1}}) is base
    assert base == {"a": {"b": 5, "c": 2}, "d": 3, "e": {"f": 1}}
    cfg = config.load(None, ["train.batch_size=64"])
    changed = config.with_updates(cfg, {"train": {"batch_size": 8}})
    assert changed.train.batch_size == 8 and changed.train.lr == cfg.train.lr
    assert cfg.train.batch_size == 64  # the original is untouched


def test_job_parser_takes_a_config_and_overrides_in_any_order():
    parser = config.job_parser("python -m x", "what x does", "example: x", "job YAML")
    args = parser.parse_intermixed_args(["a.b=1", "--config", "c.yaml", "d.e=2"])
    assert args.config == "c.yaml" and args.overrides == ["a.b=1", "d.e=2"]
    bare = config.job_parser("python -m y", "no config", "example: y")
    with pytest.raises(SystemExit):
        bare.parse_args(["--config", "c.yaml"])


def test_a_run_config_that_changed_is_kept_beside_the_new_one(tmp_path):
    first = config.load(None, [f"train.run_dir={tmp_path}", "train.lr=0.1"])
    config.save_run_config(first, tmp_path)
    config.save_run_config(first, tmp_path)  # the same config: nothing to keep
    assert not list(tmp_path.glob("config.*.yaml"))
    second = config.load(None, [f"train.run_dir={tmp_path}", "train.lr=0.2"])
    assert config.save_run_config(second, tmp_path) == tmp_path / config.CONFIG_FILE
    kept = list(tmp_path.glob("config.*.yaml"))
    assert len(kept) == 1 and config.load(kept[0]).train.lr == 0.1


@pytest.mark.parametrize(
    ("marker", "kind", "message"),
    [
        ("checkpoints", "fine-tuning", "holds a pretraining run"),
        ("result.json", "sweep", "holds a fine-tuning run"),
        ("cells", "pretraining", "holds a sweep run"),
    ],
)
def test_a_folder_holding_another_kind_of_run_is_refused(tmp_path, marker, kind, message):
    (tmp_path / marker).mkdir()
    cfg = config.load(None, [f"train.run_dir={tmp_path}"])
    with pytest.raises(config.ConfigError, match=message):
        config.check_run_folder(cfg, tmp_path, ("name",), kind=kind)
    config.check_run_folder(cfg, tmp_path, ("name",))  # no kind: only the saved config counts


def test_a_sweep_refuses_a_folder_whose_config_is_not_a_sweeps(tmp_path):
    cfg = config.load(None, [f"train.run_dir={tmp_path}", "name=s"])
    config.save_run_config(cfg, tmp_path)
    with pytest.raises(config.ConfigError, match="not a sweep"):
        config.check_run_folder(cfg, tmp_path, ("name",), kind="sweep")
    config.check_run_folder(cfg, tmp_path, ("name",), kind="fine-tuning")


def test_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    np = pytest.importorskip("numpy")
    path = write_json_atomic(tmp_path / "sub" / "r.json", {"x": np.float32(0.5), "a": np.arange(2)})
    assert json.loads(path.read_text()) == {"x": 0.5, "a": [0, 1]}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text())["x"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_a_different_run_in_the_folder_names_only_the_keys_that_differ(tmp_path):
    tiny = REPO / "configs" / "pretrain" / "tiny.yaml"
    cfg = config.load(tiny)
    config.save_run_config(cfg, tmp_path)
    other = config.load(tiny, ["model.views.rsi.in_chans=4", "model.head.out_dim=32"])
    with pytest.raises(config.ConfigError) as info:
        config.check_run_folder(other, tmp_path, ("method", "model"))
    message = str(info.value)
    assert "model.head.out_dim: 64 there, 32 now" in message
    assert "model.views.rsi.in_chans: 10 there, 4 now" in message
    assert "resnet18" not in message and "img_size" not in message  # not the whole model


@pytest.mark.parametrize(
    "override, key",
    [
        ("loader.views=[rp,rsi", "'loader.views'"),  # an unclosed YAML list
        ("train.lr=${nope.x}", "'train.lr'"),  # an interpolation to no key
    ],
)
def test_unparseable_overrides_are_config_errors_naming_the_key(override, key):
    with pytest.raises(config.ConfigError, match=key):
        config.load(REPO / "configs" / "pretrain" / "tiny.yaml", [override])


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("train: {lr: 0.5}\nloader: {workers: 1}\ntrain: {batch_size: 8}\n", "'train'", "1 and 3"),
        ("train:\n  lr: 0.5\n  batch_size: 8\n  lr: 0.1\n", "'train.lr'", "2 and 4"),
    ],
    ids=["top_level", "nested"],
)
def test_a_key_written_twice_is_refused_naming_it_and_both_lines(tmp_path, text, key, lines):
    path = write(tmp_path / "job.yaml", text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    message = str(err.value)
    assert str(path) in message and key in message and f"lines {lines}" in message
    with pytest.raises(config.ConfigError, match=key):  # a run's saved config.yaml too
        config.from_yaml_text(text, "config.yaml")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    # `<<` brings in keys that the mapping itself may then set: that is no duplicate.
    path = write(tmp_path / "job.yaml", "train:\n  <<: {lr: 0.5, batch_size: 8}\n  lr: 0.1\n")
    cfg = config.load(path)
    assert (cfg.train.lr, cfg.train.batch_size) == (pytest.approx(0.1), 8)


@pytest.mark.parametrize("base", ["3", "[null]", "[base.yaml, 4]", "{a: b}"])
def test_a_base_that_is_not_a_path_or_list_of_paths_names_the_file(tmp_path, base):
    write(tmp_path / "base.yaml", "name: x\n")
    path = write(tmp_path / "job.yaml", f"base: {base}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value) and "'base'" in str(err.value)


def test_a_config_that_is_not_utf8_text_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xff\xfe\x00train: {lr: 1}\n")
    with pytest.raises(config.ConfigError, match="UTF-8") as err:
        config.load(path)
    assert str(path) in str(err.value)
    run = tmp_path / "run"
    run.mkdir()
    (run / config.CONFIG_FILE).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(config.ConfigError, match="UTF-8"):  # a run folder's saved config
        config.check_run_folder(config.load(None), run, ("model",))
