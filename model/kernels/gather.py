"""Visible-patch gather: NHWC pixels + kept patch indices -> patch rows for the patch-embedding matmul.

    images    (N, H, W, C) uint8 / fp16 / bf16 / fp32, NHWC view with any strides (read in place, never copied)
    ids_keep  (N, K) int32 or int64 patch indices (row-major over the (H/p, W/p) grid), distinct, in [0, L)
    rows      (N, K, p*p*C) `out_dtype`, contiguous, (p, q, c) order; uint8 is normalised: x * scale[c] + shift[c]

Only the kept patches' pixels are read (25% of the image at mask ratio 0.75), and each is read once and written once.
No gradient flows to pixels, so the op has no backward; it runs inside autograd with rows that require no grad.
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
    check_ids_keep,
    check_images,
    check_pixel_norm,
    device_context,
    fail,
    load_patch_tile,
    patch_row_offsets,
    rows_contiguous,
)


@triton.jit
def _gather_kernel(img_ptr, ids_ptr, out_ptr, scale_ptr, shift_ptr,
                   total_rows, K, L, grid_w,
                   s_n, s_h, s_w, s_c, s_idn, s_idk,
                   PATCH: tl.constexpr, C: tl.constexpr, PATCH_PAD: tl.constexpr, PC_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, IS_U8: tl.constexpr, ROW_CONTIG: tl.constexpr):
    # One program: BLOCK_M consecutive output rows r = n*K + k.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < total_rows
    n = r // K
    k = r % K
    patch = tl.load(ids_ptr + n.to(tl.int64) * s_idn + k * s_idk, mask=row_ok, other=0).to(tl.int32)
    # Out-of-range ids (a broken caller; CPU launchers reject them) give zero rows instead of stray reads.
    load_ok = row_ok & (patch >= 0) & (patch < L)
    x = load_patch_tile(img_ptr, n, patch // grid_w, patch % grid_w, load_ok, s_n, s_h, s_w, s_c,
                        scale_ptr, shift_ptr, PATCH, C, PATCH_PAD, PC_PAD, IS_U8, ROW_CONTIG)
    lane_off, lane_ok = patch_row_offsets(PATCH, C, PATCH_PAD, PC_PAD)
    off = r.to(tl.int64)[:, None] * (PATCH * PATCH * C) + lane_off[None, :]
    tl.store(out_ptr + off, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & lane_ok[None, :])


@torch.library.custom_op("supmae::gather_visible_patches", mutates_args=())
def _gather_op(images: Tensor, ids_keep: Tensor, patch_size: int, pixel_scale: Tensor, pixel_shift: Tensor,
               out_dtype: torch.dtype) -> Tensor:
    n, h, w, c = images.shape
    k = ids_keep.shape[1]
    out = torch.empty((n, k, patch_size * patch_size * c), dtype=out_dtype, device=images.device)
    if out.numel() == 0:
        return out
    patch_pad, pc_pad, block_m, num_warps = patch_tile(patch_size, c)
    grid_w = w // patch_size
    grid = (triton.cdiv(n * k, block_m),)
    with device_context(images.device):
        _gather_kernel[grid](
            images, ids_keep, out, pixel_scale, pixel_shift,
            n * k, k, (h // patch_size) * grid_w, grid_w,
            *images.stride(), *ids_keep.stride(),
            PATCH=patch_size, C=c, PATCH_PAD=patch_pad, PC_PAD=pc_pad, BLOCK_M=block_m,
            IS_U8=images.dtype == torch.uint8, ROW_CONTIG=rows_contiguous(images), num_warps=num_warps,
        )
    return out


@_gather_op.register_fake
def _gather_fake(images, ids_keep, patch_size, pixel_scale, pixel_shift, out_dtype):
    return images.new_empty((images.shape[0], ids_keep.shape[1], patch_size * patch_size * images.shape[3]),
                            dtype=out_dtype)


def gather_visible_patches(
    images: Tensor,
    ids_keep: Tensor,
    patch_size: int,
    pixel_scale: Tensor,
    pixel_shift: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """Fused twin of `model.masking.gather_visible_patches`: rows (N, K, p*p*C) in `out_dtype` (see module doc)."""
    op = "gather_visible_patches"
    n, h, w, c = check_images(op, images, patch_size)
    check_device(op, images=images, ids_keep=ids_keep, pixel_scale=pixel_scale, pixel_shift=pixel_shift)
    check_ids_keep(op, ids_keep, n, (h // patch_size) * (w // patch_size))
    check_pixel_norm(op, pixel_scale, pixel_shift, c)
    if out_dtype not in FLOAT_DTYPES:
        fail(op, f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    return _gather_op(images, ids_keep, patch_size, pixel_scale, pixel_shift, out_dtype)
