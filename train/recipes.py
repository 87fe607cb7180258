"""Named recipes: pre-training (the papers' ImageNet-1k settings, small CPU ones for the demo and tests) and the
evaluation protocols' (linear probe, fine-tuning). A recipe is a set of configuration values; `--field-name value`
on the command line overrides single fields. docs/training.md and docs/evaluation.md hold the tables: every value,
the official one and the file and line it comes from, and the deliberate differences.

ImageNet-1k pre-training (SupMAE, arXiv 2205.14540, and its MAE baseline):
  * SupMAE ViT-B/16 `d1b` (decoder 1 x 512-d), classification branch on the pooled visible tokens (global pool,
    cls-loss ratio 0.01, temperature 10), mask 0.75, norm-pix loss, AdamW (0.9, 0.95), weight decay 0.05, base lr
    1.5e-4 scaled by effective batch / 256, cosine per iteration, 20 warm-up epochs. 400 epochs is the released
    recipe; 100 and 200 are the paper's shorter schedules of the efficiency comparison, whose warm-up is not
    published (20 here: this project's choice).
  * MAE ViT-B/16 `d8b` (decoder 8 x 512-d), no branch, 40 warm-up epochs (MAE's published setting), 1600 epochs in
    the MAE paper, 100/200/400 as the SupMAE authors' re-runs (their warm-up is not published; 40 here).
  * Effective batch 4096 in both papers: the recipes use 512 per GPU, i.e. 4096 on one 8-GPU node. On another
    number of GPUs keep 4096 with --batch-size (e.g. 256 on 16 GPUs); lr follows the effective batch either way.

Demo (CPU, minutes): 32x32 images, patch 4 (64 patches, 16 visible), a ViT-Tiny-width encoder of 6 blocks, a
128-d decoder (1 block for SupMAE, 8 for MAE: the papers' asymmetry at small scale). The base lr is raised to
1e-3 because these runs are a few epochs long; num_classes comes from the data set. Their checkpoints are
evaluated with the protocols' `small` recipes.

Every recipe names the effective batch it was tuned for: a run far below it (under a quarter of it) gets a start-up
warning saying what to change (`batch_warning`), since lr = blr x batch / 256 is only tested near that batch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    description: str
    values: dict[str, Any] = field(default_factory=dict)
    effective_batch: int = 0  # the effective batch (batch x accumulation x processes) the recipe is tuned for
    warmup_source: str = ""  # where the warm-up length comes from: an official file and line, or this project
    eval_recipe: str = ""  # pre-training: the protocols' recipe for its checkpoints ("" = their default)
    scale_hint: str = ""  # what to use instead when far below effective_batch


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


SUPMAE_WARMUP = "official: enyac-group/supmae PRETRAIN.md line 12 (--warmup_epochs 20, 400 epochs)"
MAE_WARMUP = "official: facebookresearch/mae PRETRAIN.md line 14 (--warmup_epochs 40, 800 epochs; paper: 1600)"
PROJECT_WARMUP = "this project's choice: not published for {epochs} epochs; the {method} warm-up of the longer recipe"
IN1K_HINT = "for a small data set on one process start from a *_demo recipe"


def _build() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for epochs in (100, 200, 400):
        recipes[f"supmae_vit_base_in1k_{epochs}ep"] = Recipe(
            f"SupMAE ViT-B/16 d1b, {epochs} epochs (20 warm-up), blr 1.5e-4, effective batch 4096 on 8 GPUs",
            dict(_IN1K, model="supmae_vit_base_patch16", model_args=dict(_SUPMAE_HEAD), epochs=epochs,
                 warmup_epochs=20.0),
            effective_batch=4096, scale_hint=IN1K_HINT,
            warmup_source=SUPMAE_WARMUP if epochs == 400 else PROJECT_WARMUP.format(epochs=epochs, method="SupMAE"),
        )
    for epochs in (100, 200, 400, 1600):
        recipes[f"mae_vit_base_in1k_{epochs}ep"] = Recipe(
            f"MAE ViT-B/16 d8b, {epochs} epochs (40 warm-up), blr 1.5e-4, effective batch 4096 on 8 GPUs",
            dict(_IN1K, model="mae_vit_base_patch16", model_args=dict(_MAE_DECODER), epochs=epochs,
                 warmup_epochs=40.0),
            effective_batch=4096, scale_hint=IN1K_HINT,
            warmup_source=MAE_WARMUP if epochs == 1600 else PROJECT_WARMUP.format(epochs=epochs, method="MAE"),
        )
    demo = "this project's choice: 1 of 10 epochs (a CPU-scale recipe)"
    recipes["supmae_vit_tiny_demo"] = Recipe(
        "CPU demo: SupMAE, 32x32 patch 4, 192-d x 6 encoder, decoder 1 x 128-d, 10 epochs",
        dict(_DEMO, model="supmae_vit_tiny_patch16",
             model_args=dict(_DEMO_ENCODER, decoder_depth=1, cls_hidden=768, cls_loss_ratio=0.01, temperature=10.0)),
        effective_batch=128, warmup_source=demo, eval_recipe="small",
    )
    recipes["mae_vit_tiny_demo"] = Recipe(
        "CPU demo: MAE, 32x32 patch 4, 192-d x 6 encoder, decoder 8 x 128-d, 10 epochs",
        dict(_DEMO, model="mae_vit_tiny_patch16", model_args=dict(_DEMO_ENCODER, decoder_depth=8)),
        effective_batch=128, warmup_source=demo, eval_recipe="small",
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


# ------------------------------------------------------------------------------------------------------------------
# The evaluation protocols' recipes (./launch.sh linprobe / finetune --recipe NAME)

_LINPROBE = dict(blr=0.1, lr=None, epochs=90, warmup_epochs=10.0, min_lr=0.0, weight_decay=0.0)
_FINETUNE = dict(batch_size=128, accum_steps=1, lr=None, epochs=100, warmup_epochs=5.0, min_lr=1e-6,
                 weight_decay=0.05, mixup=0.8, cutmix=1.0, reprob=0.25)
SMALL_HINT = "for a small data set on one process use --recipe small"

PROTOCOL_RECIPES: dict[str, dict[str, Recipe]] = {
    "linprobe": {
        "mae_in1k": Recipe(
            "MAE's linear probe, the default for both methods: LARS, blr 0.1, effective batch 16384 (2048 per GPU "
            "on 8), 90 epochs (10 warm-up)",
            dict(_LINPROBE, batch_size=2048, accum_steps=1), effective_batch=16384, scale_hint=SMALL_HINT),
        "supmae_in1k": Recipe(
            "SupMAE's released probe: as mae_in1k at effective batch 8192 (512 per GPU x 2 accumulation x 8)",
            dict(_LINPROBE, batch_size=512, accum_steps=2), effective_batch=8192, scale_hint=SMALL_HINT),
        # LARS scales every step to the weight's norm, so its step size follows the lr, not the batch: scaled down
        # with the batch (lr = 0.1 x 128 / 256 = 0.05) the probe stays where it started. The small recipe sets the lr
        # instead: twice the ImageNet recipes' peak (0.1 x 16384 / 256 = 6.4), as a probe of a few hundred steps
        # needs (docs/evaluation.md has the measurement), stable from batch 16 to 128.
        "small": Recipe(
            "small data on one process (the demo, bench compute on a CPU): batch 128, lr 12.8 (not scaled with the "
            "batch), 20 epochs (2 warm-up)",
            dict(_LINPROBE, batch_size=128, accum_steps=1, lr=12.8, epochs=20, warmup_epochs=2.0),
            effective_batch=128),
    },
    "finetune": {
        "supmae_in1k": Recipe(
            "MAE's ViT-B fine-tuning with SupMAE's base lr, the default for both methods: AdamW, blr 1e-3, "
            "effective batch 1024 (128 per GPU on 8), 100 epochs (5 warm-up)",
            dict(_FINETUNE, blr=1e-3), effective_batch=1024, scale_hint=SMALL_HINT),
        "mae_in1k": Recipe(
            "MAE's released ViT-B fine-tuning: as supmae_in1k with blr 5e-4",
            dict(_FINETUNE, blr=5e-4), effective_batch=1024, scale_hint=SMALL_HINT),
        # mixup / cutmix / erasing regularise 100-epoch runs on a million images; on a few thousand images over
        # 20 epochs they mostly hide the signal.
        "small": Recipe(
            "small data on one process: batch 128, blr 1e-3, 20 epochs (2 warm-up), no mixup / cutmix / erasing",
            dict(_FINETUNE, blr=1e-3, epochs=20, warmup_epochs=2.0, mixup=0.0, cutmix=0.0, reprob=0.0),
            effective_batch=128),
    },
}
DEFAULT_PROTOCOL_RECIPES = {"linprobe": "mae_in1k", "finetune": "supmae_in1k"}


def protocol_recipe(protocol: str, name: str = "") -> tuple[str, Recipe]:
    """(name, recipe) of `protocol`'s recipe `name` ('' = its default)."""
    recipes = PROTOCOL_RECIPES[protocol]
    name = name or DEFAULT_PROTOCOL_RECIPES[protocol]
    if name not in recipes:
        close = difflib.get_close_matches(name, recipes, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown {protocol} recipe {name!r}{hint} (available: {', '.join(recipes)})")
    return name, recipes[name]


def protocol_values(protocol: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The configuration values of a `protocol` run: its recipe (overrides["recipe"], else the default), then the
    command line's `overrides`."""
    name, recipe = protocol_recipe(protocol, overrides.get("recipe", ""))
    return {**recipe.values, **overrides, "recipe": name}


# A run whose effective batch is more than FAR_BELOW times below its recipe's gets a start-up warning.
FAR_BELOW = 4


def batch_warning(name: str, recipe: Recipe, batch_size: int, accum_steps: int, world_size: int,
                  peak_lr: float) -> str | None:
    """A start-up warning when the effective batch is far below the one `recipe` is tuned for, saying what to
    change; None when it is not (or the recipe names no batch)."""
    effective = batch_size * accum_steps * world_size
    target = recipe.effective_batch
    if not target or effective * FAR_BELOW >= target:
        return None
    per_process = -(-target // (world_size * accum_steps))
    accum = -(-target // (batch_size * world_size))
    return (f"warning: effective batch {effective} ({batch_size} x {accum_steps} accum x {world_size} processes) is "
            f"{target / effective:.0f}x below the {target} the recipe {name} is tuned for: its learning rate (here "
            f"{peak_lr:.3g}; lr = blr x batch / 256 unless --lr is set) was not chosen for this scale and the run "
            f"may not learn. To follow the recipe use --batch-size {per_process} on {world_size} process(es) or "
            f"--accum-steps {accum}" + (f"; {recipe.scale_hint}" if recipe.scale_hint else ""))
