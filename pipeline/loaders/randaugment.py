"""RandAugment of the official fine-tuning recipe, timm's `rand-m9-mstd0.5-inc1`, for both loaders.

The official fine-tuning (MAE / SupMAE main_finetune.py `--aa rand-m9-mstd0.5-inc1`, util/datasets.py) builds it
with timm's `create_transform(..., auto_augment=args.aa, interpolation='bicubic')`, i.e. timm 0.3.2's
`rand_augment_transform(config, hparams)` with hparams translate_const = int(0.45 x size), img_mean = the ImageNet
mean pixel (124, 116, 104) and bicubic warps. Per image:

  * `num_ops` (2) operations are drawn uniformly, with replacement, from the op set: with `increasing` (inc1)
    timm's `_RAND_INCREASING_TRANSFORMS` (AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing,
    SolarizeIncreasing, SolarizeAdd, ColorIncreasing, ContrastIncreasing, BrightnessIncreasing,
    SharpnessIncreasing, ShearX, ShearY, TranslateXRel, TranslateYRel), else `_RAND_TRANSFORMS`; no Identity;
  * each drawn operation is applied with probability `prob` (0.5);
  * an applied operation draws its magnitude from N(magnitude, magnitude_std) (mstd0.5) and clips it to [0, 10];
  * the magnitude becomes the operation's argument as timm's `LEVEL_TO_ARG` maps it (`level_params`), the sign of
    rotations, shears, translations and of the increasing enhancements drawn at random (timm's `_randomly_negate`);
  * warps fill uncovered pixels with the mean pixel.

Two implementations of that one policy (`RandAugmentPolicy`):

  * DALI (`rand_augment`): custom augmentations made with DALI's `@augmentation` building block and applied with
    its `select` under conditional execution (the pipeline needs `enable_conditionals=True`); every operator has a
    CPU and a GPU implementation, so the CPU backend the tests run is the GPU graph's twin. The arguments are
    computed per sample in float64 from the continuous magnitude, exactly as timm computes them (tested against
    timm's own tables). Pixel operations are DALI's: bilinear warps (DALI's warps have no bicubic filter; timm uses
    bicubic), OpenCV's histogram equalisation (PIL's lookup table differs slightly), PIL's enhance formulas.
  * torch backend (`TimmRandAugment`): timm's own `rand_augment_transform` with the official hparams, seeded per
    sample.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.loaders.base import IMAGENET_MEAN, RANDAUG_MAX_LEVEL, LoaderConfig, derive_seed

# timm 0.3.2 timm/data/auto_augment.py `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS`, in timm's order.
TIMM_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TIMM_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's create_transform: img_mean = tuple(min(255, round(255 * x)) for x in mean) = (124, 116, 104).
MEAN_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)
TRANSLATE_PCT = 0.45  # timm's `_translate_rel_level_to_arg` default: translations up to 45% of the side
APPLY_PROB = 0.5  # timm's `rand_augment_ops(prob=0.5)`


@dataclass(frozen=True)
class RandAugmentPolicy:
    """timm's RandAugment settings: `rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc{increasing}`."""

    num_ops: int = 2
    magnitude: int = 9
    magnitude_std: float = 0.5
    increasing: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.magnitude <= RANDAUG_MAX_LEVEL:
            raise ValueError(f"RandAugment magnitude {self.magnitude} must be in [0, {RANDAUG_MAX_LEVEL}]")
        if not (self.magnitude_std >= 0 and math.isfinite(self.magnitude_std)):
            raise ValueError(f"RandAugment magnitude_std {self.magnitude_std} must be a finite number >= 0")

    @classmethod
    def from_loader_config(cls, cfg: LoaderConfig) -> RandAugmentPolicy:
        return cls(cfg.randaug_n, cfg.randaug_m, cfg.randaug_mstd, cfg.randaug_inc)

    @property
    def ops(self) -> tuple[str, ...]:
        return TIMM_INCREASING_OPS if self.increasing else TIMM_OPS

    def timm_config(self) -> str:
        """The policy as timm's config string, e.g. 'rand-m9-n2-mstd0.5-inc1'."""
        return f"rand-m{self.magnitude}-n{self.num_ops}-mstd{self.magnitude_std}-inc{int(self.increasing)}"

    def timm_hparams(self, img_size: int) -> dict[str, Any]:
        """timm's `create_transform` aa_params for `img_size` with interpolation='bicubic' (MAE's build_transform)."""
        from PIL import Image

        return {"translate_const": int(img_size * 0.45), "img_mean": MEAN_FILL, "interpolation": Image.BICUBIC}


# ----------------------------------------------------------------------------------------------------------------
# timm's magnitude -> argument mapping, on DALI nodes


def level_params(name: str, magnitude, negate) -> tuple:
    """The arguments timm's `LEVEL_TO_ARG[name]` gives for `magnitude` (a float64 node, already clipped to [0, 10])
    with the random sign `negate` (an int node, 1 = negated), in timm's order of operations, per sample in float64,
    so integer arguments (posterize bits, solarize thresholds and shifts) come out exactly as timm's; fractional
    constants (0.3, 0.45, 0.9, ...) enter DALI's arithmetic in float32 (relative error below 1e-7):

        Rotate               +-(m / 10) * 30 degrees            ShearX / ShearY       +-(m / 10) * 0.3
        TranslateX/YRel      +-(m / 10) * 0.45 of the side      SolarizeAdd           int((m / 10) * 110)
        Posterize            int((m / 10) * 4) bits kept        PosterizeIncreasing   4 - int((m / 10) * 4)
        Solarize             threshold int((m / 10) * 256)      SolarizeIncreasing    256 - int((m / 10) * 256)
        Color, Contrast, Brightness, Sharpness                  factor (m / 10) * 1.8 + 0.1
        ...Increasing                                           factor 1 +- (m / 10) * 0.9
        AutoContrast, Equalize, Invert                          none
    """
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    def c(x: float):  # a float64 operand: the arithmetic runs in float64, as Python's in timm
        return types.Constant(x, dtype=types.FLOAT64)

    def signed(x):  # timm's _randomly_negate
        return x * (1 - 2 * negate)

    def to_int(x):  # Python's int() of a non-negative float
        return dmath.floor(x)

    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    level = magnitude / c(RANDAUG_MAX_LEVEL)
    base = name.removesuffix("Increasing")
    increasing = name.endswith("Increasing")
    if name == "Rotate":
        return (signed(level * c(30.0)),)
    if name in ("ShearX", "ShearY"):
        return (signed(level * c(0.3)),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (signed(level * c(TRANSLATE_PCT)),)
    if base == "Posterize":
        bits = to_int(level * c(4.0))
        return (c(4.0) - bits if increasing else bits,)
    if base == "Solarize":
        threshold = to_int(level * c(256.0))
        return (c(256.0) - threshold if increasing else threshold,)
    if name == "SolarizeAdd":
        return (to_int(level * c(110.0)),)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        if increasing:
            return (c(1.0) + signed(level * c(0.9)),)
        return (level * c(1.8) + c(0.1),)
    raise ValueError(f"unknown RandAugment operation {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# The operations, as DALI auto_aug augmentations


def _on_device_of(data, node):
    """`node` (a per-sample CPU value) where `data` lives, for arithmetic with it."""
    return node.gpu() if data.device == "gpu" else node


def _warp(data, matrix: list, fill: tuple[int, int, int]):
    """PIL's `Image.transform(size, AFFINE, matrix, fillcolor=fill)`: output pixel (x, y) samples the input at
    matrix . (x, y, 1) (pixel centres), bilinear. DALI fills with one scalar; warping the image minus the fill
    colour with fill 0 and adding it back fills each channel with its own value (the weights sum to 1)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    mean = types.Constant(np.asarray(fill, np.float32), device=data.device)
    shifted = fn.cast(data, dtype=types.FLOAT) - mean
    m = fn.reshape(fn.cast(fn.stack(*matrix), dtype=types.FLOAT), shape=[2, 3])
    warped = fn.warp_affine(shifted, matrix=m, fill_value=0.0, inverse_map=True, interp_type=types.INTERP_LINEAR)
    return fn.cast(warped + mean, dtype=types.UINT8)


def _geometric(name: str, data, param, fill, shape):
    import nvidia.dali.math as dmath

    h, w = shape
    zero, one = param * 0, param * 0 + 1
    if name == "ShearX":
        matrix = [one, param, zero, zero, one, zero]
    elif name == "ShearY":
        matrix = [one, zero, zero, param, one, zero]
    elif name == "TranslateXRel":
        matrix = [one, zero, param * w, zero, one, zero]
    elif name == "TranslateYRel":
        matrix = [one, zero, zero, zero, one, param * h]
    else:  # Rotate: PIL's Image.rotate(degrees) about the centre, counter-clockwise
        a = -param * (math.pi / 180)
        cos, sin = dmath.cos(a), dmath.sin(a)
        cx, cy = w / 2, h / 2
        matrix = [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]
    return _warp(data, matrix, fill)


def _pixelwise(name: str, data, param):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.auto_aug import augmentations as dali_aug

    base = name.removesuffix("Increasing")
    if base == "AutoContrast":
        return dali_aug.auto_contrast.op(data, None)
    if base == "Equalize":
        return fn.equalize(data)
    if base == "Invert":
        return dali_aug.invert.op(data, None)
    if base == "Posterize":  # PIL: keep the `bits` most significant bits (0 bits: black, as in timm)
        masks = types.Constant(np.array([(0xFF << (8 - b)) & 0xFF for b in range(9)], np.uint8), device=data.device)
        return data & masks[fn.cast(param, dtype=types.INT32)]
    if base == "Solarize":  # PIL: invert the pixels >= threshold (256: none)
        return dali_aug.solarize.op(data, _on_device_of(data, fn.cast(param, dtype=types.INT32)))
    if base == "SolarizeAdd":  # timm: pixels < 128 get + add (at most 127 + 110: no overflow)
        return dali_aug.solarize_add.op(data, _on_device_of(data, fn.cast(param, dtype=types.UINT8)))
    factor = fn.cast(param, dtype=types.FLOAT)
    if base == "Color":  # PIL: blend with the luma grey (0.299, 0.587, 0.114)
        return fn.saturation(data, saturation=factor)
    if base == "Contrast":  # PIL: blend with the mean luma
        return dali_aug.contrast.op(data, factor)
    if base == "Brightness":  # PIL: blend with black
        return fn.brightness(data, brightness=factor)
    if base == "Sharpness":  # PIL: blend with its SMOOTH filter, (1 - f) * smooth + f * identity
        smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
        ident = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
        kernel = types.Constant(smooth) * (1 - factor) + types.Constant(ident) * factor
        return fn.filter(data, _on_device_of(data, kernel), border="clamp")
    raise ValueError(f"unknown RandAugment operation {name!r}")


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def dali_augmentation(name: str):
    """The timm operation `name` as a DALI auto_aug augmentation. Called as aug(images, magnitude=..., negate=...,
    fill=..., shape=...) with per-sample magnitude (float64, clipped) and negate (int) nodes."""
    from nvidia.dali.auto_aug.core import augmentation

    def apply(data, _, magnitude, negate, fill, shape):
        params = level_params(name, magnitude, negate)
        if name in GEOMETRIC:
            return _geometric(name, data, params[0], fill, shape)
        return _pixelwise(name, data, params[0] if params else None)

    apply.__name__ = name
    return augmentation(apply, name=name)


class Draws(NamedTuple):
    """One image's random choices, (num_ops,) each: op index, applied (bool), magnitude (float64, clipped to
    [0, 10]), negate (int32, 1 = the argument's sign flipped)."""

    op: Any
    applied: Any
    magnitude: Any
    negate: Any


def draw(policy: RandAugmentPolicy, seed: int) -> Draws:
    """The per-sample random choices of `policy` (DALI random operators, checkpointable), seeded from `seed`."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    n = (policy.num_ops,)
    op = fn.random.uniform(values=list(range(len(policy.ops))), shape=n, dtype=types.INT32,
                           seed=derive_seed(seed, "op"))
    applied = fn.random.coin_flip(probability=APPLY_PROB, shape=n, dtype=types.BOOL, seed=derive_seed(seed, "apply"))
    if policy.magnitude_std > 0:
        magnitude = fn.random.normal(mean=float(policy.magnitude), stddev=policy.magnitude_std, shape=n,
                                     dtype=types.FLOAT64, seed=derive_seed(seed, "magnitude"))
    else:
        magnitude = fn.cast(fn.constant(fdata=[float(policy.magnitude)] * policy.num_ops, shape=list(n)),
                            dtype=types.FLOAT64)
    magnitude = dmath.clamp(magnitude, 0.0, float(RANDAUG_MAX_LEVEL))  # timm: min(10, max(0, m))
    negate = fn.random.coin_flip(probability=0.5, shape=n, dtype=types.INT32, seed=derive_seed(seed, "negate"))
    return Draws(op, applied, magnitude, negate)


def apply_draws(images, policy: RandAugmentPolicy, draws: Draws, shape: tuple[int, int]):
    """`images` (HWC uint8, `shape` (H, W)) with the operations `draws` chose applied in turn. Needs a pipeline
    with `enable_conditionals=True`: each layer runs only where it was drawn to apply, and `select` splits those
    samples among the operations."""
    from nvidia.dali.auto_aug.core import select

    ops = [dali_augmentation(name) for name in policy.ops]
    for layer in range(policy.num_ops):
        if draws.applied[layer]:
            images = select(ops, draws.op[layer], images, magnitude=draws.magnitude[layer],
                            negate=draws.negate[layer], fill=MEAN_FILL, shape=shape)
    return images


def rand_augment(images, policy: RandAugmentPolicy, shape: tuple[int, int], seed: int):
    """timm's RandAugment `policy` on a batch of (H, W, 3) uint8 images of size `shape`, CPU or GPU."""
    return apply_draws(images, policy, draw(policy, seed), shape)


# ----------------------------------------------------------------------------------------------------------------
# The torch backend: timm's own transform


@contextlib.contextmanager
def seeded_python_rngs(seed: int) -> Iterator[None]:
    """Python's `random` and numpy's global RNG (timm's RandAugment draws from both) seeded with `seed`, and put
    back afterwards, so a caller's streams are untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize as it ran with the Pillow of its time: 0 bits kept is a black image (Pillow >= 10 refuses
    bits=0, so timm's own op fails whenever PosterizeIncreasing's magnitude reaches 10)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


class TimmRandAugment:
    """timm's `rand_augment_transform(policy, official hparams)` on PIL images, seeded per sample."""

    def __init__(self, policy: RandAugmentPolicy, img_size: int):
        from timm.data.auto_augment import rand_augment_transform

        self.policy = policy
        self.transform = rand_augment_transform(policy.timm_config(), policy.timm_hparams(img_size))
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def __call__(self, img, seed: int):
        with seeded_python_rngs(seed):
            return self.transform(img)
