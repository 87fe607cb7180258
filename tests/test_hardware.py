"""Peak figures for MFU (train/hardware.py) by GPU name, and TF32 for fp32 training."""

from __future__ import annotations

import pytest
import torch

from train.config import config_from_args
from train.hardware import dtype_key, peak_for_name, peak_tflops
from train.trainer import configure_tf32

# (name as torch.cuda.get_device_name reports it, dense bf16, tf32, fp32 TFLOP/s from the datasheets)
NAMES = [
    ("NVIDIA H100 80GB HBM3", 989.4, 494.7, 66.9),  # SXM5
    ("NVIDIA H100", 989.4, 494.7, 66.9),
    ("NVIDIA H100 PCIe", 756.5, 378.0, 51.2),
    ("NVIDIA H100 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA H200", 989.4, 494.7, 66.9),  # SXM
    ("NVIDIA H200 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA GH200 480GB", 989.4, 494.7, 66.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100-SXM4-40GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0, 19.5),
    ("NVIDIA L40S", 362.1, 183.0, 91.6),
    ("NVIDIA L4", 121.0, 60.0, 30.3),
]


@pytest.mark.parametrize("name,bf16,tf32,fp32", NAMES, ids=[n[0] for n in NAMES])
def test_peak_figures_by_device_name(name, bf16, tf32, fp32):
    assert (peak_for_name(name, "bf16"), peak_for_name(name, "fp16"), peak_for_name(name, "tf32"),
            peak_for_name(name, "fp32")) == (bf16, bf16, tf32, fp32)


def test_unknown_devices_have_no_peak():
    for name in ("NVIDIA L40", "NVIDIA GeForce RTX 4090", "Tesla T4", ""):  # "L40" is not an L4
        assert peak_for_name(name, "bf16") is None, name
    assert peak_for_name("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on a V100


def test_fp32_counts_against_the_tf32_peak_when_tf32_is_on(monkeypatch):
    assert dtype_key(torch.float32) == "fp32" and dtype_key(torch.float32, tf32=True) == "tf32"
    assert dtype_key(torch.bfloat16, tf32=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops("cuda", torch.float32, tf32=True) == 378.0
    assert peak_tflops("cuda", torch.float32) == 51.2
    assert peak_tflops("cuda", torch.bfloat16) == 756.5
    assert peak_tflops("cpu", torch.float32) is None


def test_tf32_is_on_by_default_for_cuda_and_can_be_turned_off():
    base = ["--data", "d", "--out", "o"]
    assert config_from_args(base).tf32 is True
    assert config_from_args([*base, "--no-tf32"]).tf32 is False
    before = torch.get_float32_matmul_precision()
    try:
        assert configure_tf32(True, torch.device("cuda")) is True
        assert torch.get_float32_matmul_precision() == "high"  # TF32 tensor cores for fp32 matmuls
        assert configure_tf32(False, torch.device("cuda")) is False
        assert torch.get_float32_matmul_precision() == "highest"
        assert configure_tf32(True, torch.device("cpu")) is False  # the CPU is left alone
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_start_up_line_names_the_matmul_precision_on_cuda():
    from types import SimpleNamespace

    from train.trainer import Trainer

    def numerics(device, precision, tf32):
        return Trainer.numerics.fget(SimpleNamespace(device=torch.device(device), precision=precision, tf32=tf32))

    assert numerics("cuda", "fp32", True) == "fp32, TF32 matmuls"
    assert numerics("cuda", "fp32", False) == "fp32, IEEE fp32 matmuls"
    assert numerics("cuda", "bf16", True) == "bf16, TF32 matmuls"
    assert numerics("cpu", "fp32", False) == "fp32"  # the CPU line is unchanged
