"""DALI train / eval loader over the shard folder: decode + augment on the GPU (`mixed`) or the CPU backend.

One pipeline definition serves both devices; only device strings differ ("mixed"/"cpu" for the decoder, and the
labels are moved with `.gpu()`), so the CPU path the tests run is the GPU path's twin.

    reader    fn.readers.webdataset over the shards with their DALI indexes (`missing_component_behavior="error"`),
              `.lbl` read as INT64; rank sharding shard_id=rank / num_shards=world with `pad_last_batch`.
              Train: `shuffle_after_epoch` (shard order reshuffled every epoch, one seed on all ranks) +
              `random_shuffle` through `initial_fill` samples (per-rank seed).
    train     decoders.image_random_crop (decodes only the crop window) -> resize to S x S, cubic, antialiased
              [-> RandAugment (augment="finetune"): timm's rand-m9-mstd0.5-inc1 made of DALI auto_aug
              augmentations under conditional execution, on the decoder's device (pipeline.loaders.randaugment)]
              -> crop_mirror_normalize (random flip, NHWC, uint8 or normalised float16)
    eval      decoders.image -> resize the shorter side to int(S / crop_ratio), cubic -> centre crop S x S, with
              torchvision's exact output sizes and crop offsets (computed from the JPEG header per sample), so
              the torch backend's eval pixels agree within interpolation rounding.

Why the loader drives `pipe.run()` itself instead of wrapping DALIGenericIterator: the epoch length, padding mask
and exact position must be the same on every rank and on both backends (`RankLayout`), and the position must be
restorable mid-epoch. DALI's buffer shuffle never mixes epochs and puts the padding last (Loader::ReadOne keeps a
separate buffer segment per epoch), so the reader's epoch is exactly `RankLayout.reader_batches` runs, padding at
positions >= the rank's shard size. `pipe.checkpoint()` is the state after the last *returned* run, whatever the
prefetch queue holds (verified: restoring it continues with the next batch, mid-epoch and across epochs), so the
saved position is (epoch, batch, runs to discard) + that checkpoint.

Hand-off to torch, on the GPU: `pipe.run(stream)` with torch's current CUDA stream, so the outputs are ordered on
that stream (DALI makes the stream wait for them) instead of the host waiting for DALI every batch, and they reach
torch zero-copy through DLPack (on the same stream: no further wait). With the dynamic executor a returned buffer
stays valid while a reference to it lives (tested), but the consumer drops a batch as soon as it has *enqueued* the
work that reads it (visible-patch gather, loss forward and backward). How long the memory is kept: every handed-over
batch's tensors are held by `pipeline.loaders.lifetime.HeldBuffers` until the consumer has dropped the batch and a
CUDA event recorded on the stream after that point has completed, so the pipeline can only reuse the memory once
no queued kernel can read it (the module describes the contract). On the CPU backend nothing is queued: a dropped
batch's buffers go at the next hand-over.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

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
from pipeline.loaders.lifetime import HeldBuffers, cuda_marker
from pipeline.loaders.randaugment import RandAugmentPolicy, rand_augment
from pipeline.shards.shard_format import IMAGE_EXT, LABEL_EXT, VERIFY_HINT, ShardFormatError

READER_NAME = "shards"
# Upper bound on the checksum search after a decode/read failure (the error path; shards seen last go first).
DIAGNOSE_SECONDS = 300.0


def define_pipeline(cfg: LoaderConfig, shards: ShardSet, layout: RankLayout, device: torch.device,
                    checkpoint: bytes | None = None):
    """The DALI pipeline of `cfg` for this rank, not yet built.

    Outputs per run: images (B, S, S, 3) uint8/float16 HWC, labels (B, 1) int64, source info (B, L) uint8 (the
    `tar:offset:member` of each sample, zero-padded; kept for error messages).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    size = cfg.img_size
    float16 = cfg.output_dtype == "float16"

    if cfg.train:
        # New shard order every epoch, the same on all ranks, so the ranks' ranges still tile the epoch.
        order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": derive_seed(cfg.seed, "shard-order")}
    else:
        # Eval reads the same range in the same order every pass (train implies stick_to_shard).
        order = {"stick_to_shard": True}

    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=device.index if gpu else None,
        seed=derive_seed(cfg.seed, "dali-augment", layout.rank),
        prefetch_queue_depth=cfg.prefetch,
        enable_checkpointing=True,
        exec_dynamic=True,
        # RandAugment picks its operation per sample with `if` on data nodes (DALI's conditional execution). Only
        # turned on where it is used, so the pre-training pipeline is built exactly as before.
        enable_conditionals=cfg.randaugment,
    )
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            name=READER_NAME,
            paths=[str(p) for p in shards.tars],
            index_paths=[str(p) for p in shards.indexes],
            ext=[IMAGE_EXT, LABEL_EXT],
            dtypes=[types.UINT8, types.INT64],
            missing_component_behavior="error",
            shard_id=layout.rank,
            num_shards=layout.world_size,
            pad_last_batch=True,
            random_shuffle=cfg.train,
            initial_fill=cfg.shuffle_buffer,
            seed=derive_seed(cfg.seed, "dali-buffer", layout.rank),
            **order,
        )
        source = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
        decoder = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
        if gpu:
            decoder["hw_decoder_load"] = cfg.hw_decoder_load
        if cfg.train:
            images = fn.decoders.image_random_crop(
                jpegs, random_area=list(cfg.random_area), random_aspect_ratio=list(cfg.random_aspect_ratio),
                num_attempts=10, **decoder)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            if cfg.randaugment:
                images = _rand_augment(images, cfg, layout)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, **decoder)
            images = _resize_centre_crop(fn, dmath, types, jpegs, images, cfg.eval_resize, size)
            mirror = 0
        norm = {}
        if float16:
            norm = {"mean": [255 * m for m in IMAGENET_MEAN], "std": [255 * s for s in IMAGENET_STD]}
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, output_layout="HWC", dtype=types.FLOAT16 if float16 else types.UINT8, **norm)
        if gpu:
            labels = labels.gpu()
        return images, labels, source

    return pipeline(checkpoint=checkpoint)


def _rand_augment(images, cfg: LoaderConfig, layout: RankLayout):
    """timm's RandAugment (randaug_n ops, magnitude randaug_m +- N(0, randaug_mstd), the increasing op set with
    randaug_inc) on (S, S, 3) uint8 images, per-rank seed; every operation runs on the CPU and the GPU backend."""
    return rand_augment(images, RandAugmentPolicy.from_loader_config(cfg), (cfg.img_size, cfg.img_size),
                        seed=derive_seed(cfg.seed, "dali-randaugment", layout.rank))


def _resize_centre_crop(fn, dmath, types, jpegs, images, resize: int, size: int):
    """torchvision Resize(resize, bicubic) + CenterCrop(size) with its exact integer geometry.

    Sizes come from the JPEG header (CPU, so the arguments are valid for GPU operators too): the shorter side
    becomes `resize`, the longer int(resize * long / short); the crop starts at round((side - size) / 2) with
    Python's round-half-to-even, written in integer arithmetic as (d + (d // 2) % 2) // 2.
    """
    shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.INT64)
    h, w = shape[0], shape[1]
    landscape = w >= h
    longer = (dmath.max(h, w) * resize) // dmath.min(h, w)
    out_w = landscape * longer + (1 - landscape) * resize
    out_h = landscape * resize + (1 - landscape) * longer
    images = fn.resize(images, resize_x=fn.cast(out_w, dtype=types.FLOAT), resize_y=fn.cast(out_h, dtype=types.FLOAT),
                       interp_type=types.INTERP_CUBIC, antialias=True)
    dy, dx = out_h - size, out_w - size
    anchor = fn.stack((dy + (dy // 2) % 2) // 2, (dx + (dx // 2) % 2) // 2)
    return fn.slice(images, fn.cast(anchor, dtype=types.FLOAT), fn.cast(fn.stack(dy * 0 + size, dx * 0 + size),
                    dtype=types.FLOAT), axes=[0, 1], normalized_anchor=False, normalized_shape=False)


class DaliLoader(LoaderBase):
    """`Loader` on DALI; see the module docstring for how position and padding are kept exact."""

    backend = "dali"

    def __init__(self, cfg: LoaderConfig, shards: ShardSet, layout: RankLayout, device: torch.device):
        super().__init__(cfg, shards, layout, device)
        self._pipe = None
        self._checkpoint: bytes | None = None  # restored into the next pipeline built
        self._skip_runs = 0  # reader batches of the finished epoch still to discard (drop_last tail)
        self._recent_sources: deque = deque(maxlen=cfg.prefetch + 2)
        self._failure: Exception | None = None
        self._held = HeldBuffers(cuda_marker(device) if device.type == "cuda" else None)

    # -- pipeline ------------------------------------------------------------------------------------------------

    def _pipeline(self):
        if self._failure is not None:
            raise RuntimeError("this loader's DALI pipeline failed earlier (see the previous error); build a new "
                               "loader, restoring a saved state_dict to continue") from self._failure
        if self._pipe is None:
            pipe = define_pipeline(self.cfg, self.shards, self.layout, self.device, self._checkpoint)
            pipe.build()
            meta = pipe.reader_meta(READER_NAME)
            want = (self.num_samples, -(-self.num_samples // self.layout.world_size) * self.layout.world_size)
            if (meta["epoch_size"], meta["epoch_size_padded"]) != want:
                raise RuntimeError(f"DALI reader reports epoch_size {meta['epoch_size']} / padded "
                                   f"{meta['epoch_size_padded']}, expected {want}: its sharding changed")
            self._pipe, self._checkpoint = pipe, None
        return self._pipe

    def close(self) -> None:
        """Release the pipeline (threads, buffers); the position is kept and the next `__iter__` rebuilds it."""
        if self._pipe is not None:
            self._checkpoint = self._pipe.checkpoint()
            self._pipe = None

    def _stream(self):
        """torch's current stream on the GPU (outputs ordered on it, see the module doc); None: host-synchronous."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _run(self, pipe):
        try:
            outputs = pipe.run(self._stream())
        except RuntimeError as e:
            self._pipe = None
            self._failure = self._explain_failure(e)
            raise self._failure from e
        self._recent_sources.append(outputs[2])
        return outputs

    def _to_torch(self, tensor_list) -> torch.Tensor:
        tensor = tensor_list.as_tensor()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                return torch.from_dlpack(tensor)
        return torch.from_dlpack(tensor)

    def _iter_epoch(self) -> Iterator[Batch]:
        pipe = self._pipeline()
        while self._skip_runs:
            self._run(pipe)
            self._skip_runs -= 1
        epoch = self._epoch
        while self._epoch == epoch:
            images, labels, _ = self._run(pipe)
            index = self._batch
            if self._advance():
                self._skip_runs = self.layout.reader_batches - self.batches_per_epoch
            n = self.cfg.batch_size
            valid, num_valid = self._valid_mask(index, n)
            batch = Batch(self._to_torch(images), self._to_torch(labels).view(n), valid, num_valid)
            self._held.collect()
            self._held.hold(batch, (batch.images, batch.labels))
            yield batch

    # -- state ---------------------------------------------------------------------------------------------------

    def _backend_state(self) -> dict:
        blob = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"skip_runs": self._skip_runs,
                "dali_checkpoint": base64.b64encode(blob).decode("ascii") if blob is not None else None}

    def _load_backend_state(self, state: dict) -> None:
        blob = state.get("dali_checkpoint")
        skip = int(state.get("skip_runs", 0))
        if blob is None and (state["epoch"], state["batch"], skip) != (0, 0, 0):
            raise ValueError("loader state has a position but no DALI checkpoint; it was not saved by this loader")
        if not 0 <= skip < self.layout.reader_batches:
            raise ValueError(f"loader state skip_runs={skip} is out of range")
        self._pipe = None
        self._failure = None
        self._checkpoint = base64.b64decode(blob) if blob is not None else None
        self._skip_runs = skip

    # -- errors --------------------------------------------------------------------------------------------------

    def _recent_tars(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for tl in reversed(self._recent_sources):
            for row in np.asarray(tl.as_tensor()):
                info = bytes(row).rstrip(b"\0")
                if info:
                    seen.setdefault(Path(info.rsplit(b":", 2)[0].decode(errors="replace")), None)
        return list(seen)

    def _explain_failure(self, error: RuntimeError) -> Exception:
        """Turn a DALI error into one that names the shard: the corrupt one if a checksum finds it."""
        where = f"rank {self.layout.rank}, epoch {self._epoch}, batch {self._batch}"
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        recent = self._recent_tars()
        if any(s in detail for s in ("decoders", "readers", "nvImageCodec", "webdataset")):
            bad = find_corrupt_shard(self.shards, prefer=recent, budget_s=DIAGNOSE_SECONDS)
            if bad is not None:
                from pipeline.shards.verify import locate_damage

                damage = locate_damage(self.shards.folder, self.shards.manifest, bad.name)
                return ShardFormatError(
                    f"{bad}: corrupt: its sha256 differs from the manifest"
                    + (f"; {damage}" if damage is not None else "")
                    + f" (found after DALI failed to read or decode a sample at {where}: {detail[:500]}); "
                    + VERIFY_HINT.format(root=self.shards.folder))
        reading = ", ".join(p.name for p in recent[:4]) or "the first shards of the epoch"
        return RuntimeError(f"DALI pipeline failed at {where} while reading around {reading} of "
                            f"{self.shards.folder}: {detail}")


def find_corrupt_shard(shards: ShardSet, prefer: list[Path] = (), budget_s: float = DIAGNOSE_SECONDS) -> Path | None:
    """The first shard whose sha256 differs from the manifest, checking `prefer` first; None if none within budget."""
    records = {shards.folder / rec.file: rec.sha256 for rec in shards.manifest.shards}
    order = [p for p in prefer if p in records] + [p for p in records if p not in prefer]
    deadline = time.monotonic() + budget_s
    for path in order:
        if time.monotonic() > deadline:
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != records[path]:
            return path
    return None
