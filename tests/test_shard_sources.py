"""Input enumeration: sorted listing, classes, random access into tars (including a tar of tars), odd entries."""

from __future__ import annotations

import gzip
import os
import tarfile

import pytest

from pipeline.shards.sources import SourceError, display_path, open_source, read_item
from tests.shard_testdata import EMPTY_WNID, WNIDS, make_imagefolder, make_tar_of_tars, tar_folder


def test_display_path_is_reversible_and_printable():
    assert display_path(b"n01/caf\xc3\xa9.JPEG") == "n01/café.JPEG"
    assert display_path(b"n01/caf\xe9.JPEG") == "n01/caf\\xe9.JPEG"
    assert display_path(b"a\\xe9") == "a\\\\xe9"  # a literal backslash cannot be confused with an escape


def test_folder_tar_and_tar_of_tars_list_the_same_items_with_exact_bytes(tmp_path):
    root = tmp_path / "train"
    expected = make_imagefolder(root)
    listings = [
        open_source(root),
        open_source(tar_folder(root, tmp_path / "t.tar", arcname="./some/top")),
        open_source(make_tar_of_tars(root, tmp_path / "ILSVRC2012_img_train.tar")),
    ]
    assert [lst.kind for lst in listings] == ["imagefolder", "imagefolder-tar", "tar-of-tars"]
    assert listings[1].root_prefix == "some/top/"
    for lst in listings:
        assert lst.groups == sorted((*WNIDS, EMPTY_WNID))
        rels = [it.rel for it in lst.items]
        assert rels == [it.rel for it in listings[0].items]  # same sorted order whatever the container
        assert set(expected) <= set(rels) and len(rels) == len(expected) + 3
        handles = {}
        for it in lst.items:
            raw = it.rel.replace("\\xe9", "\udce9")  # the one non-UTF-8 name, back to a file system name
            assert read_item(it.ref, handles) == (root / raw).read_bytes(), it.rel
            assert it.group == it.rel.split("/")[0]
        for f in handles.values():
            f.close()
    assert all(it.ref.in_container for it in listings[2].items)


def test_tar_with_a_single_class_folder_and_stray_files(tmp_path):
    one = tmp_path / "x" / "n01"
    one.mkdir(parents=True)
    (one / "a.jpg").write_bytes(b"a")
    os.symlink("a.jpg", one / "link.jpg")  # stored in the tar as a symbolic link member
    lst = open_source(tar_folder(tmp_path / "x", tmp_path / "one.tar", arcname="x"))
    assert lst.groups == ["n01"] and [(i.rel, i.group) for i in lst.items] == [("n01/a.jpg", "n01")]
    assert [(s.rel, s.reason) for s in lst.skipped] == [("n01/link.jpg", "not a regular file (symbolic link)")]

    root = tmp_path / "tree"
    (root / "n02").mkdir(parents=True)
    (root / "n02" / "b.jpg").write_bytes(b"b")
    (root / "README").write_text("stray")
    os.symlink("/nonexistent/target", root / "n02" / "dangling.jpg")
    lst = open_source(root)
    assert [i.rel for i in lst.items] == ["n02/b.jpg"]
    assert {(s.rel, s.reason.split(" (")[0]) for s in lst.skipped} == {
        ("README", "not inside a class folder"), ("n02/dangling.jpg", "cannot read")}


def test_symlinked_class_folders_are_followed_once(tmp_path):
    real = tmp_path / "real" / "n01"
    real.mkdir(parents=True)
    (real / "a.jpg").write_bytes(b"a")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(real, root / "n01")
    os.symlink(root, real / "loop")  # a link back up must not recurse forever
    lst = open_source(root)
    assert [i.rel for i in lst.items] == ["n01/a.jpg"]


def test_refuses_compressed_tars_and_missing_sources(tmp_path):
    make_imagefolder(tmp_path / "t", odd=False, bad=False)
    plain = tar_folder(tmp_path / "t", tmp_path / "a.tar", "t")
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(SourceError, match="gzip-compressed tar: compressed tars cannot be read by seeking"):
        open_source(gz)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no files"):
        open_source(tmp_path / "empty")


def test_inner_tar_offsets_are_absolute_in_the_outer_file(tmp_path):
    root = tmp_path / "r"
    (root / "n01").mkdir(parents=True)
    (root / "n01" / "x.JPEG").write_bytes(b"0123456789" * 100)
    outer = make_tar_of_tars(root, tmp_path / "o.tar")
    (item,) = open_source(outer).items
    with open(outer, "rb") as f:
        f.seek(item.ref.offset)
        assert f.read(item.ref.size) == b"0123456789" * 100
    with tarfile.open(outer) as tf:
        inner = tf.getmember("n01.tar")
    assert inner.offset_data < item.ref.offset < inner.offset_data + inner.size
