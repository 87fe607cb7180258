"""The fused kernels compile for an H100 (sm_90) without a GPU: Triton's real compiler (not the interpreter the other
CPU tests use) down to PTX and, through the ptxas bundled with Triton, to SASS. This catches what the interpreter
accepts but the compiler does not, and guards the code generation that makes the kernels fast: 128-bit vector
loads/stores on contiguous NHWC rows and no register spills. (Codegen properties, not timings.)

Runs in a subprocess because the interpreter must be off when the kernels are defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model.kernels import gather, loss, unshuffle

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TARGET = GPUTarget("cuda", 90, 32)


def build(kernel, pointers, constexprs, aligned, num_warps):
    """Compile like a launch at ViT-B/16 shapes would: pointer types, constexprs (including the strides Triton
    specialises to 1) and 16-divisible ints / 16-byte-aligned pointers as Triton's launcher marks them."""
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info.stderr)]
    return {"loads": sorted(set(re.findall(r"ld\.global[\.\w]*", ptx))),
            "stores": sorted(set(re.findall(r"st\.global[\.\w]*", ptx))),
            "spill_bytes": sum(spills), "ptxas_ok": info.returncode == 0}


PATCH = dict(PATCH=16, C=3, PC_PAD=64, BLOCK_M=4)
out = {}
for name, img, contig in (("gather_u8_nhwc", "*u8", True), ("gather_f32_nchw", "*fp32", False)):
    strides = dict(s_c=1) if contig else dict(s_w=1)
    out[name] = build(gather._gather_kernel,
                      dict(img_ptr=img, ids_ptr="*i64", out_ptr="*bf16", scale_ptr="*fp32", shift_ptr="*fp32"),
                      dict(PATCH, IS_U8=img == "*u8", ROW_CONTIG=contig, s_idk=1, **strides),
                      ["img_ptr", "ids_ptr", "out_ptr", "s_n", "s_h", "total_rows"], 8)
out["unshuffle_fwd"] = build(unshuffle._unshuffle_fwd_kernel,
                             dict(x_ptr="*bf16", ids_ptr="*i64", mt_ptr="*fp32", pe_ptr="*fp32", out_ptr="*fp32"),
                             dict(BLOCK_R=32, BLOCK_D=128, BLOCK_K=64, s_xd=1, s_idk=1, s_mtd=1, s_pd=1),
                             ["x_ptr", "ids_ptr", "mt_ptr", "pe_ptr", "out_ptr", "s_xn", "s_xr", "s_idn", "s_pr", "D"], 8)
out["unshuffle_bwd"] = build(unshuffle._unshuffle_bwd_kernel,
                             dict(g_ptr="*fp32", ids_ptr="*i64", gx_ptr="*bf16", partial_ptr="*fp32"),
                             dict(BLOCK_R=32, BLOCK_D=128, BLOCK_K=64, s_gd=1, s_idk=1),
                             ["g_ptr", "ids_ptr", "gx_ptr", "partial_ptr", "s_gn", "s_gr", "s_idn", "D"], 8)
for name, kernel in (("loss_fwd", loss._loss_fwd_kernel), ("loss_bwd", loss._loss_bwd_kernel)):
    for norm in (True, False):
        ptrs = dict(pred_ptr="*bf16", img_ptr="*u8", mask_ptr="*fp32", scale_ptr="*fp32", shift_ptr="*fp32",
                    part_num_ptr="*fp32", part_den_ptr="*fp32", grad_loss_ptr="*fp32", den_ptr="*fp32",
                    grad_ptr="*bf16")
        out[f"{name}_{'normpix' if norm else 'plain'}"] = build(
            kernel, ptrs, dict(PATCH, IS_U8=True, ROW_CONTIG=True, NORM_PIX=norm, EPS=1e-6, s_pp=1, s_c=1, s_ml=1),
            ["pred_ptr", "img_ptr", "mask_ptr", "s_pn", "s_pl", "s_n", "s_h"]
            + (["grad_ptr"] if "grad_ptr" in kernel.arg_names else []), 8)
out["loss_finish"] = build(loss._loss_finish_kernel, dict(part_num_ptr="*fp32", part_den_ptr="*fp32",
                                                         loss_ptr="*fp32", den_ptr="*fp32"), dict(BLOCK=1024), [], 4)
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90_vectorised_without_spills():
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"{ptxas} not present (this Triton build has no bundled ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    kernels = json.loads(res.stdout.strip().splitlines()[-1])
    for name, k in kernels.items():
        assert k["ptxas_ok"] and k["spill_bytes"] == 0, (name, k)
    vector = "ld.global.v4.b32"  # 16-byte loads
    for name in ("gather_u8_nhwc", "unshuffle_fwd", "unshuffle_bwd", "loss_fwd_normpix", "loss_bwd_plain"):
        assert vector in kernels[name]["loads"], (name, kernels[name])
    for name in ("gather_u8_nhwc", "gather_f32_nchw", "unshuffle_fwd", "loss_bwd_normpix"):
        assert "st.global.v4.b32" in kernels[name]["stores"], (name, kernels[name])
    # An NCHW view has no contiguous channel run: its loads stay scalar (the documented slow-but-copy-free path).
    assert vector not in kernels["gather_f32_nchw"]["loads"]
