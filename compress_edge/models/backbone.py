"""The table of architectures: :func:`register_model` adds a backbone builder under a name; the builders
live in :mod:`~compress_edge.models.cnn` (torchvision CNNs) and :mod:`~compress_edge.models.vit` (timm
Vision Transformers), and :mod:`~compress_edge.models.registry` builds models from the table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Backbone:
    """What a builder returns.

    module: maps (B, 3, H, W) images to pooled features (B, feature_dim).
    feature_dim: F.
    feature_map: name (within ``module``) of the submodule whose output is the last spatial map
        (B, C, h, w), before pooling.
    """

    module: nn.Module
    feature_dim: int
    feature_map: str
    pool: nn.Module | None = None  # (output of module) -> (B, F) when ``module`` gives tokens (ViTs)


#: Architecture families: torchvision CNNs and timm Vision Transformers.
FAMILIES = ("cnn", "vit")


@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Callable[..., Backbone]
    defaults: dict[str, Any]  # the builder's own keyword arguments (besides small_input) and defaults
    summary: str
    family: str = "cnn"


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, family: str = "cnn"
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator adding a backbone builder to the registry under ``name`` (``family``: "cnn" or "vit").

    The builder takes keyword-only arguments: ``small_input: bool`` and its own architecture options
    (with defaults, JSON-serialisable), and returns a :class:`Backbone`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")  # a programming error, not the user's

    def decorate(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")  # a programming error, not the user's
        params = inspect.signature(fn).parameters
        if "small_input" not in params:
            raise TypeError(f"builder {fn.__name__} must accept small_input")
        defaults = {
            k: p.default for k, p in params.items() if k != "small_input" and p.default is not p.empty
        }
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = _Entry(name, fn, defaults, summary, family)
        return fn

    return decorate
