"""`./launch.sh bench memory`: GPU memory of a training step per model preset and per-GPU batch.

Computed on any machine, from what a step keeps alive at its peak (the end of the forward pass):
    weights (fp32) + gradients (fp32) + AdamW's two moments (fp32)      16 bytes per trainable parameter
  + the activations saved for the backward pass, counted on the autograd graph of a real forward pass under the
    run's autocast dtype (saved_tensors_hooks; each storage once, parameters excluded), at batch 2 and 4: the
    slope is the per-image cost, the rest (autocast's low-precision weight copies) is per step.
Measured on a GPU as well (`torch.cuda.max_memory_allocated` over real training steps, train/step_timing.py).

The computed figure leaves out the CUDA context (~0.5 GiB), the caching allocator's fragmentation, cuBLAS / NCCL
workspaces and DDP's gradient buckets (another 4 bytes per parameter): keep ~15% headroom (docs/training.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from model import create_model
from model.mae import MaskedAutoencoderViT
from tools.bench.report import BenchReport, int_list
from train.step_timing import DTYPES, StepSetup, TrainStep

TIMED = False  # computed, not timed: --warmup / --repeats do not apply
DESCRIPTION = "GPU memory per model and per-GPU batch: computed from parameters, AdamW state and saved activations"
COLUMNS = ["model", "batch", "params M", "weights+grads+AdamW GiB", "activations MiB/image", "computed GiB",
           "measured GiB"]
DEFAULT_MODELS = "supmae_vit_base_patch16,mae_vit_base_patch16,supmae_vit_large_patch16,mae_vit_large_patch16"
DEFAULT_BATCHES = "64,128,256"
BYTES_PER_TRAINABLE = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class MemoryBenchConfig:
    models: tuple[str, ...]
    batches: tuple[int, ...]
    dtype: str
    measure: bool  # also run real steps on the GPU

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("--models is empty")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batch-sizes must be integers >= 1, got {list(self.batches)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype} is invalid: must be one of {', '.join(DTYPES)}")
        if self.measure and not torch.cuda.is_available():
            raise ValueError("--measure needs a GPU (CUDA is not available here); the computed column needs none")


def saved_activation_bytes(model: MaskedAutoencoderViT, batch: int, dtype: str) -> int:
    """Bytes of the tensors a forward pass of `batch` uint8 images saves for backward (each storage once, the
    model's parameters excluded), under autocast `dtype` on the model's device."""
    cfg = model.cfg
    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(0, 256, (batch, cfg.img_size, cfg.img_size, cfg.in_chans), generator=g,
                           dtype=torch.uint8).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    autocast = (torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32"
                else torch.autocast(device.type, enabled=False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(images, labels if model.cls_head is not None else None)
    del out
    return sum(seen.values())


def computed_row(name: str, dtype: str, device: torch.device) -> dict[str, float]:
    """Static bytes, per-step bytes and per-image activation bytes of preset `name`."""
    torch.manual_seed(0)
    model = create_model(name, fused_masking="off").to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # Batches of 2 and 4 (training-mode BatchNorm in SupMAE's head needs 2): the slope is the per-image cost.
    two, four = (saved_activation_bytes(model, b, dtype) for b in (2, 4))
    per_image = (four - two) // 2
    return {"params": trainable + frozen, "static": BYTES_PER_TRAINABLE * trainable + 4 * frozen,
            "per_image": per_image, "per_step": max(0, two - 2 * per_image)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated presets (default {DEFAULT_MODELS})")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES, help=f"per-GPU batches (default {DEFAULT_BATCHES})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype of the step (bf16)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure real steps on the GPU (default: when CUDA is available)")


def config_from_args(args: argparse.Namespace) -> MemoryBenchConfig:
    batches = int_list(args.batch_sizes, "--batch-sizes", "64,128")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    measure = torch.cuda.is_available() if args.measure is None else args.measure
    return MemoryBenchConfig(models, batches, args.dtype, measure)


def run(args: argparse.Namespace) -> BenchReport:
    cfg = config_from_args(args)
    device = torch.device("cuda" if cfg.measure else "cpu")
    report = BenchReport("bench memory", COLUMNS, settings={"dtype": cfg.dtype, "img_size": 224, "mask_ratio": 0.75,
                                                            "counted_on": device.type})
    for name in cfg.models:
        row = computed_row(name, cfg.dtype, device)
        for batch in cfg.batches:
            total = row["static"] + row["per_step"] + batch * row["per_image"]
            measured = None
            if cfg.measure:
                step = TrainStep(StepSetup(model=name, batch_size=batch, dtype=cfg.dtype, device="cuda"))
                try:
                    step.reset_peak_memory()
                    for _ in range(2):
                        step()
                    step.sync()
                    measured = step.peak_memory_bytes() / 2**30
                except torch.OutOfMemoryError:
                    measured = float("inf")
                finally:
                    step.close()
            report.add_row(model=name, batch=batch, **{"params M": row["params"] / 1e6,
                           "weights+grads+AdamW GiB": row["static"] / 2**30,
                           "activations MiB/image": row["per_image"] / 2**20, "computed GiB": total / 2**30,
                           "measured GiB": measured})
    report.notes.append("computed GiB = 16 bytes per trainable parameter (fp32 weight, gradient, AdamW moments) + "
                        f"the activations saved for backward under {cfg.dtype} autocast, counted on the autograd "
                        f"graph of a real forward pass ({device.type}); batch x per-image + the per-step part.")
    report.notes.append("not included: CUDA context (~0.5 GiB), allocator fragmentation, cuBLAS/NCCL workspaces, "
                        "DDP gradient buckets (4 bytes per parameter): keep ~15% headroom.")
    if not cfg.measure:
        report.notes.append("no GPU: the measured column is empty (run this on a GPU machine to fill it).")
    return report
