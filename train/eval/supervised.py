"""What fine-tuning and linear probing share: the configuration base, the classifier task's evaluation (top-1 /
top-5 / loss every epoch, best tracking), and the per-process entry that builds data, encoder, task and Trainer,
trains with exact resume, and writes the eval result.

    ./launch.sh finetune --ckpt RUN_OR_FILE --data TRAIN --eval-data VAL [--field-name value ...] [--out DIR]
    ./launch.sh linprobe ...
    ./launch.sh linprobe --ckpt RUN_DIR --all-checkpoints ...   # every checkpoint of the run without a result

Both run on the pre-training loop (train.trainer.Trainer): same launcher, DDP, checkpoints, metrics.jsonl,
pre-emption and exact resume. The run folder (--out) has the layout of a pre-training run (docs/run-folder.md)
plus `eval.json`; `checkpoints/best.pt` holds the epoch with the best top-1.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import is_timm_folder
from pipeline.shards.shard_format import load_manifest
from train.checkpoint import CHECKPOINT_DIR, list_checkpoints
from train.config import LAUNCHER_HELP, LoopConfig, options_help, parse_overrides
from train.config import option_field as _f
from train.distributed import DistEnv, StopRequest, rank_seed, seed_all
from train.entry import (
    SetupError,
    build_loaders,
    check_class_maps,
    check_run_folder,
    check_writable,
    device_name,
    find_resume_state,
    open_run_log,
    protocol_main,
    resume_trainer,
    software_versions,
    start_trainer,
)
from train.eval.accuracy import TopKCounter
from train.eval.encoder import RANDOM, EncoderOptions, PretrainedSource
from train.eval.results import checkpoints_to_evaluate, make_result, pending_checkpoints, write_result
from train.metrics import RunLog
from train.recipes import (
    DEFAULT_PROTOCOL_RECIPES,
    PROTOCOL_RECIPES,
    batch_warning,
    protocol_recipe,
    protocol_values,
)
from train.task import Task
from train.trainer import NonFiniteError, Trainer, resolve_compile, resolve_precision

TOPK = (1, 5)


@dataclass
class SupervisedConfig(EncoderOptions, LoopConfig):
    """Fields shared by fine-tuning and linear probing (with the loop's fields of LoopConfig)."""

    out: str = _f("", "run folder (default: RUN/eval/<checkpoint stem>.<protocol> for a checkpoint of a run, "
                      "<file stem>.<protocol> beside another file; required for --ckpt random)")
    recipe: str = _f("", "named preset to start from (listed above; '' = the protocol's default); the other "
                         "options override its fields")
    eval_data: str = _f("", "held-out shard folder, evaluated every --eval-every epochs; required")
    eval_every: int = _f(1, "evaluate top-1 / top-5 on --eval-data every N epochs")
    num_classes: int = _f(0, "classes of the new head (0 = the training data set's class count)")

    def __post_init__(self) -> None:
        if not self.eval_data:  # before the loop's own "--eval-every needs --eval-data"
            raise ValueError("--eval-data is required (the held-out shard folder the accuracy is measured on)")
        super().__post_init__()
        if self.eval_every < 1:
            raise ValueError(f"--eval-every {self.eval_every} is invalid: must be an integer >= 1")
        if self.num_classes < 0:
            raise ValueError(f"--num-classes {self.num_classes} is invalid: must be an integer >= 0")


def default_out(cfg: SupervisedConfig, protocol: str) -> str:
    """Where a run goes when --out is not given (see SupervisedConfig.out)."""
    if cfg.out:
        return cfg.out
    if cfg.ckpt == RANDOM:
        raise ValueError(f"--ckpt random needs --out (there is no checkpoint folder to put the {protocol} run in)")
    path = Path(cfg.ckpt)
    if path.is_dir() and not is_timm_folder(path):  # the run's newest checkpoint (the one --ckpt RUN evaluates)
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found = list_checkpoints(folder)
        if not found:
            raise ValueError(f"--ckpt {path}: no checkpoint (step-*.pt) in {folder}")
        path = found[-1].path
    if path.parent.name == CHECKPOINT_DIR:
        return str(path.parent.parent / "eval" / f"{path.stem}.{protocol}")
    return str(path.with_name(f"{path.stem}.{protocol}"))


# ----------------------------------------------------------------------------------------------------------------
# The classifier task's shared half


class ClassifierTask(Task):
    """A classifier on the encoder: cross-entropy-style training (subclasses), and evaluation of top-1 / top-5 and
    the cross-entropy on the eval loader, every sample once across ranks; `best` follows the best top-1."""

    logged = ("loss",)

    def __init__(self, model: nn.Module, num_classes: int):
        self.model = model
        self.num_classes = num_classes
        self.best: dict[str, Any] | None = None  # {"top1", "top5", "step", "epoch"} of the best evaluation
        self.last: dict[str, Any] | None = None  # the newest evaluation, with its step
        self.ema_model: nn.Module | None = None  # evaluated too when a subclass keeps an EMA of the weights

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module, trainer: Trainer) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            counter = TopKCounter(TOPK, trainer.device, with_loss=True)
            for b in trainer.eval_loader:
                labels = b.labels.to(trainer.device, non_blocking=True)
                with trainer.autocast():
                    logits = model(b.images.to(trainer.device, non_blocking=True))
                losses = F.cross_entropy(logits.float(), labels, reduction="none")
                counter.update(logits, labels, b.valid, b.num_valid, losses)
            return counter.result(trainer.env)
        finally:
            model.train(was_training)

    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        metrics = self.evaluate_model(self.model, trainer)
        if self.ema_model is not None:
            ema = self.evaluate_model(self.ema_model, trainer)
            metrics.update(ema_top1=ema["top1"], ema_top5=ema["top5"], ema_loss=ema["loss"])
        self.last = {**metrics, "step": trainer.step, "epoch": trainer.loader.epoch}
        return metrics

    def improved(self, metrics: dict[str, Any]) -> bool:
        if self.best is not None and metrics["top1"] <= self.best["top1"]:
            return False
        self.best = {k: self.last[k] for k in ("top1", "top5", "step", "epoch")}
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.last = state.get("best"), state.get("last")


def trunc_normal_head(head: nn.Linear, std: float) -> None:
    """MAE's head initialisation: truncated normal weights (std 2e-5 fine-tuning, 0.01 probing), zero bias."""
    nn.init.trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)


# ----------------------------------------------------------------------------------------------------------------
# The per-process entry


@dataclass(frozen=True)
class Protocol:
    """One supervised protocol: its name, configuration class, task and training-loader settings."""

    name: str
    config_cls: type
    make_task: Callable[[Any, PretrainedSource, int], ClassifierTask]  # (cfg, source, num_classes) -> task
    train_augment: Callable[[Any], dict[str, Any]]  # cfg -> extra LoaderConfig fields of the training loader
    description: str

    def help_text(self) -> str:
        return "\n".join([
            f"usage: ./launch.sh {self.name} --ckpt RUN_DIR_OR_FILE --data TRAIN_SHARDS --eval-data EVAL_SHARDS "
            "[--field-name value ...] [--out DIR]",
            "", self.description, "",
            "Recipes (--recipe NAME; the default is marked *):",
            *(f"  {name:<12}{'*' if name == DEFAULT_PROTOCOL_RECIPES[self.name] else ' '} {r.description}"
              for name, r in PROTOCOL_RECIPES[self.name].items()),
            "",
            "Options (defaults: the default recipe, for ViT-B on 8 GPUs; docs/evaluation.md):",
            *options_help(self.config_cls, "Model options (with --ckpt random: override the preset; with a .pth: "
                                           "override what is inferred):"),
            "", *LAUNCHER_HELP,
        ])

    def check(self, argv: list[str]) -> Any:
        """Parse and validate the command line and the files it names; cheap (no model, no data read)."""
        if any(a in ("-h", "--help") for a in argv):
            print(self.help_text())
            raise SystemExit(0)
        cfg = self.config_cls(**protocol_values(self.name, parse_overrides(argv, self.config_cls)))
        cfg.check_ckpt_exists()
        if cfg.all_checkpoints:  # each checkpoint's run gets its default folder in run()
            pending_checkpoints(cfg.ckpt, self.name)
            check_writable(cfg.ckpt, "--ckpt")
        else:
            cfg.out = default_out(cfg, self.name)
        train, _ = load_manifest(cfg.data)
        evals, _ = load_manifest(cfg.eval_data)
        check_class_maps(train, evals, f"--eval-data {cfg.eval_data}")
        classes = cfg.num_classes or train.num_classes
        if evals.num_classes > classes:
            raise ValueError(f"--eval-data {cfg.eval_data} has {evals.num_classes} classes, more than the head's "
                             f"{classes}")
        if not cfg.all_checkpoints:
            check_writable(cfg.out, "--out")
            check_run_folder(cfg)
        return cfg

    def run(self, cfg: Any, env: DistEnv, stop: StopRequest | None = None) -> int:
        if not cfg.all_checkpoints:
            return self.run_one(cfg, env, stop)[0]
        # --all-checkpoints: one run per checkpoint without a result, each in its default folder; an interrupted
        # one continues (--resume auto), a stop signal ends the loop after the current run's checkpoint.
        todo = checkpoints_to_evaluate(cfg.ckpt, self.name, env)
        if not todo and env.is_main:
            print(f"{self.name}: every checkpoint of {cfg.ckpt} has a {self.name} result already; nothing to do")
        skipped = []
        for path in todo:
            one = dataclasses.replace(cfg, ckpt=str(path), all_checkpoints=False, resume="auto")
            one.out = default_out(one, self.name)
            try:
                status, stopped = self.run_one(one, env, stop)
            except SetupError as e:  # e.g. a damaged checkpoint: the others still run
                skipped.append(f"{path}: {e}")
                print(f"{self.name}: skipping {path}: {e}", file=sys.stderr)
                continue
            if status or stopped:
                return status
        if skipped and env.is_main:
            print(f"{self.name}: {len(skipped)} checkpoint(s) skipped:\n  " + "\n  ".join(skipped), file=sys.stderr)
        return 0

    def run_one(self, cfg: Any, env: DistEnv, stop: StopRequest | None = None) -> tuple[int, bool]:
        """Train and evaluate on one encoder: (exit status, whether a stop signal ended it early)."""
        try:
            trainer, log, source = self.build(cfg, env)
        except (ValueError, FileNotFoundError) as e:
            raise SetupError(str(e)) from e
        try:
            try:
                result = trainer.train(stop)
            except NonFiniteError:
                return 1, False
            log.message(f"{result.status}: step {result.step}, epoch {result.epoch}"
                        + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
            if result.status != "preempted":
                self.finish(cfg, env, trainer, source, log)
            return 0, result.status == "preempted"
        finally:
            log.close()

    def build(self, cfg: Any, env: DistEnv) -> tuple[Trainer, RunLog, PretrainedSource]:
        notes: list[str] = []
        manifest, _ = load_manifest(cfg.data)
        num_classes = cfg.num_classes or manifest.num_classes
        source = cfg.source(cfg.seed, warn=notes.append)
        resume = find_resume_state(cfg, env, notes, protocol=self.name)
        seed_all(cfg.seed)  # identical head (and random encoder) on every rank
        task = self.make_task(cfg, source, num_classes)
        seed_all(rank_seed(cfg.seed, env.rank))  # per-rank drop path, mixup, erasing

        img_size = cfg.img_size or source.model_cfg.img_size
        loader, eval_loader = build_loaders(cfg, env, img_size, cfg.eval_data, **self.train_augment(cfg))
        out = Path(cfg.out)
        run_config = {
            "protocol": self.name,
            "train": cfg.to_dict(),
            "source": source.describe(),
            "derived": {
                "world_size": env.world_size, "device": device_name(env.device),
                "precision": resolve_precision(cfg.precision, env.device),
                "compile": resolve_compile(cfg.compile, env.device), "img_size": img_size,
                "num_classes": num_classes, "effective_batch": cfg.effective_batch(env.world_size),
                "peak_lr": cfg.peak_lr(env.world_size), "train_samples": manifest.num_samples,
            },
            "versions": software_versions(),
            "command": list(sys.argv),
        }
        trainer = Trainer(cfg, task, loader, env, eval_loader, None, run_config)
        if resume is not None:
            resume_trainer(trainer, resume, notes, env)
        log = trainer.log = open_run_log(cfg, env, resume, title=f"{self.name} {source.name} -> {out}")
        try:
            start_trainer(trainer, run_config, out, env, trainable_parameters=sum(p.numel() for p in trainer.params))
            log.message(f"{self.name}: {source.name} (step {source.step}), {num_classes} classes, {img_size}px; "
                        f"{manifest.num_samples} training images, {eval_loader.num_samples} eval images")
            log.message(f"processes: {trainer.world_size} on {trainer.device.type}, precision {trainer.numerics}, "
                        f"batch {cfg.batch_size}/process x {cfg.accum_steps} accum x {trainer.world_size} = "
                        f"{cfg.effective_batch(trainer.world_size)}; peak lr {trainer.peak_lr:.3e}; "
                        f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps")
            warning = batch_warning(*protocol_recipe(self.name, cfg.recipe), cfg.batch_size, cfg.accum_steps,
                                    trainer.world_size, trainer.peak_lr)
            for n in notes + ([warning] if warning else []):
                log.message(n)
            return trainer, log, source
        except BaseException:
            log.close()
            raise

    def finish(self, cfg: Any, env: DistEnv, trainer: Trainer, source: PretrainedSource, log: RunLog) -> None:
        """After training: the final evaluation (the last epoch's, or a new one when the run stopped mid-epoch)
        and the result files."""
        task: ClassifierTask = trainer.task  # type: ignore[assignment]
        if task.last is not None and task.last["step"] == trainer.step:
            metrics = task.last
        else:  # stopped by --max-steps mid-epoch, or the last epoch was not an --eval-every one
            metrics = trainer.evaluate()
            if task.improved(metrics):
                trainer.save(best=True)  # collective; rewrites this step's checkpoint with the new best
        if not env.is_main:
            return
        trainer.compute.seconds = trainer._clock()
        eval_cost = {"images": trainer.compute.images, "flops": trainer.compute.images * trainer.flops_per_image,
                     "seconds": trainer.compute.seconds,
                     "device_hours": trainer.compute.seconds * trainer.world_size / 3600,
                     "steps": trainer.step, "epochs": trainer.step / trainer.steps_per_epoch}
        settings = {**cfg.to_dict(), "img_size": trainer.run_config["derived"]["img_size"],
                    "num_classes": task.num_classes, "effective_batch": cfg.effective_batch(env.world_size),
                    "peak_lr": trainer.peak_lr}
        result = make_result(self.name, source, {**metrics, "step": trainer.step}, settings, eval_cost,
                             env.world_size, device_name(env.device), software_versions(), best=task.best,
                             environment=trainer.run_config.get("environment"))
        for path in write_result(result, cfg.out, say=log.message):
            log.message(f"result: {path}")
        log.message(f"{self.name} top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  on "
                    f"{metrics['samples']} images" + (f"  (best top-1 {100 * task.best['top1']:.2f}% at epoch "
                                                       f"{task.best['epoch']})" if task.best else ""))

    def main(self, argv: list[str] | None = None) -> int:
        return protocol_main(self.name, list(sys.argv[1:] if argv is None else argv), self.check, self.run)
