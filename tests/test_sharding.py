"""The sharding tool end to end (CPU, tiny generated data): labels for every input kind, skips and counts,
determinism across runs / workers / kill-and-resume, refusal of another command, DALI and webdataset read-back."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from pipeline.shards.imageproc import ImageConfig
from pipeline.shards.shard_format import decode_label, load_manifest, parse_index, read_samples
from pipeline.shards.sharding import (
    STATE_DIR,
    ShardConfig,
    ShardingError,
    build_plan,
    run_sharding,
    sample_key,
    shuffle_order,
)
from pipeline.shards.sources import SourceError
from pipeline.shards.verify import verify
from tests.shard_testdata import (
    EMPTY_WNID,
    WNIDS,
    image_file,
    make_imagefolder,
    make_tar_of_tars,
    make_val_folder,
    tar_folder,
)
from tools import shard as shard_cli

ROOT = Path(__file__).resolve().parents[1]
ALL_WNIDS = sorted((*WNIDS, EMPTY_WNID))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("src") / "train"
    return root, make_imagefolder(root)


def shard(src, out, **kw) -> tuple:
    kw.setdefault("workers", 1)
    kw.setdefault("shard_samples", 4)
    result = run_sharding(ShardConfig(src=src, out=out, **kw))
    return result, result.manifest


def samples_of(out: Path) -> dict[str, tuple[int, dict, bytes]]:
    """{src: (label, json meta, jpg bytes)} over all shards, checking cls == lbl on the way."""
    manifest, _ = load_manifest(out)
    got = {}
    for rec in manifest.shards:
        for key, comps in read_samples(out / rec.file):
            assert list(comps) == ["jpg", "cls", "lbl", "json"]
            label = int(comps["cls"])
            assert decode_label(comps["lbl"]) == label
            meta = json.loads(comps["json"])
            assert key.rsplit("-", 1)[0] and "." not in key and " " not in key
            got[meta["src"]] = (label, meta, comps["jpg"])
    return got


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_imagefolder_labels_skips_and_counts(tree, tmp_path):
    src, expected = tree
    result, m = shard(src, tmp_path / "out")
    assert [(c.index, c.wnid) for c in m.classes] == list(enumerate(ALL_WNIDS))
    counts = {c.wnid: c.samples for c in m.classes}
    assert counts[EMPTY_WNID] == 0 and any(EMPTY_WNID in w for w in result.warnings)
    got = samples_of(tmp_path / "out")
    assert set(got) == set(expected)
    for rel, (label, meta, _) in got.items():
        assert ALL_WNIDS[label] == expected[rel] == meta["wnid"]
        assert meta["reencoded"] is True and meta["src"] == rel
    assert sum(counts.values()) == len(expected)
    skipped = {s["src"]: s["reason"] for s in m.skipped}
    assert set(skipped) == {f"{WNIDS[0]}/zero.JPEG", f"{WNIDS[1]}/notes.JPEG", f"{WNIDS[2]}/truncated.JPEG"}
    assert "empty file" in skipped[f"{WNIDS[0]}/zero.JPEG"]
    assert "not an image" in skipped[f"{WNIDS[1]}/notes.JPEG"]
    assert "truncated" in skipped[f"{WNIDS[2]}/truncated.JPEG"]
    converted = {s["src"]: s["reason"] for s in m.converted}
    assert "PNG image re-encoded as JPEG" in converted[f"{WNIDS[1]}/png_named.JPEG"]
    assert "CMYK -> RGB" in converted[f"{WNIDS[2]}/cmyk.JPEG"]
    t = m.totals
    assert t["inputs"] == len(expected) + 3 == t["written"] + t["skipped"]
    assert t["written"] == len(expected) and t["skipped"] == 3 and t["converted"] == len(m.converted) == 2
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == len(expected)
    assert info["splits"]["train"]["filenames"] == [r.file for r in m.shards]
    assert [r.file for r in m.shards] == [f"train-train-{i:06d}.tar" for i in range(len(m.shards))]
    assert not (tmp_path / "out" / STATE_DIR).exists()
    assert verify(tmp_path / "out", decode=True).ok


def test_sample_keys_are_valid_and_unique():
    keys = [sample_key(rel, i) for i, rel in enumerate(["a b.c.JPEG", "a_b_c.JPEG", "caf\\xe9.JPEG", "x" * 300 + ".png", ".hidden"])]
    assert keys == ["a_b_c-00000000", "a_b_c-00000001", "caf_xe9-00000002", "x" * 64 + "-00000003", "img-00000004"]


def test_all_input_kinds_agree(tree, tmp_path):
    """The tree, a tar of it (with a top folder) and an ILSVRC-style tar of per-class tars give the same shards."""
    src, expected = tree
    tar = tar_folder(src, tmp_path / "train.tar", arcname="train")
    tot = make_tar_of_tars(src, tmp_path / "ILSVRC_like.tar")
    outs = {}
    for kind, path in (("imagefolder", src), ("imagefolder-tar", tar), ("tar-of-tars", tot)):
        _, m = shard(path, tmp_path / kind, name="d")
        assert m.options["source_kind"] == kind
        assert [c.wnid for c in m.classes] == ALL_WNIDS
        outs[kind] = m
    ref = outs["imagefolder"]
    for kind, m in outs.items():
        assert [(r.file, r.sha256) for r in m.shards] == [(r.file, r.sha256) for r in ref.shards], kind
        assert m.skipped == ref.skipped and m.converted == ref.converted
    assert set(samples_of(tmp_path / "tar-of-tars")) == set(expected)


def test_flat_val_with_labels_and_class_map(tmp_path, tree):
    src, _ = tree
    _, train = shard(src, tmp_path / "train_out")
    val = tmp_path / "val"
    wnids = make_val_folder(val)
    (val / "README.txt").write_text("not an image and not labelled")
    labels = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4" for i, w in enumerate(wnids)]
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    result, m = shard(val, tmp_path / "val_out", split="val", labels=labels, class_map=tmp_path / "train_out")
    assert [c.wnid for c in m.classes] == [c.wnid for c in train.classes]
    got = samples_of(tmp_path / "val_out")
    assert {rel: ALL_WNIDS[label] for rel, (label, _, _) in got.items()} == {
        f"ILSVRC2012_val_{i + 1:08d}.JPEG": w for i, w in enumerate(wnids)
    }
    assert m.skipped == [{"src": "README.txt", "reason": f"no label for this image in {labels}"}]
    assert m.options["labels_format"] == "kaggle" and m.totals["inputs"] == len(wnids) + 1

    # The same val images as a tar, labelled one wnid per line (sorted file-name order), class map from a text file.
    tar = tar_folder(val, tmp_path / "val.tar", arcname="val")
    order = tmp_path / "val_wnids.txt"
    order.write_text("\n".join([*wnids, "n01440764"]) + "\n")  # README.txt sorts last
    cmap = tmp_path / "synsets.txt"
    cmap.write_text("".join(f"{w} name of {w}\n" for w in ALL_WNIDS))
    _, m2 = shard(tar, tmp_path / "val_out2", split="val", labels=order, class_map=cmap)
    assert m2.options["source_kind"] == "flat-tar" and m2.options["labels_format"] == "wnids"
    assert m2.classes[0].name == f"name of {ALL_WNIDS[0]}"
    got2 = samples_of(tmp_path / "val_out2")
    assert {rel: v[0] for rel, v in got2.items() if rel != "README.txt"} == {rel: v[0] for rel, v in got.items()}
    assert [s["src"] for s in m2.skipped] == ["README.txt"] and "not an image" in m2.skipped[0]["reason"]

    with pytest.raises(ShardingError, match="lists 3 wnids but .* holds 10 files"):
        order.write_text("\n".join(wnids[:3]) + "\n")
        build_plan(ShardConfig(src=tar, out=tmp_path / "x", labels=order, class_map=cmap))


def test_deterministic_across_runs_and_workers(tree, tmp_path):
    src, _ = tree
    shard(src, tmp_path / "a", workers=1, shard_samples=3, seed=7)
    shard(src, tmp_path / "b", workers=2, shard_samples=3, seed=7)
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert len(a) >= 10 and a == b  # shards, indexes, manifest, _info.json
    _, other = shard(src, tmp_path / "c", workers=1, shard_samples=3, seed=8)
    assert [r.sha256 for r in other.shards] != [r.sha256 for r in load_manifest(tmp_path / "a")[0].shards]


def test_shard_size_plans_from_source_bytes(tree, tmp_path):
    src, _ = tree
    plan = build_plan(ShardConfig(src=src, out=tmp_path / "o", shard_size=2500))
    sizes = [sum(it.ref.size for it in s) for s in plan.shards]
    assert len(plan.shards) > 3
    for s, total in zip(plan.shards, sizes, strict=True):
        assert total <= 2500 or len(s) == 1
    # Each shard is as full as allowed: the next input would not have fitted.
    for s, nxt in zip(plan.shards, plan.shards[1:], strict=False):
        assert sum(it.ref.size for it in s) + nxt[0].ref.size > 2500


def test_refuses_other_command_resumes_same(tree, tmp_path, capsys):
    src, _ = tree
    out = tmp_path / "out"
    first, m = shard(src, out)
    again, m2 = shard(src, out)
    assert again.already_complete and m2.to_dict() == m.to_dict()
    with pytest.raises(ShardingError, match=r"different command \(quality: 90 -> 80\).*--overwrite"):
        shard(src, out, image=ImageConfig(quality=80))
    assert shard_cli.main([str(src), str(out), "--quality", "80", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    _, m3 = shard(src, out, image=ImageConfig(quality=80), overwrite=True)
    assert m3.options["quality"] == 80 and verify(out).ok
    fd = os.open(out, os.O_RDONLY)  # another run holding OUT
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ShardingError, match="another shard run is writing"):
            shard(src, out, image=ImageConfig(quality=80))
    finally:
        os.close(fd)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "mine.txt").write_text("x")
    with pytest.raises(ShardingError, match="is not empty and holds no shard run"):
        shard(src, tmp_path / "junk")


def test_complete_output_of_another_tool_version_is_kept_an_unfinished_one_refused(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "out"
    shard(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tool_version"] = "1.0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    again, m = shard(src, out)
    assert again.already_complete and m.tool_version == "1.0"
    assert any("written with the same options by tool version 1.0 (this is" in w for w in again.warnings)
    with pytest.raises(ShardingError, match=r"different command \(tool_version: '1.0' -> '.+'; quality: 90 -> 80\)"):
        shard(src, out, image=ImageConfig(quality=80))

    unfinished = tmp_path / "unfinished"
    shard(src, unfinished)
    (unfinished / "manifest.json").unlink()  # as if killed before the end
    (unfinished / STATE_DIR).mkdir()
    plan = build_plan(ShardConfig(src=src, out=unfinished, shard_samples=4))
    (unfinished / STATE_DIR / "plan.json").write_text(json.dumps({**plan.fingerprint, "tool_version": "1.0"}))
    with pytest.raises(ShardingError, match=r"holds an unfinished run of a different command \(tool_version: '1.0' -> '.+'\)"):
        shard(src, unfinished)


def test_strict_exit_code(tree, tmp_path):
    src, _ = tree
    args = [str(src), str(tmp_path / "o"), "--workers", "1", "--no-progress"]
    assert shard_cli.main(args + ["--strict"]) == 1  # three inputs are skipped
    assert shard_cli.main(args) == 0  # same command again: complete, no --strict


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_kill_9_and_resume_gives_identical_bytes(tmp_path):
    src = tmp_path / "src"
    for label, wnid in enumerate(WNIDS):
        (src / wnid).mkdir(parents=True)
        for i in range(20):
            (src / wnid / f"{i:03d}.JPEG").write_bytes(image_file("jpeg", label, i, (420, 560)))
        (src / wnid / "zero.JPEG").write_bytes(b"")  # skipped and converted inputs must survive the resume too
        (src / wnid / "png.JPEG").write_bytes(image_file("png", label, 99))
    args = [str(src), "--shard-samples", "3", "--max-side", "256", "--no-progress"]
    ref = tmp_path / "ref"
    assert shard_cli.main([args[0], str(ref), *args[1:], "--workers", "1"]) == 0

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tools.shard", args[0], str(out), *args[1:], "--workers", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    journal = out / STATE_DIR / "journal.jsonl"
    while not (journal.is_file() and journal.read_text().count("\n")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard completed within 60 s"
        time.sleep(0.005)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    # Orphaned workers stop with the main process.
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, "worker processes outlived the killed main process"
        time.sleep(0.01)
    assert not (out / "manifest.json").exists(), "the run finished before it was killed: make the data larger"
    done = journal.read_text().count("\n")
    assert 1 <= done < 22

    # The re-run writes only the missing shards and ends with the bytes of the uninterrupted run.
    result = run_sharding(ShardConfig(src=src, out=out, shard_samples=3, workers=2, image=ImageConfig(max_side=256)))
    assert (result.shards_resumed, result.shards_written) == (done, 22 - done)
    assert result.manifest.totals["skipped"] == 3 and result.manifest.totals["converted"] == 3
    assert folder_bytes(out) == folder_bytes(ref)
    assert not (out / STATE_DIR).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_webdataset_library_reads_every_sample(tree, tmp_path):
    import webdataset as wds

    src, expected = tree
    _, m = shard(src, tmp_path / "out")
    urls = [str(tmp_path / "out" / r.file) for r in m.shards]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        seen[meta["src"]] = int(sample["cls"])
        assert f"{zlib.crc32(sample['jpg']):08x}" == meta["crc32"]
    assert {rel: ALL_WNIDS[c] for rel, c in seen.items()} == expected


def test_dali_reads_every_sample_with_the_index(tree, tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    src, expected = tree
    _, m = shard(src, tmp_path / "out")
    folder = tmp_path / "out"
    want = {}
    for rec in m.shards:
        for _, comps in read_samples(folder / rec.file):
            want[hashlib.sha256(comps["jpg"]).hexdigest()] = int(comps["cls"])
    n = m.num_samples

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(folder / r.file) for r in m.shards], index_paths=[str(folder / r.index) for r in m.shards],
            ext=["jpg", "lbl"], missing_component_behavior="error", dtypes=[types.UINT8, types.INT64],
            random_shuffle=False, name="reader",
        )
        return jpg, lbl

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n == len(expected)
    got = {}
    while len(got) < n:
        jpgs, lbls = p.run()
        for i in range(len(lbls)):
            got[hashlib.sha256(jpgs.at(i).tobytes()).hexdigest()] = int(lbls.at(i)[0])
    assert got == want
    assert sum(len(parse_index(folder / r.index)) for r in m.shards) == n


def test_timm_reads_the_shards_through_info_json(tree, tmp_path):
    pytest.importorskip("timm")
    from timm.data import create_dataset

    src, expected = tree
    _, m = shard(src, tmp_path / "out", name="tiny")
    want = [int(comps["cls"]) for rec in m.shards for _, comps in read_samples(tmp_path / "out" / rec.file)]
    ds = create_dataset("wds/tiny", root=str(tmp_path / "out"), split="train", is_training=False, batch_size=1)
    got = [(img.mode, target) for img, target in ds]
    assert len(ds) == len(got) == len(expected)
    assert [t for _, t in got] == want and {mode for mode, _ in got} == {"RGB"}


def test_clear_errors_for_misuse(tree, tmp_path):
    src, _ = tree
    with pytest.raises(ShardingError, match="is inside SRC"):
        build_plan(ShardConfig(src=src, out=src / "shards"))
    tot = make_tar_of_tars(src, tmp_path / "train.tar")
    labels = tmp_path / "val.txt"
    labels.write_text("n01440764\n")
    with pytest.raises(SourceError, match="tar of per-class tars .* drop --labels"):
        build_plan(ShardConfig(src=tot, out=tmp_path / "o", labels=labels))
    val = tmp_path / "val"
    make_val_folder(val)
    with pytest.raises(ShardingError, match="no files inside class folders .* pass --labels"):
        build_plan(ShardConfig(src=val, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="name 'a b' is not usable in shard file names"):
        ShardConfig(src=src, out=tmp_path / "o", name="a b")


def test_global_shuffle_is_a_seeded_permutation():
    rels = [f"n{c:08d}/img_{i}.JPEG" for c in range(5) for i in range(40)]
    order = shuffle_order(rels, seed=0)
    assert sorted(order) == list(range(len(rels))) and order == shuffle_order(rels, seed=0)
    assert order != shuffle_order(rels, seed=1) and order != sorted(order)
    # Global, not within a buffer: the first 40 positions draw from every class.
    assert {rels[i].split("/")[0] for i in order[:40]} == {f"n{c:08d}" for c in range(5)}
    # An input's rank depends on its own path only: adding inputs does not reorder the others.
    grown = shuffle_order(rels + ["n00000009/new.JPEG"], seed=0)
    assert [i for i in grown if i < len(rels)] == order


def test_failed_shard_names_itself_and_a_torn_journal_line_is_ignored(tree, tmp_path, monkeypatch):
    import pipeline.shards.sharding as sharding

    src, _ = tree
    shard(src, tmp_path / "ref")
    real, calls = sharding.write_shard, []

    def fail_third(task):
        calls.append(task.index)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(task)

    monkeypatch.setattr(sharding, "write_shard", fail_third)
    with pytest.raises(ShardingError, match=r"shard 2 \(train-train-000002.tar\) failed: .*No space left on device"):
        shard(src, tmp_path / "out")
    monkeypatch.setattr(sharding, "write_shard", real)
    journal = tmp_path / "out" / STATE_DIR / "journal.jsonl"
    assert journal.read_text().count("\n") == 2
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    with open(journal, "a") as f:
        f.write('{"index": 5, "record": {"fi')  # a kill in the middle of a line
    result, _ = shard(src, tmp_path / "out")
    assert (result.shards_resumed, result.shards_written) == (2, len(result.manifest.shards) - 2)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")


def test_cli_sizes_and_argument_errors(tmp_path, capsys):
    assert [shard_cli.parse_size(s) for s in ("1000", "500M", "1G", "1GiB", "1.5k")] == [
        1000, 500_000_000, 1_000_000_000, 1 << 30, 1500]
    with pytest.raises(SystemExit):
        shard_cli.main(["a", "b", "--shard-size", "lots"])
    assert "is not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shard_cli.main(["--verify", "a", "b"])
    assert "--verify takes one folder" in capsys.readouterr().err
    assert shard_cli.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
