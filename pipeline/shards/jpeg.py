"""JPEG and EXIF structure read from the bytes alone (no decoding): the header scan that qualifies a file for
--keep-original, the one EXIF orientation parser of the project, and where a file's entropy-coded data ends.

    scan_jpeg(data)          markers up to the first scan: SOF, EXIF orientation, Adobe transform, MPF, EOI present
    jpeg_size(data)          (height, width) of the frame header only: the loaders' per-sample geometry
    exif_orientation(tiff)   orientation tag (0x0112) of an EXIF/TIFF block: SHORT or LONG, either byte order
    scan_end(data, header)   where the first scan's entropy-coded data ends, the marker that ends it, and whether its
                             restart markers come in sequence

Sharding's keep-original qualification, its re-encoding and `--verify --decode` all read orientation through
`exif_orientation`, so a file that is kept unchanged always passes its own verification.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

ORIENTATION_TAG = 0x0112
ORIENTATIONS = range(1, 9)  # 1 upright; 2-8 flips and rotations (others occur in the wild and are ignored)
EOI = 0xD9
SOS = 0xDA
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_RST = range(0xD0, 0xD8)
_STANDALONE_MARKERS = {0x01, *_RST}
_SHORT, _LONG = 3, 4
# A marker inside entropy-coded data (0xFF 0x00 is a stuffed byte). It starts with a literal byte, so the regex engine
# finds candidates at memchr speed (a leading `\xff+` would make it test every position).
_MARKER = re.compile(rb"\xff[^\x00]")


@dataclass(frozen=True)
class JpegHeader:
    sof: int  # the SOFn marker byte: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int
    width: int
    height: int
    components: int
    orientation: int  # EXIF orientation 2-8, or 1 when absent, upright or invalid
    adobe_transform: int | None  # APP14 "Adobe" colour transform (1 = YCbCr), None when absent
    multi_picture: bool  # APP2 "MPF": an MPO file with further images appended
    has_eoi: bool
    sos_offset: int = 0  # where the first start-of-scan marker is
    restart_interval: int = 0  # DRI: MCUs per restart interval (0 = no restart markers)


def exif_orientation(tiff: bytes) -> int:
    """Orientation (tag 0x0112) from IFD0 of an EXIF/TIFF block (`II*\\0...` or `MM\\0*...`, without the
    `Exif\\0\\0` prefix), stored as SHORT or LONG in either byte order; 1 when absent, unreadable or invalid."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(e + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(e + "H", tiff, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        tag, typ, n = struct.unpack_from(e + "HHI", tiff, entry)
        if tag != ORIENTATION_TAG:
            continue
        if n != 1 or typ not in (_SHORT, _LONG):
            return 1
        # The value sits left-aligned in the 4-byte value field: 2 bytes for a SHORT, 4 for a LONG.
        value = struct.unpack_from(e + ("H" if typ == _SHORT else "I"), tiff, entry + 8)[0]
        # 0 and other out-of-range values occur in the wild and every reader ignores them.
        return value if value in ORIENTATIONS else 1
    return 1


def _header_segments(data: bytes | memoryview) -> tuple[list[tuple[int, int, int]], int] | None:
    """(marker, payload start, payload end) of every marker segment up to the first start of scan, and the offset of
    that SOS marker; None when `data` is not a well-formed JPEG header."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    segments = []
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        (seglen,) = struct.unpack_from(">H", data, pos + 2)
        if seglen < 2 or pos + 2 + seglen > n:
            return None
        segments.append((marker, pos + 4, pos + 2 + seglen))
        if marker == SOS:  # start of scan: the header is over
            return segments, pos
        pos += 2 + seglen
    return None


def _frame(data: bytes | memoryview, segments: list[tuple[int, int, int]]) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, precision, width, height, components) of the last frame header before the scan, or None."""
    frame = None
    for marker, start, end in segments:
        if marker in _SOF_MARKERS:
            if end - start < 6:
                return None
            precision, height, width, comps = struct.unpack_from(">BHHB", data, start)
            frame = (marker, precision, width, height, comps)
    return frame


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header without decoding (no EXIF orientation applied); None when `data`
    is not a well-formed JPEG header. The loaders' per-sample geometry: no EXIF parsing, no copy of the data."""
    header = _header_segments(data)
    frame = _frame(data, header[0]) if header is not None else None
    return None if frame is None else (frame[3], frame[2])


def scan_jpeg(data: bytes) -> JpegHeader | None:
    """Walk the JPEG markers up to the first scan (no decoding); None when `data` is not a well-formed JPEG header.

    EXIF is read from the first APP1 "Exif" segment, as Pillow and libjpeg-based readers do.
    """
    header = _header_segments(data)
    if header is None:
        return None
    segments, sos_offset = header
    sof = _frame(data, segments)
    if sof is None:
        return None
    orientation, adobe, mpf, exif_seen, restart = 1, None, False, False, 0
    for marker, start, end in segments:
        seg = data[start:end]
        if marker == 0xE1 and seg[:6] == b"Exif\0\0" and not exif_seen:
            exif_seen = True
            orientation = exif_orientation(seg[6:])
        elif marker == 0xE2 and seg[:4] == b"MPF\0":
            mpf = True
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xDD and len(seg) >= 2:
            (restart,) = struct.unpack_from(">H", seg)
    # Decoders stop at EOI; some writers pad the file after it.
    has_eoi = data.rstrip(b"\0")[-2:] == b"\xff\xd9"
    return JpegHeader(*sof, orientation=orientation, adobe_transform=adobe, multi_picture=mpf, has_eoi=has_eoi,
                      sos_offset=sos_offset, restart_interval=restart)


@dataclass(frozen=True)
class ScanEnd:
    """The end of the first scan's entropy-coded data."""

    offset: int  # of the marker that ends it (len(data) when the data runs out first)
    marker: int | None  # that marker (EOI for a single-scan file, SOS/DHT/... when more scans follow), None if none
    restarts: int  # restart markers inside the scan
    out_of_sequence: int | None  # offset of the first restart marker that is not the next RSTn, None if all are


def scan_end(data: bytes, header: JpegHeader) -> ScanEnd | None:
    """Where the first scan's entropy-coded data ends (None when the scan header itself is cut off).

    Inside entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or RST0..RST7; any other marker ends it
    (0xFF fill bytes may precede a marker).
    """
    pos = header.sos_offset
    if pos + 4 > len(data):
        return None
    (seglen,) = struct.unpack_from(">H", data, pos + 2)
    p = pos + 2 + seglen
    restarts, expected, bad = 0, 0, None
    while (m := _MARKER.search(data, p)) is not None:
        marker = data[m.end() - 1]
        if marker == 0xFF:  # a fill byte before a marker
            p = m.start() + 1
            continue
        if marker not in _RST:
            return ScanEnd(m.end() - 2, marker, restarts, bad)
        if marker != 0xD0 + expected and bad is None:
            bad = m.end() - 2
        expected = (marker - 0xD0 + 1) % 8
        restarts += 1
        p = m.end()
    return ScanEnd(len(data), None, restarts, bad)
