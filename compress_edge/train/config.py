"""The training engine's settings (:class:`TrainConfig`); a method's own settings live with the method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    """The engine's settings (a method's own settings live with the method).

    ``epochs``, ``batch_size``, ``lr`` and ``warmup_epochs`` are None ("auto") unless given, as in the
    commands: ``distill`` and ``pretrain`` (CLI and Python API alike) resolve them from the data and the
    run length (:func:`compress_edge.train.schedule.plan_run`, :meth:`with_plan`) before the engine runs;
    the engine itself (:class:`~compress_edge.train.engine.Trainer`) takes concrete numbers only.
    """

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"  # or "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None
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
