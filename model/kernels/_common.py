"""Shared pieces of the fused masking kernels: the NHWC patch reader (a Triton device function), launch sizing and
the launchers' input checks.

Patch tiles. A program of the gather and loss kernels handles BLOCK_M patches at once as a 2-D register tile
(BLOCK_M, PATCH_PAD * PC_PAD): one tile row per patch, and inside it PATCH_PAD runs of PC_PAD lanes, one run per
pixel row of the patch (the first PATCH runs are used), of which the first PATCH*C lanes are used (PATCH_PAD and
PC_PAD = the next powers of two >= PATCH and PATCH*C, as Triton's tiles must be: any patch size works, geometry in
`model.kernel_tiles`). A run is exactly
the PATCH*C values an NHWC image stores contiguously for one pixel row of one patch, and exactly the (q, c) part of
a (p, q, c)-ordered patch row, so with a contiguous-row image (stride W == C, stride C == 1) loads and stores are
straight contiguous runs that the compiler vectorises; any other strides (an NCHW tensor viewed as NHWC, a crop)
take the general address formula, read in place without a copy.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _probe_kernel(x):
    pass


# `triton.jit` returns an interpreter object when TRITON_INTERPRET=1 was set before the kernels were defined: then the
# kernels run on CPU tensors (slowly, for tests); otherwise they need CUDA tensors.
INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"


def rows_contiguous(images: Tensor) -> bool:
    """True when each pixel row of an NHWC view stores its W*C values contiguously (stride W == C, stride C == 1)."""
    _, _, w, c = images.shape
    # The stride of a size-1 dimension is meaningless (a 1-channel NCHW view has any channel stride).
    return (images.stride(3) == 1 or c == 1) and (images.stride(2) == c or w == 1)


def device_context(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def load_patch_tile(img_ptr, n, gy, gx, load_ok, s_n, s_h, s_w, s_c, scale_ptr, shift_ptr,
                    PATCH: tl.constexpr, C: tl.constexpr, PATCH_PAD: tl.constexpr, PC_PAD: tl.constexpr,
                    IS_U8: tl.constexpr, ROW_CONTIG: tl.constexpr):
    """Pixels of BLOCK_M patches of an NHWC image as an fp32 tile (BLOCK_M, PATCH_PAD * PC_PAD), 0 in unused lanes.

    n, gy, gx (BLOCK_M,) int32: sample, patch row and patch column of each tile row; load_ok (BLOCK_M,) bool: rows
    to read (others come back as zeros without touching memory). uint8 pixels become x * scale[c] + shift[c].
    """
    j = tl.arange(0, PATCH_PAD * PC_PAD)
    i = j // PC_PAD  # pixel row inside the patch
    jj = j % PC_PAD  # position inside the row's run of PATCH*C values: q*C + c
    c = jj % C
    lane_ok = (i < PATCH) & (jj < PATCH * C)
    row = gy[:, None] * PATCH + i[None, :]
    base = n.to(tl.int64) * s_n  # int64: a batch of images can exceed 2**31 elements
    if ROW_CONTIG:
        off = base[:, None] + row * s_h + (gx * (PATCH * C))[:, None] + jj[None, :]
    else:
        q = jj // C
        off = base[:, None] + row * s_h + (gx[:, None] * PATCH + q[None, :]) * s_w + (c * s_c)[None, :]
    ok = load_ok[:, None] & lane_ok[None, :]
    x = tl.load(img_ptr + off, mask=ok, other=0).to(tl.float32)
    if IS_U8:
        scale = tl.load(scale_ptr + c).to(tl.float32)
        shift = tl.load(shift_ptr + c).to(tl.float32)
        x = x * scale[None, :] + shift[None, :]
    return tl.where(ok, x, 0.0)


@triton.jit
def patch_row_offsets(PATCH: tl.constexpr, C: tl.constexpr, PATCH_PAD: tl.constexpr, PC_PAD: tl.constexpr):
    """(PATCH_PAD * PC_PAD,) offsets of the tile's lanes inside a (p, q, c)-ordered patch row, and which lanes are
    used."""
    j = tl.arange(0, PATCH_PAD * PC_PAD)
    i = j // PC_PAD
    jj = j % PC_PAD
    return i * (PATCH * C) + jj, (i < PATCH) & (jj < PATCH * C)


# ----------------------------------------------------------------------------------------------------------------
# Launcher checks: metadata only (they also run on fake tensors while torch.compile traces), so no host sync.

def fail(op: str, message: str) -> None:
    raise ValueError(f"fused {op}: {message}")


def check_device(op: str, **tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        fail(op, f"all tensors must be on one device, got {listing}")
    if first.type == "cuda" or (first.type == "cpu" and INTERPRETED) or first.type == "meta":
        return first
    hint = ("set TRITON_INTERPRET=1 before importing model.kernels to run the kernels on CPU (tests only)"
            if first.type == "cpu" else "move the tensors to a CUDA device")
    fail(op, f"Triton kernels need CUDA tensors, got {first}; use fused_masking='off' (the reference path) or {hint}")
    return first


def check_dtype(op: str, name: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        fail(op, f"{name} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def check_images(op: str, images: Tensor, patch_size: int) -> tuple[int, int, int, int]:
    """images (N, H, W, C) NHWC view, any strides; returns (N, H, W, C)."""
    if not isinstance(patch_size, int) or patch_size < 1:
        fail(op, f"patch_size must be a positive int, got {patch_size!r}")
    if images.dim() != 4:
        fail(op, f"images must be a 4-D NHWC view (N, H, W, C), got shape {tuple(images.shape)}")
    check_dtype(op, "images", images, IMAGE_DTYPES)
    n, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        fail(op, f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    if images.requires_grad and torch.is_grad_enabled():
        fail(op, "images require grad, but the fused kernels give no gradient to pixels; detach them or use "
                 "fused_masking='off'")
    return n, h, w, c


def check_pixel_norm(op: str, pixel_scale: Tensor, pixel_shift: Tensor, channels: int) -> None:
    for name, t in (("pixel_scale", pixel_scale), ("pixel_shift", pixel_shift)):
        check_dtype(op, name, t, FLOAT_DTYPES)
        if t.numel() != channels:
            fail(op, f"{name} must hold one value per channel ({channels}), got shape {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            fail(op, f"{name} requires grad; the fused kernels treat the pixel normalisation as constant")


def check_ids_keep(op: str, ids_keep: Tensor, n: int, num_patches: int, k: int | None = None) -> int:
    """ids_keep (N, K) int32/int64; eagerly on CPU also the values (free there; on CUDA it would cost a host sync,
    and under torch.compile it would be a data-dependent branch)."""
    check_dtype(op, "ids_keep", ids_keep, INDEX_DTYPES)
    # Messages are formatted only on the error path: under torch.compile the sizes may be symbolic, and turning a
    # symbolic size into text would break the graph (e.g. when a second mask ratio makes K dynamic).
    if ids_keep.dim() != 2 or ids_keep.shape[0] != n or (k is not None and ids_keep.shape[1] != k):
        fail(op, f"ids_keep must have shape ({n}, {'K' if k is None else k}), got {tuple(ids_keep.shape)}")
    if ids_keep.shape[1] > num_patches:
        fail(op, f"ids_keep keeps {ids_keep.shape[1]} patches per sample but there are only {num_patches}")
    if ids_keep.device.type == "cpu" and ids_keep.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids_keep.min()), int(ids_keep.max())
        if lo < 0 or hi >= num_patches:
            fail(op, f"ids_keep values must be patch indices in [0, {num_patches}), found [{lo}, {hi}]")
    return ids_keep.shape[1]
