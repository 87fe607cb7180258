"""The SupMAE / MAE model against a straightforward reimplementation of the original code, and its contracts."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import (
    MODEL_PRESETS,
    create_model,
    export_timm_encoder,
    infer_config,
    list_models,
    load_checkpoint,
    model_config,
    timm_vit_kwargs,
)
from model.mae import IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoderViT

SMALL = dict(img_size=32, patch_size=4, num_classes=10, depth=2, decoder_depth=2, cls_hidden=64)


def small_model(family: str = "supmae", **kw):
    torch.manual_seed(0)
    return create_model(f"{family}_vit_tiny_patch16", **(SMALL | kw))


def batch(n=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.rand(n, (size // 4) ** 2, generator=g)
    return images, labels, noise


def normalised_nchw(images_u8: torch.Tensor) -> torch.Tensor:
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def official_forward(model, imgs, labels, noise, mask_ratio=0.75):
    """MAE / SupMAE's forward as the original repositories write it (conv patch embed on NCHW, argsort masking,
    gather, cat + unshuffle gather in the decoder, patchify target, norm-pix loss, pooled-head CE)."""
    cfg = model.cfg
    p = cfg.patch_size
    x = F.conv2d(imgs, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = x + model.pos_embed[:, 1:, :]
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls_token = model.cls_token + model.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(n, -1, -1), x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    latent = model.norm(x)

    y = model.decoder_embed(latent)
    mask_tokens = model.mask_token.repeat(n, ids_restore.shape[1] + 1 - y.shape[1], 1)
    y_ = torch.cat([y[:, 1:, :], mask_tokens], dim=1)
    y_ = torch.gather(y_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1, :], y_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        y = blk(y)
    pred = model.decoder_pred(model.decoder_norm(y))[:, 1:, :]

    h = w = imgs.shape[2] // p
    target = imgs.reshape(n, 3, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, h * w, p * p * 3)
    if cfg.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    rec = ((pred - target) ** 2).mean(dim=-1)
    rec = (rec * mask).sum() / mask.sum()
    logits = cls = None
    loss = rec
    if model.cls_head is not None:
        logits = model.cls_head(latent[:, 1:, :].mean(dim=1))
        cls = F.cross_entropy(logits / cfg.temperature, labels)
        loss = rec + cfg.cls_loss_ratio * cls
    return loss, rec, cls, pred, mask, logits


@pytest.mark.parametrize("family", ["supmae", "mae"])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_matches_original_forward(family, norm_pix_loss):
    model = small_model(family, norm_pix_loss=norm_pix_loss).train()
    images, labels, noise = batch()
    out = model(images, labels, noise=noise)
    ref = official_forward(model, normalised_nchw(images), labels, noise)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rec_loss, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pred, ref[3], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.mask, ref[4])
    if family == "supmae":
        torch.testing.assert_close(out.cls_loss, ref[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, ref[5], rtol=1e-5, atol=1e-5)
    else:
        assert out.cls_loss is None and out.logits is None and ref[2] is None


def test_uint8_nhwc_equals_normalised_nchw_and_nhwc():
    model = small_model().eval()
    images, labels, noise = batch()
    a = model(images, labels, noise=noise)
    nchw = normalised_nchw(images)
    b = model(nchw, labels, noise=noise)
    c = model(nchw.permute(0, 2, 3, 1).contiguous(), labels, noise=noise)  # float NHWC
    d = model(nchw.contiguous(memory_format=torch.channels_last), labels, noise=noise)
    for other in (b, c, d):
        torch.testing.assert_close(a.loss, other.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pred, other.pred, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.logits, other.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_int_l_times_one_minus_ratio(mask_ratio):
    model = small_model().eval()
    images, _, _ = batch(n=3)
    out = model(images, mask_ratio=mask_ratio)
    keep = int(64 * (1 - mask_ratio))
    assert out.mask.shape == (3, 64)
    assert out.mask.sum(dim=1).tolist() == [64 - keep] * 3
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}


def test_noise_fixes_the_mask_and_smallest_noise_is_kept():
    model = small_model().eval()
    images, _, noise = batch(n=2)
    m1 = model(images, noise=noise).mask
    m2 = model(images, noise=noise).mask
    assert torch.equal(m1, m2)
    kept = torch.argsort(noise, dim=1)[:, :16]
    assert (m1.gather(1, kept) == 0).all()


@pytest.mark.parametrize("family", ["supmae", "mae"])
def test_gradients_reach_every_trainable_parameter(family):
    model = small_model(family).train()
    images, labels, noise = batch()
    model(images, labels, noise=noise).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0))
    assert missing == [], f"no gradient reaches {missing}"
    assert ("cls_head.0.weight" in trainable) == (family == "supmae")


def official_sincos(embed_dim: int, grid_size: int) -> torch.Tensor:
    """util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True) of the official repositories, in numpy."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def official_initialisation(cfg, seed: int) -> dict[str, torch.Tensor]:
    """The official model's fresh weights, rebuilt in plain PyTorch in its RNG order (models_mae.py /
    models_supmae.py `__init__` + `initialize_weights`, timm 0.3.2's PatchEmbed and Block): every module constructor
    draws its default initialisation in registration order (Conv2d, then per block qkv, proj, fc1, fc2, ...), then
    xavier on the patch weight viewed as (D, -1), N(0, .02) on cls_token and mask_token, and `apply(_init_weights)`:
    xavier-uniform + zero bias on every Linear (LayerNorms 1 / 0); the conv bias is never touched."""
    from torch import nn

    torch.manual_seed(seed)
    d, dd, hidden, dhidden = cfg.embed_dim, cfg.decoder_embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), int(
        cfg.decoder_embed_dim * cfg.mlp_ratio)
    out: dict[str, torch.Tensor] = {}
    linears: list[tuple[str, nn.Linear]] = []
    conv = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, cfg.patch_size)

    def block(prefix, width, mlp):
        for name, (i, o) in (("attn.qkv", (width, 3 * width)), ("attn.proj", (width, width)),
                             ("mlp.fc1", (width, mlp)), ("mlp.fc2", (mlp, width))):
            linears.append((f"{prefix}.{name}", nn.Linear(i, o)))
        for norm in ("norm1", "norm2"):
            out[f"{prefix}.{norm}.weight"], out[f"{prefix}.{norm}.bias"] = torch.ones(width), torch.zeros(width)

    for i in range(cfg.depth):
        block(f"blocks.{i}", d, hidden)
    linears.append(("decoder_embed", nn.Linear(d, dd)))
    for i in range(cfg.decoder_depth):
        block(f"decoder_blocks.{i}", dd, dhidden)
    linears.append(("decoder_pred", nn.Linear(dd, cfg.patch_dim)))
    if cfg.cls_branch:
        linears.append(("cls_head.0", nn.Linear(d, cfg.cls_hidden)))
        bn = nn.BatchNorm1d(cfg.cls_hidden)
        linears.append(("cls_head.3", nn.Linear(cfg.cls_hidden, cfg.num_classes)))
        out.update({f"cls_head.1.{k}": v for k, v in bn.state_dict().items()})
    cls_token, mask_token = torch.zeros(1, 1, d), torch.zeros(1, 1, dd)
    # initialize_weights()
    out["pos_embed"], out["decoder_pos_embed"] = official_sincos(d, cfg.grid_size), official_sincos(dd, cfg.grid_size)
    w = conv.weight.data
    torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    torch.nn.init.normal_(cls_token, std=0.02)
    torch.nn.init.normal_(mask_token, std=0.02)
    for name, lin in linears:
        torch.nn.init.xavier_uniform_(lin.weight)
        nn.init.constant_(lin.bias, 0)
        out[f"{name}.weight"], out[f"{name}.bias"] = lin.weight.data, lin.bias.data
    out.update({"patch_embed.proj.weight": conv.weight.data, "patch_embed.proj.bias": conv.bias.data,
                "cls_token": cls_token, "mask_token": mask_token, "norm.weight": torch.ones(d),
                "norm.bias": torch.zeros(d), "decoder_norm.weight": torch.ones(dd), "decoder_norm.bias": torch.zeros(dd)})
    return out


@pytest.mark.parametrize("family", ["supmae", "mae"])
def test_seeded_initialisation_equals_the_official_one_tensor_for_tensor(family):
    cfg = model_config(f"{family}_vit_tiny_patch16", **(SMALL | {"depth": 2, "decoder_depth": 2}))
    torch.manual_seed(7)
    ours = MaskedAutoencoderViT(cfg).state_dict()
    official = official_initialisation(cfg, 7)
    assert set(ours) == set(official)
    different = [k for k in ours if not torch.equal(ours[k], official[k])]
    assert different == []
    # the patch embedding's bias is Conv2d's default draw, uniform in +-1/sqrt(p*p*C), not zeros
    bound = 1 / cfg.patch_dim**0.5
    bias = ours["patch_embed.proj.bias"]
    assert bias.abs().max() <= bound and bias.abs().min() > 0 and bias.std() > bound / 4


def test_state_dict_keys_match_the_original_releases():
    model = small_model(depth=1, decoder_depth=1)
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
                *(f"blocks.0.{k}" for k in block), *(f"decoder_blocks.0.{k}" for k in block),
                "cls_head.0.weight", "cls_head.0.bias", "cls_head.1.weight", "cls_head.1.bias",
                "cls_head.1.running_mean", "cls_head.1.running_var", "cls_head.1.num_batches_tracked",
                "cls_head.3.weight", "cls_head.3.bias"}
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["patch_embed.proj.weight"].shape == (192, 3, 4, 4)
    assert sd["pos_embed"].shape == sd["decoder_pos_embed"].shape[:2] + (192,) == (1, 65, 192)
    assert sd["decoder_pred.weight"].shape == (48, 512)


def test_base_presets_have_the_paper_shapes():
    sup, mae = create_model("supmae_vit_base_patch16"), create_model("mae_vit_base_patch16")
    assert sup.cfg.decoder_depth == 1 and mae.cfg.decoder_depth == 8
    assert sup.cfg.decoder_embed_dim == mae.cfg.decoder_embed_dim == 512
    assert sup.cls_head[0].weight.shape == (3072, 768) and sup.cls_head[3].weight.shape == (1000, 3072)
    assert mae.cls_head is None
    assert sup.state_dict()["pos_embed"].shape == (1, 197, 768)
    assert len(list_models()) == 10 and set(MODEL_PRESETS) >= {"supmae_vit_huge_patch16", "mae_vit_small_patch16"}
    # FACTS section 1: about 31 (SupMAE d1b) and 59 (MAE d8b) training GFLOPs per image
    assert round(sup.train_flops_per_image() / 1e9) == 30 and round(mae.train_flops_per_image() / 1e9) == 58


def test_pos_embed_is_mae_sincos():
    model = small_model()
    pe = model.pos_embed[0]
    assert torch.equal(pe[0], torch.zeros(192))
    # patch = row * 8 + col: first half of the channels encodes the column, second half the row
    patch, row, col = 8 * 3 + 5, 3, 5
    omega = 1.0 / 10000 ** (torch.arange(48, dtype=torch.float64) / 48)
    want = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(pe[1 + patch], want.float(), rtol=0, atol=1e-7)


def test_checkpoint_round_trip_original_format(tmp_path):
    model = small_model().train()
    images, labels, noise = batch()
    model(images, labels, noise=noise)  # move BatchNorm running stats off their init
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": model.state_dict(), "epoch": 399, "args": argparse.Namespace(model="x", lr=1.0)}, path)
    state = load_checkpoint(path)
    cfg = infer_config(state, num_heads=3)
    assert cfg == model.cfg.__class__(**(model.cfg.to_dict() | {"decoder_num_heads": 16}))
    clone = create_model("supmae_vit_tiny_patch16", **SMALL)
    clone.load_state_dict(state, strict=True)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(images, labels, noise=noise).loss, model(images, labels, noise=noise).loss)
    prefixed = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, prefixed)
    assert set(load_checkpoint(prefixed)) == set(state)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth not found"):
        load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.pth"):
        load_checkpoint(bad)
    torch.save({"epoch": 3}, tmp_path / "nomodel.pth")
    with pytest.raises(ValueError, match="holds no model state_dict"):
        load_checkpoint(tmp_path / "nomodel.pth")


def test_timm_export_loads_and_matches_encoder():
    model = small_model().eval()
    state = model.state_dict()
    vit = VisionTransformer(**timm_vit_kwargs(model.cfg, num_classes=10, global_pool="avg"))
    missing, unexpected = vit.load_state_dict(export_timm_encoder(state, "avg"), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    # Token pooling keeps the per-token final norm: timm's features equal our encoder with nothing masked.
    vit_tok = VisionTransformer(**timm_vit_kwargs(model.cfg, num_classes=0, global_pool="token")).eval()
    vit_tok.load_state_dict(export_timm_encoder(state, "token"), strict=True)
    images, _, _ = batch(n=2)
    ids = torch.arange(64).expand(2, -1)
    ours = model.forward_encoder(model.as_nhwc(images), ids)
    torch.testing.assert_close(vit_tok.forward_features(normalised_nchw(images)), ours, rtol=1e-5, atol=1e-5)


def test_timm_export_of_base_loads_into_timm_create_model():
    state = create_model("supmae_vit_base_patch16").state_dict()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool="avg")
    missing, unexpected = vit.load_state_dict(export_timm_encoder(state), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []


@pytest.mark.parametrize("family", ["supmae", "mae"])
def test_flops_match_flop_counter(family):
    model = small_model(family, depth=3, decoder_depth=2).eval()
    images, _, _ = batch(n=2)
    # The math SDPA backend runs attention as bmm, which FlopCounterMode counts (the fused CPU kernel it doesn't).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, mask_ratio=0.75)
    counted = counter.get_total_flops() / 2
    assert abs(counted - model.flops_per_image(0.75)) / counted < 0.05
    assert model.train_flops_per_image(0.75) == 3 * model.flops_per_image(0.75)


def test_bad_inputs_raise_clear_errors():
    model = small_model().eval()
    images, labels, _ = batch()
    with pytest.raises(ValueError, match=r"uint8 images must be NHWC \(N, 32, 32, 3\)"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 images must be NHWC .* got \(2, 48, 48, 3\)"):
        model(torch.zeros(2, 48, 48, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"do not match the model: expected \(N, 3, 32, 32\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="images must be 4-D"):
        model(torch.zeros(32, 32, 3))
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            model(images, mask_ratio=ratio)
    with pytest.raises(ValueError, match="keeps no patch"):
        model(images, mask_ratio=0.999)
    with pytest.raises(ValueError, match=r"labels out of range: found values in \[0, 10\] .* num_classes=10"):
        model(images, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="labels out of range"):
        model(images, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must be an int64 tensor of shape \(4,\)"):
        model(images, labels[:2])
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 64\)"):
        model(images, noise=torch.rand(4, 16))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown model 'vit_b'"):
        model_config("vit_b")
    with pytest.raises(ValueError, match=r"unknown model options \['depht'\]"):
        model_config("mae_vit_base_patch16", depht=3)
    with pytest.raises(ValueError, match="img_size 30 is not a multiple of patch_size 4"):
        model_config("mae_vit_tiny_patch16", img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="fused_masking must be one of"):
        model_config("mae_vit_tiny_patch16", fused_masking="yes")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        model_config("mae_vit_tiny_patch16", num_classes=0)


def test_bf16_autocast_on_cpu():
    model = small_model().train()
    images, labels, noise = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, labels, noise=noise)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    ref = model(images, labels, noise=noise).loss
    assert abs(out.loss.item() - ref.item()) < 0.05 * ref.item()
