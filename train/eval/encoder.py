"""The encoder the evaluation protocols start from: any checkpoint kind in, timm's VisionTransformer out.

    source = resolve_source("runs/supmae")             # run folder -> newest readable checkpoint
    source = resolve_source("runs/supmae/checkpoints/step-000012000.pt")
    source = resolve_source("mae_pretrain_vit_base.pth")  # an original MAE / SupMAE release (or a bare state_dict)
    source = resolve_source("mae_finetuned_vit_base.pth")  # a fine-tuned release (fc_norm + head, no norm)
    source = resolve_source("exports/supmae400")           # a timm hub-style folder, or a .safetensors file
    source = resolve_source("random", "supmae_vit_tiny_patch16", {"img_size": 32, "patch_size": 4})
    vit = build_vit(source, num_classes=1000, global_pool="avg", drop_path=0.1)   # ViTEncoder, weights loaded

A `PretrainedSource` carries the masked autoencoder's weights and ModelConfig plus where they came from: the
checkpoint file, its step, and the pre-training compute behind it (cumulative images, training FLOPs and
device-hours from the run's metrics.jsonl at that step, else from the checkpoint's stored totals), so that every
evaluation result attaches to the compute that produced it. "random" is MAE's initialisation of the same model
(sin-cos position embeddings, xavier weights) from the seed: the zero-compute baseline.

`ViTEncoder` is timm's VisionTransformer with two additions: it takes the loaders' uint8 NHWC batches (normalised
inside with the ImageNet mean/std of pre-training, handed to the patch embedding as a channels-last NCHW view, no
copy), and its `group_matcher` is MAE's layer-wise-decay grouping (patch embedding, cls token and position
embedding at layer 0, block i at layer i + 1, final norm / fc_norm / head at the top) for timm's
`param_groups_layer_decay`. Its state_dict is plain timm's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from model.checkpoint import (
    export_timm_encoder,
    final_norm_layout,
    infer_config,
    is_timm_folder,
    load_checkpoint,
    read_timm_folder,
    timm_vit_kwargs,
)
from model.config import ModelConfig, model_config
from model.flops import forward_flops
from model.mae import IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoderViT
from train.checkpoint import CHECKPOINT_DIR, latest_checkpoint, read_checkpoint
from train.config import option_field as _f
from train.metrics import METRICS_NAME, read_jsonl

RANDOM = "random"
GLOBAL_POOLS = ("avg", "token")
FC_NORM_INITS = ("fresh", "pretrained")  # fine-tuning's fc_norm: new (official) or the pre-trained final norm
_ENCODER_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.fc1.weight")


@dataclass
class EncoderOptions:
    """Command-line fields naming the encoder (a mixin of the evaluation protocols' configurations)."""

    ckpt: str = _f("", "weights: a run folder (newest checkpoint), a checkpoint file of this project, an original "
                       "MAE/SupMAE .pth (pre-trained or fine-tuned), a timm folder or .safetensors file, or "
                       "'random' (with --model); required")
    model: str = _f("", "model preset for --ckpt random (model.list_models()); checkpoints carry their model")
    model_args: dict[str, Any] = _f({}, "ModelConfig overrides (e.g. --patch-size 4 for --ckpt random, "
                                        "--num-heads 16 for a ViT-H .pth); set each with --field-name")
    img_size: int = _f(0, "input resolution (0 = the encoder's pre-training resolution; another value resamples "
                          "the position embedding)")
    all_checkpoints: bool = _f(False, "evaluate every checkpoint of the run folder --ckpt that has no result of "
                                      "this protocol yet, oldest first (results beside each checkpoint)")

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the protocol's configuration validates its fields first
        if not self.ckpt:
            raise ValueError("--ckpt is required (a run folder, a checkpoint file, an MAE/SupMAE .pth, or random)")
        if self.ckpt == RANDOM and not self.model:
            raise ValueError("--ckpt random needs --model (a preset, e.g. supmae_vit_tiny_patch16)")
        if self.ckpt != RANDOM and self.model:
            raise ValueError(f"--model {self.model} only applies to --ckpt random: a checkpoint defines its model "
                             "(model options such as --num-heads still override what is inferred from a .pth)")
        if self.img_size < 0:
            raise ValueError(f"--img-size {self.img_size} is invalid: must be an integer >= 0 (0 = the encoder's)")
        if self.all_checkpoints and (self.ckpt == RANDOM or self.out):  # type: ignore[attr-defined]
            raise ValueError("--all-checkpoints takes --ckpt RUN (a run folder) and no --out: each result goes "
                             "beside its checkpoint (fine-tune / probe runs into their default folders)")
        if self.ckpt == RANDOM:
            self.random_model_config()  # validates the preset and the model options

    def random_model_config(self) -> ModelConfig:
        return model_config(self.model, **self._random_args())

    def _random_args(self) -> dict[str, Any]:
        return {**self.model_args, **({"img_size": self.img_size} if self.img_size else {})}

    def check_ckpt_exists(self) -> None:
        if self.ckpt != RANDOM and not Path(self.ckpt).exists():
            raise FileNotFoundError(f"--ckpt {self.ckpt}: no such file or folder")
        if self.all_checkpoints and not Path(self.ckpt).is_dir():
            raise ValueError(f"--all-checkpoints: --ckpt {self.ckpt} is not a folder (give the run folder)")

    def source(self, seed: int, warn=None) -> PretrainedSource:
        """The weights these options name (random ones drawn from `seed`)."""
        if self.ckpt == RANDOM:
            return resolve_source(RANDOM, self.model, self._random_args(), seed)
        return resolve_source(self.ckpt, model_args=self.model_args, warn=warn)


# ----------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class PretrainedSource:
    """A masked autoencoder's weights and where they came from.

    kind: "checkpoint" (this project's, also when found through a run folder), "pth" (original release, bare
    state_dict or .safetensors file), "timm" (a timm hub-style folder), "model" (an in-memory model), "random".
    compute: {"images", "flops", "device_hours", "source":
    "metrics.jsonl" | "checkpoint" | "none"} of the pre-training behind the weights (zeros for random; None when
    unknown, e.g. an original release).
    """

    kind: str
    state: dict[str, Tensor]
    model_cfg: ModelConfig
    path: Path | None = None
    step: int | None = None
    epoch: int | None = None
    compute: dict[str, Any] | None = None
    run_dir: Path | None = None

    @property
    def name(self) -> str:
        """Short identity for messages and eval files: the checkpoint's path, or 'random:<preset>'."""
        return str(self.path) if self.path is not None else f"{self.kind}"

    def describe(self) -> dict[str, Any]:
        """The JSON-able provenance written into eval files and config.json."""
        return {
            "kind": self.kind,
            "checkpoint": str(self.path) if self.path is not None else None,
            "run": str(self.run_dir) if self.run_dir is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "model": self.model_cfg.to_dict(),
            "pretrain_compute": self.compute,
        }

    @classmethod
    def from_model(cls, model: MaskedAutoencoderViT, step: int | None = None,
                   compute: dict[str, Any] | None = None) -> PretrainedSource:
        """An in-memory model (e.g. the compute-to-accuracy tool's current weights)."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return cls("model", state, model.cfg, step=step, compute=compute)


def resolve_source(ckpt: str | os.PathLike, model: str = "", model_args: dict[str, Any] | None = None,
                   seed: int = 0, warn=None) -> PretrainedSource:
    """The weights `ckpt` names (see the module docstring). model / model_args: the preset and ModelConfig options of
    "random"; model_args also override what is inferred from a .pth (e.g. num_heads, which shapes cannot tell)."""
    model_args = dict(model_args or {})
    if str(ckpt) == RANDOM:
        if not model:
            raise ValueError("--ckpt random needs --model (a preset, e.g. supmae_vit_tiny_patch16)")
        cfg = model_config(model, **model_args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = MaskedAutoencoderViT(cfg).state_dict()
        return PretrainedSource(RANDOM, state, cfg, step=0, epoch=0,
                                compute={"images": 0, "flops": 0, "device_hours": 0.0, "source": "none"})
    path = Path(ckpt)
    if path.is_dir() and is_timm_folder(path):
        weights, timm_args = read_timm_folder(path)
        return _pth_source(path, weights, {**timm_args, **model_args}, kind="timm")
    if path.is_dir():
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found = latest_checkpoint(folder, warn=warn)
        if found is None:
            raise ValueError(f"--ckpt {path}: no readable checkpoint (step-*.pt) in {folder}")
        return _project_source(found[0], found[1], model_args)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such file or folder")
    if path.suffix == ".safetensors":
        return _pth_source(path, load_checkpoint(path), model_args)
    try:
        state = read_checkpoint(path)
    except ValueError as project_error:
        try:
            weights = load_checkpoint(path)
        except ValueError as e:
            raise ValueError(f"--ckpt {path}: neither a checkpoint of this project ({project_error}) nor an MAE/SupMAE "
                             f"weight file ({e})") from e
        return _pth_source(path, weights, model_args)
    return _project_source(path, state, model_args)


def _project_source(path: Path, state: dict[str, Any], model_args: dict[str, Any]) -> PretrainedSource:
    config = state["config"]
    protocol = config.get("protocol", "pretrain")
    if protocol != "pretrain" or "model" not in config:
        raise ValueError(f"--ckpt {path} is a {protocol} checkpoint (a classifier trained on a frozen or tuned "
                         "encoder), not a pre-training one: give a pre-training run or checkpoint, or an MAE/SupMAE "
                         ".pth")
    cfg = dataclasses.replace(ModelConfig.from_dict(config["model"]), **model_args)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
    step = int(state["step"])
    return PretrainedSource("checkpoint", state["model"], cfg, path, step, int(state["epoch"]),
                            pretraining_compute(run_dir, step, state.get("compute")), run_dir)


def _pth_source(path: Path, weights: dict[str, Tensor], model_args: dict[str, Any],
                kind: str = "pth") -> PretrainedSource:
    missing = [k for k in _ENCODER_KEYS if k not in weights]
    if missing:
        raise ValueError(f"--ckpt {path}: no ViT encoder weights ({missing} missing); is it an MAE/SupMAE file?")
    if "decoder_embed.weight" in weights:
        cfg = infer_config(weights, **model_args)
    else:
        # Encoder-only weights (MAE's pre-trained and fine-tuned releases, timm files): the decoder keeps its
        # preset defaults, unused here.
        w = weights["patch_embed.proj.weight"]
        d, grid = w.shape[0], round((weights["pos_embed"].shape[1] - 1) ** 0.5)
        kw = dict(img_size=grid * w.shape[2], patch_size=w.shape[2], in_chans=w.shape[1], embed_dim=d,
                  depth=1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks.")),
                  num_heads=max(1, d // 64), mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / d,
                  cls_branch=False)
        cfg = ModelConfig(**{**kw, **model_args})
    return PretrainedSource(kind, weights, cfg, path, None, None, None)


def pretraining_compute(run_dir: Path | None, step: int, stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"images", "flops", "device_hours", "source"} behind the weights of `step`: the run's metrics.jsonl "train"
    record of that step when there is one (the numbers the run's curves use), else the checkpoint's stored totals."""
    if run_dir is not None and (run_dir / METRICS_NAME).is_file():
        found = None
        for _, rec in read_jsonl(run_dir / METRICS_NAME)[0]:  # lines cut by kill -9 or damaged are passed over
            if rec.get("kind") == "train" and rec.get("step") == step:
                found = rec
        if found is not None:
            return {"images": found["images"], "flops": found["flops"], "device_hours": found["device_hours"],
                    "source": METRICS_NAME}
    if stored:
        return {"images": int(stored["images"]), "flops": int(stored["flops"]),
                "device_hours": float(stored["device_seconds"]) / 3600, "source": "checkpoint"}
    return None


# ----------------------------------------------------------------------------------------------------------------
# The timm encoder


class ViTEncoder(VisionTransformer):
    """timm's VisionTransformer that takes uint8 NHWC batches (see the module docstring).

    images: uint8 (N, S, S, C) as the loaders emit them, or float (N, C, S, S) already normalised (e.g. after mixup).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        c = self.patch_embed.proj.in_channels
        mean = torch.tensor(IMAGENET_MEAN if c == 3 else [0.5] * c)
        std = torch.tensor(IMAGENET_STD if c == 3 else [0.5] * c)
        # x * scale + shift == (x / 255 - mean) / std; not saved (timm's state_dict stays plain)
        self.register_buffer("pixel_scale", (1.0 / (255.0 * std)).view(1, c, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", (-mean / std).view(1, c, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (N, S, S, C) -> normalised float (N, C, S, S) in channels-last memory (a view plus one elementwise
        pass); float input is returned as it is."""
        if images.dtype != torch.uint8:
            return images
        s, c = self.patch_embed.img_size, self.patch_embed.proj.in_channels
        if images.dim() != 4 or tuple(images.shape[1:]) != (s[0], s[1], c):
            raise ValueError(f"uint8 images must be NHWC (N, {s[0]}, {s[1]}, {c}) as the loaders emit them, got "
                             f"{tuple(images.shape)}; check --img-size")
        return images.permute(0, 3, 1, 2).float() * self.pixel_scale + self.pixel_shift

    def forward(self, images: Tensor) -> Tensor:
        """(N, num_classes) logits."""
        return super().forward(self.normalize(images))

    def features(self, images: Tensor) -> Tensor:
        """(N, D) pooled pre-logits feature: the cls token or the mean of the patch tokens (then fc_norm, if any)."""
        return self.forward_head(self.forward_features(self.normalize(images)), pre_logits=True)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        # MAE's layer ids (util/lr_decay.py): everything not matched (norm, fc_norm, head) sits on the top layer.
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": [(r"^blocks\.(\d+)", None)]}


def build_vit(source: PretrainedSource, num_classes: int = 0, global_pool: str = "avg", fc_norm: bool | None = None,
              drop_path: float = 0.0, img_size: int = 0, fc_norm_init: str = "fresh") -> ViTEncoder:
    """The encoder of `source` as a ViTEncoder with its weights loaded (strictly, apart from the new head).

    global_pool: "avg" (mean of the patch tokens) or "token" (cls token). fc_norm (avg only): True = a LayerNorm
    after pooling (MAE fine-tuning), False = the pre-trained per-token norm, then pooling (the feature the pre-trained
    network computes: frozen-feature protocols); None = timm's default (True). fc_norm_init (with an fc_norm):
    "fresh" = weight 1, bias 0, the pre-trained final norm dropped (the official fine-tuning: models_vit.py builds
    a new `fc_norm` and deletes `norm`); "pretrained" = the pre-trained final norm's weights copied into it.
    Fine-tuned weights (their final norm is fc_norm, after pooling) always keep it: that is the network they are.
    img_size: 0 keeps the pre-training resolution; another size resamples the position embedding (bicubic).
    The new head is left for the caller to initialise.
    """
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    cfg = source.model_cfg
    fine_tuned = final_norm_layout(source.state) == "fc_norm"
    if global_pool == "avg" and fine_tuned:
        fc_norm = True
    kwargs = timm_vit_kwargs(cfg, num_classes=num_classes, global_pool=global_pool)
    kwargs.update(drop_path_rate=drop_path, fc_norm=fc_norm if global_pool == "avg" else None, weight_init="skip")
    if img_size and img_size != cfg.img_size:
        if img_size % cfg.patch_size:
            raise ValueError(f"--img-size {img_size} is not a multiple of the encoder's patch size {cfg.patch_size}")
        kwargs["img_size"] = img_size
    vit = ViTEncoder(**kwargs)
    uses_fc_norm = not isinstance(vit.fc_norm, nn.Identity)
    if fc_norm_init not in FC_NORM_INITS:
        raise ValueError(f"fc_norm_init must be one of {FC_NORM_INITS}, got {fc_norm_init!r}")
    # With an fc_norm timm's model has no per-token norm: the pre-trained `norm.*` is dropped or becomes fc_norm
    # (fine-tuned weights bring their own trained fc_norm).
    fresh = uses_fc_norm and fc_norm_init == "fresh" and not fine_tuned
    weights = export_timm_encoder(source.state, "avg" if uses_fc_norm else "token")
    if fresh:
        weights = {k: v for k, v in weights.items() if not k.startswith("fc_norm.")}
        nn.init.ones_(vit.fc_norm.weight)
        nn.init.zeros_(vit.fc_norm.bias)
    if kwargs["img_size"] != cfg.img_size:
        grid = kwargs["img_size"] // cfg.patch_size
        weights["pos_embed"] = resample_abs_pos_embed(weights["pos_embed"], [grid, grid], num_prefix_tokens=1)
    try:
        missing, unexpected = vit.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{source.name}: the encoder weights do not fit the model {cfg}: {e}") from e
    missing = [k for k in missing if not k.startswith("head.") and not (fresh and k.startswith("fc_norm."))]
    if missing or unexpected:
        raise ValueError(f"{source.name}: encoder weights missing {missing[:5]} / unexpected {unexpected[:5]}")
    return vit


def encoder_forward_flops(cfg: ModelConfig, img_size: int = 0, num_classes: int = 0) -> int:
    """Analytic forward FLOPs per image of the encoder on all patches (+ a linear head of `num_classes`)."""
    if img_size and img_size != cfg.img_size:
        cfg = dataclasses.replace(cfg, img_size=img_size)
    f = forward_flops(cfg, 0.0)
    return f.patch_embed + f.encoder + 2 * cfg.embed_dim * num_classes
