"""Step 1: the machine: GPU, driver, torch and its CUDA build, the libraries, what is importable."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess

OPTIONAL = {"nvidia.dali": "DALI (step 6)", "pytest": "pytest (the test files of step 2)",
            "webdataset": "webdataset (not needed: the torch loader reads tars itself)"}


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> tuple[bool, str]:
    """(imports, version or the error); DALI's version comes from whichever CUDA variant is installed."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or a library that fails to load (wrong CUDA)
        return False, f"{type(e).__name__}: {e}"[:300]
    return True, str(getattr(mod, "__version__", "?"))


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch does not report it), None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def run_environment(ctx, report) -> None:
    import torch

    from train.hardware import peak_for_name

    d = report.details
    d.update(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
             triton=version("triton"), timm=version("timm"), torchvision=version("torchvision"),
             cpu_cores=len(os.sched_getaffinity(0)))
    for module, what in OPTIONAL.items():
        ok, ver = importable(module)
        d[module] = ver if ok else None
        report.notes.append(f"{what}: {'available, ' + ver if ok else 'not available (' + ver + ')'}")
    if ctx.smoke:
        d["device"] = f"CPU ({platform.processor() or platform.machine()}, {d['cpu_cores']} cores), CPU smoke run"
    else:
        if not report.check("a CUDA device is visible to torch", torch.cuda.is_available(),
                            f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU; driver "
                            f"{driver_version() or 'unknown (no nvidia-smi)'}. On a CPU machine run --cpu-smoke"):
            d["device"] = "no GPU visible to torch"
            return
        props = torch.cuda.get_device_properties(0)
        name = props.name
        d.update(gpu=name, gpu_count=torch.cuda.device_count(), capability=f"sm_{props.major}{props.minor}",
                 memory_gib=round(props.total_memory / 2**30, 1), driver=driver_version())
        d["peak_tflops"] = {k: peak_for_name(name, k) for k in ("bf16", "fp16", "tf32", "fp32")}
        d["device"] = f"{name} x{d['gpu_count']} ({d['memory_gib']} GiB, {d['capability']}), driver {d['driver']}"
        if d["peak_tflops"]["bf16"] is None:
            report.notes.append(f"train/hardware.py has no peak figures matching {name!r}: MFU stays empty")
    try:
        import model.kernels as kernels

        report.check("model.kernels imports (Triton)", True, f"interpreter: {kernels.INTERPRETED}")
    except Exception as e:
        report.check("model.kernels imports (Triton)", False, f"{type(e).__name__}: {e}")
    report.summary = (f"{d['device']}; python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda']}), "
                      f"triton {d['triton']}, DALI {d['nvidia.dali'] or 'missing'}, pytest "
                      f"{d['pytest'] or 'missing'}")
