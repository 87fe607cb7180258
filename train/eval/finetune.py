"""Per-process entry of `./launch.sh finetune`: end-to-end fine-tuning of a pre-trained encoder (MAE protocol).

    ./launch.sh finetune --ckpt RUN_DIR_OR_FILE --data TRAIN_SHARDS --eval-data EVAL_SHARDS [--field-name value ...]

The encoder becomes timm's VisionTransformer (train.eval.encoder.ViTEncoder: uint8 NHWC batches in, channels-last)
with a new head on the global pool (or the cls token); as in the official models_vit.py the pooled feature goes
through a fresh `fc_norm` (weight 1, bias 0) and the pre-trained final norm is dropped (`--fc-norm-init pretrained`
copies it instead). Defaults are MAE's ViT-B recipe with SupMAE's base lr (docs/evaluation.md has the table with
the official sources): 100 epochs (5 warm-up), effective batch 1024 (128 per GPU on 8), AdamW (0.9, 0.999), blr
1e-3, weight decay 0.05, layer-wise lr decay 0.65 (0.75 beyond 12 blocks; timm's `param_groups_layer_decay`), drop
path 0.1 (0.2 / 0.3 for 24 / 32 blocks), RandomResizedCrop(0.08-1) + flip + timm's RandAugment
rand-m9-mstd0.5-inc1 in the loader (pipeline.loaders.randaugment), random erasing 0.25 (timm's, per sample, on the
device batch), mixup 0.8 / cutmix 1.0 (timm's `Mixup`, label smoothing 0.1, SoftTargetCrossEntropy), optional EMA
of the weights (timm's ModelEmaV3). Top-1 / top-5 on --eval-data every epoch; `checkpoints/best.pt` keeps the best.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from pipeline.loaders.base import Batch
from train.config import option_field as _f
from train.distributed import DistEnv
from train.eval.encoder import FC_NORM_INITS, GLOBAL_POOLS, PretrainedSource, build_vit, encoder_forward_flops
from train.eval.supervised import ClassifierTask, Protocol, SupervisedConfig, trunc_normal_head


def default_layer_decay(depth: int) -> float:
    """MAE's layer-wise lr decay: 0.65 for ViT-B (12 blocks) and smaller, 0.75 for ViT-L / ViT-H."""
    return 0.65 if depth <= 12 else 0.75


def default_drop_path(depth: int) -> float:
    """MAE's drop path rate: 0.1 for ViT-B and smaller, 0.2 for ViT-L (24 blocks), 0.3 for ViT-H (32)."""
    return 0.1 if depth <= 12 else 0.2 if depth <= 24 else 0.3


@dataclass
class FinetuneConfig(SupervisedConfig):
    """`./launch.sh finetune` options; defaults: MAE's ViT-B fine-tuning recipe with SupMAE's base lr."""

    batch_size: int = _f(128, "batch per process (per GPU); MAE's effective batch 1024 = 128 x 8 GPUs")
    epochs: int = _f(100, "epochs of the cosine schedule")
    warmup_epochs: float = _f(5.0, "linear warm-up epochs")
    blr: float = _f(1e-3, "base learning rate (SupMAE's; MAE used 5e-4): lr = blr x effective batch / 256")
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, cls token, position embedding)")
    random_area: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop area range")
    keep: int = _f(2, "keep the newest N checkpoints (best.pt is kept apart)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    layer_decay: float | None = _f(None, "layer-wise lr decay (none = 0.65 up to 12 blocks, 0.75 deeper)")
    drop_path: float | None = _f(None, "stochastic depth rate (none = 0.1 up to 12 blocks, 0.2 to 24, 0.3 deeper)")
    global_pool: str = _f("avg", "avg (mean of the patch tokens, then fc_norm) | token (cls token)")
    fc_norm_init: str = _f("fresh", "fresh (weight 1, bias 0; the pre-trained final norm dropped, as officially) | "
                                    "pretrained (copy the final norm into fc_norm)")
    smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.8, "mixup alpha (0 = off)")
    cutmix: float = _f(1.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _f(1.0, "probability of mixing a batch (mixup or cutmix)")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    randaug_n: int = _f(2, "RandAugment operations per image, each applied with probability 0.5 (0 = off)")
    randaug_m: int = _f(9, "RandAugment magnitude on timm's 0..10 scale")
    randaug_mstd: float = _f(0.5, "std of the Gaussian noise on each applied operation's magnitude (timm's mstd)")
    randaug_inc: bool = _f(True, "timm's increasing-severity operation set (inc1; false: timm's plain set)")
    reprob: float = _f(0.25, "random erasing probability per image (0 = off)")
    ema: bool = _f(False, "keep an exponential moving average of the weights and evaluate it too")
    ema_decay: float = _f(0.9999, "EMA decay per step")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks: list[tuple[str, bool, str]] = [
            ("layer_decay", self.layer_decay is None or 0 < self.layer_decay <= 1, "a number in (0, 1] or none"),
            ("drop_path", self.drop_path is None or 0 <= self.drop_path < 1, "a number in [0, 1) or none"),
            ("global_pool", self.global_pool in GLOBAL_POOLS, "one of " + ", ".join(GLOBAL_POOLS)),
            ("fc_norm_init", self.fc_norm_init in FC_NORM_INITS, "one of " + ", ".join(FC_NORM_INITS)),
            ("smoothing", 0 <= self.smoothing < 1, "a number in [0, 1)"),
            ("mixup", self.mixup >= 0, "a number >= 0"),
            ("cutmix", self.cutmix >= 0, "a number >= 0"),
            ("mixup_prob", 0 <= self.mixup_prob <= 1, "a number in [0, 1]"),
            ("mixup_switch_prob", 0 <= self.mixup_switch_prob <= 1, "a number in [0, 1]"),
            ("randaug_n", self.randaug_n >= 0, "an integer >= 0"),
            ("randaug_m", 0 <= self.randaug_m <= 10, "an integer in [0, 10]"),
            ("randaug_mstd", 0 <= self.randaug_mstd <= 100, "a number in [0, 100]"),
            ("reprob", 0 <= self.reprob <= 1, "a number in [0, 1]"),
            ("ema_decay", 0 < self.ema_decay < 1, "a number in (0, 1)"),
            ("betas", all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"--{name.replace('_', '-')} {value} is invalid: must be {allowed}")
        if self.mixes and self.batch_size % 2:
            raise ValueError(f"--batch-size {self.batch_size} must be even with mixup / cutmix (timm's Mixup pairs "
                             "each image with its mirror in the batch); or turn them off with --mixup 0 --cutmix 0")

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


class FinetuneTask(ClassifierTask):
    """End-to-end fine-tuning of a ViTEncoder; see the module docstring for the recipe."""

    def __init__(self, cfg: FinetuneConfig, source: PretrainedSource, num_classes: int):
        depth = source.model_cfg.depth
        self.layer_decay = cfg.layer_decay if cfg.layer_decay is not None else default_layer_decay(depth)
        self.drop_path = cfg.drop_path if cfg.drop_path is not None else default_drop_path(depth)
        model = build_vit(source, num_classes, cfg.global_pool, drop_path=self.drop_path, img_size=cfg.img_size,
                          fc_norm_init=cfg.fc_norm_init)
        trunc_normal_head(model.head, std=2e-5)
        super().__init__(model, num_classes)
        self.cfg = cfg
        self.flops = 3 * encoder_forward_flops(source.model_cfg, cfg.img_size, num_classes)
        self.mixup = None
        if cfg.mixes:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=num_classes)
            self.criterion: Callable[[Tensor, Tensor], Tensor] = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.erasing: RandomErasing | None = None
        self.ema: ModelEmaV3 | None = None

    def setup(self, env: DistEnv, sync_bn: bool) -> None:
        # NHWC uint8 batches reach the patch embedding as channels-last views: its weight in the same layout.
        self.model.to(memory_format=torch.channels_last)
        if self.cfg.reprob > 0:
            self.erasing = RandomErasing(self.cfg.reprob, mode="pixel", max_count=1, device=env.device)
        if self.cfg.ema:
            self.ema = ModelEmaV3(self.model, decay=self.cfg.ema_decay)
            self.ema_model = self.ema.module

    def build_optimizer(self, peak_lr: float) -> torch.optim.Optimizer:
        groups = param_groups_layer_decay(self.model, self.cfg.weight_decay, self.model.no_weight_decay(),
                                          layer_decay=self.layer_decay)
        return torch.optim.AdamW(groups, lr=peak_lr, betas=self.cfg.betas, fused=True)

    def train_flops_per_image(self) -> int:
        return self.flops

    def forward_loss(self, forward: Callable[..., Any], batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        x = self.model.normalize(batch.images.to(device, non_blocking=True))  # (N, C, S, S) channels-last float
        target = batch.labels.to(device, non_blocking=True)
        if self.erasing is not None:
            x = self.erasing(x)  # per image, on normalised pixels (as after timm's transforms)
        if self.mixup is not None:
            x, target = self.mixup(x, target)  # soft targets (N, num_classes), label smoothing included
        loss = self.criterion(forward(x), target)
        return loss, loss.detach()[None]

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("--ema is on but the checkpoint has no EMA weights (it was written without --ema)")
            self.ema.module.load_state_dict(state["ema"])


PROTOCOL = Protocol(
    name="finetune",
    config_cls=FinetuneConfig,
    make_task=FinetuneTask,
    train_augment=lambda cfg: {"augment": "finetune", "randaug_n": cfg.randaug_n, "randaug_m": cfg.randaug_m,
                               "randaug_mstd": cfg.randaug_mstd, "randaug_inc": cfg.randaug_inc},
    description="End-to-end fine-tuning of a pre-trained encoder with a new classifier head (MAE protocol).",
)
check, run = PROTOCOL.check, PROTOCOL.run


def main(argv: list[str] | None = None) -> int:
    return PROTOCOL.main(argv)


if __name__ == "__main__":
    sys.exit(main())
