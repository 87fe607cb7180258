"""Lifetime of a loader's device buffers after a batch is handed over: `HeldBuffers`.

A zero-copy loader (DALI) hands the consumer tensors that live in the pipeline's own memory. The consumer only
enqueues GPU work on them (gather of the visible patches, loss forward, loss backward re-reading the pixels) and
drops the batch long before that work runs. If the loader let go of the memory at that moment, the pipeline could
reuse it for a later batch while the queued kernels still read it: silently wrong pixels. So the loader holds every
batch's buffers until the GPU work that can read them has completed:

  1. `hold(batch, buffers)` at hand-over: the loader keeps `buffers` (the tensors owning the pipeline's memory) and
     a weak reference to the `batch` object the consumer received.
  2. `collect()` at every later hand-over: a held batch whose object the consumer has dropped gets a completion
     marker recorded now, on the consumer's stream (a CUDA event on the current stream). Every kernel that reads the
     batch was enqueued while the consumer still held it, so before the marker.
  3. Buffers whose marker has completed (`query()` is True: a non-blocking check, never a host sync) are released;
     the pipeline may reuse that memory from then on. Markers of one stream complete in order.

Contract for consumers: enqueue work on a batch's tensors while holding the batch (the Batch object), on the stream
that is current while iterating the loader. Keeping the Batch longer only delays the release. On the CPU work is
synchronous: `new_marker=None` releases a dropped batch at the next `collect()`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Protocol


class Marker(Protocol):
    """A point in the consumer's stream of work (torch.cuda.Event, recorded)."""

    def query(self) -> bool: ...


class HeldBuffers:
    """Buffers of handed-over batches, released once no queued GPU work can still read them (see module doc).

    new_marker: records a completion marker on the consumer's stream and returns it; None on the CPU.
    """

    def __init__(self, new_marker: Callable[[], Marker] | None):
        self._new_marker = new_marker
        self._held: list[list[Any]] = []  # [weak reference to the batch, buffers, marker or None]

    def __len__(self) -> int:
        """Batches whose buffers are still held."""
        return len(self._held)

    def hold(self, batch: Any, buffers: tuple) -> None:
        """Keep `buffers` until `batch` is dropped by the consumer and the work queued until then has completed."""
        self._held.append([weakref.ref(batch), buffers, None])

    def collect(self) -> int:
        """Mark the batches the consumer dropped, release those whose marker completed; returns how many were
        released. Call at every hand-over (cheap: a weak-reference check and an event query per held batch)."""
        marker = None
        kept = []
        for entry in self._held:
            ref, _, mark = entry
            if mark is None and ref() is None:
                if self._new_marker is None:
                    continue  # CPU: the work that read the batch has already run
                if marker is None:
                    marker = self._new_marker()  # one marker covers every batch dropped since the last collect
                entry[2] = mark = marker
            if mark is not None and mark.query():
                continue
            kept.append(entry)
        released = len(self._held) - len(kept)
        self._held = kept
        return released


def cuda_marker(device) -> Callable[[], Marker]:
    """A `new_marker` for `device`: a CUDA event recorded on that device's current stream."""
    import torch

    def record() -> Marker:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    return record
