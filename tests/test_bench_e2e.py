"""`./launch.sh bench e2e` at tiny sizes on CPU: the real trainer on real shards, JSON / Markdown as documented
(speed is measured, never asserted), and the window arithmetic on hand-made records."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_tiny_shards
from tools.bench.__main__ import main as bench_main
from tools.bench.e2e import COLUMNS, windows

TINY = ["--img-size", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32",
        "--decoder-num-heads", "2", "--cls-hidden", "32", "--data-threads", "1", "--shuffle-buffer", "16"]
COMMON_FIELDS = {"benchmark", "machine", "settings", "columns", "rows", "notes"}
MACHINE_FIELDS = {"date", "host", "cpu", "cpu_cores", "gpu", "python", "torch", "triton", "dali", "timm"}


def test_bench_e2e_tiny_writes_json_and_markdown(tmp_path):
    data = tmp_path / "shards"
    write_tiny_shards(data, num_samples=40, num_classes=3, per_shard=8, size=(24, 28))  # 10 steps of 4 per epoch
    argv = ["e2e", "--data", str(data), "--recipes", "supmae_vit_tiny_demo,mae_vit_tiny_demo", "--batch-size", "4",
            "--steps", "3", "--warmup", "1", "--repeats", "4", "--device", "cpu", "--json", str(tmp_path / "e.json"),
            "--markdown", str(tmp_path / "e.md"), "--", *TINY]
    assert bench_main(argv) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert COMMON_FIELDS <= set(report) and MACHINE_FIELDS <= set(report["machine"])
    assert report["benchmark"] == "bench e2e" and report["columns"] == COLUMNS
    assert report["settings"]["steps_per_repeat"] == 3 and report["settings"]["repeats"] == 4
    assert [r["model"] for r in report["rows"]] == ["supmae_vit_tiny_demo", "mae_vit_tiny_demo"]
    for row in report["rows"]:
        # 15 steps = 1.5 epochs: the epoch end at step 10 splits a window, which is merged back.
        assert row["steps"] == 12 and row["batch"] == 4
        assert row["images/s"] > 0 and row["model images/s"] > 0
        assert row["e2e / model"] == pytest.approx(row["images/s"] / row["model images/s"])
        assert 0 <= float(row["data wait"].rstrip("%")) <= 100 and row["MFU"] is None  # CPU: no peak figure
        assert row["config"] == "fp32 reference uint8-NHWC dali"
    md = (tmp_path / "e.md").read_text()
    assert md.startswith("### bench e2e") and "| model | config | batch | steps | images/s |" in md


def _rec(step: int, images_per_sec: float, seconds: float, wait: float) -> dict:
    return {"kind": "train", "step": step, "images_per_sec": images_per_sec, "interval_seconds": seconds,
            "data_wait": wait, "tflops_per_device": 0.5, "mfu": None}


def test_windows_merge_intervals_cut_by_an_epoch_end():
    records = [
        _rec(5, 100.0, 1.0, 0.5),  # warm-up window (steps 1-5): dropped
        _rec(10, 50.0, 2.0, 0.0),  # window 1
        _rec(12, 40.0, 1.0, 0.3),  # window 2, cut by an epoch end at step 12 ...
        _rec(15, 30.0, 3.0, 0.1),  # ... and its other part
        {"kind": "eval", "step": 15},
    ]
    out = windows(records, warmup_steps=5, steps=5)
    assert len(out) == 2
    assert out[0]["images"] == 100.0 and out[0]["seconds"] == 2.0 and out[0]["images_per_sec"] == 50.0
    # (40 x 1 + 30 x 3) images / 4 s; wait weighted by seconds: (0.3 x 1 + 0.1 x 3) / 4
    assert out[1]["images_per_sec"] == pytest.approx(130 / 4)
    assert out[1]["data_wait"] == pytest.approx(0.6 / 4)
    assert out[1]["mfu"] is None and out[1]["tflops"] == pytest.approx(0.5)


def test_bench_e2e_rejects_bad_settings(tmp_path, capsys):
    write_tiny_shards(tmp_path / "s", num_samples=8, num_classes=2, per_shard=8)
    assert bench_main(["e2e", "--data", str(tmp_path / "s"), "--recipes", "supmae_vit_tiny_demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert bench_main(["e2e", "--data", str(tmp_path / "s"), "--recipes", "supmae_tiny"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
