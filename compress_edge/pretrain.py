"""Self-supervised pretraining on the training engine: SimCLR (NT-Xent) and MoCo v2 (queue,
momentum encoder). It gives a teacher to users who have none (and to the embedded default data),
and trains a student from scratch: the paper's "self-supervised from scratch" baseline.

The network trains with an MLP projection head; the model saved in ``RUN_DIR/student/`` is the
backbone without it (the representation that kNN, linear probes, distillation and export use).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_edge.errors import TrainingError
from compress_edge.losses import MoCoLoss, NTXent, commit_queues
from compress_edge.train import (
    TrainConfig,
    Trainer,
    TrainResult,
    ema_update,
    frozen,
    read_run_options,
    seed_everything,
)

logger = logging.getLogger(__name__)

PRETRAIN_METHODS = ("simclr", "moco-v2")


class TwoViews:
    """Two independent augmentations of one image: (2, 3, S, S)."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.augment(img), self.augment(img)])


class SimCLRTask(nn.Module):
    """Batch (views (B, 2, 3, S, S), labels, indices) -> NT-Xent of the two views' projections."""

    def __init__(self, model: nn.Module, temperature: float = 0.2):
        super().__init__()
        self.model = model
        self.criterion = NTXent(temperature)

    def forward(self, batch) -> torch.Tensor:
        views = batch[0]
        b = views.shape[0]
        z = self.model(views.flatten(0, 1))  # one pass over both views: batch norm sees 2B images
        z = z.view(b, 2, -1)
        return self.criterion(z[:, 0], z[:, 1])


class MoCoTask(nn.Module):
    """Batch (views (B, 2, 3, S, S), ...) -> symmetric MoCo v2 InfoNCE; the key encoder is an EMA."""

    def __init__(self, model: nn.Module, queue_size: int, temperature: float = 0.2, ema: float = 0.99):
        super().__init__()
        self.model = model
        self.key_encoder = frozen(copy.deepcopy(model)).train()
        self.ema = float(ema)
        self.criterion = MoCoLoss(model.embed_dim, queue_size, temperature)

    def forward(self, batch) -> torch.Tensor:
        views = batch[0]
        v1, v2 = views[:, 0], views[:, 1]
        with torch.no_grad():
            k1, k2 = self.key_encoder(v1), self.key_encoder(v2)
        q = self.model(views.transpose(0, 1).flatten(0, 1))  # (2B, D): view 1 of all, then view 2
        # Symmetric InfoNCE in one call: queries of view 1 against keys of view 2 and vice versa.
        return self.criterion(q, torch.cat([k2, k1]))

    @torch.no_grad()
    def after_step(self) -> None:
        commit_queues(self.criterion)
        ema_update(self.key_encoder, self.model, self.ema)


@dataclass
class PretrainOptions:
    data: str
    out: str
    arch: str = "resnet18"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "simclr"
    proj_dim: int = 128
    temperature: float = 0.2
    queue_size: int = 16_384
    ema: float = 0.99
    image_size: int | None = None
    data_root: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.06, weight_decay=5e-4, warmup_epochs=1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainOptions:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def prepare(opts: PretrainOptions):
    from compress_edge.data import TrainAugment, open_dataset
    from compress_edge.distill import default_normalisation
    from compress_edge.models import create_model

    if opts.method not in PRETRAIN_METHODS:
        raise TrainingError(f"unknown --method {opts.method!r}; choose one of: {', '.join(PRETRAIN_METHODS)}")
    dataset = open_dataset(opts.data, data_root=opts.data_root)
    image_size = opts.image_size or (32 if opts.data.startswith("fashion-mnist") else 224)
    mean, std = default_normalisation(opts.data)
    dataset.transform = TwoViews(TrainAugment(image_size, mean, std))
    kwargs = dict(opts.arch_kwargs)
    kwargs.setdefault("small_input", image_size <= 64)
    model = create_model(opts.arch, head="mlp", embed_dim=opts.proj_dim, **kwargs)
    if opts.method == "simclr":
        task: nn.Module = SimCLRTask(model, opts.temperature)
    else:
        queue = min(opts.queue_size, len(dataset))
        if queue < opts.queue_size:
            logger.warning("--queue-size %d is more than the %d images; using %d", opts.queue_size, len(dataset), queue)
        task = MoCoTask(model, queue, opts.temperature, opts.ema)
    return dataset, task, model, (image_size, mean, std, kwargs)


def backbone_only(model: nn.Module, arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """The trained network without its projection head: the representation to keep."""
    from compress_edge.models import create_model

    plain = create_model(arch, **{k: v for k, v in kwargs.items() if k not in ("head", "embed_dim")})
    plain.backbone.load_state_dict(model.backbone.state_dict())
    return plain.eval()


def run_pretrain(opts: PretrainOptions, *, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
    from compress_edge.models import save_model, spec_for

    run_dir = Path(opts.out)
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise TrainingError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick another --out")
    seed_everything(opts.train.seed)
    dataset, task, model, (image_size, mean, std, kwargs) = prepare(opts)

    def write_model(folder: Path) -> None:
        plain = backbone_only(model, opts.arch, kwargs)
        source = {"kind": "pretrain", "method": opts.method, "run": run_dir.name, "data": opts.data}
        save_model(plain, spec_for(plain, image_size=image_size, mean=mean, std=std, source=source), folder / "student")

    trainer = Trainer(task, opts.train, run_dir, extra_config={"pretrain": opts.to_dict()}, on_checkpoint=write_model)
    logger.info("pretraining %s with %s on %s (%s), %d images", opts.arch, opts.method, trainer.device,
                trainer.precision.name, len(dataset))
    return trainer.fit(dataset, resume=resume, stop_after_epochs=stop_after_epochs)


def load_pretrain_options(run_dir: str | Path) -> PretrainOptions:
    return PretrainOptions.from_dict(read_run_options(run_dir, "pretrain", "pretrain"))
