"""Register-tile geometry of the fused masking kernels (`model/kernels/`), in plain Python (no Triton import), so
that a model configuration the kernels cannot serve is refused when the configuration is built, not at the first
GPU step.

A gather / loss program holds BLOCK_M patches as a (BLOCK_M, PATCH_PAD * PC_PAD) register tile: PATCH_PAD runs (one
per pixel row of the patch, the first `patch_size` used) of PC_PAD lanes (the first `patch_size * C` used). Triton
needs every tile dimension to be a power of two, so both are padded (PATCH_PAD = next power of two >= p,
PC_PAD = next power of two >= p*C) and the unused lanes are masked: any patch size works (14 -> 16 x 64 lanes at
3 channels, 57% of them used; 16 -> 16 x 64, 75%).
"""

from __future__ import annotations

# Elements of a program's register tile: 4096 = 16 fp32 values per thread at 8 warps, enough work per program to
# hide memory latency on an H100 without spilling (the loss kernels hold three such fp32 tiles).
TILE_ELEMENTS = 4096
# One patch's padded tile row must fit a program: 16384 lanes = 64 fp32 registers per thread and tile at 8 warps,
# already past what the loss kernels hold without spilling; larger patches (beyond 64 x 64 RGB) are refused.
MAX_PATCH_LANES = 16384


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def patch_lanes(patch_size: int, channels: int) -> tuple[int, int]:
    """(PATCH_PAD, PC_PAD): the padded rows and the padded row width of one patch's tile (see module doc)."""
    return next_pow2(patch_size), next_pow2(patch_size * channels)


def patch_tile(patch_size: int, channels: int) -> tuple[int, int, int, int]:
    """(PATCH_PAD, PC_PAD, BLOCK_M, num_warps) of the gather / loss kernels on p x p x C patches."""
    patch_pad, pc_pad = patch_lanes(patch_size, channels)
    lanes = patch_pad * pc_pad
    block_m = max(1, min(32, TILE_ELEMENTS // lanes))
    num_warps = 8 if block_m * lanes >= 4096 else 4
    return patch_pad, pc_pad, block_m, num_warps


def fused_masking_problem(patch_size: int, channels: int) -> str | None:
    """Why the fused kernels cannot serve p x p x C patches, or None when they can."""
    patch_pad, pc_pad = patch_lanes(patch_size, channels)
    if patch_pad * pc_pad > MAX_PATCH_LANES:
        return (f"the fused masking kernels hold one {patch_size}x{patch_size}x{channels} patch as a register tile "
                f"of {patch_pad} x {pc_pad} = {patch_pad * pc_pad} lanes, more than the {MAX_PATCH_LANES} a "
                f"program can hold")
    return None
