"""Durable, atomic file writes: files that matter (shards, indexes, manifests, checkpoints) appear complete or not at
all, also after a power loss, and a full disk says so.

A reader (or a resumed run after `kill -9`) must never see a half-written file under its final name, so every
such file is written to a temporary name in the same directory, fsynced, `os.replace`d into place, and the
directory is fsynced after the rename (`replace_durably`): without that last step a power loss can undo the
rename, and whatever was deleted on the strength of the new file (an older checkpoint, say) is gone with it.

A write that fails for lack of space (ENOSPC, EDQUOT) becomes `DiskFullError`, whose message says where, how much
is free and (when the caller knows) how much the file needs; a partly written temporary is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """No space left (or over quota) while writing a file; the message names the file, the free space and what
    to do. An OSError, so callers that handle write errors keep handling it."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def format_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


ATOMIC_ADVICE = ("nothing was written under its final name: free space (or choose another folder) and run the same "
                 "command again")


def disk_full_error(path: str | os.PathLike, what: str, needed: int | None = None,
                    cause: OSError | None = None, advice: str = ATOMIC_ADVICE) -> DiskFullError:
    """A DiskFullError for writing `what` (e.g. "checkpoint") to `path`: free space on its file system and, when
    known, the `needed` bytes, then `advice` (what happened to the file and what to do; the default suits a file
    written under a temporary name)."""
    path = Path(path)
    folder = path.parent
    try:
        free = f"{format_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    quota = cause is not None and cause.errno == errno.EDQUOT
    need = f"; a {what} needs about {format_size(needed)}" if needed else ""
    msg = (f"{'disk quota exceeded' if quota else 'disk full'} while writing {what} {path} ({free} on the file "
           f"system of {folder}{need}); {advice}")
    return DiskFullError(cause.errno if cause is not None else errno.ENOSPC, msg)


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be created or written (checked on its nearest existing ancestor), or None if it can."""
    target = Path(folder).absolute()
    path = target
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"{path} is a file, not a folder" if path == target else f"it would be inside {path}, which is a file"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable (a read-only folder or file system)"
    return None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (renames, new files, deletions) durable. No-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on directories: nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike, sync_dir: bool = True) -> None:
    """`os.replace(tmp, path)` (both already fsynced by the caller) and fsync of the directory."""
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(Path(path).parent)


def _load_sync_file_range():
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    return None


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing `nbytes` at `offset` of `fd` to disk now, without waiting for it.

    A large file written and then fsynced waits for all of its dirty pages at the fsync (about 25 ms for a 47 MB
    shard here, half of what `tar -cf` takes to copy it); started as the file grows, the write-back overlaps the
    writing and the fsync finds little left (RocksDB's bytes_per_sync, PostgreSQL's backend_flush_after). It
    also bounds the dirty page cache of a long run. Linux only (sync_file_range(2)); elsewhere a no-op, and
    never a durability guarantee: the caller still fsyncs.
    """
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # errors only lose the head start


def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it is renamed to `path` (same directory)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True, what: str = "file",
                needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it, rename it to `path` and fsync the directory; on error
    delete it. A full disk raises DiskFullError naming `what` and `path` (`needed`: bytes the file needs)."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        replace_durably(tmp, path, sync_dir=fsync)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(path, what, needed, e) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True, what: str = "file") -> None:
    with atomic_path(path, fsync=fsync, what=what, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = True, what: str = "file") -> None:
    """Write `obj` as indented, key-ordered-as-given JSON with a trailing newline."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), fsync=fsync, what=what)


class HashingWriter(io.RawIOBase):
    """A write-only stream over an open binary file that computes the sha256 of what passes through and keeps the
    first write error (a library that wraps its writer's errors, e.g. torch.save's zip writer, loses the errno)."""

    def __init__(self, f: io.BufferedWriter):
        super().__init__()
        self._f = f
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            n = self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(b)
        self.bytes += len(b)
        return n

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise
