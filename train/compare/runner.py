"""A matched compute-to-accuracy comparison: pre-train several recipes (SupMAE and MAE) under the same compute
budgets with the real trainer, evaluate checkpoints along the way, and hand the run folders to the analysis.

    cfg = ComparisonConfig(data="shards/train", eval_data="shards/val", out="runs/cmp", budgets=(0.02,))
    outcome = run_comparison(cfg, say=print)      # run folders + train.compare.report.Analysis
    # ./launch.sh bench compute --data ... and ./launch.sh demo are thin front ends of this

Budgets (`budget_unit`):
  pflops   cumulative analytic training FLOPs (3 x the forward matmul FLOPs of a trained image, model/flops.py,
           times the images trained), in units of 1e15: equal compute for every method. A budget of B PFLOPs is
           reached at the first optimiser step whose cumulative FLOPs are >= B.
  epochs   passes over the training split: equal data for every method (its compute differs by the methods'
           FLOPs per image). B epochs = the first step >= B x steps per epoch.

Schedules (`schedule`); a run's cosine schedule always covers whole epochs (TrainConfig.epochs is an integer), so
every run ends with its learning rate annealed:
  single      one run per method whose schedule is the smallest number of whole epochs that covers the largest
              budget; checkpoints are evaluated at every budget, at `evals` points evenly spaced in the budget's
              unit up to the largest budget (the same grid for every method: equal-compute points), and at the
              schedule's end. Costs the largest budget (plus under an epoch) per method.
  per-budget  one run per method and budget, each with a schedule of the nearest whole number of epochs to the
              budget (at least 1), evaluated at its end: the papers' protocol of separately trained schedules
              (100 / 200 / 400 epochs). Costs the sum of the budgets.
With `random_init` each method's untrained weights (a step-0 checkpoint of its first run, the exact weights
training starts from) are evaluated too: the zero-compute point, and the baseline a trained encoder must beat.

Training is the pre-training code path (`train.pretrain.build` + `Trainer.train`), run in segments: train to the
next evaluation step (`--max-steps`, the schedule unchanged), evaluate the checkpoint written there, continue with
`--resume auto` (exact resume: the segmented run computes what an uninterrupted one would). Only the newest
checkpoint of each run is kept (`keep_checkpoints` keeps all); the evaluation results stay beside the pruned
checkpoints' names. Re-running the same comparison continues it: evaluated points are skipped, a run continues
from its newest checkpoint. One process (one GPU, or the CPU): for multi-GPU runs pre-train with
`./launch.sh pretrain`, evaluate with `./launch.sh knn`, and analyse the folders with `bench compute --runs`.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.fileio import atomic_write_json
from pipeline.shards.shard_format import load_manifest
from train.checkpoint import CHECKPOINT_DIR, checkpoint_name, list_checkpoints
from train.compare.report import Analysis, Method, RunData, analyse, group_runs, load_run, method_label
from train.config import TrainConfig, build_config, parse_overrides

BUDGET_UNITS = ("pflops", "epochs")
SCHEDULES = ("single", "per-budget")
PROTOCOLS = ("knn", "linprobe", "finetune")
DEFAULT_RECIPES = ("supmae_vit_tiny_demo", "mae_vit_tiny_demo")
PLAN_NAME = "comparison.json"
# Set by the comparison from the budgets and the plan; a recipe override of these would break the plan.
_PLANNED_FIELDS = ("data", "out", "epochs", "max_steps", "resume", "eval_data", "eval_every")


@dataclass(frozen=True)
class ComparisonConfig:
    """A matched comparison; validated on creation (errors name the field, the value and what is allowed)."""

    data: str  # training shards (the k-NN bank comes from them too)
    eval_data: str  # held-out shards (k-NN queries; evaluation split of linear probe / fine-tune)
    out: str  # comparison folder: one run folder per method (and budget), comparison.json, the report
    budgets: tuple[float, ...]
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    labels: tuple[str, ...] = ()  # names of the methods (default: SupMAE / MAE from the model)
    budget_unit: str = "pflops"
    schedule: str = "single"
    evals: int = 4  # single schedule: evenly spaced evaluation points up to the largest budget
    random_init: bool = True
    protocols: tuple[str, ...] = ("knn",)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: int = 0  # k-NN bank: the first N training samples (0 = the whole split)
    knn_feature: str = "avg"  # "avg" (mean of the normed patch tokens) | "token" (cls token)
    eval_batch_size: int = 256
    train_args: tuple[str, ...] = ()  # TrainConfig overrides for every recipe, as on the pretrain command line
    protocol_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra options of linprobe / finetune
    seed: int = 0
    device: str = "auto"
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "eval_data", "out"):
            if not getattr(self, name):
                raise ValueError(f"comparison: {name.replace('_', '-')} is required")
        object.__setattr__(self, "budgets", tuple(sorted(float(b) for b in self.budgets)))
        if not self.budgets or self.budgets[0] <= 0:
            raise ValueError(f"comparison: budgets {list(self.budgets)} must be one or more numbers > 0")
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(f"comparison: budget unit {self.budget_unit!r} must be one of {', '.join(BUDGET_UNITS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"comparison: schedule {self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if len(self.recipes) < 1:
            raise ValueError("comparison: recipes is empty")
        if self.labels and len(self.labels) != len(self.recipes):
            raise ValueError(f"comparison: {len(self.labels)} labels for {len(self.recipes)} recipes")
        if self.evals < 0:
            raise ValueError(f"comparison: evals {self.evals} must be >= 0")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if not self.protocols or bad:
            raise ValueError(f"comparison: protocols {list(self.protocols)} must be a non-empty subset of "
                             f"{', '.join(PROTOCOLS)}")
        unknown = set(self.protocol_args) - set(PROTOCOLS[1:])
        if unknown:
            raise ValueError(f"comparison: protocol options for {sorted(unknown)}: only linprobe and finetune take any")
        for name in ("knn_k", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"comparison: {name} must be >= 1, got {getattr(self, name)}")
        if self.knn_bank < 0 or self.knn_temperature <= 0:
            raise ValueError("comparison: knn_bank must be >= 0 and knn_temperature > 0")
        if self.knn_feature not in ("avg", "token"):
            raise ValueError(f"comparison: knn_feature {self.knn_feature!r} must be avg or token")
        overrides = parse_overrides(list(self.train_args))
        clash = [f for f in _PLANNED_FIELDS if f in overrides]
        if clash:
            raise ValueError(f"comparison: {', '.join('--' + c.replace('_', '-') for c in clash)} cannot be set for "
                             "the runs: the comparison sets them from the data, the budgets and --out")


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlannedRun:
    """One pre-training run of the comparison and the steps at which its checkpoints are evaluated."""

    label: str
    recipe: str
    folder: Path
    train: TrainConfig  # everything but max_steps (set per segment)
    flops_per_image: int
    steps_per_epoch: int
    images_per_step: int
    eval_steps: tuple[int, ...]  # ascending; 0 = the untrained weights
    budget: float | None = None  # per-budget schedule: this run's budget

    @property
    def final_step(self) -> int:
        return self.train.epochs * self.steps_per_epoch

    def pflops(self, step: int) -> float:
        return step * self.images_per_step * self.flops_per_image / 1e15

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "recipe": self.recipe, "folder": str(self.folder), "epochs": self.train.epochs,
                "steps_per_epoch": self.steps_per_epoch, "images_per_step": self.images_per_step,
                "train_flops_per_image": self.flops_per_image, "eval_steps": list(self.eval_steps),
                "eval_pflops": [self.pflops(s) for s in self.eval_steps], "budget": self.budget,
                "train": self.train.to_dict()}


def budget_steps(budget: float, unit: str, flops_per_step: int, steps_per_epoch: int) -> int:
    """The first optimiser step at which cumulative compute (PFLOPs) or data (epochs) is >= `budget` (at least 1).

    The small tolerance keeps a budget that is an exact multiple of a step (e.g. 2 epochs) at that step despite
    floating-point rounding."""
    steps = budget * 1e15 / flops_per_step if unit == "pflops" else budget * steps_per_epoch
    return max(1, math.ceil(steps - 1e-9))


def single_schedule(budgets: tuple[float, ...], unit: str, evals: int, random_init: bool, flops_per_step: int,
                    steps_per_epoch: int) -> tuple[int, tuple[int, ...]]:
    """(epochs, evaluation steps) of a single-schedule run: the fewest whole epochs covering the largest budget;
    evaluations at each budget, at `evals` evenly spaced points up to the largest budget, and at the end."""
    top = budgets[-1]
    grid = [top * i / evals for i in range(1, evals + 1)] if evals else []
    steps = {budget_steps(b, unit, flops_per_step, steps_per_epoch) for b in (*budgets, *grid)}
    epochs = max(1, math.ceil(max(steps) / steps_per_epoch))
    steps.add(epochs * steps_per_epoch)
    if random_init:
        steps.add(0)
    return epochs, tuple(sorted(steps))


def per_budget_epochs(budget: float, unit: str, flops_per_step: int, steps_per_epoch: int) -> int:
    """Whole epochs of a per-budget run: the nearest to the budget, at least 1."""
    steps = budget * 1e15 / flops_per_step if unit == "pflops" else budget * steps_per_epoch
    return max(1, round(steps / steps_per_epoch))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "run"


def _train_flops_per_image(cfg: TrainConfig, num_classes: int) -> int:
    """The trainer's figure (MaskedAutoencoderViT.train_flops_per_image), from a throw-away model."""
    from model.mae import MaskedAutoencoderViT

    return MaskedAutoencoderViT(cfg.model_config(num_classes=num_classes)).train_flops_per_image(cfg.mask_ratio)


def run_config(cfg: ComparisonConfig, recipe: str, folder: Path, epochs: int | None = None) -> TrainConfig:
    """The pre-training configuration of one run: the recipe, the comparison's defaults (nothing on screen, no
    periodic checkpoints, one kept), the user's overrides, then the planned fields."""
    user = parse_overrides(list(cfg.train_args))
    values: dict[str, Any] = {"display": "off", "tensorboard": False, "ckpt_every": 0,
                              "keep": 1_000_000 if cfg.keep_checkpoints else 1, "keep_every": 0, "seed": cfg.seed,
                              "device": cfg.device, **user, "data": cfg.data, "out": str(folder), "resume": "auto"}
    base = build_config(recipe, values)
    if epochs is None:
        return base
    # A shorter or longer schedule keeps the recipe's warm-up share, unless the warm-up was given explicitly.
    warmup = (min(user["warmup_epochs"], epochs) if "warmup_epochs" in user
              else base.warmup_epochs / base.epochs * epochs)
    return dataclasses.replace(base, epochs=epochs, warmup_epochs=warmup)


def plan_comparison(cfg: ComparisonConfig) -> list[PlannedRun]:
    """Every run of the comparison with its schedule and evaluation steps (reads the manifests; trains nothing)."""
    from train.entry import check_class_maps

    manifest, _ = load_manifest(cfg.data)
    evals, _ = load_manifest(cfg.eval_data)
    check_class_maps(manifest, evals, f"eval data {cfg.eval_data}")
    out = Path(cfg.out)
    runs: list[PlannedRun] = []
    labels = []
    for i, recipe in enumerate(cfg.recipes):
        base = run_config(cfg, recipe, out)
        label = cfg.labels[i] if cfg.labels else method_label(base.model_config(num_classes=manifest.num_classes)
                                                              .to_dict())
        labels.append(label)
        fpi = _train_flops_per_image(base, manifest.num_classes)
        images_per_step = base.effective_batch(1)
        spe = manifest.num_samples // base.batch_size // base.accum_steps
        if spe < 1:
            raise ValueError(f"comparison: {cfg.data} has {manifest.num_samples} images, fewer than one step of "
                             f"{images_per_step} for {recipe}; lower --batch-size")
        fps = fpi * images_per_step
        if cfg.schedule == "single":
            epochs, steps = single_schedule(cfg.budgets, cfg.budget_unit, cfg.evals, cfg.random_init, fps, spe)
            folder = out / slug(label)
            runs.append(PlannedRun(label, recipe, folder, run_config(cfg, recipe, folder, epochs), fpi, spe,
                                   images_per_step, steps))
            continue
        seen: dict[int, float] = {}
        for j, b in enumerate(cfg.budgets):
            epochs = per_budget_epochs(b, cfg.budget_unit, fps, spe)
            if epochs in seen:  # two budgets round to the same schedule: train it once
                continue
            seen[epochs] = b
            folder = out / f"{slug(label)}-{epochs}ep"
            steps = (0,) if cfg.random_init and j == 0 else ()
            runs.append(PlannedRun(label, recipe, folder, run_config(cfg, recipe, folder, epochs), fpi, spe,
                                   images_per_step, (*steps, epochs * spe), budget=b))
    dupes = {x for x in labels if labels.count(x) > 1}
    if dupes:
        raise ValueError(f"comparison: several recipes are called {sorted(dupes)}: name them with labels "
                         "(--labels A,B)")
    return runs


def plan_fingerprint(cfg: ComparisonConfig, runs: list[PlannedRun]) -> dict[str, Any]:
    """What decides the comparison's results: a re-run continues only when this is unchanged."""
    def identity(folder: str) -> str:
        m, _ = load_manifest(folder)
        return hashlib.sha256("".join(s.sha256 for s in m.shards).encode()).hexdigest()[:16]

    return {
        "data": {"train": identity(cfg.data), "eval": identity(cfg.eval_data)},
        "budgets": list(cfg.budgets), "budget_unit": cfg.budget_unit, "schedule": cfg.schedule,
        "protocols": list(cfg.protocols), "protocol_args": {k: list(v) for k, v in cfg.protocol_args.items()},
        "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "bank": cfg.knn_bank, "feature": cfg.knn_feature},
        "runs": [{k: v for k, v in r.describe().items() if k != "train"}
                 | {"train": {k: v for k, v in r.train.to_dict().items() if k not in _SPEED_FIELDS}} for r in runs],
    }


# Fields that change how fast a run goes or what it prints, not what it computes.
_SPEED_FIELDS = ("data", "out", "display", "tensorboard", "wandb", "recon_images", "data_threads", "keep", "log_every",
                 "device", "compile")


# ----------------------------------------------------------------------------------------------------------------
# Running it


@dataclass
class ComparisonOutcome:
    plan: list[PlannedRun]
    runs: list[RunData]
    methods: list[Method]
    analysis: Analysis
    train_seconds: float  # wall time spent training (this invocation)
    eval_seconds: float  # wall time spent evaluating (this invocation)
    warnings: list[str] = field(default_factory=list)  # from reading the run folders (the analysis has its own)


def _checkpoint(run: PlannedRun, step: int) -> Path:
    return run.folder / CHECKPOINT_DIR / checkpoint_name(step)


def _result_file(run: PlannedRun, step: int, protocol: str) -> Path:
    from train.eval.results import result_path

    return result_path(_checkpoint(run, step), protocol)


class _Evaluator:
    """Evaluates checkpoints with the chosen protocols; k-NN runs in this process on two eval loaders built once."""

    def __init__(self, cfg: ComparisonConfig, env):
        self.cfg, self.env = cfg, env
        self._loaders: dict[tuple[int, str, str], Any] = {}

    def _knn_loaders(self, img_size: int, backend: str, threads: int, decode: str) -> tuple[Any, Any]:
        from train.entry import build_eval_loader

        key = (img_size, backend, decode)
        if key not in self._loaders:
            self._loaders[key] = tuple(build_eval_loader(data, self.cfg.eval_batch_size, img_size, backend, threads,
                                                         self.cfg.seed, self.env, decode)
                                       for data in (self.cfg.data, self.cfg.eval_data))
        return self._loaders[key]

    def knn(self, run: PlannedRun, checkpoint: Path) -> dict[str, Any]:
        from train.entry import device_name, software_versions
        from train.eval.encoder import encoder_forward_flops, resolve_source
        from train.eval.knn import KnnSettings, knn_eval
        from train.eval.results import make_result, write_result
        from train.system.device import environment_record

        source = resolve_source(checkpoint)
        img_size = source.model_cfg.img_size
        bank, queries = self._knn_loaders(img_size, run.train.data_backend, run.train.data_threads, run.train.decode)
        settings = KnnSettings(k=self.cfg.knn_k, temperature=self.cfg.knn_temperature,
                               train_samples=self.cfg.knn_bank, feature=self.cfg.knn_feature)
        result = knn_eval(source, bank, queries, settings, self.env)
        # The record `./launch.sh knn` writes for the same evaluation (train/eval/knn.py run()).
        record = make_result(
            "knn", source, {"top1": result.top1, "top5": result.top5, "samples": result.samples,
                            "bank": result.bank, "feature_dim": result.feature_dim},
            {**dataclasses.asdict(settings), "data": self.cfg.data, "eval_data": self.cfg.eval_data,
             "batch_size": self.cfg.eval_batch_size, "img_size": img_size},
            {"images": result.images, "flops": encoder_forward_flops(source.model_cfg) * result.images,
             "seconds": result.seconds, "device_hours": result.seconds / 3600},
            1, device_name(self.env.device), software_versions(),
            environment=environment_record(self.env.device, compile=settings.compile))
        write_result(record)
        return record

    def supervised(self, protocol: str, checkpoint: Path, recipe: str) -> None:
        """Linear probe / fine-tune of the checkpoint with that protocol's own entry (it writes the result), with the
        protocol recipe the pre-training recipe names for its checkpoints (the demo recipes: `small`) unless the
        protocol options choose one."""
        import importlib

        from train.recipes import RECIPES

        module = importlib.import_module(f"train.eval.{protocol}")
        extra = list(self.cfg.protocol_args.get(protocol, ()))
        eval_recipe = RECIPES[recipe].eval_recipe if recipe in RECIPES else ""
        if eval_recipe and not any(a == "--recipe" or a.startswith("--recipe=") for a in extra):
            extra = ["--recipe", eval_recipe, *extra]
        argv = ["--ckpt", str(checkpoint), "--data", self.cfg.data, "--eval-data", self.cfg.eval_data,
                "--device", self.cfg.device, "--display", "off", "--seed", str(self.cfg.seed), "--resume", "auto",
                *extra]
        status = module.run(module.check(argv), self.env)
        if status != 0:
            raise RuntimeError(f"{protocol} of {checkpoint} ended with status {status}; see its run folder's log.txt")

    def close(self) -> None:
        for loaders in self._loaders.values():
            for loader in loaders:
                if hasattr(loader, "close"):
                    loader.close()
        self._loaders.clear()


def _train_to(run: PlannedRun, step: int, env) -> float:
    """Train `run` up to `step` (a new run, or resumed from its newest checkpoint) and leave the checkpoint of that
    step; step 0 writes the untrained weights. Returns the wall seconds spent."""
    from train.pretrain import build

    t0 = time.monotonic()
    trainer, log = build(dataclasses.replace(run.train, max_steps=step), env)
    try:
        if trainer.flops_per_image != run.flops_per_image:  # the plan and the trainer must count alike
            raise RuntimeError(f"{run.label}: the trainer counts {trainer.flops_per_image} FLOPs per image, the plan "
                               f"{run.flops_per_image}")
        if step == 0:
            trainer.save()
        elif trainer.train().status == "preempted":  # SIGTERM / SIGUSR1: the trainer checkpointed and stopped
            raise InterruptedError(f"{run.label}: stopped by a signal at step {trainer.step} (checkpoint written); "
                                   "run the same command again to continue")
        if trainer.step != step:
            raise RuntimeError(f"{run.label}: training stopped at step {trainer.step}, expected {step}")
    finally:
        log.close()
        if hasattr(trainer.loader, "close"):
            trainer.loader.close()
        del trainer
        gc.collect()
    return time.monotonic() - t0


def _newest_step(run: PlannedRun) -> int | None:
    found = list_checkpoints(run.folder / CHECKPOINT_DIR)
    return max(c.step for c in found) if found else None


def _check_plan(out: Path, fingerprint: dict[str, Any]) -> None:
    path = out / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text()).get("fingerprint")
        if old != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"{out} holds a comparison made with other settings ({path}); choose another output "
                             "folder, or delete that one to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a comparison folder of this tool; choose another output folder")


def run_comparison(cfg: ComparisonConfig, say: Callable[[str], None] = print) -> ComparisonOutcome:
    """Plan, train, evaluate (resuming a previous invocation with the same settings), then analyse."""
    from train.distributed import DistEnv, resolve_device

    runs = plan_comparison(cfg)
    out = Path(cfg.out)
    fingerprint = plan_fingerprint(cfg, runs)
    _check_plan(out, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PLAN_NAME, {"fingerprint": fingerprint, "config": _jsonable(dataclasses.asdict(cfg)),
                                        "runs": [r.describe() for r in runs]})
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = DistEnv(device=device)
    for r in runs:
        what = f"{r.budget:g} {cfg.budget_unit} budget, " if r.budget is not None else ""
        say(f"{r.label} ({r.recipe}): {what}{r.train.epochs} epoch(s) = {r.final_step} steps of {r.images_per_step} "
            f"images, {r.flops_per_image / 1e9:.3g} GFLOPs per image, {r.pflops(r.final_step):.4g} PFLOPs; "
            f"evaluated at steps {', '.join(map(str, r.eval_steps))} -> {r.folder}")
    evaluator = _Evaluator(cfg, env)
    train_s = eval_s = 0.0
    try:
        for r in runs:
            for step in r.eval_steps:
                todo = [p for p in cfg.protocols if not _result_file(r, step, p).is_file()]
                if not todo:
                    continue
                newest = _newest_step(r)
                if newest is not None and newest > step:
                    raise ValueError(f"{r.folder} is already trained past step {step} ({newest}) without the "
                                     f"{', '.join(todo)} result of step {step}: that checkpoint is gone; delete the "
                                     "run folder to redo it")
                if newest != step:
                    train_s += _train_to(r, step, env)
                t0 = time.monotonic()
                lines = []
                for p in todo:
                    if p == "knn":
                        rec = evaluator.knn(r, _checkpoint(r, step))
                        lines.append(f"k-NN top-1 {100 * rec['top1']:.2f}%")
                    else:
                        evaluator.supervised(p, _checkpoint(r, step), r.recipe)
                        rec = json.loads(_result_file(r, step, p).read_text())
                        lines.append(f"{p} top-1 {100 * rec['top1']:.2f}%")
                eval_s += time.monotonic() - t0
                say(f"{r.label}: step {step}/{r.final_step} ({r.pflops(step):.4g} PFLOPs) " + ", ".join(lines))
    finally:
        evaluator.close()
    warnings: list[str] = []
    loaded = [load_run(r.folder, r.label, warn=warnings.append) for r in runs]
    methods = group_runs(loaded)
    analysis = analyse(methods, list(cfg.protocols))
    return ComparisonOutcome(runs, loaded, methods, analysis, train_s, eval_s, warnings)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


# ----------------------------------------------------------------------------------------------------------------
# An ImageFolder as train / held-out shards (the demo's data path)


def split_imagefolder(src: Path, work: Path, holdout: float, seed: int) -> tuple[Path, Path, int, int]:
    """`src`/<class>/files -> `work`/train and `work`/val trees of symbolic links, holding out `holdout` of every
    class (at least one image of a class with two or more), chosen by a seeded permutation. Returns (train, val,
    train images, held-out images)."""
    train_root, val_root = work / "train", work / "val"
    n_train = n_val = 0
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{src} has no class folders: an ImageFolder is SRC/<class>/<image files>")
    for index, cls in enumerate(classes):
        files = sorted(p for p in cls.rglob("*") if p.is_file() and not p.name.startswith("."))
        k = min(len(files) - 1, max(1, round(holdout * len(files)))) if len(files) > 1 else 0
        order = np.random.default_rng([seed, index]).permutation(len(files))
        held = set(order[:k].tolist())
        for i, f in enumerate(files):
            dest = (val_root if i in held else train_root) / cls.name / f.relative_to(cls)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.is_symlink():
                os.symlink(f.resolve(), dest)
        n_val += k
        n_train += len(files) - k
    return train_root, val_root, n_train, n_val


def shard_imagefolder(src: str | os.PathLike, out: str | os.PathLike, *, name: str = "", holdout: float = 0.1,
                      seed: int = 0, max_side: int | None = None, workers: int | None = None,
                      say: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Shard an ImageFolder for a comparison with the sharding library: `src/train` and `src/val` (or
    `src/validation`) when present, else `src` itself with `holdout` of every class held out. The held-out split
    uses the training split's class map. `name`: the data set's name in the shard file names and manifests
    (default: `src`'s folder name). Returns (train shards, eval shards); already complete shards are reused."""
    from pipeline.shards.imageproc import ImageConfig
    from pipeline.shards.sharding import ShardConfig, default_workers, run_sharding

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder (expected an ImageFolder: <class>/<image files>, or "
                                "train/ and val/ of those)")
    val = next((src / n for n in ("val", "validation") if (src / n).is_dir()), None)
    if (src / "train").is_dir():
        train_src = src / "train"
        if val is None:
            train_src, val, n, k = split_imagefolder(train_src, out / "split", holdout, seed)
            say(f"{src}/train has no val/ beside it: held out {k} of {n + k} images ({holdout:.0%} per class)")
    else:
        train_src, val, n, k = split_imagefolder(src, out / "split", holdout, seed)
        say(f"{src}: held out {k} of {n + k} images ({holdout:.0%} per class) for evaluation")
    name = slug(name or src.resolve().name).replace(".", "-")
    image = ImageConfig(max_side=max_side) if max_side else ImageConfig()
    workers = workers or default_workers()
    train_out, eval_out = out / "train", out / "val"
    for split, source, dest, class_map in (("train", train_src, train_out, None), ("val", val, eval_out, train_out)):
        result = run_sharding(ShardConfig(src=source, out=dest, split=split, name=name, class_map=class_map,
                                          shard_samples=1000, seed=seed, image=image, workers=workers))
        m = result.manifest
        skipped = m.totals.get("skipped", 0)
        say(f"shards {dest}: {m.num_samples} images, {m.num_classes} classes"
            + (f", {skipped} input(s) skipped (see its manifest.json)" if skipped else "")
            + (" (already complete)" if result.already_complete else f" in {result.seconds:.1f} s"))
    return train_out, eval_out


def protocol_args_from_text(text: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """{"linprobe": "--epochs 5 --batch-size 256"} -> {"linprobe": ("--epochs", "5", ...)}."""
    return {k: tuple(shlex.split(v)) for k, v in text.items() if v}
