"""Self-supervised pretraining on the training engine: SimCLR (NT-Xent) and MoCo v2 (queue,
momentum encoder). It gives a teacher to users who have none (and to the embedded default data),
and trains a student from scratch: the paper's "self-supervised from scratch" baseline.

The network trains with an MLP projection head; the model saved in ``RUN_DIR/student/`` is the
backbone without it (the representation that kNN, linear probes, distillation and export use).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_edge.defaults import (
    DEFAULT_HOLDOUT,
    PRETRAIN_BASE_LR,
    PRETRAIN_CROP_SCALE,
    PRETRAIN_EMA,
    PRETRAIN_MAX_EPOCHS,
    PRETRAIN_MIN_EPOCHS,
    PRETRAIN_MIN_STEPS,
)
from compress_edge.errors import TrainingError
from compress_edge.train import method as shared  # the steps every training method shares
from compress_edge.train.config import TrainConfig
from compress_edge.train.engine import TrainResult
from compress_edge.train.losses import MoCoLoss, NTXent, commit_queues
from compress_edge.train.run_folder import read_run_options

logger = logging.getLogger(__name__)

PRETRAIN_METHODS = ("simclr", "moco-v2")
#: What the end-of-run check says when the pretrained model does not beat raw pixels.
PRETRAIN_ADVICE = ("self-supervised learning from scratch needs many images and steps (on a few hundred to a "
                   "thousand images its default run ended within a few points of raw pixels, above or below: "
                   "README, \"pretrain on a small data set\"); more --epochs may help, and to distil from, a "
                   "checkpoint pretrained on a large set makes the better teacher")
#: MoCo v2's queue of negatives when --queue-size is not given (or all training images when fewer).
MOCO_QUEUE_SIZE = 16_384


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

    def __init__(self, model: nn.Module, queue_size: int, temperature: float = 0.2, ema: float = 0.99,
                 mask_self: bool = True):
        super().__init__()
        self.model = model
        self.key_encoder = shared.frozen(copy.deepcopy(model)).train()
        self.ema = float(ema)
        self.criterion = MoCoLoss(model.embed_dim, queue_size, temperature, mask_self=mask_self)

    def forward(self, batch) -> torch.Tensor:
        views, index = batch[0], batch[2]
        v1, v2 = views[:, 0], views[:, 1]
        with torch.no_grad():
            k1, k2 = self.key_encoder(v1), self.key_encoder(v2)
        q = self.model(views.transpose(0, 1).flatten(0, 1))  # (2B, D): view 1 of all, then view 2
        # Symmetric InfoNCE in one call: queries of view 1 against keys of view 2 and vice versa.
        both = None if index is None else torch.cat([index, index])
        return self.criterion(q, torch.cat([k2, k1]), both)

    @torch.no_grad()
    def after_step(self) -> None:
        commit_queues(self.criterion)
        shared.ema_update(self.key_encoder, self.model, self.ema)


@dataclass
class PretrainOptions(shared.RunOptions):
    """Everything ``compress-edge pretrain`` takes; None means "auto" (see :func:`resolve_pretraining`)."""

    data: str
    out: str
    arch: str = "resnet18"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "simclr"
    proj_dim: int = 128
    temperature: float = 0.2
    queue_size: int | None = None  # MoCo: auto, min(16,384, training images)
    ema: float | None = None  # MoCo: auto, follows the run length up to 0.99
    mask_self: bool = True
    holdout: float = DEFAULT_HOLDOUT
    crop_scale: float | None = None  # auto: PRETRAIN_CROP_SCALE
    image_size: int | None = None  # auto: the data's own size, within [32, 224]
    data_root: str | None = None
    init: str | None = None  # a model folder whose backbone weights the run starts from
    grey: bool | None = None  # the model sees grey images; None: auto, the colour check of the labelled images
    train: TrainConfig = field(default_factory=lambda: TrainConfig(weight_decay=5e-4))


@dataclass
class PretrainSetup:
    """A pretraining run resolved from its options: the data (``train_set`` without the held-out
    images), the task, the network with its projection head, the preprocessing, the plan."""

    dataset: Any
    train_set: Any
    heldout: Any
    task: nn.Module
    model: nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch_kwargs: dict[str, Any]
    plan: Any
    resolved: dict[str, Any]


def resolve_pretraining(opts: PretrainOptions) -> PretrainSetup:
    """Build the dataset, the network and the task from options (no training)."""
    from compress_edge.data.datasets import native_image_size, open_dataset
    from compress_edge.data.transforms import TrainAugment, default_normalisation
    from compress_edge.models.resolve import SMALL_INPUT_MAX, check_input_size, create_model, model_family
    from compress_edge.train.schedule import key_encoder_momentum

    # A bad option is refused before any I/O: reading a folder decodes every image once.
    shared.check_method(opts.method, PRETRAIN_METHODS)
    scale = shared.crop_range(opts.crop_scale, PRETRAIN_CROP_SCALE)
    model_family(opts.arch)  # an unknown --arch
    if opts.init and not Path(opts.init).exists():
        raise TrainingError(f"--init {opts.init}: no such model folder; pass a compress-edge model or run folder "
                            "(e.g. an earlier 'compress-edge pretrain' run)")
    dataset = open_dataset(opts.data, data_root=opts.data_root)
    image_size = opts.image_size or native_image_size(dataset)
    mean, std = default_normalisation(opts.data)
    dataset.transform = TwoViews(TrainAugment.for_image_size(image_size, mean, std, scale=scale))
    train_set, heldout, plan = shared.holdout_and_plan(
        dataset, dataset, opts, base_lr=PRETRAIN_BASE_LR, min_steps=PRETRAIN_MIN_STEPS,
        min_epochs=PRETRAIN_MIN_EPOCHS, max_epochs=PRETRAIN_MAX_EPOCHS)
    kwargs = dict(opts.arch_kwargs)
    kwargs.setdefault("small_input", image_size <= SMALL_INPUT_MAX)
    colour = _choose_grey(opts, kwargs, dataset, image_size)
    model = create_model(opts.arch, head="mlp", embed_dim=opts.proj_dim, **kwargs)
    check_input_size(model, image_size)  # before any training: a forward that fails is refused here
    if opts.init:
        start_from(model, opts.init, opts.arch)
    resolved: dict[str, Any] = {"image_size": image_size, "heldout_images": int(len(heldout)),
                                "train_images": len(train_set), "crop_scale": scale[0],
                                "grey_input": bool(model.arch_kwargs.get("grey_input"))}
    if colour is not None:
        resolved["colour_check"] = colour
    if opts.method == "simclr":
        task: nn.Module = SimCLRTask(model, opts.temperature)
    else:
        queue = min(opts.queue_size or MOCO_QUEUE_SIZE, len(train_set))
        if opts.queue_size and queue < opts.queue_size:
            logger.warning("--queue-size %d is more than the %d images; using %d", opts.queue_size, len(train_set),
                           queue)
        ema = opts.ema if opts.ema is not None else key_encoder_momentum(plan.steps, paper=PRETRAIN_EMA)
        task = MoCoTask(model, queue, opts.temperature, ema, mask_self=opts.mask_self)
        resolved.update(queue_size=queue, ema=ema)
    return PretrainSetup(dataset=dataset, train_set=train_set, heldout=heldout, task=task, model=model,
                         image_size=image_size, mean=mean, std=std, arch_kwargs=kwargs, plan=plan, resolved=resolved)


def _choose_grey(opts: PretrainOptions, kwargs: dict[str, Any], dataset, image_size: int) -> dict | None:
    """Set ``kwargs["grey_input"]``: --grey / --colour, or ``grey_input`` in --arch-kwargs, or by default the
    colour check (:func:`~compress_edge.eval.quality.colour_check`: grey when the colours alone find the class
    no more often than chance, or grey raw pixels clearly more often than colour ones; colour without labels).
    Returns the check's record."""
    from compress_edge.eval.quality import colour_check, report_colour_check

    if opts.grey is not None:
        if "grey_input" in kwargs and bool(kwargs["grey_input"]) != opts.grey:
            raise TrainingError(f"--{'grey' if opts.grey else 'colour'} and --arch-kwargs grey_input="
                                f"{kwargs['grey_input']} disagree: give one of them")
        kwargs["grey_input"] = opts.grey
        return None
    if "grey_input" in kwargs:
        return None
    found = colour_check(dataset, image_size, seed=opts.train.seed)
    report_colour_check(found)
    if found is not None and found["grey"]:
        kwargs["grey_input"] = True
    return found


def start_from(model: nn.Module, init: str, arch: str) -> None:
    """Load the backbone of the model folder ``init`` into ``model`` (its projection head stays new):
    pretraining continues from a saved model, e.g. a teacher trained longer than one run allowed."""
    from compress_edge.models.files import load_model

    start, spec = load_model(init)
    if spec.arch != arch:
        raise TrainingError(f"--init {init} is a {spec.arch}, not a {arch}: pass --arch {spec.arch}")
    try:
        model.backbone.load_state_dict(start.backbone.state_dict())
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise TrainingError(f"--init {init} does not fit this {arch} ({first}); give the same --arch-kwargs "
                            f"it was built with: {spec.arch_kwargs}") from None
    logger.info("starting from the backbone of %s (%s, trained at %s px)", init, spec.arch, spec.image_size)


def backbone_only(model: nn.Module, arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """The trained network without its projection head: the representation to keep."""
    from compress_edge.models.resolve import create_model

    plain = create_model(arch, **{k: v for k, v in kwargs.items() if k not in ("head", "embed_dim")})
    plain.backbone.load_state_dict(model.backbone.state_dict())
    return plain.eval()


def stem_hint(arch: str, chosen: dict[str, Any], given: dict[str, Any], device_type: str) -> str | None:
    """On a CPU, what the automatic small-input stem costs and the faster choice; None where the user chose
    the stem, the stem is ImageNet's, the network has none (a ViT) or a GPU runs it."""
    from compress_edge.models.registry import model_family

    if device_type != "cpu" or "small_input" in given or not chosen.get("small_input") or model_family(arch) != "cnn":
        return None
    return (f"{arch} takes its small-input stem at this image size (the default: more detail, several times the "
            "compute of ImageNet's stem); on a CPU, --arch-kwargs small_input=false runs faster (resnet18 at 32 px: "
            "about 9x, 1 to 3 points lower on the two small sets measured; README, \"pretrain on a small data set\")")


def run_pretrain(opts: PretrainOptions, *, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
    """Pretrain into ``opts.out``, holding its lock for the whole run (one writer per run folder)."""
    from compress_edge.eval.quality import heldout_check, record_quality
    from compress_edge.models.resolve import save_model, spec_for

    source = {"kind": "pretrain", "method": opts.method, "run": Path(opts.out).name, "data": opts.data}
    if opts.init:
        source["init"] = str(opts.init)

    def trained(ready: PretrainSetup) -> tuple[nn.Module, Any]:
        plain = backbone_only(ready.model, opts.arch, ready.arch_kwargs)
        return plain, spec_for(plain, image_size=ready.image_size, mean=ready.mean, std=ready.std, source=source)

    def write_model(ready: PretrainSetup, folder: Path) -> None:
        save_model(*trained(ready), folder / "student")

    def announce(ready: PretrainSetup, trainer) -> None:
        logger.info("pretraining %s with %s at %d px on %s (%s): %s", opts.arch, opts.method, ready.image_size,
                    trainer.device, trainer.precision.name, ready.plan.describe())
        hint = stem_hint(opts.arch, ready.arch_kwargs, opts.arch_kwargs, trainer.device.type)
        if hint and trainer.dist.is_main:
            logger.info(hint)

    def check_after(ready: PretrainSetup, run_dir: Path, device) -> None:
        model, spec = trained(ready)
        record = heldout_check("the pretrained model", model.to(device), spec, ready.dataset, ready.heldout,
                               device=device, workers=opts.train.workers, advice=PRETRAIN_ADVICE)
        record_quality(run_dir, "heldout", record)

    # A resumed run's weights come from its checkpoint: --init is not read again (its folder may be gone).
    resolve = _resolve_without_init if resume else resolve_pretraining
    return shared.run_method("pretrain", opts, resolve, resume=resume, stop_after_epochs=stop_after_epochs,
                      write_model=write_model, announce=announce, check_after=check_after)


def _resolve_without_init(opts: PretrainOptions) -> PretrainSetup:
    return resolve_pretraining(replace(opts, init=None))


def load_pretrain_options(run_dir: str | Path) -> PretrainOptions:
    """A run folder's options, for --resume. Its colour or grey model stays what the run started with: the
    colour check is not run again (images added to the folder since could tip it), and a run from before
    the check existed sees colour."""
    import json

    opts = PretrainOptions.from_dict(read_run_options(run_dir, "pretrain", "pretrain"))
    if opts.grey is None:
        resolved = json.loads((Path(run_dir) / "config.json").read_text()).get("resolved", {})
        opts = replace(opts, grey=bool(resolved.get("grey_input", False)))
    return opts
