"""Model configuration and the named presets of the SupMAE / MAE family."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from model.kernel_tiles import fused_masking_problem

FUSED_MASKING_MODES = ("auto", "on", "off")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the model family applies to pixels in [0, 1]: ImageNet's for RGB, 0.5 otherwise."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


@dataclass(frozen=True)
class ModelConfig:
    """One masked autoencoder: ViT encoder, asymmetric decoder, optional classification branch (SupMAE).

    The defaults are SupMAE ViT-B/16 (decoder 1 block x 512-d, classification branch on).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 1
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    norm_pix_loss: bool = True
    # Classification branch (SupMAE): Linear(D, cls_hidden) - BatchNorm1d - ReLU - Linear(cls_hidden, num_classes)
    cls_branch: bool = True
    num_classes: int = 1000
    cls_hidden: int = 3072
    global_pool: bool = True
    cls_loss_ratio: float = 0.01
    temperature: float = 10.0
    # Fused Triton masking kernels: "auto" = on for CUDA inputs, off on CPU; "on"; "off" (reference path).
    fused_masking: str = "auto"

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                    "decoder_depth", "decoder_num_heads", "num_classes", "cls_hidden")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"model config: {name} must be a positive int, got {v!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model config: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for dim, heads, what in ((self.embed_dim, self.num_heads, "embed_dim/num_heads"),
                                 (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim/decoder_num_heads")):
            if dim % heads:
                raise ValueError(f"model config: {what} = {dim}/{heads} must divide evenly")
        # 2-D sin-cos position embeddings split the width into 4 sin/cos bands.
        for name in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, name) % 4:
                raise ValueError(f"model config: {name} must be a multiple of 4, got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            raise ValueError("model config: mlp_ratio and norm_eps must be positive")
        if self.cls_loss_ratio < 0 or self.temperature <= 0:
            raise ValueError(f"model config: cls_loss_ratio must be >= 0 and temperature > 0, "
                             f"got {self.cls_loss_ratio}, {self.temperature}")
        if self.fused_masking not in FUSED_MASKING_MODES:
            raise ValueError(f"model config: fused_masking must be one of {FUSED_MASKING_MODES}, got {self.fused_masking!r}")
        # "auto" is refused too: it runs the fused kernels on every GPU, where this would fail at the first step.
        problem = fused_masking_problem(self.patch_size, self.in_chans) if self.fused_masking != "off" else None
        if problem:
            raise ValueError(f"model config: patch_size {self.patch_size} with in_chans {self.in_chans} and "
                             f"fused_masking {self.fused_masking!r}: {problem}; use fused_masking 'off' "
                             "(--fused-masking off: the reference masking path serves any patch size)")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values per patch row, p*p*C, in (p, q, c) order (row within patch, column, channel)."""
        return self.patch_size**2 * self.in_chans

    def num_visible(self, mask_ratio: float) -> int:
        """Kept patches per sample, `int(L * (1 - mask_ratio))` as in MAE."""
        return int(self.num_patches * (1 - mask_ratio))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config: unknown fields {sorted(unknown)}")
        return cls(**d)


# Encoder sizes (embed_dim, depth, num_heads), as in ViT / DeiT / MAE.
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

# SupMAE: decoder 1 block x 512-d, classification branch (paper's `d1b`). MAE: decoder 8 blocks x 512-d, no branch.
FAMILIES: dict[str, dict[str, Any]] = {
    "supmae": {"decoder_depth": 1, "decoder_embed_dim": 512, "decoder_num_heads": 16, "cls_branch": True},
    "mae": {"decoder_depth": 8, "decoder_embed_dim": 512, "decoder_num_heads": 16, "cls_branch": False},
}


def _build_presets() -> dict[str, ModelConfig]:
    presets = {}
    for family, fam in FAMILIES.items():
        for size, (dim, depth, heads) in ENCODER_SIZES.items():
            presets[f"{family}_vit_{size}_patch16"] = ModelConfig(
                patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, **fam
            )
    return presets


MODEL_PRESETS: dict[str, ModelConfig] = _build_presets()


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` applied (any ModelConfig field), validated."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_PRESETS))}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)} for {name}; valid options: {sorted(known)}")
    return replace(MODEL_PRESETS[name], **overrides)
