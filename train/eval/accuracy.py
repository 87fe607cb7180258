"""Top-k accuracy counted on the device and reduced across ranks, each sample once.

    counter = TopKCounter((1, 5), device)
    for b in eval_loader:                                    # eval loaders give every sample once over all ranks
        counter.update(model(b.images), b.labels, b.valid, b.num_valid)
    counter.result(env)                                     # {"top1": ..., "top5": ..., "samples": N} on every rank

A sample is a top-k hit when its label is among the k highest scores (`Tensor.topk`, as timm's `accuracy`); with
fewer than k classes every sample is a top-k hit. Padding rows (`valid=False`, which eval loaders add to complete
the last batch and to equalise ranks) are never counted. Hits accumulate in a device tensor and the sample count
on the host (`Batch.num_valid`), so `update` never synchronises; `result` does one all-reduce of each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from train.distributed import DistEnv, control_group


def topk_hits(scores: Tensor, labels: Tensor, ks: Sequence[int], valid: Tensor | None = None) -> Tensor:
    """(len(ks),) int64: how many rows of `scores` (N, C) have their label (N,) among the top k, for each k in `ks`,
    counting only rows where `valid` (N,) is True (all rows when None)."""
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    maxk = min(max(ks), scores.shape[1])
    top = scores.topk(maxk, dim=1).indices  # (N, maxk)
    hit = (top == labels[:, None]).cumsum(dim=1).clamp_(max=1)  # hit[:, j]: label within the top j + 1
    if valid is not None:
        hit = hit * valid[:, None].to(hit.dtype)
    per_k = hit.sum(dim=0)
    return torch.stack([per_k[min(k, maxk) - 1] for k in ks]).to(torch.int64)


class TopKCounter:
    """Accumulates top-k hits (and optionally a per-sample loss) over batches; see the module docstring."""

    def __init__(self, ks: Sequence[int] = (1, 5), device: torch.device | str = "cpu", with_loss: bool = False):
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
        self.ks = tuple(ks)
        self.device = torch.device(device)
        self.hits = torch.zeros(len(self.ks), dtype=torch.int64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device) if with_loss else None
        self.samples = 0

    def update(self, scores: Tensor, labels: Tensor, valid: Tensor | None = None, num_valid: int | None = None,
               losses: Tensor | None = None) -> None:
        """One batch: scores (N, C), labels (N,), valid (N,) bool or None, num_valid = real rows (host int; computed
        from `valid` when not given, which synchronises), losses (N,) per-sample losses when counting the loss."""
        if valid is not None:
            valid = valid.to(scores.device)
        self.hits += topk_hits(scores, labels, self.ks, valid)
        if self.loss_sum is not None:
            if losses is None:
                raise ValueError("this counter sums a loss: pass losses=(N,) per-sample losses")
            losses = losses.double()
            self.loss_sum += (losses * valid).sum() if valid is not None else losses.sum()
        if num_valid is None:
            num_valid = len(labels) if valid is None else int(valid.sum())
        self.samples += num_valid

    def result(self, env: DistEnv | None = None) -> dict[str, float | int]:
        """{"top<k>": fraction for each k, "samples": N[, "loss": mean]} over all ranks (a collective when
        distributed: every rank must call it)."""
        hits = self.hits.clone()
        loss = self.loss_sum.clone() if self.loss_sum is not None else None
        samples = torch.tensor([self.samples], dtype=torch.int64)
        if env is not None and env.distributed:
            dist.all_reduce(hits)
            if loss is not None:
                dist.all_reduce(loss)
            dist.all_reduce(samples, group=control_group())
        n = int(samples.item())
        out: dict[str, float | int] = {f"top{k}": h / max(1, n) for k, h in zip(self.ks, hits.tolist(), strict=True)}
        out["samples"] = n
        if loss is not None:
            out["loss"] = float(loss.item()) / max(1, n)
        return out
