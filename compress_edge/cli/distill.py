"""``compress-edge distill`` and ``compress-edge cache-teacher``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import (
    DataRootOpt,
    DeviceOpt,
    DistillMethod,
    Optimizer,
    ProgressOpt,
    RunFlags,
    TeacherView,
    WorkersOpt,
    batch_size_option,
    console,
    epochs_option,
    holdout_option,
    lr_option,
    run_options,
    train_or_resume,
)
from compress_edge.defaults import (
    DEFAULT_HOLDOUT,
    DEFAULT_METHOD,
    DEFAULT_STUDENT_EMBED,
    DEFAULT_TEACHER_VIEW,
    DISTILL_BASE_LR,
    DISTILL_MIN_BATCH,
    DISTILL_MIN_EPOCHS,
    DISTILL_MIN_STEPS,
    DISTILL_MIN_STEPS_PER_EPOCH,
    PAPER_TEMPERATURE,
)
from compress_edge.errors import CompressEdgeError

DataArg = Annotated[str, typer.Argument(help="Images: a class folder, an image folder, or fashion-mnist:train|test.")]
TeacherOpt = Annotated[
    str | None,
    typer.Option("--teacher", help="Teacher: a compress-edge model or run folder, or an architecture name "
                                   "(see 'compress-edge models list') used with --teacher-weights."),
]
TeacherWeightsOpt = Annotated[
    str | None,
    typer.Option("--teacher-weights", help="A third-party checkpoint for an architecture-name teacher (torchvision, "
                                           "MoCo v1/v2/v3, SimCLR, SwAV, DINO, Lightning): detected automatically."),
]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Input side in pixels (default: the "
                                                                       "teacher's; 32 for Fashion-MNIST).")]


def parse_kwargs(items: list[str] | None) -> dict:
    """key=value pairs; values read as JSON when they parse (numbers, true/false), else strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CompressEdgeError(f"architecture options take key=value pairs, got {item!r} (e.g. width_mult=0.5)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


CropScaleOpt = Annotated[float | None, typer.Option("--crop-scale", help="The smallest random crop of the "
                                                  "augmented views, as a share of the image's area (0-1]; "
                                                  "default 0.8, or the teacher cache's (its views are "
                                                  "replayed). Pretraining crops to 0.2.",
                                                  show_default=False)]


@app.command("distill")
@run_options
def distill(
    data: Annotated[str | None, typer.Argument(help="Training images: a class folder, an image folder, or "
                                                    "fashion-mnist:train. Not needed with --resume.")] = None,
    teacher: TeacherOpt = None,
    teacher_weights: TeacherWeightsOpt = None,
    teacher_cache: Annotated[str | None, typer.Option("--teacher-cache", help="A folder made by "
                                                      "'compress-edge cache-teacher' (no teacher is run).")] = None,
    student_arch: Annotated[str, typer.Option("--arch", help="Student architecture (see 'compress-edge models "
                                              "list').")] = "mobilenet_v2",
    student_kwargs: Annotated[list[str] | None, typer.Option("--arch-kwargs", help="Student architecture options as "
                                                             "key=value, e.g. width_mult=0.5 (repeatable).")] = None,
    embed_dim: Annotated[int, typer.Option("--embed-dim", help="Size of the student's embedding: a linear head "
                                           "to this many floats (an index then costs 4 x this many bytes an "
                                           "image); 0: the backbone's features, no head.")] = DEFAULT_STUDENT_EMBED,
    method: Annotated[DistillMethod, typer.Option("--method", help="The loss (see the README: compress-2q is the "
                                                  "paper's, for long runs).")] = DEFAULT_METHOD,
    queue_size: Annotated[int | None, typer.Option("--queue-size", help="Anchors in each queue (default: auto, "
                                                   "the paper's 128,000 or all training images when fewer).",
                                                   show_default=False)] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Softmax temperature of the similarity "
                                               "distributions.")] = PAPER_TEMPERATURE,
    ema: Annotated[float | None, typer.Option("--ema", help="Momentum of the key encoder (compress-2q) (default: "
                                              "auto, from the run length: its memory is at most 1/20 of the run "
                                              "and at most the paper's 0.999).", show_default=False)] = None,
    mask_self: Annotated[bool, typer.Option("--mask-self/--no-mask-self", help="Leave the anchors that came "
                                            "from a query's own image out of both softmaxes; --no-mask-self is "
                                            "the paper's loss exactly.")] = True,
    teacher_view: Annotated[TeacherView | None, typer.Option(
        "--teacher-view", help="What a live teacher embeds: augmented (the student's own random view) or center "
                               "(the whole image, resized and centre-cropped, as a --views 0 cache; run once per "
                               "image and kept in memory). Default: a cache's own, else "
                               f"{DEFAULT_TEACHER_VIEW}.", show_default=False)] = None,
    holdout: Annotated[float, holdout_option("the student with its teacher, raw pixels and its random "
                                             "weights")] = DEFAULT_HOLDOUT,
    epochs: Annotated[int | None, epochs_option(DISTILL_MIN_STEPS, DISTILL_MIN_EPOCHS)] = None,
    batch_size: Annotated[int | None, batch_size_option(DISTILL_MIN_STEPS_PER_EPOCH, DISTILL_MIN_BATCH)] = None,
    lr: Annotated[float | None, lr_option(DISTILL_BASE_LR)] = None,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="The optimizer.")] = "sgd",
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum (AdamW: beta1).")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 1e-4,
    image_size: ImageSizeOpt = None,
    crop_scale: CropScaleOpt = None,
    student_image_size: Annotated[int | None, typer.Option("--student-image-size", help="The student's input "
                                                           "size, if smaller than the teacher's: both see the same "
                                                           "view of each image, each at its own size (default: the "
                                                           "teacher's).", show_default=False)] = None,
    data_root: DataRootOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder.")] = Path("runs/distill"),
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder "
                                                "(every other option comes from its config.json).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Epochs between checkpoints.")] = 1,
    *,
    flags: RunFlags,
) -> None:
    """Distil a teacher into a small student with CompRess.

    Give the data and the teacher; the batch, the run length, the learning rate, the queue and the
    key-encoder momentum follow the data (printed at the start, recorded in config.json). The run
    folder gets the student (student/model.safetensors + model.json), config.json, metrics.jsonl,
    checkpoints/ and quality.json (the teacher's similarity spread, and the student against raw
    pixels, its random weights and the teacher on held-out images). Many GPUs:
    torchrun --nproc-per-node 4 -m compress_edge distill ...

    Example: compress-edge distill images/ --teacher resnet50 --teacher-weights moco_v2.pth.tar --image-size 96 --out runs/distill
    """
    from compress_edge.train.config import TrainConfig
    from compress_edge.train.distill import DistillOptions, load_options, run_distill

    def build() -> DistillOptions:
        if data is None:
            raise CompressEdgeError("DATA is missing: pass the training images, or --resume RUN_DIR")
        return DistillOptions(
            data=data, out=str(out), teacher=teacher, teacher_weights=teacher_weights, teacher_cache=teacher_cache,
            student_arch=student_arch, student_kwargs=parse_kwargs(student_kwargs), embed_dim=embed_dim,
            method=method, queue_size=queue_size, temperature=temperature, ema=ema, mask_self=mask_self,
            teacher_view=teacher_view, crop_scale=crop_scale, holdout=holdout, image_size=image_size,
            student_image_size=student_image_size, data_root=data_root,
            train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                              weight_decay=weight_decay, warmup_epochs=None, checkpoint_every=checkpoint_every,
                              **flags.train_kwargs()),
        )

    train_or_resume("student", flags, resume=resume, load=load_options, build=build, run=run_distill)


@app.command("cache-teacher")
def cache_teacher(
    data: DataArg,
    teacher: TeacherOpt = None,
    teacher_weights: TeacherWeightsOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The cache folder.")] = Path("runs/teacher-cache"),
    views: Annotated[int, typer.Option("--views", help="0: one centre view per image (the paper); K > 0: K "
                                       "augmented views per image, replayed exactly for the student.")] = 0,
    image_size: ImageSizeOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 256,
    shard_rows: Annotated[int, typer.Option("--shard-rows", help="Images per shard file.")] = 65_536,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the recorded augmentations.")] = 0,
    crop_scale: CropScaleOpt = None,
    data_root: DataRootOpt = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Run the teacher once over the data and store its embeddings (float16, sharded, memory-mapped).

    An interrupted run continues where it stopped when started again with the same options.

    Example: compress-edge cache-teacher fashion-mnist:train --teacher runs/teacher/student --views 4 --out runs/cache
    """
    from compress_edge.train.distill import cache_teacher as build

    cache = build(data, out, teacher=teacher, teacher_weights=teacher_weights, views=views, image_size=image_size,
                  batch_size=batch_size, shard_rows=shard_rows, seed=seed, data_root=data_root, workers=workers,
                  device=device, progress=progress, crop_scale=crop_scale)
    console.print(f"teacher cache written to {out}: {len(cache)} images x {cache.views} view(s) x {cache.dim} dims "
                  f"(float16), mode {cache.mode}")
