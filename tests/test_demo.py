"""`./launch.sh demo --quick` end to end on CPU: built-in data -> shards -> SupMAE and MAE pre-trained with the real
pipeline and trainer -> k-NN -> report, plots and throughput; a second run reuses everything."""

from __future__ import annotations

import json

import pytest
import torch

from tools.demo import DemoConfig, main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_resumes(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "demo"
        assert main(["--quick", "--out", str(out), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        report = json.loads((out / "report" / "report.json").read_text())
        assert report["benchmark"] == "demo" and report["settings"]["quick"] is True
        assert {"machine", "settings", "columns", "rows", "notes", "tables", "statements", "plots"} <= set(report)
        # Both methods: the untrained weights and the 2-point grid up to the 2-epoch budget (= the schedule's end);
        # 96 images / batch 16 = 6 steps per epoch.
        assert [(r["method"], r["step"]) for r in report["rows"]] == [
            ("SupMAE", 0), ("SupMAE", 6), ("SupMAE", 12), ("MAE", 0), ("MAE", 6), ("MAE", 12)]
        throughput = report["tables"]["throughput"]["rows"]
        assert [r["what"].split(":")[0].split(" (")[0] for r in throughput] == [
            "data pipeline alone", "SupMAE training step alone", "SupMAE training loop",
            "MAE training step alone", "MAE training loop"]
        assert all(r["images/s"] > 0 for r in throughput)
        assert len(report["statements"]) == 2 and all(p.endswith(".png") for p in report["plots"])
        for p in report["plots"]:
            assert open(p, "rb").read(8) == PNG
        manifest = json.loads((out / "shards" / "val" / "manifest.json").read_text())
        assert sum(s["samples"] for s in manifest["shards"]) == 24 and len(manifest["classes"]) == 4
        assert "SupMAE: k-NN top-1" in printed and "demo finished in" in printed
        assert "report:" in printed and "accuracy_vs_compute_knn.png" in printed

        # Again: data, shards, runs and evaluations are reused; nothing is trained.
        assert main(["--quick", "--out", str(out), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        assert "(already made)" in printed and "(already complete)" in printed
        assert any("0 s training and 0 s k-NN" in n for n in
                   json.loads((out / "report" / "report.json").read_text())["notes"])
    finally:
        torch.set_num_threads(threads)


def test_demo_config_validation(tmp_path):
    with pytest.raises(ValueError, match="--holdout 1.5 must be in"):
        DemoConfig(holdout=1.5)
    with pytest.raises(ValueError, match="--budget -1.0 must be > 0"):
        DemoConfig(budget=-1.0)
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
