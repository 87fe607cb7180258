"""The compute-to-accuracy rule (train/compare/report.py) on fabricated run folders with hand-checked numbers."""

from __future__ import annotations

import json

import pytest

from tests.compute_testdata import MAE, SUPMAE, write_pair, write_run
from train.compare.report import (
    EvalPoint,
    analyse,
    best_point,
    crossing,
    first_reaching,
    group_runs,
    load_run,
    paper_crossings,
    parse_run_spec,
    scale_note,
    significance_note,
    summarise,
)


def _pt(step: int, pflops: float, top1: float, hours: float | None = None) -> EvalPoint:
    return EvalPoint(step=step, pflops=pflops, device_hours=hours, top1=top1)


@pytest.fixture
def pair(tmp_path):
    s, m = write_pair(tmp_path)
    return analyse(group_runs([load_run(s), load_run(m)]))


def test_runs_load_with_their_method_and_points(tmp_path):
    s, m = write_pair(tmp_path)
    sup, mae = load_run(s), load_run(m)
    assert (sup.label, mae.label) == ("SupMAE", "MAE")
    assert [(p.step, p.pflops, p.device_hours, p.top1) for p in sup.evals["knn"]] == [
        (0, 0.0, 0.0, 0.20), (100, 1.0, 0.10, 0.40), (200, 2.0, 0.20, 0.55), (300, 3.0, 0.30, 0.60)]
    assert [p.pflops for p in mae.evals["knn"]] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [t.step for t in sup.train] == [50, 100, 150, 200, 250, 300] and sup.train[-1].pflops == 3.0
    assert mae.train[0].cls_loss is None and sup.train[0].cls_loss is not None
    assert sup.flops_per_image == 10**9


def test_points_show_the_fractional_epoch_when_the_run_knows_its_steps_per_epoch(tmp_path):
    s, _ = write_pair(tmp_path)
    # A checkpoint's own "epoch" counts finished epochs (step // 100 here); without steps per epoch it is shown as is.
    assert [p.epoch for p in load_run(s).evals["knn"]] == [0, 1, 2, 3]
    config = json.loads((s / "config.json").read_text())
    config["derived"]["steps_per_epoch"] = 80
    (s / "config.json").write_text(json.dumps(config))
    assert [p.epoch for p in load_run(s).evals["knn"]] == [0.0, 1.25, 2.5, 3.75]


def test_supmae_reaches_maes_best_with_the_hand_checked_share_of_compute(pair):
    c = next(c for c in pair.crossings if c.method == "SupMAE")
    assert c.other == "MAE" and c.protocol == "knn" and c.target == 0.55
    # MAE's best: 55% first at step 300 (step 400 ties it with more compute and is not its best).
    assert (c.other_best.step, c.other_best.pflops, c.other_best.device_hours) == (300, 6.0, 0.45)
    fl, dh = c.axes["pflops"], c.axes["device_hours"]
    # SupMAE's step 200 has exactly 55%: at or above counts.
    assert fl.reached and (fl.step, fl.compute, fl.previous_compute, fl.other_compute) == (200, 2.0, 1.0, 6.0)
    assert fl.ratio == pytest.approx(1 / 3, abs=1e-15)
    assert dh.reached and (dh.compute, dh.other_compute) == (0.20, 0.45)
    assert dh.ratio == pytest.approx(0.20 / 0.45, abs=1e-15)
    text = c.statement()
    assert text.startswith("SupMAE reaches MAE's best k-NN top-1 (55.00%, step 300) with 33.3% of MAE's training FLOPs "
                           "(2 vs 6 PFLOPs; first evaluated SupMAE checkpoint at or above it: step 200 (55.00%); the "
                           "one before, at 1 PFLOPs, was below)")
    assert text.endswith("and 44.4% of its device-hours (0.2 h vs 0.45 h).")


def test_mae_never_reaching_supmaes_best_is_said_and_not_extrapolated(pair):
    c = next(c for c in pair.crossings if c.method == "MAE")
    assert c.target == 0.60 and not c.reached
    fl = c.axes["pflops"]
    assert fl.compute is None and fl.ratio is None and fl.max_compute == 8.0
    assert c.statement() == ("MAE never reaches SupMAE's best k-NN top-1 (60.00%, step 300): its best is 55.00% (step "
                             "300, 6 PFLOPs) and it was evaluated up to 8 PFLOPs; nothing is extrapolated beyond that.")


def test_summaries_name_init_best_final_and_totals(pair):
    s = {x.method: x for x in pair.summaries}
    assert s["SupMAE"].evaluated == 4 and s["SupMAE"].init.top1 == 0.20 and s["SupMAE"].best.step == 300
    assert s["SupMAE"].gain_over_init == pytest.approx(0.40)
    assert (s["MAE"].best.step, s["MAE"].final.step, s["MAE"].train_pflops, s["MAE"].train_device_hours) == (
        300, 400, 8.0, 0.60)


def test_ties_best_is_the_cheapest_and_target_equality_counts():
    pts = [_pt(10, 1.0, 0.5), _pt(20, 2.0, 0.7), _pt(30, 3.0, 0.7)]
    assert best_point(pts).step == 20
    hit, prev = first_reaching(pts, 0.7, "pflops")
    assert (hit.step, prev.step) == (20, 10)
    hit, prev = first_reaching(pts, 0.5, "pflops")  # the very first point: nothing before it
    assert (hit.step, prev) == (10, None)
    assert first_reaching(pts, 0.7000001, "pflops") == (None, None)
    # Both methods equally good at their best: each reaches the other's best, ratio from the cheapest checkpoints.
    c = crossing("A", [_pt(1, 1.0, 0.6), _pt(2, 2.0, 0.6)], "B", [_pt(1, 4.0, 0.6)], "knn")
    assert c.axes["pflops"].ratio == 0.25 and "device_hours" not in c.axes


def test_a_method_with_a_single_checkpoint():
    single = [_pt(500, 5.0, 0.45, 0.5)]
    other = [_pt(0, 0.0, 0.10, 0.0), _pt(100, 1.0, 0.30, 0.1), _pt(200, 2.0, 0.50, 0.2)]
    c = crossing("One", single, "Other", other, "knn")
    assert not c.reached and c.axes["pflops"].max_compute == 5.0 and c.own_best.step == 500
    back = crossing("Other", other, "One", single, "knn")
    fl = back.axes["pflops"]
    assert fl.reached and (fl.step, fl.compute, fl.previous_compute) == (200, 2.0, 1.0) and fl.ratio == 0.4
    one_first = crossing("One", single, "Other", [_pt(100, 1.0, 0.30)], "knn")
    assert one_first.axes["pflops"].previous_compute is None
    assert "it is the first one evaluated" in one_first.statement()


def test_best_at_zero_compute_gives_no_ratio():
    c = crossing("A", [_pt(0, 0.0, 0.2), _pt(5, 1.0, 0.3)], "B", [_pt(0, 0.0, 0.3), _pt(5, 2.0, 0.25)], "knn")
    assert c.axes["pflops"].reached and c.axes["pflops"].ratio is None
    assert c.statement() == ("B did not improve on its untrained weights (30.00%) within the 2 PFLOPs it was "
                             "evaluated at, so there is no compute to compare against; A is at or above that level "
                             "at 1 PFLOPs (first evaluated A checkpoint at or above it: step 5 (30.00%); the one "
                             "before, at 0 PFLOPs, was below).")


def test_single_method_and_protocol_filter(tmp_path):
    s, m = write_pair(tmp_path)
    write_run(tmp_path / "supmae", SUPMAE, True, protocol="linprobe")
    methods = group_runs([load_run(s), load_run(m)])
    a = analyse(methods)
    assert sorted({c.protocol for c in a.crossings}) == ["knn"]  # only SupMAE has linear-probe results
    assert any("linear-probe: only SupMAE" in w for w in a.warnings)
    assert [x.protocol for x in a.summaries] == ["knn", "knn", "linprobe"]
    assert analyse(methods, ["linprobe"]).crossings == []


def test_runs_of_one_label_form_one_curve(tmp_path):
    a = write_run(tmp_path / "a", {"gflops": 1.0, "evals": [(100, 0.1, 0.4)]}, True)
    b = write_run(tmp_path / "b", {"gflops": 1.0, "evals": [(300, 0.3, 0.6)]}, True)
    mae = write_run(tmp_path / "m", MAE, False)
    methods = group_runs([load_run(a), load_run(b), load_run(mae)])
    assert [m.label for m in methods] == ["SupMAE", "MAE"]
    assert [p.step for p in methods[0].points("knn")] == [100, 300]
    assert parse_run_spec(f"base={a}") == ("base", str(a)) and parse_run_spec(str(a)) == (None, str(a))
    assert load_run(a, label="base").label == "base"


def test_unreadable_and_foreign_files_are_reported_not_fatal(tmp_path):
    s = write_run(tmp_path / "s", SUPMAE, True)
    (s / "checkpoints" / "junk.json").write_text("{not json")
    (s / "checkpoints" / "other.json").write_text(json.dumps({"hello": 1}))
    rec = json.loads((s / "checkpoints" / "step-000000100.knn.json").read_text())
    rec["pretrain_flops"] = None  # e.g. an original release: no compute known
    (s / "checkpoints" / "step-000000100.knn.json").write_text(json.dumps(rec))
    seen = []
    run = load_run(s, warn=seen.append)
    assert [p.step for p in run.evals["knn"]] == [0, 200, 300]
    assert any("junk.json: not readable" in w for w in seen) and any("compute of" in w for w in seen)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_paper_table_through_the_same_rule():
    s_to_m, m_to_s = paper_crossings()
    fl = s_to_m.axes["pflops"]
    # SupMAE 400 ep (83.6) reaches MAE 1600 ep (83.6): 400 x 31 / (1600 x 59) of the FLOPs.
    assert (fl.step, s_to_m.other_best.step) == (400, 1600)
    assert fl.ratio == pytest.approx(400 * 31 / (1600 * 59))
    assert m_to_s.axes["pflops"].step == 1600 and m_to_s.axes["pflops"].ratio == pytest.approx(1600 * 59 / (400 * 31))


def test_scale_note_states_the_distance(tmp_path):
    s, m = write_pair(tmp_path)
    note = scale_note(group_runs([load_run(s), load_run(m)]), "knn")
    assert "50,000 training images, 10 classes, 32 px, patch 4 (64 patches), encoder 192-d x 6 blocks" in note
    assert "The most training compute of a method here is 8 PFLOPs" in note


def test_gain_over_the_untrained_weights_is_judged_against_its_standard_error(pair, tmp_path):
    s = {x.method: x for x in pair.summaries}
    # SupMAE: 60% vs 20% on 1,000 images; s.e. = sqrt(.6 x .4 / 1000 + .2 x .8 / 1000) = 2.00 points.
    assert s["SupMAE"].gain_standard_error == pytest.approx((0.24 / 1000 + 0.16 / 1000) ** 0.5)
    assert significance_note(s["SupMAE"]) == (
        "SupMAE: best k-NN top-1 60.00% vs 20.00% untrained on 1,000 images, a gain of +40.00 points = 20.0 "
        "standard errors (2.00 points): a clear improvement.")
    flat = write_run(tmp_path / "flat", {"gflops": 2.0, "evals": [(0, 0.0, 0.20), (100, 0.1, 0.23)]}, False)
    note = significance_note(summarise(group_runs([load_run(flat)])[0], "knn"))
    assert "+3.00 points = 1.6 standard errors (1.84 points)" in note and "has not measurably improved" in note
