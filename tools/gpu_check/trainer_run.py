"""Steps 4 and 5: the real trainer (`train.pretrain.main`, what `./launch.sh pretrain` runs in each process) on
shards the check writes.

Step 4, trainer: SupMAE ViT-B/16 at 224, batch 64, bf16, fused masking, torch.compile (the GPU defaults), 50 steps
with `--sync-check` (from the second step on any host sync in the hot path raises; log intervals and checkpoints
are exempt), a checkpoint at step 25; then a second run resumed from that checkpoint must log steps 26-50 with
exactly the same losses, gradient norms and learning rates. The comparison needs deterministic kernels: attention
runs on PyTorch's math backend here (the fused flash / memory-efficient / cuDNN attention backwards accumulate with
atomics) and cuBLAS gets a fixed workspace (CUBLAS_WORKSPACE_CONFIG, set by the runner).

Step 5, ddp: SUPMAE_PROCESS_GROUP=1 makes the one process join an NCCL process group (world size 1), so the
trainer wraps the model in DistributedDataParallel and reduces through NCCL as on a multi-GPU node: a few steps of a
two-block ViT-B (torch.compile on, as in production).

The loader is DALI's when DALI imports, else the torch backend (PIL + torchvision, no other package). The CPU smoke
run does the same with a tiny model on the CPU (gloo; the sync check does not apply there).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import traceback
from pathlib import Path

SMOKE_MODEL = ["--model", "supmae_vit_tiny_patch16", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
               "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-num-heads", "2",
               "--cls-hidden", "32", "--batch-size", "4"]
GPU_MODEL = ["--model", "supmae_vit_base_patch16", "--img-size", "224", "--batch-size", "64"]
GPU_DDP_MODEL = ["--model", "supmae_vit_base_patch16", "--img-size", "224", "--batch-size", "32", "--depth", "2"]
COMPARED = ("loss", "rec_loss", "cls_loss", "grad_norm", "lr")


def train_data(ctx) -> tuple[Path, int]:
    """(shard folder, images) of the trainer steps' data."""
    from tools.gpu_check.data import make_shards

    images, size = (32, (32, 24)) if ctx.smoke else (1600, (256, 256))
    return make_shards(ctx.work / "data", images, size), images


def data_backend() -> str:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return "torch"
    return "dali"


def fresh(folder: Path) -> Path:
    """A run folder of the check under OUTDIR/work, emptied of an earlier check's run."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def pretrain(argv: list[str]) -> tuple[int, str | None]:
    """(exit status, error) of `train.pretrain.main(argv)` in this process; an exception becomes status 1 with
    its first line (the traceback goes to the step's log)."""
    from train.pretrain import main

    try:
        return main(argv), None
    except Exception as e:
        traceback.print_exc()
        return 1, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:400]}"


def train_records(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["step"]: r for r in records if r.get("kind") == "train"}


def common_args(ctx, data: Path, images: int, batch: int, steps: int) -> list[str]:
    threads = max(1, min(8, len(os.sched_getaffinity(0)) - 1))
    epochs = math.ceil(steps / (images // batch))
    return ["--data", str(data), "--data-backend", data_backend(), "--data-threads", str(threads),
            "--epochs", str(epochs), "--warmup-epochs", "0.5", "--max-steps", str(steps), "--display", "plain",
            "--no-tensorboard", "--device", "cpu" if ctx.smoke else "cuda"]


def run_trainer(ctx, report) -> None:
    import torch

    from train.checkpoint import checkpoint_name

    if not ctx.smoke:
        # Deterministic attention for the exact-resume comparison (see the module doc).
        for backend in ("flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
        report.notes.append("attention on PyTorch's math backend and CUBLAS_WORKSPACE_CONFIG=:4096:8, so that the "
                            "resumed run can reproduce the losses bit for bit")
    data, images = train_data(ctx)
    steps, half = (6, 3) if ctx.smoke else (50, 25)
    model = SMOKE_MODEL if ctx.smoke else GPU_MODEL
    batch = int(model[model.index("--batch-size") + 1])
    args = [*model, *common_args(ctx, data, images, batch, steps), "--log-every", "1", "--ckpt-every", str(half),
            "--keep", "10", "--sync-check"]
    first, second = fresh(ctx.work / "trainer-1"), fresh(ctx.work / "trainer-2")
    report.details.update(data_backend=data_backend(), steps=steps, resumed_at=half, batch=batch)

    rc, err = pretrain([*args, "--out", str(first)])
    sync = "with --sync-check (no host sync in the hot path)" if not ctx.smoke else "(CPU: no sync check)"
    if not report.check(f"run 1: {steps} steps {sync}", rc == 0, err or f"exit status {rc}"):
        return
    records = train_records(first)
    report.check(f"run 1 logged steps 1-{steps}", sorted(records) == list(range(1, steps + 1)), f"{sorted(records)}")
    ckpt = first / "checkpoints" / checkpoint_name(half)
    if not report.check(f"checkpoint of step {half} written", ckpt.is_file(), str(ckpt)):
        return
    rc, err = pretrain([*args, "--out", str(second), "--resume", str(ckpt)])
    if not report.check(f"run 2: resumed from step {half}", rc == 0, err or f"exit status {rc}"):
        return
    resumed = train_records(second)
    mismatches = []
    for step in range(half + 1, steps + 1):
        a, b = records.get(step, {}), resumed.get(step, {})
        for key in COMPARED:
            if a.get(key) != b.get(key):
                mismatches.append(f"step {step} {key}: {a.get(key)!r} vs {b.get(key)!r}")
    report.check(f"steps {half + 1}-{steps} of the resumed run equal the uninterrupted run's ({', '.join(COMPARED)})",
                 not mismatches and len(resumed) == steps - half,
                 "; ".join(mismatches[:3]) or f"{len(resumed)} records, all equal")
    for step in (1, half, steps):
        r = records.get(step, {})
        report.add_row(run="uninterrupted", step=step, loss=r.get("loss"), grad_norm=r.get("grad_norm"),
                       **{"images/s": r.get("images_per_sec"), "data wait": r.get("data_wait")})
    r = resumed.get(steps, {})
    report.add_row(run=f"resumed at {half}", step=steps, loss=r.get("loss"), grad_norm=r.get("grad_norm"),
                   **{"images/s": r.get("images_per_sec"), "data wait": r.get("data_wait")})
    for folder in (first, second):  # the checkpoints are large (ViT-B with AdamW state: about 1.2 GB each)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    report.summary = (f"{steps} steps {sync}; resumed at {half}: steps {half + 1}-{steps} "
                      + ("identical" if not mismatches else f"differ ({len(mismatches)} values)")
                      + f"; loader {data_backend()}")


def run_ddp(ctx, report) -> None:
    from train.distributed import FORCE_GROUP_ENV

    data, images = train_data(ctx)
    os.environ[FORCE_GROUP_ENV] = "1"
    model = SMOKE_MODEL if ctx.smoke else GPU_DDP_MODEL
    batch = int(model[model.index("--batch-size") + 1])
    steps = 2 if ctx.smoke else 6
    out = fresh(ctx.work / "ddp")
    rc, err = pretrain([*model, *common_args(ctx, data, images, batch, steps), "--log-every", "2", "--ckpt-every",
                        "0", "--out", str(out)])
    if not report.check(f"{steps} steps through DDP in a process group of one", rc == 0, err or f"exit status {rc}"):
        return
    derived = json.loads((out / "config.json").read_text())["derived"]
    want = "gloo" if ctx.smoke else "nccl"
    report.check(f"{want} process group, world size 1, DDP wrapper",
                 (derived["process_group"], derived["world_size"], derived["ddp"]) == (want, 1, True),
                 f"process_group {derived['process_group']}, world_size {derived['world_size']}, "
                 f"ddp {derived['ddp']}")
    records = train_records(out)
    report.check("losses logged and finite", bool(records) and all(r.get("loss") is not None for r in records.values()),
                 f"{len(records)} records")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    last = records[max(records)] if records else {}
    report.details.update(derived={k: derived.get(k) for k in ("process_group", "world_size", "ddp", "compile")})
    report.summary = (f"{want} world size 1, DDP {'on' if derived['ddp'] else 'off'}, compile "
                      f"{'on' if derived.get('compile') else 'off'}: {steps} steps, last loss {last.get('loss')}")
