"""RandAugment against timm's definitions (the official fine-tuning's rand-m9-mstd0.5-inc1): op sets, magnitudes and
their mapping to arguments, probabilities, fill, and the pixels of every DALI operation against timm's PIL ones.
DALI runs on its CPU backend (the GPU graph is the same)."""

from __future__ import annotations

import random
from unittest import mock

import numpy as np
import pytest
import timm.data.auto_augment as taa
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN

from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.randaugment import (
    APPLY_PROB,
    MEAN_FILL,
    TIMM_INCREASING_OPS,
    TIMM_OPS,
    TRANSLATE_PCT,
    Draws,
    RandAugmentPolicy,
    TimmRandAugment,
    apply_draws,
    draw,
    level_params,
)

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("one_thread")
S = 48


def timm_args(name: str, magnitude: float, negate: bool) -> tuple:
    """timm's LEVEL_TO_ARG with its random sign forced (`_randomly_negate` negates when random() > 0.5)."""
    level = taa.LEVEL_TO_ARG[name]
    if level is None:
        return ()
    with mock.patch.object(taa.random, "random", return_value=0.9 if negate else 0.1):
        return level(magnitude, {})


def test_policy_is_timms_rand_m9_mstd05_inc1():
    assert TIMM_INCREASING_OPS == tuple(taa._RAND_INCREASING_TRANSFORMS)
    assert TIMM_OPS == tuple(taa._RAND_TRANSFORMS)
    assert "Identity" not in TIMM_INCREASING_OPS and {"Invert", "SolarizeAdd"} <= set(TIMM_INCREASING_OPS)
    # timm's create_transform: img_mean = round(255 * ImageNet mean)
    assert MEAN_FILL == tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN) == (124, 116, 104)
    assert abs(taa.LEVEL_TO_ARG["TranslateXRel"](10, {})[0]) == TRANSLATE_PCT == 0.45
    # The defaults everywhere are the official string; timm parses our policy into the same transform.
    policy = RandAugmentPolicy.from_loader_config(LoaderConfig("d", 4, augment="finetune"))
    assert policy == RandAugmentPolicy() == RandAugmentPolicy(2, 9, 0.5, True)
    ours = TimmRandAugment(policy, 224).transform
    official = taa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(policy.timm_hparams(224)))
    assert ours.num_layers == official.num_layers == 2 and ours.choice_weights is official.choice_weights is None
    for a, b in zip(ours.ops, official.ops, strict=True):
        assert (a.name, a.prob, a.magnitude, a.magnitude_std) == (b.name, b.prob, b.magnitude, b.magnitude_std)
        assert a.kwargs == b.kwargs == {"fillcolor": (124, 116, 104), "resample": Image.BICUBIC}
        assert a.prob == APPLY_PROB == 0.5 and a.magnitude_std == 0.5
    assert [op.name for op in ours.ops] == list(policy.ops)
    assert [op.name for op in TimmRandAugment(RandAugmentPolicy(increasing=False), 224).transform.ops] == list(TIMM_OPS)


def _run(pipeline_fn, batch_size: int, conditionals: bool = False):
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(pipeline_fn, batch_size=batch_size, num_threads=1, device_id=None, seed=1,
                        enable_conditionals=conditionals)()
    pipe.build()
    return [[np.asarray(t) for t in out] for out in pipe.run()]


def test_dali_arguments_equal_timms_level_to_arg():
    """Every operation's argument, computed per sample in the DALI graph, equals timm's for the same magnitude and
    sign: integers exactly (posterize bits, solarize thresholds, solarize-add shifts), floats to 1e-7 (DALI keeps
    fractional constants such as 0.9 in float32)."""
    import nvidia.dali.fn as fn

    mags = [0.0, 0.25, 2.5, 3.3, 5.0, 7.5, 8.7, 9.0, 9.499, 9.5, 9.999, 10.0]
    grid = [(m, neg) for m in mags for neg in (0, 1)]
    names = list(dict.fromkeys(TIMM_INCREASING_OPS + TIMM_OPS))
    with_args = [n for n in names if taa.LEVEL_TO_ARG[n] is not None]

    def pipe():
        m = fn.external_source(source=lambda: [np.array(g[0], np.float64) for g in grid])
        neg = fn.external_source(source=lambda: [np.array(g[1], np.int32) for g in grid])
        return tuple(level_params(n, m, neg)[0] for n in with_args)

    outs = _run(pipe, len(grid))
    for name, values in zip(with_args, outs, strict=True):
        for (m, neg), got in zip(grid, values, strict=True):
            (want,) = timm_args(name, m, bool(neg))
            if isinstance(want, int):
                assert float(got) == want, (name, m, neg, float(got), want)
            else:
                assert float(got) == pytest.approx(want, rel=1e-7, abs=1e-7), (name, m, neg, float(got), want)
    assert {n: level_params(n, None, None) for n in names if taa.LEVEL_TO_ARG[n] is None} == {
        "AutoContrast": (), "Equalize": (), "Invert": ()}


def _opencv_equalize(img: np.ndarray) -> np.ndarray:
    """DALI's equalize (OpenCV's formula, per channel); PIL's differs (its integer step), a documented difference."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        h = np.bincount(ch.ravel(), minlength=256)
        cdf = np.cumsum(h)
        cmin = cdf[h > 0][0]
        out[..., c] = np.clip(np.round((cdf - cmin) * 255.0 / (ch.size - cmin)), 0, 255).astype(np.uint8)[ch]
    return out


def test_dali_operations_match_timms_pil_operations():
    """Each DALI operation, applied with a given magnitude and sign, against timm's PIL operation with the same
    argument (bilinear, as DALI's warps): the colour operations to rounding, the warps to a few border pixels
    (interpolation at the fill edge), so a wrong direction, sign, centre or fill would show."""
    import nvidia.dali.fn as fn

    yy, xx = np.mgrid[0:S, 0:S]
    img = np.stack([xx * 5, yy * 5, (xx + yy) * 2], -1) + 60 * np.sin(xx / 5.0)[..., None] + 40 * np.cos(
        yy / 7.0)[..., None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    for increasing in (True, False):
        policy = RandAugmentPolicy(num_ops=1, increasing=increasing)
        cases = [(k, m, neg) for k in range(len(policy.ops)) for m in (3.3, 9.0, 10.0) for neg in (0, 1)]

        def pipe(cases=cases, policy=policy):
            x = fn.external_source(source=lambda: [img] * len(cases), layout="HWC")
            op = fn.external_source(source=lambda: [np.array([c[0]], np.int32) for c in cases])
            applied = fn.external_source(source=lambda: [np.array([True]) for _ in cases])
            mag = fn.external_source(source=lambda: [np.array([c[1]], np.float64) for c in cases])
            neg = fn.external_source(source=lambda: [np.array([c[2]], np.int32) for c in cases])
            return apply_draws(x, policy, Draws(op, applied, mag, neg), (S, S))

        (outs,) = _run(pipe, len(cases), conditionals=True)
        for (k, m, neg), got in zip(cases, outs, strict=True):
            name = policy.ops[k]
            args = timm_args(name, m, bool(neg))
            if name == "Equalize":
                want = _opencv_equalize(img)
            elif name.startswith("Posterize") and args[0] == 0:
                want = np.zeros_like(img)  # 0 bits kept: black (Pillow >= 10 refuses the call)
            else:
                want = np.asarray(taa.NAME_TO_OP[name](Image.fromarray(img), *args, fillcolor=MEAN_FILL,
                                                       resample=Image.BILINEAR))
            d = np.abs(got.astype(int) - want.astype(int))
            what = f"{name} m={m} negate={neg}: mean {d.mean():.2f}, max {d.max()}"
            if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Sharpness",
                        "SharpnessIncreasing"):
                assert d.mean() < 1.5 and (d > 2).mean() < 0.05, what
            else:
                assert d.max() <= (0 if name in ("AutoContrast", "Equalize", "Invert") or "olarize" in name
                                   or "osterize" in name else 2), what
    # the fill: a full translation to the left uncovers the right 45% with the mean pixel, exactly
    policy = RandAugmentPolicy(num_ops=1)

    def shifted():
        x = fn.external_source(source=lambda: [img], layout="HWC")
        one = [np.array([policy.ops.index("TranslateXRel")], np.int32)]
        return apply_draws(x, policy, Draws(fn.external_source(source=lambda: one),
                                            fn.external_source(source=lambda: [np.array([True])]),
                                            fn.external_source(source=lambda: [np.array([10.0])]),
                                            fn.external_source(source=lambda: [np.array([0], np.int32)])), (S, S))

    (out,) = _run(shifted, 1, conditionals=True)[0]
    uncovered = out[:, S - int(0.45 * S) + 1:]
    assert (uncovered == np.array(MEAN_FILL, np.uint8)).all()


def test_draws_follow_timms_probabilities():
    """Per layer: the operation uniform over the 15 (with replacement), applied with probability 0.5, magnitude
    N(9, 0.5) clipped to [0, 10], sign flipped with probability 0.5."""
    n = 3000
    policy = RandAugmentPolicy()
    outs = _run(lambda: tuple(draw(policy, seed=3)), n)
    op, applied, magnitude, negate = (np.stack(o) for o in outs)
    assert op.shape == applied.shape == magnitude.shape == negate.shape == (n, 2)
    draws = 2 * n
    tol = 5 * np.sqrt(0.25 / draws)
    assert abs(applied.mean() - APPLY_PROB) < tol and abs(negate.mean() - 0.5) < tol
    counts = np.bincount(op.ravel(), minlength=15)
    assert len(counts) == 15 and counts.min() > 0
    expected = draws / 15
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    assert magnitude.dtype == np.float64 and magnitude.min() >= 0 and magnitude.max() == 10.0  # clipped at 10
    assert abs(magnitude.mean() - 9.0) < 0.05 and 0.45 < magnitude.std() < 0.52
    assert abs((magnitude == 10.0).mean() - 0.0228) < 0.01  # P(N(9, 0.5) >= 10)
    assert len(np.unique(op[:, 0] * 100 + op[:, 1])) > 200  # the two layers draw independently
    fixed = _run(lambda: tuple(draw(RandAugmentPolicy(magnitude_std=0.0), seed=3)), 8)[2]
    assert all((m == 9.0).all() for m in fixed)  # mstd 0: the magnitude itself


def test_timm_backend_is_seeded_leaves_global_rngs_alone_and_survives_posterize_zero():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    aug = TimmRandAugment(RandAugmentPolicy(), 32)
    random.seed(123)
    np.random.seed(123)
    state = (random.getstate(), np.random.get_state()[1].copy())
    a, b = np.asarray(aug(img, 7)), np.asarray(aug(img, 7))
    assert np.array_equal(a, b)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert any(not np.array_equal(np.asarray(aug(img, s)), a) for s in range(8, 12))
    # PosterizeIncreasing at magnitude 10 keeps 0 bits: timm 0.3.2 + the Pillow of its time gave a black image
    (op,) = [op for op in TimmRandAugment(RandAugmentPolicy(magnitude=10, magnitude_std=0.0), 32).transform.ops
             if op.name == "PosterizeIncreasing"]
    op.prob = 1.0
    assert not np.asarray(op(img)).any()


def test_loader_config_randaugment_fields():
    cfg = LoaderConfig("d", 4, augment="finetune", randaug_mstd=0.0, randaug_inc=False)
    assert RandAugmentPolicy.from_loader_config(cfg).ops == TIMM_OPS
    assert cfg.result_fingerprint()["randaug_mstd"] == 0.0
    assert "randaug_mstd" not in LoaderConfig("d", 4).result_fingerprint()  # pre-training loaders: unchanged
    with pytest.raises(ValueError, match=r"randaug_mstd=-1 is invalid: a number >= 0"):
        LoaderConfig("d", 4, randaug_mstd=-1)
    from train.eval.finetune import PROTOCOL, FinetuneConfig

    ft = FinetuneConfig(data="d", eval_data="v", ckpt="x.pth", randaug_mstd=0.25, randaug_inc=False)
    assert PROTOCOL.train_augment(ft) == {"augment": "finetune", "randaug_n": 2, "randaug_m": 9,
                                          "randaug_mstd": 0.25, "randaug_inc": False}
    default = FinetuneConfig(data="d", eval_data="v", ckpt="x.pth")
    assert (default.randaug_n, default.randaug_m, default.randaug_mstd, default.randaug_inc) == (2, 9, 0.5, True)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (DALI's GPU operators); the "
                    "CPU tests above run the same graph on DALI's CPU backend")
def test_gpu_graph_equals_the_cpu_graph():
    """The same draws on the GPU backend give the CPU backend's pixels (to rounding)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in range(30)]
    policy = RandAugmentPolicy()
    cases = [(k % 15, (k * 7) % 15, 5 + k % 6, k % 2) for k in range(30)]

    def outputs(gpu: bool):
        @pipeline_def(batch_size=30, num_threads=1, device_id=0, seed=1, enable_conditionals=True)
        def pipe():
            x = fn.external_source(source=lambda: imgs, layout="HWC")
            op = fn.external_source(source=lambda: [np.array(c[:2], np.int32) for c in cases])
            applied = fn.external_source(source=lambda: [np.array([True, True]) for _ in cases])
            mag = fn.external_source(source=lambda: [np.array([c[2], c[2]], np.float64) for c in cases])
            neg = fn.external_source(source=lambda: [np.array([c[3], 1 - c[3]], np.int32) for c in cases])
            return apply_draws(x.gpu() if gpu else x, policy, Draws(op, applied, mag, neg), (S, S))

        p = pipe()
        p.build()
        (out,) = p.run()
        return [np.asarray(t) for t in (out.as_cpu() if gpu else out)]

    for (k, _, m, neg), a, b in zip(cases, outputs(False), outputs(True), strict=True):
        d = np.abs(a.astype(int) - b.astype(int))
        assert d.mean() < 1.0 and (d > 2).mean() < 0.02, (policy.ops[k], m, neg, d.mean())
