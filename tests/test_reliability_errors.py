"""Training-side failures that are foreseeable end as a message naming the file / shard / sample and exit status 2,
never a traceback, also through the multi-process launcher: a corrupt shard met while training, a full disk while
checkpointing, --out a file, eval data with another class map, a partial state dict given to an evaluation,
metrics.jsonl lines that are not UTF-8."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import create_model
from pipeline.fileio import HashingWriter
from pipeline.shards.shard_format import parse_index
from tests.conftest import write_tiny_shards
from tools import launch
from train.compare.report import read_train_curve
from train.eval.encoder import pretraining_compute
from train.metrics import LOG_NAME, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
ENC = ["--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32",
       "--decoder-num-heads", "2", "--cls-hidden", "32"]
RUN = ["--model", "supmae_vit_tiny_patch16", *ENC, "--img-size", "16", "--batch-size", "4", "--epochs", "2",
       "--warmup-epochs", "0", "--lr", "1e-3", "--data-threads", "1", "--display", "off", "--no-tensorboard",
       "--log-every", "2", "--ckpt-every", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    write_tiny_shards(root / "train", num_samples=16, num_classes=2, per_shard=8, size=(20, 20))
    write_tiny_shards(root / "val", num_samples=4, num_classes=2, per_shard=4, size=(20, 20), split="val")
    return root / "train", root / "val"


def run_launcher(args: list[str], capsys) -> tuple[int, str]:
    code = launch.main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


# ----------------------------------------------------------------------------------------------------------------
# Exit statuses through the launcher

_LAUNCH = ("import sys, tools.launch as l; l.PROTOCOLS['exit'] = l.Protocol('tests.exit_status_worker', 'test'); "
           "sys.exit(l.main(['exit', '--nproc', '2']))")


@pytest.mark.slow
@pytest.mark.parametrize("status, launcher, says", [
    ("2", 2, "rank 1 failed first, with exit status 2"),
    ("1", 1, "rank 1 failed first, with exit status 1"),
    ("signal:9", 137, "rank 1 was killed by SIGKILL (the out-of-memory killer is the usual sender"),
])
def test_a_ranks_exit_status_is_the_launchers(status, launcher, says):
    env = dict(os.environ, PYTHONPATH=str(ROOT), EXIT_STATUS_RANK1=status, OMP_NUM_THREADS="1")
    env.pop("EXIT_STATUS_RANK0", None)
    proc = subprocess.run([sys.executable, "-c", _LAUNCH], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == launcher, proc.stderr[-2000:]
    assert f"launch: {says}" in proc.stderr


def test_bad_input_before_start_is_exit_status_2(data, tmp_path, capsys):
    train, val = data
    (tmp_path / "a-file").write_text("x")
    code, out = run_launcher(["pretrain", "--data", str(train), "--out", str(tmp_path / "a-file"), *RUN,
                              "--dry-run"], capsys)
    assert code == 2 and f"pretrain: error: --out {tmp_path / 'a-file'}: {tmp_path / 'a-file'} is a file" in out

    # Eval data numbered against another class map: pretrain checks it as knn / linprobe / finetune do.
    other = tmp_path / "other-val"
    write_tiny_shards(other, num_samples=4, num_classes=2, per_shard=4, size=(20, 20), split="val")
    manifest = json.loads((other / "manifest.json").read_text())
    for c in manifest["classes"]:
        c["wnid"] = "x" + c["wnid"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, out = run_launcher(["pretrain", "--data", str(train), "--out", str(tmp_path / "run"), "--eval-data",
                              str(other), "--eval-every", "1", *RUN, "--dry-run"], capsys)
    assert code == 2 and f"--eval-data {other} numbers its classes differently from the training data" in out
    code, _ = run_launcher(["pretrain", "--data", str(train), "--out", str(tmp_path / "run"), "--eval-data", str(val),
                            "--eval-every", "1", *RUN, "--dry-run"], capsys)
    assert code == 0


def test_a_batch_larger_than_the_data_names_the_option_to_change(data, tmp_path, capsys):
    code, text = run_launcher(["pretrain", "--data", str(data[0]), "--out", str(tmp_path / "run"), *RUN,
                               "--batch-size", "64"], capsys)
    assert code == 2 and ("pretrain: error: batch_size 64 is larger than the 16 samples the smallest rank reads (16 "
                          "samples over 1 ranks) and drop_last=True (training: incomplete batches are dropped) would "
                          "leave no batch; lower --batch-size to at most 16 (or set drop_last=False)") in text, text
    assert "Traceback" not in text and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# During training


def corrupt_sample(folder: Path, shard_index: int, sample: int) -> str:
    """Overwrite a sample's image bytes in place (same size: the start-up size check passes)."""
    tar = sorted(folder.glob("*.tar"))[shard_index]
    comp = next(c for c in parse_index(tar.with_suffix(".idx"))[sample] if c.ext == "jpg")
    with open(tar, "r+b") as f:
        f.seek(comp.offset)
        f.write(b"\0" * comp.size)
    return comp.name.split(".")[0]


def test_a_corrupt_shard_met_while_training_names_shard_and_sample(data, tmp_path, capsys):
    train = tmp_path / "train"
    write_tiny_shards(train, num_samples=16, num_classes=2, per_shard=8, size=(20, 20))
    key = corrupt_sample(train, 1, 3)
    out = tmp_path / "run"
    code, text = run_launcher(["pretrain", "--data", str(train), "--out", str(out), *RUN, "--data-backend", "torch"],
                              capsys)
    assert code == 2, text
    assert f"train-000001.tar: sample '{key}' is not a decodable image" in text
    assert f"run `./launch.sh shard --verify {train}`" in text and "Traceback" not in text
    assert f"sample '{key}'" in (out / LOG_NAME).read_text()


def test_a_corrupt_shard_met_by_the_dali_loader_names_shard_and_sample(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (the torch backend test covers the rest)")
    from pipeline.loaders.base import LoaderConfig
    from pipeline.loaders.build import build_loader
    from pipeline.shards.shard_format import ShardFormatError

    folder = tmp_path / "shards"
    write_tiny_shards(folder, num_samples=10, num_classes=2, per_shard=5, size=(24, 24))
    key = corrupt_sample(folder, 1, 2)
    loader = build_loader(LoaderConfig(data=str(folder), batch_size=5, img_size=16, device="cpu", num_threads=1,
                                       decode="dali-cpu", train=False))
    with pytest.raises(ShardFormatError) as info:
        list(loader)
    msg = str(info.value)
    assert "train-000001.tar: corrupt: its sha256 differs from the manifest; " in msg
    assert f"sample {key}: jpg does not decode" in msg and f"./launch.sh shard --verify {folder}" in msg


def test_disk_full_while_checkpointing_is_a_message_in_the_log_and_exit_status_2(data, tmp_path, capsys,
                                                                                 monkeypatch):
    real_write = HashingWriter.write

    def write(self, b):
        if self.bytes > 1000:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, b)

    monkeypatch.setattr(HashingWriter, "write", write)
    out = tmp_path / "run"
    code, text = run_launcher(["pretrain", "--data", str(data[0]), "--out", str(out), *RUN, "--data-backend",
                               "torch"], capsys)
    assert code == 2
    expected = f"disk full while writing checkpoint {out / 'checkpoints' / 'step-000000002.pt'} ("
    assert f"pretrain: error: {expected}" in text and "inline_container" not in text and "Traceback" not in text
    assert expected in (out / LOG_NAME).read_text()
    assert not list((out / "checkpoints").iterdir())  # nothing half-written


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (writes fail with ENOSPC)")
@pytest.mark.parametrize("name, what", [("metrics.jsonl", "metrics record"), ("log.txt", "log line")])
def test_disk_full_while_writing_the_run_log_is_a_message_and_exit_status_2(data, tmp_path, capsys, name, what):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to("/dev/full")  # every write fails as on a full file system
    code, text = run_launcher(["pretrain", "--data", str(data[0]), "--out", str(out), *RUN, "--data-backend",
                               "torch", "--display", "plain"], capsys)
    assert code == 2, text
    assert f"pretrain: error: disk full while writing {what} {out / name} (" in text and "Traceback" not in text
    assert "continue the run with --resume auto" in text


def test_disk_full_in_a_tracker_is_a_message_and_exit_status_2(data, tmp_path, capsys, monkeypatch):
    from train.tracking.tensorboard_sink import TensorBoardSink

    def record(self, rec):  # TensorBoard's writer thread met a full disk; the next call raises its error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TensorBoardSink, "record", record)
    out = tmp_path / "run"
    code, text = run_launcher(["pretrain", "--data", str(data[0]), "--out", str(out),
                               *[a for a in RUN if a != "--no-tensorboard"], "--data-backend", "torch"], capsys)
    assert code == 2, text
    assert f"pretrain: error: disk full while writing TensorBoard events {out / 'tb'} (" in text
    assert "Traceback" not in text


def test_a_resume_refused_at_start_up_leaves_the_run_as_it_was(data, tmp_path, capsys):
    """Setting the newer checkpoints aside and cutting metrics.jsonl back happen only once the checkpoint has been
    loaded: a resume refused while the run is built (a loader position that does not fit another batch size, or
    another number of micro-batches per step) changes nothing, so the next `--resume auto` continues from the newest checkpoint."""
    out = tmp_path / "run"
    base = ["pretrain", "--data", str(data[0]), "--out", str(out), *RUN, "--data-backend", "torch", "--keep", "5"]
    code, text = run_launcher([*base, "--max-steps", "6"], capsys)
    assert code == 0, text
    folder = out / "checkpoints"
    before = sorted(p.name for p in folder.iterdir())
    assert before == ["step-000000002.pt", "step-000000004.pt", "step-000000006.pt"]
    metrics = (out / "metrics.jsonl").read_bytes()
    code, text = run_launcher([*base, "--max-steps", "6", "--batch-size", "2", "--resume",
                               str(folder / "step-000000002.pt")], capsys)
    assert code == 2 and "loader state does not fit this loader (batch_size: saved 4, now 2)" in text, text
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing set aside
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing cut
    # Another --accum-steps: the same data position would be another step (epochs, schedule and records off).
    code, text = run_launcher([*base, "--max-steps", "6", "--accum-steps", "2", "--resume",
                               str(folder / "step-000000002.pt")], capsys)
    assert code == 2 and ("pretrain: error: the checkpoint's step 2 is at batch 2 of epoch 0 of the data, which is "
                          "not that step in this configuration (4 batches per epoch in groups of --accum-steps 2: 2 "
                          "steps per epoch; the run used --accum-steps 1): the micro-batches per step cannot change "
                          "within a run; resume with the run's own --accum-steps") in text, text
    assert "Traceback" not in text
    # Another model: the fields that differ are named, not two whole configurations printed.
    code, text = run_launcher([*base, "--max-steps", "6", "--depth", "2", "--img-size", "20", "--patch-size", "5",
                               "--resume", "auto"], capsys)
    assert code == 2 and (f"pretrain: error: the checkpoint {folder / 'step-000000006.pt'} holds a different model "
                          "than this configuration (img_size: 16 in the checkpoint, 20 here; patch_size: 4 in the "
                          "checkpoint, 5 here; depth: 1 in the checkpoint, 2 here); resume with the run's own --model "
                          "and model options\n") in text, text
    assert sorted(p.name for p in folder.iterdir()) == before and (out / "metrics.jsonl").read_bytes() == metrics
    # MAE's habit of --resume with a path, given the run folder (or its checkpoints/): says what to write instead.
    for given in (out, folder):
        code, text = run_launcher([*base, "--resume", str(given), "--dry-run"], capsys)
        assert code == 2 and (f"pretrain: error: --resume {given} is a folder: --resume takes auto (the newest "
                              "readable checkpoint of --out) or a checkpoint file; to continue the run in "
                              f"{out} use --out {out} --resume auto\n") in text, text
    code, text = run_launcher([*base, "--max-steps", "8", "--resume", "auto"], capsys)
    assert code == 0, text
    assert f"resumed from {folder / 'step-000000006.pt'} at step 6" in (out / LOG_NAME).read_text()


# ----------------------------------------------------------------------------------------------------------------
# Evaluations given a partial state dict


@pytest.mark.parametrize("protocol", ["knn", "linprobe", "finetune"])
def test_a_partial_state_dict_given_to_an_evaluation_is_named(data, tmp_path, capsys, protocol):
    model = create_model("mae_vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=1)
    weights = model.state_dict()
    del weights["blocks.0.attn.qkv.weight"]
    pth = tmp_path / "partial.pth"
    torch.save({"model": weights}, pth)
    train, val = data
    loop = [] if protocol == "knn" else ["--display", "off", "--no-tensorboard"]
    code, out = run_launcher([protocol, "--ckpt", str(pth), "--num-heads", "2", "--data", str(train), "--eval-data",
                              str(val), "--out", str(tmp_path / protocol), "--batch-size", "4", "--data-threads",
                              "1", "--data-backend", "torch", *loop], capsys)
    assert code == 2, out
    assert f"{protocol}: error: {pth}: encoder weights missing ['blocks.0.attn.qkv.weight']" in out
    assert "Traceback" not in out


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_lines_that_are_not_utf8_are_named_and_passed_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "train", "step": s, "flops": s * 1e15, "images": s, "device_hours": 0.1 * s} for s in (1, 2, 3)]
    lines = [json.dumps(r).encode() for r in good]
    lines.insert(2, b'{"kind": "train", "step": 9\xff}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    warnings: list[str] = []
    assert [p.step for p in read_train_curve(path, warnings.append)] == [1, 2, 3]
    assert warnings == [f"{path}:3: not valid UTF-8 (byte 0xff at column 28); line skipped"]
    assert pretraining_compute(tmp_path, 3, None)["source"] == "metrics.jsonl"
    assert truncate_metrics(path, after_step=2) == 2  # the damaged line and step 3
    assert path.read_bytes() == lines[0] + b"\n" + lines[1] + b"\n"
