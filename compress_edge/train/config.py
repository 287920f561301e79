"""The training engine's settings (:class:`TrainConfig`); a method's own settings live with the method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
