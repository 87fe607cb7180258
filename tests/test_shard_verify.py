"""`shard --verify`: a clean folder passes; flipped bytes, truncation, bad headers, undecodable images and
inconsistent totals are each reported with the shard and sample, and the CLI exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline.shards.sharding as sharding
from pipeline.shards.imageproc import ProcessedImage
from pipeline.shards.shard_format import load_manifest, parse_index, read_samples
from pipeline.shards.sharding import ShardConfig, run_sharding
from pipeline.shards.verify import verify
from tests.shard_testdata import make_imagefolder
from tools import shard as shard_cli


@pytest.fixture
def out(tmp_path) -> Path:
    src = tmp_path / "src"
    make_imagefolder(src, per_class=3, odd=False, bad=False)
    run_sharding(ShardConfig(src=src, out=tmp_path / "out", name="t", shard_samples=3, workers=1))
    return tmp_path / "out"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _messages(report) -> list[str]:
    return [str(p) for p in report.problems]


def test_clean_folder_passes(out, capsys):
    report = verify(out, decode=True, workers=2)
    assert report.ok and report.shards == 3 and report.samples == report.decoded == 9
    assert shard_cli.main(["--verify", str(out), "--decode", "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_in_an_image_names_shard_and_sample(out, capsys):
    shard = "t-train-000001"
    sample = parse_index(out / f"{shard}.idx")[1]
    jpg = sample[0]
    key = jpg.name.split(".")[0]
    _flip(out / f"{shard}.tar", jpg.offset + jpg.size // 2)
    msgs = _messages(verify(out))
    assert f"{shard}.tar sample {key}: jpg bytes differ from the crc32 recorded in its json (the image is corrupted)" in msgs
    assert f"{shard}.tar: sha256 differs from the manifest" in msgs
    assert len(msgs) == 2
    assert shard_cli.main(["--verify", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert key in printed and "FAILED" in printed


def test_flipped_label_byte_and_header_byte(out):
    shard = "t-train-000000"
    sample = parse_index(out / f"{shard}.idx")[2]
    lbl = sample[2]
    _flip(out / f"{shard}.tar", lbl.offset)  # the int64 label no longer equals the .cls text
    msgs = _messages(verify(out))
    assert any(m.startswith(f"{shard}.tar sample {lbl.name.split('.')[0]}: lbl ") for m in msgs)

    shard = "t-train-000002"
    first = parse_index(out / f"{shard}.idx")[0][0]
    _flip(out / f"{shard}.tar", first.offset - 512 + 3)  # inside the first member's name: header checksum fails
    msgs = _messages(verify(out))
    assert any(m.startswith(f"{shard}.tar: corrupt tar header at byte 0") for m in msgs)


def test_truncated_shard_names_the_cut_sample(out):
    shard = "t-train-000001"
    last = parse_index(out / f"{shard}.idx")[-1]
    jpg = last[0]
    tar = out / f"{shard}.tar"
    tar.write_bytes(tar.read_bytes()[: jpg.offset + 100])
    msgs = _messages(verify(out))
    key = jpg.name.split(".")[0]
    assert any(m.startswith(f"{shard}.tar: truncated: {jpg.offset + 100} bytes, manifest says") for m in msgs)
    assert f"{shard}.tar sample {key}: member {jpg.name} is cut off at byte {jpg.offset + 100}: the file ends there (truncated shard)" in msgs
    assert any(f"4 indexed members from {jpg.name} on are missing" in m for m in msgs)


def test_missing_index_and_inconsistent_manifest(out):
    (out / "t-train-000000.idx").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["totals"]["written"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    msgs = _messages(verify(out))
    assert "t-train-000000.tar: t-train-000000.idx is missing" in msgs
    assert any("totals.written 10 but the shards list 9 samples" in m for m in msgs)
    assert any("totals do not reconcile" in m for m in msgs)
    assert not any(m.startswith("_info.json") for m in msgs)  # it lists shards, which did not change


def test_decode_catches_an_image_that_hashes_right_but_does_not_decode(tmp_path, monkeypatch):
    real = sharding.process_image
    calls, broken = [], []

    def broken_fourth(data, cfg):
        calls.append(1)
        out = real(data, cfg)
        if len(calls) == 4:
            broken.append(data)
            return ProcessedImage(out.jpeg[: len(out.jpeg) // 2], out.width, out.height, True, False)
        return out

    monkeypatch.setattr(sharding, "process_image", broken_fourth)
    src = tmp_path / "src"
    make_imagefolder(src, per_class=2, odd=False, bad=False)
    run_sharding(ShardConfig(src=src, out=tmp_path / "out", name="t", shard_samples=2, workers=1))
    assert verify(tmp_path / "out").ok  # structure and hashes are fine
    msgs = _messages(verify(tmp_path / "out", decode=True))
    assert len(msgs) == 1 and "jpg does not decode: truncated" in msgs[0]
    manifest, folder = load_manifest(tmp_path / "out")
    where = [(rec.file, key) for rec in manifest.shards for key, comps in read_samples(folder / rec.file)
             if (src / json.loads(comps["json"])["src"]).read_bytes() == broken[0]]
    assert len(where) == 1 and msgs[0].startswith(f"{where[0][0]} sample {where[0][1]}: ")
