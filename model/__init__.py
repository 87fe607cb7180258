"""The SupMAE / MAE model family.

    model = create_model("supmae_vit_base_patch16")                   # ViT-B/16, decoder d1b, classification branch
    model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, num_classes=10)
    out = model(images_uint8_nhwc, labels)                             # MAEOutput(loss, rec_loss, cls_loss, ...)
"""

from __future__ import annotations

from typing import Any

from model.checkpoint import export_timm_encoder, infer_config, load_checkpoint, timm_vit_kwargs
from model.config import MODEL_PRESETS, ModelConfig, model_config
from model.mae import MAEOutput, MaskedAutoencoderViT


def create_model(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """A freshly initialised model from the preset `name` (see `list_models()`) with `overrides` applied."""
    return MaskedAutoencoderViT(model_config(name, **overrides))


def list_models() -> list[str]:
    return sorted(MODEL_PRESETS)


__all__ = [
    "MAEOutput", "MODEL_PRESETS", "MaskedAutoencoderViT", "ModelConfig", "create_model", "export_timm_encoder",
    "infer_config", "list_models", "load_checkpoint", "model_config", "timm_vit_kwargs",
]
