"""The check's steps and their time budgets (what tools/gpu_check/__init__.py describes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    title: str
    budget_s: int  # on a GPU (the eight-minute plan for one H100/H200)
    smoke_budget_s: int  # --cpu-smoke: generous, the CPU run takes a few seconds per step

    def report_path(self, out: Path) -> Path:
        return out / "steps" / f"{self.number:02d}-{self.name}.json"


STEPS = (
    Step(1, "environment", "GPU, driver and software", 20, 60),
    Step(2, "parity", "fused Triton kernels vs the reference ops, compiled for this GPU", 95, 120),
    Step(3, "train-step", "SupMAE / MAE ViT-B/16 training step, batch 256", 140, 120),
    Step(4, "trainer", "the real trainer with --sync-check, checkpoint and exact resume", 110, 120),
    Step(5, "ddp", "NCCL process group, trainer through its DDP wrapper, world size 1", 45, 90),
    Step(6, "dali", "DALI GPU decoding, eval pipeline, data wait of the real loop", 70, 120),
)
TOTAL_BUDGET_S = sum(s.budget_s for s in STEPS)  # 480 s: the eight minutes
