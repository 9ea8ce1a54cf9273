"""Encoders and timm (the `timm` extra): any timm model name as a tower, our short names equal
to timm models, exports that plain timm loads with the same outputs, timm / torchgeo weights
files that start our towers. timm needs a torchvision built for the installed torch, so CI runs
these (`pytest -m timm`) in a venv of their own (.ci/run)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_finetune import ft_config, read_result
from test_large_encoders import checkpointing_peaks
from test_pretrain import assert_ok, run_ranks, shards  # noqa: F401 (fixture)
from torch.utils.flop_counter import FlopCounterMode

from pimc_dist import finetune, load_encoder
from pimc_dist.models import (
    BatchNorm2d,
    build_encoder,
    build_model,
    count_flops,
    create_timm_model,
    load_pretrained_weights,
    load_view_weights,
    timm_recipe,
)

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.timm


def flop_counter(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's count of a forward. On a CPU tensor it misses the attention products
    (the CPU attention kernel has no FLOP formula), so models with attention run on meta."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return int(counter.get_total_flops())


def same_outputs(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("resnet18", {"in_chans": 10, "img_size": 32}),  # small stem
        ("resnet50", {"in_chans": 12, "img_size": 120, "width": 16}),  # ImageNet stem, narrow
        ("vit_small_p8", {"in_chans": 3, "img_size": 48, "depth": 2}),
        ("vit_tiny", {"in_chans": 5, "img_size": 32, "depth": 2, "pool": "mean"}),
    ],
)
def test_our_short_names_are_timm_models_with_the_same_outputs_and_flops(name, kw):
    torch.manual_seed(0)
    ours = build_encoder(name, **kw)
    theirs = create_timm_model(timm_recipe(ours))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, kw["in_chans"], kw["img_size"], kw["img_size"])
    same_outputs(ours, theirs, x)
    # The planner's and the engine's analytic count is timm's measured one.
    with torch.device("meta"):
        meta_theirs = create_timm_model(timm_recipe(ours))
        meta_x = torch.zeros(1, *x.shape[1:])
    assert count_flops(ours) == flop_counter(meta_theirs, meta_x)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("convnext_atto", {}),
        ("resnet18d", {}),
        ("vit_small_patch16_224", {"patch_size": 8, "pool": "mean", "timm_args": {"depth": 2}}),
        ("efficientnet_b0", {"drop_path_rate": 0.1}),
    ],
)
def test_any_timm_name_is_a_tower_that_trains_and_counts_its_flops(name, kw):
    encoder = build_encoder(name, in_chans=5, img_size=32, **kw)
    x = torch.randn(4, 5, 32, 32)
    out = encoder.train()(x)
    assert out.shape == (4, encoder.out_dim)
    out.square().mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
    if name.startswith("vit"):  # our analytic count of the same shape
        same = build_encoder("vit_small_p8", in_chans=5, img_size=32, depth=2, pool="mean")
        assert count_flops(encoder) == count_flops(same)
    else:
        assert count_flops(encoder) == flop_counter(encoder, x[:1]) > 0
    norms = [m for m in encoder.modules() if type(m) is torch.nn.BatchNorm2d]
    assert not norms, "plain BatchNorms left: DeepSpeed bf16 on CPU would refuse them"
    if name == "resnet18d":
        assert any(isinstance(m, BatchNorm2d) for m in encoder.modules())


def test_a_timm_name_with_an_argument_timm_refuses_is_a_clear_error():
    with pytest.raises(ValueError, match="convnext_atto: timm refused the arguments"):
        build_encoder("convnext_atto", in_chans=5, img_size=32, small_input=True)
    with pytest.raises(
        ValueError, match="unknown encoder 'convnext_enormous'.*nor is it a timm model"
    ):
        build_encoder("convnext_enormous", in_chans=5, img_size=32)


def test_grad_checkpointing_of_a_timm_tower_keeps_gradients_and_batchnorm_statistics():
    # timm's set_grad_checkpointing, and our BatchNorms leave their statistics alone in the
    # recomputation.
    checkpointing_peaks("model.views.rsi.encoder=resnet18d", "model.views.rsi.width=null")


@pytest.mark.parametrize(
    "timm_name, ours, kw",
    [
        ("resnet50", "resnet50", {"img_size": 64, "small_input": False}),
        ("vit_small_patch16_224", "vit_small", {"img_size": 224, "patch_size": 16}),
    ],
)
def test_a_timm_or_torchgeo_weights_file_starts_our_tower_with_timms_outputs(
    tmp_path, timm_name, ours, kw
):
    """As torchgeo ships SSL4EO-S12 weights: a torch.save'd timm state dict of 13 bands, with
    the classifier; our tower of the same name then computes timm's features."""
    torch.manual_seed(0)
    source = timm.create_model(timm_name, pretrained=False, in_chans=13, num_classes=19)
    path = tmp_path / f"{timm_name}_sentinel2_all_moco.pth"
    torch.save(source.state_dict(), path)
    tower = build_encoder(ours, in_chans=13, **kw)
    load_pretrained_weights(tower, path)
    source.reset_classifier(0)
    same_outputs(tower, source, torch.randn(2, 13, kw["img_size"], kw["img_size"]))


def test_a_weights_file_starts_a_timm_named_tower(tmp_path):
    views = {
        "rp": {"encoder": "convnext_atto", "in_chans": 3, "img_size": 32},
        "rsi": {"encoder": "resnet18", "in_chans": 4, "img_size": 32, "width": 16},
    }
    model = build_model(views)
    source = timm.create_model("convnext_atto", pretrained=False, in_chans=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "convnext.pth")
    load_view_weights(
        model, {**views, "rp": {**views["rp"], "weights": str(tmp_path / "convnext.pth")}}
    )
    source.reset_classifier(0)
    same_outputs(model.encoders["rp"], source, torch.randn(2, 3, 32, 32))


def test_a_pretraining_runs_towers_load_into_plain_timm_with_the_same_outputs(
    tmp_path,
    shards,  # noqa: F811
):
    """The crop tower is a timm name, the plot tower our resnet18 (small stem, width 16);
    the exported file's metadata rebuilds both in plain timm as docs/usage.md shows, and the
    evaluation probes the timm tower."""
    run = tmp_path / "run"
    overrides = ["model.views.rsi.encoder=resnet18d", "model.views.rsi.width=null"]
    overrides += ["train.total_samples=128", "train.ckpt_every_steps=100"]
    assert_ok(run_ranks(run, shards, 1, overrides))
    for view, size, chans in (("rp", 42, 3), ("rsi", 16, 10)):
        # The documented recipe, in plain timm and torch only.
        with safe_open(str(run / "encoders.safetensors"), "pt") as f:
            recipe = json.loads(f.metadata()["encoders"])[view]
            prefix = f"{view}.encoder."
            state = {
                k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)
            }
        theirs = timm.create_model(recipe["timm"], **recipe["kwargs"])
        if recipe["stem"] == "small":
            theirs.conv1 = torch.nn.Conv2d(chans, theirs.bn1.num_features, 3, 1, 1, bias=False)
            theirs.maxpool = torch.nn.Identity()
        theirs.load_state_dict(state)
        loaded = load_encoder(run, view)
        same_outputs(loaded.module, theirs, torch.randn(3, chans, size, size))
    probe = tmp_path / "probe"
    # The run pretrained on every split of this small set: what is checked here is that the
    # timm tower runs through the evaluation, not a score, so the leak guard is told so.
    overlap_ok = "finetune.allow_pretrain_overlap=true"
    rsi = "finetune.inputs=[rsi]"
    cfg = ft_config("pastis_pixel_cls", probe, shards, f"finetune.ckpt={run}", overlap_ok, rsi)
    assert finetune.main(cfg) == 0
    result = read_result(probe)
    assert result["status"] == "ok" and result["inputs"] == ["rsi"], result
    assert result["samples"]["test"] == result["metrics"]["n"] == 64
    assert result["architecture_from"] == str(run / "config.yaml")
    # A score is not the point (this fixture's test fold has crops its train folds lack).
    assert 0.0 <= result["metrics"]["oa"] <= 1.0 and 0.0 <= result["metrics"]["knn_acc"] <= 1.0
