"""Weights in and out: original MAE / SupMAE `.pth` files, timm's layout (`.safetensors`, hub-style folders), and
export of the encoder to timm's ViT.

Loading is safe (`weights_only=True`, or safetensors); the original releases store `{"model": state_dict, ...}` and
some also an `argparse.Namespace` of their arguments, which is allow-listed for unpickling (it holds plain values
only).

The encoder's final LayerNorm comes in two layouts: `norm.*` (per token: pre-training, MAE's pre-trained releases,
timm's default `global_pool="token"`) and `fc_norm.*` (after average pooling: MAE's / SupMAE's *fine-tuned*
releases, which have no `norm.*`). `final_norm_layout` tells them apart.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import ModelConfig, pixel_mean_std

# Encoder parameters shared with timm's VisionTransformer (same names, same shapes).
_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.", "fc_norm.")
_ENCODER_KEYS = ("cls_token", "pos_embed")
EVAL_CROP_PCT = 0.875  # MAE's evaluation transform: resize the shorter side to 256, centre crop 224 (as the loaders)
TIMM_CONFIG_NAME = "config.json"
TIMM_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # what timm's "local-dir:" loader looks for first


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state_dict stored in `path`: an original `.pth` ({"model": ...}), this project's checkpoint
    ({"model": ..., "optimizer": ...}), a bare state_dict, or a `.safetensors` file."""
    if str(path).endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found") from None
    except Exception as e:  # unpickling errors, truncated zip files
        raise ValueError(f"cannot read checkpoint {path}: {torch_load_problem(path, e)}") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no model state_dict (expected a dict with key 'model' or a state_dict)")
    # DDP / torch.compile wrappers prefix the keys; strip them so files from any trainer load.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def torch_load_problem(path: str | os.PathLike, error: Exception) -> str:
    """One line saying why torch.load refused `path` (its own messages run over several lines, and for objects that
    weights-only loading refuses they advise weights_only=False, which would run code from the file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return str(e)
    if head != b"PK" and not head.startswith(b"\x80"):  # torch's zip format / a legacy pickle
        return "not a torch checkpoint file (neither torch's zip format nor a legacy pickle)"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return ("it holds Python objects besides tensors and plain values, which are never unpickled here (they "
                "could run code); save the state_dict alone ({'model': model.state_dict()})")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{first.rstrip('.')}. Is it a complete torch checkpoint file?"


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


def _load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}. Is it a complete .safetensors file?") from e


def final_norm_layout(state: dict[str, Tensor]) -> str:
    """"norm" (per-token final norm) or "fc_norm" (norm after average pooling, no per-token norm: fine-tuned)."""
    return "fc_norm" if "fc_norm.weight" in state and "norm.weight" not in state else "norm"


def export_timm_encoder(state: dict[str, Tensor], global_pool: str = "avg") -> dict[str, Tensor]:
    """Encoder weights as a timm `VisionTransformer` state_dict (no classifier).

    With `global_pool="avg"` timm normalises after pooling (`fc_norm`) instead of per token (`norm`), as MAE's
    fine-tuning does; the pre-trained final norm initialises it. With `global_pool="token"` it stays `norm`.
    Weights in the fine-tuned layout (`fc_norm`, no `norm`) keep their `fc_norm`; they only fit average pooling.
    """
    if final_norm_layout(state) == "fc_norm" and global_pool != "avg":
        raise ValueError("these weights were fine-tuned with global average pooling (their final norm is fc_norm, "
                         "applied after pooling; there is no per-token norm), so they cannot give a cls-token "
                         "feature: use average pooling (--feature avg / --global-pool avg / --pool avg)")
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


# ----------------------------------------------------------------------------------------------------------------
# timm's hub layout: OUT/config.json + OUT/model.safetensors, read by timm.create_model("local-dir:OUT")

# timm's ViT architectures for the encoder sizes of model.config.ENCODER_SIZES, with what their factory functions
# set besides (embed_dim, depth, num_heads) (timm.models.vision_transformer); the rest is VisionTransformer's default.
_TIMM_ARCHS: dict[tuple[int, int, int], tuple[str, dict[str, Any]]] = {
    (192, 12, 3): ("vit_tiny_patch16_224", {"patch_size": 16}),
    (384, 12, 6): ("vit_small_patch16_224", {"patch_size": 16}),
    (768, 12, 12): ("vit_base_patch16_224", {"patch_size": 16}),
    (1024, 24, 16): ("vit_large_patch16_224", {"patch_size": 16}),
    (1280, 32, 16): ("vit_huge_patch14_224", {"patch_size": 14}),
}
_TIMM_VIT_DEFAULTS: dict[str, Any] = {"img_size": 224, "in_chans": 3, "mlp_ratio": 4.0, "qkv_bias": True,
                                      "global_pool": "token", "fc_norm": None}
TIMM_POOLS = ("token", "avg")
_TIMM_NORM_EPS = 1e-6  # timm's ViT LayerNorm


def timm_model_args(cfg: ModelConfig, pool: str = "token") -> tuple[str, dict[str, Any]]:
    """(timm architecture, the VisionTransformer arguments that differ from its defaults) of `cfg`'s encoder.

    pool "token" (timm's default): the cls token after the per-token norm. "avg": the mean of the normed patch
    tokens (`fc_norm=False`: the norm stays per token), the feature the pre-trained encoder computes for SupMAE's
    classification branch and the k-NN protocol. Both keep the final norm as `norm.*`, so either file loads into
    timm's defaults.
    """
    if pool not in TIMM_POOLS:
        raise ValueError(f"pool must be one of {TIMM_POOLS}, got {pool!r}")
    if cfg.norm_eps != _TIMM_NORM_EPS:
        raise ValueError(f"timm's ViT normalises with eps {_TIMM_NORM_EPS}; this encoder uses {cfg.norm_eps}")
    arch, fixed = _TIMM_ARCHS.get((cfg.embed_dim, cfg.depth, cfg.num_heads),
                                  ("vit_base_patch16_224", {"patch_size": 16, "embed_dim": 768, "depth": 12,
                                                            "num_heads": 12}))
    wanted = {**timm_vit_kwargs(cfg, num_classes=0, global_pool=pool), "fc_norm": False if pool == "avg" else None}
    wanted.pop("num_classes")
    defaults = {**_TIMM_VIT_DEFAULTS, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                **fixed}
    return arch, {k: v for k, v in wanted.items() if defaults.get(k) != v}


def timm_hub_config(cfg: ModelConfig, pool: str = "token", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` of a timm hub-style folder holding `cfg`'s encoder (no head): architecture, the model
    arguments that differ from the architecture's, and the pretrained_cfg (normalisation, input size, bicubic
    interpolation, crop_pct, num_classes 0). `extra` is stored under "supmae_fast" (timm ignores it)."""
    arch, model_args = timm_model_args(cfg, pool)
    mean, std = pixel_mean_std(cfg.in_chans)
    config: dict[str, Any] = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": cfg.embed_dim,
        "global_pool": pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "supmae_fast",
            "custom_load": False,
            "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": EVAL_CROP_PCT,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if extra:
        config["supmae_fast"] = extra
    return config


def read_timm_folder(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(weights, ModelConfig fields the shapes cannot tell: num_heads) of a timm hub-style folder (config.json +
    model.safetensors or pytorch_model.bin) holding a plain ViT normalised like this model family."""
    folder = Path(folder)
    try:
        config = json.loads((folder / TIMM_CONFIG_NAME).read_text())
        arch = config["architecture"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / TIMM_CONFIG_NAME}: not a timm model config ({e})") from e
    weights = next((folder / n for n in TIMM_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise ValueError(f"{folder}: a timm folder needs {' or '.join(TIMM_WEIGHT_NAMES)} beside its config.json")
    pcfg = config.get("pretrained_cfg", {})
    args = dict(config.get("model_args") or {})
    in_chans = int(args.get("in_chans", (pcfg.get("input_size") or [3])[0]))
    mean, std = pixel_mean_std(in_chans)
    for name, want in (("mean", mean), ("std", std)):
        got = pcfg.get(name, want)
        if len(got) != len(want) or any(abs(a - b) > 1e-4 for a, b in zip(got, want, strict=False)):
            raise ValueError(f"{folder}: its pixels are normalised with {name} {list(got)}, this project's encoders "
                             f"with {list(want)}; features would be wrong, so it is not loaded")
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    except Exception as e:  # unknown architecture or arguments this timm does not take
        raise ValueError(f"{folder}: timm cannot build {arch} with {args}: {e}") from e
    if type(vit) is not VisionTransformer or vit.num_prefix_tokens != 1 or not vit.has_class_token:
        raise ValueError(f"{folder}: {arch} is not a plain ViT with one cls token (the MAE / SupMAE encoder)")
    return load_checkpoint(weights), {"num_heads": vit.blocks[0].attn.num_heads}


def is_timm_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / TIMM_CONFIG_NAME).is_file() and any((Path(path) / n).is_file() for n in TIMM_WEIGHT_NAMES)
