"""Small source data for the sharding tests: ImageFolder trees, their tars, an ILSVRC-style tar of tars, val sets.

Everything is generated here (tiny images, a few KB each); nothing comes from ../shared.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import jpeg_bytes, make_image

WNIDS = ("n01440764", "n01443537", "n01484850")
EMPTY_WNID = "n01491361"  # a class folder with no files: keeps its index


def image_file(kind: str, label: int, index: int, size: tuple[int, int] = (20, 24)) -> bytes:
    """Bytes of a small test image; kind: jpeg, png, cmyk, gray, progressive."""
    h, w = size
    arr = make_image(label, index, h, w)
    if kind == "jpeg":
        return jpeg_bytes(arr)
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if kind == "png":
        im.save(buf, "PNG")
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "gray":
        im.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "progressive":
        im.save(buf, "JPEG", quality=90, progressive=True)
    else:
        raise ValueError(kind)
    return buf.getvalue()


def make_imagefolder(root: Path, per_class: int = 4, odd: bool = True, bad: bool = True) -> dict[str, str]:
    """An ImageFolder tree under `root`; returns {relative path (display form): wnid} of the valid images.

    odd: names with spaces and dots, a non-UTF-8 byte, a very long name, a PNG named .JPEG, a CMYK JPEG.
    bad: a zero-byte file, a truncated JPEG and a text file named .JPEG (all must be skipped).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / EMPTY_WNID).mkdir()
    expected = {}
    for label, wnid in enumerate(WNIDS):
        d = root / wnid
        d.mkdir()
        for i in range(per_class):
            name = f"{wnid}_{i}.JPEG"
            (d / name).write_bytes(image_file("jpeg", label, i, (18 + i, 22 + 2 * i)))
            expected[f"{wnid}/{name}"] = wnid
    if odd:
        w0, w1, w2 = WNIDS
        odd_files = {
            f"{w0}/a photo.v2.final.JPEG": image_file("jpeg", 0, 50),
            f"{w1}/{'long' * 40}.JPEG": image_file("jpeg", 1, 51),
            f"{w1}/png_named.JPEG": image_file("png", 1, 52),
            f"{w2}/cmyk.JPEG": image_file("cmyk", 2, 53),
            f"{w2}/sub/nested.jpg": image_file("jpeg", 2, 54),
        }
        for rel, data in odd_files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            expected[rel] = rel.split("/")[0]
        raw = os.fsencode(root / w2) + b"/caf\xe9.JPEG"  # Latin-1 e-acute: not valid UTF-8
        with open(raw, "wb") as f:
            f.write(image_file("jpeg", 2, 55))
        expected[f"{w2}/caf\\xe9.JPEG"] = w2
    if bad:
        (root / WNIDS[0] / "zero.JPEG").write_bytes(b"")
        (root / WNIDS[1] / "notes.JPEG").write_bytes(b"this is not an image\n")
        good = image_file("jpeg", 2, 56, (96, 96))
        (root / WNIDS[2] / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    return expected


def tar_folder(root: Path, tar_path: Path, arcname: str) -> Path:
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(root, arcname=arcname)
    return tar_path


def make_tar_of_tars(root: Path, tar_path: Path) -> Path:
    """ILSVRC2012_img_train.tar layout: one `<wnid>.tar` per class folder of `root` (flat member names)."""
    inner_dir = tar_path.parent / (tar_path.name + ".parts")
    inner_dir.mkdir()
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as outer:
        for cls in sorted(os.listdir(root)):
            inner = inner_dir / f"{cls}.tar"
            with tarfile.open(inner, "w", format=tarfile.GNU_FORMAT) as tf:
                for dirpath, _, files in sorted(os.walk(root / cls)):
                    for f in sorted(files):
                        full = Path(dirpath) / f
                        tf.add(full, arcname=os.path.relpath(full, root / cls))
            outer.add(inner, arcname=f"{cls}.tar")
    return tar_path


def make_val_folder(root: Path, n: int = 9) -> list[str]:
    """Flat ILSVRC2012_val_XXXXXXXX.JPEG files; returns the wnid of each (file i+1 has class i % 3)."""
    root.mkdir(parents=True)
    wnids = []
    for i in range(n):
        label = (i * 2) % len(WNIDS)
        (root / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(image_file("jpeg", label, 100 + i))
        wnids.append(WNIDS[label])
    return wnids


def rgb_at(jpeg: bytes, x: int, y: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[y, x].astype(int)
