"""Weights & Biases for a run (`--wandb [PROJECT]`): what TensorBoard gets, in a W&B run.

    scalars   train/<field>, eval/<field> against "step", with "images" (seen so far) and "pflops" (training PFLOPs
              so far) logged beside every record and declared as metrics (wandb.define_metric): pick either as the
              x-axis of a panel to compare runs by data or by compute
    config    run_config (config.json's content) as the run's config
    pictures  reconstruction grids as wandb.Image

The run lives under OUT/wandb (files, and offline runs: WANDB_MODE=offline writes there and needs no network;
`wandb sync OUT/wandb/offline-run-*` uploads later). Its id is kept in OUT/wandb/run-id so a resumed run
continues the same W&B run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PROJECT = "supmae-fast"
ID_FILE = "run-id"
X_AXES = ("step", "images", "pflops")
MISSING = ("--wandb needs the wandb package, which is not installed in this environment: install it with "
           "`.venv/bin/python -m pip install wandb` (./launch.sh setup installs it with the test dependencies), "
           "or leave out --wandb")


def require_wandb() -> Any:
    """The wandb module, or a ValueError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ValueError(MISSING) from None
    return wandb


class WandbSink:
    """One W&B run for the run folder `out`; `resume`: continue the run whose id OUT/wandb/run-id holds."""

    what = "W&B files"  # how errors name what was being written

    def __init__(self, out: str | os.PathLike, project: str, resume: bool = False, job_type: str | None = None):
        wandb = require_wandb()
        folder = self.path = Path(out) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
        self._wandb = wandb
        # Console capture off unless asked for (WANDB_CONSOLE): it would wrap the live panel; log.txt has the lines.
        settings = wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off"))
        self.run = wandb.init(project=project or DEFAULT_PROJECT, name=Path(out).resolve().name, id=run_id,
                              resume="allow", dir=str(Path(out)), job_type=job_type, settings=settings)
        id_file.write_text(run_id + "\n")
        for axis in X_AXES:
            self.run.define_metric(axis)
        for kind in ("train", "eval", "pictures"):
            self.run.define_metric(f"{kind}/*", step_metric="step")

    @staticmethod
    def _axes(rec: dict[str, Any]) -> dict[str, Any]:
        axes: dict[str, Any] = {"step": rec["step"]}
        if rec.get("images") is not None:
            axes["images"] = rec["images"]
        if rec.get("flops") is not None:
            axes["pflops"] = rec["flops"] / 1e15
        return axes

    def record(self, rec: dict[str, Any]) -> None:
        values = {f"{rec['kind']}/{k}": v for k, v in rec.items()
                  if k not in ("kind", "time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({**self._axes(rec), **values})

    def image(self, tag: str, picture: np.ndarray, step: int, caption: str = "") -> None:
        self.run.log({"step": step, tag: self._wandb.Image(picture, caption=caption or None)})

    def config(self, run_config: dict[str, Any], step: int) -> None:
        self.run.config.update(run_config, allow_val_change=True)

    def flush(self) -> None:
        pass  # the W&B service streams on its own

    def close(self) -> None:
        self.run.finish()
