"""`./launch.sh bench shard`: sharding images/s against its two floors, on real ImageNet files.

Measured on the same files, all in the page cache (read once before timing). The machine may be shared, so the
measurements run in interleaved rounds (every measurement once per round, `--repeats` rounds, medians reported):
slow changes in the load then hit the tool and its baselines alike. Each row also reports the CPU seconds used
(this process and its workers): wall time well above CPU time / workers means the cores were busy elsewhere.
What is measured:
  * `tar -cf` of the files: the floor of any tool that reads and writes them;
  * decode+encode per image on one core (pipeline.shards.imageproc.process_image on bytes in memory): the floor of the
    default re-encode mode, divided by the number of workers;
  * the sharding command (pipeline.shards.sharding.run_sharding: listing, planning, worker start-up, writing with fsync,
    manifest) in the default re-encode mode and with --keep-original, with 1 and 2 (`--workers`) processes, and
    --keep-original also on only the files that qualify to be kept, against `tar -cf` of those same files.
Targets (issue 3): --keep-original on qualifying files within 2x of `tar -cf`; re-encode within 1.3x of the
per-core decode+encode time divided by the workers.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.shards.imageproc import ImageConfig, keep_original_blockers, process_image, scan_jpeg
from pipeline.shards.shard_format import load_manifest, read_samples
from pipeline.shards.sharding import NullProgress, ShardConfig, run_sharding, run_tasks
from tools.bench.report import BenchReport, Timing, int_list

DESCRIPTION = "sharding throughput vs plain tar copy and per-image decode+encode cost"
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "imagenet-sample-500.tar"
COLUMNS = ["method", "files", "workers", "seconds", "cpu_s", "images_per_sec", "baseline_s", "ratio", "target", "met",
           "ratio_after_startup"]


@dataclass(frozen=True)
class BenchShardConfig:
    data: Path
    workers: tuple[int, ...] = (1, 2)
    shard_samples: int | None = None  # None: one shard per worker (ceil(files / workers))
    warmup: int = 1
    repeats: int = 5
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if not self.data.exists():
            raise ValueError(f"--data {self.data} does not exist; give an ImageFolder tree or a tar of one "
                             "(e.g. ../shared/data/imagenet-sample-500.tar)")
        if not self.workers or any(w < 1 for w in self.workers):
            raise ValueError(f"--workers must list positive counts, got {self.workers}")
        if (self.shard_samples is not None and self.shard_samples < 1) or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--shard-samples and --repeats must be >= 1, --warmup >= 0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="ImageFolder tree or tar of one (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    p.add_argument("--shard-samples", type=int, default=None,
                   help="samples per shard (default: one shard per worker, as large as the files allow: ImageNet's "
                        "~1,000-image shards amortise the per-shard fsync that 50-image shards would not)")
    p.add_argument("--workdir", help="scratch folder (default: a temporary folder, removed afterwards)")


def device_of(args: argparse.Namespace) -> None:
    """Sharding runs on the CPU only."""
    return None


def _config(args: argparse.Namespace) -> BenchShardConfig:
    return BenchShardConfig(
        data=Path(args.data),
        workers=int_list(args.workers, "--workers", "1,2"),
        shard_samples=args.shard_samples,
        warmup=1 if args.warmup is None else args.warmup,
        repeats=5 if args.repeats is None else args.repeats,
        workdir=Path(args.workdir) if args.workdir else None,
    )


def _prepare(cfg: BenchShardConfig, work: Path) -> tuple[Path, Path, int, int, list[bytes]]:
    """(all-files tree, qualifying-files tree, counts, file bytes) under `work`, read once into the page cache."""
    src = work / "src"
    if cfg.data.is_dir():
        shutil.copytree(cfg.data, src)
    else:
        with tarfile.open(cfg.data) as tf:
            tops = {m.name.split("/", 1)[0] for m in tf}
            tf.extractall(work / "extract", filter="data")
        inner = work / "extract" / tops.pop() if len(tops) == 1 else work / "extract"
        inner.rename(src)
    qual = work / "qualifying"
    datas = []
    n_qual = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        datas.append(data)
        if not keep_original_blockers(scan_jpeg(data), ImageConfig().max_side):
            dest = qual / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            n_qual += 1
    return src, qual, len(datas), n_qual, datas


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float


def _timed(fn: Callable[[], object]) -> Sample:
    """Wall and CPU time (this process + reaped children, e.g. tar and the pool's workers) of one call."""
    c0, t0 = os.times(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + (
        c1.children_system - c0.children_system)
    return Sample(t1 - t0, cpu)


def _noop(_: int) -> None:
    return None


def _tar(folder: Path, out: Path, fsync: bool) -> Sample:
    """`tar -cf` of `folder`; with `fsync`, also flushed to disk as the sharding tool does with every shard."""

    def copy() -> None:
        subprocess.run(["tar", "-cf", str(out), "-C", str(folder), "."], check=True)
        if fsync:
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    sample = _timed(copy)
    out.unlink()
    return sample


def _shard(cfg: BenchShardConfig, folder: Path, files: int, out: Path, image: ImageConfig, workers: int) -> Sample:
    """The whole sharding call; the previous output is removed outside the timed region."""
    shutil.rmtree(out, ignore_errors=True)
    per_shard = cfg.shard_samples or -(-files // workers)
    return _timed(lambda: run_sharding(
        ShardConfig(src=folder, out=out, shard_samples=per_shard, workers=workers, image=image)))


def _decode(jpegs: list[bytes]) -> Sample:
    def decode_all() -> None:
        for data in jpegs:
            Image.open(io.BytesIO(data)).load()

    return _timed(decode_all)


def _run_rounds(cfg: BenchShardConfig, measurements: dict[str, Callable[[], Sample]]) -> dict[str, Sample]:
    """Median wall and CPU time of each measurement over `cfg.repeats` interleaved rounds (after warm-up)."""
    for _ in range(cfg.warmup):
        for fn in measurements.values():
            fn()
    samples: dict[str, list[Sample]] = {name: [] for name in measurements}
    for _ in range(cfg.repeats):
        for name, fn in measurements.items():
            samples[name].append(fn())
    return {name: Sample(Timing([x.wall for x in xs]).median, Timing([x.cpu for x in xs]).median)
            for name, xs in samples.items()}


def run(args: argparse.Namespace) -> BenchReport:
    cfg = _config(args)
    default, keep = ImageConfig(), ImageConfig(keep_original=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as tmp:
        work = Path(tmp)
        src, qual, n, n_qual, datas = _prepare(cfg, work)
        out, copy = work / "out", work / "copy.tar"
        run_sharding(ShardConfig(src=src, out=out, shard_samples=cfg.shard_samples or n, workers=1, image=default))
        stored = [c["jpg"] for r in load_manifest(out)[0].shards for _, c in read_samples(out / r.file)]

        m: dict[str, Callable[[], Sample]] = {
            "tar_all": lambda: _tar(src, copy, fsync=False),
            "tar_qual": lambda: _tar(qual, copy, fsync=False),
            "tar_qual_sync": lambda: _tar(qual, copy, fsync=True),
            "codec": lambda: _timed(lambda: [process_image(d, default) for d in datas]),
            "decode_orig": lambda: _decode(datas),
            "decode_stored": lambda: _decode(stored),
        }
        for w in cfg.workers:
            if w > 1:
                m[f"startup{w}"] = lambda w=w: _timed(lambda: run_tasks(_noop, list(range(w)), w, NullProgress(), str,
                                                                     (0, 0, 0, 0)))
            m[f"reencode{w}"] = lambda w=w: _shard(cfg, src, n, out, default, w)
            m[f"keep_qual{w}"] = lambda w=w: _shard(cfg, qual, n_qual, out, keep, w)
            m[f"keep_all{w}"] = lambda w=w: _shard(cfg, src, n, out, keep, w)
        r = _run_rounds(cfg, m)
        shutil.rmtree(out, ignore_errors=True)
    # Only now: the machine description imports torch, which the sharding command never loads (and a process
    # holding torch's mappings forks its workers several times slower).
    report = BenchReport("shard", COLUMNS, settings={
        "data": str(cfg.data), "shard_samples": cfg.shard_samples or "one shard per worker", "repeats": cfg.repeats,
        "warmup": cfg.warmup, "max_side": default.max_side, "quality": default.quality, "rounds": "interleaved",
    })

    def row(method: str, key: str, files: int, workers: int = 1, baseline: str | None = None, target: float | None = None):
        x = r[key]
        values = dict(method=method, files=files, workers=workers, seconds=x.wall, cpu_s=round(x.cpu, 2),
                      images_per_sec=files / x.wall if files else None)
        if baseline is not None:
            base = r[baseline].wall / (workers if baseline == "codec" else 1)
            startup = r[f"startup{workers}"].wall if workers > 1 else 0.0
            values.update(baseline_s=base, ratio=x.wall / base, ratio_after_startup=(x.wall - startup) / base)
            if target is not None:
                values.update(target=f"<= {target:g}", met=x.wall / base <= target)
        report.add_row(**values)

    row("tar -cf, all files", "tar_all", n)
    row("tar -cf, qualifying files", "tar_qual", n_qual)
    row("tar -cf + fsync, qualifying files", "tar_qual_sync", n_qual)
    row("decode+encode, 1 core", "codec", n)
    for w in cfg.workers:
        if w > 1:
            row("worker start-up only", f"startup{w}", 0, w)
    for w in cfg.workers:
        row("shard, re-encode (default)", f"reencode{w}", n, w, baseline="codec", target=1.3)
    for w in cfg.workers:
        row("shard --keep-original, qualifying", f"keep_qual{w}", n_qual, w, baseline="tar_qual", target=2.0)
        row("  same, vs tar -cf + fsync", f"keep_qual{w}", n_qual, w, baseline="tar_qual_sync")
    for w in cfg.workers:
        row("shard --keep-original, all files", f"keep_all{w}", n, w, baseline="tar_all")
    row("PIL decode, original files", "decode_orig", n)
    row("PIL decode, re-encoded (default)", "decode_stored", n, baseline="decode_orig")

    report.notes += [
        f"{n} files, {sum(map(len, datas)) / 1e6:.1f} MB; re-encoded (default) images take "
        f"{sum(map(len, stored)) / 1e6:.1f} MB; {n_qual} files qualify to be kept unchanged under --keep-original "
        f"(baseline YCbCr JPEG, longer side <= {default.max_side}, no rotation), the rest are re-encoded",
        "shards: " + (f"{cfg.shard_samples} samples each" if cfg.shard_samples
                      else "one per worker (files / workers samples each)") + "; "
        "shard times are the whole call (listing, planning, worker start-up, fsync of every shard, manifest), files "
        "in the page cache; `tar -cf` does not fsync; ratio = seconds / baseline_s; cpu_s = CPU seconds of this "
        "process and its children (tar, workers), in 10 ms ticks",
        "baselines: re-encode -> decode+encode time on 1 core / workers; --keep-original -> tar -cf of the same "
        "files; decode of re-encoded -> decode of the originals; ratio_after_startup subtracts the measured worker "
        "start-up (a fixed cost per run that a real data set amortises)",
        f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (other processes on the "
        "machine compete for its cores)",
    ]
    return report
