"""How the engine steps: mixed precision (bf16, fp16 with a grad scaler, or fp32), the optimizer (SGD or
AdamW) and the learning-rate schedule (warm-up, then cosine or constant), per step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress_edge.errors import TrainingError
from compress_edge.train.config import TrainConfig


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


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule over ``config.epochs``: linear warm-up, then cosine to zero (or constant)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    kind = config.schedule
    if kind not in ("cosine", "constant"):
        raise TrainingError(f"unknown schedule {kind!r}; use cosine or constant")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
