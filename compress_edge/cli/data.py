"""``compress-edge data``: look at a DATA argument before training on it."""

from __future__ import annotations

from typing import Annotated

import typer

from compress_edge.cli import app

data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("info")
def info(
    data: Annotated[str, typer.Argument(help="A class-folder, an image folder, or fashion-mnist:train|test.")],
) -> None:
    """Show what a DATA argument holds.

    Example: compress-edge data info fashion-mnist:train
    """
    typer.echo(f"(not yet) {data}")
