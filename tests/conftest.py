"""Shared test fixtures: tiny data the tests make themselves (no downloads, no ../shared needed)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Triton kernels run on CPU tensors under the interpreter; it must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pipeline.fileio import atomic_write_json
from pipeline.shards.shard_format import ClassEntry, Manifest, ShardWriter, image_checksum, timm_info

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def requires_shared(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the test with the reason (a user's clone has no ../shared)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data exists only on the project's build machines)")
    return path


def make_image(label: int, index: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: a class-coloured background with a little per-image noise, so labels are visible in pixels."""
    rng = np.random.default_rng(seed * 1_000_003 + index)
    base = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256], np.float32)
    img = base + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_tiny_shards(
    folder: str | os.PathLike,
    num_samples: int = 24,
    num_classes: int = 3,
    per_shard: int = 5,
    size: tuple[int, int] = (40, 48),
    name: str = "tiny",
    split: str = "train",
    seed: int = 0,
    checksums: bool = False,
) -> Manifest:
    """Write a small shard folder directly with ShardWriter (no sharding tool), image sizes varying a little.

    Sample i has key f"s{i:05d}", label i % num_classes; returns the manifest (also saved with _info.json).
    `checksums`: each json records its image's crc32, as the sharding tool writes it (tool version 1.0 did not).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for shard_index, start in enumerate(range(0, num_samples, per_shard)):
        writer = ShardWriter(folder, name, split, shard_index)
        for i in range(start, min(start + per_shard, num_samples)):
            label = i % num_classes
            h, w = size[0] + (i % 3) * 4, size[1] + (i % 2) * 6
            meta = {"src": f"c{label}/img{i}.jpg", "wnid": f"c{label}", "width": w, "height": h, "reencoded": False}
            jpeg = jpeg_bytes(make_image(label, i, h, w, seed))
            if checksums:
                meta["crc32"] = image_checksum(jpeg)
            writer.add_sample(f"s{i:05d}", jpeg, label, meta)
        records.append(writer.close())
    manifest = Manifest(
        name=name,
        split=split,
        source="<tests.conftest.write_tiny_shards>",
        command=["write_tiny_shards"],
        options={"num_samples": num_samples, "per_shard": per_shard, "seed": seed},
        classes=[ClassEntry(index=c, wnid=f"c{c}") for c in range(num_classes)],
        shards=records,
        totals={"inputs": num_samples, "written": num_samples, "skipped": 0, "converted": 0},
    )
    manifest.save(folder)
    atomic_write_json(folder / "_info.json", timm_info(manifest))
    return manifest


@pytest.fixture
def tiny_shards(tmp_path) -> tuple[Path, Manifest]:
    """A 24-sample, 3-class, 5-shard train folder."""
    folder = tmp_path / "shards"
    return folder, write_tiny_shards(folder)


@pytest.fixture
def one_thread():
    """Tiny ops run fastest on one thread, and stay fast when other jobs load the machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
