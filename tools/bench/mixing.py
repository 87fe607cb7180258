"""`./launch.sh bench mixing`: how well the training order mixes the data, on sample indices (nothing is read).

    ./launch.sh bench mixing                                   # ImageNet-1k, 1,000-image shards, 8 ranks x 512
    ./launch.sh bench mixing --samples 50000 --world 1 --batch 256 --buffers 512,2048,8192

For each shuffle buffer, the loaders' order (shard order reshuffled per epoch, contiguous rank ranges, buffer
shuffle: pipeline/loaders/mixing.py) against a full random permutation: distinct shards per rank batch and per
step, and the share of sample pairs sharing a batch (a step) that share one again the next epoch.
"""

from __future__ import annotations

import argparse

from pipeline.loaders.base import DEFAULT_SHUFFLE_BUFFER
from pipeline.loaders.mixing import IMAGENET_SAMPLE_KB, MixingSetup, measure
from tools.bench.report import BenchReport, int_list

TIMED = False  # computed, not timed: --warmup / --repeats do not apply
DESCRIPTION = "data-order mixing of the loaders' shuffle buffer vs a full permutation (sample indices only)"
COLUMNS = ["order", "buffer", "buffer MB / rank", "shards / batch", "shards / step", "rebatch (rank)",
           "rebatch (step)", "rebatch x permutation (rank)", "rebatch x permutation (step)"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=1_281_167, help="samples in the data set (default: ImageNet-1k)")
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per shard (the sharding tool's default)")
    p.add_argument("--world", type=int, default=8, help="ranks (GPUs)")
    p.add_argument("--batch", type=int, default=512, help="batch per rank")
    p.add_argument("--buffers", default=f"1024,4096,{DEFAULT_SHUFFLE_BUFFER},16384",
                   help="shuffle buffer sizes to compare, comma-separated")
    p.add_argument("--epochs", type=int, default=3, help="epochs simulated (re-meeting is averaged over pairs of)")
    p.add_argument("--sample-kb", type=float, default=IMAGENET_SAMPLE_KB,
                   help="mean encoded sample size for the buffer's memory (default: ImageNet's JPEGs)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> BenchReport:
    buffers = list(int_list(args.buffers, "--buffers", "1024,8192"))
    if not args.sample_kb > 0:
        raise ValueError(f"--sample-kb {args.sample_kb} is invalid: must be a number > 0")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} is invalid: must be an integer >= 0")
    common = dict(num_samples=args.samples, shard_samples=args.shard_samples, world_size=args.world,
                  batch_size=args.batch, epochs=args.epochs, seed=args.seed)
    perm = measure(MixingSetup(**common, buffer=1, order="permutation"))  # bad settings: ValueError, one line
    results = [perm] + [measure(MixingSetup(**common, buffer=b)) for b in buffers]
    report = BenchReport("bench mixing", COLUMNS, settings={**common, "buffers": buffers,
                                                            "sample_kb": args.sample_kb})
    for m in results:
        reader = m.setup.order == "reader"
        report.add_row(**{
            "order": "shards + buffer" if reader else "full permutation", "buffer": m.setup.buffer if reader else None,
            "buffer MB / rank": m.buffer_mb(args.sample_kb) if reader else None,
            "shards / batch": m.shards_per_batch, "shards / step": m.shards_per_step,
            "rebatch (rank)": m.rebatch, "rebatch (step)": m.rebatch_step,
            "rebatch x permutation (rank)": m.rebatch / perm.rebatch if perm.rebatch else None,
            "rebatch x permutation (step)": m.rebatch_step / perm.rebatch_step if perm.rebatch_step else None})
    report.notes.append(f"{perm.batches_per_epoch} batches per rank per epoch; a full permutation's expected "
                        f"rebatch (rank) is (B - 1) / (N - 1) = {perm.permutation_rebatch:.2e}. The loaders' "
                        f"default buffer is {DEFAULT_SHUFFLE_BUFFER} (--shuffle-buffer).")
    return report
