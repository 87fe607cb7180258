"""When a zero-copy loader may release a batch's buffers (pipeline/loaders/lifetime.py), checked on the CPU with a
simulated GPU queue: work is enqueued while the consumer holds a batch, runs later, and must never find its buffer
released; the DALI loader's CPU path holds and releases through the same unit."""

from __future__ import annotations

import weakref
from collections import deque

import pytest
import torch

from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.build import build_loader
from pipeline.loaders.lifetime import HeldBuffers
from tests.conftest import write_tiny_shards


class Buffer:
    """Stands for pipeline memory: alive while someone references it."""


class FakeBatch:
    def __init__(self, buffer: Buffer):
        self.images = buffer


class FakeGPU:
    """One in-order stream: enqueued work and markers run when `advance` says so."""

    def __init__(self):
        self.queue: deque = deque()
        self.done = 0  # items completed
        self.enqueued = 0
        self.reads_after_release = 0
        self.markers = 0

    def read(self, buffer: Buffer) -> None:
        """Enqueue a kernel that reads `buffer` when it runs (the GPU holds a raw pointer, not a reference)."""
        self.queue.append(weakref.ref(buffer))
        self.enqueued += 1

    def record(self):
        gpu, position = self, self.enqueued
        self.queue.append(None)
        self.enqueued += 1
        self.markers += 1

        class Event:
            def query(self) -> bool:
                return gpu.done >= position + 1

        return Event()

    def advance(self, items: int | None = None) -> None:
        for _ in range(len(self.queue) if items is None else min(items, len(self.queue))):
            ref = self.queue.popleft()
            if ref is not None and ref() is None:
                self.reads_after_release += 1
            self.done += 1


def test_buffers_stay_until_the_batch_is_dropped_and_the_work_queued_before_has_run():
    gpu = FakeGPU()
    held = HeldBuffers(gpu.record)
    a, b = Buffer(), Buffer()
    ra, rb = weakref.ref(a), weakref.ref(b)
    batch_a, batch_b = FakeBatch(a), FakeBatch(b)
    held.hold(batch_a, (a,))
    held.hold(batch_b, (b,))
    del a, b
    gpu.read(batch_a.images)
    gpu.advance()  # the GPU has caught up, but the consumer still holds both batches: nothing may go
    assert held.collect() == 0 and len(held) == 2 and gpu.markers == 0

    del batch_a  # dropped: a marker recorded now covers the work queued while it was held
    gpu.read(batch_b.images)
    assert held.collect() == 0 and gpu.markers == 1 and ra() is not None
    assert held.collect() == 0 and gpu.markers == 1  # still pending: no second marker for the same batch
    gpu.advance(1)  # batch b's read ran, the marker not yet
    assert held.collect() == 0 and ra() is not None
    gpu.advance(1)  # the marker completed: a may go, b is still held by the consumer
    assert held.collect() == 1 and ra() is None and rb() is not None and len(held) == 1

    # A marker that completed before b was dropped does not release b: its own marker must complete.
    del batch_b
    assert held.collect() == 0 and gpu.markers == 2 and rb() is not None
    gpu.advance()
    assert held.collect() == 1 and rb() is None and len(held) == 0


def test_cpu_releases_a_dropped_batch_at_the_next_hand_over():
    held = HeldBuffers(None)
    buf = Buffer()
    ref = weakref.ref(buf)
    batch = FakeBatch(buf)
    held.hold(batch, (buf,))
    del buf
    assert held.collect() == 0 and ref() is not None
    del batch
    assert held.collect() == 1 and ref() is None


@pytest.mark.parametrize("accum_steps,lag", [(1, 0), (1, 3), (4, 2), (3, 7)])
def test_training_loop_with_a_lagging_gpu_never_reads_a_released_buffer(accum_steps, lag):
    """The trainer's pattern: take accum_steps batches, enqueue their step (gather, loss forward, loss backward
    re-reading the pixels), drop the group when the next one is complete; the GPU runs `lag` steps behind."""
    gpu = FakeGPU()
    held = HeldBuffers(gpu.record)
    alive = []  # weak references to every buffer made

    def loader(batches: int):
        for _ in range(batches):
            buf = Buffer()
            alive.append(weakref.ref(buf))
            batch = FakeBatch(buf)
            held.collect()
            held.hold(batch, (buf,))
            del buf
            yield batch

    step_items = []
    group: list[FakeBatch] = []
    for b in loader(12 * accum_steps):
        group.append(b)
        if len(group) < accum_steps:
            continue
        before = gpu.enqueued
        for x in group:
            for _ in range(3):  # gather, loss forward, loss backward
                gpu.read(x.images)
        step_items.append(gpu.enqueued - before)
        if len(step_items) > lag:  # the GPU finishes the step issued `lag` steps ago
            gpu.advance(step_items[-lag - 1] if lag else None)
        group = []
    del b, x  # the loop variables were the last references to the final group
    gpu.advance()
    held.collect()
    gpu.advance()
    held.collect()
    assert gpu.reads_after_release == 0
    assert len(held) == 0 and all(r() is None for r in alive)  # and everything was released in the end


def test_without_waiting_for_markers_the_simulation_sees_reads_after_release():
    """The simulation's teeth: a holder whose markers complete at once (as if the buffers went with the batch)
    lets a lagging GPU read released memory."""

    class Done:
        def query(self) -> bool:
            return True

    gpu = FakeGPU()
    held = HeldBuffers(Done)
    batch = FakeBatch(Buffer())
    held.hold(batch, (batch.images,))
    gpu.read(batch.images)
    del batch
    held.collect()
    gpu.advance()
    assert gpu.reads_after_release == 1


def test_dali_cpu_loader_holds_each_batch_until_it_is_dropped(tmp_path):
    pytest.importorskip("nvidia.dali", reason="the DALI loader needs nvidia-dali")
    write_tiny_shards(tmp_path / "s", num_samples=24)
    loader = build_loader(LoaderConfig(str(tmp_path / "s"), 4, 16, device="cpu", num_threads=1, shuffle_buffer=8,
                                       decode="dali-cpu"))
    kept = []
    for i, b in enumerate(loader):
        assert b.images.shape == (4, 16, 16, 3) and b.images.dtype == torch.uint8
        # Held: the batch just handed over, the ones kept, and the previous one (the loop variable still referred
        # to it while this one was fetched) unless it is kept anyway.
        assert len(loader._held) == 1 + len(kept) + (1 if i >= 3 else 0)
        if i < 2:
            kept.append(b)
    assert len(kept) == 2 and i == len(loader) - 1 == 5
    kept.clear()
    b = None
    next(iter(loader))  # the next hand-over releases every dropped batch (CPU: nothing is queued)
    assert len(loader._held) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the stream DALI's GPU outputs are bound to)"))])
def test_dali_runs_the_pipeline_on_torchs_current_stream(tmp_path, device):
    """GPU: outputs ordered on torch's current stream (no host wait); CPU: no stream (host-synchronous)."""
    pytest.importorskip("nvidia.dali", reason="the DALI loader needs nvidia-dali")
    write_tiny_shards(tmp_path / "s", num_samples=8)
    loader = build_loader(LoaderConfig(str(tmp_path / "s"), 4, 16, device=device, num_threads=1,
                                       decode="dali-cpu" if device == "cpu" else "gpu"))
    calls = []

    class Pipe:  # records how the loader runs its pipeline
        def run(self, *args):
            calls.append(args)
            return None, None, "source info"

    loader._run(Pipe())
    want = torch.cuda.current_stream(loader.device) if device == "cuda" else None
    assert calls == [(want,)]
