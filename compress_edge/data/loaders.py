"""DataLoaders (torch) that fit this package: worker count, pinning, seeded shuffling, and workers
that leave Ctrl-C and SIGTERM to the main process."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def default_loader_workers() -> int:
    """DataLoader worker processes: the cores less one for the main process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0, then: Callable[[int], None] | None = None) -> None:
    """A loader worker's first act: ignore SIGINT and SIGTERM, then run ``then(worker_id)``.

    Ctrl-C, ``kill -TERM -- -PGID`` and ``docker stop`` signal the whole process group; the main
    process decides what a stop means (finish the step, save, exit) and ends its workers itself. The
    worker starts with both signals held (:class:`StopSafeLoader`); ignoring them drops any that
    arrived meanwhile, and only then are they released.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if then is not None:
        then(worker_id)


class StopSafeLoader(DataLoader):
    """A DataLoader whose worker processes leave Ctrl-C and SIGTERM to the main process.

    A worker forked while a stop signal reaches the process group would otherwise die of it in the
    moment between its start and its ``worker_init_fn`` (torch's worker handler re-raises a SIGTERM
    that its parent did not send), and the run would end in "DataLoader worker exited unexpectedly"
    instead of stopping cleanly. So the signals are held (blocked, not lost) while workers start;
    the main process gets them as soon as its workers exist, the workers never.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = partial(ignore_stop_signals, then=kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int | None = None,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    pin_memory: bool | None = None,
    *,
    seed: int | None = None,
    collate_fn: Callable | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader with defaults that fit this package.

    workers=None: :func:`default_loader_workers`; workers > 0 keeps them alive between epochs
    (persistent) and prefetches. pin_memory=None: pinned when CUDA is available. A ``sampler``
    (e.g. DistributedSampler) replaces ``shuffle``. ``seed`` fixes the shuffling order.
    ``worker_init_fn`` runs in each worker process as it starts; workers ignore stop signals
    (:class:`StopSafeLoader`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    workers = default_loader_workers() if workers is None else int(workers)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return StopSafeLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn,
        **kwargs,
    )
