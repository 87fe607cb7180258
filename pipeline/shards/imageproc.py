"""Per-image work of the sharding tool: qualify, decode, make upright RGB, downscale, encode as baseline JPEG.

Two modes, one entry point (`process_image`):

* default (re-encode): decode, apply the EXIF orientation, convert to RGB (CMYK, grayscale, palette, alpha, 16-bit),
  downscale with an area filter so the longer side is at most `max_side` (never enlarge), encode baseline JPEG with
  4:2:0 chroma at `quality`, with no EXIF/ICC (so no orientation tag). Typical ImageNet files (q~96, 4:4:4) then
  decode about twice as fast and take under half the bytes, and DALI, PIL and timm all see the same upright image.
* `keep_original`: store the source bytes unchanged when a header scan (`scan_jpeg`) shows a baseline 8-bit
  3-component YCbCr JPEG within `max_side`, without a rotating EXIF orientation and with its end-of-image marker,
  and the file passes the very check `--verify --decode` applies to stored images (`check_stored`, decoded at 1/8
  scale: the entropy-coded data is read in full, the inverse DCT is skipped). Everything else is re-encoded.

Files are opened and decoded only through pipeline.shards.imagefile (format allow-list, `max_pixels`, corrupt JPEG
data detected), and images far above the target size are shrunk before any per-pixel conversion (DCT scaling for
JPEG, `reduce` for 16-bit and alpha images), so a worker holds a few bytes per source pixel at most.

Decoding is deterministic for a given Pillow/libjpeg-turbo build, so the same input gives the same bytes; the
encoder versions are recorded in the manifest (`encoder_versions`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, features

from pipeline.shards.imagefile import (
    DEFAULT_MAX_PIXELS,
    STORED_FORMATS,
    ImageSkip,
    load_image,
    open_image,
)
from pipeline.shards.jpeg import ORIENTATION_TAG, JpegHeader, exif_orientation, scan_jpeg

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "DEFAULT_QUALITY", "ORIENTATION_TAG", "ImageConfig", "ImageSkip",
           "JpegHeader", "ProcessedImage", "check_stored", "decode_stored", "encoder_versions", "fit_within",
           "keep_original_blockers", "process_image", "reencode", "scan_jpeg"]

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90

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
_JPEG_FORMATS = ("JPEG", "MPO")


@dataclass(frozen=True)
class ImageConfig:
    """How images are stored. `max_side`: longest side after downscaling; `quality`: JPEG quality 1-100;
    `max_pixels`: inputs whose header declares more pixels are skipped (decompression-bomb guard)."""

    max_side: int = DEFAULT_MAX_SIDE
    quality: int = DEFAULT_QUALITY
    keep_original: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not isinstance(self.max_side, int) or self.max_side < 16:
            raise ValueError(f"max_side must be an int >= 16, got {self.max_side!r}")
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be an int in 1..100, got {self.quality!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < self.max_side:
            raise ValueError(f"max_pixels must be an int >= max_side ({self.max_side}), got {self.max_pixels!r}")


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
# Keep-original qualification


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


def _to_rgb(im: Image.Image, factor: int = 1) -> tuple[Image.Image, str | None]:
    """(RGB image, conversion reason or None). Alpha is composited over white, as an image viewer shows it.

    `factor` >= 2: the image is far larger than needed, and modes whose conversion costs several bytes per pixel
    (16-bit, float, alpha) are first shrunk by that integer factor (`reduce`, a box filter; alpha premultiplied).
    """
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        # Imported here: numpy costs every spawned worker ~50 ms at start-up and is needed only for these modes.
        import numpy as np

        if factor >= 2:
            im = (im if mode in ("I", "F") else im.convert("I")).reduce(factor)
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
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # convert() to the same mode would copy
        if factor >= 2:
            rgba = rgba.convert("RGBa").reduce(factor).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} alpha composited over white -> RGB"
    names = {"L": "grayscale", "1": "1-bit", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}
    return im.convert("RGB"), f"{names.get(mode, mode)} -> RGB"


def image_orientation(data: bytes, im: Image.Image) -> int:
    """EXIF orientation of an opened input, read by pipeline.shards.jpeg.exif_orientation (the project's one
    EXIF parser): a JPEG's first APP1 Exif block, a TIFF's own first IFD, PNG eXIf / WebP EXIF chunks."""
    if im.format in _JPEG_FORMATS:
        header = scan_jpeg(data)
        return header.orientation if header is not None else 1
    if im.format == "TIFF":
        return exif_orientation(data)
    exif = im.info.get("exif")
    if isinstance(exif, bytes):
        return exif_orientation(exif[6:] if exif.startswith(b"Exif\0\0") else exif)
    return 1


def _animated(im: Image.Image) -> bool:
    # `is_animated` looks at the second frame only: counting every frame (n_frames) of a hostile GIF or TIFF
    # could take unbounded time.
    try:
        return bool(getattr(im, "is_animated", False))
    except Exception:  # a damaged second frame: the first may still be fine, and is decoded (and checked) next
        return True


def reencode(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Decode, upright, RGB, area-downscale to `cfg.max_side`, baseline 4:2:0 JPEG at `cfg.quality`; no metadata."""
    im = open_image(data, max_pixels=cfg.max_pixels)
    conversions = []
    if im.format != "JPEG":
        conversions.append(f"{im.format or 'unknown'} image re-encoded as JPEG")
    if _animated(im):
        conversions.append("several frames, first kept")
    orientation = image_orientation(data, im)
    stored_w, stored_h = im.size
    target = fit_within(stored_w, stored_h, cfg.max_side)
    # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding: big files decode several times faster; the area
    # filter below then takes the image to its exact size.
    if im.format in _JPEG_FORMATS and target[0] * 2 <= stored_w:
        im.draft(im.mode if im.mode in ("L", "CMYK") else "RGB", target)
    load_image(im, data)
    mode = im.mode
    buf = io.BytesIO()
    try:
        im, why = _to_rgb(im, min(im.size[0] // target[0], im.size[1] // target[1]))
        if why:
            conversions.append(why)
        if im.size != target:
            im = im.resize(target, Image.Resampling.BOX)
        if orientation != 1:
            im = im.transpose(_ORIENTATION_OPS[orientation])
            conversions.append(f"EXIF orientation {orientation} applied")
        im.save(buf, "JPEG", quality=cfg.quality, subsampling=2, optimize=False, progressive=False)
    except (OSError, ValueError, TypeError, MemoryError) as e:  # an exotic mode Pillow cannot convert: listed
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


def check_stored(jpeg: bytes, max_side: int | None = None, full: bool = True) -> Image.Image:
    """The check every stored image passes: an RGB JPEG (not MPO), no rotating EXIF orientation (read by the same
    parser as keep-original's qualification), within `max_side`, decoding without truncation or corrupt data.

    `full=False` decodes at 1/8 scale (all entropy-coded data is read, the inverse DCT is skipped): what
    `--keep-original` runs on every file it keeps. Returns the decoded image; raises ImageSkip with the reason.
    """
    im = open_image(jpeg, formats=STORED_FORMATS)
    if im.format != "JPEG" or im.mode != "RGB":
        raise ImageSkip(f"stored image is {im.format} {im.mode}, expected an RGB JPEG")
    header = scan_jpeg(jpeg)
    if header is None:
        raise ImageSkip("stored image has a malformed JPEG header")
    if header.orientation != 1:
        raise ImageSkip(f"stored image has EXIF orientation {header.orientation}; readers would disagree on it")
    if max_side is not None and max(im.size) > max_side:
        raise ImageSkip(f"jpg is {im.size[0]}x{im.size[1]}, larger than max-side {max_side}")
    if not full:
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))  # 1/8 scale: DC coefficients only
    load_image(im, jpeg)
    return im


def decode_stored(jpeg: bytes) -> Image.Image:
    """Fully decode a stored sample image; raises ImageSkip when it is not an upright RGB JPEG (--verify --decode)."""
    return check_stored(jpeg)


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """The stored form of one input file; raises ImageSkip with the reason when it cannot be stored."""
    if not data:
        raise ImageSkip("empty file (0 bytes)")
    if not cfg.keep_original:
        return reencode(data, cfg)
    header = scan_jpeg(data)
    blockers = keep_original_blockers(header, cfg.max_side)
    if not blockers:
        # What is kept passes its own `--verify --decode`: the same check, and corrupt data is never stored.
        check_stored(data, cfg.max_side, full=False)
        return ProcessedImage(jpeg=data, width=header.width, height=header.height, reencoded=False, resized=False)
    out = reencode(data, cfg)
    # In this mode every re-encode is a conversion of the original: list why, then what was done.
    extra = tuple(c for c in out.conversions if c not in blockers)
    return ProcessedImage(out.jpeg, out.width, out.height, True, out.resized, tuple(blockers) + extra)
