"""Recorded `nvidia-smi` outputs and a stand-in `nvidia-smi` for the set-up and device-check tests."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

_HEADER = """Tue Dec  2 10:21:33 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver:<26}Driver Version: {driver:<15}CUDA Version: {cuda:<9}|
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|=========================================+========================+======================|
|   0  {short:<26}          On  |   00000000:18:00.0 Off |                    0 |
| N/A   31C    P0             70W /  700W |       1MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""
# R470 and older print a narrower table.
_OLD_HEADER = """+-----------------------------------------------------------------------------+
| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}     |
|-------------------------------+----------------------+----------------------+
"""


@dataclass(frozen=True)
class Smi:
    """What a machine's `nvidia-smi` prints: header (no arguments) and listing (-L), with their exit statuses."""

    header: str
    listing: str
    header_rc: int = 0
    listing_rc: int = 0


def smi(driver: str, cuda: str, gpus: list[str], old: bool = False) -> Smi:
    listing = "".join(f"GPU {i}: {name} (UUID: GPU-4f0b2c1e-9d1a-4c55-8e2f-00000000000{i})\n"
                      for i, name in enumerate(gpus))
    header = (_OLD_HEADER if old else _HEADER).format(driver=driver, cuda=cuda, short=gpus[0][:26] if gpus else "")
    return Smi(header, listing)


H100 = "NVIDIA H100 80GB HBM3"
RECORDED = {
    "r470-cuda11.4": smi("470.182.03", "11.4", ["NVIDIA A100-SXM4-40GB"], old=True),
    "r535-cuda12.2": smi("535.104.05", "12.2", ["NVIDIA A100-SXM4-80GB"] * 4),
    "r550-cuda12.4": smi("550.54.15", "12.4", [H100] * 8),
    "r560-cuda12.6": smi("560.35.03", "12.6", ["NVIDIA L40S"] * 2),
    "r570-cuda12.8": smi("570.124.06", "12.8", [H100] * 8),
    "r575-cuda12.9": smi("575.57.08", "12.9", ["NVIDIA H200"] * 8),
    "r580-cuda13.0": smi("580.65.06", "13.0", ["NVIDIA H200"] * 8),
    # A MIG-partitioned A100: the MIG lines are not GPUs of their own.
    "r550-mig": Smi(smi("550.54.15", "12.4", ["NVIDIA A100-SXM4-40GB"]).header,
                    "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)\n"
                    "  MIG 3g.20gb     Device  0: (UUID: MIG-1d4a0b2c-7d3e-5f6a-9b8c-0d1e2f3a4b5c)\n"
                    "  MIG 3g.20gb     Device  1: (UUID: MIG-2e5b1c3d-8e4f-6a7b-0c9d-1e2f3a4b5c6d)\n"),
    "no-devices": Smi("No devices were found\n", "No devices were found\n", 6, 6),
    "no-driver": Smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that "
                     "the latest NVIDIA driver is installed and running.\n", "NVIDIA-SMI has failed because it "
                     "couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is "
                     "installed and running.\n", 9, 9),
    "version-mismatch": Smi("Failed to initialize NVML: Driver/library version mismatch\nNVML library version: "
                            "550.90\n", "Failed to initialize NVML: Driver/library version mismatch\nNVML library "
                            "version: 550.90\n", 18, 18),
}


def fake_nvidia_smi(folder: Path, output: Smi) -> Path:
    """An executable `nvidia-smi` in `folder` that prints `output`; put `folder` first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smi-header.txt").write_text(output.header)
    (folder / "smi-list.txt").write_text(output.listing)
    script = folder / "nvidia-smi"
    header, listing = shlex.quote(str(folder / "smi-header.txt")), shlex.quote(str(folder / "smi-list.txt"))
    script.write_text(f'#!/bin/sh\nif [ "$1" = "-L" ]; then cat {listing}; exit {output.listing_rc}; fi\n'
                      f"cat {header}\nexit {output.header_rc}\n")
    script.chmod(0o755)
    return script


def fake_proc(folder: Path, driver: str | None, models: list[str]) -> Path:
    """A stand-in /proc/driver/nvidia (SUPMAE_NVIDIA_PROC): `version` and one gpus/<bus id>/information each."""
    folder.mkdir(parents=True, exist_ok=True)
    if driver:
        (folder / "version").write_text(f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {driver}  Release "
                                        "Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jul 17 2025\nGCC version:  gcc "
                                        "version 12.2.0 (Debian 12.2.0-14)\n")
    for i, model in enumerate(models):
        gpu = folder / "gpus" / f"0000:{0x18 + i:02x}:00.0"
        gpu.mkdir(parents=True)
        (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t GPU-0000\n"
                                          "Video BIOS: \t 96.00.99.00.01\nBus Type: \t PCIe\n")
    return folder


def machine_env(tmp: Path, output: Smi | None, proc: Path | None = None) -> dict[str, str]:
    """os.environ for a machine whose nvidia-smi prints `output` (None: nvidia-smi fails as with no driver) and
    whose /proc/driver/nvidia is `proc` (None: absent). GPU and build choices of the caller are dropped."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPMAE_TORCH_CUDA", "SUPMAE_DALI_CUDA", "SUPMAE_PYTHON", "CUDA_VISIBLE_DEVICES")}
    fake_nvidia_smi(tmp / "bin", output or RECORDED["no-driver"])
    env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["SUPMAE_NVIDIA_PROC"] = str(proc or tmp / "no-proc")
    return env


def make_wheel(folder: Path, name: str, version: str = "1.0", payload: int = 30_000, seed: int = 0) -> Path:
    """A small, valid, pure-Python wheel `name` (one module holding `payload` random-looking bytes as DATA)."""
    import base64
    import hashlib
    import random
    import zipfile

    module = name.replace("-", "_")
    data = random.Random(seed).randbytes(payload)
    files = {
        f"{module}/__init__.py": f"DATA = {data!r}\n".encode(),
        f"{module}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{module}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                              b"Tag: py3-none-any\n",
    }
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b'=').decode()},"
                     f"{len(body)}\n" for path, body in files.items())
    files[f"{module}-{version}.dist-info/RECORD"] = (record + f"{module}-{version}.dist-info/RECORD,,\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # stored: the bytes do not shrink
        for p, body in files.items():
            z.writestr(p, body)
    return path


def copying_download(wheels: list[Path]):
    """A stand-in for `pip download` (make_bundle's `run`): copies `wheels` into the command's --dest."""
    import shutil

    def run(cmd: list[str]) -> None:
        dest = Path(cmd[cmd.index("--dest") + 1])
        for w in wheels:
            shutil.copy(w, dest / w.name)

    return run


def launch_copy(root: Path) -> Path:
    """A project folder at `root` for running launch.sh: its own launch.sh, pyproject.toml (edit at will) and
    .venv place; the code folders the set-up imports are links to this checkout's."""
    project = Path(__file__).resolve().parents[1]
    root.mkdir(parents=True)
    for f in ("launch.sh", "pyproject.toml"):
        (root / f).write_bytes((project / f).read_bytes())
    (root / "launch.sh").chmod(0o755)
    for d in ("tools", "train", "pipeline"):
        (root / d).symlink_to(project / d)
    return root
