"""How well the training order mixes the data, measured on sample indices alone (nothing is read or decoded).

The loaders read shards (tar files of consecutive samples): DALI's webdataset reader visits the shards in an order
reshuffled every epoch (`shuffle_after_epoch`), rank r reads the contiguous range [N r / W, N (r+1) / W) of that
epoch's sample sequence, and a shuffle buffer of `initial_fill` samples shuffles locally. The reader has no
index-level (whole data set) shuffle and reads one shard at a time. A batch therefore draws from the few shards
the buffer spans, and samples of one shard meet in the same batches epoch after epoch. The official code's
`DistributedSampler` instead draws a full random permutation every epoch.

`measure` simulates an order with the torch backend's planner (`EpochPlanner`: the same shard-order shuffle, rank
ranges, buffer shuffle, padding and drop_last as the DALI reader) or a full permutation, and reports:

  shards_per_batch       mean number of distinct shards that feed one rank's batch (what its BatchNorm sees)
  shards_per_step        the same for the global batch of a step (all ranks' batches: what the gradient sees)
  rebatch                of the sample pairs that share a rank's batch in one epoch, the share that share a batch
                         again in the next (mean over consecutive epochs); a full permutation gives about
                         (B - 1) / (N - 1)
  rebatch_step           the same for the global batch of a step
  buffer_mb              the shuffle buffer's host memory per rank at `sample_kb` per encoded sample

`./launch.sh bench mixing` prints these for several buffer sizes next to the full permutation (docs/data-pipeline.md
has the measurement behind the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.loaders.base import RankLayout
from pipeline.loaders.torch_loader import EpochPlanner

ORDERS = ("reader", "permutation")
IMAGENET_SAMPLE_KB = 115.0  # ImageNet-1k train: 147.9 GB of JPEGs / 1,281,167 images


@dataclass(frozen=True)
class MixingSetup:
    """A data set of `num_samples` in shards of `shard_samples`, read by `world_size` ranks in batches of
    `batch_size` per rank through a shuffle buffer of `buffer` samples (per rank)."""

    num_samples: int
    shard_samples: int
    world_size: int
    batch_size: int
    buffer: int
    epochs: int = 3
    seed: int = 0
    order: str = "reader"  # "reader" (shards + buffer, as the loaders read) | "permutation" (full shuffle)

    def __post_init__(self) -> None:
        for name in ("num_samples", "shard_samples", "world_size", "batch_size", "buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"mixing: {name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 2:
            raise ValueError(f"mixing: epochs must be >= 2 (re-meeting is measured between epochs), got {self.epochs}")
        if self.order not in ORDERS:
            raise ValueError(f"mixing: order {self.order!r} must be one of {', '.join(ORDERS)}")

    @property
    def shard_starts(self) -> np.ndarray:
        """(num_shards + 1,) first sample of each shard, then N."""
        return np.append(np.arange(0, self.num_samples, self.shard_samples), self.num_samples).astype(np.int64)


@dataclass(frozen=True)
class Mixing:
    setup: MixingSetup
    batches_per_epoch: int  # per rank
    shards_per_batch: float
    shards_per_step: float
    rebatch: float
    rebatch_step: float
    permutation_rebatch: float  # (B - 1) / (N - 1): a full permutation's expected rebatch

    def buffer_mb(self, sample_kb: float = IMAGENET_SAMPLE_KB) -> float:
        return self.setup.buffer * sample_kb / 1024 if self.setup.order == "reader" else 0.0


def epoch_batches(setup: MixingSetup, epoch: int) -> np.ndarray:
    """(W, batches_per_epoch, B) sample ids of every rank's batches in `epoch` (drop_last, as in training)."""
    layouts = [RankLayout(setup.num_samples, setup.world_size, r, setup.batch_size, True)
               for r in range(setup.world_size)]
    bpe = layouts[0].batches_per_epoch
    if setup.order == "permutation":
        perm = np.random.default_rng([setup.seed, epoch]).permutation(setup.num_samples)
        return np.stack([perm[slice(*lay.shard_range(lay.rank))][: bpe * setup.batch_size].reshape(bpe, -1)
                         for lay in layouts])
    starts = setup.shard_starts
    return np.stack([EpochPlanner(starts, lay, True, setup.seed, setup.buffer).plan(epoch).reshape(bpe, -1)
                     for lay in layouts])


def _distinct_per_row(values: np.ndarray) -> float:
    """Mean number of distinct values per row of a 2-D array."""
    s = np.sort(values, axis=1)
    return float(np.mean(1 + (np.diff(s, axis=1) != 0).sum(axis=1)))


def _rebatch(a: np.ndarray, b: np.ndarray, num_samples: int) -> float:
    """Of the pairs of samples that share a group in `a`, the share that share one in `b` too. a, b: (groups,
    size) sample ids of two epochs; samples absent from either (dropped by drop_last) are not counted."""
    ga = np.full(num_samples, -1, np.int64)
    gb = np.full(num_samples, -1, np.int64)
    ga[a.ravel()] = np.repeat(np.arange(a.shape[0]), a.shape[1])
    gb[b.ravel()] = np.repeat(np.arange(b.shape[0]), b.shape[1])
    both = (ga >= 0) & (gb >= 0)
    ga, gb = ga[both], gb[both]

    def pairs(keys: np.ndarray) -> float:
        counts = np.unique(keys, return_counts=True)[1].astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    met = pairs(ga)
    return pairs(ga * (b.shape[0] + 1) + gb) / met if met else 0.0


def measure(setup: MixingSetup) -> Mixing:
    """Mixing of `setup`'s order over `setup.epochs` epochs (see the module docstring)."""
    shard_of = np.repeat(np.arange(len(setup.shard_starts) - 1), np.diff(setup.shard_starts))
    epochs = [epoch_batches(setup, e) for e in range(setup.epochs)]
    w, bpe, b = epochs[0].shape
    per_batch = np.mean([_distinct_per_row(shard_of[e.reshape(w * bpe, b)]) for e in epochs])
    steps = [e.transpose(1, 0, 2).reshape(bpe, w * b) for e in epochs]  # step s: every rank's batch s
    per_step = np.mean([_distinct_per_row(shard_of[s]) for s in steps])
    n = setup.num_samples
    rebatch = np.mean([_rebatch(x.reshape(w * bpe, b), y.reshape(w * bpe, b), n)
                       for x, y in zip(epochs, epochs[1:], strict=False)])
    rebatch_step = np.mean([_rebatch(x, y, n) for x, y in zip(steps, steps[1:], strict=False)])
    return Mixing(setup, bpe, float(per_batch), float(per_step), float(rebatch), float(rebatch_step),
                  (b - 1) / (n - 1))
