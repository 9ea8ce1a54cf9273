"""Encoders, heads, the contrastive model, FLOP counts and encoder weight files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pimc_dist.models import (
    ENCODER_NAMES,
    SERIES_ENCODERS,
    BatchNorm1d,
    ContrastiveModel,
    ProjectionHead,
    ResNet,
    ResNet1d,
    SeriesCNN,
    VisionTransformer,
    WeightsError,
    build_encoder,
    build_head,
    build_model,
    count_flops,
    count_params,
    default_patch_size,
    export_encoder_state,
    load_encoder_weights,
    model_summary,
    resize_pos_embed,
    save_encoder_weights,
)

# Tiny shapes so every architecture runs on a loaded 2-core CPU in well under a second.
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_RESNET = {"width": 8}
IMAGE_ENCODERS = [n for n in ENCODER_NAMES if n not in SERIES_ENCODERS]


def tiny_kw(name: str) -> dict:
    return dict(TINY_RESNET) if name.startswith("resnet") else dict(TINY_VIT)


def measured_flops(fn) -> int:
    """FLOPs torch counts for fn(); SDPA on the math path, whose matmuls the counter sees."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("name", IMAGE_ENCODERS)
@pytest.mark.parametrize("in_chans", [3, 10, 2])
def test_every_encoder_runs_forward_and_backward_on_small_inputs(name, in_chans):
    torch.manual_seed(0)
    model = build_encoder(name, in_chans=in_chans, img_size=32, **tiny_kw(name))
    x = torch.randn(3, in_chans, 32, 32, requires_grad=True)
    features = model(x)
    assert features.shape == (3, model.out_dim)
    features.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit_tiny", "vit_small"])
def test_full_width_encoders_run_on_a_recurrence_plot_batch(name):
    model = build_encoder(name, in_chans=3, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()  # a plain sum of LayerNorm output has zero gradient
    first = model.conv1 if name.startswith("resnet") else model.patch_embed.proj
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    expected_dim = {"resnet18": 512, "resnet50": 2048, "vit_tiny": 192, "vit_small": 384}[name]
    assert model.out_dim == expected_dim


# Published sizes with a 1000-class classifier (torchvision ResNets, timm ViTs at 224 px);
# our encoders have none, so the classifier (features x 1000 + 1000) is subtracted.
PUBLISHED_PARAMS = [
    ("resnet18", None, 11_689_512, 512),
    ("resnet50", None, 25_557_032, 2048),
    ("vit_tiny", 16, 5_717_416, 192),
    ("vit_small", 16, 22_050_664, 384),
    ("vit_base", 16, 86_567_656, 768),
    ("vit_large", 16, 304_326_632, 1024),
    ("vit_huge", 14, 632_045_800, 1280),
]


@pytest.mark.parametrize(("name", "patch", "published", "features"), PUBLISHED_PARAMS)
def test_parameter_counts_match_published_sizes(name, patch, published, features):
    with torch.device("meta"):  # no memory even for the 600M huge
        model = build_encoder(name, in_chans=3, img_size=224, patch_size=patch)
    assert model.out_dim == features
    assert count_params(model) == published - (features * 1000 + 1000)


def test_giant_is_about_one_billion_parameters_with_dinov2_giant2_shape():
    with torch.device("meta"):
        model = build_encoder("vit_giant", in_chans=3, img_size=224, patch_size=14)
    assert (model.embed_dim, model.depth, model.num_heads) == (1536, 40, 24)
    assert 1.0e9 < count_params(model) < 1.2e9


def test_model_summary_lists_modules_and_the_exact_total():
    with torch.device("meta"):
        model = build_encoder("vit_large", in_chans=13, img_size=224, patch_size=16)
    text = model_summary(model)
    total = count_params(model)
    assert f"{total:,}" in text.splitlines()[1]
    for part in ("patch_embed", "blocks", "blocks.23", "norm", "trainable"):
        assert part in text
    block_params = count_params(model.blocks[0])
    assert f"{block_params:,}" in text


def test_input_channels_set_the_first_layer_and_wrong_channels_fail():
    vit = build_encoder("vit_tiny", in_chans=13, img_size=32, **TINY_VIT)
    resnet = build_encoder("resnet18", in_chans=2, img_size=32, **TINY_RESNET)
    assert vit.patch_embed.proj.weight.shape[1] == 13
    assert resnet.conv1.weight.shape[1] == 2
    with pytest.raises(ValueError, match="expected 13 input channels, got 3"):
        vit(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected 2 input channels, got 3"):
        resnet(torch.randn(1, 3, 32, 32))


def _last_stage_size(model: ResNet, img_size: int) -> tuple[int, int]:
    seen = {}

    def record(module, inputs, output):
        seen["s"] = output.shape

    handle = model.layer4.register_forward_hook(record)
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, model.in_chans, img_size, img_size))
    handle.remove()
    return tuple(seen["s"][-2:])


@pytest.mark.parametrize(
    ("img_size", "small", "last_stage"),
    [(16, True, (2, 2)), (32, True, (4, 4)), (64, True, (8, 8)), (96, False, (3, 3))],
)
def test_resnet_stem_is_chosen_by_input_size(img_size, small, last_stage):
    model = build_encoder("resnet18", in_chans=3, img_size=img_size, **TINY_RESNET)
    assert model.small_input is small
    assert isinstance(model.maxpool, nn.Identity) is small
    assert _last_stage_size(model, img_size) == last_stage


def test_resnet_stem_can_be_forced():
    model = build_encoder("resnet50", in_chans=3, img_size=32, small_input=False, **TINY_RESNET)
    assert model.conv1.kernel_size == (7, 7) and _last_stage_size(model, 32) == (1, 1)


def test_resnet_residual_branches_start_at_identity():
    model = build_encoder("resnet50", in_chans=3, img_size=32, **TINY_RESNET)
    assert all(block.bn3.weight.abs().sum() == 0 for block in model.layer1)
    plain = build_encoder(
        "resnet50", in_chans=3, img_size=32, zero_init_residual=False, **TINY_RESNET
    )
    assert all(block.bn3.weight.abs().sum() > 0 for block in plain.layer1)


def test_vit_pooling_is_class_token_or_mean_of_patch_tokens():
    torch.manual_seed(0)
    cls_model = build_encoder("vit_tiny", in_chans=3, img_size=32, pool="cls", **TINY_VIT)
    mean_model = build_encoder("vit_tiny", in_chans=3, img_size=32, pool="mean", **TINY_VIT)
    mean_model.load_state_dict(cls_model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    tokens = cls_model.forward_tokens(x)
    assert tokens.shape == (2, 1 + 8 * 8, 32)
    torch.testing.assert_close(cls_model(x), tokens[:, 0])
    torch.testing.assert_close(mean_model(x), tokens[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="unknown ViT pool 'max'"):
        build_encoder("vit_tiny", in_chans=3, img_size=32, pool="max", **TINY_VIT)


@pytest.mark.parametrize(
    ("img_size", "patch"), [(16, 2), (32, 4), (48, 8), (64, 8), (120, 8), (224, 16), (7, 1)]
)
def test_default_patch_size_leaves_at_least_six_patches_per_side(img_size, patch):
    assert default_patch_size(img_size) == patch
    model = build_encoder("vit_tiny", in_chans=3, img_size=img_size, **TINY_VIT)
    assert model.patch_size == patch


def test_vit_runs_on_other_input_sizes_by_resizing_position_embeddings():
    torch.manual_seed(0)
    model = build_encoder("vit_tiny", in_chans=3, img_size=32, patch_size=4, **TINY_VIT)
    assert model.pos_embed.shape == (1, 1 + 64, 32)
    for size in (24, 48, 64):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 32)
    # Rectangular inputs resize to a rectangular grid.
    assert model.forward_tokens(torch.randn(1, 3, 32, 48)).shape == (1, 1 + 8 * 12, 32)
    with pytest.raises(ValueError, match="30x30 px is not divisible by the ViT patch size 4"):
        model(torch.randn(1, 3, 30, 30))


def test_position_embedding_resize_keeps_class_token_and_constant_fields():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, (4, 4)) is pos
    constant = torch.cat([torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.5)], dim=1)
    resized = resize_pos_embed(constant, (6, 3))
    assert resized.shape == (1, 1 + 18, 8)
    torch.testing.assert_close(resized[:, :1], constant[:, :1])
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 18, 8), 0.5))
    # A smooth field survives a round trip up and down almost unchanged.
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    field = torch.sin(ys / 3 + xs / 5).reshape(1, 64, 1).expand(1, 64, 4)
    smooth = torch.cat([torch.zeros(1, 1, 4), field], dim=1)
    back = resize_pos_embed(resize_pos_embed(smooth, (16, 16)), (8, 8))
    torch.testing.assert_close(back, smooth, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def test_activation_checkpointing_gives_identical_gradients_and_saves_less():
    kw = {"embed_dim": 64, "depth": 4, "num_heads": 4, "drop_path_rate": 0.2}
    torch.manual_seed(0)
    plain = build_encoder("vit_small", in_chans=3, img_size=32, **kw)
    ckpt = build_encoder("vit_small", in_chans=3, img_size=32, grad_checkpointing=True, **kw)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same stochastic-depth draws; checkpoint replays the RNG state
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)
    assert _saved_activation_bytes(ckpt, x) < 0.5 * _saved_activation_bytes(plain, x)
    with torch.no_grad():  # no checkpoint without grad: same output
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x))


def test_resnet_accepts_activation_checkpointing():
    # Same gradients and BatchNorm statistics: tests/test_large_encoders.py.
    model = build_encoder(
        "resnet18", in_chans=3, img_size=32, grad_checkpointing=True, **TINY_RESNET
    )
    assert model.grad_checkpointing


# ---------------------------------------------------------------- registry


def test_unknown_encoder_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown encoder 'vit_enormous'") as err:
        build_encoder("vit_enormous", in_chans=3, img_size=32)
    for name in ("resnet18", "resnet50", "vit_tiny", "vit_huge", "vit_giant"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown encoder 'resnet101'"):
        build_encoder("resnet101", in_chans=3, img_size=32)


def test_unknown_encoder_option_is_named():
    with pytest.raises(ValueError, match="unknown option.*embed_dims.*for vit_base"):
        build_encoder("vit_base", in_chans=3, img_size=32, embed_dims=8)
    with pytest.raises(ValueError, match="unknown option.*pool.*for resnet18"):
        build_encoder("resnet18", in_chans=3, img_size=32, pool="mean")
    with pytest.raises(ValueError, match="patch_size applies to ViT encoders only"):
        build_encoder("resnet18", in_chans=3, img_size=32, patch_size=4)


def test_patch_size_suffix_in_the_name():
    with torch.device("meta"):
        model = build_encoder("vit_large_p8", in_chans=3, img_size=48)
    assert model.patch_size == 8 and model.grid == (6, 6)
    with pytest.raises(ValueError, match="contradicts the name's _p8"):
        build_encoder("vit_large_p8", in_chans=3, img_size=48, patch_size=4)
    with pytest.raises(ValueError, match="img_size 48 is not divisible by patch_size 14"):
        build_encoder("vit_tiny_p14", in_chans=3, img_size=48, **TINY_VIT)


# ---------------------------------------------------------------- heads


def test_projection_head_depths():
    identity = build_head(32, depth=0, out_dim=None)
    assert identity.out_dim == 32 and len(identity.mlp) == 0
    linear = build_head(32, depth=1, out_dim=16)
    assert [type(m) for m in linear.mlp] == [nn.Linear]
    deep = build_head(32, depth=3, hidden_dim=64, out_dim=16, norm="bn", act="relu")
    kinds = [type(m) for m in deep.mlp]
    # pimc_dist's BatchNorm1d: torch's, also with bf16 weights and fp32 statistics (DeepSpeed bf16).
    from pimc_dist.models import BatchNorm1d

    assert kinds == [nn.Linear, BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert deep.mlp[0].bias is None  # BatchNorm follows: the bias would be redundant
    ln = build_head(32, depth=2, hidden_dim=64, out_dim=16)
    assert [type(m) for m in ln.mlp] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    x = torch.randn(5, 32)
    for head in (identity, linear, deep, ln):
        assert head(x).shape == (5, head.out_dim)
    torch.testing.assert_close(identity(x), x)


def test_layernorm_head_works_with_one_sample_per_rank():
    head = build_head(32, depth=2, hidden_dim=64, out_dim=16, norm="ln")
    assert head(torch.randn(1, 32)).shape == (1, 16)


def test_bad_head_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown head norm 'group'"):
        build_head(32, norm="group")
    with pytest.raises(ValueError, match="unknown head activation 'tanh'"):
        build_head(32, act="tanh")
    with pytest.raises(ValueError, match="unknown option.*width.*projection head"):
        build_head(32, width=64)
    with pytest.raises(ValueError, match="depth-0 .identity. head keeps in_dim 32, not 16"):
        build_head(32, depth=0, out_dim=16)


# ---------------------------------------------------------------- contrastive model

PIMC_VIEWS = {
    "rp": {"encoder": "vit_tiny", "in_chans": 3, "img_size": 32, "pool": "mean", **TINY_VIT},
    "rsi": {"encoder": "resnet18", "in_chans": 10, "img_size": 16, **TINY_RESNET},
}
HEAD = {"out_dim": 16, "depth": 2, "hidden_dim": 32}


def pimc_batch(b: int = 4) -> dict:
    return {
        "rp": torch.randn(b, 3, 32, 32),
        "rsi": torch.randn(b, 10, 16, 16),
        "label": torch.arange(b),
        "meta": [{"row": i} for i in range(b)],
    }


def test_two_tower_model_returns_unit_embeddings_per_view_and_the_logit_scale():
    torch.manual_seed(0)
    model = build_model(PIMC_VIEWS, HEAD)
    out = model(pimc_batch())
    assert set(out) == {"rp", "rsi", "logit_scale"}
    for view in ("rp", "rsi"):
        assert out[view].shape == (4, 16)
        torch.testing.assert_close(out[view].norm(dim=-1), torch.ones(4))
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))  # the log, as CLIP
    logits = out["logit_scale"].exp() * out["rp"] @ out["rsi"].T
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert model.logit_scale.grad is not None
    assert all(p.grad is not None for p in model.encoders["rsi"].parameters())
    assert isinstance(model.encoder("rp"), VisionTransformer)
    assert isinstance(model.encoder("rsi"), ResNet)


def test_encode_gives_pre_head_features_and_embed_matches_forward():
    model = build_model(PIMC_VIEWS, HEAD).eval()
    batch = pimc_batch(3)
    assert model.encode("rp", batch["rp"]).shape == (3, 32)
    assert model.encode("rsi", batch["rsi"]).shape == (3, 8 * 8)
    torch.testing.assert_close(model.embed("rsi", batch["rsi"]), model(batch)["rsi"])
    with pytest.raises(KeyError, match="unknown view 's2'"):
        model.encode("s2", batch["rp"])


def test_forward_embeds_only_the_views_present_and_fails_without_any():
    model = build_model(PIMC_VIEWS, HEAD)
    out = model({"rp": torch.randn(2, 3, 32, 32), "label": torch.zeros(2)})
    assert set(out) == {"rp", "logit_scale"}
    with pytest.raises(ValueError, match=r"none of the model's views \['rp', 'rsi'\]"):
        model({"s2": torch.randn(2, 3, 32, 32)})


def test_views_can_share_a_whole_tower_or_only_the_encoder():
    views = {
        "s2": {"encoder": "resnet18", "in_chans": 12, "img_size": 32, **TINY_RESNET},
        "s2_aug2": {"share": "s2"},
        "s1": {"encoder": "resnet18", "in_chans": 2, "img_size": 32, **TINY_RESNET},
        "s1_aug2": {"share": "s1"},
        "s2_probe": {"share_encoder": "s2", "head": {"depth": 1}},
    }
    model = build_model(views, HEAD)
    assert model.encoder("s2_aug2") is model.encoder("s2")
    assert model.head("s2_aug2") is model.head("s2")
    assert model.encoder("s2_probe") is model.encoder("s2")
    assert model.head("s2_probe") is not model.head("s2")
    assert model.head("s2_probe").depth == 1
    assert sorted(model.encoders) == ["s1", "s2"]
    # Shared modules are stored once: no duplicated state-dict entries or parameters.
    keys = list(model.state_dict())
    assert len(keys) == len(set(keys))
    assert not any(k.startswith(("encoders.s2_aug2", "heads.s2_aug2")) for k in keys)
    x = torch.randn(2, 12, 32, 32)
    out = model.eval()({"s2": x, "s2_aug2": x, "s1": torch.randn(2, 2, 32, 32)})
    torch.testing.assert_close(out["s2"], out["s2_aug2"])


def test_logit_scale_and_siglip_bias_options():
    model = build_model(PIMC_VIEWS, HEAD, init_temperature=0.1, init_logit_bias=-10.0)
    out = model(pimc_batch(2))
    assert out["logit_scale"].exp().item() == pytest.approx(10.0)
    assert out["logit_bias"].item() == -10.0
    frozen = build_model(PIMC_VIEWS, HEAD, learn_logit_scale=False)
    assert not frozen.logit_scale.requires_grad


def test_shared_encoder_option_runs_every_view_through_the_first_encoder():
    spec = {"encoder": "vit_tiny", "in_chans": 3, "img_size": 32, **TINY_VIT}
    views = {"a": spec, "b": {**spec, "head": {"depth": 1}}, "c": {"share": "a"}}
    model = build_model(views, HEAD, shared_encoder=True)
    assert list(model.encoders) == ["a"]
    assert model.encoder("b") is model.encoder("a") and model.head("b") is not model.head("a")
    assert model.head("b").depth == 1 and model.head("c") is model.head("a")
    with pytest.raises(ValueError, match="view 'b': shared_encoder needs the same encoder"):
        build_model({"a": spec, "b": {**spec, "in_chans": 4}}, HEAD, shared_encoder=True)


def test_global_grad_checkpointing_switch_reaches_every_encoder():
    model = build_model(PIMC_VIEWS, HEAD, grad_checkpointing=True)
    assert model.encoder("rp").grad_checkpointing is True
    assert model.encoder("rsi").grad_checkpointing is True


def test_none_valued_keys_count_as_absent():
    # A structured config carries every field, unset ones as None.
    views = {
        "rp": {**PIMC_VIEWS["rp"], "patch_size": None, "share": None, "share_encoder": None},
        "rsi": {**PIMC_VIEWS["rsi"], "patch_size": None, "head": None},
    }
    model = build_model(views, {**HEAD, "act": None})
    assert model.encoder("rp").patch_size == 4 and model.embed_dim == 16


def test_model_builds_from_an_omegaconf_config():
    cfg = OmegaConf.create({"views": PIMC_VIEWS, "head": HEAD})
    model = build_model(cfg.views, cfg.head)
    assert sorted(model.views) == ["rp", "rsi"] and model.embed_dim == 16


@pytest.mark.parametrize(
    ("views", "message"),
    [
        ({"rp": {"in_chans": 3, "img_size": 32}}, "view 'rp': needs 'encoder'"),
        ({"rp": {"encoder": "vit_tiny", "img_size": 32}}, "view 'rp': missing in_chans"),
        (
            {"rp": {"encoder": "vit_mega", "in_chans": 3, "img_size": 32}},
            "view 'rp': unknown encoder 'vit_mega'",
        ),
        ({**PIMC_VIEWS, "x": {"share": "nope"}}, "view 'x': share target 'nope' is not a view"),
        ({**PIMC_VIEWS, "x": {"share": "rp", "img_size": 8}}, "view 'x': share allows no other"),
        ({**PIMC_VIEWS, "logit_scale": {"share": "rp"}}, "'logit_scale' is reserved"),
        (
            {**PIMC_VIEWS, "x": {"share_encoder": "rp", "head": {"out_dim": 8}}},
            r"one dimension, got \[8, 16\]",
        ),
    ],
)
def test_bad_model_configs_name_the_view_and_problem(views, message):
    with pytest.raises(ValueError, match=message):
        build_model(views, HEAD)


def test_contrastive_model_checks_encoder_and_head_dimensions():
    encoder = build_encoder("resnet18", in_chans=3, img_size=32, **TINY_RESNET)
    with pytest.raises(ValueError, match="gives 64 features but head 'a' takes 32"):
        ContrastiveModel({"a": encoder}, {"a": ProjectionHead(32, 16)})


# ---------------------------------------------------------------- FLOPs

FLOP_CASES = [
    ("vit_tiny", 3, 32, 4, TINY_VIT),
    ("vit_small", 13, 48, 8, {"embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 2.0}),
    ("resnet18", 3, 32, None, TINY_RESNET),
    ("resnet50", 10, 32, None, TINY_RESNET),
    ("resnet50", 2, 96, None, TINY_RESNET),  # ImageNet stem
    ("resnet18", 12, 17, None, TINY_RESNET),  # odd size: rounding of strided convs
]


@pytest.mark.parametrize(("name", "in_chans", "img_size", "patch", "kw"), FLOP_CASES)
def test_analytic_flops_agree_with_torch_flop_counter(name, in_chans, img_size, patch, kw):
    model = build_encoder(name, in_chans=in_chans, img_size=img_size, patch_size=patch, **kw)
    x = torch.randn(2, in_chans, img_size, img_size)
    measured = measured_flops(lambda: model(x))
    analytic = count_flops(model, batch=2)
    assert analytic == pytest.approx(measured, rel=0.01)
    by_name = count_flops(name, in_chans, img_size, patch, batch=2, **kw)
    assert by_name == analytic


def test_vit_flops_at_another_input_size_agree_with_flop_counter():
    model = build_encoder("vit_tiny", in_chans=3, img_size=32, patch_size=4, **TINY_VIT)
    measured = measured_flops(lambda: model(torch.randn(1, 3, 48, 48)))
    assert count_flops(model, img_size=48) == pytest.approx(measured, rel=0.01)


def test_contrastive_model_flops_agree_with_flop_counter():
    views = {**PIMC_VIEWS, "rp_aug2": {"share": "rp"}}
    model = build_model(views, HEAD)
    batch = {**pimc_batch(2), "rp_aug2": torch.randn(2, 3, 32, 32)}
    measured = measured_flops(lambda: model(batch))
    assert count_flops(model, batch=2) == pytest.approx(measured, rel=0.01)


def test_flops_of_standard_models_match_published_multiply_adds():
    # ResNet-50 4.1 GMACs, ResNet-18 1.8 GMACs, ViT-B/16 17.6 GMACs, ViT-L/16 61.6 GMACs at 224.
    assert count_flops("resnet50", 3, 224) == pytest.approx(2 * 4.1e9, rel=0.02)
    assert count_flops("resnet18", 3, 224) == pytest.approx(2 * 1.82e9, rel=0.02)
    assert count_flops("vit_base", 3, 224, 16) == pytest.approx(2 * 17.6e9, rel=0.02)
    assert count_flops("vit_large", 3, 224, 16) == pytest.approx(2 * 61.6e9, rel=0.02)
    assert count_flops("vit_giant", 3, 224, 14, batch=4) == 4 * count_flops("vit_giant", 3, 224, 14)
    with pytest.raises(ValueError, match="needs in_chans and img_size"):
        count_flops("vit_base")


# ---------------------------------------------------------------- weight files


@pytest.fixture()
def pimc_model():
    torch.manual_seed(0)
    return build_model({**PIMC_VIEWS, "rp_aug2": {"share": "rp"}}, HEAD)


def _fresh(view: str) -> nn.Module:
    spec = dict(PIMC_VIEWS[view])
    return build_encoder(spec.pop("encoder"), **spec)


def test_exported_encoders_reload_into_fresh_modules(pimc_model, tmp_path):
    state = export_encoder_state(pimc_model)
    assert all(k.startswith(("rp.encoder.", "rsi.encoder.")) for k in state)
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())
    views = {v: keys[0] for v, keys in pimc_model.views.items()}
    path = save_encoder_weights(state, tmp_path / "out" / "encoders.safetensors", views)
    assert [p.name for p in path.parent.iterdir()] == ["encoders.safetensors"]
    batch = pimc_batch(2)
    pimc_model.eval()
    for view in ("rp", "rsi"):
        encoder = _fresh(view).eval()
        load_encoder_weights(encoder, path, view=view)
        torch.testing.assert_close(encoder(batch[view]), pimc_model.encode(view, batch[view]))


def test_export_from_a_consolidated_state_dict_matches_export_from_the_model(pimc_model):
    wrapped = {f"module.{k}": v for k, v in pimc_model.state_dict().items()}
    from_dict = export_encoder_state(wrapped)
    from_model = export_encoder_state(pimc_model)
    assert from_dict.keys() == from_model.keys()
    for key in from_model:
        assert torch.equal(from_dict[key], from_model[key])
    with pytest.raises(ValueError, match="no 'encoders.<view>.' keys"):
        export_encoder_state({"weight": torch.zeros(1)})


def test_bf16_model_exports_float32(pimc_model):
    state = export_encoder_state(pimc_model.to(torch.bfloat16))
    assert state["rp.encoder.pos_embed"].dtype == torch.float32


def test_bare_encoder_file_loads_and_pos_embed_is_resized(tmp_path):
    torch.manual_seed(0)
    small = build_encoder("vit_tiny", in_chans=3, img_size=32, patch_size=4, **TINY_VIT)
    path = tmp_path / "bare.safetensors"
    save_encoder_weights(small.state_dict(), path)
    big = build_encoder("vit_tiny", in_chans=3, img_size=48, patch_size=4, **TINY_VIT)
    load_encoder_weights(big, path)
    torch.testing.assert_close(big.pos_embed, resize_pos_embed(small.pos_embed, (12, 12)))
    torch.testing.assert_close(big.blocks[1].mlp.fc2.weight, small.blocks[1].mlp.fc2.weight)
    x = torch.randn(1, 3, 48, 48)  # same computation as the small model resizing on the fly
    torch.testing.assert_close(big.eval()(x), small.eval()(x))


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors: encoder weights file not found"):
        load_encoder_weights(_fresh("rp"), path)


@pytest.mark.parametrize("damage", ["truncated", "header_only", "pickle", "empty", "garbage"])
def test_unreadable_weights_files_are_named_and_leave_the_module_untouched(
    pimc_model, tmp_path, damage
):
    good = tmp_path / "good.safetensors"
    save_encoder_weights(export_encoder_state(pimc_model), good)
    raw = good.read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) - 100])
    elif damage == "header_only":
        bad.write_bytes(raw[:7])
    elif damage == "pickle":
        torch.save(pimc_model.encoders["rp"].state_dict(), bad)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes(b"\xff" * 4096)
    encoder = _fresh("rp")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(WeightsError, match=f"{damage}.safetensors: not a readable safetensors"):
        load_encoder_weights(encoder, bad, view="rp")
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert good.read_bytes() == raw


def test_weights_for_another_model_are_refused_with_the_keys_named(pimc_model, tmp_path):
    path = save_encoder_weights(export_encoder_state(pimc_model), tmp_path / "enc.safetensors")
    resnet = _fresh("rsi")
    with pytest.raises(WeightsError, match="enc.safetensors: does not fit ResNet: missing keys"):
        load_encoder_weights(resnet, path, view="rp")
    with pytest.raises(WeightsError, match=r"holds encoders of views \['rp', 'rsi'\]; pass view="):
        load_encoder_weights(resnet, path)
    with pytest.raises(WeightsError, match="has no encoder for view 's2'"):
        load_encoder_weights(resnet, path, view="s2")


def test_weights_of_the_wrong_shape_are_refused_with_the_key_named(pimc_model, tmp_path):
    path = save_encoder_weights(export_encoder_state(pimc_model), tmp_path / "enc.safetensors")
    wider = build_encoder("resnet18", in_chans=10, img_size=16, width=16)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        WeightsError, match=r"enc.safetensors: wrong shapes: conv1.weight: file \(8, 10"
    ):
        load_encoder_weights(wider, path, view="rsi")
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    other_chans = build_encoder("vit_tiny", in_chans=12, img_size=32, pool="mean", **TINY_VIT)
    with pytest.raises(WeightsError, match="patch_embed.proj.weight"):
        load_encoder_weights(other_chans, path, view="rp")


def test_file_mixing_prefixed_and_bare_keys_is_refused(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"rp.encoder.w": torch.zeros(1), "w": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsError, match="mixed.safetensors: mixes '<view>.encoder.' keys"):
        load_encoder_weights(_fresh("rp"), path)


def test_bare_file_refuses_a_view_and_empty_file_is_refused(tmp_path):
    encoder = _fresh("rsi")
    bare = save_encoder_weights(encoder.state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(
        WeightsError, match="bare.safetensors: has no 'rp.encoder.' keys for view 'rp'"
    ):
        load_encoder_weights(encoder, bare, view="rp")
    empty = save_encoder_weights({}, tmp_path / "empty.safetensors")
    with pytest.raises(WeightsError, match="empty.safetensors: holds no tensors"):
        load_encoder_weights(encoder, empty)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_checkpointed_vit_in_bf16_on_cuda_runs_and_matches_the_flop_count():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_encoder("vit_small", in_chans=3, img_size=48, grad_checkpointing=True).cuda()
    x = torch.randn(8, 3, 48, 48, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        out = model(x)  # flash / efficient SDPA kernels, which the counter knows
    assert out.shape == (8, 384)
    assert count_flops(model, batch=8) == pytest.approx(counter.get_total_flops(), rel=0.01)
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- 1D series encoders


@pytest.mark.parametrize("name", SERIES_ENCODERS)
@pytest.mark.parametrize("in_chans", [3, 1])
def test_series_encoders_run_forward_and_backward_on_any_length(name, in_chans):
    torch.manual_seed(0)
    model = build_encoder(name, in_chans=in_chans, seq_len=36, width=8)
    assert model.seq_len == 36 and model.in_chans == in_chans
    for steps in (36, 23):  # global pooling: other grid lengths run too
        x = torch.randn(4, in_chans, steps, requires_grad=True)
        features = model(x)
        assert features.shape == (4, model.out_dim)
        features.square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"expected {in_chans} series channels"):
        model(torch.randn(2, in_chans + 1, 36))


def test_series_encoder_shapes_and_sizes():
    cnn = build_encoder("cnn1d_small", in_chans=3, seq_len=36)
    assert isinstance(cnn, SeriesCNN) and cnn.out_dim == 64  # width 32 -> 2w, pooled globally
    assert build_encoder("cnn1d_small", in_chans=3, seq_len=36, positions=4).out_dim == 256
    res = build_encoder("resnet1d18", in_chans=3, seq_len=36)
    assert isinstance(res, ResNet1d) and res.out_dim == 512  # 8 x width 64, as ResNet-18
    assert 3.5e6 < count_params(res) < 4.5e6
    assert build_encoder("resnet1d18", in_chans=3, seq_len=36, width=16).out_dim == 128
    # Residual branches start at the identity, as the 2D ResNets.
    assert all(b.bn2.weight.abs().sum() == 0 for stage in res.stages for b in stage)
    assert all(isinstance(m, BatchNorm1d) for m in res.modules() if isinstance(m, nn.BatchNorm1d))


def test_series_encoders_take_seq_len_not_img_size():
    with pytest.raises(ValueError, match="cnn1d_small: a 1D series encoder needs seq_len"):
        build_encoder("cnn1d_small", in_chans=3)
    with pytest.raises(ValueError, match="takes seq_len, not img_size"):
        build_encoder("resnet1d18", in_chans=3, seq_len=36, img_size=36)
    with pytest.raises(ValueError, match="seq_len applies to 1D series encoders only"):
        build_encoder("resnet18", in_chans=3, img_size=32, seq_len=36)
    with pytest.raises(ValueError, match="unknown option.*pool.*known: grad_checkpointing"):
        build_encoder("cnn1d_small", in_chans=3, seq_len=36, pool="mean")
    with pytest.raises(ValueError, match="view 'series': missing seq_len"):
        build_model({**PIMC_VIEWS, "series": {"encoder": "cnn1d_small", "in_chans": 3}}, HEAD)
    with pytest.raises(ValueError, match="view 'series': .*takes seq_len, not img_size"):
        build_model(
            {"series": {"encoder": "cnn1d_small", "in_chans": 3, "seq_len": 36, "img_size": 36}},
            HEAD,
        )


@pytest.mark.parametrize("chans", [3, 1])  # 1: plots and series of NDVI alone
def test_plot_and_series_towers_without_a_crop(chans):
    views = {
        "rp": {"encoder": "resnet18", "in_chans": chans, "img_size": 36, "width": 8},
        "series": {"encoder": "cnn1d_small", "in_chans": chans, "seq_len": 36, "width": 8},
    }
    # A structured config carries img_size: None beside seq_len.
    cfg = OmegaConf.create({"views": {**views, "series": {**views["series"], "img_size": None}}})
    model = build_model(cfg.views, HEAD, grad_checkpointing=True)  # accepted by the 1D CNN
    out = model({"rp": torch.randn(4, chans, 36, 36), "series": torch.randn(4, chans, 36)})
    assert out["rp"].shape == out["series"].shape == (4, 16)
    assert torch.allclose(out["series"].norm(dim=1), torch.ones(4))
    expected = sum(
        count_flops(model.encoder(v)) + count_flops(model.head(v)) for v in ("rp", "series")
    )
    assert count_flops(model) == expected
    assert measured_flops(lambda: model.encode("series", torch.randn(1, chans, 36))) == (
        count_flops("cnn1d_small", in_chans=chans, seq_len=36, width=8)
    )


@pytest.mark.parametrize(
    ("name", "kw", "steps"),
    [("cnn1d_small", {}, 36), ("cnn1d_small", {"positions": 4}, 41), ("resnet1d18", {}, 36),
     ("resnet1d18", {"width": 16}, 23)],
)  # fmt: skip
def test_series_flops_agree_with_torch_flop_counter(name, kw, steps):
    model = build_encoder(name, in_chans=3, seq_len=steps, **kw)
    assert measured_flops(lambda: model(torch.randn(1, 3, steps))) == count_flops(model)
    assert count_flops(name, in_chans=3, seq_len=steps, batch=5, **kw) == 5 * count_flops(model)


def test_series_encoder_runs_with_bf16_weights_and_float32_statistics():
    # DeepSpeed bf16 casts parameters, not buffers (models/norm.py).
    model = build_encoder("resnet1d18", in_chans=3, seq_len=36, width=8)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    out = model.train()(torch.randn(4, 3, 36, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_series_encoder_weights_round_trip(tmp_path):
    views = {
        "rp": {"encoder": "resnet18", "in_chans": 1, "img_size": 36, "width": 8},
        "series": {"encoder": "resnet1d18", "in_chans": 1, "seq_len": 36, "width": 8},
    }
    model = build_model(views, HEAD)
    path = tmp_path / "encoders.safetensors"
    save_encoder_weights(export_encoder_state(model), path)
    fresh = build_encoder("resnet1d18", in_chans=1, seq_len=36, width=8)
    load_encoder_weights(fresh, path, view="series")
    x = torch.randn(2, 1, 36)
    assert torch.equal(fresh.eval()(x), model.encoder("series").eval()(x))


def test_the_downstream_cnn1d_baseline_is_the_series_encoder():
    # One 1D CNN: eval's raw-series baseline (protocol cnn1d) is cnn1d_small at 4 positions.
    from pimc_dist.eval import downstream

    assert downstream.SeriesCNN is SeriesCNN and not hasattr(downstream, "CNN1D")
