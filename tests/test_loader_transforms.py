"""The recipe's geometry and PIL's bicubic resize on torch tensors (pipeline/loaders/transforms.py), and the crop-decode
loader's pixels against PIL and torchvision on the same windows (real ImageNet files when ../shared is present)."""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from pipeline.loaders import transforms
from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.build import build_loader
from pipeline.loaders.transforms import (
    crop_windows,
    eval_geometry,
    resize_bicubic,
    resize_bicubic_float,
    train_geometry,
    vertical_first,
)
from tests.test_loader_torch import stored_imagenet_jpegs, write_jpeg_shards

BICUBIC = Image.Resampling.BICUBIC
AREA, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def pil_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((out_w, out_h), BICUBIC))


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Photo-like content: low-frequency colour fields with a little noise and a few hard edges."""
    coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)).astype(np.int16)
    img[: h // 3, : w // 4] = rng.integers(0, 256, 3)  # a flat block: hard edges, overshoot clipped at 0 / 255
    img += rng.integers(-6, 7, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int32) - b.astype(np.int32))


def assert_pil_parity(diffs: list[np.ndarray]) -> None:
    """PIL's bicubic within rounding: torch's kernel uses 15-bit weights where Pillow uses 22, so a few pixels in a
    thousand differ by 1 and about one in a million by 2 (never more)."""
    d = np.concatenate([x.ravel() for x in diffs])
    assert d.max() <= 2, d.max()
    assert (d > 1).mean() < 2e-5 and (d > 0).mean() < 0.01, ((d > 1).mean(), (d > 0).mean())


# ----------------------------------------------------------------------------------------------------------------
# geometry


def test_crop_windows_follow_torchvisions_random_resized_crop():
    """Same law as RandomResizedCrop.get_params: windows inside the image, area fraction and log aspect ratio
    uniform over the ranges (compared with torchvision's own draws on the same image sizes)."""
    rng = np.random.default_rng(0)
    n = 4000
    heights, widths = rng.integers(60, 600, n), rng.integers(60, 600, n)
    win = crop_windows(heights, widths, AREA, RATIO, np.random.default_rng(1))
    top, left, h, w = win.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(Image.new("L", (int(wi), int(hi))), list(AREA), list(RATIO))
                    for hi, wi in zip(heights, widths, strict=True)])
    for ours, theirs in ((h * w / (heights * widths), ref[:, 2] * ref[:, 3] / (heights * widths)),
                         (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                         ((top + h / 2) / heights, (ref[:, 0] + ref[:, 2] / 2) / heights)):
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
        assert np.abs(np.quantile(ours, [0.1, 0.5, 0.9]) - np.quantile(theirs, [0.1, 0.5, 0.9])).max() < 0.02


@pytest.mark.parametrize("h,w", [(10, 200), (200, 10), (50, 50)])
def test_crop_windows_fall_back_to_torchvisions_central_crop(h, w):
    """When no attempt fits (area 1 and a ratio the image does not have), the central crop with the ratio clamped."""
    scale = (1.0, 1.0)
    ratio = (2.0, 3.0) if h == w else RATIO
    ours = crop_windows(np.array([h]), np.array([w]), scale, ratio, np.random.default_rng(0))[0]
    theirs = T.RandomResizedCrop.get_params(Image.new("L", (w, h)), list(scale), list(ratio))
    assert tuple(ours) == tuple(theirs)


def test_train_geometry_is_a_function_of_the_generator():
    a = train_geometry(np.array([100, 200]), np.array([150, 120]), 32, AREA, RATIO, np.random.default_rng(7))
    b = train_geometry(np.array([100, 200]), np.array([150, 120]), 32, AREA, RATIO, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip((a.window, a.flip), (b.window, b.flip), strict=True))
    assert (a.resize == 32).all() and (a.offset == 0).all()
    flips = train_geometry(np.full(2000, 64), np.full(2000, 64), 32, AREA, RATIO, np.random.default_rng(0)).flip
    assert 0.45 < flips.mean() < 0.55


@pytest.mark.parametrize("h,w", [(375, 500), (500, 375), (256, 256), (300, 301), (511, 97), (224, 224), (250, 300),
                                 (300, 402), (402, 300)])
def test_eval_geometry_is_torchvisions_resize_and_centre_crop(h, w):
    g = eval_geometry(np.array([h]), np.array([w]), 256, 224)
    resized = TF.resize(Image.new("L", (w, h)), 256, T.InterpolationMode.BICUBIC)
    assert tuple(g.resize[0]) == (resized.height, resized.width)
    # torchvision's CenterCrop: int(round((side - size) / 2.0))
    assert tuple(g.offset[0]) == (int(round((resized.height - 224) / 2.0)), int(round((resized.width - 224) / 2.0)))
    assert tuple(g.window[0]) == (0, 0, h, w) and not g.flip[0]


# ----------------------------------------------------------------------------------------------------------------
# resize


SHAPES = [(240, 187, 224, 224), (187, 240, 224, 224), (300, 200, 224, 224), (180, 180, 224, 224),
          (500, 210, 224, 224), (210, 500, 224, 224), (375, 500, 256, 341), (512, 100, 224, 224), (90, 70, 16, 16),
          (224, 224, 224, 224), (300, 224, 224, 224)]


@pytest.mark.parametrize("exact", [True, False], ids=["uint8-cpu", "float32-any-device"])
def test_resize_equals_pils_bicubic(exact):
    """Both implementations against Image.resize(BICUBIC): enlarging, shrinking, one of each (where the order of
    the passes decides up to ~20 levels), one side unchanged, nothing to do."""
    rng = np.random.default_rng(0)
    diffs = []
    for h, w, oh, ow in SHAPES:
        img = smooth_image(rng, h, w)
        if exact:
            ours = resize_bicubic(torch.from_numpy(img), torch.empty(oh, ow, 3, dtype=torch.uint8)).numpy()
        else:
            x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float()
            ours = resize_bicubic_float(x, (oh, ow)).round().clamp(0, 255)[0].permute(1, 2, 0).to(torch.uint8).numpy()
        diffs.append(differences(ours, pil_resize(img, oh, ow)))
    assert_pil_parity(diffs)


def test_pass_order_follows_the_installed_pillow():
    """Noise makes the order of the passes visible (8-bit clipping between them): ours matches PIL, the other order
    does not, in both directions."""
    rng = np.random.default_rng(1)
    for h, w, oh, ow in [(240, 187, 224, 224), (187, 240, 224, 224)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = resize_bicubic(torch.from_numpy(img), torch.empty(oh, ow, 3, dtype=torch.uint8)).numpy()
        vertical = pil_resize(pil_resize(img, oh, w), oh, ow)
        horizontal = pil_resize(pil_resize(img, h, ow), oh, ow)
        reference = pil_resize(img, oh, ow)
        other = horizontal if vertical_first(h, w, oh, ow) else vertical
        assert differences(ours, reference).max() <= 2 and differences(other, reference).max() > 8


def test_resize_reads_a_crop_view_and_writes_into_a_batch():
    img = smooth_image(np.random.default_rng(2), 120, 160)
    batch = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    resize_bicubic(torch.from_numpy(img)[10:90, 20:120], batch[1])
    assert differences(batch[1].numpy(), pil_resize(np.ascontiguousarray(img[10:90, 20:120]), 32, 32)).max() <= 1
    assert batch[0].sum() == 0 and batch[2].sum() == 0


def test_pillow_rule_depends_on_the_version(monkeypatch):
    monkeypatch.setattr(transforms, "PILLOW_VERTICAL_FIRST", False)
    assert not vertical_first(300, 200, 224, 224)
    monkeypatch.setattr(transforms, "PILLOW_VERTICAL_FIRST", True)
    assert vertical_first(300, 200, 224, 224) and not vertical_first(200, 300, 224, 224)
    assert vertical_first(240, 221, 224, 224)  # the width grows: any shrinking height goes first
    assert not vertical_first(240, 235, 224, 224)  # the height shrinks by 16, the width by 11: not twice as much
    assert not vertical_first(224, 100, 224, 224)  # height unchanged


# ----------------------------------------------------------------------------------------------------------------
# the crop-decode loader's pixels on real ImageNet files


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    jpegs = stored_imagenet_jpegs(24)
    folder = tmp_path_factory.mktemp("real") / "shards"
    write_jpeg_shards(folder, jpegs, list(range(len(jpegs))))
    return folder, jpegs


def test_train_pixels_equal_pils_bicubic_on_the_same_windows(real_shards):
    """Each image of a crop-decode batch against PIL: decode, crop the batch's window, Image.resize(BICUBIC), flip."""
    folder, jpegs = real_shards
    loader = build_loader(LoaderConfig(str(folder), batch_size=8, device="cpu", num_threads=2, seed=3))
    diffs, flipped = [], 0
    for b, batch in zip(range(3), loader, strict=False):
        prepared = loader.prepare(0, b)
        assert batch.labels.tolist() == prepared.labels.tolist()
        for k, sid in enumerate(prepared.ids):
            top, left, h, w = prepared.geometry.window[k].tolist()
            img = Image.open(io.BytesIO(jpegs[int(sid)])).convert("RGB")
            ref = np.asarray(img.crop((left, top, left + w, top + h)).resize((224, 224), BICUBIC))
            if prepared.geometry.flip[k]:
                ref, flipped = ref[:, ::-1], flipped + 1
            diffs.append(differences(batch.images[k].numpy(), ref))
    assert 0 < flipped < 24
    assert_pil_parity(diffs)


def test_eval_pixels_equal_torchvisions_eval_transform(real_shards):
    folder, jpegs = real_shards
    loader = build_loader(LoaderConfig(str(folder), batch_size=8, device="cpu", num_threads=2, train=False))
    transform = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    diffs = []
    for batch in loader:
        for k, label in enumerate(batch.labels.tolist()):  # label == index of the file
            ref = np.asarray(transform(Image.open(io.BytesIO(jpegs[label])).convert("RGB")))
            diffs.append(differences(batch.images[k].numpy(), ref))
    assert len(diffs) == len(jpegs)
    assert_pil_parity(diffs)


def test_windows_have_the_recipes_area_and_ratio_on_real_images(real_shards):
    folder, _ = real_shards
    loader = build_loader(LoaderConfig(str(folder), batch_size=8, device="cpu", num_threads=1))
    for b in range(3):
        g = loader.prepare(0, b).geometry
        area = g.window[:, 2] * g.window[:, 3]
        ratio = g.window[:, 3] / g.window[:, 2]
        assert (area > 0).all() and np.all(np.log(ratio) > math.log(3 / 4) - 0.05)
        assert np.all(np.log(ratio) < math.log(4 / 3) + 0.05)


# ----------------------------------------------------------------------------------------------------------------
# the GPU half of `--decode cpu` (resize, crop and flip with float32 torch ops on the output device), run on the CPU


@pytest.mark.parametrize("train", [True, False])
def test_device_assembly_equals_the_cpu_assembly(tmp_path, train):
    """`assemble_device` is what a CUDA output device runs; here on the CPU, against the uint8 path, on the same
    decoded windows (photo-like images of assorted sizes, so that every pass order and the eval crop occur)."""
    from pipeline.loaders.transforms import assemble_device
    from tests.conftest import jpeg_bytes

    rng = np.random.default_rng(4)
    jpegs = [jpeg_bytes(smooth_image(rng, int(h), int(w)), quality=95) for h, w in rng.integers(90, 400, (24, 2))]
    write_jpeg_shards(tmp_path / "shards", jpegs, list(range(24)), per_shard=8)
    loader = build_loader(LoaderConfig(str(tmp_path / "shards"), batch_size=8, img_size=64, device="cpu",
                                       num_threads=1, train=train))
    diffs = []
    for b in range(3):
        prepared = loader.prepare(0, b)
        crops = []
        for jpeg, (top, left, h, w) in zip(prepared.jpegs, prepared.geometry.window.tolist(), strict=True):
            crops.append(np.asarray(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))[top : top + h,
                                                                                              left : left + w].copy())
        cpu = loader.assemble(prepared, crops)
        device = assemble_device(crops, prepared.geometry, 64, torch.device("cpu"))
        assert device.shape == cpu.shape and device.dtype == torch.uint8 and device.is_contiguous()
        with ThreadPoolExecutor(2) as pool:  # the windows packed for the transfer by several threads
            assert torch.equal(assemble_device(crops, prepared.geometry, 64, torch.device("cpu"), pool), device)
        diffs.append(differences(device.numpy(), cpu.numpy()))
    assert_pil_parity(diffs)


def test_every_batch_and_epoch_draws_its_own_windows_and_flips(tmp_path):
    """Images of one size, so that only the draws tell batches apart: each (epoch, batch) has its own, and the same
    (seed, epoch, batch) always gets the same, whichever loader asks."""
    from tests.conftest import jpeg_bytes, make_image

    jpegs = [jpeg_bytes(make_image(i % 3, i, 60, 80)) for i in range(32)]
    write_jpeg_shards(tmp_path / "shards", jpegs, [i % 3 for i in range(32)], per_shard=8)
    config = LoaderConfig(str(tmp_path / "shards"), batch_size=8, img_size=32, device="cpu", num_threads=1)
    loader, again = build_loader(config), build_loader(config)

    def draws(ld, epoch, batch):
        g = ld.prepare(epoch, batch).geometry
        return g.window.tolist(), g.flip.tolist()

    seen = [draws(loader, e, b) for e in range(2) for b in range(4)]
    assert all(a != b for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert draws(again, 1, 2) == seen[4 + 2]
