"""What the training loop trains: a `Task` owns the model, turns a batch into a loss, names the numbers it logs,
builds its optimiser and knows what to evaluate. `train.trainer.Trainer` runs any task with the same loop
(no-sync hot path, accumulation, non-finite skipping, checkpoints, exact resume, metrics).

    MaskedAutoencoderTask   SupMAE / MAE pre-training (this module)
    FinetuneTask            train/eval/finetune.py      LinearProbeTask   train/eval/linprobe.py

A task's hooks run inside the loop's rules: `forward_loss` and `after_step` never read a device value on the host;
`evaluate` runs on every rank and may synchronise (it is called between epochs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from model.mae import MaskedAutoencoderViT
from pipeline.loaders.base import Batch
from train.distributed import DistEnv
from train.eval.accuracy import TopKCounter
from train.optim import build_optimizer

if TYPE_CHECKING:
    from train.trainer import Trainer


class Task:
    """Base class of the objectives the Trainer runs. Subclasses set `model` and `logged` and implement
    `build_optimizer`, `train_flops_per_image` and `forward_loss`; the other hooks have neutral defaults."""

    model: nn.Module  # the bare module: the trainer moves it to the device, wraps it (DDP, compile), checkpoints it
    logged: tuple[str, ...] = ("loss",)  # per-micro-batch numbers averaged per log interval; logged[0] is the loss

    def setup(self, env: DistEnv, sync_bn: bool) -> None:
        """Called once the model is on `env.device`, before DDP wraps it (SyncBatchNorm, EMA copies, ...)."""

    def build_optimizer(self, peak_lr: float) -> torch.optim.Optimizer:
        """The optimiser over the trainable parameters; a param group's "lr_scale" multiplies the schedule's lr."""
        raise NotImplementedError

    def train_flops_per_image(self) -> int:
        """Training FLOPs per image (forward + backward), for the compute columns of the metrics."""
        raise NotImplementedError

    def forward_loss(self, forward: Callable[..., Any], batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        """(loss, logged values (len(logged),)) of one micro-batch, inside the trainer's autocast. `forward` is the
        wrapped model (DDP / compiled): call it for everything that needs gradients."""
        raise NotImplementedError

    def interval_losses(self, means: list[float]) -> dict[str, float | None]:
        """The loss fields of a metrics.jsonl train record from the interval means of `logged`."""
        return {"loss": means[0], "rec_loss": None, "cls_loss": None}

    def after_step(self) -> None:
        """After every optimiser step (e.g. an EMA update); device work only."""

    def evaluate(self, trainer: Trainer) -> dict[str, Any] | None:
        """Metrics on `trainer.eval_loader` (all ranks; every sample counted once), at least {"top1", "samples"}."""
        return None

    def improved(self, metrics: dict[str, Any]) -> bool:
        """Whether `metrics` (from `evaluate`) are the best so far; the trainer then keeps a `best.pt` copy."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Task state beyond the model's weights that an exact resume needs (EMA weights, best result)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MaskedAutoencoderTask(Task):
    """SupMAE / MAE pre-training: the masked-reconstruction loss plus, for SupMAE, the classification branch.

    Logged: loss, rec_loss, cls_loss (0 for MAE); evaluated: the SupMAE head's top-1 on held-out data, all patches
    visible, BatchNorm in eval mode.
    """

    logged = ("loss", "rec_loss", "cls_loss")

    def __init__(self, model: MaskedAutoencoderViT, mask_ratio: float, weight_decay: float,
                 betas: tuple[float, float]):
        self.model = model
        self.mask_ratio = mask_ratio
        self.weight_decay = weight_decay
        self.betas = betas

    def setup(self, env: DistEnv, sync_bn: bool) -> None:
        if sync_bn and env.distributed and self.model.cls_head is not None:
            self.model.cls_head = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.cls_head)

    def build_optimizer(self, peak_lr: float) -> torch.optim.Optimizer:
        return build_optimizer(self.model, peak_lr, self.weight_decay, self.betas)

    def train_flops_per_image(self) -> int:
        return self.model.train_flops_per_image(self.mask_ratio)

    def forward_loss(self, forward: Callable[..., Any], batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        out = forward(images, labels, mask_ratio=self.mask_ratio)
        cls = out.cls_loss if out.cls_loss is not None else torch.zeros((), device=device)
        return out.loss, torch.stack([out.loss.detach(), out.rec_loss.detach(), cls.detach()])

    def interval_losses(self, means: list[float]) -> dict[str, float | None]:
        loss, rec, cls = means
        return {"loss": loss, "rec_loss": rec, "cls_loss": cls if self.model.cls_head is not None else None}

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        model = self.model
        model.eval()
        try:
            counter = TopKCounter((1,), trainer.device)
            num_patches = model.cfg.num_patches
            for b in trainer.eval_loader:
                images = model.as_nhwc(b.images.to(trainer.device, non_blocking=True))
                labels = b.labels.to(trainer.device, non_blocking=True)
                ids = torch.arange(num_patches, device=trainer.device).expand(images.shape[0], -1)
                with trainer.autocast():
                    latent = model.forward_encoder(images, ids)
                    logits = model.cls_head(model.forward_features(latent))
                counter.update(logits, labels, b.valid, b.num_valid)
            result = counter.result(trainer.env)
        finally:
            model.train()
        return {"top1": result["top1"], "samples": result["samples"]}
