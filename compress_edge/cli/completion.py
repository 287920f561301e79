"""Tab completion: ``compress-edge --show-completion [SHELL]`` and ``--install-completion [SHELL]``.

Typer's own two options are flags: a shell named after them is never read, and the shell is found
from the parent processes alone (shellingham). Where no parent is a shell (a container's entry point,
a job runner, an IDE's terminal task) the user got "Shell  not supported.", and ``--show-completion
zsh`` typed in bash printed bash's script. These take the shell by name, and find it only when none is
named: from the parent processes, then from ``$SHELL``. The scripts and the answers to a tab press are
still Typer's.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from typer.completion import Shells, completion_init, install_callback, show_callback

#: The shells Typer writes a completion script for.
SHELLS = tuple(shell.value for shell in Shells)


def detect_shell() -> str | None:
    """The user's shell: the nearest parent process that is one, else ``$SHELL``'s name; None if neither."""
    try:
        import shellingham

        return shellingham.detect_shell()[0].lower()
    except Exception:  # noqa: BLE001 - ShellDetectionFailure, or no process table to read (a sandbox)
        name = Path(os.environ.get("SHELL", "")).name.lower()
        return name or None


def completion_shell(value: str) -> str:
    """The shell to complete for: ``value`` when given, else the detected one; a clear error otherwise."""
    name = value.strip().lower() or detect_shell()
    if name not in SHELLS:
        what = f"{name!r} is not a shell with completion" if name else "could not tell which shell this is"
        raise typer.BadParameter(f"{what}; name one: {', '.join(SHELLS)} (e.g. --show-completion bash)")
    return name


def _show(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    show_callback(ctx, param, completion_shell(value))  # prints the script and exits


def _install(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    install_callback(ctx, param, completion_shell(value))  # writes the shell's startup file and exits


FLAGS = ("--install-completion", "--show-completion")


def _option(flag: str, callback, help: str):
    # The shell's name is optional: optional_shell() gives a bare flag an empty value, detect_shell()'s cue.
    return typer.Option(flag, metavar="[SHELL]", callback=callback, is_eager=True, expose_value=False, help=help)


def optional_shell(args: list[str]) -> list[str]:
    """``args`` with an empty shell name after a bare ``--show-completion`` / ``--install-completion`` (the
    last word, or one followed by an option): Typer's options cannot have an optional value. Only the
    words before the subcommand are looked at; those two options belong to the top command."""
    out = list(args)
    for i, word in enumerate(out):
        if not word.startswith("-"):
            break
        if word in FLAGS and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "")
            break
    return out


INSTALL = _option("--install-completion", _install,
                  f"Install tab completion for SHELL ({', '.join(SHELLS)}); without one, for the shell this "
                  "runs in.")
SHOW = _option("--show-completion", _show,
               "Print the completion script for SHELL, to copy it or customize the installation; without one, "
               "for the shell this runs in.")


def enable() -> None:
    """Register Typer's completion classes, which answer a tab press (Typer does this itself only when it
    adds its own two options)."""
    completion_init()
