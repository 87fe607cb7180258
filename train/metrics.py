"""What a run records and shows (rank 0 only): metrics.jsonl, log.txt, the live display, and the trackers of
train/tracking (TensorBoard events, Weights & Biases).

metrics.jsonl has one JSON object per line: a "train" record per log interval and an "eval" record per head
evaluation. The fields (TRAIN_FIELDS, EVAL_FIELDS) are documented in docs/run-folder.md; the compute-to-accuracy
tools read them, so change them only together with that document.
"""

from __future__ import annotations

import contextlib
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

from pipeline.fileio import DiskFullError, atomic_write_bytes, disk_full_error, is_disk_full

METRICS_NAME = "metrics.jsonl"
LOG_NAME = "log.txt"
TB_DIR = "tb"
# What to do when the run log meets a full disk (the run stops with exit status 2; its checkpoints are intact).
DISK_FULL_ADVICE = ("the run stopped: free space (or choose another --out) and continue the run with --resume auto "
                    "from its last checkpoint")

TRAIN_FIELDS = (
    "kind", "time", "step", "epoch", "images", "flops", "device_hours", "loss", "rec_loss", "cls_loss", "lr",
    "grad_norm", "images_per_sec", "images_per_sec_per_device", "data_wait", "tflops_per_device", "mfu",
    "memory_gb", "eta_seconds", "nonfinite_steps", "loss_scale", "interval_steps", "interval_seconds", "end_step",
    "elapsed_seconds",
)
EVAL_FIELDS = ("kind", "time", "step", "epoch", "images", "flops", "device_hours", "top1", "samples")
# Fields of a record that depend on the clock, the machine or where this attempt was told to stop (--max-steps),
# not on the computation: two runs that computed the same thing (e.g. an uninterrupted and a resumed one) agree on
# every other field.
TIMING_FIELDS = frozenset({"time", "device_hours", "images_per_sec", "images_per_sec_per_device", "data_wait",
                           "tflops_per_device", "mfu", "memory_gb", "eta_seconds", "interval_seconds", "end_step",
                           "elapsed_seconds"})


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
    end_step: int = 0  # the step this run stops at (the schedule's end, or --max-steps)
    elapsed_seconds: float = 0.0  # wall seconds of training so far (all attempts of a resumed run)


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
        "end_step": n.end_step,
        "elapsed_seconds": n.elapsed_seconds,
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
    """metrics.jsonl + log.txt + the console display + the trackers (TensorBoard, W&B) of rank 0; on other ranks
    every call is a no-op.

    display: "live" (rich live panel), "plain" (one line per interval), "off", or "auto" (live on a terminal).
    wandb: "" (off) or the W&B project (train/tracking/wandb_sink.py).

    A full disk met while writing any of its files (or a tracker's) raises DiskFullError naming the file (the
    protocol's entry makes it a message and exit status 2); from then on the files are left alone, so that
    reporting the error and closing the log do not meet the full disk again.
    """

    def __init__(self, out: str | os.PathLike, enabled: bool, display: str = "auto", tensorboard: bool = True,
                 resume_step: int | None = None, title: str = "", wandb: str = ""):
        self.enabled = enabled
        self.out = Path(out)
        self._sinks: list[Any] = []
        self._live = None
        self._console = None
        self._disk_full = False
        self.title = title
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.out / METRICS_NAME, resume_step)
        self._metrics = open(self.out / METRICS_NAME, "a", buffering=1)
        self._log = open(self.out / LOG_NAME, "a", buffering=1)
        try:
            if tensorboard:
                from train.tracking.tensorboard_sink import TensorBoardSink

                # purge_step hides events a previous attempt wrote after the checkpoint this run resumes from.
                with self._writing("TensorBoard events", self.out / TB_DIR):
                    self._sinks.append(TensorBoardSink(self.out / TB_DIR, resume_step))
            if wandb:
                from train.tracking.wandb_sink import WandbSink

                with self._writing("W&B files", self.out / "wandb"):
                    self._sinks.append(WandbSink(self.out, wandb, resume=resume_step is not None,
                                                 job_type=title.split(" ", 1)[0] or None))
        except BaseException:
            self.close()
            raise
        if display == "auto":
            display = "live" if sys.stdout.isatty() else "plain"
        self.display = display
        if display == "live":
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live(console=self._console, auto_refresh=False, transient=False)
            self._live.start()

    @contextlib.contextmanager
    def _writing(self, what: str, path: Path):
        """A full disk met inside the block becomes a DiskFullError naming `what` and `path`."""
        try:
            yield
        except OSError as e:
            if not is_disk_full(e) or isinstance(e, DiskFullError):
                raise
            self._disk_full = True
            raise disk_full_error(path, what, cause=e, advice=DISK_FULL_ADVICE) from e

    def _write(self, f: Any, text: str, what: str, name: str) -> None:
        if not self._disk_full:
            with self._writing(what, self.out / name):
                f.write(text)

    def _to_sinks(self, method: str, *args: Any) -> None:
        if self._disk_full:
            return
        for sink in self._sinks:
            with self._writing(sink.what, sink.path):
                getattr(sink, method)(*args)

    # -- messages ------------------------------------------------------------------------------------------------
    def message(self, text: str, console: bool = True) -> None:
        """A line for the user (start-up, warnings, checkpoints, stops): log.txt and (unless `console` is False, e.g.
        an error the process reports on stderr itself) the console."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(self._log, f"{stamp} {text}\n", "log line", LOG_NAME)
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
        self._write(self._metrics, json.dumps(rec) + "\n", "metrics record", METRICS_NAME)
        self._to_sinks("record", rec)
        if rec["kind"] == "train":
            self._show_train(rec)
        else:
            self.message(f"eval  step {rec['step']}  epoch {rec['epoch']:.2f}  head top-1 {100 * rec['top1']:.2f}% "
                         f"on {rec['samples']} images")

    @property
    def tracking(self) -> bool:
        """Whether a tracker (TensorBoard, W&B) takes pictures and the configuration."""
        return self.enabled and bool(self._sinks)

    def image(self, tag: str, picture: Any, step: int, caption: str = "") -> None:
        """An (H, W, C) uint8 picture for the trackers (e.g. a reconstruction grid at a checkpoint)."""
        if self.enabled:
            self._to_sinks("image", tag, picture, step, caption)

    def log_config(self, run_config: dict[str, Any], step: int = 0) -> None:
        """The resolved configuration (config.json's content) for the trackers: text and hyper-parameters."""
        if self.enabled:
            self._to_sinks("config", run_config, step)

    def flush(self) -> None:
        if self.enabled and not self._disk_full:
            with self._writing("metrics record", self.out / METRICS_NAME):
                self._metrics.flush()
            self._to_sinks("flush")

    def close(self) -> None:
        """Stop the display, close the trackers and files. A full disk met only now is raised after everything is
        closed; after an earlier one (already on its way as an error) the files' errors are ignored."""
        if not self.enabled:
            return
        self.enabled = False
        if self._live is not None:
            self._live.stop()
            self._live = None
        closing = [(sink.close, sink.what, sink.path) for sink in self._sinks]
        closing += [(f.close, what, self.out / name) for f, what, name in
                    ((getattr(self, "_metrics", None), "metrics record", METRICS_NAME),
                     (getattr(self, "_log", None), "log line", LOG_NAME)) if f is not None]
        self._sinks = []
        earlier = self._disk_full
        first: OSError | None = None
        for close, what, path in closing:
            try:
                with self._writing(what, path):
                    close()
            except OSError as e:
                first = first or e
        if first is not None and not earlier:
            raise first

    # -- display -------------------------------------------------------------------------------------------------
    def _show_train(self, rec: dict[str, Any]) -> None:
        line = format_train_line(rec)
        self._write(self._log, time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n", "log line", LOG_NAME)
        if self._live is not None:
            self._live.update(train_panel(rec, self.title, self._console.width), refresh=True)
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


def format_progress(rec: dict[str, Any], sep: str = ",") -> str:
    """"step/end (pct%)" of a train record ("step" alone when the end is unknown)."""
    step, end = rec["step"], rec.get("end_step")
    if not end:
        return f"{step:{sep}d}" if sep else str(step)
    return (f"{step:{sep}d}/{end:{sep}d}" if sep else f"{step}/{end}") + f" ({100 * step / end:.1f}%)"


def format_train_line(rec: dict[str, Any]) -> str:
    """One plain-text line of a train record (log.txt, non-terminal output)."""
    mfu = f" mfu {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
    cls = f" cls {rec['cls_loss']:.4f}" if rec.get("cls_loss") is not None else ""
    return (f"step {format_progress(rec, '')} ep {rec['epoch']:.2f} loss {_fmt(rec['loss'], '.4f')} rec "
            f"{_fmt(rec['rec_loss'], '.4f')}{cls} lr {rec['lr']:.3e} | {rec['images_per_sec']:.1f} img/s "
            f"({rec['images_per_sec_per_device']:.1f}/dev) wait {100 * rec['data_wait']:.0f}% "
            f"{rec['tflops_per_device']:.2f} TFLOP/s/dev{mfu} mem {rec['memory_gb']:.1f}GB "
            f"elapsed {_fmt_eta(rec.get('elapsed_seconds'))} eta {_fmt_eta(rec['eta_seconds'])}"
            + (f" nonfinite {rec['nonfinite_steps']}" if rec.get("nonfinite_steps") else ""))


# Width of the console from which the panel shows 4 (label, value) pairs per row, and 2.
_PANEL_WIDE, _PANEL_NARROW = 96, 48


def train_panel(rec: dict[str, Any], title: str = "", width: int = 120):
    """The rich renderable of the live display for a console `width` columns wide: a progress line
    (step n/N (%), elapsed, ETA) and bar, then the latest interval's numbers, 4 pairs per row on wide consoles,
    2 below 96 columns (an 80-column terminal), 1 below 48."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    header = Text.assemble(("step ", "bold"), format_progress(rec), ("  elapsed ", "bold"),
                           _fmt_eta(rec.get("elapsed_seconds")), ("  ETA ", "bold"), _fmt_eta(rec["eta_seconds"]))
    top = Table.grid(expand=True)  # a table row ends its line (a bare ProgressBar does not)
    top.add_column()
    top.add_row(header)
    if rec.get("end_step"):
        top.add_row(ProgressBar(total=rec["end_step"], completed=rec["step"]))
    parts: list[Any] = [top]
    pairs = [
        ("epoch", f"{rec['epoch']:.2f}"), ("lr", f"{rec['lr']:.3e}"),
        ("loss", _fmt(rec["loss"], ".4f")), ("rec", _fmt(rec["rec_loss"], ".4f")),
        ("cls", _fmt(rec["cls_loss"], ".4f")), ("gnorm", _fmt(rec["grad_norm"], ".3f")),
        ("img/s", f"{rec['images_per_sec']:,.0f}"), ("/device", f"{rec['images_per_sec_per_device']:,.0f}"),
        ("wait", f"{100 * rec['data_wait']:.1f}%"), ("mem", f"{rec['memory_gb']:.1f} GB"),
        ("TFLOP/s", f"{rec['tflops_per_device']:.2f}/dev"),
        ("MFU", "-" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"),
        ("images", f"{rec['images']:,}"), ("PFLOP", f"{rec['flops'] / 1e15:,.3f}"),
    ]
    per_row = 4 if width >= _PANEL_WIDE else 2 if width >= _PANEL_NARROW else 1
    t = Table.grid(padding=(0, 1))
    for _ in range(per_row):
        t.add_column(justify="right", style="bold", no_wrap=True)
        t.add_column(justify="left", min_width=10, no_wrap=True)
    for i in range(0, len(pairs), per_row):
        row = [x for pair in pairs[i : i + per_row] for x in pair]
        t.add_row(*row, *[""] * (2 * per_row - len(row)))
    parts.append(t)
    extra = []
    if rec.get("nonfinite_steps"):
        extra.append(f"non-finite steps skipped: {rec['nonfinite_steps']}")
    if rec.get("loss_scale") is not None:
        extra.append(f"loss scale {rec['loss_scale']:g}")
    subtitle = "  ".join(extra) or None
    return Panel(Group(*parts), title=title or None, subtitle=subtitle)
