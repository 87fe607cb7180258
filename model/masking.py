"""Token masking: random per-sample masking and the three masking stages, in plain PyTorch (the reference path).

The three stages are the only non-matmul token shuffling an MAE step does, so they are the ones with fused Triton
twins in `model.kernels` (same signatures, same meaning). `model.masking_ops.masking_ops(mode, device)` picks one
of the two sets.

Layouts used throughout:
    images      (N, H, W, C) NHWC; any strides (an NCHW tensor permuted to NHWC is accepted as a view).
                uint8 (raw pixels, normalised on the fly with `pixel_scale`/`pixel_shift`) or float (already
                normalised).
    patch rows  (N, L, P), P = p*p*C in (p, q, c) order: row inside the patch, column, channel. This is MAE's
                `patchify` order, and also the order in which an NHWC image stores a patch's pixels.
    ids_keep    (N, K) int64 or int32 (the kernels accept both): kept patch indices, in masking order.
    mask        (N, L) float, 1 = masked (removed), 0 = kept.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_masking(noise: Tensor, num_keep: int) -> tuple[Tensor, Tensor]:
    """Per-sample random masking by argsort of `noise` (N, L): the `num_keep` smallest are kept.

    Returns ids_keep (N, K) int64 and mask (N, L) float32 (1 = masked), as MAE's `random_masking`.
    """
    ids_keep = torch.argsort(noise, dim=1)[:, :num_keep]
    mask = torch.ones(noise.shape, dtype=torch.float32, device=noise.device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


def patchify_nhwc(images: Tensor, patch_size: int) -> Tensor:
    """(N, H, W, C) -> (N, L, p*p*C) patch rows in (p, q, c) order."""
    n, h, w, c = images.shape
    p = patch_size
    x = images.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def normalize_rows(rows: Tensor, pixel_scale: Tensor, pixel_shift: Tensor) -> Tensor:
    """uint8 patch rows (..., p*p*C) -> float32 normalised pixels: x * scale[c] + shift[c].

    scale = 1 / (255 * std), shift = -mean / std, so the result equals (x / 255 - mean) / std.
    """
    c = pixel_scale.numel()
    shape = rows.shape
    x = rows.reshape(*shape[:-1], shape[-1] // c, c).float()
    return (x * pixel_scale + pixel_shift).reshape(shape)


def gather_visible_patches(
    images: Tensor,
    ids_keep: Tensor,
    patch_size: int,
    pixel_scale: Tensor,
    pixel_shift: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """Kept patches of NHWC `images` as rows (N, K, p*p*C) in `out_dtype`; uint8 input is normalised."""
    rows = patchify_nhwc(images, patch_size)
    rows = torch.gather(rows, 1, ids_keep[..., None].expand(-1, -1, rows.shape[-1]))
    if images.dtype == torch.uint8:
        rows = normalize_rows(rows, pixel_scale, pixel_shift)
    return rows.to(out_dtype)


def unshuffle_decoder_tokens(x: Tensor, ids_keep: Tensor, mask_token: Tensor, pos_embed: Tensor) -> Tensor:
    """Full decoder input (N, 1+L, D) from encoder tokens x (N, 1+K, D) (cls first).

    Kept tokens go back to their patch positions, every other position gets `mask_token` (1, 1, D), then the
    decoder position embedding `pos_embed` (1, 1+L, D) is added.
    """
    n, _, d = x.shape
    num_patches = pos_embed.shape[1] - 1
    full = mask_token.to(x.dtype).expand(n, num_patches, d)
    full = torch.scatter(full, 1, ids_keep[..., None].expand(-1, -1, d), x[:, 1:])
    return torch.cat([x[:, :1], full], dim=1) + pos_embed


def patch_targets(images: Tensor, patch_size: int, norm_pix_loss: bool, pixel_scale: Tensor,
                  pixel_shift: Tensor) -> Tensor:
    """Reconstruction targets (N, L, p*p*C) float32: normalised pixels, per-patch standardised if norm_pix_loss."""
    target = patchify_nhwc(images, patch_size)
    target = normalize_rows(target, pixel_scale, pixel_shift) if images.dtype == torch.uint8 else target.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_patch_loss(
    pred: Tensor,
    images: Tensor,
    mask: Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    pixel_scale: Tensor,
    pixel_shift: Tensor,
) -> Tensor:
    """MSE between pred (N, L, P) and the patch targets, mean per patch, mean over masked patches; fp32 scalar."""
    target = patch_targets(images, patch_size, norm_pix_loss, pixel_scale, pixel_shift)
    loss = (pred.float() - target).pow(2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()
