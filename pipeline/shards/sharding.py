"""The sharding library behind `./launch.sh shard SRC OUT`: plan, write shards in parallel, resume, manifest.

    plan     enumerate the source (pipeline.shards.sources), label every input (folder name or pipeline.shards.val_labels),
             number the inputs in sorted order (the number makes each sample key unique), order them by a keyed
             hash of (seed, path) -- a global shuffle that needs no RNG, so it is the same on every Python and
             NumPy -- and cut that order into shards by count (`shard_samples`) or by source bytes (`shard_size`:
             re-encoded sizes are unknown before encoding, so boundaries come from the source file sizes).
    write    each shard is one task: one worker process reads its inputs by seeking (tar-of-tars included),
             converts them (pipeline.shards.imageproc) and writes the shard and its DALI index with ShardWriter (temporary
             names, renamed when complete). A shard's bytes depend only on its inputs, never on which worker or
             how many workers wrote it. A worker holds one image at a time; the main process holds the plan.
             Whatever one input raises skips that input (listed with the exception); a worker that dies (the
             out-of-memory killer) stops the run with the shard it was writing named, and a re-run resumes.
    record   when a shard is renamed into place its record (sha256, counts, skipped and converted inputs) goes back
             to the main process, which appends it as one line to OUT/.shard-state/journal.jsonl; a shard counts as
             done when its journal line and its files exist (a line torn by a kill is ignored: the shard is redone).
    finish   manifest.json and _info.json are assembled from the records (no timestamps, no worker count: a killed
             and resumed run ends with the same bytes as an uninterrupted one) and the state folder is removed.

OUT/.shard-state/plan.json records the run's fingerprint (source, its listing digest, every option that changes
the output, encoder versions): re-running the same command resumes, a different one refuses unless `overwrite`,
which deletes only what an earlier run recorded writing (its manifest, journal and plan name the files).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.fileio import atomic_write_json, disk_full_error, folder_problem, fsync_dir, is_disk_full
from pipeline.shards.imageproc import ImageConfig, ImageSkip, encoder_versions, process_image
from pipeline.shards.shard_format import (
    MANIFEST_NAME,
    MAX_KEY_LEN,
    TIMM_INFO_NAME,
    ClassEntry,
    Manifest,
    ShardFormatError,
    ShardRecord,
    ShardWriter,
    image_checksum,
    load_manifest,
    shard_filenames,
    shard_files_problem,
    timm_info,
)
from pipeline.shards.sources import ItemRef, SourceListing, open_source, read_item
from pipeline.shards.val_labels import FORMATS as LABEL_FORMATS
from pipeline.shards.val_labels import ValLabels, image_stem, load_class_map, load_val_labels

# 1.1: per-sample crc32 instead of sha256 in KEY.json. 1.2: format allow-list, --max-pixels, corrupt JPEG data
# skipped, large 16-bit/alpha images shrunk before conversion.
TOOL_VERSION = "1.2"
STATE_DIR = ".shard-state"
PLAN_NAME = "plan.json"
JOURNAL_NAME = "journal.jsonl"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHARD_FILE_RE = re.compile(r"^.+-.+-\d{6}\.(tar|idx)$")
TMP_FILE_RE = re.compile(r"^\..+\.\d+\.tmp$")
_KEY_STEM_LEN = 64
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class ShardingError(RuntimeError):
    """The run cannot proceed (refused OUT, failed shard, bad labels); the message says what to do."""


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class ShardConfig:
    """Everything a sharding run depends on. `name` defaults to SRC's base name (without `.tar`)."""

    src: Path
    out: Path
    split: str = "train"
    name: str = ""
    labels: Path | None = None
    labels_format: str = "auto"
    meta: Path | None = None
    class_map: Path | None = None
    shard_samples: int = 1000
    shard_size: int | None = None
    seed: int = 0
    image: ImageConfig = field(default_factory=ImageConfig)
    workers: int = field(default_factory=default_workers)
    strict: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for f in ("src", "out", "labels", "meta", "class_map"):
            value = getattr(self, f)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, f, Path(value))
        if not self.name:
            base = self.src.name[: -len(".tar")] if self.src.name.endswith(".tar") else self.src.name
            object.__setattr__(self, "name", base)
        for f in ("name", "split"):
            if not NAME_RE.match(getattr(self, f)):
                raise ValueError(
                    f"{f} {getattr(self, f)!r} is not usable in shard file names: use letters, digits, '.', '_' "
                    f"or '-' (pass --{f})"
                )
        if not isinstance(self.shard_samples, int) or self.shard_samples < 1:
            raise ValueError(f"shard_samples must be an int >= 1, got {self.shard_samples!r}")
        if self.shard_size is not None and (not isinstance(self.shard_size, int) or self.shard_size < 1):
            raise ValueError(f"shard_size must be a positive number of bytes, got {self.shard_size!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.labels_format not in ("auto", *LABEL_FORMATS):
            raise ValueError(f"labels_format must be auto or one of {', '.join(LABEL_FORMATS)}, got {self.labels_format!r}")
        if self.meta is not None and self.labels is None:
            raise ValueError("meta (meta.mat) only applies with labels (the devkit ground truth)")


# ----------------------------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True, slots=True)
class PlannedItem:
    key: str
    rel: str
    wnid: str
    label: int
    ref: ItemRef


@dataclass
class Plan:
    """The shards to write. Holds only what the run needs (the source listing itself is dropped: ImageNet's
    1.28 M inputs cost about 0.5 KB each here)."""

    source_kind: str
    classes: list[ClassEntry]
    shards: list[list[PlannedItem]]
    skipped: list[dict[str, str]]  # inputs that never reach a worker (links, no class folder, no label)
    warnings: list[str]
    fingerprint: dict[str, Any]

    @property
    def num_inputs(self) -> int:
        return sum(len(s) for s in self.shards) + len(self.skipped)


def sample_key(rel: str, number: int) -> str:
    """Unique, valid key: the sanitised file stem (no dots or spaces) plus the input's number in sorted order."""
    stem = _UNSAFE_KEY_CHARS.sub("_", image_stem(rel)).strip("_-")[:_KEY_STEM_LEN] or "img"
    key = f"{stem}-{number:08d}"
    assert len(key) <= MAX_KEY_LEN
    return key


def shuffle_order(rels: list[str], seed: int) -> list[int]:
    """Global shuffle as a sort by keyed hash: depends only on (seed, path), identical on every platform."""
    salt = seed.to_bytes(8, "little")
    return sorted(range(len(rels)), key=lambda i: hashlib.blake2b(rels[i].encode(), digest_size=8, key=salt).digest())


def cut_shards(sizes: list[int], order: list[int], shard_samples: int, shard_size: int | None) -> list[list[int]]:
    """Consecutive runs of `order`: `shard_samples` inputs each, or (with `shard_size`) as many as fit in that many
    source bytes (at least one per shard)."""
    if shard_size is None:
        return [order[i : i + shard_samples] for i in range(0, len(order), shard_samples)]
    shards, cur, cur_bytes = [], [], 0
    for i in order:
        if cur and cur_bytes + sizes[i] > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += sizes[i]
    if cur:
        shards.append(cur)
    return shards


def _resolve_classes(
    cfg: ShardConfig, listing: SourceListing, labels: ValLabels | None, class_map: list[ClassEntry] | None
) -> tuple[list[ClassEntry], list[str]]:
    warnings = []
    if class_map is not None:
        known = {c.wnid for c in class_map}
        found = set(listing.groups) if listing.labelled_by_folder else labels.wnids()
        unknown = sorted(found - known)
        if unknown:
            what = "class folders" if listing.labelled_by_folder else f"wnids in {labels.origin}"
            raise ShardingError(
                f"{len(unknown)} {what} are not in --class-map {cfg.class_map} (e.g. {', '.join(unknown[:5])}); "
                "give the class map of the same data set"
            )
        names = {c.wnid: c.name for c in (labels.classes or [])} if labels else {}
        return [ClassEntry(c.index, c.wnid, c.name or names.get(c.wnid)) for c in class_map], warnings
    if listing.labelled_by_folder:
        return [ClassEntry(i, g) for i, g in enumerate(listing.groups)], warnings
    if labels.classes is not None:
        return list(labels.classes), warnings
    warnings.append(
        f"class indices come from the sorted wnids of {labels.origin}; pass --class-map TRAIN_OUT so that they "
        "agree with the train split"
    )
    return [ClassEntry(i, w) for i, w in enumerate(sorted(labels.wnids()))], warnings


def _labels_for(cfg: ShardConfig, listing: SourceListing, labels: ValLabels | None) -> list[str | None]:
    if labels is None:
        return [it.group for it in listing.items]
    if labels.in_order is not None:
        if len(labels.in_order) != len(listing.items):
            raise ShardingError(
                f"{labels.origin} lists {len(labels.in_order)} wnids but {cfg.src} holds {len(listing.items)} files; "
                "one wnid per line must match the images in sorted file-name order"
            )
        return list(labels.in_order)
    return [labels.by_stem.get(image_stem(it.rel)) for it in listing.items]


def check_out(out: Path) -> None:
    """OUT is a folder that can be written (or can be created: its nearest existing parent is a writable folder)."""
    problem = folder_problem(out)
    if problem:
        raise ShardingError(f"OUT {out}: {problem}; choose a folder you can write (it is created if missing)")


def build_plan(cfg: ShardConfig) -> Plan:
    """Enumerate, label, number, shuffle and cut the source into shards; nothing is written."""
    check_out(cfg.out)
    src, out = cfg.src.resolve(), cfg.out.resolve()
    if src.is_dir() and (out == src or src in out.parents):
        raise ShardingError(f"OUT {cfg.out} is inside SRC {cfg.src}: the shards would become inputs; choose another OUT")
    listing = open_source(cfg.src, flat=cfg.labels is not None)
    if listing.labelled_by_folder and not listing.items and listing.skipped:
        raise ShardingError(
            f"{cfg.src} has no files inside class folders ({len(listing.skipped)} files at its top level): "
            "for validation images pass --labels FILE; for training data point SRC at the folder of class folders"
        )
    class_map = load_class_map(cfg.class_map) if cfg.class_map else None
    labels = (
        load_val_labels(cfg.labels, cfg.labels_format, cfg.meta, class_map) if cfg.labels is not None else None
    )
    classes, warnings = _resolve_classes(cfg, listing, labels, class_map)
    index_of = {c.wnid: c.index for c in classes}
    wnids = _labels_for(cfg, listing, labels)

    skipped = [{"src": s.rel, "reason": s.reason} for s in listing.skipped]
    planned: list[PlannedItem] = []
    for number, (item, wnid) in enumerate(zip(listing.items, wnids, strict=True)):
        if wnid is None:
            skipped.append({"src": item.rel, "reason": f"no label for this image in {labels.origin}"})
            continue
        planned.append(PlannedItem(sample_key(item.rel, number), item.rel, wnid, index_of[wnid], item.ref))
    if not planned:
        examples = "; ".join(f"{s['src']}: {s['reason']}" for s in skipped[:3])
        raise ShardingError(
            f"none of the {len(skipped)} inputs of {cfg.src} can be sharded ({examples}"
            + (" ..." if len(skipped) > 3 else "") + "): check SRC" + (" and --labels" if labels is not None else ""))
    if labels is not None and labels.by_stem is not None:
        unused = len(set(labels.by_stem) - {image_stem(it.rel) for it in listing.items})
        if unused:
            warnings.append(f"{unused} images labelled in {labels.origin} are not in {cfg.src}")
    present = Counter(p.wnid for p in planned)
    empty = [c.wnid for c in classes if not present[c.wnid]]
    if empty:
        warnings.append(
            f"{len(empty)} classes have no inputs but keep their index: {', '.join(empty[:10])}"
            + (" ..." if len(empty) > 10 else "")
        )

    order = shuffle_order([p.rel for p in planned], cfg.seed)
    shard_ids = cut_shards([p.ref.size for p in planned], order, cfg.shard_samples, cfg.shard_size)
    shards = [[planned[i] for i in ids] for ids in shard_ids]
    fingerprint = _fingerprint(cfg, listing, labels, classes, planned, skipped, len(shards))
    return Plan(listing.kind, classes, shards, skipped, warnings, fingerprint)


def _fingerprint(cfg, listing, labels, classes, planned, skipped, num_shards) -> dict[str, Any]:
    """What decides the output bytes; equal fingerprints mean a resumed run continues the same output."""
    digest = hashlib.sha256()
    for p in planned:
        digest.update(f"{p.rel}\0{p.ref.size}\0{p.label}\n".encode())
    for s in skipped:
        digest.update(f"{s['src']}\0{s['reason']}\n".encode())
    digest.update(json.dumps([[c.index, c.wnid, c.name] for c in classes]).encode())
    return {
        "source": str(cfg.src.resolve()),
        "tool_version": TOOL_VERSION,
        "options": {
            "name": cfg.name,
            "split": cfg.split,
            "seed": cfg.seed,
            "shard_samples": None if cfg.shard_size else cfg.shard_samples,
            "shard_size": cfg.shard_size,
            "max_side": cfg.image.max_side,
            "quality": cfg.image.quality,
            "keep_original": cfg.image.keep_original,
            "max_pixels": cfg.image.max_pixels,
            "labels": str(cfg.labels.resolve()) if cfg.labels else None,
            "labels_format": labels.format if labels else None,
            "meta": str(cfg.meta.resolve()) if cfg.meta else None,
            "class_map": str(cfg.class_map.resolve()) if cfg.class_map else None,
            "source_kind": listing.kind,
            "source_listing_sha256": digest.hexdigest(),
            "num_shards_planned": num_shards,
            "encoder_versions": encoder_versions(),
        },
    }


def canonical_command(fingerprint: dict[str, Any]) -> list[str]:
    """The command that reproduces the output, without the output folder (the manifest lives in it)."""
    o = fingerprint["options"]
    cmd = ["./launch.sh", "shard", fingerprint["source"], "--split", o["split"], "--name", o["name"]]
    cmd += ["--seed", str(o["seed"])]
    cmd += ["--shard-size", str(o["shard_size"])] if o["shard_size"] else ["--shard-samples", str(o["shard_samples"])]
    cmd += ["--max-side", str(o["max_side"]), "--quality", str(o["quality"])]
    if o.get("max_pixels") is not None:
        cmd += ["--max-pixels", str(o["max_pixels"])]
    if o["keep_original"]:
        cmd.append("--keep-original")
    for opt in ("labels", "meta", "class_map"):
        if o[opt]:
            cmd += [f"--{opt.replace('_', '-')}", o[opt]]
    if o["labels_format"]:
        cmd += ["--labels-format", o["labels_format"]]
    return cmd


# ----------------------------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class ShardTask:
    folder: Path
    name: str
    split: str
    index: int
    items: list[PlannedItem]
    image: ImageConfig


class WorkerProgress:
    """Batches (files, bytes) progress from a worker to the main process, at most ~10 messages per second."""

    sink: Callable[[tuple[int, int]], None] | None = None

    def __init__(self) -> None:
        self.files = self.nbytes = 0
        self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.files += 1
        self.nbytes += nbytes
        if time.monotonic() - self.last > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.files and WorkerProgress.sink is not None:
            WorkerProgress.sink((self.files, self.nbytes))
        self.files = self.nbytes = 0
        self.last = time.monotonic()


def _init_worker(progress_queue, parent_pid: int, parent_only_fds: tuple[int, ...]) -> None:
    WorkerProgress.sink = progress_queue.put
    # A forked worker starts with the parent's descriptors and signal handlers (a trainer's SIGTERM/SIGUSR1
    # checkpoint handlers, say): the lock on OUT must not outlive the parent in a worker, and signals act as they
    # do on a fresh interpreter (a spawned worker).
    for fd in parent_only_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)
    # When the main process dies (kill -9), its workers must stop at once instead of writing on beside a resumed
    # run. Linux: the kernel kills us with the parent; elsewhere (or if that fails) a thread watches the parent.
    # A half-written temporary shard is left behind; the next run removes it.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.05)
    os._exit(1)


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard from its planned inputs; returns its record for the journal."""
    progress = WorkerProgress()
    skipped, converted = [], []
    stats = Counter()
    class_counts: Counter[int] = Counter()
    handles: dict = {}
    writer = ShardWriter(task.folder, task.name, task.split, task.index)
    try:
        for item in task.items:
            try:
                data = read_item(item.ref, handles)
            except OSError as e:
                skipped.append({"src": item.rel, "reason": f"cannot read ({e.strerror or e})"})
                progress.add(0)
                continue
            except Exception as e:  # anything else reading one input may raise costs that input only
                skipped.append({"src": item.rel, "reason": f"cannot read ({type(e).__name__}: {e})"})
                progress.add(0)
                continue
            stats["source_bytes"] += len(data)
            try:
                out = process_image(data, task.image)
            except ImageSkip as e:
                skipped.append({"src": item.rel, "reason": str(e)})
                progress.add(len(data))
                continue
            except Exception as e:
                # One input never stops a run: whatever a decoder raises on it (Pillow's plugins raise IndexError,
                # KeyError, TypeError, MemoryError, ... on hostile files) skips it, named with the exception.
                skipped.append({"src": item.rel, "reason": f"decoder failed ({type(e).__name__}: {e})"})
                progress.add(len(data))
                continue
            meta = {
                "src": item.rel,
                "wnid": item.wnid,
                "width": out.width,
                "height": out.height,
                "reencoded": out.reencoded,
                "crc32": image_checksum(out.jpeg),
            }
            writer.add_sample(item.key, out.jpeg, item.label, meta)
            if out.conversions:
                converted.append({"src": item.rel, "reason": "; ".join(out.conversions)})
            class_counts[item.label] += 1
            stats["reencoded" if out.reencoded else "kept_original"] += 1
            stats["resized"] += out.resized
            progress.add(len(data))
        record = writer.close() if writer.samples else None
        if record is None:
            writer.abort()
    except BaseException:
        writer.abort()
        raise
    finally:
        for f in handles.values():
            f.close()
        progress.flush()
    return {
        "index": task.index,
        "record": asdict(record) if record else None,
        "inputs": len(task.items),
        "skipped": skipped,
        "converted": converted,
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "stats": dict(sorted(stats.items())),
    }


# ----------------------------------------------------------------------------------------------------------------
# Running tasks in worker processes


class ProgressSink(Protocol):
    """Where `run_tasks` reports progress. `start` comes once the workers exist: a sink that runs a thread (a live
    display) starts it there, not before, so that the workers can be forked (`worker_start_method`)."""

    def start(self, total_files: int, total_bytes: int, done_files: int, done_bytes: int) -> None: ...

    def advance(self, files: int, nbytes: int) -> None: ...


class NullProgress:
    def start(self, total_files: int, total_bytes: int, done_files: int, done_bytes: int) -> None:
        pass

    def advance(self, files: int, nbytes: int) -> None:
        pass


def worker_start_method() -> str:
    """"fork" while this process runs no other Python thread, else "spawn".

    A forked worker starts in milliseconds; a spawned one re-imports this package (about 0.1 s, a fifth of the
    time two workers take to re-encode 500 ImageNet images). Forking is only safe without other threads (one could
    hold a lock the child then never sees released), so callers start threads -- a progress display -- after the
    workers exist (`run_tasks` calls `progress.start` then). Native threads (OpenMP, DALI) do not count: workers
    only run Pillow, zlib, hashlib and file I/O.
    """
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"


@contextlib.contextmanager
def _started_pool(workers: int, ctx, messages, parent_only_fds: tuple[int, ...]):
    """A process pool whose workers already exist; shut down (waiting for running tasks) on exit."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(messages, os.getpid(), parent_only_fds))
    try:
        if ctx.get_start_method() == "fork":
            # Objects the parent holds (ImageNet's plan: ~1.3 M items) stay shared copy-on-write only if the
            # workers' garbage collector never writes to their headers: freeze them out of its reach.
            gc.freeze()
            try:
                pool.submit(_noop).result()  # forks every worker (all at once, before the pool's own threads start)
            finally:
                gc.unfreeze()
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _noop() -> None:
    return None


def _tracked(fn: Callable, index: int, task: Any) -> Any:
    """Runs in a worker: tell the main process which task this worker (pid) runs, then run it."""
    if WorkerProgress.sink is not None:
        WorkerProgress.sink(("start", os.getpid(), index))
    return fn(task)


class _WorkerDied(Exception):
    """A worker process ended abruptly (the pool is broken); explained once the pool has shut down."""


def explain_worker_death(exitcode: int | None, what: str) -> str:
    """What to tell the user when the worker running `what` (e.g. "shard 3 (x-train-000003.tar)") died."""
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return (f"{what}: its worker process was killed by SIGKILL, most likely by the kernel's out-of-memory "
                    "killer (`dmesg` shows it): a worker holds one image at a time, but a huge image can need "
                    "several GB. Re-run the same command (finished shards are kept) with fewer --workers, or "
                    "lower --max-pixels to skip such images")
        return (f"{what}: its worker process died of {sig} (a crash while decoding one of its inputs, or a signal "
                "from outside); re-run the same command to resume (finished shards are kept); if it recurs at the "
                "same shard, report it with the command")
    return (f"{what}: its worker process exited unexpectedly (status {exitcode}); re-run the same command to resume "
            "(finished shards are kept)")


def run_tasks(
    fn: Callable,
    tasks: list,
    workers: int,
    progress: ProgressSink,
    describe: Callable[[Any], str],
    totals: tuple[int, int, int, int],
    on_result: Callable[[Any], None] | None = None,
    parent_only_fds: tuple[int, ...] = (),
) -> list:
    """fn(task) for every task, in `workers` processes (in this process for 1); results in task order.

    `progress.start(*totals)` is called once the workers exist (a display thread started earlier would make
    forking unsafe: see `worker_start_method`); workers report (files, bytes) through a queue to `progress`.
    `on_result(result)` runs in this process as each task finishes. A failing task stops the run with an error
    naming it (`describe(task)`); a worker that dies (the out-of-memory killer, a crash) is reported with the task
    it was running, the likely cause and what to do. Finished tasks keep their output, so a re-run continues.
    `parent_only_fds`: descriptors a forked worker closes (the lock on OUT).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    results: dict[int, Any] = {}

    def finished(i: int, result: Any) -> None:
        results[i] = result
        if on_result is not None:
            on_result(result)

    running: dict[int, int] = {}  # worker pid -> index of the task it last started

    def on_message(msg: tuple) -> None:
        if msg[0] == "start":
            running[msg[1]] = msg[2]
        else:
            progress.advance(*msg)

    if workers == 1 or len(tasks) <= 1:
        progress.start(*totals)
        WorkerProgress.sink = on_message
        try:
            for i, task in enumerate(tasks):
                try:
                    result = fn(task)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    raise ShardingError(f"{describe(task)} failed: {e}") from e
                finished(i, result)
        finally:
            WorkerProgress.sink = None
        return [results[i] for i in range(len(tasks))]

    ctx = mp.get_context(worker_start_method())
    # A SimpleQueue has no feeder thread: a put writes to the pipe at once (tiny messages, ~10 per second).
    messages = ctx.SimpleQueue()
    processes: dict[int, Any] = {}  # pid -> multiprocessing.Process, to read the exit status of one that died

    def drain() -> None:
        while not messages.empty():
            on_message(messages.get())

    try:
        with contextlib.closing(messages), _started_pool(min(workers, len(tasks)), ctx, messages,
                                                         parent_only_fds) as pool:
            progress.start(*totals)
            pending = {pool.submit(_tracked, fn, i, t): i for i, t in enumerate(tasks)}
            try:
                while pending:
                    processes.update(getattr(pool, "_processes", None) or {})
                    done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    drain()
                    for fut in done:
                        i = pending.pop(fut)
                        try:
                            result = fut.result()
                        except BrokenProcessPool as e:
                            raise _WorkerDied() from e
                        except Exception as e:
                            raise ShardingError(f"{describe(tasks[i])} failed: {e}") from e
                        finished(i, result)
            except BaseException:
                _wind_down(pending, drain, finished)
                raise
            drain()  # a worker's last message is in the pipe before its task's result
    except _WorkerDied as e:
        # The pool has shut down: every worker is joined and has its exit status.
        dead = sorted(((p.exitcode, pid) for pid, p in processes.items() if p.exitcode not in (None, 0)),
                      key=lambda t: (t[0] != -signal.SIGKILL, t[0] == -signal.SIGTERM))
        code, pid = dead[0] if dead else (None, None)
        what = describe(tasks[running[pid]]) if pid in running else "a worker"
        raise ShardingError(explain_worker_death(code, what)) from e.__cause__
    return [results[i] for i in range(len(tasks))]


def _wind_down(pending: dict, drain: Callable[[], None], finished: Callable[[int, Any], None]) -> None:
    """After a failure: cancel the tasks not started, let the running ones end and keep what they finish.

    Their progress messages must keep being read meanwhile: a worker blocks on a full pipe (64 KiB, about a
    thousand messages), and the pool's shutdown would then wait for it forever.
    """
    for fut in pending:
        fut.cancel()
    while pending:
        done, _ = wait(pending, timeout=0.1)
        drain()
        for fut in done:
            i = pending.pop(fut)
            if not fut.cancelled() and fut.exception() is None:
                finished(i, fut.result())


# ----------------------------------------------------------------------------------------------------------------
# The output folder: lock, refusal, resume state, clean-up


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    flat_old = {"source": old.get("source"), "tool_version": old.get("tool_version"), **old.get("options", {})}
    flat_new = {"source": new["source"], "tool_version": new["tool_version"], **new["options"]}
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in flat_new if flat_old.get(k) != flat_new[k]]


def _manifest_fingerprint(m: Manifest) -> dict[str, Any]:
    return {"source": m.source, "tool_version": m.tool_version, "options": m.options}


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on the OUT folder itself (no lock file to leave behind)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardingError(f"another shard run is writing {out}; wait for it or stop it first") from None
        yield fd
    finally:
        os.close(fd)


def _recorded_outputs(out: Path) -> list[Path]:
    """The files an earlier run of this tool recorded writing to `out`: the shards and indexes its manifest or
    journal lists and those its plan named, manifest.json and _info.json (when a manifest or plan shows a shard
    run), the state folder's files, and the tool's temporaries of those names. Nothing else."""
    names: set[str] = set()
    try:
        manifest, _ = load_manifest(out)
    except (ShardFormatError, FileNotFoundError, OSError, UnicodeDecodeError):
        manifest = None
    if manifest is not None:
        names |= {n for r in manifest.shards for n in (r.file, r.index)} | {MANIFEST_NAME, TIMM_INFO_NAME}
    state = out / STATE_DIR
    try:
        plan = json.loads((state / PLAN_NAME).read_text())
        o = plan["options"]
        names |= {n for i in range(int(o["num_shards_planned"])) for n in shard_filenames(o["name"], o["split"], i)}
        names |= {MANIFEST_NAME, TIMM_INFO_NAME}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with contextlib.suppress(OSError):
        for line in (state / JOURNAL_NAME).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                rec = json.loads(line).get("record") or {}
                names |= {rec["file"], rec["index"]}
    found = []
    for entry in out.iterdir() if out.is_dir() else ():
        tmp = TMP_FILE_RE.match(entry.name)
        base = entry.name[1:].rsplit(".", 2)[0] if tmp else entry.name
        if entry.is_file() and base in names and "/" not in base:
            found.append(entry)
    for entry in state.iterdir() if state.is_dir() else ():
        if entry.is_file() and (entry.name in (PLAN_NAME, JOURNAL_NAME) or TMP_FILE_RE.match(entry.name)):
            found.append(entry)
    return sorted(found)


def _clear_outputs(out: Path, recorded: list[Path]) -> list[str]:
    """Delete what an earlier run recorded writing to OUT (`_recorded_outputs`); returns their names."""
    removed = []
    for path in recorded:
        path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(out)))
    with contextlib.suppress(OSError):
        (out / STATE_DIR).rmdir()  # only when empty: a file the tool did not write stays, and so does its folder
    fsync_dir(out)
    return removed


def _remove_temporaries(out: Path) -> None:
    """Partly written files of a killed run (their writers are gone: we hold the lock)."""
    for folder in (out, out / STATE_DIR):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if TMP_FILE_RE.match(entry.name):
                entry.unlink(missing_ok=True)


def _refuse(out: Path, why: str) -> ShardingError:
    return ShardingError(f"{out} {why}; re-run with --overwrite to replace it, or choose another OUT")


def _prepare_out(cfg: ShardConfig, plan: Plan, removed: list[str]) -> bool | list[int]:
    """Check OUT against this run. True when OUT already holds its complete output; a list of shard numbers when
    it holds it except for those shards, whose files are missing or cut short (they are written again); False for
    a run to start or resume. Caller holds the lock. With `overwrite`, what an earlier run recorded writing is
    deleted first (its names appended to `removed`), once nothing else stands in the way: a refused run deletes
    nothing."""
    out = cfg.out
    plan_path = out / STATE_DIR / PLAN_NAME
    if cfg.overwrite:
        recorded = _recorded_outputs(out)
        ours = {str(p.relative_to(out)) for p in recorded}
        mine = {n for i in range(len(plan.shards)) for n in shard_filenames(cfg.name, cfg.split, i)}
        clash = sorted(n for n in mine | {MANIFEST_NAME, TIMM_INFO_NAME} if (out / n).exists() and n not in ours)
        if clash:
            raise ShardingError(f"{out} holds {', '.join(clash[:5])}, which this run would write, but no earlier "
                                "shard run recorded writing them (--overwrite deletes only what the tool wrote): "
                                "move them away or choose another OUT; nothing was deleted")
        removed += _clear_outputs(out, recorded)
    elif (out / MANIFEST_NAME).is_file():
        try:
            manifest, _ = load_manifest(out)
        except (ShardFormatError, FileNotFoundError) as e:
            raise _refuse(out, f"has an unreadable manifest ({e})") from e
        diff = _differences(_manifest_fingerprint(manifest), plan.fingerprint)
        # Another tool version with the same source and options wrote a complete, readable folder (the manifest
        # loaded, so its format version is supported): keep it rather than refuse. Its bytes are not this version's
        # (an unfinished run of another version is refused below: one folder must not mix the two).
        other_version = bool(diff) and all(d.startswith("tool_version:") for d in diff)
        if diff and not other_version:
            raise _refuse(out, "holds shards written by a different command (" + "; ".join(diff) + ")")
        damaged = _damaged_shards(cfg, plan, manifest)
        if damaged and other_version:
            raise _refuse(out, f"was written by tool version {manifest.tool_version} (this is {TOOL_VERSION}) and "
                               f"has missing or cut-short shards ({', '.join(sorted(damaged.values())[:3])}); "
                               "this version would write other bytes")
        if damaged:
            _remove_temporaries(out)
            return sorted(damaged)
        if other_version:
            plan.warnings.append(
                f"{out} is complete, written with the same options by tool version {manifest.tool_version} (this is "
                f"{TOOL_VERSION}): kept as it is; --overwrite re-shards it with this version"
            )
        return True
    elif plan_path.is_file():
        diff = _differences(json.loads(plan_path.read_text()), plan.fingerprint)
        if diff:
            raise _refuse(out, "holds an unfinished run of a different command (" + "; ".join(diff) + ")")
    else:
        others = sorted(e.name for e in out.iterdir() if e.name != STATE_DIR)
        if others:
            raise _refuse(out, f"is not empty and holds no shard run ({', '.join(others[:5])})")
    plan_path.parent.mkdir(exist_ok=True)
    _remove_temporaries(out)
    atomic_write_json(plan_path, plan.fingerprint, what="run plan")
    return False


def _damaged_shards(cfg: ShardConfig, plan: Plan, manifest: Manifest) -> dict[int, str]:
    """{shard number: file} of the manifest's shards whose tar or index is missing or has another size than
    listed (the loaders' start-up check); a re-run of the same command writes those shards again. A shard whose
    files have the right sizes but other bytes (`shard --verify` finds it) is repaired the same way once its
    files are deleted."""
    number = {shard_filenames(cfg.name, cfg.split, i)[0]: i for i in range(len(plan.shards))}
    damaged = {}
    for rec in manifest.shards:
        if rec.file not in number:  # cannot happen for the same fingerprint; refuse rather than guess
            raise _refuse(cfg.out, f"lists {rec.file}, which this command does not write")
        if shard_files_problem(rec, cfg.out):
            damaged[number[rec.file]] = rec.file
    return damaged


def _repair(cfg: ShardConfig, plan: Plan, manifest: Manifest, numbers: list[int], progress: ProgressSink,
            lock_fd: int) -> list[str]:
    """Write shards `numbers` again; each must come out byte for byte as the manifest lists it (the output is
    deterministic), else the source changed since the manifest was written: the new files are removed and the
    run refused. Returns the shard files written."""
    records = {r.file: r for r in manifest.shards}
    tasks = [ShardTask(cfg.out, cfg.name, cfg.split, i, plan.shards[i], cfg.image) for i in numbers]
    totals = (sum(len(t.items) for t in tasks), sum(it.ref.size for t in tasks for it in t.items), 0, 0)
    parts = run_tasks(write_shard, tasks, cfg.workers, progress, _describe, totals, parent_only_fds=(lock_fd,))
    changed = []
    for task, part in zip(tasks, parts, strict=True):
        name = shard_filenames(cfg.name, cfg.split, task.index)[0]
        if part["record"] is None or ShardRecord.from_dict(part["record"]) != records[name]:
            changed.append(name)
    if changed:
        for task in tasks:
            for f in shard_filenames(cfg.name, cfg.split, task.index):
                (cfg.out / f).unlink(missing_ok=True)
        fsync_dir(cfg.out)
        raise ShardingError(
            f"{cfg.out}: {', '.join(changed[:3])} came out different from what manifest.json lists when written "
            "again: the source has changed since the manifest was written; re-shard the split with --overwrite")
    fsync_dir(cfg.out)
    return [shard_filenames(cfg.name, cfg.split, t.index)[0] for t in tasks]


class _Journal:
    """OUT/.shard-state/journal.jsonl: one line per completed shard, appended by the main process only.

    A line is flushed (not fsynced) as soon as its shard is in place: a kill loses nothing written, and after a
    power loss a missing or torn line only means that shard is written again.
    """

    def __init__(self, out: Path):
        self.path = out / STATE_DIR / JOURNAL_NAME
        self._file = None

    def completed(self, tasks: list[ShardTask]) -> dict[int, dict[str, Any]]:
        """Records of the shards an earlier run completed whose files are still there with their sizes."""
        if not self.path.is_file():
            return {}
        folder = self.path.parent.parent
        parts = {}
        for line in self.path.read_text().splitlines():
            try:
                part = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill
            rec = part.get("record")
            if rec is None or all(
                (folder / f).is_file() and (folder / f).stat().st_size == size
                for f, size in ((rec["file"], rec["bytes"]), (rec["index"], rec["index_bytes"]))
            ):
                parts[part["index"]] = part
        valid = {t.index for t in tasks}
        return {i: p for i, p in parts.items() if i in valid}

    def append(self, part: dict[str, Any]) -> None:
        try:
            if self._file is None:
                torn = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
                if torn:  # end the torn line so that it stays one bad line instead of spoiling the next
                    self._file.write("\n")
            self._file.write(json.dumps(part) + "\n")
            self._file.flush()
        except OSError as e:
            if is_disk_full(e):
                # The shard itself is in place; without its journal line a re-run writes it again.
                raise disk_full_error(self.path, "the shard journal", cause=e) from e
            raise

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk was reported by append
                self._file.close()
            self._file = None


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class ShardRunResult:
    manifest: Manifest
    warnings: list[str]
    already_complete: bool
    shards_written: int  # by this run
    shards_resumed: int  # completed by an earlier, interrupted run
    seconds: float
    files_processed: int  # by this run
    bytes_processed: int  # source bytes read by this run
    removed: list[str] = field(default_factory=list)  # files of an earlier run deleted by --overwrite
    repaired: list[str] = field(default_factory=list)  # shards of a complete folder written again (missing, cut)


def _assemble(cfg: ShardConfig, plan: Plan, parts: list[dict[str, Any]]) -> Manifest:
    counts: Counter[int] = Counter()
    stats: Counter[str] = Counter()
    skipped = list(plan.skipped)
    converted = []
    for part in parts:
        counts.update({int(k): v for k, v in part["class_counts"].items()})
        stats.update(part["stats"])
        skipped += part["skipped"]
        converted += part["converted"]
    records = [ShardRecord.from_dict(p["record"]) for p in parts if p["record"]]
    written = sum(r.samples for r in records)
    totals = {
        "inputs": plan.num_inputs,
        "written": written,
        "skipped": len(skipped),
        "converted": len(converted),
        "reencoded": stats["reencoded"],
        "kept_original": stats["kept_original"],
        "resized": stats["resized"],
        "source_bytes": stats["source_bytes"],
        "shard_bytes": sum(r.bytes for r in records),
        "shards": len(records),
    }
    if totals["inputs"] != written + len(skipped):
        raise ShardingError(
            f"counts do not reconcile: {totals['inputs']} inputs but {written} written + {len(skipped)} skipped; "
            "this is a bug: please report it with the command"
        )
    classes = [ClassEntry(c.index, c.wnid, c.name, samples=counts[c.index]) for c in plan.classes]
    return Manifest(
        name=cfg.name,
        split=cfg.split,
        source=plan.fingerprint["source"],
        command=canonical_command(plan.fingerprint),
        options=plan.fingerprint["options"],
        classes=classes,
        shards=records,
        totals=totals,
        # Rebuilt entry by entry: fresh and journal-loaded records must serialise identically.
        skipped=[{"src": e["src"], "reason": e["reason"]} for e in sorted(skipped, key=lambda e: e["src"])],
        converted=[{"src": e["src"], "reason": e["reason"]} for e in sorted(converted, key=lambda e: e["src"])],
        tool_version=TOOL_VERSION,
    )


def _describe(task: ShardTask) -> str:
    return f"shard {task.index} ({shard_filenames(task.name, task.split, task.index)[0]})"


def run_sharding(cfg: ShardConfig, progress: ProgressSink | None = None, plan: Plan | None = None) -> ShardRunResult:
    """Shard `cfg.src` into `cfg.out` (resuming an interrupted run of the same command); see the module doc.

    `plan`: a plan already built from `cfg` by `build_plan` (the CLI builds it first to report on it).
    """
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    plan = plan or build_plan(cfg)
    check_out(cfg.out)
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardingError(f"cannot create OUT {cfg.out} ({e.strerror or e}); choose a folder you can write") from e
    removed: list[str] = []
    with _locked(cfg.out) as lock_fd:
        state = _prepare_out(cfg, plan, removed)
        if state is True or isinstance(state, list):
            manifest, _ = load_manifest(cfg.out)
            repaired = _repair(cfg, plan, manifest, state, progress, lock_fd) if state is not True else []
            shutil.rmtree(cfg.out / STATE_DIR, ignore_errors=True)
            todo = [plan.shards[i] for i in (state if repaired else [])]
            return ShardRunResult(manifest, plan.warnings, not repaired, len(repaired),
                                  len(manifest.shards) - len(repaired), time.perf_counter() - t0,
                                  sum(len(items) for items in todo), sum(it.ref.size for s in todo for it in s),
                                  removed, repaired)
        tasks = [ShardTask(cfg.out, cfg.name, cfg.split, i, items, cfg.image) for i, items in enumerate(plan.shards)]
        journal = _Journal(cfg.out)
        finished = journal.completed(tasks)
        # Largest first (by source bytes), so that no worker starts a big shard while the others run out of work.
        todo = sorted((t for t in tasks if t.index not in finished), key=lambda t: -sum(it.ref.size for it in t.items))
        done = [t for t in tasks if t.index in finished]
        totals = (
            sum(len(t.items) for t in tasks),
            sum(it.ref.size for t in tasks for it in t.items),
            sum(len(t.items) for t in done),
            sum(it.ref.size for t in done for it in t.items),
        )
        try:
            new_parts = run_tasks(write_shard, todo, cfg.workers, progress, _describe, totals,
                                  on_result=journal.append, parent_only_fds=(lock_fd,))
        finally:
            journal.close()
        parts = {**finished, **{p["index"]: p for p in new_parts}}
        manifest = _assemble(cfg, plan, [parts[t.index] for t in tasks])
        empty = [shard_filenames(cfg.name, cfg.split, i)[0] for i in sorted(parts) if parts[i]["record"] is None]
        if empty:
            plan.warnings.append(
                f"{len(empty)} planned shards had no readable input and were not written ({', '.join(empty[:5])}): "
                "the shard numbers have gaps; manifest.json and _info.json list the shards that exist"
            )
        atomic_write_json(cfg.out / TIMM_INFO_NAME, timm_info(manifest), what="_info.json")
        manifest.save(cfg.out)  # last: a manifest means the folder is complete (written durably)
    shutil.rmtree(cfg.out / STATE_DIR, ignore_errors=True)
    return ShardRunResult(
        manifest=manifest,
        warnings=plan.warnings,
        already_complete=False,
        shards_written=len(todo),
        shards_resumed=len(finished),
        seconds=time.perf_counter() - t0,
        files_processed=sum(len(t.items) for t in todo),
        bytes_processed=sum(it.ref.size for t in todo for it in t.items),
        removed=removed,
    )
