"""`./launch.sh bench pipeline` end to end on tiny data: every row measured, JSON as documented."""

from __future__ import annotations

import argparse
import json
import tarfile

import pytest
from PIL import Image

from tests.conftest import make_image, write_tiny_shards
from tools.bench import pipeline as bench
from tools.bench.__main__ import main as bench_main


def make_imagefolder(root, classes: int = 3, per_class: int = 4) -> None:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(make_image(c, i, 40, 48)).save(root / f"c{c}" / f"img{i}.jpg", quality=90)


def test_imagefolder_root_accepts_a_folder_or_a_tar_of_one(tmp_path):
    make_imagefolder(tmp_path / "src" / "top")
    with tarfile.open(tmp_path / "src.tar", "w") as tf:
        tf.add(tmp_path / "src" / "top", arcname="top")
    assert bench.imagefolder_root(str(tmp_path / "src"), str(tmp_path / "cache")) == tmp_path / "src" / "top"
    root = bench.imagefolder_root(str(tmp_path / "src.tar"), str(tmp_path / "cache"))
    assert root == tmp_path / "cache" / "src" / "top" and sorted(p.name for p in root.iterdir()) == ["c0", "c1", "c2"]
    assert bench.imagefolder_root(str(tmp_path / "src.tar"), str(tmp_path / "cache")) == root  # extracted once


def test_bench_pipeline_reports_every_row(tmp_path):
    write_tiny_shards(tmp_path / "shards", num_samples=12, num_classes=3, per_shard=5, size=(40, 48))
    make_imagefolder(tmp_path / "images")
    out = tmp_path / "bench.json"
    rc = bench_main(["pipeline", "--data", str(tmp_path / "shards"), "--imagefolder", str(tmp_path / "images"),
                     "--batch-size", "4", "--img-size", "16", "--threads", "1", "--device", "cpu", "--images", "8",
                     "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    for prefix in ("(a) crop-decode loader (decode=cpu)", "(a') DALI pipeline (decode=dali-cpu)", "(b) torch",
                   "(c) original recipe", "(c') original recipe", "ceiling: PIL full decode of the stored",
                   "ceiling: DALI CPU decode", "crop-decode 1:", "crop-decode 4:", "alt 2: DALI image_random_crop",
                   "alt 3: PIL", "dali 4:", "(e) eval: crop-decode", "(e') eval: DALI"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    for row in report["rows"]:
        assert row["images_per_sec"] > 0 and row["cpu_ms_per_image"] > 0
    recipe = next(r for r in report["rows"] if r["name"].startswith("(c)"))
    assert recipe["x_recipe"] == 1.0
    assert all(r["x_recipe"] is None for r in report["rows"] if r["name"].startswith("(e"))  # the recipe trains
    assert report["machine"]["cpu_cores"] >= 1 and report["settings"]["threads"] == 1


def test_bench_config_validation():
    ns = argparse.Namespace(data="d", imagefolder="i", batch_size=4, img_size=16, threads=1, device="cpu",
                            images=8, rows="dali,nope", cache="/tmp", warmup=None, repeats=None)
    with pytest.raises(ValueError, match="rows \\['nope'\\] unknown"):
        bench.PipelineBenchConfig.from_args(ns)
