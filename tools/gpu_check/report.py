"""A step's report (OUTDIR/steps/NN-name.json, rewritten as results come in) and the check's summary (summary.md and
summary.json: one table of every step, then the tables of the measuring steps)."""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_write_json

STATUSES = ("running", "ok", "failed", "skipped", "timed out")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017 (any Python 3)


@dataclass
class StepReport:
    """What one step found. `check` records pass/fail facts, `add_row` table rows; `save` writes the JSON file
    (called after every row, so a step that runs out of time keeps what it measured)."""

    number: int
    name: str
    title: str
    path: Path
    status: str = "running"
    summary: str = ""
    reason: str = ""  # why skipped / failed / timed out
    seconds: float = 0.0
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic, repr=False)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"what": what, "ok": bool(ok), "detail": detail})
        self.save()
        return bool(ok)

    def add_row(self, **row: Any) -> None:
        for k in row:
            if k not in self.columns:
                self.columns.append(k)
        self.rows.append(row)
        self.save()

    def finish(self) -> None:
        """ok unless a check failed (a skip or failure set before stays)."""
        if self.status == "running":
            failed = [c["what"] for c in self.checks if not c["ok"]]
            self.status = "failed" if failed else "ok"
            if failed and not self.reason:
                self.reason = "failed: " + "; ".join(failed)
        self.save()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("started")
        d["path"] = str(self.path)
        return d

    def save(self) -> None:
        self.seconds = round(time.monotonic() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.to_dict(), fsync=False)

    @classmethod
    def load(cls, path: Path) -> dict[str, Any] | None:
        import json

        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v).replace("|", "/")


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def summary(reports: list[dict[str, Any]], header: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(Markdown, JSON) of the whole check: one row per step, then every step's own table."""
    rows = [{"step": f"{r['number']} {r['name']}", "status": r["status"], "seconds": r["seconds"],
             "result": r["summary"] or r["reason"]} for r in reports]
    md = [f"### gpu_check {header['date']}", "",
          f"Device: {header['device']}. Command: `{header['command']}` ({header['mode']}, "
          f"{header['seconds']:.0f} s of a {header['budget_s']} s budget).", ""]
    md += markdown_table(["step", "status", "seconds", "result"], rows)
    for r in reports:
        if r.get("rows"):
            md += ["", f"#### {r['number']} {r['name']}: {r['title']}", ""]
            md += markdown_table(r["columns"], r["rows"])
        for note in r.get("notes", []):
            md.append(f"\n{r['number']} {r['name']}: {note}")
    return "\n".join(md) + "\n", {**header, "steps": reports, "table": rows}
