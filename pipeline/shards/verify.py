"""`./launch.sh shard --verify OUT [--decode]`: re-read a shard folder and report every mismatch by shard and sample.

Per shard, in one sequential pass (memory: one member at a time):
  * size and sha256 of the tar and of its index against the manifest;
  * every tar header (checksum), every member against its index entry (name, data offset, size), zero padding,
    the end-of-archive blocks;
  * every sample: components exactly jpg, cls, lbl, json in that order; cls == lbl; label within the class map;
    json's wnid is the label's class; json's crc32 is the jpg's (this names the sample of a flipped byte;
    tool version 1.0 wrote no crc32: its damaged images are found by the shard's sha256 only);
  * with `decode`: every jpg decodes fully as an upright RGB JPEG within the manifest's max-side.
Across the folder: keys unique, per-class counts, totals (inputs = written + skipped), _info.json.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.shards.imageproc import ImageSkip, decode_stored
from pipeline.shards.shard_format import (
    SAMPLE_EXTS,
    TAR_BLOCK,
    TIMM_INFO_NAME,
    IndexComponent,
    Manifest,
    ShardFormatError,
    ShardRecord,
    check_key,
    decode_label,
    image_checksum,
    load_manifest,
    parse_index,
    split_member_name,
    timm_info,
)
from pipeline.shards.sharding import SHARD_FILE_RE, NullProgress, ProgressSink, WorkerProgress, run_tasks


@dataclass(frozen=True)
class Problem:
    shard: str | None
    sample: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(x for x in (self.shard, f"sample {self.sample}" if self.sample else None) if x)
        return f"{where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class VerifyTask:
    folder: Path
    record: ShardRecord
    wnids: list[str]
    max_side: int | None
    decode: bool


@dataclass
class ShardCheck:
    shard: str
    samples: int = 0
    bytes: int = 0
    decoded: int = 0
    keys: list[str] = field(default_factory=list)
    class_counts: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)


class _Reader:
    """Sequential reader that hashes every byte it hands out and knows its position."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")  # noqa: SIM115 - closed by verify_shard
        self.sha = hashlib.sha256()
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.pos += len(data)
        return data

    def hash_rest(self) -> None:
        while self.read(1 << 20):
            pass


def _check_sample(task: VerifyTask, check: ShardCheck, key: str, comps: dict[str, bytes]) -> None:
    def bad(msg: str) -> None:
        check.problems.append(Problem(check.shard, key, msg))

    try:
        check_key(key)
    except ValueError as e:
        bad(str(e))
    if list(comps) != list(SAMPLE_EXTS):
        bad(f"components {list(comps)}, expected {list(SAMPLE_EXTS)}")
        return
    try:
        label = int(comps["cls"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        bad(f"cls {comps['cls'][:20]!r} is not a decimal class index")
        return
    if len(comps["lbl"]) != 8 or decode_label(comps["lbl"]) != label:
        bad(f"lbl {comps['lbl'].hex()} does not hold the cls label {label}")
    if not 0 <= label < len(task.wnids):
        bad(f"label {label} outside the {len(task.wnids)} classes of the manifest")
        return
    check.class_counts[label] += 1
    try:
        meta = json.loads(comps["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        bad(f"json member is not valid JSON ({e})")
        return
    if meta.get("wnid") != task.wnids[label]:
        bad(f"json wnid {meta.get('wnid')!r} is not class {label} ({task.wnids[label]})")
    if "crc32" in meta and image_checksum(comps["jpg"]) != meta["crc32"]:
        bad("jpg bytes differ from the crc32 recorded in its json (the image is corrupted)")
    if task.decode:
        try:
            im = decode_stored(comps["jpg"])
        except ImageSkip as e:
            bad(f"jpg does not decode: {e}")
            return
        check.decoded += 1
        if task.max_side is not None and max(im.size) > task.max_side:
            bad(f"jpg is {im.size[0]}x{im.size[1]}, larger than max-side {task.max_side}")


def _walk_tar(task: VerifyTask, check: ShardCheck, reader: _Reader, entries: list[IndexComponent]) -> None:
    """Walk the tar member by member against the flat list of index entries."""
    rec = task.record
    key, comps = None, {}
    i = 0
    while True:
        header_at = reader.pos
        block = reader.read(TAR_BLOCK)
        if len(block) < TAR_BLOCK:
            check.problems.append(Problem(rec.file, key, f"file ends at byte {header_at} before the end-of-archive "
                                                         "blocks (truncated shard)"))
            break
        if block == b"\0" * TAR_BLOCK:
            rest = block + reader.read(TAR_BLOCK)
            if rest != b"\0" * (2 * TAR_BLOCK):
                check.problems.append(Problem(rec.file, None, f"bad end-of-archive blocks at byte {header_at}"))
            break
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            check.problems.append(Problem(rec.file, key, f"corrupt tar header at byte {header_at} ({e}); "
                                                         "members after it cannot be located"))
            return
        data_at = reader.pos
        data = reader.read(info.size)
        pad = reader.read(-info.size % TAR_BLOCK)
        k, ext = split_member_name(info.name)
        if k != key and comps:
            _finish_sample(task, check, key, comps)
            comps = {}
        key = k
        if len(data) < info.size:
            check.problems.append(Problem(rec.file, k, f"member {info.name} is cut off at byte {reader.pos}: the "
                                                       "file ends there (truncated shard)"))
            comps = {}
            break
        if pad.strip(b"\0"):
            check.problems.append(Problem(rec.file, k, f"non-zero padding after member {info.name}"))
        want = entries[i] if i < len(entries) else None
        if want is None or (want.name, want.offset, want.size) != (info.name, data_at, info.size):
            got = f"{info.name} at {data_at} ({info.size} bytes)"
            exp = f"{want.name} at {want.offset} ({want.size} bytes)" if want else "no further entry"
            check.problems.append(Problem(rec.file, k, f"tar member {got} does not match the index: {exp}"))
        i += 1
        if ext in comps:
            check.problems.append(Problem(rec.file, k, f"component {ext} appears twice"))
        comps[ext] = data
        check.bytes += len(data)
    if comps:
        _finish_sample(task, check, key, comps)
    if i < len(entries):
        missing = entries[i]
        check.problems.append(Problem(rec.file, split_member_name(missing.name)[0],
                                      f"{len(entries) - i} indexed members from {missing.name} on are missing"))


def _finish_sample(task: VerifyTask, check: ShardCheck, key: str, comps: dict[str, bytes]) -> None:
    check.samples += 1
    check.keys.append(key)
    _check_sample(task, check, key, comps)
    _progress.add(sum(len(v) for v in comps.values()))


_progress = WorkerProgress()


def verify_shard(task: VerifyTask) -> ShardCheck:
    rec = task.record
    check = ShardCheck(rec.file)
    tar_path, idx_path = task.folder / rec.file, task.folder / rec.index
    for path in (tar_path, idx_path):
        if not path.is_file():
            check.problems.append(Problem(rec.file, None, f"{path.name} is missing"))
    if check.problems:
        return check
    size = tar_path.stat().st_size
    if size != rec.bytes:
        what = "truncated" if size < rec.bytes else "longer than listed"
        check.problems.append(Problem(rec.file, None, f"{what}: {size} bytes, manifest says {rec.bytes}"))
    index_bytes = idx_path.read_bytes()
    if hashlib.sha256(index_bytes).hexdigest() != rec.index_sha256:
        check.problems.append(Problem(rec.index, None, "index sha256 differs from the manifest"))
    try:
        samples = parse_index(idx_path)
    except (ShardFormatError, UnicodeDecodeError) as e:
        check.problems.append(Problem(rec.index, None, f"unreadable index ({e})"))
        samples = []
    entries = [c for s in samples for c in s]
    reader = _Reader(tar_path)
    try:
        _walk_tar(task, check, reader, entries)
        reader.hash_rest()
    finally:
        reader.f.close()
    if reader.sha.hexdigest() != rec.sha256:
        located = any(p.shard == rec.file for p in check.problems)
        check.problems.append(Problem(rec.file, None, "sha256 differs from the manifest" +
                                      ("" if located else " (no member check located the change)")))
    if check.samples != rec.samples or len(samples) != rec.samples:
        check.problems.append(Problem(rec.file, None, f"{check.samples} samples in the tar, {len(samples)} in the "
                                                      f"index, manifest says {rec.samples}"))
    _progress.flush()
    return check


def locate_damage(folder: Path, manifest: Manifest, shard_file: str) -> Problem | None:
    """The first problem `verify_shard` finds in one shard of `folder` (a sample's when one is named): used to name
    the sample when a loader meets a corrupt shard during training."""
    record = next((r for r in manifest.shards if r.file == shard_file), None)
    if record is None:
        return None
    wnids = [c.wnid for c in sorted(manifest.classes, key=lambda c: c.index)]
    check = None
    # The per-image CRC-32 names a damaged sample without decoding; shards without it need the decode.
    for decode in (False, True):
        check = verify_shard(VerifyTask(Path(folder), record, wnids, None, decode=decode))
        named = [p for p in check.problems if p.sample]
        if named:
            return named[0]
    return check.problems[0] if check.problems else None


@dataclass
class VerifyReport:
    folder: Path
    manifest: Manifest | None
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    decoded: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_totals(manifest: Manifest, checks: list[ShardCheck], report: VerifyReport) -> None:
    t = manifest.totals
    p = report.problems.append
    listed = sum(r.samples for r in manifest.shards)
    if t.get("written") != listed:
        p(Problem(None, None, f"totals.written {t.get('written')} but the shards list {listed} samples"))
    if t.get("inputs") != t.get("written", 0) + t.get("skipped", 0):
        p(Problem(None, None, f"totals do not reconcile: inputs {t.get('inputs')} != written {t.get('written')} "
                              f"+ skipped {t.get('skipped')}"))
    if t.get("skipped") != len(manifest.skipped):
        p(Problem(None, None, f"totals.skipped {t.get('skipped')} but {len(manifest.skipped)} skipped inputs listed"))
    if t.get("converted") != len(manifest.converted):
        p(Problem(None, None, f"totals.converted {t.get('converted')} but {len(manifest.converted)} listed"))
    keys = Counter(k for c in checks for k in c.keys)
    dups = [k for k, n in keys.items() if n > 1]
    if dups:
        p(Problem(None, dups[0], f"{len(dups)} sample keys appear more than once across shards"))
    counts = Counter()
    for c in checks:
        counts.update(c.class_counts)
    for cls in manifest.classes:
        if cls.samples is not None and counts[cls.index] != cls.samples:
            p(Problem(None, None, f"class {cls.index} ({cls.wnid}): {counts[cls.index]} samples read, manifest says "
                                  f"{cls.samples}"))


def verify(folder: str | Path, decode: bool = False, workers: int = 1, progress: ProgressSink | None = None) -> VerifyReport:
    """Check a shard folder end to end; never raises for bad data, every finding is a Problem in the report."""
    folder = Path(folder)
    progress = progress or NullProgress()
    try:
        manifest, folder = load_manifest(folder)
    except (ShardFormatError, FileNotFoundError) as e:
        return VerifyReport(folder, None, problems=[Problem(None, None, str(e))])
    report = VerifyReport(folder, manifest)
    info_path = folder / TIMM_INFO_NAME
    try:
        if json.loads(info_path.read_text()) != timm_info(manifest):
            report.problems.append(Problem(TIMM_INFO_NAME, None, "does not match the manifest (timm would read other shards)"))
    except (OSError, json.JSONDecodeError) as e:
        report.problems.append(Problem(TIMM_INFO_NAME, None, f"missing or unreadable ({e})"))
    listed = {n for r in manifest.shards for n in (r.file, r.index)}
    strays = sorted(e.name for e in folder.iterdir() if SHARD_FILE_RE.match(e.name) and e.name not in listed)
    if strays:
        report.warnings.append(f"{len(strays)} shard files not in the manifest (ignored by loaders): {', '.join(strays[:5])}")
    wnids = [c.wnid for c in sorted(manifest.classes, key=lambda c: c.index)]
    max_side = None if manifest.options.get("max_side") is None else int(manifest.options["max_side"])
    tasks = [VerifyTask(folder, rec, wnids, max_side, decode) for rec in manifest.shards]
    totals = (manifest.num_samples, sum(r.bytes for r in manifest.shards), 0, 0)
    checks = run_tasks(verify_shard, tasks, workers, progress, lambda t: f"verifying {t.record.file}", totals)
    for c in checks:
        report.shards += 1
        report.samples += c.samples
        report.bytes += c.bytes
        report.decoded += c.decoded
        report.problems += c.problems
    _check_totals(manifest, checks, report)
    return report
