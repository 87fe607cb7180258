"""Sharding real ImageNet files (../shared/data/imagenet-sample-500.tar, read in place) with --keep-original."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from pipeline.shards.imageproc import ImageConfig
from pipeline.shards.sharding import ShardConfig, run_sharding
from pipeline.shards.verify import verify
from tests.conftest import requires_shared


def _qualifies(data: bytes, max_side: int) -> bool:
    """Independent of pipeline.shards.imageproc: what PIL says about the file."""
    im = Image.open(io.BytesIO(data))
    return (im.format == "JPEG" and im.mode == "RGB" and "progressive" not in im.info and "progression" not in im.info
            and max(im.size) <= max_side and im.getexif().get(0x0112, 1) in (0, 1))


def test_imagenet_sample_tar_keep_original(tmp_path):
    tar = requires_shared("imagenet-sample-500.tar")
    with tarfile.open(tar) as tf:
        files = {m.name.split("/", 1)[1]: tf.extractfile(m).read() for m in tf if m.isreg()}
    m = run_sharding(ShardConfig(src=tar, out=tmp_path / "out", shard_samples=100, workers=2,
                                 image=ImageConfig(keep_original=True))).manifest
    assert m.options["source_kind"] == "imagefolder-tar" and m.num_classes == 500 == len(files)
    qualifying = sum(_qualifies(d, 512) for d in files.values())
    t = m.totals
    assert (t["inputs"], t["written"], t["skipped"]) == (500, 500, 0)
    assert t["kept_original"] == qualifying and t["reencoded"] == 500 - qualifying == t["converted"]
    assert 0 < t["reencoded"] < 500
    report = verify(tmp_path / "out", decode=True, workers=2)
    assert report.ok, report.problems[:5]
    assert report.decoded == 500
