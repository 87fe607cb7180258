"""NVIDIA GPUs and driver of this machine, found without torch (standard library only: `./launch.sh setup` runs
this before torch is installed, and a run uses it when torch cannot see a GPU).

Sources: `nvidia-smi -L` (one line per GPU) and `nvidia-smi` (its header has the driver version and the highest
CUDA version the driver supports). Where nvidia-smi is missing or fails (containers without it; "Driver/library
version mismatch" after a driver update), /proc/driver/nvidia: `version` (driver version) and
`gpus/*/information` (one folder per GPU); the CUDA version is then derived from the driver branch (DRIVER_CUDA).
nvidia-smi's "No devices were found" is believed: the GPUs /proc lists may belong to other jobs (cgroups).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC_DIR = "/proc/driver/nvidia"
PROC_ENV = "SUPMAE_NVIDIA_PROC"  # another folder in place of /proc/driver/nvidia (tests)
SMI_TIMEOUT_S = 20  # nvidia-smi can hang on a GPU in a bad state

# Driver branch -> highest CUDA version it supports (NVIDIA's CUDA toolkit release notes; nvidia-smi's header
# shows the same). Only used where nvidia-smi is not there to say it.
DRIVER_CUDA: tuple[tuple[int, tuple[int, int]], ...] = (
    (590, (13, 1)), (580, (13, 0)), (575, (12, 9)), (570, (12, 8)), (565, (12, 7)), (560, (12, 6)),
    (555, (12, 5)), (550, (12, 4)), (545, (12, 3)), (535, (12, 2)), (530, (12, 1)), (525, (12, 0)),
    (520, (11, 8)), (515, (11, 7)), (510, (11, 6)), (495, (11, 5)), (470, (11, 4)), (465, (11, 3)),
    (460, (11, 2)), (455, (11, 1)), (450, (11, 0)),
)


@dataclass(frozen=True)
class NvidiaInfo:
    """What the NVIDIA driver shows. gpus: model names, one per GPU; driver: "550.54.15"; cuda: the highest CUDA
    version the driver supports, (12, 4); source: "nvidia-smi", "/proc/driver/nvidia" or "none"; problem: why
    nvidia-smi could not be used, when it could not."""

    gpus: tuple[str, ...] = ()
    driver: str | None = None
    cuda: tuple[int, int] | None = None
    source: str = "none"
    problem: str | None = None

    @property
    def cuda_version(self) -> str | None:
        return f"{self.cuda[0]}.{self.cuda[1]}" if self.cuda else None

    def describe(self) -> str:
        """"2 x NVIDIA H100 80GB HBM3, driver 550.54.15 (CUDA 12.4)", or "no NVIDIA GPU"."""
        names = sorted(set(self.gpus))
        gpus = (f"{len(self.gpus)} x {' / '.join(names)}" if self.gpus else "no NVIDIA GPU")
        if self.driver:
            gpus += f", driver {self.driver}" + (f" (CUDA {self.cuda_version})" if self.cuda else "")
        return gpus

    def to_dict(self) -> dict:
        return {"gpus": list(self.gpus), "driver": self.driver, "driver_cuda": self.cuda_version,
                "source": self.source, "problem": self.problem}


def parse_smi_list(text: str) -> tuple[str, ...]:
    """GPU names from `nvidia-smi -L` ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"; MIG lines are skipped)."""
    return tuple(m.group(1).strip() for m in re.finditer(r"^GPU \d+: (.+?)(?: \(UUID: [^)]*\))?\s*$", text, re.M))


def parse_smi_header(text: str) -> tuple[str | None, tuple[int, int] | None]:
    """(driver version, CUDA version) from the header of plain `nvidia-smi`."""
    driver = re.search(r"Driver Version:\s*(\d+(?:\.\d+)+)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (driver.group(1) if driver else None, (int(cuda.group(1)), int(cuda.group(2))) if cuda else None)


def parse_proc_version(text: str) -> str | None:
    """Driver version from /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel Module
    550.54.15 ...", or "... Open Kernel Module for x86_64  580.65.06 ...")."""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def driver_cuda(driver: str | None) -> tuple[int, int] | None:
    """Highest CUDA version of a driver version, from its branch (DRIVER_CUDA); None if unknown or too old."""
    if not driver:
        return None
    try:
        branch = int(driver.split(".")[0])
    except ValueError:
        return None
    return next((cuda for first, cuda in DRIVER_CUDA if branch >= first), None)


def _read_proc(root: Path) -> tuple[tuple[str, ...], str | None]:
    """(GPU names, driver version) from a /proc/driver/nvidia folder; ((), None) when there is none."""
    try:
        driver = parse_proc_version((root / "version").read_text(errors="replace"))
    except OSError:
        driver = None
    names = []
    try:
        folders = sorted((root / "gpus").iterdir())
    except OSError:
        folders = []
    for folder in folders:
        try:
            m = re.search(r"^Model:\s*(.+?)\s*$", (folder / "information").read_text(errors="replace"), re.M)
        except OSError:
            m = None
        names.append(m.group(1) if m else "NVIDIA GPU")
    return tuple(names), driver


Runner = Callable[..., subprocess.CompletedProcess]


def detect_nvidia(env: Mapping[str, str] | None = None, run: Runner = subprocess.run) -> NvidiaInfo:
    """The NVIDIA GPUs and driver of this machine (see the module doc); never raises."""
    env = os.environ if env is None else env
    proc = Path(env.get(PROC_ENV) or PROC_DIR)
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    problem = None
    if smi:
        try:
            listing = run([smi, "-L"], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
            out = (listing.stdout or "") + (listing.stderr or "")
            if listing.returncode == 0 or "No devices were found" in out:
                header = run([smi], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
                driver, cuda = parse_smi_header(header.stdout or "")
                if driver is None:
                    driver = _read_proc(proc)[1]
                return NvidiaInfo(parse_smi_list(listing.stdout or ""), driver, cuda or driver_cuda(driver),
                                  "nvidia-smi")
            problem = f"nvidia-smi failed: {out.strip().splitlines()[0] if out.strip() else listing.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"nvidia-smi did not answer within {SMI_TIMEOUT_S} s"
        except OSError as e:
            problem = f"nvidia-smi could not run: {e}"
    gpus, driver = _read_proc(proc)
    if not gpus and driver is None:
        return NvidiaInfo(problem=problem)
    return NvidiaInfo(gpus, driver, driver_cuda(driver), str(proc), problem)
