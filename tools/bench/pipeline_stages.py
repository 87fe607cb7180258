"""Stage rows of `./launch.sh bench pipeline`: where a CPU data path's time goes, one thread, CPU time per image.

crop-decode (the default CPU train path, `pipeline.loaders.crop_decode`), built up one step at a time on the same
batches:
    1  read      plan + positioned reads of image and label + JPEG frame header + crop windows (`prepare`)
    2  decode    + DALI `decoders.image_slice` of the window (CPU, 1 thread, one batch at a time)
    3  resize    + torch's uint8 antialiased bicubic kernel into the NHWC batch (PIL's filter and pass order)
    4  flip      + the random flip: the whole loader on one thread
and the alternatives that were measured for steps 2 and 3, each alone on the same windows:
    decode: DALI `decoders.image_random_crop` (the reference pipeline's), DALI full decode, PIL full decode,
            torchvision `decode_jpeg` full decode (PIL's draft() is not one: it decodes at 1/2, 1/4, 1/8 scale,
            so its pixels are not PIL's bicubic of the window)
    resize: PIL `Image.resize(BICUBIC)` (the original recipe's), `F.interpolate` (the same torch kernel returning a
            channels-first tensor: a repack and a transposing copy more)

dali (the reference pipeline on DALI's CPU backend, `decode="dali-cpu"`): the same built up one operator at a time
(reader, decode, crop-decode, cubic antialiased resize, flip) with a synchronous executor.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import numpy as np

from tools.bench.report import Timing

CROP_STAGES = (
    ("read", "crop-decode 1: read + header + windows"),
    ("decode", "crop-decode 2: + crop-window decode (DALI image_slice)"),
    ("resize", "crop-decode 3: + resize (torch uint8 bicubic, PIL's)"),
    ("flip", "crop-decode 4: + flip, NHWC uint8 = (a) on one thread"),
)
DALI_STAGES = (
    ("read", "dali 1: read shards"),
    ("decode", "dali 2: + full decode"),
    ("crop-decode", "dali 2': crop-decode instead"),
    ("resize", "dali 3: + cubic antialiased resize"),
    ("flip", "dali 4: + flip, NHWC uint8 = (a') on one thread"),
)


def cpu_per_call(fn: Callable[[], object], warmup: int, repeats: int) -> Timing:
    """CPU seconds (this process, all threads) per call of `fn`: single-threaded stage costs that background load
    on a shared machine changes less than wall time."""
    import time

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return Timing(out)


def cpu_interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, Timing]:
    """`cpu_per_call` of several calls, one call of each in turn per round, so that changing background load hits
    them alike (their ratios stay meaningful on a shared machine)."""
    import time

    for _ in range(warmup):
        for fn in calls.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.process_time()
            fn()
            out[name].append(time.process_time() - t0)
    return {name: Timing(seconds) for name, seconds in out.items()}


def per_image(timing: Timing, images: int) -> Timing:
    return Timing([t / images for t in timing.seconds])


# ----------------------------------------------------------------------------------------------------------------
# crop-decode


class CropDecodeStages:
    """The crop-decode loader's steps on `batches` batches of epoch 0, one thread, each step callable alone."""

    def __init__(self, data: str, batch_size: int, img_size: int, batches: int):
        from pipeline.loaders.base import LoaderConfig
        from pipeline.loaders.build import build_loader
        from pipeline.loaders.crop_decode import decode_pipeline, feed

        self.loader = build_loader(LoaderConfig(data, batch_size, img_size, device="cpu", num_threads=1, prefetch=1,
                                                decode="cpu"))
        self.batches = min(batches, self.loader.batches_per_epoch)
        self.images = self.batches * batch_size
        self.prepared = self.read()
        self.pipe = decode_pipeline(batch_size, 1, 1, crop=True)
        self.pipe.build()
        self._feed = feed
        self.crops = self.decode()

    def read(self) -> list[Any]:
        return [self.loader.prepare(0, b) for b in range(self.batches)]

    def decode(self) -> list[list[np.ndarray]]:
        out = []
        for prepared in self.prepared:
            self._feed(self.pipe, prepared, True)
            self.pipe.schedule_run()
            (decoded,) = self.pipe.outputs()
            out.append([np.asarray(decoded[k]) for k in range(len(decoded))])
        return out

    def assemble(self, flip: bool) -> None:
        for prepared, crops in zip(self.prepared, self.crops, strict=True):
            if not flip:
                prepared = dataclasses.replace(
                    prepared, geometry=dataclasses.replace(prepared.geometry, flip=np.zeros(len(crops), bool)))
            self.loader.assemble(prepared, crops)

    def stage(self, name: str) -> Callable[[], None]:
        steps = {"read": [self.read], "decode": [self.read, self.decode],
                 "resize": [self.read, self.decode, lambda: self.assemble(False)],
                 "flip": [self.read, self.decode, lambda: self.assemble(True)]}[name]
        return lambda: [step() for step in steps]

    # the alternatives, each alone on the same windows

    def windows(self) -> list[tuple[bytes, tuple[int, int, int, int]]]:
        return [(bytes(j), tuple(w)) for p in self.prepared for j, w in zip(p.jpegs, p.geometry.window.tolist(),
                                                                             strict=True)]

    def alt_decoders(self) -> dict[str, tuple[Callable[[], None], str]]:
        import warnings

        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        import torch
        import torchvision.io as tio
        from nvidia.dali import pipeline_def
        from PIL import Image

        jpegs = [p.jpegs for p in self.prepared]
        batch = len(jpegs[0])

        def dali(decoder: Callable) -> Callable[[], None]:
            @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1, seed=0)
            def pipe():
                return decoder(fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1), fn, types)

            p = pipe()
            p.build()

            def run():
                for js in jpegs:
                    p.feed_input("jpegs", js)
                    p.schedule_run()
                    p.outputs()
            return run

        random_crop = dali(lambda j, fn, types: fn.decoders.image_random_crop(
            j, device="cpu", output_type=types.RGB, random_area=[0.2, 1.0], random_aspect_ratio=[0.75, 4 / 3]))
        full = dali(lambda j, fn, types: fn.decoders.image(j, device="cpu", output_type=types.RGB))
        data = [j.tobytes() for js in jpegs for j in js]
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]

        def pil():
            for d in data:
                with Image.open(io.BytesIO(d)) as im:
                    im.convert("RGB").load()

        def torchvision_decode():
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (for torchcodec): warns per call
                warnings.simplefilter("ignore", DeprecationWarning)
                for t in tensors:
                    tio.decode_jpeg(t, mode=tio.ImageReadMode.RGB)

        return {
            "alt 2: DALI image_random_crop": (random_crop, "the reference pipeline's crop-decode (its own windows)"),
            "alt 2: DALI full decode": (full, "decoders.image"),
            "alt 2: PIL full decode": (pil, "what the torch backend and the original recipe do"),
            "alt 2: torchvision decode_jpeg": (torchvision_decode, "full decode, libjpeg-turbo"),
        }

    def alt_resizers(self) -> dict[str, tuple[Callable[[], None], str]]:
        import torch
        import torch.nn.functional as F
        from PIL import Image

        size = self.loader.cfg.img_size
        crops = [c for cs in self.crops for c in cs]
        pils = [Image.fromarray(c) for c in crops]
        tensors = [torch.from_numpy(c) for c in crops]

        def pil():
            for im in pils:
                im.resize((size, size), Image.Resampling.BICUBIC)

        def interpolate():
            for t in tensors:
                y = F.interpolate(t.permute(2, 0, 1)[None], size=(size, size), mode="bicubic", antialias=True)
                y[0].permute(1, 2, 0).contiguous()

        return {
            "alt 3: PIL Image.resize(BICUBIC)": (pil, "the original recipe's resize"),
            "alt 3: F.interpolate (NCHW result)": (interpolate, "the same kernel without out=: repack + transpose"),
        }


def crop_stage_rows(data: str, batch_size: int, img_size: int, images: int, repeats: int) -> list[tuple[str, Timing,
                                                                                                         str]]:
    """(name, CPU seconds per image, note) of each crop-decode stage and alternative, one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = CropDecodeStages(data, batch_size, img_size, max(1, images // batch_size))
        calls = {name: (stages.stage(stage), "1 thread; images/s of one core") for stage, name in CROP_STAGES}
        calls.update({**stages.alt_decoders(), **stages.alt_resizers()})
        timings = cpu_interleaved({name: fn for name, (fn, _) in calls.items()}, 1, repeats)
        return [(name, per_image(timings[name], stages.images), note) for name, (_, note) in calls.items()]
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# the DALI reference pipeline


def dali_stage_pipeline(data: str, batch_size: int, img_size: int, stage: str):
    """The reference train pipeline up to `stage`, on one CPU thread with a synchronous executor (so CPU time per run
    is the cost of that run alone)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipeline.loaders.base import ShardSet

    shards = ShardSet.open(data)
    size = [img_size, img_size]

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0, exec_dynamic=False,
                  exec_pipelined=False, exec_async=False)
    def pipe():
        jpegs, labels = fn.readers.webdataset(
            paths=[str(p) for p in shards.tars], index_paths=[str(p) for p in shards.indexes],
            ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64], random_shuffle=True, initial_fill=256,
            pad_last_batch=True)
        if stage == "read":
            return labels
        if stage == "decode":
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.2, 1.0], random_aspect_ratio=[0.75, 4 / 3])
        if stage == "crop-decode":
            return images
        images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
        if stage == "resize":
            return images
        return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), output_layout="HWC", dtype=types.UINT8)

    p = pipe()
    p.build()
    return p


def dali_stage_ms(data: str, batch_size: int, img_size: int, images: int, repeats: int, stage: str) -> Timing:
    """CPU seconds per image of the reference pipeline up to `stage` (median over repeats of `images` images)."""
    pipe = dali_stage_pipeline(data, batch_size, img_size, stage)
    runs = max(1, images // batch_size)

    def call():
        for _ in range(runs):
            pipe.run()
    return per_image(cpu_per_call(call, warmup=1, repeats=repeats), runs * batch_size)
