"""Step 3: the SupMAE and MAE ViT-B/16 training step at batch 256 in three configurations, each timed by
`bench model`'s step (train.step_timing.TrainStep: zero_grad, forward, backward, AdamW, synthetic input on the
device):

    original              fp16 autocast + GradScaler, normalised float NCHW input, reference masking, eager
                          (the original code's recipe, torch's default AdamW)
    bf16 fused            bf16 autocast, uint8 NHWC input (the DALI loader's), fused Triton masking, fused AdamW
    bf16 fused compile    the same under torch.compile

with images/s, TFLOP/s (analytic training FLOPs), MFU against this GPU's dense peak and peak memory; the speed-up
is against the original recipe of the same model, measured in the same run. The CPU smoke run times tiny models
(the fused kernels under the interpreter) and leaves torch.compile out (Inductor's C++ build takes longer than the
whole smoke run).
"""

from __future__ import annotations

from dataclasses import replace

MODELS = ("supmae_vit_base_patch16", "mae_vit_base_patch16")
SMOKE_MODELS = ("supmae_vit_tiny_patch16", "mae_vit_tiny_patch16")


# CPU smoke: two-block models of width 32 at 16 px (the presets' widths would take seconds per step on a CPU).
SMOKE_ARGS = (("cls_hidden", 32), ("decoder_depth", 1), ("decoder_embed_dim", 32), ("decoder_num_heads", 2),
              ("depth", 1), ("embed_dim", 32), ("img_size", 16), ("num_classes", 10), ("num_heads", 2),
              ("patch_size", 4))


def configs(model: str, smoke: bool) -> list[tuple[str, object]]:
    from tools.bench.e2e import ConfigStepSetup
    from train.step_timing import StepSetup, original_recipe

    if smoke:
        base = ConfigStepSetup(model=model, batch_size=2, device="cpu", dtype="bf16", fused="on",
                               model_args=SMOKE_ARGS)
    else:
        base = StepSetup(model=model, batch_size=256, device="cuda", dtype="bf16", fused="on")
    out = [("original", original_recipe(base)), ("bf16 fused", base)]
    if not smoke:
        out.append(("bf16 fused compile", replace(base, compile=True)))
    return out


def run_train_step(ctx, report) -> None:
    from tools.bench.model import time_train_step

    timing = dict(warmup=0, repeats=1, steps=1) if ctx.smoke else dict(warmup=3, repeats=3, steps=10)
    best = {}
    for model in SMOKE_MODELS if ctx.smoke else MODELS:
        original = None
        for label, setup in configs(model, ctx.smoke):
            try:
                row = time_train_step(setup, **timing)
            except Exception as e:  # e.g. out of memory: this row fails, the others still run
                report.check(f"{model} {label}", False, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            report.check(f"{model} {label}", row["images/s"] > 0, setup.describe())
            original = row["images/s"] if label == "original" else original
            report.add_row(model=model.replace("_patch16", "/16"), config=label, describe=setup.describe(),
                           batch=setup.batch_size, **{k: row[k] for k in ("ms/step", "spread", "images/s",
                                                                          "TFLOP/s", "MFU", "peak GiB")},
                           speedup=f"{row['images/s'] / original:.2f}x" if original else None)
            if model not in best or row["images/s"] > best[model][1]:
                best[model] = (label, row["images/s"], row["MFU"])
    report.summary = "; ".join(f"{m.split('_')[0]}: best {lab} {ips:,.0f} images/s" + (f", MFU {mfu}" if mfu else "")
                               for m, (lab, ips, mfu) in best.items())
    if ctx.smoke:
        report.notes.append("CPU smoke: tiny models, the fused kernels under the Triton interpreter (their timings "
                            "mean nothing), no torch.compile row")
