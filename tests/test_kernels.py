"""Fused Triton masking kernels (model/kernels) against the reference path (model/masking.py).

Without CUDA the kernels run under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 first);
with CUDA the same parity tests run the compiled kernels, and the tests marked `gpu` add bf16 / torch.compile /
ViT-B-shape checks. Tolerances: fp32 results to 1e-5 (the paths differ only in summation order and FMA contraction);
fp16 / bf16 outputs round the same fp32 value once, so they differ by at most one unit in the last place: rtol 2**-7
(bf16) / 2**-10 (fp16). (The Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest even, also
with fp_downcast_rounding="rtne", which it implements wrongly; compiled kernels round to nearest even. One ulp
covers both.)
"""

from __future__ import annotations

import pytest
import torch

from model import create_model
from model.kernels import INTERPRETED
from model.mae import IMAGENET_MEAN, IMAGENET_STD
from model.masking import random_masking
from model.masking_ops import REFERENCE_OPS, fused_ops, masking_ops

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (compiled Triton kernels); CPU runs the interpreter")
LOW_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
FUSED_OPS = fused_ops()
SMALL = dict(img_size=32, patch_size=4, num_classes=10, depth=2, decoder_depth=2, cls_hidden=64)

assert CUDA or INTERPRETED, "conftest must set TRITON_INTERPRET=1 before model.kernels is imported"


def matrix(every: int, **axes: list) -> list:
    """pytest params for the cross product of `axes`. Under the interpreter (CPU) all of it: nothing compiles. With
    CUDA each combination is a fresh Triton compilation (about half a second), so the combinations whose index sum is
    divisible by `every`: 1/every of them, still with every value of every axis (checked here)."""
    import itertools

    names = list(axes)
    combos = list(itertools.product(*(range(len(v)) for v in axes.values())))
    if CUDA:
        combos = [c for c in combos if sum(c) % every == 0]
        for i, name in enumerate(names):
            assert {c[i] for c in combos} == set(range(len(axes[name]))), f"subset misses a value of {name}"
    return [pytest.param(*(axes[n][j] for n, j in zip(names, c, strict=True)),
                         id="-".join(_param_id(axes[n][j]) for n, j in zip(names, c, strict=True))) for c in combos]


def _param_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        return "x".join(_param_id(v) for v in value)
    return str(value)


def pixel_norm(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's uint8 normalisation: scale = 1 / (255 std), shift = -mean / std."""
    mean = torch.tensor(IMAGENET_MEAN if channels == 3 else [0.5] * channels)
    std = torch.tensor(IMAGENET_STD if channels == 3 else [0.5] * channels)
    return (1.0 / (255.0 * std)).to(DEV), (-mean / std).to(DEV)


def make_images(n: int, h: int, w: int, c: int, dtype: torch.dtype, layout: str, seed: int = 0) -> torch.Tensor:
    """(N, H, W, C) NHWC view: 'nhwc' contiguous, or 'nchw' (a contiguous NCHW tensor permuted, strided view)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, h, w, c) if layout == "nhwc" else (n, c, h, w)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if dtype == torch.uint8 else \
        torch.randn(shape, generator=g).to(dtype)
    x = x.to(DEV)
    return x if layout == "nhwc" else x.permute(0, 2, 3, 1)


def make_masking(n: int, num_patches: int, keep: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    ids_keep, mask = random_masking(torch.rand(n, num_patches, generator=g), keep)
    return ids_keep.to(DEV), mask.to(DEV)


def close(actual, expected, dtype=torch.float32, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=LOW_RTOL[dtype], atol=atol)


# ---------------------------------------------------------------------------------------------------------------- gather
GATHER_CASES = [  # (patch, channels, height, width, keep)
    (2, 1, 8, 8, 4),
    (4, 3, 16, 16, 1),
    (4, 3, 8, 16, 8),  # non-square image, every patch kept
    (8, 4, 16, 16, 3),
]


@pytest.mark.parametrize("case,in_dtype,layout", matrix(
    4, case=GATHER_CASES, in_dtype=[torch.uint8, torch.float16, torch.bfloat16, torch.float32], layout=["nhwc", "nchw"]))
def test_gather_matches_reference(case, in_dtype, layout):
    p, c, h, w, keep = case
    images = make_images(3, h, w, c, in_dtype, layout)
    ids_keep, _ = make_masking(3, (h // p) * (w // p), keep)
    scale, shift = pixel_norm(c)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = FUSED_OPS.gather_visible_patches(images, ids_keep, p, scale, shift, out_dtype)
        want = REFERENCE_OPS.gather_visible_patches(images, ids_keep, p, scale, shift, out_dtype)
        assert got.dtype == out_dtype and got.shape == want.shape == (3, keep, p * p * c) and got.is_contiguous()
        close(got, want, out_dtype)


def test_gather_int32_ids_and_inside_autograd():
    images = make_images(2, 16, 16, 3, torch.uint8, "nhwc")
    ids_keep, _ = make_masking(2, 16, 5)
    scale, shift = pixel_norm(3)
    weight = torch.randn(48, 7, device=DEV, requires_grad=True)
    rows = FUSED_OPS.gather_visible_patches(images, ids_keep.int(), 4, scale, shift, torch.float32)
    assert not rows.requires_grad
    (rows @ weight).square().sum().backward()
    ref = REFERENCE_OPS.gather_visible_patches(images, ids_keep, 4, scale, shift, torch.float32)
    close(rows, ref)
    close(weight.grad, 2 * ref.reshape(-1, 48).T @ (ref.reshape(-1, 48) @ weight.detach()), atol=1e-4)


# ------------------------------------------------------------------------------------------------------------- unshuffle
UNSHUFFLE_CASES = [  # (batch, keep, patches, width)
    (3, 4, 16, 8),
    (1, 1, 4, 12),
    (2, 16, 16, 40),  # nothing masked
    (3, 9, 36, 136),  # 37 rows > one row tile, 136 columns > one column tile
]


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16)], ids=["fp32", "bf16_x", "fp16"])
@pytest.mark.parametrize("case", UNSHUFFLE_CASES, ids=lambda c: f"n{c[0]}k{c[1]}l{c[2]}d{c[3]}")
def test_unshuffle_matches_reference_forward_and_backward(case, dtypes):
    n, keep, num_patches, d = case
    x_dtype, param_dtype = dtypes
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 1 + keep, d, generator=g).to(DEV, x_dtype)
    mt0 = torch.randn(1, 1, d, generator=g).to(DEV, param_dtype)
    pe = torch.randn(1, 1 + num_patches, d, generator=g).to(DEV, param_dtype)
    ids_keep, _ = make_masking(n, num_patches, keep)
    grad_out = torch.randn(n, 1 + num_patches, d, generator=g).to(DEV, torch.promote_types(x_dtype, param_dtype))
    results = []
    for ops in (FUSED_OPS, REFERENCE_OPS):
        x, mt = x0.clone().requires_grad_(), mt0.clone().requires_grad_()
        out = ops.unshuffle_decoder_tokens(x, ids_keep, mt, pe)
        out.backward(grad_out)
        results.append((out, x.grad, mt.grad))
    (out, gx, gmt), (ref_out, ref_gx, ref_gmt) = results
    assert out.dtype == ref_out.dtype and out.shape == (n, 1 + num_patches, d)
    # The mask token is rounded to x's dtype before the (promoted) add: one ulp of the mask token, absolute.
    close(out, ref_out, out.dtype, atol=1e-5 + LOW_RTOL[x_dtype] * mt0.abs().max().item())
    assert gx.dtype == x_dtype and gmt.dtype == param_dtype
    close(gx, ref_gx, x_dtype)
    # fp32 sums of the masked rows; the reference rounds each row to x's dtype before summing when x is 16-bit.
    close(gmt, ref_gmt, x_dtype, atol=1e-5 if x_dtype == torch.float32 else 0.05)


def test_unshuffle_compares_kept_indices_in_chunks_when_k_exceeds_one_block():
    """K = 300 kept patches > MAX_BLOCK_K (256): the kernel walks the indices in two chunks."""
    from model.kernels.unshuffle import MAX_BLOCK_K

    n, keep, num_patches, d = 2, 300, 400, 8
    assert keep > MAX_BLOCK_K
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(n, 1 + keep, d, generator=g).to(DEV)
    mt, pe = torch.randn(1, 1, d, generator=g).to(DEV), torch.randn(1, 1 + num_patches, d, generator=g).to(DEV)
    ids_keep, _ = make_masking(n, num_patches, keep)
    grads = []
    for ops in (FUSED_OPS, REFERENCE_OPS):
        x = x0.clone().requires_grad_()
        out = ops.unshuffle_decoder_tokens(x, ids_keep, mt, pe)
        out.square().sum().backward()
        grads.append((out, x.grad))
    close(grads[0][0], grads[1][0])
    close(grads[0][1], grads[1][1])


def test_unshuffle_gives_pos_embed_a_gradient_when_asked():
    ids_keep, _ = make_masking(2, 16, 4)
    x = torch.randn(2, 5, 8, device=DEV, requires_grad=True)
    mt = torch.randn(1, 1, 8, device=DEV)
    grads = []
    for ops in (FUSED_OPS, REFERENCE_OPS):
        pe = torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(0)).to(DEV).requires_grad_()
        ops.unshuffle_decoder_tokens(x, ids_keep, mt, pe).pow(2).sum().backward()
        grads.append(pe.grad)
    close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------------------------ loss
LOSS_CASES = [  # (patch, channels, batch, height, width)
    (2, 1, 3, 8, 8),
    (4, 3, 3, 16, 16),
    (4, 3, 1, 8, 16),
    (8, 4, 2, 16, 16),
]


def loss_and_grad(pred0, images, mask, patch, norm_pix, scale, shift) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(loss, grad of pred)] of the fused and the reference loss on a copy of pred0 each."""
    results = []
    for ops in (FUSED_OPS, REFERENCE_OPS):
        pred = pred0.clone().requires_grad_()
        loss = ops.masked_patch_loss(pred, images, mask, patch, norm_pix, scale, shift)
        loss.backward()
        results.append((loss, pred.grad))
    return results


@pytest.mark.parametrize("case,in_dtype,layout,norm_pix", matrix(
    4, case=LOSS_CASES, in_dtype=[torch.uint8, torch.float16, torch.bfloat16, torch.float32], layout=["nhwc", "nchw"],
    norm_pix=[True, False]))
def test_loss_matches_reference_forward_and_backward(case, in_dtype, layout, norm_pix):
    p, c, n, h, w = case
    num_patches = (h // p) * (w // p)
    images = make_images(n, h, w, c, in_dtype, layout)
    _, mask = make_masking(n, num_patches, max(1, num_patches // 4))
    scale, shift = pixel_norm(c)
    g = torch.Generator().manual_seed(5)
    for pred_dtype in (torch.float32, torch.bfloat16):
        pred0 = torch.randn(n, num_patches, p * p * c, generator=g).to(DEV, pred_dtype)
        (loss, grad), (ref_loss, ref_grad) = loss_and_grad(pred0, images, mask, p, norm_pix, scale, shift)
        assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == pred_dtype
        close(loss, ref_loss)
        close(grad, ref_grad, pred_dtype, atol=1e-7)


@pytest.mark.parametrize("input_kind", ["uint8_nhwc", "float_nchw"])
@pytest.mark.parametrize("patch", [14, 12])
def test_patch_sizes_that_are_not_powers_of_two_match_reference(patch, input_kind):
    """p = 14 / 12: the patch tile is padded to 16 rows x 64 lanes and masked (Triton tiles are powers of two)."""
    c, n, h, w = 3, 2, 2 * patch, 3 * patch
    num_patches = 6
    in_dtype, layout = (torch.uint8, "nhwc") if input_kind == "uint8_nhwc" else (torch.float32, "nchw")
    images = make_images(n, h, w, c, in_dtype, layout)
    ids_keep, mask = make_masking(n, num_patches, 2)
    scale, shift = pixel_norm(c)
    rows = [ops.gather_visible_patches(images, ids_keep, patch, scale, shift, torch.float32)
            for ops in (FUSED_OPS, REFERENCE_OPS)]
    assert rows[0].shape == (n, 2, patch * patch * c)
    close(rows[0], rows[1])
    pred0 = torch.randn(n, num_patches, patch * patch * c, generator=torch.Generator().manual_seed(6)).to(DEV)
    for norm_pix in (True, False):
        (loss, grad), (ref_loss, ref_grad) = loss_and_grad(pred0, images, mask, patch, norm_pix, scale, shift)
        close(loss, ref_loss)
        close(grad, ref_grad, atol=1e-7)


def test_model_with_patch_14_fused_equals_reference_loss_and_gradients():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8, generator=g)
    labels, noise = torch.randint(0, 10, (2,), generator=g), torch.rand(2, 4, generator=g)
    runs = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = create_model("supmae_vit_tiny_patch16", fused_masking=mode,
                             **dict(SMALL, img_size=28, patch_size=14)).to(DEV).train()
        out = model(images.to(DEV), labels.to(DEV), noise=noise.to(DEV))
        out.loss.backward()
        runs[mode] = (out.loss, {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    close(runs["on"][0], runs["off"][0])
    assert runs["on"][1].keys() == runs["off"][1].keys()
    for name, grad in runs["off"][1].items():
        torch.testing.assert_close(runs["on"][1][name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_model_config_refuses_a_patch_the_fused_kernels_cannot_hold():
    """Refused when the model is configured (not at the first GPU step); the reference path serves it."""
    from model.config import model_config

    for mode in ("auto", "on"):
        with pytest.raises(ValueError, match=r"patch_size 112 with in_chans 3 and fused_masking '" + mode
                           + r"': the fused masking kernels hold one 112x112x3 patch as a register tile of 128 x 512"
                           r" = 65536 lanes, more than the 16384 .*use fused_masking 'off'"):
            model_config("supmae_vit_tiny_patch16", img_size=224, patch_size=112, fused_masking=mode)
    assert model_config("supmae_vit_tiny_patch16", img_size=224, patch_size=112, fused_masking="off").patch_size == 112
    assert model_config("supmae_vit_tiny_patch16", img_size=256, patch_size=64).patch_size == 64


def test_loss_weights_patches_by_mask_value_and_skips_unmasked():
    images = make_images(2, 8, 8, 3, torch.uint8, "nhwc")
    scale, shift = pixel_norm(3)
    mask = torch.tensor([[0.0, 0.5, 1.0, 2.0], [1.0, 0.0, 0.25, 0.0]], device=DEV)
    pred = torch.randn(2, 4, 48, device=DEV, requires_grad=True)
    ref_pred = pred.detach().clone().requires_grad_()
    loss = FUSED_OPS.masked_patch_loss(pred, images, mask, 4, True, scale, shift)
    ref = REFERENCE_OPS.masked_patch_loss(ref_pred, images, mask, 4, True, scale, shift)
    loss.backward()
    ref.backward()
    close(loss, ref)
    close(pred.grad, ref_pred.grad)
    assert (pred.grad[mask == 0] == 0).all()
    # By design unmasked patches are not read: a NaN there leaves the loss finite (the reference's 0 * NaN is NaN).
    with torch.no_grad():
        poisoned = pred.detach().clone()
        poisoned[0, 0] = float("nan")
        assert torch.isfinite(FUSED_OPS.masked_patch_loss(poisoned, images, mask, 4, True, scale, shift))


def test_loss_is_deterministic():
    images = make_images(3, 16, 16, 3, torch.uint8, "nhwc")
    _, mask = make_masking(3, 16, 4)
    pred = torch.randn(3, 16, 48, device=DEV)
    scale, shift = pixel_norm(3)
    runs = [FUSED_OPS.masked_patch_loss(pred, images, mask, 4, True, scale, shift) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)


# ---------------------------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("input_kind", ["uint8_nhwc", "float_nchw"])
@pytest.mark.parametrize("family", ["supmae", "mae"])
def test_model_fused_equals_reference_loss_and_gradients(family, input_kind):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=g)
    if input_kind == "float_nchw":
        images = torch.randn(3, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (3,), generator=g)
    noise = torch.rand(3, 64, generator=g)
    runs = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = create_model(f"{family}_vit_tiny_patch16", fused_masking=mode, **SMALL).to(DEV).train()
        out = model(images.to(DEV), labels.to(DEV), noise=noise.to(DEV))
        out.loss.backward()
        runs[mode] = (out, {k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    (fused, fused_grads), (ref, ref_grads) = runs["on"], runs["off"]
    close(fused.loss, ref.loss)
    close(fused.rec_loss, ref.rec_loss)
    close(fused.pred, ref.pred)
    assert torch.equal(fused.mask, ref.mask)
    assert fused_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_masking_ops_switch():
    assert masking_ops("on", torch.device("cpu")) is FUSED_OPS
    assert masking_ops("auto", torch.device("cuda")) is FUSED_OPS
    assert masking_ops("auto", torch.device("cpu")) is REFERENCE_OPS
    assert masking_ops("off", torch.device("cuda")) is REFERENCE_OPS


# ------------------------------------------------------------------------------------------------ compile friendliness
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every op, as torch.compile uses them."""
    images = make_images(2, 8, 8, 3, torch.uint8, "nchw")
    ids_keep, mask = make_masking(2, 4, 2)
    scale, shift = pixel_norm(3)
    x = torch.randn(2, 3, 8, device=DEV, requires_grad=True)
    mt = torch.randn(1, 1, 8, device=DEV, requires_grad=True)
    pe = torch.randn(1, 5, 8, device=DEV)
    pred = torch.randn(2, 4, 48, device=DEV, requires_grad=True)
    ops = torch.ops.supmae
    cases = [
        (ops.gather_visible_patches.default, (images, ids_keep, 4, scale, shift, torch.bfloat16)),
        (ops.unshuffle_decoder_tokens.default, (x, ids_keep, mt, pe)),
        (ops.unshuffle_decoder_tokens_backward.default, (torch.randn(2, 5, 8, device=DEV), ids_keep, torch.float32)),
        (ops.masked_patch_loss.default, (pred, images, mask, 4, True, scale, shift)),
        (ops.masked_patch_loss_backward.default,
         (torch.tensor(1.0, device=DEV), mask.sum(), pred.detach(), images, mask, 4, True, scale, shift)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_torch_compile_traces_the_fused_ops_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager runs the AOT-autograd graph (inductor codegen is the
    CUDA test's job: on CPU it needs a C++ build of the surrounding graph, about 30 s)."""
    images = make_images(2, 16, 16, 3, torch.uint8, "nhwc")
    ids_keep, mask = make_masking(2, 16, 4)
    scale, shift = pixel_norm(3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=g).to(DEV).requires_grad_()
    mt = torch.randn(1, 1, 8, generator=g).to(DEV).requires_grad_()
    pe = torch.randn(1, 17, 8, generator=g).to(DEV)
    pred = torch.randn(2, 16, 48, generator=g).to(DEV).requires_grad_()

    def step(images, ids_keep, x, mt, pred, mask):
        rows = FUSED_OPS.gather_visible_patches(images, ids_keep, 4, scale, shift, torch.float32)
        tokens = FUSED_OPS.unshuffle_decoder_tokens(x, ids_keep, mt, pe)
        loss = FUSED_OPS.masked_patch_loss(pred, images, mask, 4, True, scale, shift)
        return rows.mean() + tokens.square().mean() + loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(images, ids_keep, x, mt, pred, mask)
    got_grads = torch.autograd.grad(got, (x, mt, pred))
    want = step(images, ids_keep, x, mt, pred, mask)
    want_grads = torch.autograd.grad(want, (x, mt, pred))
    close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        close(a, b)


def test_torch_compile_whole_model_with_fused_ops_is_one_graph():
    """The whole model (forward + AOT backward) with fused masking compiles as one graph and matches eager.
    No labels: on CPU the model's label range check reads values (a deliberate graph break there, not on CUDA)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=g).to(DEV)
    noise = torch.rand(3, 64, generator=g).to(DEV)
    torch.manual_seed(0)
    model = create_model("supmae_vit_tiny_patch16", fused_masking="on", **SMALL).to(DEV).train()
    eager = model(images, noise=noise)
    eager.loss.backward()
    eager_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images, noise=noise)
    compiled.loss.backward()
    close(compiled.loss, eager.loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------- errors
def test_launcher_errors_are_clear(monkeypatch):
    images = make_images(2, 8, 8, 3, torch.uint8, "nhwc")
    ids_keep, mask = make_masking(2, 4, 2)
    scale, shift = pixel_norm(3)
    gather, unshuffle, loss = FUSED_OPS.gather_visible_patches, FUSED_OPS.unshuffle_decoder_tokens, \
        FUSED_OPS.masked_patch_loss
    pred = torch.randn(2, 4, 48, device=DEV)
    x, mt, pe = torch.randn(2, 3, 8, device=DEV), torch.randn(1, 1, 8, device=DEV), torch.randn(1, 5, 8, device=DEV)

    with pytest.raises(ValueError, match="fused gather_visible_patches: images must be one of uint8, float16, "
                                         "bfloat16, float32, got int32"):
        gather(images.int(), ids_keep, 4, scale, shift, torch.float32)
    with pytest.raises(ValueError, match=r"images must be a 4-D NHWC view \(N, H, W, C\), got shape \(8, 8, 3\)"):
        gather(images[0], ids_keep, 4, scale, shift, torch.float32)
    with pytest.raises(ValueError, match="image size 8x8 is not a multiple of patch_size 3"):
        gather(images, ids_keep, 3, scale, shift, torch.float32)
    with pytest.raises(ValueError, match="ids_keep must be one of int32, int64, got float32"):
        gather(images, ids_keep.float(), 4, scale, shift, torch.float32)
    with pytest.raises(ValueError, match=r"ids_keep must have shape \(2, K\), got \(3, 2\)"):
        gather(images, ids_keep[[0, 1, 1]], 4, scale, shift, torch.float32)
    out_of_range = torch.tensor([[0, 4], [1, 2]], device=DEV)
    if CUDA:
        # On CUDA the values are not checked (a host sync every step); the kernel's guard gives a zero row instead
        # of reading outside the image.
        rows = gather(images, out_of_range, 4, scale, shift, torch.float32)
        assert torch.equal(rows[0, 1], torch.zeros_like(rows[0, 1]))
        close(rows[:, :1], REFERENCE_OPS.gather_visible_patches(images, out_of_range[:, :1], 4, scale, shift,
                                                                torch.float32))
    else:
        with pytest.raises(ValueError, match=r"ids_keep values must be patch indices in \[0, 4\), found \[0, 4\]"):
            gather(images, out_of_range, 4, scale, shift, torch.float32)
    with pytest.raises(ValueError, match=r"pixel_scale must hold one value per channel \(3\), got shape \(4,\)"):
        gather(images, ids_keep, 4, torch.ones(4, device=DEV), shift, torch.float32)
    with pytest.raises(ValueError, match="out_dtype must be float16, bfloat16 or float32"):
        gather(images, ids_keep, 4, scale, shift, torch.int64)
    with pytest.raises(ValueError, match="images require grad, but the fused kernels give no gradient to pixels"):
        gather(images.float().requires_grad_(), ids_keep, 4, scale, shift, torch.float32)
    with pytest.raises(ValueError, match="all tensors must be on one device, got images on meta, ids_keep on"):
        gather(images.to("meta"), ids_keep, 4, scale, shift, torch.float32)

    with pytest.raises(ValueError, match=r"fused unshuffle_decoder_tokens: mask_token must have shape \(1, 1, 8\)"):
        unshuffle(x, ids_keep, mt[..., :4], pe)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 1\+L, 8\), got \(5, 8\)"):
        unshuffle(x, ids_keep, mt, pe[0])
    with pytest.raises(ValueError, match=r"ids_keep must have shape \(2, 2\), got \(2, 1\)"):
        unshuffle(x, ids_keep[:, :1], mt, pe)
    with pytest.raises(ValueError, match="x must be one of float16, bfloat16, float32, got int64"):
        unshuffle(x.long(), ids_keep, mt, pe)
    with pytest.raises(ValueError, match=r"x must be \(N, 1\+K, D\) with the cls token first"):
        unshuffle(x[0], ids_keep, mt, pe)

    with pytest.raises(ValueError, match=r"fused masked_patch_loss: pred must have shape \(2, 4, 48\) for 8x8x3 "
                                         r"images with patch_size 4, got \(2, 4, 47\)"):
        loss(pred[..., :47], images, mask, 4, True, scale, shift)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\), got \(2, 3\)"):
        loss(pred, images, mask[:, :3], 4, True, scale, shift)
    with pytest.raises(ValueError, match="pred must be one of float16, bfloat16, float32, got int64"):
        loss(pred.long(), images, mask, 4, True, scale, shift)
    with pytest.raises(ValueError, match="mask requires grad"):
        loss(pred, images, mask.clone().requires_grad_(), 4, True, scale, shift)

    if not CUDA:  # the hint a CPU user gets when TRITON_INTERPRET was not set
        monkeypatch.setattr("model.kernels._common.INTERPRETED", False)
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors, got cpu; use fused_masking='off'"):
            gather(images, ids_keep, 4, scale, shift, torch.float32)


# ------------------------------------------------------------------------------------------------------ CUDA-only checks
@requires_cuda
@pytest.mark.gpu
def test_cuda_vit_b_shapes_match_reference():
    """The three stages at ViT-B/16 shapes (batch 32, 224x224, 49 kept of 196), bf16 as in training."""
    images = make_images(32, 224, 224, 3, torch.uint8, "nhwc")
    ids_keep, mask = make_masking(32, 196, 49)
    scale, shift = pixel_norm(3)
    rows = [ops.gather_visible_patches(images, ids_keep, 16, scale, shift, torch.bfloat16)
            for ops in (FUSED_OPS, REFERENCE_OPS)]
    close(rows[0], rows[1], torch.bfloat16)
    x = torch.randn(32, 50, 512, device=DEV, dtype=torch.bfloat16)
    mt, pe = torch.randn(1, 1, 512, device=DEV), torch.randn(1, 197, 512, device=DEV)
    close(FUSED_OPS.unshuffle_decoder_tokens(x, ids_keep, mt, pe), REFERENCE_OPS.unshuffle_decoder_tokens(x, ids_keep, mt, pe))
    pred = torch.randn(32, 196, 768, device=DEV, dtype=torch.bfloat16)
    close(FUSED_OPS.masked_patch_loss(pred, images, mask, 16, True, scale, shift),
          REFERENCE_OPS.masked_patch_loss(pred, images, mask, 16, True, scale, shift))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["supmae", "mae"])
def test_cuda_bf16_autocast_model_fused_vs_reference(family):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g).to(DEV)
    labels, noise = torch.randint(0, 10, (8,), generator=g).to(DEV), torch.rand(8, 64, generator=g).to(DEV)
    runs = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = create_model(f"{family}_vit_tiny_patch16", fused_masking=mode, **SMALL).to(DEV).train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, labels, noise=noise)
        out.loss.backward()
        runs[mode] = (out.loss.detach(), model.patch_embed.proj.weight.grad, model.mask_token.grad)
    for a, b in zip(runs["on"], runs["off"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # bf16 matmuls: the two runs round differently


@requires_cuda
@pytest.mark.gpu
def test_cuda_torch_compile_whole_model_with_fused_ops():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g).to(DEV)
    labels, noise = torch.randint(0, 10, (4,), generator=g).to(DEV), torch.rand(4, 64, generator=g).to(DEV)
    torch.manual_seed(0)
    model = create_model("supmae_vit_tiny_patch16", fused_masking="on", **SMALL).to(DEV).train()
    eager = model(images, labels, noise=noise)
    eager.loss.backward()
    eager_grad = model.mask_token.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model)(images, labels, noise=noise)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.mask_token.grad, eager_grad, rtol=1e-3, atol=1e-5)
