"""Files written so that nothing already there is lost: write to a temporary file in the same
folder, flush, fsync, then rename over the target (atomic on POSIX)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress_edge.errors import CompressEdgeError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    On an exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what a plain open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (metrics logs); a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()


def read_epoch_losses(run_dir: str | os.PathLike) -> list[float]:
    """The epoch-mean losses of a run folder's ``metrics.jsonl`` in epoch order (the last line of each
    epoch, so a resumed run counts an epoch once); empty when there is no log."""
    path = Path(run_dir) / "metrics.jsonl"
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line) if line.strip() else {}
        if row.get("kind") == "epoch":
            losses[int(row["epoch"])] = float(row["loss"])
    return [losses[e] for e in sorted(losses)]


class FolderBusy(CompressEdgeError):
    """Raised by :func:`folder_lock` when another live process holds the folder."""

    def __init__(self, folder: Path, holder: str):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is in use by another process ({holder}); wait for it to finish, "
                         "or use another folder")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "this folder") -> Iterator[Path]:
    """One writer per folder: hold an exclusive ``flock`` on ``FOLDER/.lock`` while the block runs.

    The lock file records the holder's pid and command so that a refused second writer can name it.
    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a stale
    lock file never blocks anyone. Raises :class:`FolderBusy` when another process holds it.
    """
    import fcntl
    import sys

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "pid unknown"
            raise FolderBusy(folder, holder) from None
        locked = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:400]} ({what})\n".encode(), 0)
        yield path
    finally:
        if locked and created:
            _remove_if_only_the_lock(folder, path)
        os.close(fd)  # closing the descriptor releases the lock


def _remove_if_only_the_lock(folder: Path, lock: Path) -> None:
    """Take away a folder this process made for a job that wrote nothing in it (a run refused at its
    start), so that it leaves no empty folder behind; anything else in it stays."""
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [lock.name]:
            lock.unlink()
            folder.rmdir()
