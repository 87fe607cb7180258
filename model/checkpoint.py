"""Weights in and out: original MAE / SupMAE `.pth` files, and export of the encoder to timm's ViT.

Loading is safe (`weights_only=True`); the original releases store `{"model": state_dict, ...}` and some also an
`argparse.Namespace` of their arguments, which is allow-listed for unpickling (it holds plain values only).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import Tensor

from model.config import ModelConfig

# Encoder parameters shared with timm's VisionTransformer (same names, same shapes).
_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")
_ENCODER_KEYS = ("cls_token", "pos_embed")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state_dict stored in `path`: an original `.pth` ({"model": ...}), this project's checkpoint
    ({"model": ..., "optimizer": ...}) or a bare state_dict."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found") from None
    except Exception as e:  # unpickling errors, truncated zip files
        raise ValueError(f"cannot read checkpoint {path}: {e}. Is it a complete torch checkpoint file?") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no model state_dict (expected a dict with key 'model' or a state_dict)")
    # DDP / torch.compile wrappers prefix the keys; strip them so files from any trainer load.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def infer_config(state: dict[str, Tensor], **overrides: Any) -> ModelConfig:
    """The ModelConfig that produced `state` (sizes from tensor shapes; num_heads cannot be inferred from shapes,
    so the ViT convention of 64-d heads is assumed unless given in `overrides`)."""
    d = state["patch_embed.proj.weight"].shape[0]
    in_chans, patch = state["patch_embed.proj.weight"].shape[1], state["patch_embed.proj.weight"].shape[2]
    num_patches = state["pos_embed"].shape[1] - 1
    grid = int(round(num_patches**0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    dd = state["decoder_embed.weight"].shape[0]
    ddepth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    kw: dict[str, Any] = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=d, depth=depth,
        num_heads=max(1, d // 64), decoder_embed_dim=dd, decoder_depth=ddepth, decoder_num_heads=16,
        mlp_ratio=hidden / d, cls_branch="cls_head.0.weight" in state,
    )
    if kw["cls_branch"]:
        kw["cls_hidden"] = state["cls_head.0.weight"].shape[0]
        kw["num_classes"] = state["cls_head.3.weight"].shape[0]
    kw.update(overrides)
    return ModelConfig(**kw)


def export_timm_encoder(state: dict[str, Tensor], global_pool: str = "avg") -> dict[str, Tensor]:
    """Encoder weights as a timm `VisionTransformer` state_dict (no classifier).

    With `global_pool="avg"` timm normalises after pooling (`fc_norm`) instead of per token (`norm`), as MAE's
    fine-tuning does; the pre-trained final norm initialises it. With `global_pool="token"` it stays `norm`.
    """
    out = {}
    for k, v in state.items():
        if k in _ENCODER_KEYS or k.startswith(_ENCODER_PREFIXES):
            if k.startswith("norm.") and global_pool == "avg":
                k = "fc_norm." + k.removeprefix("norm.")
            out[k] = v.detach().clone()
    return out


def timm_vit_kwargs(cfg: ModelConfig, num_classes: int = 0, global_pool: str = "avg") -> dict[str, Any]:
    """Arguments for `timm.models.vision_transformer.VisionTransformer` matching the encoder of `cfg`."""
    return dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        num_classes=num_classes, global_pool=global_pool,
    )
