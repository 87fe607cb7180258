"""Per-process entry of `./launch.sh pretrain` (tools/launch.py starts one per GPU through torchrun):

    python -m train.pretrain --recipe NAME --data SHARDS --out RUN_DIR [--field-name value ...]

Parse and validate the configuration, join the process group, build data, model and trainer, resume if asked,
train. Exit status (train.entry): 0 = schedule finished, --max-steps reached, or stopped by SIGTERM/SIGUSR1 after
checkpointing; 1 = stopped by non-finite steps (after checkpointing); 2 = bad input or environment.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.mae import MaskedAutoencoderViT
from pipeline.shards.shard_format import load_manifest
from train.config import TrainConfig, config_from_args, help_text
from train.distributed import DistEnv, StopRequest, rank_seed, seed_all
from train.entry import (
    SetupError,
    build_loaders,
    check_class_maps,
    check_run_folder,
    device_name,
    find_resume_state,
    open_run_log,
    protocol_main,
    resume_trainer,
    software_versions,
    start_trainer,
)
from train.metrics import RunLog
from train.recipes import RECIPES, batch_warning
from train.task import MaskedAutoencoderTask
from train.tracking.pictures import CheckpointPictures
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
        check_class_maps(manifest, eval_manifest, f"--eval-data {cfg.eval_data}")
        if eval_manifest.num_classes > model_cfg.num_classes:
            raise ValueError(f"--eval-data {cfg.eval_data} has {eval_manifest.num_classes} classes, more than the "
                             f"model's {model_cfg.num_classes}")
    if cfg.init and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init {cfg.init}: no such file")
    check_run_folder(cfg)


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
        saved_model = ModelConfig.from_dict(resume.state["config"]["model"]).to_dict()
        # fused_masking picks kernels, not weights: a run may resume on another machine with or without them.
        diff = {k: (v, saved_model[k]) for k, v in model_cfg.to_dict().items()
                if k != "fused_masking" and v != saved_model[k]}
        if diff:
            raise ValueError(f"the checkpoint {resume.path} holds a different model than this configuration ("
                             + "; ".join(f"{k}: {theirs!r} in the checkpoint, {mine!r} here"
                                         for k, (mine, theirs) in diff.items())
                             + "); resume with the run's own --model and model options")

    seed_all(cfg.seed)  # identical initial weights on every rank
    model = MaskedAutoencoderViT(model_cfg)
    if resume is None and cfg.init:
        init_weights(model, cfg.init, notes)
    elif cfg.init:
        notes.append(f"--init {cfg.init} not used: the run continues from its checkpoint")
    seed_all(rank_seed(cfg.seed, env.rank))  # per-rank masking stream

    loader, eval_loader = build_loaders(cfg, env, cfg.img_size, cfg.eval_data if cfg.eval_every else "")
    out = Path(cfg.out)
    precision = resolve_precision(cfg.precision, env.device)
    run_config = {
        "train": cfg.to_dict(),
        "model": model_cfg.to_dict(),
        "derived": {
            "world_size": env.world_size,
            "local_world_size": env.local_world_size,
            "nodes": max(1, env.world_size // env.local_world_size),
            "device": device_name(env.device),
            "precision": precision,
            "compile": resolve_compile(cfg.compile, env.device),
            "effective_batch": cfg.effective_batch(env.world_size),
            "peak_lr": cfg.peak_lr(env.world_size),
            "train_samples": manifest.num_samples,
            "train_classes": manifest.num_classes,
        },
        "versions": software_versions(),
        "command": list(sys.argv),
    }
    task = MaskedAutoencoderTask(model, cfg.mask_ratio, cfg.weight_decay, cfg.betas)
    trainer = Trainer(cfg, task, loader, env, eval_loader, None, run_config)
    if resume is not None:
        resume_trainer(trainer, resume, notes, env)
    log = trainer.log = open_run_log(cfg, env, resume, title=f"pretrain {cfg.recipe or cfg.model} -> {cfg.out}")
    try:
        if cfg.recon_images and log.tracking:
            trainer.checkpoint_hooks.append(CheckpointPictures(cfg.eval_data or cfg.data, cfg.recon_images,
                                                               cfg.img_size, cfg.mask_ratio, cfg.seed,
                                                               cfg.data_backend))
        start_trainer(trainer, run_config, out, env, parameters=sum(p.numel() for p in model.parameters()))
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
    log.message(f"processes: {t.world_size} on {t.device.type}, precision {t.numerics}, compile "
                f"{'on' if t.compiled else 'off'}, fused masking {mc.fused_masking}")
    log.message(f"batch {cfg.batch_size}/process x {cfg.accum_steps} accum x {t.world_size} = "
                f"{cfg.effective_batch(t.world_size)}; peak lr {t.peak_lr:.3e}; {t.steps_per_epoch} steps/epoch, "
                f"{t.total_steps} steps, {t.schedule.warmup_steps} warm-up"
                + (f"; stopping at step {cfg.max_steps}" if cfg.max_steps else ""))
    if cfg.recipe:
        warning = batch_warning(cfg.recipe, RECIPES[cfg.recipe], cfg.batch_size, cfg.accum_steps, t.world_size,
                                t.peak_lr)
        if warning:
            notes.append(warning)
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
    return protocol_main("pretrain", list(sys.argv[1:] if argv is None else argv), check, run)


if __name__ == "__main__":
    sys.exit(main())
