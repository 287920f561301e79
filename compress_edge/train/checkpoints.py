"""A run's checkpoints: ``RUN_DIR/checkpoints/last.pt`` and the one before it, ``previous.pt``, written
atomically, with the random number generators' states, read back for a resume (from ``previous.pt``,
with a warning, when ``last.pt`` is missing or damaged)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress_edge.errors import TrainingError
from compress_edge.storage import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "compress-edge-train/1"
_CHECKPOINT_KEYS = ("format", "task", "optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "global_step",
                    "rng")


def rng_state() -> dict[str, Any]:
    """The states of torch's, numpy's, Python's (and CUDA's) generators, as a checkpoint keeps them."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_gauss"][0], state["numpy_gauss"][1]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class RunCheckpoints:
    """The checkpoint files of the run folder ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.last = Path(run_dir) / "checkpoints" / "last.pt"
        #: The checkpoint before ``last.pt``: a resume falls back to it when last.pt is damaged.
        self.previous = Path(run_dir) / "checkpoints" / "previous.pt"

    def exists(self) -> bool:
        """Whether the folder holds a run (a fresh run there is refused; the demo resumes it)."""
        return self.last.exists()

    def write(self, state: dict[str, Any]) -> None:
        """``state`` (the engine's, without its format and RNG states) as the new ``last.pt``."""
        state = {"format": CHECKPOINT_FORMAT, **state, "rng": rng_state()}
        with atomic_path(self.last) as tmp:
            torch.save(state, tmp)
            self._keep_previous()

    def _keep_previous(self) -> None:
        """Before a new last.pt replaces it, make the current one previous.pt (atomically: a hard link
        renamed into place, a copy where links are not supported); last.pt stays in place throughout."""
        last, previous = self.last, self.previous
        if not last.is_file():
            return
        with atomic_path(previous) as tmp:
            tmp.unlink()
            try:
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged file or not ours
            raise TrainingError(f"cannot read checkpoint {path} ({exc.__class__.__name__})") from None
        missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else ["format"]
        if missing or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a compress-edge training checkpoint")
        return state

    def read(self, *, is_main: bool = True) -> tuple[dict[str, Any], Path]:
        """The state to continue from and the file it came from: last.pt, or previous.pt (with a warning;
        the main process puts a damaged last.pt aside as last.damaged.pt) when last.pt is missing or
        damaged."""
        path, previous = self.last, self.previous
        if not path.is_file() and not previous.is_file():
            raise TrainingError(f"no checkpoint to resume from at {path}; start a new run instead of --resume")
        try:
            state = self._read(path) if path.is_file() else None
            problem = None if state is not None else f"{path} is missing"
        except TrainingError as exc:
            state, problem = None, str(exc)
        if state is None:
            try:
                state = self._read(previous) if previous.is_file() else None
            except TrainingError:
                state = None
            if state is None:
                raise TrainingError(f"{problem}, and there is no readable {previous.name} before it; start a new run "
                                    "(another --out)")
            if is_main and self.last.is_file():  # never rotated into previous.pt
                os.replace(self.last, self.last.with_name("last.damaged.pt"))
            logger.warning("%s; resuming from %s, the checkpoint before it (the steps after it are trained again)",
                           problem, previous)
            path = previous
        return state, path
