"""``compress-edge data``: look at a DATA argument before training on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import command_group

data_app = command_group("data", "Inspect datasets.")

# Skipped files listed in the table view; --json (and --verbose logs) list them all.
_SHOWN_SKIPPED = 20


@data_app.command("info")
def info(
    data: Annotated[
        str,
        typer.Argument(
            help="A class folder (DIR/<class>/<image>), an unlabelled image folder, or fashion-mnist:train|test."
        ),
    ],
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root",
            help="Folder to look for Fashion-MNIST in first (and to download it to); relative DATA folders are also looked up under it.",
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Download Fashion-MNIST when no copy is found.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of a table.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Show what a DATA argument holds: its kind, images, classes with counts, skipped files.

    Every image is decoded once, so unreadable files are reported here rather than during training.

    Example: compress-edge data info fashion-mnist:train

    Example: compress-edge data info ~/photos --json
    """
    from compress_edge.data.datasets import open_dataset

    ds = open_dataset(data, data_root=data_root, download=download, progress=progress)
    summary = ds.describe()
    summary["fingerprint"] = ds.fingerprint()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_table(summary)


def _print_table(summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from compress_edge.cli.common import console

    console.print(
        f"[bold]{escape(summary['data'])}[/bold]  ({summary['kind']}, {escape(summary['location'])})",
        highlight=False,
    )
    console.print(f"images: {summary['images']}", highlight=False)
    classes = summary["classes"]
    if classes:
        table = Table("index", "class", "images", title=f"{len(classes)} classes", title_justify="left")
        for c in classes:
            table.add_row(str(c["index"]), escape(c["name"]), str(c["images"]))
        console.print(table)
    else:
        console.print("classes: none (unlabelled)")
    skipped = summary["skipped"]
    console.print(
        f"skipped: {len(skipped)} unreadable file{'' if len(skipped) == 1 else 's'}", highlight=False
    )
    for item in skipped[:_SHOWN_SKIPPED]:
        console.print(f"  {item['path']}: {item['reason']}", highlight=False, markup=False, soft_wrap=True)
    if len(skipped) > _SHOWN_SKIPPED:
        console.print(f"  ... and {len(skipped) - _SHOWN_SKIPPED} more (--json lists them all)")
    console.print(f"fingerprint: {summary['fingerprint']}", highlight=False)
