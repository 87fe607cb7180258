"""The torch backend: webdataset tar reading + PIL + torchvision transforms in `DataLoader` workers.

For machines without DALI, and the baseline of `./launch.sh bench pipeline`. Same `Loader` interface and the same
semantics as the DALI loader (`pipeline.loaders.base`): DALI's rank ranges and padding (`RankLayout`), labels from the
`.lbl` member, train = shard order reshuffled per epoch from the seed (same on every rank) + a shuffle buffer of
`shuffle_buffer` samples + RandomResizedCrop(bicubic) + flip (+ timm's own RandAugment with augment="finetune",
the official rand-m9-mstd0.5-inc1: pipeline.loaders.randaugment), eval =
Resize(int(S / crop_ratio), bicubic) + CenterCrop(S) in shard order.

Exact resume without replaying: the epoch's whole plan (which sample goes to which batch position) is a pure
function of (seed, epoch, rank), computed up front from the DALI index files, and each sample's augmentation
draws come from its own seed (seed, epoch, rank, position). Batch b is therefore the same whichever worker makes
it and however many workers there are; restoring a position is starting the epoch's batch sampler at b. Workers
read a sample's members with one positioned read of its span (offsets from the index) and parse them with the
webdataset library's tar iterator (WebDataset key/extension rules); the buffer shuffle keeps reads within a window
of about `shuffle_buffer` consecutive samples, as with DALI, so the page cache and read-ahead still work.
"""

from __future__ import annotations

import io
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.loaders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    LoaderBase,
    LoaderConfig,
    RankLayout,
    ShardSet,
    derive_seed,
)
from pipeline.loaders.randaugment import RandAugmentPolicy, TimmRandAugment
from pipeline.shards.shard_format import (
    IMAGE_EXT,
    LABEL_EXT,
    TAR_BLOCK,
    VERIFY_HINT,
    ShardFormatError,
    decode_label,
    parse_index,
    split_member_name,
)


@dataclass(frozen=True)
class SampleIndex:
    """Where every sample of a shard folder lives, from the DALI index files; global id = position in manifest order.

    Per sample: `tar` (shard number), `span` [start, end) covering the tar headers and data of its image and label
    members (read in one pread), `key`.
    """

    tars: tuple[str, ...]
    tar: np.ndarray  # (N,) int32
    span_start: np.ndarray  # (N,) int64
    span_end: np.ndarray  # (N,) int64
    keys: tuple[str, ...]
    shard_starts: np.ndarray  # (num_shards + 1,) first global id of each shard, then N

    @classmethod
    def build(cls, shards: ShardSet) -> SampleIndex:
        tar, start, end, keys = [], [], [], []
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
                first = min(by_ext[IMAGE_EXT].offset, by_ext[LABEL_EXT].offset)
                last = max(c.offset + c.size for c in (by_ext[IMAGE_EXT], by_ext[LABEL_EXT]))
                tar.append(t)
                # The format writes plain ustar headers (no long-name records): each sits one block before its data.
                start.append(first - TAR_BLOCK)
                end.append(last + (-last % TAR_BLOCK))
                keys.append(split_member_name(by_ext[IMAGE_EXT].name)[0])
        return cls(
            tars=tuple(str(p) for p in shards.tars),
            tar=np.asarray(tar, np.int32),
            span_start=np.asarray(start, np.int64),
            span_end=np.asarray(end, np.int64),
            keys=tuple(keys),
            shard_starts=np.concatenate([[0], np.cumsum(shards.sizes)]).astype(np.int64),
        )


class SampleReader:
    """Reads (jpeg bytes, label) of a sample by global id; one per process (file handles are not shared).

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

    def read(self, sid: int) -> tuple[bytes, int]:
        import webdataset.tariterators as wds_tar

        ix = self.index
        t = int(ix.tar[sid])
        path, key = ix.tars[t], ix.keys[sid]
        try:
            length = int(ix.span_end[sid] - ix.span_start[sid])
            span = os.pread(self._file(t).fileno(), length, int(ix.span_start[sid]))
            if len(span) != length:
                raise ValueError(f"short read ({len(span)} of {length} bytes)")
            members = ({**m, "__url__": path} for m in wds_tar.tar_file_iterator(io.BytesIO(span)))
            sample = next(iter(wds_tar.group_by_keys(members)))
            if sample["__key__"] != key:
                raise ValueError(f"found member key {sample['__key__']!r} where the index says {key!r}")
            return sample[IMAGE_EXT], decode_label(sample[LABEL_EXT])
        except Exception as e:
            raise ShardFormatError(f"{path}: sample {key!r} cannot be read ({e}); "
                                   + VERIFY_HINT.format(root=self.root)) from e

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


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


class SampleTransform:
    """PIL image -> (S, S, 3) uint8: train RandomResizedCrop(bicubic) + flip (+ RandAugment) from a per-sample seed;
    eval Resize(int(S / crop_ratio), bicubic) + CenterCrop(S). Seeded draws keep the caller's torch RNG untouched."""

    def __init__(self, cfg: LoaderConfig):
        self.train = cfg.train
        self.size = cfg.img_size
        self.resize = cfg.eval_resize
        self.area = cfg.random_area
        self.ratio = cfg.random_aspect_ratio
        self.randaugment = None
        if cfg.randaugment:
            self.randaugment = TimmRandAugment(RandAugmentPolicy.from_loader_config(cfg), cfg.img_size)

    def __call__(self, img, seed: int) -> np.ndarray:
        import torchvision.transforms as T
        import torchvision.transforms.functional as F

        bicubic = T.InterpolationMode.BICUBIC
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                i, j, h, w = T.RandomResizedCrop.get_params(img, list(self.area), list(self.ratio))
                flip = bool(torch.rand(()) < 0.5)
                img = F.resized_crop(img, i, j, h, w, [self.size, self.size], bicubic, antialias=True)
                if flip:
                    img = F.hflip(img)
                if self.randaugment is not None:
                    img = self.randaugment(img, seed)  # timm draws from Python's and numpy's RNGs
        else:
            img = F.center_crop(F.resize(img, self.resize, bicubic, antialias=True), [self.size, self.size])
        return np.asarray(img)


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

    def augment_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, "torch-augment", self.layout.rank, epoch)


class PlannedBatches(Dataset):
    """Item (epoch, b): batch b of that epoch's plan as images (B, S, S, 3) uint8 or normalised float16 and labels
    (B,) int64. Workers compute (and keep) the epoch's plan themselves, so they can persist across epochs."""

    def __init__(self, index: SampleIndex, root: str, planner: EpochPlanner, cfg: LoaderConfig):
        self.index = index
        self.root = root
        self.planner = planner
        self.batch_size = cfg.batch_size
        self.float16 = cfg.output_dtype == "float16"
        self.transform = SampleTransform(cfg)
        self._reader: SampleReader | None = None
        self._epoch: int | None = None
        self._plan = np.empty(0, np.int64)
        self._augment_seed = 0

    def __len__(self) -> int:
        return self.planner.layout.batches_per_epoch

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        epoch, b = item
        if epoch != self._epoch:
            self._plan, self._augment_seed, self._epoch = self.planner.plan(epoch), self.planner.augment_seed(epoch), epoch
        if self._reader is None:
            self._reader = SampleReader(self.index, self.root)
        n, size = self.batch_size, self.transform.size
        images = np.empty((n, size, size, 3), np.uint8)
        labels = np.empty(n, np.int64)
        prev = None
        for k in range(n):
            position = b * n + k
            sid = int(self._plan[position])
            if sid == prev and not self.transform.train:
                # Padding repeats the last sample; eval output is deterministic, so reuse it.
                images[k], labels[k] = images[k - 1], labels[k - 1]
                continue
            jpeg, labels[k] = self._reader.read(sid)
            try:
                with Image.open(io.BytesIO(jpeg)) as im:
                    img = im.convert("RGB")
            except Exception as e:
                raise ShardFormatError(f"{self.index.tars[self.index.tar[sid]]}: sample {self.index.keys[sid]!r} "
                                       f"is not a decodable image ({e}); " + VERIFY_HINT.format(root=self.root)) from e
            images[k] = self.transform(img, (self._augment_seed * 1_000_003 + position) % 2**63)
            prev = sid
        out = torch.from_numpy(images)
        if self.float16:
            mean = torch.tensor(IMAGENET_MEAN) * 255
            std = torch.tensor(IMAGENET_STD) * 255
            out = ((out.float() - mean) / std).half()
        return out, torch.from_numpy(labels)


class _PositionSampler:
    """Yields (epoch, b) from the loader's current position to the end of its epoch, read at each `iter()`.

    Holds the loader weakly: a reference cycle would leave the persistent workers to the cyclic garbage collector,
    whose DataLoader shutdown then waits out a 5 s join timeout per worker.
    """

    def __init__(self, loader: TorchLoader):
        self._loader = weakref.ref(loader)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        loader = self._loader()
        return iter([(loader.epoch, b) for b in range(loader.batch, loader.batches_per_epoch)])

    def __len__(self) -> int:
        loader = self._loader()
        return loader.batches_per_epoch - loader.batch


class TorchLoader(LoaderBase):
    """`Loader` on torch `DataLoader` workers (`num_threads` of them, kept across epochs; 0 = in this process)."""

    backend = "torch"

    def __init__(self, cfg: LoaderConfig, shards: ShardSet, layout: RankLayout, device: torch.device):
        super().__init__(cfg, shards, layout, device)
        self.index = SampleIndex.build(shards)
        self.planner = EpochPlanner(self.index.shard_starts, layout, cfg.train, cfg.seed, cfg.shuffle_buffer)
        self._dataloader = self._make_dataloader()

    def _make_dataloader(self) -> DataLoader:
        workers = self.cfg.num_threads
        return DataLoader(
            PlannedBatches(self.index, str(self.shards.folder), self.planner, self.cfg),
            batch_size=None,
            sampler=_PositionSampler(self),
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch if workers else None,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
            # Its own generator: DataLoader draws a worker base seed per epoch, which must not consume the training
            # loop's global RNG (masking noise would then depend on data loading). Augmentation is seeded per sample.
            generator=torch.Generator(),
        )

    def plan(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch * batch_size,) global sample ids this rank reads in `epoch`, in batch order."""
        return self.planner.plan(epoch)

    def close(self) -> None:
        """Stop the worker processes now (the position is kept; the next `__iter__` starts new ones)."""
        self._dataloader = self._make_dataloader()  # dropping the old one shuts its workers down

    def _iter_epoch(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        for images, labels in self._dataloader:
            index = self._batch
            self._advance()
            valid, num_valid = self._valid_mask(index, self.cfg.batch_size)
            yield Batch(images.to(self.device, non_blocking=non_blocking),
                        labels.to(self.device, non_blocking=non_blocking), valid, num_valid)
