"""A run folder (``--out``) as the training commands share it: one writer at a time (``FOLDER/.lock``),
no fresh run over one that is there, the code version recorded in its ``config.json``, and the
options read back from it for ``--resume``."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compress_edge import __version__
from compress_edge.errors import TrainingError
from compress_edge.storage import folder_lock
from compress_edge.train.checkpoints import RunCheckpoints
from compress_edge.train.distributed import current_dist


def run_folder_lock(folder: str | os.PathLike, what: str) -> contextlib.AbstractContextManager:
    """One writer per run or cache folder: the main process holds ``FOLDER/.lock`` for the whole run
    (the other ranks of a ``torchrun`` write nothing there). A second run raises FolderBusy."""
    if not current_dist().is_main:
        return contextlib.nullcontext()
    return folder_lock(folder, what=what)


@contextlib.contextmanager
def run_folder(out: str | os.PathLike, command: str, *, resume: bool) -> Iterator[Path]:
    """The run folder of ``compress-edge COMMAND``, locked while the block runs; a new run (not
    ``resume``) is refused where the folder already holds one."""
    run_dir = Path(out)
    with run_folder_lock(run_dir, command):
        if not resume and RunCheckpoints(run_dir).exists():
            raise TrainingError(f"{run_dir} already holds a run; continue it with --resume "
                                f"{shlex.quote(str(run_dir))}, or pick another --out")
        yield run_dir


def code_version() -> dict[str, Any]:
    info: dict[str, Any] = {"compress_edge": __version__, "torch": torch.__version__}
    with contextlib.suppress(Exception):
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, check=False)
            info["git_dirty"] = bool(dirty.stdout.strip())
    return info


def read_run_options(run_dir: str | os.PathLike, section: str, command: str) -> dict[str, Any]:
    """The options a run folder was started with (``config.json``'s ``section``), for --resume."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise TrainingError(f"{run_dir} is not a run folder (no config.json); pass the folder given to --out")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TrainingError(f"{path} is damaged; start a new run") from None
    if section not in config:
        raise TrainingError(f"{run_dir} was not made by 'compress-edge {command}'")
    return {**config[section], "out": str(run_dir)}
