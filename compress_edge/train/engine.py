"""One training engine for every method (distillation, teacher pretraining): the loop.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns the scalar loss of one batch. It may
define ``after_step()`` (EMA updates, queue commits) and ``checkpoint_state()`` /
``load_checkpoint_state(state)`` (what to save; the frozen teacher is not saved). The engine adds
everything around it: device choice, DistributedDataParallel under ``torchrun`` (``distributed``),
mixed precision, the optimizer and its schedule (``optim``), atomic checkpoints with RNG states and
resume, also from the middle of an epoch (``checkpoints``), SIGINT/SIGTERM handling
(:mod:`compress_edge.signals`), a stop on a non-finite loss, a progress bar, ``metrics.jsonl`` and
TensorBoard when installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from compress_edge.data.loaders import StopSafeLoader
from compress_edge.devices import resolve_device  # noqa: F401  (re-exported: the one device choice)
from compress_edge.errors import TrainingError
from compress_edge.progress import format_duration, time_left
from compress_edge.signals import StopRequest
from compress_edge.storage import append_jsonl, atomic_write_json
from compress_edge.train.checkpoints import RunCheckpoints, seed_everything, set_rng_state
from compress_edge.train.config import TrainConfig
from compress_edge.train.distributed import EpochSampler, current_dist, reduce_mean
from compress_edge.train.optim import make_optimizer, make_scheduler, resolve_precision
from compress_edge.train.run_folder import code_version

logger = logging.getLogger(__name__)

#: Without a progress bar, an epoch's line is logged at most this often (seconds), besides the first and last.
EPOCH_LINE_SECONDS = 30.0
#: ... and when the first epoch runs longer than this, one line in its middle gives the time left early.
FIRST_LINE_SECONDS = 60.0


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        non_blocking = device.type == "cuda"
        if channels_last and batch.dim() == 4:
            return batch.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


class TrainingStopped(TrainingError):
    """The run was stopped by a signal after saving a checkpoint."""


@dataclass
class TrainResult:
    epochs_done: int
    global_step: int
    last_loss: float
    stopped: bool
    seconds: float


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Runs a task over a dataset for ``config.epochs``; see the module docstring.

    run_dir gets ``config.json`` (resolved settings and code version), ``metrics.jsonl``,
    ``checkpoints/last.pt``; ``on_checkpoint(run_dir)`` is called after each checkpoint on the main
    process (the caller writes its model there).
    """

    def __init__(
        self,
        task: nn.Module,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        extra_config: dict[str, Any] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        collate_fn: Callable | None = None,
    ):
        unresolved = [k for k in ("epochs", "batch_size", "lr", "warmup_epochs") if getattr(config, k) is None]
        if unresolved:
            raise TrainingError(f"the engine needs concrete settings; {', '.join(unresolved)} left on auto: give "
                                "numbers, or resolve them with TrainConfig.with_plan(schedule.plan_run(...))")
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoints = RunCheckpoints(self.run_dir)
        self.dist = current_dist()
        self.device = resolve_device(config.device, self.dist.local_rank)
        self.precision = resolve_precision(config.amp, self.device)
        # NHWC on CPUs too: oneDNN's depthwise convolutions are faster in it (a mobilenet_v2 training
        # step 1.7x on this project's 2-core test machine; a resnet18's about the same).
        self.channels_last = config.channels_last
        self.extra_config = extra_config or {}
        self.on_checkpoint = on_checkpoint
        self.collate_fn = collate_fn

        # gloo has no SyncBatchNorm: on CPU each process keeps its own batch statistics.
        if self.dist.enabled and config.sync_bn and self.device.type == "cuda":
            task = nn.SyncBatchNorm.convert_sync_batchnorm(task)
        self.task = task.to(self.device)
        if self.channels_last:
            self.task = self.task.to(memory_format=torch.channels_last)
        params = [p for p in self.task.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the task has no trainable parameters")
        self.params = params
        self.model: nn.Module = self.task
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.task,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # queues are kept identical by gathering keys, not by copying
            )
        self.optimizer = make_optimizer(params, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaler)
        self.epoch = 0  # epochs fully done
        self.batch_in_epoch = 0
        self.global_step = 0
        self._writer = None

    # -- schedule ------------------------------------------------------------------------------------
    def _make_scheduler(self, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        return make_scheduler(self.optimizer, self.config, steps_per_epoch)

    # -- checkpoints ------------------------------------------------------------------------------
    def _task_state(self) -> dict[str, Any]:
        if hasattr(self.task, "checkpoint_state"):
            return self.task.checkpoint_state()
        return self.task.state_dict()

    def save_checkpoint(self, scheduler) -> None:
        if not self.dist.is_main:
            return
        self.checkpoints.write({
            "task": self._task_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
        })
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.run_dir)
        logger.debug("checkpoint written: %s (epoch %d, batch %d)", self.checkpoints.last, self.epoch,
                     self.batch_in_epoch)

    def load_checkpoint(self, scheduler) -> None:
        """Continue from last.pt, or from previous.pt (with a warning) when last.pt is missing or damaged."""
        state, path = self.checkpoints.read(is_main=self.dist.is_main)
        if hasattr(self.task, "load_checkpoint_state"):
            self.task.load_checkpoint_state(state["task"])
        else:
            self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.global_step = int(state["global_step"])
        set_rng_state(state["rng"])
        logger.info("resuming from %s: epoch %d, batch %d", path, self.epoch + 1, self.batch_in_epoch)

    # -- logging ------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self._writer is not None and "loss" in record:
            self._writer.add_scalar(f"{record.get('kind', 'train')}/loss", record["loss"], self.global_step)
            if "lr" in record:
                self._writer.add_scalar("train/lr", record["lr"], self.global_step)

    def _open_tensorboard(self) -> None:
        if not self.dist.is_main:
            return
        with contextlib.suppress(Exception):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, dataset: Dataset, *, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            seed_everything(cfg.seed + self.dist.rank)
        sampler = EpochSampler(len(dataset), cfg.batch_size, shuffle=True, seed=cfg.seed, rank=self.dist.rank,
                               world_size=self.dist.world_size, max_batches=cfg.max_steps_per_epoch)
        steps_per_epoch = sampler.batches_per_epoch()
        scheduler = self._make_scheduler(steps_per_epoch)
        if resume:
            self.load_checkpoint(scheduler)
        elif self.dist.is_main:
            atomic_write_json(self.run_dir / "config.json", {
                "train": cfg.to_dict(), **self.extra_config, "code": code_version(),
                "world_size": self.dist.world_size, "device": str(self.device), "precision": self.precision.name,
            })
        self._open_tensorboard()
        workers = cfg.workers
        loader = StopSafeLoader(
            dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=True, collate_fn=self.collate_fn,
            persistent_workers=False,
        )
        start = time.perf_counter()
        first_step, first_epoch, last_line = self.global_step, self.epoch, start
        last_loss = float("nan")
        end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, self.epoch + stop_after_epochs)
        stopped = False
        with StopRequest() as stop, self._progress(steps_per_epoch) as progress:
            early_line = not progress.enabled and self.dist.is_main  # a line within a long first epoch
            while self.epoch < end_epoch and not stopped:
                sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self.task.train()
                epoch_loss, epoch_n, t0, seen = 0.0, 0, time.perf_counter(), 0
                task_id = progress.start_epoch(self.epoch, cfg.epochs, self.batch_in_epoch)
                for batch in loader:
                    loss = self._step(batch, scheduler)
                    last_loss = loss
                    epoch_loss += loss
                    epoch_n += 1
                    seen += cfg.batch_size * self.dist.world_size
                    ips = seen / max(1e-9, time.perf_counter() - t0)
                    progress.advance(task_id, loss, ips)
                    if early_line and time.perf_counter() - start >= FIRST_LINE_SECONDS:
                        early_line = False
                        self._time_left_line(steps_per_epoch, first_step, start, loss, ips)
                    if self.global_step % cfg.log_every == 0:
                        self._log({"kind": "train", "epoch": self.epoch + 1, "step": self.global_step,
                                   "loss": loss, "lr": scheduler.get_last_lr()[0], "images_per_s": ips})
                    if stop.signal is not None:
                        stopped = True
                        break
                if stopped and self.batch_in_epoch < steps_per_epoch:
                    self.save_checkpoint(scheduler)
                    break
                # A stop on the epoch's last batch completes the epoch first, so a resume starts the next.
                self.epoch += 1
                self.batch_in_epoch = 0
                early_line = False
                self._log({"kind": "epoch", "epoch": self.epoch, "step": self.global_step,
                           "loss": epoch_loss / max(1, epoch_n), "seconds": time.perf_counter() - t0,
                           "images_per_s": seen / max(1e-9, time.perf_counter() - t0)})
                # Without a bar (--no-progress), a line instead: the first and last epochs' and, between
                # them, one at most every EPOCH_LINE_SECONDS.
                quiet_for = time.perf_counter() - last_line
                if (not progress.enabled and self.dist.is_main
                        and (quiet_for >= EPOCH_LINE_SECONDS or self.epoch in (first_epoch + 1, cfg.epochs))):
                    last_line = time.perf_counter()
                    left = self._time_left(steps_per_epoch, first_step, start)
                    logger.info("epoch %d/%d: loss %.4f, %.0f images/s, %s%s", self.epoch, cfg.epochs,
                                epoch_loss / max(1, epoch_n), seen / max(1e-9, last_line - t0),
                                format_duration(last_line - t0), f"; about {left} left" if self.epoch < cfg.epochs else "")
                if stopped or self.epoch % cfg.checkpoint_every == 0 or self.epoch == end_epoch:
                    self.save_checkpoint(scheduler)
        if self._writer is not None:
            self._writer.close()
        result = TrainResult(self.epoch, self.global_step, last_loss, stopped, time.perf_counter() - start)
        if stopped:
            raise TrainingStopped(
                f"stopped at epoch {self.epoch + 1}, batch {self.batch_in_epoch}; checkpoint saved, "
                f"continue with --resume {shlex.quote(str(self.run_dir))}"
            )
        return result

    def _time_left(self, steps_per_epoch: int, first_step: int, start: float) -> str:
        """The time to the end of the run at the pace of this invocation's steps so far."""
        return time_left(time.perf_counter() - start, self.global_step - first_step,
                         self.config.epochs * steps_per_epoch - self.global_step)

    def _time_left_line(self, steps_per_epoch: int, first_step: int, start: float, loss: float, ips: float) -> None:
        """Without a bar: the time left, from a first epoch still running after FIRST_LINE_SECONDS."""
        logger.info("epoch %d/%d: step %d/%d, loss %.4f, %.0f images/s; about %s left", self.epoch + 1,
                    self.config.epochs, self.batch_in_epoch, steps_per_epoch, loss, ips,
                    self._time_left(steps_per_epoch, first_step, start))

    def _step(self, batch: Any, scheduler) -> float:
        batch = _to_device(batch, self.device, self.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.precision.dtype, enabled=self.precision.enabled)
        with autocast:
            loss = self.model(batch)
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"the loss became {loss.item()} at epoch {self.epoch + 1}, step {self.global_step + 1}; "
                "try a lower --lr, --amp off, or check the teacher's embeddings for NaN"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        scheduler.step()
        if hasattr(self.task, "after_step"):
            self.task.after_step()
        self.global_step += 1
        self.batch_in_epoch += 1
        return float(reduce_mean(loss.detach(), self.dist).item())

    @contextlib.contextmanager
    def _progress(self, steps_per_epoch: int):
        bar = _Progress(steps_per_epoch, enabled=self.config.progress and self.dist.is_main)
        try:
            yield bar
        finally:
            bar.close()


class _Progress:
    """A rich progress bar per epoch: loss, images/s, ETA."""

    def __init__(self, steps: int, enabled: bool):
        self.steps = steps
        self.enabled = enabled
        self._bar = None

    def start_epoch(self, epoch: int, epochs: int, done: int):
        if not self.enabled:
            return None
        if self._bar is None:
            from rich.progress import TextColumn

            from compress_edge.progress import progress_bar

            self._bar = progress_bar(TextColumn("loss {task.fields[loss]:.4f}"),
                                     TextColumn("{task.fields[ips]:.0f} img/s"))
            self._bar.start()
        return self._bar.add_task(f"epoch {epoch + 1}/{epochs}", total=self.steps, completed=done, loss=float("nan"),
                                  ips=0.0)

    def advance(self, task_id, loss: float, ips: float) -> None:
        if self._bar is not None and task_id is not None:
            self._bar.update(task_id, advance=1, loss=loss, ips=ips)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
