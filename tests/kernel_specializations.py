"""Compile every Triton kernel specialisation the model launches for one GPU architecture (sm_90: H100/H200, sm_80:
A100) on a machine without a GPU, and check each with the ptxas bundled with Triton (no error, no register spill).

    python tests/kernel_specializations.py ARCH OUT.json      (tests/test_kernels_ptx.py runs it, once per ARCH)

How: a stand-in Triton driver reports the target GPU and accepts launches without running them. The model runs
its real forward and backward on CPU tensors with fused masking on (the launchers' device check is told to accept
them), so every kernel goes through the real launch path: the launcher's tile sizing, Triton's argument
specialisation (dtypes, 16-byte alignment and divisibility of every pointer and integer, the constexprs) and its
full compiler, including its own ptxas run (whose `-v` report is captured; when Triton's on-disk cache already holds
the kernel, ptxas is run here on the cached PTX). Only the launch itself is skipped, so the outputs are garbage and
the numbers the model computes mean nothing.

What is launched: the scenarios below. Only what the kernels see matters (image size, patch, channels, decoder
width, batch divisibility, dtypes, layouts, strides), so the transformer blocks are left out to keep the CPU work
small (the kernels see the patch embedding's input, the decoder embedding's output, the decoder prediction and the
gradients flowing back into them, through the same norms and linear layers), and Triton's cache of specialisations
dedupes the rest: MAE launches exactly SupMAE's specialisations (same
decoder width; checked). Batch 16 stands for every batch that is a multiple of 16 (the recipes' 512 and the
benchmarks' 256 included: an integer argument is specialised only on being 1 or divisible by 16); batch 3 for the
others, on the default GPU path (bf16, uint8 NHWC). CPU autocast gives the kernels the dtypes CUDA autocast does
(linear layers in the autocast dtype; the fp32 parameters; the fp32 sum of the unshuffle and its gradient).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Only the parts the kernels see are real (224 px, patch 16 or 14, RGB, decoder width 512 as in ViT-B d1b / d8b);
# the encoder width does not reach them, and the blocks are removed in run_scenario.
SMALL_BLOCKS = dict(embed_dim=64, depth=1, num_heads=1, decoder_depth=1, cls_hidden=64, num_classes=10)
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Scenario:
    label: str
    model: str
    overrides: dict
    batch: int
    precision: str  # autocast dtype: bf16 | fp16, or fp32 (no autocast)
    inputs: str  # uint8_nhwc (the DALI loader's) | float_nchw (normalised, the original loader's) | fp16_nhwc
    mode: str = "train"  # train: forward + backward; eval: the encoder with every patch (the SupMAE head's top-1)


def input_kinds(precision: str) -> tuple[str, ...]:
    # fp16 NHWC images (the loader's float16 output) need autocast: an fp32 model cannot take them.
    return ("uint8_nhwc", "float_nchw") + (("fp16_nhwc",) if precision != "fp32" else ())


def scenarios() -> list[Scenario]:
    out = []
    for family in ("supmae", "mae"):
        for precision in PRECISIONS:
            for inputs in input_kinds(precision):
                out.append(Scenario(f"{family} ViT-B/16 224 {precision} {inputs} batch 16",
                                    f"{family}_vit_base_patch16", SMALL_BLOCKS, 16, precision, inputs))
    out.append(Scenario("supmae ViT-B/16 224 bf16 uint8_nhwc batch 3", "supmae_vit_base_patch16", SMALL_BLOCKS, 3,
                        "bf16", "uint8_nhwc"))
    for precision in PRECISIONS:
        out.append(Scenario(f"supmae ViT-B/16 224 {precision} uint8_nhwc eval encoder batch 16",
                            "supmae_vit_base_patch16", SMALL_BLOCKS, 16, precision, "uint8_nhwc", "eval"))
    for precision, inputs in (("bf16", "uint8_nhwc"), ("bf16", "float_nchw"), ("fp32", "uint8_nhwc")):
        out.append(Scenario(f"supmae ViT-B/14 224 {precision} {inputs} batch 16", "supmae_vit_base_patch16",
                            dict(SMALL_BLOCKS, patch_size=14), 16, precision, inputs))
    from train.recipes import RECIPES

    for name in ("supmae_vit_tiny_demo", "mae_vit_tiny_demo"):
        recipe = RECIPES[name].values
        for precision in ("bf16", "fp32"):  # bf16: the demo on a GPU (precision auto); fp32: --precision fp32
            out.append(Scenario(f"{name} {precision} uint8_nhwc batch {recipe['batch_size']}", recipe["model"],
                                dict(recipe["model_args"], img_size=recipe["img_size"]), recipe["batch_size"],
                                precision, "uint8_nhwc"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The stand-in driver


class _Launcher:
    """Accepts a launch and does nothing: the kernel is compiled, never run."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills (the ptxas report has the real ones), threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448 if self.arch >= 90 else 166912, "multiprocessor_count": 132}

    def unload_module(self, module):
        pass


class StandInDriver:
    """A Triton driver for a GPU that is not there: reports `arch` as the target, runs nothing."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _Launcher

    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver cannot time kernels")


# ----------------------------------------------------------------------------------------------------------------
# Recording compilations

REGISTERS = re.compile(r"Used (\d+) registers")
SPILL = re.compile(r"(\d+) bytes spill (?:stores|loads)")


def ptxas_report(ptx: str, arch: int) -> str:
    """ptxas -v on `ptx` with the flags Triton uses (for kernels Triton took from its cache without running ptxas)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                              str(src), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
    return res.stderr + ("" if res.returncode == 0 else f"\nptxas exit status {res.returncode}")


class Recorder:
    """Wraps JITFunction.run: every launch that compiles a new specialisation is recorded with the scenario that
    launched it and the ptxas report of its compilation."""

    def __init__(self, arch: int):
        self.arch = arch
        self.scenario = ""
        self.compiled: list[dict] = []
        self._run = JITFunction.run

    def __enter__(self):
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            cache = fn.device_caches[0][0]
            before = set(cache)
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    result = recorder._run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            except Exception as e:  # a compiler or ptxas failure is a finding: recorded, then raised
                recorder._record(fn, None, log.getvalue(), f"{type(e).__name__}: {e}"[:4000], args, kwargs)
                raise
            for key in cache.keys() - before:
                recorder._record(fn, cache[key], log.getvalue(), None, args, kwargs)
            return result

        JITFunction.run = run
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v report: captured above
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run
        knobs.nvidia.dump_ptxas_log = False

    def _record(self, fn, compiled, log, error, args, kwargs):
        ptx = compiled.asm.get("ptx", "") if compiled is not None else ""
        if compiled is not None and not REGISTERS.search(log):
            log = ptxas_report(ptx, self.arch)  # taken from Triton's cache: no ptxas ran
        regs = [int(m) for m in REGISTERS.findall(log)]
        self.compiled.append({
            "kernel": fn.fn.__name__,
            "arch": self.arch,
            "scenario": self.scenario,
            "spec": describe(fn, args, kwargs),
            "ptxas_ok": error is None and bool(regs) and "exit status" not in log,
            "registers": max(regs) if regs else None,
            "spill_bytes": sum(int(n) for n in SPILL.findall(log)),
            "loads": sorted(set(re.findall(r"ld\.global[\.\w]*", ptx))),
            "stores": sorted(set(re.findall(r"st\.global[\.\w]*", ptx))),
            "error": error or (None if regs else log[-2000:]),
        })


def describe(fn, args, kwargs) -> str:
    """The specialisation in words: pointer dtypes, integers divisible by 16 / equal to 1, constexprs."""
    parts = []
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}:{str(value.dtype).replace('torch.', '')}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{name}={'1' if value == 1 else ('16k' if value % 16 == 0 else 'n')}")
    parts += [f"{k}={v}" for k, v in kwargs.items()]
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Running the model


def run_scenario(s: Scenario) -> None:
    from model import create_model

    torch.manual_seed(0)
    model = create_model(s.model, fused_masking="on", **s.overrides).train(s.mode == "train")
    model.blocks, model.decoder_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()  # see the module doc
    cfg = model.cfg
    n, size, c = s.batch, cfg.img_size, cfg.in_chans
    g = torch.Generator().manual_seed(0)
    if s.inputs == "uint8_nhwc":
        images = torch.randint(0, 256, (n, size, size, c), dtype=torch.uint8, generator=g)
    elif s.inputs == "float_nchw":
        images = torch.randn((n, c, size, size), generator=g)
    else:
        images = torch.randn((n, size, size, c), generator=g).half()
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    autocast = (torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[s.precision])
                if s.precision != "fp32" else contextlib.nullcontext())
    if s.mode == "train":
        with autocast:
            out = model(images, labels)
        out.loss.backward()
    else:  # as the trainer's evaluation and the k-NN feature extraction: every patch visible
        with torch.no_grad(), autocast:
            ids = torch.arange(cfg.num_patches).expand(n, -1)
            model.forward_encoder(model.as_nhwc(images), ids)


def main(arch: int, out_path: str) -> int:
    import model.kernels._common as common

    # The launchers accept CPU tensors only under the interpreter; here they go to the stand-in driver instead.
    common.INTERPRETED = True
    triton_driver.set_active(StandInDriver(arch))
    failures = []
    with Recorder(arch) as rec:
        for s in scenarios():
            rec.scenario = s.label
            try:
                run_scenario(s)
            except Exception as e:  # recorded; the other scenarios still run
                failures.append(f"{s.label}: {type(e).__name__}: {str(e)[:2000]}")
    report = {"arch": arch, "triton": triton.__version__, "ptxas": knobs.nvidia.ptxas.path,
              "scenarios": [s.label for s in scenarios()], "failures": failures, "compiled": rec.compiled}
    Path(out_path).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
