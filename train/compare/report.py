"""Compute-to-accuracy analysis: the accuracy of evaluated checkpoints against the training compute behind them,
per method, and the compute each method needs to reach another method's best accuracy.

    runs = [load_run("runs/supmae"), load_run("runs/mae")]          # run folders of `./launch.sh pretrain`
    analysis = analyse(group_runs(runs))                               # pure from here on
    for c in analysis.crossings: print(c.statement())

Input (docs/run-folder.md): a run folder's `config.json` (model, data set), `metrics.jsonl` ("train" records: the
training curve against cumulative FLOPs and device-hours) and the evaluation result files beside its checkpoints,
`checkpoints/<stem>.<protocol>.json` (train/eval/results.py: top-1 of k-NN, linear probe or fine-tune, with the
cumulative pre-training images, FLOPs and device-hours of that checkpoint). Checkpoint files need not exist any
more (pruned checkpoints leave their results).

Definitions (the same in docs/benchmarking.md):

* compute axes: cumulative training PFLOPs (analytic training FLOPs, `flops / 1e15`) and device-hours, both as
  recorded by the trainer for the evaluated checkpoint. A method's points are its evaluated checkpoints, from all
  of its runs, ordered by the axis (then by step).
* best(M): the evaluated checkpoint of M with the highest top-1; of equal top-1s the one with the least training
  FLOPs (then the lowest step). Its compute is "M's compute" in the statements below.
* reach(A, target): the first evaluated checkpoint of A, in order of the axis, whose top-1 is at or above
  `target` (plain `>=` on the recorded fractions, so an exact tie counts as reached). No interpolation: the true
  crossing lies somewhere after A's previous evaluated checkpoint (which was below the target) and at or before
  this one, and both are reported; the figure is an upper bound at checkpoint granularity.
* "A reaches B's best with r of B's compute": r = compute of reach(A, best(B).top1) / compute of best(B), on each
  axis. When A never reaches the target, nothing is extrapolated: the statement says so and gives A's best and the
  most compute A was evaluated at.

The paper's figures (../shared/FACTS.md section 1) are kept here as data (PAPER_*) and run through the same
`crossing` rule, so the measured and published ratios mean the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.metrics import read_jsonl

AXES: dict[str, str] = {"pflops": "training PFLOPs", "device_hours": "device-hours"}
PROTOCOL_NAMES = {"knn": "k-NN", "linprobe": "linear-probe", "finetune": "fine-tune"}
RESULT_FORMAT = "supmae-fast-eval"  # train/eval/results.py's format tag (read here without importing the eval stack)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class EvalPoint:
    """One evaluated checkpoint: its accuracy and the cumulative training compute behind it."""

    step: int
    pflops: float | None
    device_hours: float | None
    top1: float  # fraction in [0, 1]
    top5: float | None = None
    samples: int | None = None
    images: int | None = None
    epoch: float | None = None
    source: str = ""  # the result file it was read from

    def compute(self, axis: str) -> float | None:
        return self.pflops if axis == "pflops" else self.device_hours


@dataclass(frozen=True)
class TrainPoint:
    """One "train" record of metrics.jsonl (losses of a log interval and the cumulative compute at its end)."""

    step: int
    pflops: float
    device_hours: float | None
    loss: float | None
    rec_loss: float | None
    cls_loss: float | None
    images_per_sec: float | None = None
    data_wait: float | None = None


@dataclass
class RunData:
    """What the analysis needs from one pre-training run folder."""

    path: Path
    label: str
    model: dict[str, Any]
    train: list[TrainPoint] = field(default_factory=list)
    evals: dict[str, list[EvalPoint]] = field(default_factory=dict)  # protocol -> points
    derived: dict[str, Any] = field(default_factory=dict)  # config.json "derived" (data set size, device, ...)
    train_config: dict[str, Any] = field(default_factory=dict)  # config.json "train"

    @property
    def flops_per_image(self) -> int | None:
        return self.derived.get("train_flops_per_image")


@dataclass
class Method:
    """The runs of one method (e.g. SupMAE); their evaluated checkpoints form one accuracy-vs-compute curve."""

    label: str
    runs: list[RunData]

    @property
    def protocols(self) -> list[str]:
        return sorted({p for r in self.runs for p, pts in r.evals.items() if pts}, key=_protocol_order)

    def points(self, protocol: str, axis: str = "pflops") -> list[EvalPoint]:
        """Evaluated checkpoints with a known `axis` value, in order of it (then step)."""
        pts = [p for r in self.runs for p in r.evals.get(protocol, []) if p.compute(axis) is not None]
        return sorted(pts, key=lambda p: (p.compute(axis), p.step))

    def train_points(self) -> list[TrainPoint]:
        return sorted((t for r in self.runs for t in r.train), key=lambda t: (t.pflops, t.step))


def _protocol_order(p: str) -> tuple[int, str]:
    order = list(PROTOCOL_NAMES)
    return (order.index(p) if p in order else len(order), p)


def method_label(model: dict[str, Any]) -> str:
    """Default label of a run's method: SupMAE when the model has the classification branch, else MAE."""
    return "SupMAE" if model.get("cls_branch") else "MAE"


# ----------------------------------------------------------------------------------------------------------------
# Reading run folders


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_eval_results(folder: Path, warn: Callable[[str], None]) -> dict[str, list[EvalPoint]]:
    """Result files `<checkpoint stem>.<protocol>.json` in `folder` -> {protocol: points}."""
    out: dict[str, list[EvalPoint]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            warn(f"{path}: not readable as JSON ({e}); skipped")
            continue
        if not isinstance(rec, dict) or rec.get("format") != RESULT_FORMAT:
            continue  # some other JSON file
        top1, flops = _finite(rec.get("top1")), rec.get("pretrain_flops")
        if top1 is None or rec.get("step") is None:
            warn(f"{path}: no top1 / step; skipped")
            continue
        if flops is None:
            warn(f"{path}: the pre-training compute of {rec.get('checkpoint')} is unknown; it cannot be placed "
                 "on a compute axis and is skipped")
            continue
        out.setdefault(rec["protocol"], []).append(EvalPoint(
            step=int(rec["step"]), pflops=flops / 1e15, device_hours=_finite(rec.get("pretrain_device_hours")),
            top1=top1, top5=_finite(rec.get("top5")), samples=rec.get("samples"),
            images=rec.get("pretrain_images"), epoch=_finite(rec.get("epoch")), source=str(path),
        ))
    return out


def read_train_curve(path: Path, warn: Callable[[str], None]) -> list[TrainPoint]:
    """The "train" records of metrics.jsonl (a line cut short by a kill is skipped with a warning)."""
    points = []
    if not path.is_file():
        return points
    records, problems = read_jsonl(path)
    for problem in problems:
        warn(problem)
    for _, rec in records:
        if rec.get("kind") != "train":
            continue
        points.append(TrainPoint(
            step=int(rec["step"]), pflops=rec["flops"] / 1e15, device_hours=_finite(rec.get("device_hours")),
            loss=_finite(rec.get("loss")), rec_loss=_finite(rec.get("rec_loss")),
            cls_loss=_finite(rec.get("cls_loss")), images_per_sec=_finite(rec.get("images_per_sec")),
            data_wait=_finite(rec.get("data_wait")),
        ))
    return points


def load_run(path: str | os.PathLike, label: str | None = None,
             warn: Callable[[str], None] | None = None) -> RunData:
    """A pre-training run folder (config.json, metrics.jsonl, checkpoints/*.<protocol>.json).

    label: the method's name in tables and plots (default: SupMAE / MAE from the model's classification branch).
    """
    warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    evals = read_eval_results(path / "checkpoints", warn)
    model = config.get("model")
    if model is None:  # no config.json: the result files carry the model too
        model = next((json.loads(Path(p.source).read_text()).get("model") for pts in evals.values() for p in pts),
                     None)
    if model is None:
        raise ValueError(f"{path} has neither config.json nor evaluation results: is it a pre-training run folder "
                         "(./launch.sh pretrain --out) that was evaluated (./launch.sh knn --ckpt ...)?")
    steps_per_epoch = config.get("derived", {}).get("steps_per_epoch")
    for protocol, pts in evals.items():
        if steps_per_epoch:  # a checkpoint's own "epoch" counts finished epochs only; tables show the position
            pts = [dataclasses.replace(p, epoch=p.step / steps_per_epoch) for p in pts]
        evals[protocol] = sorted(pts, key=lambda p: (p.pflops, p.step))
    return RunData(path=path, label=label or method_label(model), model=model,
                   train=read_train_curve(path / "metrics.jsonl", warn), evals=evals,
                   derived=config.get("derived", {}), train_config=config.get("train", {}))


def parse_run_spec(spec: str) -> tuple[str | None, str]:
    """`LABEL=PATH` or `PATH` -> (label or None, path)."""
    label, sep, path = spec.partition("=")
    if sep and label and not os.path.exists(spec):
        return label, path
    return None, spec


def group_runs(runs: Iterable[RunData]) -> list[Method]:
    """Runs with the same label form one method (e.g. separately trained budgets); order of first appearance."""
    methods: dict[str, Method] = {}
    for r in runs:
        methods.setdefault(r.label, Method(r.label, [])).runs.append(r)
    return list(methods.values())


# ----------------------------------------------------------------------------------------------------------------
# The rule


def best_point(points: Sequence[EvalPoint]) -> EvalPoint:
    """The highest top-1; of equal top-1s the one with the least training FLOPs, then the lowest step."""
    if not points:
        raise ValueError("no evaluated checkpoints")
    return min(points, key=lambda p: (-p.top1, p.pflops if p.pflops is not None else math.inf, p.step))


def first_reaching(points: Sequence[EvalPoint], target: float, axis: str
                   ) -> tuple[EvalPoint | None, EvalPoint | None]:
    """(first point in `axis` order with top1 >= target, the point just before it) or (None, None)."""
    ordered = sorted((p for p in points if p.compute(axis) is not None), key=lambda p: (p.compute(axis), p.step))
    for i, p in enumerate(ordered):
        if p.top1 >= target:
            return p, ordered[i - 1] if i else None
    return None, None


@dataclass(frozen=True)
class AxisCrossing:
    """Where `method` first reaches the target on one compute axis."""

    axis: str
    reached: bool
    compute: float | None  # compute of the first evaluated checkpoint at or above the target
    step: int | None
    top1: float | None  # that checkpoint's top-1
    previous_compute: float | None  # the evaluated checkpoint before it (below the target); None if it is the first
    other_compute: float  # compute of the other method's best checkpoint
    max_compute: float  # the most compute `method` was evaluated at

    @property
    def ratio(self) -> float | None:
        """compute / other's compute; None when not reached or the other's best took no compute."""
        if not self.reached or self.other_compute <= 0:
            return None
        return self.compute / self.other_compute


@dataclass(frozen=True)
class Crossing:
    """Whether and with how much compute `method` reaches `other`'s best top-1 under `protocol`."""

    method: str
    other: str
    protocol: str
    target: float  # other's best top-1
    other_best: EvalPoint
    own_best: EvalPoint
    axes: dict[str, AxisCrossing]
    other_max_pflops: float | None = None  # the most compute the other method was evaluated at

    @property
    def reached(self) -> bool:
        return self.axes["pflops"].reached

    def statement(self) -> str:
        """One plain sentence with the numbers (see the module docstring for the definitions)."""
        proto = PROTOCOL_NAMES.get(self.protocol, self.protocol)
        target = f"{self.other}'s best {proto} top-1 ({100 * self.target:.2f}%, step {self.other_best.step})"
        fl = self.axes["pflops"]
        if not fl.reached:
            b = self.own_best
            return (f"{self.method} never reaches {target}: its best is {100 * b.top1:.2f}% (step {b.step}, "
                    f"{_pf(b.pflops)} PFLOPs) and it was evaluated up to {_pf(fl.max_compute)} PFLOPs; "
                    "nothing is extrapolated beyond that.")
        where = (f"first evaluated {self.method} checkpoint at or above it: step {fl.step} ({100 * fl.top1:.2f}%)"
                 + (f"; the one before, at {_pf(fl.previous_compute)} PFLOPs, was below" if fl.previous_compute
                    is not None else "; it is the first one evaluated"))
        if fl.other_compute <= 0:
            return (f"{self.other} did not improve on its untrained weights ({100 * self.target:.2f}%) within the "
                    f"{_pf(self.other_max_pflops)} PFLOPs it was evaluated at, so there is no compute to compare "
                    f"against; {self.method} is at or above that level at {_pf(fl.compute)} PFLOPs ({where}).")
        text = (f"{self.method} reaches {target} with {100 * fl.ratio:.1f}% of {self.other}'s training FLOPs "
                f"({_pf(fl.compute)} vs {_pf(fl.other_compute)} PFLOPs; {where})")
        dh = self.axes.get("device_hours")
        if dh is not None and dh.reached and dh.ratio is not None:
            text += (f" and {100 * dh.ratio:.1f}% of its device-hours ({_dh(dh.compute)} vs "
                     f"{_dh(dh.other_compute)})")
        return text + "."


def _pf(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _dh(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g} h"


def crossing(method: str, points: Sequence[EvalPoint], other: str, other_points: Sequence[EvalPoint],
             protocol: str) -> Crossing:
    """How `method` (its evaluated checkpoints `points`) reaches the best of `other` (see the module docstring)."""
    if not points or not other_points:
        raise ValueError(f"crossing {method} -> {other} ({protocol}): both need evaluated checkpoints")
    other_best = best_point(other_points)
    axes = {}
    for axis in AXES:
        mine = [p for p in points if p.compute(axis) is not None]
        if not mine or other_best.compute(axis) is None:
            continue  # e.g. results without device-hours
        hit, prev = first_reaching(mine, other_best.top1, axis)
        axes[axis] = AxisCrossing(
            axis=axis, reached=hit is not None, compute=hit.compute(axis) if hit else None,
            step=hit.step if hit else None, top1=hit.top1 if hit else None,
            previous_compute=prev.compute(axis) if prev else None, other_compute=other_best.compute(axis),
            max_compute=max(p.compute(axis) for p in mine),
        )
    other_max = max((p.pflops for p in other_points if p.pflops is not None), default=None)
    return Crossing(method, other, protocol, other_best.top1, other_best, best_point(points), axes, other_max)


# ----------------------------------------------------------------------------------------------------------------
# The whole analysis


@dataclass(frozen=True)
class MethodSummary:
    method: str
    protocol: str
    evaluated: int
    init: EvalPoint | None  # the step-0 (untrained) checkpoint, when evaluated
    best: EvalPoint
    final: EvalPoint  # the most trained checkpoint evaluated
    train_pflops: float | None  # total training compute of the method's runs (largest recorded)
    train_device_hours: float | None

    @property
    def gain_over_init(self) -> float | None:
        return self.best.top1 - self.init.top1 if self.init is not None else None

    @property
    def gain_standard_error(self) -> float | None:
        """Standard error of `gain_over_init` (two independent binomial proportions: a conservative figure, as both
        are measured on the same images)."""
        if self.init is None or not self.best.samples or not self.init.samples:
            return None
        return math.hypot(standard_error(self.best.top1, self.best.samples),
                          standard_error(self.init.top1, self.init.samples))


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy `p` measured on `n` images."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def significance_note(s: MethodSummary) -> str | None:
    """Whether training measurably improved on the untrained weights (gain > 2 standard errors), in one sentence."""
    gain, se = s.gain_over_init, s.gain_standard_error
    if gain is None or se is None or se == 0:
        return None
    proto = PROTOCOL_NAMES.get(s.protocol, s.protocol)
    head = (f"{s.method}: best {proto} top-1 {100 * s.best.top1:.2f}% vs {100 * s.init.top1:.2f}% untrained on "
            f"{s.best.samples:,} images, a gain of {100 * gain:+.2f} points = {gain / se:.1f} standard errors "
            f"({100 * se:.2f} points)")
    if gain > 2 * se:
        return head + ": a clear improvement."
    return (head + ": within two standard errors, so its training has not measurably improved this measure, and "
            "a crossing that targets its best measures noise.")


@dataclass
class Analysis:
    summaries: list[MethodSummary]
    crossings: list[Crossing]
    warnings: list[str] = field(default_factory=list)

    def statements(self) -> list[str]:
        return [c.statement() for c in self.crossings]


def summarise(m: Method, protocol: str) -> MethodSummary:
    pts = m.points(protocol)
    init = next((p for p in pts if p.step == 0), None)
    train = m.train_points()
    final = max(pts, key=lambda p: (p.pflops, p.step))
    total = max([t.pflops for t in train] + [final.pflops])
    hours = [t.device_hours for t in train if t.device_hours is not None]
    hours += [p.device_hours for p in pts if p.device_hours is not None]
    return MethodSummary(m.label, protocol, len(pts), init, best_point(pts), final, total,
                         max(hours) if hours else None)


def analyse(methods: Sequence[Method], protocols: Sequence[str] | None = None) -> Analysis:
    """Summaries of every method and the crossings of every ordered pair of methods, per protocol that both have."""
    found = sorted({p for m in methods for p in m.protocols}, key=_protocol_order)
    protocols = [p for p in (protocols or found) if p in found]
    out = Analysis([], [])
    for proto in protocols:
        have = [m for m in methods if m.points(proto)]
        out.summaries += [summarise(m, proto) for m in have]
        for a in have:
            for b in have:
                if a is not b:
                    out.crossings.append(crossing(a.label, a.points(proto), b.label, b.points(proto), proto))
        if len(have) < 2:
            out.warnings.append(f"{PROTOCOL_NAMES.get(proto, proto)}: only {', '.join(m.label for m in have)} "
                                "has evaluated checkpoints; no comparison")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The paper's setting (../shared/FACTS.md section 1), as data


IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_SOURCE = "SupMAE (Liang et al., arXiv 2205.14540): ImageNet-1k, ViT-B/16 at 224 px, fine-tuned top-1"
# Training GFLOPs per image (about 3 x forward: encoder on 49 + 1 tokens, decoder on 197 tokens).
PAPER_GFLOPS_PER_IMAGE = {"SupMAE": 31.0, "MAE": 59.0}
PAPER_DECODERS = {"SupMAE": "d1b (1 x 512)", "MAE": "d8b (8 x 512)"}
# Pre-training epochs -> fine-tuned top-1 (%); MAE 100-400 are the SupMAE authors' re-runs, 1600 the MAE paper.
PAPER_FINETUNE = {"SupMAE": {100: 82.6, 200: 83.1, 400: 83.6}, "MAE": {100: 82.0, 200: 82.4, 400: 83.0, 1600: 83.6}}
PAPER_CLAIM = 'SupMAE matches MAE with "only 30% of compute"'


def paper_points(method: str) -> list[EvalPoint]:
    """The paper's fine-tune table as evaluated checkpoints on the training-FLOP axis (no device-hours)."""
    gflops = PAPER_GFLOPS_PER_IMAGE[method]
    return [EvalPoint(step=ep, pflops=ep * IMAGENET_TRAIN_IMAGES * gflops * 1e9 / 1e15, device_hours=None,
                      top1=top1 / 100, epoch=float(ep), images=ep * IMAGENET_TRAIN_IMAGES, source="paper")
            for ep, top1 in sorted(PAPER_FINETUNE[method].items())]


def paper_crossings() -> list[Crossing]:
    """The crossing rule applied to the paper's table: SupMAE -> MAE's best and MAE -> SupMAE's best."""
    s, m = paper_points("SupMAE"), paper_points("MAE")
    return [crossing("SupMAE", s, "MAE", m, "finetune"), crossing("MAE", m, "SupMAE", s, "finetune")]


def paper_rows() -> list[dict[str, Any]]:
    """The fine-tune table with each schedule's training compute (rows for a report table)."""
    rows = []
    for method in ("SupMAE", "MAE"):
        for p in paper_points(method):
            rows.append({"method": f"{method} {PAPER_DECODERS[method]}", "epochs": p.step,
                         "PFLOPs": p.pflops, "fine-tune top-1": f"{100 * p.top1:.1f}%"})
    return rows


def paper_notes() -> list[str]:
    s_to_m = paper_crossings()[0]
    fl = s_to_m.axes["pflops"]
    return [
        f"Paper ({PAPER_SOURCE}): {PAPER_CLAIM}.",
        f"Same rule on the paper's table: SupMAE first reaches MAE's best fine-tune top-1 ({100 * s_to_m.target:.1f}%, "
        f"{s_to_m.other_best.step} epochs) at {fl.step} epochs, i.e. {100 * fl.ratio:.0f}% of MAE's training FLOPs "
        f"at about {PAPER_GFLOPS_PER_IMAGE['SupMAE']:.0f} vs {PAPER_GFLOPS_PER_IMAGE['MAE']:.0f} GFLOPs per trained "
        "image; the paper's 30% is not a pure FLOP ratio.",
    ]


def scale_note(methods: Sequence[Method], protocol: str) -> str | None:
    """How far a measured setting is from the paper's: data set, resolution, encoder, protocol, compute."""
    runs = [r for m in methods for r in m.runs]
    if not runs:
        return None
    r = runs[0]
    model = r.model
    samples = r.derived.get("train_samples")
    total = max((t.pflops for m in methods for t in m.train_points()), default=None)
    if total is None:
        total = max((p.pflops for m in methods for p in m.points(protocol)), default=None)
    paper_total = paper_points("SupMAE")[-1].pflops  # SupMAE's released 400-epoch run
    parts = [
        f"{samples:,} training images" if samples else "training images unknown",
        f"{r.derived.get('train_classes', model.get('num_classes'))} classes",
        f"{model.get('img_size')} px, patch {model.get('patch_size')} ({(model.get('img_size', 0) // max(1, model.get('patch_size', 1))) ** 2} patches)",
        f"encoder {model.get('embed_dim')}-d x {model.get('depth')} blocks",
        f"{PROTOCOL_NAMES.get(protocol, protocol)} accuracy",
    ]
    text = ("Measured setting vs the paper's: " + ", ".join(parts)
            + f" -- against {IMAGENET_TRAIN_IMAGES:,} images, 1,000 classes, 224 px, patch 16 (196 patches), encoder 768-d x 12 "
              "blocks, fine-tuned accuracy.")
    if total:
        text += (f" The most training compute of a method here is {_pf(total)} PFLOPs, 1/{paper_total / total:,.0f} "
                 f"of SupMAE's 400-epoch ImageNet run ({paper_total:,.0f} PFLOPs). Small-scale results indicate "
                 "the direction of the effect, not the paper's magnitudes.")
    return text
