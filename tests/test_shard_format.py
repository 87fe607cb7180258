"""The shard format writer: tar layout, DALI index agreement, determinism, atomicity, manifest round trip."""

import json

import pytest

from pipeline.shards.shard_format import (
    ShardFormatError,
    ShardWriter,
    check_shard_files,
    decode_label,
    iter_tar_members,
    load_manifest,
    parse_index,
    read_samples,
)
from tests.conftest import write_tiny_shards


def test_index_matches_tar_members(tiny_shards):
    folder, manifest = tiny_shards
    for rec in manifest.shards:
        flat = [c for s in parse_index(folder / rec.index) for c in s]
        members = list(iter_tar_members(folder / rec.file))
        assert [(m.name, m.offset, m.size) for m in members] == [(c.name, c.offset, c.size) for c in flat]
        assert all(c.offset % 512 == 0 for c in flat)
        assert [c.ext for c in flat[:4]] == ["jpg", "cls", "lbl", "json"]


def test_samples_read_back_with_labels(tiny_shards):
    folder, manifest = tiny_shards
    seen = []
    for rec in manifest.shards:
        for key, comps in read_samples(folder / rec.file):
            label = int(comps["cls"])
            assert decode_label(comps["lbl"]) == label
            assert json.loads(comps["json"])["wnid"] == f"c{label}"
            seen.append((key, label))
    assert seen == [(f"s{i:05d}", i % 3) for i in range(24)]
    assert manifest.num_samples == 24 and [s.samples for s in manifest.shards] == [5, 5, 5, 5, 4]


def test_byte_identical_rewrite(tmp_path):
    a = write_tiny_shards(tmp_path / "a")
    b = write_tiny_shards(tmp_path / "b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a" / a.shards[0].file).read_bytes() == (tmp_path / "b" / b.shards[0].file).read_bytes()


def test_bad_keys_and_duplicates(tmp_path):
    w = ShardWriter(tmp_path, "x", "train", 0)
    for bad in ["a.b", "a b", "", "é", "k" * 91]:
        with pytest.raises(ValueError, match="invalid sample key"):
            w.add_sample(bad, b"x", 0, {})
    w.add_sample("ok", b"x", 0, {})
    with pytest.raises(ValueError, match="duplicate sample key 'ok'"):
        w.add_sample("ok", b"x", 0, {})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_aborted_writer_leaves_nothing_under_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "x", "train", 0) as w:
            w.add_sample("a", b"x", 0, {})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_manifest_checks(tiny_shards, tmp_path):
    folder, manifest = tiny_shards
    loaded, root = load_manifest(folder)
    assert loaded.to_dict() == manifest.to_dict() and root == folder
    check_shard_files(loaded, folder)
    shard = folder / manifest.shards[2].file
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(ShardFormatError, match=r"tiny-train-000002\.tar: truncated .*--verify"):
        check_shard_files(loaded, folder)
    (folder / manifest.shards[1].index).unlink()
    with pytest.raises(ShardFormatError, match=r"tiny-train-000001\.idx: listed in the manifest but missing"):
        check_shard_files(loaded, folder)
    with pytest.raises(FileNotFoundError, match="not a shard folder"):
        load_manifest(tmp_path)
    d = manifest.to_dict() | {"format_version": 99}
    (folder / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ShardFormatError, match="format_version 99 is not supported"):
        load_manifest(folder)


def test_manifest_to_dict_equals_the_dataclass_fields(tiny_shards):
    from dataclasses import asdict, fields

    from pipeline.shards.shard_format import Manifest

    _, manifest = tiny_shards
    manifest.skipped.append({"src": "a/b.jpg", "reason": "truncated"})
    d = manifest.to_dict()
    assert set(d) == {f.name for f in fields(Manifest)}  # a new field must be added to to_dict
    assert d == asdict(manifest)
    assert list(d)[:3] == ["format", "format_version", "tool_version"]
