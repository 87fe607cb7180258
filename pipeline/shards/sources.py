"""Input enumeration for the sharding tool: every input file, addressable for random access, in sorted order.

Source kinds (`open_source`):

    imagefolder       SRC/<class>/<file...>: class = first-level folder name (wnid); files anywhere below it
    imagefolder-tar   a plain tar of such a tree (an optional common top folder, e.g. `imagenet-sample-500/`, is
                      found and stripped); read in place
    tar-of-tars       ImageNet's ILSVRC2012_img_train.tar: a tar of per-class tars `<wnid>.tar`; read in place,
                      each member addressed by its absolute offset in the outer file (no extraction, 148 GB is fine)
    flat / flat-tar   validation images in a folder or tar; labels come from a labels file (pipeline.shards.val_labels)

Every input is an `ItemRef` (file, offset, size): a worker seeks and reads one file's bytes without touching the
rest of a container. Paths relative to the source root (`SourceItem.rel`) use `display_path`, so file names with
non-UTF-8 bytes are escaped reproducibly; a tar-of-tars member is named `<wnid>/<file>` exactly as in the
extracted tree, so sharding the tar or its extraction gives the same samples.

Entries that cannot be inputs (links, devices, files outside any class folder, an unreadable inner tar) are
returned as `ListingSkip`s: they count as inputs that were skipped, never dropped silently.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

KIND_IMAGEFOLDER = "imagefolder"
KIND_IMAGEFOLDER_TAR = "imagefolder-tar"
KIND_TAR_OF_TARS = "tar-of-tars"
KIND_FLAT = "flat"
KIND_FLAT_TAR = "flat-tar"

_TAR_ENCODING = dict(encoding="utf-8", errors="surrogateescape")


class SourceError(ValueError):
    """The source cannot be enumerated; the message names the path and what to do."""


def display_path(raw: bytes) -> str:
    """Printable, reversible form of a raw relative path: backslashes doubled, non-UTF-8 bytes as `\\xNN`."""
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class ItemRef:
    """Where an input's bytes are: `size` bytes at `offset` of `path` (a container), or all of `path` (a file)."""

    path: str
    offset: int
    size: int
    in_container: bool


@dataclass(frozen=True, slots=True)
class SourceItem:
    rel: str  # display_path of the path relative to the source root
    group: str | None  # class folder name (wnid) for folder kinds, None for flat sources
    ref: ItemRef


@dataclass(frozen=True, slots=True)
class ListingSkip:
    rel: str
    reason: str


@dataclass
class SourceListing:
    """Items sorted by raw relative path; `groups`: every class folder found (also empty ones), sorted."""

    kind: str
    path: Path
    items: list[SourceItem]
    groups: list[str] | None
    skipped: list[ListingSkip] = field(default_factory=list)
    root_prefix: str = ""  # the common top folder stripped from a tar's member names

    @property
    def labelled_by_folder(self) -> bool:
        return self.groups is not None


def read_item(ref: ItemRef, handles: dict[str, io.BufferedReader] | None = None) -> bytes:
    """The bytes of one input. `handles` caches open containers across calls (one open per worker, not per image)."""
    if not ref.in_container:
        with open(ref.path, "rb") as f:
            return f.read()
    f = handles.get(ref.path) if handles is not None else None
    if f is None:
        f = open(ref.path, "rb")  # noqa: SIM115 - kept open in `handles` by design
        if handles is not None:
            handles[ref.path] = f
    try:
        f.seek(ref.offset)
        data = f.read(ref.size)
    finally:
        if handles is None:
            f.close()
    if len(data) != ref.size:
        raise OSError(f"{ref.path}: container ends at byte {ref.offset + len(data)}, expected {ref.size} bytes at offset {ref.offset}")
    return data


def _is_tar(path: Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def _check_plain_tar(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(6)
    for sig, what in ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")):
        if magic.startswith(sig):
            raise SourceError(
                f"{path} is a {what}-compressed tar: compressed tars cannot be read by seeking; "
                "decompress it first (the tar itself is read in place) or extract it"
            )


def _walk_files(root: bytes) -> Iterator[tuple[bytes, os.stat_result | None, str | None]]:
    """(raw relative path, stat, problem) for everything below `root` that is not a folder.

    Symbolic links to folders are followed (class folders are often links), each real folder once, so a link
    loop ends instead of recursing forever.
    """
    seen: set[tuple[int, int]] = set()
    stack = [b""]
    while stack:
        rel = stack.pop()
        base = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(base)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(base))
        except OSError as e:
            yield rel, None, f"cannot list folder ({e.strerror or e})"
            continue
        for entry in entries:
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(child)
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as e:
                yield child, None, f"cannot read ({e.strerror or e})"
                continue
            yield child, st, None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _list_folder(path: Path, flat: bool) -> SourceListing:
    root = os.fsencode(path)
    items: list[tuple[bytes, SourceItem]] = []
    skipped: list[ListingSkip] = []
    groups = None
    if not flat:
        groups = sorted(display_path(e.name) for e in os.scandir(root) if e.is_dir(follow_symlinks=True))
    for raw, st, problem in _walk_files(root):
        rel = display_path(raw)
        if problem:
            skipped.append(ListingSkip(rel, problem))
            continue
        group = None
        if not flat:
            if os.sep.encode() not in raw:
                skipped.append(ListingSkip(rel, "not inside a class folder"))
                continue
            group = display_path(raw.split(os.sep.encode(), 1)[0])
        ref = ItemRef(os.fsdecode(os.path.join(root, raw)), 0, st.st_size, in_container=False)
        items.append((raw, SourceItem(rel, group, ref)))
    items.sort(key=lambda t: t[0])
    if not items and not skipped:
        raise SourceError(f"{path} holds no files; point SRC at the folder that holds the class folders")
    return SourceListing(KIND_FLAT if flat else KIND_IMAGEFOLDER, path, [it for _, it in items], groups, skipped)


class _Window(io.RawIOBase):
    """A read-only view of `size` bytes at `start` of an open file, so tarfile can walk an inner tar in place."""

    def __init__(self, f: io.RawIOBase, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _raw(name: str) -> bytes:
    """A tar member name as raw bytes, without a leading `./` or `/` (tar -C dir . writes `./class/file`)."""
    raw = name.encode("utf-8", "surrogateescape")
    while raw.startswith((b"./", b"/")):
        raw = raw[2:] if raw.startswith(b"./") else raw[1:]
    return raw


@dataclass(frozen=True, slots=True)
class _Member:
    raw: bytes  # name without a leading ./
    offset: int  # of the data, relative to the start of the tar
    size: int
    kind: str  # "file", "dir" or why it is neither


_SPECIAL = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.FIFOTYPE: "FIFO"}


def _scan_tar(fileobj: io.RawIOBase) -> Iterator[_Member]:
    """Members of a plain tar, read header by header; tarfile's own list of members is emptied as it goes, so
    a tar of a million files costs a compact record per file, not a TarInfo object each."""
    with tarfile.open(fileobj=fileobj, mode="r:", **_TAR_ENCODING) as tf:
        while (info := tf.next()) is not None:
            tf.members.clear()
            if info.isreg():
                kind = "file"
            elif info.isdir():
                kind = "dir"
            else:
                kind = f"not a regular file ({_SPECIAL.get(info.type, 'special member')})"
            yield _Member(_raw(info.name), info.offset_data, info.size, kind)


def _list_tar_of_tars(path: Path, f: io.RawIOBase, members: list[_Member]) -> SourceListing:
    items: list[tuple[bytes, SourceItem]] = []
    skipped: list[ListingSkip] = []
    groups = []
    container = str(path)
    for inner in members:
        stem = inner.raw.rsplit(b"/", 1)[-1][: -len(b".tar")]
        wnid = display_path(stem)
        groups.append(wnid)
        found = 0
        try:
            for m in _scan_tar(_Window(f, inner.offset, inner.size)):
                if m.kind == "dir":
                    continue
                raw = stem + b"/" + m.raw
                rel = display_path(raw)
                found += 1
                if m.kind != "file":
                    skipped.append(ListingSkip(rel, m.kind))
                elif m.offset + m.size > inner.size:
                    skipped.append(ListingSkip(rel, f"extends past the end of {display_path(inner.raw)}"))
                else:
                    ref = ItemRef(container, inner.offset + m.offset, m.size, in_container=True)
                    items.append((raw, SourceItem(rel, wnid, ref)))
        except (tarfile.TarError, OSError) as e:
            skipped.append(ListingSkip(
                display_path(inner.raw), f"inner tar unreadable after {found} members ({e}); the rest of the class is missing"))
    items.sort(key=lambda t: t[0])
    return SourceListing(KIND_TAR_OF_TARS, path, [it for _, it in items], sorted(set(groups)), skipped)


def _common_dir(paths: list[bytes]) -> bytes:
    """Longest common folder prefix (ending in b'/', or b'') of the parent folders of `paths`."""
    parents = [p.rsplit(b"/", 1)[0] + b"/" if b"/" in p else b"" for p in paths]
    if not parents:
        return b""
    common = os.path.commonprefix(parents)
    return common[: common.rfind(b"/") + 1]


def _list_tar(path: Path, flat: bool) -> SourceListing:
    _check_plain_tar(path)
    # Unbuffered: listing reads one 512-byte header per member and seeks over the data; a buffered reader would
    # read 8 KB per member (about 10 GB for ImageNet's train tar).
    with open(path, "rb", buffering=0) as f:
        try:
            members = list(_scan_tar(f))
        except tarfile.TarError as e:
            raise SourceError(f"{path}: not a readable tar ({e}); check the download (e.g. its md5) or extract it") from e
        files = [m for m in members if m.kind != "dir"]
        if not files:
            raise SourceError(f"{path} holds no files")
        if all(m.kind == "file" and m.raw.endswith(b".tar") for m in files):
            if flat:
                raise SourceError(f"{path} is a tar of per-class tars (training data): drop --labels, which is for "
                                  "validation images")
            return _list_tar_of_tars(path, f, files)
    root = _common_dir([m.raw for m in files])
    if not flat and root and all((m.raw.rsplit(b"/", 1)[0] + b"/" if b"/" in m.raw else b"") == root for m in files):
        # Every file sits in one folder: that folder is the only class, its parent is the root.
        root = root[: root[:-1].rfind(b"/") + 1]
    groups = None
    if not flat:
        found = {m.raw[len(root) :].split(b"/", 1)[0] for m in files if b"/" in m.raw[len(root) :]}
        dirs = {m.raw.rstrip(b"/") + b"/" for m in members if m.kind == "dir" and m.raw}
        found |= {d[len(root) :].split(b"/", 1)[0] for d in dirs if d.startswith(root) and len(d) > len(root)}
        groups = sorted(display_path(g) for g in found)
    items: list[tuple[bytes, SourceItem]] = []
    skipped: list[ListingSkip] = []
    container = str(path)
    for m in files:
        rel_raw = m.raw[len(root) :]
        rel = display_path(rel_raw)
        if m.kind != "file":
            skipped.append(ListingSkip(rel, m.kind))
            continue
        group = None
        if not flat:
            if b"/" not in rel_raw:
                skipped.append(ListingSkip(rel, "not inside a class folder"))
                continue
            group = display_path(rel_raw.split(b"/", 1)[0])
        items.append((rel_raw, SourceItem(rel, group, ItemRef(container, m.offset, m.size, in_container=True))))
    items.sort(key=lambda t: t[0])
    kind = KIND_FLAT_TAR if flat else KIND_IMAGEFOLDER_TAR
    return SourceListing(kind, path, [it for _, it in items], groups, skipped, root_prefix=display_path(root))


def open_source(path: str | os.PathLike, flat: bool = False) -> SourceListing:
    """Enumerate a source. `flat=True` when labels come from a labels file (validation images)."""
    path = Path(path)
    if path.is_dir():
        return _list_folder(path, flat)
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if _is_tar(path):
        return _list_tar(path, flat)
    _check_plain_tar(path)
    raise SourceError(
        f"source {path} is neither a folder nor a plain tar; give an ImageFolder tree, "
        "ILSVRC2012_img_train.tar, or a tar/folder of validation images with --labels"
    )
