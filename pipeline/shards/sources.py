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

What cannot be listed completely is an error, not a partial listing:
  * a tar (outer or inner) must end with its end-of-archive blocks and its last member must lie within the file: a
    tar cut at a member boundary otherwise reads as a smaller, valid one;
  * tar member paths that are absolute or climb with `..` are listed as skipped and never name a class;
  * in a tar of an ImageFolder tree every file must sit inside a class folder (`<class>/<file>`, under one optional
    common top folder): a stray file beside the class folders would otherwise shift which folder level is taken
    as the class.
In a folder, a symbolic link to a folder inside SRC is not followed (its files are read through their own path,
so no class can take another class's files), and a file reached through two paths (hard links, links to files)
is reported by both names: kept once when both paths are in one class, skipped with both names when they are in
different classes. Links to folders outside SRC (class folders on another disk) are followed.
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


def _inside(path: bytes, root: bytes) -> bool:
    sep = os.sep.encode()
    return path == root or path.startswith(root.rstrip(sep) + sep)


def _walk_files(root: bytes) -> Iterator[tuple[bytes, os.stat_result | None, str | None]]:
    """(raw relative path, stat, problem) for everything below `root` that is not a folder, in sorted order.

    Symbolic links to folders outside `root` are followed (class folders are often links), each real folder
    once, so a link loop ends instead of recursing forever; a link to a folder inside `root` is reported, not
    followed (its files are listed through their own path).
    """
    real_root = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    stack = [b""]
    while stack:
        rel = stack.pop()
        base = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(base)
            if (st.st_dev, st.st_ino) in seen:
                yield rel, None, "folder reached a second time through a symbolic link: not followed"
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(base), key=lambda e: e.name, reverse=True)
        except OSError as e:
            yield rel, None, f"cannot list folder ({e.strerror or e})"
            continue
        for entry in entries:
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if _inside(target, real_root):
                            inside = display_path(os.path.relpath(target, real_root))
                            yield child, None, (f"symbolic link to the folder {inside} inside SRC: not followed "
                                                "(its files are read through their own path)")
                            continue
                    stack.append(child)
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as e:
                yield child, None, f"cannot read ({e.strerror or e})"
                continue
            yield child, st, None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _one_path_per_file(items: list[tuple[bytes, SourceItem, tuple[int, int]]],
                       skipped: list[ListingSkip]) -> list[tuple[bytes, SourceItem]]:
    """Files reached through two or more paths (hard links, symbolic links to files in SRC): kept once (first path
    in sorted order) when every path is in one class, else skipped under every path with all the names."""
    by_file: dict[tuple[int, int], list[tuple[bytes, SourceItem]]] = {}
    for raw, item, key in items:
        by_file.setdefault(key, []).append((raw, item))
    kept = []
    for paths in by_file.values():
        paths.sort(key=lambda t: t[0])
        if len(paths) == 1:
            kept.append(paths[0])
            continue
        names = ", ".join(it.rel for _, it in paths)
        if len({it.group for _, it in paths}) == 1:
            kept.append(paths[0])
            for _, it in paths[1:]:
                skipped.append(ListingSkip(it.rel, f"the same file as {paths[0][1].rel} (one file, two paths): "
                                                   "kept once"))
        else:
            for _, it in paths:
                skipped.append(ListingSkip(it.rel, f"one file reached through paths in different classes ({names}): "
                                                   "it cannot belong to both; give it one path"))
    return kept


def _list_folder(path: Path, flat: bool) -> SourceListing:
    root = os.fsencode(path)
    items: list[tuple[bytes, SourceItem, tuple[int, int]]] = []
    skipped: list[ListingSkip] = []
    groups = None
    if not flat:
        real_root = os.path.realpath(root)
        groups = sorted(display_path(e.name) for e in os.scandir(root) if e.is_dir(follow_symlinks=True)
                        and not (e.is_symlink() and _inside(os.path.realpath(e.path), real_root)))
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
        items.append((raw, SourceItem(rel, group, ref), (st.st_dev, st.st_ino)))
    kept = _one_path_per_file(items, skipped)
    kept.sort(key=lambda t: t[0])
    if not kept and not skipped:
        raise SourceError(f"{path} holds no files; point SRC at the folder that holds the class folders")
    return SourceListing(KIND_FLAT if flat else KIND_IMAGEFOLDER, path, [it for _, it in kept], groups, skipped)


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
    """A tar member name as raw bytes, without a leading `./` (tar -C dir . writes `./class/file`)."""
    raw = name.encode("utf-8", "surrogateescape")
    while raw.startswith(b"./"):
        raw = raw[2:]
    return raw


def _unsafe(raw: bytes) -> bool:
    """An absolute member path, or one that climbs with `..`: never a class name, never read."""
    return raw.startswith(b"/") or b".." in raw.split(b"/")


@dataclass(frozen=True, slots=True)
class _Member:
    raw: bytes  # name without a leading ./
    offset: int  # of the data, relative to the start of the tar
    size: int
    kind: str  # "file", "dir", "unsafe" or why it is neither


_SPECIAL = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.FIFOTYPE: "FIFO"}
_END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)
UNSAFE_REASON = "member path is absolute or climbs out with '..': never read, never a class name"


def _scan_tar(fileobj: io.RawIOBase, size: int, name: str) -> Iterator[_Member]:
    """Members of a plain tar of `size` bytes, read header by header; tarfile's own list of members is emptied as it
    goes, so a tar of a million files costs a compact record per file, not a TarInfo object each.

    tarfile reads a tar cut at a member boundary (or inside a header) as a shorter, valid one; so the end is
    checked here: the two zero blocks of the end-of-archive marker must follow the last member, within the file.
    Raises SourceError naming `name` otherwise.
    """
    last = None
    with tarfile.open(fileobj=fileobj, mode="r:", **_TAR_ENCODING) as tf:
        while (info := tf.next()) is not None:
            tf.members.clear()
            raw = _raw(info.name)
            if _unsafe(raw):
                kind = "unsafe"
            elif info.isreg():
                kind = "file"
            elif info.isdir():
                kind = "dir"
            else:
                kind = f"not a regular file ({_SPECIAL.get(info.type, 'special member')})"
            last = info
            yield _Member(raw, info.offset_data, info.size, kind)
        end = tf.offset
    if last is not None and last.offset_data + last.size > size:
        raise SourceError(f"{name}: its last member {last.name} ends at byte {last.offset_data + last.size}, past the "
                          f"end of the file ({size} bytes): the tar is cut short; check the download (size, md5) "
                          "or re-create it")
    fileobj.seek(end)
    if fileobj.read(len(_END_OF_ARCHIVE)) != _END_OF_ARCHIVE:
        raise SourceError(f"{name}: no end-of-archive marker after its last member (at byte {end} of {size}): the "
                          "tar is cut short or damaged and members after that point cannot be read; check the "
                          "download (size, md5) or re-create it")


def _list_tar_of_tars(path: Path, f: io.RawIOBase, members: list[_Member]) -> SourceListing:
    items: list[tuple[bytes, SourceItem]] = []
    skipped: list[ListingSkip] = []
    groups = []
    container = str(path)
    for inner in members:
        if inner.kind == "unsafe":
            skipped.append(ListingSkip(display_path(inner.raw), UNSAFE_REASON))
            continue
        stem = inner.raw.rsplit(b"/", 1)[-1][: -len(b".tar")]
        wnid = display_path(stem)
        groups.append(wnid)
        inner_name = f"{path} member {display_path(inner.raw)}"
        try:
            for m in _scan_tar(_Window(f, inner.offset, inner.size), inner.size, inner_name):
                if m.kind == "dir":
                    continue
                raw = stem + b"/" + m.raw
                rel = display_path(raw)
                if m.kind == "unsafe":
                    skipped.append(ListingSkip(rel, UNSAFE_REASON))
                elif m.kind != "file":
                    skipped.append(ListingSkip(rel, m.kind))
                else:
                    ref = ItemRef(container, inner.offset + m.offset, m.size, in_container=True)
                    items.append((raw, SourceItem(rel, wnid, ref)))
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{inner_name}: not a readable tar ({e}); the class {wnid} cannot be read completely: "
                              "check the download (size, md5)") from e
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
            members = list(_scan_tar(f, os.fstat(f.fileno()).st_size, str(path)))
        except tarfile.TarError as e:
            raise SourceError(f"{path}: not a readable tar ({e}); check the download (e.g. its md5) or extract it") from e
        files = [m for m in members if m.kind != "dir"]
        if not files:
            raise SourceError(f"{path} holds no files")
        safe = [m for m in files if m.kind != "unsafe"]
        if safe and all(m.kind == "file" and m.raw.endswith(b".tar") for m in safe):
            if flat:
                raise SourceError(f"{path} is a tar of per-class tars (training data): drop --labels, which is for "
                                  "validation images")
            return _list_tar_of_tars(path, f, files)
    root = _common_dir([m.raw for m in safe])
    if not flat and root and all((m.raw.rsplit(b"/", 1)[0] + b"/" if b"/" in m.raw else b"") == root for m in safe):
        # Every file sits in one folder: that folder is the only class, its parent is the root.
        root = root[: root[:-1].rfind(b"/") + 1]
    groups = None
    if not flat:
        strays = [m for m in safe if b"/" not in m.raw[len(root) :]]
        if strays:
            names = ", ".join(display_path(m.raw) for m in strays[:3]) + (" ..." if len(strays) > 3 else "")
            raise SourceError(
                f"{path}: {len(strays)} member(s) sit outside any class folder ({names}), so the class level of "
                "this tar is ambiguous: a tar of an ImageFolder tree must hold every file as <class>/<file>, "
                "optionally all under one common top folder (e.g. train/<class>/<file>); remove or move those "
                "members (or, for validation images, give --labels)")
        found = {m.raw[len(root) :].split(b"/", 1)[0] for m in safe}
        dirs = {m.raw.rstrip(b"/") + b"/" for m in members if m.kind == "dir" and m.raw}
        found |= {d[len(root) :].split(b"/", 1)[0] for d in dirs if d.startswith(root) and len(d) > len(root)}
        groups = sorted(display_path(g) for g in found)
    items: list[tuple[bytes, SourceItem]] = []
    skipped: list[ListingSkip] = []
    container = str(path)
    for m in files:
        if m.kind == "unsafe":
            skipped.append(ListingSkip(display_path(m.raw), UNSAFE_REASON))
            continue
        rel_raw = m.raw[len(root) :]
        rel = display_path(rel_raw)
        if m.kind != "file":
            skipped.append(ListingSkip(rel, m.kind))
            continue
        group = display_path(rel_raw.split(b"/", 1)[0]) if not flat else None
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
