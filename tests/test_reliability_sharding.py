"""Sharding under attack: one bad input never stops a run (skipped with its exception, a worker's death explained,
re-runs resume), bounded memory per input, untrusted files never reach external programs, corrupt JPEG data is not
stored, tars read completely or not at all, symlinks cannot move a class, --overwrite deletes only what the tool
wrote, and every foreseeable failure is a message with exit status 2."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

import pipeline.shards.shard_format as shard_format
import pipeline.shards.sharding as sharding
from pipeline.shards.imageproc import ImageConfig, ImageSkip, check_stored, process_image
from pipeline.shards.shard_format import ShardFormatError, ShardWriter, load_manifest, read_samples
from pipeline.shards.sharding import STATE_DIR, ShardConfig, ShardingError, build_plan, run_sharding
from pipeline.shards.sources import SourceError, open_source
from pipeline.shards.val_labels import LabelsError, load_val_labels
from pipeline.shards.verify import verify
from tests.shard_testdata import WNIDS, image_file, make_imagefolder, make_tar_of_tars, tar_folder
from tools import shard as shard_cli

ROOT = Path(__file__).resolve().parents[1]


def small_tree(root: Path, per_class: int = 3) -> Path:
    make_imagefolder(root, per_class=per_class, odd=False, bad=False)
    return root


def shard(src: Path, out: Path, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("shard_samples", 3)
    return run_sharding(ShardConfig(src=src, out=out, **kw))


def cli(*args: str, capsys) -> tuple[int, str]:
    code = shard_cli.main([*args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out + out.err


def jpeg(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Isolation per input


@pytest.mark.parametrize("error", [IndexError("tile index out of range"), MemoryError("cannot allocate")])
def test_any_exception_of_one_input_skips_that_input_and_the_run_goes_on(tmp_path, monkeypatch, error):
    src = small_tree(tmp_path / "src")
    (src / WNIDS[1] / "hostile.gif").write_bytes(b"HOSTILE" + image_file("png", 1, 9))
    real = sharding.process_image

    def decoder(data, cfg):  # a decoder bug that only this file triggers
        if data.startswith(b"HOSTILE"):
            raise error
        return real(data, cfg)

    monkeypatch.setattr(sharding, "process_image", decoder)
    result = shard(src, tmp_path / "out", workers=1)  # write_shard is the same in a worker process
    m = result.manifest
    assert m.skipped == [{"src": f"{WNIDS[1]}/hostile.gif",
                          "reason": f"decoder failed ({type(error).__name__}: {error})"}]
    assert m.totals["inputs"] == m.totals["written"] + m.totals["skipped"] == 3 * len(WNIDS) + 1
    assert verify(tmp_path / "out").ok


# Run in a fresh interpreter: its workers are forked (no other thread runs there), so they see the stand-in
# decoder, which kills the worker that meets the file starting with b"KILL" as the out-of-memory killer would.
_OOM_SCENARIO = """
import json, os, signal, sys
from pathlib import Path
import pipeline.shards.sharding as sharding
from pipeline.shards.sharding import ShardConfig, ShardingError, build_plan, run_sharding

src, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = ShardConfig(src=src, out=out, workers=2, shard_samples=2)
plan = build_plan(cfg)
victim = next(i for i, items in enumerate(plan.shards) if any(it.rel.endswith("huge.JPEG") for it in items))
real, parent = sharding.process_image, os.getpid()

def decoder(data, cfg):
    if data.startswith(b"KILL") and os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(data, cfg)

sharding.process_image = decoder
try:
    run_sharding(cfg)
    error = None
except ShardingError as e:
    error = str(e)
sharding.process_image = real
again = run_sharding(cfg)  # the same command, run again
print(json.dumps({"victim": victim, "error": error, "again": again.manifest.to_dict()}))
"""


def test_a_worker_killed_by_the_oom_killer_is_named_and_a_rerun_resumes(tmp_path):
    src = small_tree(tmp_path / "src", per_class=4)
    (src / WNIDS[2] / "huge.JPEG").write_bytes(b"KILL" + image_file("jpeg", 2, 9))
    proc = subprocess.run([sys.executable, "-c", _OOM_SCENARIO, str(src), str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    victim = got["victim"]
    assert got["error"].startswith(
        f"shard {victim} (src-train-{victim:06d}.tar): its worker process was killed by SIGKILL, most likely by the "
        "kernel's out-of-memory killer")
    assert "fewer --workers, or lower --max-pixels" in got["error"]
    clean = run_sharding(ShardConfig(src=src, out=tmp_path / "clean", workers=1, shard_samples=2)).manifest
    assert got["again"]["shards"] == clean.to_dict()["shards"]  # the re-run finished the same shards
    assert {"src": f"{WNIDS[2]}/huge.JPEG", "reason": "not an image (format not recognised)"} in got["again"]["skipped"]


# ----------------------------------------------------------------------------------------------------------------
# Bounded memory


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_skips_large_images_and_decompression_bombs_before_decoding(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PNG")
    with pytest.raises(ImageSkip, match=r"image too large: 300x200 = 60,000 pixels, above --max-pixels 50,000 \(a "
                                        "decompression-bomb guard; raise --max-pixels to keep such images\\)"):
        process_image(buf.getvalue(), ImageConfig(max_pixels=50_000))
    assert process_image(buf.getvalue(), ImageConfig(max_pixels=60_000)).reencoded
    for keep in (False, True):
        with pytest.raises(ImageSkip, match="image too large: 30000x30000 = 900,000,000 pixels, above --max-pixels "
                                            "89,478,485"):
            process_image(png_with_size(30000, 30000), ImageConfig(keep_original=keep))
    # The limit is an option of the run: it is recorded and reproduced.
    src = small_tree(tmp_path / "src", per_class=1)
    m = shard(src, tmp_path / "out", image=ImageConfig(max_pixels=1000)).manifest
    assert m.options["max_pixels"] == 1000 and m.command[m.command.index("--max-pixels") + 1] == "1000"


# Peak resident memory (VmHWM, KiB) of processing one file, from a reset peak: ru_maxrss would carry the peak of the
# forked pytest process across exec.
_MEASURE = """
import sys
from pipeline.shards.imageproc import ImageConfig, process_image
def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")
before = peak()
process_image(data, ImageConfig())
print(peak() - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["16-bit", "alpha"])
def test_large_sixteen_bit_and_alpha_images_need_few_bytes_per_pixel(tmp_path, kind):
    """A worker converts huge 16-bit and alpha images after shrinking them, not at full size (it needed about 14 and
    19 bytes per pixel before: 1.3 and 1.7 GB for a 90-megapixel image)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    side = 4000
    if kind == "16-bit":
        im = Image.fromarray((np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side))
    else:
        arr = np.zeros((side, side, 4), np.uint8)
        arr[..., 0], arr[..., 3] = 200, 128
        im = Image.fromarray(arr, "RGBA")
    path = tmp_path / "big.png"
    im.save(path, compress_level=1)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    peak_kib = int(out.stdout)
    assert peak_kib * 1024 < 10 * side * side, f"{peak_kib / 1024:.0f} MiB for {side * side / 1e6:.0f} MP"


# ----------------------------------------------------------------------------------------------------------------
# Untrusted files stay inert


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A `gs` first on PATH that leaves a mark when anything runs it (Pillow's EPS plugin looks for it anew)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mark = tmp_path / "gs-ran"
    (bindir / "gs").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (bindir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return mark


def eps_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, "EPS")
    return buf.getvalue()


def test_an_eps_named_jpeg_never_runs_ghostscript(tmp_path, fake_ghostscript):
    eps = eps_bytes()
    with pytest.raises(Exception):  # noqa: B017 - what plain Pillow does with it: run gs (the fake one fails)
        Image.open(io.BytesIO(eps)).load()
    assert fake_ghostscript.exists()
    fake_ghostscript.unlink()
    EpsImagePlugin.gs_binary = None

    for keep in (False, True):
        with pytest.raises(ImageSkip, match=r"^unsupported format EPS \(allowed: JPEG, PNG, WEBP, GIF, BMP"):
            process_image(eps, ImageConfig(keep_original=keep))
    src = small_tree(tmp_path / "src", per_class=2)
    (src / WNIDS[0] / "photo.JPEG").write_bytes(eps)
    (src / WNIDS[0] / "doc.JPEG").write_bytes(b"%PDF-1.4\n" + b"0" * 100)
    m = shard(src, tmp_path / "out", workers=2).manifest
    assert {(s["src"], s["reason"].split(" (")[0]) for s in m.skipped} == {
        (f"{WNIDS[0]}/photo.JPEG", "unsupported format EPS"), (f"{WNIDS[0]}/doc.JPEG", "unsupported format PDF")}
    assert not fake_ghostscript.exists()


# ----------------------------------------------------------------------------------------------------------------
# Corrupt JPEG data


def damaged_height(data: bytes) -> bytes:
    """The SOF0 height field corrupted: libjpeg warns "premature end of data segment" and fills grey."""
    pos = data.index(b"\xff\xc0")
    d = bytearray(data)
    d[pos + 5] ^= 0x10
    return bytes(d)


def damaged_huffman_table(data: bytes) -> bytes:
    """A symbol of the last Huffman table changed: the entropy-coded data decodes to garbage that ends early."""
    pos = data.rindex(b"\xff\xc4")
    d = bytearray(data)
    d[pos + 4 + 1 + 16 + 3] ^= 0x01
    return bytes(d)


@pytest.mark.parametrize("damage, reason", [
    (damaged_height, "corrupt JPEG data: premature end of data segment"),
    (damaged_huffman_table, "corrupt JPEG data: extraneous bytes before the end-of-image marker"),
    (lambda d: d[: len(d) * 2 // 3] + b"\xff\xd9", "corrupt JPEG data: premature end of data segment"),
])
def test_corrupt_jpeg_data_is_skipped_not_stored_as_grey(damage, reason):
    good = jpeg(320, 240)
    bad = damage(good)
    im = Image.open(io.BytesIO(bad))
    im.load()  # plain Pillow decodes it without complaint ...
    assert im.size[0] >= 320
    for keep in (False, True):
        with pytest.raises(ImageSkip, match=reason):  # ... here it is skipped with libjpeg's reason
            process_image(bad, ImageConfig(keep_original=keep))
        assert process_image(good, ImageConfig(keep_original=keep)).jpeg  # the healthy file passes


def test_verify_decode_finds_corrupt_data_that_was_stored(tmp_path):
    """A shard written before this check (or by hand) with a damaged image: --verify --decode names the sample."""
    with ShardWriter(tmp_path, "t", "train", 0) as w:
        w.add_sample("good-00000000", jpeg(seed=1), 0, {"src": "a", "wnid": "n0"})
        w.add_sample("bad-00000001", damaged_height(jpeg(seed=2)), 0, {"src": "b", "wnid": "n0"})
        record = w.close()
    manifest = shard_format.Manifest("t", "train", "x", [], {"max_side": 512}, [shard_format.ClassEntry(0, "n0")],
                                     [record], {"inputs": 2, "written": 2, "skipped": 0, "converted": 0})
    manifest.save(tmp_path)
    (tmp_path / "_info.json").write_text(json.dumps(shard_format.timm_info(manifest)))
    report = verify(tmp_path, decode=True)
    assert [str(p) for p in report.problems] == [
        "t-train-000000.tar sample bad-00000001: jpg does not decode: corrupt JPEG data: premature end of data "
        "segment (the image data runs out before the last blocks, which would be flat grey; a damaged header or "
        "cut data)"]


# ----------------------------------------------------------------------------------------------------------------
# --keep-original passes its own --verify --decode


def exif_block(orientation: int, order: bytes, long: bool) -> bytes:
    e = "<" if order == b"II" else ">"
    typ, value = (4, struct.pack(e + "I", orientation)) if long else (3, struct.pack(e + "HH", orientation, 0))
    tiff = order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1)
    tiff += struct.pack(e + "HHI", 0x0112, typ, 1) + value + struct.pack(e + "I", 0)
    return b"Exif\0\0" + tiff


@pytest.mark.parametrize("order", [b"II", b"MM"])
@pytest.mark.parametrize("long", [False, True])
def test_keep_original_output_passes_its_own_verify_decode(tmp_path, capsys, order, long):
    """Orientation stored as LONG (some cameras) used to be read as upright when qualifying, then found rotated by
    --verify --decode: one parser reads it for both now, in either byte order."""
    src = small_tree(tmp_path / "src", per_class=2)
    rotated = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif_block(6, order, long))
    (src / WNIDS[0] / "rotated.JPEG").write_bytes(buf.getvalue())
    result = shard(src, tmp_path / "out", image=ImageConfig(keep_original=True))
    conv = {c["src"]: c["reason"] for c in result.manifest.converted}
    assert conv[f"{WNIDS[0]}/rotated.JPEG"].startswith("EXIF orientation 6")
    assert result.manifest.totals["kept_original"] == 2 * len(WNIDS)
    code, out = cli("--verify", str(tmp_path / "out"), "--decode", capsys=capsys)
    assert code == 0, out


# ----------------------------------------------------------------------------------------------------------------
# Tars are read completely or not at all


@pytest.fixture
def tree_tar(tmp_path) -> Path:
    return tar_folder(small_tree(tmp_path / "t"), tmp_path / "train.tar", "train")


def members_end(path: Path) -> list[int]:
    with tarfile.open(path) as tf:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers()]


@pytest.mark.parametrize("cut", ["member boundary", "inside a header", "inside the last member"])
def test_a_cut_tar_is_an_error_naming_it(tree_tar, tmp_path, cut, capsys):
    ends = members_end(tree_tar)
    at = {"member boundary": ends[len(ends) // 2], "inside a header": ends[len(ends) // 2] + 100,
          "inside the last member": ends[-1] - 300}[cut]
    cut_tar = tmp_path / "cut.tar"
    cut_tar.write_bytes(tree_tar.read_bytes()[:at])
    with pytest.raises(SourceError, match=f"^{cut_tar}: (no end-of-archive marker|its last member)"):
        open_source(cut_tar)
    code, out = cli(str(cut_tar), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and "the tar is cut short" in out and str(cut_tar) in out


def test_a_cut_inner_tar_of_a_tar_of_tars_is_an_error(tmp_path):
    root = small_tree(tmp_path / "r")
    outer = make_tar_of_tars(root, tmp_path / "ILSVRC2012_img_train.tar")
    inner = tmp_path / "ILSVRC2012_img_train.tar.parts" / f"{WNIDS[1]}.tar"
    ends = members_end(inner)
    with tarfile.open(outer, "w", format=tarfile.GNU_FORMAT) as tf:  # rebuild with one inner tar cut short
        for wnid in sorted(os.listdir(root)):
            part = tmp_path / "ILSVRC2012_img_train.tar.parts" / f"{wnid}.tar"
            if wnid == WNIDS[1]:
                part.write_bytes(part.read_bytes()[: ends[1]])
            tf.add(part, arcname=f"{wnid}.tar")
    with pytest.raises(SourceError, match=f"^{outer} member {WNIDS[1]}.tar: no end-of-archive marker"):
        open_source(outer)


def tar_of(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "members.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_absolute_and_dotdot_members_are_listed_and_never_classes(tmp_path):
    img = image_file("jpeg", 0, 0)
    path = tar_of(tmp_path, {"n01/a.jpg": img, "n02/b.jpg": img, "/etc/c.jpg": img, "n01/../../up/d.jpg": img})
    lst = open_source(path)
    assert lst.groups == ["n01", "n02"] and [i.rel for i in lst.items] == ["n01/a.jpg", "n02/b.jpg"]
    reason = "member path is absolute or climbs out with '..': never read, never a class name"
    assert sorted((s.rel, s.reason) for s in lst.skipped) == [("/etc/c.jpg", reason), ("n01/../../up/d.jpg", reason)]


@pytest.mark.parametrize("stray", ["README", "train/README"])
def test_a_member_outside_the_class_folders_is_an_error_explaining_the_layout(tmp_path, stray):
    img = image_file("jpeg", 0, 0)
    path = tar_of(tmp_path, {"train/n01/a.jpg": img, "train/n02/b.jpg": img, stray: b"notes"})
    with pytest.raises(SourceError, match=rf"1 member\(s\) sit outside any class folder \({stray}\), so the class "
                                          r"level of this tar is ambiguous: .* <class>/<file>, optionally all under "
                                          r"one common top folder"):
        open_source(path)


# ----------------------------------------------------------------------------------------------------------------
# Symlinks cannot move a class


@pytest.mark.parametrize("link_name", ["aaa", "zzz"])  # before and after the real files in traversal order
def test_a_folder_link_inside_src_does_not_move_files_between_classes(tmp_path, link_name):
    src = small_tree(tmp_path / "src", per_class=2)
    os.symlink(src / WNIDS[1], src / WNIDS[0] / link_name)
    os.symlink(src / WNIDS[2], src / "alias")  # a class folder that is another class
    lst = open_source(src)
    assert {i.group for i in lst.items if i.rel.startswith(WNIDS[1])} == {WNIDS[1]}
    assert sum(i.group == WNIDS[0] for i in lst.items) == 2 and "alias" not in lst.groups
    reasons = {s.rel: s.reason for s in lst.skipped}
    assert reasons[f"{WNIDS[0]}/{link_name}"] == (f"symbolic link to the folder {WNIDS[1]} inside SRC: not followed "
                                                  "(its files are read through their own path)")
    assert reasons["alias"].startswith(f"symbolic link to the folder {WNIDS[2]} inside SRC")


def test_one_file_through_two_paths_is_reported_by_both_names(tmp_path):
    src = small_tree(tmp_path / "src", per_class=1)
    a, b = f"{WNIDS[0]}/{WNIDS[0]}_0.JPEG", f"{WNIDS[1]}/{WNIDS[1]}_0.JPEG"
    os.link(src / a, src / WNIDS[1] / "same.JPEG")  # the same file in two classes
    os.link(src / b, src / WNIDS[1] / "again.JPEG")  # the same file twice in one class
    lst = open_source(src)
    reasons = {s.rel: s.reason for s in lst.skipped}
    two = f"one file reached through paths in different classes ({a}, {WNIDS[1]}/same.JPEG)"
    assert reasons[a].startswith(two) and reasons[f"{WNIDS[1]}/same.JPEG"].startswith(two)
    again = f"{WNIDS[1]}/again.JPEG"  # first in sorted order: kept, the other path listed
    assert reasons[b] == f"the same file as {again} (one file, two paths): kept once"
    assert again in {i.rel for i in lst.items} and not {a, b} & {i.rel for i in lst.items}


# ----------------------------------------------------------------------------------------------------------------
# --overwrite deletes only what the tool wrote


def test_overwrite_deletes_only_recorded_files_and_lists_them(tmp_path, capsys):
    src = small_tree(tmp_path / "src")
    out = tmp_path / "out"
    first = shard(src, out).manifest
    written = sorted([n for r in first.shards for n in (r.file, r.index)] + ["_info.json", "manifest.json"])
    mine = ["notes-my-000007.tar", "notes-my-000007.idx", "README.txt"]  # look like shards, written by the user
    for name in mine:
        (out / name).write_text("user data")
    code, text = cli(str(src), str(out), "--quality", "80", "--overwrite", "--workers", "1", capsys=capsys)
    assert code == 0, text
    assert f"--overwrite deleted {len(written)} files an earlier run had written:" in text
    for name in mine:
        assert (out / name).read_text() == "user data"

    # An unfinished run: what its plan and journal name goes; a user file with a name this run writes is refused.
    (out / STATE_DIR).mkdir()
    plan = build_plan(ShardConfig(src=src, out=out, name="other", shard_samples=3))
    (out / STATE_DIR / "plan.json").write_text(json.dumps(plan.fingerprint))
    (out / "other-train-000000.tar").write_text("a shard of that run")
    (out / "src-train-000099.tar").write_text("user file with a shard-like name")
    cfg = ShardConfig(src=src, out=out, shard_samples=3, overwrite=True, image=ImageConfig(quality=70))
    result = run_sharding(cfg)
    assert "other-train-000000.tar" in result.removed and ".shard-state/plan.json" in result.removed
    assert (out / "src-train-000099.tar").read_text() == "user file with a shard-like name"
    # Without the manifest nothing records who wrote the shards: they are not deleted, and not written over.
    (out / "manifest.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ShardingError, match=r"holds _info.json, src-train-000000.idx, src-train-000000.tar, .*, which "
                                            "this run would write, but no earlier shard run recorded writing them"):
        run_sharding(ShardConfig(src=src, out=out, shard_samples=3, overwrite=True, image=ImageConfig(quality=60)))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_refused_by_a_user_file_deletes_nothing(tmp_path):
    src = small_tree(tmp_path / "src")  # 9 images: 3 shards of 3
    out = tmp_path / "out"
    shard(src, out)
    (out / "src-train-000005.tar").write_text("user file with the name of a shard the next run writes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ShardingError, match=r"holds src-train-000005.tar, which this run would write, .*nothing was "
                                            "deleted"):
        shard(src, out, shard_samples=1, overwrite=True)  # 9 shards
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_missing_or_cut_shards_of_a_complete_folder_are_written_again_by_the_same_command(tmp_path, capsys):
    src = small_tree(tmp_path / "src")
    out = tmp_path / "out"
    first = shard(src, out).manifest
    assert len(first.shards) == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / first.shards[0].file).unlink()  # lost
    index = out / first.shards[2].index
    index.write_bytes(index.read_bytes()[:-7])  # cut short
    with pytest.raises(ShardFormatError, match="delete those it reports and re-run the shard command"):
        shard_format.check_shard_files(first, out)
    code, text = cli(str(src), str(out), "--shard-samples", "3", "--workers", "1", capsys=capsys)
    assert code == 0, text
    assert f"written again (missing or cut short; each equal to what manifest.json lists): {first.shards[0].file}, " \
           f"{first.shards[2].file}" in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The source changed since: the shard cannot come out as listed; nothing of that run stays, OUT is refused.
    (out / first.shards[1].file).unlink()
    for path in sorted(src.rglob("*.JPEG")):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: the plan's fingerprint cannot tell
        path.write_bytes(bytes(data))
    with pytest.raises(ShardingError, match=rf"{first.shards[1].file} came out different from what manifest.json "
                                            "lists .* the source has changed .* --overwrite"):
        shard(src, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(set(before) - {first.shards[1].file,
                                                                           first.shards[1].index})


def test_a_run_that_writes_nothing_is_an_error(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg())
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01440764 1 2 3 4\n")
    code, text = cli(str(flat), str(tmp_path / "out"), "--labels", str(labels), capsys=capsys)
    assert code == 2
    assert f"shard: error: none of the 1 inputs of {flat} can be sharded (ILSVRC2012_val_00000001.JPEG: no label " \
           f"for this image in {labels}): check SRC and --labels" in text
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    (bad / WNIDS[0]).mkdir(parents=True)
    (bad / WNIDS[0] / "a.JPEG").write_bytes(b"not an image")
    code, text = cli(str(bad), str(tmp_path / "out2"), capsys=capsys)
    assert code == 2 and "shard: error: no image was written: all 1 inputs were skipped" in text


def test_verify_of_a_folder_that_is_not_a_shard_folder_is_a_usage_error(tmp_path, capsys):
    code, text = cli("--verify", str(tmp_path / "nope"), capsys=capsys)
    assert code == 2 and f"shard: error: shard folder {tmp_path / 'nope'} does not exist" in text
    code, text = cli("--verify", str(tmp_path), capsys=capsys)
    assert code == 2 and f"shard: error: {tmp_path / 'manifest.json'} not found" in text
    (tmp_path / "manifest.json").write_text("{")  # damaged: a finding of the check
    code, text = cli("--verify", str(tmp_path), capsys=capsys)
    assert code == 1 and "not valid JSON" in text and "FAILED" in text


# ----------------------------------------------------------------------------------------------------------------
# Errors: messages and exit status 2


def test_out_that_is_a_file_or_read_only_is_refused(tmp_path, capsys, monkeypatch):
    src = small_tree(tmp_path / "src", per_class=1)
    (tmp_path / "file").write_text("x")
    code, out = cli(str(src), str(tmp_path / "file"), capsys=capsys)
    assert code == 2 and f"OUT {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder" in out
    code, out = cli(str(src), str(tmp_path / "file" / "sub"), capsys=capsys)
    assert code == 2 and f"it would be inside {tmp_path / 'file'}, which is a file" in out
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    code, out = cli(str(src), str(tmp_path / "ro"), capsys=capsys)
    assert code == 2 and f"OUT {tmp_path / 'ro'}: {tmp_path / 'ro'} is not writable" in out


class _FullFile:
    """A file object on a full disk."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_disk_full_while_writing_the_journal_index_or_manifest(tmp_path, capsys, monkeypatch):
    src = small_tree(tmp_path / "src")
    out = tmp_path / "out"

    def full_open(match: str):
        def opener(path, *args, **kw):
            f = open(path, *args, **kw)
            return _FullFile(f) if match in str(path) else f
        return opener

    monkeypatch.setattr(sharding, "open", full_open("journal.jsonl"), raising=False)
    code, text = cli(str(src), str(out), "--workers", "1", capsys=capsys)
    assert code == 2 and f"disk full while writing the shard journal {out / STATE_DIR / 'journal.jsonl'} (" in text
    monkeypatch.undo()

    monkeypatch.setattr(shard_format, "open", full_open(".idx."), raising=False)
    code, text = cli(str(src), str(out), "--workers", "1", capsys=capsys)
    assert code == 2 and "failed: disk full while writing shard" in text and "Traceback" not in text
    monkeypatch.undo()

    real_write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left")) if "manifest.json" in self.name else real_write_bytes(self, data))
    code, text = cli(str(src), str(out), "--workers", "1", capsys=capsys)
    assert code == 2 and f"disk full while writing manifest {out / 'manifest.json'} (" in text
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    code, text = cli(str(src), str(out), "--workers", "1", capsys=capsys)  # space freed: the same command finishes
    assert code == 0 and verify(out).ok, text


def devkit_tar(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n" * 4000),
                           ("ILSVRC2012_devkit_t12/data/meta.mat", os.urandom(20000))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_damaged_devkit_archive_is_named(tmp_path):
    whole = devkit_tar(tmp_path)
    for damaged in (whole[: len(whole) // 2], whole[:4] + os.urandom(len(whole) - 4), gzip.compress(b"x" * 100)):
        path = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
        path.write_bytes(damaged)
        with pytest.raises(LabelsError, match=f"^{path}"):
            load_val_labels(path)
    path.write_bytes(whole)  # complete, but its meta.mat is not a MAT file
    with pytest.raises(LabelsError, match="is not a MATLAB 5 MAT file"):
        load_val_labels(path)


def test_labels_files_utf8_errors_bom_and_folders(tmp_path, capsys):
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_bytes(b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n"
                    b"ILSVRC2012_val_00000002,n0\xe9751748 1 2 3 4\n")
    with pytest.raises(LabelsError, match=f"^{csv}:3: not valid UTF-8 \\(byte 0xe9 at column 27\\); save the file as "
                                          "UTF-8"):
        load_val_labels(csv)
    csv.write_bytes(b"\xef\xbb\xbfImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n")
    labels = load_val_labels(csv)  # a byte-order mark, as spreadsheet programs write one
    assert labels.format == "kaggle" and labels.by_stem == {"ILSVRC2012_val_00000001": "n01751748"}
    src = tmp_path / "val"
    src.mkdir()
    (src / "ILSVRC2012_val_00000001.JPEG").write_bytes(image_file("jpeg", 0, 0))
    code, out = cli(str(src), str(tmp_path / "out"), "--labels", str(tmp_path), capsys=capsys)
    assert code == 2 and f"--labels {tmp_path} is a folder; give the labels file itself" in out
    code, out = cli(str(src), str(tmp_path / "out"), "--labels", str(csv), "--split", "val", capsys=capsys)
    assert code == 0, out


def test_verify_with_zero_workers_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        shard_cli.main(["--verify", str(tmp_path), "--workers", "0"])
    assert info.value.code == 2 and "--workers: 0 is not allowed: give an integer >= 1" in capsys.readouterr().err


def test_shard_index_and_directory_are_fsynced_before_and_after_the_renames(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).split(".tmp")[0])
        real_fsync(fd)

    def replace(a, b):
        events.append("rename " + Path(b).name)
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with ShardWriter(tmp_path, "t", "train", 0) as w:
        w.add_sample("a-00000000", jpeg(), 0, {"src": "a", "wnid": "n0"})
        w.close()
    pid = os.getpid()
    assert events == [f"fsync .t-train-000000.tar.{pid}", f"fsync .t-train-000000.idx.{pid}",
                      "rename t-train-000000.idx", "rename t-train-000000.tar", f"fsync {tmp_path.name}"]


def test_samples_of_a_finished_run_are_all_decodable_rgb(tmp_path):
    src = small_tree(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    shard(src, out, image=ImageConfig(keep_original=True))
    m, _ = load_manifest(out)
    for rec in m.shards:
        for _, comps in read_samples(out / rec.file):
            assert check_stored(comps["jpg"]).mode == "RGB"
