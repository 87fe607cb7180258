"""Checkpoint files: naming, pruning, atomic leftovers, the corrupt-newest fallback, and initialising from the
original MAE / SupMAE release format."""

from __future__ import annotations

import argparse

import pytest
import torch

from model import create_model
from train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from train.pretrain import init_weights

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
             decoder_num_heads=2, cls_hidden=16, num_classes=3)


def fake_state(step: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "epoch": 0,
            "model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "scaler": None, "loader": [{}],
            "rng": [{}], "world_size": 1, "compute": {}, "config": {}}


def test_names_listing_and_pruning(tmp_path):
    assert checkpoint_name(1200) == "step-000001200.pt"
    assert checkpoint_name(1200, epoch=50) == "epoch-0050-step-000001200.pt"
    for step, epoch in ((10, None), (20, 1), (30, None), (40, None), (50, 2)):
        save_checkpoint(fake_state(step), tmp_path, step, epoch)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [(c.step, c.permanent) for c in list_checkpoints(tmp_path)] == [(10, False), (20, True), (30, False),
                                                                            (40, False), (50, True)]
    removed = prune_checkpoints(tmp_path, keep=2).removed
    assert sorted(p.name for p in removed) == ["step-000000010.pt", "step-000000030.pt"]
    assert [c.path.name for c in list_checkpoints(tmp_path)] == [
        "epoch-0001-step-000000020.pt", "step-000000040.pt", "epoch-0002-step-000000050.pt"]


def test_half_written_files_are_cleaned_up(tmp_path):
    (tmp_path / ".step-000000010.pt.1234.tmp").write_bytes(b"partial")
    save_checkpoint(fake_state(5), tmp_path, 5)
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".step-000000010.pt.1234.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000005.pt"]


def test_corrupt_newest_falls_back_with_a_warning(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(fake_state(step), tmp_path, step)
    newest = tmp_path / "step-000000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, e.g. a partial copy
    (tmp_path / "step-000000040.pt").write_bytes(b"garbage")
    warnings: list[str] = []
    path, state = latest_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "step-000000020.pt" and state["step"] == 20
    assert len(warnings) == 2
    assert warnings[0].startswith(f"skipped checkpoint step-000000040.pt: {tmp_path / 'step-000000040.pt'} is not "
                                  "a readable checkpoint archive")
    assert warnings[1].startswith(f"skipped checkpoint {newest.name}: {newest}")
    assert warnings[1].endswith("; falling back to an older one")


def test_read_rejects_other_files(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a supmae-fast-checkpoint checkpoint .*--init"):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")


def test_original_release_checkpoint_initialises_the_model(tmp_path):
    """The original repositories save {"model", "optimizer", "epoch", "scaler", "args": Namespace}."""
    torch.manual_seed(1)
    source = create_model("supmae_vit_tiny_patch16", **SMALL)
    original = {"model": source.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4)}
    torch.save(original, tmp_path / "checkpoint-399.pth")
    torch.manual_seed(2)
    target = create_model("supmae_vit_tiny_patch16", **SMALL)
    notes: list[str] = []
    init_weights(target, str(tmp_path / "checkpoint-399.pth"), notes)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert notes == [f"initialised from {tmp_path / 'checkpoint-399.pth'}: {len(source.state_dict())} tensors loaded"]

    # An MAE release (no classification head, DDP "module." prefixes) initialises a SupMAE model's encoder+decoder.
    mae = create_model("mae_vit_tiny_patch16", **dict(SMALL, decoder_depth=1))
    torch.save({"model": {f"module.{k}": v for k, v in mae.state_dict().items()}}, tmp_path / "mae.pth")
    notes.clear()
    init_weights(target, str(tmp_path / "mae.pth"), notes)
    assert torch.equal(target.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert "not in the file (kept fresh): ['cls_head.0.bias', 'cls_head.0.weight'" in notes[0]

    wrong = create_model("supmae_vit_tiny_patch16", **dict(SMALL, embed_dim=64))
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shapes differ from the model for"):
        init_weights(target, str(tmp_path / "wrong.pth"), [])
