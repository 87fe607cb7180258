"""Per-image work of the sharding tool: qualify, decode, make upright RGB, downscale, encode as baseline JPEG.

Two modes, one entry point (`process_image`):

* default (re-encode): decode, apply the EXIF orientation, convert to RGB (CMYK, grayscale, palette, alpha, 16-bit),
  downscale with an area filter so the longer side is at most `max_side` (never enlarge), encode baseline JPEG with
  4:2:0 chroma at `quality`, with no EXIF/ICC (so no orientation tag). Typical ImageNet files (q~96, 4:4:4) then
  decode about twice as fast and take under half the bytes, and DALI, PIL and timm all see the same upright image.
* `keep_original`: store the source bytes unchanged when a header scan (`scan_jpeg`, no decoding) shows a baseline
  8-bit 3-component YCbCr JPEG within `max_side`, without a rotating EXIF orientation and with its end-of-image
  marker; everything else goes through the default path. Entropy-coded data is not decoded in this mode (that is
  what makes it run at close to copy speed); `--verify --decode` decodes every stored image.

Decoding is deterministic for a given Pillow/libjpeg-turbo build, so the same input gives the same bytes; the
encoder versions are recorded in the manifest (`encoder_versions`).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError, features

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (PIL's ImageOps.exif_transpose table).
_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class ImageConfig:
    """How images are stored. `max_side`: longest side after downscaling; `quality`: JPEG quality 1-100."""

    max_side: int = DEFAULT_MAX_SIDE
    quality: int = DEFAULT_QUALITY
    keep_original: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_side, int) or self.max_side < 16:
            raise ValueError(f"max_side must be an int >= 16, got {self.max_side!r}")
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be an int in 1..100, got {self.quality!r}")


class ImageSkip(Exception):
    """The input cannot become a sample (empty, not an image, truncated, undecodable); str(e) is the reason."""


@dataclass(frozen=True)
class ProcessedImage:
    """What is stored for one input. `width`/`height`: the original size, upright (after EXIF orientation)."""

    jpeg: bytes
    width: int
    height: int
    reencoded: bool
    resized: bool
    # Why the stored image differs from the source beyond the mode's normal treatment (empty when it does not):
    # format/colour/orientation conversions, and in keep-original mode every reason the original could not be kept.
    conversions: tuple[str, ...] = ()


def encoder_versions() -> str:
    """Versions that decide the output bytes; recorded in the manifest and checked when a run resumes."""
    return f"Pillow {Image.__version__}, libjpeg-turbo {features.version('libjpeg_turbo')}"


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is at most `max_side`, aspect kept, rounded half up, never enlarged."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


# ----------------------------------------------------------------------------------------------------------------
# Header scan: qualification for --keep-original without decoding


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


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


def _exif_orientation(tiff: bytes) -> int:
    """Orientation (tag 0x0112) from the IFD0 of an EXIF TIFF block; 1 when absent or unreadable."""
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
        tag, typ = struct.unpack_from(e + "HH", tiff, entry)
        if tag == ORIENTATION_TAG and typ == 3:  # SHORT, stored in the first 2 bytes of the value field
            value = struct.unpack_from(e + "H", tiff, entry + 8)[0]
            # 1 is upright; 0 and other out-of-range values occur in the wild and every reader ignores them.
            return value if value in _ORIENTATION_OPS else 1
    return 1


def _header_segments(data: bytes | memoryview) -> list[tuple[int, int, int]] | None:
    """(marker, start, end) of each marker segment's payload up to the start of scan; None when `data` is not a
    well-formed JPEG header."""
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
        if marker == 0xDA:  # start of scan: the header is over
            return segments
        pos += 2 + seglen
    return None


def _frame(data: bytes | memoryview, segments: list[tuple[int, int, int]]) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, precision, width, height, components) of the first frame header, or None."""
    for marker, start, end in segments:
        if marker in _SOF_MARKERS:
            if end - start < 6:
                return None
            precision, height, width, comps = struct.unpack_from(">BHHB", data, start)
            return marker, precision, width, height, comps
    return None


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header without decoding (no EXIF orientation applied); None when `data`
    is not a well-formed JPEG header."""
    segments = _header_segments(data)
    frame = _frame(data, segments) if segments is not None else None
    return None if frame is None else (frame[3], frame[2])


def scan_jpeg(data: bytes) -> JpegHeader | None:
    """Walk the JPEG markers up to the first scan (no decoding); None when `data` is not a well-formed JPEG header."""
    segments = _header_segments(data)
    sof = _frame(data, segments) if segments is not None else None
    if sof is None:
        return None
    orientation, adobe, mpf = 1, None, False
    for marker, start, end in segments:
        seg = data[start:end]
        if marker == 0xE1 and seg[:6] == b"Exif\0\0":
            orientation = _exif_orientation(seg[6:])
        elif marker == 0xE2 and seg[:4] == b"MPF\0":
            mpf = True
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
    # Decoders stop at EOI; some writers pad the file after it.
    has_eoi = data.rstrip(b"\0")[-2:] == b"\xff\xd9"
    return JpegHeader(*sof, orientation=orientation, adobe_transform=adobe, multi_picture=mpf, has_eoi=has_eoi)


def keep_original_blockers(header: JpegHeader | None, max_side: int) -> list[str]:
    """Why a file cannot be stored unchanged under --keep-original (empty list: it can)."""
    if header is None:
        return ["not a JPEG file"]
    reasons = []
    if header.sof != 0xC0:
        kind = "progressive" if header.sof in (0xC2, 0xC6, 0xCA, 0xCE) else f"non-baseline (SOF{header.sof - 0xC0})"
        reasons.append(f"{kind} JPEG")
    if header.precision != 8:
        reasons.append(f"{header.precision}-bit JPEG")
    if header.components != 3:
        reasons.append({1: "grayscale", 4: "CMYK/YCCK"}.get(header.components, f"{header.components} components"))
    elif header.adobe_transform == 0:
        reasons.append("RGB-coded JPEG (Adobe transform 0)")
    if max(header.width, header.height) > max_side:
        reasons.append(f"longer side {max(header.width, header.height)} > max-side {max_side}")
    if header.orientation != 1:
        reasons.append(f"EXIF orientation {header.orientation}")
    if header.multi_picture:
        reasons.append("multi-picture (MPO) file")
    if not header.has_eoi:
        reasons.append("no end-of-image marker")
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# Decode and re-encode


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """(RGB image, conversion reason or None). Alpha is composited over white, as an image viewer shows it."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        # Imported here: numpy costs every spawned worker ~50 ms at start-up and is needed only for these modes.
        import numpy as np
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255; scale the full range instead.
        arr = np.asarray(im, dtype=np.uint32)
        arr8 = ((arr * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), f"16-bit {mode} -> RGB"
    if mode == "F":
        arr8 = np.asarray(im, dtype=np.float32).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), "float image -> RGB (values clipped to 0..255)"
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "P+transparency"
    if mode == "P":
        return im.convert("RGB"), "palette -> RGB"
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} alpha composited over white -> RGB"
    names = {"L": "grayscale", "1": "1-bit", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}
    return im.convert("RGB"), f"{names.get(mode, mode)} -> RGB"


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageSkip("not an image (format not recognised)") from None
    except Image.DecompressionBombError as e:
        raise ImageSkip(f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise ImageSkip(f"truncated or unreadable image header ({e})") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block must not cost the image; it is dropped on re-encode anyway
        return 1
    return value if value in _ORIENTATION_OPS else 1


def reencode(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Decode, upright, RGB, area-downscale to `cfg.max_side`, baseline 4:2:0 JPEG at `cfg.quality`; no metadata."""
    im = _open(data)
    conversions = []
    if im.format != "JPEG":
        conversions.append(f"{im.format or 'unknown'} image re-encoded as JPEG")
    try:
        frames = getattr(im, "n_frames", 1)
    except (OSError, ValueError, SyntaxError, struct.error) as e:
        raise ImageSkip(f"truncated or corrupt image data ({e})") from None
    if frames > 1:
        conversions.append(f"{frames} frames, first kept")
    orientation = _orientation(im)
    stored_w, stored_h = im.size
    target = fit_within(stored_w, stored_h, cfg.max_side)
    # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding: big files decode several times faster; the area
    # filter below then takes the image to its exact size.
    if im.format == "JPEG" and target[0] * 2 <= stored_w:
        im.draft(im.mode if im.mode in ("L", "CMYK") else "RGB", target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Image.DecompressionBombError as e:
        raise ImageSkip(f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise ImageSkip(f"truncated or corrupt image data ({e})") from None
    mode = im.mode
    buf = io.BytesIO()
    try:
        im, why = _to_rgb(im)
        if why:
            conversions.append(why)
        if im.size != target:
            im = im.resize(target, Image.Resampling.BOX)
        if orientation != 1:
            im = im.transpose(_ORIENTATION_OPS[orientation])
            conversions.append(f"EXIF orientation {orientation} applied")
        im.save(buf, "JPEG", quality=cfg.quality, subsampling=2, optimize=False, progressive=False)
    except (OSError, ValueError, struct.error) as e:  # an exotic mode Pillow cannot convert: listed, not fatal
        raise ImageSkip(f"cannot convert this {mode} image to an RGB JPEG ({e})") from None
    width, height = (stored_h, stored_w) if orientation in _SWAPS_AXES else (stored_w, stored_h)
    return ProcessedImage(
        jpeg=buf.getvalue(),
        width=width,
        height=height,
        reencoded=True,
        resized=target != (stored_w, stored_h),
        conversions=tuple(conversions),
    )


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """The stored form of one input file; raises ImageSkip with the reason when it cannot be stored."""
    if not data:
        raise ImageSkip("empty file (0 bytes)")
    if not cfg.keep_original:
        return reencode(data, cfg)
    header = scan_jpeg(data)
    blockers = keep_original_blockers(header, cfg.max_side)
    if not blockers:
        return ProcessedImage(jpeg=data, width=header.width, height=header.height, reencoded=False, resized=False)
    out = reencode(data, cfg)
    # In this mode every re-encode is a conversion of the original: list why, then what was done.
    extra = tuple(c for c in out.conversions if c not in blockers)
    return ProcessedImage(out.jpeg, out.width, out.height, True, out.resized, tuple(blockers) + extra)


def decode_stored(jpeg: bytes) -> Image.Image:
    """Fully decode a stored sample image; raises ImageSkip when it is not an upright RGB JPEG (--verify --decode)."""
    im = _open(jpeg)
    if im.format != "JPEG" or im.mode != "RGB":
        raise ImageSkip(f"stored image is {im.format} {im.mode}, expected an RGB JPEG")
    if _orientation(im) != 1:
        raise ImageSkip(f"stored image has EXIF orientation {_orientation(im)}; readers would disagree on it")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise ImageSkip(f"truncated or corrupt image data ({e})") from None
    return im
