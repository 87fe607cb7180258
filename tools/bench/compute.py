"""`./launch.sh bench compute`: compute-to-accuracy of SupMAE against MAE.

    # analyse existing pre-training run folders (evaluated with ./launch.sh knn / linprobe / finetune)
    ./launch.sh bench compute --runs runs/supmae400 runs/mae1600 [--out report/]
    ./launch.sh bench compute --runs SupMAE=runs/a MAE=runs/b MAE=runs/c      # LABEL=PATH: runs of one method

    # run a matched comparison (train/compare/runner.py): pre-train each recipe under the budgets, evaluate, analyse
    ./launch.sh bench compute --data shards/train --eval-data shards/val --out runs/cmp \
        --recipes supmae_vit_tiny_demo,mae_vit_tiny_demo --budgets 0.05 --budget-unit pflops --evals 5 \
        -- --batch-size 256 --data-threads 2

Output: the accuracy of every evaluated checkpoint against cumulative training PFLOPs and device-hours, a summary
per method, the crossings ("SupMAE reaches MAE's best k-NN top-1 with x% of MAE's compute", or that it never
does), the paper's figures beside them, PNG plots, and report.json / report.md in --out (definitions in
train/compare/report.py and docs/benchmarking.md). Accuracy is measured, not timed: --warmup / --repeats do
not apply here.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from tools.bench.report import BenchReport
from train.compare.report import (
    AXES,
    PROTOCOL_NAMES,
    Analysis,
    Method,
    analyse,
    group_runs,
    load_run,
    paper_notes,
    paper_rows,
    parse_run_spec,
    scale_note,
    significance_note,
    standard_error,
)

TIMED = False  # accuracy against recorded compute: --warmup / --repeats do not apply
DESCRIPTION = "compute-to-accuracy: SupMAE vs MAE (runs a matched comparison or reads run folders)"
COLUMNS = ["method", "protocol", "step", "epoch", "PFLOPs", "device-h", "top-1", "top-5"]
SUMMARY_COLUMNS = ["method", "protocol", "evaluated", "untrained top-1", "best top-1", "s.e.", "best at PFLOPs",
                   "final top-1", "train PFLOPs", "train device-h", "GFLOPs/image", "train images/s", "data wait"]
CROSSING_COLUMNS = ["method", "target", "protocol", "target top-1", "reached", "at PFLOPs", "% of PFLOPs",
                    "at device-h", "% of device-h", "bracket (PFLOPs)"]
PAPER_COLUMNS = ["method", "epochs", "PFLOPs", "fine-tune top-1"]


class ComputeReport(BenchReport):
    """BenchReport with the analysis' further tables (summary, crossings, paper) in every output."""

    def __init__(self, *args: Any, tables: list[tuple[str, list[str], list[dict[str, Any]]]] | None = None,
                 extra: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tables = tables or []  # (title, columns, rows)
        self.extra = extra or {}  # further JSON fields

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["tables"] = {title: {"columns": cols, "rows": rows} for title, cols, rows in self.tables}
        d.update(self.extra)
        return d

    def to_markdown(self) -> str:
        # The base layout (title, machine, settings, main table), then the further tables, then the notes.
        notes, self.notes = self.notes, []
        try:
            md = super().to_markdown()
        finally:
            self.notes = notes
        for title, cols, rows in self.tables:
            md += f"\n#### {title}\n\n| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
            md += "".join("| " + " | ".join(self._fmt(r.get(c)) for c in cols) + " |\n" for r in rows)
        return md + ("\n" + "".join(f"- {n}\n" for n in self.notes) if self.notes else "")

    def print(self, console=None) -> None:
        import sys

        from rich.console import Console
        from rich.table import Table

        # Off a terminal (logs, CI) rich would squeeze the wide tables into 80 columns.
        console = console or Console(width=None if sys.stdout.isatty() else 200)
        notes, self.notes = self.notes, []
        try:
            super().print(console)
        finally:
            self.notes = notes
        for title, cols, rows in self.tables:
            table = Table(title=title)
            for c in cols:
                table.add_column(c, justify="left" if c in ("method", "target", "protocol", "what") else "right")
            for r in rows:
                table.add_row(*(self._fmt(r.get(c)) for c in cols))
            console.print(table)
        for n in self.notes:
            console.print(f"- {n}", markup=False, highlight=False)


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.2f}%"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_report(methods: list[Method], analysis: Analysis, settings: dict[str, Any], plots: list[Path],
                 notes: list[str] | None = None) -> ComputeReport:
    """The report of an analysis: checkpoints table, summary, crossings, paper reference, statements."""
    rows = []
    for m in methods:
        for proto in m.protocols:
            for p in m.points(proto):
                rows.append({"method": m.label, "protocol": PROTOCOL_NAMES.get(proto, proto), "step": p.step,
                             "epoch": p.epoch, "PFLOPs": p.pflops, "device-h": p.device_hours,
                             "top-1": _pct(p.top1), "top-5": _pct(p.top5)})
    by_label = {m.label: m for m in methods}
    summary = []
    for s in analysis.summaries:
        m = by_label[s.method]
        train = m.train_points()
        run = m.runs[0]
        summary.append({
            "method": s.method, "protocol": PROTOCOL_NAMES.get(s.protocol, s.protocol), "evaluated": s.evaluated,
            "untrained top-1": _pct(s.init.top1) if s.init else None, "best top-1": _pct(s.best.top1),
            "s.e.": _pct(standard_error(s.best.top1, s.best.samples)) if s.best.samples else None,
            "best at PFLOPs": s.best.pflops,
            "final top-1": _pct(s.final.top1), "train PFLOPs": s.train_pflops, "train device-h": s.train_device_hours,
            "GFLOPs/image": run.flops_per_image / 1e9 if run.flops_per_image else None,
            "train images/s": _median([t.images_per_sec for t in train if t.images_per_sec is not None]),
            "data wait": _pct(_median([t.data_wait for t in train if t.data_wait is not None])),
        })
    crossings = []
    for c in analysis.crossings:
        fl, dh = c.axes["pflops"], c.axes.get("device_hours")
        crossings.append({
            "method": c.method, "target": f"{c.other}'s best", "protocol": PROTOCOL_NAMES.get(c.protocol, c.protocol),
            "target top-1": _pct(c.target), "reached": "yes" if c.reached else "never",
            "at PFLOPs": fl.compute, "% of PFLOPs": _pct(fl.ratio),
            "at device-h": dh.compute if dh else None, "% of device-h": _pct(dh.ratio) if dh else None,
            "bracket (PFLOPs)": (f"({fl.previous_compute:.4g}, {fl.compute:.4g}]" if fl.reached and
                                 fl.previous_compute is not None else None),
        })
    report = ComputeReport(
        "bench compute", COLUMNS, rows=rows, settings=settings,
        tables=[("summary per method", SUMMARY_COLUMNS, summary), ("crossings", CROSSING_COLUMNS, crossings),
                ("paper (ImageNet-1k, ViT-B/16, fine-tune)", PAPER_COLUMNS, paper_rows())],
        extra={"statements": analysis.statements(), "crossings": [_crossing_json(c) for c in analysis.crossings],
               "plots": [str(p) for p in plots], "runs": {m.label: [str(r.path) for r in m.runs] for m in methods}},
    )
    report.notes += analysis.statements()
    report.notes += [n for n in map(significance_note, analysis.summaries) if n]
    for proto in sorted({s.protocol for s in analysis.summaries}):
        if note := scale_note(methods, proto):
            report.notes.append(note)
            break
    report.notes += paper_notes()
    report.notes.append("Definitions: a method's best = its evaluated checkpoint with the highest top-1 (ties: the "
                        "least compute); it reaches a target at its first evaluated checkpoint, in compute order, with "
                        "top-1 >= the target; no interpolation (the crossing lies in the bracket after the previous "
                        "checkpoint); % = that compute / the compute of the other method's best. PFLOPs = cumulative "
                        "analytic training FLOPs (3 x forward matmuls) / 1e15; device-hours = training wall time x "
                        "processes, evaluations excluded.")
    report.notes += list(notes or []) + analysis.warnings
    if plots:
        report.notes.append("plots: " + ", ".join(str(p) for p in plots))
    return report


def _crossing_json(c) -> dict[str, Any]:
    return {
        "method": c.method, "other": c.other, "protocol": c.protocol, "target_top1": c.target,
        "other_best": {"step": c.other_best.step, "pflops": c.other_best.pflops,
                       "device_hours": c.other_best.device_hours},
        "own_best": {"step": c.own_best.step, "top1": c.own_best.top1, "pflops": c.own_best.pflops},
        "reached": c.reached,
        "axes": {a: {"reached": x.reached, "compute": x.compute, "step": x.step, "top1": x.top1,
                     "previous_compute": x.previous_compute, "other_compute": x.other_compute,
                     "max_compute": x.max_compute, "ratio": x.ratio} for a, x in c.axes.items()},
        "axis_units": {a: AXES[a] for a in c.axes},
        "statement": c.statement(),
    }


def write_outputs(report: ComputeReport, out: Path) -> list[Path]:
    """report.json and report.md in `out` (besides any --json / --markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    report.write(json_path=out / "report.json", markdown_path=out / "report.md")
    return [out / "report.json", out / "report.md"]


def plot_title(methods: list[Method]) -> str:
    """'SupMAE vs MAE: cifar10 (49,920 images), 32 px patch 4, encoder 192-d x 6' from the first run."""
    from pipeline.shards.shard_format import ShardFormatError, load_manifest

    names = " vs ".join(x.label for x in methods)
    run = methods[0].runs[0] if methods and methods[0].runs else None
    if run is None or not isinstance(run.derived.get("train_samples"), int):
        return names
    m, data = run.model, run.train_config.get("data", "")
    try:
        data = load_manifest(data)[0].name  # the data set's name, where the shards are still at hand
    except (ShardFormatError, OSError, ValueError):
        data = Path(data).name or "data"
    return (f"{names}: {data} ({run.derived['train_samples']:,} images), {m.get('img_size')} px patch "
            f"{m.get('patch_size')}, encoder {m.get('embed_dim')}-d x {m.get('depth')}")


# ----------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    from train.compare.runner import BUDGET_UNITS, DEFAULT_RECIPES, PROTOCOLS, SCHEDULES

    g = p.add_argument_group("analyse existing run folders")
    g.add_argument("--runs", nargs="+", metavar="[LABEL=]RUN",
                   help="pre-training run folders with evaluation results beside their checkpoints; runs with the "
                        "same LABEL form one curve (default label: SupMAE / MAE from the model)")
    g = p.add_argument_group("run a matched comparison (train/compare/runner.py)")
    g.add_argument("--data", help="training shards (also the k-NN bank)")
    g.add_argument("--eval-data", help="held-out shards, sharded with --class-map of --data")
    g.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated pre-training recipes")
    g.add_argument("--labels", default="", help="comma-separated method names, one per recipe")
    g.add_argument("--budgets", help="comma-separated compute budgets in --budget-unit, e.g. 0.01,0.02,0.04")
    g.add_argument("--budget-unit", choices=BUDGET_UNITS, default="pflops",
                   help="pflops: cumulative analytic training PFLOPs (equal compute); epochs: passes over the "
                        "training split (equal data) (default pflops)")
    g.add_argument("--schedule", choices=SCHEDULES, default="single",
                   help="single: one run per method to the largest budget, evaluated along the way; per-budget: one "
                        "run per method and budget, evaluated at its end (default single)")
    g.add_argument("--evals", type=int, default=4,
                   help="single schedule: evaluation points evenly spaced up to the largest budget (default 4)")
    g.add_argument("--no-random-init", dest="random_init", action="store_false",
                   help="do not evaluate the untrained weights (the zero-compute point)")
    g.add_argument("--protocols", default=None,
                   help=f"comma-separated subset of {','.join(PROTOCOLS)} (default knn; with --runs: all found)")
    g.add_argument("--linprobe-args", default="", help="options for each linear probe, e.g. '--epochs 10'")
    g.add_argument("--finetune-args", default="", help="options for each fine-tune, e.g. '--epochs 5'")
    g.add_argument("--knn-k", type=int, default=20)
    g.add_argument("--knn-temperature", type=float, default=0.07)
    g.add_argument("--knn-bank", type=int, default=0, help="k-NN bank: the first N training samples (0 = all)")
    g.add_argument("--knn-feature", choices=("avg", "token"), default="avg",
                   help="avg: mean of the normed patch tokens (default); token: the cls token")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--keep-checkpoints", action="store_true", help="keep every evaluated checkpoint (default: the "
                   "newest of each run; the results stay)")
    p.add_argument("--out", default=None, help="comparison folder (required with --data); with --runs: where the "
                   "plots and report.json/.md go (default compute-report)")
    p.add_argument("train_args", nargs="*", metavar="-- --field value",
                   help="pre-training overrides for every recipe after `--`, e.g. -- --batch-size 256")


def device_of(args: argparse.Namespace) -> str | None:
    """Reading run folders (--runs) needs no device; a matched comparison trains on --device."""
    return None if args.runs else args.device


def comparison_config(args: argparse.Namespace):
    from train.compare.runner import ComparisonConfig, protocol_args_from_text

    missing = [o for o, v in (("--eval-data", args.eval_data), ("--budgets", args.budgets), ("--out", args.out))
               if not v]
    if missing:
        raise ValueError(f"bench compute: a matched comparison (--data) needs {', '.join(missing)}")
    try:
        budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"bench compute: --budgets {args.budgets!r} must be comma-separated numbers") from None
    return ComparisonConfig(
        data=args.data, eval_data=args.eval_data, out=args.out, budgets=budgets,
        recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()),
        labels=tuple(x.strip() for x in args.labels.split(",") if x.strip()), budget_unit=args.budget_unit,
        schedule=args.schedule, evals=args.evals, random_init=args.random_init,
        protocols=tuple(x.strip() for x in (args.protocols or "knn").split(",") if x.strip()),
        knn_k=args.knn_k, knn_temperature=args.knn_temperature, knn_bank=args.knn_bank,
        knn_feature=args.knn_feature, eval_batch_size=args.eval_batch_size, train_args=tuple(args.train_args),
        protocol_args=protocol_args_from_text({"linprobe": args.linprobe_args, "finetune": args.finetune_args}),
        seed=args.seed, device=args.device, keep_checkpoints=args.keep_checkpoints,
    )


def run(args: argparse.Namespace) -> ComputeReport:
    from train.compare.plots import write_plots

    if bool(args.runs) == bool(args.data):
        raise ValueError("bench compute: give either --runs RUN... (analyse run folders) or --data SHARDS "
                         "(run a matched comparison)")
    notes: list[str] = []
    if args.runs:
        if args.train_args:
            raise ValueError("bench compute --runs: pre-training overrides after -- only apply to --data")
        out = Path(args.out or "compute-report")
        runs = [load_run(path, label, warn=notes.append) for label, path in map(parse_run_spec, args.runs)]
        methods = group_runs(runs)
        protocols = [x.strip() for x in args.protocols.split(",")] if args.protocols else None
        analysis = analyse(methods, protocols)
        settings: dict[str, Any] = {"mode": "runs", "runs": [str(r.path) for r in runs]}
    else:
        from train.compare.runner import run_comparison

        cfg = comparison_config(args)
        try:
            outcome = run_comparison(cfg)
        except InterruptedError as e:
            raise SystemExit(f"bench compute: {e}") from None
        out, methods, analysis = Path(cfg.out), outcome.methods, outcome.analysis
        notes += outcome.warnings
        notes.append(f"this invocation: {outcome.train_seconds:.0f} s training, {outcome.eval_seconds:.0f} s "
                     "evaluating")
        settings = {"mode": "comparison", "data": cfg.data, "eval_data": cfg.eval_data, "out": cfg.out,
                    "recipes": list(cfg.recipes), "budgets": list(cfg.budgets), "budget_unit": cfg.budget_unit,
                    "schedule": cfg.schedule, "evals": cfg.evals, "protocols": list(cfg.protocols),
                    "knn_k": cfg.knn_k, "knn_temperature": cfg.knn_temperature, "knn_bank": cfg.knn_bank,
                    "knn_feature": cfg.knn_feature,
                    "train_args": list(cfg.train_args), "seed": cfg.seed}
    if not analysis.summaries:
        raise ValueError("bench compute: no evaluated checkpoints found: evaluate the runs' checkpoints first "
                         "(./launch.sh knn --ckpt RUN --all-checkpoints --data ... --eval-data ...)")
    plots = write_plots(methods, analysis, out, plot_title(methods))
    report = build_report(methods, analysis, settings, plots, notes)
    written = write_outputs(report, out)
    report.notes.append("report: " + ", ".join(str(p) for p in written))
    return report
