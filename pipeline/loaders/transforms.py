"""The recipe's image geometry and its antialiased bicubic resize on torch tensors, equal to PIL's within rounding.

Shared by the loaders that decode on CPU threads (`pipeline.loaders.crop_decode`, `pipeline.loaders.torch_loader`):

* `train_geometry`: torchvision's `RandomResizedCrop.get_params` (10 attempts of area in `random_area` and log-uniform
  aspect ratio in `random_aspect_ratio`, then the central fallback) vectorised over a batch, plus a coin flip per
  sample, from one generator per batch.
* `eval_geometry`: torchvision's `Resize(int(S / crop_ratio))` output size and `CenterCrop(S)` offsets, exactly.
* `resize_bicubic`: PIL's `Image.resize(..., BICUBIC)` (Keys cubic a = -0.5, support scaled by the reduction, two
  separable passes rounded to 8 bits in between). On the CPU it runs torch's uint8 kernel, a port of Pillow's
  fixed-point code (AVX2; 3-5x faster than Pillow itself), called with an `out=` tensor so that the result is
  written channels-last straight into the batch: `F.interpolate` returns the uint8 result channels-first, which
  costs a repack inside and a transposing copy after, twice the time of the resize. On other devices
  (`--decode cpu` on a GPU machine) the same passes run in float32, each rounded and clamped to 0..255 as Pillow's
  8-bit passes are (ties to even where Pillow rounds them up: a level apart on exact ties, which are rare).

Parity with PIL: torch's kernel quantises the filter weights to 15 bits, Pillow to 22, so about 0.3% of the pixels
differ by 1 and about one in a million by 2 (measured on 300 real ImageNet crops; tests/test_loader_transforms.py).
The order of the passes matters more: where one pass enlarges and the other shrinks, the 8-bit clipping between
them changes pixels by up to ~20 levels. Pillow always ran the horizontal pass first until 13.0, which runs the
vertical pass first when the height shrinks by more than twice as many pixels as the width
(python-pillow/Pillow#9549); `resize_bicubic` follows the installed Pillow's rule.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD

RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


def _pillow_major() -> int:
    try:
        import PIL

        return int(PIL.__version__.split(".")[0])
    except (ImportError, ValueError):
        return 0


# Pillow >= 13 runs the vertical pass first when the height shrinks much more than the width.
PILLOW_VERTICAL_FIRST = _pillow_major() >= 13


def vertical_first(h: int, w: int, out_h: int, out_w: int) -> bool:
    """Whether PIL resizes (h, w) -> (out_h, out_w) vertically first (see the module docstring)."""
    return PILLOW_VERTICAL_FIRST and out_h < h and h - out_h > 2 * (w - out_w)


# ----------------------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class BatchGeometry:
    """Per sample of a batch: which source region is decoded, the size it is resized to, where the S x S output
    sits inside the resized region, and whether it is mirrored. All (B, ...) int64 arrays, `flip` bool."""

    window: np.ndarray  # (B, 4) top, left, height, width in the source image
    resize: np.ndarray  # (B, 2) height, width of the resized window
    offset: np.ndarray  # (B, 2) top, left of the output in the resized window
    flip: np.ndarray  # (B,) bool

    def __len__(self) -> int:
        return len(self.window)


def crop_windows(heights: np.ndarray, widths: np.ndarray, area: tuple[float, float], ratio: tuple[float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """(B, 4) int64 windows (top, left, height, width): torchvision's RandomResizedCrop.get_params per sample.

    Each sample tries RRC_ATTEMPTS (area fraction, log aspect ratio) draws and takes the first window that fits;
    when none fits, the central crop with the ratio clamped to `ratio`. Python's round (half to even) as
    torchvision's `int(round(...))`.
    """
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    n = len(h)
    target = (h * w)[:, None] * rng.uniform(area[0], area[1], (n, RRC_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, RRC_ATTEMPTS)))
    cw = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(n), first]
    ch, cw = ch[np.arange(n), first], cw[np.arange(n), first]
    u = rng.random((n, 2))
    top = np.floor(u[:, 0] * (h - ch + 1)).astype(np.int64)
    left = np.floor(u[:, 1] * (w - cw + 1)).astype(np.int64)
    if not found.all():
        in_ratio = w / h
        fw = np.where(in_ratio > ratio[1], np.rint(h * ratio[1]), w).astype(np.int64)
        fh = np.where(in_ratio < ratio[0], np.rint(w / ratio[0]), h).astype(np.int64)
        ch, cw = np.where(found, ch, fh), np.where(found, cw, fw)
        top = np.where(found, top, (h - ch) // 2)
        left = np.where(found, left, (w - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1)


def train_geometry(heights: np.ndarray, widths: np.ndarray, size: int, area: tuple[float, float],
                   ratio: tuple[float, float], rng: np.random.Generator) -> BatchGeometry:
    """RandomResizedCrop(size, area, ratio) windows resized to size x size, and a fair coin for the flip."""
    window = crop_windows(heights, widths, area, ratio, rng)
    n = len(window)
    return BatchGeometry(window, np.full((n, 2), size, np.int64), np.zeros((n, 2), np.int64), rng.random(n) < 0.5)


def eval_geometry(heights: np.ndarray, widths: np.ndarray, resize: int, size: int) -> BatchGeometry:
    """torchvision Resize(resize) (shorter side; the longer int(resize * long / short)) + CenterCrop(size)."""
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    short, long = np.minimum(h, w), np.maximum(h, w)
    new_long = np.floor(resize * long / short).astype(np.int64)  # float64 division, as Python's int(a * b / c)
    out_h = np.where(w <= h, new_long, resize)
    out_w = np.where(w <= h, resize, new_long)
    # torchvision CenterCrop: int(round((side - size) / 2.0)), Python's round half to even = np.rint.
    top = np.rint((out_h - size) / 2.0).astype(np.int64)
    left = np.rint((out_w - size) / 2.0).astype(np.int64)
    n = len(h)
    window = np.stack([np.zeros(n, np.int64), np.zeros(n, np.int64), h, w], axis=1)
    return BatchGeometry(window, np.stack([out_h, out_w], axis=1), np.stack([top, left], axis=1), np.zeros(n, bool))


# ----------------------------------------------------------------------------------------------------------------
# resize


# The kernel F.interpolate(mode="bicubic", antialias=True) calls, without its Python wrapper (about 20 us a call)
# and with an `out=` form. Arguments: input (N, C, H, W), output size, align_corners, scale_h, scale_w (None: from
# the sizes, as PIL: in / out).
_AA_BICUBIC = torch._C._nn._upsample_bicubic2d_aa


def resize_bicubic(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic resize of `src` (h, w, 3) uint8 into `out` (oh, ow, 3) uint8, both on the CPU; returns `out`.

    `out` must be contiguous (an image of a batch, `batch[k]`); `src` may be a view (a crop of a larger image).
    """
    h, w = src.shape[:2]
    oh, ow = out.shape[:2]
    x = src.permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last strides
    if vertical_first(h, w, oh, ow):
        mid = torch.empty(1, oh, w, 3, dtype=torch.uint8)
        _AA_BICUBIC(x, [oh, w], False, None, None, out=mid.permute(0, 3, 1, 2))
        x = mid.permute(0, 3, 1, 2)
    _AA_BICUBIC(x, [oh, ow], False, None, None, out=out.unsqueeze(0).permute(0, 3, 1, 2))
    return out


def resize_bicubic_float(x: torch.Tensor, out_hw: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """The same resize in float32 on any device: (1, 3, h, w) holding integers 0..255 -> (1, 3, oh, ow), written to
    `out` when given. Pillow's passes in Pillow's order; the first is rounded and clamped to 0..255 as Pillow's 8-bit
    intermediate image is, the last is left for the caller to round (once for a whole batch).
    """
    h, w = x.shape[2:]
    oh, ow = out_hw
    first = (oh, w) if vertical_first(h, w, oh, ow) else (h, ow)
    if first not in ((h, w), (oh, ow)):
        x = _AA_BICUBIC(x, list(first), False, None, None).round_().clamp_(0, 255)
    if (h, w) == (oh, ow) or tuple(x.shape[2:]) == (oh, ow):
        return x if out is None else out.copy_(x)
    if out is None:
        return _AA_BICUBIC(x, [oh, ow], False, None, None)
    return _AA_BICUBIC(x, [oh, ow], False, None, None, out=out)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> float16 normalised with the ImageNet mean and std (as DALI's crop_mirror_normalize)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device) * 255
    return ((images.float() - mean) / std).half()


def assemble_cpu(crops: list[torch.Tensor], geometry: BatchGeometry, size: int, out: torch.Tensor,
                 indices: range | list[int]) -> None:
    """Resize, crop and flip `crops[k]` (h, w, 3) uint8 into `out[k]` (size, size, 3) for k in `indices` (CPU)."""
    resize, offset, flip = geometry.resize.tolist(), geometry.offset.tolist(), geometry.flip.tolist()
    images = out.unbind(0)
    for k in indices:
        (rh, rw), (top, left), dst = resize[k], offset[k], images[k]
        if rh == rw == size:
            resize_bicubic(crops[k], dst)
        else:
            resized = resize_bicubic(crops[k], torch.empty(rh, rw, 3, dtype=torch.uint8))
            dst.copy_(resized[top : top + size, left : left + size])
        if flip[k]:
            dst.copy_(dst.flip(1))


def assemble_device(crops: list[np.ndarray], geometry: BatchGeometry, size: int, device: torch.device,
                    pool: Executor | None = None) -> torch.Tensor:
    """(B, size, size, 3) uint8 on `device` (a GPU for `--decode cpu`; any device in the tests) from the decoded
    windows `crops` (h, w, 3) uint8: packed into one (pinned) buffer (by `pool`'s threads when given), moved in one
    transfer, resized, cropped and flipped there with `resize_bicubic_float`.

    Kernels: 2-4 per image (first pass, its rounding, last pass into the batch; eval adds the crop copy), then a few
    for the whole batch (rounding, flips, layout, uint8).
    """
    n = len(crops)
    starts = np.concatenate([[0], np.cumsum([c.size for c in crops])])
    staging = torch.empty(int(starts[-1]), dtype=torch.uint8, pin_memory=device.type == "cuda")
    packed = staging.numpy()

    def pack(indices) -> None:
        for k in indices:
            packed[starts[k] : starts[k + 1]] = crops[k].reshape(-1)  # numpy copies without holding the GIL
    if pool is None:
        pack(range(n))
    else:
        list(pool.map(pack, np.array_split(np.arange(n), max(1, n // 16))))  # tasks of ~16 images
    flat = staging.to(device, non_blocking=True).float()
    batch = torch.empty(n, 3, size, size, dtype=torch.float32, device=device)
    resize, offset = geometry.resize.tolist(), geometry.offset.tolist()
    for k, (c, chunk) in enumerate(zip(crops, flat.split(np.diff(starts).tolist()), strict=True)):
        h, w = c.shape[:2]
        x = chunk.as_strided((1, 3, h, w), (h * w * 3, 1, w * 3, 3))  # the HWC window as channels-last NCHW
        (rh, rw), (top, left) = resize[k], offset[k]
        if rh == rw == size:
            resize_bicubic_float(x, (rh, rw), out=batch[k : k + 1])
        else:
            batch[k].copy_(resize_bicubic_float(x, (rh, rw))[0, :, top : top + size, left : left + size])
    batch = batch.round_().clamp_(0, 255)
    flip = np.flatnonzero(geometry.flip)
    if len(flip):
        index = torch.as_tensor(flip, device=device)
        batch[index] = batch[index].flip(3)
    return batch.permute(0, 2, 3, 1).to(torch.uint8).contiguous()
