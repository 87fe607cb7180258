"""Every Triton kernel specialisation the model launches compiles for an H100/H200 (sm_90) and an A100 (sm_80)
without a GPU: tests/kernel_specializations.py drives the real launch path (model forward and backward, the
launchers, Triton's argument specialisation and compiler) with a stand-in driver that reports the target and runs
nothing, and the ptxas bundled with Triton checks each kernel. This catches what the interpreter the other CPU
tests use accepts but the compiler does not, and guards the code generation that makes the kernels fast:
no register spills, 16-byte vector loads/stores on contiguous NHWC rows. (Codegen properties, not timings.)

The two architectures compile in two processes at once (the interpreter must be off when the kernels are defined).
Triton's on-disk cache keeps later runs short; a cold run compiles about 60 specialisations per architecture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_gather_kernel", "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel",
           "_loss_finish_kernel"}
DEFAULT_GPU_PATH = "supmae ViT-B/16 224 bf16 uint8_nhwc batch 16"  # bf16 autocast, the DALI loader's uint8 NHWC


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, dict]:
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"{ptxas} not present (this Triton build has no bundled ptxas)")
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = {arch: subprocess.Popen([sys.executable, str(ROOT / "tests" / "kernel_specializations.py"), str(arch),
                                     str(out / f"sm{arch}.json")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for arch in (90, 80)}
    reports = {}
    for arch, proc in procs.items():
        log, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, log[-4000:]
        reports[arch] = json.loads((out / f"sm{arch}.json").read_text())
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_launched_specialisation_compiles_without_spills(compiled, arch):
    report = compiled[arch]
    assert report["failures"] == []
    kernels = report["compiled"]
    assert {k["kernel"] for k in kernels} == KERNELS
    for k in kernels:
        assert k["ptxas_ok"] and k["spill_bytes"] == 0 and k["error"] is None, k
    # What was covered: patch 16 and 14 at 224, the demo's patch 4, every input kind and dtype.
    specs = " ".join(k["spec"] for k in kernels)
    for fragment in ("PATCH=16", "PATCH=14", "PATCH=4", "img_ptr:uint8", "img_ptr:float32", "img_ptr:float16",
                     "out_ptr:bfloat16", "out_ptr:float16", "out_ptr:float32", "total_rows=n", "total_rows=16k"):
        assert fragment in specs, fragment
    # MAE launches exactly what SupMAE launches (same decoder width): nothing new was compiled for it.
    assert not [k for k in kernels if k["scenario"].startswith("mae ViT-B")]


@pytest.mark.slow
def test_both_architectures_compile_the_same_specialisations(compiled):
    def keys(arch):
        return sorted((k["kernel"], k["spec"]) for k in compiled[arch]["compiled"])

    assert keys(90) == keys(80) and len(keys(90)) > 40


@pytest.mark.slow
def test_contiguous_paths_use_16_byte_vector_loads_and_stores(compiled):
    for arch in (90, 80):
        default = {k["kernel"]: k for k in compiled[arch]["compiled"] if k["scenario"] == DEFAULT_GPU_PATH}
        assert set(default) == KERNELS, arch
        for name in ("_gather_kernel", "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel", "_loss_fwd_kernel",
                     "_loss_bwd_kernel"):
            assert "ld.global.v4.b32" in default[name]["loads"], (arch, name, default[name])
        for name in ("_gather_kernel", "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel", "_loss_bwd_kernel"):
            assert "st.global.v4.b32" in default[name]["stores"], (arch, name, default[name])
        # An NCHW float batch has no contiguous channel run: its gather loads stay scalar (read in place, no copy).
        nchw = [k for k in compiled[arch]["compiled"] if k["kernel"] == "_gather_kernel"
                and k["scenario"] == DEFAULT_GPU_PATH.replace("uint8_nhwc", "float_nchw")]
        assert nchw and "ld.global.v4.b32" not in nchw[0]["loads"]
