"""Two tiny fabricated pre-training run folders with hand-picked numbers, for the compute-to-accuracy tests.

Layout and fields as docs/run-folder.md and train/eval/results.py define them (config.json, metrics.jsonl,
checkpoints/<stem>.<protocol>.json); no checkpoint files (pruned checkpoints leave their results).

SupMAE: 1 GFLOP per trained image, 10,000 images per step of 100 (1e6 images = 1 PFLOP per 100 steps)
    step    0: 0 PFLOPs, 0.00 h, k-NN 20%      (the untrained initialisation)
    step  100: 1 PFLOP,  0.10 h, k-NN 40%
    step  200: 2 PFLOPs, 0.20 h, k-NN 55%      (exactly MAE's best: a tie counts as reached)
    step  300: 3 PFLOPs, 0.30 h, k-NN 60%      (SupMAE's best)
MAE: 2 GFLOPs per trained image
    step    0: 0 PFLOPs, 0.00 h, k-NN 20%
    step  100: 2 PFLOPs, 0.15 h, k-NN 35%
    step  200: 4 PFLOPs, 0.30 h, k-NN 50%
    step  300: 6 PFLOPs, 0.45 h, k-NN 55%      (MAE's best; step 400 ties it with more compute)
    step  400: 8 PFLOPs, 0.60 h, k-NN 55%

Hand-checked: SupMAE reaches MAE's best (55%, step 300, 6 PFLOPs, 0.45 h) at step 200: 2/6 = 33.3% of the FLOPs,
0.20/0.45 = 44.4% of the device-hours, the crossing lying between 1 PFLOP (step 100, 40%) and 2 PFLOPs. MAE never
reaches SupMAE's best (60%): its best is 55% and it was evaluated up to 8 PFLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path

SUPMAE = {"gflops": 1.0, "evals": [(0, 0.0, 0.20), (100, 0.10, 0.40), (200, 0.20, 0.55), (300, 0.30, 0.60)]}
MAE = {"gflops": 2.0, "evals": [(0, 0.0, 0.20), (100, 0.15, 0.35), (200, 0.30, 0.50), (300, 0.45, 0.55),
                                (400, 0.60, 0.55)]}
IMAGES_PER_STEP = 10_000


def model_dict(cls_branch: bool) -> dict:
    return {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 192, "depth": 6, "num_heads": 3,
            "decoder_embed_dim": 128, "decoder_depth": 1 if cls_branch else 8, "decoder_num_heads": 4,
            "mlp_ratio": 4.0, "norm_eps": 1e-6, "norm_pix_loss": True, "cls_branch": cls_branch, "num_classes": 10,
            "cls_hidden": 768, "global_pool": True, "cls_loss_ratio": 0.01, "temperature": 10.0,
            "fused_masking": "off"}


def write_run(folder: Path, spec: dict, cls_branch: bool, protocol: str = "knn", eval_samples: int = 1000) -> Path:
    """A run folder with `spec`'s evaluations (step, device-hours, top-1) and a train record every 50 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    per_image = int(spec["gflops"] * 1e9)
    model = model_dict(cls_branch)
    last = spec["evals"][-1]
    config = {"train": {"recipe": "fabricated", "batch_size": IMAGES_PER_STEP // 100},
              "model": model,
              "derived": {"train_flops_per_image": per_image, "train_samples": 50_000, "train_classes": 10,
                          "device": "cpu", "world_size": 1}}
    (folder / "config.json").write_text(json.dumps(config))
    hours_per_step = last[1] / last[0]
    lines = []
    for step in range(50, last[0] + 1, 50):
        images = step * IMAGES_PER_STEP
        lines.append({"kind": "train", "step": step, "epoch": step / 100, "images": images,
                      "flops": images * per_image, "device_hours": step * hours_per_step,
                      "loss": 1.0 / step ** 0.5 + (0.01 if cls_branch else 0.0), "rec_loss": 1.0 / step ** 0.5,
                      "cls_loss": 2.0 / step ** 0.5 if cls_branch else None, "images_per_sec": 100.0,
                      "data_wait": 0.05})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ck = folder / "checkpoints"
    ck.mkdir(exist_ok=True)
    for step, hours, top1 in spec["evals"]:
        images = step * IMAGES_PER_STEP
        result = {"format": "supmae-fast-eval", "version": 1, "protocol": protocol,
                  "checkpoint": str((ck / f"step-{step:09d}.pt").resolve()), "source": "checkpoint",
                  "run": str(folder.resolve()), "step": step, "epoch": step // 100, "pretrain_images": images,
                  "pretrain_flops": images * per_image, "pretrain_device_hours": hours,
                  "pretrain_compute_source": "metrics.jsonl", "top1": top1, "top5": min(1.0, top1 + 0.3),
                  "samples": eval_samples, "model": model}
        (ck / f"step-{step:09d}.{protocol}.json").write_text(json.dumps(result))
    return folder


def write_pair(root: Path) -> tuple[Path, Path]:
    return write_run(root / "supmae", SUPMAE, True), write_run(root / "mae", MAE, False)
