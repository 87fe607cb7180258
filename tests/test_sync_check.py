"""--sync-check: CUDA's sync debug mode set to "error" for the training hot path, the log intervals, checkpoints and
evaluations exempt. The switching is tested on the CPU with the mode functions stood in for; the real thing (a host
sync in the hot path raises, the real loop passes) needs CUDA. Its CPU twin: every Python-level read of a tensor's
value (`.item()`, `.tolist()`, `float()`, `bool()`, ...) and `torch.cuda.synchronize` made an error inside
`Trainer.train_step`, for fused and plain optimisers in fp32 and fp16, with accumulation, clipping and a skipped
step."""

from __future__ import annotations

import contextlib
import sys
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


def test_sync_check_is_an_option_that_does_not_change_results(tmp_path):
    assert config_from_args(["--data", "d", "--out", "o"]).sync_check is False
    assert config_from_args(["--data", "d", "--out", "o", "--sync-check"]).sync_check is True
    assert "sync_check" in RUNTIME_FIELDS  # a resumed run may add or drop it
    # On the CPU it checks nothing, and says so rather than passing silently.
    cfg = config_from_args(["--data", "unused", "--out", str(tmp_path), "--device", "cpu", "--sync-check", *TINY,
                            "--max-steps", "1"])
    model = create_model(cfg.model, **cfg.model_config(num_classes=3).to_dict())
    images = torch.zeros(4, 16, 16, 3, dtype=torch.uint8)
    trainer = Trainer(cfg, model, InMemoryLoader(lambda e, b: Batch(images, torch.zeros(4, dtype=torch.int64), None,
                                                                    4), 4, 16, 3), DistEnv())
    said = []
    trainer._say = said.append
    trainer.train()
    assert said[0] == "note: --sync-check has no effect on the CPU (it checks host synchronisations with CUDA)"


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


# ----------------------------------------------------------------------------------------------------------------
# The CPU twin: every way Python reads a tensor's value on the host, made an error inside train_step


class HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Inside `with reads_forbidden():` any host read of a tensor's value raises HostRead, except the model's label
    range check, which runs on CPU tensors only by design (model.mae: on GPUs the class count is checked once)."""
    state = {"on": False}

    def guard(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if state["on"] and caller != "_check_labels":
                raise HostRead(f"Tensor.{name} in the training step (called from {caller})")
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    for name in ("synchronize",):
        monkeypatch.setattr(torch.cuda, name, guard(f"cuda.{name}", getattr(torch.cuda, name)))

    @contextlib.contextmanager
    def reads_forbidden():
        state["on"] = True
        try:
            yield
        finally:
            state["on"] = False

    return reads_forbidden


class SgdTask(MaskedAutoencoderTask):
    """An optimiser without the found_inf protocol of fused ones (as LARS in the linear probe)."""

    def build_optimizer(self, peak_lr):
        return torch.optim.SGD(self.model.parameters(), lr=peak_lr, momentum=0.9, foreach=False)


@pytest.mark.parametrize("task_cls, precision", [
    (MaskedAutoencoderTask, "fp32"), (MaskedAutoencoderTask, "fp16"), (SgdTask, "fp32"), (SgdTask, "fp16"),
])
def test_the_training_step_never_reads_a_device_value_on_the_host(no_host_reads, tmp_path, task_cls, precision):
    cfg = config_from_args(["--data", "unused", "--out", str(tmp_path), "--device", "cpu", "--precision", precision,
                            "--accum-steps", "2", "--clip-grad", "1", *TINY])

    def make(epoch: int, b: int) -> Batch:
        g = torch.Generator().manual_seed(100 * epoch + b)
        images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        if b == 2:
            images = images.float().fill_(float("nan"))  # a non-finite step, skipped on the device
        return Batch(images, torch.randint(0, 3, (4,), generator=g), None, 4)

    seed_all(0)
    model = create_model(cfg.model, **cfg.model_config(num_classes=3).to_dict())
    trainer = Trainer(cfg, task_cls(model, cfg.mask_ratio, cfg.weight_decay, cfg.betas),
                      InMemoryLoader(make, 4, 16, 3), DistEnv())
    batches = [[trainer.loader.make(0, 2 * s), trainer.loader.make(0, 2 * s + 1)] for s in range(2)]
    with no_host_reads():
        for group in batches:
            trainer.train_step(group)
    assert trainer.step == 2
    assert int(trainer._bad_count) == 1  # the NaN step was counted, on the device
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # and skipped there
    if precision == "fp16":
        assert trainer.scaler.get_scale() == 2.0**15  # backed off once from 2**16 by the overflow


def test_the_host_read_guard_catches_a_read_in_the_step(no_host_reads, tmp_path):
    class Syncing(MaskedAutoencoderTask):
        def forward_loss(self, forward, batch, device):
            loss, logged = super().forward_loss(forward, batch, device)
            float(loss)  # what the original MAE loop did every step
            return loss, logged

    cfg = config_from_args(["--data", "unused", "--out", str(tmp_path), "--device", "cpu", *TINY])
    model = create_model(cfg.model, **cfg.model_config(num_classes=3).to_dict())
    images = torch.zeros(4, 16, 16, 3, dtype=torch.uint8)
    trainer = Trainer(cfg, Syncing(model, cfg.mask_ratio, cfg.weight_decay, cfg.betas),
                      InMemoryLoader(lambda e, b: Batch(images, torch.zeros(4, dtype=torch.int64), None, 4), 4, 16, 3),
                      DistEnv())
    with no_host_reads(), pytest.raises(HostRead, match=r"Tensor.__float__ in the training step \(called from "
                                                         "forward_loss\\)"):
        trainer.train_step([trainer.loader.make(0, 0)])


@pytest.mark.parametrize("protocol, precision", [
    ("finetune", "fp32"), ("finetune", "fp16"), ("linprobe", "fp32"), ("linprobe", "fp16"),
])
def test_the_evaluation_protocols_training_steps_never_read_a_device_value(no_host_reads, tmp_path, protocol,
                                                                          precision):
    """Fine-tuning with mixup, cutmix, random erasing and an EMA of the weights; the probe with LARS (no on-device
    skip of its own)."""
    from train.eval.encoder import resolve_source
    from train.eval.finetune import FinetuneConfig, FinetuneTask
    from train.eval.linprobe import LinearProbeTask, LinprobeConfig

    common = dict(data="unused", eval_data="unused", out=str(tmp_path), device="cpu", precision=precision,
                  batch_size=4, accum_steps=2, epochs=2, warmup_epochs=0.0, log_every=1, display="off",
                  tensorboard=False, ckpt="random", model="supmae_vit_tiny_patch16")
    if protocol == "finetune":
        cfg = FinetuneConfig(**common, ema=True, reprob=1.0, clip_grad=1.0)
        task_cls = FinetuneTask
    else:
        cfg = LinprobeConfig(**common)
        task_cls = LinearProbeTask
    source = resolve_source("random", "supmae_vit_tiny_patch16", dict(img_size=16, patch_size=4, embed_dim=32,
                            depth=1, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2, cls_hidden=32,
                            num_classes=3), seed=0)

    def make(epoch: int, b: int) -> Batch:
        g = torch.Generator().manual_seed(100 * epoch + b)
        images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        if b == 2:  # float input is taken as normalised (N, C, S, S)
            images = torch.full((4, 3, 16, 16), float("nan"))
        return Batch(images, torch.randint(0, 3, (4,), generator=g), None, 4)

    seed_all(0)
    trainer = Trainer(cfg, task_cls(cfg, source, 3), InMemoryLoader(make, 4, 16, 3), DistEnv())
    batches = [[make(0, 2 * s), make(0, 2 * s + 1)] for s in range(2)]
    with no_host_reads():
        for group in batches:
            trainer.train_step(group)
    assert trainer.step == 2 and int(trainer._bad_count) == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
