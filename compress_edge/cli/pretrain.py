"""``compress-edge pretrain``: a self-supervised teacher (or a student from scratch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import Amp, PretrainMethod, console
from compress_edge.cli.distill import DataRootOpt, DeviceOpt, WorkersOpt, parse_kwargs
from compress_edge.defaults import DEFAULT_HOLDOUT, PRETRAIN_BASE_LR, PRETRAIN_MIN_EPOCHS, PRETRAIN_MIN_STEPS
from compress_edge.errors import CompressEdgeError


@app.command("pretrain")
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
    holdout: Annotated[float, typer.Option("--holdout", help="Share of labelled images (at most 1,000) kept out "
                                           "of training to compare the model with raw pixels and its random "
                                           "weights at the end (quality.json); 0: none.")] = DEFAULT_HOLDOUT,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data (default: auto, at least "
                                               f"{PRETRAIN_MIN_STEPS} optimizer steps and {PRETRAIN_MIN_EPOCHS} "
                                               "epochs).", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per step per process "
                                                   "(default: auto, 256 or fewer so an epoch has 8 steps).",
                                                   show_default=False)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="SGD learning rate, warm-up then cosine (default: auto, "
                                             f"{PRETRAIN_BASE_LR:g} per 256 images of batch).",
                                             show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 5e-4,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Training size in pixels (default: auto, "
                                                   "the images' own median size rounded to 32, within 32-224).",
                                                   show_default=False)] = None,
    data_root: DataRootOpt = None,
    init: Annotated[str | None, typer.Option("--init", help="Start the backbone from this model or run folder "
                                             "(e.g. a teacher to train longer); the projection head starts "
                                             "new.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder.")] = Path("runs/pretrain"),
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder.")] = None,
    stop_after: Annotated[int | None, typer.Option("--stop-after", help="Train at most this many epochs now.")] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option("--max-steps-per-epoch", help="Cap the steps of each "
                                                            "epoch (quick trials).")] = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: Annotated[Amp, typer.Option("--amp", help="Mixed precision: auto (bf16/fp16 on GPU), bf16, fp16, "
                                      "off.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Pretrain a self-supervised model (SimCLR or MoCo v2): a teacher, or a student from scratch.

    Give the data; the image size, batch, run length and learning rate follow it (printed at the
    start, recorded in config.json). The backbone, without its projection head, is written to
    RUN_DIR/student/ (the same layout as a distillation run, so every later command takes the run
    folder); with labelled data, quality.json compares it with raw pixels and its random weights on
    held-out images.

    Example: compress-edge pretrain fashion-mnist:train --out runs/teacher
    """
    from compress_edge.train.config import TrainConfig
    from compress_edge.train.distributed import current_dist, init_distributed
    from compress_edge.train.pretrain import PretrainOptions, load_pretrain_options, run_pretrain

    init_distributed(device)
    if resume is not None:
        opts = load_pretrain_options(resume)
        opts.train.progress = progress
        result = run_pretrain(opts, resume=True, stop_after_epochs=stop_after)
    else:
        if data is None:
            raise CompressEdgeError("DATA is missing: pass the training images, or --resume RUN_DIR")
        opts = PretrainOptions(
            data=data, out=str(out), arch=arch, arch_kwargs=parse_kwargs(arch_kwargs), method=method,
            proj_dim=proj_dim, temperature=temperature, queue_size=queue_size, ema=ema, mask_self=mask_self,
            holdout=holdout, image_size=image_size, data_root=data_root, init=init,
            train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              warmup_epochs=None, workers=workers, device=device, amp=amp, seed=seed,
                              max_steps_per_epoch=max_steps_per_epoch, progress=progress),
        )
        result = run_pretrain(opts, stop_after_epochs=stop_after)
    if current_dist().is_main:  # under torchrun, only rank 0 speaks
        console.print(f"model written to {Path(opts.out) / 'student'} ({result.epochs_done} epochs, "
                      f"{result.global_step} steps, last loss {result.last_loss:.4f}, {result.seconds:.0f} s)")
