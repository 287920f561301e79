"""``compress-edge pretrain``: a self-supervised teacher (or a student from scratch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import console
from compress_edge.cli.distill import DataRootOpt, DeviceOpt, ImageSizeOpt, WorkersOpt, parse_kwargs
from compress_edge.errors import CompressEdgeError


@app.command("pretrain")
def pretrain(
    data: Annotated[str | None, typer.Argument(help="Training images: a class folder, an image folder, or "
                                                    "fashion-mnist:train. Not needed with --resume.")] = None,
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see 'compress-edge models list').")] = "resnet18",
    arch_kwargs: Annotated[list[str] | None, typer.Option("--arch-kwargs", help="Architecture options as key=value, "
                                                          "e.g. width_mult=0.5 (repeatable).")] = None,
    method: Annotated[str, typer.Option("--method", help="simclr (NT-Xent) or moco-v2 (queue + momentum "
                                        "encoder).")] = "simclr",
    proj_dim: Annotated[int, typer.Option("--proj-dim", help="Output of the MLP projection head used in "
                                          "training (not kept).")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Contrastive temperature.")] = 0.2,
    queue_size: Annotated[int, typer.Option("--queue-size", help="MoCo negatives (clipped to the number of "
                                            "images).")] = 16_384,
    ema: Annotated[float, typer.Option("--ema", help="MoCo key-encoder momentum.")] = 0.99,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step per process.")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate (warm-up, then cosine).")] = 0.06,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 5e-4,
    image_size: ImageSizeOpt = None,
    data_root: DataRootOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder.")] = Path("runs/pretrain"),
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder.")] = None,
    stop_after: Annotated[int | None, typer.Option("--stop-after", help="Train at most this many epochs now.")] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option("--max-steps-per-epoch", help="Cap the steps of each "
                                                            "epoch (quick trials).")] = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: Annotated[str, typer.Option("--amp", help="auto, bf16, fp16 or off.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Pretrain a self-supervised model (SimCLR or MoCo v2): a teacher, or a student from scratch.

    The backbone, without its projection head, is written to RUN_DIR/student/ (the same layout as a
    distillation run, so every later command takes the run folder).

    Example: compress-edge pretrain fashion-mnist:train --arch resnet18 --method simclr --epochs 20 --out runs/teacher
    """
    from compress_edge.pretrain import PretrainOptions, load_pretrain_options, run_pretrain
    from compress_edge.train import TrainConfig, init_distributed

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
            proj_dim=proj_dim, temperature=temperature, queue_size=queue_size, ema=ema, image_size=image_size,
            data_root=data_root,
            train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              warmup_epochs=1 if epochs > 2 else 0, workers=workers, device=device, amp=amp,
                              seed=seed, max_steps_per_epoch=max_steps_per_epoch, progress=progress),
        )
        result = run_pretrain(opts, stop_after_epochs=stop_after)
    console.print(f"model written to {Path(opts.out) / 'student'} ({result.epochs_done} epochs, "
                  f"{result.global_step} steps, last loss {result.last_loss:.4f}, {result.seconds:.0f} s)")
