"""`./launch.sh shard SRC OUT [options]` and `./launch.sh shard --verify OUT [--decode]`.

Thin CLI over pipeline.shards.sharding / pipeline.shards.verify: parses arguments into a ShardConfig, shows a rich progress bar
(files/s, MB/s, ETA) and prints a summary table. Exit status (README "Exit codes"): 0 done, 1 the run's verdict
(skipped inputs under --strict, a failed verification), 2 bad input or environment (refused OUT, bad arguments or
labels, an incomplete tar, a full disk, a worker killed), 130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pipeline.shards.imageproc import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_QUALITY, ImageConfig
from pipeline.shards.shard_format import ShardFormatError, load_manifest
from pipeline.shards.sharding import (
    ShardConfig,
    ShardingError,
    ShardRunResult,
    build_plan,
    default_workers,
    run_sharding,
)
from pipeline.shards.sources import SourceError
from pipeline.shards.val_labels import FORMATS, LabelsError
from pipeline.shards.verify import VerifyReport, verify

LIST_LIMIT = 20
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500M', '1G', '1.5GiB', '1000000' -> bytes (K/M/G/T are powers of 1000, KiB/MiB/... of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 500M, 1G, 1GiB or a number of bytes")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./launch.sh shard",
        usage="./launch.sh shard SRC OUT [options]\n       ./launch.sh shard --verify OUT [--decode]",
        description="Shard an ImageFolder tree, ILSVRC2012_img_train.tar (read in place), a tar of an ImageFolder "
        "tree, or validation images plus --labels into indexed WebDataset shards (docs/sharding.md).",
    )
    p.add_argument("paths", nargs="+", metavar="SRC OUT", help="source and output folder (with --verify: OUT only)")
    g = p.add_argument_group("input")
    g.add_argument("--split", default="train", metavar="NAME", help="split name in shard file names and _info.json (default: train)")
    g.add_argument("--name", default="", metavar="NAME", help="data set name in shard file names (default: SRC's base name)")
    g.add_argument("--labels", metavar="FILE", help="validation labels: devkit ground truth (+meta.mat) or devkit .tar.gz, Caffe "
                   "val.txt, Kaggle LOC_val_solution.csv, or one wnid per line; SRC is then a flat folder or tar")
    g.add_argument("--labels-format", default="auto", choices=("auto", *FORMATS), help="default: detected")
    g.add_argument("--meta", metavar="FILE", help="the devkit's meta.mat (default: beside the ground-truth file)")
    g.add_argument("--class-map", metavar="DIR|FILE", help="reuse a class map: the train split's OUT folder (or its manifest.json), or "
                   "a text file of 'wnid [name]' lines in index order")
    g = p.add_argument_group("output")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--shard-samples", type=int, default=1000, metavar="N", help="samples per shard (default: 1000)")
    size.add_argument("--shard-size", type=parse_size, metavar="SIZE", help="shard size in SOURCE bytes (e.g. 500M); planned from "
                      "the source file sizes, so re-encoded shards come out smaller")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the global shuffle (default: 0)")
    g.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PX", help=f"longer side after downscaling "
                   f"(default: {DEFAULT_MAX_SIDE}; never enlarged)")
    g.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q", help=f"JPEG quality (default: {DEFAULT_QUALITY})")
    g.add_argument("--keep-original", action="store_true", help="store baseline RGB JPEGs within --max-side "
                   "without rotation unchanged; re-encode only the rest")
    g.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N", help="skip inputs "
                   f"whose header declares more pixels (decompression-bomb guard; default: {DEFAULT_MAX_PIXELS:,})")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=positive_int, default=default_workers(), metavar="N",
                   help="processes (default: all cores)")
    g.add_argument("--strict", action="store_true", help="exit 1 when any input was skipped")
    g.add_argument("--overwrite", action="store_true", help="replace what another command wrote to OUT")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (summary only)")
    g = p.add_argument_group("verify")
    g.add_argument("--verify", action="store_true", help="re-read OUT and check it against its manifest")
    g.add_argument("--decode", action="store_true", help="with --verify: also decode every image")
    return p


class _RateColumn(ProgressColumn):
    """Items or bytes per second processed by this run (a resumed run's earlier shards do not count)."""

    def __init__(self, field: str, unit: str, scale: float):
        super().__init__()
        self.field, self.unit, self.scale = field, unit, scale

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.fields.get(self.field, 0) / self.scale / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} {self.unit}" if rate >= 10 else f"{rate:.1f} {self.unit}", style="progress.data.speed")


class RichProgress:
    """The ProgressSink of pipeline.shards.sharding as a rich progress bar."""

    def __init__(self, console: Console, description: str, unit: str, enabled: bool = True):
        self.description, self.unit = description, unit
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn("run_files", f"{unit}/s", 1),
            _RateColumn("run_bytes", "MB/s", 1e6),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()

    def start(self, total_files: int, total_bytes: int, done_files: int, done_bytes: int) -> None:
        # Called once the workers exist: rich's refresh thread must not be running when they are forked.
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=total_files, completed=done_files,
                                           run_files=0, run_bytes=0)

    def advance(self, files: int, nbytes: int) -> None:
        t = self.progress.tasks[self.task]
        self.progress.update(self.task, advance=files, run_files=t.fields["run_files"] + files,
                             run_bytes=t.fields["run_bytes"] + nbytes)


@contextlib.contextmanager
def _status(console: Console, text: str):
    """A spinner whose refresh thread has ended on exit (rich only signals it): workers forked next need a
    process without other threads (pipeline.shards.sharding.worker_start_method)."""
    before = set(threading.enumerate())
    with console.status(text, spinner="dots"):
        yield
    for thread in set(threading.enumerate()) - before:
        thread.join()


def _config(args: argparse.Namespace, src: str, out: str) -> ShardConfig:
    return ShardConfig(
        src=src, out=out, split=args.split, name=args.name, labels=args.labels, labels_format=args.labels_format,
        meta=args.meta, class_map=args.class_map, shard_samples=args.shard_samples, shard_size=args.shard_size,
        seed=args.seed, workers=args.workers, strict=args.strict, overwrite=args.overwrite,
        image=ImageConfig(max_side=args.max_side, quality=args.quality, keep_original=args.keep_original,
                          max_pixels=args.max_pixels),
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_summary(console: Console, cfg: ShardConfig, result: ShardRunResult) -> None:
    m, t = result.manifest, result.manifest.totals
    table = Table(title=escape(f"{cfg.out}: {m.name} {m.split}"), show_header=False)
    table.add_column(justify="left", style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("source", escape(f"{m.source} ({m.options.get('source_kind')})"))
    table.add_row("classes", f"{m.num_classes}")
    if result.already_complete:
        status = "already complete"
    elif result.repaired:
        status = f"{len(result.repaired)} missing or cut short, written again"
    else:
        status = f"{result.shards_written} written" + (
            f", {result.shards_resumed} from the interrupted run" if result.shards_resumed else "")
    table.add_row("shards", f"{t['shards']} ({status})")
    table.add_row("inputs", f"{t['inputs']:,}")
    table.add_row("written", f"{t['written']:,}")
    table.add_row("skipped", f"{t['skipped']:,}", style="red" if t["skipped"] else None)
    table.add_row("inputs = written + skipped", "yes" if t["inputs"] == t["written"] + t["skipped"] else "NO")
    table.add_row("converted", f"{t['converted']:,}")
    table.add_row("re-encoded / kept original / resized", f"{t['reencoded']:,} / {t['kept_original']:,} / {t['resized']:,}")
    table.add_row("source bytes -> shard bytes", f"{_mb(t['source_bytes'])} -> {_mb(t['shard_bytes'])}")
    if result.seconds > 0 and result.files_processed:
        table.add_row("time", f"{result.seconds:.1f} s")
        table.add_row("files/s, MB/s (this run)", f"{result.files_processed / result.seconds:,.0f}, "
                      f"{result.bytes_processed / 1e6 / result.seconds:,.1f}")
    console.print(table)
    if result.removed:
        console.print(f"[bold]--overwrite deleted[/] {len(result.removed)} files an earlier run had written:")
        for name in result.removed[:LIST_LIMIT]:
            console.print(f"  {name}", markup=False, highlight=False, soft_wrap=True)
        if len(result.removed) > LIST_LIMIT:
            console.print(f"  ... {len(result.removed) - LIST_LIMIT} more")
    if result.repaired:
        console.print(f"[bold]written again[/] (missing or cut short; each equal to what manifest.json lists): "
                      f"{escape(', '.join(result.repaired[:LIST_LIMIT]))}"
                      + (f" ... {len(result.repaired) - LIST_LIMIT} more" if len(result.repaired) > LIST_LIMIT else ""),
                      highlight=False, soft_wrap=True)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for title, items in (("skipped", m.skipped), ("converted", m.converted)):
        if items:
            console.print(f"[bold]{title}[/] ({len(items)}, all listed in manifest.json):")
            for s in items[:LIST_LIMIT]:
                console.print(f"  {s['src']}: {s['reason']}", markup=False, highlight=False, soft_wrap=True)
            if len(items) > LIST_LIMIT:
                console.print(f"  ... {len(items) - LIST_LIMIT} more")


def print_verify(console: Console, report: VerifyReport, decode: bool) -> None:
    table = Table(title=escape(f"verify {report.folder}"), show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("shards", f"{report.shards:,}")
    table.add_row("samples", f"{report.samples:,}")
    table.add_row("member bytes", _mb(report.bytes))
    table.add_row("decoded", f"{report.decoded:,}" if decode else "not asked (--decode)")
    table.add_row("problems", f"{len(report.problems):,}", style="red" if report.problems else "green")
    console.print(table)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for p in report.problems[:100]:
        console.print(f"[red]problem:[/] {escape(str(p))}", highlight=False, soft_wrap=True)
    if len(report.problems) > 100:
        console.print(f"... {len(report.problems) - 100} more problems")
    console.print("[green]OK[/]" if report.ok else "[red]FAILED[/]: delete the shards listed and re-run the shard "
                  "command that wrote them (manifest.json's \"command\"): it writes them again; or re-shard the whole "
                  "split with --overwrite")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=False)
    err = Console(stderr=True)
    progress_on = not args.no_progress and console.is_terminal
    if args.verify:
        if len(args.paths) != 1:
            parser.error("--verify takes one folder: ./launch.sh shard --verify OUT [--decode]")
        try:
            load_manifest(args.paths[0])  # no folder or no manifest.json: a wrong argument, not a failed check
        except FileNotFoundError as e:
            err.print(f"shard: error: {e}", markup=False, highlight=False, soft_wrap=True)
            return 2
        except ShardFormatError:
            pass  # a damaged manifest is a finding of the verification
        try:
            with RichProgress(console, "verifying", "samples", progress_on) as progress:
                report = verify(args.paths[0], decode=args.decode, workers=args.workers, progress=progress)
        except (ShardingError, OSError) as e:  # e.g. a verification worker killed by the out-of-memory killer
            err.print(f"shard: error: {e}", markup=False, highlight=False, soft_wrap=True)
            return 2
        print_verify(console, report, args.decode)
        return 0 if report.ok else 1
    if args.decode:
        parser.error("--decode only applies with --verify")
    if len(args.paths) != 2:
        parser.error("give SRC and OUT: ./launch.sh shard SRC OUT [options]")
    try:
        cfg = _config(args, *args.paths)
        t0 = time.perf_counter()
        with _status(console, "listing the source and planning shards") if progress_on else contextlib.nullcontext():
            plan = build_plan(cfg)
        console.print(f"{plan.source_kind} source: planned {sum(len(s) for s in plan.shards):,} inputs "
                      f"({len(plan.skipped):,} skipped while listing) into {len(plan.shards):,} shards, "
                      f"{len(plan.classes):,} classes, in {time.perf_counter() - t0:.1f} s", highlight=False,
                      soft_wrap=True)
        with RichProgress(console, "sharding", "files", progress_on) as progress:
            result = run_sharding(cfg, progress, plan=plan)
    except (ShardingError, SourceError, LabelsError, ValueError, OSError) as e:
        # OSError: a full disk (DiskFullError says where and how much), a missing or unreadable file.
        err.print(f"shard: error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("shard: interrupted; completed shards are kept: re-run the same command to resume")
        return 130
    print_summary(console, cfg, result)
    totals = result.manifest.totals
    if not totals["written"]:
        err.print(f"shard: error: no image was written: all {totals['skipped']:,} inputs were skipped (the reasons are "
                  f"listed above and in {cfg.out / 'manifest.json'}); check SRC", markup=False, soft_wrap=True)
        return 2
    if cfg.strict and result.manifest.totals["skipped"]:
        err.print(f"shard: {result.manifest.totals['skipped']} inputs were skipped and --strict was given", markup=False,
                  soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
