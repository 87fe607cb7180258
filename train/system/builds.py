"""Which torch and DALI builds an NVIDIA driver can run, which are installed, and which `./launch.sh setup` installs
(standard library only: the set-up runs this before torch is installed).

    driver CUDA >= 13.0   torch from PyPI (its Linux wheels are the CUDA 13.0 build)   DALI nvidia-dali-cuda130
    12.8 <= CUDA < 13.0   torch +cu128 from PyTorch's index                            DALI nvidia-dali-cuda120
    12.6 <= CUDA < 12.8   torch +cu126 from PyTorch's index                            DALI nvidia-dali-cuda120
    CUDA < 12.6           refused: update the driver, or choose a build (SUPMAE_TORCH_CUDA=cpu | 126)
    no NVIDIA driver      the installed builds are kept; a new environment gets the PyPI ones (torch CUDA 13.0,
                          DALI cuda130), as before

A build that is installed and runs on the driver is kept (a cu128 torch stays on a CUDA 13 driver), so a folder
shared by nodes with different drivers is not re-installed back and forth. SUPMAE_TORCH_CUDA=126|128|130|cpu and
SUPMAE_DALI_CUDA=120|130 choose a build whatever the driver.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field

from train.system.nvidia import DRIVER_CUDA, NvidiaInfo

TORCH_ENV = "SUPMAE_TORCH_CUDA"
DALI_ENV = "SUPMAE_DALI_CUDA"
PYTORCH_INDEX = "https://download.pytorch.org/whl/"


@dataclass(frozen=True)
class Build:
    """One build of torch or DALI. key: the override's value ("128"); tag: "cu128", "cpu", "cuda120"; cuda: the
    driver CUDA version it needs, None for a CPU-only build; index: torch's wheel index (None = the default index,
    PyPI); local: the local version label torch's wheels carry on that index ("+cu128")."""

    kind: str
    key: str
    tag: str
    cuda: tuple[int, int] | None
    index: str | None = None
    local: str = ""

    @property
    def cuda_version(self) -> str | None:
        return f"{self.cuda[0]}.{self.cuda[1]}" if self.cuda else None

    @property
    def dali_package(self) -> str:
        return f"nvidia-dali-{self.tag}"

    def describe(self) -> str:
        if self.kind == "dali":
            return f"{self.dali_package} (CUDA {self.cuda_version})"
        where = f"from {self.index}" if self.index else "from PyPI"
        return f"{self.tag} ({'CPU only' if self.cuda is None else f'CUDA {self.cuda_version}'}) {where}"

    def runs_on(self, driver_cuda: tuple[int, int] | None) -> bool:
        """Uses the GPU under a driver supporting `driver_cuda` (a CPU build never does)."""
        return self.cuda is not None and driver_cuda is not None and driver_cuda >= self.cuda


# Newest first: the first GPU build a driver runs is the one chosen for it.
TORCH_BUILDS = (
    Build("torch", "130", "cu130", (13, 0)),
    Build("torch", "128", "cu128", (12, 8), PYTORCH_INDEX + "cu128", "+cu128"),
    Build("torch", "126", "cu126", (12, 6), PYTORCH_INDEX + "cu126", "+cu126"),
    Build("torch", "cpu", "cpu", None, PYTORCH_INDEX + "cpu", "+cpu"),
)
DALI_BUILDS = (
    Build("dali", "130", "cuda130", (13, 0)),
    Build("dali", "120", "cuda120", (12, 0)),
)
_BUILDS = {"torch": TORCH_BUILDS, "dali": DALI_BUILDS}
_ENV = {"torch": TORCH_ENV, "dali": DALI_ENV}


class PlanError(ValueError):
    """No build can be chosen (unknown override, driver too old): the message says what to do."""


@dataclass(frozen=True)
class Choice:
    build: Build
    reason: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def build_by_key(kind: str, key: str) -> Build:
    for b in _BUILDS[kind]:
        if b.key == key:
            return b
    raise PlanError(f"{_ENV[kind]}={key!r} is not a build: choose one of {', '.join(b.key for b in _BUILDS[kind])}")


def min_driver(cuda: tuple[int, int]) -> int:
    """The oldest driver branch supporting CUDA `cuda` (570 for 12.8)."""
    return min(branch for branch, c in DRIVER_CUDA if c >= cuda)


def _driver_text(nvidia: NvidiaInfo) -> str:
    return f"the NVIDIA driver {nvidia.driver or '(version unknown)'} supports CUDA {nvidia.cuda_version}"


def choose(kind: str, nvidia: NvidiaInfo, override: str | None = None, installed: Build | None = None) -> Choice:
    """The build of `kind` ("torch" or "dali") for this machine (rules in the module doc). override: the value of
    SUPMAE_TORCH_CUDA / SUPMAE_DALI_CUDA (None or "" = not set); installed: the build installed now."""
    builds = _BUILDS[kind]
    if override:
        return given(build_by_key(kind, override), nvidia, f"{_ENV[kind]}={override}")
    if nvidia.cuda is not None:
        if installed is not None and installed.runs_on(nvidia.cuda):
            return Choice(installed, f"the installed {installed.tag} build runs on this driver (CUDA "
                                     f"{nvidia.cuda_version}); {_ENV[kind]} chooses another")
        for build in builds:
            if build.runs_on(nvidia.cuda):
                return Choice(build, f"{_driver_text(nvidia)}")
        oldest = min((b for b in builds if b.cuda is not None), key=lambda b: b.cuda)
        if kind == "dali":  # DALI's CPU operators still work; torch decides whether the GPU is usable
            return Choice(oldest, _driver_text(nvidia), (
                f"DALI's GPU operators need a driver supporting CUDA {oldest.cuda_version}; "
                f"{_driver_text(nvidia)}: use --data-backend torch or update the driver",))
        supported = ", ".join(b.cuda_version for b in reversed(builds) if b.cuda is not None)
        raise PlanError(
            f"{_driver_text(nvidia)}, but torch is built for CUDA {supported}: the oldest needs a driver "
            f"supporting CUDA {oldest.cuda_version} (R{min_driver(oldest.cuda)} or newer). Update the NVIDIA "
            f"driver, or choose a build: {TORCH_ENV}=cpu ./launch.sh setup (CPU only; runs need --device cpu), "
            f"or {TORCH_ENV}={oldest.key} ./launch.sh setup (CUDA's minor-version compatibility may run it on an "
            "older 12.x driver; not tested here)")
    if installed is not None:
        return Choice(installed, f"no NVIDIA driver found: the installed {installed.tag} build is kept")
    return Choice(builds[0], "no NVIDIA driver found: the default build")


def given(build: Build, nvidia: NvidiaInfo, reason: str) -> Choice:
    """A build chosen by the user (an override, a bundle), with a warning when this machine's driver cannot run it."""
    warnings = []
    if nvidia.gpus and build.cuda is None:
        warnings.append(f"{reason}: a CPU-only build on a machine with {nvidia.describe()}; runs need --device cpu")
    elif nvidia.cuda is not None and build.cuda is not None and not build.runs_on(nvidia.cuda):
        warnings.append(f"{reason}: the {build.tag} build needs a driver supporting CUDA {build.cuda_version} "
                        f"(R{min_driver(build.cuda)} or newer) but {_driver_text(nvidia)}")
    return Choice(build, reason, tuple(warnings))


def torch_build_of(cuda: str | None) -> Build:
    """The torch build of a `torch.version.cuda` value ("12.8" -> cu128, None -> cpu)."""
    if cuda is None:
        return build_by_key("torch", "cpu")
    m = re.match(r"(\d+)\.(\d+)", cuda)
    if not m:
        raise ValueError(f"not a CUDA version: {cuda!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    for b in TORCH_BUILDS:
        if b.cuda == (major, minor):
            return b
    return Build("torch", f"{major}{minor}", f"cu{major}{minor}", (major, minor))


def installed_torch() -> Build | None:
    """The torch build installed for this interpreter, read from torch/version.py without importing torch."""
    try:
        dist = importlib.metadata.distribution("torch")
        text = open(dist.locate_file("torch/version.py")).read()  # noqa: SIM115
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    m = re.search(r"^cuda\b[^=\n]*=\s*(?:'([^']*)'|None)", text, re.M)
    if not m:
        return None
    return torch_build_of(m.group(1))


def installed_dali() -> tuple[Build, str] | None:
    """(build, version) of the installed DALI package, or None."""
    for build in DALI_BUILDS:
        try:
            return build, importlib.metadata.version(build.dali_package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_fix(nvidia: NvidiaInfo, torch_cuda: str | None) -> str:
    """What to do when torch (built for `torch_cuda`, None = CPU build) cannot use the GPUs `nvidia` shows."""
    insist = "or run on the CPU anyway with --device cpu"
    try:
        best = choose("torch", nvidia).build
    except PlanError:
        oldest = min((b for b in TORCH_BUILDS if b.cuda is not None), key=lambda b: b.cuda)
        return (f"update the NVIDIA driver to R{min_driver(oldest.cuda)} or newer (CUDA >= {oldest.cuda_version}), "
                f"then run ./launch.sh setup; {insist}")
    have = torch_build_of(torch_cuda)
    if have.runs_on(nvidia.cuda):
        return (f"torch's {have.tag} build suits this driver, so the GPUs are hidden (CUDA_VISIBLE_DEVICES) or "
                f"the driver does not work (check nvidia-smi); {insist}")
    return f"install the build for this driver: {TORCH_ENV}={best.key} ./launch.sh setup; {insist}"
