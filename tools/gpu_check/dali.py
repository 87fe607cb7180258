"""Step 6 (when DALI imports): GPU decoding.

  train pipeline   the DALI train loader (`mixed` nvJPEG decoding of the crop window, cubic resize to 224, flip,
                   uint8 NHWC), batch 256, on ImageNet-sized JPEGs the check makes (500 x 375, sharded with the
                   tool's defaults), images/s at hw_decoder_load 0 (CUDA decoding only), 0.65 (the default) and 1.0
                   (the hardware JPEG decoder takes everything it can)
  eval pipeline    decode + resize + centre crop, images/s
  data wait        `bench e2e`'s measurement: the real training loop (train.pretrain.build + Trainer.train, the
                   SupMAE ViT-B/16 recipe at batch 256, bf16, fused masking, compile) fed by the DALI loader; the
                   share of its wall time spent waiting for data, and its images/s

Loader rates count the images handed over between a first and a last batch, with the device synchronised at both
ends (the work the hand-off left queued on the stream is included). The CPU smoke run uses DALI's CPU backend at
tiny sizes (where hw_decoder_load does nothing).
"""

from __future__ import annotations

import os
import statistics
import time

LOADS = (0.0, 0.65, 1.0)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(cfg, images: int, warmup_batches: int = 2) -> float:
    """images/s of the loader of `cfg` over `images` images after `warmup_batches` batches (see the module doc)."""
    from pipeline.loaders.build import build_loader
    from tools.bench.pipeline import endless

    loader = build_loader(cfg)
    stream = endless(lambda: iter(loader))
    for _ in range(warmup_batches):
        next(stream)
    _sync(loader.device)
    t0, got = time.perf_counter(), 0
    while got < images:
        got += next(stream).num_valid
    _sync(loader.device)
    return got / (time.perf_counter() - t0)


def run_dali(ctx, report) -> None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:
        from tools.gpu_check.step import Skip

        raise Skip(f"DALI is not importable here ({type(e).__name__}: {str(e)[:200]}); ./launch.sh setup installs "
                   "the variant for this driver") from e
    from pipeline.loaders.base import LoaderConfig
    from tools.bench.e2e import E2EConfig, run_e2e
    from tools.gpu_check.data import make_shards
    from train.config import build_config

    threads = max(1, min(8, len(os.sched_getaffinity(0)) - 1))
    device = "cpu" if ctx.smoke else "cuda"
    images, size, batch, img = (32, (64, 48), 8, 32) if ctx.smoke else (2048, (500, 375), 256, 224)
    data = make_shards(ctx.work / "data", images, size)
    measured = images if ctx.smoke else 2 * images  # two epochs per rate on a GPU
    for load in LOADS:
        cfg = LoaderConfig(str(data), batch, img, device=device, num_threads=threads, hw_decoder_load=load)
        rate = loader_rate(cfg, measured)
        report.check(f"train pipeline, hw_decoder_load {load}", rate > 0, f"{rate:,.0f} images/s")
        report.add_row(pipeline="train (mixed decode)" if not ctx.smoke else "train (CPU backend)",
                       hw_decoder_load=load, batch=batch, **{"images/s": rate})
    rate = loader_rate(LoaderConfig(str(data), batch, img, train=False, device=device, num_threads=threads), measured)
    report.check("eval pipeline", rate > 0, f"{rate:,.0f} images/s")
    report.add_row(pipeline="eval (decode, resize, centre crop)", hw_decoder_load=0.65, batch=batch,
                   **{"images/s": rate})

    recipe = "supmae_vit_tiny_demo" if ctx.smoke else "supmae_vit_base_in1k_400ep"
    cfg = build_config(recipe, {"data": str(data), "out": "<scratch>", "device": device, "batch_size": batch,
                                "data_threads": threads, "data_backend": "dali", "img_size": img})
    steps = 1 if ctx.smoke else 8
    windows, run_config = run_e2e(cfg, E2EConfig((cfg,), steps=steps, warmup=1, repeats=2, device=device))
    wait = statistics.median(w["data_wait"] for w in windows)
    ips = statistics.median(w["images_per_sec"] for w in windows)
    report.check("real loop fed by DALI", ips > 0, f"{ips:,.0f} images/s, data wait {100 * wait:.1f}%")
    report.details.update(loop={"recipe": recipe, "images_per_sec": ips, "data_wait": wait, "steps": steps * 2,
                                "compile": run_config["derived"]["compile"]})
    report.add_row(pipeline=f"real loop, {recipe} (data wait {100 * wait:.1f}%)", hw_decoder_load=0.65,
                   batch=batch, **{"images/s": ips})
    best = max(r["images/s"] for r in report.rows[: len(LOADS)])
    report.summary = (f"train pipeline up to {best:,.0f} images/s; eval {rate:,.0f} images/s; the real SupMAE loop "
                      f"waits {100 * wait:.1f}% of its time for data")
