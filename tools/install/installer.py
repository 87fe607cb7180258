"""Running pip for a set-up plan, online or from a bundle's wheels, and the set-up stamp.

The stamp (.venv/.supmae-setup-stamp) is written last, after every pip step succeeded, and removed before the
first: launch.sh compares it on every command (a `key=` line it computes itself from pyproject.toml's dependency
lines, the Python version and the set-up format; `torch=` / `dali=` against SUPMAE_TORCH_CUDA / SUPMAE_DALI_CUDA),
so an interrupted install is never taken for a finished one.

SUPMAE_SETUP_PIP replaces `python -m pip` by another command (shell words). It exists for the tests, which check
the set-up's decisions without installing anything; it is not a user setting.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.fileio import atomic_write_bytes
from tools.install.plan import TORCH_PACKAGES, Plan, other_dali_packages

PIP_ENV = "SUPMAE_SETUP_PIP"
# pip's complaint about a find-links folder of the build machine's pip configuration that does not exist.
_PIP_NOISE = "is ignored: it is neither a file nor a directory"


class PipError(RuntimeError):
    """A pip step failed (pip printed why)."""


def pip_command() -> list[str]:
    """How pip is run: this interpreter's pip, or SUPMAE_SETUP_PIP (tests)."""
    fake = os.environ.get(PIP_ENV)
    return shlex.split(fake) if fake else [sys.executable, "-m", "pip"]


def run_pip(pip: list[str], args: list[str]) -> None:
    """Run pip with `args`; its stderr passes through (without the noise above); PipError when it fails."""
    cmd = [*pip, *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    assert proc.stderr is not None
    for line in proc.stderr:
        if _PIP_NOISE not in line:
            sys.stderr.write(line)
    if proc.wait():
        raise PipError(f"pip failed (exit status {proc.returncode}): {shlex.join(cmd)}")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install(plan: Plan, pip: list[str], wheels: Path | None = None, say: Callable[[str], None] = print) -> None:
    """Install `plan`: from PyPI (and PyTorch's index for its torch build), or with no network from the folder
    `wheels`. A torch build other than the plan's is uninstalled first (pip would keep it: the same version
    number satisfies the pins), and the other DALI package is removed after."""
    have_torch, have_dali = plan.installed
    with tempfile.TemporaryDirectory(prefix="supmae-setup-") as tmp:
        reqs, cons = Path(tmp) / "requirements.txt", Path(tmp) / "constraints.txt"
        reqs.write_text("".join(f"{r}\n" for r in plan.requirements))
        cons.write_text("".join(f"{c}\n" for c in plan.constraints))
        if have_torch is not None and have_torch.tag != plan.torch.build.tag:
            say(f"launch.sh: replacing torch's {have_torch.tag} build by the {plan.torch.build.tag} build")
            run_pip(pip, ["uninstall", "--disable-pip-version-check", "-y", "-q", *TORCH_PACKAGES])
        common = ["install", "--disable-pip-version-check", "-q", "-c", str(cons)]
        if wheels is not None:
            run_pip(pip, [*common, "--no-index", "--find-links", str(wheels), "-r", str(reqs)])
        else:
            if plan.torch.build.index and plan.torch_lines:
                run_pip(pip, [*common, "--index-url", plan.torch.build.index, *plan.torch_lines])
            run_pip(pip, [*common, "-r", str(reqs)])
    stale = [d for d in other_dali_packages(plan.dali.build) if (have_dali and d == have_dali.dali_package)
             or _installed(d)]
    if stale:
        # Both DALI packages provide the `nvidia.dali` module: the other one must not linger.
        run_pip(pip, ["uninstall", "--disable-pip-version-check", "-y", "-q", *stale])


def read_stamp(path: Path) -> dict[str, str]:
    """The stamp's `name=value` lines ({} when there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def write_stamp(path: Path, key: str, plan: Plan, source: str) -> None:
    fields = {"key": key, "torch": plan.torch.build.tag, "dali": plan.dali.build.tag, "python": plan.python,
              "source": source}
    atomic_write_bytes(path, "".join(f"{k}={v}\n" for k, v in fields.items()).encode())


def remove_stamp(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def up_to_date(stamp: dict[str, str], key: str, plan: Plan) -> bool:
    """The stamp was written for these dependencies and Python, and the builds installed are the plan's."""
    have_torch, have_dali = plan.installed
    return (stamp.get("key") == key and stamp.get("torch") == plan.torch.build.tag
            and stamp.get("dali") == plan.dali.build.tag and have_torch == plan.torch.build
            and have_dali == plan.dali.build)
