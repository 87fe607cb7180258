"""Analytic FLOP accounting for the masked autoencoder (1 multiply-add = 2 FLOPs).

Counts what dominates and what `torch.utils.flop_counter.FlopCounterMode` counts: every matmul (patch embedding,
qkv / proj / MLP, decoder embedding and prediction, classification head) and the two attention matmuls
(QK^T and AV). Norms, softmax, GELU and the loss are elementwise and left out (< 1% at ViT-B).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """One transformer block on `tokens` tokens of width `dim`."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV over all heads
    return linear + attention


@dataclass(frozen=True)
class FlopBreakdown:
    patch_embed: int
    encoder: int
    decoder: int
    head: int

    @property
    def total(self) -> int:
        return self.patch_embed + self.encoder + self.decoder + self.head


def forward_flops(cfg: ModelConfig, mask_ratio: float) -> FlopBreakdown:
    """Forward FLOPs per image: encoder on the 1 + K visible tokens, decoder on all 1 + L tokens, head."""
    num_keep = cfg.num_visible(mask_ratio)
    enc_tokens, dec_tokens = 1 + num_keep, 1 + cfg.num_patches
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    patch_embed = 2 * num_keep * cfg.patch_dim * d
    encoder = cfg.depth * block_flops(enc_tokens, d, cfg.mlp_ratio)
    decoder = (
        2 * enc_tokens * d * dd  # decoder_embed
        + cfg.decoder_depth * block_flops(dec_tokens, dd, cfg.mlp_ratio)
        + 2 * cfg.num_patches * dd * cfg.patch_dim  # decoder_pred on the patch tokens
    )
    head = 2 * (d * cfg.cls_hidden + cfg.cls_hidden * cfg.num_classes) if cfg.cls_branch else 0
    return FlopBreakdown(patch_embed, encoder, decoder, head)
