"""Evaluation across 2 real gloo processes: every eval sample counted once (padding never), k-NN equal to the
single-process answer, and DDP fine-tuning / probing with identical replicas."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.build import build_loader
from tests.conftest import write_tiny_shards
from train.distributed import DistEnv
from train.eval.accuracy import TopKCounter
from train.eval.knn import KnnSettings, knn_eval

ENC = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
       "cls_hidden": 32, "img_size": 16}
# RandAugment's first DALI build takes seconds per process; the loader tests cover it.
EXTRA = {"finetune": ["--randaug-n", "0"], "linprobe": []}
RANDOM = ["--ckpt", "random", "--model", "supmae_vit_tiny_patch16",
          *(x for k, v in ENC.items() for x in (f"--{k.replace('_', '-')}", str(v)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scores_of(images: torch.Tensor) -> torch.Tensor:
    """A fixed 'classifier' of the pixels (4 classes), the same in every process."""
    w = torch.randn(images[0].numel(), 4, generator=torch.Generator().manual_seed(0))
    return images.flatten(1).float() @ w


def eval_counts(data: str, env: DistEnv) -> dict:
    loader = build_loader(LoaderConfig(data, 4, 16, train=False, device="cpu", num_threads=1), env.rank, env.world_size)
    counter = TopKCounter((1, 2))
    for b in loader:
        counter.update(scores_of(b.images), b.labels, b.valid, b.num_valid)
    return {**counter.result(env), "local": counter.samples, "batches": len(loader)}


def knn_results(train: str, val: str, env: DistEnv) -> dict:
    from train.eval.encoder import resolve_source

    loaders = [build_loader(LoaderConfig(d, 4, 16, train=False, device="cpu", num_threads=1), env.rank,
                            env.world_size) for d in (train, val)]
    source = resolve_source("random", "supmae_vit_tiny_patch16", ENC, seed=1)
    full = knn_eval(source, *loaders, KnnSettings(k=5), env)
    subset = knn_eval(source, *loaders, KnnSettings(k=5, train_samples=9), env)
    return {"full": full.to_dict(), "subset_bank": subset.bank, "subset_images": subset.images}


def _worker(rank: int, world: int, port: int, train: str, val: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from train.distributed import destroy_distributed, init_distributed
    from train.eval.finetune import PROTOCOL as FINETUNE
    from train.eval.linprobe import PROTOCOL as LINPROBE

    env = init_distributed("cpu")
    result = {"eval": eval_counts(val, env), "knn": knn_results(train, val, env)}
    for proto in (FINETUNE, LINPROBE):
        cfg = proto.check([*RANDOM, "--data", train, "--eval-data", val, "--out", f"{out}/{proto.name}",
                           "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-3",
                           "--data-threads", "1", "--display", "off", "--no-tensorboard", "--log-every", "2",
                           *EXTRA[proto.name]])
        trainer, log, source = proto.build(cfg, env)  # what proto.run does, keeping this rank's trainer
        try:
            assert trainer.train().status == "completed"
            proto.finish(cfg, env, trainer, source, log)
        finally:
            log.close()
        result[proto.name] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    destroy_distributed()


@pytest.mark.slow
def test_two_ranks_count_every_sample_once_and_train_identical_replicas(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    write_tiny_shards(train, num_samples=19, num_classes=4, per_shard=5, size=(24, 28))
    write_tiny_shards(val, num_samples=11, num_classes=4, per_shard=4, size=(20, 20), split="val", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(train), str(val), str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))

    # Eval counting: 11 samples over 2 ranks of batch 4 = 2 batches each (5 + 6 real, 3 + 2 padding).
    single = eval_counts(str(val), DistEnv())
    assert (r0["eval"]["local"], r1["eval"]["local"], r0["eval"]["batches"]) == (5, 6, 2)
    for r in (r0, r1):
        assert {k: r["eval"][k] for k in ("top1", "top2", "samples")} == \
               {k: single[k] for k in ("top1", "top2", "samples")}
    assert single["samples"] == 11

    # k-NN: the whole bank gathered on both ranks gives the single-process answer; a subset of 9 is 4 + 5.
    torch.set_num_threads(1)
    from train.eval.encoder import resolve_source

    loaders = [build_loader(LoaderConfig(str(d), 4, 16, train=False, device="cpu", num_threads=1)) for d in (train, val)]
    ref = knn_eval(resolve_source("random", "supmae_vit_tiny_patch16", ENC, seed=1), *loaders, KnnSettings(k=5))
    for r in (r0, r1):
        got = r["knn"]["full"]
        assert (got["top1"], got["top5"], got["samples"], got["bank"], got["images"]) == (
            ref.top1, ref.top5, 11, 19, 30)
        assert (r["knn"]["subset_bank"], r["knn"]["subset_images"]) == (9, 20)

    # DDP: identical replicas after fine-tuning and probing, and the evaluations counted 11 samples.
    for name in ("finetune", "linprobe"):
        assert r0[name].keys() == r1[name].keys()
        differ = [k for k in r0[name] if not torch.equal(r0[name][k], r1[name][k])]
        assert not differ, (name, differ)
        evals = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [e["samples"] for e in evals if e["kind"] == "eval"] == [11]
        result = json.loads((out / name / "eval.json").read_text())
        assert (result["world_size"], result["samples"]) == (2, 11)
