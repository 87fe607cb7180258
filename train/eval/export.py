"""Weights out: a pre-trained encoder as a timm hub-style folder or in the official MAE release layout.

    export_encoder(resolve_source("runs/supmae400"), "timm", "exports/supmae400")     # config.json + model.safetensors
    export_encoder(resolve_source("runs/supmae400"), "mae", "supmae400_encoder.pth")  # {"model": encoder state}

"timm": `OUT/model.safetensors` (timm's VisionTransformer state_dict, no head), `OUT/config.json` (architecture,
the model arguments that differ from it, pretrained_cfg: mean/std, input size, bicubic, crop_pct, num_classes 0;
model.checkpoint.timm_hub_config) and a short model card `OUT/README.md`, so that
`timm.create_model("local-dir:OUT", pretrained=True)` builds the encoder and the folder can be pushed to the
Hugging Face hub as it is. "mae": `{"model": encoder state_dict}` with the keys of `mae_pretrain_vit_base.pth`
(patch embedding, cls token, position embedding, blocks, final norm; no decoder, mask token or SupMAE head), which
MAE's and SupMAE's fine-tuning code load.

Files are written atomically; an existing folder is written into only when it is empty or an earlier export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import (
    TIMM_CONFIG_NAME,
    export_timm_encoder,
    final_norm_layout,
    timm_hub_config,
)
from pipeline.fileio import atomic_path, atomic_write_bytes, atomic_write_json
from train.eval.encoder import RANDOM, PretrainedSource, resolve_source

FORMATS = ("timm", "mae")
POOLS = ("token", "avg")
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class ExportConfig:
    """`./launch.sh export` options."""

    ckpt: str  # a run folder (newest checkpoint), a checkpoint file, an MAE/SupMAE .pth, a timm folder / file
    format: str  # "timm" | "mae"
    out: str
    pool: str = "token"  # timm's pooled feature: "token" (timm's default) | "avg"
    num_heads: int = 0  # attention heads of a .pth encoder (0 = embed_dim / 64, the ViT convention)

    def __post_init__(self) -> None:
        if not self.ckpt or self.ckpt == RANDOM:
            raise ValueError("--ckpt must name a run folder, a checkpoint file or a weight file")
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format} is invalid: must be one of {', '.join(FORMATS)}")
        if self.pool not in POOLS:
            raise ValueError(f"--pool {self.pool} is invalid: must be one of {', '.join(POOLS)}")
        if self.format == "mae" and self.pool != "token":
            raise ValueError("--pool only applies to --format timm (the mae format holds weights, no pooling choice)")
        if not self.out:
            raise ValueError("--out is required")
        if self.num_heads < 0:
            raise ValueError(f"--num-heads {self.num_heads} is invalid: must be an integer >= 1 (or 0 = inferred)")

    def run(self, warn=None) -> tuple[PretrainedSource, list[Path]]:
        source = resolve_source(self.ckpt, model_args={"num_heads": self.num_heads} if self.num_heads else {},
                                warn=warn)
        return source, export_encoder(source, self.format, self.out, self.pool)


def encoder_state(source: PretrainedSource) -> dict[str, torch.Tensor]:
    """The encoder of `source` with timm's / MAE's keys and the per-token final norm (`norm.*`), contiguous fp32
    copies (safetensors refuses shared or strided storage)."""
    if final_norm_layout(source.state) == "fc_norm":
        raise ValueError(f"{source.name} holds fine-tuned weights (final norm after pooling, fc_norm; no per-token "
                         "norm): export takes a pre-trained encoder (a pre-training run, checkpoint or release)")
    state = export_timm_encoder(source.state, "token")
    return {k: v.float().contiguous() for k, v in state.items()}


def provenance(source: PretrainedSource) -> dict[str, Any]:
    """What the weights are (model, step, pre-training compute), stored with the export; no file paths."""
    compute = source.compute or {}
    return {"model": source.model_cfg.to_dict(), "source": source.kind, "step": source.step, "epoch": source.epoch,
            "pretrain_images": compute.get("images"), "pretrain_flops": compute.get("flops")}


def export_encoder(source: PretrainedSource, fmt: str, out: str | os.PathLike, pool: str = "token") -> list[Path]:
    """Write the encoder of `source` as `fmt` ("timm": a folder, "mae": a file) at `out`; returns the files."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt} is invalid: must be one of {', '.join(FORMATS)}")
    if pool not in POOLS:
        raise ValueError(f"--pool {pool} is invalid: must be one of {', '.join(POOLS)}")
    out = Path(out)
    state = encoder_state(source)
    if fmt == "mae":
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder: the mae format is one file (e.g. {out / 'encoder.pth'})")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            torch.save({"model": state}, tmp)
        return [out]
    from safetensors.torch import save_file

    _check_export_folder(out)
    config = timm_hub_config(source.model_cfg, pool, provenance(source))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / TIMM_CONFIG_NAME, config)
    atomic_write_bytes(out / CARD_NAME, model_card(config).encode())
    return [out / WEIGHTS_NAME, out / TIMM_CONFIG_NAME, out / CARD_NAME]


def _check_export_folder(out: Path) -> None:
    """A timm export goes into a new or empty folder, or over an earlier export: never over a run folder's
    config.json or other files that are not ours."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: the timm format is a folder")
    if not out.is_dir():
        return
    ours = {WEIGHTS_NAME, TIMM_CONFIG_NAME, CARD_NAME}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    config = out / TIMM_CONFIG_NAME
    earlier_export = False
    if config.is_file():
        try:
            earlier_export = "architecture" in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    if others or (config.is_file() and not earlier_export):
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "") if others else TIMM_CONFIG_NAME
        raise ValueError(f"--out {out} already holds files that are not an earlier export ({shown}); choose a new "
                         "or empty folder")


def model_card(config: dict[str, Any]) -> str:
    """A minimal Hugging Face model card for the exported folder."""
    info = config.get("supmae_fast", {})
    model = info.get("model", {})
    family = "SupMAE" if model.get("cls_branch") else "MAE"
    pool = config["global_pool"]
    feature = ("the cls token after the final norm" if pool == "token" else
               "the mean of the patch tokens after the final norm (fc_norm=False)")
    flops = info.get("pretrain_flops")
    lines = [
        "---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", f"- {family.lower()}", "---",
        "", f"# {family} ViT encoder: {model.get('embed_dim')}-d x {model.get('depth')} blocks, patch "
            f"{model.get('patch_size')}, {model.get('img_size')} px (supmae-fast)", "",
        f"Encoder only (no classifier, `num_classes` 0), built as timm's `{config['architecture']}` with the "
        f"`model_args` of config.json. Pooled feature: {feature}.", "",
        "```python", "import timm",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO"',
        "features = model(images)  # (N, embed_dim), images normalised as in pretrained_cfg", "```", "",
        f"Pre-training step {info.get('step')}"
        + (f", {info.get('pretrain_images'):,} images seen, {flops / 1e15:.3f} training PFLOPs" if flops else "")
        + ". Exported by supmae-fast (`./launch.sh export`).",
        "",
    ]
    return "\n".join(lines)
