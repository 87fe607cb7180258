"""Trainer overhead: the real `train.trainer.Trainer` loop vs a bare loop over the same training step.

    python -m tools.bench.trainer_overhead [--models supmae_vit_base_patch16] [--batch-size 16] [--dtype fp32]

Bare step: `train.step_timing.TrainStep` (zero_grad, forward, backward, fused AdamW step; nothing else), the step
`./launch.sh bench model` times. Trainer: `Trainer.train()` on an identical model and batch, fed by an in-memory
loader, with a RunLog writing metrics.jsonl every --log-every steps. The two alternate step by step (see
`paired_times`), so load drifting on a shared machine hits both alike. Overhead = trainer time / bare time - 1.

Module protocol of `./launch.sh bench` (DESCRIPTION, add_arguments, run -> BenchReport), so it can be registered
there as a subcommand; runnable on its own meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from pipeline.loaders.base import Batch
from pipeline.loaders.memory_loader import InMemoryLoader
from tools.bench.report import BenchReport, spread_text
from train.config import TrainConfig
from train.distributed import DistEnv
from train.metrics import RunLog
from train.step_timing import DTYPES, StepSetup, TrainStep
from train.trainer import Trainer

DESCRIPTION = "the trainer's real loop vs a bare loop over the same step (overhead must stay under 5%)"
COLUMNS = ["model", "config", "batch", "pairs", "bare ms", "trainer ms", "overhead (total)",
           "overhead (median pair)", "bare spread"]


@dataclass
class PairedTimes:
    bare: list[float]  # seconds of each bare step
    trainer: list[float]  # seconds of the trainer loop's iteration right after it


def paired_times(setup: StepSetup, steps: int, warmup: int, log_every: int) -> PairedTimes:
    """Alternate one bare step and one iteration of the real Trainer loop, `warmup + steps` times.

    The trainer reads its batches from an in-memory loader whose batch function first runs (and times) one bare
    step; a trainer iteration is the time from the end of that bare step to the next batch request: the trainer's
    train_step, stop poll, log-interval and checkpoint bookkeeping and the loader wrapper. Adjacent in time, the
    two share whatever load the machine has.
    """
    bare, trained = TrainStep(setup), TrainStep(setup)  # same initialisation, inputs and optimiser settings
    mc = setup.model_config()
    fixed = Batch(trained.images, trained.labels, None, setup.batch_size)
    times = PairedTimes([], [])
    last_end: list[float] = []

    def make(epoch: int, index: int) -> Batch:
        now = time.perf_counter()
        if last_end:
            times.trainer.append(now - last_end[0])
        # The bare step takes the learning rate the trainer's next step will use, so the two models train alike (not
        # bit-equal: each draws its own masks). At a fixed lr the bare model drifted into another regime, and on a
        # CPU its speed with it (denormal activations slowed the trainer's model by 5-10%).
        for g in bare.optimizer.param_groups:
            g["lr"] = trainer.schedule(trainer.step)
        bare()
        bare.sync()
        end = time.perf_counter()
        times.bare.append(end - now)
        last_end[:] = [end]
        return fixed

    total = warmup + steps
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                data="synthetic", out=tmp, model=setup.model,
                model_args={k: v for k, v in mc.to_dict().items() if k != "img_size"}, img_size=mc.img_size,
                mask_ratio=setup.mask_ratio, batch_size=setup.batch_size, epochs=1, warmup_epochs=0.0,
                max_steps=total + 1, precision=setup.dtype, compile="on" if setup.compile else "off",
                log_every=log_every, ckpt_every=0, display="off", tensorboard=False, device=setup.torch_device.type,
            )
            # One step more than measured: the last measured iteration ends at the next batch request.
            loader = InMemoryLoader(make, total + 2, (total + 2) * setup.batch_size, mc.num_classes)
            log = RunLog(tmp, enabled=True, display="off", tensorboard=False)
            trainer = Trainer(cfg, trained.model, loader, DistEnv(device=setup.torch_device), log=log)
            trainer.train()  # ends at --max-steps with a checkpoint write, after the last measured iteration
            log.close()
    finally:
        bare.close()
        trained.close()
    return PairedTimes(times.bare[warmup:total], times.trainer[warmup:total])




def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="supmae_vit_base_patch16", help="comma-separated presets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--steps", type=int, default=20, help="measured step pairs (after --warmup pairs)")
    p.add_argument("--log-every", type=int, default=10, help="the trainer's log interval (its sync + metrics line)")


def run(args: argparse.Namespace) -> BenchReport:
    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    warmup = args.warmup if args.warmup is not None else 2
    if args.steps < 1 or warmup < 0:
        raise ValueError("trainer_overhead: --steps must be >= 1 and --warmup >= 0")
    report = BenchReport("bench trainer-overhead", COLUMNS, settings={
        "batch_size": args.batch_size, "dtype": dtype, "pairs": args.steps, "warmup_pairs": warmup,
        "log_every": args.log_every, "device": "cuda" if gpu else "cpu",
    })
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        setup = StepSetup(model=name, batch_size=args.batch_size, img_size=args.img_size,
                          patch_size=args.patch_size, dtype=dtype, compile=gpu if args.compile is None else args.compile,
                          grad_scaler=dtype == "fp16", fused_adamw=True)
        t = paired_times(setup, args.steps, warmup, args.log_every)
        ratios = [tr / b for b, tr in zip(t.bare, t.trainer, strict=True)]
        report.add_row(model=name, config=setup.describe(), batch=args.batch_size, pairs=len(ratios), **{
            "bare ms": 1e3 * statistics.median(t.bare), "trainer ms": 1e3 * statistics.median(t.trainer),
            "overhead (total)": f"{sum(t.trainer) / sum(t.bare) - 1:+.1%}",
            "overhead (median pair)": f"{statistics.median(ratios) - 1:+.1%}",
            "bare spread": spread_text(t.bare)})
    report.notes.append("Pairs of one bare step (TrainStep: zero_grad, forward, backward, fused AdamW) and one "
                        "iteration of Trainer.train() on the same synthetic batch (same model, optimiser settings, "
                        "inputs), alternating, so that load on a shared machine hits both alike.")
    report.notes.append("overhead (total) = sum(trainer) / sum(bare) - 1, log-interval work included; "
                        "overhead (median pair) = median of the per-pair ratios - 1.")
    report.notes.append("The trainer's iteration adds: lr schedule, gradient-norm pass (non-finite detection, "
                        "logged), device-side loss / non-finite accumulators, BatchNorm snapshot, stop-signal poll, "
                        "loader wrapper, and every --log-every steps one host sync + metrics line.")
    return report


def main(argv: list[str] | None = None) -> int:
    from tools.bench.__main__ import add_common_arguments

    parser = argparse.ArgumentParser(prog="python -m tools.bench.trainer_overhead", description=DESCRIPTION)
    add_arguments(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    report = run(args)
    report.print()
    report.write(json_path=args.json, markdown_path=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
