"""Shared measurement and reporting for every `./launch.sh bench` subcommand.

Every benchmark warms up before timing, repeats, and reports the median with its spread, together with a
description of the machine, as a rich table on screen and optionally as JSON and Markdown files.

JSON schema (all subcommands):
    {"benchmark": str, "machine": {...machine_info()}, "settings": {...}, "columns": [str],
     "rows": [{column: value, ...}], "notes": [str]}
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_write_bytes


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU name, driver, library versions and builds, date: printed with every benchmark
    result."""
    import torch

    from train.system.builds import installed_dali
    from train.system.nvidia import detect_nvidia

    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    nvidia = detect_nvidia()
    dali = installed_dali()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": gpu,
        "driver": nvidia.driver,
        "driver_cuda": nvidia.cuda_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "dali": dali[1] if dali else None,
        "dali_package": dali[0].dali_package if dali else None,
        "timm": _version("timm"),
    }


@dataclass(frozen=True)
class Timing:
    """Seconds per call over repeats; `rate(items)` converts to items/s using the median."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Half the min-max range relative to the median (0.05 = +-5%)."""
        return (max(self.seconds) - min(self.seconds)) / 2 / self.median if self.median > 0 else 0.0

    def rate(self, items_per_call: float) -> float:
        return items_per_call / self.median


def int_list(text: str, option: str, example: str = "1,2") -> tuple[int, ...]:
    """A comma-separated list of integers given to `option`; ValueError naming the option otherwise."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} {text}: give comma-separated integers, e.g. {example}") from None


def spread_text(values: list[float]) -> str:
    """"±x.x%": the spread of `values` as `Timing.spread` defines it ("-" when their median is 0)."""
    timing = Timing(list(values))
    return f"±{timing.spread:.1%}" if timing.median else "-"


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[], Any] | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then time `repeats` calls; `sync` (e.g. cuda.synchronize) ends each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return Timing(out)


@dataclass
class BenchReport:
    benchmark: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)

    def add_row(self, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.benchmark}: row has columns {sorted(unknown)} not in {self.columns}")
        self.rows.append({c: values.get(c) for c in self.columns})

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "machine": self.machine,
            "settings": self.settings,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }

    @staticmethod
    def _fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)

    def machine_line(self) -> str:
        m = self.machine
        gpu = m.get("gpu") or "no GPU"
        if m.get("driver"):
            gpu += f" (driver {m['driver']}, CUDA {m.get('driver_cuda')})"
        build = f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else ""
        return (f"{m.get('cpu')} ({m.get('cpu_cores')} cores), {gpu}; torch {m.get('torch')}{build}, "
                f"triton {m.get('triton')}, DALI {m.get('dali')}, timm {m.get('timm')}; {m.get('date')}")

    def to_markdown(self) -> str:
        lines = [f"### {self.benchmark}", "", f"Machine: {self.machine_line()}", ""]
        if self.settings:
            lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("| " + " | ".join("---" for _ in self.columns) + " |")
        for row in self.rows:
            lines.append("| " + " | ".join(self._fmt(row[c]) for c in self.columns) + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        table = Table(title=self.benchmark, caption=self.machine_line())
        for c in self.columns:
            table.add_column(c, justify="left" if c in ("name", "stage", "method", "config") else "right")
        for row in self.rows:
            table.add_row(*(self._fmt(row[c]) for c in self.columns))
        console.print(table)
        for n in self.notes:
            console.print(f"- {n}")

    def write(self, json_path: str | os.PathLike | None = None, markdown_path: str | os.PathLike | None = None) -> None:
        for path in (json_path, markdown_path):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        if json_path:
            atomic_write_bytes(json_path, (json.dumps(self.to_dict(), indent=2) + "\n").encode(), fsync=False)
        if markdown_path:
            atomic_write_bytes(markdown_path, self.to_markdown().encode(), fsync=False)
