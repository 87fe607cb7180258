"""Validation label formats, the MAT v5 reader for the devkit's meta.mat, class maps, and val sharding with them."""

from __future__ import annotations

import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from pipeline.shards.shard_format import read_samples
from pipeline.shards.sharding import ShardConfig, run_sharding
from pipeline.shards.val_labels import (
    LabelsError,
    detect_format,
    load_class_map,
    load_val_labels,
    read_mat,
)
from tests.conftest import write_tiny_shards
from tests.shard_testdata import make_val_folder

# ---------------------------------------------------------------------------------------------------------------
# A minimal MATLAB v5 writer, enough to build a devkit-like meta.mat (struct array of numbers and strings).


def _el(typ: int, data: bytes, small: bool = False) -> bytes:
    if small:  # "small data element": size and type packed in the tag, data in the next 4 bytes
        assert len(data) <= 4
        return struct.pack("<I", (len(data) << 16) | typ) + data.ljust(4, b"\0")
    return struct.pack("<II", typ, len(data)) + data + b"\0" * (-len(data) % 8)


def _matrix(cls: int, dims: list[int], body: bytes, name: str = "") -> bytes:
    head = _el(6, struct.pack("<II", cls, 0)) + _el(5, struct.pack(f"<{len(dims)}i", *dims)) + _el(1, name.encode())
    return _el(14, head + body)


def mat_double(v: float) -> bytes:
    if float(v).is_integer() and 0 <= v < 65536:  # MATLAB stores integral doubles in the smallest integer type
        return _matrix(6, [1, 1], _el(4, struct.pack("<H", int(v)), small=True))
    return _matrix(6, [1, 1], _el(9, struct.pack("<d", v)))


def mat_char(s: str) -> bytes:
    return _matrix(4, [1, len(s)], _el(4, s.encode("utf-16-le")))


def mat_empty() -> bytes:
    return _matrix(6, [0, 0], _el(9, b""))


def mat_struct_array(name: str, rows: list[dict[str, bytes]]) -> bytes:
    fields = list(rows[0])
    body = _el(5, struct.pack("<i", 32), small=True) + _el(1, b"".join(f.encode().ljust(32, b"\0") for f in fields))
    body += b"".join(row[f] for row in rows for f in fields)
    return _matrix(2, [1, len(rows)], body, name)


def write_meta_mat(path: Path, synsets: list[tuple[int, str, str, int]], compress: bool = True) -> Path:
    """synsets: (ILSVRC2012_ID, WNID, words, num_children) in meta.mat order."""
    rows = [
        {"ILSVRC2012_ID": mat_double(i), "WNID": mat_char(w), "words": mat_char(words),
         "num_children": mat_double(n), "children": mat_empty()}
        for i, w, words, n in synsets
    ]
    element = mat_struct_array("synsets", rows)
    if compress:
        z = zlib.compress(element)
        element = struct.pack("<II", 15, len(z)) + z
    header = b"MATLAB 5.0 MAT-file, written by the supmae-fast tests".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"
    path.write_bytes(header + element)
    return path


# meta.mat order is WordNet order, not sorted-wnid order; 900 is a non-leaf synset (has children).
SYNSETS = [(1, "n03000003", "third", 0), (2, "n01000001", "first, one", 0), (3, "n02000002", "second", 0),
           (900, "n09999999", "an inner node", 3)]


@pytest.mark.parametrize("compress", [True, False])
def test_read_mat_round_trip(tmp_path, compress):
    meta = read_mat(write_meta_mat(tmp_path / "meta.mat", SYNSETS, compress).read_bytes())
    assert meta["synsets"][1] == {"ILSVRC2012_ID": 2, "WNID": "n01000001", "words": "first, one", "num_children": 0,
                                  "children": []}
    assert [s["ILSVRC2012_ID"] for s in meta["synsets"]] == [1, 2, 3, 900]
    with pytest.raises(LabelsError, match="not a MATLAB 5 MAT file"):
        read_mat(b"hello" * 40)
    with pytest.raises(LabelsError, match="7.3"):
        read_mat(b"\x89HDF\r\n\x1a\n" + bytes(200))


def test_devkit_ground_truth_maps_through_meta_mat(tmp_path):
    gt = tmp_path / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.parent.mkdir()
    gt.write_text("1\n3\n2\n1\n")
    with pytest.raises(LabelsError, match="meta.mat .*--meta"):
        load_val_labels(gt)
    write_meta_mat(gt.parent / "meta.mat", SYNSETS)
    labels = load_val_labels(gt)
    assert labels.format == "devkit"
    assert labels.by_stem == {"ILSVRC2012_val_00000001": "n03000003", "ILSVRC2012_val_00000002": "n02000002",
                              "ILSVRC2012_val_00000003": "n01000001", "ILSVRC2012_val_00000004": "n03000003"}
    assert [(c.index, c.wnid, c.name) for c in labels.classes] == [
        (0, "n01000001", "first, one"), (1, "n02000002", "second"), (2, "n03000003", "third")]
    # The devkit tarball works as --labels too.
    tgz = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(gt.parent, arcname="ILSVRC2012_devkit_t12/data")
    assert load_val_labels(tgz).by_stem == labels.by_stem
    gt.write_text("1\n7\n")
    with pytest.raises(LabelsError, match=r"ground_truth.txt:2: '7' is not an ILSVRC2012_ID"):
        load_val_labels(gt)


def test_devkit_facts_check_val_1_is_index_65(tmp_path):
    """FACTS section 5: val_00000001 -> ID 490 -> n01751748 -> index 65 (65 of the 1,000 wnids sort before it)."""
    wnids = [f"n0100{i:04d}" for i in range(65)] + ["n01751748"] + [f"n0200{i:04d}" for i in range(934)]
    ids = list(range(1, 1001))
    random.Random(0).shuffle(ids)
    ids.remove(490)
    ids.insert(65, 490)
    synsets = [(i, w, w, 0) for i, w in zip(ids, wnids, strict=True)]
    random.Random(1).shuffle(synsets)  # meta.mat order is not sorted-wnid order
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n")
    labels = load_val_labels(gt, meta=write_meta_mat(tmp_path / "m.mat", synsets))
    wnid = labels.by_stem["ILSVRC2012_val_00000001"]
    assert wnid == "n01751748" and [c.wnid for c in labels.classes].index(wnid) == 65


def test_caffe_kaggle_and_wnid_list(tmp_path):
    cmap = tmp_path / "synset_words.txt"
    cmap.write_text("n01000001 first\nn02000002 second\nn03000003\n")
    classes = load_class_map(cmap)
    assert [(c.index, c.wnid, c.name) for c in classes] == [(0, "n01000001", "first"), (1, "n02000002", "second"),
                                                           (2, "n03000003", None)]
    caffe = tmp_path / "val.txt"
    caffe.write_text("ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 0\n")
    assert load_val_labels(caffe, classes=classes).by_stem == {
        "ILSVRC2012_val_00000001": "n03000003", "ILSVRC2012_val_00000002": "n01000001"}
    with pytest.raises(LabelsError, match="--class-map"):
        load_val_labels(caffe)
    caffe.write_text("ILSVRC2012_val_00000001.JPEG 3\n")
    with pytest.raises(LabelsError, match=r"val.txt:1: class index 3 out of range for 3 classes"):
        load_val_labels(caffe, classes=classes)

    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n02000002 1 2 3 4 n02000002 5 6 7 8 \n"
                      "ILSVRC2012_val_00000001,n01000001 0 0 9 9 \n")
    assert load_val_labels(kaggle).by_stem == {"ILSVRC2012_val_00000001": "n01000001",
                                               "ILSVRC2012_val_00000002": "n02000002"}
    kaggle.write_text(kaggle.read_text() + "ILSVRC2012_val_00000001,n03000003 0 0 1 1\n")
    with pytest.raises(LabelsError, match="labelled twice"):
        load_val_labels(kaggle)

    order = tmp_path / "wnids.txt"
    order.write_text("n02000002\nn01000001\n")
    assert load_val_labels(order).in_order == ["n02000002", "n01000001"]

    for path, fmt in ((caffe, "caffe"), (kaggle, "kaggle"), (order, "wnids")):
        assert detect_format(path) == fmt


def test_class_map_from_a_train_shard_folder(tmp_path):
    write_tiny_shards(tmp_path / "train", num_classes=3)
    assert [(c.index, c.wnid) for c in load_class_map(tmp_path / "train")] == [(0, "c0"), (1, "c1"), (2, "c2")]
    assert [c.wnid for c in load_class_map(tmp_path / "train" / "manifest.json")] == ["c0", "c1", "c2"]
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(LabelsError, match="dup.txt:3: class 'a' listed twice"):
        load_class_map(dup)


@pytest.mark.parametrize("fmt", ["devkit", "caffe"])
def test_val_sharding_with_devkit_and_caffe_labels(tmp_path, fmt):
    synsets = [(1, "n01484850", "great white shark", 0), (2, "n01440764", "tench", 0), (3, "n01443537", "goldfish", 0)]
    wnids = make_val_folder(tmp_path / "val")  # WNIDS of tests.shard_testdata: one of the three above
    by_wnid = {w: i for i, w, _, _ in synsets}
    sorted_wnids = sorted(by_wnid)
    if fmt == "devkit":
        labels = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
        labels.write_text("".join(f"{by_wnid[w]}\n" for w in wnids))
        write_meta_mat(tmp_path / "meta.mat", synsets)
        extra = {}
    else:
        labels = tmp_path / "val.txt"
        labels.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {sorted_wnids.index(w)}\n" for i, w in enumerate(wnids)))
        cmap = tmp_path / "synsets.txt"
        cmap.write_text("\n".join(sorted_wnids) + "\n")
        extra = {"class_map": cmap}
    m = run_sharding(ShardConfig(src=tmp_path / "val", out=tmp_path / "out", split="val", labels=labels,
                                 workers=1, **extra)).manifest
    assert m.options["labels_format"] == fmt
    assert [c.wnid for c in m.classes] == sorted_wnids
    if fmt == "devkit":
        assert [c.name for c in m.classes] == ["tench", "goldfish", "great white shark"]
    got = {}
    for rec in m.shards:
        for _, comps in read_samples(tmp_path / "out" / rec.file):
            got[comps["json"].decode()] = int(comps["cls"])
    assert {json.loads(k)["src"]: v for k, v in got.items()} == {
        f"ILSVRC2012_val_{i + 1:08d}.JPEG": sorted_wnids.index(w) for i, w in enumerate(wnids)}
