"""What `./launch.sh setup` installs: pyproject.toml's requirement lines with the DALI package of the chosen build,
and the torch build (its wheel index and the local version label that pins it).

    plan = make_plan(Path("pyproject.toml"), detect_nvidia(), os.environ)
    print(plan.describe())
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.system.builds import (
    DALI_BUILDS,
    DALI_ENV,
    TORCH_ENV,
    Build,
    Choice,
    PlanError,
    choose,
    given,
    installed_dali,
    installed_torch,
)
from train.system.nvidia import NvidiaInfo

TORCH_PACKAGES = ("torch", "torchvision")  # installed from the torch build's index, pinned to its local label
DALI_IN_PYPROJECT = "nvidia-dali-cuda130"  # the line pyproject.toml lists; the chosen build's package replaces it


def requirement_name(line: str) -> str:
    """The normalised distribution name of a requirement line ("Pillow>=10" -> "pillow")."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not m:
        raise PlanError(f"not a requirement: {line!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def read_requirements(pyproject: Path) -> list[str]:
    """The project's dependencies and its dev extras (pytest, ruff), as listed."""
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise PlanError(f"cannot read the dependencies of {pyproject}: {e}") from None
    return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("dev", []))


def supported_pythons(pyproject: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lowest, first unsupported) Python of pyproject.toml's requires-python = ">=3.A,<3.B" (launch.sh reads the
    same line)."""
    try:
        text = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise PlanError(f"cannot read requires-python of {pyproject}: {e}") from None
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)\s*,\s*<\s*(\d+)\.(\d+)", text.strip())
    if not m:
        raise PlanError(f"{pyproject}: requires-python must read \">=3.A,<3.B\", not {text!r}")
    a, b, c, d = map(int, m.groups())
    return (a, b), (c, d)


def requirements_for(lines: list[str], dali: Build) -> list[str]:
    """`lines` with the DALI package of `dali`."""
    return [line.replace(DALI_IN_PYPROJECT, dali.dali_package) if requirement_name(line) == DALI_IN_PYPROJECT
            else line for line in lines]


@dataclass(frozen=True)
class Plan:
    """python: "3.11"; requirements: every line to install; torch / dali: the chosen builds and why."""

    python: str
    nvidia: NvidiaInfo
    torch: Choice
    dali: Choice
    requirements: tuple[str, ...]
    installed: tuple[Build | None, Build | None] = (None, None)  # torch, DALI builds installed now

    @property
    def torch_lines(self) -> list[str]:
        return [r for r in self.requirements if requirement_name(r) in TORCH_PACKAGES]

    @property
    def constraints(self) -> list[str]:
        """Pins of torch and torchvision to the chosen build ("torch==2.14.1+cu128"): pip then never swaps in
        another build of the same version from another index."""
        out = []
        for line in self.torch_lines:
            m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([0-9][0-9A-Za-z.]*)\s*", line)
            if m:
                out.append(f"{m.group(1)}=={m.group(2)}{self.torch.build.local}")
        return out

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.torch.warnings + self.dali.warnings

    def describe(self) -> str:
        torch = ", ".join(self.torch_lines) or "torch"
        dali = next((r for r in self.requirements if requirement_name(r).startswith("nvidia-dali-")), "DALI")
        have = [b.tag if b.kind == "torch" else b.dali_package for b in self.installed if b is not None]
        lines = [
            f"  machine    {self.nvidia.describe()}" + (f"  [{self.nvidia.source}]" if self.nvidia.gpus else ""),
            f"  python     {self.python}",
            f"  torch      {torch}: {self.torch.build.describe()}; {self.torch.reason}",
            f"  DALI       {dali}: {self.dali.reason}",
            f"  installed  {', '.join(have) if have else 'no torch or DALI yet'}",
            f"  choose     {TORCH_ENV}=126|128|130|cpu, {DALI_ENV}=120|130 (docs: README, Set-up)",
        ]
        return "\n".join(lines + [f"  warning    {w}" for w in self.warnings])

    def to_dict(self) -> dict[str, Any]:
        return {"python": self.python, "nvidia": self.nvidia.to_dict(), "torch": self.torch.build.tag,
                "torch_index": self.torch.build.index, "torch_reason": self.torch.reason, "dali": self.dali.build.tag,
                "dali_reason": self.dali.reason, "requirements": list(self.requirements),
                "constraints": self.constraints, "warnings": list(self.warnings)}


def python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def make_plan(pyproject: Path, nvidia: NvidiaInfo, env: Mapping[str, str], fresh: bool = False,
              torch_build: Build | None = None, dali_build: Build | None = None, python: str | None = None) -> Plan:
    """The plan for this interpreter's environment. fresh: ignore what is installed (a .venv yet to be made);
    torch_build / dali_build: fixed builds (a bundle's), else chosen by `choose` from the driver, the overrides in
    `env` and what is installed."""
    have_torch = None if fresh else installed_torch()
    have_dali = None if fresh else installed_dali()
    have_dali_build = have_dali[0] if have_dali else None
    torch = (given(torch_build, nvidia, "the bundle's build") if torch_build
             else choose("torch", nvidia, env.get(TORCH_ENV) or None, have_torch))
    dali = (given(dali_build, nvidia, "the bundle's build") if dali_build
            else choose("dali", nvidia, env.get(DALI_ENV) or None, have_dali_build))
    lines = requirements_for(read_requirements(pyproject), dali.build)
    return Plan(python or python_version(), nvidia, torch, dali, tuple(lines), (have_torch, have_dali_build))


def other_dali_packages(dali: Build) -> list[str]:
    """The DALI packages that must not stay beside `dali`'s (both provide the `nvidia.dali` module)."""
    return [b.dali_package for b in DALI_BUILDS if b != dali]
