"""`./launch.sh bench model`: training-step throughput of model presets on synthetic input.

Rows: one per model preset (and configuration), with ms/step, images/s, achieved TFLOP/s (analytic training FLOPs,
`model.train_flops_per_image`), MFU against the device's dense peak (GPU only, train/hardware.py) and peak memory.
The step is `train.step_timing.TrainStep`, the same one `bench kernels` and tools/gpu_check.sh time.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

from tools.bench.report import BenchReport, time_calls
from train.hardware import peak_tflops
from train.step_timing import DTYPES, INPUT_FORMATS, StepSetup, TrainStep

DESCRIPTION = "training-step images/s, ms/step, TFLOP/s, MFU (GPU) and peak memory on synthetic input"
COLUMNS = ["model", "config", "batch", "ms/step", "spread", "min ms/step", "images/s", "TFLOP/s", "MFU", "peak GiB"]
DEFAULT_MODELS = "supmae_vit_base_patch16,mae_vit_base_patch16"


@dataclass(frozen=True)
class ModelBenchConfig:
    setups: tuple[StepSetup, ...]
    warmup: int
    repeats: int
    steps: int

    def __post_init__(self) -> None:
        for name in ("warmup", "steps", "repeats"):
            v = getattr(self, name)
            if v < (0 if name == "warmup" else 1):
                raise ValueError(f"bench model: --{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {v}")


def time_train_step(setup: StepSetup, *, warmup: int, repeats: int, steps: int) -> dict[str, Any]:
    """Build `setup`, run `warmup` untimed steps (compilation happens there), then `repeats` timed runs of `steps`
    steps each; returns the row values (median per step and its spread)."""
    step = TrainStep(setup)
    try:
        def run_steps() -> None:
            for _ in range(steps):
                step()

        for _ in range(warmup):
            step()
        step.sync()
        step.reset_peak_memory()
        timing = time_calls(run_steps, warmup=0, repeats=repeats, sync=step.sync)
        seconds = timing.median / steps
        images_per_s = setup.batch_size / seconds
        tflops = step.flops_per_image * images_per_s / 1e12
        peak = peak_tflops(step.device, DTYPES[setup.dtype])
        memory = step.peak_memory_bytes()
        return {
            "ms/step": seconds * 1e3,
            "spread": f"±{timing.spread:.1%}",
            "min ms/step": min(timing.seconds) / steps * 1e3,
            "images/s": images_per_s,
            "TFLOP/s": tflops,
            "MFU": f"{tflops / peak:.1%}" if peak else None,
            "peak GiB": memory / 2**30 if memory is not None else None,
        }
    finally:
        step.close()


def load_note(start: float | None) -> str | None:
    """CPU runs: the 1-minute load average at the start and end, so that contention from other processes is on record."""
    if start is None or not hasattr(os, "getloadavg"):
        return None
    return (f"Load average (1 min) {start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, on "
            f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPUs: above the core count other processes were competing for the CPU.")


def start_load(device: torch.device) -> float | None:
    return os.getloadavg()[0] if device.type == "cpu" and hasattr(os, "getloadavg") else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated presets (default {DEFAULT_MODELS})")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 256 on GPU, 16 on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--patch-size", type=int, default=None, help="override the preset's patch size")
    p.add_argument("--num-classes", type=int, default=None, help="override the preset's class count")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype; fp16 adds GradScaler (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                   help="fused Triton masking kernels (auto = on for CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for GPU, off on CPU)")
    p.add_argument("--input", choices=INPUT_FORMATS, default="uint8_nhwc",
                   help="synthetic input: uint8 NHWC (the DALI pipeline's) or normalised float NCHW")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat (default 10 GPU, 1 CPU)")
    p.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: cuda when available)")


def config_from_args(args: argparse.Namespace) -> ModelBenchConfig:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if not gpu and args.fused == "on":
        raise ValueError("bench model: --fused on needs a GPU: on CPU the Triton kernels only run under the "
                         "interpreter, whose timings mean nothing; use --fused auto/off")
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError("bench model: --models is empty")
    batch_size = (256 if gpu else 16) if args.batch_size is None else args.batch_size
    setups = tuple(
        StepSetup(model=m, batch_size=batch_size, img_size=args.img_size,
                  patch_size=args.patch_size, num_classes=args.num_classes, dtype=dtype, fused=args.fused,
                  compile=gpu if args.compile is None else args.compile, input_format=args.input,
                  grad_scaler=dtype == "fp16", device=str(device))
        for m in models
    )
    return ModelBenchConfig(setups, warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
                            repeats=(5 if gpu else 3) if args.repeats is None else args.repeats,
                            steps=(10 if gpu else 1) if args.steps is None else args.steps)


def run(args: argparse.Namespace) -> BenchReport:
    cfg = config_from_args(args)
    first = cfg.setups[0]
    load = start_load(first.torch_device)
    mc = first.model_config()
    report = BenchReport("bench model", COLUMNS, settings={
        "device": str(first.torch_device), "batch_size": first.batch_size, "img_size": mc.img_size,
        "patch_size": mc.patch_size, "num_classes": mc.num_classes, "dtype": first.dtype,
        "fused": first.fused, "compile": first.compile, "input": first.input_format,
        "warmup": cfg.warmup, "repeats": cfg.repeats, "steps_per_repeat": cfg.steps,
    })
    for setup in cfg.setups:
        row = time_train_step(setup, warmup=cfg.warmup, repeats=cfg.repeats, steps=cfg.steps)
        report.add_row(model=setup.model, config=setup.describe(), batch=setup.batch_size, **row)
    report.notes.append("images/s and ms/step: median over repeats of a full training step (forward, backward, "
                        "AdamW step) on synthetic input already on the device; spread = half the min-max range; "
                        "min ms/step = the fastest repeat (the least disturbed one on a shared machine).")
    report.notes.append("TFLOP/s: analytic training FLOPs (3x forward matmuls + attention, model/flops.py) x images/s.")
    if first.torch_device.type != "cuda":
        report.notes.append("CPU run: MFU needs a GPU peak figure (train/hardware.py) and peak memory the CUDA "
                            "allocator, so both are left out; masking runs the reference path (Triton needs CUDA).")
    if note := load_note(load):
        report.notes.append(note)
    return report
