"""One training engine for every method (distillation, teacher pretraining).

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns the scalar loss of one batch. It may
define ``after_step()`` (EMA updates, queue commits) and ``checkpoint_state()`` /
``load_checkpoint_state(state)`` (what to save; the frozen teacher is not saved). The engine adds
everything around it: device choice, DistributedDataParallel under ``torchrun`` (NCCL on GPU, gloo on
CPU), mixed precision, SGD with a cosine schedule, atomic checkpoints with RNG states, resume (also
from the middle of an epoch), SIGINT/SIGTERM handling, a stop on a non-finite loss, a progress bar,
``metrics.jsonl`` and TensorBoard when installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from compress_edge import __version__
from compress_edge.data.datasets import StopSafeLoader
from compress_edge.devices import resolve_device  # noqa: F401  (re-exported: the one device choice)
from compress_edge.errors import TrainingError
from compress_edge.storage import append_jsonl, atomic_path, atomic_write_json, folder_lock

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "compress-edge-train/1"
_CHECKPOINT_KEYS = ("format", "task", "optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "global_step",
                    "rng")


@dataclass
class TrainConfig:
    """The engine's settings (a method's own settings live with the method).

    ``epochs``, ``batch_size``, ``lr`` and ``warmup_epochs`` may be None ("auto") in a command's
    options; the command resolves them (:func:`compress_edge.train.schedule.plan_run`) before the engine runs.
    """

    epochs: int | None = 10
    batch_size: int | None = 256
    lr: float | None = 0.01
    optimizer: str = "sgd"  # or "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float | None = 0.0
    schedule: str = "cosine"  # or "constant"
    workers: int = 2
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True  # NHWC memory format for the network and its image batches
    sync_bn: bool = True  # with more than one GPU process
    checkpoint_every: int = 1  # epochs
    log_every: int = 10  # steps
    seed: int = 0
    max_steps_per_epoch: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_plan(self, plan) -> TrainConfig:
        """These settings with a :class:`~compress_edge.train.schedule.RunPlan`'s batch, epochs, lr and (when
        on auto) warm-up filled in."""
        warmup = self.warmup_epochs
        if warmup is None:
            warmup = plan.warmup_steps / max(1, plan.steps_per_epoch)
        return dataclasses.replace(self, epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr,
                                   warmup_epochs=warmup)


# ----------------------------------------------------------------------------------------------
# devices, processes, precision
# ----------------------------------------------------------------------------------------------
@dataclass
class Precision:
    enabled: bool
    dtype: torch.dtype | None
    scaler: bool

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32") if self.enabled else "fp32"


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """bf16 where the GPU supports it, else fp16 with a grad scaler; fp32 on CPU unless forced."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise TrainingError(f"unknown --amp {amp!r}; use auto, bf16, fp16 or off")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(False, None, False)
    if amp == "auto":
        bf16 = torch.cuda.is_bf16_supported()
        return Precision(True, torch.bfloat16 if bf16 else torch.float16, not bf16)
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or off")
    return Precision(True, torch.bfloat16 if amp == "bf16" else torch.float16, amp == "fp16")


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the papers' choice), or AdamW (``momentum`` is its beta1)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)
    raise TrainingError(f"unknown optimizer {config.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes; one process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        logger.debug("joined process group: rank %d of %d (%s)", rank, world, backend)
    if rank != 0:
        quiet_this_process()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def quiet_this_process() -> None:
    """Only rank 0 speaks: on the other ranks of a ``torchrun`` run, logs and progress bars (all on the
    shared stderr console) print nothing. Errors still do (the CLI prints them itself)."""
    from compress_edge.progress import err_console

    err_console.quiet = True


def current_dist() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def run_folder_lock(folder: str | os.PathLike, what: str) -> contextlib.AbstractContextManager:
    """One writer per run or cache folder: the main process holds ``FOLDER/.lock`` for the whole run
    (the other ranks of a ``torchrun`` write nothing there). A second run raises FolderBusy."""
    if not current_dist().is_main:
        return contextlib.nullcontext()
    return folder_lock(folder, what=what)


# ----------------------------------------------------------------------------------------------
# data order
# ----------------------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """Deterministic order per (seed, epoch), sharded per step so that the concatenation of the
    ranks' batches, in rank order, is exactly the batch one process would see with the global batch.
    ``start_batch`` skips batches already trained (resume from the middle of an epoch)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None):
        if n < batch_size * world_size:
            raise TrainingError(
                f"the dataset has {n} images, fewer than one global batch ({batch_size} x {world_size} "
                "processes); use a smaller --batch-size"
            )
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.max_batches = max_batches
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        from compress_edge.train.schedule import steps_per_epoch

        return steps_per_epoch(self.n, self.batch_size, self.world_size, self.max_batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        gb = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            start = b * gb + self.rank * self.batch_size
            yield from order[start : start + self.batch_size]

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


# ----------------------------------------------------------------------------------------------
# helpers shared by methods
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * source, over parameters (key encoder, MoCo)."""
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in source.parameters()]
    if len(t_params) != len(s_params):
        raise TrainingError("EMA target and source do not have the same parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for a teacher."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def code_version() -> dict[str, Any]:
    info: dict[str, Any] = {"compress_edge": __version__, "torch": torch.__version__}
    with contextlib.suppress(Exception):
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, check=False)
            info["git_dirty"] = bool(dirty.stdout.strip())
    return info


def read_run_options(run_dir: str | os.PathLike, section: str, command: str) -> dict[str, Any]:
    """The options a run folder was started with (``config.json``'s ``section``), for --resume."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise TrainingError(f"{run_dir} is not a run folder (no config.json); pass the folder given to --out")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TrainingError(f"{path} is damaged; start a new run") from None
    if section not in config:
        raise TrainingError(f"{run_dir} was not made by 'compress-edge {command}'")
    return {**config[section], "out": str(run_dir)}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_gauss"][0], state["numpy_gauss"][1]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


class StopRequest:
    """SIGINT/SIGTERM set a flag that the caller checks at its next safe point (``then``: what happens
    there, for the log); a second signal stops at once. A forked loader worker that has not yet run
    :func:`compress_edge.data.datasets.ignore_stop_signals` leaves the signal to the main process."""

    def __init__(self, then: str = "saving a checkpoint after this step") -> None:
        self.signal: int | None = None
        self.then = then
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if os.getpid() != self._pid:
            return
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("stop requested (%s): %s", signal.Signals(signum).name, self.then)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
            raise TrainingError(f"the engine needs concrete settings; {', '.join(unresolved)} left on auto")
        self.config = config
        self.run_dir = Path(run_dir)
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

    # -- paths --------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def previous_checkpoint_path(self) -> Path:
        """The checkpoint before ``last.pt``: a resume falls back to it when last.pt is damaged."""
        return self.run_dir / "checkpoints" / "previous.pt"

    # -- schedule ------------------------------------------------------------------------------------
    def _make_scheduler(self, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        total = max(1, self.config.epochs * steps_per_epoch)
        warmup = int(self.config.warmup_epochs * steps_per_epoch)
        kind = self.config.schedule
        if kind not in ("cosine", "constant"):
            raise TrainingError(f"unknown schedule {kind!r}; use cosine or constant")

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if kind == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # -- checkpoints ------------------------------------------------------------------------------
    def _task_state(self) -> dict[str, Any]:
        if hasattr(self.task, "checkpoint_state"):
            return self.task.checkpoint_state()
        return self.task.state_dict()

    def save_checkpoint(self, scheduler) -> None:
        if not self.dist.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "task": self._task_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "rng": _rng_state(),
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)
            self._keep_previous()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.run_dir)
        logger.debug("checkpoint written: %s (epoch %d, batch %d)", self.checkpoint_path, self.epoch,
                     self.batch_in_epoch)

    def _keep_previous(self) -> None:
        """Before a new last.pt replaces it, make the current one previous.pt (atomically: a hard link
        renamed into place, a copy where links are not supported); last.pt stays in place throughout."""
        last, previous = self.checkpoint_path, self.previous_checkpoint_path
        if not last.is_file():
            return
        with atomic_path(previous) as tmp:
            tmp.unlink()
            try:
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged file or not ours
            raise TrainingError(f"cannot read checkpoint {path} ({exc.__class__.__name__})") from None
        missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else ["format"]
        if missing or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a compress-edge training checkpoint")
        return state

    def load_checkpoint(self, scheduler) -> None:
        """Continue from last.pt, or from previous.pt (with a warning) when last.pt is missing or damaged."""
        path, previous = self.checkpoint_path, self.previous_checkpoint_path
        if not path.is_file() and not previous.is_file():
            raise TrainingError(f"no checkpoint to resume from at {path}; start a new run instead of --resume")
        try:
            state = self._read_checkpoint(path) if path.is_file() else None
            problem = None if state is not None else f"{path} is missing"
        except TrainingError as exc:
            state, problem = None, str(exc)
        if state is None:
            try:
                state = self._read_checkpoint(previous) if previous.is_file() else None
            except TrainingError:
                state = None
            if state is None:
                raise TrainingError(f"{problem}, and there is no readable {previous.name} before it; start a new run "
                                    "(another --out)")
            if self.dist.is_main and self.checkpoint_path.is_file():  # never rotated into previous.pt
                os.replace(self.checkpoint_path, self.checkpoint_path.with_name("last.damaged.pt"))
            logger.warning("%s; resuming from %s, the checkpoint before it (the steps after it are trained again)",
                           problem, previous)
            path = previous
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
        _set_rng_state(state["rng"])
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

    def _reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.dist.world_size
        return value

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
        last_loss = float("nan")
        end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, self.epoch + stop_after_epochs)
        stopped = False
        with StopRequest() as stop, self._progress(steps_per_epoch) as progress:
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
                self._log({"kind": "epoch", "epoch": self.epoch, "step": self.global_step,
                           "loss": epoch_loss / max(1, epoch_n), "seconds": time.perf_counter() - t0,
                           "images_per_s": seen / max(1e-9, time.perf_counter() - t0)})
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
        return float(self._reduce_mean(loss.detach()).item())

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
