"""Per-image conversion: pixels, orientation, size and encoding of what is stored, keep-original qualification, skips."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipeline.shards.imageproc import (
    ImageConfig,
    ImageSkip,
    fit_within,
    keep_original_blockers,
    process_image,
    scan_jpeg,
)
from tests.shard_testdata import image_file, rgb_at

CFG = ImageConfig()


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(w: int, h: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """w x h image: left half `left`, right half `right`."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr)


def assert_stored_form(jpeg: bytes) -> Image.Image:
    """Baseline 4:2:0 RGB JPEG, no EXIF, no ICC profile."""
    header = scan_jpeg(jpeg)
    assert header.sof == 0xC0 and header.components == 3 and header.orientation == 1
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
    assert "exif" not in im.info and "icc_profile" not in im.info
    return im


def close(a, b, tol=12) -> bool:
    return bool(np.all(np.abs(np.asarray(a, int) - np.asarray(b, int)) <= tol))


def test_fit_within():
    assert fit_within(100, 50, 512) == (100, 50)  # never enlarged
    assert fit_within(1000, 600, 512) == (512, 307)
    assert fit_within(600, 1000, 512) == (307, 512)
    assert fit_within(5000, 3, 512) == (512, 1)


def test_typical_jpeg_reencoded_at_quality_444_to_420():
    src = encode(halves(64, 48), quality=96, subsampling=0)
    out = process_image(src, CFG)
    im = assert_stored_form(out.jpeg)
    assert im.size == (64, 48) and (out.width, out.height) == (64, 48)
    assert out.reencoded and not out.resized and out.conversions == ()
    assert close(rgb_at(out.jpeg, 8, 24), (255, 0, 0)) and close(rgb_at(out.jpeg, 56, 24), (0, 0, 255))


def test_cmyk_becomes_rgb_with_the_same_colours():
    src = encode(halves(64, 48).convert("CMYK"), quality=95)
    assert Image.open(io.BytesIO(src)).mode == "CMYK"
    out = process_image(src, CFG)
    assert_stored_form(out.jpeg)
    assert "CMYK -> RGB" in out.conversions
    assert close(rgb_at(out.jpeg, 8, 24), (255, 0, 0), 20) and close(rgb_at(out.jpeg, 56, 24), (0, 0, 255), 20)


def test_grayscale_becomes_three_equal_channels():
    arr = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    out = process_image(encode(Image.fromarray(arr, "L"), quality=95), CFG)
    assert_stored_form(out.jpeg)
    assert out.conversions == ("grayscale -> RGB",)
    px = np.asarray(Image.open(io.BytesIO(out.jpeg)), int)
    assert np.abs(px[..., 0] - px[..., 1]).max() <= 3 and np.abs(px[..., 0] - px[..., 2]).max() <= 3
    assert close(px[24, :, 0], arr[24], 6)


def test_png_with_a_jpeg_name_is_converted():
    src = encode(halves(40, 30), "PNG")
    out = process_image(src, CFG)
    assert_stored_form(out.jpeg)
    assert out.conversions == ("PNG image re-encoded as JPEG",)
    assert close(rgb_at(out.jpeg, 4, 15), (255, 0, 0)) and close(rgb_at(out.jpeg, 36, 15), (0, 0, 255))


def test_exif_rotated_image_is_stored_upright_without_the_tag():
    # Stored 60 wide x 40 high, left half red; orientation 6 = "rotate 90 degrees clockwise to display",
    # so upright it is 40 wide x 60 high with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    src = encode(halves(60, 40), quality=95, exif=exif.tobytes())
    assert scan_jpeg(src).orientation == 6
    for keep in (False, True):
        out = process_image(src, ImageConfig(keep_original=keep))
        im = assert_stored_form(out.jpeg)
        assert im.size == (40, 60) and (out.width, out.height) == (40, 60)
        assert close(rgb_at(out.jpeg, 20, 8), (255, 0, 0)) and close(rgb_at(out.jpeg, 20, 52), (0, 0, 255))
        assert "EXIF orientation 6 applied" in out.conversions


@pytest.mark.parametrize("size", [(1000, 600), (1100, 600), (520, 300)])  # 1100: decoded at 1/2 scale first
def test_oversize_is_area_downscaled_to_max_side(size):
    w, h = size
    out = process_image(encode(halves(w, h), quality=95), CFG)
    im = assert_stored_form(out.jpeg)
    tw, th = fit_within(w, h, 512)
    assert im.size == (tw, th) and max(im.size) == 512 and out.resized and (out.width, out.height) == (w, h)
    assert close(rgb_at(out.jpeg, 10, th // 2), (255, 0, 0)) and close(rgb_at(out.jpeg, tw - 10, th // 2), (0, 0, 255))
    # The area filter averages across the colour edge (a nearest-neighbour resize would not).
    edge = np.asarray(Image.open(io.BytesIO(out.jpeg)), int)[th // 2, tw // 2 - 1 : tw // 2 + 1]
    assert edge[:, 0].min() < 250 or edge[:, 2].min() < 250


def test_sixteen_bit_alpha_and_palette_inputs():
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(1, 64).repeat(8, 0)  # 0 .. 65520
    out = process_image(encode(Image.fromarray(ramp), "PNG"), CFG)
    assert_stored_form(out.jpeg)
    assert out.conversions[1].startswith("16-bit")
    px = np.asarray(Image.open(io.BytesIO(out.jpeg)), int)[4, :, 0]
    assert close(px, np.round(ramp[4] / 257), 6) and px[-1] > 240  # full range, not clipped at 255

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 10:, 3] = 255  # left half fully transparent: a viewer shows white there
    out = process_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), CFG)
    assert "RGBA alpha composited over white -> RGB" in out.conversions
    assert close(rgb_at(out.jpeg, 3, 10), (255, 255, 255)) and close(rgb_at(out.jpeg, 16, 10), (255, 0, 0))

    pal = halves(20, 20).convert("P")
    out = process_image(encode(pal, "GIF"), CFG)
    assert out.conversions == ("GIF image re-encoded as JPEG", "palette -> RGB")
    assert close(rgb_at(out.jpeg, 3, 10), (255, 0, 0))


def test_keep_original_stores_qualifying_bytes_unchanged():
    cfg = ImageConfig(keep_original=True)
    src = image_file("jpeg", 1, 0, (40, 50))
    out = process_image(src, cfg)
    assert out.jpeg == src and not out.reencoded and (out.width, out.height) == (50, 40) and out.conversions == ()
    # Quality and chroma subsampling do not matter, EXIF orientation 1 (upright) and 0 (invalid) do not either.
    exif = Image.Exif()
    for value in (1, 0):
        exif[0x0112] = value
        src444 = encode(halves(30, 20), quality=97, subsampling=0, exif=exif.tobytes())
        assert process_image(src444, cfg).jpeg == src444


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("progressive", "progressive JPEG"),
        ("gray", "grayscale"),
        ("cmyk", "CMYK/YCCK"),
        ("png", "not a JPEG file"),
        ("big", "longer side 600 > max-side 512"),
        ("rotated", "EXIF orientation 3"),
    ],
)
def test_keep_original_reencodes_what_does_not_qualify(kind, reason):
    if kind == "big":
        src = encode(halves(600, 40))
    elif kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 3
        src = encode(halves(30, 20), exif=exif.tobytes())
    else:
        src = image_file(kind, 0, 1, (30, 40))
    assert keep_original_blockers(scan_jpeg(src), 512) == [reason]
    out = process_image(src, ImageConfig(keep_original=True))
    assert out.reencoded and out.conversions[0] == reason
    assert_stored_form(out.jpeg)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, not an image\n" * 3, "not an image"),
        ("truncated", "truncated or corrupt image data"),
        ("header-only", "truncated or unreadable image header"),
    ],
)
def test_skips_have_reasons(data, reason):
    good = image_file("jpeg", 0, 1, (96, 96))  # noisy: most of the file is entropy-coded data
    if data == "truncated":
        data = good[: len(good) * 2 // 3]
    elif data == "header-only":
        data = good[:200]
    for keep in (False, True):
        with pytest.raises(ImageSkip, match=reason.split(" (")[0]):
            process_image(data, ImageConfig(keep_original=keep))


def test_scan_jpeg_reads_the_header_only():
    src = encode(halves(33, 17), quality=80)
    h = scan_jpeg(src)
    assert (h.sof, h.precision, h.width, h.height, h.components, h.has_eoi) == (0xC0, 8, 33, 17, 3, True)
    assert scan_jpeg(b"\x89PNG\r\n") is None and scan_jpeg(src[:100]) is None
    assert scan_jpeg(src[:-2]).has_eoi is False
    assert "no end-of-image marker" in keep_original_blockers(scan_jpeg(src[:-2]), 512)
    with pytest.raises(ValueError, match="quality"):
        ImageConfig(quality=101)


def test_unconvertible_mode_is_a_skip_not_a_crash(monkeypatch):
    import pipeline.shards.imageproc as imageproc

    def refuse(im, *args):
        raise ValueError(f"conversion from {im.mode} to RGB not supported")

    monkeypatch.setattr(imageproc, "_to_rgb", refuse)
    with pytest.raises(ImageSkip, match=r"cannot convert this RGB image to an RGB JPEG \(conversion from RGB"):
        process_image(encode(halves(8, 8)), CFG)
