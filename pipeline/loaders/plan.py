"""Which sample goes where, without DALI's reader: the sample index, positioned reads, the epoch's batch plan.

Used by the loaders that read the shards themselves (the crop-decode path, `pipeline.loaders.crop_decode`, and the
torch backend, `pipeline.loaders.torch_loader`). The plan follows the semantics of `pipeline.loaders.base`: DALI's
rank ranges and padding (`RankLayout`), the shard order reshuffled every epoch from the seed (the same on every
rank), then a shuffle buffer of `shuffle_buffer` samples per rank.

The plan of an epoch is a pure function of (seed, epoch, rank): batch b is the same whoever makes it, and a saved
position is restored by starting the epoch's plan at b, with nothing to replay.
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pipeline.loaders.base import LoaderConfig, RankLayout, ShardSet, derive_seed
from pipeline.shards.shard_format import (
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    TAR_BLOCK,
    VERIFY_HINT,
    ShardFormatError,
    decode_label,
    image_checksum,
    parse_index,
    split_member_name,
)


@dataclass(frozen=True)
class SampleIndex:
    """Where every sample of a shard folder lives, from the DALI index files; global id = position in manifest order.

    Per sample: `tar` (shard number), `span` [start, end) covering the tar headers and data of its image, label and
    json members (read in one pread), the offsets of their data inside the tar (json: -1 when a sample has none),
    their sizes, and `key`.
    """

    tars: tuple[str, ...]
    tar: np.ndarray  # (N,) int32
    span_start: np.ndarray  # (N,) int64
    span_end: np.ndarray  # (N,) int64
    image_offset: np.ndarray  # (N,) int64, of the data (its ustar header is the block before)
    image_size: np.ndarray  # (N,) int64
    label_offset: np.ndarray  # (N,) int64
    label_size: np.ndarray  # (N,) int64
    meta_offset: np.ndarray  # (N,) int64, -1: no json member
    meta_size: np.ndarray  # (N,) int64
    keys: tuple[str, ...]
    shard_starts: np.ndarray  # (num_shards + 1,) first global id of each shard, then N

    @classmethod
    def build(cls, shards: ShardSet) -> SampleIndex:
        cols: dict[str, list[int]] = {k: [] for k in ("tar", "start", "end", "io", "is", "lo", "ls", "mo", "ms")}
        keys = []
        for t, (index_path, size) in enumerate(zip(shards.indexes, shards.sizes, strict=True)):
            samples = parse_index(index_path)
            if len(samples) != size:
                raise ShardFormatError(f"{index_path}: lists {len(samples)} samples, the manifest says {size}; "
                                       + VERIFY_HINT.format(root=shards.folder))
            for comps in samples:
                by_ext = {c.ext: c for c in comps}
                if IMAGE_EXT not in by_ext or LABEL_EXT not in by_ext:
                    raise ShardFormatError(f"{index_path}: sample {comps[0].name} lacks .{IMAGE_EXT} or "
                                           f".{LABEL_EXT}; " + VERIFY_HINT.format(root=shards.folder))
                image, label, meta = by_ext[IMAGE_EXT], by_ext[LABEL_EXT], by_ext.get(META_EXT)
                members = (image, label) if meta is None else (image, label, meta)
                last = max(c.offset + c.size for c in members)
                cols["tar"].append(t)
                # The format writes plain ustar headers (no long-name records): each sits one block before its data.
                cols["start"].append(min(c.offset for c in members) - TAR_BLOCK)
                cols["end"].append(last + (-last % TAR_BLOCK))
                cols["io"].append(image.offset)
                cols["is"].append(image.size)
                cols["lo"].append(label.offset)
                cols["ls"].append(label.size)
                cols["mo"].append(-1 if meta is None else meta.offset)
                cols["ms"].append(0 if meta is None else meta.size)
                keys.append(split_member_name(image.name)[0])
        return cls(
            tars=tuple(str(p) for p in shards.tars),
            tar=np.asarray(cols["tar"], np.int32),
            span_start=np.asarray(cols["start"], np.int64),
            span_end=np.asarray(cols["end"], np.int64),
            image_offset=np.asarray(cols["io"], np.int64),
            image_size=np.asarray(cols["is"], np.int64),
            label_offset=np.asarray(cols["lo"], np.int64),
            label_size=np.asarray(cols["ls"], np.int64),
            meta_offset=np.asarray(cols["mo"], np.int64),
            meta_size=np.asarray(cols["ms"], np.int64),
            keys=tuple(keys),
            shard_starts=np.concatenate([[0], np.cumsum(shards.sizes)]).astype(np.int64),
        )

    def where(self, sid: int) -> str:
        """`shard: sample 'key'` of a global sample id, for error messages."""
        return f"{self.tars[self.tar[sid]]}: sample {self.keys[sid]!r}"


class SampleReader:
    """Reads (jpeg bytes, label) of a sample by global id; one per process (file handles are not shared).

    One positioned read of the sample's span; the image and label are sliced out at the offsets of the index, after
    checking that the ustar header before each names the member the index lists (a stale or foreign index is
    caught, not trusted). Parsing the members with a tar library instead costs about 25x the read. The image's
    CRC-32 is checked against the one its json records (as `shard --verify` does): a damaged byte in the image data
    stops the run naming the sample, instead of training on the wrong pixels the decoder makes of it (libjpeg only
    warns on most such damage). It costs about 1% of a sample's CPU time (a 1 KB longer read, ~20 us of CRC).

    Keeps at most `max_open` shard files open (least recently used closed first): a worker of an ImageNet-sized
    folder would otherwise hold a thousand descriptors, while the buffer shuffle reads from a couple at a time.
    """

    def __init__(self, index: SampleIndex, root: str, max_open: int = 16):
        self.index = index
        self.root = root
        self.max_open = max_open
        self._files: OrderedDict[int, io.FileIO] = OrderedDict()

    def _file(self, t: int) -> io.FileIO:
        f = self._files.get(t)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            f = self._files[t] = io.FileIO(self.index.tars[t], "r")
        else:
            self._files.move_to_end(t)
        return f

    def read(self, sid: int) -> tuple[memoryview, int]:
        """(the image's bytes, a view into the read span; its label). Errors name the shard and the sample."""
        ix = self.index
        t, key = int(ix.tar[sid]), ix.keys[sid]
        start = int(ix.span_start[sid])
        try:
            length = int(ix.span_end[sid]) - start
            span = memoryview(os.pread(self._file(t).fileno(), length, start))
            if len(span) != length:
                raise ValueError(f"short read ({len(span)} of {length} bytes)")
            image = _member(span, start, int(ix.image_offset[sid]), int(ix.image_size[sid]), f"{key}.{IMAGE_EXT}")
            label = _member(span, start, int(ix.label_offset[sid]), int(ix.label_size[sid]), f"{key}.{LABEL_EXT}")
            if ix.meta_offset[sid] >= 0:
                meta = _member(span, start, int(ix.meta_offset[sid]), int(ix.meta_size[sid]), f"{key}.{META_EXT}")
                recorded = json.loads(bytes(meta)).get("crc32")
                if recorded is not None and image_checksum(image) != recorded:
                    raise ValueError("its jpg bytes differ from the crc32 recorded in its json: the image is corrupted")
            return image, decode_label(label)
        except Exception as e:
            raise ShardFormatError(f"{ix.where(sid)} cannot be read ({e}); " + VERIFY_HINT.format(root=self.root)) from e

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


def _member(span: memoryview, start: int, offset: int, size: int, name: str) -> memoryview:
    """The data of member `name` at tar offset `offset`, from `span` (the bytes read from `start`)."""
    header = offset - TAR_BLOCK - start
    raw = name.encode()
    if bytes(span[header : header + len(raw) + 1]) != raw + b"\0":
        found = bytes(span[header : header + 100]).split(b"\0", 1)[0].decode(errors="replace")
        raise ValueError(f"the tar member at offset {offset} is {found!r}, the index says {name!r}")
    return span[offset - start : offset - start + size]


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) permutation of range(n) as a shuffle buffer of `buffer` items produces it (each output drawn uniformly
    from the buffer, refilled in order), so positions move by about `buffer` at most and reads stay local."""
    out = np.empty(n, np.int64)
    buf = list(range(min(buffer, n)))
    nxt = len(buf)
    draws = rng.random(n)
    for i in range(n):
        j = int(draws[i] * len(buf))
        out[i] = buf[j]
        if nxt < n:
            buf[j] = nxt
            nxt += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


@dataclass(frozen=True)
class EpochPlanner:
    """Which sample goes to which batch position of an epoch on this rank: a pure function of (seed, epoch, rank)."""

    shard_starts: np.ndarray  # (num_shards + 1,) from SampleIndex
    layout: RankLayout
    train: bool
    seed: int
    shuffle_buffer: int

    def plan(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch * batch_size,) global sample ids, in batch order.

        Shards are concatenated in the epoch's order (train: a permutation drawn from (seed, epoch), the same on
        every rank; eval: manifest order), the rank takes its `RankLayout` range, train shuffles it through a
        buffer (seed, rank, epoch), and DALI's padding (the last sample repeated) completes the reader's batches.
        """
        layout, starts = self.layout, self.shard_starts
        num_shards = len(starts) - 1
        if self.train:
            order = np.random.default_rng(derive_seed(self.seed, "torch-shard-order", epoch)).permutation(num_shards)
        else:
            order = np.arange(num_shards)
        sequence = np.concatenate([np.arange(starts[t], starts[t + 1]) for t in order])
        lo, hi = layout.shard_range(layout.rank)
        mine = sequence[lo:hi]
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, "torch-buffer", layout.rank, epoch))
            mine = mine[buffer_shuffle(len(mine), self.shuffle_buffer, rng)]
        padded = layout.reader_batches * layout.batch_size
        mine = np.concatenate([mine, np.full(padded - len(mine), mine[-1], np.int64)])
        return mine[: layout.batches_per_epoch * layout.batch_size]

    def augment_rng(self, epoch: int, batch: int) -> np.random.Generator:
        """The generator of batch `batch`'s crop windows and flips: its own stream per (seed, rank, epoch, batch)."""
        return np.random.default_rng(derive_seed(self.seed, "augment", self.layout.rank, epoch, batch))

    def augment_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, "torch-augment", self.layout.rank, epoch)


def plan_for(cfg: LoaderConfig, shards: ShardSet, layout: RankLayout) -> tuple[SampleIndex, EpochPlanner]:
    """The sample index of `shards` and this rank's epoch planner for `cfg`."""
    index = SampleIndex.build(shards)
    return index, EpochPlanner(index.shard_starts, layout, cfg.train, cfg.seed, cfg.shuffle_buffer)
