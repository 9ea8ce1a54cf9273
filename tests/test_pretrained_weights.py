"""A user's own timm / torchgeo weights file starts a tower (`model.views.<view>.weights`), and
exports say how plain timm rebuilds each encoder. The files here are written the way timm and
torchgeo ship them (torch.save'd state dicts, MoCo wrappers, safetensors); the checks against
timm itself are in tests/test_timm.py (marker timm, run by CI in a venv with timm)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_pretrain import TINY, assert_ok, run_ranks, shards  # noqa: F401 (fixture)

from pimc_dist import config as config_lib
from pimc_dist import pretrain
from pimc_dist.models import (
    WeightsError,
    build_encoder,
    build_model,
    encoder_recipes,
    export_encoder_state,
    load_pretrained_weights,
    load_view_weights,
    save_encoder_weights,
)
from pimc_dist.models.timm_encoders import import_timm

SSL4EO = {"in_chans": 13, "img_size": 64, "small_input": False, "width": 16}


def torchgeo_style_file(tmp_path, module: torch.nn.Module, name: str = "moco.pth"):
    """A MoCo-style checkpoint as torchgeo's SSL4EO-S12 weights come: a wrapper dict, every key
    under "backbone.", a classifier the encoder does not have, and no BatchNorm step counters."""
    state = {f"backbone.{k}": v for k, v in module.state_dict().items() if "num_batches" not in k}
    state["backbone.fc.weight"] = torch.zeros(1000, 8)
    path = tmp_path / name
    torch.save({"epoch": 99, "arch": "resnet18", "state_dict": state}, path)
    return path


def test_a_torchgeo_style_checkpoint_starts_a_resnet_tower(tmp_path):
    torch.manual_seed(0)
    source = build_encoder("resnet18", **SSL4EO)
    path = torchgeo_style_file(tmp_path, source)
    target = build_encoder("resnet18", **SSL4EO)
    load_pretrained_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_a_vit_safetensors_file_of_another_grid_is_resized_and_its_head_dropped(tmp_path):
    torch.manual_seed(0)
    kw = {"in_chans": 3, "embed_dim": 32, "depth": 1, "num_heads": 2}
    source = build_encoder("vit_small", img_size=64, patch_size=8, **kw)  # 8 x 8 patches
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 32)
    save_file(state, tmp_path / "vit.safetensors")
    target = build_encoder("vit_small", img_size=48, patch_size=8, **kw)  # 6 x 6 patches
    load_pretrained_weights(target, tmp_path / "vit.safetensors")
    assert target.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(target.cls_token, source.cls_token)
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])
    torch.testing.assert_close(target.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_a_band_count_mismatch_names_the_file_the_key_and_both_shapes(tmp_path):
    path = torchgeo_style_file(tmp_path, build_encoder("resnet18", **SSL4EO))
    target = build_encoder("resnet18", **{**SSL4EO, "in_chans": 10})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_pretrained_weights(target, path)
    message = str(err.value)
    assert str(path) in message
    assert "conv1.weight: file (16, 13, 7, 7), model (16, 10, 7, 7)" in message
    assert "the file's first convolution takes 13 bands: set in_chans" in message
    for key, value in before.items():  # all or nothing: the module is untouched
        assert torch.equal(target.state_dict()[key], value), key


def test_the_small_stem_does_not_take_an_imagenet_stem(tmp_path):
    path = torchgeo_style_file(tmp_path, build_encoder("resnet18", **SSL4EO))
    small = build_encoder("resnet18", **{**SSL4EO, "small_input": True})
    with pytest.raises(
        WeightsError,
        match=r"conv1.weight: file \(16, 13, 7, 7\), model \(16, 13, 3, 3\).*its stem is 7x7: set small_input: false",
    ):
        load_pretrained_weights(small, path)


def test_another_architecture_is_named_by_its_missing_and_unexpected_keys(tmp_path):
    path = torchgeo_style_file(tmp_path, build_encoder("resnet18", **SSL4EO))
    vit = build_encoder("vit_tiny", in_chans=13, img_size=64, depth=1)
    with pytest.raises(
        WeightsError, match=r"does not fit VisionTransformer: missing keys .*unexpected keys"
    ):
        load_pretrained_weights(vit, path)


class NotATensor:
    """A pickled object of a class: torch.load(weights_only=True) refuses to run its code."""


@pytest.mark.parametrize(
    "content, problem",
    [
        ("truncated", "not a readable torch state dict file"),
        ("code", "not a readable torch state dict file"),
        ("list", "holds a list, not a state dict"),
        ("no tensors", "holds no tensors"),
        ("bad safetensors", "not a readable safetensors file"),
    ],
)
def test_unreadable_weights_files_are_named_with_the_problem(tmp_path, content, problem):
    encoder = build_encoder("resnet18", **SSL4EO)
    path = tmp_path / ("w.safetensors" if content == "bad safetensors" else "w.pth")
    if content == "truncated":
        good = torchgeo_style_file(tmp_path, encoder, "good.pth").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif content == "code":
        path.write_bytes(pickle.dumps({"state_dict": NotATensor()}, protocol=2))
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "no tensors":
        torch.save({"state_dict": {"epoch": 3}}, path)
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match=problem) as err:
        load_pretrained_weights(encoder, path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_pretrained_weights(encoder, tmp_path / "absent.pth")


def test_load_view_weights_names_the_view_and_refuses_a_shared_one(tmp_path):
    views = {
        "rp": {"encoder": "resnet18", "in_chans": 3, "img_size": 32, "width": 16},
        "rsi": {"encoder": "resnet18", **SSL4EO},
        "rsi2": {"share": "rsi"},
    }
    model = build_model(views)
    path = torchgeo_style_file(tmp_path, model.encoders["rsi"])
    assert load_view_weights(model, {**views, "rsi": {**views["rsi"], "weights": str(path)}}) == [
        "rsi"
    ]
    with pytest.raises(ValueError, match="view 'rp': weights: .*wrong shapes"):
        load_view_weights(model, {**views, "rp": {**views["rp"], "weights": str(path)}})
    with pytest.raises(ValueError, match="view 'rsi2': weights applies to a view with an encoder"):
        load_view_weights(model, {**views, "rsi2": {"share": "rsi", "weights": str(path)}})


def tiny_rsi_file(tmp_path) -> tuple[torch.nn.Module, str]:
    """A weights file that fits tiny.yaml's crop tower (resnet18, 10 bands, 16 px, width 16)."""
    torch.manual_seed(3)
    source = build_encoder("resnet18", in_chans=10, img_size=16, width=16)
    return source, str(torchgeo_style_file(tmp_path, source))


def test_the_preflight_check_names_a_weights_file_that_is_missing_or_does_not_fit(tmp_path):
    cfg = config_lib.load(TINY, [f"model.views.rsi.weights={tmp_path / 'absent.pth'}"])
    with pytest.raises(
        config_lib.ConfigError,
        match=r"model.views.rsi: weights: .*absent.pth: weights file not found",
    ):
        pretrain._check_model(cfg)
    _, path = tiny_rsi_file(tmp_path)
    cfg = config_lib.load(TINY, [f"model.views.rp.weights={path}"])  # 3 bands, not 13
    with pytest.raises(
        config_lib.ConfigError, match=r"model.views.rp: weights: .*moco.pth: wrong shapes"
    ):
        pretrain._check_model(cfg)


def test_pretraining_starts_the_tower_from_the_users_weights(tmp_path, shards):  # noqa: F811
    """At a learning rate of 1e-12 the exported crop encoder still holds the user's weights."""
    source, path = tiny_rsi_file(tmp_path)
    run = tmp_path / "run"
    overrides = [f"model.views.rsi.weights={path}", "train.lr=1e-12", "train.min_lr=0"]
    overrides += ["train.total_samples=128", "train.ckpt_every_steps=100"]
    assert_ok(run_ranks(run, shards, 1, overrides))
    with safe_open(str(run / "encoders.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
        recipes = json.loads(f.metadata()["encoders"])
    for key, value in source.state_dict().items():
        if value.is_floating_point() and "running" not in key:  # BatchNorm statistics move
            torch.testing.assert_close(exported[f"rsi.encoder.{key}"], value, msg=key)
    assert recipes["rsi"]["timm"] == "resnet18" and recipes["rsi"]["stem"] == "small"


def test_exports_carry_a_timm_recipe_for_each_image_encoder(tmp_path):
    views = {
        "rp": {"encoder": "vit_tiny_p8", "in_chans": 3, "img_size": 48, "pool": "mean"},
        "rsi": {"encoder": "resnet50", "in_chans": 12, "img_size": 120},
        "series": {"encoder": "cnn1d_small", "in_chans": 3, "seq_len": 24},
    }
    with torch.device("meta"):
        model = build_model(views)
    recipes = encoder_recipes(model)
    assert set(recipes) == {"rp", "rsi"}  # a 1D series encoder has no timm counterpart
    assert recipes["rsi"] == {
        "timm": "resnet50",
        "kwargs": {"in_chans": 12, "num_classes": 0},
        "stem": None,
    }
    vit = recipes["rp"]["kwargs"]
    assert recipes["rp"]["timm"] == "vit_tiny_patch16_224"
    assert (vit["img_size"], vit["patch_size"], vit["global_pool"], vit["fc_norm"]) == (
        48,
        8,
        "avg",
        False,
    )
    small = build_model(
        {"rsi": {"encoder": "resnet18", "in_chans": 4, "img_size": 32, "width": 16}}
    )
    path = save_encoder_weights(
        export_encoder_state(small),
        tmp_path / "enc.safetensors",
        {"rsi": "rsi"},
        encoder_recipes(small),
    )
    with safe_open(str(path), "pt") as f:
        stored = json.loads(f.metadata()["encoders"])["rsi"]
    assert stored["stem"] == "small" and stored["kwargs"]["stem_width"] == 8


@pytest.mark.skipif(import_timm() is not None, reason="timm is installed here")
def test_a_timm_name_without_timm_says_how_to_install_it():
    with pytest.raises(
        ValueError, match=r"unknown encoder 'convnext_tiny'; ours: resnet18.*pimc_dist\[timm\]"
    ):
        build_encoder("convnext_tiny", in_chans=3, img_size=32)
