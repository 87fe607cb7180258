"""The torch backend: same interface and semantics as the DALI loader (labels, coverage, padding, determinism,
exact resume) and the same eval pixels within interpolation rounding, on tiny synthetic and real ImageNet files."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.build import build_loader
from pipeline.loaders.torch_loader import buffer_shuffle
from pipeline.shards.shard_format import ClassEntry, Manifest, ShardFormatError, ShardWriter
from tests.conftest import requires_shared, write_tiny_shards
from tests.test_loader import (
    SIZE,
    N,
    cfg,
    consume,
    corrupt_first_jpeg,
    run_epochs,
    same_batches,
    valid_labels,
    write_ids_data,
)


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    return write_ids_data(tmp_path_factory)


def tcfg(data, **kw) -> LoaderConfig:
    return cfg(data, **{"backend": "torch", "num_threads": 0, **kw})


def test_buffer_shuffle_is_a_local_permutation():
    rng = np.random.default_rng(0)
    order = buffer_shuffle(1000, 16, rng)
    assert sorted(order) == list(range(1000))
    assert not np.array_equal(order, np.arange(1000))
    # Output i was read at most 15 samples after it would have been in order.
    assert (order - np.arange(1000)).max() <= 15
    assert np.array_equal(buffer_shuffle(5, 1, rng), np.arange(5))


def test_torch_batches_have_the_interface_shapes_and_labels(ids_data):
    loader = build_loader(tcfg(ids_data, drop_last=False))
    assert (loader.num_samples, loader.num_classes, loader.batches_per_epoch) == (N, N, 6)
    batches = list(loader)
    for b in batches:
        assert b.images.shape == (4, SIZE, SIZE, 3) and b.images.dtype == torch.uint8 and b.images.is_contiguous()
        assert b.labels.dtype == torch.int64 and b.labels.shape == (4,)
    assert batches[-1].valid.tolist() == [True, True, True, False] and batches[-1].num_valid == 3
    real = [b.labels[b.valid] if b.valid is not None else b.labels for b in batches]
    assert sorted(torch.cat(real).tolist()) == list(range(N))
    assert loader.stats.images == N and loader.epoch == 1


def test_labels_match_the_images(ids_data):
    base = np.array([[(lbl * 67) % 256, (lbl * 131 + 40) % 256, (lbl * 29 + 90) % 256] for lbl in range(N)], float)
    for images, labels, _ in run_epochs(build_loader(tcfg(ids_data)), 1):
        for img, lbl in zip(images, labels, strict=True):
            assert np.argmin(((base - img.reshape(-1, 3).mean(0)) ** 2).sum(1)) == lbl


@pytest.mark.parametrize("world", [1, 2])
def test_eval_agrees_with_dali_on_labels_padding_and_pixels(ids_data, world):
    for rank in range(world):
        dali = run_epochs(build_loader(cfg(ids_data, train=False), rank, world), 1)
        tv = run_epochs(build_loader(tcfg(ids_data, train=False), rank, world), 1)
        assert [b[1] for b in dali] == [b[1] for b in tv]
        assert [b[2] for b in dali] == [b[2] for b in tv]
        diff = np.abs(np.concatenate([d[0] for d in dali]).astype(int) - np.concatenate([t[0] for t in tv]))
        assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_float16_output_is_normalised(ids_data):
    u8 = run_epochs(build_loader(tcfg(ids_data, train=False)), 1)
    f16 = run_epochs(build_loader(tcfg(ids_data, train=False, output_dtype="float16")), 1)
    dali16 = run_epochs(build_loader(cfg(ids_data, train=False, output_dtype="float16")), 1)
    for a, b, c in zip(u8, f16, dali16, strict=True):
        assert b[0].dtype == np.float16
        np.testing.assert_allclose(b[0].astype(np.float32), (a[0] - np.array([123.675, 116.28, 103.53]))
                                   / np.array([58.395, 57.12, 57.375]), atol=2e-2)
        assert np.abs(b[0].astype(np.float32) - c[0].astype(np.float32)).mean() < 0.02


def test_train_covers_every_sample_across_two_ranks_like_dali(ids_data):
    for backend_cfg in (tcfg, cfg):
        loaders = [build_loader(backend_cfg(ids_data, drop_last=False), rank, 2) for rank in range(2)]
        for _ in range(2):
            assert sorted(lbl for ld in loaders for lbl in valid_labels(run_epochs(ld, 1))) == list(range(N))
    dropped = [build_loader(tcfg(ids_data), rank, 2) for rank in range(2)]
    assert [ld.batches_per_epoch for ld in dropped] == [2, 2]
    seen = [lbl for ld in dropped for lbl in valid_labels(run_epochs(ld, 1))]
    assert len(seen) == len(set(seen)) == 16


def test_order_depends_on_seed_and_epoch_not_on_workers(ids_data):
    a = run_epochs(build_loader(tcfg(ids_data)), 2)
    b = run_epochs(build_loader(tcfg(ids_data, num_threads=2, prefetch=1)), 2)
    c = run_epochs(build_loader(tcfg(ids_data, seed=1)), 2)
    assert same_batches(a, b)
    assert [x[1] for x in a] != [x[1] for x in c]
    assert [x[1] for x in a[:5]] != [x[1] for x in a[5:]]
    assert not np.array_equal(a[0][0], c[0][0])


def test_training_loop_rng_is_untouched(ids_data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_loader(tcfg(ids_data)))
    assert torch.equal(torch.rand(3), expected)


def test_resume_mid_epoch_and_across_epochs(ids_data):
    config = tcfg(ids_data, batch_size=3)
    reference = run_epochs(build_loader(config, 1, 2), 2)
    per_epoch = len(reference) // 2
    for k in (2, per_epoch, per_epoch + 1):
        first = build_loader(config, 1, 2)
        consume(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_loader(tcfg(ids_data, batch_size=3, num_threads=2), 1, 2)
        resumed.load_state_dict(state)
        assert same_batches(run_epochs(resumed, 2 - k // per_epoch), reference[k:]), f"resume after {k}"


def test_corrupt_sample_names_the_shard_and_key(tmp_path):
    folder = tmp_path / "shards"
    manifest = write_tiny_shards(folder, num_samples=10, num_classes=10, per_shard=5, size=(24, 24))
    key = corrupt_first_jpeg(folder, manifest.shards[1])
    with pytest.raises(ShardFormatError, match=f"{manifest.shards[1].file}: sample '{key}'.*shard --verify"):
        list(build_loader(tcfg(folder, train=False)))


# ----------------------------------------------------------------------------------------------------------------
# real ImageNet files (../shared/data)


def write_jpeg_shards(folder, jpegs: list[bytes], labels: list[int], per_shard: int = 6) -> None:
    folder.mkdir(parents=True)
    records = []
    for shard, start in enumerate(range(0, len(jpegs), per_shard)):
        writer = ShardWriter(folder, "real", "val", shard)
        for i in range(start, min(start + per_shard, len(jpegs))):
            writer.add_sample(f"r{i:04d}", jpegs[i], labels[i], {"src": str(i)})
        records.append(writer.close())
    classes = sorted(set(labels))
    Manifest(name="real", split="val", source="imagenet-sample-500", command=["test"], options={},
             classes=[ClassEntry(index=c, wnid=f"c{c}") for c in range(max(classes) + 1)], shards=records,
             totals={"written": len(jpegs)}).save(folder)


def test_eval_pixels_agree_with_dali_on_real_imagenet_files(tmp_path):
    src = requires_shared("imagenet-sample-500.tar")
    jpegs = []
    with tarfile.open(src) as tf:
        for member in tf:
            if member.isfile() and len(jpegs) < 10:
                im = Image.open(tf.extractfile(member)).convert("RGB")
                im.thumbnail((512, 512), Image.Resampling.BOX)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90, subsampling=2)  # as the sharding tool stores them
                jpegs.append(buf.getvalue())
    folder = tmp_path / "real"
    write_jpeg_shards(folder, jpegs, list(range(len(jpegs))))
    common = dict(batch_size=5, img_size=224, train=False)
    dali = run_epochs(build_loader(cfg(folder, **common)), 1)
    tv = run_epochs(build_loader(tcfg(folder, **common)), 1)
    assert [b[1] for b in dali] == [b[1] for b in tv] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    diff = np.abs(np.concatenate([d[0] for d in dali]).astype(int) - np.concatenate([t[0] for t in tv]))
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2, (diff.mean(), np.percentile(diff, 99))


def test_stopping_mid_epoch_then_iterating_continues_with_workers(ids_data):
    reference = run_epochs(build_loader(tcfg(ids_data)), 2)
    loader = build_loader(tcfg(ids_data, num_threads=2))
    got = []
    for _ in range(3):  # stop after 2 and 4 of the 5 batches (prefetched ones are dropped), then finish
        for b in loader:
            got.append((b.images.numpy().copy(), b.labels.tolist(), None))
            if len(got) in (2, 4):
                break
    assert (loader.epoch, loader.batch) == (1, 0)
    got += run_epochs(loader, 1)
    assert same_batches(got, reference)


def test_no_worker_processes_outlive_the_loader(ids_data):
    import multiprocessing

    before = set(multiprocessing.active_children())
    loader = build_loader(tcfg(ids_data, num_threads=2))
    next(iter(loader))
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.close()
    assert set(multiprocessing.active_children()) - before == set()
    next(iter(loader))  # still usable after close
    del loader
    assert set(multiprocessing.active_children()) - before == set()


def test_sample_reader_keeps_few_files_open(ids_data):
    from pipeline.loaders.base import ShardSet
    from pipeline.loaders.torch_loader import SampleIndex, SampleReader

    index = SampleIndex.build(ShardSet.open(ids_data))
    reader = SampleReader(index, str(ids_data), max_open=2)
    labels = [reader.read(sid)[1] for sid in (0, 7, 12, 1, 22)]  # shards 0, 1, 2, 0, 4
    assert labels == [0, 7, 12, 1, 22] and len(reader._files) == 2
    reader.close()
    assert not reader._files


def test_sample_members_follow_webdatasets_key_and_extension_rules():
    """The torch backend parses a sample's tar span with the standard library, as the webdataset library would."""
    from pipeline.loaders.torch_loader import sample_members

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("d/x1.jpg", b"J1"), ("d/x1.seg.PNG", b"P1"), ("d/x1.lbl", b"L1"), ("d/x2.jpg", b"J2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    assert sample_members(raw) == ("d/x1", {"jpg": b"J1", "seg.png": b"P1", "lbl": b"L1"})
    assert sample_members(raw[: 6 * 512]) == sample_members(raw)  # a span ends where its sample ends: no EOF blocks
    wds = pytest.importorskip("webdataset.tariterators")
    members = ({**m, "__url__": "t.tar"} for m in wds.tar_file_iterator(io.BytesIO(raw)))
    first = next(iter(wds.group_by_keys(members)))
    assert first["__key__"] == "d/x1" and {k: v for k, v in first.items() if not k.startswith("__")} == \
        sample_members(raw)[1]
