"""PNG plots of a compute-to-accuracy analysis (matplotlib, Agg backend: no display needed).

    accuracy_vs_compute_<protocol>.png   top-1 of every evaluated checkpoint against cumulative training PFLOPs (left)
                                         and device-hours (right), one line per method; a dotted line at each
                                         method's best; a ring where a method first reaches the other's best
    training_curves.png                  reconstruction loss (comparable between SupMAE and MAE: the same normalised
                                         pixel MSE on masked patches) against PFLOPs and device-hours, and SupMAE's
                                         classification loss against PFLOPs
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.fileio import atomic_path
from train.compare.report import AXES, PROTOCOL_NAMES, Analysis, Method

# Fixed colours per method label, so SupMAE is the same colour in every plot of the project.
_COLOURS = {"SupMAE": "tab:blue", "MAE": "tab:orange"}
_FALLBACK = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def _colour(label: str, index: int) -> str:
    return _COLOURS.get(label, _FALLBACK[index % len(_FALLBACK)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_accuracy(methods: Sequence[Method], analysis: Analysis, protocol: str, path: str | os.PathLike,
                  title: str = "") -> Path:
    """Top-1 vs training PFLOPs and vs device-hours for every method with `protocol` results."""
    plt = _pyplot()
    path = Path(path)
    have = [m for m in methods if m.points(protocol)]
    axes_used = [a for a in AXES if any(m.points(protocol, a) for m in have)]
    fig, axs = plt.subplots(1, len(axes_used), figsize=(6.2 * len(axes_used), 4.4), squeeze=False,
                            layout="constrained")
    proto = PROTOCOL_NAMES.get(protocol, protocol)
    for ax, axis in zip(axs[0], axes_used, strict=True):
        for i, m in enumerate(have):
            pts = m.points(protocol, axis)
            colour = _colour(m.label, i)
            ax.plot([p.compute(axis) for p in pts], [100 * p.top1 for p in pts], "o-", color=colour, label=m.label,
                    markersize=4)
            best = max(p.top1 for p in pts)
            ax.axhline(100 * best, color=colour, linestyle=":", linewidth=1)
        for c in analysis.crossings:
            if c.protocol != protocol or axis not in c.axes or not c.axes[axis].reached:
                continue
            x = c.axes[axis]
            colour = _colour(c.method, [m.label for m in have].index(c.method))
            ax.plot([x.compute], [100 * x.top1], "o", markersize=12, markerfacecolor="none", color=colour)
            if x.ratio is not None:
                ax.annotate(f"{c.method} reaches {c.other}'s best\nwith {100 * x.ratio:.0f}% of its {AXES[axis]}",
                            (x.compute, 100 * x.top1), textcoords="offset points", xytext=(8, -28), fontsize=8,
                            color=colour)
        ax.set_xlabel(f"cumulative {AXES[axis]}")
        ax.set_ylabel(f"{proto} top-1 (%)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.legend(loc="lower right", fontsize=9)
    fig.suptitle(title or f"{proto} top-1 against training compute", fontsize=11)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_training(methods: Sequence[Method], path: str | os.PathLike, title: str = "") -> Path | None:
    """Training curves against compute; None when no method has metrics.jsonl records."""
    if not any(m.train_points() for m in methods):
        return None
    plt = _pyplot()
    path = Path(path)
    with_cls = any(t.cls_loss is not None for m in methods for t in m.train_points())
    panels = 3 if with_cls else 2
    fig, axs = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), squeeze=False, layout="constrained")
    for i, m in enumerate(methods):
        pts = [t for t in m.train_points() if t.rec_loss is not None]
        colour = _colour(m.label, i)
        axs[0][0].plot([t.pflops for t in pts], [t.rec_loss for t in pts], "-", color=colour, label=m.label)
        timed = [t for t in pts if t.device_hours is not None]
        axs[0][1].plot([t.device_hours for t in timed], [t.rec_loss for t in timed], "-", color=colour,
                       label=m.label)
        cls = [t for t in m.train_points() if t.cls_loss is not None]
        if with_cls and cls:
            axs[0][2].plot([t.pflops for t in cls], [t.cls_loss for t in cls], "-", color=colour, label=m.label)
    labels = [("training PFLOPs", "reconstruction loss (masked patches)"),
              ("device-hours", "reconstruction loss (masked patches)"),
              ("training PFLOPs", "classification loss (SupMAE head)")]
    for ax, (x, y) in zip(axs[0], labels, strict=False):
        ax.set_xlabel(f"cumulative {x}")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.legend(fontsize=9)
    fig.suptitle(title or "training curves against compute", fontsize=11)
    _save(fig, path)
    plt.close(fig)
    return path


def write_plots(methods: Sequence[Method], analysis: Analysis, folder: str | os.PathLike, title: str = ""
                ) -> list[Path]:
    """Every plot of the analysis into `folder`; returns the files written."""
    folder = Path(folder)
    written = []
    for protocol in sorted({s.protocol for s in analysis.summaries}):
        written.append(plot_accuracy(methods, analysis, protocol, folder / f"accuracy_vs_compute_{protocol}.png",
                                     title))
    curves = plot_training(methods, folder / "training_curves.png", title)
    if curves is not None:
        written.append(curves)
    return written
