"""Public interface of the data loaders: `LoaderConfig`, `Batch`, the `Loader` protocol and `LoaderBase`.

`pipeline.loaders.build.build_loader` validates a shard folder and makes the configured backend.

Paths that read the same shard folder (`pipeline.shards.shard_format`) with the same semantics:

* `backend="dali"`, `decode="gpu"` (`pipeline.loaders.dali_loader`): DALI decodes (`mixed` nvJPEG) and augments on
  the GPU; `decode="dali-cpu"` runs the same pipeline on DALI's CPU backend (its twin, the reference).
* `backend="dali"`, `decode="cpu"` (`pipeline.loaders.crop_decode`): DALI decodes only the crop window on CPU
  threads, torch resizes (PIL's bicubic) and flips on the output device; the default without a GPU.
* `backend="torch"` (`pipeline.loaders.torch_loader`): PIL decoding in `DataLoader` workers, then the crop-decode
  path's geometry and resize (the same batches); for machines without DALI.

Semantics shared by all (docs/data-pipeline.md has the user-facing version):

* Rank sharding is DALI's: over the epoch's sample sequence (all shards concatenated in the epoch's shard order),
  rank r reads the contiguous range [N*r//W, N*(r+1)//W) (`RankLayout`), so over one epoch the ranks together read
  every sample exactly once. Shorter ranks are padded by repeating their last sample so every rank runs the same
  number of batches; padding is flagged `valid=False`.
* Train: the shard order is reshuffled every epoch from `seed` (the same order on every rank), then samples are
  shuffled through a buffer of `shuffle_buffer`; random-resized-crop + horizontal flip, and with
  `augment="finetune"` RandAugment after them (timm's rand-m9-mstd0.5-inc1, `pipeline.loaders.randaugment`: on DALI
  built from its auto_aug building blocks, on the torch backend timm's own transform: the same policy, different
  random streams and warp filters). With `drop_last` (the train
  default) every rank yields only full batches of real samples: `batches_per_epoch = min_r(size_r) // batch_size`,
  so at most `batch_size - 1` samples per rank (a different, random few each epoch) are skipped in an epoch. With
  `drop_last=False` the last batch is completed with flagged padding and the epoch covers every sample.
* Eval: shards in manifest order, no randomness, resize + centre crop; every sample exactly once over all ranks,
  the last partial batch completed with padding that is flagged and must not be counted.
* Position: `epoch` and `batch` advance as batches are handed over; `state_dict()` captures the exact position
  (plus the DALI checkpoint) and `load_state_dict()` continues there. `__iter__` yields the rest of the current
  epoch, so a loop that stops early (or a restored loader) resumes mid-epoch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.loaders.throughput import ThroughputStats
from pipeline.shards.shard_format import (
    IMAGE_EXT,
    LABEL_EXT,
    VERIFY_HINT,
    Manifest,
    ShardFormatError,
    check_shard_files,
    load_manifest,
)

BACKENDS = ("dali", "torch")
DEVICES = ("auto", "cpu", "cuda")
# Where the dali backend decodes and resizes (see `resolve_decode`): "gpu" DALI mixed nvJPEG + GPU operators;
# "cpu" crop-window decoding on CPU threads, then torch's resize and flip on the output device; "dali-cpu" the GPU
# pipeline's operators on DALI's CPU backend (its twin, the reference); "auto" = "gpu" on CUDA, else "cpu".
DECODES = ("auto", "gpu", "cpu", "dali-cpu")
OUTPUT_DTYPES = ("uint8", "float16")
# "pretrain": random-resized crop + flip (MAE / SupMAE pre-training, linear probing); "finetune": the same followed
# by RandAugment(randaug_n ops, magnitude randaug_m) as in MAE's fine-tuning recipe.
AUGMENTS = ("pretrain", "finetune")
# RandAugment magnitudes are on timm's 0..10 scale (MAE's "rand-m9-mstd0.5-inc1": 9 of 10); randaugment.py.
RANDAUG_MAX_LEVEL = 10
# Samples in the training shuffle buffer (DALI initial_fill) per rank: with 1,000-sample shards it brings the
# re-meeting of samples across epochs near a full permutation's at about 0.9 GB of host memory per rank for
# ImageNet's ~115 KB JPEGs (pipeline/loaders/mixing.py; the measurement is in docs/data-pipeline.md).
DEFAULT_SHUFFLE_BUFFER = 8192
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_VERSION = 1


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LoaderConfig.{name}={value!r} is invalid: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class LoaderConfig:
    """What a loader reads and how; validated on creation (errors name the field, the value and what is allowed)."""

    data: str  # shard folder (with manifest.json)
    batch_size: int  # per rank
    img_size: int = 224
    train: bool = True  # train: random crop+flip, shuffled, drop_last by default; eval: resize+centre crop, once
    backend: str = "dali"  # "dali" | "torch"
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda"
    decode: str = "auto"  # dali backend: "auto" | "gpu" | "cpu" | "dali-cpu" (see DECODES, resolve_decode)
    output_dtype: str = "uint8"  # "uint8" (model normalises) | "float16" (normalised with ImageNet mean/std)
    num_threads: int = 4  # DALI CPU threads / torch DataLoader workers (0: in the main process)
    seed: int = 0
    random_area: tuple[float, float] = (0.2, 1.0)
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_ratio: float = 0.875  # eval resize of the shorter side = int(img_size / crop_ratio)
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # DALI initial_fill (the torch backend: a buffer of the same size)
    hw_decoder_load: float = 0.65  # share of JPEG decoding on the A100/H100 hardware decoder (cuda only)
    prefetch: int = 2  # batches prepared ahead (DALI prefetch_queue_depth, DataLoader prefetch_factor)
    drop_last: bool | None = None  # None: True for train, False for eval (eval must see every sample)
    augment: str = "pretrain"  # train only: "pretrain" (crop + flip) | "finetune" (crop + flip + RandAugment)
    randaug_n: int = 2  # RandAugment (augment="finetune", timm's rand-m9-mstd0.5-inc1): operations per image
    randaug_m: int = 9  # RandAugment: magnitude on timm's 0..10 scale
    randaug_mstd: float = 0.5  # RandAugment: std of the Gaussian noise on the magnitude of each applied operation
    randaug_inc: bool = True  # RandAugment: timm's increasing-severity operation set (inc1)

    def __post_init__(self) -> None:
        if isinstance(self.data, os.PathLike):
            self.data = os.fspath(self.data)
        _require(isinstance(self.data, str) and bool(self.data), "data", self.data, "a shard folder path")
        _require(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        _require(_is_int(self.img_size) and self.img_size >= 8, "img_size", self.img_size, "an int >= 8")
        _require(isinstance(self.train, bool), "train", self.train, "True or False")
        _require(self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        _require(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        _require(self.decode in DECODES, "decode", self.decode, f"one of {DECODES}")
        _require(self.backend == "dali" or self.decode in ("auto", "cpu"), "decode", self.decode,
                 "'auto' or 'cpu' with backend='torch' (it decodes with PIL on the CPU)")
        _require(self.output_dtype in OUTPUT_DTYPES, "output_dtype", self.output_dtype, f"one of {OUTPUT_DTYPES}")
        _require(_is_int(self.num_threads) and self.num_threads >= 0, "num_threads", self.num_threads, "an int >= 0")
        if self.backend == "dali":
            _require(self.num_threads >= 1, "num_threads", self.num_threads, "DALI needs at least 1 thread")
        _require(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "an int in [0, 2**63)")
        self.random_area = tuple(float(v) for v in self.random_area)
        a0, a1 = self.random_area if len(self.random_area) == 2 else (0.0, -1.0)
        _require(0 < a0 <= a1 <= 1, "random_area", self.random_area, "(min, max) with 0 < min <= max <= 1")
        self.random_aspect_ratio = tuple(float(v) for v in self.random_aspect_ratio)
        r0, r1 = self.random_aspect_ratio if len(self.random_aspect_ratio) == 2 else (0.0, -1.0)
        _require(0 < r0 <= r1, "random_aspect_ratio", self.random_aspect_ratio, "(min, max) with 0 < min <= max")
        _require(isinstance(self.crop_ratio, (int, float)) and 0 < self.crop_ratio <= 1, "crop_ratio",
                 self.crop_ratio, "a number in (0, 1]")
        _require(_is_int(self.shuffle_buffer) and self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer,
                 "an int >= 1")
        _require(isinstance(self.hw_decoder_load, (int, float)) and 0 <= self.hw_decoder_load <= 1,
                 "hw_decoder_load", self.hw_decoder_load, "a number in [0, 1]")
        _require(_is_int(self.prefetch) and self.prefetch >= 1, "prefetch", self.prefetch, "an int >= 1")
        if self.drop_last is None:
            self.drop_last = self.train
        _require(isinstance(self.drop_last, bool), "drop_last", self.drop_last, "True, False or None")
        _require(self.train or not self.drop_last, "drop_last", self.drop_last,
                 "eval loaders must not drop samples (use drop_last=None or False with train=False)")
        _require(self.augment in AUGMENTS, "augment", self.augment, f"one of {AUGMENTS}")
        _require(_is_int(self.randaug_n) and self.randaug_n >= 0, "randaug_n", self.randaug_n, "an int >= 0")
        _require(_is_int(self.randaug_m) and 0 <= self.randaug_m <= RANDAUG_MAX_LEVEL, "randaug_m", self.randaug_m,
                 f"an int in [0, {RANDAUG_MAX_LEVEL}] (timm's magnitude scale)")
        _require(isinstance(self.randaug_mstd, (int, float)) and not isinstance(self.randaug_mstd, bool)
                 and 0 <= self.randaug_mstd < float("inf"), "randaug_mstd", self.randaug_mstd, "a number >= 0")
        _require(isinstance(self.randaug_inc, bool), "randaug_inc", self.randaug_inc, "True or False")

    @property
    def randaugment(self) -> bool:
        """Whether batches get RandAugment: a fine-tuning train loader with at least one operation."""
        return self.train and self.augment == "finetune" and self.randaug_n > 0

    @property
    def eval_resize(self) -> int:
        """Shorter side before the eval centre crop (MAE: int(input_size / crop_pct), 256 for 224)."""
        return int(self.img_size / self.crop_ratio + 1e-6)

    def result_fingerprint(self) -> dict[str, Any]:
        """The settings that decide which batches come out; a saved position only fits a loader with the same ones.

        Not included (they change speed, not results): device, num_threads, prefetch, hw_decoder_load, data (the
        folder may move; the data identity is checked separately); decode is resolved for the device and added by
        the loader (`LoaderBase._fingerprint`).
        """
        skip = {"data", "device", "decode", "num_threads", "prefetch", "hw_decoder_load"}
        if self.augment == "pretrain":
            # Positions saved before the augment option existed stay valid: the default adds nothing.
            skip |= {"augment", "randaug_n", "randaug_m", "randaug_mstd", "randaug_inc"}
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in skip}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass
class Batch:
    """One batch on the loader's device.

    images: (N, H, W, C) NHWC contiguous, uint8 (model normalises) or float16 (normalised).
    labels: (N,) int64.
    valid: (N,) bool, False for padding (eval, equalised ranks); None when every sample is real.
    num_valid: how many samples are real, as a host int (count them without a device sync).
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor | None = None
    num_valid: int = -1

    def __post_init__(self) -> None:
        if self.num_valid < 0:
            self.num_valid = len(self.labels) if self.valid is None else int(self.valid.sum())

    def __len__(self) -> int:
        return len(self.labels)


@runtime_checkable
class Loader(Protocol):
    num_samples: int  # samples in the split (all ranks)
    num_classes: int
    batches_per_epoch: int  # per rank, equal on every rank
    epoch: int  # epoch the next __iter__ runs
    stats: ThroughputStats

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def resolve_device(device: str) -> torch.device:
    """"auto" -> the current CUDA device when CUDA is available, else the CPU; "cuda" without CUDA is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("LoaderConfig.device='cuda' but CUDA is not available; use device='auto' or 'cpu'")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_decode(cfg: LoaderConfig, device: torch.device) -> str:
    """The decoding path of `cfg` on `device`: "gpu", "cpu" or "dali-cpu" (backend "torch": always "cpu").

    "auto" is "gpu" on a CUDA device and "cpu" (crop-decode on CPU threads + torch resize) on the CPU, except with
    RandAugment ("cpu" does not run it): then "dali-cpu". "gpu" needs a CUDA device; "dali-cpu" yields CPU batches,
    so it needs device "cpu".
    """
    if cfg.backend == "torch":
        return "cpu"
    decode = cfg.decode
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "dali-cpu" if cfg.randaugment else "cpu"
    if decode == "cpu" and cfg.randaugment:
        raise ValueError("LoaderConfig.decode='cpu' does not run RandAugment (augment='finetune'; DALI applies it "
                         "after its own resize): use decode='gpu' on a GPU, 'dali-cpu' on a CPU, or backend='torch'")
    if decode == "gpu" and device.type != "cuda":
        raise ValueError("LoaderConfig.decode='gpu' needs a CUDA device (device='cuda', or 'auto' on a GPU machine); "
                         "use decode='cpu' (or 'auto') on a machine without a GPU")
    if decode == "dali-cpu" and device.type != "cpu":
        raise ValueError("LoaderConfig.decode='dali-cpu' runs the whole pipeline on DALI's CPU backend and yields CPU "
                         "batches: use it with device='cpu'; on a GPU use decode='gpu' or 'cpu'")
    return decode


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed mixed from `parts` (ints and tags); the same parts give the same seed on every rank and run."""
    words = []
    for p in parts:
        if isinstance(p, str):
            words.extend(hashlib.sha256(p.encode()).digest()[:8])
        else:
            words.extend(int(p).to_bytes(8, "little", signed=False))
    state = np.random.SeedSequence(np.frombuffer(bytes(words), np.uint32)).generate_state(1, np.uint32)[0]
    return int(state) >> 1


# ----------------------------------------------------------------------------------------------------------------
# The data, validated at start


@dataclass(frozen=True)
class ShardSet:
    """A validated shard folder: manifest, and per shard its tar, index and sample count (manifest order)."""

    folder: Path
    manifest: Manifest
    tars: tuple[Path, ...]
    indexes: tuple[Path, ...]
    sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def identity(self) -> str:
        """Content identity of the data (hash of the shards' checksums): a saved position belongs to this data."""
        h = hashlib.sha256()
        for rec in self.manifest.shards:
            h.update(f"{rec.file}:{rec.samples}:{rec.sha256}\n".encode())
        return h.hexdigest()[:16]

    @classmethod
    def open(cls, data: str | Path) -> ShardSet:
        """Load the manifest and check every listed shard and index exists with its listed size (no hashing).

        Errors name the file and say to run `./launch.sh shard --verify`.
        """
        manifest, folder = load_manifest(data)
        hint = VERIFY_HINT.format(root=folder)
        components = manifest.components
        if components.get("image") != IMAGE_EXT or components.get("label") != LABEL_EXT:
            raise ShardFormatError(
                f"{folder / 'manifest.json'}: components {components} are not the ones the loaders read "
                f"(image '{IMAGE_EXT}', label '{LABEL_EXT}'); re-shard with this version's `./launch.sh shard`"
            )
        if manifest.label_dtype != "int64-le":
            raise ShardFormatError(f"{folder / 'manifest.json'}: label_dtype {manifest.label_dtype!r} is not "
                                   "'int64-le'; re-shard with this version's `./launch.sh shard`")
        if not manifest.shards:
            raise ShardFormatError(f"{folder / 'manifest.json'}: lists no shards; {hint}")
        check_shard_files(manifest, folder)
        return cls(
            folder=folder,
            manifest=manifest,
            tars=tuple(folder / s.file for s in manifest.shards),
            indexes=tuple(folder / s.index for s in manifest.shards),
            sizes=tuple(s.samples for s in manifest.shards),
        )


# ----------------------------------------------------------------------------------------------------------------
# Rank layout: which positions of an epoch a rank reads, how many batches, which are padding


@dataclass(frozen=True)
class RankLayout:
    """DALI's sharding of an epoch's N samples over W ranks, batched by B.

    Rank r reads positions [N*r//W, N*(r+1)//W) of the epoch's sample sequence. DALI pads every rank (repeating its
    last sample) to ceil(N/W) samples and then to whole batches: `reader_batches` per epoch on every rank. A rank
    yields `batches_per_epoch` of them: all with padding (eval, or drop_last=False), or only the full batches of
    real samples that every rank has (drop_last=True); the reader's remaining batches are read and discarded.
    """

    num_samples: int
    world_size: int
    rank: int
    batch_size: int
    drop_last: bool

    def __post_init__(self) -> None:
        if not (_is_int(self.world_size) and self.world_size >= 1):
            raise ValueError(f"world_size must be an int >= 1, got {self.world_size!r}")
        if not (_is_int(self.rank) and 0 <= self.rank < self.world_size):
            raise ValueError(f"rank must be an int in [0, world_size={self.world_size}), got {self.rank!r}")
        if self.num_samples < self.world_size:
            raise ValueError(f"{self.num_samples} samples cannot be split over {self.world_size} ranks "
                             "(every rank needs at least one)")
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {self.min_shard_size} samples the smallest rank "
                f"reads ({self.num_samples} samples over {self.world_size} ranks) and drop_last=True (training: "
                "incomplete batches are dropped) would leave no batch; lower --batch-size to at most "
                f"{self.min_shard_size} (or set drop_last=False)"
            )

    def shard_range(self, rank: int) -> tuple[int, int]:
        n, w = self.num_samples, self.world_size
        return n * rank // w, n * (rank + 1) // w

    @property
    def shard_size(self) -> int:
        start, end = self.shard_range(self.rank)
        return end - start

    @property
    def min_shard_size(self) -> int:
        return self.num_samples // self.world_size

    @property
    def reader_batches(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        return -(-per_rank // self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        return self.min_shard_size // self.batch_size if self.drop_last else self.reader_batches

    def num_valid(self, batch: int) -> int:
        """Real (non-padding) samples in batch `batch` of an epoch on this rank."""
        return min(self.batch_size, max(0, self.shard_size - batch * self.batch_size))


# ----------------------------------------------------------------------------------------------------------------
# Shared loader machinery: position, counters, state envelope


class LoaderBase:
    """Position bookkeeping, throughput counters and the state-dict envelope; backends provide `_iter_epoch`."""

    backend: str = ""

    def __init__(self, cfg: LoaderConfig, shards: ShardSet, layout: RankLayout, device: torch.device):
        self.cfg = cfg
        self.shards = shards
        self.layout = layout
        self.device = device
        self.decode = resolve_decode(cfg, device)  # "gpu", "cpu" or "dali-cpu"
        self.num_samples = shards.num_samples
        self.num_classes = shards.num_classes
        self.batches_per_epoch = layout.batches_per_epoch
        self.stats = ThroughputStats()
        self._epoch = 0
        self._batch = 0

    @property
    def epoch(self) -> int:
        """The epoch the next `__iter__` runs (advances when the last batch of an epoch is handed over)."""
        return self._epoch

    @property
    def batch(self) -> int:
        """Batches of `epoch` already handed over; the next `__iter__` starts at this one."""
        return self._batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.stats.timed(self._iter_epoch(), lambda b: b.num_valid)

    def _iter_epoch(self) -> Iterator[Batch]:
        raise NotImplementedError

    def _advance(self) -> bool:
        """Count one handed-over batch; True when it was the last of its epoch."""
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch += 1
            self._batch = 0
            return True
        return False

    def _valid_mask(self, batch: int, n: int) -> tuple[torch.Tensor | None, int]:
        """(valid mask on the device or None, real count) for batch `batch` of the epoch, `n` samples long."""
        num_valid = self.layout.num_valid(batch)
        if num_valid >= n:
            return None, n
        return torch.arange(n, device=self.device) < num_valid, num_valid

    # -- state ---------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        fingerprint = {
            "data": self.shards.identity,
            "num_samples": self.num_samples,
            "rank": self.layout.rank,
            "world_size": self.layout.world_size,
            **self.cfg.result_fingerprint(),
        }
        if self.decode == "cpu":
            # Crop-decode (and the torch backend, which shares its plan and draws) draws its crops otherwise than
            # DALI's operators and than the torch backend before it; "gpu" and "dali-cpu" are one pipeline on two
            # devices (a position moves between them), so they add nothing and their older positions stay valid.
            fingerprint["decode"] = "cpu"
        return fingerprint

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "backend": self.backend,
            "fingerprint": self._fingerprint(),
            "epoch": self._epoch,
            "batch": self._batch,
            **self._backend_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not supported (expected "
                             f"{STATE_VERSION})")
        if state.get("backend") != self.backend:
            raise ValueError(f"loader state was saved by backend {state.get('backend')!r}, this loader is "
                             f"{self.backend!r}: resume with the same backend")
        saved, mine = state["fingerprint"], self._fingerprint()
        diff = {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"loader state does not fit this loader ({detail}); a position can only be restored "
                             "with the same data, rank, world size and result-affecting settings")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state position epoch={epoch} batch={batch} is out of range "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self._load_backend_state(state)
        self._epoch, self._batch = epoch, batch

    def _backend_state(self) -> dict:
        return {}

    def _load_backend_state(self, state: dict) -> None:
        pass
