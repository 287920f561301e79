"""One writer per index folder: the ``.lock`` a build, add or remove holds, and what is cleaned up
when a write fails for lack of disk space. Readers take no lock: they only ever see whole generations."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress_edge.retrieval.plan import format_bytes
from compress_edge.retrieval.safety import shown
from compress_edge.retrieval.shards import EMBEDDINGS_DIR
from compress_edge.retrieval.sidecar import SIDECAR, drop_unused_shards, read_sidecar

from compress_edge.errors import IndexFileError
from compress_edge.storage import FolderBusy, folder_lock

_HELD = threading.local()


@contextlib.contextmanager
def writing(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """One writer per index folder: hold ``folder_lock`` on FOLDER/.lock (FolderBusy when another
    process holds it). Re-entrant within a thread, so a build that commits does not refuse itself."""
    key = os.path.normpath(os.path.abspath(folder))
    held = getattr(_HELD, "folders", None)
    if held is None:
        held = _HELD.folders = set()
    if key in held:
        yield
        return
    try:
        lock = folder_lock(folder, what=what)
        lock.__enter__()
    except FolderBusy as exc:
        raise FolderBusy(exc.folder, shown(exc.holder)) from None
    held.add(key)
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        _drop_leftovers(Path(folder))
        kept = ("the partial files were removed, the previous index is unchanged" if (Path(folder) / SIDECAR).is_file()
                else "the partial files were removed")
        need = getattr(_HELD, "need", {}).get(key)
        try:
            free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        raise IndexFileError(f"no space left on the disk of {shown(folder)} ({free}"
                             f"{f'; this needs about {format_bytes(need)}' if need else ''}): free some space or use "
                             f"another folder, then run the command again ({kept})") from None
    else:
        _drop_killed_writes(Path(folder))
    finally:
        held.discard(key)
        getattr(_HELD, "need", {}).pop(key, None)
        lock.__exit__(None, None, None)


def expect_bytes(folder: str | os.PathLike, nbytes: float) -> None:
    """Note the disk space a write into ``folder`` needs, for the message when the disk is full."""
    if not hasattr(_HELD, "need"):
        _HELD.need = {}
    _HELD.need[os.path.normpath(os.path.abspath(folder))] = int(nbytes)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)  # numpy's and FAISS's short writes carry no errno
    return "No space left" in text or bool(re.search(r"\d+ requested and \d+ written", text))


def _drop_killed_writes(path: Path) -> None:
    """At the end of a write that went well, the lock still held: drop what a writer killed before it
    could clean up left (a temporary sidecar, generation folders the sidecar does not name), so that a
    rerun with nothing left to change still tidies the folder. Not when the lock is taken: a writer
    through the Python API builds its next generation before it takes the lock to commit. Shards are
    left to the commit: under torchrun other ranks write theirs without the lock."""
    if not (path / SIDECAR).is_file():
        return
    try:
        meta = read_sidecar(path)
    except IndexFileError:
        return  # unsure what is in use: leave everything
    _drop_generations(path, meta)
    for tmp in path.glob(f".{SIDECAR}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _drop_generations(path: Path, meta: dict[str, Any] | None) -> None:
    """Remove the generation folders the sidecar ``meta`` does not name (all of them without one)."""
    keep = (path / meta["index"]["file"]).parent if meta else None
    for old in path.glob("v[0-9][0-9][0-9][0-9]*"):
        if old.is_dir() and old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _drop_leftovers(path: Path) -> None:
    """After a failed write: remove generation folders and embedding shards the sidecar does not use
    (all of them when there is no index yet)."""
    meta = None
    if (path / SIDECAR).is_file():
        try:
            meta = read_sidecar(path)
        except IndexFileError:
            return  # unsure what is in use: leave everything
    _drop_generations(path, meta)
    if meta is not None:
        drop_unused_shards(path, meta)
    else:
        shutil.rmtree(path / EMBEDDINGS_DIR, ignore_errors=True)


def one_writer(what: str, pos: int, name: str, existing: bool = False):
    """Decorate a function that writes the index folder in its argument ``name`` (position ``pos``)
    to hold :func:`writing` while it runs. existing: say "no index at" before creating any lock."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = kwargs[name] if name in kwargs else args[pos]
            if existing:
                read_sidecar(folder)
            with writing(folder, what):
                return fn(*args, **kwargs)

        return wrapper

    return deco
