"""The check's own data: JPEGs made on the spot, written into shards by the project's sharding tool (the path real
data takes). No download; made once per settings under OUTDIR/work."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(index: int, label: int, width: int, height: int, seed: int) -> bytes:
    """A smooth random colour field tinted by the class: compresses and decodes about like a photo (a noise image
    would be far costlier to decode, a flat one far cheaper)."""
    rng = np.random.default_rng([seed, index])
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    tint = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256], np.float32)
    pixels = np.clip(0.7 * field + 0.3 * tint + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(folder: Path, images: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> Path:
    """`images` JPEGs of `size` (width, height) in an ImageFolder, sharded with the tool's defaults (re-encoded to
    at most 512 px, quality 90); returns the shard folder, under `folder` in a sub-folder named by the settings.
    Reused when already made."""
    from pipeline.shards.sharding import ShardConfig, run_sharding

    folder = folder / f"{images}x{size[0]}x{size[1]}-c{classes}-s{seed}"
    shards = folder / "shards"
    marker = folder / "made.json"
    if marker.is_file() and (shards / "manifest.json").is_file():
        return shards
    source = folder / "images"
    for i in range(images):
        label = i % classes
        cls = source / f"c{label:03d}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"img{i:06d}.jpg").write_bytes(jpeg(i, label, size[0], size[1], seed))
    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    run_sharding(ShardConfig(src=source, out=shards, name="gpucheck", shard_samples=256, workers=workers))
    marker.write_text(json.dumps({"images": images, "size": list(size), "classes": classes, "seed": seed}))
    return shards
