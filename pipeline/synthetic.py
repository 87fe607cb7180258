"""The demo's built-in data set: small labelled JPEG images whose class is a shape, in an ImageFolder tree.

Each class is a shape (disc, square, triangle, ...) drawn at a random position, size and rotation, in random
foreground and background colours over a noisy background. Colour carries no class information, so a model has to
learn spatial structure to tell the classes apart: a randomly initialised encoder does clearly worse on k-NN than a
trained one, which is what makes the demo's compute-to-accuracy comparison meaningful. Generated deterministically
from a seed, with no download.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "disc", "square", "triangle", "plus", "cross", "ring", "hstripes", "vstripes", "checker", "diamond",
)
# Shapes are drawn at this multiple of the output size and downsampled with an area filter (anti-aliasing).
_SUPERSAMPLE = 4


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int], size: int) -> None:
    w = max(2.0, r * 0.35)
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(w))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle + math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - 1.3 * r), (cx + 0.75 * r, cy), (cx, cy + 1.3 * r), (cx - 0.75 * r, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, angle - math.pi / 2), fill=fill)
    elif shape in ("plus", "cross"):
        base = angle + (0.0 if shape == "plus" else math.pi / 4)
        for a in (base, base + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=int(w))
    elif shape in ("hstripes", "vstripes"):
        period = max(4.0, r * 0.6)
        k = 0
        while k * period < size:
            a = k * period
            box = [0, a, size, a + period / 2] if shape == "hstripes" else [a, 0, a + period / 2, size]
            draw.rectangle(box, fill=fill)
            k += 1
    elif shape == "checker":
        cell = max(4.0, r * 0.7)
        n = int(size / cell) + 1
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(fg.astype(int) - bg.astype(int)).sum() > 200:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def render(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label`, `size` x `size`."""
    big = size * _SUPERSAMPLE
    fg, bg = _contrasting_colours(rng)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = big * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r, big - r, 2)
    # Small rotations only: a square turned 45 degrees would be a diamond, a plus turned 45 degrees a cross.
    _draw_shape(draw, CLASSES[label], cx, cy, r, rng.uniform(-0.3, 0.3), fg, big)
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    small = small + rng.normal(0, 10, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))


def make_shapes_dataset(
    root: str | os.PathLike,
    train_per_class: int = 500,
    val_per_class: int = 100,
    size: int = 32,
    num_classes: int = len(CLASSES),
    seed: int = 0,
    quality: int = 95,
) -> dict[str, int]:
    """Write `root/train/<class>/<class>_<i>.jpg` and `root/val/<class>/...`; returns images written per split.

    Deterministic: the same arguments give the same files. Existing files are overwritten.
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {num_classes}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels for the shapes to be recognisable, got {size}")
    root = Path(root)
    counts = {}
    for split_index, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label in range(num_classes):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_index, label])
            for i in range(per_class):
                render(label, size, rng).save(folder / f"{CLASSES[label]}_{i:05d}.jpg", "JPEG", quality=quality)
        counts[split] = per_class * num_classes
    return counts
