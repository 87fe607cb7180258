"""`./launch.sh bench compute`: on fabricated run folders (hand-checked crossing in the JSON, plots, report files),
the plan arithmetic of the matched comparison, and a tiny matched comparison end to end on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from tests.compute_testdata import write_pair
from tests.conftest import make_image, write_tiny_shards
from tools.bench.__main__ import main as bench_main
from tools.bench.compute import COLUMNS
from train.compare.runner import (
    ComparisonConfig,
    budget_steps,
    per_budget_epochs,
    plan_comparison,
    shard_imagefolder,
    single_schedule,
)

COMMON_FIELDS = {"benchmark", "machine", "settings", "columns", "rows", "notes"}
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--img-size", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32",
        "--decoder-num-heads", "2", "--cls-hidden", "32", "--batch-size", "8", "--data-threads", "1",
        "--shuffle-buffer", "16", "--log-every", "2"]


def test_runs_mode_reports_the_hand_checked_crossing(tmp_path):
    s, m = write_pair(tmp_path / "runs")
    out = tmp_path / "report"
    assert bench_main(["compute", "--runs", str(s), f"MAE={m}", "--out", str(out), "--json", str(tmp_path / "c.json"),
                       "--markdown", str(tmp_path / "c.md")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert COMMON_FIELDS <= set(data) and data["benchmark"] == "bench compute" and data["columns"] == COLUMNS
    assert len(data["rows"]) == 9 and data["rows"][2] == {
        "method": "SupMAE", "protocol": "k-NN", "step": 200, "epoch": 2.0, "PFLOPs": 2.0, "device-h": 0.2,
        "top-1": "55.00%", "top-5": "85.00%"}
    sup = next(c for c in data["crossings"] if c["method"] == "SupMAE")
    assert sup["reached"] and sup["target_top1"] == 0.55 and sup["other_best"]["step"] == 300
    assert sup["axes"]["pflops"]["ratio"] == pytest.approx(1 / 3) and sup["axes"]["pflops"]["step"] == 200
    assert sup["axes"]["pflops"]["previous_compute"] == 1.0
    assert sup["axes"]["device_hours"]["ratio"] == pytest.approx(0.2 / 0.45)
    mae = next(c for c in data["crossings"] if c["method"] == "MAE")
    assert not mae["reached"] and mae["axes"]["pflops"]["compute"] is None and mae["axes"]["pflops"]["ratio"] is None
    assert "MAE never reaches SupMAE's best k-NN top-1 (60.00%" in mae["statement"]
    assert data["statements"] == [sup["statement"], mae["statement"]]
    crossings = data["tables"]["crossings"]["rows"]
    assert crossings[0]["% of PFLOPs"] == "33.33%" and crossings[0]["bracket (PFLOPs)"] == "(1, 2]"
    assert crossings[1]["reached"] == "never"
    summary = {r["method"]: r for r in data["tables"]["summary per method"]["rows"]}
    assert summary["SupMAE"]["best top-1"] == "60.00%" and summary["MAE"]["untrained top-1"] == "20.00%"
    assert [r["epochs"] for r in data["tables"]["paper (ImageNet-1k, ViT-B/16, fine-tune)"]["rows"]] == [
        100, 200, 400, 100, 200, 400, 1600]
    assert any("13% of MAE's training FLOPs" in n for n in data["notes"])
    assert any(n.startswith("Measured setting vs the paper's") for n in data["notes"])
    for name in ("accuracy_vs_compute_knn.png", "training_curves.png"):
        assert (out / name).read_bytes().startswith(PNG) and str(out / name) in data["plots"]
    assert json.loads((out / "report.json").read_text())["statements"] == data["statements"]
    md = (tmp_path / "c.md").read_text()
    assert "#### crossings" in md and "| SupMAE | MAE's best | k-NN | 55.00% | yes | 2.00 | 33.33% |" in md


def test_bad_invocations_are_refused(tmp_path, capsys):
    s, m = write_pair(tmp_path)
    for args, message in ((["--runs", str(s), "--data", str(s)], "either --runs"),
                          (["--runs", str(s), str(m), "--repeats", "3"], "--repeats does not apply: this benchmark times nothing"),
                          (["--data", str(s)], "needs --eval-data, --budgets, --out")):
        assert bench_main(["compute", *args]) == 2  # one line, no traceback
        err = capsys.readouterr().err
        assert err.startswith("bench compute: error: ") and message in err, err


def test_budget_arithmetic():
    # 1 GFLOP per image, 100 images per step: 1e11 FLOPs per step, 10 steps per epoch.
    assert budget_steps(0.1, "pflops", 10**11, 10) == 1000  # exactly 1e14 / 1e11
    assert budget_steps(0.10001, "pflops", 10**11, 10) == 1001  # the first step at or above the budget
    assert budget_steps(2.5, "epochs", 10**11, 10) == 25
    assert budget_steps(1e-9, "pflops", 10**11, 10) == 1  # at least one step
    epochs, steps = single_schedule((0.05, 0.1), "pflops", 4, True, 10**11, 7)
    # largest budget: 1000 steps -> ceil(1000 / 7) = 143 epochs = 1001 steps; grid 250, 500, 750, 1000.
    assert epochs == 143 and steps == (0, 250, 500, 750, 1000, 1001)
    assert single_schedule((3.0,), "epochs", 0, False, 10**11, 10) == (3, (30,))
    assert per_budget_epochs(0.1, "pflops", 10**11, 7) == round(1000 / 7) == 143
    assert per_budget_epochs(0.01, "epochs", 10**11, 7) == 1


def test_plan_matches_the_trainer_and_keeps_the_warmup_share(tmp_path):
    write_tiny_shards(tmp_path / "train", num_samples=40, num_classes=3, per_shard=8)
    write_tiny_shards(tmp_path / "val", num_samples=9, num_classes=3, per_shard=8, split="val")
    cfg = ComparisonConfig(data=str(tmp_path / "train"), eval_data=str(tmp_path / "val"), out=str(tmp_path / "o"),
                           budgets=(1e-9,), evals=2, train_args=tuple(TINY))
    sup, mae = plan_comparison(cfg)
    assert (sup.label, mae.label) == ("SupMAE", "MAE") and sup.steps_per_epoch == 5 and sup.images_per_step == 8
    # Each method needs ceil(1e6 / (8 x its FLOPs per image)) steps; the schedule covers whole epochs.
    need = math.ceil(1e6 / (8 * sup.flops_per_image))
    assert sup.eval_steps[-1] == sup.final_step == 5 * math.ceil(need / 5) and sup.eval_steps[0] == 0
    assert sup.train.warmup_epochs == pytest.approx(1.0 / 10 * sup.train.epochs)  # the demo recipe's 1 of 10
    assert mae.flops_per_image > sup.flops_per_image and mae.train.model_args["decoder_depth"] == 8
    with pytest.raises(ValueError, match="--epochs cannot be set"):
        ComparisonConfig(data="a", eval_data="b", out="c", budgets=(1.0,), train_args=("--epochs", "3"))
    per = plan_comparison(ComparisonConfig(data=cfg.data, eval_data=cfg.eval_data, out=cfg.out, budgets=(1, 2, 2.2),
                                           budget_unit="epochs", schedule="per-budget", train_args=tuple(TINY)))
    assert [(r.label, r.train.epochs, r.eval_steps) for r in per] == [
        ("SupMAE", 1, (0, 5)), ("SupMAE", 2, (10,)), ("MAE", 1, (0, 5)), ("MAE", 2, (10,))]  # 2.2 rounds to 2


def test_shard_imagefolder_holds_out_a_share_of_every_class(tmp_path):
    src = tmp_path / "images"
    for c in range(3):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(make_image(c, i, 20, 24)).save(src / f"c{c}" / f"{i}.jpg", quality=90)
    said = []
    train, val = shard_imagefolder(src, tmp_path / "shards", holdout=0.2, workers=1, say=said.append)
    from pipeline.shards.shard_format import load_manifest

    mt, mv = load_manifest(train)[0], load_manifest(val)[0]
    assert (mt.num_samples, mv.num_samples) == (24, 6) and [c.wnid for c in mv.classes] == ["c0", "c1", "c2"]
    assert "held out 6 of 30 images" in said[0]
    again = []
    shard_imagefolder(src, tmp_path / "shards", holdout=0.2, workers=1, say=again.append)
    assert all("already complete" in s for s in again[1:])


@pytest.mark.slow
def test_tiny_matched_comparison_end_to_end_and_resume(tmp_path, capsys):
    torch.set_num_threads(1)
    write_tiny_shards(tmp_path / "train", num_samples=48, num_classes=3, per_shard=8, size=(24, 28))
    write_tiny_shards(tmp_path / "val", num_samples=12, num_classes=3, per_shard=8, size=(24, 28), split="val", seed=1)
    out = tmp_path / "cmp"
    argv = ["compute", "--device", "cpu", "--data", str(tmp_path / "train"), "--eval-data", str(tmp_path / "val"),
            "--out", str(out),
            "--budgets", "2", "--budget-unit", "epochs", "--evals", "2", "--knn-k", "5", "--eval-batch-size", "8",
            "--json", str(tmp_path / "c.json"), "--", *TINY]
    assert bench_main(argv) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    steps = [(r["method"], r["step"]) for r in data["rows"]]
    assert steps == [("SupMAE", 0), ("SupMAE", 6), ("SupMAE", 12), ("MAE", 0), ("MAE", 6), ("MAE", 12)]
    for method in ("supmae", "mae"):
        ck = out / method / "checkpoints"
        assert sorted(p.name for p in ck.glob("*.pt")) == ["step-000000012.pt"]  # evaluated ones were pruned
        result = json.loads((ck / "step-000000006.knn.json").read_text())
        assert result["protocol"] == "knn" and result["samples"] == 12 and result["pretrain_images"] == 6 * 8
        metrics = [json.loads(x) for x in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics] == [2, 4, 6, 8, 10, 12]  # segments resume exactly, no step twice
    assert data["settings"]["mode"] == "comparison" and len(data["statements"]) == 2
    assert (out / "accuracy_vs_compute_knn.png").read_bytes().startswith(PNG)
    # The same command again finds every result and trains nothing.
    assert bench_main(argv) == 0
    assert "this invocation: 0 s training, 0 s evaluating" in json.loads((tmp_path / "c.json").read_text())["notes"]
    # Other settings in the same folder are refused.
    capsys.readouterr()
    assert bench_main([*argv[:argv.index("--evals") + 1], "3", *argv[argv.index("--evals") + 2:]]) == 2
    assert "made with other settings" in capsys.readouterr().err
