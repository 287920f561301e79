"""The one device choice: what ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) means,
for training, evaluation, PyTorch inference and onnxruntime alike.

Torch-light: :func:`parse_device` needs only the standard library (onnxruntime's provider choice
uses it on the torch-free device install); :func:`torch_device_name` and :func:`resolve_device`
import torch when called.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from compress_edge.errors import ModelError, TrainingError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"

_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


class DeviceError(ModelError, TrainingError):
    """An unknown device, or CUDA asked for where none is visible. A ModelError (what opening a model
    for inference raised) and a TrainingError (what a training run raised) alike."""


def unknown_device(name: Any) -> DeviceError:
    """The error for a device name outside :data:`DEVICE_CHOICES`."""
    return DeviceError(f"unknown device {name!r}; choose one of: {DEVICE_CHOICES}")


def parse_device(name: Any) -> tuple[str, int | None]:
    """``name`` (a string, a torch.device or None) as (kind, index): kind one of auto, cpu, cuda,
    mps; index the N of ``cuda:N``, else None. None and "" mean auto; case does not matter."""
    text = "" if name is None else str(name).strip().lower()
    if not text:
        return "auto", None
    m = _DEVICE.fullmatch(text)
    if m is None or (m.group(2) is not None and m.group(1) not in ("cuda", "cpu")):
        raise unknown_device(name)
    if m.group(1) == "cpu":  # torch's "cpu:0" is the CPU
        return "cpu", None
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def torch_device_name(name: Any = "auto", local_rank: int | None = None) -> str:
    """The torch device for ``name``: ``auto`` is CUDA when torch sees a GPU, else the CPU; CUDA
    asked for without a visible GPU is a :class:`DeviceError`. ``local_rank`` (the process of a
    distributed run) is the index a bare ``cuda`` or ``auto`` gets; without it they stay ``cuda``."""
    kind, index = parse_device(name)
    if kind in ("cpu", "mps"):
        return kind
    import torch

    if not torch.cuda.is_available():
        if kind == "auto":
            return "cpu"
        raise DeviceError(f"--device {name} was asked for, but torch sees no CUDA GPU; use --device cpu")
    if index is None:
        index = local_rank
    return "cuda" if index is None else f"cuda:{index}"


def resolve_device(name: Any = "auto", local_rank: int = 0) -> torch.device:
    """:func:`torch_device_name` as a ``torch.device``, a bare ``cuda`` on this process's GPU."""
    import torch

    return torch.device(torch_device_name(name, local_rank))
