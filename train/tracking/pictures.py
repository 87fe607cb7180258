"""Reconstruction pictures (model/reconstruction.py draws them): at every checkpoint of a pre-training run, and
`./launch.sh visualize`.

    ./launch.sh visualize --ckpt runs/supmae400 --data /data/shards/in1k-val --out rec.png [--num 8]
                          [--mask-ratio 0.75] [--seed 0]

The images are the first `num` of the shard folder in its order, with the evaluation transform (resize + centre
crop, as k-NN and the probes see them); `seed` fixes the masking (a private generator: the training run's random
streams are untouched, so a run with pictures computes exactly what it computes without them).

During pre-training, `CheckpointPictures` (a `Trainer.checkpoint_hooks` entry, rank 0) reads the images once, from
--eval-data when given else --data, and logs the grid of the current weights to TensorBoard / W&B as
"pictures/reconstructions" at every checkpoint (`--recon-images 0` turns it off).
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from model.mae import MaskedAutoencoderViT
from model.reconstruction import PANEL_TITLES, Reconstruction, reconstruct, reconstruction_grid
from pipeline.fileio import atomic_write_bytes, folder_problem
from train.distributed import DistEnv, rng_state, set_rng_state
from train.entry import build_eval_loader
from train.eval.encoder import resolve_source

if TYPE_CHECKING:
    from train.trainer import Trainer

TAG = "pictures/reconstructions"
MIN_PANEL = 112  # pixels: smaller images are enlarged (nearest neighbour) so a grid stays legible


def sample_images(data: str, num: int, img_size: int, backend: str = "dali", threads: int = 1) -> Tensor:
    """The first `num` images of the shard folder `data` (fewer if it holds fewer) as uint8 (n, S, S, C) on the CPU,
    with the evaluation transform (resize + centre crop to `img_size`)."""
    loader = build_eval_loader(data, num, img_size, backend, threads, 0, DistEnv())
    try:
        batch = next(iter(loader))
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return batch.images[: batch.num_valid].cpu()


def masking_noise(num: int, num_patches: int, seed: int) -> Tensor:
    """(num, num_patches) masking noise from a private generator (no global random state is drawn from)."""
    return torch.rand(num, num_patches, generator=torch.Generator().manual_seed(seed))


def grid_png(grid: np.ndarray, titles: tuple[str, ...] = PANEL_TITLES, caption: str = "", pad: int = 2) -> bytes:
    """The grid as PNG bytes, a title above each column and `caption` below (when given)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w, c = grid.shape
    band = 18
    canvas = Image.new("RGB", (w, h + band + (band if caption else 0)), "white")
    tile = Image.fromarray(grid if c == 3 else np.repeat(grid[..., :1], 3, axis=2))
    canvas.paste(tile, (0, band))
    draw = ImageDraw.Draw(canvas)
    col = (w - pad) // len(titles)
    for size in range(12, 6, -1):  # the largest font whose titles fit their columns
        font = ImageFont.load_default(size=size)
        if all(draw.textlength(t, font=font) <= col - pad - 2 for t in titles):
            break
    for i, title in enumerate(titles):
        x0 = pad + i * col
        width = draw.textlength(title, font=font)
        draw.text((x0 + max(0, (col - pad - width) / 2), 3), title, fill="black", font=font)
    if caption:
        draw.text((pad + 2, h + band + 3), caption, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def caption_of(rec: Reconstruction, what: str) -> str:
    return f"{what}: mask ratio {rec.mask_ratio:g}, {rec.original.shape[0]} images"


# ----------------------------------------------------------------------------------------------------------------
# During pre-training


class CheckpointPictures:
    """Trainer checkpoint hook: the reconstruction grid of fixed images with the current weights -> the run's
    trackers. The images are read at the first checkpoint (not at start-up) and kept; the random state of this
    process is saved and restored around the work, and the model runs in eval mode without gradients, so training
    continues exactly as without pictures."""

    def __init__(self, data: str, num: int, img_size: int, mask_ratio: float, seed: int, backend: str = "dali"):
        self.data, self.num, self.img_size = data, num, img_size
        self.mask_ratio, self.seed, self.backend = mask_ratio, seed, backend
        self.images: Tensor | None = None
        self.noise: Tensor | None = None

    def __call__(self, trainer: Trainer, path: Path) -> None:
        log = trainer.log
        if log is None or not log.tracking:
            return
        saved = rng_state(trainer.device)
        try:
            if self.images is None:
                self.images = sample_images(self.data, self.num, self.img_size, self.backend)
                self.noise = masking_noise(len(self.images), trainer.model.cfg.num_patches, self.seed)
            model: MaskedAutoencoderViT = trainer.model
            rec = reconstruct(model, self.images.to(trainer.device), self.mask_ratio,
                              self.noise.to(trainer.device))
        finally:
            set_rng_state(saved, trainer.device)
        grid = reconstruction_grid(rec, min_panel=MIN_PANEL if rec.original.shape[1] < MIN_PANEL else 0)
        log.image(TAG, grid, trainer.step, caption_of(rec, f"step {trainer.step}"))


# ----------------------------------------------------------------------------------------------------------------
# ./launch.sh visualize


@dataclass(frozen=True)
class VisualizeConfig:
    """`./launch.sh visualize` options."""

    ckpt: str  # a run folder (newest checkpoint), a checkpoint file, or an MAE/SupMAE .pth with its decoder
    data: str  # shard folder the images come from
    out: str  # the PNG to write
    num: int = 8
    mask_ratio: float = 0.75
    seed: int = 0
    data_backend: str = "dali"
    device: str = "auto"
    norm_pix_loss: bool | None = None  # None: the checkpoint's (a .pth cannot tell: MAE's default, on)
    num_heads: int = 0  # attention heads of a .pth (0 = embed_dim / 64)

    def __post_init__(self) -> None:
        checks = [("num", self.num >= 1, "an integer >= 1"), ("mask_ratio", 0 <= self.mask_ratio < 1,
                  "a number in [0, 1)"), ("seed", self.seed >= 0, "an integer >= 0"),
                  ("data_backend", self.data_backend in ("dali", "torch"), "dali or torch"),
                  ("device", self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
                  ("num_heads", self.num_heads >= 0, "an integer >= 0")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid: must be {allowed}")
        if not self.out.lower().endswith(".png"):
            raise ValueError(f"--out {self.out}: the picture is a PNG file; name it FILE.png")
        problem = f"{self.out} is a folder" if Path(self.out).is_dir() else folder_problem(Path(self.out).parent)
        if problem:
            raise ValueError(f"--out {self.out}: {problem}; choose another place for the picture")
        if not Path(self.ckpt).exists():
            raise FileNotFoundError(f"--ckpt {self.ckpt}: no such file or folder")


def load_autoencoder(ckpt: str | os.PathLike, model_args: dict[str, Any] | None = None,
                     warn=None) -> tuple[MaskedAutoencoderViT, Any]:
    """The whole masked autoencoder (decoder included) of a run folder / checkpoint / .pth, and its source."""
    source = resolve_source(ckpt, model_args=model_args, warn=warn)
    if "decoder_pred.weight" not in source.state:
        raise ValueError(f"{source.name} holds an encoder only (no decoder): reconstructions need a pre-training "
                         "checkpoint of this project or an MAE/SupMAE release with its decoder "
                         "(e.g. mae_visualize_vit_large.pth)")
    model = MaskedAutoencoderViT(dataclasses.replace(source.model_cfg, fused_masking="off"))
    missing, unexpected = model.load_state_dict(source.state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source.name}: the weights do not fit {source.model_cfg}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model, source


def visualize(cfg: VisualizeConfig, warn=None) -> tuple[Path, Reconstruction, Any]:
    """Draw the reconstruction grid `cfg` asks for into cfg.out; returns (path, reconstruction, source)."""
    args: dict[str, Any] = {}
    if cfg.num_heads:
        args["num_heads"] = cfg.num_heads
    if cfg.norm_pix_loss is not None:
        args["norm_pix_loss"] = cfg.norm_pix_loss
    model, source = load_autoencoder(cfg.ckpt, args, warn)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    images = sample_images(cfg.data, cfg.num, model.cfg.img_size, cfg.data_backend)
    noise = masking_noise(len(images), model.cfg.num_patches, cfg.seed)
    model.to(device)
    rec = reconstruct(model, images.to(device), cfg.mask_ratio, noise.to(device))
    grid = reconstruction_grid(rec, min_panel=MIN_PANEL)
    what = f"{Path(source.name).name}" + (f" step {source.step}" if source.step is not None else "")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, grid_png(grid, caption=caption_of(rec, what)))
    return out, rec, source
