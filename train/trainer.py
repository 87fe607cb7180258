"""The training loop of every protocol: `Trainer.train_step` (one optimiser step) and `Trainer.train` (epochs,
logging, checkpoints, pre-emption, evaluation), with one `state_dict` that holds everything an exact resume needs.

What is trained is a `train.task.Task`: it owns the model, computes the loss and the logged numbers of a batch,
builds the optimiser and evaluates (MaskedAutoencoderTask for pre-training, FinetuneTask, LinearProbeTask). The
loop, its accounting and its files are the same for all of them.

Hot-path rules (the original MAE loop synced the host every step; this one does not; `--sync-check` makes any host
sync outside the exempt places below an error on CUDA):
  * losses, gradient norms and non-finite counts accumulate in device tensors and are read once per log
    interval (one all-reduce + one host copy);
  * a non-finite step is skipped on the device, never by a host `if`: by the fused AdamW (`found_inf`), or for
    optimisers without that protocol (LARS) by putting the parameters and optimiser state back with `torch.where`,
    also in fp16 (where GradScaler.step would read its overflow flag on the host);
  * the stop request of SIGTERM / SIGUSR1 is agreed on through an asynchronous gloo all-reduce of a host flag;
  * the learning rate is a host float computed from the step counter;
  * log intervals, checkpoints and evaluations read device values by design (`_exempt_from_sync_check`).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.mae import MaskedAutoencoderViT
from pipeline.fileio import DiskFullError, atomic_path
from pipeline.loaders.base import Batch, Loader
from pipeline.shards.shard_format import ShardFormatError
from train.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    prune_checkpoints,
    save_checkpoint,
)
from train.config import LoopConfig
from train.distributed import DistEnv, StopRequest, control_group, gather_objects, rng_state, set_rng_state
from train.hardware import peak_tflops
from train.metrics import IntervalNumbers, RunLog, eval_record, peak_memory_gb, train_record
from train.optim import CosineSchedule, skip_if
from train.task import MaskedAutoencoderTask, Task

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NO_BAD_STEP = 2**62
BEST_NAME = "best.pt"  # OUT/checkpoints/best.pt: the checkpoint of the best evaluation (never pruned or resumed)


class NonFiniteError(RuntimeError):
    """More non-finite steps than --skip-nonfinite allows; raised after the checkpoint is written."""

    def __init__(self, message: str, first_step: int, count: int, checkpoint: Path | None):
        super().__init__(message)
        self.first_step, self.count, self.checkpoint = first_step, count, checkpoint


@dataclass(frozen=True)
class TrainResult:
    status: str  # "completed" (schedule done), "max_steps", "preempted" (signal)
    step: int
    epoch: int
    checkpoint: Path | None


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 autocast on CUDA, fp32 on the CPU (CPU autocast works, but is slower than fp32 there)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_compile(compile: str, device: torch.device) -> bool:
    return compile == "on" or (compile == "auto" and device.type == "cuda")


def configure_tf32(enabled: bool, device: torch.device) -> bool:
    """TF32 tensor-core matmuls for fp32 on CUDA (torch's float32 matmul precision "high"), or IEEE fp32 matmuls
    ("highest"). Process-wide; it matters for `--precision fp32`, where every matmul is fp32 (under bf16 / fp16
    autocast only the few fp32 matmuls left outside it). Returns whether TF32 is in use; the CPU is left alone."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return enabled


def _exempt_from_sync_check(method):
    """The places that read device values by design (log intervals, checkpoints, evaluations) run with CUDA's sync
    debug mode off, so that `--sync-check` only catches host syncs in the hot path."""

    @functools.wraps(method)
    def exempt(self, *args, **kwargs):
        if self.device.type != "cuda" or torch.cuda.get_sync_debug_mode() == 0:
            return method(self, *args, **kwargs)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    return exempt


@dataclass
class Compute:
    """Cumulative work behind the current weights (checkpointed; a resumed run continues from these)."""

    images: int = 0
    seconds: float = 0.0  # wall seconds of training (x world_size = device-seconds)
    nonfinite_steps: int = 0


class Trainer:
    """One process's share of a training run.

    task: what is trained (train.task.Task); a bare MaskedAutoencoderViT is trained as MaskedAutoencoderTask with
    cfg's mask ratio and AdamW settings. The trainer moves the task's model to the device and wraps it with DDP /
    compile. cfg: the loop settings (train.config.LoopConfig: TrainConfig, FinetuneConfig, LinprobeConfig).
    loader: this rank's training loader (pipeline.loaders.base protocol). eval_loader: held-out data for the task's
    evaluation (optional). log: rank 0's RunLog (None = record nothing, e.g. benchmarks).
    """

    def __init__(self, cfg: LoopConfig, task: Task | MaskedAutoencoderViT, loader: Loader, env: DistEnv | None = None,
                 eval_loader: Loader | None = None, log: RunLog | None = None, run_config: dict | None = None):
        if not isinstance(task, Task):
            task = MaskedAutoencoderTask(task, cfg.mask_ratio, cfg.weight_decay, cfg.betas)
        self.task = task
        self.cfg = cfg
        self.env = env or DistEnv()
        self.device = self.env.device
        self.loader = loader
        self.eval_loader = eval_loader
        self.log = log
        if run_config is None:
            run_config = {"train": cfg.to_dict()}
            if hasattr(task.model, "cfg"):
                run_config["model"] = task.model.cfg.to_dict()
        self.run_config = run_config
        self.precision = resolve_precision(cfg.precision, self.device)
        self.amp_dtype = DTYPES[self.precision]
        self.tf32 = configure_tf32(cfg.tf32, self.device)
        self.compiled = resolve_compile(cfg.compile, self.device)

        if cfg.sync_bn and self.env.distributed and self.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs: SyncBatchNorm has no CPU implementation")
        task.model.to(self.device)
        task.setup(self.env, cfg.sync_bn)
        self.model = task.model
        self.model.train()
        self.ddp: DistributedDataParallel | None = None
        forward: nn.Module = self.model
        if self.env.distributed:
            # Every parameter is used every step: no unused-parameter search. Gradients live in the buckets.
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=False, gradient_as_bucket_view=True,
            )
            forward = self.ddp
        self.forward = torch.compile(forward) if self.compiled else forward

        self.world_size = self.env.world_size
        self.steps_per_epoch = loader.batches_per_epoch // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"{loader.batches_per_epoch} batches per epoch per process cannot make one step of "
                             f"--accum-steps {cfg.accum_steps}; lower --batch-size or --accum-steps")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.peak_lr = cfg.peak_lr(self.world_size)
        self.schedule = CosineSchedule(self.peak_lr, min(cfg.min_lr, self.peak_lr),
                                       round(cfg.warmup_epochs * self.steps_per_epoch), self.total_steps)
        self.optimizer = task.build_optimizer(self.peak_lr)
        # Fused optimisers skip a step on the device through `found_inf` (the protocol GradScaler uses with them).
        self._skips_on_device = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # BatchNorm running statistics change in the forward pass, before anyone knows whether the step is
        # finite: they are snapshotted and put back on the device when the step is skipped.
        norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        self._bn_buffers = [b for m in self.model.modules() if isinstance(m, norms)
                            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._bn_snapshot = [b.clone() for b in self._bn_buffers]
        self.flops_per_image = task.train_flops_per_image()
        self.peak_tflops = peak_tflops(self.device, self.amp_dtype, tf32=self.tf32)

        self.step = 0
        self.compute = Compute()
        self.last_checkpoint: Path | None = None
        self._saved_step = -1  # step of the newest checkpoint of this state (-1: none)
        self._lr = self.schedule(0)
        self._reset_device_accumulators()
        self._interval_step0 = 0  # step of the previous log record: the current record averages the steps since
        self._step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._clock = lambda: self.compute.seconds
        self._restart_rate_window()
        # Called on rank 0 after every checkpoint write, with the trainer and the file (e.g. reconstruction
        # pictures); their time is excluded from the images/s window like the write's.
        self.checkpoint_hooks: list[Callable[[Trainer, Path], None]] = []

    # ------------------------------------------------------------------------------------------------------------
    # One step

    def _reset_device_accumulators(self) -> None:
        dev = self.device
        # [the task's logged numbers (loss first)..., finite micro-batches, grad-norm sum, finite steps]
        self._sums = torch.zeros(len(self.task.logged) + 3, dtype=torch.float64, device=dev)
        self._bad_count = torch.zeros((), dtype=torch.int64, device=dev)
        self._first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=dev)

    @property
    def numerics(self) -> str:
        """The precision in words for the start-up log, e.g. "bf16" or "fp32, TF32 matmuls"."""
        if self.device.type != "cuda":
            return self.precision
        return f"{self.precision}, {'TF32' if self.tf32 else 'IEEE fp32'} matmuls"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of this run's forward passes (none in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _set_lr(self, lr: float) -> None:
        # A param group's "lr_scale" (layer-wise decay of fine-tuning) scales the schedule's value.
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def train_step(self, batches: Sequence[Batch]) -> None:
        """One optimiser step over `batches` (accum_steps micro-batches). Never reads a device value."""
        cfg = self.cfg
        k = len(self.task.logged)
        self._lr = self.schedule(self.step)
        self._set_lr(self._lr)
        n = len(batches)
        loss_fail = torch.zeros((), dtype=torch.bool, device=self.device)
        for saved, buf in zip(self._bn_snapshot, self._bn_buffers, strict=True):
            saved.copy_(buf)
        for i, b in enumerate(batches):
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if (self.ddp is None or i == n - 1) else self.ddp.no_sync()
            with sync:
                with self.autocast():
                    loss, logged = self.task.forward_loss(self.forward, b, self.device)
                loss = loss / n
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            vals = logged.detach().double()
            finite = torch.isfinite(vals).all()
            self._sums[:k] += torch.where(finite, vals, 0.0)
            self._sums[k] += finite
            loss_fail |= ~finite

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.clip_grad, gnorm, foreach=True)
        bad = ~torch.isfinite(gnorm)
        if self.scaler is not None:
            # fp16: the scaler skips overflowing steps (normal while it calibrates); a non-finite *loss* is the
            # failure that counts against --skip-nonfinite. GradScaler.step reads found_inf on the host for
            # optimisers without the found_inf protocol (LARS): those skip on the device here instead (the gradients
            # are unscaled, so `bad` is the scaler's overflow), and update() backs the scale off from its own record.
            if self._skips_on_device:
                self.scaler.step(self.optimizer)
            else:
                self._step_unless(bad)
            self.scaler.update()
            fail = loss_fail
        elif self._skips_on_device:
            skip_if(self.optimizer, bad.float())
            self.optimizer.step()
            fail = bad  # identical on every rank: the gradients were all-reduced
        else:
            self._step_unless(bad)
            fail = bad
        self.optimizer.zero_grad(set_to_none=True)
        for buf, saved in zip(self._bn_buffers, self._bn_snapshot, strict=True):
            buf.copy_(torch.where(bad, saved, buf))
        self.task.after_step()

        self._sums[k + 1] += torch.where(bad, 0.0, gnorm.double())
        self._sums[k + 2] += ~bad
        self._bad_count += fail
        self._first_bad = torch.where(fail & (self._first_bad == _NO_BAD_STEP), self._step_t, self._first_bad)
        self._step_t += 1
        self.step += 1
        self.compute.images += sum(b.num_valid for b in batches) * self.world_size

    def _step_unless(self, bad: torch.Tensor) -> None:
        """`optimizer.step()`, undone on the device where `bad` (0-d bool) for optimisers without `found_inf`:
        parameters and tensor state are put back (state created by this step is zeroed, which for momentum
        buffers equals "not created yet"). Copies every trainable tensor: meant for small ones (probe heads)."""
        saved = [p.detach().clone() for p in self.params]
        state = self.optimizer.state
        saved_state = {id(p): {k: v.clone() for k, v in state[p].items() if torch.is_tensor(v)}
                       for p in self.params if p in state}
        self.optimizer.step()
        with torch.no_grad():
            for p, old in zip(self.params, saved, strict=True):
                p.copy_(torch.where(bad, old, p))
                before = saved_state.get(id(p), {})
                for key, value in state.get(p, {}).items():
                    if torch.is_tensor(value):
                        old_value = before.get(key)
                        value.copy_(torch.where(bad, old_value if old_value is not None else 0, value))

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _micro_batches(self) -> Iterator[list[Batch]]:
        """The rest of the loader's current epoch in groups of accum_steps; a last incomplete group is read and
        dropped so the loader's epoch ends together with the epoch's last step."""
        group: list[Batch] = []
        for b in self.loader:
            group.append(b)
            if len(group) == self.cfg.accum_steps:
                yield group
                group = []

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log.message(text)

    def _start_clock(self) -> None:
        t0, base = time.monotonic(), self.compute.seconds
        self._clock = lambda: base + (time.monotonic() - t0)
        self._restart_rate_window()

    def _restart_rate_window(self) -> None:
        self._rate_t0 = time.monotonic()
        self._rate_excluded = 0.0  # seconds of checkpoint writes and evaluations inside the window
        self._rate_step0 = self.step
        self._rate_images0 = self.compute.images
        self.loader.stats.reset()

    def train(self, stop: StopRequest | None = None) -> TrainResult:
        """Run until the schedule ends, --max-steps, a stop signal, or too many non-finite steps.

        Checkpoints: every --ckpt-every steps, at every epoch end, and at the end (also when stopped by a signal).
        Log records depend only on the step sequence (a partial interval is carried in the checkpoint, not cut
        short), so an interrupted and resumed run writes the same metrics.jsonl records as an uninterrupted one.
        """
        cfg = self.cfg
        own_stop = stop is None
        stop = stop or StopRequest(self.env)
        self._start_clock()
        status: str | None = None
        sync_mode = torch.cuda.get_sync_debug_mode() if self.device.type == "cuda" else None
        if cfg.sync_check and sync_mode is None:
            self._say("note: --sync-check has no effect on the CPU (it checks host synchronisations with CUDA)")
        try:
            while status is None:
                if self.step >= self._end_step():
                    status = "max_steps" if self.step < self.total_steps else "completed"
                    break
                epoch0 = self.loader.epoch
                for group in self._micro_batches():
                    self.train_step(group)
                    if cfg.sync_check and sync_mode is not None:
                        # From the second step on: the first compiles and autotunes (which synchronises).
                        torch.cuda.set_sync_debug_mode("error")
                    if stop.poll():
                        status = "preempted"
                    elif cfg.max_steps and self.step >= cfg.max_steps:
                        status = "max_steps"
                    if self.step % cfg.log_every == 0:
                        self._end_interval()
                    if self.step % self.steps_per_epoch == 0:
                        continue  # the epoch's last step: let the loop read any leftover batches and end
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save()
                    if status is not None:
                        break
                if self.loader.epoch != epoch0:
                    self._end_epoch()
            # At --max-steps the run ends here: the log interval is closed before saving (so a continuation does not
            # log these steps twice). On a stop signal the open interval travels in the checkpoint instead.
            closed = self._end_interval() if status == "max_steps" else False
            if closed or self._saved_step != self.step:
                self.save()
            if status == "preempted":
                who = stop.received.name if stop.received else "received by another process"
                self._say(f"stop signal ({who}): checkpoint of step {self.step} written, exiting")
        except (ShardFormatError, DiskFullError) as e:
            # Foreseeable (a damaged shard, a full disk): the entry turns them into a message and exit status 2;
            # log.txt keeps the message too.
            if self.log is not None:
                self.log.message(f"error: {e}", console=False)
            raise
        finally:
            if sync_mode is not None:
                torch.cuda.set_sync_debug_mode(sync_mode)
            if own_stop:
                stop.restore()
            if self.log is not None:
                self.log.flush()
        return TrainResult(status, self.step, self.loader.epoch, self.last_checkpoint)

    @_exempt_from_sync_check
    def _end_epoch(self) -> None:
        """After every epoch: close the log interval, the optional evaluation, a checkpoint (kept for good every
        --keep-every epochs; also kept as best.pt when the evaluation is the task's best so far)."""
        cfg = self.cfg
        epoch = self.loader.epoch  # epochs finished
        self._end_interval()
        best = False
        if cfg.eval_every and self.eval_loader is not None and epoch % cfg.eval_every == 0:
            metrics = self.evaluate()
            best = metrics is not None and self.task.improved(metrics)
        self.save(permanent_epoch=epoch if cfg.keep_every and epoch % cfg.keep_every == 0 else None, best=best)

    # ------------------------------------------------------------------------------------------------------------
    # Log intervals: the one place the host reads device values

    @_exempt_from_sync_check
    def _end_interval(self) -> bool:
        """Close the log interval: reduce, read, record. False when it was empty."""
        if self.step == self._interval_step0:
            return False
        sums = self._sums.clone()
        counts = torch.stack([self._bad_count, -self._first_bad]).double()
        host = torch.tensor([self.loader.stats.wait_fraction], dtype=torch.float64)
        if self.env.distributed:
            dist.all_reduce(sums)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            dist.all_reduce(host, group=control_group())
        values = torch.cat([sums, counts]).tolist()  # the host sync of this interval
        k = len(self.task.logged)
        logged_sums, (n_micro, gsum, n_steps, bad, neg_first) = values[:k], values[k:]
        (wait_sum,) = host.tolist()
        bad, first_bad = int(bad), int(-neg_first)
        self.compute.seconds = self._clock()
        self.compute.nonfinite_steps += bad
        losses = self.task.interval_losses([v / n_micro if n_micro else float("nan") for v in logged_sums])
        rec = train_record(IntervalNumbers(
            step=self.step,
            epoch=self.step / self.steps_per_epoch,
            images=self.compute.images,
            flops=self.compute.images * self.flops_per_image,
            device_hours=self.compute.seconds * self.world_size / 3600,
            **losses,
            lr=self._lr,
            grad_norm=gsum / n_steps if n_steps else float("nan"),
            interval_steps=self.step - self._interval_step0,
            interval_images=self.compute.images - self._rate_images0,
            interval_seconds=time.monotonic() - self._rate_t0 - self._rate_excluded,
            rate_steps=self.step - self._rate_step0,
            data_wait=wait_sum / self.world_size,
            world_size=self.world_size,
            flops_per_image=self.flops_per_image,
            peak_tflops=self.peak_tflops,
            memory_gb=peak_memory_gb(self.device),
            remaining_steps=max(0, self._end_step() - self.step),
            nonfinite_steps=self.compute.nonfinite_steps,
            loss_scale=self.scaler.get_scale() if self.scaler is not None else None,
            end_step=self._end_step(),
            elapsed_seconds=self.compute.seconds,
        ))
        if self.log is not None:
            self.log.record(rec)
        self._reset_device_accumulators()
        self._interval_step0 = self.step
        self._restart_rate_window()
        if bad and self.compute.nonfinite_steps > self.cfg.skip_nonfinite:
            self._fail_nonfinite(first_bad)
        return True

    def _end_step(self) -> int:
        return min(self.total_steps, self.cfg.max_steps) if self.cfg.max_steps else self.total_steps

    def _fail_nonfinite(self, first_bad: int) -> None:
        # Skipped steps never touched the weights, so the current state is the last good one.
        path = self.save()
        n, allowed = self.compute.nonfinite_steps, self.cfg.skip_nonfinite
        what = "loss" if self.precision == "fp16" else "loss or gradients"
        msg = (f"non-finite {what} at step {first_bad + 1} ({n} non-finite step(s) so far, --skip-nonfinite "
               f"{allowed}); those updates were skipped and the run stopped at step {self.step}"
               + (f" with checkpoint {path}" if path else "")
               + ". Resume with --resume auto after lowering --blr, adding --clip-grad or using --precision fp32,"
               f" or let it skip more with --skip-nonfinite {n + 10}")
        self._say(msg)
        raise NonFiniteError(msg, first_bad + 1, n, path)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation: the task's (SupMAE head's top-1, a classifier's top-1 / top-5), logged as an "eval" record

    @_exempt_from_sync_check
    def evaluate(self) -> dict[str, Any] | None:
        """The task's metrics on the eval loader's epoch (all ranks; padding not counted), recorded in metrics.jsonl;
        None when there is no eval loader or the task evaluates nothing."""
        if self.eval_loader is None:
            return None
        t0 = time.monotonic()
        try:
            if self.ddp is not None:
                # BatchNorm running statistics moved locally in the last forward (DDP broadcasts rank 0's only at
                # the next one): every rank evaluates rank 0's model, the one the checkpoint holds.
                for buf in self.model.buffers():
                    dist.broadcast(buf, src=0)
            metrics = self.task.evaluate(self)
            if metrics is not None and self.log is not None:
                rec = eval_record(
                    self.step, self.step / self.steps_per_epoch, self.compute.images,
                    self.compute.images * self.flops_per_image, self._clock() * self.world_size / 3600,
                    metrics["top1"], metrics["samples"],
                )
                rec.update((k, v) for k, v in metrics.items() if k not in rec)  # e.g. top5, loss, ema_top1
                self.log.record(rec)
        finally:
            self._rate_excluded += time.monotonic() - t0
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any] | None:
        """The whole training state; a collective (every rank's loader position and RNG go to rank 0).

        Returns the dict on rank 0, None elsewhere. Called between steps, so no gradients exist.
        """
        loaders = gather_objects(self.loader.state_dict(), self.env)
        rngs = gather_objects(rng_state(self.device), self.env)
        # The open log interval's per-rank sums, so a resumed run completes the same record.
        interval = gather_objects({"sums": self._sums.cpu(), "bad_count": self._bad_count.cpu(),
                                   "first_bad": self._first_bad.cpu()}, self.env)
        if not self.env.is_main:
            return None
        self.compute.seconds = self._clock()
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "epoch": self.loader.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": loaders,
            "rng": rngs,
            "interval": {"step0": self._interval_step0, "per_rank": interval},
            "world_size": self.world_size,
            "compute": {
                "images": self.compute.images,
                "flops": self.compute.images * self.flops_per_image,
                "train_flops_per_image": self.flops_per_image,
                "device_seconds": self.compute.seconds * self.world_size,
                "wall_seconds": self.compute.seconds,
                "nonfinite_steps": self.compute.nonfinite_steps,
            },
            "config": self.run_config,
            "time": time.time(),
            **({"task": task_state} if (task_state := self.task.state_dict()) else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (same world size: each rank takes its own loader and RNG)."""
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"the checkpoint was written by {state['world_size']} processes and this run has {self.world_size}: "
                "data positions and RNG streams are per process, so an exact resume needs the same number "
                f"(use --nproc {state['world_size']} or the same node count)"
            )
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # torch: "... parameter group that doesn't match the size of optimizer's group"
            sizes = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
            raise ValueError(
                f"the checkpoint's optimiser state has parameter groups of {sizes} tensors, this version builds "
                f"{[len(g['params']) for g in self.optimizer.param_groups]} ({e}): it was written by a version that "
                "grouped the parameters differently (pre-training decays cls_token and mask_token since it follows "
                "the official groups). Continue it with the version that wrote it, or start a new run from its "
                "weights with --init CHECKPOINT") from e
        self.task.load_state_dict(state.get("task", {}))
        if self.scaler is not None:
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self._step_t.fill_(self.step)
        self.loader.load_state_dict(state["loader"][self.env.rank])
        self._check_position(state)
        set_rng_state(state["rng"][self.env.rank], self.device)
        c = state["compute"]
        self.compute = Compute(int(c["images"]), float(c["wall_seconds"]), int(c["nonfinite_steps"]))
        self._lr = self.schedule(self.step)
        interval = state.get("interval")
        if interval is not None:
            mine = interval["per_rank"][self.env.rank]
            self._sums.copy_(mine["sums"])
            self._bad_count.copy_(mine["bad_count"])
            self._first_bad.copy_(mine["first_bad"])
            self._interval_step0 = int(interval["step0"])
        else:
            self._interval_step0 = self.step
        self._saved_step = self.step
        self._restart_rate_window()

    def _check_position(self, state: dict[str, Any]) -> None:
        """The checkpoint's step must be where its data position is in this run's schedule: another
        --accum-steps (micro-batches per step) would count the same position as another step, and the epochs,
        warm-up, cosine and log records would no longer meet the data's epochs."""
        position = state["loader"][self.env.rank]
        epoch, batch = int(position["epoch"]), int(position["batch"])
        accum = self.cfg.accum_steps
        if batch % accum == 0 and self.step == epoch * self.steps_per_epoch + batch // accum:
            return
        saved = state["config"].get("train", {}).get("accum_steps") if isinstance(state.get("config"), dict) else None
        was = f"; the run used --accum-steps {saved}" if saved not in (None, accum) else ""
        raise ValueError(
            f"the checkpoint's step {self.step} is at batch {batch} of epoch {epoch} of the data, which is not that step "
            f"in this configuration ({self.loader.batches_per_epoch} batches per epoch in groups of --accum-steps "
            f"{accum}: {self.steps_per_epoch} steps per epoch{was}): the micro-batches per step cannot change within "
            "a run; resume with the run's own --accum-steps")

    @_exempt_from_sync_check
    def save(self, permanent_epoch: int | None = None, best: bool = False) -> Path | None:
        """Write a checkpoint of the current state (collective); prune old ones; with `best` also as best.pt.
        Returns the path on rank 0."""
        t0 = time.monotonic()
        state = self.state_dict()
        path = None
        if self.env.is_main:
            folder = Path(self.cfg.out) / CHECKPOINT_DIR
            path = save_checkpoint(state, folder, self.step, permanent_epoch)
            # Only now that the new checkpoint is durable may older ones go (never it, never an unreadable one).
            pruned = prune_checkpoints(folder, self.cfg.keep, protect=path)
            self._say(f"checkpoint {path}" + (f" (removed {len(pruned.removed)} old)" if pruned.removed else ""))
            if pruned.unreadable:
                self._say(f"warning: {len(pruned.unreadable)} damaged checkpoint(s) moved to "
                          f"{pruned.unreadable[0].parent} (not counted as kept): "
                          + ", ".join(p.name for p in pruned.unreadable))
            if best:
                with atomic_path(folder / BEST_NAME) as tmp:
                    shutil.copyfile(path, tmp)
                self._say(f"best so far: {folder / BEST_NAME} (step {self.step})")
            for hook in self.checkpoint_hooks:
                hook(self, path)
        self.last_checkpoint = path
        self._saved_step = self.step
        self._rate_excluded += time.monotonic() - t0
        return path
