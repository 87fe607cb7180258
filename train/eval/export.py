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

Files are written atomically (temporary name, fsync, rename). An existing folder is written into only when it is
empty or an earlier export (its model card or config.json says so); the card is written first and config.json last,
so an interrupted export is recognised as ours and never loads as a complete one. An existing mae file is never
replaced (it may be a release or other weights).
"""

from __future__ import annotations

import json
import os
import re
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
from pipeline.fileio import TMP_SUFFIX, atomic_path, atomic_write_bytes, atomic_write_json, folder_problem
from train.entry import check_writable
from train.eval.encoder import RANDOM, PretrainedSource, resolve_source

FORMATS = ("timm", "mae")
POOLS = ("token", "avg")
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CARD_MARK = "Exported by supmae-fast"  # in every model card this module writes
EXTRA_KEY = "supmae_fast"  # config.json's provenance section (timm ignores it)
_OURS = (WEIGHTS_NAME, TIMM_CONFIG_NAME, CARD_NAME)


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
        check_export_target(Path(self.out), self.format)  # before a large checkpoint is read
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
    check_export_target(out, fmt)
    state = encoder_state(source)
    if fmt == "mae":
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            torch.save({"model": state}, tmp)
        return [out]
    from safetensors.torch import save_file

    config = timm_hub_config(source.model_cfg, pool, provenance(source))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # what an export killed mid-write left
        if _is_our_temporary(stale.name):
            stale.unlink()
    # The card first (it marks the folder as an export), the stale config.json out of the way, config.json last:
    # at every point of an interruption the folder is recognised as ours and is not a loadable timm folder.
    atomic_write_bytes(out / CARD_NAME, model_card(config).encode())
    (out / TIMM_CONFIG_NAME).unlink(missing_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / TIMM_CONFIG_NAME, config)
    return [out / WEIGHTS_NAME, out / TIMM_CONFIG_NAME, out / CARD_NAME]


def check_export_target(out: Path, fmt: str) -> None:
    """ValueError unless `out` may be written: a writable place; for "mae" a file that does not exist yet; for
    "timm" a new or empty folder, or an earlier export (never a run folder, a downloaded model or other files that
    are not ours)."""
    if fmt == "mae":
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder: the mae format is one file (e.g. {out / 'encoder.pth'})")
        if out.exists() or out.is_symlink():
            raise ValueError(f"--out {out} already exists: an export never replaces a file (it may be a release or "
                             "other weights); delete it or choose another name")
        problem = folder_problem(out.parent)
        if problem:
            raise ValueError(f"--out {out}: {problem}; choose another place")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: the timm format is a folder")
    check_writable(out, "--out")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    others = [n for n in names if n not in _OURS and not _is_our_temporary(n)]
    if not names or (not others and _is_earlier_export(out)):
        return
    shown = ", ".join((others or names)[:3]) + (" ..." if len(others or names) > 3 else "")
    raise ValueError(f"--out {out} already holds files that are not an earlier export ({shown}); choose a new or "
                     "empty folder")


def _is_our_temporary(name: str) -> bool:
    """A temporary file an export killed mid-write left (pipeline.fileio.tmp_path_for of one of our files)."""
    return any(re.fullmatch(re.escape(f".{n}.") + r"\d+" + re.escape(TMP_SUFFIX), name) for n in _OURS)


def _is_earlier_export(folder: Path) -> bool:
    """Whether `folder`'s config.json or model card is one this module wrote."""
    try:
        if (folder / TIMM_CONFIG_NAME).is_file():
            return EXTRA_KEY in json.loads((folder / TIMM_CONFIG_NAME).read_text())
        return (folder / CARD_NAME).is_file() and CARD_MARK in (folder / CARD_NAME).read_text()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def model_card(config: dict[str, Any]) -> str:
    """A minimal Hugging Face model card for the exported folder."""
    info = config.get(EXTRA_KEY, {})
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
        + f". {CARD_MARK} (`./launch.sh export`).",
        "",
    ]
    return "\n".join(lines)
