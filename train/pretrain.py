"""Per-process entry of `./launch.sh pretrain` (tools/launch.py starts one per GPU through torchrun):

    python -m train.pretrain --recipe NAME --data SHARDS --out RUN_DIR [--field-name value ...]

Parse and validate the configuration, join the process group, build data, model and trainer, resume if asked,
train. Exit status: 0 = schedule finished, --max-steps reached, or stopped by SIGTERM/SIGUSR1 after checkpointing;
1 = stopped by non-finite steps (after checkpointing); 2 = invalid configuration or data.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.mae import MaskedAutoencoderViT
from pipeline.fileio import atomic_write_json
from pipeline.loader import LoaderConfig, build_loader
from pipeline.shard_format import ShardFormatError, load_manifest
from train.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    remove_stale_temporaries,
)
from train.config import TrainConfig, config_from_args, help_text
from train.distributed import (
    DistEnv,
    StopRequest,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    rank_seed,
    seed_all,
)
from train.metrics import RunLog
from train.trainer import NonFiniteError, Trainer, resolve_compile, resolve_precision

CONFIG_NAME = "config.json"
# Encoder keys an --init file must provide (a decoder or head may be missing, e.g. SupMAE from MAE weights).
_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.", "cls_token")


def check(argv: list[str]) -> TrainConfig:
    """Parse and validate the command line and the files it names; cheap (no model, no data read).

    tools/launch.py calls this before starting any process, so mistakes surface once and immediately.
    Raises SystemExit(0) for --help, ValueError / FileNotFoundError / ShardFormatError for bad input.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    cfg = config_from_args(argv)
    preflight(cfg)
    return cfg


def preflight(cfg: TrainConfig) -> None:
    """Checks of the files the configuration names, before any work."""
    manifest, _ = load_manifest(cfg.data)
    model_cfg = cfg.model_config(num_classes=manifest.num_classes)
    if manifest.num_classes > model_cfg.num_classes:
        raise ValueError(f"the data set {cfg.data} has {manifest.num_classes} classes but --num-classes is "
                         f"{model_cfg.num_classes}; raise --num-classes or leave it unset (taken from the data)")
    if cfg.eval_data:
        eval_manifest, _ = load_manifest(cfg.eval_data)
        if eval_manifest.num_classes > model_cfg.num_classes:
            raise ValueError(f"--eval-data {cfg.eval_data} has {eval_manifest.num_classes} classes, more than the "
                             f"model's {model_cfg.num_classes}")
    if cfg.init and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init {cfg.init}: no such file")
    ckdir = Path(cfg.out) / CHECKPOINT_DIR
    existing = list_checkpoints(ckdir)
    if cfg.resume == "" and existing:
        raise ValueError(f"{cfg.out} already holds checkpoints (newest: {existing[-1].path.name}); continue that run "
                         "with --resume auto, or choose another --out")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint file")


def resolve_fused_masking(mode: str, device: torch.device) -> str:
    """"auto" becomes "off" where the fused kernels cannot run (CPU, or no Triton kernels installed)."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "off"
    try:
        import model.kernels  # noqa: F401
    except ImportError:
        return "off"
    return "on"


def find_resume_state(cfg: TrainConfig, env: DistEnv, notes: list[str]) -> tuple[str, dict] | None:
    """(path, contents) of the checkpoint to continue from, the same on every rank; None for a new run.

    Rank 0 picks the file (newest valid one for "auto") and tells the others, so all ranks load the same step.
    """
    if cfg.resume == "":
        return None
    choice: Any = None
    state = None
    if env.is_main:
        try:
            if cfg.resume == "auto":
                folder = Path(cfg.out) / CHECKPOINT_DIR
                found = latest_checkpoint(folder, warn=notes.append)
                if found is not None:
                    choice, state = str(found[0]), found[1]
                elif list_checkpoints(folder):
                    raise ValueError(f"--resume auto: none of the checkpoints in {folder} can be read ("
                                     + "; ".join(notes) + "); move them away to start a new run")
            else:
                choice, state = cfg.resume, read_checkpoint(cfg.resume)
        except (ValueError, FileNotFoundError) as e:
            choice = e
    choice = broadcast_object(choice if not isinstance(choice, Exception) else ("error", str(choice)), env)
    if isinstance(choice, tuple):
        raise ValueError(choice[1])
    if choice is None:
        notes.append(f"--resume auto: no checkpoint in {Path(cfg.out) / CHECKPOINT_DIR}, starting a new run")
        return None
    if state is None:
        state = read_checkpoint(choice)
    return choice, state


def init_weights(model: MaskedAutoencoderViT, path: str, notes: list[str]) -> None:
    """Initialise from an original MAE/SupMAE .pth, a bare state_dict or a checkpoint of this project."""
    state = load_checkpoint(path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"--init {path}: shapes differ from the model for {mismatched[:5]}"
                         f"{' ...' if len(mismatched) > 5 else ''}; pick the matching --model and model options")
    result = model.load_state_dict(state, strict=False)
    missing_encoder = [k for k in result.missing_keys if k.startswith(_ENCODER_PREFIXES)]
    if missing_encoder:
        raise ValueError(f"--init {path}: lacks encoder weights {missing_encoder[:5]}; is it an MAE/SupMAE file?")
    notes.append(f"initialised from {path}: {len(state) - len(result.unexpected_keys)} tensors loaded"
                 + (f", not in the file (kept fresh): {sorted(result.missing_keys)}" if result.missing_keys else "")
                 + (f", ignored from the file: {sorted(result.unexpected_keys)}" if result.unexpected_keys else ""))


def _versions() -> dict[str, str | None]:
    def v(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": str(torch.__version__), "timm": v("timm"),
            "dali": v("nvidia-dali-cuda130") or v("nvidia-dali-cuda120")}


class SetupError(Exception):
    """The run cannot start (options, data, checkpoint): reported as a message with exit status 2."""


def run(cfg: TrainConfig, env: DistEnv, stop: StopRequest | None = None) -> int:
    """Build everything for this process and train; returns the exit status (errors during training propagate
    with their traceback)."""
    try:
        trainer, log = build(cfg, env)
    except (ValueError, FileNotFoundError) as e:  # ShardFormatError is a ValueError
        raise SetupError(str(e)) from e
    try:
        try:
            result = trainer.train(stop)
        except NonFiniteError:
            return 1  # the message is in the log
        log.message(f"{result.status}: step {result.step}, epoch {result.epoch}"
                    + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
        return 0
    finally:
        log.close()


def build(cfg: TrainConfig, env: DistEnv) -> tuple[Trainer, RunLog]:
    """Data, model, run folder, trainer (resumed or initialised) of this process; rank 0's log is open."""
    notes: list[str] = []
    manifest, _ = load_manifest(cfg.data)
    model_cfg = cfg.model_config(num_classes=manifest.num_classes)
    model_cfg = dataclasses.replace(model_cfg, fused_masking=resolve_fused_masking(model_cfg.fused_masking,
                                                                                 env.device))
    resume = find_resume_state(cfg, env, notes)
    if resume is not None:
        saved_model = ModelConfig.from_dict(resume[1]["config"]["model"])
        if dataclasses.replace(saved_model, fused_masking="off") != dataclasses.replace(model_cfg, fused_masking="off"):
            raise ValueError(f"the checkpoint {resume[0]} holds a different model ({saved_model}) than this "
                             f"configuration ({model_cfg}); resume with the run's own options")

    seed_all(cfg.seed)  # identical initial weights on every rank
    model = MaskedAutoencoderViT(model_cfg)
    if resume is None and cfg.init:
        init_weights(model, cfg.init, notes)
    elif cfg.init:
        notes.append(f"--init {cfg.init} not used: the run continues from its checkpoint")
    seed_all(rank_seed(cfg.seed, env.rank))  # per-rank masking stream

    device_kind = "cuda" if env.device.type == "cuda" else "cpu"
    loader = build_loader(LoaderConfig(
        data=cfg.data, batch_size=cfg.batch_size, img_size=cfg.img_size, train=True, backend=cfg.data_backend,
        device=device_kind, num_threads=cfg.data_threads, seed=cfg.seed, random_area=cfg.random_area,
        random_aspect_ratio=cfg.random_aspect_ratio, shuffle_buffer=cfg.shuffle_buffer,
    ), env.rank, env.world_size)
    eval_loader = None
    if cfg.eval_data and cfg.eval_every:
        eval_loader = build_loader(LoaderConfig(
            data=cfg.eval_data, batch_size=cfg.eval_batch_size or cfg.batch_size, img_size=cfg.img_size,
            train=False, backend=cfg.data_backend, device=device_kind, num_threads=cfg.data_threads, seed=cfg.seed,
        ), env.rank, env.world_size)

    out = Path(cfg.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / CHECKPOINT_DIR)
    log = RunLog(out, enabled=env.is_main, display=cfg.display, tensorboard=cfg.tensorboard,
                 resume_step=resume[1]["step"] if resume else None,
                 title=f"pretrain {cfg.recipe or cfg.model} -> {cfg.out}")
    try:
        precision = resolve_precision(cfg.precision, env.device)
        run_config = {
            "train": cfg.to_dict(),
            "model": model_cfg.to_dict(),
            "derived": {
                "world_size": env.world_size,
                "local_world_size": env.local_world_size,
                "nodes": max(1, env.world_size // env.local_world_size),
                "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
                "precision": precision,
                "compile": resolve_compile(cfg.compile, env.device),
                "effective_batch": cfg.effective_batch(env.world_size),
                "peak_lr": cfg.peak_lr(env.world_size),
                "train_samples": manifest.num_samples,
                "train_classes": manifest.num_classes,
            },
            "versions": _versions(),
            "command": list(sys.argv),
        }
        trainer = Trainer(cfg, model, loader, env, eval_loader, log, run_config)
        run_config["derived"].update(
            steps_per_epoch=trainer.steps_per_epoch, total_steps=trainer.total_steps,
            warmup_steps=trainer.schedule.warmup_steps, train_flops_per_image=trainer.flops_per_image,
            parameters=sum(p.numel() for p in model.parameters()),
        )
        if resume is not None:
            path, state = resume
            saved = TrainConfig.from_dict(state["config"]["train"])
            diff = saved.differences(cfg)
            if diff:
                notes.append("resuming with changed settings (the run is no longer the one it started as): "
                             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()))
            trainer.load_state_dict(state)
            notes.append(f"resumed from {path} at step {trainer.step} (epoch {loader.epoch})")
        # Plain JSON types only: checkpoints are read back with torch.load(weights_only=True).
        run_config = json.loads(json.dumps(run_config))
        trainer.run_config = run_config
        if env.is_main:
            atomic_write_json(out / CONFIG_NAME, run_config)
        _summary(log, cfg, trainer, manifest.num_samples, manifest.num_classes, notes)
        return trainer, log
    except BaseException:
        log.close()
        raise


def _summary(log: RunLog, cfg: TrainConfig, t: Trainer, samples: int, classes: int, notes: list[str]) -> None:
    mc = t.model.cfg
    params = sum(p.numel() for p in t.model.parameters()) / 1e6
    log.message(f"pretrain: recipe {cfg.recipe or '-'}, model {cfg.model} ({params:.1f}M parameters, "
                f"{t.flops_per_image / 1e9:.2f} GFLOP per trained image), {cfg.img_size}px patch {mc.patch_size}")
    log.message(f"data: {cfg.data} ({samples} images, {classes} classes), {t.loader.batches_per_epoch} batches "
                f"per process per epoch, backend {cfg.data_backend}")
    log.message(f"processes: {t.world_size} on {t.device.type}, precision {t.precision}, compile "
                f"{'on' if t.compiled else 'off'}, fused masking {mc.fused_masking}")
    log.message(f"batch {cfg.batch_size}/process x {cfg.accum_steps} accum x {t.world_size} = "
                f"{cfg.effective_batch(t.world_size)}; peak lr {t.peak_lr:.3e}; {t.steps_per_epoch} steps/epoch, "
                f"{t.total_steps} steps, {t.schedule.warmup_steps} warm-up"
                + (f"; stopping at step {cfg.max_steps}" if cfg.max_steps else ""))
    if cfg.accum_steps > 1 and mc.cls_branch:
        notes.append(f"warning: --accum-steps {cfg.accum_steps} with the SupMAE head: its BatchNorm normalises "
                     f"each micro-batch of {cfg.batch_size} separately, not the effective batch, which changes the "
                     "head's statistics compared with the paper's setting")
    if t.loader.batches_per_epoch % cfg.accum_steps:
        notes.append(f"note: {t.loader.batches_per_epoch % cfg.accum_steps} batch(es) per epoch do not fill an "
                     f"accumulation group of {cfg.accum_steps} and are skipped")
    for n in notes:
        log.message(n)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = check(argv)
    except (ValueError, FileNotFoundError, ShardFormatError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    env = init_distributed(cfg.device)
    # Handlers go in before the (slow) build, so an early SIGTERM still ends in a checkpoint and exit 0.
    stop = StopRequest(env)
    try:
        return run(cfg, env, stop)
    except SetupError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        stop.restore()
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
