"""Run settings that follow the data and the run length, for ``pretrain`` and ``distill``.

Torch-free. Every "auto" default of a training command is resolved here, from the number of
training images, the number of processes and the image size, so that a user who gives only the data
gets a setting that works on 500 images as on 2,000,000:

- the batch follows the data: at most 256 images, and small enough for at least
  ``MIN_STEPS_PER_EPOCH`` optimizer steps per epoch (``distill`` asks for more, down to a larger
  smallest batch: :data:`compress_edge.defaults.DISTILL_MIN_STEPS_PER_EPOCH`, ``DISTILL_MIN_BATCH``);
- the run length is counted in optimizer steps, not epochs: enough steps for the optimizer and the
  key encoder, enough epochs for each image to be seen many times under augmentation, and no more
  epochs than a large data set needs;
- the key encoder's momentum follows the run: its memory (1 / (1 - m) steps) is at most the paper's
  (1,000 steps at 0.999) and at most a 20th of the run, so the encoder has forgotten its random
  initialisation well before the end (at the end, m^steps < e^-20);
- the queue holds the whole data set when it is smaller than the paper's 128,000 (an image's own
  anchors are masked, so this is safe);
- the learning rate scales with the batch from a base per 256 images: linearly (Goyal et al. 2017)
  for ``pretrain``, with the square root for ``distill`` (see :func:`scaled_lr`).

:class:`RunPlan` records what was resolved and why; ``config.json`` keeps it and the command prints it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from compress_edge.defaults import PAPER_QUEUE_SIZE

#: The paper's key-encoder momentum (CompRess, NeurIPS 2020).
PAPER_EMA = 0.999
#: Largest automatic batch, and the smallest.
MAX_BATCH = 256
MIN_BATCH = 16
#: The automatic batch leaves at least this many optimizer steps in an epoch.
MIN_STEPS_PER_EPOCH = 8
#: The key encoder's memory is at most this share of the run.
EMA_RUN_SHARE = 1 / 20


def steps_per_epoch(images: int, batch_size: int, world_size: int = 1, max_steps: int | None = None) -> int:
    """Optimizer steps in one epoch: the last partial global batch is dropped."""
    full = int(images) // (int(batch_size) * int(world_size))
    return min(full, int(max_steps)) if max_steps else full


def auto_batch_size(images: int, world_size: int = 1, *, largest: int = MAX_BATCH, smallest: int = MIN_BATCH,
                    min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """The largest power of two up to ``largest`` images per process that leaves at least
    ``min_steps`` steps per epoch (never below ``smallest``, unless the data holds fewer than one such
    batch: then the largest power of two that still makes one step)."""
    batch = int(largest)
    while batch > smallest and batch * world_size * min_steps > images:
        batch //= 2
    batch = max(int(smallest), batch)
    while batch > 1 and batch * world_size > images:
        batch //= 2
    return batch


def auto_epochs(images: int, batch_size: int, world_size: int = 1, *, min_steps: int, min_epochs: int,
                max_epochs: int) -> int:
    """Epochs for at least ``min_steps`` optimizer steps, within [min_epochs, max_epochs]."""
    per_epoch = max(1, steps_per_epoch(images, batch_size, world_size))
    return int(min(max_epochs, max(min_epochs, math.ceil(min_steps / per_epoch))))


def key_encoder_momentum(total_steps: int, *, paper: float = PAPER_EMA, run_share: float = EMA_RUN_SHARE) -> float:
    """EMA momentum whose memory 1 / (1 - m) is the paper's or ``run_share`` of the run, whichever is
    shorter (at least one step): 0.999 for a run of 20,000 steps or more, 0.98 for 1,000 steps."""
    horizon = min(1.0 / (1.0 - paper), max(1.0, run_share * float(total_steps)))
    return round(1.0 - 1.0 / horizon, 6)


def auto_queue_size(images: int, *, paper: int = PAPER_QUEUE_SIZE) -> int:
    """The paper's queue, or the whole data set when it is smaller."""
    return int(min(paper, images))


def scaled_lr(base_per_256: float, batch_size: int, world_size: int = 1, rule: str = "linear") -> float:
    """``base`` for a global batch of 256, scaled to the global batch: ``linear`` (Goyal et al. 2017) or
    ``sqrt`` (Krizhevsky 2014; SimCLR, Chen et al. 2020, appendix B.1, finds it better for small batches
    and short runs). The automatic batch shrinks on small data sets to keep the step count up; under the
    linear rule the learning rate shrinks with it, and a run of a few hundred images then ends far
    from fitting its teacher (README, "Defaults that fit the run")."""
    ratio = batch_size * world_size / 256.0
    if rule == "linear":
        return float(base_per_256) * ratio
    if rule == "sqrt":
        return float(base_per_256) * math.sqrt(ratio)
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}: linear or sqrt")


@dataclass(frozen=True)
class RunPlan:
    """The resolved length and shape of a run (what ``config.json`` records as ``plan``)."""

    images: int
    batch_size: int
    world_size: int
    epochs: int
    steps_per_epoch: int
    steps: int
    lr: float
    warmup_steps: int
    automatic: tuple[str, ...]  # which of the above were chosen automatically

    def to_dict(self) -> dict:
        return {**asdict(self), "automatic": list(self.automatic)}

    def describe(self) -> str:
        auto = f" (auto: {', '.join(self.automatic)})" if self.automatic else ""
        return (f"{self.images} images, batch {self.batch_size}"
                + (f" x {self.world_size} processes" if self.world_size > 1 else "")
                + f", {self.epochs} epochs of {self.steps_per_epoch} steps = {self.steps} steps, lr {self.lr:g}{auto}")


def plan_run(images: int, *, batch_size: int | None, epochs: int | None, lr: float | None, base_lr: float,
             min_steps: int, min_epochs: int, max_epochs: int, world_size: int = 1,
             max_steps_per_epoch: int | None = None, warmup_share: float = 0.05,
             lr_scaling: str = "linear", min_steps_per_epoch: int = MIN_STEPS_PER_EPOCH,
             min_batch: int = MIN_BATCH) -> RunPlan:
    """Resolve the "auto" (None) settings of a run; see the module docstring."""
    automatic = []
    if batch_size is None:
        batch_size = auto_batch_size(images, world_size, min_steps=min_steps_per_epoch, smallest=min_batch)
        automatic.append("batch")
    if epochs is None:
        epochs = auto_epochs(images, batch_size, world_size, min_steps=min_steps, min_epochs=min_epochs,
                             max_epochs=max_epochs)
        automatic.append("epochs")
    if lr is None:
        lr = scaled_lr(base_lr, batch_size, world_size, lr_scaling)
        automatic.append("lr")
    per_epoch = steps_per_epoch(images, batch_size, world_size, max_steps_per_epoch)
    steps = per_epoch * int(epochs)
    return RunPlan(images=int(images), batch_size=int(batch_size), world_size=int(world_size), epochs=int(epochs),
                   steps_per_epoch=per_epoch, steps=steps, lr=round(float(lr), 6),
                   warmup_steps=int(round(warmup_share * steps)), automatic=tuple(automatic))


#: The end-of-run check warns when more than this share of the loss's fall came in the run's last
#: quarter: under a cosine schedule the learning rate there is at most 15 % of its peak, so a loss still
#: falling fast had not finished. Measured (README, "The run length"): every run whose longer twin
#: scored 3 points or more higher was above 0.045 (0.049 and 0.054: 10 points short; 0.079 to 0.18 on the
#: shortest runs); the runs whose longer twin gained a point or less were at 0.005, 0.033 and 0.045 (a
#: warning that costs a longer run, not a worse model), and the other long runs at 0.006 to 0.029.
LATE_FALL_WARN = 0.04
#: Fewer epochs than this say too little about the shape of the loss curve.
LATE_FALL_MIN_EPOCHS = 8


def late_fall(epoch_losses: list[float]) -> float | None:
    """Share of the fall of the epoch-mean loss (first epoch to last) that came in the last quarter of
    the epochs; None for fewer than ``LATE_FALL_MIN_EPOCHS`` epochs or a loss that did not fall."""
    n = len(epoch_losses)
    if n < LATE_FALL_MIN_EPOCHS:
        return None
    fall = float(epoch_losses[0]) - float(epoch_losses[-1])
    if not math.isfinite(fall) or fall <= 0:
        return None
    three_quarters = float(epoch_losses[int(round(0.75 * n)) - 1])
    return max(0.0, three_quarters - float(epoch_losses[-1])) / fall
