"""Consumer-side throughput counters of a data loader: images/s delivered and time the consumer waited for data.

The loader times each `next()` its consumer makes (wall time from the request to the batch being handed over),
so `wait_fraction` is the share of wall time the training loop (or benchmark) sat idle waiting for input: near 0
means the data path keeps up, near 1 means the consumer is starved. Counts are host-side Python integers (the
loaders know how many samples of a batch are real without looking at the device), so recording never syncs.

The training loop reads the counters at its log interval and calls `reset()`; between resets the figures cover
exactly that interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ThroughputSnapshot:
    """The counters of one interval, for logging."""

    images: int
    batches: int
    seconds: float
    wait_seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        return min(1.0, self.wait_seconds / self.seconds) if self.seconds > 0 else 0.0


class ThroughputStats:
    """Images delivered and consumer wait time since the last `reset()` (or creation)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self._start = self._clock()
        self.images = 0
        self.batches = 0
        self.wait_seconds = 0.0

    def record(self, images: int, wait_seconds: float) -> None:
        """One batch of `images` real samples was handed over after the consumer waited `wait_seconds`."""
        self.images += images
        self.batches += 1
        self.wait_seconds += wait_seconds

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def snapshot(self) -> ThroughputSnapshot:
        return ThroughputSnapshot(self.images, self.batches, self.elapsed, self.wait_seconds)

    @property
    def images_per_sec(self) -> float:
        return self.snapshot().images_per_sec

    @property
    def wait_fraction(self) -> float:
        return self.snapshot().wait_fraction

    def timed(self, batches: Iterator[T], count: Callable[[T], int]) -> Iterator[T]:
        """Re-yield `batches`, recording `count(batch)` images and the time each `next()` blocked."""
        while True:
            t0 = self._clock()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.record(count(batch), self._clock() - t0)
            yield batch
