"""Fixed 2-D sin-cos position embeddings, numerically identical to MAE's numpy helper (float64, then float32)."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + L, D) float32 table for a grid_size x grid_size patch grid (row-major patches), cls row zero.

    As in MAE, the first half of the channels encodes the patch's column, the second half its row.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    col = coords.repeat(grid_size)
    row = coords.repeat_interleave(grid_size)
    emb = torch.cat([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
