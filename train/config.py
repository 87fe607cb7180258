"""The pre-training configuration: one typed dataclass, named recipes (train/recipes.py), command-line overrides.

    cfg = config_from_args(["--recipe", "supmae_vit_tiny_demo", "--data", "shards", "--out", "runs/a",
                            "--epochs", "2", "--patch-size", "4"])

Every `TrainConfig` field can be set on the command line as `--field-name value` (`--field-name=value` works too;
booleans also as `--field-name` / `--no-field-name`, and `--no-X` means `--X off` for on/off/auto switches). Any
field of the model's `ModelConfig` (`--patch-size`, `--embed-dim`, `--decoder-depth`, `--fused-masking`, ...) is
accepted the same way and lands in `model_args`. The option names of MAE's and timm's scripts are accepted too
(OPTION_ALIASES: `--data-path`, `--output-dir`, `--input-size`, `--finetune`, `--model-ema`, timm's `--aa`).
Unknown options and impossible values are rejected here, before
anything is built, with a message naming the option, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from model.config import ModelConfig, model_config
from pipeline.loaders.base import DEFAULT_SHUFFLE_BUFFER
from train.tracking.wandb_sink import DEFAULT_PROJECT as WANDB_DEFAULT_PROJECT

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SWITCHES = ("auto", "on", "off")
SWITCH_FIELDS = ("compile", "fused_masking")  # auto/on/off fields: --no-X means --X off
DEVICES = ("auto", "cuda", "cpu")
DATA_BACKENDS = ("dali", "torch")
DECODES = ("auto", "gpu", "cpu", "dali-cpu")  # pipeline.loaders.base.DECODES
DISPLAYS = ("auto", "live", "plain", "off")
# Set from the training data set's manifest when not given (`--num-classes` overrides).
AUTO_MODEL_FIELDS = ("num_classes",)
# A ModelConfig field that is also a field of the configuration class (img_size: it sets the loader and the model)
# is set through that field, never through model_args.

# Fields that may change between a run and its resumption without changing what is computed (where files go, how
# often things are logged or saved, how fast the data is read). Any other difference is reported at resume.
RUNTIME_FIELDS = frozenset({
    "out", "resume", "max_steps", "log_every", "ckpt_every", "keep", "keep_every", "display", "tensorboard",
    "data", "data_threads", "compile", "eval_data", "eval_every", "eval_batch_size", "recipe", "wandb",
    "recon_images", "sync_check",
})
# MAE's (main_pretrain.py, main_finetune.py) and timm's (train.py) option names -> this project's, for the classes
# that have the target (docs/training.md has the table). --aa is parsed by parse_timm_randaugment.
OPTION_ALIASES = {
    "data_path": "data", "output_dir": "out", "output": "out", "input_size": "img_size", "finetune": "ckpt",
    "model_ema": "ema", "model_ema_decay": "ema_decay", "accum_iter": "accum_steps", "nb_classes": "num_classes",
    "num_workers": "data_threads",
}
# MAE's and timm's options that have no counterpart here, with what to do instead (an unknown-option message says it).
RETIRED_OPTIONS = {
    "log_dir": "TensorBoard events go to OUT/tb (--out); drop --log_dir",
    "pin_mem": "batches bound for a GPU are pinned already; drop it",
    "no_pin_mem": "batches bound for a GPU are pinned already; drop it",
    "dist_url": "./launch.sh sets up the processes (README \"Pre-train\"); drop it",
    "world_size": "./launch.sh sets up the processes: --nproc N per node, nodes from NNODES or SLURM; drop it",
    "local_rank": "./launch.sh sets up the processes; drop it",
    "dist_on_itp": "./launch.sh sets up the processes; drop it",
    "start_epoch": "--resume auto continues at the checkpoint's step and data position",
}
# String options that may be given without a value (`--wandb` alone = its default project).
OPTIONAL_VALUES = {"wandb": WANDB_DEFAULT_PROJECT}


def option_field(default: Any, help: str) -> Any:
    """A configuration dataclass field with its help text (shown by `--help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_f = option_field


@dataclass
class RunConfig:
    """What every protocol's process needs (pre-training, fine-tuning, linear probing, k-NN): data, device, numerics.

    Subclasses add their fields and may redeclare a field to change its default or help (it keeps its place).
    Validation runs in `__post_init__`, base class first, after every value was coerced to its declared type.
    """

    data: str = _f("", "training shard folder (with manifest.json); required")
    out: str = _f("", "output folder")
    eval_data: str = _f("", "held-out shard folder ('' = none)")
    eval_batch_size: int = _f(0, "per-process batch for --eval-data (0 = --batch-size)")
    batch_size: int = _f(512, "batch per process (per GPU)")
    device: str = _f("auto", "auto (the GPU; stops if torch cannot use one that is there) | cuda | cpu")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with a gradient scaler) | fp32")
    compile: str = _f("auto", "torch.compile: auto (on for CUDA) | on | off  (--no-compile = off)")
    tf32: bool = _f(True, "fp32 matmuls on CUDA use TF32 tensor cores (what --precision fp32 trains with); "
                          "--no-tf32 = IEEE fp32 matmuls")
    seed: int = _f(0, "seed of weights, augmentation and data order")
    data_backend: str = _f("dali", "dali | torch")
    decode: str = _f("auto", "where JPEGs are decoded (dali backend): gpu = nvJPEG + GPU resize (default on a GPU), "
                     "cpu = crop-window decode on CPU threads + resize on the output device (default without a "
                     "GPU), dali-cpu = the GPU pipeline on DALI's CPU backend")
    data_threads: int = _f(4, "loader threads per process (DALI CPU threads / DataLoader workers)")

    def __post_init__(self) -> None:
        _normalise_types(self)
        if not self.data:
            raise ValueError("--data is required (got none)")
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("compile", self.compile, SWITCHES)
        _check_choice("data_backend", self.data_backend, DATA_BACKENDS)
        _check_choice("decode", self.decode, DECODES)
        for name in ("batch_size", "data_threads"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("eval_batch_size", "seed"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)} (written by a newer version?)")
        return cls(**d)

    def differences(self, other: RunConfig, ignore: frozenset[str] = RUNTIME_FIELDS) -> dict[str, tuple[Any, Any]]:
        """{field: (self value, other value)} for fields that differ, except `ignore`."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}


@dataclass
class LoopConfig(RunConfig):
    """The training loop's settings (train.trainer.Trainer reads these): schedule, optimiser basics, augmentation
    geometry, evaluation, checkpoints and logs. Shared by pre-training, fine-tuning and linear probing."""

    eval_every: int = _f(0, "evaluate on --eval-data every N epochs (0 = never)")
    epochs: int = _f(400, "epochs of the cosine schedule")
    warmup_epochs: float = _f(20.0, "linear warm-up epochs (fractions allowed)")
    max_steps: int = _f(0, "stop after this many optimiser steps (0 = run the whole schedule); the schedule is unchanged")
    accum_steps: int = _f(1, "micro-batches per optimiser step (changes BatchNorm statistics)")
    blr: float = _f(1.5e-4, "base learning rate: lr = blr x effective batch / 256")
    lr: float | None = _f(None, "absolute peak learning rate (overrides --blr)")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine")
    weight_decay: float = _f(0.05, "weight decay (not on biases and other 1-D tensors)")
    clip_grad: float = _f(0.0, "clip the global gradient norm to this value (0 = no clipping)")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (CUDA)")
    skip_nonfinite: int = _f(0, "skip up to N steps with non-finite loss/gradients before stopping")
    random_area: tuple[float, float] = _f((0.2, 1.0), "RandomResizedCrop area range, e.g. 0.2,1.0")
    random_aspect_ratio: tuple[float, float] = _f((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range")
    shuffle_buffer: int = _f(DEFAULT_SHUFFLE_BUFFER, "samples in the loader's shuffle buffer per process "
                                                     "(host memory: this x the mean JPEG size)")
    ckpt_every: int = _f(1000, "checkpoint every N steps (0 = only at epoch ends and on signals)")
    keep: int = _f(3, "keep the newest N checkpoints")
    keep_every: int = _f(0, "also keep the epoch-end checkpoint of every N-th epoch for good (0 = none)")
    resume: str = _f("", "'' = new run, 'auto' = newest valid checkpoint in --out (new run if none), or a file")
    log_every: int = _f(50, "steps per log interval (metrics line, display update)")
    sync_check: bool = _f(False, "CUDA: from the second step on, any host-device synchronisation in the training hot "
                                 "path raises an error (torch.cuda.set_sync_debug_mode); log intervals, checkpoints "
                                 "and evaluations are exempt. A check of the configuration, not for production")
    display: str = _f("auto", "auto (live on a terminal, plain otherwise) | live | plain | off")
    tensorboard: bool = _f(True, "write TensorBoard events to OUT/tb")
    wandb: str = _f("", "also log to Weights & Biases: --wandb [PROJECT] (alone: project supmae-fast); "
                        "WANDB_MODE=offline keeps it under OUT/wandb")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("display", self.display, DISPLAYS)
        for name in ("epochs", "accum_steps", "log_every", "keep", "shuffle_buffer"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("eval_every", "max_steps", "skip_nonfinite", "ckpt_every", "keep_every"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        _check(0.0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", self.warmup_epochs,
               f"a number in [0, epochs={self.epochs}]")
        _check(self.blr > 0, "blr", self.blr, "a number > 0")
        _check(self.lr is None or self.lr > 0, "lr", self.lr, "a number > 0 (or none to use --blr)")
        _check(self.min_lr >= 0, "min_lr", self.min_lr, "a number >= 0")
        # The schedule ends at min(min_lr, peak): a min_lr above an explicit --lr would silently be a constant lr.
        _check(self.lr is None or self.min_lr <= self.lr, "min_lr", self.min_lr,
               f"a number in [0, --lr {self.lr}] (the cosine ends there)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.clip_grad >= 0, "clip_grad", self.clip_grad, "a number >= 0 (0 = off)")
        for name in ("random_area", "random_aspect_ratio"):
            lo, hi = getattr(self, name)
            _check(0 < lo <= hi, name, getattr(self, name), "two numbers lo,hi with 0 < lo <= hi")
        _check(self.random_area[1] <= 1.0, "random_area", self.random_area, "an area range within (0, 1]")
        if self.eval_every and not self.eval_data:
            raise ValueError(f"--eval-every {self.eval_every} needs --eval-data (a held-out shard folder)")

    # -- derived values ----------------------------------------------------------------------------------------
    def effective_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def peak_lr(self, world_size: int) -> float:
        """MAE's linear scaling rule: lr = blr x effective batch / 256, unless --lr is given."""
        return self.lr if self.lr is not None else self.blr * self.effective_batch(world_size) / 256


@dataclass
class TrainConfig(LoopConfig):
    """Everything one pre-training run needs; validated on creation. Defaults are the SupMAE ViT-B/16 recipe."""

    out: str = _f("", "run folder: config.json, metrics.jsonl, tb/, checkpoints/; required")
    eval_data: str = _f("", "held-out shard folder for the SupMAE head's top-1 ('' = none)")
    batch_size: int = _f(512, "batch per process (per GPU); effective batch = batch_size x processes x accum_steps")
    seed: int = _f(0, "seed of weights, masking and data order")
    eval_every: int = _f(0, "evaluate the head's top-1 on --eval-data every N epochs (0 = never); logged only")
    accum_steps: int = _f(1, "micro-batches per optimiser step (changes the head's BatchNorm statistics)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases and 1-D tensors; tokens are decayed)")
    sync_bn: bool = _f(False, "SyncBatchNorm for the SupMAE head across processes (CUDA)")
    recipe: str = _f("", "named preset to start from (listed above); the other options override its fields")
    model: str = _f("supmae_vit_base_patch16", "model preset (model.list_models())")
    model_args: dict[str, Any] = _f({}, "ModelConfig overrides; set each with --field-name (e.g. --patch-size 4)")
    img_size: int = _f(224, "input resolution (loader crop and model)")
    mask_ratio: float = _f(0.75, "fraction of patches masked, in (0, 1)")
    init: str = _f("", "initial weights: an original MAE/SupMAE .pth or a checkpoint of this project")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas, e.g. 0.9,0.95")
    recon_images: int = _f(8, "reconstruction grid of N images to TensorBoard / W&B at every checkpoint (0 = off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.recon_images >= 0, "recon_images", self.recon_images, "an integer >= 0 (0 = off)")
        if not self.out:
            raise ValueError("--out is required (got none)")
        _check(self.img_size >= 1, "img_size", self.img_size, "an integer >= 1")
        # The reconstruction loss is the mean over the masked patches: with none masked it is 0 / 0.
        _check(0.0 < self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "a number in (0, 1)")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "betas", self.betas, "two numbers in [0, 1), e.g. 0.9,0.95")
        mc = self.model_config()  # validates the preset name, the model_args keys and their values
        if self.eval_every and not mc.cls_branch:
            raise ValueError(f"--eval-every needs a model with the classification branch; {self.model} has none "
                             "(evaluate MAE encoders with ./launch.sh knn or linprobe)")
        if mc.num_visible(self.mask_ratio) < 1:
            raise ValueError(f"--mask-ratio {self.mask_ratio} keeps no patch of {mc.num_patches}; lower it")
        if mc.num_visible(self.mask_ratio) >= mc.num_patches:
            raise ValueError(f"--mask-ratio {self.mask_ratio} masks no patch of {mc.num_patches} (the loss is "
                             "computed on the masked ones); raise it")

    def model_config(self, **auto: Any) -> ModelConfig:
        """The resolved ModelConfig: preset + model_args + img_size; `auto` fills AUTO_MODEL_FIELDS not given."""
        fill = {k: v for k, v in auto.items() if k in AUTO_MODEL_FIELDS and k not in self.model_args}
        return model_config(self.model, **{**fill, **self.model_args, "img_size": self.img_size})


# ------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _opt(name: str) -> str:
    return name.replace("_", "-")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"--{_opt(name)} {_show(value)} is invalid: must be {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, value, "one of " + ", ".join(choices))


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


_MODEL_HINTS = typing.get_type_hints(ModelConfig)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """{field: type} of a config dataclass."""
    return typing.get_type_hints(cls)


def _takes_model_args(cls: type) -> bool:
    """Whether `cls` collects ModelConfig options (`--patch-size` ...) in a `model_args` field."""
    return "model_args" in _hints(cls)


def _normalise_types(cfg: Any) -> None:
    """Coerce values built in code (ints for floats, lists for tuples) and reject wrong types with the field name."""
    hints = _hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        hint = hints[f.name]
        try:
            setattr(cfg, f.name, _coerce(value, hint))
        except (TypeError, ValueError):
            raise ValueError(f"--{_opt(f.name)} {_show(value)} is invalid: must be {_describe(hint)}") from None
    if not _takes_model_args(type(cfg)):
        return
    if not isinstance(cfg.model_args, dict):
        raise ValueError(f"model_args must be a dict of ModelConfig fields, got {cfg.model_args!r}")
    cfg.model_args = dict(cfg.model_args)
    for k, v in cfg.model_args.items():
        if k in hints:
            raise ValueError(f"model_args may not set {k!r}: use --{_opt(k)} (a field of this configuration)")
        if k not in _MODEL_HINTS:
            raise ValueError(_unknown_message(k, type(cfg)))
        try:
            cfg.model_args[k] = _coerce(v, _MODEL_HINTS[k])
        except (TypeError, ValueError):
            raise ValueError(f"--{_opt(k)} {_show(v)} is invalid: must be {_describe(_MODEL_HINTS[k])}") from None


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int, float, str, bool, X | None, tuple[float, float], dict); raises on mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            raise TypeError(value)
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(f"unsupported field type {hint}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_describe(inner)} or none"
    if origin is tuple:
        return f"{len(args)} comma-separated numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


# ------------------------------------------------------------------------------------------------------------------
# Command line: --field-name value


def option_names(cls: type = None) -> list[str]:
    """Every option name `cls` accepts (default TrainConfig): its fields, then ModelConfig fields when it has
    model_args (those not owned by a field of its own, e.g. img_size)."""
    cls = cls or TrainConfig
    own = [f.name for f in fields(cls) if f.name != "model_args"]
    model = [f.name for f in fields(ModelConfig) if f.name not in _hints(cls)] if _takes_model_args(cls) else []
    return own + model


def _unknown_message(name: str, cls: type = None) -> str:
    if name in RETIRED_OPTIONS:
        return f"unknown option --{_opt(name)}: {RETIRED_OPTIONS[name]}"
    options = [_opt(n) for n in option_names(cls)]
    close = difflib.get_close_matches(_opt(name), options, n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return f"unknown option --{_opt(name)}{hint} (see --help for the list)"


def _parse_value(name: str, text: str, hint: Any) -> Any:
    """Command-line text -> typed value for field `name` of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ValueError(f"--{_opt(name)} {text} is invalid: must be {_describe(hint)}")
    if origin is tuple:
        parts = [p for p in text.replace(" ", "").split(",")]
        if len(parts) != len(args):
            raise bad
        try:
            return tuple(_parse_value(name, p, a) for p, a in zip(parts, args, strict=True))
        except ValueError:
            raise bad from None
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if hint is float:
        try:
            v = float(text)
        except ValueError:
            raise bad from None
        if not math.isfinite(v):
            raise bad
        return v
    return text


def _field_hint(name: str, cls: type) -> tuple[str, Any]:
    """('train' | 'model', type) of option `name` for config class `cls`; raises the unknown-option error."""
    hints = _hints(cls)
    if name in hints and name != "model_args":
        return "train", hints[name]
    if _takes_model_args(cls) and name in _MODEL_HINTS:
        return "model", _MODEL_HINTS[name]
    raise ValueError(_unknown_message(name, cls))


def parse_overrides(argv: list[str], cls: type = None) -> dict[str, Any]:
    """`--field-name value ...` -> {field_name: typed value} for config class `cls` (default TrainConfig);
    ModelConfig fields are collected under model_args when `cls` has that field.

    Also `--field-name=value`, `--flag` / `--no-flag` for booleans, `--no-X` for on/off/auto switches.
    A field given twice takes the last value, also under two of its names (`--output_dir a --out b`: b), so
    scripts can append overrides to a base command.
    """
    cls = cls or TrainConfig
    hints = _hints(cls)
    out: dict[str, Any] = {}
    model_args: dict[str, Any] = {}
    i = 0
    last = ""  # the previous option as given, with its value: named when a stray value follows it
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            after = f" after {last}" if last else ""
            hint = (" (timm's `--input-size 3 H W` is `--img-size H` here)"
                    if last.startswith(("--input-size", "--input_size")) else "")
            raise ValueError(f"unexpected argument {token!r}{after}{hint}: options are --field-name value")
        key, eq, inline = token[2:].partition("=")
        name = key.replace("-", "_")
        target = OPTION_ALIASES.get(name)
        if name not in hints and name not in _MODEL_HINTS and target and (
                target in hints or (target in _MODEL_HINTS and _takes_model_args(cls))):
            name = target
        if name == "aa" and "randaug_m" in hints:
            if not eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                raise ValueError("--aa needs a value (timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1)")
            out.update(parse_timm_randaugment(inline if eq else argv[i + 1]))
            last = f"{token}, which takes one value" if eq else f"{token} {argv[i + 1]}, which takes one value"
            i += 1 if eq else 2
            continue
        negated = False
        if name.startswith("no_") and name not in hints and name not in _MODEL_HINTS:
            name, negated = name[3:], True
        where, hint = _field_hint(name, cls)
        i += 1
        if negated:
            if eq:
                raise ValueError(f"--no-{_opt(name)} takes no value")
            if hint is bool:
                value: Any = False
            elif name in SWITCH_FIELDS:
                value = "off"
            else:
                raise ValueError(f"--no-{_opt(name)} is not an option: --{_opt(name)} is not an on/off switch")
        elif eq:
            value = _parse_value(name, inline, hint)
        elif hint is bool and (i >= len(argv) or argv[i].startswith("--")):
            value = True
        elif name in OPTIONAL_VALUES and (i >= len(argv) or argv[i].startswith("--")):
            value = OPTIONAL_VALUES[name]
        else:
            if i >= len(argv) or (argv[i].startswith("--") and not _looks_negative_number(argv[i])):
                raise ValueError(f"--{_opt(name)} needs a value ({_describe(hint)})")
            value = _parse_value(name, argv[i], hint)
            i += 1
        last = (f"{token}, which takes one value" if eq else f"{token}, which takes no value" if argv[i - 1] == token
                else f"{token} {argv[i - 1]}, which takes one value")
        (model_args if where == "model" else out)[name] = value
    if model_args:
        out["model_args"] = model_args
    return out


def parse_timm_randaugment(text: str) -> dict[str, Any]:
    """timm's RandAugment string (`--aa rand-m9-mstd0.5-inc1`) -> {randaug_n, randaug_m, randaug_mstd, randaug_inc}.

    Sections after "rand", in any order: m (magnitude, 0..10; default 10), n (operations per image; default 2),
    mstd (std of the per-operation magnitude noise; default 0), inc (1 = the ops whose strength increases with
    the magnitude; default 0): timm's defaults for what is not given. "none" turns RandAugment off."""
    if text.strip().lower() in ("", "none", "off"):
        return {"randaug_n": 0}
    parts = text.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"--aa {text} is not supported: only timm's RandAugment strings ('rand-m9-mstd0.5-inc1') "
                         "are; AutoAugment ('original', 'v0') and AugMix ('augmix-...') policies are not")
    out: dict[str, Any] = {"randaug_n": 2, "randaug_m": 10, "randaug_mstd": 0.0, "randaug_inc": False}
    for part in parts[1:]:
        key, value = re.fullmatch(r"([a-z]*)(.*)", part).groups()
        try:
            if key == "m":
                out["randaug_m"] = int(value)
            elif key == "n":
                out["randaug_n"] = int(value)
            elif key == "mstd":
                out["randaug_mstd"] = float(value)
            elif key == "inc":
                out["randaug_inc"] = bool(int(value))
            else:
                raise KeyError(key)
        except ValueError:
            raise ValueError(f"--aa {text}: section {part!r} needs a number after {key!r}") from None
        except KeyError:
            raise ValueError(f"--aa {text}: section {part!r} is not supported (supported: m, n, mstd, inc; "
                             "timm's p, mmax and t change the policy in ways this pipeline does not offer)") from None
    if out["randaug_mstd"] > 100:
        raise ValueError(f"--aa {text}: mstd > 100 (uniform magnitude sampling) is not supported")
    return out


def _looks_negative_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_config(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Recipe values, then `overrides` (model_args merged key by key), validated."""
    from train.recipes import recipe_values

    values: dict[str, Any] = recipe_values(recipe) if recipe else {}
    if recipe:
        values["recipe"] = recipe
    model_args = {**values.pop("model_args", {}), **overrides.get("model_args", {})}
    values.update({k: v for k, v in overrides.items() if k != "model_args"})
    values["model_args"] = model_args
    return TrainConfig(**values)


def config_from_args(argv: list[str]) -> TrainConfig:
    """The command line `--recipe NAME --data D --out O [--field-name value ...]` as a validated TrainConfig.

    A recipe sets a model, schedule and optimiser; options after it override single fields. Without --recipe
    every field not given keeps TrainConfig's default (the SupMAE ViT-B/16 400-epoch setting).
    """
    overrides = parse_overrides(argv)
    recipe = overrides.pop("recipe", None)
    return build_config(recipe, overrides)


def options_help(cls: type, model_heading: str = "Model options (ModelConfig fields, override the preset's value):"
                 ) -> list[str]:
    """`--help` lines of every option of config class `cls`: its fields with help and default, then the ModelConfig
    options when it takes them."""
    lines = []
    for f in fields(cls):
        if f.name == "model_args":
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = _show(default) if default != "" else "''"
        lines.append(f"  --{_opt(f.name):<22} {f.metadata['help']} [{shown}]")
    if _takes_model_args(cls):
        lines += ["", model_heading]
        model_opts = [f"--{_opt(f.name)}" for f in fields(ModelConfig) if f.name not in _hints(cls)]
        for i in range(0, len(model_opts), 5):
            lines.append("  " + " ".join(model_opts[i : i + 5]))
    return lines


LAUNCHER_HELP = ["Launcher options: --nproc N (processes per node; default: one per visible GPU, 1 on CPU).",
                 "Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or SLURM's environment (docs/training.md).",
                 "MAE's and timm's option names work too where they apply: --data_path, --output_dir / --output, "
                 "--input_size, --finetune, --model-ema, --num_workers, --aa rand-m9-mstd0.5-inc1 (docs/training.md)."]


def help_text(prog: str = "./launch.sh pretrain") -> str:
    from train.recipes import RECIPES

    lines = [
        f"usage: {prog} --data SHARDS --recipe NAME --out RUN_DIR [--field-name value ...]",
        "",
        "Recipes:",
        *(f"  {name:<32} {r.description}" for name, r in RECIPES.items()),
        "",
        "Options (any field; defaults shown are TrainConfig's, a recipe changes some of them):",
        *options_help(TrainConfig),
        "",
        *LAUNCHER_HELP,
    ]
    return "\n".join(lines)


def replace_config(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of `cfg` with `changes` (model_args merged key by key)."""
    if "model_args" in changes:
        changes["model_args"] = {**cfg.model_args, **changes["model_args"]}
    return replace(cfg, **changes)
