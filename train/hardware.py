"""Peak dense throughput of known accelerators, for MFU (model FLOPs utilisation) in logs and benchmarks."""

from __future__ import annotations

import re

import torch

# Dense (no sparsity) peak TFLOP/s by compute dtype, from the vendors' datasheets (NVIDIA prints tensor-core figures
# "with sparsity": the dense figure is half). "tf32" is the fp32 matmul peak with TF32 tensor cores on, "fp32" the
# plain CUDA-core figure. Matched against torch.cuda.get_device_name() by regular expression, first match wins, so
# the specific forms come before the generic ones. Names as the driver reports them, e.g. "NVIDIA H100 80GB HBM3"
# (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe".
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}  # H100 SXM5 / H200 SXM / GH200
_H100_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}  # H100 NVL (94 GB) / H200 NVL
_H100_PCIE = {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}  # SXM4 and PCIe, 40 and 80 GB: same datasheet peak
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"GH200", _H100_SXM),
    (r"H200 NVL", _H100_NVL),
    (r"H200", _H100_SXM),
    (r"H100 NVL", _H100_NVL),
    (r"H100.*PCIe", _H100_PCIE),
    (r"H100", _H100_SXM),
    (r"B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    (r"A100.*PCIe", _A100),
    (r"A100", _A100),
    (r"A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
]


def dtype_key(dtype: torch.dtype, tf32: bool = False) -> str:
    """The PEAK_TFLOPS column of a compute dtype; fp32 with TF32 matmuls counts against the TF32 peak."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return "tf32" if key == "fp32" and tf32 else key


def peak_for_name(name: str, key: str) -> float | None:
    """Peak dense TFLOP/s of the GPU called `name` (as torch.cuda.get_device_name reports it) for column `key`."""
    for pattern, table in PEAK_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return table.get(key)
    return None


def peak_tflops(device: torch.device | str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Peak dense TFLOP/s of `device` for `dtype` (fp32 with `tf32` matmuls: the TF32 peak), or None when unknown
    (CPUs, unlisted GPUs): MFU is then omitted."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(device), dtype_key(dtype, tf32))
