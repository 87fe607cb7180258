"""Every `./launch.sh bench` subcommand whose own test does not check it writes the common JSON fields and a
Markdown table through the real entry point (`shard`, `pipeline`, `trainer_overhead`; `model` and `kernels` are
checked in test_kernels_bench.py, `e2e` and `compute` in their own tests). Tiny sizes; speed is never asserted."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import make_image, write_tiny_shards
from tests.shard_testdata import make_imagefolder
from tools.bench.__main__ import SUBCOMMANDS
from tools.bench.__main__ import main as bench_main

COMMON_FIELDS = {"benchmark", "machine", "settings", "columns", "rows", "notes"}
MACHINE_FIELDS = {"date", "host", "cpu", "cpu_cores", "gpu", "python", "torch", "triton", "dali", "timm"}


def _check(tmp_path, argv: list[str]) -> dict:
    assert bench_main([*argv, "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert COMMON_FIELDS <= set(data) and MACHINE_FIELDS <= set(data["machine"])
    assert data["rows"] and all(set(row) == set(data["columns"]) for row in data["rows"])
    md = (tmp_path / "r.md").read_text()
    assert md.startswith(f"### {data['benchmark']}") and "Machine: " in md
    assert "| " + " | ".join(data["columns"]) + " |" in md
    return data


def test_every_subcommand_is_registered():
    for name in SUBCOMMANDS:
        assert __import__(f"tools.bench.{name}", fromlist=["run"]).run


def test_bench_shard_common_fields(tmp_path):
    make_imagefolder(tmp_path / "data", per_class=2, odd=False, bad=False)
    data = _check(tmp_path, ["shard", "--data", str(tmp_path / "data"), "--workers", "1", "--shard-samples", "4",
                             "--workdir", str(tmp_path), "--warmup", "0", "--repeats", "1"])
    assert "shard" in data["benchmark"]  # named "shard" (the others: "bench <name>")


def test_bench_pipeline_common_fields(tmp_path):
    write_tiny_shards(tmp_path / "shards", num_samples=8, num_classes=2, per_shard=8, size=(24, 28))
    for c in range(2):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(make_image(c, i, 24, 28)).save(tmp_path / "images" / f"c{c}" / f"{i}.jpg", quality=90)
    data = _check(tmp_path, ["pipeline", "--data", str(tmp_path / "shards"), "--imagefolder",
                             str(tmp_path / "images"), "--batch-size", "4", "--img-size", "16", "--threads", "1",
                             "--device", "cpu", "--images", "4", "--rows", "dali,recipe", "--warmup", "0",
                             "--repeats", "1"])
    assert data["settings"]["threads"] == 1


@pytest.mark.slow
def test_bench_trainer_overhead_common_fields(tmp_path):
    data = _check(tmp_path, ["trainer_overhead", "--models", "supmae_vit_tiny_patch16", "--img-size", "16",
                             "--patch-size", "8", "--batch-size", "2", "--steps", "2", "--warmup", "0",
                             "--log-every", "1"])
    assert data["rows"][0]["pairs"] == 2
