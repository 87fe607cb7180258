"""The crop-decode loader (`decode="cpu"`): JPEG decoding of only the crop window on CPU threads, then PIL's bicubic
resize, crop and flip with torch on the output device.

    plan      `pipeline.loaders.plan`: the epoch's sample order (DALI's rank ranges and padding, shard order per
              epoch, shuffle buffer), positioned reads of each sample's members
    geometry  `pipeline.loaders.transforms`: train = torchvision's RandomResizedCrop windows + coin flips, drawn per
              batch from (seed, rank, epoch, batch), the image size read from its JPEG frame header; eval = the
              whole image, torchvision's Resize + CenterCrop sizes and offsets
    decode    DALI on its CPU backend, `num_threads` threads, fed by external sources: `decoders.image_slice`
              decodes only the window (libjpeg-turbo skips the IDCT outside it; the pixels equal PIL's decode of
              the same region); eval `decoders.image`
    resize    `transforms.resize_bicubic`: torch's uint8 antialiased bicubic kernel (PIL's filter and pass order),
              straight into the NHWC batch, `num_threads` threads; then the flip. On a CUDA device the decoded
              windows go over in one pinned transfer and are resized, cropped and flipped there in float32.

Every random choice is a function of (seed, rank, epoch, batch), so the batches do not depend on thread counts or
timing, the training loop's RNG is never touched, and the state is the position alone: restoring it starts the
epoch's plan at the saved batch (the torch backend's scheme; it shares the plan, geometry and resize, so it makes
the same batches with PIL decoding). DALI decodes `prefetch` batches ahead of the consumer.
"""

from __future__ import annotations

import io
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.loaders.base import Batch, LoaderBase, LoaderConfig, RankLayout, ShardSet
from pipeline.loaders.plan import SampleReader, plan_for
from pipeline.loaders.transforms import (
    BatchGeometry,
    assemble_cpu,
    assemble_device,
    eval_geometry,
    normalise,
    train_geometry,
)
from pipeline.shards.jpeg import jpeg_size
from pipeline.shards.shard_format import VERIFY_HINT, ShardFormatError


@dataclass
class PreparedBatch:
    """One batch read and planned, before decoding: ids (B,), labels (B,), encoded images, geometry."""

    epoch: int
    batch: int
    ids: np.ndarray
    labels: np.ndarray
    jpegs: list[np.ndarray]
    geometry: BatchGeometry


def decode_pipeline(batch_size: int, threads: int, prefetch: int, crop: bool):
    """DALI CPU pipeline: external sources `jpegs` (+ `anchor` (left, top) and `shape` (width, height) with `crop`)
    -> decoded RGB uint8 (h, w, 3) per sample. EXIF orientation is not applied: windows refer to stored pixels."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=prefetch,
                  exec_dynamic=True)
    def pipeline():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        common = {"device": "cpu", "output_type": types.RGB, "adjust_orientation": False}
        if not crop:
            return fn.decoders.image(jpegs, **common)
        anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
        return fn.decoders.image_slice(jpegs, anchor, shape, axis_names="WH", normalized_anchor=False,
                                       normalized_shape=False, **common)

    return pipeline()


def feed(pipe, prepared: PreparedBatch, crop: bool) -> None:
    """Hand `prepared`'s encoded images (and with `crop` its windows) to a `decode_pipeline` for its next run."""
    pipe.feed_input("jpegs", prepared.jpegs)
    if crop:
        window = prepared.geometry.window.astype(np.int32)
        pipe.feed_input("anchor", np.ascontiguousarray(window[:, [1, 0]]))
        pipe.feed_input("shape", np.ascontiguousarray(window[:, [3, 2]]))


class CropDecodeLoader(LoaderBase):
    """`Loader` whose JPEG decoding runs on CPU threads and whose resize runs with torch on the output device."""

    backend = "dali"

    def __init__(self, cfg: LoaderConfig, shards: ShardSet, layout: RankLayout, device: torch.device):
        super().__init__(cfg, shards, layout, device)
        self.index, self.planner = plan_for(cfg, shards, layout)
        self._reader = SampleReader(self.index, str(shards.folder))
        self._plans: dict[int, np.ndarray] = {}
        self._pipe = None
        self._inflight: deque[PreparedBatch] = deque()
        self._next: tuple[int, int] = (0, 0)  # position of the next batch to hand to the decoder
        self._pool = None  # resizes (CPU output) or packs the decoded windows for the transfer (GPU output)
        if cfg.num_threads > 1:
            self._pool = ThreadPoolExecutor(cfg.num_threads, "assemble")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        self._failure: Exception | None = None

    # -- plan ----------------------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch * batch_size,) global sample ids this rank reads in `epoch`, in batch order."""
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self.planner.plan(epoch)
        return self._plans[epoch]

    def prepare(self, epoch: int, batch: int) -> PreparedBatch:
        """Batch `batch` of `epoch` read from the shards, with its geometry (nothing decoded yet)."""
        n = self.cfg.batch_size
        ids = self.plan(epoch)[batch * n : (batch + 1) * n]
        jpegs, labels, heights, widths = [], np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        for k, sid in enumerate(ids):
            jpeg, labels[k] = self._reader.read(int(sid))
            size = jpeg_size(jpeg)
            if size is None:
                raise ShardFormatError(f"{self.index.where(int(sid))} is not a JPEG (no frame header); "
                                       + VERIFY_HINT.format(root=self.shards.folder))
            heights[k], widths[k] = size
            jpegs.append(np.frombuffer(jpeg, np.uint8))
        cfg = self.cfg
        if cfg.train:
            geometry = train_geometry(heights, widths, cfg.img_size, cfg.random_area, cfg.random_aspect_ratio,
                                      self.planner.augment_rng(epoch, batch))
        else:
            geometry = eval_geometry(heights, widths, cfg.eval_resize, cfg.img_size)
        return PreparedBatch(epoch, batch, ids, labels, jpegs, geometry)

    # -- decoder -------------------------------------------------------------------------------------------------

    def _advance_next(self) -> None:
        epoch, batch = self._next
        self._next = (epoch + 1, 0) if batch + 1 == self.batches_per_epoch else (epoch, batch + 1)

    def _feed(self, pipe, prepared: PreparedBatch) -> None:
        feed(pipe, prepared, self.cfg.train)
        self._inflight.append(prepared)

    def _start(self):
        """Build the decoder and hand it the next `prefetch` batches from the current position."""
        if self._failure is not None:
            raise RuntimeError("this loader's decoding failed earlier (see the previous error); build a new "
                               "loader, restoring a saved state_dict to continue") from self._failure
        self.close()
        pipe = decode_pipeline(self.cfg.batch_size, self.cfg.num_threads, self.cfg.prefetch, self.cfg.train)
        pipe.build()
        self._next = (self._epoch, self._batch)
        try:
            for _ in range(self.cfg.prefetch):
                self._feed(pipe, self.prepare(*self._next))
                self._advance_next()
        except BaseException:
            self.close()
            raise
        pipe.schedule_run()
        self._pipe = pipe
        return pipe

    def _take(self) -> tuple[PreparedBatch, list]:
        """The oldest batch in flight, decoded; the next position is handed to the decoder before returning.

        Any failure drops the decoder, so that the next call starts again from the position (nothing was handed
        over); a failed decode also makes the loader refuse further use, as the DALI pipeline does.
        """
        pipe = self._pipe if self._pipe is not None else self._start()
        try:
            (decoded,) = pipe.outputs()
        except RuntimeError as e:
            self._failure = self._explain_failure(e)
            self.close()
            raise self._failure from e
        try:
            prepared = self._inflight.popleft()
            self._feed(pipe, self.prepare(*self._next))
            self._advance_next()
            pipe.schedule_run()
        except BaseException:
            self.close()
            raise
        return prepared, [np.asarray(decoded[k]) for k in range(len(decoded))]

    def close(self) -> None:
        """Release the decoder (threads, buffers); the position is kept and the next `__iter__` starts a new one."""
        self._pipe = None
        self._inflight.clear()

    def _load_backend_state(self, state: dict) -> None:
        self.close()
        self._failure = None

    def _explain_failure(self, error: RuntimeError) -> Exception:
        """Name the sample DALI could not decode: the first of the batches in flight that PIL cannot decode either."""
        from PIL import Image

        for prepared in self._inflight:
            for sid, jpeg in zip(prepared.ids, prepared.jpegs, strict=True):
                try:
                    with Image.open(io.BytesIO(jpeg.tobytes())) as im:
                        im.load()
                except Exception as e:
                    return ShardFormatError(f"{self.index.where(int(sid))} is not a decodable image ({e}); "
                                            + VERIFY_HINT.format(root=self.shards.folder))
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        return RuntimeError(f"JPEG decoding failed at rank {self.layout.rank}, epoch {self._epoch}, batch "
                            f"{self._batch} of {self.shards.folder}: {detail[:800]}")

    # -- batches -------------------------------------------------------------------------------------------------

    def assemble(self, prepared: PreparedBatch, crops: list[np.ndarray]) -> torch.Tensor:
        """(B, S, S, 3) uint8 on the loader's device from the decoded windows `crops` (h, w, 3) uint8."""
        size, geometry = self.cfg.img_size, prepared.geometry
        if self.device.type != "cpu":
            return assemble_device(crops, geometry, size, self.device, self._pool)
        out = torch.empty(len(crops), size, size, 3, dtype=torch.uint8)
        sources = [torch.from_numpy(c) for c in crops]
        if self._pool is None:
            assemble_cpu(sources, geometry, size, out, range(len(crops)))
        else:
            chunks = np.array_split(np.arange(len(crops)), self.cfg.num_threads)
            list(self._pool.map(lambda idx: assemble_cpu(sources, geometry, size, out, idx.tolist()), chunks))
        return out

    def _iter_epoch(self):
        n = self.cfg.batch_size
        epoch = self._epoch
        while self._epoch == epoch:
            prepared, crops = self._take()
            assert (prepared.epoch, prepared.batch) == (self._epoch, self._batch), "decoder out of step"
            images = self.assemble(prepared, crops)
            if self.cfg.output_dtype == "float16":
                images = normalise(images)
            index = self._batch
            self._advance()
            valid, num_valid = self._valid_mask(index, n)
            labels = torch.from_numpy(prepared.labels).to(self.device, non_blocking=True)
            yield Batch(images, labels, valid, num_valid)
