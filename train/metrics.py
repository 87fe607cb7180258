"""What a run records and shows (rank 0 only): metrics.jsonl, TensorBoard events, log.txt, the live display.

metrics.jsonl has one JSON object per line: a "train" record per log interval and an "eval" record per head
evaluation. The fields (TRAIN_FIELDS, EVAL_FIELDS) are documented in docs/run-folder.md; the compute-to-accuracy
tools read them, so change them only together with that document.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.fileio import atomic_write_bytes

METRICS_NAME = "metrics.jsonl"
LOG_NAME = "log.txt"
TB_DIR = "tb"

TRAIN_FIELDS = (
    "kind", "time", "step", "epoch", "images", "flops", "device_hours", "loss", "rec_loss", "cls_loss", "lr",
    "grad_norm", "images_per_sec", "images_per_sec_per_device", "data_wait", "tflops_per_device", "mfu",
    "memory_gb", "eta_seconds", "nonfinite_steps", "loss_scale", "interval_steps", "interval_seconds",
)
EVAL_FIELDS = ("kind", "time", "step", "epoch", "images", "flops", "device_hours", "top1", "samples")
# Fields of a record that depend on the clock or the machine, not on the computation: two runs that computed the
# same thing (e.g. an uninterrupted and a resumed one) agree on every other field.
TIMING_FIELDS = frozenset({"time", "device_hours", "images_per_sec", "images_per_sec_per_device", "data_wait",
                           "tflops_per_device", "mfu", "memory_gb", "eta_seconds", "interval_seconds"})


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats are written as null (a non-finite loss shows up in nonfinite_steps)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class IntervalNumbers:
    """Inputs of one train record, gathered by the trainer at a log interval (all host values)."""

    step: int
    epoch: float
    images: int
    flops: int
    device_hours: float
    loss: float
    rec_loss: float
    cls_loss: float | None
    lr: float
    grad_norm: float
    interval_steps: int  # steps averaged in this record (since the previous record)
    interval_images: int  # images in the rate window (since the previous record or the (re)start)
    interval_seconds: float  # wall seconds of the rate window, checkpoint writes and evaluations excluded
    rate_steps: int  # steps in the rate window
    data_wait: float
    world_size: int
    flops_per_image: int
    peak_tflops: float | None
    memory_gb: float
    remaining_steps: int
    nonfinite_steps: int
    loss_scale: float | None


def train_record(n: IntervalNumbers) -> dict[str, Any]:
    """The metrics.jsonl "train" record of an interval (field order = TRAIN_FIELDS)."""
    ips = n.interval_images / n.interval_seconds if n.interval_seconds > 0 else 0.0
    per_device = ips / n.world_size
    tflops = per_device * n.flops_per_image / 1e12
    rec = {
        "kind": "train",
        "time": time.time(),
        "step": n.step,
        "epoch": n.epoch,
        "images": n.images,
        "flops": n.flops,
        "device_hours": n.device_hours,
        "loss": n.loss,
        "rec_loss": n.rec_loss,
        "cls_loss": n.cls_loss,
        "lr": n.lr,
        "grad_norm": n.grad_norm,
        "images_per_sec": ips,
        "images_per_sec_per_device": per_device,
        "data_wait": n.data_wait,
        "tflops_per_device": tflops,
        "mfu": tflops / n.peak_tflops if n.peak_tflops else None,
        "memory_gb": n.memory_gb,
        "eta_seconds": n.remaining_steps * n.interval_seconds / n.rate_steps if n.rate_steps else None,
        "nonfinite_steps": n.nonfinite_steps,
        "loss_scale": n.loss_scale,
        "interval_steps": n.interval_steps,
        "interval_seconds": n.interval_seconds,
    }
    return {k: _clean(v) for k, v in rec.items()}


def eval_record(step: int, epoch: float, images: int, flops: int, device_hours: float, top1: float,
                samples: int) -> dict[str, Any]:
    return {"kind": "eval", "time": time.time(), "step": step, "epoch": epoch, "images": images, "flops": flops,
            "device_hours": device_hours, "top1": top1, "samples": samples}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------------------------------------------------------
# Files


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[bytes, dict[str, Any]]], list[str]]:
    """The records of a JSONL file (metrics.jsonl) with their raw lines, and one note per line that cannot be read,
    naming the file and line: not UTF-8 (disk damage), not a JSON object (a line cut by `kill -9`)."""
    records, problems = [], []
    for lineno, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "line skipped")
            continue
        except json.JSONDecodeError:
            problems.append(f"{path}:{lineno}: not valid JSON (a line cut by a kill?); line skipped")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{path}:{lineno}: not a JSON object; line skipped")
            continue
        records.append((raw, rec))
    return records, problems


def truncate_metrics(path: str | os.PathLike, after_step: int) -> int:
    """Drop records with step > `after_step` (written after the checkpoint a run resumes from), and unreadable lines
    (`read_jsonl`); returns how many lines were dropped.

    A resumed run re-does those steps, so without this the file would hold them twice.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    records, problems = read_jsonl(path)
    kept = [raw for raw, rec in records if not (isinstance(rec.get("step", 0), (int, float))
                                                 and rec.get("step", 0) > after_step)]
    dropped = len(problems) + len(records) - len(kept)
    if dropped:
        atomic_write_bytes(path, b"".join(raw + b"\n" for raw in kept))
    return dropped


class RunLog:
    """metrics.jsonl + TensorBoard + log.txt + the console display of rank 0; on other ranks every call is a no-op.

    display: "live" (rich live panel), "plain" (one line per interval), "off", or "auto" (live on a terminal).
    """

    def __init__(self, out: str | os.PathLike, enabled: bool, display: str = "auto", tensorboard: bool = True,
                 resume_step: int | None = None, title: str = ""):
        self.enabled = enabled
        self.out = Path(out)
        self._tb = None
        self._live = None
        self._console = None
        self.title = title
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.out / METRICS_NAME, resume_step)
        self._metrics = open(self.out / METRICS_NAME, "a", buffering=1)
        self._log = open(self.out / LOG_NAME, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a previous attempt wrote after the checkpoint this run resumes from.
            self._tb = SummaryWriter(str(self.out / TB_DIR),
                                     purge_step=resume_step + 1 if resume_step is not None else None)
        if display == "auto":
            display = "live" if sys.stdout.isatty() else "plain"
        self.display = display
        if display == "live":
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live(console=self._console, auto_refresh=False, transient=False)
            self._live.start()

    # -- messages ------------------------------------------------------------------------------------------------
    def message(self, text: str, console: bool = True) -> None:
        """A line for the user (start-up, warnings, checkpoints, stops): log.txt and (unless `console` is False, e.g.
        an error the process reports on stderr itself) the console."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{stamp} {text}\n")
        if not console:
            return
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
        elif self.display != "off":
            print(text, flush=True)

    # -- records -------------------------------------------------------------------------------------------------
    def record(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            prefix = rec["kind"]
            for k, v in rec.items():
                if k not in ("kind", "time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, rec["step"])
        if rec["kind"] == "train":
            self._show_train(rec)
        else:
            self.message(f"eval  step {rec['step']}  epoch {rec['epoch']:.2f}  head top-1 {100 * rec['top1']:.2f}% "
                         f"on {rec['samples']} images")

    def flush(self) -> None:
        if self.enabled:
            self._metrics.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._tb is not None:
            self._tb.close()
        self._metrics.close()
        self._log.close()
        self.enabled = False

    # -- display -------------------------------------------------------------------------------------------------
    def _show_train(self, rec: dict[str, Any]) -> None:
        line = format_train_line(rec)
        self._log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
        if self._live is not None:
            self._live.update(train_panel(rec, self.title), refresh=True)
        elif self.display == "plain":
            print(line, flush=True)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h:d}:{m:02d}:{s:02d}"


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_train_line(rec: dict[str, Any]) -> str:
    """One plain-text line of a train record (log.txt, non-terminal output)."""
    mfu = f" mfu {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
    cls = f" cls {rec['cls_loss']:.4f}" if rec.get("cls_loss") is not None else ""
    return (f"step {rec['step']} ep {rec['epoch']:.2f} loss {_fmt(rec['loss'], '.4f')} rec "
            f"{_fmt(rec['rec_loss'], '.4f')}{cls} lr {rec['lr']:.3e} | {rec['images_per_sec']:.1f} img/s "
            f"({rec['images_per_sec_per_device']:.1f}/dev) wait {100 * rec['data_wait']:.0f}% "
            f"{rec['tflops_per_device']:.2f} TFLOP/s/dev{mfu} mem {rec['memory_gb']:.1f}GB "
            f"eta {_fmt_eta(rec['eta_seconds'])}"
            + (f" nonfinite {rec['nonfinite_steps']}" if rec.get("nonfinite_steps") else ""))


def train_panel(rec: dict[str, Any], title: str = ""):
    """The rich renderable of the live display: one table of the latest interval."""
    from rich.panel import Panel
    from rich.table import Table

    t = Table.grid(padding=(0, 1))
    for _ in range(4):
        t.add_column(justify="right", style="bold")
        t.add_column(justify="left", min_width=10)
    t.add_row("epoch", f"{rec['epoch']:.2f}", "step", str(rec["step"]), "lr", f"{rec['lr']:.3e}", "ETA",
              _fmt_eta(rec["eta_seconds"]))
    t.add_row("loss", _fmt(rec["loss"], ".4f"), "rec", _fmt(rec["rec_loss"], ".4f"), "cls",
              _fmt(rec["cls_loss"], ".4f"), "gnorm", _fmt(rec["grad_norm"], ".3f"))
    t.add_row("img/s", f"{rec['images_per_sec']:,.0f}", "/device", f"{rec['images_per_sec_per_device']:,.0f}",
              "wait", f"{100 * rec['data_wait']:.1f}%", "mem", f"{rec['memory_gb']:.1f} GB")
    t.add_row("TFLOP/s", f"{rec['tflops_per_device']:.2f}/dev", "MFU",
              "-" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%", "images", f"{rec['images']:,}",
              "PFLOP", f"{rec['flops'] / 1e15:,.3f}")
    extra = []
    if rec.get("nonfinite_steps"):
        extra.append(f"non-finite steps skipped: {rec['nonfinite_steps']}")
    if rec.get("loss_scale") is not None:
        extra.append(f"loss scale {rec['loss_scale']:g}")
    subtitle = "  ".join(extra) or None
    return Panel(t, title=title or None, subtitle=subtitle)
