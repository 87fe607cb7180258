"""Optimiser and learning-rate schedule of MAE / SupMAE pre-training.

* AdamW with betas (0.9, 0.95) and weight decay 0.05, grouped as the official pre-training groups them (timm
  0.3.2's `add_weight_decay` with no skip list, main_pretrain.py / main_pretrain_supmae.py): every 1-D tensor
  (LayerNorm / BatchNorm weights and biases) and every `.bias` is not decayed; everything else is, the cls and
  mask tokens included (shape (1, 1, D), not 1-D). The frozen sin-cos position embeddings are not trained at all.
  (Fine-tuning keeps its own exclusions: train/eval/finetune.py.)
* Peak lr = blr x effective batch / 256 (TrainConfig.peak_lr), reached by a linear warm-up and followed by a
  half-cosine to min_lr, set on every optimiser step (per iteration, as MAE's `adjust_learning_rate`).
* Non-finite steps are skipped on the device: the fused AdamW kernel takes a `found_inf` flag and then leaves the
  weights, the moments and its step counter unchanged, so skipping needs no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[not decayed, decayed] parameter groups of `model`, trainable parameters only, in named_parameters order.

    The rule and the group order of timm 0.3.2's `optim_factory.add_weight_decay(model, weight_decay)` with an empty
    skip list, which the official MAE and SupMAE pre-training use: a parameter is not decayed when it is 1-D or its
    name ends in `.bias`. Frozen parameters (`requires_grad=False`: the position embeddings) are left out.
    """
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias"):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel (CPU and CUDA) so that `found_inf` skips a step on the device."""
    groups = param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


@dataclass(frozen=True)
class CosineSchedule:
    """Learning rate of optimiser step `step` (0-based): linear warm-up from 0, then half-cosine to `min_lr`.

        step < warmup:  peak * step / warmup
        otherwise:      min_lr + (peak - min_lr) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
    """

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps <= self.total_steps or self.total_steps < 1:
            raise ValueError(f"schedule needs 0 <= warmup_steps ({self.warmup_steps}) <= total_steps "
                             f"({self.total_steps}) and total_steps >= 1")
        if self.min_lr > self.peak_lr:
            raise ValueError(f"min_lr {self.min_lr} is above the peak lr {self.peak_lr}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.total_steps == self.warmup_steps:
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def skip_if(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None) -> None:
    """Make the next fused `optimizer.step()` a no-op where `found_inf` (a 0-d float tensor on the parameters'
    device) is 1. This is the attribute protocol torch's GradScaler uses with fused optimisers."""
    if found_inf is None:
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
    else:
        optimizer.found_inf = found_inf
