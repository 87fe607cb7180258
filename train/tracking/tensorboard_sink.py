"""TensorBoard events of a run (OUT/tb): scalars, pictures, and the resolved configuration.

Scalars are `<kind>/<field>` (train/loss, eval/top1, ...) against the optimiser step. The configuration goes in as
text (the JSON of config.json, under "config") and as hyper-parameters (the HPARAMS tab: every scalar setting of
run_config's "train", "model" and "derived" sections, flattened to "train.blr", "model.embed_dim", ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# Metrics the HPARAMS tab offers next to the settings (the scalars of these tags).
HPARAM_METRICS = ("train/loss", "train/rec_loss", "eval/top1")
_CONFIG_SECTIONS = ("train", "model", "derived")


def flat_hparams(run_config: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """{"section.field": value} of the scalar settings of `run_config` (lists and tuples as text, None as "none")."""
    out: dict[str, int | float | str | bool] = {}
    for section in _CONFIG_SECTIONS:
        for k, v in (run_config.get(section) or {}).items():
            if isinstance(v, dict):
                continue  # model_args: its values are in the "model" section
            if v is None:
                v = "none"
            elif isinstance(v, (list, tuple)):
                v = ",".join(str(x) for x in v)
            out[f"{section}.{k}"] = v
    return out


class TensorBoardSink:
    """One SummaryWriter on OUT/tb; `resume_step` hides events a previous attempt wrote after that step."""

    what = "TensorBoard events"  # how errors name what was being written

    def __init__(self, folder: str | os.PathLike, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(folder)
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step is not None else None)

    def record(self, rec: dict[str, Any]) -> None:
        prefix = rec["kind"]
        for k, v in rec.items():
            if k not in ("kind", "time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def image(self, tag: str, picture: np.ndarray, step: int, caption: str = "") -> None:
        """picture: (H, W, C) uint8."""
        self.writer.add_image(tag, picture, step, dataformats="HWC")
        if caption:
            self.writer.add_text(f"{tag}/caption", caption, step)

    def config(self, run_config: dict[str, Any], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Markdown: an indented block keeps the JSON's layout.
        text = "\n".join("    " + line for line in json.dumps(run_config, indent=2).splitlines())
        self.writer.add_text("config", text, step)
        writer = self.writer._get_file_writer()
        for summary in hparams(flat_hparams(run_config), dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
