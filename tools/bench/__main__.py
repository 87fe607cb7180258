"""`./launch.sh bench SUBCOMMAND [options]`: throughput and compute-to-accuracy benchmarks.

Each subcommand lives in `tools/bench/<name>.py` and provides:
    DESCRIPTION: str
    add_arguments(parser)            its own options (the common ones below are added here)
    run(args) -> BenchReport         turns args into its typed config first thing, measures, returns the report
    TIMED = False                    optional: it measures no time, so --warmup / --repeats are refused
    device_of(args) -> str | None    optional: the device it measures on ("auto", "cpu", "cuda[:N]"), None = none;
                                     default: its --device option, "auto" when it has none or leaves it unset
Modules are imported only when chosen, so e.g. `bench kernels` works on a machine without DALI. A machine whose
GPUs torch cannot use stops a benchmark on "auto" before it measures anything (train.system.device). Bad arguments
and inputs (a missing folder, a file that is not a shard folder, an impossible setting) are reported as one
`bench NAME: error: ...` line with exit status 2, like the other commands; --json / --markdown places that cannot
be written are among them, found before anything is measured.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from pipeline.fileio import folder_problem

SUBCOMMANDS = {
    "pipeline": "data pipeline images/s: DALI vs torch backend vs the original ImageFolder recipe",
    "model": "training-step images/s, TFLOP/s, MFU, memory on synthetic input",
    "kernels": "fused Triton masking kernels vs reference ops, and the whole training step",
    "e2e": "the real training loop on real shards: images/s, data-wait %, ratio to `model`",
    "shard": "sharding throughput vs plain tar copy and decode+encode cost",
    "trainer_overhead": "the trainer's real loop vs a bare loop over the same step (overhead must stay under 5%)",
    "compute": "compute-to-accuracy: SupMAE vs MAE (runs a matched comparison or reads run folders)",
    "memory": "GPU memory per model and per-GPU batch (computed; measured too on a GPU)",
    "mixing": "data-order mixing: the loaders' shuffle buffer vs a full permutation (sample indices only)",
}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common benchmark options")
    g.add_argument("--json", metavar="FILE", help="write the result as JSON")
    g.add_argument("--markdown", metavar="FILE", help="write the result as a Markdown table")
    g.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations (default: per benchmark)")
    g.add_argument("--repeats", type=int, default=None, help="timed repeats; the median is reported (default: per benchmark)")


def check_common_arguments(args: argparse.Namespace, timed: bool = True) -> None:
    """ValueError for common options that cannot work, before a benchmark spends minutes measuring: --warmup < 0,
    --repeats < 1, either of them for a benchmark that times nothing, a --json / --markdown file that cannot be
    written (a folder, or inside a file or a read-only folder)."""
    given = [f"--{k}" for k in ("warmup", "repeats") if getattr(args, k) is not None]
    if given and not timed:
        raise ValueError(f"{' and '.join(given)} {'do' if len(given) > 1 else 'does'} not apply: this benchmark "
                         "times nothing")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} is invalid: must be an integer >= 0")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} is invalid: must be an integer >= 1")
    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            problem = f"{path} is a folder" if Path(path).is_dir() else folder_problem(Path(path).parent)
            if problem:
                raise ValueError(f"{option} {path}: {problem}; choose another file")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="./launch.sh bench",
        description="Benchmarks. Every subcommand warms up, repeats, reports median and spread with the machine description.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {k:<9} {v}" for k, v in SUBCOMMANDS.items()),
    )
    top.add_argument("subcommand", choices=list(SUBCOMMANDS), metavar="SUBCOMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        top.error(f"unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(f"tools.bench.{name}")
    parser = argparse.ArgumentParser(prog=f"./launch.sh bench {name}", description=module.DESCRIPTION)
    module.add_arguments(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv[1:])  # argument errors: usage + "error: ..." and exit status 2
    try:
        check_common_arguments(args, timed=getattr(module, "TIMED", True))
    except ValueError as e:
        print(f"bench {name}: error: {e}", file=sys.stderr)
        return 2
    device = module.device_of(args) if hasattr(module, "device_of") else (getattr(args, "device", None) or "auto")
    if device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        print(f"bench {name}: error: --device {device} is invalid: must be auto, cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    if device is not None:
        from train.system.device import DeviceError, check_device

        try:
            check_device("cuda" if device.startswith("cuda") else device)
        except DeviceError as e:
            print(f"bench {name}: error: {e}", file=sys.stderr)
            return 2
    try:
        report = module.run(args)
        report.print()
        report.write(json_path=args.json, markdown_path=args.markdown)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:  # bad input: no traceback
        print(f"bench {name}: error: {str(e).removeprefix(f'bench {name}: ')}", file=sys.stderr)
        return 2
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
