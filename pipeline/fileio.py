"""Atomic file writes: files that matter (shards, indexes, manifests, checkpoints) appear complete or not at all.

A reader (or a resumed run after `kill -9`) must never see a half-written file under its final name, so every
such file is written to a temporary name in the same directory and `os.replace`d into place.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it is renamed to `path` (same directory)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`, on error delete it."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = True) -> None:
    """Write `obj` as indented, key-ordered-as-given JSON with a trailing newline."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), fsync=fsync)
