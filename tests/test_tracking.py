"""Pictures and trackers: reconstruction maths and grid, `./launch.sh visualize`, the grid / config / hyper-parameters
in TensorBoard during pre-training (without changing the training), Weights & Biases in offline mode, the live
panel."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model
from model.masking import normalize_rows, patch_targets, patchify_nhwc
from model.reconstruction import predictions_to_normalised, reconstruct, reconstruction_grid, unpatchify_nhwc
from tests.conftest import write_tiny_shards
from train.metrics import RunLog, format_train_line, train_panel

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2,
            cls_hidden=32, num_classes=3)
TINY_MODEL = ["--model", "supmae_vit_tiny_patch16", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
              "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-num-heads", "2",
              "--cls-hidden", "32"]

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD = {"kind": "train", "step": 1234, "end_step": 100000, "elapsed_seconds": 3723.0, "epoch": 3.21,
          "images": 5_053_440, "flops": 1.5e17, "loss": 0.6123, "rec_loss": 0.6012, "cls_loss": 1.1234, "lr": 1.2e-4,
          "grad_norm": 0.345, "images_per_sec": 12345.6, "images_per_sec_per_device": 1543.2, "data_wait": 0.012,
          "tflops_per_device": 95.43, "mfu": 0.0965, "memory_gb": 41.2, "eta_seconds": 98765.0,
          "nonfinite_steps": 0, "loss_scale": None}


def tiny_model(**overrides):
    torch.manual_seed(0)
    return create_model("supmae_vit_tiny_patch16", **{**TINY, **overrides})


def images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------------------------------------------
# Reconstruction maths


def test_norm_pix_prediction_maps_back_with_each_patchs_own_statistics():
    model = tiny_model()
    x = images()
    rows = normalize_rows(patchify_nhwc(x, 4), model.pixel_scale, model.pixel_shift)
    perfect = patch_targets(x, 4, True, model.pixel_scale, model.pixel_shift)  # what the loss wants predicted
    torch.testing.assert_close(predictions_to_normalised(perfect, rows, True), rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(predictions_to_normalised(rows, rows, False), rows)  # plain-pixel models: as predicted
    assert torch.equal(unpatchify_nhwc(patchify_nhwc(x, 4), 4, 3), x)


def test_reconstruction_views_and_untouched_training_state():
    model = tiny_model().train()
    x = images()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    bn = model.cls_head[1].running_mean.clone()
    rng = torch.get_rng_state()
    rec = reconstruct(model, x, 0.75, noise)
    assert model.training and torch.equal(model.cls_head[1].running_mean, bn)
    assert torch.equal(torch.get_rng_state(), rng)
    assert rec.mask.sum(dim=1).tolist() == [12.0] * 3
    masked = rec.mask.bool()
    orig, masked_view, recon, pasted = (patchify_nhwc(v, 4).reshape(3, 16, 16, 3) for v in rec.panels())
    assert torch.equal(rec.original, x)
    assert torch.equal(pasted[~masked], orig[~masked]) and torch.equal(pasted[masked], recon[masked])
    assert torch.equal(masked_view[~masked], orig[~masked])
    mean_colour = torch.tensor([round(255 * m) for m in (0.485, 0.456, 0.406)], dtype=torch.uint8)
    assert (masked_view[masked] == mean_colour).all()  # 0 in normalised space, as MAE's notebook shows it
    # a masked patch of the reconstruction is the model's prediction scaled by that patch's std and mean
    with torch.no_grad():
        pred = model.eval()(x, mask_ratio=0.75, noise=noise).pred
    rows = normalize_rows(patchify_nhwc(x, 4), model.pixel_scale, model.pixel_shift)
    i, j = 1, int(masked[1].nonzero()[0])
    expected = pred[i, j] * (rows[i, j].var() + 1e-6) ** 0.5 + rows[i, j].mean()
    expected = ((expected.reshape(16, 3) - model.pixel_shift) / model.pixel_scale).round().clamp(0, 255)
    assert torch.equal(recon[i, j].float(), expected)


def test_grid_layout():
    rec = reconstruct(tiny_model(), images(2), 0.5, torch.rand(2, 16, generator=torch.Generator().manual_seed(0)))
    grid = reconstruction_grid(rec, pad=2, min_panel=40)  # 16 px panels enlarged x3 to 48
    assert grid.shape == (2 + 2 * 50, 2 + 4 * 50, 3) and grid.dtype == np.uint8
    for col, panel in enumerate(rec.panels()):
        tile = grid[52:100, 2 + col * 50 : 50 + col * 50]
        assert np.array_equal(tile, panel[1].numpy().repeat(3, axis=0).repeat(3, axis=1))
    assert (grid[:2] == 255).all() and (grid[:, 50:52] == 255).all()


# ------------------------------------------------------------------------------------------------------------------
# ./launch.sh visualize


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "train"
    write_tiny_shards(folder, num_samples=24, num_classes=3, per_shard=6, size=(24, 28))
    return folder


def test_visualize_writes_the_png(shards, tmp_path, capsys):
    from tools.visualize import main

    full, encoder_only = tmp_path / "release.pth", tmp_path / "encoder.pth"
    state = tiny_model().state_dict()
    torch.save({"model": state}, full)
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, encoder_only)
    out = tmp_path / "pics" / "rec.png"
    assert main(["--ckpt", str(full), "--data", str(shards), "--out", str(out), "--num", "5", "--num-heads", "2",
                 "--seed", "3"]) == 0
    assert "5 images, mask ratio 0.75" in capsys.readouterr().out
    picture = Image.open(out)
    # 5 rows and 4 columns of 16 px panels enlarged x7 to 112, 2 px gaps, a title band and a caption band
    assert picture.format == "PNG" and picture.size == (2 + 4 * 114, 2 + 5 * 114 + 2 * 18)
    again = tmp_path / "again.png"
    main(["--ckpt", str(full), "--data", str(shards), "--out", str(again), "--num", "5", "--num-heads", "2",
          "--seed", "3"])
    assert again.read_bytes() == out.read_bytes()  # the seed fixes the masking
    assert main(["--ckpt", str(encoder_only), "--data", str(shards), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds an encoder only (no decoder)" in capsys.readouterr().err
    assert main(["--ckpt", str(full), "--data", str(shards), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "the picture is a PNG file" in capsys.readouterr().err
    assert main(["--ckpt", str(full), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_visualize_more_images_than_the_data_and_unwritable_places(shards, tmp_path, capsys):
    from tools.visualize import main
    from train.distributed import DistEnv
    from train.entry import build_eval_loader

    full = tmp_path / "release.pth"
    torch.save({"model": tiny_model().state_dict()}, full)
    common = ["--ckpt", str(full), "--data", str(shards), "--num-heads", "2", "--data-backend", "torch"]
    # the batch is at most what a rank reads, not --num / --batch-size (which would allocate that many)
    for rank, world, batch in ((0, 1, 24), (1, 2, 12), (2, 5, 5)):
        loader = build_eval_loader(str(shards), 10**9, 16, "torch", 1, 0, DistEnv(rank=rank, world_size=world))
        assert loader.cfg.batch_size == batch
        assert sum(b.num_valid for b in loader) == 24 * (rank + 1) // world - 24 * rank // world
        loader.close()
    # every image of the 24 once
    assert main([*common, "--out", str(tmp_path / "all.png"), "--num", str(10**9)]) == 0
    assert "24 images" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    for out, says in (("file/rec.png", "is a file"), ("dir.png", "is a folder")):
        assert main([*common, "--out", str(tmp_path / out)]) == 2
        assert says in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# TensorBoard during pre-training


def pretrain(data: Path, out: Path, *args: str) -> int:
    from train.config import config_from_args
    from train.distributed import DistEnv
    from train.pretrain import run

    cfg = config_from_args(["--data", str(data), "--out", str(out), *TINY_MODEL, "--batch-size", "4", "--epochs", "1",
                            "--warmup-epochs", "0.5", "--lr", "2e-3", "--data-threads", "1", "--shuffle-buffer", "16",
                            "--display", "off", "--log-every", "2", "--ckpt-every", "3", "--keep", "5", *args])
    return run(cfg, DistEnv())


@pytest.mark.slow
def test_pretraining_logs_grids_config_and_hparams_without_changing_the_run(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.checkpoint import read_checkpoint

    # the torch backend's DataLoader draws its seed from the global RNG: the pictures' loader must not shift it
    assert pretrain(shards, tmp_path / "with", "--recon-images", "3", "--data-backend", "torch") == 0
    assert pretrain(shards, tmp_path / "without", "--recon-images", "0", "--data-backend", "torch") == 0
    a = read_checkpoint(tmp_path / "with" / "checkpoints" / "step-000000006.pt")
    b = read_checkpoint(tmp_path / "without" / "checkpoints" / "step-000000006.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # same weights, BatchNorm statistics, RNG streams
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    events = EventAccumulator(str(tmp_path / "with" / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    grids = events.Images("pictures/reconstructions")
    assert [g.step for g in grids] == [3, 6]  # every checkpoint
    grid = np.array(Image.open(io.BytesIO(grids[0].encoded_image_string)))
    assert grid.shape == (2 + 3 * 114, 2 + 4 * 114, 3)
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in text.splitlines()))["train"]["recon_images"] == 3
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                         "_hparams_/session_end_info"}
    none = EventAccumulator(str(tmp_path / "without" / "tb"))
    none.Reload()
    assert none.Tags()["images"] == []


# ------------------------------------------------------------------------------------------------------------------
# Weights & Biases, offline


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf Records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768  # a block's tail too short for a header is padding
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def test_wandb_offline_writes_scalars_axes_config_and_pictures(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    rec = {**RECORD, "time": 0.0, "step": 4, "images": 512, "flops": 3.0e14, "loss": 0.5, "rec_loss": 0.4,
           "cls_loss": None, "mfu": None}
    log = RunLog(out, enabled=True, display="off", tensorboard=False, wandb="proj", title="pretrain x -> y")
    log.log_config({"train": {"blr": 1.5e-4, "batch_size": 4}, "model": {"embed_dim": 32}})
    log.record(rec)
    log.image("pictures/reconstructions", np.zeros((6, 8, 3), np.uint8), 4, "step 4")
    log.close()
    run_id = (out / "wandb" / "run-id").read_text().strip()
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(run_file)
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    assert {"step": 4, "images": 512, "pflops": 0.3, "train/loss": 0.5, "train/rec_loss": 0.4} .items() <= \
        history[0].items()
    assert "train/cls_loss" not in history[0]  # None (MAE) is not logged
    assert history[1]["pictures/reconstructions._type"] == "image-file" and history[1]["step"] == 4
    config = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
              for r in records if r.HasField("config") for i in r.config.update}
    assert config["train"] == {"blr": 1.5e-4, "batch_size": 4} and config["model"] == {"embed_dim": 32}
    metrics = {r.metric.name or r.metric.glob_name: r.metric.step_metric for r in records if r.HasField("metric")}
    assert {"step": "", "images": "", "pflops": "", "train/*": "step", "eval/*": "step"}.items() <= metrics.items()
    assert list((run_file.parent / "files" / "media" / "images").rglob("*.png"))
    # a resumed run continues the same W&B run
    log = RunLog(out, enabled=True, display="off", tensorboard=False, wandb="proj", resume_step=4)
    log.close()
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert (out / "wandb" / "run-id").read_text().strip() == run_id


def test_wandb_missing_is_a_clear_error(shards, tmp_path, monkeypatch):
    from train.pretrain import check

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"--wandb needs the wandb package.*pip install wandb"):
        check(["--data", str(shards), "--out", str(tmp_path / "r"), *TINY_MODEL, "--wandb"])
    check(["--data", str(shards), "--out", str(tmp_path / "r"), *TINY_MODEL])  # without --wandb: fine


# ------------------------------------------------------------------------------------------------------------------
# The live panel


@pytest.mark.parametrize("width", [120, 79, 60, 40])
def test_live_panel_shows_progress_and_fits_narrow_terminals(width):
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(train_panel(RECORD, "pretrain supmae -> runs/x", width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    for shown in ("1,234/100,000 (1.2%)", "elapsed", "1:02:03", "ETA", "1d03h26m", "0.6123", "12,346", "9.7%",
                  "5,053,440", "150.000", "41.2 GB"):
        assert shown in text, (shown, text)
    assert "…" not in text  # nothing cut off


def test_plain_line_has_progress_and_elapsed():
    line = format_train_line(RECORD)
    assert line.startswith("step 1234/100000 (1.2%) ep 3.21 ") and "elapsed 1:02:03 eta 1d03h26m" in line


def test_checkpoint_pictures_leave_the_random_state_alone(monkeypatch):
    import random
    from types import SimpleNamespace

    from train.distributed import rng_state
    from train.tracking import pictures

    def sample_drawing_from_every_generator(*args, **kwargs):  # as a loader seeding itself from them would
        torch.rand(5), np.random.rand(), random.random()
        return images(2)

    monkeypatch.setattr(pictures, "sample_images", sample_drawing_from_every_generator)
    logged = []
    log = SimpleNamespace(tracking=True, image=lambda *a: logged.append(a))
    trainer = SimpleNamespace(log=log, device=torch.device("cpu"), model=tiny_model(), step=7)
    before = rng_state(trainer.device)
    pictures.CheckpointPictures("unused", 2, 16, 0.75, seed=0)(trainer, Path("ck.pt"))
    after = rng_state(trainer.device)
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert torch.equal(before["numpy"]["key"], after["numpy"]["key"])
    assert before["numpy"]["pos"] == after["numpy"]["pos"]
    (tag, grid, step, caption), = logged
    assert (tag, step, caption) == ("pictures/reconstructions", 7, "step 7: mask ratio 0.75, 2 images")
    assert grid.shape == (2 + 2 * 114, 2 + 4 * 114, 3)
