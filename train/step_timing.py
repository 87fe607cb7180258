"""One training step of a model preset on synthetic input, built for timing.

Used by `./launch.sh bench model`, `./launch.sh bench kernels` and tools/gpu_check.sh (through the two benchmarks),
so that every throughput figure of the project comes from the same step:

    optimizer.zero_grad(); with autocast(dtype): loss = model(images, labels).loss; loss.backward(); optimizer.step()

(with GradScaler for the fp16 recipe), with the trainer's AdamW settings and weight-decay groups (train/optim.py)
but none of its bookkeeping (lr schedule, gradient norm, logging): tools/bench/trainer_overhead.py measures that. The input lives on the model's device from the start (uint8 NHWC as the DALI
pipeline emits it, or normalised float NCHW as the original DataLoader does), so only the model is measured; the
masking noise is drawn inside the model every step, as in training.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace

import torch

from model.config import FUSED_MASKING_MODES, model_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INPUT_FORMATS = ("uint8_nhwc", "float_nchw")


@dataclass(frozen=True)
class StepSetup:
    """What to time. `dtype` is the autocast dtype (fp32 = no autocast)."""

    model: str = "supmae_vit_base_patch16"
    batch_size: int = 256
    img_size: int | None = None  # None: the preset's
    patch_size: int | None = None
    num_classes: int | None = None
    dtype: str = "bf16"
    fused: str = "auto"  # the model's fused_masking switch
    compile: bool = False
    input_format: str = "uint8_nhwc"
    grad_scaler: bool = False  # the fp16 recipe's loss scaling (one host sync per step, as in the original code)
    fused_adamw: bool = True  # the trainer's fused AdamW (train/optim.py); False: torch's default implementation
    mask_ratio: float = 0.75
    device: str | None = None  # None: cuda when available, else cpu

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"step setup: batch_size must be a positive int, got {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"step setup: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.fused not in FUSED_MASKING_MODES:
            raise ValueError(f"step setup: fused must be one of {FUSED_MASKING_MODES}, got {self.fused!r}")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"step setup: input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.grad_scaler and self.dtype != "fp16":
            raise ValueError(f"step setup: grad_scaler is for fp16 autocast, got dtype {self.dtype!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"step setup: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        self.model_config()  # validates the preset and the overrides

    def model_config(self):
        overrides = {k: v for k, v in (("img_size", self.img_size), ("patch_size", self.patch_size),
                                       ("num_classes", self.num_classes)) if v is not None}
        return model_config(self.model, fused_masking=self.fused, **overrides)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def describe(self) -> str:
        """Short label, e.g. 'bf16 fused compile uint8-NHWC' or 'fp16+scaler reference float-NCHW'."""
        masking = {"on": "fused", "off": "reference"}.get(self.fused)
        if masking is None:  # auto
            masking = "fused" if self.torch_device.type == "cuda" else "reference"
        parts = [self.dtype + ("+scaler" if self.grad_scaler else ""), masking]
        if self.compile:
            parts.append("compile")
        parts.append({"uint8_nhwc": "uint8-NHWC", "float_nchw": "float-NCHW"}[self.input_format])
        return " ".join(parts)


def original_recipe(setup: StepSetup) -> StepSetup:
    """The original MAE / SupMAE code's recipe as this project's reference path reproduces it: fp16 autocast with
    GradScaler, normalised float NCHW input, reference masking, no compile, torch's default AdamW."""
    return replace(setup, dtype="fp16", grad_scaler=True, input_format="float_nchw", fused="off", compile=False,
                   fused_adamw=False)


class TrainStep:
    """A built model + optimizer + synthetic batch; calling it runs one training step (no host sync on CUDA except
    the GradScaler's, which is part of that recipe)."""

    def __init__(self, setup: StepSetup, seed: int = 0):
        from model.mae import MaskedAutoencoderViT  # the model imports timm: keep this module's import light
        from train.optim import param_groups  # the trainer's weight-decay groups: one definition of them

        self.setup = setup
        self.device = setup.torch_device
        cfg = setup.model_config()
        torch.manual_seed(seed)
        self.model = MaskedAutoencoderViT(cfg).to(self.device).train()
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(self.model, 0.05)]
        self.optimizer = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=setup.fused_adamw or None)
        self.scaler = torch.amp.GradScaler(self.device.type) if setup.grad_scaler else None
        self.amp_dtype = None if setup.dtype == "fp32" else DTYPES[setup.dtype]
        self.forward = torch.compile(self.model) if setup.compile else self.model

        g = torch.Generator(device=self.device).manual_seed(seed)
        n, s, c = setup.batch_size, cfg.img_size, cfg.in_chans
        if setup.input_format == "uint8_nhwc":
            self.images = torch.randint(0, 256, (n, s, s, c), dtype=torch.uint8, device=self.device, generator=g)
        else:
            self.images = torch.randn((n, c, s, s), device=self.device, generator=g)
        self.labels = torch.randint(0, cfg.num_classes, (n,), device=self.device, generator=g)
        self.flops_per_image = self.model.train_flops_per_image(setup.mask_ratio)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.forward(self.images, self.labels, mask_ratio=self.setup.mask_ratio).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int | None:
        """Peak CUDA memory allocated since `reset_peak_memory` (None on CPU: no allocator statistics there)."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        """Free the model, optimizer state and compiled graphs so the next setup starts from an empty device."""
        del self.forward, self.model, self.optimizer, self.images, self.labels
        if self.setup.compile:
            torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
