"""Reconstructions as pictures, as MAE's visualisation shows them: original / masked / reconstruction /
reconstruction with the visible patches pasted back.

    rec = reconstruct(model, images_uint8_nhwc, mask_ratio=0.75, noise=noise)   # four (N, S, S, C) uint8 images
    grid = reconstruction_grid(rec)                                             # (H, W, C) uint8: a row per image

A model trained with `norm_pix_loss` predicts every patch standardised by its own mean and variance; the
prediction is mapped back to pixels with the statistics of the same patch of the input (`patch_targets`' mean and
unbiased variance), then the ImageNet normalisation is undone. Masked patches show the dataset mean (0 in
normalised space), as in MAE's notebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.mae import MaskedAutoencoderViT
from model.masking import normalize_rows, patchify_nhwc

PANEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
NORM_PIX_EPS = 1.0e-6  # as in the loss (model/masking.py patch_targets)


@dataclass(frozen=True)
class Reconstruction:
    """Four views of the same images, each (N, S, S, C) uint8, and the mask (N, L) float (1 = masked)."""

    original: Tensor
    masked: Tensor
    reconstruction: Tensor
    pasted: Tensor
    mask: Tensor
    mask_ratio: float

    def panels(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """In PANEL_TITLES order."""
        return self.original, self.masked, self.reconstruction, self.pasted


def unpatchify_nhwc(rows: Tensor, patch_size: int, channels: int) -> Tensor:
    """(N, L, p*p*C) patch rows in (p, q, c) order -> (N, H, W, C) images (inverse of `patchify_nhwc`)."""
    n, num_patches, _ = rows.shape
    g = math.isqrt(num_patches)
    p = patch_size
    x = rows.reshape(n, g, g, p, p, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, channels)


def predictions_to_normalised(pred: Tensor, target_rows: Tensor, norm_pix_loss: bool) -> Tensor:
    """Predicted patch rows (N, L, P) -> rows in normalised pixel space: a norm-pix prediction is scaled by the
    standard deviation and shifted by the mean of the same patch of `target_rows` (the normalised input)."""
    pred = pred.float()
    if not norm_pix_loss:
        return pred
    mean = target_rows.mean(dim=-1, keepdim=True)
    var = target_rows.var(dim=-1, keepdim=True)  # unbiased, as the loss
    return pred * (var + NORM_PIX_EPS) ** 0.5 + mean


def to_uint8(normalised: Tensor, pixel_scale: Tensor, pixel_shift: Tensor) -> Tensor:
    """Normalised (..., C) pixels -> uint8: the inverse of x * scale + shift (scale = 1 / (255 std),
    shift = -mean / std)."""
    return ((normalised - pixel_shift) / pixel_scale).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: Tensor, mask_ratio: float = 0.75,
                noise: Tensor | None = None) -> Reconstruction:
    """The four views of uint8 NHWC `images` (N, S, S, C) (on the model's device) under the masking that `noise`
    (N, L) fixes (random when None). Runs the model in eval mode (BatchNorm statistics untouched), then restores
    its mode; touches no global random state when `noise` is given."""
    if images.dtype != torch.uint8:
        raise ValueError(f"reconstruct takes uint8 NHWC images as the loaders emit them, got {images.dtype}")
    cfg = model.cfg
    x = model.as_nhwc(images)
    was_training = model.training
    model.eval()
    try:
        out = model(x, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    scale, shift = model.pixel_scale, model.pixel_shift
    target = normalize_rows(patchify_nhwc(x, cfg.patch_size), scale, shift)  # (N, L, P) normalised
    pred = predictions_to_normalised(out.pred, target, cfg.norm_pix_loss)
    mask = out.mask[..., None]  # (N, L, 1)
    c = cfg.in_chans
    views = [target, target * (1 - mask), pred, target * (1 - mask) + pred * mask]
    original, masked, recon, pasted = (to_uint8(unpatchify_nhwc(v, cfg.patch_size, c), scale, shift) for v in views)
    return Reconstruction(original, masked, recon, pasted, out.mask, mask_ratio)


def reconstruction_grid(rec: Reconstruction, pad: int = 2, min_panel: int = 0, background: int = 255) -> np.ndarray:
    """(H, W, C) uint8 picture: one row per image, the four views left to right (PANEL_TITLES), `pad` pixels of
    `background` between panels and around them. Panels smaller than `min_panel` pixels are enlarged by an integer
    factor (nearest neighbour, so each pixel stays a visible square)."""
    panels = [p.cpu().numpy() for p in rec.panels()]
    n, s, _, c = panels[0].shape
    k = max(1, math.ceil(min_panel / s)) if min_panel else 1
    if k > 1:
        panels = [p.repeat(k, axis=1).repeat(k, axis=2) for p in panels]
    size = s * k
    cols = len(panels)
    grid = np.full((pad + n * (size + pad), pad + cols * (size + pad), c), background, np.uint8)
    for row in range(n):
        for col, p in enumerate(panels):
            y, x = pad + row * (size + pad), pad + col * (size + pad)
            grid[y : y + size, x : x + size] = p[row]
    return grid
