"""Project set-up: launch.sh behaviour and the dependency lists that must agree."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pip_lines_of_environment_yml() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    out = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s+- (\S.*)$", line)
        if not m:
            break
        out.append(m.group(1).strip())
    return out


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert _pip_lines_of_environment_yml() == wanted
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_layout_of_the_design_card():
    for name in ("pipeline", "model", "train", "tools", "tests", "docs"):
        assert (ROOT / name).is_dir(), name
    for name in ("launch.sh", "environment.yml", "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / name).is_file(), name


def _launch(*args, cwd="/") -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "launch.sh"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_launch_help_lists_every_subcommand_from_any_directory():
    res = _launch("help")
    assert res.returncode == 0
    for sub in ("setup", "test", "help", "shard", "pretrain", "finetune", "linprobe", "knn", "bench", "demo"):
        assert re.search(rf"^\s+{sub}\s", res.stdout, re.M), sub


def test_launch_unknown_subcommand_is_a_clear_error():
    res = _launch("pretrian")
    assert res.returncode == 2
    assert "unknown subcommand 'pretrian'" in res.stderr and "usage:" in res.stderr


def test_ci_runs_setup_then_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "./launch.sh setup\n./launch.sh test\n" in ci
    assert "./launch.sh test" in readme and "./launch.sh demo" in readme
