"""Progress bars and the stderr console, shared by every long-running piece of work.

Importable without rich (a device installed with --no-deps may lack it): then :func:`optional_bar`
gives None and the code that advances a bar by hand runs without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

try:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
except ImportError:  # the torch-free device install without rich: no bars (optional_bar gives None)
    Console = None

T = TypeVar("T")

err_console = Console(stderr=True) if Console is not None else None

# Switched off for the length of a command run with --no-progress (see :func:`bars`).
_enabled = True


@contextlib.contextmanager
def bars(enabled: bool) -> Iterator[None]:
    """While open, every bar of this module is shown only when ``enabled`` (a command's --progress):
    also the ones deep in library code that has no progress argument (a folder's "checking images")."""
    global _enabled
    saved, _enabled = _enabled, bool(enabled) and _enabled
    try:
        yield
    finally:
        _enabled = saved


def bars_enabled() -> bool:
    """False inside ``bars(False)``."""
    return _enabled


def shows_bar(enabled: bool) -> bool:
    """Whether a bar asked for with ``enabled`` is drawn; long work that draws none logs lines instead."""
    return bool(enabled) and _enabled


def progress_bar(*extra_columns: TextColumn) -> Progress:
    """The package's bar on stderr; it draws nothing inside ``bars(False)``."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False, disable=not _enabled,
    )


def optional_bar(enabled: bool = True) -> Progress | None:
    """:func:`progress_bar`, or None when not ``enabled`` or when rich is not installed: the one
    bar-or-nothing for loops that advance a bar by hand (``if bar is not None: bar.advance(...)``)."""
    if not enabled or Console is None:
        return None
    return progress_bar()


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar on stderr (nothing when ``enabled`` is False)."""
    if not shows_bar(enabled):
        yield from items
        return
    if total is None:
        with contextlib.suppress(TypeError):
            total = len(items)  # type: ignore[arg-type]
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def time_left(elapsed: float, done: int, remaining: int) -> str:
    """The time ``remaining`` units of work take at the pace of ``done`` units in ``elapsed`` seconds,
    as :func:`format_duration` writes it (for the lines of work that draws no bar)."""
    return format_duration(remaining * elapsed / max(1, done))


def format_duration(seconds: float) -> str:
    """A duration as a person reads it in a log line: "42 s", "7 min 5 s", "3 h 20 min"."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
