"""The three protocols end to end, in-process on tiny data: fine-tune and probe exact resume, the result files and
their compute fields, the k-NN library function, and a fine-tune of a pre-trained encoder beating random init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import create_model
from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.build import build_loader
from tests.conftest import write_tiny_shards
from train.checkpoint import list_checkpoints, read_checkpoint
from train.config import config_from_args
from train.distributed import DistEnv
from train.eval.encoder import resolve_source
from train.eval.knn import KnnSettings, knn_eval
from train.eval.results import RESULT_FIELDS, read_result, result_path
from train.metrics import TIMING_FIELDS

ENC = ["--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-embed-dim", "32",
       "--decoder-num-heads", "2", "--cls-hidden", "32"]
QUIET = ["--data-threads", "1", "--display", "off", "--no-tensorboard"]
RANDOM = ["--ckpt", "random", "--model", "supmae_vit_tiny_patch16", *ENC, "--img-size", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    write_tiny_shards(root / "train", num_samples=32, num_classes=4, per_shard=8, size=(24, 28))
    write_tiny_shards(root / "val", num_samples=11, num_classes=4, per_shard=4, size=(20, 20), split="val", seed=1)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    """A 6-step pre-training run (4 steps per epoch): checkpoints at steps 3 (no metrics record there), 4 and 6."""
    from train.pretrain import run

    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = config_from_args(["--data", str(data[0]), "--out", str(out), "--model", "supmae_vit_tiny_patch16", *ENC,
                            "--img-size", "16", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0.5",
                            "--max-steps", "6", "--lr", "1e-3", "--log-every", "5", "--ckpt-every", "3",
                            "--keep", "5", *QUIET])
    threads = torch.get_num_threads()
    assert run(cfg, DistEnv()) == 0
    torch.set_num_threads(threads)
    assert [c.step for c in list_checkpoints(out / "checkpoints")] == [3, 4, 6]
    return out


class StopAt:
    """Stands in for StopRequest: a stop (as after SIGTERM) once `step` steps are done."""

    def __init__(self, step: int):
        self.step, self.polls, self.received = step, 0, None

    def poll(self) -> bool:
        self.polls += 1
        return self.polls >= self.step


def protocol_run(name: str, args: list[str], stop=None) -> int:
    import importlib

    mod = importlib.import_module(f"train.eval.{name}")
    return mod.run(mod.check(args), DistEnv(), stop)


def records(out: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in recs if r["kind"] == kind]


# ------------------------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("protocol, extra", [
    # the whole fine-tuning recipe: RandAugment, erasing, mixup/cutmix, drop path, EMA, layer decay
    ("finetune", ["--ema", "--ema-decay", "0.9", "--drop-path", "0.1", "--lr", "1e-3"]),
    ("linprobe", ["--lr", "0.1"]),
])
def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_one(data, tmp_path, protocol, extra):
    args = [*RANDOM, "--data", str(data[0]), "--eval-data", str(data[1]), "--batch-size", "4", "--epochs", "2",
            "--warmup-epochs", "0.5", "--log-every", "3", "--ckpt-every", "5", "--keep", "10", *QUIET, *extra]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert protocol_run(protocol, [*args, "--out", str(full)]) == 0
    assert protocol_run(protocol, [*args, "--out", str(cut)], stop=StopAt(7)) == 0  # mid-epoch, mid-interval
    assert not (cut / "eval.json").exists()  # a pre-empted run has no result yet
    assert protocol_run(protocol, [*args, "--out", str(cut), "--resume", "auto"]) == 0

    assert [r["step"] for r in records(full, "train")] == [3, 6, 8, 9, 12, 15, 16]  # 8 steps per epoch
    for kind in ("train", "eval"):
        assert records(cut, kind) == records(full, kind), kind
    a = read_checkpoint(list_checkpoints(full / "checkpoints")[-1].path)
    b = read_checkpoint(list_checkpoints(cut / "checkpoints")[-1].path)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["task"]["best"] == b["task"]["best"]
    if protocol == "finetune":
        assert all(torch.equal(a["task"]["ema"][k], b["task"]["ema"][k]) for k in a["task"]["ema"])
    evals = records(full, "eval")
    assert [(r["step"], r["samples"]) for r in evals] == [(8, 11), (16, 11)]
    assert {"top1", "top5", "loss"} <= set(evals[0])
    result = read_result(full / "eval.json")
    assert (result["top1"], result["top5"]) == (evals[-1]["top1"], evals[-1]["top5"])
    assert result["best"]["top1"] == max(r["top1"] for r in evals)
    assert (full / "checkpoints" / "best.pt").is_file()
    if protocol == "linprobe":  # the frozen backbone did not move
        source = resolve_source("random", "supmae_vit_tiny_patch16",
                                {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                                 "decoder_num_heads": 2, "cls_hidden": 32, "img_size": 16})
        assert torch.equal(a["model"]["backbone.blocks.1.mlp.fc2.weight"], source.state["blocks.1.mlp.fc2.weight"])


# ------------------------------------------------------------------------------------------------------------------
# Result files


def test_result_files_carry_the_checkpoints_step_and_compute(data, pretrained, tmp_path):
    ck6 = pretrained / "checkpoints" / "step-000000006.pt"
    ck3 = pretrained / "checkpoints" / "step-000000003.pt"
    common = ["--data", str(data[0]), "--eval-data", str(data[1]), "--data-threads", "1", "--batch-size", "8"]
    assert protocol_run("knn", ["--ckpt", str(pretrained), *common, "--out", str(tmp_path / "k")]) == 0  # newest
    assert protocol_run("knn", ["--ckpt", str(ck3), *common, "--k", "5"]) == 0
    assert protocol_run("linprobe", ["--ckpt", str(ck6), *common, "--epochs", "1", "--warmup-epochs", "0",
                                     "--log-every", "2", *QUIET]) == 0

    r6 = read_result(result_path(ck6, "knn"))
    assert tuple(r6) == RESULT_FIELDS
    assert read_result(tmp_path / "k" / "eval.json") == r6
    metrics6 = [r for r in records(pretrained, "train") if r["step"] == 6][0]
    ck = read_checkpoint(ck6)
    assert (r6["protocol"], r6["source"], r6["checkpoint"], r6["run"], r6["step"], r6["epoch"]) == (
        "knn", "checkpoint", str(ck6.resolve()), str(pretrained.resolve()), 6, 1)
    assert (r6["pretrain_images"], r6["pretrain_flops"], r6["pretrain_compute_source"]) == (
        48, metrics6["flops"], "metrics.jsonl")
    assert r6["pretrain_flops"] == 48 * ck["compute"]["train_flops_per_image"]
    assert r6["samples"] == 11 and 0 <= r6["top1"] <= r6["top5"] <= 1
    assert r6["metrics"]["bank"] == 32 and r6["settings"]["k"] == 20 and r6["model"]["embed_dim"] == 32
    assert r6["eval_cost"]["images"] == 32 + 11 and r6["world_size"] == 1 and r6["device"] == "cpu"
    assert (r6["environment"]["device"], r6["environment"]["torch_cuda"], r6["environment"]["compile"]) == (
        "cpu", torch.version.cuda, False)

    r3 = read_result(result_path(ck3, "knn"))  # step 3 has no metrics.jsonl record: the checkpoint's totals
    ck = read_checkpoint(ck3)
    assert (r3["step"], r3["settings"]["k"], r3["pretrain_compute_source"]) == (3, 5, "checkpoint")
    assert (r3["pretrain_images"], r3["pretrain_flops"]) == (24, ck["compute"]["flops"])
    assert r3["pretrain_device_hours"] == pytest.approx(ck["compute"]["device_seconds"] / 3600)

    probe = read_result(result_path(ck6, "linprobe"))  # several protocols beside one checkpoint, no collision
    assert probe["protocol"] == "linprobe" and probe["step"] == 6 and probe["best"]["epoch"] == 1
    assert probe["eval_cost"]["steps"] == 4 and probe["eval_cost"]["images"] == 32
    assert probe["environment"]["device"] == "cpu" and probe["environment"]["compile"] is False
    assert read_result(pretrained / "eval" / "step-000000006.linprobe" / "eval.json") == probe  # default --out


def test_knn_eval_library_reuses_loaders_and_accepts_models(data, pretrained):
    loaders = [build_loader(LoaderConfig(str(d), 4, 16, train=False, device="cpu", num_threads=1)) for d in data]
    settings = KnnSettings(k=5, train_samples=10)
    ck = pretrained / "checkpoints" / "step-000000006.pt"
    first = knn_eval(ck, *loaders, settings)
    assert (first.bank, first.samples, first.images) == (10, 11, 21)
    assert (loaders[0].epoch, loaders[0].batch) == (0, 0)  # the bank's partial read was undone
    again = knn_eval(resolve_source(ck), *loaders, settings)  # same subset, same answer
    assert (again.top1, again.top5) == (first.top1, first.top5)
    model = create_model("supmae_vit_tiny_patch16", **read_checkpoint(ck)["config"]["model"])
    model.load_state_dict(read_checkpoint(ck)["model"])
    in_memory = knn_eval(model, *loaders, settings)
    assert (in_memory.top1, in_memory.top5) == (first.top1, first.top5)
    whole = knn_eval(ck, *loaders, KnnSettings(k=5))
    assert whole.bank == 32


# ------------------------------------------------------------------------------------------------------------------
# Pre-training helps


@pytest.mark.slow
def test_finetuning_a_pretrained_encoder_beats_random_init(tmp_path):
    """Shapes (pipeline.synthetic): pre-train a tiny SupMAE for 10 epochs on 800 images, then fine-tune it and the
    same model from random init identically on 64 labelled images (the low-shot setting where pre-training shows)
    and compare top-1 on 200 held-out images. Seeds fixed; heavy regularisers (mixup, RandAugment, erasing) off,
    as they need long schedules. Observed here: 0.345 vs 0.245."""
    from pipeline.shards.sharding import ShardConfig, run_sharding
    from pipeline.synthetic import make_shapes_dataset
    from train.pretrain import run

    make_shapes_dataset(tmp_path / "img", train_per_class=200, val_per_class=50, size=32, num_classes=4)
    make_shapes_dataset(tmp_path / "few", train_per_class=16, val_per_class=1, size=32, num_classes=4, seed=7)
    train, val, few = tmp_path / "train", tmp_path / "val", tmp_path / "few-train"
    run_sharding(ShardConfig(src=tmp_path / "img" / "train", out=train, shard_samples=200, workers=1))
    run_sharding(ShardConfig(src=tmp_path / "img" / "val", out=val, split="val", shard_samples=200, workers=1,
                             class_map=train))
    run_sharding(ShardConfig(src=tmp_path / "few" / "train", out=few, shard_samples=64, workers=1, class_map=train))

    enc = ["--patch-size", "4", "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--decoder-embed-dim", "32",
           "--decoder-num-heads", "2", "--cls-hidden", "64", "--img-size", "32"]
    common = [*QUIET, "--log-every", "1000", "--ckpt-every", "0", "--seed", "0", "--random-area", "0.5,1"]
    cfg = config_from_args(["--data", str(train), "--out", str(tmp_path / "pre"), "--model", "supmae_vit_tiny_patch16",
                            *enc, *common, "--epochs", "10", "--warmup-epochs", "1", "--batch-size", "32",
                            "--blr", "1.5e-2", "--mask-ratio", "0.5", "--cls-loss-ratio", "1", "--temperature", "1"])
    assert run(cfg, DistEnv()) == 0
    top1 = {}
    for name, ckpt in (("pretrained", ["--ckpt", str(tmp_path / "pre")]),
                       ("random", ["--ckpt", "random", "--model", "supmae_vit_tiny_patch16", *enc])):
        out = tmp_path / name
        assert protocol_run("finetune", [*ckpt, "--data", str(few), "--eval-data", str(val), "--out", str(out),
                                         *common, "--epochs", "10", "--warmup-epochs", "0", "--batch-size", "16",
                                         "--blr", "2e-2", "--mixup", "0", "--cutmix", "0", "--randaug-n", "0",
                                         "--reprob", "0", "--smoothing", "0"]) == 0
        top1[name] = read_result(out / "eval.json")["top1"]
    assert top1["pretrained"] >= top1["random"] + 0.05, top1


@pytest.mark.slow  # two probes on 128 images: 7 s on the idle 2-core build machine
def test_small_probe_recipe_learns_on_a_tiny_set_where_the_imagenet_one_warns(tmp_path):
    """A probe on 128 colour-coded images (4 classes, chance 25%) at batch 32: MAE's ImageNet recipe scales its LARS
    lr down to 0.0125 and would end at chance (measured: top-1 25% after 90 epochs at batch 16), so it warns at
    start-up and names the small recipe; the small recipe (lr 12.8, 20 epochs) learns the classes."""
    write_tiny_shards(tmp_path / "train", num_samples=128, num_classes=4, per_shard=32, size=(20, 20))
    write_tiny_shards(tmp_path / "val", num_samples=40, num_classes=4, per_shard=20, size=(20, 20), split="val",
                      seed=1)
    data = ["--data", str(tmp_path / "train"), "--eval-data", str(tmp_path / "val"), *RANDOM, *QUIET,
            "--batch-size", "32", "--log-every", "1000"]
    assert protocol_run("linprobe", [*data, "--out", str(tmp_path / "in1k"), "--max-steps", "1"]) == 0
    log = (tmp_path / "in1k" / "log.txt").read_text()
    assert ("warning: effective batch 32 (32 x 1 accum x 1 processes) is 512x below the 16384 the recipe mae_in1k "
            "is tuned for") in log and "use --recipe small" in log
    assert protocol_run("linprobe", [*data, "--out", str(tmp_path / "small"), "--recipe", "small",
                                     "--eval-every", "20"]) == 0
    assert "warning: effective batch" not in (tmp_path / "small" / "log.txt").read_text()
    result = read_result(tmp_path / "small" / "eval.json")
    assert result["top1"] >= 0.75, result["top1"]
