"""Runs the check's steps one after another, each as `python -m tools.gpu_check.step NAME` in its own process
group under a time budget, echoes their output, and writes the summary. The CPU smoke run executes the same step
functions in this process instead (one set of imports: the whole smoke run takes well under a minute).

A step that ends early leaves its unspent time to the next ones; a step that runs out of time is stopped (its
process group gets SIGTERM, then SIGKILL) and reported "timed out" with whatever it had written; a step that
crashes is reported "failed" with the end of its output. The environment step failing stops the check (nothing
else can run); any other step failing does not.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.fileio import atomic_write_bytes, atomic_write_json
from tools.gpu_check.plan import STEPS, Step
from tools.gpu_check.report import StepReport, summary, utc_now

ROOT = Path(__file__).resolve().parents[2]


MIN_STEP_S = 5
KILL_GRACE_S = 10


@dataclass(frozen=True)
class CheckConfig:
    out: Path
    smoke: bool = False
    steps: tuple[str, ...] = tuple(s.name for s in STEPS)
    budget_s: int | None = None  # None: the sum of the selected steps' budgets

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in {st.name for st in STEPS}]
        if unknown:
            raise ValueError(f"gpu_check: unknown step(s) {unknown}; the steps are "
                             f"{', '.join(s.name for s in STEPS)}")
        if self.budget_s is not None and self.budget_s < MIN_STEP_S:
            raise ValueError(f"gpu_check: --budget {self.budget_s} is too short (at least {MIN_STEP_S} s)")

    def selected(self) -> list[Step]:
        return [s for s in STEPS if s.name in self.steps]

    def budget(self) -> int:
        if self.budget_s is not None:
            return self.budget_s
        return sum(s.smoke_budget_s if self.smoke else s.budget_s for s in self.selected())


def step_environment(step: Step, smoke: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    if smoke:
        # The CPU twins: the Triton interpreter for the kernels, no GPU even on a machine that has one.
        env.update(SMOKE_ENV)
    else:
        env.pop("TRITON_INTERPRET", None)
    if step.name == "trainer":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS for the exact-resume comparison
    return env


def _echo(log: Path, pos: int, write: Callable[[str], None]) -> int:
    with open(log, "rb") as f:
        f.seek(pos)
        data = f.read()
    if data:
        write(data.decode(errors="replace"))
    return pos + len(data)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's own process group (its DataLoader workers too), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


SMOKE_ENV = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_step_here(step: Step, cfg: CheckConfig, budget: float, write: Callable[[str], None]) -> dict:
    """The CPU smoke run's way: the step's function in this process (no budget enforcement)."""
    from tools.gpu_check.step import Context, execute

    write(f"\n=== {step.number} {step.name}: {step.title} ({utc_now()}) ===\n")
    report = execute(step, Context(cfg.out, True, time.time() + budget)).to_dict()
    write(f"=== {step.number} {step.name}: {report['status']} ({report['seconds']:.0f} s) "
          f"{report['summary'] or report['reason']} ===\n")
    return report


def run_step(step: Step, cfg: CheckConfig, budget: float, write: Callable[[str], None]) -> dict:
    """Run one step in its own process; returns its final report (also written to its JSON file)."""
    if cfg.smoke:
        return run_step_here(step, cfg, budget, write)
    path = step.report_path(cfg.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    log = path.with_suffix(".log")
    deadline = time.time() + budget
    cmd = [sys.executable, "-m", "tools.gpu_check.step", step.name, "--out", str(cfg.out),
           "--deadline", f"{deadline:.0f}"] + (["--cpu-smoke"] if cfg.smoke else [])
    write(f"\n=== {step.number} {step.name}: {step.title} (budget {budget:.0f} s, {utc_now()}) ===\n")
    t0 = time.monotonic()
    timed_out = False
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=step_environment(step, cfg.smoke), start_new_session=True)
        pos = 0
        try:
            while proc.poll() is None:
                if time.time() > deadline:
                    timed_out = True
                    _stop(proc)
                    break
                time.sleep(0.2)
                pos = _echo(log, pos, write)
        except BaseException:  # Ctrl-C: the step runs in its own session, so stop it here
            _stop(proc)
            raise
        _echo(log, pos, write)
    tail = log.read_text(errors="replace")[-3000:]
    report = StepReport.load(path) or StepReport(step.number, step.name, step.title, path).to_dict()
    report["seconds"] = round(time.monotonic() - t0, 1)
    if timed_out:
        report["status"] = "timed out"
        report["reason"] = f"stopped after its budget of {budget:.0f} s; partial results kept"
    elif proc.returncode != 0 and report["status"] in ("running", "ok"):
        report["status"] = "failed"
        lines = [line for line in tail.splitlines() if line.strip()]
        report["reason"] = f"exit status {proc.returncode}: " + (lines[-1] if lines else "no output")
    report["log"] = str(log)
    atomic_write_json(path, report, fsync=False)
    write(f"=== {step.number} {step.name}: {report['status']} ({report['seconds']:.0f} s) "
          f"{report['summary'] or report['reason']} ===\n")
    return report


def write_summary(cfg: CheckConfig, argv: list[str], reports: list[dict], seconds: float, total: int) -> str:
    """OUTDIR/summary.md and summary.json of the steps so far (rewritten after every step); returns the Markdown."""
    device = next((r["details"].get("device") for r in reports if r["name"] == "environment"), None)
    header = {"date": utc_now(), "device": device or "unknown", "mode": "CPU smoke" if cfg.smoke else "GPU",
              "command": "tools/gpu_check.sh " + " ".join(shlex.quote(a) for a in argv), "seconds": seconds,
              "budget_s": total}
    md, data = summary(reports, header)
    atomic_write_bytes(cfg.out / "summary.md", md.encode(), fsync=False)
    atomic_write_json(cfg.out / "summary.json", data, fsync=False)
    return md


def run_check(cfg: CheckConfig, argv: list[str], write: Callable[[str], None] = sys.stdout.write) -> int:
    """All selected steps, the summary rewritten after each; exit status 0 unless a step failed or timed out."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.smoke:
        os.environ.update(SMOKE_ENV)  # before any step imports torch or the kernels
    total = cfg.budget()
    start = time.monotonic()
    reports: list[dict] = []
    carry = 0.0  # time earlier steps left unspent goes to the next ones
    for step in cfg.selected():
        own = step.smoke_budget_s if cfg.smoke else step.budget_s
        budget = min(own + carry, total - (time.monotonic() - start))
        if budget < MIN_STEP_S:
            rep = StepReport(step.number, step.name, step.title, step.report_path(cfg.out), status="timed out",
                             reason=f"not run: the check's budget of {total} s is spent")
            rep.save()
            reports.append(rep.to_dict())
            continue
        report = run_step(step, cfg, budget, write)
        reports.append(report)
        carry = max(0.0, budget - report["seconds"])
        write_summary(cfg, argv, reports, time.monotonic() - start, total)
        if step.name == "environment" and report["status"] != "ok":
            write("gpu_check: the environment step failed; the other steps cannot run\n")
            break
    md = write_summary(cfg, argv, reports, time.monotonic() - start, total)
    write("\n" + md + f"\nfiles: {cfg.out}/summary.md, summary.json, steps/*.json, steps/*.log\n")
    failed = [r["name"] for r in reports if r["status"] in ("failed", "timed out")]
    if failed:
        write(f"gpu_check: not passed: {', '.join(failed)}\n")
        return 1
    write("gpu_check: all steps passed (skipped steps say why)\n")
    return 0
