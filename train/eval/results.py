"""Evaluation result files: one JSON per (checkpoint, protocol), next to the checkpoint, and `eval.json` in --out.

    RUN/checkpoints/step-000012000.pt
    RUN/checkpoints/step-000012000.knn.json        <checkpoint stem>.<protocol>.json: several protocols and several
    RUN/checkpoints/step-000012000.linprobe.json   checkpoints of one folder never collide; pruning a checkpoint
    RUN/checkpoints/step-000012000.finetune.json   leaves its results
    OUT/eval.json                                  the same content, where --out points (fine-tune / probe runs)

The fields (RESULT_FIELDS, documented in docs/run-folder.md) attach the accuracy to the pre-training compute that
produced the weights, so the compute-to-accuracy tool can read a folder of them without loading checkpoints.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_write_json
from train.checkpoint import CHECKPOINT_DIR, list_checkpoints
from train.distributed import DistEnv, broadcast_object
from train.eval.encoder import PretrainedSource

RESULT_FORMAT = "supmae-fast-eval"
RESULT_VERSION = 1
RESULT_NAME = "eval.json"
PROTOCOLS = ("knn", "linprobe", "finetune")
RESULT_FIELDS = (
    "format", "version", "protocol", "checkpoint", "source", "run", "step", "epoch", "pretrain_images",
    "pretrain_flops", "pretrain_device_hours", "pretrain_compute_source", "top1", "top5", "samples", "metrics", "best",
    "eval_cost", "settings", "model", "world_size", "device", "versions", "environment", "time",
)


def result_path(checkpoint: str | Path, protocol: str) -> Path:
    """`<checkpoint stem>.<protocol>.json` beside the checkpoint file."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{protocol}.json")


def make_result(protocol: str, source: PretrainedSource, metrics: dict[str, Any], settings: dict[str, Any],
                eval_cost: dict[str, Any], world_size: int, device: str, versions: dict[str, Any],
                best: dict[str, Any] | None = None, environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result record (field order = RESULT_FIELDS). metrics: {"top1", "top5", "samples", ...} (all of them are
    kept under "metrics"); eval_cost: what the evaluation itself spent ({"images", "flops", "seconds",
    "device_hours", ...}); best: the best evaluation during training (fine-tune / probe); environment: the
    run's train.system.device.environment_record."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    compute = source.compute or {}
    return {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "protocol": protocol,
        "checkpoint": str(source.path.resolve()) if source.path is not None else None,
        "source": source.kind,
        "run": str(source.run_dir.resolve()) if source.run_dir is not None else None,
        "step": source.step,
        "epoch": source.epoch,
        "pretrain_images": compute.get("images"),
        "pretrain_flops": compute.get("flops"),
        "pretrain_device_hours": compute.get("device_hours"),
        "pretrain_compute_source": compute.get("source"),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "samples": metrics["samples"],
        "metrics": metrics,
        "best": best,
        "eval_cost": eval_cost,
        "settings": settings,
        "model": source.model_cfg.to_dict(),
        "world_size": world_size,
        "device": device,
        "versions": versions,
        "environment": environment,
        "time": time.time(),
    }


def write_result(result: dict[str, Any], out: str | Path | None = None,
                 say: Callable[[str], None] | None = None) -> list[Path]:
    """Write `result` beside its checkpoint (when it has one) and as OUT/eval.json (when `out` is given); returns the
    files written. A checkpoint folder that cannot be written (read-only release) is reported, not fatal."""
    written = []
    if result["checkpoint"] is not None:
        path = result_path(result["checkpoint"], result["protocol"])
        try:
            atomic_write_json(path, result)
            written.append(path)
        except OSError as e:
            message = f"could not write {path} beside the checkpoint ({e}); the result is in --out only"
            (say or (lambda m: warnings.warn(m, stacklevel=2)))(message)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out) / RESULT_NAME, result)
        written.append(Path(out) / RESULT_NAME)
    if not written:
        raise ValueError("the result has no checkpoint to sit beside and no --out folder: pass --out")
    return written


def pending_checkpoints(run: str | Path, protocol: str) -> list[Path]:
    """The checkpoints of the run folder `run` (or of a checkpoints folder) without a `protocol` result beside
    them, oldest first (`--all-checkpoints`). ValueError when the folder holds no checkpoint at all."""
    run = Path(run)
    folder = run / CHECKPOINT_DIR if (run / CHECKPOINT_DIR).is_dir() else run
    found = list_checkpoints(folder)
    if not found:
        raise ValueError(f"--all-checkpoints: no checkpoint (step-*.pt) in {folder}")
    return [ck.path for ck in found if not result_path(ck.path, protocol).is_file()]


def checkpoints_to_evaluate(run: str | Path, protocol: str, env: DistEnv) -> list[Path]:
    """`pending_checkpoints` as rank 0 sees it, on every rank (all ranks evaluate the same files in order)."""
    return broadcast_object(pending_checkpoints(run, protocol) if env.is_main else None, env)


def read_result(path: str | Path) -> dict[str, Any]:
    """Load and check a result file."""
    result = json.loads(Path(path).read_text())
    if result.get("format") != RESULT_FORMAT or result.get("version") != RESULT_VERSION:
        raise ValueError(f"{path} is not a {RESULT_FORMAT} v{RESULT_VERSION} result file")
    return result
