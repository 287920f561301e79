"""``compress-edge pretrain``: a self-supervised teacher (or a student from scratch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import (
    DataRootOpt,
    PretrainMethod,
    RunFlags,
    batch_size_option,
    epochs_option,
    holdout_option,
    lr_option,
    run_options,
    train_or_resume,
)
from compress_edge.cli.distill import parse_kwargs
from compress_edge.defaults import (
    DEFAULT_HOLDOUT,
    PRETRAIN_BASE_LR,
    PRETRAIN_CROP_SCALE,
    PRETRAIN_MIN_EPOCHS,
    PRETRAIN_MIN_STEPS,
)
from compress_edge.errors import CompressEdgeError
from compress_edge.train.schedule import MIN_BATCH, MIN_STEPS_PER_EPOCH


@app.command("pretrain")
@run_options
def pretrain(
    data: Annotated[str | None, typer.Argument(help="Training images: a class folder, an image folder, or "
                                                    "fashion-mnist:train. Not needed with --resume.")] = None,
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see 'compress-edge models list').")] = "resnet18",
    arch_kwargs: Annotated[list[str] | None, typer.Option("--arch-kwargs", help="Architecture options as key=value, "
                                                          "e.g. width_mult=0.5 (repeatable).")] = None,
    method: Annotated[PretrainMethod, typer.Option("--method", help="simclr (NT-Xent) or moco-v2 (queue + "
                                                   "momentum encoder).")] = "simclr",
    proj_dim: Annotated[int, typer.Option("--proj-dim", help="Output of the MLP projection head used in "
                                          "training (not kept).")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Contrastive temperature.")] = 0.2,
    queue_size: Annotated[int | None, typer.Option("--queue-size", help="MoCo negatives (default: auto, 16,384 or "
                                                   "all training images when fewer).", show_default=False)] = None,
    ema: Annotated[float | None, typer.Option("--ema", help="MoCo key-encoder momentum (default: auto, from the "
                                              "run length, at most 0.99).", show_default=False)] = None,
    mask_self: Annotated[bool, typer.Option("--mask-self/--no-mask-self", help="MoCo: never use a queued key of "
                                            "the query's own image as a negative.")] = True,
    holdout: Annotated[float, holdout_option("the model with raw pixels and its random weights")] = DEFAULT_HOLDOUT,
    crop_scale: Annotated[float | None, typer.Option("--crop-scale", help="The smallest random crop of the two "
                                                     "views, as a share of the image's area (0-1]; default "
                                                     f"{PRETRAIN_CROP_SCALE}. Larger keeps more of each image's "
                                                     "shape and position in the embedding.",
                                                     show_default=False)] = None,
    epochs: Annotated[int | None, epochs_option(PRETRAIN_MIN_STEPS, PRETRAIN_MIN_EPOCHS)] = None,
    batch_size: Annotated[int | None, batch_size_option(MIN_STEPS_PER_EPOCH, MIN_BATCH)] = None,
    lr: Annotated[float | None, lr_option(PRETRAIN_BASE_LR)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 5e-4,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Training size in pixels (default: auto, "
                                                   "the images' own median size rounded to 32, within 32-224).",
                                                   show_default=False)] = None,
    grey: Annotated[bool | None, typer.Option("--grey/--colour", help="The model sees grey images (its first "
                                              "layer mixes the colours away; index, search, serve and exports "
                                              "do the same) or colour ones. Default, on labelled images: grey "
                                              "when their colours alone find the right class no more often "
                                              "than chance, or grey raw pixels find it clearly more often than "
                                              "colour ones (colours that vary from image to image are a "
                                              "shortcut a self-supervised model learns instead of the "
                                              "content); colour otherwise.", show_default=False)] = None,
    data_root: DataRootOpt = None,
    init: Annotated[str | None, typer.Option("--init", help="Start the backbone from this model or run folder "
                                             "(e.g. a teacher to train longer); the projection head starts "
                                             "new.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder.")] = Path("runs/pretrain"),
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder.")] = None,
    *,
    flags: RunFlags,
) -> None:
    """Pretrain a self-supervised model (SimCLR or MoCo v2): a teacher, or a student from scratch.

    Give the data; the image size, batch, run length and learning rate follow it (printed at the
    start, recorded in config.json), and so does colour: on labelled images whose colours say nothing
    of the class, or mislead, the model sees them grey. The backbone, without its projection head, is written to
    RUN_DIR/student/ (the same layout as a distillation run, so every later command takes the run
    folder); with labelled data, quality.json compares it with raw pixels and its random weights on
    held-out images.

    Example: compress-edge pretrain fashion-mnist:train --out runs/teacher
    """
    from compress_edge.train.config import TrainConfig
    from compress_edge.train.pretrain import PretrainOptions, load_pretrain_options, run_pretrain

    def build() -> PretrainOptions:
        if data is None:
            raise CompressEdgeError("DATA is missing: pass the training images, or --resume RUN_DIR")
        return PretrainOptions(
            data=data, out=str(out), arch=arch, arch_kwargs=parse_kwargs(arch_kwargs), method=method,
            proj_dim=proj_dim, temperature=temperature, queue_size=queue_size, ema=ema, mask_self=mask_self,
            holdout=holdout, crop_scale=crop_scale, image_size=image_size, data_root=data_root, init=init,
            grey=grey, train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              warmup_epochs=None, **flags.train_kwargs()),
        )

    train_or_resume("model", flags, resume=resume, load=load_pretrain_options, build=build, run=run_pretrain)
