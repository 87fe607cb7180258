"""Wheelhouses for machines without internet: `./launch.sh bundle OUT` on a machine with it, then
`./launch.sh setup --offline OUT` on the machine without.

    OUT/manifest.json        the target (Python, architecture, torch and DALI builds), the requirement lines and
                             pins it was made for, every wheel (name, size, sha256) and, when split, every part
    OUT/wheels/*.whl         the wheels; or, with --part-size, instead:
    OUT/parts/part-000 ...   the wheels concatenated in manifest order, cut into parts of at most that size (for
                             transfers with size limits)
    OUT/requirements.txt, OUT/constraints.txt   what pip was asked for (for reading; the manifest is the contract)

`open_bundle` checks everything before pip sees a byte: each part's size and sha256 (a missing or damaged part is
named), then, while reassembling, each wheel's sha256; an unsplit bundle's wheels are checked in place and a wheel
the manifest does not list is refused. Only names of the form the bundle writes are accepted from a manifest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.fileio import atomic_write_json
from tools.install.plan import Plan
from train.system.builds import Build, build_by_key

FORMAT = "supmae-fast-bundle"
VERSION = 1
MANIFEST = "manifest.json"
WHEELS = "wheels"
PARTS = "parts"
CHUNK = 1 << 20
_WHEEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.whl")
_PART_NAME = re.compile(r"part-\d{3,}")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


class BundleError(ValueError):
    """The bundle cannot be made or used; the message names the file or part and says what to do."""


def parse_size(text: str) -> int:
    """Bytes of "60M" (MiB, as split(1) reads it), "2G", "500MB" (10^6), "1000"."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]B?)?\s*", text.upper())
    if not m or int(m.group(1)) == 0:
        raise BundleError(f"--part-size {text!r}: give a size such as 60M, 2G or 500MB (K/M/G = 1024^n bytes, "
                          "KB/MB/GB = 1000^n)")
    return int(m.group(1)) * _UNITS[m.group(2) or ""]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Target:
    """The machine a bundle is for: Python "3.11", architecture "x86_64", glibc of its manylinux wheels."""

    python: str
    arch: str
    torch: Build
    dali: Build
    glibc: tuple[int, int] = (2, 28)  # torch's wheels need manylinux_2_28

    def platforms(self) -> list[str]:
        """pip --platform values: every manylinux tag the target runs. pip expands manylinux2014 to 2010 and 1 but
        does not expand the PEP 600 names, so they are listed one by one."""
        major, minor = self.glibc
        return [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{self.arch}"]

    def to_dict(self) -> dict[str, Any]:
        return {"python": self.python, "arch": self.arch, "torch": self.torch.key, "dali": self.dali.key,
                "glibc": f"{self.glibc[0]}.{self.glibc[1]}"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        glibc = tuple(int(x) for x in str(d.get("glibc", "2.28")).split("."))
        return cls(str(d["python"]), str(d["arch"]), build_by_key("torch", str(d["torch"])),
                   build_by_key("dali", str(d["dali"])), (glibc[0], glibc[1]))


def download_commands(plan: Plan, target: Target, pip: list[str], dest: Path, reqs: Path, cons: Path,
                      extra: tuple[str, ...] = ()) -> list[list[str]]:
    """The `pip download` runs that fill `dest` for `target`: torch's build from its index (when it has one), then
    everything, with the wheels already in `dest` satisfying the pins."""
    base = [*pip, "download", "--disable-pip-version-check", "--dest", str(dest), "--only-binary=:all:",
            "--python-version", target.python, *(f"--platform={p}" for p in target.platforms()), "-c", str(cons),
            *extra]
    cmds = []
    if plan.torch.build.index and plan.torch_lines:
        cmds.append([*base, "--index-url", plan.torch.build.index, *plan.torch_lines])
    cmds.append([*base, "--find-links", str(dest), "-r", str(reqs)])
    return cmds


def _chunks(files: list[Path]) -> Iterator[bytes]:
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


def write_parts(files: list[Path], folder: Path, part_size: int) -> list[dict[str, Any]]:
    """`files` concatenated and cut into `folder`/part-000, ... of at most `part_size` bytes each."""
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, Any]] = []
    out: BinaryIO | None = None
    h = hashlib.sha256()
    room = 0

    def close() -> None:
        nonlocal out
        if out is not None:
            out.close()
            parts[-1]["sha256"] = h.hexdigest()
            out = None

    for chunk in _chunks(files):
        while chunk:
            if room == 0:
                close()
                name = f"part-{len(parts):03d}"
                out, h, room = open(folder / name, "wb"), hashlib.sha256(), part_size
                parts.append({"name": name, "size": 0, "sha256": ""})
            piece, chunk = chunk[:room], chunk[room:]
            out.write(piece)
            h.update(piece)
            parts[-1]["size"] += len(piece)
            room -= len(piece)
    close()
    return parts


def make_bundle(out: Path, plan: Plan, target: Target, pip: list[str], run: Callable[[list[str]], None],
                part_size: int | None = None, extra: tuple[str, ...] = (),
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Download every wheel of `plan` for `target` into the new folder `out`, split it when `part_size` is given,
    and write the manifest (last: a folder without one is unfinished). `run` runs one pip command."""
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty: give a new folder for the bundle")
    wheels = out / WHEELS
    wheels.mkdir(parents=True, exist_ok=True)
    reqs, cons = out / "requirements.txt", out / "constraints.txt"
    reqs.write_text("".join(f"{r}\n" for r in plan.requirements))
    cons.write_text("".join(f"{c}\n" for c in plan.constraints))
    for cmd in download_commands(plan, target, pip, wheels, reqs, cons, extra):
        run(cmd)
    files = sorted(p for p in wheels.iterdir() if p.is_file())
    odd = [p.name for p in files if not _WHEEL_NAME.fullmatch(p.name)]
    if odd:
        raise BundleError(f"pip left files that are not wheels in {wheels}: {odd[:5]}")
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "target": target.to_dict(), "requirements": list(plan.requirements), "constraints": plan.constraints,
        "files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
        "parts": None,
    }
    if part_size:
        manifest["parts"] = write_parts(files, out / PARTS, part_size)
        shutil.rmtree(wheels)
    atomic_write_json(out / MANIFEST, manifest)
    total = sum(f["size"] for f in manifest["files"])
    say(f"launch.sh: bundle {out}: {len(files)} wheels, {total / 2**30:.2f} GiB"
        + (f" in {len(manifest['parts'])} parts of at most {part_size:,} bytes" if part_size else "")
        + f", for Python {target.python} on {target.arch}, torch {target.torch.tag}, {target.dali.dali_package}")
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: {bundle} is not a finished bundle (./launch.sh bundle makes one)") \
            from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} cannot be read ({e}): copy the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not the manifest of a bundle of this project")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{path} has bundle format version {manifest.get('version')}; this set-up reads "
                          f"version {VERSION}: make the bundle with this version of the project")
    for f in manifest.get("files", []):
        if not _WHEEL_NAME.fullmatch(str(f.get("name", ""))):
            raise BundleError(f"{path} lists a file named {f.get('name')!r}, which a bundle never holds")
    for p in manifest.get("parts") or []:
        if not _PART_NAME.fullmatch(str(p.get("name", ""))):
            raise BundleError(f"{path} lists a part named {p.get('name')!r}, which a bundle never holds")
    return manifest


def _check_parts(bundle: Path, parts: list[dict[str, Any]]) -> None:
    """Every part is there with its size (cheap; the digests are checked while reassembling)."""
    n = len(parts)
    missing = [f"{i + 1} of {n} ({PARTS}/{p['name']})" for i, p in enumerate(parts)
               if not (bundle / PARTS / p["name"]).is_file()]
    if missing:
        raise BundleError(f"{bundle}: part {', '.join(missing)} missing; copy the bundle's parts again")
    for i, p in enumerate(parts):
        size = (bundle / PARTS / p["name"]).stat().st_size
        if size != p["size"]:
            raise BundleError(f"{bundle}: part {i + 1} of {n} ({PARTS}/{p['name']}) is damaged: {size:,} bytes, "
                              f"the manifest says {p['size']:,}; copy it again")


class _Splitter:
    """Writes one byte stream into the manifest's files under `work`, one after another, checking each file's
    size and sha256 as it is completed."""

    def __init__(self, bundle: Path, files: list[dict[str, Any]], work: Path):
        self.bundle, self.work, self.queue = bundle, work, iter(files)
        self.current: dict[str, Any] | None = None
        self.out: BinaryIO | None = None
        self.left = 0
        self.hash = hashlib.sha256()
        self.bad: list[str] = []

    def _next(self) -> None:
        self.current = next(self.queue, None)
        if self.current is None:
            raise BundleError(f"{self.bundle}: the parts hold more bytes than the files the manifest lists; make "
                              "the bundle again")
        self.out, self.left, self.hash = open(self.work / self.current["name"], "wb"), self.current["size"], \
            hashlib.sha256()

    def _finish(self) -> None:
        assert self.out is not None and self.current is not None
        self.out.close()
        self.out = None
        if self.hash.hexdigest() != self.current["sha256"]:
            self.bad.append(self.current["name"])  # reported after the part's own check, which names the part

    def check(self) -> None:
        if self.bad:
            raise BundleError(f"{self.bundle}: {self.bad[0]} reassembled from intact parts does not match its "
                              "sha256 in the manifest; make the bundle again")

    def feed(self, data: bytes) -> None:
        while data:
            if self.out is None:
                self._next()
            piece, data = data[: self.left], data[self.left:]
            assert self.out is not None
            self.out.write(piece)
            self.hash.update(piece)
            self.left -= len(piece)
            if self.left == 0:
                self._finish()

    def close(self) -> None:
        """After the last part: every file must be complete."""
        if self.out is not None:
            assert self.current is not None
            raise BundleError(f"{self.bundle}: the parts end inside {self.current['name']}; make the bundle again")
        if next(self.queue, None) is not None:
            raise BundleError(f"{self.bundle}: the parts end before the files the manifest lists; make the bundle "
                              "again")

    def abort(self) -> None:
        if self.out is not None:
            self.out.close()


def _reassemble(bundle: Path, manifest: dict[str, Any], work: Path) -> None:
    """Cut the parts' bytes back into the wheels under `work`, checking each part's and each wheel's sha256."""
    parts = manifest["parts"]
    need = sum(f["size"] for f in manifest["files"])
    free = shutil.disk_usage(work).free
    if free < need:
        raise BundleError(f"reassembling the bundle needs {need / 2**30:.1f} GiB in {work}, which has "
                          f"{free / 2**30:.1f} GiB free: set TMPDIR to a folder with room")
    files = [f for f in manifest["files"] if f["size"] > 0]  # an empty file has no bytes in the parts
    for f in manifest["files"]:
        if f["size"] == 0:
            (work / f["name"]).write_bytes(b"")
    splitter = _Splitter(bundle, files, work)
    try:
        for i, p in enumerate(parts):
            part_hash = hashlib.sha256()
            with open(bundle / PARTS / p["name"], "rb") as f:
                while data := f.read(CHUNK):
                    part_hash.update(data)
                    splitter.feed(data)
            if part_hash.hexdigest() != p["sha256"]:
                raise BundleError(f"{bundle}: part {i + 1} of {len(parts)} ({PARTS}/{p['name']}) is damaged (its "
                                  f"sha256 is {part_hash.hexdigest()[:16]}..., the manifest says "
                                  f"{p['sha256'][:16]}...); copy it again")
            splitter.check()
        splitter.close()
    finally:
        splitter.abort()


def open_bundle(bundle: Path, work: Path, python: str, arch: str) -> tuple[dict[str, Any], Path]:
    """(manifest, folder of checked wheels) of `bundle` for this interpreter's Python and architecture; a split
    bundle is reassembled under `work`. BundleError names what is wrong."""
    manifest = read_manifest(bundle)
    target = manifest.get("target", {})
    if str(target.get("python")) != python:
        raise BundleError(f"{bundle} is for Python {target.get('python')} but .venv uses Python {python}: make the "
                          f"bundle with --python {python}, or set SUPMAE_PYTHON to a Python {target.get('python')}")
    if str(target.get("arch")) != arch:
        raise BundleError(f"{bundle} is for {target.get('arch')} machines, this one is {arch}: make the bundle with "
                          f"--arch {arch}")
    if manifest.get("parts"):
        _check_parts(bundle, manifest["parts"])
        _reassemble(bundle, manifest, work)
        return manifest, work
    wheels = bundle / WHEELS
    listed = {f["name"] for f in manifest["files"]}
    extra = sorted(p.name for p in wheels.glob("*") if p.name not in listed) if wheels.is_dir() else []
    if extra:
        raise BundleError(f"{wheels} holds files the manifest does not list ({', '.join(extra[:5])}): remove them")
    for f in manifest["files"]:
        path = wheels / f["name"]
        if not path.is_file():
            raise BundleError(f"{bundle}: {WHEELS}/{f['name']} is missing; copy the bundle again")
        if path.stat().st_size != f["size"] or sha256_file(path) != f["sha256"]:
            raise BundleError(f"{bundle}: {WHEELS}/{f['name']} is damaged (size or sha256 differs from the "
                              "manifest); copy it again")
    return manifest, wheels
