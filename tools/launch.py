"""`./launch.sh PROTOCOL [--nproc N] [--dry-run] ARGS...`: start a training protocol on every GPU of every node.

    ./launch.sh pretrain --recipe supmae_vit_base_in1k_400ep --data /data/in1k --out runs/supmae400

Processes per node: --nproc N, else one per visible GPU, else 1 (CPU). Nodes: NNODES / NODE_RANK / MASTER_ADDR /
MASTER_PORT from the environment, or SLURM's variables inside `srun` (one task per node: this launcher starts
torchrun on each; one task per GPU: each task is a rank and runs the entry directly). A single process runs the
entry in the launcher's own process (no torchrun); several run under torchrun with its elastic agent.

The arguments are validated (the protocol's `check(argv)`) before any process starts. Pre-emption: SIGTERM and
SIGUSR1 reach every worker (torchrun forwards them), the workers checkpoint and exit 0, and so does the launcher.
Exit status (README "Exit codes"): 0 done, 1 the run's own verdict, 2 bad input or environment; under torchrun the
status of the rank that failed first (`worker_exit_status`).

Adding a protocol: one `Protocol` entry in PROTOCOLS naming the per-process module; the module provides
`main(argv) -> int` (run as `python -m MODULE ARGS`) and optionally `check(argv)` (validation, raises ValueError /
FileNotFoundError, SystemExit(0) for --help).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from train.distributed import DEFAULT_MASTER_PORT, expand_nodelist, slurm_master_port
from train.system.device import check_device


@dataclass(frozen=True)
class Protocol:
    module: str  # per-process entry, run as `python -m module`
    description: str


PROTOCOLS: dict[str, Protocol] = {
    "pretrain": Protocol("train.pretrain", "SupMAE / MAE pre-training"),
    "finetune": Protocol("train.eval.finetune", "fine-tune a pre-trained encoder (MAE protocol)"),
    "linprobe": Protocol("train.eval.linprobe", "linear probe on the frozen encoder (MAE protocol)"),
    "knn": Protocol("train.eval.knn", "weighted k-NN accuracy of the frozen encoder (DINO)"),
}

# Seconds torchrun's agent waits for workers to checkpoint and exit after a signal before killing them.
SHUTDOWN_TIMEOUT_S = 300
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")


@dataclass(frozen=True)
class LaunchPlan:
    """How to start the processes of this node."""

    mode: str  # "direct" (this process is the only rank, or SLURM made it one) | "torchrun"
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int | None
    source: str  # where the layout came from: "local", "env", "slurm"

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v.split("(")[0])  # SLURM writes counts like "8(x2)"
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def plan_launch(env: Mapping[str, str], visible_gpus: int, nproc: int | None = None) -> LaunchPlan:
    """The launch layout from the environment (pure: tested without GPUs or SLURM).

    Precedence: explicit NNODES (torchrun-style variables) > a SLURM step (srun) > this machine alone.
    """
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    local = nproc if nproc is not None else _int(env, "NPROC_PER_NODE", max(1, visible_gpus))
    if "NNODES" in env:
        nnodes = _int(env, "NNODES")
        node_rank = _int(env, "NODE_RANK", 0)
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"NNODES={nnodes} / NODE_RANK={node_rank}: need NNODES >= 1 and 0 <= NODE_RANK < NNODES")
        addr = env.get("MASTER_ADDR")
        if nnodes > 1 and not addr:
            raise ValueError("NNODES > 1 needs MASTER_ADDR (the host name or address of node 0)")
        port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
        mode = "torchrun" if nnodes * local > 1 else "direct"
        return LaunchPlan(mode, local, nnodes, node_rank, addr or "127.0.0.1", port, "env")
    # Inside srun (a job step); the batch script itself has the job's variables but no step ones.
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NUM_NODES" in env:
        nnodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        ntasks = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", nnodes))
        hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
        port = _int(env, "MASTER_PORT", slurm_master_port(env))
        if ntasks == nnodes:  # one task per node: torchrun starts the per-GPU processes
            mode = "torchrun" if nnodes * local > 1 else "direct"
            return LaunchPlan(mode, local, nnodes, _int(env, "SLURM_NODEID", 0), addr, port, "slurm")
        # One task per GPU: srun already made the processes; each is a rank (train.distributed reads SLURM_*).
        per_node = ntasks // nnodes
        return LaunchPlan("direct", per_node, nnodes, _int(env, "SLURM_NODEID", 0), addr, port, "slurm")
    if "SLURM_JOB_ID" in env and _int(env, "SLURM_NNODES", 1) > 1:
        raise ValueError(f"this SLURM job has {env['SLURM_NNODES']} nodes but the launcher runs outside srun: start "
                         "it with `srun --ntasks-per-node=1 ./launch.sh ...` (docs/training.md has an sbatch example)")
    mode = "torchrun" if local > 1 else "direct"
    return LaunchPlan(mode, local, 1, 0, "127.0.0.1", None, "local")


def torchrun_args(plan: LaunchPlan, module: str, argv: list[str]) -> list[str]:
    # SIGUSR1 (SLURM's early warning) joins the signals the agent forwards to the workers; left to its default
    # action it would kill the agent and strand the workers.
    args = [f"--nproc-per-node={plan.nproc_per_node}", "--max-restarts=0",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", f"--signals-to-handle={','.join(AGENT_SIGNALS)}"]
    if plan.nnodes == 1 and plan.master_port is None:
        args.append("--standalone")  # a free local port, no rendezvous set-up
    else:
        args += [f"--nnodes={plan.nnodes}", f"--node-rank={plan.node_rank}", f"--master-addr={plan.master_addr}",
                 f"--master-port={plan.master_port}"]
    return args + ["-m", module, *argv]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _split_launcher_options(argv: list[str]) -> tuple[int | None, bool, list[str]]:
    """Take --nproc N and --dry-run out of argv (everything else belongs to the protocol)."""
    nproc, dry, rest = None, False, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in a else 2
            try:
                nproc = int(value)
            except ValueError:
                raise ValueError(f"--nproc needs an integer, got {value!r}") from None
            continue
        if a == "--dry-run":
            dry = True
        else:
            rest.append(a)
        i += 1
    return nproc, dry, rest


def run_torchrun(args: list[str]) -> int:
    """torchrun in this process. On SIGTERM / SIGUSR1 its agent forwards the signal to the workers and waits for
    them (they checkpoint and exit 0), then raises SignalException here: the launcher then exits 0 too."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except SignalException as e:
        if e.sigval in (signal.SIGTERM, signal.SIGUSR1):
            print(f"launch: {e.sigval.name} forwarded to the workers, which checkpoint and exit", file=sys.stderr)
            return 0
        return 128 + int(e.sigval)
    except Exception as e:  # ChildFailedError: torchrun already printed the failing rank's error
        code, who = worker_exit_status(e)
        print(f"launch: {who}; exiting with status {code}", file=sys.stderr)
        return code
    return 0


def worker_exit_status(error: BaseException) -> tuple[int, str]:
    """(exit status, description) of a failed torchrun job: the status of the rank that failed first, so a
    rank's 2 (bad input or environment) or 1 (the run's verdict) is the launcher's; a rank killed by a signal
    gives 128 + the signal number, as a shell reports it."""
    get_first = getattr(error, "get_first_failure", None)
    if get_first is None:
        return 1, f"{type(error).__name__}: {error}"
    rank, failure = get_first()
    code = int(getattr(failure, "exitcode", 1) or 1)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer is the usual sender: check `dmesg`)" if -code == signal.SIGKILL else ""
        return 128 - code, f"rank {rank} was killed by {name}{hint}"
    return code, f"rank {rank} failed first, with exit status {code}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ./launch.sh PROTOCOL [--nproc N] [--dry-run] [ARGS...]\nprotocols:")
        for name, p in PROTOCOLS.items():
            print(f"  {name:<10} {p.description}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in PROTOCOLS:
        known = ", ".join(PROTOCOLS)
        print(f"launch: '{name}' is not available in this version (protocols: {known})", file=sys.stderr)
        return 2
    proto = PROTOCOLS[name]
    try:
        nproc, dry, rest = _split_launcher_options(rest)
        module = importlib.import_module(proto.module)
        cfg = module.check(rest) if hasattr(module, "check") else None
        # A GPU torch cannot use stops the run here, once, before any process starts (train.system.device).
        device = getattr(cfg, "device", "auto")
        check_device(device)
        # --device cpu is one process per node unless --nproc says otherwise, whatever GPUs the node has.
        plan = plan_launch(os.environ, 0 if device == "cpu" else _visible_gpus(), nproc)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    if plan.mode == "direct":
        cmd = [sys.executable, "-m", proto.module, *rest]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(plan, proto.module, rest)]
    print(f"launch: {name} on {plan.nnodes} node(s) x {plan.nproc_per_node} process(es) [{plan.source}, "
          f"{plan.mode}]" + (f", node {plan.node_rank}, master {plan.master_addr}:{plan.master_port}"
                             if plan.nnodes > 1 else ""), file=sys.stderr)
    if dry:
        print(" ".join(cmd))
        return 0
    if plan.mode == "direct":
        # The one rank runs in this process (already imported, and signals reach it directly).
        return module.main(rest)
    return run_torchrun(cmd[3:])


if __name__ == "__main__":
    sys.exit(main())
