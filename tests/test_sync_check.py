"""--sync-check: CUDA's sync debug mode set to "error" for the training hot path, the log intervals, checkpoints and
evaluations exempt. The switching is tested on the CPU with the mode functions stood in for; the real thing (a host
sync in the hot path raises, the real loop passes) needs CUDA."""

from __future__ import annotations

import types

import pytest
import torch

from model import create_model
from pipeline.loaders.base import Batch
from pipeline.loaders.memory_loader import InMemoryLoader
from train.config import RUNTIME_FIELDS, config_from_args
from train.distributed import DistEnv, seed_all
from train.task import MaskedAutoencoderTask
from train.trainer import Trainer, _exempt_from_sync_check

CUDA = torch.cuda.is_available()
TINY = ["--model", "supmae_vit_tiny_patch16", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
        "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-num-heads", "2",
        "--cls-hidden", "32", "--num-classes", "3", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0",
        "--display", "off", "--no-tensorboard", "--log-every", "1", "--ckpt-every", "3"]


def test_sync_check_is_an_option_that_does_not_change_results():
    assert config_from_args(["--data", "d", "--out", "o"]).sync_check is False
    assert config_from_args(["--data", "d", "--out", "o", "--sync-check"]).sync_check is True
    assert "sync_check" in RUNTIME_FIELDS  # a resumed run may add or drop it


def test_exempt_places_turn_the_sync_debug_mode_off_and_back(monkeypatch):
    mode = {"value": 2}
    seen = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["value"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(value=m))

    class Loop:
        device = torch.device("cuda")

        @_exempt_from_sync_check
        def log_interval(self):
            seen.append(mode["value"])
            return "read"

        @_exempt_from_sync_check
        def failing(self):
            raise RuntimeError("boom")

    assert Loop().log_interval() == "read" and seen == [0] and mode["value"] == 2
    with pytest.raises(RuntimeError, match="boom"):
        Loop().failing()
    assert mode["value"] == 2  # restored on the error path too
    mode["value"] = 0
    Loop().log_interval()
    assert seen == [0, 0] and mode["value"] == 0
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    assert _exempt_from_sync_check(lambda self: mode["value"])(cpu) == 0  # the CPU never touches the mode


def _trainer(tmp_path, task_cls=MaskedAutoencoderTask) -> Trainer:
    cfg = config_from_args(["--data", "unused", "--out", str(tmp_path), "--device", "cuda", "--sync-check", *TINY])

    def make(epoch: int, b: int) -> Batch:  # made on the device: a blocking host-to-device copy would sync
        g = torch.Generator("cuda").manual_seed(100 * epoch + b)
        images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g, device="cuda")
        return Batch(images, torch.randint(0, 3, (4,), generator=g, device="cuda"), None, 4)

    seed_all(0)
    model = create_model(cfg.model, **cfg.model_config(num_classes=3).to_dict())
    task = task_cls(model, cfg.mask_ratio, cfg.weight_decay, cfg.betas)
    return Trainer(cfg, task, InMemoryLoader(make, 4, 16, 3), DistEnv(device=torch.device("cuda")))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_sync_check_passes_the_real_loop_and_catches_a_host_sync_in_the_step(tmp_path):
    trainer = _trainer(tmp_path / "clean")
    assert trainer.train().step == 8  # log every step, checkpoints, epoch ends: all exempt
    assert torch.cuda.get_sync_debug_mode() == 0  # put back afterwards

    class Syncing(MaskedAutoencoderTask):
        def forward_loss(self, forward, batch, device):
            loss, logged = super().forward_loss(forward, batch, device)
            loss.item()  # what the original MAE loop did every step
            return loss, logged

    with pytest.raises(RuntimeError, match="synchroniz"):
        _trainer(tmp_path / "syncing", Syncing).train()
    assert torch.cuda.get_sync_debug_mode() == 0
