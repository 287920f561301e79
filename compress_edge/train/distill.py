"""CompRess distillation: a frozen teacher, a student, a loss with queues, run by the training engine.

``DistillTask`` is the engine's task: ``forward((images, teacher_or_label, index))`` returns the loss
of one batch. ``run_distill(options)`` wires a DATA argument, a teacher (live or cached), a student
and a method into a run folder; ``run_distill(load_options(run_dir), resume=True)`` continues one.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_edge.defaults import (
    DEFAULT_HOLDOUT,
    DEFAULT_METHOD,
    DEFAULT_STUDENT_EMBED,
    DEFAULT_TEACHER_VIEW,
    DISTILL_CROP_SCALE,
    DISTILL_PLAN_LIMITS,
    METHODS,
    PAPER_TEMPERATURE,
    TEACHER_MEMO_BYTES,
    TEACHER_VIEWS,
)
from compress_edge.errors import TrainingError
from compress_edge.models.spec import ModelSpec
from compress_edge.train.config import TrainConfig
from compress_edge.train.engine import TrainResult
from compress_edge.train.losses import build_loss, commit_queues, uses_momentum_encoder
from compress_edge.train.method import (
    RunOptions,
    check_method,
    crop_range,
    ema_update,
    frozen,
    holdout_and_plan,
    run_method,
)
from compress_edge.train.run_folder import read_run_options, run_folder_lock
from compress_edge.train.teacher_cost import CACHE_VIEWS, TeacherClock, cache_commands, teacher_cost_check

logger = logging.getLogger(__name__)

class DistillTask(nn.Module):
    """One distillation step: teacher embeddings (live, frozen, or from the batch when cached), the
    student's, and the momentum key encoder's for ``compress-2q``; the loss does the rest.

    Batch: (images (B, 3, s, s), then the teacher's embeddings (B, Dt) when cached, its own views
    (B, 3, S, S) of the same images when it takes another size or the centre view, else labels;
    indices (B,)).

    ``memo_images`` > 0 (a centre-view teacher, whose embedding of an image never changes): the
    teacher's embeddings are kept (float16, by dataset index) after an image's first step and read
    back afterwards, so the teacher runs once per image instead of once per step. Not checkpointed:
    a resumed run fills it again.
    """

    def __init__(
        self,
        student: nn.Module,
        criterion: nn.Module,
        *,
        teacher: nn.Module | None = None,
        momentum_encoder: bool = False,
        ema: float = 0.999,
        memo_images: int = 0,
    ):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.teacher = frozen(teacher) if teacher is not None else None
        self.ema = float(ema)
        self.key_encoder = frozen(copy.deepcopy(student)).train() if momentum_encoder else None
        self.clock: TeacherClock | None = None  # set by run_distill on a CPU: what the live teacher costs
        self.memo_images = int(memo_images)
        # plain attributes, not buffers: never in a checkpoint, never synchronised between processes
        self.memo: torch.Tensor | None = None
        self.known: torch.Tensor | None = None

    def train(self, mode: bool = True) -> DistillTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: its batch norm statistics never move
        return self

    def forward(self, batch) -> torch.Tensor:
        images, second, index = batch
        if self.teacher is not None:
            start = time.perf_counter()
            with torch.no_grad():
                teacher_input = second if second.dim() == 4 else images
                teacher = (self._remembered(teacher_input, index) if self.memo_images
                           else self.teacher(teacher_input).float())
            if self.clock is not None and images.device.type == "cpu":
                self.clock.record(start, time.perf_counter())
        else:
            teacher = second.float()
        student = self.student(images)
        key = None
        if self.key_encoder is not None:
            with torch.no_grad():
                key = self.key_encoder(images)
        return self.criterion(student, teacher, key, index)

    def _remembered(self, views: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of ``views`` (the centre views of dataset images ``index``): run
        only on the images not seen before, the rest read from the memo."""
        new = ~self.known[index] if self.known is not None else torch.ones_like(index, dtype=torch.bool)
        if bool(new.any()):
            out = self.teacher(views[new]).float()
            if self.memo is None:
                self.memo = torch.zeros(self.memo_images, out.shape[1], dtype=torch.float16, device=out.device)
                self.known = torch.zeros(self.memo_images, dtype=torch.bool, device=out.device)
            self.memo[index[new]] = out.to(torch.float16)
            self.known[index[new]] = True
        return self.memo[index].float()  # float16 the first time too: every epoch sees the same target

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
class DistillOptions(RunOptions):
    """Everything ``compress-edge distill`` takes; saved in the run's config.json for --resume.

    None means "auto": resolved from the data and the run length by :func:`resolve_distillation` (see
    :mod:`compress_edge.train.schedule`), and recorded in config.json's ``plan``.
    """

    data: str
    out: str
    teacher: str | None = None  # a compress-edge model/run folder, or an architecture name
    teacher_weights: str | None = None  # third-party checkpoint for an architecture-name teacher
    teacher_cache: str | None = None
    student_arch: str = "mobilenet_v2"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int | None = DEFAULT_STUDENT_EMBED  # 0: the backbone's feature dimension, no head
    method: str = DEFAULT_METHOD
    queue_size: int | None = None  # auto: min(128,000, training images)
    temperature: float = PAPER_TEMPERATURE
    ema: float | None = None  # auto: follows the run length
    mask_self: bool = True  # False: the paper's loss exactly
    teacher_view: str | None = None  # what a live teacher embeds (TEACHER_VIEWS); auto: the cache's, or the default
    crop_scale: float | None = None  # the smallest random crop's share of the image (auto: the cache's, or the default)
    holdout: float = DEFAULT_HOLDOUT
    image_size: int | None = None  # the teacher's input size (default: its own)
    student_image_size: int | None = None  # the student's (default: the teacher's)
    data_root: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def load_teacher(teacher: str | None, weights: str | None, data: str, image_size: int | None):
    """The frozen teacher and its ModelSpec, whose image size and mean/std are the preprocessing
    every consumer of this distillation uses: a compress-edge teacher's own; for an architecture
    name, ImageNet's with third-party weights, else the data's (32 px for Fashion-MNIST)."""
    from compress_edge.models.resolve import did_you_mean, list_models, looks_like_path, resolve_model
    from compress_edge.models.spec import IMAGENET_MEAN, IMAGENET_STD

    if teacher is None:
        raise TrainingError("no teacher: pass --teacher (a model folder, or an architecture with --teacher-weights), "
                            "or --teacher-cache")
    if Path(teacher).exists():
        model, spec = resolve_model(teacher)
        if image_size:
            spec = spec.replace(image_size=image_size)
    else:
        if teacher not in list_models():
            what = "no such folder" if looks_like_path(teacher) else "neither a folder nor a known architecture"
            raise TrainingError(
                f"--teacher {teacher}: {what}{did_you_mean(teacher)}; pass a compress-edge model or run folder "
                "(e.g. from 'compress-edge pretrain'), or an architecture (compress-edge models list) with "
                "--teacher-weights CHECKPOINT"
            )
        if weights is None:
            raise TrainingError(
                f"--teacher {teacher} is an architecture without weights: a randomly initialised teacher teaches "
                "nothing; add --teacher-weights CHECKPOINT, or pass a model folder (e.g. from 'compress-edge pretrain')"
            )
        size = image_size or (32 if data.startswith("fashion-mnist") else 224)
        model, spec = resolve_model(teacher, weights=weights, image_size=size)
        from compress_edge.data.transforms import default_normalisation

        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if weights else default_normalisation(data)
        spec = spec.replace(image_size=size, mean=mean, std=std)
    return frozen(model), spec


@dataclass
class DistillSetup:
    """A distillation resolved from its options, before training.

    dataset: the whole DATA; train_set: what the engine trains on (the held-out images left out);
    heldout: dataset indices of the held-out images (empty when none); task: the engine's task;
    spec: the student's ModelSpec; teacher / teacher_spec: the live teacher (None with a cache, where
    teacher_spec comes from the cache); plan: batch, epochs, steps, lr; resolved: every other
    setting chosen automatically (queue, key-encoder momentum, teacher dimension).
    """

    dataset: Any
    train_set: Any
    heldout: Any
    task: DistillTask
    spec: ModelSpec
    teacher: nn.Module | None
    teacher_spec: ModelSpec | None
    cache: Any
    plan: Any
    resolved: dict[str, Any]


def resolve_distillation(opts: DistillOptions) -> DistillSetup:
    """Build the dataset, the task and the student's ModelSpec from options (no training)."""
    from compress_edge.data.datasets import open_dataset
    from compress_edge.models.resolve import model_family, spec_for
    from compress_edge.train.schedule import auto_queue_size, key_encoder_momentum

    check_method(opts.method, METHODS)
    model_family(opts.student_arch)  # an unknown --arch
    # The teacher next: a wrong --teacher is found in seconds, before every image is decoded once.
    teacher, teacher_spec, cache, (teacher_size, mean, std) = _teacher_side(opts)
    dataset = open_dataset(opts.data, data_root=opts.data_root)
    image_size = opts.student_image_size or teacher_size
    view = teacher_view(opts, cache)
    images, teacher_dim, augment = _training_images(opts, dataset, cache, view, teacher_spec, image_size,
                                                    teacher_size, mean, std)
    train_set, heldout, plan = holdout_and_plan(
        dataset, images, opts, **DISTILL_PLAN_LIMITS)
    queue_size = opts.queue_size or auto_queue_size(len(train_set))
    if queue_size > len(train_set):
        logger.warning("--queue-size %d is more than the %d training images; using %d", queue_size, len(train_set),
                       len(train_set))
        queue_size = len(train_set)
    ema = opts.ema if opts.ema is not None else key_encoder_momentum(plan.steps)

    student = _student(opts, teacher_spec, image_size)
    criterion = build_loss(opts.method, teacher_dim=teacher_dim, student_dim=student.embed_dim,
                           queue_size=queue_size, temperature=opts.temperature, mask_self=opts.mask_self)
    memo = len(dataset) if teacher is not None and view == "center" and (
        2 * len(dataset) * teacher_dim <= TEACHER_MEMO_BYTES) else 0
    task = DistillTask(student, criterion, teacher=teacher,
                       momentum_encoder=uses_momentum_encoder(opts.method), ema=ema, memo_images=memo)
    source = {"kind": "distill", "method": opts.method, "teacher": opts.teacher or opts.teacher_cache,
              "teacher_sha256": (teacher_spec.weights_sha256 if teacher_spec else None), "run": Path(opts.out).name}
    spec = spec_for(student, image_size=image_size, mean=mean, std=std, source=source)
    resolved = {"queue_size": queue_size, "teacher_dim": teacher_dim, "ema": ema, "temperature": opts.temperature,
                "crop_scale": augment.scale[0], "teacher_view": view, "teacher_memo": bool(memo),
                "mask_self": opts.mask_self, "heldout_images": int(len(heldout)), "train_images": len(train_set)}
    return DistillSetup(dataset=dataset, train_set=train_set, heldout=heldout, task=task, spec=spec, teacher=teacher,
                        teacher_spec=teacher_spec, cache=cache, plan=plan, resolved=resolved)


def _teacher_side(opts: DistillOptions):
    """The live teacher and its spec, or the cache (and the spec it recorded, when it did), and the
    teacher's input: (size, mean, std)."""
    from compress_edge.train.teacher_cache import open_cache

    if opts.teacher_cache:
        cache = open_cache(opts.teacher_cache)
        _check_cache_teacher(opts, cache.meta)
        teacher_spec = ModelSpec.from_dict(cache.meta["teacher_spec"]) if "teacher_spec" in cache.meta else None
        transform = cache.meta["parts"]["transform"]
        teacher_size = opts.image_size or transform["image_size"]
        return None, teacher_spec, cache, (teacher_size, tuple(transform["mean"]), tuple(transform["std"]))
    teacher, teacher_spec = load_teacher(opts.teacher, opts.teacher_weights, opts.data, opts.image_size)
    return teacher, teacher_spec, None, (teacher_spec.image_size, teacher_spec.mean, teacher_spec.std)


def teacher_view(opts: DistillOptions, cache) -> str:
    """What the teacher embeds: a cache's own mode (``--teacher-view``, when given, must agree with it),
    else ``--teacher-view`` or the default."""
    if opts.teacher_view is not None and opts.teacher_view not in TEACHER_VIEWS:
        raise TrainingError(f"--teacher-view {opts.teacher_view!r}: use one of {', '.join(TEACHER_VIEWS)}")
    if cache is None:
        return opts.teacher_view or DEFAULT_TEACHER_VIEW
    view = "center" if cache.mode == "center" else "augmented"
    if opts.teacher_view not in (None, view):
        redo = "--views 0" if opts.teacher_view == "center" else "--views K"
        raise TrainingError(f"--teacher-view {opts.teacher_view}: the teacher cache {opts.teacher_cache} holds "
                            f"{'centre' if view == 'center' else 'augmented'} views; leave out --teacher-view, or "
                            f"make a cache with 'compress-edge cache-teacher ... {redo}'")
    return view


def _check_cache_teacher(opts: DistillOptions, meta: dict[str, Any]) -> None:
    """``--teacher`` (and ``--teacher-weights``) given beside ``--teacher-cache`` must name the teacher the
    cache was made from: the cache is what trains the student, the named teacher what the held-out
    check compares it with."""
    from compress_edge.data.grammar import absolute_if_exists

    def same(given: str | None, made: str | None) -> bool:
        # not given, or a cache that did not record it; else the same file or folder, or the same name
        return given is None or made is None or absolute_if_exists(given) == absolute_if_exists(made)

    if not (same(opts.teacher, meta.get("teacher")) and same(opts.teacher_weights, meta.get("teacher_weights"))):
        made = " ".join(x for x in (meta.get("teacher"), meta.get("teacher_weights")) if x)
        raise TrainingError(f"the teacher cache {opts.teacher_cache} was made from {made}, not the --teacher given; "
                            "leave out --teacher (the cache is the teacher), or run cache-teacher again with it")


def _training_images(opts: DistillOptions, dataset, cache, view: str, teacher_spec, image_size: int,
                     teacher_size: int, mean, std):
    """What the student trains on (every image of ``dataset``, with its teacher side: a cached embedding,
    the teacher's own view, or none when student and live teacher share a view), the teacher's
    dimension and the student's augmentation."""
    from compress_edge.data.transforms import TrainAugment, eval_transform
    from compress_edge.train.teacher_cache import (
        CachedTeacherDataset,
        PairedDataset,
        PairedViews,
        WithCenterView,
        fingerprint_parts,
    )

    recorded = cache.meta["parts"]["transform"].get("augment") if cache is not None else None
    # A cache's views are replayed as they were recorded, unless --crop-scale is given.
    given = recorded["scale"][0] if opts.crop_scale is None and recorded else opts.crop_scale
    scale = crop_range(given, DISTILL_CROP_SCALE)
    teacher_augment = TrainAugment.for_image_size(teacher_size, mean, std, scale=scale)
    augment = (teacher_augment if image_size == teacher_size
               else TrainAugment.for_image_size(image_size, mean, std, scale=scale))
    if cache is not None:
        parts = fingerprint_parts(dataset_fingerprint=dataset.fingerprint(), image_size=teacher_size, mean=mean,
                                  std=std, mode=cache.mode, views=cache.views,
                                  augment=augment_settings(teacher_augment),
                                  seed=cache.meta["parts"]["transform"].get("seed") or 0)
        cache.check(parts)
        return CachedTeacherDataset(dataset, cache, augment), cache.dim, augment
    if view == "center":  # the teacher gets the whole image, the student a random view
        dataset.transform = WithCenterView(augment, eval_transform(teacher_size, mean, std))
        return PairedDataset(dataset), teacher_spec.embed_dim, augment
    if image_size != teacher_size:  # the teacher gets its own, larger render of the same view
        dataset.transform = PairedViews(augment, teacher_augment)
        return PairedDataset(dataset), teacher_spec.embed_dim, augment
    dataset.transform = augment
    return dataset, teacher_spec.embed_dim, augment


def _student(opts: DistillOptions, teacher_spec: ModelSpec | None, image_size: int) -> nn.Module:
    from compress_edge.models.resolve import SMALL_INPUT_MAX, create_model, model_family
    from compress_edge.models.spec import is_grey_input

    kwargs = dict(opts.student_kwargs)
    # The student keeps the teacher's stem: a small-input stem under a teacher with an ImageNet stem
    # would make the "compressed" student cost about what its teacher does.
    teacher_stem = (teacher_spec.arch_kwargs or {}).get("small_input") if teacher_spec is not None else None
    kwargs.setdefault("small_input", bool(teacher_stem) if teacher_stem is not None else image_size <= SMALL_INPUT_MAX)
    # The student sees what its teacher sees: a teacher blind to colour gives neighbourhoods that colour
    # does not explain, and a student that sees colour would have colours to tell them apart by.
    if teacher_spec is not None and is_grey_input(teacher_spec):
        kwargs.setdefault("grey_input", True)
    if model_family(opts.student_arch) == "vit":
        kwargs.setdefault("img_size", image_size)  # the position embedding for the student's own image size
    embed = opts.embed_dim or None
    return create_model(opts.student_arch, embed_dim=embed, head="linear" if embed else None, **kwargs)


def cache_teacher(data: str, out: str | Path, *, teacher: str | None, teacher_weights: str | None = None,
                  views: int = 0, image_size: int | None = None, batch_size: int = 256, shard_rows: int = 65_536,
                  seed: int = 0, data_root: str | None = None, workers: int = 2, device: str = "auto",
                  progress: bool = True, crop_scale: float | None = None):
    """Run the teacher once over ``data`` into a cache folder (``compress-edge cache-teacher``):
    ``views`` 0 for one centre view per image (the paper), K for K recorded augmented views. The
    cache folder's lock is held for the whole run (one writer per cache folder)."""
    with run_folder_lock(out, "cache-teacher"):
        return _cache_teacher(data, out, teacher=teacher, teacher_weights=teacher_weights, views=views,
                              image_size=image_size, batch_size=batch_size, shard_rows=shard_rows, seed=seed,
                              data_root=data_root, workers=workers, device=device, progress=progress,
                              crop_scale=crop_scale)


def _cache_teacher(data: str, out: str | Path, *, teacher: str | None, teacher_weights: str | None, views: int,
                   image_size: int | None, batch_size: int, shard_rows: int, seed: int, data_root: str | None,
                   workers: int, device: str, progress: bool, crop_scale: float | None):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.grammar import absolute_data, absolute_if_exists
    from compress_edge.data.transforms import TrainAugment, eval_transform
    from compress_edge.devices import resolve_device
    from compress_edge.export.backends import TorchEmbedder
    from compress_edge.train.teacher_cache import build_cache, fingerprint_parts, tensor_hash

    model, spec = load_teacher(teacher, teacher_weights, data, image_size)  # before decoding every image
    dataset = open_dataset(data, data_root=data_root)
    augment = TrainAugment.for_image_size(spec.image_size, spec.mean, spec.std,
                                          scale=crop_range(crop_scale, DISTILL_CROP_SCALE))
    mode = "views" if views > 0 else "center"
    parts = fingerprint_parts(dataset_fingerprint=dataset.fingerprint(), image_size=spec.image_size, mean=spec.mean,
                              std=spec.std, mode=mode, views=max(1, views), augment=augment_settings(augment), seed=seed)
    embedder = TorchEmbedder(spec.arch, device=str(resolve_device(device)), module=model, spec=spec)
    return build_cache(
        embedder, dataset, out, parts=parts, teacher_sha256=tensor_hash(model), mode=mode, views=max(1, views),
        eval_tf=eval_transform(spec.image_size, spec.mean, spec.std), augment=augment, seed=seed,
        batch_size=batch_size, workers=workers, shard_rows=shard_rows,
        progress=progress, extra_meta={"teacher_spec": spec.to_dict(), "data": absolute_data(data, data_root),
                                       "teacher": absolute_if_exists(teacher),
                                       "teacher_weights": teacher_weights and absolute_if_exists(teacher_weights)},
    )


def augment_settings(augment) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(augment).items()
            if k not in ("mean", "std", "image_size")}


#: What the run-length warning tells a ``distill`` user to run: ``{epochs}`` is twice the run's epochs.
LONGER_RUN = "--epochs {epochs}"


def run_distill(opts: DistillOptions, *, resume: bool = False, stop_after_epochs: int | None = None,
                longer: str = LONGER_RUN) -> TrainResult:
    """Train a student into ``opts.out`` (see the module docstring); returns the engine's result. The
    run folder's lock is held for the whole run (one writer per run folder). ``longer``: what the
    end-of-run check tells the user to run when the loss was still falling (see :func:`run_length_check`)."""
    from compress_edge.models.resolve import save_model

    def write_student(ready: DistillSetup, folder: Path) -> None:
        save_model(ready.task.student, ready.spec, folder / "student")

    def announce(ready: DistillSetup, trainer) -> None:
        logger.info("distilling %s -> %s with %s on %s (%s): %s; queue %d, T %g, key-encoder momentum %g%s",
                    opts.teacher or opts.teacher_cache, opts.student_arch, opts.method, trainer.device,
                    trainer.precision.name, ready.plan.describe(), ready.resolved["queue_size"], opts.temperature,
                    ready.resolved["ema"], "" if opts.mask_self else " (own-image anchors kept, as the paper)")
        if ready.task.memo_images:
            logger.info("the teacher embeds the centre view of each image once (its first step) and keeps it in "
                        "memory: the first epoch runs it, the others do not")
        elif ready.teacher is not None and trainer.device.type == "cpu" and trainer.dist.is_main:
            # a centre-view teacher too large to keep in memory: a --views 0 cache is the same target
            views = 0 if ready.resolved["teacher_view"] == "center" else CACHE_VIEWS
            commands = cache_commands(data=opts.data, teacher=opts.teacher, teacher_weights=opts.teacher_weights,
                                      image_size=opts.image_size, out=str(opts.out), views=views)
            ready.task.clock = TeacherClock(lambda teacher_s, step_s: teacher_cost_check(
                teacher_s, step_s, run_dir=trainer.run_dir, steps_left=ready.plan.steps - trainer.global_step,
                images=len(ready.dataset), batch_size=ready.plan.batch_size, dim=ready.resolved["teacher_dim"],
                commands=commands, views=views))

    return run_method("distill", opts, resolve_distillation, resume=resume, stop_after_epochs=stop_after_epochs,
                      write_model=write_student, announce=announce, check_before=check_teacher,
                      check_after=lambda ready, run_dir, device: final_check(ready, run_dir, opts, device=device,
                                                                              longer=longer))


#: Training images the teacher embeds for the check at the start of a run.
TEACHER_CHECK_IMAGES = 2048


def teacher_sample(ready: DistillSetup, device, images: int = TEACHER_CHECK_IMAGES):
    """Up to ``images`` training images (not held out), drawn with a fixed seed: (indices, the teacher's
    embeddings (N, Dt) of them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pool = np.setdiff1d(np.arange(len(ready.dataset)), ready.heldout)
    chosen = np.sort(rng.choice(pool, size=min(len(pool), images), replace=False))
    return chosen, teacher_embeddings(ready, chosen, device)


def teacher_embeddings(ready: DistillSetup, indices, device):
    """The teacher's embeddings (N, Dt) of the images at ``indices``: from the cache (its first view), or
    the live teacher's evaluation views."""
    import numpy as np

    if ready.cache is not None:
        return np.stack([ready.cache.embedding(int(i), 0) for i in indices])
    from compress_edge.data.datasets import SubsetDataset
    from compress_edge.eval.features import extract_features

    sample = SubsetDataset(f"{ready.dataset.name} (sample)", ready.dataset, indices=indices)
    return extract_features(ready.teacher, sample, spec=ready.teacher_spec, device=str(device), use_cache=False,
                            progress=False)[0]


def check_teacher(ready: DistillSetup, run_dir: Path, device) -> None:
    """Before training: is the teacher's similarity distribution at this temperature worth copying, and
    (with held-out labelled images) are its neighbourhoods better than raw pixels'?"""
    from compress_edge.data.datasets import SubsetDataset
    from compress_edge.eval.quality import record_quality, teacher_against_pixels, teacher_check
    from compress_edge.models.spec import is_grey_input

    chosen, sample = teacher_sample(ready, device)
    record = teacher_check(sample, ready.resolved["temperature"])
    if len(ready.heldout):  # held out only from labelled data
        gallery = SubsetDataset(f"{ready.dataset.name} (training images)", ready.dataset, indices=chosen)
        queries = SubsetDataset(f"{ready.dataset.name} (held out)", ready.dataset, indices=ready.heldout)
        record["heldout"] = teacher_against_pixels(
            (sample, teacher_embeddings(ready, ready.heldout, device)), gallery, queries, ready.spec.image_size,
            grey=is_grey_input(ready.teacher_spec or ready.spec), device=str(device))
    record_quality(run_dir, "teacher", record)


def final_check(ready: DistillSetup, run_dir: Path, opts: DistillOptions, *, device, longer: str) -> None:
    """After training: the student against raw pixels, its random weights and the teacher (kNN on
    the held-out images), recorded in quality.json."""
    from compress_edge.eval.quality import heldout_check, record_quality

    teacher, teacher_spec = ready.teacher, ready.teacher_spec
    if teacher is None and ready.cache is not None:  # trained from a cache: load its teacher for the check
        teacher, teacher_spec = _cached_teacher(ready, opts)
    student = ready.task.student.eval()
    record = heldout_check("the student", student, ready.spec, ready.dataset, ready.heldout, teacher=teacher,
                           teacher_spec=teacher_spec, device=device, workers=opts.train.workers)
    record_quality(run_dir, "heldout", record)
    run_length_check(run_dir, ready.plan.epochs, longer=longer)


def _cached_teacher(ready: DistillSetup, opts: DistillOptions):
    """The teacher a cache was made from, when it is still there (a model folder, or an architecture
    name and its weights file), else (None, the spec the cache recorded): no teacher row then."""
    ref = opts.teacher or ready.cache.meta.get("teacher")
    weights = opts.teacher_weights or ready.cache.meta.get("teacher_weights")
    if not ref or not (Path(ref).exists() or (weights and Path(weights).is_file())):
        logger.info("the teacher the cache was made from (%s) is not here: the held-out check has no teacher row", ref)
        return None, ready.teacher_spec
    size = opts.image_size or (ready.teacher_spec.image_size if ready.teacher_spec is not None else None)
    return load_teacher(ref, weights, opts.data, size)


def run_length_check(run_dir: Path, epochs: int, *, longer: str = LONGER_RUN) -> dict[str, Any] | None:
    """Did the run end while the loss was still falling fast (see :data:`schedule.LATE_FALL_WARN`)?
    Read from ``metrics.jsonl`` (the last line of each epoch, so a resumed run counts once); recorded in
    quality.json as ``run_length`` with a warning that names a longer run: ``longer`` with ``{epochs}``
    twice the run's (a caller that started the run some other way, as the demo does, says how to run it
    longer there)."""
    from compress_edge.eval.quality import record_quality
    from compress_edge.storage import read_epoch_losses
    from compress_edge.train.schedule import LATE_FALL_WARN, late_fall

    share = late_fall(read_epoch_losses(run_dir))
    if share is None:
        return None
    record = {"late_fall": round(share, 4), "warn_above": LATE_FALL_WARN, "epochs": int(epochs),
              "still_falling": share > LATE_FALL_WARN}
    if record["still_falling"]:
        record["try"] = longer.format(epochs=2 * epochs)
        logger.warning("the loss was still falling when the run ended (%.0f %% of its fall came in the last quarter "
                       "of the %d epochs; finished runs measured at 3 %% or less): the student had not finished "
                       "copying its teacher; a longer run is likely to score higher: %s",
                       100 * share, epochs, record["try"])
    record_quality(run_dir, "run_length", record)
    return record


def load_options(run_dir: str | Path) -> DistillOptions:
    stored = read_run_options(run_dir, "distill", "distill")
    # A run started before --teacher-view existed gave its live teacher the student's view: it resumes so
    # (with a cache, the cache decides).
    if not stored.get("teacher_cache"):
        stored.setdefault("teacher_view", "augmented")
    return DistillOptions.from_dict(stored)
