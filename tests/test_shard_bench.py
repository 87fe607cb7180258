"""`./launch.sh bench shard` runs end to end on tiny generated data and reports every measurement (no timing asserts)."""

import argparse

from tests.shard_testdata import make_imagefolder
from tools.bench import shard as bench_shard


def test_bench_shard_reports_all_rows(tmp_path):
    make_imagefolder(tmp_path / "data", per_class=3, odd=False, bad=False)
    args = argparse.Namespace(data=str(tmp_path / "data"), workers="1", shard_samples=4, workdir=str(tmp_path),
                              warmup=0, repeats=1)
    report = bench_shard.run(args)
    methods = [r["method"] for r in report.rows]
    assert methods == [
        "tar -cf, all files", "tar -cf, qualifying files", "tar -cf + fsync, qualifying files",
        "decode+encode, 1 core", "shard, re-encode (default)", "shard --keep-original, qualifying",
        "  same, vs tar -cf + fsync", "shard --keep-original, all files", "PIL decode, original files",
        "PIL decode, re-encoded (default)",
    ]
    rows = {r["method"]: r for r in report.rows}
    assert rows["tar -cf, all files"]["files"] == 9 == rows["tar -cf, qualifying files"]["files"]
    assert all(r["seconds"] > 0 for r in report.rows)
    assert rows["shard, re-encode (default)"]["met"] in (True, False)
    assert "9 files" in report.notes[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # scratch folder removed


def test_bench_shard_defaults_to_one_shard_per_worker(tmp_path):
    make_imagefolder(tmp_path / "data", per_class=2, odd=False, bad=False)
    args = argparse.Namespace(data=str(tmp_path / "data"), workers="1", shard_samples=None, workdir=str(tmp_path),
                              warmup=0, repeats=1)
    report = bench_shard.run(args)
    assert report.settings["shard_samples"] == "one shard per worker"
    assert "shards: one per worker (files / workers samples each)" in report.notes[1]
