"""One step of the check, in this process: `python -m tools.gpu_check.step NAME --out OUTDIR --deadline T
[--cpu-smoke]` (the runner starts it; NAME is a step of `tools.gpu_check.runner.STEPS`)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tools.gpu_check.plan import STEPS
from tools.gpu_check.report import StepReport

MODULES = {"environment": "environment", "parity": "parity", "train-step": "train_step", "trainer": "trainer_run",
           "ddp": "trainer_run", "dali": "dali"}


class Skip(Exception):
    """The step cannot run here (a missing package, no GPU): reported as skipped with this reason."""


@dataclass(frozen=True)
class Context:
    out: Path
    smoke: bool
    deadline: float  # time.time() by which the runner stops this step

    @property
    def work(self) -> Path:
        """Scratch space (data, run folders) shared by the steps."""
        return self.out / "work"

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.smoke else "cuda")

    def left(self) -> float:
        return self.deadline - time.time()


def execute(step, ctx: Context) -> StepReport:
    """Run `step` in this process; its report is written as results come in and when it ends."""
    report = StepReport(step.number, step.name, step.title, step.report_path(ctx.out))
    report.save()
    try:
        module = importlib.import_module(f"tools.gpu_check.{MODULES[step.name]}")
        getattr(module, "run_" + step.name.replace("-", "_"))(ctx, report)
    except Skip as e:
        report.status, report.reason = "skipped", str(e)
    except Exception as e:  # reported with its message; the traceback goes to the step's log
        traceback.print_exc()
        report.status = "failed"
        report.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
    report.finish()
    print(f"step {step.name}: {report.status}" + (f" ({report.reason})" if report.reason else ""), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check.step")
    p.add_argument("name", choices=[s.name for s in STEPS])
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    step = next(s for s in STEPS if s.name == args.name)
    report = execute(step, Context(Path(args.out), args.cpu_smoke, args.deadline))
    return 0 if report.status in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
