"""The GPU check every run makes before any work, and the environment record every run writes.

A machine whose NVIDIA GPUs torch cannot use (a torch build newer than the driver, a CPU-only build, a broken
driver) would otherwise train quietly on the CPU with `--device auto`. `check_device` stops such a run with a
message naming the driver's CUDA version, torch's build and the fix; `--device cpu` insists on the CPU.
CUDA_VISIBLE_DEVICES="" (or -1) hides the GPUs on purpose: `auto` is then the CPU.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from train.system.builds import installed_dali, torch_fix
from train.system.nvidia import NvidiaInfo, detect_nvidia


class DeviceError(ValueError):
    """The requested device cannot be used (exit status 2 with the message)."""


def gpus_hidden(env: Mapping[str, str]) -> bool:
    """CUDA_VISIBLE_DEVICES hides every GPU on purpose ("", "-1", "NoDevFiles")."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1", "NoDevFiles")


def cuda_status() -> tuple[bool, str]:
    """(torch can use CUDA, torch's own reason when it cannot and says one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    said = " ".join(str(w.message) for w in caught)
    said = re.sub(r"\s*\(Triggered internally at[^)]*\)", "", said).strip()
    return ok, said[:300]


def unusable_gpu_message(nvidia: NvidiaInfo, torch_reason: str = "") -> str:
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"this machine has {nvidia.describe()}, but torch {torch.__version__} ({build}) cannot use it"
            + (f" (torch: {torch_reason})" if torch_reason else "")
            + (f" ({nvidia.problem})" if nvidia.problem else "")
            + f". Fix: {torch_fix(nvidia, torch.version.cuda)}")


def check_device(device: str, env: Mapping[str, str] | None = None,
                 detect: Callable[..., NvidiaInfo] = detect_nvidia) -> None:
    """Raise DeviceError when `device` ("auto", "cuda", "cuda:N", "cpu") cannot be honoured: "cuda" without a usable
    GPU, or "auto" on a machine with NVIDIA GPUs that torch cannot use. Cheap when torch sees a GPU."""
    if device == "cpu":
        return
    env = os.environ if env is None else env
    ok, reason = cuda_status()
    if ok:
        return
    if device == "auto" and gpus_hidden(env):
        return
    nvidia = detect(env)
    if nvidia.gpus:
        raise DeviceError(unusable_gpu_message(nvidia, reason) + (" (--device auto refuses to fall back to the CPU "
                                                                  "silently)" if device == "auto" else ""))
    if device != "auto":
        raise DeviceError(f"--device {device} but torch {torch.__version__} sees no GPU and none was found "
                          "(nvidia-smi, /proc/driver/nvidia)" + (f" (torch: {reason})" if reason else "")
                          + "; use --device auto or cpu")


def environment_record(device: torch.device, fused_masking: str | None = None, compile: bool | None = None,
                       nvidia: NvidiaInfo | None = None) -> dict[str, Any]:
    """What a run ran on (config.json "environment", result files). nvidia: the driver's view (None = not looked
    up, e.g. on ranks other than 0); fused_masking / compile: the model's resolved switches (None = n/a)."""
    cuda = device.type == "cuda"
    dali = installed_dali()
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "machine_gpus": len(nvidia.gpus) if nvidia else None,
        "driver": nvidia.driver if nvidia else None,
        "driver_cuda": nvidia.cuda_version if nvidia else None,
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "dali": f"{dali[0].dali_package} {dali[1]}" if dali else None,
        "fused_masking": fused_masking,
        "compile": compile,
    }


def describe_environment(rec: dict[str, Any]) -> str:
    """One log line of an environment_record."""
    where = rec["device"] + (f" {rec['gpu']} ({rec['gpu_count']} visible)" if rec["gpu"] else "")
    if rec["machine_gpus"]:
        where += f", machine: {rec['machine_gpus']} NVIDIA GPU(s)"
    elif rec["machine_gpus"] == 0:
        where += ", no NVIDIA GPU"
    parts = [where]
    if rec["driver"]:
        parts.append(f"driver {rec['driver']} (CUDA {rec['driver_cuda']})")
    parts.append(f"torch {rec['torch']} ({'CUDA ' + rec['torch_cuda'] if rec['torch_cuda'] else 'CPU build'})")
    parts.append(rec["dali"] or "no DALI")
    if rec["fused_masking"] is not None:
        parts.append(f"fused masking {rec['fused_masking']}")
    if rec["compile"] is not None:
        parts.append(f"compile {'on' if rec['compile'] else 'off'}")
    return "environment: " + ", ".join(parts)
