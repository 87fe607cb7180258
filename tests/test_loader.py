"""The dali backend's two CPU paths and the shared loader interface: shapes, labels, coverage, determinism, exact
resume, validation and errors. Every behaviour test runs on both paths (the `decode` fixture): "cpu", the default on a
machine without a GPU (crop-decode on CPU threads + torch resize), and "dali-cpu", the GPU pipeline's operators on
DALI's CPU backend (its reference twin). Tiny images (tens of pixels) keep every build and run in the milliseconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.loaders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    Loader,
    LoaderConfig,
    RankLayout,
    derive_seed,
)
from pipeline.loaders.build import build_loader
from pipeline.loaders.throughput import ThroughputStats
from pipeline.shards.shard_format import ShardFormatError, parse_index
from tests.conftest import write_tiny_shards

N = 23  # odd, and not a multiple of the shard size, the batch size or the rank count
SIZE = 16


def write_ids_data(tmp_path_factory):
    """N samples in 5 shards, label == sample index (so labels identify samples)."""
    folder = tmp_path_factory.mktemp("ids") / "shards"
    write_tiny_shards(folder, num_samples=N, num_classes=N, per_shard=5, size=(24, 28))
    return folder


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    return write_ids_data(tmp_path_factory)


# "cpu": the crop-decode path (the default without a GPU); "dali-cpu": the GPU pipeline's operators on DALI's CPU backend.
DECODE_PATHS = ("cpu", "dali-cpu")


@pytest.fixture(params=DECODE_PATHS)
def decode(request) -> str:
    return request.param


def cfg(data, **kw) -> LoaderConfig:
    base = dict(data=str(data), batch_size=4, img_size=SIZE, device="cpu", num_threads=2, shuffle_buffer=8)
    base.update(kw)
    return LoaderConfig(**base)


def run_epochs(loader, epochs: int) -> list[tuple[np.ndarray, list[int], list[bool] | None]]:
    """Every batch of `epochs` epochs as (images copy, labels, valid) in order."""
    out = []
    for _ in range(epochs):
        for b in loader:
            out.append((b.images.numpy().copy(), b.labels.tolist(), None if b.valid is None else b.valid.tolist()))
    return out


def valid_labels(batches) -> list[int]:
    return [lbl for _, labels, valid in batches
            for lbl, ok in zip(labels, valid or [True] * len(labels), strict=True) if ok]


def consume(loader, k: int) -> None:
    """Take k batches, epoch after epoch, leaving each epoch's iterator as a training loop that stops would."""
    while k:
        it = iter(loader)
        for _ in range(min(k, loader.batches_per_epoch - loader.batch)):
            next(it)
            k -= 1


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x[0], y[0]) and x[1] == y[1] and x[2] == y[2] for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# config, layout, counters


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("backend", "jax"), ("device", "tpu"), ("output_dtype", "bfloat16"), ("random_area", (0.5, 0.2)),
    ("random_aspect_ratio", (2.0, 1.0)), ("crop_ratio", 1.5), ("shuffle_buffer", 0), ("hw_decoder_load", 2.0),
    ("prefetch", 0), ("num_threads", 0), ("seed", -1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"LoaderConfig.{field}="):
        LoaderConfig(**{"data": "x", "batch_size": 4, field: value})


def test_config_defaults_and_eval_drop_last():
    assert LoaderConfig(data="x", batch_size=4).drop_last is True
    assert LoaderConfig(data="x", batch_size=4, train=False).drop_last is False
    assert LoaderConfig(data="x", batch_size=4).eval_resize == 256
    with pytest.raises(ValueError, match="drop_last"):
        LoaderConfig(data="x", batch_size=4, train=False, drop_last=True)


@pytest.mark.parametrize("n,w,b", [(23, 1, 4), (23, 2, 4), (25, 2, 4), (10, 3, 3), (7, 7, 1)])
def test_rank_layout_tiles_the_epoch(n, w, b):
    layouts = [RankLayout(n, w, r, b, drop_last=False) for r in range(w)]
    ranges = [lay.shard_range(lay.rank) for lay in layouts]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == c[0] for a, c in zip(ranges, ranges[1:], strict=False))
    assert len({lay.batches_per_epoch for lay in layouts}) == 1
    for lay in layouts:
        assert sum(lay.num_valid(i) for i in range(lay.batches_per_epoch)) == lay.shard_size
    dropped = [RankLayout(n, w, r, b, drop_last=True) for r in range(w)]
    assert {lay.batches_per_epoch for lay in dropped} == {(n // w) // b}
    assert all(lay.num_valid(i) == b for lay in dropped for i in range(lay.batches_per_epoch))


def test_rank_layout_errors():
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        RankLayout(3, 4, 0, 1, False)
    with pytest.raises(ValueError, match="batch_size 8 is larger than the 5 samples"):
        RankLayout(10, 2, 0, 8, True)
    with pytest.raises(ValueError, match="rank must be"):
        RankLayout(10, 2, 2, 1, False)


def test_derive_seed_is_stable_and_mixes():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert len({derive_seed(s, "a", r) for s in range(3) for r in range(3)}) == 9
    assert 0 <= derive_seed(2**62, "x") < 2**31


def test_throughput_stats_with_a_fake_clock():
    now = [0.0]
    stats = ThroughputStats(clock=lambda: now[0])

    def source():
        for _ in range(3):
            now[0] += 0.5  # the consumer waits 0.5 s for each batch
            yield 10
    for _ in stats.timed(source(), count=lambda x: x):
        now[0] += 1.5  # and computes 1.5 s on it
    snap = stats.snapshot()
    assert (snap.images, snap.batches, snap.seconds, snap.wait_seconds) == (30, 3, 6.0, 1.5)
    assert stats.images_per_sec == 5.0 and stats.wait_fraction == 0.25
    stats.reset()
    assert stats.images == 0 and stats.images_per_sec == 0.0


# ----------------------------------------------------------------------------------------------------------------
# output


def test_train_batch_shapes_dtypes_and_layout(ids_data, decode):
    loader = build_loader(cfg(ids_data, decode=decode))
    assert isinstance(loader, Loader)
    assert (loader.num_samples, loader.num_classes, loader.batches_per_epoch, len(loader)) == (N, N, 5, 5)
    batches = list(loader)
    assert len(batches) == 5 and loader.epoch == 1
    for b in batches:
        assert isinstance(b, Batch)
        assert b.images.shape == (4, SIZE, SIZE, 3) and b.images.dtype == torch.uint8 and b.images.is_contiguous()
        assert b.labels.shape == (4,) and b.labels.dtype == torch.int64
        assert b.valid is None and b.num_valid == 4 and b.images.device.type == "cpu"
    assert loader.stats.images == 20 and loader.stats.batches == 5


def test_labels_match_the_images(ids_data, decode):
    """Each image's mean colour is its label's class colour (tests/conftest.make_image), through shuffle and crops."""
    base = np.array([[(lbl * 67) % 256, (lbl * 131 + 40) % 256, (lbl * 29 + 90) % 256] for lbl in range(N)], float)
    loader = build_loader(cfg(ids_data, decode=decode, drop_last=False))
    checked = 0
    for images, labels, _ in run_epochs(loader, 2):
        for img, lbl in zip(images, labels, strict=True):
            nearest = np.argmin(((base - img.reshape(-1, 3).mean(0)) ** 2).sum(1))
            assert nearest == lbl
            checked += 1
    assert checked == 2 * 6 * 4


def test_float16_output_is_the_normalised_uint8_output(ids_data, decode):
    u8 = run_epochs(build_loader(cfg(ids_data, decode=decode)), 1)
    f16 = run_epochs(build_loader(cfg(ids_data, decode=decode, output_dtype="float16")), 1)
    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    for a, b in zip(u8, f16, strict=True):
        assert b[0].dtype == np.float16 and a[1] == b[1]
        np.testing.assert_allclose(b[0].astype(np.float32), (a[0] - mean) / std, atol=2e-2)


def test_eval_reads_every_sample_in_order_with_padding_flagged(ids_data, decode):
    loader = build_loader(cfg(ids_data, decode=decode, train=False, batch_size=5))
    batches = run_epochs(loader, 2)
    assert len(batches) == 2 * 5
    first = batches[:5]
    assert [lbl for b in first for lbl in b[1]] == list(range(N)) + [N - 1] * 2
    assert first[-1][2] == [True, True, True, False, False]
    assert same_batches(first, batches[5:])  # eval is deterministic pass after pass


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_covers_every_sample_exactly_once_across_ranks(ids_data, decode, world):
    per_rank = [run_epochs(build_loader(cfg(ids_data, decode=decode, train=False), rank, world), 1)
                for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of batches
    seen = [lbl for batches in per_rank for lbl in valid_labels(batches)]
    assert sorted(seen) == list(range(N))


def test_train_epoch_covers_every_sample_across_two_ranks_without_drop_last(ids_data, decode):
    loaders = [build_loader(cfg(ids_data, decode=decode, drop_last=False), rank, 2) for rank in range(2)]
    for _ in range(3):  # every epoch, although the order changes
        seen = [lbl for ld in loaders for lbl in valid_labels(run_epochs(ld, 1))]
        assert sorted(seen) == list(range(N))


def test_train_epoch_with_drop_last_reads_full_batches_of_distinct_samples(ids_data, decode):
    loaders = [build_loader(cfg(ids_data, decode=decode), rank, 2) for rank in range(2)]
    assert [ld.batches_per_epoch for ld in loaders] == [2, 2]  # 11 // 4 on both ranks
    for _ in range(2):
        seen = [lbl for ld in loaders for lbl in valid_labels(run_epochs(ld, 1))]
        assert len(seen) == len(set(seen)) == 16  # no sample twice; 7 of 23 left for later epochs


def test_same_seed_same_batches_other_seed_or_epoch_differs(ids_data, decode):
    a = run_epochs(build_loader(cfg(ids_data, decode=decode)), 2)
    b = run_epochs(build_loader(cfg(ids_data, decode=decode, num_threads=1, prefetch=1)), 2)  # speed: no change
    c = run_epochs(build_loader(cfg(ids_data, decode=decode, seed=1)), 2)
    assert same_batches(a, b)
    assert [x[1] for x in a] != [x[1] for x in c]
    assert [x[1] for x in a[:5]] != [x[1] for x in a[5:]]  # epoch 1 has another order
    assert sorted(valid_labels(a[:5])) != sorted(valid_labels(a[5:]))  # and drops other samples


def test_returned_batches_stay_valid_while_later_batches_are_made(ids_data, decode):
    """Images come zero-copy from DALI (dali-cpu): a batch kept by the consumer must not be overwritten later."""
    kept = list(build_loader(cfg(ids_data, decode=decode, prefetch=1)))
    copied = run_epochs(build_loader(cfg(ids_data, decode=decode, prefetch=1)), 1)
    assert all(np.array_equal(k.images.numpy(), c[0]) for k, c in zip(kept, copied, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_resume_mid_epoch_and_across_epochs_gives_identical_batches(ids_data, decode, rank, world):
    config = cfg(ids_data, decode=decode, batch_size=3, prefetch=3)
    reference = run_epochs(build_loader(config, rank, world), 3)
    per_epoch = build_loader(config, rank, world).batches_per_epoch
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch - 1):
        first = build_loader(config, rank, world)
        consume(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint file holds
        assert (state["epoch"], state["batch"]) == divmod(k, per_epoch)
        resumed = build_loader(cfg(ids_data, decode=decode, batch_size=3, prefetch=1, num_threads=1), rank, world)
        resumed.load_state_dict(state)
        assert resumed.epoch == k // per_epoch
        rest = run_epochs(resumed, 3 - k // per_epoch)
        assert same_batches(rest, reference[k:]), f"resume after {k} batches"


def test_iterating_again_continues_the_unfinished_epoch(ids_data, decode):
    reference = run_epochs(build_loader(cfg(ids_data, decode=decode)), 1)
    loader = build_loader(cfg(ids_data, decode=decode))
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    del it
    assert (loader.epoch, loader.batch) == (0, 2)
    tail = run_epochs(loader, 1)
    assert [b.labels.tolist() for b in head] + [t[1] for t in tail] == [r[1] for r in reference]


def test_close_releases_the_pipeline_and_keeps_the_position(ids_data, decode):
    reference = run_epochs(build_loader(cfg(ids_data, decode=decode)), 2)
    loader = build_loader(cfg(ids_data, decode=decode))
    consume(loader, 3)
    loader.close()
    assert loader._pipe is None
    assert same_batches(run_epochs(loader, 2)[:7], reference[3:])


def test_state_of_a_fresh_loader_restores_to_the_start(ids_data, decode):
    reference = run_epochs(build_loader(cfg(ids_data, decode=decode)), 1)
    loader = build_loader(cfg(ids_data, decode=decode))
    loader.load_state_dict(build_loader(cfg(ids_data, decode=decode)).state_dict())
    assert same_batches(run_epochs(loader, 1), reference)


def test_state_from_other_settings_is_refused(ids_data, decode):
    state = build_loader(cfg(ids_data, decode=decode)).state_dict()
    with pytest.raises(ValueError, match="seed: saved 0, now 3"):
        build_loader(cfg(ids_data, decode=decode, seed=3)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        build_loader(cfg(ids_data, decode=decode), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="backend 'dali'"):
        build_loader(cfg(ids_data, backend="torch", num_threads=0)).load_state_dict(state)


def test_a_position_moves_between_dali_devices_but_not_to_crop_decode(ids_data):
    """"gpu" and "dali-cpu" are one pipeline on two devices (their states are interchangeable); crop-decode draws
    other crops, so its position is refused there and the other way round, naming the setting."""
    dali = build_loader(cfg(ids_data, decode="dali-cpu"))
    crop = build_loader(cfg(ids_data, decode="cpu"))
    assert "decode" not in dali.state_dict()["fingerprint"]
    with pytest.raises(ValueError, match="decode: saved None, now 'cpu'"):
        crop.load_state_dict(dali.state_dict())
    with pytest.raises(ValueError, match="decode: saved 'cpu', now None"):
        dali.load_state_dict(crop.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# validation at start and errors while reading


@pytest.fixture
def small_data(tmp_path):
    folder = tmp_path / "shards"
    manifest = write_tiny_shards(folder, num_samples=10, num_classes=10, per_shard=5, size=(24, 24))
    return folder, manifest


def test_missing_manifest_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        build_loader(cfg(tmp_path / "empty"))


def test_unsupported_manifest_version_is_reported(small_data):
    folder, _ = small_data
    d = json.loads((folder / "manifest.json").read_text())
    d["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ShardFormatError, match="format_version 99 is not supported"):
        build_loader(cfg(folder))


@pytest.mark.parametrize("which", ["index", "tar"])
def test_missing_index_or_shard_names_it(small_data, which):
    folder, manifest = small_data
    name = getattr(manifest.shards[1], "index" if which == "index" else "file")
    (folder / name).unlink()
    with pytest.raises(ShardFormatError, match=f"{name}: listed in the manifest but missing.*shard --verify"):
        build_loader(cfg(folder))


def test_truncated_shard_names_it(small_data):
    folder, manifest = small_data
    path = folder / manifest.shards[0].file
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(ShardFormatError, match=f"{manifest.shards[0].file}: truncated.*shard --verify"):
        build_loader(cfg(folder))


def corrupt_first_jpeg(folder, record) -> str:
    """Overwrite the start of the first image of a shard in place (same size, so the start-up check passes)."""
    comp = next(c for c in parse_index(folder / record.index)[0] if c.ext == "jpg")
    with open(folder / record.file, "r+b") as f:
        f.seek(comp.offset)
        f.write(b"\0" * 64)
    return comp.name.split(".")[0]


def undefine_huffman_tables(folder, record) -> str:
    """Point the first image's scan at Huffman tables it does not define (same size, header still well formed), so
    that decoding fails; returns its key."""
    comp = next(c for c in parse_index(folder / record.index)[0] if c.ext == "jpg")
    with open(folder / record.file, "r+b") as f:
        f.seek(comp.offset)
        jpeg = bytearray(f.read(comp.size))
        sos = jpeg.index(b"\xff\xda")
        for c in range(jpeg[sos + 4]):
            jpeg[sos + 6 + 2 * c] = 0x33
        f.seek(comp.offset)
        f.write(jpeg)
    return comp.name.split(".")[0]


def test_corrupt_shard_found_while_reading_names_the_shard(small_data):
    """dali-cpu: DALI does not say which sample failed; a checksum search names the shard."""
    folder, manifest = small_data
    corrupt_first_jpeg(folder, manifest.shards[1])
    loader = build_loader(cfg(folder, train=False, decode="dali-cpu"))
    with pytest.raises(ShardFormatError, match=f"{manifest.shards[1].file}: corrupt.*shard --verify"):
        list(loader)
    with pytest.raises(RuntimeError, match="failed earlier"):
        list(loader)


@pytest.mark.parametrize("damage", ["header", "scan"])
def test_crop_decode_names_the_sample_it_cannot_decode(small_data, damage):
    """cpu: a damaged header is caught when the batch is planned, a failed decode by re-decoding the batches in
    flight with PIL; both name the shard and the sample, and the loader refuses further use until restored."""
    folder, manifest = small_data
    record = manifest.shards[1]
    key = corrupt_first_jpeg(folder, record) if damage == "header" else undefine_huffman_tables(folder, record)
    loader = build_loader(cfg(folder, train=False, decode="cpu"))
    why = "is not a JPEG" if damage == "header" else "is not a decodable image"
    with pytest.raises(ShardFormatError, match=f"{record.file}: sample '{key}' {why}.*shard --verify"):
        list(loader)
    if damage == "scan":
        with pytest.raises(RuntimeError, match="failed earlier"):
            list(loader)
    else:  # found before decoding: the same error again, not a loader out of step
        with pytest.raises(ShardFormatError, match=f"sample '{key}' {why}"):
            list(loader)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_flipped_bit_in_image_data_stops_the_loader_naming_the_sample(tmp_path, backend):
    """A damaged byte inside the entropy-coded data decodes to wrong pixels with at most a libjpeg warning; the
    CRC-32 each sample's json records is checked as the sample is read (crop-decode and torch backends)."""
    folder = tmp_path / "shards"
    manifest = write_tiny_shards(folder, num_samples=10, num_classes=10, per_shard=5, size=(24, 24), checksums=True)
    good = [labels for _, labels, _ in run_epochs(build_loader(cfg(folder, train=False, decode="cpu")), 1)]
    record = manifest.shards[1]
    comp = parse_index(folder / record.index)[2][0]
    assert comp.ext == "jpg"
    with open(folder / record.file, "r+b") as f:
        f.seek(comp.offset + comp.size - 40)
        byte = f.read(1)[0]
        f.seek(comp.offset + comp.size - 40)
        f.write(bytes([byte ^ 0x04]))
    kind = {"backend": "torch", "num_threads": 0} if backend == "torch" else {"decode": "cpu"}
    loader = build_loader(cfg(folder, train=False, **kind))
    key = comp.name.split(".")[0]
    with pytest.raises(ShardFormatError, match=rf"{record.file}: sample '{key}' cannot be read \(its jpg bytes differ "
                                               r"from the crc32 recorded in its json: the image is corrupted\).*"
                                               r"shard --verify"):
        list(loader)
    assert len(good) == 3  # the same folder read cleanly before the damage


# ----------------------------------------------------------------------------------------------------------------
# the GPU path (mixed decoding, GPU operators): the same pipeline definition with other device strings


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI mixed decoding); the CPU tests cover "
                    "the same pipeline definition")
def test_gpu_batches_match_the_cpu_path_and_resume(ids_data):
    cpu_eval = run_epochs(build_loader(cfg(ids_data, train=False, decode="dali-cpu")), 1)
    gpu_loader = build_loader(cfg(ids_data, train=False, device="cuda"))
    gpu_eval = []
    for b in gpu_loader:
        assert b.images.device.type == b.labels.device.type == "cuda" and b.images.dtype == torch.uint8
        assert b.valid is None or b.valid.device.type == "cuda"
        gpu_eval.append((b.images.cpu().numpy(), b.labels.tolist(), None if b.valid is None else b.valid.tolist()))
    assert [b[1:] for b in gpu_eval] == [b[1:] for b in cpu_eval]
    diff = np.abs(np.concatenate([b[0] for b in gpu_eval]).astype(int) - np.concatenate([b[0] for b in cpu_eval]))
    assert diff.mean() < 2.0  # nvJPEG and libjpeg-turbo round differently

    config = cfg(ids_data, device="cuda")
    reference = [(b.images.cpu(), b.labels.cpu()) for _ in range(2) for b in build_loader(config)]
    first = build_loader(config)
    consume(first, 7)
    resumed = build_loader(config)
    resumed.load_state_dict(first.state_dict())
    rest = [(b.images.cpu(), b.labels.cpu()) for _ in range(2) for b in resumed][: len(reference) - 7]
    assert all(torch.equal(a[1], b[1]) and (a[0].int() - b[0].int()).abs().max() <= 1
               for a, b in zip(rest, reference[7:], strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (--decode cpu resizes on the GPU); the CPU tests "
                    "run the same resize on the CPU (tests/test_loader_transforms.py)")
@pytest.mark.parametrize("train", [True, False])
def test_crop_decode_on_the_gpu_matches_the_cpu_and_resumes(ids_data, train):
    """--decode cpu on a GPU machine: windows decoded on CPU threads, resized, cropped and flipped on the GPU; the
    same batches as on the CPU within rounding, and the same exact resume."""
    config = cfg(ids_data, train=train, decode="cpu", drop_last=False)
    cpu = run_epochs(build_loader(config), 2)
    gpu_loader = build_loader(cfg(ids_data, train=train, decode="cpu", drop_last=False, device="cuda"))
    assert gpu_loader.decode == "cpu"
    gpu = []
    for _ in range(2):
        for b in gpu_loader:
            assert b.images.device.type == b.labels.device.type == "cuda" and b.images.dtype == torch.uint8
            gpu.append((b.images.cpu().numpy(), b.labels.tolist(), None if b.valid is None else b.valid.tolist()))
    assert [b[1:] for b in gpu] == [b[1:] for b in cpu]
    diff = np.abs(np.concatenate([b[0] for b in gpu]).astype(int) - np.concatenate([b[0] for b in cpu]))
    assert diff.max() <= 2 and (diff > 1).mean() < 1e-3
    first = build_loader(cfg(ids_data, train=train, decode="cpu", drop_last=False, device="cuda"))
    consume(first, 4)
    resumed = build_loader(cfg(ids_data, train=train, decode="cpu", drop_last=False, device="cuda"))
    resumed.load_state_dict(first.state_dict())
    rest = [(b.images.cpu().numpy(), b.labels.tolist(), None if b.valid is None else b.valid.tolist())
            for _ in range(2) for b in resumed][: len(gpu) - 4]
    assert same_batches(rest, gpu[4:])
