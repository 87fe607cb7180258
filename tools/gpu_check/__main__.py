"""`python -m tools.gpu_check [--cpu-smoke] [--steps a,b] [--budget S] [OUTDIR]` (what tools/gpu_check.sh runs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import tools.gpu_check as package
from tools.gpu_check.plan import STEPS, TOTAL_BUDGET_S
from tools.gpu_check.runner import CheckConfig, run_check

USES = """\
needs: python >= 3.10 with torch (a CUDA build), triton, timm, torchvision, numpy and Pillow (torchvision's own
  dependencies); run from a copy of the project (no setup, no .venv, no network needed).
uses when present: nvidia-dali (step 6; skipped with the reason when missing), pytest (step 2's test files; left
  out with the reason when missing), nvidia-smi (the driver version in step 1).
writes: OUTDIR/summary.md, summary.json, steps/NN-name.json and .log (each step's as soon as it ends), and its
  scratch data and run folders in OUTDIR/work (up to about 5 GB while it runs; checkpoints are deleted after
  use)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="tools/gpu_check.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=package.__doc__.split("\n\n", 1)[1], epilog=USES)
    p.add_argument("outdir", nargs="?", default=os.environ.get("OUT") or "gpu_check_out",
                   help="where reports go (default: $OUT when set, else ./gpu_check_out)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps at tiny shapes on the CPU (Triton "
                   "interpreter, DALI's CPU backend, gloo): checks the check itself in under a minute")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS),
                   help="comma-separated subset of the steps (default: all)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"total seconds (default {TOTAL_BUDGET_S} on a GPU: the per-step budgets of the runner)")
    args = p.parse_args(argv)
    try:
        cfg = CheckConfig(Path(args.outdir).absolute(), args.cpu_smoke,
                          tuple(s.strip() for s in args.steps.split(",") if s.strip()), args.budget)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return run_check(cfg, argv)


if __name__ == "__main__":
    sys.exit(main())
