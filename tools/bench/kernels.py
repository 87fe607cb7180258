"""`./launch.sh bench kernels`: the fused Triton masking kernels against the reference ops, stage by stage and in a
whole training step, plus the original recipe's step measured in the same run.

Stage rows (at ViT-B/16 shapes by default: batch 256, 224x224, patch 16, mask 0.75, decoder width 512):
    gather (fwd)          uint8 NHWC pixels -> kept patch rows in the compute dtype
    unshuffle (fwd+bwd)   decoder tokens (N, 1+K, 512) -> (N, 1+L, 512) with mask token and position embedding
    loss (fwd+bwd)        norm-pix masked MSE from pred (N, L, 768) and the uint8 pixels
    3 stages              the three together (the issue's target: >= 3x faster fused)
Step rows: `train.step_timing.TrainStep` (forward, backward, AdamW step) for each model and configuration:
    original        fp16 autocast + GradScaler, normalised float NCHW input, reference masking, no compile
    ref / fused     bf16 (--dtype) autocast, uint8 NHWC input, reference / fused masking
    +compile        the same under torch.compile
On CPU the fused kernels would run under the Triton interpreter, whose timings say nothing about kernel speed: the
fused rows are skipped there (with a note) and the shapes default to small ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from model.masking import random_masking
from model.masking_ops import REFERENCE_OPS, MaskingOps, fused_ops
from tools.bench.model import load_note, start_load, time_train_step
from tools.bench.report import BenchReport, time_calls
from train.step_timing import DTYPES, StepSetup, original_recipe

DESCRIPTION = "fused Triton masking kernels vs reference ops, per stage and in a whole training step"
COLUMNS = ["part", "impl", "ms", "spread", "images/s", "GB/s", "TFLOP/s", "MFU", "peak MiB", "speedup"]
STEP_CONFIGS = {
    "original": "fp16+GradScaler, float NCHW input, reference masking, no compile (the original code's recipe)",
    "ref": "--dtype autocast, uint8 NHWC input, reference masking",
    "fused": "--dtype autocast, uint8 NHWC input, fused masking",
    "ref+compile": "ref under torch.compile",
    "fused+compile": "fused under torch.compile",
}
DECODER_DIM = 512  # SupMAE d1b and MAE d8b decoders are both 512 wide


@dataclass(frozen=True)
class KernelBenchConfig:
    device: torch.device
    batch_size: int
    img_size: int
    patch_size: int
    mask_ratio: float
    dtype: str
    models: tuple[str, ...]
    configs: tuple[str, ...]
    stages: bool
    warmup: int
    repeats: int
    stage_iters: int
    steps: int

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in STEP_CONFIGS]
        if unknown:
            raise ValueError(f"bench kernels: unknown --configs {unknown}; choose from {', '.join(STEP_CONFIGS)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"bench kernels: --img-size {self.img_size} is not a multiple of --patch-size "
                             f"{self.patch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench kernels: --dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("batch_size", "img_size", "repeats", "stage_iters", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench kernels: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"bench kernels: --warmup must be >= 0, got {self.warmup}")

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------------------------------------------------- stages
class StageInputs:
    """Synthetic tensors of one training step's three masking stages, on the device."""

    def __init__(self, cfg: KernelBenchConfig):
        dev, n, p = cfg.device, cfg.batch_size, cfg.patch_size
        g = torch.Generator(device=dev).manual_seed(0)
        self.n, self.p, self.dtype = n, p, DTYPES[cfg.dtype]
        self.num_patches = (cfg.img_size // p) ** 2
        self.keep = max(1, int(self.num_patches * (1 - cfg.mask_ratio)))
        self.patch_dim = p * p * 3
        self.images = torch.randint(0, 256, (n, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, device=dev,
                                    generator=g)
        self.ids_keep, self.mask = random_masking(torch.rand(n, self.num_patches, device=dev, generator=g), self.keep)
        std = torch.tensor([0.229, 0.224, 0.225], device=dev)
        self.scale, self.shift = 1.0 / (255.0 * std), -torch.tensor([0.485, 0.456, 0.406], device=dev) / std
        d = DECODER_DIM
        self.x = torch.randn(n, 1 + self.keep, d, device=dev, generator=g).to(self.dtype).requires_grad_()
        self.mask_token = (0.02 * torch.randn(1, 1, d, device=dev, generator=g)).requires_grad_()
        self.pos_embed = torch.randn(1, 1 + self.num_patches, d, device=dev, generator=g)
        self.grad_tokens = torch.randn(n, 1 + self.num_patches, d, device=dev, generator=g)
        self.pred = torch.randn(n, self.num_patches, self.patch_dim, device=dev, generator=g).to(self.dtype)
        self.pred.requires_grad_()

    def stage_bytes(self) -> dict[str, float]:
        """Compulsory memory traffic of each stage (each input read once, each output written once)."""
        n, k, L, P, d = self.n, self.keep, self.num_patches, self.patch_dim, DECODER_DIM
        b = self.dtype.itemsize
        masked = L - k
        gather = n * k * P * (1 + b)
        unshuffle = 2 * (n * (1 + k) * d * b + n * (1 + L) * d * 4)  # fwd: read x, write fp32; bwd: the reverse
        loss = 2 * n * masked * P * (b + 1) + n * L * P * b  # fwd + bwd read masked pred + pixels; bwd writes grad
        return {"gather (fwd)": gather, "unshuffle (fwd+bwd)": unshuffle, "loss (fwd+bwd)": loss,
                "3 stages": gather + unshuffle + loss}

    def stage_fns(self, ops: MaskingOps) -> dict[str, Callable[[], Any]]:
        def gather():
            return ops.gather_visible_patches(self.images, self.ids_keep, self.p, self.scale, self.shift, self.dtype)

        def unshuffle():
            out = ops.unshuffle_decoder_tokens(self.x, self.ids_keep, self.mask_token, self.pos_embed)
            return torch.autograd.grad(out, (self.x, self.mask_token), self.grad_tokens)

        def loss():
            value = ops.masked_patch_loss(self.pred, self.images, self.mask, self.p, True, self.scale, self.shift)
            return torch.autograd.grad(value, self.pred)

        def all_three():
            gather(), unshuffle(), loss()

        return {"gather (fwd)": gather, "unshuffle (fwd+bwd)": unshuffle, "loss (fwd+bwd)": loss,
                "3 stages": all_three}


def _sync(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def time_stages(cfg: KernelBenchConfig, report: BenchReport) -> None:
    inputs = StageInputs(cfg)
    impls: list[MaskingOps] = [REFERENCE_OPS]
    if cfg.gpu:
        impls.append(fused_ops())
    else:
        report.notes.append("CPU: fused stage rows skipped (the Triton interpreter's timings say nothing about "
                            "kernel speed); run on a GPU for them.")
    nbytes = inputs.stage_bytes()
    reference_ms: dict[str, float] = {}
    sync = _sync(cfg.device)
    for ops in impls:
        for part, fn in inputs.stage_fns(ops).items():
            def run_iters(fn=fn):
                for _ in range(cfg.stage_iters):
                    fn()

            if cfg.gpu:
                torch.cuda.synchronize(cfg.device)
                base = torch.cuda.memory_allocated(cfg.device)
                torch.cuda.reset_peak_memory_stats(cfg.device)
            timing = time_calls(run_iters, warmup=max(1, cfg.warmup), repeats=cfg.repeats, sync=sync)
            ms = timing.median / cfg.stage_iters * 1e3
            extra = (torch.cuda.max_memory_allocated(cfg.device) - base) / 2**20 if cfg.gpu else None
            if ops is REFERENCE_OPS:
                reference_ms[part] = ms
            report.add_row(part=part, impl=ops.name, ms=ms, spread=f"±{timing.spread:.1%}",
                           **{"images/s": inputs.n / ms * 1e3, "GB/s": nbytes[part] / ms / 1e6, "peak MiB": extra,
                              "speedup": reference_ms[part] / ms if ops is not REFERENCE_OPS else None})


# -------------------------------------------------------------------------------------------------------------- steps
def step_setup(cfg: KernelBenchConfig, model: str, config: str) -> StepSetup:
    base = StepSetup(model=model, batch_size=cfg.batch_size, img_size=cfg.img_size, patch_size=cfg.patch_size,
                     dtype=cfg.dtype, fused="off", mask_ratio=cfg.mask_ratio, device=str(cfg.device))
    if config == "original":
        return original_recipe(base)
    return replace(base, fused="on" if config.startswith("fused") else "off", compile=config.endswith("+compile"))


def time_steps(cfg: KernelBenchConfig, report: BenchReport) -> None:
    configs = list(cfg.configs)
    if not cfg.gpu and any(c.startswith("fused") for c in configs):
        configs = [c for c in configs if not c.startswith("fused")]
        report.notes.append("CPU: fused step rows skipped (Triton runs only under the interpreter there).")
    for model in cfg.models:
        original_rate = None
        for config in configs:
            setup = step_setup(cfg, model, config)
            row = time_train_step(setup, warmup=cfg.warmup, repeats=cfg.repeats, steps=cfg.steps)
            if config == "original":
                original_rate = row["images/s"]
            peak = row.pop("peak GiB")
            row.pop("min ms/step")
            report.add_row(part=f"step {model}", impl=f"{config}: {setup.describe()}", ms=row.pop("ms/step"),
                           **row, **{"peak MiB": peak * 1024 if peak is not None else None,
                                     "speedup": row["images/s"] / original_rate if original_rate else None})


# ---------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    p.add_argument("--img-size", type=int, default=None, help="default 224 on GPU, 64 on CPU")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype of the stages and autocast dtype of the non-original steps "
                        "(default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--models", default="supmae_vit_base_patch16,mae_vit_base_patch16",
                   help="presets for the training-step rows (comma-separated)")
    p.add_argument("--configs", default=None,
                   help="training-step configurations, comma-separated from: " + ", ".join(STEP_CONFIGS)
                        + " (default: all on GPU; ref on CPU, where fp16 is emulated and fused/compile say "
                          "nothing about GPU speed); '' for none")
    p.add_argument("--no-stages", dest="stages", action="store_false", help="skip the per-stage rows")
    p.add_argument("--stage-iters", type=int, default=None, help="stage calls per timed repeat (default 20 GPU, 2 CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat (default 5 GPU, 1 CPU)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda when available)")


def config_from_args(args: argparse.Namespace) -> KernelBenchConfig:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    configs = args.configs if args.configs is not None else (",".join(STEP_CONFIGS) if gpu else "ref")
    return KernelBenchConfig(
        device=device,
        batch_size=(256 if gpu else 8) if args.batch_size is None else args.batch_size,
        img_size=(224 if gpu else 64) if args.img_size is None else args.img_size,
        patch_size=args.patch_size,
        mask_ratio=args.mask_ratio,
        dtype=args.dtype or ("bf16" if gpu else "fp32"),
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        configs=tuple(c.strip() for c in configs.split(",") if c.strip()),
        stages=args.stages,
        warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        repeats=(10 if gpu else 3) if args.repeats is None else args.repeats,
        stage_iters=(20 if gpu else 2) if args.stage_iters is None else args.stage_iters,
        steps=(5 if gpu else 1) if args.steps is None else args.steps,
    )


def run(args: argparse.Namespace) -> BenchReport:
    cfg = config_from_args(args)
    load = start_load(cfg.device)
    report = BenchReport("bench kernels", COLUMNS, settings={
        "device": str(cfg.device), "batch_size": cfg.batch_size, "img_size": cfg.img_size,
        "patch_size": cfg.patch_size, "mask_ratio": cfg.mask_ratio, "dtype": cfg.dtype,
        "decoder_dim": DECODER_DIM, "warmup": cfg.warmup, "repeats": cfg.repeats,
        "stage_iters": cfg.stage_iters, "steps_per_repeat": cfg.steps,
    })
    if not cfg.gpu:
        report.notes.append(f"CPU run at small shapes (batch {cfg.batch_size}, {cfg.img_size}x{cfg.img_size}): "
                            "a smoke test of the benchmark, not GPU-comparable figures. The original recipe's fp16 "
                            "is emulated on CPU (slow), so it runs only when --configs names it.")
    if cfg.stages:
        time_stages(cfg, report)
    if cfg.configs and cfg.models:
        time_steps(cfg, report)
    report.notes += [
        "Stage rows: ms per call; GB/s = compulsory traffic (each input read once, each output written once; "
        "masked patches only where the fused loss skips the rest) / time; peak MiB = memory allocated above the "
        "inputs; speedup = reference ms / fused ms.",
        "Step rows: forward + backward + AdamW step on synthetic input on the device (train.step_timing); "
        "TFLOP/s from the analytic training FLOPs; speedup = images/s / the original recipe's images/s (same model).",
    ]
    if note := load_note(load):
        report.notes.append(note)
    return report
