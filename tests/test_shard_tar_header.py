"""The fast tar header of ShardWriter is byte-identical to tarfile's (the reference path)."""

import pytest

from pipeline.shards.shard_format import _tar_header, _tar_header_reference


@pytest.mark.parametrize("name", ["a.jpg", "n01440764_10026-00012345.json", "k" * 90 + ".json", "x" * 100])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123_456, 8**11 - 1])
def test_fast_header_matches_tarfile(name, size):
    assert _tar_header(name, size) == _tar_header_reference(name, size)
    assert len(_tar_header(name, size)) == 512
