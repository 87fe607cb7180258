"""Masked reconstruction loss with the target computed on the fly from the NHWC pixels.

    pred      (N, L, P) fp16 / bf16 / fp32, P = p*p*C in (p, q, c) order, any strides
    images    (N, H, W, C) uint8 / fp16 / bf16 / fp32 NHWC view, any strides (uint8 normalised: x * scale[c] + shift[c])
    mask      (N, L) float (1 = masked); the loss weights patch l by mask[n, l]
    loss      () fp32 = sum_{n,l} mask * mean_P (pred - target)^2 / sum_{n,l} mask

target = the patch's normalised pixels, standardised per patch when norm_pix_loss ((t - mean) / sqrt(var + 1e-6),
unbiased var), exactly as `model.masking.patch_targets`; it is never materialised.

Forward: each program handles BLOCK_M patches, reads only the patches with a non-zero mask weight (pred row and
pixels), and writes one (weighted sum, weight sum) pair; a one-program second stage adds the pairs in a fixed order,
so the loss is deterministic (no atomics). Backward recomputes the target the same way and writes
grad_pred = grad * mask / sum(mask) * 2/P * (pred - target) in pred's dtype (zeros for unmasked patches).

Difference from the reference, by design: patches with mask 0 are not read, so a NaN/Inf in such a patch of pred
does not turn the loss into NaN (in the reference 0 * NaN does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.kernel_tiles import patch_tile
from model.kernels._common import (
    FLOAT_DTYPES,
    check_device,
    check_dtype,
    check_images,
    check_pixel_norm,
    device_context,
    fail,
    load_patch_tile,
    patch_row_offsets,
    rows_contiguous,
)

NORM_PIX_EPS = 1.0e-6  # as MAE
FINISH_BLOCK = 1024


@triton.jit
def _patch_error(pred_ptr, img_ptr, mask_ptr, scale_ptr, shift_ptr, pid,
                 NL, L, grid_w, s_pn, s_pl, s_pp, s_n, s_h, s_w, s_c, s_mn, s_ml,
                 PATCH: tl.constexpr, C: tl.constexpr, PATCH_PAD: tl.constexpr, PC_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, IS_U8: tl.constexpr, ROW_CONTIG: tl.constexpr, NORM_PIX: tl.constexpr,
                 EPS: tl.constexpr):
    """For BLOCK_M patches: (pred - target) tile (BLOCK_M, PATCH_PAD*PC_PAD) fp32 (0 in unused lanes and in patches
    not read), mask weights (BLOCK_M,), flat patch indices (BLOCK_M,) and which of them exist."""
    P: tl.constexpr = PATCH * PATCH * C
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < NL
    n = r // L
    pos = r % L
    w = tl.load(mask_ptr + n.to(tl.int64) * s_mn + pos * s_ml, mask=row_ok, other=0.0).to(tl.float32)
    load_ok = row_ok & (w != 0.0)
    t = load_patch_tile(img_ptr, n, pos // grid_w, pos % grid_w, load_ok, s_n, s_h, s_w, s_c, scale_ptr, shift_ptr,
                        PATCH, C, PATCH_PAD, PC_PAD, IS_U8, ROW_CONTIG)
    lane_off, lane_ok = patch_row_offsets(PATCH, C, PATCH_PAD, PC_PAD)
    ok = load_ok[:, None] & lane_ok[None, :]
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / P
        dev = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(dev * dev, axis=1) / (P - 1)  # unbiased, as torch.var
        t = dev / tl.sqrt_rn(var + EPS)[:, None]
    pred = tl.load(pred_ptr + (n.to(tl.int64) * s_pn + pos * s_pl)[:, None] + (lane_off * s_pp)[None, :],
                   mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, pred - t, 0.0), w, r, row_ok


@triton.jit
def _loss_fwd_kernel(pred_ptr, img_ptr, mask_ptr, scale_ptr, shift_ptr, part_num_ptr, part_den_ptr,
                     NL, L, grid_w, s_pn, s_pl, s_pp, s_n, s_h, s_w, s_c, s_mn, s_ml,
                     PATCH: tl.constexpr, C: tl.constexpr, PATCH_PAD: tl.constexpr, PC_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, IS_U8: tl.constexpr, ROW_CONTIG: tl.constexpr, NORM_PIX: tl.constexpr,
                     EPS: tl.constexpr):
    pid = tl.program_id(0)
    err, w, _, _ = _patch_error(pred_ptr, img_ptr, mask_ptr, scale_ptr, shift_ptr, pid,
                                NL, L, grid_w, s_pn, s_pl, s_pp, s_n, s_h, s_w, s_c, s_mn, s_ml,
                                PATCH, C, PATCH_PAD, PC_PAD, BLOCK_M, IS_U8, ROW_CONTIG, NORM_PIX, EPS)
    per_patch = tl.sum(err * err, axis=1) / (PATCH * PATCH * C)
    tl.store(part_num_ptr + pid, tl.sum(per_patch * w, axis=0))
    tl.store(part_den_ptr + pid, tl.sum(w, axis=0))


@triton.jit
def _loss_finish_kernel(part_num_ptr, part_den_ptr, loss_ptr, den_ptr, num_parts, BLOCK: tl.constexpr):
    # Second stage: one program adds the per-program partials in a fixed order (deterministic).
    acc_num = tl.zeros([BLOCK], dtype=tl.float32)
    acc_den = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, num_parts, BLOCK):
        o = s + tl.arange(0, BLOCK)
        acc_num += tl.load(part_num_ptr + o, mask=o < num_parts, other=0.0)
        acc_den += tl.load(part_den_ptr + o, mask=o < num_parts, other=0.0)
    num = tl.sum(acc_num, axis=0)
    den = tl.sum(acc_den, axis=0)
    tl.store(loss_ptr, num / den)
    tl.store(den_ptr, den)


@triton.jit
def _loss_bwd_kernel(pred_ptr, img_ptr, mask_ptr, scale_ptr, shift_ptr, grad_loss_ptr, den_ptr, grad_ptr,
                     NL, L, grid_w, s_pn, s_pl, s_pp, s_n, s_h, s_w, s_c, s_mn, s_ml,
                     PATCH: tl.constexpr, C: tl.constexpr, PATCH_PAD: tl.constexpr, PC_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, IS_U8: tl.constexpr, ROW_CONTIG: tl.constexpr, NORM_PIX: tl.constexpr,
                     EPS: tl.constexpr):
    pid = tl.program_id(0)
    err, w, r, row_ok = _patch_error(pred_ptr, img_ptr, mask_ptr, scale_ptr, shift_ptr, pid,
                                     NL, L, grid_w, s_pn, s_pl, s_pp, s_n, s_h, s_w, s_c, s_mn, s_ml,
                                     PATCH, C, PATCH_PAD, PC_PAD, BLOCK_M, IS_U8, ROW_CONTIG, NORM_PIX, EPS)
    # d loss / d pred = grad * w / sum(w) * 2 / P * (pred - target); unread patches have err = 0 -> zeros.
    coef = tl.load(grad_loss_ptr).to(tl.float32) / tl.load(den_ptr) * (2.0 / (PATCH * PATCH * C)) * w
    lane_off, lane_ok = patch_row_offsets(PATCH, C, PATCH_PAD, PC_PAD)
    off = r.to(tl.int64)[:, None] * (PATCH * PATCH * C) + lane_off[None, :]
    tl.store(grad_ptr + off, (coef[:, None] * err).to(grad_ptr.dtype.element_ty),
             mask=row_ok[:, None] & lane_ok[None, :])


def _launch_args(pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix_loss: bool):
    n, num_patches, _ = pred.shape
    c = images.shape[3]
    patch_pad, pc_pad, block_m, num_warps = patch_tile(patch_size, c)
    sizes = (n * num_patches, num_patches, images.shape[2] // patch_size, *pred.stride(), *images.stride(), *mask.stride())
    meta = dict(PATCH=patch_size, C=c, PATCH_PAD=patch_pad, PC_PAD=pc_pad, BLOCK_M=block_m,
                IS_U8=images.dtype == torch.uint8, ROW_CONTIG=rows_contiguous(images), NORM_PIX=norm_pix_loss,
                EPS=NORM_PIX_EPS, num_warps=num_warps)
    return triton.cdiv(n * num_patches, block_m), sizes, meta


@torch.library.custom_op("supmae::masked_patch_loss", mutates_args=())
def _loss_op(pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix_loss: bool,
             pixel_scale: Tensor, pixel_shift: Tensor) -> tuple[Tensor, Tensor]:
    """-> (loss () fp32, sum of mask weights () fp32, kept for the backward)."""
    programs, sizes, meta = _launch_args(pred, images, mask, patch_size, norm_pix_loss)
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    den = torch.empty((), dtype=torch.float32, device=pred.device)
    partials = torch.empty((2, max(programs, 1)), dtype=torch.float32, device=pred.device)
    with device_context(pred.device):
        if programs:
            _loss_fwd_kernel[(programs,)](pred, images, mask, pixel_scale, pixel_shift, partials[0], partials[1],
                                         *sizes, **meta)
        _loss_finish_kernel[(1,)](partials[0], partials[1], loss, den, programs, BLOCK=FINISH_BLOCK, num_warps=4)
    return loss, den


@_loss_op.register_fake
def _loss_fake(pred, images, mask, patch_size, norm_pix_loss, pixel_scale, pixel_shift):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("supmae::masked_patch_loss_backward", mutates_args=())
def _loss_bwd_op(grad_loss: Tensor, den: Tensor, pred: Tensor, images: Tensor, mask: Tensor, patch_size: int,
                 norm_pix_loss: bool, pixel_scale: Tensor, pixel_shift: Tensor) -> Tensor:
    """-> grad_pred (N, L, P) contiguous, pred's dtype."""
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    programs, sizes, meta = _launch_args(pred, images, mask, patch_size, norm_pix_loss)
    if programs:
        with device_context(pred.device):
            _loss_bwd_kernel[(programs,)](pred, images, mask, pixel_scale, pixel_shift, grad_loss, den, grad,
                                         *sizes, **meta)
    return grad


@_loss_bwd_op.register_fake
def _loss_bwd_fake(grad_loss, den, pred, images, mask, patch_size, norm_pix_loss, pixel_scale, pixel_shift):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, images, mask, patch_size, norm_pix_loss, pixel_scale, pixel_shift = inputs
    ctx.save_for_backward(pred, images, mask, pixel_scale, pixel_shift, output[1])
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_den):
    pred, images, mask, pixel_scale, pixel_shift, den = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_pred = _loss_bwd_op(grad_loss, den, pred, images, mask, ctx.patch_size, ctx.norm_pix_loss,
                                 pixel_scale, pixel_shift)
    return grad_pred, None, None, None, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def masked_patch_loss(
    pred: Tensor,
    images: Tensor,
    mask: Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    pixel_scale: Tensor,
    pixel_shift: Tensor,
) -> Tensor:
    """Fused twin of `model.masking.masked_patch_loss`: () fp32 loss (see module doc)."""
    op = "masked_patch_loss"
    n, h, w, c = check_images(op, images, patch_size)
    num_patches, patch_dim = (h // patch_size) * (w // patch_size), patch_size * patch_size * c
    if pred.dim() != 3 or pred.shape != (n, num_patches, patch_dim):
        fail(op, f"pred must have shape ({n}, {num_patches}, {patch_dim}) for {h}x{w}x{c} images with "
                 f"patch_size {patch_size}, got {tuple(pred.shape)}")
    check_dtype(op, "pred", pred, FLOAT_DTYPES)
    if mask.shape != (n, num_patches):
        fail(op, f"mask must have shape ({n}, {num_patches}), got {tuple(mask.shape)}")
    check_dtype(op, "mask", mask, FLOAT_DTYPES)
    if mask.requires_grad and torch.is_grad_enabled():
        fail(op, "mask requires grad; the fused loss treats the mask as constant")
    check_pixel_norm(op, pixel_scale, pixel_shift, c)
    check_device(op, pred=pred, images=images, mask=mask, pixel_scale=pixel_scale, pixel_shift=pixel_shift)
    if norm_pix_loss and patch_dim < 2:
        fail(op, "norm_pix_loss needs at least 2 values per patch (unbiased variance)")
    return _loss_op(pred, images, mask, patch_size, bool(norm_pix_loss), pixel_scale, pixel_shift)[0]
