"""`python -m tools.install plan|install|bundle ...`: the Python half of `./launch.sh setup` and
`./launch.sh bundle` (launch.sh passes --pyproject, --stamp and --key; see tools/install/__init__.py).

    plan     [--offline BUNDLE] [--fresh] [--json]    what a set-up would install here, installing nothing
    install  --stamp FILE --key KEY [--offline BUNDLE]  install it into this interpreter's environment
    bundle   OUT [--python 3.11] [--torch-cuda 126|128|130|cpu] [--dali-cuda 120|130] [--part-size 60M]
             [--arch x86_64]                            a wheelhouse for a machine without internet

Exit status: 0 done, 1 pip failed (its messages are above), 2 nothing can be chosen or the bundle is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

from tools.install.bundle import BundleError, Target, make_bundle, open_bundle, parse_size, read_manifest
from tools.install.installer import (
    PipError,
    install,
    pip_command,
    read_stamp,
    remove_stamp,
    run_pip,
    up_to_date,
    write_stamp,
)
from tools.install.plan import Plan, make_plan, python_version, supported_pythons
from train.system.builds import TORCH_BUILDS, PlanError, build_by_key
from train.system.nvidia import NvidiaInfo, detect_nvidia

PROG = "launch.sh"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bundle_plan(pyproject: Path, bundle: Path, nvidia: NvidiaInfo) -> tuple[Plan, dict]:
    """The plan of an offline set-up: the bundle's builds, refused when the bundle was made for other dependencies."""
    manifest = read_manifest(bundle)
    target = Target.from_dict(manifest["target"])
    plan = make_plan(pyproject, nvidia, os.environ, torch_build=target.torch, dali_build=target.dali)
    if list(plan.requirements) != manifest.get("requirements"):
        have, want = set(manifest.get("requirements") or []), set(plan.requirements)
        raise BundleError(f"{bundle} was made for other dependencies than pyproject.toml lists now (only in the "
                          f"bundle: {sorted(have - want)}; only in pyproject.toml: {sorted(want - have)}): make a "
                          "new bundle with ./launch.sh bundle")
    return plan, manifest


def cmd_plan(args: argparse.Namespace) -> int:
    nvidia = detect_nvidia()
    if args.offline:
        plan, _ = _bundle_plan(args.pyproject, args.offline, nvidia)
    else:
        plan = make_plan(args.pyproject, nvidia, os.environ, fresh=args.fresh)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"{PROG}: set-up plan (nothing installed)\n{plan.describe()}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    nvidia = detect_nvidia()
    pip = pip_command()
    if args.offline:
        plan, manifest = _bundle_plan(args.pyproject, args.offline, nvidia)
        with tempfile.TemporaryDirectory(prefix="supmae-bundle-") as work:
            manifest, wheels = open_bundle(args.offline, Path(work), plan.python, platform.machine())
            say(f"{PROG}: bundle {args.offline} checked: {len(manifest['files'])} wheels"
                + (f" from {len(manifest['parts'])} parts" if manifest.get("parts") else ""))
            say(f"{PROG}: installing into {sys.prefix} with no network\n{plan.describe()}")
            remove_stamp(args.stamp)
            install(plan, pip, wheels, say)
        write_stamp(args.stamp, args.key, plan, f"bundle {args.offline.resolve()}")
        say(f"{PROG}: set-up complete (offline)")
        return 0
    plan = make_plan(args.pyproject, nvidia, os.environ)
    if up_to_date(read_stamp(args.stamp), args.key, plan):
        say(f"{PROG}: {sys.prefix} is up to date (torch {plan.torch.build.tag}, {plan.dali.build.dali_package})")
        return 0
    first = plan.installed == (None, None)
    say(f"{PROG}: installing into {sys.prefix}" + ("; the first time takes a few minutes (about 6 GB)" if first
                                                   else "") + f"\n{plan.describe()}")
    remove_stamp(args.stamp)
    try:
        install(plan, pip, None, say)
    except PipError:
        say(f"{PROG}: the installation failed (pip's messages above). Without internet here, make a bundle on a "
            "machine with it (./launch.sh bundle OUT) and run ./launch.sh setup --offline OUT")
        raise
    write_stamp(args.stamp, args.key, plan, "online")
    say(f"{PROG}: set-up complete")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    low, end = supported_pythons(args.pyproject)
    m = re.fullmatch(r"(\d+)\.(\d+)", args.python)
    if not m or not low <= (int(m.group(1)), int(m.group(2))) < end:
        raise PlanError(f"--python {args.python}: give a version from {low[0]}.{low[1]} up to, not including, "
                        f"{end[0]}.{end[1]} (pyproject.toml's requires-python)")
    torch = build_by_key("torch", args.torch_cuda)
    dali = build_by_key("dali", args.dali_cuda or ("130" if torch.cuda is None or torch.cuda >= (13, 0) else "120"))
    target = Target(args.python, args.arch, torch, dali)
    plan = make_plan(args.pyproject, NvidiaInfo(), {}, fresh=True, torch_build=torch, dali_build=dali,
                     python=args.python)
    part_size = parse_size(args.part_size) if args.part_size else None
    say(f"{PROG}: downloading the wheels for Python {target.python} on {target.arch}: torch {torch.describe()}, "
        f"{dali.dali_package}")
    pip = pip_command()
    make_bundle(args.out, plan, target, pip, lambda cmd: run_pip([], cmd), part_size, say=say)
    say(f"{PROG}: copy {args.out} to the machine without internet and run there: "
        f"./launch.sh setup --offline {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.install", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[2] / "pyproject.toml")
    sp = sub.add_parser("plan", parents=[common], help="what a set-up would install here")
    sp.add_argument("--offline", type=Path, metavar="BUNDLE")
    sp.add_argument("--fresh", action="store_true", help="as for a new .venv (ignore what is installed)")
    sp.add_argument("--json", action="store_true")
    sp = sub.add_parser("install", parents=[common], help="install into this interpreter's environment")
    sp.add_argument("--stamp", type=Path, required=True)
    sp.add_argument("--key", required=True)
    sp.add_argument("--offline", type=Path, metavar="BUNDLE")
    sp = sub.add_parser("bundle", parents=[common], help="a wheelhouse for a machine without internet",
                        prog="./launch.sh bundle")
    sp.add_argument("out", type=Path, metavar="OUT")
    sp.add_argument("--python", default=python_version(), help="the target's Python (default: %(default)s)")
    sp.add_argument("--torch-cuda", default="130", choices=[b.key for b in TORCH_BUILDS],
                    help="torch build: the driver CUDA version it needs (default 130 = PyPI's build)")
    sp.add_argument("--dali-cuda", default=None, choices=("120", "130"),
                    help="DALI build (default: 130 with torch 130 or cpu, else 120)")
    sp.add_argument("--part-size", default=None, metavar="SIZE",
                    help="split into parts of at most SIZE (60M, 2G, 500MB) for transfers with size limits")
    sp.add_argument("--arch", default=platform.machine(), choices=("x86_64", "aarch64"),
                    help="the target's architecture (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"plan": cmd_plan, "install": cmd_install, "bundle": cmd_bundle}[args.command](args)
    except (PlanError, BundleError) as e:
        say(f"{PROG}: error: {e}")
        return 2
    except PipError as e:
        say(f"{PROG}: error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
