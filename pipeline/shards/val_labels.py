"""Validation labels and class maps: the four ImageNet val label formats, devkit `meta.mat`, `--class-map`.

Label formats (`load_val_labels`, `fmt="auto"` detects them from the content):

    devkit   ILSVRC2012_validation_ground_truth.txt: one ILSVRC2012_ID per line, line i = ILSVRC2012_val_{i:08d};
             IDs are in meta.mat order, NOT sorted-wnid order, so they are mapped through meta.mat's synsets
             (check: val_00000001 -> ID 490 -> n01751748 -> index 65). meta.mat is read by `read_mat` (a small
             MATLAB v5 reader: scipy is not a dependency). The devkit tarball ILSVRC2012_devkit_t12.tar.gz can be
             given directly instead of the two files.
    caffe    val.txt: `ILSVRC2012_val_00000001.JPEG 65` (index in sorted-wnid order; needs --class-map for wnids)
    kaggle   LOC_val_solution.csv: `ImageId,PredictionString` header, then `ILSVRC2012_val_00000001,n01751748 ...`
    wnids    one wnid per line, line i = the i-th image in sorted file-name order

Every format resolves to a wnid per image; the class index is then the wnid's position in the class map, which
is the train split's (`--class-map TRAIN_OUT`, or a `wnid [name]` text file such as LOC_synset_mapping.txt), or
else the sorted wnids known from the labels (all of meta.mat's 1,000 leaf synsets for devkit).
"""

from __future__ import annotations

import csv
import io
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.shards.shard_format import MANIFEST_NAME, ClassEntry, load_manifest

FORMATS = ("devkit", "caffe", "kaggle", "wnids")
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"


class LabelsError(ValueError):
    """A labels or class-map file is malformed or does not fit the data; the message names file and line."""


def decode_text(data: bytes, origin: str) -> str:
    """UTF-8 text of a labels or class-map file (a leading byte-order mark, as spreadsheet programs write, is
    dropped); LabelsError naming the file and line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise LabelsError(f"{origin}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                          "save the file as UTF-8") from None


def read_text(path: Path) -> str:
    return decode_text(path.read_bytes(), str(path))


def image_stem(name: str) -> str:
    """The part of a file name that labels files key on: the base name without its last extension."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


@dataclass(frozen=True)
class ValLabels:
    """Wnid per image: by file stem (`by_stem`) or by position in sorted file-name order (`in_order`)."""

    format: str
    origin: str
    by_stem: dict[str, str] | None = None
    in_order: list[str] | None = None
    classes: list[ClassEntry] | None = None  # the class map the labels file defines itself (devkit), if any

    def wnids(self) -> set[str]:
        return set(self.by_stem.values() if self.by_stem is not None else self.in_order)


# ----------------------------------------------------------------------------------------------------------------
# MATLAB v5 MAT-file reader (just enough for the devkit's meta.mat: structs, cells, chars, numbers; zlib)

_MI_NUMERIC = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 9: "d", 12: "q", 13: "Q"}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8, _MI_UTF16 = 14, 15, 16, 17
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = range(6, 16)


def _mat_elements(buf: bytes, e: str, pad: bool):
    """Yield (type, data) of the data elements in `buf`; sub-elements are padded to 8 bytes, top-level ones not."""
    pos = 0
    while pos + 8 <= len(buf):
        (tag,) = struct.unpack_from(e + "I", buf, pos)
        if tag >> 16:  # small data element: 2-byte size, 2-byte type, data in the next 4 bytes
            nbytes, typ = tag >> 16, tag & 0xFFFF
            yield typ, buf[pos + 4 : pos + 4 + nbytes]
            pos += 8
            continue
        typ, nbytes = struct.unpack_from(e + "II", buf, pos)
        data = buf[pos + 8 : pos + 8 + nbytes]
        if len(data) != nbytes:
            raise LabelsError(f"MAT element of type {typ} claims {nbytes} bytes but the file ends")
        yield typ, data
        pos += 8 + nbytes + ((-nbytes % 8) if pad else 0)


def _mat_numbers(typ: int, data: bytes, e: str) -> list:
    code = _MI_NUMERIC.get(typ)
    if code is None:
        raise LabelsError(f"unsupported MAT numeric element type {typ}")
    return list(struct.unpack(e + code * (len(data) // struct.calcsize(code)), data))


def _mat_matrix(data: bytes, e: str) -> tuple[str, Any]:
    """(name, value) of an miMATRIX: struct arrays -> list of dicts, cells -> lists, 1xN char -> str,
    1x1 numeric -> number, other numeric -> flat column-major list."""
    if not data:
        return "", []
    subs = list(_mat_elements(data, e, pad=True))
    flags = _mat_numbers(*subs[0], e)
    dims = _mat_numbers(*subs[1], e)
    name = subs[2][1].decode("latin-1")
    cls = flags[0] & 0xFF
    count = 1
    for d in dims:
        count *= d
    if cls == _MX_STRUCT:
        (field_len,) = _mat_numbers(*subs[3], e)
        raw = subs[4][1]
        fields = [raw[i : i + field_len].split(b"\0", 1)[0].decode("latin-1") for i in range(0, len(raw), field_len)]
        values = [_mat_matrix(d, e)[1] for t, d in subs[5:] if t == _MI_MATRIX]
        if len(values) != count * len(fields):
            raise LabelsError(f"MAT struct {name!r}: expected {count * len(fields)} field values, got {len(values)}")
        structs = [dict(zip(fields, values[i * len(fields) : (i + 1) * len(fields)], strict=True)) for i in range(count)]
        return name, structs
    if cls == _MX_CELL:
        return name, [_mat_matrix(d, e)[1] for t, d in subs[3:] if t == _MI_MATRIX]
    if cls == _MX_CHAR:
        typ, raw = subs[3] if len(subs) > 3 else (_MI_UTF8, b"")
        if typ in (4, _MI_UTF16):
            text = raw.decode("utf-16-le" if e == "<" else "utf-16-be")
        else:
            text = raw.decode("utf-8" if typ == _MI_UTF8 else "latin-1")
        rows = dims[0] if dims else 1
        if rows <= 1:
            return name, text
        return name, ["".join(text[r::rows]) for r in range(rows)]  # column-major
    if cls in _MX_NUMERIC:
        values = _mat_numbers(*subs[3], e) if len(subs) > 3 else []
        return name, values[0] if count == 1 and len(values) == 1 else values
    raise LabelsError(f"MAT variable {name!r} has class {cls}, which this reader does not support")


def read_mat(data: bytes, origin: str = "MAT file") -> dict[str, Any]:
    """Variables of a MATLAB v5 MAT file (compressed or not). v7.3 (HDF5) files are refused with advice."""
    if data[:19] == b"MATLAB 7.3 MAT-file" or data[:8] == b"\x89HDF\r\n\x1a\n":
        raise LabelsError(f"{origin} is a MATLAB 7.3 (HDF5) file; save it as v7 (`save -v7`) or give val.txt instead")
    if len(data) < 128 or not data.startswith(b"MATLAB 5.0 MAT-file"):
        raise LabelsError(f"{origin} is not a MATLAB 5 MAT file (it should start with 'MATLAB 5.0 MAT-file')")
    e = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if e is None:
        raise LabelsError(f"{origin}: bad MAT endian indicator {data[126:128]!r}")
    out = {}
    try:
        for typ, payload in _mat_elements(data[128:], e, pad=False):
            if typ == _MI_COMPRESSED:
                typ, payload = next(_mat_elements(zlib.decompress(payload), e, pad=False))
            if typ == _MI_MATRIX:
                name, value = _mat_matrix(payload, e)
                out[name] = value
    except LabelsError as err:
        raise LabelsError(f"{origin}: {err}") from err
    except (struct.error, zlib.error, IndexError, StopIteration, ValueError, TypeError, KeyError, OverflowError,
            MemoryError, RecursionError) as err:  # whatever damaged bytes make the reader trip over
        raise LabelsError(f"{origin}: malformed MAT file ({err!r}); is it the devkit's data/meta.mat, undamaged?"
                          ) from err
    return out


def devkit_synsets(meta: dict[str, Any], origin: str) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (wnid, words) for the leaf synsets (the 1,000 classes) of a devkit meta.mat."""
    synsets = meta.get("synsets")
    if not isinstance(synsets, list) or not synsets or not isinstance(synsets[0], dict):
        raise LabelsError(f"{origin} has no 'synsets' struct array; is it the ILSVRC2012 devkit's data/meta.mat?")
    out = {}
    for s in synsets:
        try:
            if int(s.get("num_children", 0) or 0) != 0:
                continue
            out[int(s["ILSVRC2012_ID"])] = (str(s["WNID"]), str(s.get("words", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise LabelsError(f"{origin}: synset entry without ILSVRC2012_ID/WNID ({err!r})") from err
    return out


# ----------------------------------------------------------------------------------------------------------------
# Class maps


def load_class_map(path: str | Path) -> list[ClassEntry]:
    """Class map from a shard folder / manifest.json (the train split's) or a text file of `wnid [name...]` lines
    in index order (e.g. Kaggle's LOC_synset_mapping.txt, Caffe's synset_words.txt)."""
    path = Path(path)
    if path.is_dir() or path.name == MANIFEST_NAME:
        manifest, _ = load_manifest(path)
        return [ClassEntry(c.index, c.wnid, c.name) for c in manifest.classes]
    if not path.is_file():
        raise LabelsError(f"--class-map {path} does not exist; give the train split's shard folder or a wnid list")
    classes, seen = [], set()
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        wnid = parts[0]
        if wnid in seen:
            raise LabelsError(f"{path}:{lineno}: class {wnid!r} listed twice")
        seen.add(wnid)
        classes.append(ClassEntry(len(classes), wnid, parts[1].strip() if len(parts) > 1 else None))
    if not classes:
        raise LabelsError(f"{path}: empty class map")
    return classes


# ----------------------------------------------------------------------------------------------------------------
# Label formats


def _read_devkit_files(path: Path, meta: Path | None) -> tuple[str, bytes, str]:
    """(ground-truth text, meta.mat bytes, origin) from the two files or the devkit tarball."""
    if _is_archive(path):
        found = {}
        try:
            with tarfile.open(path) as tf:
                for m in tf:
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isreg() and base in (DEVKIT_GROUND_TRUTH, DEVKIT_META):
                        found[base] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise LabelsError(f"{path}: the devkit archive is damaged or cut short ({type(e).__name__}: {e}); "
                              "download ILSVRC2012_devkit_t12.tar.gz again") from e
        missing = {DEVKIT_GROUND_TRUTH, DEVKIT_META} - set(found)
        if missing:
            raise LabelsError(f"{path} does not contain {', '.join(sorted(missing))}; is it ILSVRC2012_devkit_t12.tar.gz?")
        origin = f"{path}:{DEVKIT_GROUND_TRUTH}"
        return decode_text(found[DEVKIT_GROUND_TRUTH], origin), found[DEVKIT_META], str(path)
    meta = meta or path.with_name(DEVKIT_META)
    if not meta.is_file():
        raise LabelsError(
            f"{path} holds ILSVRC2012_IDs, which need the devkit's meta.mat to become classes: "
            f"{meta} not found; pass --meta PATH/meta.mat (or give the devkit .tar.gz as --labels)"
        )
    return read_text(path), meta.read_bytes(), str(path)


def _devkit(path: Path, meta: Path | None) -> ValLabels:
    text, mat, origin = _read_devkit_files(path, meta)
    synsets = devkit_synsets(read_mat(mat, origin=f"{origin} meta.mat"), origin)
    by_stem = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            wnid = synsets[int(line)][0]
        except (ValueError, KeyError):
            raise LabelsError(f"{origin}:{lineno}: {line.strip()!r} is not an ILSVRC2012_ID of a class in meta.mat") from None
        by_stem[f"ILSVRC2012_val_{lineno:08d}"] = wnid
    classes = [ClassEntry(i, wnid, words) for i, (wnid, words) in enumerate(sorted(synsets.values()))]
    return ValLabels("devkit", origin, by_stem=by_stem, classes=classes)


def _add(by_stem: dict[str, str], stem: str, wnid: str, where: str) -> None:
    if stem in by_stem:
        raise LabelsError(f"{where}: image {stem!r} is labelled twice")
    by_stem[stem] = wnid


def _caffe(path: Path, text: str, classes: list[ClassEntry] | None) -> ValLabels:
    if classes is None:
        raise LabelsError(
            f"{path} (Caffe val.txt) gives class indices, not wnids: pass --class-map with the train split's shard "
            "folder (or a synsets.txt / synset_words.txt in the same order) so indices and wnids agree"
        )
    by_stem: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise LabelsError(f"{path}:{lineno}: expected '<file name> <class index>', got {line!r}")
        index = int(parts[1])
        if index >= len(classes):
            raise LabelsError(f"{path}:{lineno}: class index {index} out of range for {len(classes)} classes")
        _add(by_stem, image_stem(parts[0]), classes[index].wnid, f"{path}:{lineno}")
    return ValLabels("caffe", str(path), by_stem=by_stem)


def _kaggle(path: Path, text: str) -> ValLabels:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise LabelsError(f"{path}: expected the header 'ImageId,PredictionString' of LOC_val_solution.csv")
    by_stem: dict[str, str] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) < 2 or not row[1].split():
            raise LabelsError(f"{path}:{lineno}: expected '<ImageId>,<wnid> <box>...', got {','.join(row)!r}")
        _add(by_stem, image_stem(row[0].strip()), row[1].split()[0], f"{path}:{lineno}")
    return ValLabels("kaggle", str(path), by_stem=by_stem)


def _wnids(path: Path, text: str) -> ValLabels:
    order = [line.strip() for line in text.splitlines() if line.strip()]
    for lineno, w in enumerate(order, start=1):
        if len(w.split()) != 1:
            raise LabelsError(f"{path}:{lineno}: expected one wnid per line, got {w!r}")
    return ValLabels("wnids", str(path), in_order=order)


_INT_LINE = re.compile(r"^\s*\d+\s*$")
_CAFFE_LINE = re.compile(r"^\s*\S+\s+\d+\s*$")


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def _is_archive(path: Path) -> bool:
    """A tar (possibly compressed) -- or something compressed that should have been one (a damaged download)."""
    try:
        if tarfile.is_tarfile(path):
            return True
    except (OSError, EOFError, zlib.error):
        return True
    with open(path, "rb") as f:
        return f.read(6).startswith(_COMPRESSED_MAGIC)


def detect_format(path: Path) -> str:
    """Which of FORMATS a labels file is, from its content (a tarball is the devkit)."""
    if _is_archive(path):
        return "devkit"
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff")
    first = next((line for line in head.splitlines() if line.strip()), "")
    if first.startswith("ImageId"):
        return "kaggle"
    if _INT_LINE.match(first):
        return "devkit"
    if _CAFFE_LINE.match(first):
        return "caffe"
    if len(first.split()) == 1:
        return "wnids"
    raise LabelsError(
        f"cannot tell the format of {path} from its first line {first!r}; pass --labels-format "
        f"({'|'.join(FORMATS)})"
    )


def load_val_labels(
    path: str | Path, fmt: str = "auto", meta: str | Path | None = None, classes: list[ClassEntry] | None = None
) -> ValLabels:
    """Read a labels file of any of FORMATS (`classes`: the class map, needed by the Caffe format)."""
    path = Path(path)
    if path.is_dir():
        raise LabelsError(f"--labels {path} is a folder; give the labels file itself (e.g. LOC_val_solution.csv, "
                          "val.txt or ILSVRC2012_devkit_t12.tar.gz)")
    if not path.is_file():
        raise LabelsError(f"--labels {path} does not exist")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise LabelsError(f"unknown labels format {fmt!r}; choose from {', '.join(FORMATS)} or auto")
    if fmt == "devkit":
        return _devkit(path, Path(meta) if meta else None)
    text = read_text(path)
    if fmt == "caffe":
        return _caffe(path, text, classes)
    if fmt == "kaggle":
        return _kaggle(path, text)
    return _wnids(path, text)
