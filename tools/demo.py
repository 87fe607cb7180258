"""`./launch.sh demo`: the whole project in one command, with no arguments and no network.

    ./launch.sh demo                        # built-in data; about 5-6 minutes on 2 CPU cores, faster on a GPU
    ./launch.sh demo --data ~/my-images     # an ImageFolder: train/ and val/ of class folders, or class folders only
    ./launch.sh demo --budget 0.05 --out runs/demo-big --seed 1
    ./launch.sh demo --quick                # tiny everything (well under a minute): checks an installation

Steps (docs/demo.md):
  1. data       the built-in shapes data set (pipeline/synthetic.py: JPEGs in an ImageFolder, class = shape,
                colour uninformative), or --data
  2. shards     the sharding library writes indexed WebDataset shards of the training split and of the held-out
                split (val/ when present, else --holdout of every class), with the training split's class map
  3. pipeline   images/s of the default training loader alone on those shards (`bench pipeline`'s row (a) on a
                CPU, (a') on a GPU)
  4. compare    train/compare/runner.py: SupMAE and MAE (the demo recipes) pre-trained with the real trainer and
                pipeline to the same compute budget, their checkpoints (untrained, along the way, final)
                evaluated with k-NN, then the compute-to-accuracy analysis (`bench compute`)
  5. model      images/s of each model's training step alone on synthetic input (`bench model`'s step)
  6. report     the compute-to-accuracy tables, the throughput table, the crossing statements, PNG plots and
                report.json / report.md under OUT/report

Running it again with the same options reuses the data, shards and every finished run and evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The default budget: training PFLOPs per method, sized so that the demo takes about 6 minutes on the project's
# idle 2-core build machine (docs/benchmarks.md, "Demo", has the measurement). It is 7 epochs of SupMAE on the
# built-in set (273 steps of 128 x 0.3646 GFLOPs = 0.01274 PFLOPs; the first step at or above 0.0127 is the
# 273rd), so SupMAE's schedule ends at the budget; MAE reaches it at step 105 of its 3-epoch schedule.
DEFAULT_BUDGET_PFLOPS = 0.0127
DEFAULT_EVALS = 2  # evenly spaced k-NN points up to the budget (plus the untrained weights and the schedule's end)
DEFAULT_KNN_BANK = 2000  # k-NN bank: the first N training images (all 1,000 held-out images are the queries)
SHAPES = {"train_per_class": 500, "val_per_class": 100, "size": 32, "num_classes": 10}
# --quick: a 4-class 16-px data set and a one-block encoder: every step of the demo in seconds.
QUICK_SHAPES = {"train_per_class": 24, "val_per_class": 6, "size": 16, "num_classes": 4}
QUICK_TRAIN_ARGS = ("--img-size", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
                    "--decoder-embed-dim", "32", "--decoder-num-heads", "2", "--cls-hidden", "32", "--batch-size", "16",
                    "--data-threads", "1", "--shuffle-buffer", "32", "--log-every", "2")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    data: str = ""  # an ImageFolder; "" = the built-in shapes data set
    budget: float | None = None  # None: DEFAULT_BUDGET_PFLOPS (or 2 epochs with --quick)
    budget_unit: str = "pflops"
    evals: int = DEFAULT_EVALS
    knn_bank: int | None = None  # None: DEFAULT_KNN_BANK (all with --quick)
    holdout: float = 0.1
    seed: int = 0
    device: str = "auto"
    quick: bool = False
    train_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("demo: --out is required")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"demo: --budget {self.budget} must be > 0")
        if not 0 < self.holdout < 1:
            raise ValueError(f"demo: --holdout {self.holdout} must be in (0, 1)")
        if self.evals < 0:
            raise ValueError(f"demo: --evals {self.evals} must be >= 0")

    @property
    def shapes(self) -> dict[str, int]:
        return QUICK_SHAPES if self.quick else SHAPES

    def comparison(self, train: Path, val: Path):
        from train.compare.runner import ComparisonConfig

        quick = self.quick
        budget = self.budget if self.budget is not None else (2.0 if quick else DEFAULT_BUDGET_PFLOPS)
        unit = self.budget_unit if self.budget is not None else ("epochs" if quick else "pflops")
        bank = self.knn_bank if self.knn_bank is not None else (0 if quick else DEFAULT_KNN_BANK)
        return ComparisonConfig(
            data=str(train), eval_data=str(val), out=str(Path(self.out) / "comparison"), budgets=(budget,),
            budget_unit=unit, evals=self.evals, knn_bank=bank, eval_batch_size=32 if quick else 256,
            knn_k=5 if quick else 20, train_args=(*(QUICK_TRAIN_ARGS if quick else ()), *self.train_args),
            seed=self.seed, device=self.device)


def make_builtin_data(root: Path, shapes: dict[str, int], seed: int, say) -> Path:
    """The shapes data set under `root` (train/ and val/ ImageFolders), made once per settings."""
    from pipeline.synthetic import make_shapes_dataset

    marker = root / ".complete.json"
    want = {**shapes, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        say(f"data: built-in shapes data set in {root} (already made)")
        return root
    t0 = time.monotonic()
    counts = make_shapes_dataset(root, seed=seed, **shapes)
    marker.write_text(json.dumps(want))
    say(f"data: built-in shapes data set, {shapes['num_classes']} classes, {counts['train']} training and "
        f"{counts['val']} held-out JPEGs of {shapes['size']} px in {root} ({time.monotonic() - t0:.1f} s)")
    return root


def pipeline_rate(train: Path, cfg, images: int, repeats: int) -> dict[str, Any]:
    """images/s of the default training loader alone on the shards, with the first recipe's batch, size and threads
    (bench pipeline's row (a) without a GPU, (a') with one, measured the same way)."""
    from pipeline.loaders.base import resolve_device
    from tools.bench.pipeline import PipelineBenchConfig, loader_row, measure_interleaved
    from train.compare.runner import run_config

    tc = run_config(cfg, cfg.recipes[0], Path(cfg.out))
    device = "cpu" if cfg.device == "cpu" else "auto"
    which = "dali" if resolve_device(device).type == "cuda" else "cpu"  # the default path on this device
    pcfg = PipelineBenchConfig(data=str(train), imagefolder=str(train), batch_size=tc.batch_size,
                               img_size=tc.img_size, threads=tc.data_threads,
                               device=device, images=images, rows=(which,),
                               warmup=1, repeats=repeats)
    row = loader_row(pcfg, which)
    m = measure_interleaved([row], pcfg)[row.name]
    return {"what": f"data pipeline alone: {row.name} ({row.note})", "images/s": m.rate,
            "spread": f"±{m.timing.spread:.1%}", "data wait": None, "vs step alone": None}


def model_rates(outcome, steps: int, repeats: int) -> list[dict[str, Any]]:
    """Each method's training step alone (synthetic input on the device) and its real training loop."""
    import statistics

    from tools.bench.e2e import step_setup
    from tools.bench.model import time_train_step
    from train.config import TrainConfig

    rows = []
    for run in outcome.plan:
        config = json.loads((run.folder / "config.json").read_text())
        setup = step_setup(TrainConfig.from_dict(config["train"]), config)
        alone = time_train_step(setup, warmup=1, repeats=repeats, steps=steps)
        loop = [t for t in next(r for r in outcome.runs if r.path == run.folder).train if t.images_per_sec]
        loop_ips = statistics.median(t.images_per_sec for t in loop) if loop else None
        rows.append({"what": f"{run.label} training step alone ({setup.describe()}, batch {setup.batch_size}, "
                             "synthetic input)", "images/s": alone["images/s"], "spread": alone["spread"],
                     "data wait": None, "vs step alone": None})
        rows.append({"what": f"{run.label} training loop: pipeline + step (median of its log intervals)",
                     "images/s": loop_ips, "spread": None,
                     "data wait": f"{100 * statistics.median(t.data_wait for t in loop):.1f}%" if loop else None,
                     "vs step alone": loop_ips / alone["images/s"] if loop_ips else None})
    return rows


def run_demo(cfg: DemoConfig, say=print) -> tuple[Any, Path]:
    """Every step of the demo; returns (the report, its folder)."""
    from tools.bench.compute import build_report, plot_title, write_outputs
    from train.compare.plots import write_plots
    from train.compare.runner import run_comparison, shard_imagefolder

    t_start = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(cfg.data) if cfg.data else make_builtin_data(out / "images", cfg.shapes, cfg.seed, say)
    from train.config import parse_overrides

    img_size = parse_overrides(list(cfg.train_args)).get("img_size", cfg.shapes["size"] if cfg.quick else 32)
    # Shards keep 4x the training resolution: the random crops still get detail, decoding stays cheap.
    train, val = shard_imagefolder(source, out / "shards", name="" if cfg.data else "shapes", holdout=cfg.holdout,
                                   seed=cfg.seed, max_side=max(64, 4 * img_size), say=say)
    comparison = cfg.comparison(train, val)
    say("pipeline: timing the training loader alone ...")
    throughput = [pipeline_rate(train, comparison, images=256 if cfg.quick else 4096, repeats=2 if cfg.quick else 3)]
    t_compare = time.monotonic()
    outcome = run_comparison(comparison, say=say)
    compare_s = time.monotonic() - t_compare
    say("model: timing each training step alone ...")
    throughput += model_rates(outcome, steps=1 if cfg.quick else 2, repeats=2 if cfg.quick else 3)

    report_dir = out / "report"
    plots = write_plots(outcome.methods, outcome.analysis, report_dir, plot_title(outcome.methods))
    settings = {"mode": "demo", "data": cfg.data or "built-in shapes", "shards": [str(train), str(val)],
                "recipes": list(comparison.recipes), "budget": comparison.budgets[0],
                "budget_unit": comparison.budget_unit, "evals": comparison.evals, "knn_bank": comparison.knn_bank,
                "seed": cfg.seed, "quick": cfg.quick, "train_args": list(comparison.train_args)}
    notes = [*outcome.warnings,
             f"wall time: {time.monotonic() - t_start:.0f} s in all, of which pre-training and evaluation "
             f"{compare_s:.0f} s ({outcome.train_seconds:.0f} s training and {outcome.eval_seconds:.0f} s k-NN in "
             "this invocation; finished runs and evaluations of an earlier one are reused)"]
    report = build_report(outcome.methods, outcome.analysis, settings, plots, notes)
    report.tables.insert(0, ("throughput", ["what", "images/s", "spread", "data wait", "vs step alone"], throughput))
    report.benchmark = "demo"
    report.extra["wall_seconds"] = time.monotonic() - t_start
    write_outputs(report, report_dir)
    return report, report_dir


def headline(report, report_dir: Path) -> list[str]:
    """The lines printed last: the answer, the check against the untrained weights, where things are."""
    lines = []
    summaries = next((rows for title, _, rows in report.tables if title == "summary per method"), [])
    for row in summaries:
        lines.append(f"{row['method']}: k-NN top-1 {row['untrained top-1']} untrained -> best {row['best top-1']} "
                     f"after {row['best at PFLOPs']:.4g} PFLOPs")
    lines += report.extra.get("statements", [])
    lines.append(f"report: {report_dir / 'report.md'} and report.json; plots: "
                 + ", ".join(Path(p).name for p in report.extra.get("plots", [])) + f" in {report_dir}")
    lines.append(f"demo finished in {report.extra['wall_seconds'] / 60:.1f} min")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="./launch.sh demo",
        description="Built-in data -> shards -> SupMAE and MAE pre-trained to the same compute budget -> k-NN -> "
                    "compute-to-accuracy report (docs/demo.md).")
    p.add_argument("--data", default="", help="an ImageFolder (train/ and val/ of class folders, or class folders: "
                                              "--holdout of each class is held out); default: the built-in data set")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"training budget per method in --budget-unit (default {DEFAULT_BUDGET_PFLOPS} PFLOPs)")
    p.add_argument("--budget-unit", choices=("pflops", "epochs"), default="pflops")
    p.add_argument("--evals", type=int, default=DEFAULT_EVALS,
                   help=f"k-NN points evenly spaced up to the budget (default {DEFAULT_EVALS}), besides the untrained "
                        "weights and each schedule's end")
    p.add_argument("--knn-bank", type=int, default=None,
                   help=f"k-NN bank: the first N training images (default {DEFAULT_KNN_BANK}; 0 = all)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of each class held out when --data has no val/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny data and models: the whole flow in well under a minute")
    p.add_argument("train_args", nargs="*", metavar="-- --field value",
                   help="pre-training overrides for both recipes after `--`, e.g. -- --batch-size 256")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from rich.console import Console

    from train.system.device import check_device

    console = Console(width=None if sys.stdout.isatty() else 200)
    say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    try:
        cfg = DemoConfig(out=args.out, data=args.data, budget=args.budget, budget_unit=args.budget_unit,
                         evals=args.evals, knn_bank=args.knn_bank, holdout=args.holdout, seed=args.seed,
                         device=args.device, quick=args.quick, train_args=tuple(args.train_args))
        check_device(cfg.device)  # a GPU torch cannot use stops the demo before it makes anything
        report, report_dir = run_demo(cfg, say)
    except (ValueError, FileNotFoundError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    except InterruptedError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 130
    report.print(console)
    console.rule("result")
    for line in headline(report, report_dir):
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
