"""The training loop in-process: learning, exact resume, metrics schema and compute accounting, non-finite steps,
gradient accumulation, evaluation. Tiny model (32-d, 1 block, 16x16 images) on tiny shards or an in-memory loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import create_model, load_checkpoint
from pipeline.loaders.base import Batch
from pipeline.loaders.memory_loader import InMemoryLoader
from tests.conftest import write_tiny_shards
from train.checkpoint import list_checkpoints, read_checkpoint
from train.config import config_from_args
from train.distributed import DistEnv, seed_all
from train.metrics import EVAL_FIELDS, TIMING_FIELDS, TRAIN_FIELDS, RunLog
from train.pretrain import SetupError, run
from train.system.builds import installed_dali
from train.system.device import describe_environment
from train.system.nvidia import detect_nvidia
from train.trainer import NonFiniteError, Trainer

TINY_MODEL = ["--model", "supmae_vit_tiny_patch16", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
              "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-num-heads", "2",
              "--cls-hidden", "32"]
TINY_RUN = [*TINY_MODEL, "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "2e-3",
            "--data-threads", "1", "--shuffle-buffer", "16", "--display", "off", "--no-tensorboard",
            "--log-every", "1", "--ckpt-every", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "train"
    write_tiny_shards(folder, num_samples=24, num_classes=3, per_shard=6, size=(24, 28))
    return folder


def pretrain(data: Path, out: Path, *args: str, stop=None) -> int:
    cfg = config_from_args(["--data", str(data), "--out", str(out), *TINY_RUN, *args])
    return run(cfg, DistEnv(), stop)


def records(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def comparable(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in recs]


class StopAt:
    """Stands in for StopRequest: asks every rank to stop after step `step` (as a SIGTERM would)."""

    def __init__(self, step: int):
        self.step, self.polls = step, 0
        self.received = None

    def poll(self) -> bool:
        self.polls += 1
        return self.polls >= self.step


# ------------------------------------------------------------------------------------------------------------------


def test_short_run_lowers_the_loss(shards, tmp_path):
    assert pretrain(shards, tmp_path / "run", "--epochs", "3", "--warmup-epochs", "1") == 0
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert len(losses) == 18
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.75 * first, (first, last)  # about 1.5 -> 0.75 here


@pytest.mark.parametrize("backend, cut, position, logged", [
    ("dali", 5, (0, 5), [4]),  # step 5 is carried in the checkpoint
    ("torch", 5, (0, 5), [4]),  # the torch backend (PIL in DataLoader workers)
    ("torch", 6, (1, 0), [4, 6]),  # at the epoch boundary: the next epoch's first batch
])
def test_interrupted_and_resumed_run_reproduces_every_record(shards, tmp_path, backend, cut, position, logged):
    """Stop (as on SIGTERM) in the middle of a log interval and of an epoch, or at an epoch's end, resume: same
    records, same weights, with either loader backend."""
    args = ["--log-every", "4", "--ckpt-every", "3", "--data-backend", backend]
    assert pretrain(shards, tmp_path / "full", *args) == 0
    assert pretrain(shards, tmp_path / "cut", *args, stop=StopAt(cut)) == 0
    assert [ck.step for ck in list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3, cut]
    state = read_checkpoint(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1].path)
    assert (state["loader"][0]["epoch"], state["loader"][0]["batch"]) == position  # (epoch, next batch)
    assert [r["step"] for r in records(tmp_path / "cut")] == logged
    assert pretrain(shards, tmp_path / "cut", *args, "--resume", "auto") == 0

    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in full] == [4, 6, 8, 12]  # every 4 steps and at each epoch end (6 steps/epoch)
    assert comparable(cut) == comparable(full)
    a = read_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[-1].path)
    b = read_checkpoint(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1].path)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["compute"]["images"] == b["compute"]["images"] == 12 * 4


def test_run_folder_metrics_checkpoint_and_eval(shards, tmp_path):
    eval_data = tmp_path / "val"
    write_tiny_shards(eval_data, num_samples=10, num_classes=3, per_shard=4, size=(20, 20), split="val", seed=1)
    out = tmp_path / "run"
    assert pretrain(shards, out, "--eval-data", str(eval_data), "--eval-every", "1", "--eval-batch-size", "4",
                    "--tensorboard", "--keep", "1", "--keep-every", "2") == 0

    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"train", "model", "derived", "versions", "environment", "command"}
    dali = installed_dali()
    assert config["environment"] == {
        "device": "cpu", "gpu": None, "gpu_count": 0, "machine_gpus": len(detect_nvidia().gpus),
        "driver": detect_nvidia().driver, "driver_cuda": detect_nvidia().cuda_version, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "dali": f"{dali[0].dali_package} {dali[1]}" if dali else None,
        "fused_masking": "off", "compile": False}
    assert config["model"]["num_classes"] == 3  # from the data set's manifest
    flops_per_image = create_model("supmae_vit_tiny_patch16", **{k: config["model"][k] for k in config["model"]}) \
        .train_flops_per_image(0.75)
    assert config["derived"]["train_flops_per_image"] == flops_per_image
    assert (config["derived"]["steps_per_epoch"], config["derived"]["total_steps"],
            config["derived"]["warmup_steps"], config["derived"]["effective_batch"]) == (6, 12, 3, 4)

    train = records(out)
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        assert tuple(r) == TRAIN_FIELDS
        assert r["images"] == 4 * r["step"]
        assert r["flops"] == r["images"] * flops_per_image
        assert r["mfu"] is None and r["loss_scale"] is None and r["nonfinite_steps"] == 0
        assert r["loss"] == pytest.approx(r["rec_loss"] + 0.01 * r["cls_loss"], rel=1e-6)
    # lr of step s is the schedule at s-1: warm-up 0, 2e-3/3, 4e-3/3, then the cosine from the peak
    assert [r["lr"] for r in train[:4]] == pytest.approx([0.0, 2e-3 / 3, 4e-3 / 3, 2e-3])
    assert train[-1]["epoch"] == 2.0
    assert all(b["device_hours"] >= a["device_hours"] for a, b in zip(train, train[1:], strict=False))

    evals = records(out, "eval")
    assert [(tuple(r), r["step"], r["samples"]) for r in evals] == [(EVAL_FIELDS, 6, 10), (EVAL_FIELDS, 12, 10)]
    assert all(0.0 <= r["top1"] <= 1.0 for r in evals)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "processes: 1 on cpu, precision fp32, compile off, fused masking off" in (out / "log.txt").read_text()
    assert describe_environment(config["environment"]) in (out / "log.txt").read_text()

    # --keep 1 keeps the newest; --keep-every 2 keeps epoch 2's for good
    assert [ck.path.name for ck in list_checkpoints(out / "checkpoints")] == ["epoch-0002-step-000000012.pt"]
    ck = read_checkpoint(out / "checkpoints" / "epoch-0002-step-000000012.pt")
    assert {"model", "optimizer", "scaler", "step", "epoch", "loader", "rng", "world_size", "compute", "config",
            "interval"} <= set(ck)
    assert (ck["step"], ck["epoch"], ck["world_size"], len(ck["loader"]), len(ck["rng"])) == (12, 2, 1, 1, 1)
    assert ck["compute"]["flops"] == 48 * flops_per_image and ck["config"] == config
    # the evaluation tools read the weights of these files with model.load_checkpoint
    state = load_checkpoint(out / "checkpoints" / "epoch-0002-step-000000012.pt")
    assert set(state) == set(ck["model"])


def test_max_steps_ends_early_with_a_checkpoint(shards, tmp_path):
    assert pretrain(shards, tmp_path / "run", "--max-steps", "4", "--log-every", "3") == 0
    assert [r["step"] for r in records(tmp_path / "run")] == [3, 4]
    assert [ck.step for ck in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


def test_new_run_refuses_a_folder_with_checkpoints(shards, tmp_path):
    from train.pretrain import check

    assert pretrain(shards, tmp_path / "run", "--max-steps", "1") == 0
    with pytest.raises(ValueError, match="already holds checkpoints .*--resume auto"):
        check(["--data", str(shards), "--out", str(tmp_path / "run"), *TINY_RUN])
    # an explicit checkpoint file continues that state, here into another folder
    ck = tmp_path / "run" / "checkpoints" / "step-000000001.pt"
    assert pretrain(shards, tmp_path / "other", "--max-steps", "2", "--resume", str(ck)) == 0
    assert [r["step"] for r in records(tmp_path / "other")] == [2]
    # --resume auto never silently starts over a folder whose checkpoints are all unreadable
    ck.write_bytes(b"damaged")
    with pytest.raises(SetupError, match="--resume auto: none of the checkpoints in .* can be read"):
        pretrain(shards, tmp_path / "run", "--resume", "auto")


# ------------------------------------------------------------------------------------------------------------------
# In-memory data: float images with NaNs where asked


def memory_loader(num_samples=32, batch_size=4, img_size=16, num_classes=3, nan_batches=()) -> InMemoryLoader:
    """Deterministic in-memory loader: batch b of epoch e is a function of (e, b); float images (uint8 ones cannot
    be non-finite), NaN for the global batch indices `nan_batches` (epoch * batches_per_epoch + b)."""
    per_epoch = num_samples // batch_size

    def make(epoch: int, b: int) -> Batch:
        g = torch.Generator().manual_seed(10_000 * epoch + 10 * b)
        images = torch.randn(batch_size, img_size, img_size, 3, generator=g)
        if epoch * per_epoch + b in nan_batches:
            images[:] = float("nan")
        return Batch(images, torch.randint(0, num_classes, (batch_size,), generator=g), None, batch_size)

    return InMemoryLoader(make, per_epoch, num_samples, num_classes)


def memory_trainer(tmp_path: Path, *args: str, loader: InMemoryLoader | None = None, family: str = "supmae",
                   batch_size: int = 4, log: RunLog | None = None) -> Trainer:
    cfg = config_from_args(["--data", "unused", "--out", str(tmp_path / "run"), *TINY_RUN,
                            "--model", f"{family}_vit_tiny_patch16", "--num-classes", "3",
                            "--batch-size", str(batch_size), *args])
    seed_all(0)
    model = create_model(cfg.model, **cfg.model_config(num_classes=3).to_dict())
    return Trainer(cfg, model, loader or memory_loader(batch_size=batch_size), DistEnv(), log=log)


def test_nonfinite_step_stops_the_run_with_the_last_good_state(tmp_path):
    trainer = memory_trainer(tmp_path / "a", loader=memory_loader(nan_batches={3}))
    with pytest.raises(NonFiniteError) as e:
        trainer.train()
    assert e.value.first_step == 4 and e.value.count == 1
    assert str(e.value).startswith("non-finite loss or gradients at step 4 (1 non-finite step(s) so far, "
                                   "--skip-nonfinite 0); those updates were skipped and the run stopped at step 4")
    ck = read_checkpoint(e.value.checkpoint)
    assert ck["step"] == 4 and ck["compute"]["nonfinite_steps"] == 1
    # The weights (and the head's BatchNorm statistics) are those after the 3 good steps.
    clean = memory_trainer(tmp_path / "b", "--max-steps", "3")
    clean.train()
    for k, v in clean.model.state_dict().items():
        assert torch.equal(ck["model"][k], v), k


def test_resuming_a_checkpoint_with_other_weight_decay_groups_says_why(tmp_path):
    """A checkpoint from a version that grouped the parameters differently (the tokens among the not-decayed) cannot
    continue: the error says so and how to go on, instead of torch's bare size mismatch."""
    trainer = memory_trainer(tmp_path / "a", "--max-steps", "1")
    trainer.train()
    state = trainer.state_dict()
    no_decay, decay = state["optimizer"]["param_groups"]
    no_decay["params"], decay["params"] = no_decay["params"] + decay["params"][:2], decay["params"][2:]
    with pytest.raises(ValueError, match=r"the checkpoint's optimiser state has parameter groups of \[\d+, \d+\] "
                                         r"tensors, this version builds .* --init CHECKPOINT"):
        memory_trainer(tmp_path / "b").load_state_dict(state)


def test_skip_nonfinite_counts_and_continues(tmp_path):
    trainer = memory_trainer(tmp_path, "--skip-nonfinite", "2", "--epochs", "1", "--log-every", "2",
                             loader=memory_loader(nan_batches={2, 5}))
    result = trainer.train()
    assert result.status == "completed" and result.step == 8
    assert trainer.compute.nonfinite_steps == 2
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


def test_fp16_loss_scaler_path(tmp_path):
    """The fp16 recipe (CPU autocast here): GradScaler + fused AdamW skip the NaN step on the device, back the scale
    off once, count the step, and log the scale."""
    log = RunLog(tmp_path / "run", enabled=True, display="off", tensorboard=False)
    trainer = memory_trainer(tmp_path, "--precision", "fp16", "--skip-nonfinite", "1", "--epochs", "1",
                             "--log-every", "4", loader=memory_loader(nan_batches={1}), log=log)
    assert trainer.train().status == "completed"
    log.close()
    recs = records(tmp_path / "run")
    assert [(r["step"], r["nonfinite_steps"], r["loss_scale"]) for r in recs] == [(4, 1, 32768.0), (8, 1, 32768.0)]
    ck = read_checkpoint(trainer.last_checkpoint)
    assert ck["scaler"]["scale"] == 32768.0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """MAE (no BatchNorm): 2 micro-batches of 2 give the update of one batch of 4 (same samples, same masks)."""

    whole = memory_loader(num_samples=32, batch_size=4)

    def half(epoch: int, b: int) -> Batch:  # the halves of the batches of 4 the big-batch run gets
        batch = whole.make(epoch, b // 2)
        part = slice(0, 2) if b % 2 == 0 else slice(2, 4)
        return Batch(batch.images[part], batch.labels[part], None, 2)

    big = memory_trainer(tmp_path / "a", "--max-steps", "2", family="mae")
    big.train()
    acc = memory_trainer(tmp_path / "b", "--max-steps", "2", "--accum-steps", "2", family="mae", batch_size=2,
                         loader=InMemoryLoader(half, 16, 32, 3))
    acc.train()
    assert acc.peak_lr == big.peak_lr  # lr follows the effective batch
    for (k, a), b in zip(big.model.state_dict().items(), acc.model.state_dict().values(), strict=True):
        # The attention key bias gets no gradient in exact arithmetic (softmax ignores a per-query shift), so
        # Adam turns rounding noise into updates of a few % of lr there; everything else agrees to ~1e-8.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5 if k.endswith("qkv.bias") else 1e-7, msg=k)
