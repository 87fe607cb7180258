"""Pre-training as users run it, in real processes: SIGTERM -> checkpoint + exit 0, `kill -9` -> exact resume,
and 2-process gloo DDP (identical replicas, different data per rank)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import write_tiny_shards
from train.checkpoint import list_checkpoints, read_checkpoint
from train.config import config_from_args
from train.distributed import DistEnv
from train.metrics import TIMING_FIELDS
from train.pretrain import run

ROOT = Path(__file__).resolve().parents[1]
# --device cpu: the runs are compared bit for bit with a CPU reference, also on a machine with GPUs.
RUN = ["--device", "cpu", "--model", "supmae_vit_tiny_patch16", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
       "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-num-heads", "2",
       "--cls-hidden", "32", "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "1", "--lr", "2e-3",
       "--data-threads", "1", "--shuffle-buffer", "16", "--display", "plain", "--no-tensorboard",
       "--log-every", "3", "--ckpt-every", "2", "--keep", "20"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "train"
    write_tiny_shards(folder, num_samples=48, num_classes=3, per_shard=8, size=(24, 28))  # 12 steps per epoch
    return folder


def launch(data: Path, out: Path, *args: str) -> subprocess.Popen:
    """`./launch.sh pretrain ...` without the shell wrapper (one process unless args say --nproc: the launcher execs
    the entry; without --nproc 1 it would start one process per visible GPU)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    nproc = [] if "--nproc" in args else ["--nproc", "1"]
    return subprocess.Popen([sys.executable, "-m", "tools.launch", "pretrain", *nproc, "--data", str(data), "--out",
                             str(out), *RUN, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, min_step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [c.step for c in list_checkpoints(folder)]
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {min_step}: {proc.communicate()[0]}")
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint >= {min_step} within {timeout}s")


def records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in recs]


@pytest.mark.slow
def test_sigterm_then_kill_9_then_resume_reproduces_the_uninterrupted_run(shards, tmp_path):
    # The uninterrupted reference runs in this process, with the subprocesses' single thread (CPU results depend
    # on the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(config_from_args(["--data", str(shards), "--out", str(tmp_path / "ref"), *RUN]), DistEnv()) == 0
    finally:
        torch.set_num_threads(threads)
    reference = records(tmp_path / "ref")
    assert [r["step"] for r in reference] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36]

    # 1. SIGTERM (cluster pre-emption): checkpoint of the current step, exit status 0.
    out = tmp_path / "run"
    proc = launch(shards, out)
    wait_for_checkpoint(proc, out / "checkpoints", 2)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 0, log
    assert "stop signal (SIGTERM): checkpoint of step" in log
    stopped = list_checkpoints(out / "checkpoints")[-1]
    assert read_checkpoint(stopped.path)["step"] == stopped.step < 36

    # 2. Resume, then kill -9 mid-run (no chance to clean up).
    proc = launch(shards, out, "--resume", "auto")
    wait_for_checkpoint(proc, out / "checkpoints", stopped.step + 4)
    proc.send_signal(signal.SIGKILL)
    rc, log = finish(proc)
    assert rc == -signal.SIGKILL, log
    killed_at = list_checkpoints(out / "checkpoints")[-1].step
    assert killed_at < 36

    # 3. Resume again: the same records, bit for bit, and the same final weights.
    rc, log = finish(launch(shards, out, "--resume", "auto"))
    assert rc == 0, log
    assert f"resumed from {out / 'checkpoints'}" in log
    assert records(out) == reference
    a = read_checkpoint(list_checkpoints(tmp_path / "ref" / "checkpoints")[-1].path)
    b = read_checkpoint(list_checkpoints(out / "checkpoints")[-1].path)
    assert a["step"] == b["step"] == 36
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------------------------------------------------------
# 2-process DDP on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from model import create_model
    from pipeline.loaders.base import LoaderConfig
    from pipeline.loaders.build import build_loader
    from train.config import config_from_args
    from train.distributed import destroy_distributed, init_distributed, rank_seed, seed_all
    from train.trainer import Trainer

    env = init_distributed("cpu")
    cfg = config_from_args(["--data", data, "--out", out, *RUN, "--max-steps", "5", "--num-classes", "3"])
    seed_all(cfg.seed)
    model = create_model(cfg.model, **cfg.model_config().to_dict())
    seed_all(rank_seed(cfg.seed, rank))
    loader = build_loader(LoaderConfig(data, cfg.batch_size, cfg.img_size, backend="dali", device="cpu",
                                       num_threads=1, seed=cfg.seed, shuffle_buffer=16), rank, world)
    seen: list[torch.Tensor] = []

    class Recording:  # the real loader, remembering what this rank was given
        def __getattr__(self, name):
            return getattr(loader, name)

        def __iter__(self):
            for b in loader:
                seen.append(b.images.clone())
                yield b

    trainer = Trainer(cfg, model, Recording(), env)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()], "initial": initial, "seen": seen,
                "world": trainer.world_size, "peak_lr": trainer.peak_lr}, Path(out) / f"rank{rank}.pt")
    destroy_distributed()


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical_on_different_data(shards, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(shards), str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2 and r0["peak_lr"] == 2e-3
    assert len(r0["seen"]) == len(r1["seen"]) == 5
    assert all(not torch.equal(a, b) for a, b in zip(r0["seen"], r1["seen"], strict=True))  # each rank reads its own samples
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))  # ...and the replicas agree
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], r0["initial"], strict=True))  # and they did train
    ck = read_checkpoint(list_checkpoints(out / "checkpoints")[-1].path)
    assert ck["world_size"] == 2 and ck["step"] == 5
    assert [s["fingerprint"]["rank"] for s in ck["loader"]] == [0, 1]
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # per-rank masking streams


@pytest.mark.slow
def test_launcher_runs_torchrun_and_forwards_sigusr1(shards, tmp_path):
    """`--nproc 2`: the launcher runs torchrun's agent; SLURM's SIGUSR1 warning reaches both workers, which agree on
    a step, checkpoint it and exit 0, and so does the launcher."""
    out = tmp_path / "run"
    proc = launch(shards, out, "--nproc", "2", "--epochs", "50", "--ckpt-every", "1000")
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    rc, log = finish(proc)
    assert rc == 0, log
    assert "[local, torchrun]" in log and "stop signal (SIGUSR1): checkpoint of step" in log
    ck = read_checkpoint(list_checkpoints(out / "checkpoints")[-1].path)
    assert ck["world_size"] == 2 and len(ck["loader"]) == 2 and ck["step"] < 50 * 6
