"""The demo's built-in shape data set."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import CLASSES, make_shapes_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_counts_and_determinism(tmp_path):
    counts = make_shapes_dataset(tmp_path / "a", train_per_class=3, val_per_class=2, num_classes=4, seed=7)
    assert counts == {"train": 12, "val": 8}
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == sorted(CLASSES[:4])
    files = sorted((tmp_path / "a" / "val" / "disc").iterdir())
    assert [f.name for f in files] == ["disc_00000.jpg", "disc_00001.jpg"]
    with Image.open(files[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    make_shapes_dataset(tmp_path / "b", train_per_class=3, val_per_class=2, num_classes=4, seed=7)
    make_shapes_dataset(tmp_path / "c", train_per_class=3, val_per_class=2, num_classes=4, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_colour_carries_no_class_information(tmp_path):
    """Mean colours of two classes are statistically alike: the class is in the shape, not the palette."""
    make_shapes_dataset(tmp_path, train_per_class=60, val_per_class=0, num_classes=2, seed=0)
    means = [np.stack([np.asarray(Image.open(p), np.float32).mean((0, 1)) for p in (tmp_path / "train" / c).iterdir()])
             for c in CLASSES[:2]]
    assert np.abs(means[0].mean(0) - means[1].mean(0)).max() < 25  # of a 0..255 range, sd of a mean ~ 10


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes must be in \[2, 10\]"):
        make_shapes_dataset(tmp_path, num_classes=11)
    with pytest.raises(ValueError, match="size must be >= 16"):
        make_shapes_dataset(tmp_path, size=8)
