"""tools/gpu_check.sh: the CPU smoke run of every step, and the runner's handling of time, failures and missing
packages (the GPU run itself needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.gpu_check.plan import STEPS, TOTAL_BUDGET_S, Step
from tools.gpu_check.report import StepReport, summary
from tools.gpu_check.runner import CheckConfig, run_step
from tools.gpu_check.step import Context, Skip

ROOT = Path(__file__).resolve().parents[1]
STEP_NAMES = [s.name for s in STEPS]


def _script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), *args], cwd="/", env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path):
    res = _script("--cpu-smoke", str(tmp_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [r["step"] for r in data["table"]] == [f"{s.number} {s.name}" for s in STEPS]
    for r in data["steps"]:
        assert r["status"] == "ok" or (r["name"] == "dali" and r["status"] == "skipped"), r
        assert Path(r["path"]).is_file() and json.loads(Path(r["path"]).read_text())["status"] == r["status"]
    steps = {r["name"]: r for r in data["steps"]}
    assert all(c["ok"] for c in steps["parity"]["checks"]) and len(steps["parity"]["checks"]) > 20
    assert [r["config"] for r in steps["train-step"]["rows"]] == ["original", "bf16 fused"] * 2
    trainer = {c["what"]: c for c in steps["trainer"]["checks"]}
    assert trainer["steps 4-6 of the resumed run equal the uninterrupted run's (loss, rec_loss, cls_loss, "
                   "grad_norm, lr)"]["ok"]
    assert steps["ddp"]["details"]["derived"] == {"process_group": "gloo", "world_size": 1, "ddp": True,
                                                  "compile": False}
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("### gpu_check ") and "| step | status | seconds | result |" in md
    assert "| 4 trainer | ok |" in md and data["mode"] == "CPU smoke"


def test_help_says_what_the_check_uses():
    res = _script("--help", timeout=60)
    assert res.returncode == 0
    for text in ("torch (a CUDA build), triton, timm, torchvision", "nvidia-dali (step 6", "pytest (step 2",
                 "--cpu-smoke", "summary.md"):
        assert text in res.stdout, text


def test_on_a_machine_without_a_gpu_the_environment_step_fails_and_stops_the_check(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even where there is one
    res = subprocess.run([sys.executable, "-m", "tools.gpu_check", str(tmp_path)], cwd=ROOT,
                         env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in data["steps"]] == ["environment"] and data["steps"][0]["status"] == "failed"
    assert "a CUDA device is visible to torch" in data["steps"][0]["reason"]
    assert "the environment step failed; the other steps cannot run" in res.stdout


def test_a_step_out_of_time_is_stopped_and_reported_with_what_it_wrote(tmp_path):
    """The GPU run's subprocess path: a budget shorter than the step's imports."""
    cfg = CheckConfig(tmp_path, smoke=False, steps=("parity",))
    step = Step(2, "parity", "parity", 1, 1)
    lines: list[str] = []
    report = run_step(step, cfg, budget=1.0, write=lines.append)
    assert report["status"] == "timed out" and "stopped after its budget of 1 s" in report["reason"]
    saved = json.loads(step.report_path(tmp_path).read_text())
    assert saved["status"] == "timed out" and Path(saved["log"]).is_file()
    assert any("=== 2 parity: timed out" in line for line in lines)


def test_missing_dali_and_pytest_are_skips_not_failures(tmp_path, monkeypatch):
    from tools.gpu_check import dali, parity

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    report = StepReport(6, "dali", "dali", tmp_path / "d.json")
    with pytest.raises(Skip, match="DALI is not importable here"):
        dali.run_dali(Context(tmp_path, True, 0.0), report)
    monkeypatch.setitem(sys.modules, "pytest", None)
    report = StepReport(2, "parity", "parity", tmp_path / "p.json")
    parity._pytest(Context(tmp_path, False, 1e12), report)
    report.finish()
    assert report.status == "ok" and report.checks == []
    assert report.notes == ["pytest is not installed: the test files were not run (the checks above were)"]


def test_summary_table_and_budgets():
    assert TOTAL_BUDGET_S == 480  # the eight minutes on one H100/H200
    assert STEP_NAMES == ["environment", "parity", "train-step", "trainer", "ddp", "dali"]
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['speed'\]"):
        CheckConfig(Path("x"), steps=("speed",))
    reports = [{"number": 1, "name": "environment", "title": "env", "status": "ok", "seconds": 3.0,
                "summary": "H200 | driver 570", "reason": "", "columns": [], "rows": [], "notes": []},
               {"number": 3, "name": "train-step", "title": "step", "status": "timed out", "seconds": 150.0,
                "summary": "", "reason": "stopped after its budget of 150 s; partial results kept",
                "columns": ["model", "images/s"], "rows": [{"model": "supmae", "images/s": 12345.6}], "notes": []}]
    md, data = summary(reports, {"date": "d", "device": "NVIDIA H200", "mode": "GPU", "command": "c",
                                 "seconds": 160.0, "budget_s": 480})
    assert "| 1 environment | ok | 3 | H200 / driver 570 |" in md
    assert "| 3 train-step | timed out | 150 | stopped after its budget of 150 s; partial results kept |" in md
    assert "| supmae | 12,346 |" in md
    assert data["table"][1]["status"] == "timed out" and data["steps"] == reports
