"""The on-disk shard format, independent of any reader.

A data set is one folder holding one split:

    OUT/
      manifest.json                    the source of truth (schema below, `Manifest`)
      _info.json                       timm's WebDataset layout, so timm's train.py reads the same shards
      {name}-{split}-000000.tar        WebDataset shards
      {name}-{split}-000000.idx        DALI index v1.2 of the shard, written while the shard is written
      ...

Each sample is four adjacent tar members sharing one key (letters, digits, `_`, `-`; no dots, no spaces):

    KEY.jpg    baseline RGB JPEG
    KEY.cls    class index, ASCII decimal (WebDataset / timm convention)
    KEY.lbl    class index, 8-byte little-endian int64 (DALI reads it with dtypes=INT64; a text .cls comes out
               of DALI as ragged bytes that cannot be batched)
    KEY.json   {"src": path relative to the source, "wnid", "width", "height", "reencoded": bool, ...}; the sharding
               tool adds "crc32" of the jpg member, 8 hex digits (docs/sharding.md)

Tar headers are fixed (mtime 0, uid/gid 0, empty user/group names, mode 0644, ustar), so the same samples in the
same order give byte-identical shards.

DALI index v1.2 (DALI tools/wds2idx.py): first line `v1.2 <num_samples>`, then per sample one line listing, for
each component, `<ext> <data offset> <size> <member name>`; offsets point at the member's data (multiples of 512).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fileio import (
    atomic_write_json,
    disk_full_error,
    fsync_dir,
    is_disk_full,
    start_writeback,
    tmp_path_for,
)

FORMAT_NAME = "supmae-wds"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
TIMM_INFO_NAME = "_info.json"
INDEX_VERSION = "v1.2"

IMAGE_EXT = "jpg"
CLS_EXT = "cls"
LABEL_EXT = "lbl"
META_EXT = "json"
SAMPLE_EXTS = (IMAGE_EXT, CLS_EXT, LABEL_EXT, META_EXT)
LABEL_STRUCT = struct.Struct("<q")

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# ustar stores names up to 100 bytes; "KEY.json" must fit without a GNU/PAX long-name header.
MAX_KEY_LEN = 90
TAR_BLOCK = 512
TAR_RECORD = 10240
# Start the disk write-back of a shard every this many bytes, so that its closing fsync finds little left to write.
WRITEBACK_BYTES = 1 << 20
_META_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=True)  # one encoder: json.dumps builds one per call

VERIFY_HINT = ("run `./launch.sh shard --verify {root}` to check the shards, delete those it reports and re-run "
               "the shard command that wrote {root} (manifest.json's \"command\"): it writes them again")


class ShardFormatError(ValueError):
    """A shard, index or manifest does not match the format; the message names the file and what to do."""


def shard_stem(name: str, split: str, shard_index: int) -> str:
    return f"{name}-{split}-{shard_index:06d}"


def shard_filenames(name: str, split: str, shard_index: int) -> tuple[str, str]:
    """(tar file name, index file name) of shard `shard_index`."""
    stem = shard_stem(name, split, shard_index)
    return f"{stem}.tar", f"{stem}.idx"


def check_key(key: str) -> str:
    if not KEY_RE.match(key) or len(key) > MAX_KEY_LEN:
        raise ValueError(
            f"invalid sample key {key!r}: keys must be 1-{MAX_KEY_LEN} characters of letters, digits, '_' or '-' "
            "(DALI splits the extension at the first dot and its index breaks on spaces)"
        )
    return key


def image_checksum(jpeg: bytes) -> str:
    """The "crc32" of a sample's json: CRC-32 of its jpg member, 8 hex digits.

    It lets --verify name the sample of a damaged byte (the shard's sha256 in the manifest only names the shard).
    CRC-32 catches any burst error up to 32 bits and random damage with probability 1 - 2**-32, which is all this
    needs, at less than half the cost of a second sha256 pass over every image (11 vs 27 ms per 47 MB here).
    """
    return f"{zlib.crc32(jpeg):08x}"


def encode_label(label: int) -> bytes:
    return LABEL_STRUCT.pack(label)


def decode_label(data: bytes) -> int:
    return LABEL_STRUCT.unpack(data)[0]


def _tar_header_reference(name: str, size: int) -> bytes:
    """The fixed ustar header of a member, built by tarfile (the reference for `_tar_header`)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


# Every header field but name, size and checksum is the same for all members: splice those three into a template
# (tarfile's TarInfo.tobuf costs 15-35 us per member: with 4 members per sample, about a fifth of the time of
# storing an image unchanged under --keep-original).
_HEADER_TEMPLATE = _tar_header_reference("", 0)
_HEADER_MIDDLE = _HEADER_TEMPLATE[100:124]  # mode, uid, gid
_HEADER_MTIME = _HEADER_TEMPLATE[136:148]
_HEADER_TAIL = _HEADER_TEMPLATE[156:]  # type, link name, ustar magic, user/group names, devices, prefix
# The checksum is the byte sum of the header with its own field as 8 spaces: constant part + name + size.
_HEADER_CONST_SUM = sum(_HEADER_MIDDLE) + sum(_HEADER_MTIME) + 8 * ord(" ") + sum(_HEADER_TAIL)
_MAX_USTAR_SIZE = 8**11 - 1


def _tar_header(name: str, size: int) -> bytes:
    """Byte-identical to `_tar_header_reference` (tests/test_shard_tar_header.py) for names of at most 100 bytes."""
    raw = name.encode("ascii")
    if len(raw) > 100 or not 0 <= size <= _MAX_USTAR_SIZE:
        return _tar_header_reference(name, size)
    size_field = b"%011o\0" % size
    checksum = _HEADER_CONST_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), _HEADER_MIDDLE, size_field, _HEADER_MTIME, b"%06o\0 " % checksum,
                     _HEADER_TAIL))


@dataclass(frozen=True)
class ShardRecord:
    """One shard as listed in the manifest."""

    file: str
    index: str
    samples: int
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


class ShardWriter:
    """Writes one shard and its DALI index in a single pass.

    Both files are written under temporary names in the shard's folder and renamed into place by `close()`, so a
    shard that exists under its final name is complete. The sha256 is computed while writing.
    """

    def __init__(self, folder: str | os.PathLike, name: str, split: str, shard_index: int):
        self.folder = Path(folder)
        self.tar_name, self.index_name = shard_filenames(name, split, shard_index)
        self._tar_tmp = tmp_path_for(self.folder / self.tar_name)
        self._file = open(self._tar_tmp, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._written_back = 0  # bytes whose write-back has been started
        self._index_lines: list[str] = []
        self._keys: set[str] = set()
        self._closed = False

    @property
    def samples(self) -> int:
        return len(self._index_lines)

    @property
    def bytes_written(self) -> int:
        return self._offset

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.folder / self.tar_name, "shard", self._offset + len(data), e) from e
            raise
        self._sha.update(data)
        self._offset += len(data)
        if self._offset - self._written_back >= WRITEBACK_BYTES:
            self._file.flush()
            start_writeback(self._file.fileno(), self._written_back, self._offset - self._written_back)
            self._written_back = self._offset

    def _add_member(self, name: str, data: bytes) -> tuple[int, int]:
        self._write(_tar_header(name, len(data)))
        data_offset = self._offset
        self._write(data)
        pad = -len(data) % TAR_BLOCK
        if pad:
            self._write(b"\0" * pad)
        return data_offset, len(data)

    def add_sample(self, key: str, jpeg: bytes, label: int, meta: dict[str, Any]) -> None:
        """Append one sample: `jpeg` bytes, integer class `label`, JSON-able `meta`."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.tar_name}")
        if not isinstance(label, int) or label < 0:
            raise ValueError(f"sample {key!r}: label must be a non-negative int, got {label!r}")
        self._keys.add(key)
        members = (
            (IMAGE_EXT, jpeg),
            (CLS_EXT, str(label).encode()),
            (LABEL_EXT, encode_label(label)),
            (META_EXT, _META_JSON.encode(meta).encode()),
        )
        parts = []
        for ext, data in members:
            member = f"{key}.{ext}"
            offset, size = self._add_member(member, data)
            parts.append(f"{ext} {offset} {size} {member}")
        self._index_lines.append(" ".join(parts))

    def close(self) -> ShardRecord:
        """Finish the tar (end blocks, record padding), write the index, fsync both, rename both into place and
        fsync the folder (a power loss then keeps both under their final names, or neither)."""
        if self._closed:
            raise RuntimeError(f"shard {self.tar_name} already closed")
        if not self._index_lines:
            self.abort()
            raise ValueError(f"shard {self.tar_name} has no samples; an empty shard is never written")
        end = b"\0" * (2 * TAR_BLOCK)
        self._write(end)
        pad = -self._offset % TAR_RECORD
        if pad:
            self._write(b"\0" * pad)
        index = (f"{INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n").encode()
        index_tmp = tmp_path_for(self.folder / self.index_name)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._closed = True
            with open(index_tmp, "wb") as f:
                f.write(index)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            index_tmp.unlink(missing_ok=True)
            self.abort()
            if is_disk_full(e):
                raise disk_full_error(self.folder / self.tar_name, "shard", self._offset + len(index), e) from e
            raise
        # Index first: a final-named tar always has its index beside it.
        os.replace(index_tmp, self.folder / self.index_name)
        os.replace(self._tar_tmp, self.folder / self.tar_name)
        fsync_dir(self.folder)
        return ShardRecord(
            file=self.tar_name,
            index=self.index_name,
            samples=len(self._index_lines),
            bytes=self._offset,
            sha256=self._sha.hexdigest(),
            index_bytes=len(index),
            index_sha256=hashlib.sha256(index).hexdigest(),
        )

    def abort(self) -> None:
        """Drop a partly written shard (temporary file removed)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails again
                self._file.close()
        self._tar_tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------------------------------------------
# Reading back: index files and raw tar members (used by --verify, tests and the torch backend's checks)


@dataclass(frozen=True)
class IndexComponent:
    ext: str
    offset: int
    size: int
    name: str


def parse_index(path: str | os.PathLike) -> list[list[IndexComponent]]:
    """Parse a DALI v1.2 index file into samples of components; errors name the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="ascii").splitlines()
    if not lines:
        raise ShardFormatError(f"{path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardFormatError(f"{path}: first line must be '{INDEX_VERSION} <num_samples>', got {lines[0]!r}")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardFormatError(f"{path}:{lineno}: expected groups of '<ext> <offset> <size> <name>'")
        comps = []
        for i in range(0, len(fields), 4):
            ext, off, size, name = fields[i : i + 4]
            if not (off.isdigit() and size.isdigit()):
                raise ShardFormatError(f"{path}:{lineno}: offset and size must be integers")
            comps.append(IndexComponent(ext, int(off), int(size), name))
        samples.append(comps)
    if len(samples) != int(head[1]):
        raise ShardFormatError(f"{path}: header says {head[1]} samples but {len(samples)} are listed")
    return samples


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of the data, not the header
    size: int


def iter_tar_members(path: str | os.PathLike) -> Iterator[TarMember]:
    """Regular-file members of a tar with their data offsets, in file order."""
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            if info.isreg():
                yield TarMember(info.name, info.offset_data, info.size)


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) the WebDataset way: the extension is everything after the first dot of the base name."""
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def read_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a shard, grouping adjacent members by key."""
    with tarfile.open(path, "r:") as tf:
        key, comps = None, {}
        for info in tf:
            if not info.isreg():
                continue
            k, ext = split_member_name(info.name)
            if k != key and comps:
                yield key, comps
                comps = {}
            key = k
            comps[ext] = tf.extractfile(info).read()
        if comps:
            yield key, comps


# ----------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ClassEntry:
    index: int
    wnid: str
    name: str | None = None
    samples: int | None = None  # samples of this class in the split (None in manifests written without counts)


@dataclass
class Manifest:
    """`manifest.json`: what was written, from what, how; the loaders and --verify trust nothing else."""

    name: str
    split: str
    source: str
    command: list[str]
    options: dict[str, Any]
    classes: list[ClassEntry]
    shards: list[ShardRecord]
    totals: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    tool_version: str = ""
    components: dict[str, str] = field(
        default_factory=lambda: {"image": IMAGE_EXT, "cls": CLS_EXT, "label": LABEL_EXT, "meta": META_EXT}
    )
    label_dtype: str = "int64-le"

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        # Stable, readable key order: identity first, then content. Built by hand: dataclasses.asdict deep-copies
        # every value (3 ms for a thousand classes, a tenth of sharding 500 files under --keep-original).
        return {
            "format": self.format,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "name": self.name,
            "split": self.split,
            "source": self.source,
            "command": list(self.command),
            "options": dict(self.options),
            "components": dict(self.components),
            "label_dtype": self.label_dtype,
            "classes": [dict(vars(c)) for c in self.classes],
            "shards": [dict(vars(r)) for r in self.shards],
            "totals": dict(self.totals),
            "skipped": [dict(e) for e in self.skipped],
            "converted": [dict(e) for e in self.converted],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise ShardFormatError(f"{origin}: not a {FORMAT_NAME} manifest (format={d.get('format')!r})")
        if d.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
            raise ShardFormatError(
                f"{origin}: format_version {d.get('format_version')!r} is not supported by this version "
                f"(supported: {SUPPORTED_FORMAT_VERSIONS}); re-shard with this version's `./launch.sh shard`"
            )
        try:
            return cls(
                name=d["name"],
                split=d["split"],
                source=d["source"],
                command=list(d["command"]),
                options=dict(d["options"]),
                classes=[ClassEntry(**c) for c in d["classes"]],
                shards=[ShardRecord.from_dict(s) for s in d["shards"]],
                totals=dict(d["totals"]),
                skipped=list(d.get("skipped", [])),
                converted=list(d.get("converted", [])),
                format=d["format"],
                format_version=d["format_version"],
                tool_version=d.get("tool_version", ""),
                components=dict(d["components"]),
                label_dtype=d["label_dtype"],
            )
        except (KeyError, TypeError) as e:
            raise ShardFormatError(f"{origin}: malformed manifest ({e!r}); re-shard the data") from e

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_json(Path(folder) / MANIFEST_NAME, self.to_dict(), what="manifest")


def _holds_source_data(folder: Path, most: int = 1000) -> bool:
    """Whether `folder` (without a manifest) holds something other than an unfinished shard run's files: a visible
    sub-folder or a file that is neither a shard nor an index (a look at its first `most` entries)."""
    with os.scandir(folder) as entries:
        for i, entry in enumerate(entries):
            if i >= most:
                break
            name = entry.name
            if name.startswith("."):  # the shard run's state folder and temporaries, or hidden files
                continue
            if entry.is_dir() or not (name.endswith((".tar", ".idx")) or name == TIMM_INFO_NAME):
                return True
    return False


def load_manifest(path: str | os.PathLike) -> tuple[Manifest, Path]:
    """Load the manifest of a shard folder (or a path to manifest.json); returns (manifest, shard folder)."""
    path = Path(path)
    folder = path.parent if path.name == MANIFEST_NAME else path
    mpath = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} does not exist; create it with `./launch.sh shard SRC {folder}`")
    if not mpath.is_file():
        if _holds_source_data(folder):
            raise FileNotFoundError(
                f"{mpath} not found: {folder} is not a shard folder: it holds files or folders but no shards; if "
                "they are the images themselves (an ImageFolder tree, as MAE's --data_path takes), shard them once "
                "with `./launch.sh shard IMAGES SHARDS` (README \"Shard ImageNet\": one shard folder per split) and "
                "give the shard folder (--data SHARDS)"
            )
        raise FileNotFoundError(
            f"{mpath} not found: {folder} is not a shard folder (or sharding did not finish); "
            f"run `./launch.sh shard SRC {folder}` (re-running resumes an interrupted run)"
        )
    try:
        d = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{mpath}: not valid JSON ({e}); re-run the shard command to rewrite it") from e
    return Manifest.from_dict(d, origin=str(mpath)), folder


def shard_files_problem(rec: ShardRecord, folder: str | os.PathLike) -> str | None:
    """What is wrong with the files of one listed shard at a glance (missing, another size), or None."""
    for fname, want in ((rec.file, rec.bytes), (rec.index, rec.index_bytes)):
        p = Path(folder) / fname
        if not p.is_file():
            return f"{p}: listed in the manifest but missing"
        got = p.stat().st_size
        if got != want:
            return f"{p}: {'truncated' if got < want else 'larger than listed'} ({got} bytes, manifest says {want})"
    return None


def check_shard_files(manifest: Manifest, folder: str | os.PathLike) -> None:
    """Cheap start-up check: every listed shard and index exists with its listed size (no hashing)."""
    for rec in manifest.shards:
        problem = shard_files_problem(rec, folder)
        if problem:
            raise ShardFormatError(f"{problem}; {VERIFY_HINT.format(root=Path(folder))}")


def timm_info(manifest: Manifest) -> dict[str, Any]:
    """`_info.json` in timm's WebDataset layout (timm maps split 'val' via its own names; we list ours as-is)."""
    return {
        "name": manifest.name,
        "num_classes": manifest.num_classes,
        "splits": {
            manifest.split: {
                "name": manifest.split,
                "num_samples": manifest.num_samples,
                "filenames": [s.file for s in manifest.shards],
                "shard_lengths": [s.samples for s in manifest.shards],
            }
        },
    }


def read_bytes_at(path: str | os.PathLike, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)

