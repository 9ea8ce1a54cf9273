"""Encoders (ResNet, ViT up to ~1B parameters, 1D CNN / ResNet for index series), projection
heads and the contrastive model.

Build everything by name from the config with `build_encoder`, `build_head` and
`build_model`; `count_flops` and `model_summary` report cost and size;
`export_encoder_state` / `load_encoder_weights` move encoder weights to
downstream jobs as safetensors; `load_view_weights` starts towers from a user's timm /
torchgeo weights files. Encoder names other than ours are timm models (`timm_encoders`).
"""

from pimc_dist.models.flops import count_flops
from pimc_dist.models.heads import ProjectionHead
from pimc_dist.models.norm import BatchNorm1d, BatchNorm2d
from pimc_dist.models.registry import (
    ENCODER_NAMES,
    build_encoder,
    build_head,
    build_model,
    compile_encoders,
    is_own_encoder,
)
from pimc_dist.models.resnet import ResNet
from pimc_dist.models.series import SERIES_ENCODERS, ResNet1d, SeriesCNN
from pimc_dist.models.summary import count_params, model_summary
from pimc_dist.models.timm_encoders import create_timm_model, timm_recipe
from pimc_dist.models.two_tower import ContrastiveModel
from pimc_dist.models.vit import VIT_SIZES, VisionTransformer, default_patch_size, resize_pos_embed
from pimc_dist.models.weights import (
    WeightsError,
    encoder_recipes,
    export_encoder_state,
    load_encoder_weights,
    load_pretrained_weights,
    load_view_weights,
    read_weights_file,
    save_encoder_weights,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "ENCODER_NAMES",
    "SERIES_ENCODERS",
    "VIT_SIZES",
    "ContrastiveModel",
    "ProjectionHead",
    "ResNet",
    "ResNet1d",
    "SeriesCNN",
    "VisionTransformer",
    "WeightsError",
    "build_encoder",
    "build_head",
    "build_model",
    "compile_encoders",
    "count_flops",
    "count_params",
    "create_timm_model",
    "encoder_recipes",
    "default_patch_size",
    "export_encoder_state",
    "is_own_encoder",
    "load_encoder_weights",
    "load_pretrained_weights",
    "load_view_weights",
    "model_summary",
    "read_weights_file",
    "resize_pos_embed",
    "save_encoder_weights",
    "timm_recipe",
]
