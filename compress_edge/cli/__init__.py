"""The ``compress-edge`` command line: thin commands that parse, call the library and print."""

from __future__ import annotations

from typing import Annotated

import typer

from compress_edge import __version__
from compress_edge.cli import completion
from compress_edge.cli.common import ErrorBoundaryGroup, HelpGroup, setup_logging

app = typer.Typer(
    name="compress-edge",
    cls=ErrorBoundaryGroup,
    help=(
        "Distil a big self-supervised image model into a small one (CompRess), export it for a "
        "device and serve image search.\n\n"
        "Example: compress-edge distill fashion-mnist:train --teacher runs/teacher --arch mobilenet_v2"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # compress_edge.cli.completion's two options instead: they take the shell by name
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command_group(name: str, help: str, example: str | None = None) -> typer.Typer:
    """A group of subcommands (``compress-edge NAME ...``) added to the app; ``example``: a command line
    shown under the help."""
    group = typer.Typer(help=f"{help}\n\nExample: {example}" if example else help, no_args_is_help=True,
                        cls=HelpGroup)
    app.add_typer(group, name=name)
    return group


def _version(value: bool) -> None:
    if value:
        typer.echo(f"compress-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show debug logs and the full traceback of errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    install_completion: Annotated[str | None, completion.INSTALL] = None,
    show_completion: Annotated[str | None, completion.SHOW] = None,
) -> None:
    setup_logging(verbose)


def _register() -> None:
    # Each command group lives in its own module; heavy imports stay inside the commands.
    from compress_edge.cli import data as _data  # noqa: F401
    from compress_edge.cli import demo as _demo  # noqa: F401
    from compress_edge.cli import distill as _distill  # noqa: F401
    from compress_edge.cli import eval as _eval  # noqa: F401
    from compress_edge.cli import export as _export  # noqa: F401
    from compress_edge.cli import index as _index  # noqa: F401
    from compress_edge.cli import models as _models  # noqa: F401
    from compress_edge.cli import pretrain as _pretrain  # noqa: F401
    from compress_edge.cli import profile as _profile  # noqa: F401
    from compress_edge.cli import serve as _serve  # noqa: F401


_register()
completion.enable()


def main() -> None:
    app()
