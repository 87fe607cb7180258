"""An in-memory loader: the `pipeline.loaders.base.Loader` protocol over batches made by a function, with no I/O.

For benchmarks that must measure the model or the trainer without the data pipeline, and for tests that need a
deterministic loader with an exact position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.loaders.base import Batch
from pipeline.loaders.throughput import ThroughputStats


class InMemoryLoader:
    """The pipeline.loaders.base protocol over batches made by `make(epoch, index) -> Batch` (deterministic, no I/O):
    synthetic data for benchmarks and tests. The position advances when a batch is handed over, as in the real
    loaders, so `state_dict` / `load_state_dict` resume exactly."""

    def __init__(self, make: Callable[[int, int], Batch], batches_per_epoch: int, num_samples: int,
                 num_classes: int):
        self.make = make
        self.batches_per_epoch, self.num_samples, self.num_classes = batches_per_epoch, num_samples, num_classes
        self.epoch, self._batch = 0, 0
        self.stats = ThroughputStats()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch(self) -> Iterator[Batch]:
        while True:
            batch = self.make(self.epoch, self._batch)
            self._batch += 1
            last = self._batch == self.batches_per_epoch
            if last:
                self.epoch, self._batch = self.epoch + 1, 0
            yield batch
            if last:
                return

    def __iter__(self) -> Iterator[Batch]:
        return self.stats.timed(self._epoch(), lambda b: b.num_valid)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._batch = state["epoch"], state["batch"]
