"""Processes and ranks: process-group set-up from torchrun's or SLURM's environment, collectives on Python objects,
RNG state, and the pre-emption signal that every rank must agree on.

Environments understood (first match wins):
  * torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
  * srun with one task per GPU: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE; MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST and MASTER_PORT to a
    port derived from SLURM_JOB_ID (so concurrent jobs on a node do not collide).
  * nothing: one process.
NCCL on GPUs, gloo on CPUs. A second, gloo, group carries the small host-side control messages (stop flags) so
they never wait behind GPU work.

SUPMAE_PROCESS_GROUP=1 makes even a single process join a process group (world size 1, MASTER_ADDR / MASTER_PORT
defaulting to a free local port), so that one GPU runs the multi-process code path: NCCL, the trainer's DDP
wrapper, the collectives (tools/gpu_check.sh uses it).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.system.device import check_device

DEFAULT_MASTER_PORT = 29500
FORCE_GROUP_ENV = "SUPMAE_PROCESS_GROUP"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is in use (world size > 1, or 1 with SUPMAE_PROCESS_GROUP=1): DDP and collectives."""
        return self.backend is not None


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None


def expand_nodelist(nodelist: str, scontrol: bool = True) -> list[str]:
    """SLURM's compressed host list -> host names, in SLURM's order.

    `scontrol show hostnames` (the reference) when it is on the PATH; otherwise, or when it fails, the built-in
    parser: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5, and several bracket groups in one name expand
    as their product, "rack[1-2]-gpu[01-02]" -> rack1-gpu01 rack1-gpu02 rack2-gpu01 rack2-gpu02.
    """
    if not nodelist:
        return []
    if scontrol and shutil.which("scontrol"):
        try:
            # An argument vector, no shell: the list is passed as one argument whatever it contains.
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol (no slurm.conf on this host, ...): parse it here
    return [host for pattern in _split_top_level(nodelist) for host in _expand_host_pattern(pattern)]


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets: "a[1,3],b" -> ["a[1,3]", "b"]."""
    parts, depth, current = [], 0, ""
    for ch in nodelist:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _expand_host_pattern(pattern: str) -> list[str]:
    """One host pattern with any number of bracket groups -> the product of their ranges."""
    pieces = re.split(r"\[([^\]]*)\]", pattern)  # text, ranges, text, ranges, ..., text
    choices: list[list[str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            choices.append([piece])
            continue
        values = []
        for part in piece.split(","):
            lo, _, hi = part.strip().partition("-")
            if not hi:
                values.append(lo)
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"SLURM node list {pattern!r}: cannot read the range {part!r}")
            values.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
        choices.append(values)
    return ["".join(combo) for combo in itertools.product(*choices)]


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port in [20000, 30000) derived from the job id: the same on every node of a job, different across jobs."""
    job = env.get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 10000 if job.isdigit() else DEFAULT_MASTER_PORT


def rank_info(env: Mapping[str, str]) -> RankInfo:
    """Rank layout from torchrun's variables, else from an srun task's, else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return RankInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                        int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR"),
                        int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    # An srun step with several tasks (the batch script itself also carries SLURM_PROCID / SLURM_NTASKS, but is
    # one process: the step variables tell the two apart).
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "1"))
        m = re.match(r"\d+", per_node)
        local_world = int(m.group(0)) if m else 1
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        addr = env.get("MASTER_ADDR") or (nodes[0] if nodes else None)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_master_port(env)
        return RankInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world, addr, port)
    return RankInfo(0, 1, 0, 1, None, None)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU when CUDA is available, else the CPU. Raises DeviceError (a ValueError) for
    "cuda" without a usable GPU, and for "auto" on a machine whose GPUs torch cannot use (train.system.device)."""
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


_CONTROL_GROUP: Any = None


def init_distributed(device: str = "auto", env: Mapping[str, str] | None = None,
                     timeout: timedelta = timedelta(minutes=30)) -> DistEnv:
    """Join the job described by the environment (see module doc); a single process needs no process group."""
    global _CONTROL_GROUP
    environ = os.environ if env is None else env
    info = rank_info(environ)
    dev = resolve_device(device, info.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.world_size == 1:
        if environ.get(FORCE_GROUP_ENV) != "1":
            return DistEnv(device=dev)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if info.master_addr:
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
    if info.master_port:
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("distributed run without MASTER_ADDR: launch through ./launch.sh (torchrun) or srun")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = dict(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # eager NCCL init, bound to this GPU
        dist.init_process_group(init_method="env://", **kwargs)
    # Control messages get their own gloo group even on a gloo job, so they never queue behind gradients.
    _CONTROL_GROUP = dist.new_group(backend="gloo")
    return DistEnv(info.rank, info.world_size, info.local_rank, info.local_world_size, dev, backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_distributed() -> None:
    global _CONTROL_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def control_group() -> Any:
    return _CONTROL_GROUP


# ------------------------------------------------------------------------------------------------------------------
# Collectives on host objects (rare: checkpoints, start-up). Single-process runs skip them.


def gather_objects(obj: Any, env: DistEnv) -> list[Any] | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (over the gloo control group)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0, group=_CONTROL_GROUP)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL_GROUP)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=_CONTROL_GROUP)


# ------------------------------------------------------------------------------------------------------------------
# RNG


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s per-step randomness (masking): distinct per rank so replicas mask differently."""
    return (seed * 1_000_003 + rank * 7919 + 1) % 2**63


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (CPU, and `device`'s if it is a GPU) in types `torch.load(weights_only=True)`
    accepts. Only this process's own GPU: touching the others would create a CUDA context on each of them."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    # A checkpoint from a CPU run has no GPU state: the GPU keeps its seeded stream (no resume across device kinds
    # is bitwise anyway).
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------------------------
# Pre-emption: SIGTERM / SIGUSR1 ask for a checkpoint and a clean exit; all ranks must stop after the same step.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Turns SIGTERM / SIGUSR1 into a stop that every rank agrees on without blocking the training loop.

    A signal only sets a local flag. Each step the local flag goes into an asynchronous MAX all-reduce over the
    gloo control group; the result is collected one step later (long finished by then). Every rank reads the
    same reduction, so they all stop after the same step. One process needs no collective.
    """

    def __init__(self, env: DistEnv, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.env = env
        self.received: signal.Signals | None = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._work is not None:
            self._work.wait()
            self._work = None

    def agreed(self) -> bool:
        """Whether any rank received a stop signal, now (a blocking all-reduce; between units of work such as the
        checkpoints of `--all-checkpoints`, not per step)."""
        if not self.env.distributed:
            return self.received is not None
        if self._work is not None:
            self._work.wait()
            self._work = None
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
        return bool(flag.item())

    def poll(self) -> bool:
        """Called once per step on every rank: True when all ranks must stop now."""
        if not self.env.distributed:
            return self.received is not None
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._flag.item())  # a host tensor of the gloo group: no device sync
        self._flag.fill_(1 if self.received is not None else 0)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP, async_op=True)
        return stop
