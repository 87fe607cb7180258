"""The one way this project opens and decodes an image file it did not write (sharding, `--verify --decode`, the
torch loader): a format allow-list, a pixel limit, and corrupt data detected instead of stored.

    im = open_image(data)            # header only; ImageSkip("unsupported format EPS"), ("... above --max-pixels")
    load_image(im, data)             # decode; ImageSkip("corrupt JPEG data: premature end of data segment ...")

* **Allow-list.** `Image.open(fp, formats=ALLOWED_FORMATS)`: JPEG (MPO, the multi-picture JPEG of cameras, too),
  PNG, WebP, GIF, BMP, TIFF, PPM/PGM/PBM and TGA, all decoded inside this process by Pillow's bundled libraries.
  Never EPS/PS or PDF: Pillow hands those to Ghostscript, an external program. Anything else is skipped as
  "unsupported format X" (X from the byte signature, read by Pillow's plugins' signature checks only).
* **Pixel limit** (`max_pixels`, default DEFAULT_MAX_PIXELS, about 90 megapixels: Pillow's own
  decompression-bomb threshold): an image whose header declares more pixels is skipped before anything is decoded
  (Pillow's own check, which only warns below twice its limit, is replaced by this one).
* **Corrupt JPEG data.** Pillow hides libjpeg's warnings ("Corrupt JPEG data: premature end of data segment",
  "... N extraneous bytes before marker 0xd9") and returns the damaged pixels: a damaged header becomes a flat grey
  image. For a single-scan JPEG (baseline or extended sequential: nearly all photographs) both are checked while
  decoding, at no extra cost for a healthy file:
    - extraneous data: the file is read through a reader that holds back the last byte before the end-of-image
      marker; a healthy stream's last block needs that byte, so a decoder that finished its rows without asking
      for it stopped early (it reads up to 8 bytes ahead: an early stop by fewer bytes passes);
    - premature end: when the last pixel is the mid grey libjpeg substitutes for missing data, the file is decoded
      a second time with filler bytes before its end marker: a complete stream ignores them, one that ran out of
      data turns them into visible blocks. A stream that runs short only inside its last block is not caught.
  Restart markers must come in sequence. Progressive JPEGs (many scans) are checked for truncation and structure
  only; damage inside a restart interval of a file with restart markers is not detected.
* Every other exception a decoder raises on a malformed file (Pillow raises OSError, SyntaxError, ValueError,
  IndexError, KeyError, TypeError, struct.error, MemoryError, ...) becomes ImageSkip with the exception named;
  warnings Pillow issues about corrupt or truncated data too.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator

from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.shards.jpeg import EOI, scan_end, scan_jpeg

# Pillow opens JPEG files that carry further pictures (MPO, the multi-picture JPEG of cameras) as "MPO" through its
# JPEG plugin; "JPEG" admits them.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA")
STORED_FORMATS = ("JPEG",)  # what shards hold
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: about 90 megapixels
_JPEG_FORMATS = ("JPEG", "MPO")
# Arbitrary bits without 0xFF (a marker): a decoder still short of data turns them into visible blocks, a complete
# stream ignores them.
_FILLER = bytes((i * 73 + 41) % 255 for i in range(64))
_CORRUPT_WARNING = re.compile(r"corrupt|truncat|premature|broken|bad |larger than file", re.IGNORECASE)


class ImageSkip(Exception):
    """The input cannot become a sample (empty, not an image, unsupported, too large, truncated, corrupt);
    str(e) is the reason."""


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _HoldBackReader(io.BytesIO):
    """An in-memory file that hands out its bytes only up to `hold_at` until a reader asks past it (then records
    that it asked, and hands out the rest)."""

    hold_at: int | None = None
    asked_past_hold = False

    def read(self, n: int | None = -1) -> bytes:
        if self.hold_at is not None:
            pos = self.tell()
            if pos >= self.hold_at:
                self.asked_past_hold = True
                self.hold_at = None
            elif n is None or n < 0 or pos + n > self.hold_at:
                n = self.hold_at - pos
        return super().read(n)


@contextlib.contextmanager
def _pillow_limits() -> Iterator[None]:
    """Truncated files not accepted, Pillow's warnings about corrupt or truncated data raised as ImageSkip. Pillow's
    own decompression-bomb check is off: `open_image` applies `max_pixels` to the header's size itself (one limit,
    one message). Pillow's settings and the warning filters are process-wide (restored on exit): images are opened
    by one thread per process here (sharding and loader workers are processes)."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            if _CORRUPT_WARNING.search(str(w.message)):
                raise ImageSkip(f"corrupt image data ({str(w.message).strip()})")
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


_OTHER_SIGNATURES = {b"%PDF": "PDF"}  # formats Pillow cannot read, recognised for the message


def identify_format(data: bytes) -> str | None:
    """The format Pillow's plugins recognise from the first bytes (signature checks only, nothing parsed)."""
    Image.init()
    prefix = data[:16]
    for signature, fmt in _OTHER_SIGNATURES.items():
        if prefix.startswith(signature):
            return fmt
    for fmt in Image.ID:
        _, accept = Image.OPEN[fmt]
        if accept is None:  # plugins without a signature check would claim anything
            continue
        try:
            result = accept(prefix)
        except Exception:  # a signature check that fails on odd bytes recognises nothing
            continue
        if result and not isinstance(result, str):  # a str is Pillow's "looks like it, but unsupported"
            return fmt
    return None


def _too_large(w: int, h: int, max_pixels: int) -> ImageSkip:
    return ImageSkip(f"image too large: {w}x{h} = {w * h:,} pixels, above --max-pixels {max_pixels:,} (a "
                     "decompression-bomb guard; raise --max-pixels to keep such images)")


def open_image(data: bytes, formats: tuple[str, ...] = ALLOWED_FORMATS,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `data` (header only) if it is an allowed format within `max_pixels`; raises ImageSkip otherwise."""
    if not data:
        raise ImageSkip("empty file (0 bytes)")
    Image.init()  # registers every plugin once (for `identify_format`); later calls return at once
    fp = _HoldBackReader(data)
    try:
        with _pillow_limits():
            im = Image.open(fp, formats=list(formats))
    except ImageSkip:
        raise
    except UnidentifiedImageError:
        fmt = identify_format(data)
        if fmt is not None and fmt not in formats:
            raise ImageSkip(f"unsupported format {fmt} (allowed: {', '.join(formats)})") from None
        raise ImageSkip("not an image (format not recognised)") from None
    except Exception as e:  # any exception a plugin raises on a malformed header
        raise ImageSkip(f"truncated or unreadable image header ({_describe(e)})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise _too_large(w, h, max_pixels)
    if w < 1 or h < 1:
        raise ImageSkip(f"image header declares an empty {w}x{h} image")
    return im


def load_image(im: Image.Image, data: bytes) -> None:
    """Decode `im` (opened by `open_image` from `data`, possibly with `draft` set); raises ImageSkip when the file
    is truncated or its data is corrupt (see the module docstring)."""
    header = scan_jpeg(data) if im.format in _JPEG_FORMATS else None
    end = scan_end(data, header) if header is not None else None
    if end is not None and end.out_of_sequence is not None:
        raise ImageSkip(f"corrupt JPEG data: restart markers out of sequence at byte {end.out_of_sequence}")
    single_scan = end is not None and end.marker == EOI
    fp = im.fp
    if single_scan and isinstance(fp, _HoldBackReader):
        # A healthy stream's last block needs the last byte before the marker: the decoder always asks for it.
        fp.hold_at = max(header.sos_offset, end.offset - 1)
    _decode(im)
    if not single_scan:
        return
    if isinstance(fp, _HoldBackReader) and fp.hold_at is not None and not fp.asked_past_hold:
        raise ImageSkip(f"corrupt JPEG data: extraneous bytes before the end-of-image marker at byte {end.offset} "
                        "(the image data ends early: damaged data or Huffman tables); the decoded pixels would be "
                        "wrong")
    if _looks_zero_filled(im) and _changes_with_filler(im, data, end.offset):
        raise ImageSkip("corrupt JPEG data: premature end of data segment (the image data runs out before the "
                        "last blocks, which would be flat grey; a damaged header or cut data)")


def _decode(im: Image.Image) -> None:
    try:
        with _pillow_limits():
            im.load()
    except ImageSkip:
        raise
    except Exception as e:  # truncated data, decoder errors, and whatever a plugin raises on malformed data
        raise ImageSkip(f"truncated or corrupt image data ({_describe(e)})") from None


def _looks_zero_filled(im: Image.Image) -> bool:
    """The last pixel is (close to) what libjpeg outputs for a block it had no data for: mid grey."""
    px = im.getpixel((im.size[0] - 1, im.size[1] - 1))
    values = px if isinstance(px, tuple) else (px,)
    if im.mode in ("L", "RGB"):
        return all(abs(v - 128) <= 2 for v in values)
    return True  # rare modes (CMYK, ...): let the second decode decide


def _changes_with_filler(im: Image.Image, data: bytes, eoi: int) -> bool:
    """Whether the image decodes differently with filler bytes inserted before its end-of-image marker."""
    # The same header: its size passed the pixel limit when `im` was opened.
    other = open_image(data[:eoi] + _FILLER + data[eoi:], formats=("JPEG",), max_pixels=2**62)
    scale = (getattr(im, "decoderconfig", None) or (1,))[0]  # DCT scaling `im.draft` chose, if any
    if scale > 1 or im.mode != other.mode:
        other.draft(im.mode, (max(1, other.size[0] // scale), max(1, other.size[1] // scale)))  # the same scale
    _decode(other)
    if other.size != im.size or other.mode != im.mode:
        return False  # not comparable: no verdict against the file
    return other.tobytes() != im.tobytes()
