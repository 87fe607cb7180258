"""`./launch.sh bench e2e`: the real training loop on real shards, against the model's own step rate.

    ./launch.sh bench e2e --data SHARDS --recipes supmae_vit_base_in1k_400ep,mae_vit_base_in1k_1600ep
    ./launch.sh bench e2e --data shards/cifar10-train --recipes supmae_vit_tiny_demo -- --data-threads 2

For each recipe (with the TrainConfig overrides after `--`, as `./launch.sh pretrain` takes them):

  e2e     `train.pretrain.build` + `Trainer.train()` exactly as a pre-training run (DALI or torch loader over the
          shards, the trainer's no-sync step, log intervals, metrics.jsonl in a scratch folder) for
          `(warmup + repeats) x steps` optimiser steps with the log interval set to `--steps`. Every log interval
          after the `--warmup` first ones is one repeat: images/s over its rate window (the trainer's own figure:
          checkpoint writes at epoch ends excluded, the loader's epoch restarts included) and the share of that
          window the loop waited for the loader (`data_wait`). An interval cut by an epoch end is merged back
          with its other part, so every repeat covers exactly `--steps` steps.
  model   the same model, batch, precision, compile and masking settings timed by `bench model`'s step
          (`train.step_timing.TrainStep`: synthetic uint8 NHWC input already on the device, no loader, no
          trainer bookkeeping): the rate the device reaches when it never waits.
  ratio   e2e images/s / model images/s: how close the pipeline and the loop keep the device to saturation
          (1.0 = the device never waits). On a CPU machine the loader's decoding competes with the model for
          the same cores, so the ratio there measures the sum of both costs, not overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import model_config
from tools.bench.model import load_note, start_load, time_train_step
from tools.bench.report import BenchReport, spread_text
from train.config import TrainConfig, build_config, parse_overrides
from train.distributed import DistEnv, resolve_device
from train.step_timing import StepSetup

DESCRIPTION = "the real training loop on real shards: images/s, data-wait %, ratio to `bench model`'s step rate"
COLUMNS = ["model", "config", "batch", "steps", "images/s", "spread", "data wait", "model images/s",
           "model spread", "e2e / model", "TFLOP/s", "MFU"]
DEFAULT_RECIPES = "supmae_vit_base_in1k_400ep,mae_vit_base_in1k_1600ep"


@dataclass(frozen=True)
class ConfigStepSetup(StepSetup):
    """`bench model`'s step for an exact ModelConfig: a recipe's model options (depth, decoder, ...) included.

    model_args: sorted (field, value) pairs of ModelConfig fields applied on top of the preset.
    """

    model_args: tuple[tuple[str, Any], ...] = ()

    def model_config(self):
        return model_config(self.model, **{**dict(self.model_args), "fused_masking": self.fused})


@dataclass(frozen=True)
class E2EConfig:
    """One row per entry of `runs` (validated TrainConfigs whose `out` is replaced by a scratch folder)."""

    runs: tuple[TrainConfig, ...]
    steps: int  # optimiser steps per repeat (= the trainer's log interval)
    warmup: int  # warm-up intervals of `steps` steps, not counted
    repeats: int
    device: str

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"bench e2e: --steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"bench e2e: --warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"bench e2e: --repeats must be >= 1, got {self.repeats}")
        if not self.runs:
            raise ValueError("bench e2e: --recipes is empty")

    @property
    def total_steps(self) -> int:
        return (self.warmup + self.repeats) * self.steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training shard folder (written by `./launch.sh shard`)")
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help=f"comma-separated pre-training recipes (./launch.sh pretrain --help; default {DEFAULT_RECIPES})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the recipe's on a GPU, 16 on a CPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per repeat, also the log interval (default 50 on a GPU, 5 on a CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("train_args", nargs="*", metavar="-- --field value",
                   help="TrainConfig overrides for every recipe after `--`, e.g. -- --img-size 32 --data-threads 8")


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    overrides = parse_overrides(list(args.train_args))
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    elif not gpu and "batch_size" not in overrides:
        overrides["batch_size"] = 16
    runs = []
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        # `out` is a placeholder until run() creates the scratch folder; the schedule is the recipe's.
        runs.append(build_config(recipe, {**overrides, "data": args.data, "out": "<scratch>",
                                          "device": args.device}))
    return E2EConfig(tuple(runs), steps=(50 if gpu else 5) if args.steps is None else args.steps,
                     warmup=1 if args.warmup is None else args.warmup,
                     repeats=(5 if gpu else 3) if args.repeats is None else args.repeats, device=str(device))


# ----------------------------------------------------------------------------------------------------------------


def _bench_config(cfg: TrainConfig, e: E2EConfig, out: str, steps_per_epoch: int) -> TrainConfig:
    """The run's config for the benchmark: log interval = one repeat, no periodic checkpoints, enough epochs that
    the schedule does not end before the last measured step, nothing on screen."""
    epochs = max(cfg.epochs, math.ceil(e.total_steps / steps_per_epoch))
    return dataclasses.replace(cfg, out=out, max_steps=e.total_steps, log_every=e.steps, ckpt_every=0, keep=1,
                               keep_every=0, epochs=epochs, display="off", tensorboard=False, eval_every=0,
                               resume="")


def windows(records: list[dict[str, Any]], warmup_steps: int, steps: int) -> list[dict[str, float]]:
    """The trainer's "train" records after `warmup_steps`, merged into windows of `steps` steps.

    An epoch end closes a log interval early, so one window may span two records; its images/s is total images /
    total rate-window seconds, its data wait the seconds-weighted mean. Each window: images, seconds, images_per_sec,
    data_wait, mfu (None on CPUs), tflops.
    """
    merged: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "train" or r["step"] <= warmup_steps:
            continue
        w = merged.setdefault((r["step"] - warmup_steps - 1) // steps,
                              {"images": 0.0, "seconds": 0.0, "wait": 0.0, "tflop": 0.0, "mfu": []})
        secs = r["interval_seconds"]
        w["images"] += r["images_per_sec"] * secs
        w["seconds"] += secs
        w["wait"] += r["data_wait"] * secs
        w["tflop"] += r["tflops_per_device"] * secs
        if r.get("mfu") is not None:
            w["mfu"].append((r["mfu"], secs))
    out = []
    for _, w in sorted(merged.items()):
        s = w["seconds"]
        mfu = sum(m * t for m, t in w["mfu"]) / s if w["mfu"] else None
        out.append({"images": w["images"], "seconds": s, "images_per_sec": w["images"] / s,
                    "data_wait": w["wait"] / s, "tflops": w["tflop"] / s, "mfu": mfu})
    return out


def run_e2e(cfg: TrainConfig, e: E2EConfig) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train `cfg` for `e.total_steps` steps in a scratch run folder; returns (windows, the run's config.json)."""
    from pipeline.shards.shard_format import load_manifest
    from train.pretrain import build

    manifest, _ = load_manifest(cfg.data)
    steps_per_epoch = manifest.num_samples // cfg.batch_size  # one process, drop_last
    if steps_per_epoch < 1:
        raise ValueError(f"bench e2e: {cfg.data} has {manifest.num_samples} images, fewer than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        trainer, log = build(_bench_config(cfg, e, tmp, steps_per_epoch), DistEnv(device=device))
        try:
            trainer.train()
        finally:
            log.close()
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line]
        run_config = json.loads((Path(tmp) / "config.json").read_text())
        del trainer
    return windows(records, e.warmup * e.steps, e.steps), run_config


def step_setup(cfg: TrainConfig, run_config: dict[str, Any]) -> ConfigStepSetup:
    """`bench model`'s step with the e2e run's resolved model, batch, precision, compile and masking."""
    model = dict(run_config["model"])
    fused = model.pop("fused_masking")
    precision = run_config["derived"]["precision"]
    return ConfigStepSetup(model=cfg.model, batch_size=cfg.batch_size, dtype=precision, fused=fused,
                           compile=bool(run_config["derived"]["compile"]), input_format="uint8_nhwc",
                           grad_scaler=precision == "fp16", mask_ratio=cfg.mask_ratio, device=cfg.device
                           if cfg.device != "auto" else None, model_args=tuple(sorted(model.items())))



def run(args: argparse.Namespace) -> BenchReport:
    e = config_from_args(args)
    load = start_load(torch.device(e.device))
    first = e.runs[0]
    report = BenchReport("bench e2e", COLUMNS, settings={
        "data": first.data, "device": e.device, "steps_per_repeat": e.steps, "warmup_intervals": e.warmup,
        "repeats": e.repeats, "data_backend": first.data_backend, "data_threads": first.data_threads,
        "batch_size": first.batch_size, "img_size": first.img_size,
    })
    for cfg in e.runs:
        wins, run_config = run_e2e(cfg, e)
        setup = step_setup(cfg, run_config)
        # The model-only rate right after the e2e run, on the same device and settings.
        model_row = time_train_step(setup, warmup=max(1, e.warmup), repeats=e.repeats, steps=e.steps)
        rates = [w["images_per_sec"] for w in wins]
        ips = statistics.median(rates)
        model_ips = model_row["images/s"]
        mfus = [w["mfu"] for w in wins if w["mfu"] is not None]
        report.add_row(**{
            "model": cfg.recipe or cfg.model, "config": f"{setup.describe()} {cfg.data_backend}", "batch":
            cfg.batch_size, "steps": e.steps * len(wins), "images/s": ips, "spread": spread_text(rates),
            "data wait": f"{100 * statistics.median(w['data_wait'] for w in wins):.1f}%",
            "model images/s": model_ips, "model spread": model_row["spread"],
            "e2e / model": ips / model_ips, "TFLOP/s": statistics.median(w["tflops"] for w in wins),
            "MFU": f"{100 * statistics.median(mfus):.1f}%" if mfus else None,
        })
    report.notes.append(
        f"e2e: train.pretrain.build + Trainer.train() on the shards (the pre-training code path), "
        f"{e.warmup} warm-up interval(s) then {e.repeats} measured interval(s) of {e.steps} steps; images/s and "
        "data wait are the trainer's own metrics.jsonl figures (checkpoint writes excluded), median over intervals, "
        "spread = half the min-max range.")
    report.notes.append(
        "model: bench model's step (TrainStep: synthetic uint8 NHWC input on the device, same model, batch, "
        "precision, compile and masking) timed right after; e2e / model = how close the loop keeps the device to "
        "its own step rate.")
    if torch.device(e.device).type == "cpu":
        report.notes.append("CPU run: the loader's decoding and the model share the same cores, so e2e / model "
                            "reflects their summed cost rather than how well loading overlaps compute.")
    if note := load_note(load):
        report.notes.append(note)
    return report
