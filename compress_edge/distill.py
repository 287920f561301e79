"""CompRess distillation: a frozen teacher, a student, a loss with queues, run by the training engine.

``DistillTask`` is the engine's task: ``forward((images, teacher_or_label, index))`` returns the loss
of one batch. ``run_distill(options)`` wires a DATA argument, a teacher (live or cached), a student
and a method into a run folder; ``resume_distill(run_dir)`` continues one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_edge.errors import TrainingError
from compress_edge.losses import (
    METHODS,
    PAPER_QUEUE_SIZE,
    PAPER_TEMPERATURE,
    build_loss,
    commit_queues,
    uses_momentum_encoder,
)
from compress_edge.spec import ModelSpec
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

FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)


class InputAdapter(nn.Module):
    """Turns a student batch (B, 3, S, S), normalised with the student's mean/std, into the
    teacher's input: resized to the teacher's size and renormalised with its mean/std."""

    def __init__(self, src: ModelSpec | None, dst: ModelSpec | None):
        super().__init__()
        same = src is None or dst is None or (
            src.image_size == dst.image_size and src.mean == dst.mean and src.std == dst.std
        )
        self.active = not same
        if self.active:
            self.size = dst.image_size
            self.register_buffer("scale", (torch.tensor(src.std) / torch.tensor(dst.std)).view(1, -1, 1, 1))
            self.register_buffer(
                "shift", ((torch.tensor(src.mean) - torch.tensor(dst.mean)) / torch.tensor(dst.std)).view(1, -1, 1, 1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        x = x * self.scale + self.shift
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x


class DistillTask(nn.Module):
    """One distillation step: teacher embeddings (live, frozen, or from the batch when cached), the
    student's, and the momentum key encoder's for ``compress-2q``; the loss does the rest.

    Batch: (images (B, 3, S, S), teacher embeddings (B, Dt) when cached else labels, indices (B,)).
    """

    def __init__(
        self,
        student: nn.Module,
        criterion: nn.Module,
        *,
        teacher: nn.Module | None = None,
        adapter: nn.Module | None = None,
        momentum_encoder: bool = False,
        ema: float = 0.999,
    ):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.teacher = frozen(teacher) if teacher is not None else None
        self.adapter = adapter if adapter is not None else nn.Identity()
        self.ema = float(ema)
        self.key_encoder = frozen(copy.deepcopy(student)).train() if momentum_encoder else None

    def train(self, mode: bool = True) -> DistillTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: its batch norm statistics never move
        return self

    def forward(self, batch) -> torch.Tensor:
        images, second, _ = batch
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(self.adapter(images)).float()
        else:
            teacher = second.float()
        student = self.student(images)
        key = None
        if self.key_encoder is not None:
            with torch.no_grad():
                key = self.key_encoder(images)
        return self.criterion(student, teacher, key)

    @torch.no_grad()
    def after_step(self) -> None:
        commit_queues(self.criterion)
        if self.key_encoder is not None:
            ema_update(self.key_encoder, self.student, self.ema)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        # The frozen teacher is not part of a checkpoint: it is rebuilt from its own file.
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("teacher.")]
        if missing or result.unexpected_keys:
            raise TrainingError(
                "the checkpoint does not fit this run "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); was the run folder changed?"
            )


# ----------------------------------------------------------------------------------------------
# options -> a run
# ----------------------------------------------------------------------------------------------
@dataclass
class DistillOptions:
    """Everything ``compress-edge distill`` takes; saved in the run's config.json for --resume."""

    data: str
    out: str
    teacher: str | None = None  # a compress-edge model/run folder, or an architecture name
    teacher_weights: str | None = None  # third-party checkpoint for an architecture-name teacher
    teacher_cache: str | None = None
    student_arch: str = "mobilenet_v2"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int | None = None  # None: the backbone's feature dimension
    method: str = "compress-2q"
    queue_size: int = PAPER_QUEUE_SIZE
    temperature: float = PAPER_TEMPERATURE
    ema: float = 0.999
    image_size: int | None = None
    data_root: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillOptions:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def default_normalisation(data: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data.startswith("fashion-mnist"):
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from compress_edge.spec import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def load_teacher(teacher: str | None, weights: str | None, data: str, image_size: int | None):
    """The frozen teacher and its ModelSpec, whose image size and mean/std are the preprocessing
    every consumer of this distillation uses: a compress-edge teacher's own; for an architecture
    name, ImageNet's with third-party weights, else the data's (32 px for Fashion-MNIST)."""
    from compress_edge.models import resolve_model
    from compress_edge.spec import IMAGENET_MEAN, IMAGENET_STD

    if teacher is None:
        raise TrainingError("no teacher: pass --teacher (a model folder, or an architecture with --teacher-weights), "
                            "or --teacher-cache")
    if Path(teacher).exists():
        model, spec = resolve_model(teacher)
        if image_size:
            spec = spec.replace(image_size=image_size)
    else:
        if weights is None:
            raise TrainingError(
                f"--teacher {teacher} is an architecture without weights: a randomly initialised teacher teaches "
                "nothing; add --teacher-weights CHECKPOINT, or pass a model folder (e.g. from 'compress-edge pretrain')"
            )
        size = image_size or (32 if data.startswith("fashion-mnist") else 224)
        model, spec = resolve_model(teacher, weights=weights, image_size=size)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if weights else default_normalisation(data)
        spec = spec.replace(image_size=size, mean=mean, std=std)
    return frozen(model), spec


def prepare(opts: DistillOptions, *, device: str = "cpu"):
    """Build the dataset, the task and the student's ModelSpec from options (no training)."""
    from compress_edge.data import TrainAugment, open_dataset
    from compress_edge.models import create_model, spec_for
    from compress_edge.teacher_cache import CachedTeacherDataset, fingerprint_parts, open_cache

    if opts.method not in METHODS:
        raise TrainingError(f"unknown --method {opts.method!r}; choose one of: {', '.join(METHODS)}")
    dataset = open_dataset(opts.data, data_root=opts.data_root)
    teacher, teacher_spec, cache = None, None, None
    if opts.teacher_cache:
        cache = open_cache(opts.teacher_cache)
        teacher_spec = ModelSpec.from_dict(cache.meta["teacher_spec"]) if "teacher_spec" in cache.meta else None
        transform = cache.meta["parts"]["transform"]
        image_size = opts.image_size or transform["image_size"]
        mean, std = tuple(transform["mean"]), tuple(transform["std"])
    else:
        teacher, teacher_spec = load_teacher(opts.teacher, opts.teacher_weights, opts.data, opts.image_size)
        image_size, mean, std = teacher_spec.image_size, teacher_spec.mean, teacher_spec.std
    augment = TrainAugment(image_size, mean, std)
    if cache is not None:
        parts = fingerprint_parts(dataset_fingerprint=dataset.fingerprint(), image_size=image_size, mean=mean, std=std,
                                  mode=cache.mode, views=cache.views, augment=augment_settings(augment),
                                  seed=cache.meta["parts"]["transform"].get("seed") or 0)
        cache.check(parts)
        if cache.mode == "center":
            logger.warning("the teacher cache holds one centre view per image (as the paper): the student trains on "
                           "augmented views whose teacher embedding came from the centre view")
        train_set = CachedTeacherDataset(dataset, cache, augment)
        teacher_dim = cache.dim
    else:
        dataset.transform = augment
        train_set = dataset
        teacher_dim = teacher_spec.embed_dim

    kwargs = dict(opts.student_kwargs)
    kwargs.setdefault("small_input", image_size <= 64)
    student = create_model(opts.student_arch, embed_dim=opts.embed_dim,
                           head="linear" if opts.embed_dim else None, **kwargs)
    queue_size = opts.queue_size
    if queue_size > len(dataset):
        logger.warning("--queue-size %d is more than the %d training images; using %d", queue_size, len(dataset),
                       len(dataset))
        queue_size = len(dataset)
    criterion = build_loss(opts.method, teacher_dim=teacher_dim, student_dim=student.embed_dim,
                           queue_size=queue_size, temperature=opts.temperature)
    student_spec_base = ModelSpec(arch=student.arch, arch_kwargs=student.arch_kwargs, embed_dim=student.embed_dim,
                                  image_size=image_size, mean=mean, std=std)
    adapter = InputAdapter(student_spec_base, teacher_spec) if teacher is not None else None
    task = DistillTask(student, criterion, teacher=teacher, adapter=adapter,
                       momentum_encoder=uses_momentum_encoder(opts.method), ema=opts.ema)
    source = {"kind": "distill", "method": opts.method, "teacher": opts.teacher or opts.teacher_cache,
              "teacher_sha256": (teacher_spec.weights_sha256 if teacher_spec else None), "run": Path(opts.out).name}
    spec = spec_for(student, image_size=image_size, mean=mean, std=std, source=source)
    return train_set, task, spec, {"queue_size": queue_size, "teacher_dim": teacher_dim}


def augment_settings(augment) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(augment).items()
            if k not in ("mean", "std", "image_size")}


def run_distill(opts: DistillOptions, *, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
    """Train a student into ``opts.out`` (see the module docstring); returns the engine's result."""
    from compress_edge.models import save_model

    run_dir = Path(opts.out)
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise TrainingError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick another --out")
    seed_everything(opts.train.seed)  # the student's initial weights depend on it
    train_set, task, spec, resolved = prepare(opts)

    def write_student(folder: Path) -> None:
        save_model(task.student, spec, folder / "student")

    trainer = Trainer(task, opts.train, run_dir, extra_config={"distill": opts.to_dict(), "resolved": resolved},
                      on_checkpoint=write_student)
    logger.info("distilling %s -> %s with %s on %s (%s), %d images, queue %d", opts.teacher or opts.teacher_cache,
                opts.student_arch, opts.method, trainer.device, trainer.precision.name, len(train_set),
                resolved["queue_size"])
    return trainer.fit(train_set, resume=resume, stop_after_epochs=stop_after_epochs)


def load_options(run_dir: str | Path) -> DistillOptions:
    return DistillOptions.from_dict(read_run_options(run_dir, "distill", "distill"))
