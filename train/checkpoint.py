"""Checkpoint files of a run: naming, atomic writing, finding the newest valid one, pruning.

    OUT/checkpoints/step-000012000.pt                rolling: the newest `keep` of all checkpoints are kept
    OUT/checkpoints/epoch-0050-step-000125000.pt     epoch-end checkpoint of a --keep-every epoch: kept for good

A file is written under a temporary name and renamed (pipeline.fileio.atomic_path), so a file under its final
name is complete even after `kill -9`; a damaged file (disk trouble, a partial copy) is skipped with a warning by
`latest_checkpoint`. Contents (schema in docs/run-folder.md): CHECKPOINT_FORMAT / version, step, epoch, model,
optimizer, scaler, loader (per rank), rng (per rank), world_size, compute, config. The "model" entry is a plain
state_dict, so `model.load_checkpoint` (and the evaluation tools) read these files like the original releases.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.fileio import TMP_SUFFIX, atomic_path

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "supmae-fast-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "epoch", "model", "optimizer", "loader", "rng", "world_size",
                 "compute", "config")
_NAME_RE = re.compile(r"^(?:epoch-(\d{4,})-)?step-(\d{9,})\.pt$")


@dataclass(frozen=True, order=True)
class CheckpointFile:
    step: int
    permanent: bool
    path: Path


def checkpoint_name(step: int, epoch: int | None = None) -> str:
    """File name of the checkpoint after `step` optimiser steps; `epoch` (1-based count of finished epochs) marks
    a checkpoint kept for good."""
    return f"step-{step:09d}.pt" if epoch is None else f"epoch-{epoch:04d}-step-{step:09d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[CheckpointFile]:
    """Checkpoint files in `folder`, oldest first (by step; a permanent file sorts after a rolling one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file():
            found.append(CheckpointFile(int(m.group(2)), m.group(1) is not None, p))
    return sorted(found)


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, step: int,
                    permanent_epoch: int | None = None) -> Path:
    """Write `state` atomically as the checkpoint of `step`; returns the final path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step, permanent_epoch)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint of this project (CPU tensors, `weights_only`); ValueError when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found") from None
    except Exception as e:  # truncated zip, unpickling errors
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (an original MAE/SupMAE .pth or a "
                         "bare state_dict initialises weights with --init instead)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')!r} is not supported "
                         f"(this version reads {CHECKPOINT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return state


def latest_checkpoint(folder: str | os.PathLike,
                      warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that reads back, with its contents; None when there is none.

    A newer file that fails to read is reported through `warn` and skipped, falling back to the previous one.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for ck in reversed(list_checkpoints(folder)):
        try:
            return ck.path, read_checkpoint(ck.path)
        except ValueError as e:
            warn(f"skipping unreadable checkpoint {ck.path}: {e}; falling back to the previous one")
    return None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, never a permanent one; returns what was deleted."""
    files = list_checkpoints(folder)
    newest = {ck.path for ck in files[-keep:]} if keep > 0 else set()
    removed = []
    for ck in files:
        if not ck.permanent and ck.path not in newest:
            ck.path.unlink(missing_ok=True)
            removed.append(ck.path)
    return removed


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written checkpoint files left by a killed run (temporary names, never renamed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
