"""Data-order mixing on sample indices (pipeline/loaders/mixing.py): the measures on hand-checked cases, the
simulated reader order against what the DALI reader really yields, and the default shuffle buffer against a full
permutation at ImageNet's scale (the measurement docs/data-pipeline.md reports)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.loaders.base import DEFAULT_SHUFFLE_BUFFER, LoaderConfig
from pipeline.loaders.mixing import IMAGENET_SAMPLE_KB, MixingSetup, _distinct_per_row, _rebatch, measure
from tests.conftest import write_tiny_shards


def test_measures_on_hand_checked_orders():
    assert _distinct_per_row(np.array([[0, 0, 1], [2, 2, 2]])) == 1.5
    a = np.array([[0, 1], [2, 3]])
    assert _rebatch(a, a, 4) == 1.0  # the same batches again
    assert _rebatch(a, np.array([[0, 2], [1, 3]]), 4) == 0.0  # no pair meets twice
    assert _rebatch(np.array([[0, 1, 2]]), np.array([[0, 1, 4]]), 5) == 1.0  # sample 2 absent: pair (0, 1) only
    # one shard per rank, shards of 4, buffer 1: every batch is one shard, the same pairs every epoch
    m = measure(MixingSetup(16, 4, 4, 4, 1, epochs=3))
    assert (m.batches_per_epoch, m.shards_per_batch, m.shards_per_step, m.rebatch) == (1, 1.0, 4.0, 1.0)
    assert m.permutation_rebatch == 3 / 15
    with pytest.raises(ValueError, match="epochs must be >= 2"):
        MixingSetup(16, 4, 1, 4, 1, epochs=1)


def test_a_buffer_holding_the_whole_data_set_is_a_full_permutation():
    perm = measure(MixingSetup(4000, 100, 1, 50, 1, epochs=4, order="permutation"))
    full = measure(MixingSetup(4000, 100, 1, 50, 4000, epochs=4))
    assert perm.rebatch == pytest.approx(perm.permutation_rebatch, rel=0.3)
    assert full.rebatch == pytest.approx(perm.rebatch, rel=0.3)
    assert full.shards_per_batch == pytest.approx(perm.shards_per_batch, rel=0.05)
    local = measure(MixingSetup(4000, 100, 1, 50, 50, epochs=4))
    assert local.shards_per_batch < full.shards_per_batch / 3 and local.rebatch > 10 * full.rebatch


def test_simulated_order_is_the_dali_readers(tmp_path):
    """The simulation's shard-order shuffle + buffer model what DALI's webdataset reader yields: the same mixing
    on a small shard folder whose labels are the sample indices."""
    pytest.importorskip("nvidia.dali")
    from pipeline.loaders.build import build_loader

    n, shard, batch, buffer = 600, 20, 20, 40
    write_tiny_shards(tmp_path / "d", num_samples=n, num_classes=n, per_shard=shard, size=(8, 8))
    loader = build_loader(LoaderConfig(str(tmp_path / "d"), batch, 8, device="cpu", num_threads=1,
                                       shuffle_buffer=buffer))
    epochs = [np.stack([b.labels.numpy() for b in loader]) for _ in range(3)]
    shard_of = np.arange(n) // shard
    dali_shards = np.mean([_distinct_per_row(shard_of[e]) for e in epochs])
    dali_rebatch = np.mean([_rebatch(x, y, n) for x, y in zip(epochs, epochs[1:], strict=False)])
    sims = [measure(MixingSetup(n, shard, 1, batch, buffer, epochs=3, seed=s)) for s in range(4)]
    sim_shards = np.mean([m.shards_per_batch for m in sims])
    sim_rebatch = np.mean([m.rebatch for m in sims])
    assert dali_shards == pytest.approx(sim_shards, rel=0.2), (dali_shards, sim_shards)
    assert dali_rebatch == pytest.approx(sim_rebatch, rel=0.35), (dali_rebatch, sim_rebatch)
    assert dali_rebatch > 1.5 * sims[0].permutation_rebatch  # a small buffer is far from a permutation


@pytest.mark.slow  # simulates 1.28 M sample indices, 3 orders x 2 epochs: about 10 s
def test_default_buffer_comes_close_to_a_permutation_at_imagenet_scale():
    """ImageNet-1k (1,281,167 images in 1,000-image shards), 8 ranks x 512: the default buffer makes samples meet
    in a step again about as rarely as a full permutation does, within 1 GiB of buffer per rank; 1,024 did not."""
    setup = dict(num_samples=1_281_167, shard_samples=1000, world_size=8, batch_size=512, epochs=2)
    perm = measure(MixingSetup(**setup, buffer=1, order="permutation"))
    default = measure(MixingSetup(**setup, buffer=DEFAULT_SHUFFLE_BUFFER))
    old = measure(MixingSetup(**setup, buffer=1024))
    assert LoaderConfig("d", 4).shuffle_buffer == DEFAULT_SHUFFLE_BUFFER
    assert default.buffer_mb(IMAGENET_SAMPLE_KB) <= 1024
    assert default.rebatch_step < 1.15 * perm.rebatch_step
    assert default.rebatch < 10 * perm.rebatch
    assert old.rebatch_step > 2.5 * perm.rebatch_step and old.rebatch > 100 * perm.rebatch
    assert default.shards_per_batch > 4 * old.shards_per_batch


def test_bench_mixing_common_fields(tmp_path):
    import json

    from tools.bench.__main__ import main as bench_main

    out = tmp_path / "r.json"
    assert bench_main(["mixing", "--samples", "2000", "--shard-samples", "100", "--world", "2", "--batch", "50",
                       "--buffers", "50,1000", "--epochs", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["order"] for r in data["rows"]] == ["full permutation", "shards + buffer", "shards + buffer"]
    assert [r["buffer"] for r in data["rows"]] == [None, 50, 1000]
    assert data["rows"][1]["rebatch x permutation (rank)"] > data["rows"][2]["rebatch x permutation (rank)"]
    assert all(set(r) == set(data["columns"]) for r in data["rows"])
