"""Named pre-training recipes: the papers' settings for ImageNet-1k, and small CPU recipes for the demo and tests.

A recipe is a set of TrainConfig values; `--field-name value` on the command line overrides single fields.

ImageNet-1k (SupMAE, arXiv 2205.14540, and its MAE baseline; ../shared/FACTS.md section 1):
  * SupMAE ViT-B/16 `d1b` (decoder 1 x 512-d), classification branch on the pooled visible tokens (global pool,
    cls-loss ratio 0.01, temperature 10), mask 0.75, norm-pix loss, AdamW (0.9, 0.95), weight decay 0.05, base lr
    1.5e-4 scaled by effective batch / 256, cosine per iteration, 20 warm-up epochs. 400 epochs is the released
    recipe; 100 and 200 are the paper's shorter schedules of the efficiency comparison (same warm-up).
  * MAE ViT-B/16 `d8b` (decoder 8 x 512-d), no branch, 40 warm-up epochs (MAE's setting for every length),
    1600 epochs in the MAE paper, 100/200/400 as the SupMAE authors' re-runs.
  * Effective batch 4096 in both papers: the recipes use 512 per GPU, i.e. 4096 on one 8-GPU node. On another
    number of GPUs keep 4096 with --batch-size (e.g. 256 on 16 GPUs); lr follows the effective batch either way.

Demo (CPU, minutes): 32x32 images, patch 4 (64 patches, 16 visible), a ViT-Tiny-width encoder of 6 blocks, a
128-d decoder (1 block for SupMAE, 8 for MAE: the papers' asymmetry at small scale). The base lr is raised to
1e-3 because these runs are a few epochs long; num_classes comes from the data set.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    description: str
    values: dict[str, Any] = field(default_factory=dict)


_IN1K = dict(
    img_size=224, mask_ratio=0.75, batch_size=512, accum_steps=1, blr=1.5e-4, min_lr=0.0, weight_decay=0.05,
    betas=(0.9, 0.95), clip_grad=0.0, random_area=(0.2, 1.0), ckpt_every=1000, keep=3, keep_every=50,
    log_every=50,
)
_SUPMAE_HEAD = dict(norm_pix_loss=True, global_pool=True, cls_loss_ratio=0.01, temperature=10.0,
                    decoder_depth=1, decoder_embed_dim=512, decoder_num_heads=16)
_MAE_DECODER = dict(norm_pix_loss=True, decoder_depth=8, decoder_embed_dim=512, decoder_num_heads=16)

_DEMO = dict(
    img_size=32, mask_ratio=0.75, epochs=10, warmup_epochs=1.0, batch_size=128, blr=1e-3, weight_decay=0.05,
    betas=(0.9, 0.95), random_area=(0.35, 1.0), data_threads=2, shuffle_buffer=512, ckpt_every=0, keep=2,
    log_every=10,
)
_DEMO_ENCODER = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128, decoder_num_heads=4,
                     norm_pix_loss=True)


def _build() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for epochs in (100, 200, 400):
        recipes[f"supmae_vit_base_in1k_{epochs}ep"] = Recipe(
            f"SupMAE ViT-B/16 d1b, {epochs} epochs (20 warm-up), blr 1.5e-4, effective batch 4096 on 8 GPUs",
            dict(_IN1K, model="supmae_vit_base_patch16", model_args=dict(_SUPMAE_HEAD), epochs=epochs,
                 warmup_epochs=20.0),
        )
    for epochs in (100, 200, 400, 1600):
        recipes[f"mae_vit_base_in1k_{epochs}ep"] = Recipe(
            f"MAE ViT-B/16 d8b, {epochs} epochs (40 warm-up), blr 1.5e-4, effective batch 4096 on 8 GPUs",
            dict(_IN1K, model="mae_vit_base_patch16", model_args=dict(_MAE_DECODER), epochs=epochs,
                 warmup_epochs=40.0),
        )
    recipes["supmae_vit_tiny_demo"] = Recipe(
        "CPU demo: SupMAE, 32x32 patch 4, 192-d x 6 encoder, decoder 1 x 128-d, 10 epochs",
        dict(_DEMO, model="supmae_vit_tiny_patch16",
             model_args=dict(_DEMO_ENCODER, decoder_depth=1, cls_hidden=768, cls_loss_ratio=0.01, temperature=10.0)),
    )
    recipes["mae_vit_tiny_demo"] = Recipe(
        "CPU demo: MAE, 32x32 patch 4, 192-d x 6 encoder, decoder 8 x 128-d, 10 epochs",
        dict(_DEMO, model="mae_vit_tiny_patch16", model_args=dict(_DEMO_ENCODER, decoder_depth=8)),
    )
    return recipes


RECIPES: dict[str, Recipe] = _build()


def list_recipes() -> list[str]:
    return list(RECIPES)


def recipe_values(name: str) -> dict[str, Any]:
    """A copy of the recipe's TrainConfig values (model_args copied too)."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint} (available: {', '.join(RECIPES)})")
    values = dict(RECIPES[name].values)
    values["model_args"] = dict(values.get("model_args", {}))
    return values
