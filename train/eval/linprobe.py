"""Per-process entry of `./launch.sh linprobe`: a linear classifier on the frozen encoder (MAE protocol).

    ./launch.sh linprobe --ckpt RUN_DIR_OR_FILE --data TRAIN_SHARDS --eval-data EVAL_SHARDS [--field-name value ...]

The encoder (train.eval.encoder.ViTEncoder) is frozen, kept in eval mode and run without gradients (in bf16 autocast on
GPUs); its feature is the cls token after the final norm (MAE's linear-probe setting) or the mean of the normed
patch tokens (`--feature avg`, the feature SupMAE's classification branch sees). The head is MAE's:
BatchNorm1d(affine=False, eps=1e-6) + Linear, trained with LARS (timm's `Lars`, trust coefficient 0.001, layer
adaptation on the weight matrix only), momentum 0.9, weight decay 0, base lr 0.1, 90 epochs with 10 warm-up,
RandomResizedCrop(0.08-1) + flip. Top-1 / top-5 every epoch. The batch comes from the recipe (train/recipes.py):
`mae_in1k`, the default for both methods, is MAE's effective batch 16384 (2048 per GPU on 8); `supmae_in1k` is
SupMAE's released 8192 (512 per GPU x 2 accumulation x 8); `small` suits small data on one process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn

from pipeline.loaders.base import Batch
from train.config import option_field as _f
from train.distributed import DistEnv
from train.eval.encoder import GLOBAL_POOLS, PretrainedSource, ViTEncoder, build_vit, encoder_forward_flops
from train.eval.supervised import ClassifierTask, Protocol, SupervisedConfig, trunc_normal_head

LARS_TRUST = 1e-3  # MAE's LARS trust coefficient


@dataclass
class LinprobeConfig(SupervisedConfig):
    """`./launch.sh linprobe` options; defaults: MAE's linear-probing recipe."""

    batch_size: int = _f(2048, "batch per process (per GPU); MAE's effective batch 16384 = 2048 x 8 GPUs")
    epochs: int = _f(90, "epochs of the cosine schedule")
    warmup_epochs: float = _f(10.0, "linear warm-up epochs")
    blr: float = _f(0.1, "base learning rate: lr = blr x effective batch / 256")
    weight_decay: float = _f(0.0, "weight decay of the linear layer's weight (LARS)")
    random_area: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop area range")
    keep: int = _f(2, "keep the newest N checkpoints (best.pt is kept apart)")
    feature: str = _f("token", "token (cls token, MAE's probe) | avg (mean of the patch tokens)")
    momentum: float = _f(0.9, "LARS momentum")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature not in GLOBAL_POOLS:
            raise ValueError(f"--feature {self.feature} is invalid: must be one of {', '.join(GLOBAL_POOLS)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum {self.momentum} is invalid: must be a number in [0, 1)")


class LinearProbe(nn.Module):
    """Frozen ViTEncoder features -> BatchNorm1d(affine=False) -> Linear. The backbone never trains (no gradients,
    eval mode whatever `train()` says); only `head` has trainable parameters."""

    def __init__(self, backbone: ViTEncoder, num_classes: int):
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone
        dim = backbone.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """images (see ViTEncoder) -> (N, num_classes) logits."""
        with torch.no_grad():
            features = self.backbone.features(images)
        return self.head(features)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()
        return self


class LinearProbeTask(ClassifierTask):
    """Linear probing; see the module docstring for the recipe."""

    def __init__(self, cfg: LinprobeConfig, source: PretrainedSource, num_classes: int):
        backbone = build_vit(source, 0, cfg.feature, fc_norm=False, img_size=cfg.img_size)
        model = LinearProbe(backbone, num_classes)
        trunc_normal_head(model.head[1], std=0.01)
        super().__init__(model, num_classes)
        self.cfg = cfg
        # The backbone runs forward only; the head forward and backward.
        self.flops = encoder_forward_flops(source.model_cfg, cfg.img_size) + 3 * 2 * backbone.num_features * num_classes

    def setup(self, env: DistEnv, sync_bn: bool) -> None:
        self.model.backbone.to(memory_format=torch.channels_last)
        if sync_bn and env.distributed:
            self.model.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.head)

    def build_optimizer(self, peak_lr: float) -> torch.optim.Optimizer:
        linear = self.model.head[1]
        # MAE's LARS adapts the step of matrices only (weight decay too); the bias takes plain momentum SGD.
        groups = [{"params": [linear.weight], "weight_decay": self.cfg.weight_decay, "always_adapt": True},
                  {"params": [linear.bias], "weight_decay": 0.0, "always_adapt": False}]
        return Lars(groups, lr=peak_lr, momentum=self.cfg.momentum, trust_coeff=LARS_TRUST)

    def train_flops_per_image(self) -> int:
        return self.flops

    def forward_loss(self, forward: Callable[..., Any], batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(forward(batch.images.to(device, non_blocking=True)),
                               batch.labels.to(device, non_blocking=True))
        return loss, loss.detach()[None]


PROTOCOL = Protocol(
    name="linprobe",
    config_cls=LinprobeConfig,
    make_task=LinearProbeTask,
    train_augment=lambda cfg: {"augment": "pretrain"},
    description="Linear probe: BatchNorm + linear classifier trained with LARS on the frozen encoder (MAE protocol).",
)
check, run = PROTOCOL.check, PROTOCOL.run


def main(argv: list[str] | None = None) -> int:
    return PROTOCOL.main(argv)


if __name__ == "__main__":
    sys.exit(main())
