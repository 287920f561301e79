"""What every command shares: the error boundary, --verbose, logging, the console."""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperGroup

from compress_edge.errors import CompressEdgeError
from compress_edge.progress import err_console  # noqa: E402,F401 - one stderr console for all

console = Console()


@dataclass
class State:
    verbose: bool = False


state = State()


def setup_logging(verbose: bool) -> None:
    state.verbose = verbose
    root = logging.getLogger("compress_edge")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _fail(message: str, code: int) -> None:
    if state.verbose:
        traceback.print_exc(file=sys.stderr)
    # One line, on stderr: collapse any newline a message may hold.
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


class ErrorBoundaryGroup(TyperGroup):
    """Turns a user's mistake into one line on stderr and exit code 1 (traceback with --verbose)."""

    def invoke(self, ctx):  # noqa: D401
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.BadParameter, typer.TyperException):
            raise
        except CompressEdgeError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader went away (| head): nothing to report
            raise typer.Exit(0) from None
        except FileNotFoundError as exc:
            _fail(f"file not found: {exc.filename or exc}; check the path", 1)
        except PermissionError as exc:
            _fail(f"permission denied: {exc.filename or exc}; check the file's permissions", 1)
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename or ''} (an operating-system error)", 1)
        except Exception as exc:  # a bug, not the user's fault: still one line, traceback on demand
            if _is_usage_error(exc):
                raise
            _fail(
                f"internal error: {exc.__class__.__name__}: {exc} "
                "(run again with --verbose for the traceback, and please report it)",
                1,
            )


def _is_usage_error(exc: Exception) -> bool:
    """Typer's own usage errors (bad option, missing argument) carry exit code 2 and show()."""
    return hasattr(exc, "show") and hasattr(exc, "exit_code")
