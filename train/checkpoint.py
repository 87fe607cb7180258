"""Checkpoint files of a run: naming, durable writing with a digest, choosing the one to resume, pruning.

    OUT/checkpoints/step-000012000.pt                rolling: the newest `keep` readable checkpoints are kept
    OUT/checkpoints/epoch-0050-step-000125000.pt     epoch-end checkpoint of a --keep-every epoch: kept for good
    OUT/checkpoints/abandoned-after-step-000010000/  newer checkpoints set aside when a run resumed an older one
    OUT/checkpoints/unreadable/                      damaged checkpoints found by pruning or passed over by a resume
                                                     (moved, never deleted)

Writing: `torch.save` streams into a temporary file while its sha256 is computed; the digest goes into the zip
archive's comment field (`supmae-fast-sha256:<hex>`, the file stays a plain torch zip that any `torch.load`
reads), then fsync, rename, fsync of the folder (pipeline.fileio). A full disk is a DiskFullError that names the
file, the free space and the size a checkpoint needs; nothing half-written appears under a final name.

Reading (`read_checkpoint`): the digest is verified before unpickling; a mismatch (a flipped byte, which torch
itself does not notice) is a ValueError naming the file. Files written before digests existed are checked
against their zip members' CRC-32s instead.

Choosing (`select_checkpoint`) is the one rule behind both resuming and pruning: checkpoints are considered newest
first (by step; a permanent file sorts after a rolling one of the same step) and the first that reads back wins;
every newer one passed over is reported with the reason. Pruning (`prune_checkpoints`) never deletes the
checkpoint just written, never counts an unreadable file as kept, and so always keeps the newest readable one.

Contents (schema in docs/run-folder.md): CHECKPOINT_FORMAT / version, step, epoch, model, optimizer, scaler, loader
(per rank), rng (per rank), world_size, compute, config. The "model" entry is a plain state_dict, so
`model.load_checkpoint` (and the evaluation tools) read these files like the original releases.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import torch_load_problem
from pipeline.fileio import (
    TMP_SUFFIX,
    DiskFullError,
    HashingWriter,
    disk_full_error,
    fsync_dir,
    is_disk_full,
    replace_durably,
    tmp_path_for,
)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "supmae-fast-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "epoch", "model", "optimizer", "loader", "rng", "world_size",
                 "compute", "config")
ABANDONED_PREFIX = "abandoned-after-step-"
UNREADABLE_DIR = "unreadable"
DIGEST_PREFIX = b"supmae-fast-sha256:"
_NAME_RE = re.compile(r"^(?:epoch-(\d{4,})-)?step-(\d{9,})\.pt$")
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes, the last 2 the comment length
_EOCD_SIZE = 22
_DIGEST_COMMENT_LEN = len(DIGEST_PREFIX) + 64
# Files this process wrote or verified, with the (size, mtime) they had then: pruning need not read them again.
_verified: dict[Path, tuple[int, int]] = {}


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
    """Checkpoint files in `folder` (not its sub-folders), oldest first (by step; a permanent file sorts after a
    rolling one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file():
            found.append(CheckpointFile(int(m.group(2)), m.group(1) is not None, p))
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------------
# Digest


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _remember(path: Path) -> None:
    _verified[path.absolute()] = _stat_key(path)


def _state_bytes(obj: Any) -> int:
    """Tensor bytes in a nested state (what a checkpoint of it takes, give or take the pickled metadata)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _add_digest(f, length: int, digest: str) -> None:
    """Put `digest` into the zip comment of the archive of `length` bytes that `f` holds (torch writes none)."""
    f.seek(length - _EOCD_SIZE)
    eocd = f.read(_EOCD_SIZE)
    if len(eocd) != _EOCD_SIZE or eocd[:4] != _EOCD or eocd[-2:] != b"\0\0":
        raise RuntimeError("torch.save wrote no plain zip end record; cannot add the checkpoint digest")
    comment = DIGEST_PREFIX + digest.encode("ascii")
    f.seek(length - 2)
    f.write(struct.pack("<H", len(comment)) + comment)


def stored_digest(path: str | os.PathLike) -> str | None:
    """The sha256 recorded in a checkpoint's zip comment, or None when it has none."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = _EOCD_SIZE + _DIGEST_COMMENT_LEN
        if size < tail_len:
            return None
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    if tail[:4] != _EOCD or struct.unpack("<H", tail[20:22])[0] != _DIGEST_COMMENT_LEN:
        return None
    comment = tail[_EOCD_SIZE:]
    if not comment.startswith(DIGEST_PREFIX):
        return None
    return comment[len(DIGEST_PREFIX):].decode("ascii", "replace")


def verify_checkpoint_bytes(path: str | os.PathLike) -> None:
    """Check a checkpoint's bytes: its digest, or (older files without one) its zip members' CRC-32s.

    Raises ValueError naming the file when they do not match; files this process wrote or already verified, and
    unchanged since, are not read again.
    """
    path = Path(path)
    key = path.absolute()
    try:
        if _verified.get(key) == _stat_key(path):
            return
    except OSError:
        pass
    want = stored_digest(path)
    if want is None:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise ValueError(f"{path} is not a readable checkpoint archive ({type(e).__name__}: {e})") from e
        if bad is not None:
            raise ValueError(f"{path}: member {bad} fails its CRC-32 check (the file was damaged after it was "
                             "written)")
    else:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            remaining = f.seek(0, os.SEEK_END) - _DIGEST_COMMENT_LEN - 2
            f.seek(0)
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 22))
                if not chunk:
                    break
                sha.update(chunk)
                remaining -= len(chunk)
        sha.update(b"\0\0")  # the comment length as torch wrote it
        if sha.hexdigest() != want:
            raise ValueError(f"{path}: digest mismatch: its bytes changed after it was written (disk damage or a "
                             "bad copy), so it is not used")
    _remember(path)


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, step: int,
                    permanent_epoch: int | None = None) -> Path:
    """Write `state` durably as the checkpoint of `step` with its digest; returns the final path.

    Raises DiskFullError (nothing left under a temporary or final name) when the disk is full.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step, permanent_epoch)
    tmp = tmp_path_for(path)
    writer = None
    try:
        with open(tmp, "wb+") as f:
            writer = HashingWriter(f)
            torch.save(state, writer)
            writer.flush()
            _add_digest(f, writer.bytes, writer.sha.hexdigest())
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e if is_disk_full(e) else (writer.error if writer is not None else None)
        if is_disk_full(cause) and not isinstance(e, DiskFullError):
            previous = [c.path.stat().st_size for c in list_checkpoints(folder)]
            needed = max(previous) if previous else _state_bytes(state)
            raise disk_full_error(path, "checkpoint", needed, cause) from e
        raise
    _remember(path)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify, load and check a checkpoint of this project (CPU tensors, `weights_only`); ValueError when it is
    damaged or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    verify_checkpoint_bytes(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling errors
        raise ValueError(f"cannot read checkpoint {path}: {torch_load_problem(path, e)}") from e
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


# ----------------------------------------------------------------------------------------------------------------
# Choosing: resume and pruning


@dataclass
class Selection:
    """The checkpoint `select_checkpoint` chose (None: none reads back) and the newer ones it passed over."""

    chosen: CheckpointFile | None
    state: dict[str, Any] | None
    passed_over: list[tuple[CheckpointFile, str]] = field(default_factory=list)

    def explain(self) -> list[str]:
        return [f"skipped checkpoint {ck.path.name}: {why}; falling back to an older one"
                for ck, why in self.passed_over]


def _newest_first(folder: Path) -> Iterator[tuple[CheckpointFile, str | None]]:
    """(checkpoint, None if its bytes check out else why not), newest first, verified lazily."""
    for ck in reversed(list_checkpoints(folder)):
        try:
            verify_checkpoint_bytes(ck.path)
        except (ValueError, OSError) as e:
            yield ck, str(e)
            continue
        yield ck, None


def select_checkpoint(folder: str | os.PathLike) -> Selection:
    """The newest checkpoint in `folder` that reads back (digest and contents), with the newer ones passed over."""
    passed: list[tuple[CheckpointFile, str]] = []
    for ck, problem in _newest_first(Path(folder)):
        if problem is None:
            try:
                return Selection(ck, read_checkpoint(ck.path), passed)
            except (ValueError, OSError) as e:
                problem = str(e)
        passed.append((ck, problem))
    return Selection(None, None, passed)


def latest_checkpoint(folder: str | os.PathLike,
                      warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that reads back, with its contents; None when there is none.

    Every newer file passed over is reported through `warn` with the reason.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    sel = select_checkpoint(folder)
    for msg in sel.explain():
        warn(msg)
    return (sel.chosen.path, sel.state) if sel.chosen is not None else None


def _free_folder(folder: Path, name: str) -> Path:
    dest, n = folder / name, 1
    while dest.exists():
        n += 1
        dest = folder / f"{name}-{n}"
    return dest


def _move_into(files: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in files:
        os.replace(p, dest / p.name)
        moved.append(dest / p.name)
    fsync_dir(dest)
    fsync_dir(dest.parent)
    return moved


@dataclass
class SetAside:
    """What `set_aside_newer` moved: readable files into `folder` (the abandoned timeline), damaged ones into
    UNREADABLE_DIR."""

    folder: Path | None = None
    moved: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def set_aside_newer(folder: str | os.PathLike, step: int, damaged: Collection[str | os.PathLike] = ()) -> SetAside:
    """Move every checkpoint of `folder` newer than `step` out of the way of a run that continues from `step`: the
    ones named in `damaged` (passed over as unreadable) into `unreadable/`, the others, a timeline the run abandons,
    into `abandoned-after-step-<step>/`. `select_checkpoint` looks in neither."""
    folder = Path(folder)
    bad = {Path(p).name for p in damaged}
    newer = [ck.path for ck in list_checkpoints(folder) if ck.step > step]
    result = SetAside()
    if any(p.name in bad for p in newer):
        result.unreadable = _move_into([p for p in newer if p.name in bad], folder / UNREADABLE_DIR)
    abandoned = [p for p in newer if p.name not in bad]
    if abandoned:
        result.folder = _free_folder(folder, f"{ABANDONED_PREFIX}{step:09d}")
        result.moved = _move_into(abandoned, result.folder)
    return result


@dataclass
class Pruned:
    removed: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)  # moved to UNREADABLE_DIR


def prune_checkpoints(folder: str | os.PathLike, keep: int, protect: Path | None = None) -> Pruned:
    """Keep the newest `keep` readable checkpoints (permanent ones count and are never deleted); delete older
    rolling ones; move unreadable ones to `unreadable/` (never counted as kept). `protect`, the checkpoint just
    written, is never touched. Call only once the newest checkpoint is durable (save_checkpoint's rename is)."""
    folder = Path(folder)
    keep = max(1, keep)
    protect = protect.absolute() if protect is not None else None
    result = Pruned()
    unreadable = []
    kept = 0
    for ck in reversed(list_checkpoints(folder)):
        if ck.path.absolute() == protect:
            kept += 1
            continue
        if kept >= keep:
            if not ck.permanent:
                ck.path.unlink(missing_ok=True)
                result.removed.append(ck.path)
            continue
        try:
            verify_checkpoint_bytes(ck.path)
        except (ValueError, OSError):
            unreadable.append(ck.path)
            continue
        kept += 1
    if unreadable:
        result.unreadable = _move_into(unreadable, folder / UNREADABLE_DIR)
    if result.removed:
        fsync_dir(folder)
    return result


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written checkpoint files left by a killed run (temporary names, never renamed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
