"""The torch backend: PIL decoding + the recipe's crop, resize and flip in `DataLoader` workers.

For machines without DALI, and a baseline of `./launch.sh bench pipeline`. Same `Loader` interface and the same
semantics as the DALI loader (`pipeline.loaders.base`): DALI's rank ranges and padding (`RankLayout`), labels from the
`.lbl` member, train = shard order reshuffled per epoch from the seed (same on every rank) + a shuffle buffer of
`shuffle_buffer` samples + RandomResizedCrop(bicubic) + flip (+ timm's own RandAugment with augment="finetune",
the official rand-m9-mstd0.5-inc1: pipeline.loaders.randaugment), eval =
Resize(int(S / crop_ratio), bicubic) + CenterCrop(S) in shard order.

It shares the plan (`pipeline.loaders.plan`), the geometry and the resize (`pipeline.loaders.transforms`) with the
crop-decode path (`decode="cpu"`, `pipeline.loaders.crop_decode`): the same seed gives the same batches, decoded by
PIL (the whole image) instead of DALI (the window only); libjpeg-turbo decodes both, to the same pixels. The
resize is torch's uint8 port of PIL's bicubic filter (about 5x faster than PIL's own).

Exact resume without replaying: the epoch's whole plan (which sample goes to which batch position) is a pure
function of (seed, epoch, rank), computed up front from the DALI index files, and each batch's augmentation draws
come from its own generator (seed, rank, epoch, batch). Batch b is therefore the same whichever worker makes it and
however many workers there are; restoring a position is starting the epoch's batch sampler at b.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.loaders.base import (
    Batch,
    LoaderBase,
    LoaderConfig,
    RankLayout,
    ShardSet,
)
from pipeline.loaders.plan import EpochPlanner, SampleIndex, SampleReader, plan_for
from pipeline.loaders.randaugment import RandAugmentPolicy, TimmRandAugment
from pipeline.loaders.transforms import assemble_cpu, eval_geometry, normalise, train_geometry
from pipeline.shards.shard_format import VERIFY_HINT, ShardFormatError


class PlannedBatches(Dataset):
    """Item (epoch, b): batch b of that epoch's plan as images (B, S, S, 3) uint8 or normalised float16 and labels
    (B,) int64. Workers compute (and keep) the epoch's plan themselves, so they can persist across epochs."""

    def __init__(self, index: SampleIndex, root: str, planner: EpochPlanner, cfg: LoaderConfig):
        self.index = index
        self.root = root
        self.planner = planner
        self.cfg = cfg
        self.randaugment = None
        if cfg.randaugment:
            self.randaugment = TimmRandAugment(RandAugmentPolicy.from_loader_config(cfg), cfg.img_size)
        self._reader: SampleReader | None = None
        self._epoch: int | None = None
        self._plan = np.empty(0, np.int64)
        self._augment_seed = 0

    def __len__(self) -> int:
        return self.planner.layout.batches_per_epoch

    def _decode(self, sid: int) -> np.ndarray:
        """(H, W, 3) uint8: the whole image, opened the project's one way (pipeline.shards.imagefile)."""
        from pipeline.shards.imagefile import STORED_FORMATS, load_image, open_image

        jpeg = bytes(self._reader.read(sid)[0])  # the reader's view into the shard; the checks need bytes
        try:
            im = open_image(jpeg, formats=STORED_FORMATS)
            load_image(im, jpeg)
            return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ShardFormatError(f"{self.index.where(sid)} is not a decodable image ({e}); "
                                   + VERIFY_HINT.format(root=self.root)) from e

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = item
        if epoch != self._epoch:
            self._plan, self._augment_seed, self._epoch = self.planner.plan(epoch), self.planner.augment_seed(epoch), epoch
        if self._reader is None:
            self._reader = SampleReader(self.index, self.root)
        cfg, n = self.cfg, self.cfg.batch_size
        ids = self._plan[b * n : (b + 1) * n]
        labels = np.asarray([self._reader.read(int(sid))[1] for sid in ids], np.int64)
        decoded: dict[int, np.ndarray] = {}
        for sid in ids:
            if int(sid) not in decoded:  # padding repeats the last sample: decode it once
                decoded[int(sid)] = self._decode(int(sid))
        images = [decoded[int(sid)] for sid in ids]
        heights = np.asarray([im.shape[0] for im in images])
        widths = np.asarray([im.shape[1] for im in images])
        if cfg.train:
            geometry = train_geometry(heights, widths, cfg.img_size, cfg.random_area, cfg.random_aspect_ratio,
                                      self.planner.augment_rng(epoch, b))
        else:
            geometry = eval_geometry(heights, widths, cfg.eval_resize, cfg.img_size)
        with warnings.catch_warnings():  # PIL's arrays are read-only; they are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            crops = [torch.from_numpy(im)[t : t + h, left : left + w]
                     for im, (t, left, h, w) in zip(images, geometry.window.tolist(), strict=True)]
        out = torch.empty(n, cfg.img_size, cfg.img_size, 3, dtype=torch.uint8)
        assemble_cpu(crops, geometry, cfg.img_size, out, range(n))
        if self.randaugment is not None:
            self._rand_augment(out, b)
        return (normalise(out) if cfg.output_dtype == "float16" else out), torch.from_numpy(labels)

    def _rand_augment(self, images: torch.Tensor, b: int) -> None:
        """timm's RandAugment (the official policy) on each (S, S, 3) image in place, from a per-sample seed (the
        caller's RNGs are left untouched)."""
        from PIL import Image

        n = self.cfg.batch_size
        for k in range(n):
            img = self.randaugment(Image.fromarray(images[k].numpy()), (self._augment_seed * 1_000_003 + b * n + k) % 2**63)
            images[k].copy_(torch.from_numpy(np.asarray(img).copy()))


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
        self.index, self.planner = plan_for(cfg, shards, layout)
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
            # loop's global RNG (masking noise would then depend on data loading). Augmentation is seeded per batch.
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
        batches = iter(self._dataloader)
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            except ShardFormatError as e:
                # DataLoader re-raises a worker's error with the worker's traceback in its message; the user gets
                # the message alone (it names the shard and the sample).
                text = str(e)
                raise ShardFormatError(text.rsplit("ShardFormatError: ", 1)[-1].strip()
                                       if text.startswith("Caught ") else text) from None
            index = self._batch
            self._advance()
            valid, num_valid = self._valid_mask(index, self.cfg.batch_size)
            yield Batch(images.to(self.device, non_blocking=non_blocking),
                        labels.to(self.device, non_blocking=non_blocking), valid, num_valid)
