"""`./launch.sh bench pipeline`: images/s of the data pipelines on the same images and cores, side by side.

Rows:
  (a) the crop-decode train loader (`decode="cpu"`, the default without a GPU: DALI decodes the crop window on CPU
      threads, torch's uint8 bicubic resizes it) on the shards, uint8 NHWC
  (a') the reference DALI pipeline on the same shards (`decode="dali-cpu"`: the GPU pipeline's operators on DALI's
      CPU backend; with --device cuda, `decode="gpu"`)
  (b) the torch backend on the same shards (PIL decoding in DataLoader workers, the same geometry and resize)
  (c) the original MAE/SupMAE recipe: torchvision ImageFolder on the original JPEGs, RandomResizedCrop(224,
      (0.2, 1.0), bicubic) + flip + ToTensor + Normalize, DataLoader(num_workers=cores, batch 64, shuffle,
      drop_last) - as MAE's main_pretrain.py builds it (workers restart every epoch); (c') the same with
      persistent workers, a favour to the baseline on a small image set where epochs are short
  ceiling: decoding every stored image once on one core, times the cores (DALI's CPU decoder and PIL), and
      the same for the original files
  stages: (a) built up one step at a time on one thread (read, crop-decode, resize, flip) and the alternatives
      measured for its decode and resize (`tools/bench/pipeline_stages.py`) - where (a)'s time goes
  dali-stages: the same for (a') (reader, decode, crop-decode, cubic resize, flip)
  eval: (e) the crop-decode loader and (e') the DALI pipeline as eval loaders (whole-image decode, resize of the
      shorter side to 256, centre crop), measured with the loader rows (no recipe ratio: the recipe row trains)

Loader rows are measured interleaved (one timed call of each row in turn, `repeats` rounds after a warm-up round),
so background load on a shared machine hits every row alike; each call takes `--images` images from an endless
stream of epochs. The median over rounds is reported with its spread.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tools.bench.pipeline_stages import DALI_STAGES, cpu_per_call, crop_stage_rows, dali_stage_ms, per_image
from tools.bench.report import BenchReport, Timing

DESCRIPTION = "data pipeline images/s: crop-decode and DALI loaders vs torch backend vs the original recipe"
ROWS = ("cpu", "dali", "torch", "recipe", "recipe-persistent", "eval", "ceiling", "stages", "dali-stages")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="shard folder written by `./launch.sh shard` (default settings)")
    p.add_argument("--imagefolder", required=True,
                   help="the same images as an ImageFolder tree, or a tar of one (extracted once into --cache)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=_cores(),
                   help="DALI threads = DataLoader workers for every row (default: the cores this process may use)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of the loaders' output")
    p.add_argument("--images", type=int, default=1024, help="images per timed call (default 1024)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--cache", default="/tmp/supmae-bench", help="where a --imagefolder tar is extracted")


@dataclass(frozen=True)
class PipelineBenchConfig:
    data: str
    imagefolder: str
    batch_size: int = 64
    img_size: int = 224
    threads: int = 2
    device: str = "auto"
    images: int = 1024
    rows: tuple[str, ...] = ROWS
    cache: str = "/tmp/supmae-bench"
    warmup: int = 1
    repeats: int = 5

    def __post_init__(self) -> None:
        for name in ("batch_size", "img_size", "threads", "images", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        unknown = set(self.rows) - set(ROWS)
        if unknown:
            raise ValueError(f"rows {sorted(unknown)} unknown; choose from {', '.join(ROWS)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PipelineBenchConfig:
        return cls(data=args.data, imagefolder=args.imagefolder, batch_size=args.batch_size, img_size=args.img_size,
                   threads=args.threads, device=args.device, images=args.images,
                   rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()), cache=args.cache,
                   warmup=1 if args.warmup is None else args.warmup,
                   repeats=5 if args.repeats is None else args.repeats)


# ----------------------------------------------------------------------------------------------------------------
# inputs


def imagefolder_root(src: str, cache: str) -> Path:
    """An ImageFolder root (class folders inside) for `src`: the folder itself, or a tar extracted once."""
    path = Path(src)
    if path.is_dir():
        root = path
    elif path.is_file() and tarfile.is_tarfile(path):
        root = Path(cache) / path.name.split(".")[0]
        done = root / ".extracted"
        if not done.exists():
            root.mkdir(parents=True, exist_ok=True)
            with tarfile.open(path) as tf:
                tf.extractall(root, filter="data")
            done.touch()
    else:
        raise FileNotFoundError(f"--imagefolder {src}: not a folder or a tar file")
    # A tar usually holds one top folder around the class folders.
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and any(x.is_dir() for x in entries[0].iterdir()):
            root = entries[0]
        else:
            return root


def stored_jpegs(data: str) -> list[bytes]:
    """Every stored image of a shard folder, in manifest order."""
    from pipeline.loaders.base import ShardSet
    from pipeline.shards.shard_format import read_samples

    return [comps["jpg"] for tar in ShardSet.open(data).tars for _, comps in read_samples(tar)]


def original_jpegs(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------------------------
# rows


def endless(make_epoch: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make_epoch()


@dataclass
class StreamRow:
    """A loader measured as `images` per call taken from an endless stream of its batches."""

    name: str
    stream: Iterator
    count: Callable[[object], int]
    note: str = ""

    def take(self, images: int) -> int:
        got = 0
        while got < images:
            got += self.count(next(self.stream))
        return got


def loader_row(cfg: PipelineBenchConfig, row: str, train: bool = True) -> StreamRow:
    """(a) crop-decode, (a') the reference DALI pipeline, (b) the torch backend: the project's loaders, uint8; with
    `train=False` (rows (e), (e')) the same as eval loaders."""
    from pipeline.loaders.base import LoaderConfig, resolve_device
    from pipeline.loaders.build import build_loader

    reference = "gpu" if resolve_device(cfg.device).type == "cuda" else "dali-cpu"
    backend, decode = {"cpu": ("dali", "cpu"), "dali": ("dali", reference), "torch": ("torch", "auto")}[row]
    loader = build_loader(LoaderConfig(cfg.data, cfg.batch_size, cfg.img_size, backend=backend, decode=decode,
                                       device=cfg.device, num_threads=cfg.threads, train=train))
    name, note = {
        "cpu": ("crop-decode loader (decode=cpu)", "DALI window decode + torch bicubic resize + flip, "
                f"{cfg.threads} + {cfg.threads} threads, output on {loader.device.type}"),
        "dali": (f"DALI pipeline (decode={loader.decode})", f"{loader.device.type}, {cfg.threads} threads, "
                 "crop-decode + cubic resize + flip"),
        "torch": ("torch backend", f"{cfg.threads} DataLoader workers, PIL decode + torch bicubic resize"),
    }[row]
    if train:
        tag = {"cpu": "(a)", "dali": "(a')", "torch": "(b)"}[row]
    else:
        tag = {"cpu": "(e) eval:", "dali": "(e') eval:"}[row]
        note = note.replace("window decode", "whole-image decode").replace("crop-decode", "decode") \
            .replace(" + flip", ", shorter side + centre crop")
    return StreamRow(f"{tag} {name}, uint8", endless(lambda: iter(loader)), lambda b: b.num_valid, note)


def recipe_row(cfg: PipelineBenchConfig, root: Path, persistent: bool) -> StreamRow:
    """MAE main_pretrain.py's loader: ImageFolder + RandomResizedCrop(bicubic) + flip + ToTensor + Normalize."""
    import torch
    import torchvision.datasets as datasets
    import torchvision.transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(cfg.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.threads, persistent_workers=persistent,
                                         pin_memory=torch.cuda.is_available())
    name = "(c') original recipe, persistent workers" if persistent else "(c) original recipe (MAE main_pretrain)"
    return StreamRow(name, endless(lambda: iter(loader)), lambda b: len(b[1]),
                     f"ImageFolder on the original JPEGs, {cfg.threads} workers, float32 CHW")


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its worker processes, live or finished."""
    import multiprocessing
    import resource

    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + done.ru_utime + done.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_until_idle(max_seconds: float = 10.0, window: float = 0.1, busy: float = 0.05) -> None:
    """Return once this process tree uses under `busy` of a core over `window` (or after `max_seconds`).

    Every loader keeps working after a timed call ends (DALI refills its prefetch queue, DataLoader workers finish
    their outstanding batches); without this, that work would run inside the next row's timed call.
    """
    deadline = time.monotonic() + max_seconds
    last = _tree_cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(window)
        now = _tree_cpu_seconds()
        if now - last < busy * window:
            return
        last = now


@dataclass
class Measured:
    timing: Timing  # wall seconds per call
    images: int  # per call
    cpu_seconds: list[float]  # CPU of this process tree per call, including the work it left running

    @property
    def rate(self) -> float:
        return self.timing.rate(self.images)

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * statistics.median(self.cpu_seconds) / self.images


def measure_interleaved(rows: list[StreamRow], cfg: PipelineBenchConfig) -> dict[str, Measured]:
    """One timed call of each row in turn, after warm-up rounds; each call starts once the previous row's leftover
    work (prefetch refills, outstanding worker batches) has finished, and that work is charged to its own row."""
    for _ in range(cfg.warmup):
        for row in rows:
            row.take(cfg.images)
            wait_until_idle()
    out = {row.name: Measured(Timing([]), 0, []) for row in rows}
    for _ in range(cfg.repeats):
        for row in rows:
            m = out[row.name]
            cpu0, t0 = _tree_cpu_seconds(), time.perf_counter()
            m.images = row.take(cfg.images)
            m.timing.seconds.append(time.perf_counter() - t0)
            wait_until_idle()
            m.cpu_seconds.append(_tree_cpu_seconds() - cpu0)
    return out


def pil_decode_all(jpegs: list[bytes]) -> Callable[[], None]:
    from PIL import Image

    def decode_all():
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB").load()
    return decode_all


# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> BenchReport:
    cfg = PipelineBenchConfig.from_args(args)
    report = BenchReport(
        benchmark="pipeline",
        columns=["name", "images_per_sec", "spread", "x_recipe", "cpu_ms_per_image", "x_recipe_cpu", "notes"],
        settings={"data": cfg.data, "imagefolder": cfg.imagefolder, "batch_size": cfg.batch_size,
                  "img_size": cfg.img_size, "threads": cfg.threads, "images_per_call": cfg.images,
                  "warmup": cfg.warmup, "repeats": cfg.repeats},
    )
    load_before = os.getloadavg()[0]
    root = imagefolder_root(cfg.imagefolder, cfg.cache) if {"recipe", "recipe-persistent", "ceiling"} & set(cfg.rows) \
        else None

    rows = [loader_row(cfg, row) for row in ("cpu", "dali", "torch") if row in cfg.rows]
    if "recipe" in cfg.rows:
        rows.append(recipe_row(cfg, root, persistent=False))
    if "recipe-persistent" in cfg.rows:
        rows.append(recipe_row(cfg, root, persistent=True))
    if "eval" in cfg.rows:
        rows += [loader_row(cfg, row, train=False) for row in ("cpu", "dali")]
    measured = measure_interleaved(rows, cfg) if rows else {}

    recipe = next((measured[r.name] for r in rows if r.name.startswith("(c)")), None)
    for row in rows:
        m = measured[row.name]
        versus = recipe if not row.name.startswith("(e") else None  # the recipe row trains: no ratio for eval
        report.add_row(name=row.name, images_per_sec=m.rate, spread=f"±{m.timing.spread:.0%}",
                       x_recipe=m.rate / versus.rate if versus else None, cpu_ms_per_image=m.cpu_ms_per_image,
                       x_recipe_cpu=versus.cpu_ms_per_image / m.cpu_ms_per_image if versus else None, notes=row.note)

    def per_core_row(name: str, seconds_per_image: Timing, note: str, times_cores: bool) -> None:
        per_core = 1 / seconds_per_image.median
        rate = per_core * cfg.threads if times_cores else per_core
        report.add_row(name=name, images_per_sec=rate, spread=f"±{seconds_per_image.spread:.0%}",
                       x_recipe=rate / recipe.rate if recipe and times_cores else None,
                       cpu_ms_per_image=1000 * seconds_per_image.median, x_recipe_cpu=None, notes=note)

    stage_args = (cfg.data, cfg.batch_size, cfg.img_size, cfg.images, cfg.repeats)
    if "ceiling" in cfg.rows:
        for label, jpegs, note in (("stored images", stored_jpegs(cfg.data), "libjpeg-turbo via Pillow"),
                                   ("original files", original_jpegs(root), "what (c) decodes")):
            t = cpu_per_call(pil_decode_all(jpegs), warmup=1, repeats=cfg.repeats)
            per_core_row(f"ceiling: PIL full decode of the {label}, 1 core x {cfg.threads}",
                         per_image(t, len(jpegs)), f"{len(jpegs)} images, {note}", True)
        per_core_row(f"ceiling: DALI CPU decode of the stored images, 1 thread x {cfg.threads}",
                     dali_stage_ms(*stage_args, "decode"), "reader + decoders.image, nothing else", True)
    if "stages" in cfg.rows:
        for name, timing, note in crop_stage_rows(*stage_args):
            per_core_row(name, timing, note, False)
    if "dali-stages" in cfg.rows:
        for stage, name in DALI_STAGES:
            per_core_row(name, dali_stage_ms(*stage_args, stage), "1 thread; images/s of one core", False)
    load_after = os.getloadavg()[0]
    report.notes.append(
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {_cores()} cores "
        "(other work on a shared machine lowers every row; loader rows are interleaved so it hits them alike)")
    report.notes.append("x_recipe: images/s relative to (c), the original recipe; x_recipe_cpu: CPU time per image of "
                        "(c) over this row's (independent of how much of the machine other work takes)")
    report.notes.append("cpu_ms_per_image: CPU milliseconds per image of this process and its workers; stage and "
                        "ceiling rows: one thread, synchronous executor")
    return report
