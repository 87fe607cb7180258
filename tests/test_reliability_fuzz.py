"""Fuzzing the image path: thousands of random mutations of small JPEG, PNG, GIF, TIFF and WebP files (fixed seed,
the same cases every run). Every mutation is either stored as an RGB JPEG that passes `--verify --decode`'s own
check, or skipped with a reason; nothing raises anything else."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
from PIL import Image

from pipeline.shards.imageproc import ImageConfig, ImageSkip, check_stored, process_image

SEED = 15
CASES = 2400
# Small limits keep each case fast: a mutated header may declare a huge image.
RE_ENCODE = ImageConfig(max_side=64, max_pixels=1_000_000)
KEEP = ImageConfig(max_side=64, max_pixels=1_000_000, keep_original=True)


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8))
    sixteen = Image.fromarray((rng.random((20, 24)) * 65535).astype(np.uint16))
    out = {}

    def add(name: str, im: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    add("jpeg", rgb, "JPEG", quality=90)
    add("jpeg-progressive", rgb, "JPEG", quality=90, progressive=True)
    add("jpeg-gray", rgb.convert("L"), "JPEG", quality=90)
    add("png", rgb, "PNG")
    add("png-rgba", rgb.convert("RGBA"), "PNG")
    add("png-16bit", sixteen, "PNG")
    add("gif-animated", rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.rotate(90).convert("P")])
    add("tiff", rgb, "TIFF")
    add("tiff-lzw", rgb, "TIFF", compression="tiff_lzw")
    add("webp", rgb, "WEBP", quality=80)
    add("webp-lossless", rgb, "WEBP", lossless=True)
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # random bytes over a short run
        p = rng.randrange(len(d))
        d[p : p + rng.randint(1, 8)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 2:  # cut
        d = d[: rng.randrange(1, len(d))]
    elif kind == 3:  # insertion
        p = rng.randrange(len(d))
        d[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 4:  # deletion
        p = rng.randrange(len(d))
        del d[p : p + rng.randint(1, 32)]
    elif kind == 5:  # a size or offset field set to an extreme
        p = rng.randrange(max(1, len(d) - 4))
        d[p : p + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"\0\x01\0\0"])
    else:  # a chunk duplicated elsewhere
        p, q = rng.randrange(len(d)), rng.randrange(len(d))
        d[q:q] = d[p : p + rng.randint(1, 64)]
    return bytes(d)


def test_every_mutation_is_stored_as_decodable_rgb_or_skipped_with_a_reason():
    files = seeds()
    names = sorted(files)
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    for i in range(CASES):
        name = names[i % len(names)]
        data = mutate(files[name], rng)
        cfg = KEEP if i % 2 else RE_ENCODE
        try:
            out = process_image(data, cfg)
        except ImageSkip as e:
            assert str(e).strip(), f"case {i} ({name}): a skip without a reason"
            outcomes["skipped"] += 1
            continue
        im = check_stored(out.jpeg, cfg.max_side)  # what --verify --decode applies to every stored image
        assert im.mode == "RGB" and max(im.size) <= cfg.max_side, f"case {i} ({name})"
        outcomes["kept" if not out.reencoded else "stored"] += 1
    # The cases exercise every outcome: stored re-encoded, kept unchanged, and skipped.
    assert set(outcomes) == {"stored", "kept", "skipped"} and sum(outcomes.values()) == CASES
