"""Sharding's worker processes and write path: forked when safe (progress display started after the fork), the
lock on OUT not inherited, progress delivered in full, failures named; shard write-back started in contiguous
ranges without changing a byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

import pipeline.fileio as fileio
import pipeline.shards.shard_format as shard_format
from pipeline.shards.shard_format import ShardWriter
from pipeline.shards.sharding import (
    NullProgress,
    ShardingError,
    WorkerProgress,
    run_tasks,
    worker_start_method,
)
from tools import shard as shard_cli

REPO = Path(__file__).resolve().parents[1]
# Set in the parent by the tests below; a forked worker inherits it, a spawned one re-imports this module.
_PARENT_MARK: int | None = None


def _task(n: int) -> tuple[int, int | None]:
    progress = WorkerProgress()
    for _ in range(n):
        progress.add(10)
    progress.flush()
    return n, _PARENT_MARK


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _signal_handlers(_: int) -> list[str]:
    return [str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]


def _handlers_scenario() -> dict:
    signal.signal(signal.SIGTERM, lambda *_: None)  # as a trainer's checkpoint-and-exit handler
    signal.signal(signal.SIGUSR1, lambda *_: None)
    return {"workers": run_tasks(_signal_handlers, [0, 1], 2, NullProgress(), str, (0, 0, 0, 0))}


def test_forked_workers_get_fresh_signal_handlers():
    code = "import json, tests.test_shard_workers as t; print(json.dumps(t._handlers_scenario()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    fresh = [str(signal.default_int_handler), str(signal.SIG_DFL), str(signal.SIG_DFL)]
    assert json.loads(out)["workers"] == [fresh, fresh]


def _fail_on_two(n: int) -> int:
    if n == 2:
        raise OSError(28, "No space left on device")
    return n


class _ThreadedSink:
    """Like the CLI's rich display: a thread runs from `start` on."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, int, int, int]] = []
        self.files = self.nbytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stop.wait, daemon=True)

    def start(self, *totals: int) -> None:
        self.starts.append(totals)
        self._thread.start()

    def advance(self, files: int, nbytes: int) -> None:
        self.files += files
        self.nbytes += nbytes

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def test_start_method_is_fork_only_without_other_threads():
    code = (
        "import threading; from pipeline.shards.sharding import worker_start_method as m; a = m(); "
        "e = threading.Event(); t = threading.Thread(target=e.wait); t.start(); b = m(); e.set(); t.join(); "
        "print(a, b, m())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["fork", "spawn", "fork"]


def _forked_scenario() -> dict:
    """Run in a fresh process (no other threads, as in the CLI): a display thread starting at `progress.start`."""
    global _PARENT_MARK
    _PARENT_MARK = os.getpid()
    sink = _ThreadedSink()
    try:
        results = run_tasks(_task, [3, 1, 4, 1, 5], 2, sink, str, totals=(14, 140, 0, 0))
    finally:
        sink.close()
    return {"pid": os.getpid(), "results": results, "starts": sink.starts, "progress": [sink.files, sink.nbytes]}


def test_workers_are_forked_before_the_display_starts_and_deliver_all_progress():
    code = "import json, tests.test_shard_workers as t; print(json.dumps(t._forked_scenario()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    # Forked: each worker returned the mark its parent set after importing this module.
    assert got["results"] == [[n, got["pid"]] for n in (3, 1, 4, 1, 5)]
    assert got["starts"] == [[14, 140, 0, 0]]
    assert got["progress"] == [14, 140]


def test_spawned_workers_when_a_thread_runs_give_the_same_results():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    sink = _ThreadedSink()
    try:
        assert worker_start_method() == "spawn"
        results = run_tasks(_task, [2, 3], 2, sink, str, totals=(5, 50, 0, 0))
    finally:
        stop.set()
        other.join()
        sink.close()
    assert results == [(2, None), (3, None)]  # spawned: the module was imported afresh
    assert (sink.files, sink.nbytes) == (5, 50)


def test_forked_workers_close_the_parents_lock(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert run_tasks(_fd_open, [fd, fd], 2, NullProgress(), str, (0, 0, 0, 0), parent_only_fds=(fd,)) == [False] * 2
        assert run_tasks(_fd_open, [fd], 1, NullProgress(), str, (0, 0, 0, 0), parent_only_fds=(fd,)) == [True]
    finally:
        os.close(fd)


def test_a_failing_task_is_named():
    with pytest.raises(ShardingError, match=r"task 2 failed: .*No space left on device"):
        run_tasks(_fail_on_two, [1, 2, 3], 2, NullProgress(), lambda n: f"task {n}", (0, 0, 0, 0))


def _fail_or_chatter(n: int) -> int:
    if n == 0:
        raise OSError(5, "Input/output error")
    time.sleep(0.5)  # the main process has seen the failure by now
    progress = WorkerProgress()
    for _ in range(n):  # far more messages than a pipe holds (~1,000) unless the main process keeps reading
        progress.add(1)
        progress.flush()
    return n


def _failure_scenario() -> dict:
    sink = _ThreadedSink()
    finished: list[int] = []
    try:
        run_tasks(_fail_or_chatter, [0, 20_000], 2, sink, lambda n: f"task {n}", (0, 0, 0, 0),
                  on_result=finished.append)
    except ShardingError as e:
        error = str(e)
    finally:
        sink.close()
    return {"error": error, "finished": finished, "progress": [sink.files, sink.nbytes]}


def test_a_failure_winds_down_without_hanging_and_keeps_finished_work():
    code = "import json, tests.test_shard_workers as t; print(json.dumps(t._failure_scenario()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    got = json.loads(out)
    assert got["error"].startswith("task 0 failed: ") and "Input/output error" in got["error"]
    assert got["finished"] == [20_000]  # the running task ended and its result reached on_result
    assert got["progress"] == [20_000, 20_000]


def test_cli_spinner_thread_has_ended_on_exit():
    before = threading.active_count()
    with shard_cli._status(Console(file=open(os.devnull, "w"), force_terminal=True), "planning"):  # noqa: SIM115
        assert threading.active_count() == before + 1
    assert threading.active_count() == before


def _write(folder: Path, sizes: list[int]) -> bytes:
    w = ShardWriter(folder, "x", "train", 0)
    for i, size in enumerate(sizes):
        w.add_sample(f"s{i}", bytes([i]) * size, i, {"i": i})
    rec = w.close()
    return (folder / rec.file).read_bytes()


def test_write_back_starts_in_contiguous_ranges_and_changes_no_byte(tmp_path, monkeypatch):
    sizes = [3000, 70_000, 10, 250_000, 5000, 123_456]
    reference = _write(tmp_path, sizes)
    calls = []

    def spy(fd: int, offset: int, nbytes: int) -> None:
        assert os.fstat(fd).st_size == offset + nbytes  # flushed: the range is in the file, not in a buffer
        calls.append((offset, nbytes))

    monkeypatch.setattr(shard_format, "WRITEBACK_BYTES", 64 * 1024)
    monkeypatch.setattr(shard_format, "start_writeback", spy)
    (tmp_path / "b").mkdir()
    assert _write(tmp_path / "b", sizes) == reference
    assert calls and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:], strict=False))
    assert all(n >= 64 * 1024 for _, n in calls)
    assert len(reference) - sum(calls[-1]) < 64 * 1024  # under one window left for the fsync


def test_start_writeback_on_a_real_file(tmp_path):
    if sys.platform.startswith("linux"):
        assert fileio._sync_file_range is not None  # found in libc: the head start is not silently lost
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        shard_format.start_writeback(f.fileno(), 0, 100_000)  # sync_file_range on Linux, no-op elsewhere
        shard_format.start_writeback(f.fileno(), 0, 0)
    assert path.read_bytes() == b"x" * 100_000
