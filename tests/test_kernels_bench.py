"""`bench model` and `bench kernels` at tiny sizes on CPU: they run and write the documented JSON / Markdown (speed
itself is measured, never asserted). tools/gpu_check.sh: tests/test_gpu_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench.__main__ import main as bench_main
from train.step_timing import StepSetup, TrainStep, original_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "16", "--patch-size", "8", "--device", "cpu"]  # 4 patches: the 8-block MAE decoder stays cheap


def _read(tmp_path: Path, name: str) -> tuple[dict, str]:
    return json.loads((tmp_path / f"{name}.json").read_text()), (tmp_path / f"{name}.md").read_text()


def test_bench_model_tiny_writes_json_and_markdown(tmp_path):
    argv = ["model", "--models", "supmae_vit_tiny_patch16,mae_vit_tiny_patch16", "--batch-size", "2", *TINY,
            "--num-classes", "10", "--warmup", "0", "--repeats", "2", "--steps", "1",
            "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md")]
    assert bench_main(argv) == 0
    data, md = _read(tmp_path, "m")
    assert data["benchmark"] == "bench model"
    assert data["columns"] == ["model", "config", "batch", "ms/step", "spread", "min ms/step", "images/s", "TFLOP/s",
                               "MFU", "peak GiB"]
    assert [r["model"] for r in data["rows"]] == ["supmae_vit_tiny_patch16", "mae_vit_tiny_patch16"]
    for row in data["rows"]:
        assert 0 < row["min ms/step"] <= row["ms/step"] and row["batch"] == 2
        assert abs(row["images/s"] - 2 / (row["ms/step"] / 1e3)) < 1e-6 * row["images/s"]
        assert row["TFLOP/s"] > 0 and row["MFU"] is None and row["peak GiB"] is None  # CPU: no peak, no allocator
        assert row["config"] == "fp32 reference uint8-NHWC"
    assert data["settings"]["img_size"] == 16 and data["settings"]["dtype"] == "fp32"
    assert data["machine"]["cpu_cores"] >= 1 and "torch" in data["machine"]
    assert "| supmae_vit_tiny_patch16 | fp32 reference uint8-NHWC | 2 |" in md


def test_bench_kernels_tiny_writes_json_and_markdown(tmp_path):
    argv = ["kernels", "--models", "supmae_vit_tiny_patch16", "--batch-size", "2", *TINY, "--configs", "ref",
            "--warmup", "0", "--repeats", "1", "--stage-iters", "1", "--steps", "1",
            "--json", str(tmp_path / "k.json"), "--markdown", str(tmp_path / "k.md")]
    assert bench_main(argv) == 0
    data, md = _read(tmp_path, "k")
    assert data["columns"] == ["part", "impl", "ms", "spread", "images/s", "GB/s", "TFLOP/s", "MFU", "peak MiB",
                               "speedup"]
    parts = [(r["part"], r["impl"]) for r in data["rows"]]
    assert parts == [("gather (fwd)", "reference"), ("unshuffle (fwd+bwd)", "reference"),
                     ("loss (fwd+bwd)", "reference"), ("3 stages", "reference"),
                     ("step supmae_vit_tiny_patch16", "ref: fp32 reference uint8-NHWC")]
    assert all(r["ms"] > 0 for r in data["rows"])
    assert any("fused stage rows skipped" in n for n in data["notes"])
    assert any("CPU run at small shapes (batch 2, 16x16)" in n for n in data["notes"])
    assert "| 3 stages | reference |" in md


def test_bench_option_errors(capsys):
    assert bench_main(["model", "--fused", "on", "--device", "cpu"]) == 2
    assert "--fused on needs a GPU" in capsys.readouterr().err
    assert bench_main(["kernels", "--configs", "fast", "--device", "cpu"]) == 2
    assert "unknown --configs ['fast']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="grad_scaler is for fp16 autocast"):
        StepSetup(dtype="bf16", grad_scaler=True)
    with pytest.raises(ValueError, match="unknown model 'vit_x'"):
        StepSetup(model="vit_x")


def test_original_recipe_step_runs_with_grad_scaler_and_float_nchw():
    setup = original_recipe(StepSetup(model="supmae_vit_tiny_patch16", batch_size=2, img_size=16, patch_size=4,
                                      num_classes=4, dtype="bf16", fused="on", compile=True, device="cpu"))
    assert (setup.dtype, setup.grad_scaler, setup.input_format, setup.fused, setup.compile) == \
        ("fp16", True, "float_nchw", "off", False)
    assert setup.describe() == "fp16+scaler reference float-NCHW"
    step = TrainStep(setup)
    assert step.images.shape == (2, 3, 16, 16) and step.images.dtype.is_floating_point
    before = step.model.patch_embed.proj.weight.detach().clone()
    step()
    step.sync()
    assert not step.model.patch_embed.proj.weight.detach().equal(before)  # the optimizer stepped
    step.close()
