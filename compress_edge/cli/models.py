"""``compress-edge models``: the architectures on offer, and what a model file or checkpoint holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from compress_edge.cli import command_group

models_app = command_group(
    "models",
    "List architectures and inspect model files and third-party checkpoints.",
    "compress-edge models inspect moco_v2_800ep_pretrain.pth.tar --arch resnet50",
)


def _params(n: int) -> str:
    return f"{n / 1e6:.1f} M"


@models_app.command("list")
def list_models_cmd(
    image_size: Annotated[
        int,
        typer.Option("--image-size", min=8, help="Square input side in pixels used for the feature map."),
    ] = 224,
    small_input: Annotated[
        bool | None,
        typer.Option(
            "--small-input/--no-small-input",
            help="The stem for images of 64 px and below (default: chosen from --image-size).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the architectures: parameters, feature dimension and last feature map at an image size.

    Example: compress-edge models list --image-size 32
    """
    from compress_edge.models.resolve import describe_model, list_models

    infos = [describe_model(name, image_size=image_size, small_input=small_input) for name in list_models()]
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return

    from rich.table import Table

    from compress_edge.cli.common import console

    # Short headers, explained in the caption, so that the five columns fit an 80-column terminal whole
    # (the one-line summaries stay in --json: a sixth column would not fit).
    table = Table(title=f"architectures at {image_size}px",
                  caption="dim: floats in the embedding; map: the last feature map (height x width)")
    for column in ("name", "stem", "params", "dim", "map"):
        table.add_column(column, justify="right" if column in ("params", "dim") else "left", no_wrap=True)
    for i in infos:
        fmap = f"{i.feature_map[0]}x{i.feature_map[1]}" if i.feature_map else "too small"
        if "patch_size" in i.arch_kwargs:  # a ViT: no stem, a patch grid
            stem = f"patch {i.arch_kwargs['patch_size']}"
        else:
            stem = "small-input" if i.small_input else "ImageNet"
        table.add_row(i.name, stem, _params(i.params), str(i.feature_dim), fmap)
    console.print(table)


@models_app.command("inspect")
def inspect_cmd(
    path: Annotated[
        str,
        typer.Argument(
            help="A compress-edge model or run folder, its model.safetensors, a third-party "
            "checkpoint (.pth, .pth.tar, .ckpt, .safetensors), or an exported file (.onnx, .engine, .xml)."
        ),
    ],
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="Match the weights against this architecture (default: guess it)."),
    ] = None,
    small_input: Annotated[
        bool, typer.Option("--small-input", help="With --arch: its small-input stem.")
    ] = False,
    key: Annotated[
        str | None,
        typer.Option("--key", help="Top-level entry to read (DINO: teacher or student)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
) -> None:
    """Show a checkpoint's format, which architecture its weights fit, and a model's ModelSpec.

    Exits with 1 when the weights do not fit the architecture.

    Example: compress-edge models inspect dino_resnet50.pth --arch resnet50 --key teacher
    """
    from compress_edge.errors import ModelError
    from compress_edge.export.exported import is_exported
    from compress_edge.models.inspection import inspect_checkpoint
    from compress_edge.models.layouts import refusal

    if is_exported(path):
        _inspect_exported(path, as_json)
        return
    info = inspect_checkpoint(path, arch=arch, small_input=small_input, key=key)
    report = info.report
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
    else:
        from compress_edge.cli.common import console

        where = f" under {info.container!r}" if info.container else ""

        # markup=False throughout: paths and keys may hold brackets that rich would read as styles.
        def say(text: str) -> None:
            console.print(text, markup=False, highlight=False, soft_wrap=True)

        say(str(info.path))
        say(f"format       {info.format}{where}, {info.tensors} tensors")
        if info.arch:
            stem = " (small-input stem)" if info.small_input else ""
            say(f"architecture {info.arch}{stem} ({info.arch_source})")
        if report is not None:
            say(f"backbone     prefix {report.prefix!r}: {report.matched}/{report.total} tensors matched")
            for label, items in (
                ("missing", report.missing),
                ("mismatched", report.mismatched),
                ("unexpected", report.unexpected),
                ("ignored", report.ignored),
            ):
                if items:
                    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                    say(f"{label:<12} {len(items)}: {', '.join(items[:3])}{more}")
        if info.weights_verified is not None:
            say(f"sha256       {'matches the spec' if info.weights_verified else 'DIFFERS from the spec'}")
        if info.spec is not None:
            say("spec")
            console.print_json(info.spec.to_json())
    if info.weights_verified is False:
        raise ModelError(
            f"{info.path} is not the weights file its spec was written for (sha256 differs): "
            "it was changed or replaced; save the model again"
        )
    if report is None:
        raise ModelError(f"no registered architecture fits the weights in {path}; pass --arch to compare")
    if not report.fits() and info.detected is not None:
        raise ModelError(refusal(report, info.detected, path))


def _inspect_exported(path: str, as_json: bool) -> None:
    """An exported file: the runtime that runs it, its precision, size and sha256, and the ModelSpec it
    carries (an engine's from its sidecar JSON: it is not opened, which would take a GPU)."""
    from pathlib import Path

    from compress_edge.export.exported import ENGINE_SUFFIXES, read_sidecar
    from compress_edge.export.runtimes import open_embedder
    from compress_edge.models.spec import ModelSpec
    from compress_edge.storage import sha256_file

    file = Path(path)
    if file.suffix.lower() in ENGINE_SUFFIXES:
        side = read_sidecar(file)
        runtime, precision, spec = "tensorrt", str(side.get("precision", "unknown")), ModelSpec.from_dict(side["spec"])
    else:
        embedder = open_embedder(file)
        runtime, precision, spec = embedder.name, embedder.precision, embedder.spec
        embedder.close()
    info = {"path": str(file), "runtime": runtime, "precision": precision, "bytes": file.stat().st_size,
            "sha256": sha256_file(file), "spec": spec.to_dict()}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from compress_edge.cli.common import console

    for label in ("path", "runtime", "precision", "bytes", "sha256"):
        console.print(f"{label:<12} {info[label]}", markup=False, highlight=False, soft_wrap=True)
    console.print("spec", markup=False, highlight=False)
    console.print_json(spec.to_json())
