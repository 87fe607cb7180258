"""Decoder unshuffle: encoder tokens back to their patch positions, mask tokens elsewhere, + position embedding.

    x          (N, 1+K, D) fp16 / bf16 / fp32, cls first, any strides
    ids_keep   (N, K) int32 or int64, distinct patch indices in [0, L) (in masking order: token 1+k sits at ids_keep[k])
    mask_token (1, 1, D) float (a trainable parameter; rounded to x's dtype first, as the reference does)
    pos_embed  (1, 1+L, D) float (the frozen decoder table)
    out        (N, 1+L, D) contiguous, dtype = promote(x, pos_embed) as the reference's `+ pos_embed`

Forward, one pass: a program owns a (rows, D) tile of one sample's output and finds, for each output position, the
kept token that lands there by comparing against the sample's K indices in registers, at most MAX_BLOCK_K of them
at a time (one chunk at ViT-B/16's K = 49; any K works), so no inverse permutation is materialised and no output
row is written twice.

Backward, one pass over grad_out (no atomics): a program owns one sample and a D slice, walks the 1+L rows, writes
the cls and kept rows to grad_x (distinct destinations) and sums the masked rows in fp32 into a per-sample partial;
the mask-token gradient is the (deterministic) sum of the N partials. pos_embed is frozen in the model; if it does
require grad it gets grad_out summed over the batch (fp32 accumulation), computed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.kernel_tiles import next_pow2
from model.kernels._common import (
    FLOAT_DTYPES,
    check_device,
    check_dtype,
    check_ids_keep,
    device_context,
    fail,
)

BLOCK_ROWS = 32
BLOCK_COLS = 128  # 32 x 128 tile: 16 elements per thread at 8 warps; D = 512 -> 4 column blocks
MAX_BLOCK_K = 256  # kept indices compared per chunk: a 32 x 256 int32 tile, 32 registers per thread at 8 warps


@triton.jit
def _source_rows(ids_ptr, n, s_idn, s_idk, r, K, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr):
    """(BLOCK_R,) row of x that output row r takes: 0 for the cls row, 1+k where ids_keep[n, k] == r-1, else -1.
    The K indices are compared in K_CHUNKS unrolled chunks of BLOCK_K (one at ViT-B/16's K = 49)."""
    src_k = tl.zeros_like(r) - 1
    for chunk in tl.static_range(K_CHUNKS):
        kk = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        keep = tl.load(ids_ptr + n.to(tl.int64) * s_idn + kk * s_idk, mask=k_ok, other=0).to(tl.int32)
        hit = (keep[None, :] == (r - 1)[:, None]) & k_ok[None, :]
        src_k = tl.maximum(src_k, tl.max(tl.where(hit, kk[None, :], -1), axis=1))
    return tl.where(r == 0, 0, tl.where(src_k >= 0, src_k + 1, -1))


@triton.jit
def _unshuffle_fwd_kernel(x_ptr, ids_ptr, mt_ptr, pe_ptr, out_ptr,
                          R, K, D,
                          s_xn, s_xr, s_xd, s_idn, s_idk, s_mtd, s_pr, s_pd,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                          K_CHUNKS: tl.constexpr):
    n = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < R
    d_ok = d < D
    src = _source_rows(ids_ptr, n, s_idn, s_idk, r, K, BLOCK_K, K_CHUNKS)
    from_x = src >= 0
    tile_ok = r_ok[:, None] & d_ok[None, :]
    xv = tl.load(x_ptr + n.to(tl.int64) * s_xn + src[:, None] * s_xr + d[None, :] * s_xd,
                 mask=tile_ok & from_x[:, None], other=0.0).to(tl.float32)
    # The reference casts the mask token to x's dtype before the fp32 (promoted) add: round it the same way.
    mt = tl.load(mt_ptr + d * s_mtd, mask=d_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    pe = tl.load(pe_ptr + r[:, None] * s_pr + d[None, :] * s_pd, mask=tile_ok, other=0.0).to(tl.float32)
    val = tl.where(from_x[:, None], xv, mt[None, :]) + pe
    out_off = (n.to(tl.int64) * R + r[:, None]) * D + d[None, :]
    tl.store(out_ptr + out_off, val.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _unshuffle_bwd_kernel(g_ptr, ids_ptr, gx_ptr, partial_ptr,
                          R, K, D,
                          s_gn, s_gr, s_gd, s_idn, s_idk,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                          K_CHUNKS: tl.constexpr):
    n = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    g_base = g_ptr + n.to(tl.int64) * s_gn
    gx_base = gx_ptr + n.to(tl.int64) * (K + 1) * D
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        src = _source_rows(ids_ptr, n, s_idn, s_idk, r, K, BLOCK_K, K_CHUNKS)
        to_x = (src >= 0) & r_ok
        g = tl.load(g_base + r[:, None] * s_gr + d[None, :] * s_gd, mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        tl.store(gx_base + src[:, None] * D + d[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=to_x[:, None] & d_ok[None, :])
        acc += tl.sum(tl.where(to_x[:, None], 0.0, g), axis=0)
    tl.store(partial_ptr + n * D + d, acc, mask=d_ok)


def _k_blocks(k: int) -> dict[str, int]:
    """BLOCK_K (indices compared at a time) and K_CHUNKS (how many such chunks cover the K kept indices)."""
    block_k = min(MAX_BLOCK_K, max(2, next_pow2(k)))
    return {"BLOCK_K": block_k, "K_CHUNKS": max(1, triton.cdiv(k, block_k))}


@torch.library.custom_op("supmae::unshuffle_decoder_tokens", mutates_args=())
def _unshuffle_op(x: Tensor, ids_keep: Tensor, mask_token: Tensor, pos_embed: Tensor) -> Tensor:
    n, k1, d = x.shape
    rows = pos_embed.shape[1]
    out = torch.empty((n, rows, d), dtype=torch.promote_types(x.dtype, pos_embed.dtype), device=x.device)
    if out.numel() == 0:
        return out
    grid = (n, triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(d, BLOCK_COLS))
    with device_context(x.device):
        _unshuffle_fwd_kernel[grid](
            x, ids_keep, mask_token, pos_embed, out, rows, k1 - 1, d,
            *x.stride(), *ids_keep.stride(), mask_token.stride(2), pos_embed.stride(1), pos_embed.stride(2),
            BLOCK_R=BLOCK_ROWS, BLOCK_D=BLOCK_COLS, **_k_blocks(k1 - 1), num_warps=8,
        )
    return out


@_unshuffle_op.register_fake
def _unshuffle_fake(x, ids_keep, mask_token, pos_embed):
    return x.new_empty((x.shape[0], pos_embed.shape[1], x.shape[2]),
                       dtype=torch.promote_types(x.dtype, pos_embed.dtype))


@torch.library.custom_op("supmae::unshuffle_decoder_tokens_backward", mutates_args=())
def _unshuffle_bwd_op(grad_out: Tensor, ids_keep: Tensor, x_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """grad_out (N, 1+L, D) -> grad_x (N, 1+K, D) in x_dtype, mask-token partial sums (N, D) fp32."""
    n, rows, d = grad_out.shape
    k = ids_keep.shape[1]
    grad_x = torch.empty((n, k + 1, d), dtype=x_dtype, device=grad_out.device)
    partial = torch.empty((n, d), dtype=torch.float32, device=grad_out.device)
    if grad_out.numel() == 0:
        return grad_x, partial.zero_()
    grid = (n, triton.cdiv(d, BLOCK_COLS))
    with device_context(grad_out.device):
        _unshuffle_bwd_kernel[grid](
            grad_out, ids_keep, grad_x, partial, rows, k, d, *grad_out.stride(), *ids_keep.stride(),
            BLOCK_R=BLOCK_ROWS, BLOCK_D=BLOCK_COLS, **_k_blocks(k), num_warps=8,
        )
    return grad_x, partial


@_unshuffle_bwd_op.register_fake
def _unshuffle_bwd_fake(grad_out, ids_keep, x_dtype):
    n, _, d = grad_out.shape
    return (grad_out.new_empty((n, ids_keep.shape[1] + 1, d), dtype=x_dtype),
            grad_out.new_empty((n, d), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, ids_keep, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_keep)
    ctx.x_dtype = x.dtype
    ctx.mask_token_dtype = mask_token.dtype
    ctx.pos_embed_dtype = pos_embed.dtype


def _backward(ctx, grad_out):
    (ids_keep,) = ctx.saved_tensors
    need_x, _, need_mt, need_pe = ctx.needs_input_grad
    grad_x = grad_mt = grad_pe = None
    if need_x or need_mt:
        grad_x, partial = _unshuffle_bwd_op(grad_out, ids_keep, ctx.x_dtype)
        if need_mt:
            grad_mt = partial.sum(dim=0).to(ctx.mask_token_dtype).view(1, 1, -1)
        if not need_x:
            grad_x = None
    if need_pe:
        grad_pe = grad_out.sum(dim=0, keepdim=True, dtype=torch.float32).to(ctx.pos_embed_dtype)
    return grad_x, None, grad_mt, grad_pe


_unshuffle_op.register_autograd(_backward, setup_context=_setup_context)


def unshuffle_decoder_tokens(x: Tensor, ids_keep: Tensor, mask_token: Tensor, pos_embed: Tensor) -> Tensor:
    """Fused twin of `model.masking.unshuffle_decoder_tokens`: (N, 1+K, D) -> (N, 1+L, D) (see module doc)."""
    op = "unshuffle_decoder_tokens"
    if x.dim() != 3 or x.shape[1] < 1:
        fail(op, f"x must be (N, 1+K, D) with the cls token first, got shape {tuple(x.shape)}")
    n, k1, d = x.shape
    for name, t in (("x", x), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        check_dtype(op, name, t, FLOAT_DTYPES)
    if mask_token.shape != (1, 1, d):
        fail(op, f"mask_token must have shape (1, 1, {d}), got {tuple(mask_token.shape)}")
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != d or pos_embed.shape[1] < 2:
        fail(op, f"pos_embed must have shape (1, 1+L, {d}), got {tuple(pos_embed.shape)}")
    check_device(op, x=x, ids_keep=ids_keep, mask_token=mask_token, pos_embed=pos_embed)
    check_ids_keep(op, ids_keep, n, pos_embed.shape[1] - 1, k=k1 - 1)
    return _unshuffle_op(x, ids_keep, mask_token, pos_embed)
