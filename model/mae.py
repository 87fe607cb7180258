"""The masked autoencoder: SupMAE (classification branch on) and MAE (branch off) in one implementation.

Weights are interchangeable with the official MAE and SupMAE releases: the state_dict has the same keys and shapes
(`patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.N.*`, `norm.*`, `decoder_embed.*`, `mask_token`,
`decoder_pos_embed`, `decoder_blocks.N.*`, `decoder_norm.*`, `decoder_pred.*`, `cls_head.{0,1,3}.*`).

Where this differs from the original code (same results, less work):
  * images arrive NHWC (uint8 straight from DALI, or float) and are normalised inside the model;
  * only the kept 25% of the patches are gathered and embedded (patch embedding = one matmul on (p, q, c) rows,
    equal to the original stride-p convolution followed by the gather);
  * the masking stages can run as fused Triton kernels (`fused_masking`), see model/masking.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from model.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, pixel_mean_std
from model.flops import FlopBreakdown, forward_flops
from model.masking import random_masking
from model.masking_ops import masking_ops
from model.pos_embed import sincos_pos_embed_2d

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAEOutput", "MaskedAutoencoderViT", "PatchEmbed"]


class MAEOutput(NamedTuple):
    """What one forward pass returns (a NamedTuple so torch.compile traces it as is)."""

    loss: Tensor  # () total: rec_loss + cls_loss_ratio * cls_loss (rec_loss alone for MAE / no labels)
    rec_loss: Tensor  # () MSE on masked patches
    cls_loss: Tensor | None  # () CrossEntropy(logits / temperature, labels), unweighted; None for MAE / no labels
    pred: Tensor  # (N, L, p*p*C) reconstruction of every patch, in the target's (normalised) space
    mask: Tensor  # (N, L) float, 1 = masked
    logits: Tensor | None  # (N, num_classes) from the classification branch; None for MAE


class PatchEmbed(nn.Module):
    """Conv2d(C, D, p, stride=p) parameters (`proj.*`, as timm / MAE) applied as a matmul on patch rows.

    A (p, q, c)-ordered patch row is exactly what an NHWC image stores for that patch, so the embedding consumes
    NHWC pixels without transposing the image, and only the kept patches are embedded.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def row_weight(self) -> Tensor:
        """(D, p*p*C) weight in (p, q, c) column order."""
        w = self.proj.weight
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def forward(self, rows: Tensor) -> Tensor:
        """(N, K, p*p*C) -> (N, K, D)."""
        return F.linear(rows, self.row_weight(), self.proj.bias)


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        norm = functools.partial(nn.LayerNorm, eps=cfg.norm_eps)
        num_patches = cfg.num_patches

        # Encoder
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.depth)
        )
        self.norm = norm(cfg.embed_dim)

        # Decoder
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, cfg.decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = norm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)

        # Classification branch (SupMAE)
        self.cls_head: nn.Sequential | None = None
        if cfg.cls_branch:
            self.cls_head = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.cls_hidden),
                nn.BatchNorm1d(cfg.cls_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(cfg.cls_hidden, cfg.num_classes),
            )

        # uint8 pixels -> normalised: x * scale + shift == (x / 255 - mean) / std. Not saved (not in the releases).
        mean, std = (torch.tensor(v) for v in pixel_mean_std(cfg.in_chans))
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """The official MAE / SupMAE initialisation (`initialize_weights`), drawing from the global RNG in the same
        order, so that a seeded model equals the official one tensor for tensor: the modules' own constructors
        draw first (in registration order), then the sin-cos tables, xavier-uniform on the patch embedding's
        weight viewed as (D, p*p*C), N(0, 0.02) on cls_token then mask_token, and `apply` order over the modules:
        xavier-uniform weights and zero biases for every Linear, ones / zeros for every LayerNorm. The patch
        embedding's bias keeps Conv2d's default initialisation (uniform in +-1/sqrt(p*p*C)), as in the original."""
        cfg = self.cfg
        self.pos_embed.data.copy_(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(cfg.decoder_embed_dim, cfg.grid_size)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------------------------
    def as_nhwc(self, images: Tensor) -> Tensor:
        """Validate `images` and return an NHWC view (no copy).

        Accepts uint8 (N, S, S, C) as the data pipeline emits it, or float images already normalised, either
        (N, C, S, S) (NCHW, any memory format) or (N, S, S, C) (NHWC).
        """
        c, s = self.cfg.in_chans, self.cfg.img_size
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D (N, {s}, {s}, {c}) or (N, {c}, {s}, {s}), got shape {tuple(images.shape)}")
        shape = tuple(images.shape[1:])
        if images.dtype == torch.uint8:
            if shape != (s, s, c):
                raise ValueError(
                    f"uint8 images must be NHWC (N, {s}, {s}, {c}) as the data pipeline emits them, got "
                    f"{tuple(images.shape)}; check img_size / in_chans or the loader's output size"
                )
            return images
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        if shape == (c, s, s):
            return images.permute(0, 2, 3, 1)
        if shape == (s, s, c):
            return images
        raise ValueError(
            f"images of shape {tuple(images.shape)} do not match the model: expected (N, {c}, {s}, {s}) (NCHW) or "
            f"(N, {s}, {s}, {c}) (NHWC) for img_size={s}, in_chans={c}"
        )

    def _compute_dtype(self, images: Tensor) -> torch.dtype:
        dev = images.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return torch.float32 if images.dtype == torch.uint8 else images.dtype

    def forward_encoder(self, images: Tensor, ids_keep: Tensor, ops=None) -> Tensor:
        """NHWC images (N, H, W, C) + ids_keep (N, K) -> normalised latent tokens (N, 1+K, D), cls first."""
        ops = ops or masking_ops(self.cfg.fused_masking, images.device)
        rows = ops.gather_visible_patches(
            images, ids_keep, self.cfg.patch_size, self.pixel_scale, self.pixel_shift, self._compute_dtype(images)
        )
        x = self.patch_embed(rows) + self.pos_embed[0, 1:][ids_keep]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: Tensor, ids_keep: Tensor, ops=None) -> Tensor:
        """latent (N, 1+K, D) -> predicted patch rows (N, L, p*p*C)."""
        ops = ops or masking_ops(self.cfg.fused_masking, latent.device)
        x = self.decoder_embed(latent)
        x = ops.unshuffle_decoder_tokens(x, ids_keep, self.mask_token, self.decoder_pos_embed)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:])

    def forward_features(self, latent: Tensor) -> Tensor:
        """Pooled feature (N, D): mean of the patch tokens (global pool) or the cls token."""
        return latent[:, 1:].mean(dim=1) if self.cfg.global_pool else latent[:, 0]

    def _check_labels(self, labels: Tensor, n: int) -> None:
        if labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an int64 tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        # A value check needs the values on the host: free on CPU; on GPUs it would sync every step, so there the
        # trainer checks the data set's class count against num_classes once at start-up instead. Skipped while
        # torch.compile traces (a data-dependent branch would break the graph).
        if labels.device.type == "cpu" and n and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.cfg.num_classes:
                raise ValueError(
                    f"labels out of range: found values in [{lo}, {hi}] but the model has num_classes="
                    f"{self.cfg.num_classes}; set --num-classes to the data set's class count"
                )

    def forward(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        mask_ratio: float = 0.75,
        noise: Tensor | None = None,
    ) -> MAEOutput:
        """images (see `as_nhwc`), labels (N,) int64 or None, noise (N, L) fixes the masking when given."""
        x = self.as_nhwc(images)
        n, cfg = x.shape[0], self.cfg
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        num_keep = cfg.num_visible(mask_ratio)
        if num_keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {cfg.num_patches}; lower it")
        if noise is None:
            noise = torch.rand(n, cfg.num_patches, device=x.device)
        elif noise.shape != (n, cfg.num_patches):
            raise ValueError(f"noise must have shape ({n}, {cfg.num_patches}), got {tuple(noise.shape)}")
        if labels is not None:
            self._check_labels(labels, n)

        ops = masking_ops(cfg.fused_masking, x.device)
        ids_keep, mask = random_masking(noise, num_keep)
        latent = self.forward_encoder(x, ids_keep, ops)
        pred = self.forward_decoder(latent, ids_keep, ops)
        rec_loss = ops.masked_patch_loss(
            pred, x, mask, cfg.patch_size, cfg.norm_pix_loss, self.pixel_scale, self.pixel_shift
        )

        logits = cls_loss = None
        loss = rec_loss
        if self.cls_head is not None:
            logits = self.cls_head(self.forward_features(latent))
            if labels is not None:
                cls_loss = F.cross_entropy(logits.float() / cfg.temperature, labels)
                loss = rec_loss + cfg.cls_loss_ratio * cls_loss
        return MAEOutput(loss, rec_loss, cls_loss, pred, mask, logits)

    # ------------------------------------------------------------------------------------------------------------
    def flops_breakdown(self, mask_ratio: float = 0.75) -> FlopBreakdown:
        return forward_flops(self.cfg, mask_ratio)

    def flops_per_image(self, mask_ratio: float = 0.75) -> int:
        """Analytic forward FLOPs per image (matmuls and attention; 1 multiply-add = 2 FLOPs)."""
        return forward_flops(self.cfg, mask_ratio).total

    def train_flops_per_image(self, mask_ratio: float = 0.75) -> int:
        """Forward + backward FLOPs per trained image (backward = 2x forward, the usual accounting)."""
        return 3 * self.flops_per_image(mask_ratio)
