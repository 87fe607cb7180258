"""Step 2: the fused kernels (compiled for this GPU; the interpreter in the CPU smoke run) against the reference
masking ops, fp32 / bf16 / fp16, forward and gradients, at ViT-B/16 shapes and patch 14, then the whole model; then
the GPU-sensitive test files under pytest when pytest is installed.

Tolerances as tests/test_kernels.py: both paths compute in fp32 and round once, so fp32 agrees to 1e-5 and 16-bit
outputs to one unit in the last place (relative 2^-7 bf16, 2^-10 fp16); the whole model under 16-bit autocast to
2e-2 relative (its matmuls round the slightly different inputs differently).
"""

from __future__ import annotations

import re
import subprocess
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RTOL = {"fp32": 1e-5, "bf16": 2**-7, "fp16": 2**-10}
# The test files whose behaviour depends on CUDA being present (compiled kernels, streams, sync mode, peaks).
GPU_TEST_FILES = ("tests/test_kernels.py", "tests/test_compile_step.py", "tests/test_loader_lifetime.py",
                  "tests/test_hardware.py", "tests/test_sync_check.py")
PYTEST_RESERVE_S = 10  # left for writing the report after the tests


def _diff(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    got, want = got.float(), want.float()
    err = (got - want).abs()
    return bool((err <= atol + rtol * want.abs()).all()), float(err.max()) if err.numel() else 0.0


class Table:
    """Rows op x dtype of 'ok <max abs diff>' cells, every cell also a check of the report."""

    def __init__(self, report):
        self.report = report
        self.rows: dict[str, dict[str, str]] = {}

    def compare(self, op: str, dtype: str, got, want, rtol: float | None = None, atol: float = 1e-5) -> None:
        ok, err = _diff(got, want, RTOL[dtype] if rtol is None else rtol, atol)
        self.report.check(f"{op} {dtype}", ok, f"max abs diff {err:.3g}")
        self.rows.setdefault(op, {"op": op})[dtype] = f"{'ok' if ok else 'FAIL'} {err:.2g}"

    def publish(self) -> None:
        for row in self.rows.values():
            self.report.add_row(**row)


def _stage_parity(table: Table, dev, n: int, size: int, patch: int, keep: int, width: int, tag: str,
                  dtypes: tuple[str, ...] = tuple(DTYPES)) -> None:
    from model.masking import random_masking
    from model.masking_ops import REFERENCE_OPS, fused_ops

    fused = fused_ops()
    g = torch.Generator().manual_seed(0)
    num = (size // patch) ** 2
    ids, mask = random_masking(torch.rand(n, num, generator=g), keep)
    ids, mask = ids.to(dev), mask.to(dev)
    u8 = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).to(dev)
    nchw = torch.randn(n, 3, size, size, generator=g).to(dev)
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    scale, shift = (1 / (255 * std)).to(dev), (-mean / std).to(dev)
    for name in dtypes:
        dt = DTYPES[name]
        for kind, images in (("uint8 NHWC", u8), ("float NCHW", nchw.to(dt).permute(0, 2, 3, 1))):
            got, want = (ops.gather_visible_patches(images, ids, patch, scale, shift, dt)
                         for ops in (fused, REFERENCE_OPS))
            table.compare(f"gather {kind}{tag}", name, got, want)
        x0 = torch.randn(n, 1 + keep, width, generator=g).to(dev, dt)
        mt0, pe = torch.randn(1, 1, width, generator=g).to(dev), torch.randn(1, 1 + num, width, generator=g).to(dev)
        grad = torch.randn(n, 1 + num, width, generator=g).to(dev)
        pred0 = torch.randn(n, num, patch * patch * 3, generator=g).to(dev, dt)
        outs = []
        for ops in (fused, REFERENCE_OPS):
            x, mt, pred = x0.clone().requires_grad_(), mt0.clone().requires_grad_(), pred0.clone().requires_grad_()
            out = ops.unshuffle_decoder_tokens(x, ids, mt, pe)
            out.backward(grad)
            loss = ops.masked_patch_loss(pred, u8, mask, patch, True, scale, shift)
            loss.backward()
            outs.append((out, x.grad, mt.grad, loss, pred.grad))
        (out, gx, gmt, loss, gp), (r_out, r_gx, r_gmt, r_loss, r_gp) = outs
        # The mask token is rounded to x's dtype before the fp32 add: one ulp of it, absolute.
        table.compare(f"unshuffle forward{tag}", name, out, r_out, atol=1e-5 + RTOL[name] * float(mt0.abs().max()))
        table.compare(f"unshuffle grad x{tag}", name, gx, r_gx)
        # fp32 sums of the masked rows; the reference rounds each row to x's dtype first when x is 16-bit.
        table.compare(f"unshuffle grad mask token{tag}", name, gmt, r_gmt, rtol=2e-2 if name != "fp32" else None,
                      atol=1e-5 if name == "fp32" else 0.05 * (n * num) ** 0.5)
        table.compare(f"loss (norm-pix){tag}", name, loss, r_loss, rtol=1e-5)
        table.compare(f"loss grad pred{tag}", name, gp, r_gp, atol=1e-7)


def _model_parity(table: Table, dev, smoke: bool, dtypes: tuple[str, ...] = tuple(DTYPES)) -> None:
    from model import create_model

    kw = dict(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=2, cls_hidden=32) if smoke else {}
    name = "supmae_vit_tiny_patch16" if smoke else "supmae_vit_base_patch16"
    n, size = (3, 16) if smoke else (16, 224)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).to(dev)
    labels = torch.randint(0, 10, (n,), generator=g).to(dev)
    noise = torch.rand(n, (size // (4 if smoke else 16)) ** 2, generator=g).to(dev)
    for dname in dtypes:
        dt = DTYPES[dname]
        runs = []
        for mode in ("on", "off"):
            torch.manual_seed(0)
            model = create_model(name, fused_masking=mode, **kw).to(dev).train()
            with torch.autocast(dev.type, dtype=dt, enabled=dname != "fp32"):
                out = model(images, labels, noise=noise)
            out.loss.backward()
            runs.append((out.loss.detach(), model.patch_embed.proj.weight.grad, model.mask_token.grad))
            del model
        rtol, atol = (1e-4, 1e-5) if dname == "fp32" else (2e-2, 2e-3)
        for what, a, b in zip(("loss", "grad patch embedding", "grad mask token"), *runs, strict=True):
            table.compare(f"model {name} {what}", dname, a, b, rtol=rtol, atol=atol)


def _pytest(ctx, report) -> None:
    """The GPU-sensitive test files on this machine, within the time left."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        report.notes.append("pytest is not installed: the test files were not run (the checks above were)")
        return
    budget = ctx.left() - PYTEST_RESERVE_S
    if budget < 20:
        report.notes.append(f"no time left for the test files ({budget:.0f} s)")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", *GPU_TEST_FILES]
    log = ctx.work / "pytest.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = log.read_text(errors="replace")
    print(out[-6000:], flush=True)
    what = f"pytest {' '.join(GPU_TEST_FILES)}"
    final = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)), "")
    if proc.returncode not in (0, 1) and not final:
        # Out of time: a failure is reported as one, an unfinished run as a note (the budget, not the code).
        progress = "".join(line for line in out.splitlines() if re.fullmatch(r"[.sFExX]+( +\[ *\d+%\])?", line))
        failed = progress.count("F") + progress.count("E")
        if failed:
            report.check(what, False, f"{failed} failed before the time ran out ({budget:.0f} s); see {log}")
        else:
            report.notes.append(f"the test files did not finish within {budget:.0f} s: {progress.count('.')} passed, "
                                f"none failed so far ({log})")
        report.details["pytest"] = f"unfinished: {progress.count('.')} passed, {failed} failed"
        return
    report.details["pytest"] = final.strip("= ")
    report.check(what, proc.returncode == 0, final.strip("= "))


def run_parity(ctx, report) -> None:
    dev = ctx.device
    table = Table(report)
    if ctx.smoke:  # the interpreter is slow: every dtype at patch 4, the GPU default (bf16) for the rest
        _stage_parity(table, dev, n=2, size=8, patch=4, keep=2, width=16, tag="")
        _stage_parity(table, dev, n=1, size=28, patch=14, keep=2, width=16, tag=" (patch 14)", dtypes=("bf16",))
        _model_parity(table, dev, True, dtypes=("bf16",))
    else:
        _stage_parity(table, dev, n=32, size=224, patch=16, keep=49, width=512, tag="")
        _stage_parity(table, dev, n=8, size=224, patch=14, keep=64, width=512, tag=" (patch 14)")
        _model_parity(table, dev, False)
    table.publish()
    failed = [c["what"] for c in report.checks if not c["ok"]]
    report.summary = (f"{len(report.checks) - len(failed)}/{len(report.checks)} comparisons within tolerance"
                      + (f"; outside: {', '.join(failed[:4])}" if failed else ""))
    if ctx.smoke:
        report.notes.append("CPU smoke: the test files run in the suite itself, not here")
    else:
        _pytest(ctx, report)
        if "pytest" in report.details:
            report.summary += f"; tests: {report.details['pytest']}"
