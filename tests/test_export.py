"""Weights out and in: the timm hub-style export (loaded by timm itself, offline), the official MAE release layout,
and evaluations from the official fine-tuned layout, timm folders and .safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from model import create_model
from model.checkpoint import timm_hub_config, timm_model_args
from model.config import model_config
from tests.conftest import write_tiny_shards
from train.distributed import DistEnv
from train.eval.encoder import PretrainedSource, build_vit, resolve_source
from train.eval.export import ExportConfig, export_encoder

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2,
            cls_hidden=32, num_classes=4)
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may reach the network: timm resolves local-dir: sources without it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("supmae_vit_tiny_patch16", **TINY).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def normalised(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> ImageNet-normalised NCHW, as timm's data config asks."""
    return (x.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def encoder_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """(N, 1 + L, D) normed tokens of the pre-trained encoder on every patch."""
    with torch.no_grad():
        return model.forward_encoder(model.as_nhwc(x), torch.arange(16).expand(x.shape[0], -1))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_export_loads_in_timm_with_the_projects_features(model, tmp_path, pool):
    out = tmp_path / "export"
    files = export_encoder(PretrainedSource.from_model(model), "timm", out, pool)
    assert [f.name for f in files] == ["model.safetensors", "config.json", "README.md"]
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(vit) is VisionTransformer and vit.num_classes == 0 and vit.global_pool == pool
    x = images()
    tokens = encoder_tokens(model, x)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(normalised(x)), tokens, rtol=1e-5, atol=1e-5)
        feature = tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(dim=1)  # the k-NN features
        torch.testing.assert_close(vit(normalised(x)), feature, rtol=1e-5, atol=1e-5)
    # timm's data config reproduces the project's evaluation transform
    data = timm.data.resolve_data_config({}, model=vit)
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    assert data == {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                    "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    # fine-tuning in timm: a new head, the encoder loaded
    head = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5)
    assert head.head.out_features == 5 and torch.equal(head.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    # and the folder reads back as an encoder (num_heads from config.json, which shapes cannot tell)
    source = resolve_source(out)
    assert (source.kind, source.model_cfg.num_heads, source.model_cfg.embed_dim) == ("timm", 2, 32)


def test_timm_config_records_only_what_differs_from_the_architecture():
    base = model_config("supmae_vit_base_patch16")
    assert timm_model_args(base, "token") == ("vit_base_patch16_224", {})
    assert timm_model_args(base, "avg") == ("vit_base_patch16_224", {"global_pool": "avg", "fc_norm": False})
    assert timm_model_args(model_config("mae_vit_huge_patch16"), "token") == ("vit_huge_patch14_224",
                                                                              {"patch_size": 16})
    assert timm_model_args(model_config("mae_vit_large_patch16", img_size=448), "token") == (
        "vit_large_patch16_224", {"img_size": 448})
    config = timm_hub_config(base)
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["num_classes"] == 0
    assert config["pretrained_cfg"]["interpolation"] == "bicubic" and config["pretrained_cfg"]["crop_pct"] == 0.875
    # the recorded arguments rebuild exactly this encoder in timm (meta device: no weights)
    for name in ("supmae_vit_base_patch16", "mae_vit_huge_patch16"):
        cfg = model_config(name)
        arch, args = timm_model_args(cfg)
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, num_classes=0, **args)
            encoder = create_model(name, fused_masking="off")
        ours = {k: v.shape for k, v in encoder.state_dict().items() if k.startswith(("patch_embed", "blocks", "norm.",
                                                                                     "cls_token", "pos_embed"))}
        assert {k: v.shape for k, v in vit.state_dict().items()} == ours, name


def test_mae_export_is_the_official_release_layout(model, tmp_path):
    out = tmp_path / "encoder.pth"
    export_encoder(PretrainedSource.from_model(model), "mae", out)
    state = torch.load(out, weights_only=True)
    assert list(state) == ["model"]
    blocks = {f"blocks.{i}.{m}.{w}" for i in range(2) for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                                  "mlp.fc2") for w in ("weight", "bias")}
    assert set(state["model"]) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                                   "norm.weight", "norm.bias", *blocks}
    # MAE's main_finetune.py: global-pool ViT, strict=False, only the new head and fc_norm missing
    vit = VisionTransformer(**{k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")},
                            num_classes=1000, global_pool="avg")
    missing = vit.load_state_dict(state["model"], strict=False).missing_keys
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    # and the evaluations read it back as the same encoder
    source = resolve_source(out, model_args={"num_heads": 2})
    x = images()
    torch.testing.assert_close(build_vit(source, 0, "avg", fc_norm=False).eval().features(x),
                               encoder_tokens(model, x)[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-5)


def finetuned_release(model, tmp_path) -> tuple[Path, VisionTransformer]:
    """An official fine-tuned release's layout: encoder + fc_norm + head, no per-token norm."""
    vit = VisionTransformer(**{k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")},
                            num_classes=7, global_pool="avg").eval()
    weights = {k: v for k, v in model.state_dict().items() if k.startswith(("patch_embed", "blocks", "cls_token",
                                                                             "pos_embed"))}
    torch.manual_seed(3)
    weights.update({"fc_norm.weight": 1 + 0.1 * torch.randn(32), "fc_norm.bias": 0.1 * torch.randn(32),
                    "head.weight": torch.randn(7, 32), "head.bias": torch.zeros(7)})
    vit.load_state_dict(weights)  # strict: exactly timm's global-pool ViT
    path = tmp_path / "mae_finetuned_vit_tiny.pth"
    torch.save({"model": weights, "epoch": 99}, path)
    return path, vit


def test_finetuned_release_layout_is_accepted_with_its_fc_norm(model, tmp_path):
    path, reference = finetuned_release(model, tmp_path)
    source = resolve_source(path, model_args={"num_heads": 2})
    x = images()
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(normalised(x)), pre_logits=True)
    # the frozen-feature protocols ask for the per-token norm; these weights have none: their fc_norm is kept
    torch.testing.assert_close(build_vit(source, 0, "avg", fc_norm=False).eval().features(x), expected,
                               rtol=1e-5, atol=1e-5)
    finetune = build_vit(source, 10, "avg")  # fine-tuning from it: a new head, the rest loaded
    assert torch.equal(finetune.fc_norm.weight, reference.fc_norm.weight) and finetune.head.out_features == 10
    with pytest.raises(ValueError, match="fine-tuned with global average pooling .* use average pooling"):
        build_vit(source, 0, "token")
    with pytest.raises(ValueError, match="holds fine-tuned weights .* export takes a pre-trained encoder"):
        export_encoder(source, "timm", tmp_path / "x")


def test_knn_evaluates_the_finetuned_layout_and_a_safetensors_file(model, tmp_path):
    from train.eval import knn

    write_tiny_shards(tmp_path / "train", num_samples=16, num_classes=4, per_shard=8, size=(20, 20))
    write_tiny_shards(tmp_path / "val", num_samples=8, num_classes=4, per_shard=8, size=(20, 20), split="val", seed=1)
    path, _ = finetuned_release(model, tmp_path)
    export_encoder(PretrainedSource.from_model(model), "timm", tmp_path / "timm", "avg")
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "timm" / "model.safetensors"), tmp_path / "encoder.safetensors")
    for ckpt, kind in ((path, "pth"), (tmp_path / "encoder.safetensors", "pth"), (tmp_path / "timm", "timm")):
        args = ["--ckpt", str(ckpt), "--data", str(tmp_path / "train"), "--eval-data", str(tmp_path / "val"),
                "--num-heads", "2", "--batch-size", "8", "--data-threads", "1", "--k", "3"]
        assert knn.run(knn.check(args), DistEnv()) == 0
        result = json.loads(ckpt.with_name(f"{ckpt.stem}.knn.json").read_text())
        assert result["source"] == kind and result["samples"] == 8 and result["model"]["num_heads"] == 2


def test_export_cli_and_refusals(model, tmp_path, capsys):
    from tools.export import main

    pth = tmp_path / "release.pth"
    torch.save({"model": model.state_dict()}, pth)
    assert main(["--ckpt", str(pth), "--format", "timm", "--out", str(tmp_path / "t"), "--num-heads", "2"]) == 0
    assert 'timm.create_model("local-dir:' in capsys.readouterr().out
    # again: an earlier export is overwritten
    assert main(["--ckpt", str(pth), "--format", "timm", "--out", str(tmp_path / "t"), "--num-heads", "2"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": {}}')
    assert main(["--ckpt", str(pth), "--format", "timm", "--out", str(run)]) == 2
    assert "already holds files that are not an earlier export (config.json)" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text()) == {"train": {}}  # untouched
    assert main(["--ckpt", str(tmp_path / "nope"), "--format", "mae", "--out", str(tmp_path / "x.pth")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--pool only applies to --format timm"):
        ExportConfig(str(pth), "mae", "x.pth", pool="avg")


def test_export_never_replaces_files_that_are_not_its_own(model, tmp_path, capsys):
    from tools.export import main

    pth = tmp_path / "release.pth"
    torch.save({"model": model.state_dict()}, pth)
    common = ["--ckpt", str(pth), "--num-heads", "2"]
    # mae: an existing file (a release, say) is kept byte for byte
    (tmp_path / "user.pth").write_bytes(b"someone's weights")
    assert main([*common, "--format", "mae", "--out", str(tmp_path / "user.pth")]) == 2
    assert "already exists: an export never replaces a file" in capsys.readouterr().err
    assert (tmp_path / "user.pth").read_bytes() == b"someone's weights"
    # --out inside a file: a message, not a traceback
    for fmt, out in (("mae", "user.pth/encoder.pth"), ("timm", "user.pth/export")):
        assert main([*common, "--format", fmt, "--out", str(tmp_path / out)]) == 2
        assert "is a file" in capsys.readouterr().err
    # timm: a folder of notes, a downloaded timm model (config.json with an architecture, not ours)
    notes, download = tmp_path / "notes", tmp_path / "vit_base"
    notes.mkdir(), download.mkdir()
    (notes / "README.md").write_text("my notes")
    (download / "config.json").write_text('{"architecture": "vit_base_patch16_224"}')
    (download / "model.safetensors").write_bytes(b"weights")
    for folder, named in ((notes, "README.md"), (download, "config.json, model.safetensors")):
        assert main([*common, "--format", "timm", "--out", str(folder)]) == 2
        assert f"not an earlier export ({named})" in capsys.readouterr().err
    assert (notes / "README.md").read_text() == "my notes" and (download / "model.safetensors").read_bytes() == b"weights"


def test_an_interrupted_timm_export_is_not_loadable_and_is_completed_by_the_next(model, tmp_path, monkeypatch):
    import safetensors.torch

    from model.checkpoint import is_timm_folder
    from train.eval.export import check_export_target

    out = tmp_path / "export"
    source = PretrainedSource.from_model(model)
    export_encoder(source, "timm", out, "token")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill while the weights are written

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_encoder(source, "timm", out, "avg")
    # the old config.json (token pool) does not vouch for weights that are not all written
    assert not is_timm_folder(out) and sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    (out / ".model.safetensors.12345.tmp").write_bytes(b"half")  # as kill -9 leaves it
    check_export_target(out, "timm")  # still recognised as an export
    monkeypatch.undo()
    export_encoder(source, "timm", out, "avg")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert timm.create_model(f"local-dir:{out}", pretrained=True).global_pool == "avg"


class Custom:
    """An object that weights-only loading refuses to unpickle."""


def test_files_that_are_no_weights_get_a_one_line_reason(model, tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    cases = {"config.json": (b'{"train": {}}', "not a torch checkpoint file (neither torch's zip format nor a legacy "
                                               "pickle)"),
             "cut.pth": (good.read_bytes()[:3000], "Is it a complete torch checkpoint file?")}
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": model.state_dict(), "args": Custom()}, tmp_path / "objects.pth")
    cases["objects.pth"] = (None, "holds Python objects besides tensors and plain values, which are never unpickled")
    for name, (_, says) in cases.items():
        with pytest.raises(ValueError) as e:
            resolve_source(tmp_path / name)
        assert says in str(e.value) and "\n" not in str(e.value) and "weights_only" not in str(e.value), str(e.value)
