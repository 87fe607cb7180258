"""What every protocol's per-process entry shares (`train.pretrain`, `train.eval.finetune`, `train.eval.linprobe`,
`train.eval.knn`): the main() wrapper with its exit statuses, the choice of the checkpoint to resume, the run folder's
start-up checks, and the software versions recorded in config.json.

Exit statuses (README "Exit codes"): 0 = done (schedule finished, --max-steps, or stopped by SIGTERM/SIGUSR1 after
checkpointing); 1 = the run's own verdict: stopped by non-finite steps (after checkpointing); 2 = bad input or
environment: invalid configuration, data or checkpoint, a shard found corrupt during training, a full disk.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pipeline.fileio import DiskFullError, atomic_write_json, folder_problem
from pipeline.loaders.base import Loader, LoaderConfig
from pipeline.loaders.build import build_loader
from pipeline.shards.shard_format import Manifest, ShardFormatError
from train.checkpoint import (
    CHECKPOINT_DIR,
    list_checkpoints,
    read_checkpoint,
    remove_stale_temporaries,
    select_checkpoint,
    set_aside_newer,
)
from train.config import LoopConfig
from train.distributed import DistEnv, StopRequest, broadcast_object, destroy_distributed, init_distributed
from train.metrics import RunLog
from train.system.builds import installed_dali
from train.system.device import DeviceError, describe_environment, environment_record
from train.system.nvidia import detect_nvidia
from train.tracking.wandb_sink import require_wandb

if TYPE_CHECKING:
    from train.trainer import Trainer

CONFIG_NAME = "config.json"


class SetupError(Exception):
    """The run cannot start (options, data, checkpoint): reported as a message with exit status 2."""


def protocol_main(name: str, argv: list[str], check: Callable[[list[str]], Any],
                  run: Callable[[Any, DistEnv, StopRequest], int]) -> int:
    """Validate `argv` (`check` -> config), join the process group, run; errors before the work starts become a
    one-line message `NAME: error: ...` and exit status 2."""
    try:
        cfg = check(argv)
    except (ValueError, FileNotFoundError, ShardFormatError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    try:
        env = init_distributed(cfg.device)
    except DeviceError as e:  # a GPU torch cannot use: stop before any work
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    # Handlers go in before the (slow) build, so an early SIGTERM still ends in a checkpoint and exit 0.
    stop = StopRequest(env)
    try:
        return run(cfg, env, stop)
    except (SetupError, ShardFormatError, DiskFullError) as e:
        # Foreseeable failures during the run too: a shard found corrupt while training, a full disk.
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    finally:
        stop.restore()
        destroy_distributed()


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """`folder` can be created or written (checked on its nearest existing ancestor), before any work is done."""
    problem = folder_problem(folder)
    if problem:
        raise ValueError(f"{what} {folder}: {problem}; choose another folder")


def check_run_folder(cfg: LoopConfig) -> None:
    """--out is a writable folder; a new run must not land on an old one's checkpoints; an explicit --resume file
    must exist; the trackers it asks for must be installed (--wandb)."""
    check_writable(cfg.out, "--out")
    if cfg.wandb:
        require_wandb()
    existing = list_checkpoints(Path(cfg.out) / CHECKPOINT_DIR)
    if cfg.resume == "" and existing:
        raise ValueError(f"{cfg.out} already holds checkpoints (newest: {existing[-1].path.name}); continue that run "
                         "with --resume auto, or choose another --out")
    if cfg.resume not in ("", "auto") and Path(cfg.resume).is_dir():
        run_folder = Path(cfg.resume).parent if Path(cfg.resume).name == CHECKPOINT_DIR else Path(cfg.resume)
        raise ValueError(f"--resume {cfg.resume} is a folder: --resume takes auto (the newest readable checkpoint of "
                         f"--out) or a checkpoint file; to continue the run in {run_folder} use --out {run_folder} "
                         "--resume auto")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint file")


def check_class_maps(train: Manifest, other: Manifest, what: str) -> None:
    """`other`'s class indices must mean what they mean in the training data (shard it with --class-map)."""
    mine = [c.wnid for c in train.classes]
    theirs = [c.wnid for c in other.classes]
    if theirs != mine[: len(theirs)]:
        raise ValueError(f"{what} numbers its classes differently from the training data ({theirs[:3]}... vs "
                         f"{mine[:3]}...): shard it with `./launch.sh shard ... --class-map TRAIN_SHARDS`")


class Resume(NamedTuple):
    """The checkpoint a run continues from, the same on every rank; `damaged`: the newer files of the run folder
    that `--resume auto` passed over as unreadable (rank 0)."""

    path: str
    state: dict[str, Any]
    damaged: tuple[str, ...] = ()


def find_resume_state(cfg: LoopConfig, env: DistEnv, notes: list[str], protocol: str = "pretrain") -> Resume | None:
    """The checkpoint to continue from, the same on every rank; None for a new run. Reads only: nothing in the run
    folder changes until `resume_trainer` has loaded it.

    Rank 0 picks the file (for "auto" `train.checkpoint.select_checkpoint`: the newest that reads back, every newer
    one passed over noted with the reason) and tells the others, so all ranks load the same step. The checkpoint
    must be one of `protocol`'s.
    """
    if cfg.resume == "":
        return None
    folder = Path(cfg.out) / CHECKPOINT_DIR
    choice: Any = None
    state = None
    damaged: tuple[str, ...] = ()
    if env.is_main:
        try:
            if cfg.resume == "auto":
                sel = select_checkpoint(folder)
                notes.extend(sel.explain())
                damaged = tuple(str(ck.path) for ck, _ in sel.passed_over)
                if sel.chosen is not None:
                    choice, state = str(sel.chosen.path), sel.state
                elif sel.passed_over:
                    raise ValueError(f"--resume auto: none of the checkpoints in {folder} can be read ("
                                     + "; ".join(sel.explain()) + "); move them away to start a new run")
            else:
                choice, state = cfg.resume, read_checkpoint(cfg.resume)
            if state is not None:
                check_protocol(choice, state, protocol)
        except (ValueError, FileNotFoundError) as e:
            choice = e
    choice = broadcast_object(choice if not isinstance(choice, Exception) else ("error", str(choice)), env)
    if isinstance(choice, tuple):
        raise ValueError(choice[1])
    if choice is None:
        notes.append(f"--resume auto: no checkpoint in {folder}, starting a new run")
        return None
    if state is None:
        state = read_checkpoint(choice)
    return Resume(choice, state, damaged)


def resume_trainer(trainer: Trainer, resume: Resume, notes: list[str], env: DistEnv) -> None:
    """Load `resume` into `trainer` (ValueError when it does not fit: world size, data position, optimiser groups),
    then, on rank 0, move the run folder's checkpoints newer than it out of the way
    (`train.checkpoint.set_aside_newer`: the damaged ones passed over into `checkpoints/unreadable/`, the others, a
    timeline this run abandons, into `checkpoints/abandoned-after-step-N/`, where "auto" never looks), noted.

    Called before the run log opens (which cuts metrics.jsonl back to the checkpoint's step): a resume refused at
    start-up leaves the run folder as it was, and the next `--resume auto` still finds its newest checkpoint."""
    note = resume_note(trainer.cfg, resume.state)
    if note:
        notes.append(note)
    trainer.load_state_dict(resume.state)
    if env.is_main:
        aside = set_aside_newer(Path(trainer.cfg.out) / CHECKPOINT_DIR, trainer.step, resume.damaged)
        if aside.unreadable:
            notes.append(f"resuming step {trainer.step}: the {len(aside.unreadable)} damaged newer checkpoint(s) "
                         f"passed over ({_names(aside.unreadable)}) were moved to {aside.unreadable[0].parent}")
        if aside.moved:
            notes.append(f"resuming step {trainer.step}: the {len(aside.moved)} newer checkpoint(s) of the "
                         f"abandoned timeline ({_names(aside.moved)}) were moved to {aside.folder}; --resume auto "
                         "will not pick them (move them back to continue that timeline instead)")
    notes.append(f"resumed from {resume.path} at step {trainer.step} (epoch {trainer.loader.epoch})")


def _names(paths: list[Path], most: int = 5) -> str:
    return ", ".join(p.name for p in paths[:most]) + (" ..." if len(paths) > most else "")


def check_protocol(path: str, state: dict[str, Any], protocol: str) -> None:
    """A run resumes only a checkpoint of its own protocol (pretrain, finetune, linprobe)."""
    theirs = state["config"].get("protocol", "pretrain") if isinstance(state.get("config"), dict) else None
    if theirs != protocol:
        hint = ("start the evaluation from it with --ckpt instead" if theirs == "pretrain"
                else f"continue it with `./launch.sh {theirs} ... --resume {path}`" if theirs else "")
        raise ValueError(f"--resume {path}: a {theirs or 'unknown'} checkpoint cannot resume a {protocol} run"
                         + (f"; {hint}" if hint else ""))


def resume_note(cfg: LoopConfig, state: dict[str, Any]) -> str | None:
    """A warning listing the settings that differ from those the checkpoint's run started with (None if none)."""
    saved = type(cfg).from_dict(state["config"]["train"])
    diff = saved.differences(cfg)
    if not diff:
        return None
    return ("resuming with changed settings (the run is no longer the one it started as): "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()))


def start_trainer(trainer: Trainer, run_config: dict[str, Any], out: Path, env: DistEnv, **derived: Any) -> None:
    """The common end of a protocol's build (after `resume_trainer` and with the run log open): the schedule's
    numbers (and `derived`) into run_config["derived"], config.json written by rank 0."""
    run_config["derived"].update(
        steps_per_epoch=trainer.steps_per_epoch, total_steps=trainer.total_steps,
        warmup_steps=trainer.schedule.warmup_steps, train_flops_per_image=trainer.flops_per_image,
        tf32=trainer.tf32, ddp=trainer.ddp is not None, process_group=env.backend, **derived,
    )
    run_config["environment"] = run_environment(trainer, env)
    if trainer.log is not None:
        trainer.log.message(describe_environment(run_config["environment"]))
    # Plain JSON types only: checkpoints are read back with torch.load(weights_only=True).
    trainer.run_config = json.loads(json.dumps(run_config))
    if env.is_main:
        atomic_write_json(out / CONFIG_NAME, trainer.run_config)
        if trainer.log is not None:
            trainer.log.log_config(trainer.run_config, trainer.step)


def run_environment(trainer: Trainer, env: DistEnv) -> dict[str, Any]:
    """The environment record (train.system.device) of a trainer's run; rank 0 asks the driver."""
    model_cfg = getattr(trainer.model, "cfg", None)
    return environment_record(env.device, fused_masking=getattr(model_cfg, "fused_masking", None),
                              compile=trainer.compiled, nvidia=detect_nvidia() if env.is_main else None)


def build_eval_loader(data: str, batch_size: int, img_size: int, backend: str, threads: int, seed: int,
                      env: DistEnv, decode: str = "auto") -> Loader:
    """This rank's eval loader over `data` (resize + centre crop, every sample once, in order) on the run's device;
    the batch is at most what one rank reads (`build_loader`)."""
    return build_loader(LoaderConfig(
        data=data, batch_size=batch_size, img_size=img_size, train=False, backend=backend, decode=decode,
        device="cuda" if env.device.type == "cuda" else "cpu", num_threads=threads, seed=seed,
    ), env.rank, env.world_size)


def build_loaders(cfg: LoopConfig, env: DistEnv, img_size: int, eval_data: str = "",
                  **augment: Any) -> tuple[Loader, Loader | None]:
    """This rank's training loader (random-resized crop, flip, `augment`) and, when `eval_data` is given, its eval
    loader (`build_eval_loader`), both on the run's device."""
    loader = build_loader(LoaderConfig(
        data=cfg.data, batch_size=cfg.batch_size, img_size=img_size, train=True, backend=cfg.data_backend,
        decode=cfg.decode, device="cuda" if env.device.type == "cuda" else "cpu", num_threads=cfg.data_threads,
        seed=cfg.seed, random_area=cfg.random_area, random_aspect_ratio=cfg.random_aspect_ratio, shuffle_buffer=cfg.shuffle_buffer,
        **augment,
    ), env.rank, env.world_size)
    if not eval_data:
        return loader, None
    return loader, build_eval_loader(eval_data, cfg.eval_batch_size or cfg.batch_size, img_size, cfg.data_backend,
                                     cfg.data_threads, cfg.seed, env, cfg.decode)


def open_run_log(cfg: LoopConfig, env: DistEnv, resume: Resume | None, title: str) -> RunLog:
    """The run folder made (rank 0; temporaries of a killed checkpoint write removed) and its log opened (a resumed
    run's metrics.jsonl cut back to the checkpoint's step: call it after `resume_trainer`)."""
    out = Path(cfg.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / CHECKPOINT_DIR)
    return RunLog(out, enabled=env.is_main, display=cfg.display, tensorboard=cfg.tensorboard,
                  resume_step=resume.state["step"] if resume else None, title=title, wandb=cfg.wandb)


def software_versions() -> dict[str, str | None]:
    def v(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    dali = installed_dali()
    return {"python": platform.python_version(), "torch": str(torch.__version__), "timm": v("timm"),
            "dali": dali[1] if dali else None}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
