"""Processes under ``torchrun``: joining the process group (NCCL on GPU, gloo on CPU), which rank this
is, rank 0 the only one that speaks, and the data order sharded across the ranks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from compress_edge.errors import TrainingError

logger = logging.getLogger(__name__)


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


def reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself with one process)."""
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


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
