"""Checkpoints never lose the run: a digest of every file's bytes verified on load, one selection rule for resume and
pruning (the checkpoint just written and the newest readable one are never deleted, unreadable files never count
as kept), an abandoned timeline set aside (never picked by --resume auto), durable writes, a full disk named."""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pipeline.fileio as fileio
import train.checkpoint as ckpt
from pipeline.fileio import DiskFullError, HashingWriter
from train.checkpoint import (
    ABANDONED_PREFIX,
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    UNREADABLE_DIR,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    select_checkpoint,
    stored_digest,
)
from train.config import TrainConfig
from train.distributed import DistEnv
from train.entry import find_resume_state, resume_trainer

TRAIN = TrainConfig(data="unused", out="unused").to_dict()


def state(step: int, protocol: str | None = None) -> dict:
    config = {"train": TRAIN} if protocol is None else {"train": TRAIN, "protocol": protocol}
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "epoch": 0,
            "model": {"w": torch.full((64,), float(step))}, "optimizer": {}, "scaler": None, "loader": [{}],
            "rng": [{}], "world_size": 1, "compute": {}, "config": config}


@pytest.fixture(autouse=True)
def forget_verified(monkeypatch):
    """Each test starts with no file known to be good (the cache spares re-reading files this process wrote)."""
    monkeypatch.setattr(ckpt, "_verified", {})


def forget() -> None:
    ckpt._verified.clear()


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the stored tensor data: torch.load still succeeds and returns a different value."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    local = info.header_offset  # the local header's own name and extra lengths (torch pads the extra field)
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little") + int.from_bytes(
        data[local + 28 : local + 30], "little")
    data[start + 8] ^= 0x40  # inside the third float32 of "w"
    path.write_bytes(bytes(data))


def cfg_for(out: Path, resume: str) -> TrainConfig:
    return TrainConfig(data="unused", out=str(out), resume=resume)


class Loading:
    """What `resume_trainer` uses of a Trainer: its configuration, and loading a state (which sets the step)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.step, self.loader = cfg, 0, SimpleNamespace(epoch=0)

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def resume(cfg: TrainConfig, notes: list[str]) -> str:
    """Choose and load the checkpoint as a run does; returns its path."""
    chosen = find_resume_state(cfg, DistEnv(), notes)
    resume_trainer(Loading(cfg), chosen, notes, DistEnv())
    return chosen.path


def test_every_checkpoint_carries_a_digest_and_stays_a_plain_torch_file(tmp_path):
    path = save_checkpoint(state(10), tmp_path, 10)
    assert len(stored_digest(path)) == 64
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.full((64,), 10.0))
    assert zipfile.ZipFile(path).comment.startswith(b"supmae-fast-sha256:")
    assert read_checkpoint(path)["step"] == 10


def test_a_flipped_byte_is_detected_named_and_passed_over(tmp_path):
    for step in (10, 20):
        save_checkpoint(state(step), tmp_path, step)
    newest = tmp_path / "step-000000020.pt"
    flip_tensor_byte(newest)
    forget()
    # torch itself does not notice: without the digest this resumes into wrong weights.
    assert not torch.equal(torch.load(newest, weights_only=True)["model"]["w"], torch.full((64,), 20.0))
    with pytest.raises(ValueError, match=f"{newest}: digest mismatch"):
        read_checkpoint(newest)
    notes: list[str] = []
    path, loaded = latest_checkpoint(tmp_path, warn=notes.append)
    assert path.name == "step-000000010.pt" and loaded["step"] == 10
    assert notes == [f"skipped checkpoint step-000000020.pt: {newest}: digest mismatch: its bytes changed after it "
                     "was written (disk damage or a bad copy), so it is not used; falling back to an older one"]


def test_files_without_a_digest_are_checked_by_their_zip_crcs(tmp_path):
    """Checkpoints written before digests existed: torch's zip members carry CRC-32s that torch never checks."""
    old = tmp_path / "step-000000010.pt"
    torch.save(state(10), old)
    assert stored_digest(old) is None and read_checkpoint(old)["step"] == 10
    flip_tensor_byte(old)
    forget()
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        read_checkpoint(old)


def test_resume_auto_falls_back_names_what_it_passed_over_and_moves_it_aside(tmp_path):
    folder = tmp_path / CHECKPOINT_DIR
    for step in (10, 20, 30):
        save_checkpoint(state(step), folder, step)
    flip_tensor_byte(folder / "step-000000030.pt")
    (folder / "step-000000040.pt").write_bytes(b"garbage from a partial copy")
    forget()
    notes: list[str] = []
    chosen = find_resume_state(cfg_for(tmp_path, "auto"), DistEnv(), notes)
    assert Path(chosen.path).name == "step-000000020.pt" and chosen.state["step"] == 20
    assert notes[0].startswith("skipped checkpoint step-000000040.pt: ") and "not a readable checkpoint" in notes[0]
    assert notes[1].startswith("skipped checkpoint step-000000030.pt: ") and "digest mismatch" in notes[1]
    # Choosing reads only: the files move once the checkpoint is loaded (a refused resume changes nothing).
    assert [c.step for c in list_checkpoints(folder)] == [10, 20, 30, 40]
    resume_trainer(Loading(cfg_for(tmp_path, "auto")), chosen, notes, DistEnv())
    # Damaged files go where pruning puts them, not into an "abandoned timeline" one could continue.
    assert notes[2] == ("resuming step 20: the 2 damaged newer checkpoint(s) passed over (step-000000030.pt, "
                        f"step-000000040.pt) were moved to {folder / UNREADABLE_DIR}")
    assert notes[3] == f"resumed from {chosen.path} at step 20 (epoch 0)"
    assert sorted(p.name for p in (folder / UNREADABLE_DIR).iterdir()) == ["step-000000030.pt", "step-000000040.pt"]
    assert not list(folder.glob(f"{ABANDONED_PREFIX}*"))

    # The run goes on (keep=1): the checkpoint it writes survives pruning, the next --resume auto picks it, and
    # nothing set aside is touched.
    new = save_checkpoint(state(21), folder, 21)
    pruned = prune_checkpoints(folder, keep=1, protect=new)
    assert sorted(p.name for p in pruned.removed) == ["step-000000010.pt", "step-000000020.pt"]
    assert [c.path.name for c in list_checkpoints(folder)] == ["step-000000021.pt"]
    assert select_checkpoint(folder).chosen.path == new
    assert sorted(p.name for p in (folder / UNREADABLE_DIR).iterdir()) == ["step-000000030.pt", "step-000000040.pt"]


def test_resuming_an_older_checkpoint_on_purpose_sets_the_newer_ones_aside(tmp_path):
    folder = tmp_path / CHECKPOINT_DIR
    for step in (10, 20, 30):
        save_checkpoint(state(step), folder, step, permanent_epoch=3 if step == 30 else None)
    notes: list[str] = []
    resume(cfg_for(tmp_path, str(folder / "step-000000010.pt")), notes)
    aside = folder / f"{ABANDONED_PREFIX}000000010"
    assert notes[0] == ("resuming step 10: the 2 newer checkpoint(s) of the abandoned timeline "
                        f"(step-000000020.pt, epoch-0003-step-000000030.pt) were moved to {aside}; --resume auto "
                        "will not pick them (move them back to continue that timeline instead)")
    assert [c.step for c in list_checkpoints(folder)] == [10]
    assert sorted(p.name for p in aside.iterdir()) == ["epoch-0003-step-000000030.pt", "step-000000020.pt"]
    # A second branch from the same step gets a folder of its own.
    save_checkpoint(state(15), folder, 15)
    resume(cfg_for(tmp_path, str(folder / "step-000000010.pt")), [])
    assert (folder / f"{ABANDONED_PREFIX}000000010-2" / "step-000000015.pt").is_file()


def test_pruning_keeps_the_new_and_the_newest_readable_and_never_counts_unreadable_files(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(state(step), tmp_path, step)
    (tmp_path / "step-000000040.pt").write_bytes(b"unreadable")  # newer than anything good
    flip_tensor_byte(tmp_path / "step-000000030.pt")
    forget()
    new = save_checkpoint(state(25), tmp_path, 25)  # e.g. a run that resumed step 20 on purpose
    pruned = prune_checkpoints(tmp_path, keep=2, protect=new)
    assert [p.name for p in pruned.removed] == ["step-000000010.pt"]
    assert sorted(p.name for p in pruned.unreadable) == ["step-000000030.pt", "step-000000040.pt"]
    assert all(p.parent.name == UNREADABLE_DIR for p in pruned.unreadable)  # moved, never deleted
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 25]

    # The checkpoint just written is never deleted, even when a newer readable one exists.
    later = save_checkpoint(state(50), tmp_path, 50)
    assert prune_checkpoints(tmp_path, keep=1, protect=tmp_path / "step-000000025.pt").removed == [
        tmp_path / "step-000000020.pt"]
    assert [c.path for c in list_checkpoints(tmp_path)] == [tmp_path / "step-000000025.pt", later]


def test_checkpoint_is_durable_before_anything_is_pruned(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_replace, real_fsync_dir, real_unlink = fileio.os.replace, fileio.fsync_dir, Path.unlink

    def replace(a, b):
        events.append(("rename", Path(b).name))
        real_replace(a, b)

    def fsync_dir(folder):
        events.append(("fsync dir", Path(folder).name))
        real_fsync_dir(folder)

    def unlink(self, missing_ok=False):
        events.append(("delete", self.name))
        real_unlink(self, missing_ok=missing_ok)

    save_checkpoint(state(10), tmp_path, 10)
    monkeypatch.setattr(fileio.os, "replace", replace)
    monkeypatch.setattr(fileio, "fsync_dir", fsync_dir)
    monkeypatch.setattr(ckpt, "fsync_dir", fsync_dir)
    monkeypatch.setattr(Path, "unlink", unlink)
    new = save_checkpoint(state(20), tmp_path, 20)
    prune_checkpoints(tmp_path, keep=1, protect=new)
    assert events == [("rename", "step-000000020.pt"), ("fsync dir", tmp_path.name),
                      ("delete", "step-000000010.pt"), ("fsync dir", tmp_path.name)]


def test_disk_full_while_writing_a_checkpoint_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    save_checkpoint(state(10), tmp_path, 10)
    size = (tmp_path / "step-000000010.pt").stat().st_size
    real_write = HashingWriter.write

    def write(self, b):
        if self.bytes + len(b) > 300:  # the disk fills up part-way through the file
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, b)

    monkeypatch.setattr(HashingWriter, "write", write)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(state(20), tmp_path, 20)
    msg = str(info.value)
    assert msg.startswith(f"disk full while writing checkpoint {tmp_path / 'step-000000020.pt'} (")
    assert f"free on the file system of {tmp_path}; a checkpoint needs about {size / 1e3:,.1f} kB)" in msg
    assert "inline_container" not in msg and "nothing was written under its final name" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000010.pt"]  # no temporary, no partial file


def test_a_checkpoint_of_another_protocol_cannot_be_resumed(tmp_path):
    folder = tmp_path / CHECKPOINT_DIR
    path = save_checkpoint(state(10, protocol="linprobe"), folder, 10)
    with pytest.raises(ValueError, match=rf"--resume {path}: a linprobe checkpoint cannot resume a pretrain run; "
                                         rf"continue it with `./launch.sh linprobe ... --resume {path}`"):
        find_resume_state(cfg_for(tmp_path, str(path)), DistEnv(), [])
    pretrain = save_checkpoint(state(20), tmp_path / "other", 20)
    with pytest.raises(ValueError, match="a pretrain checkpoint cannot resume a finetune run; start the evaluation "
                                         "from it with --ckpt"):
        find_resume_state(cfg_for(tmp_path, str(pretrain)), DistEnv(), [], protocol="finetune")
