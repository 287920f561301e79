"""``compress-edge models inspect``: what a checkpoint or model file holds, which architecture its
weights fit (given, from its spec, or guessed), and how well."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from compress_edge.errors import ModelError
from compress_edge.models.formats import Detected, detect_format, read_checkpoint
from compress_edge.models.layouts import LoadReport, _backbone_of, guess_arch, match_backbone
from compress_edge.models.registry import (
    create_model,
    list_models,
    rebuild,
    unknown_arch_message,
)
from compress_edge.models.spec import ModelSpec
from compress_edge.storage import sha256_file


# --------------------------------------------------------------------------------------------------
# Inspection (``compress-edge models inspect``)
# --------------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """What a file holds and how it fits an architecture (given, from its spec, or guessed)."""

    path: str
    format: str
    container: str | None
    tensors: int
    top_keys: list[str]
    arch: str | None
    small_input: bool | None
    arch_source: str  # "given", "spec", "guessed" or "none"
    report: LoadReport | None
    spec: ModelSpec | None
    weights_verified: bool | None = None  # our own files: the sha256 the spec recorded matches
    detected: Detected | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "container": self.container,
            "tensors": self.tensors,
            "top_keys": self.top_keys,
            "arch": self.arch,
            "small_input": self.small_input,
            "arch_source": self.arch_source,
            "fits": self.report.fits() if self.report else None,
            "report": self.report.to_dict() if self.report else None,
            "spec": self.spec.to_dict() if self.spec else None,
            "weights_verified": self.weights_verified,
        }


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    small_input: bool = False,
    key: str | None = None,
    fmt: str = "auto",
) -> CheckpointInfo:
    """Detect a checkpoint's format and match it against ``arch`` (or the spec's, or the best guess).

    Never raises for a checkpoint that does not fit: ``info.report.fits()`` says whether it does.
    """
    if arch is not None and arch not in list_models():
        raise ModelError(unknown_arch_message(arch))
    raw = read_checkpoint(path)
    detected = detect_format(raw, fmt=fmt, key=key)
    info = CheckpointInfo(
        path=str(raw.path),
        format=detected.format,
        container=detected.container,
        tensors=len(detected.tensors),
        top_keys=[str(k) for k in list(raw.top)[:20]] if not raw.is_own else [],
        arch=None,
        small_input=None,
        arch_source="none",
        report=None,
        spec=raw.spec,
        detected=detected,
    )
    if raw.spec is not None and raw.spec.weights_sha256:
        info.weights_verified = sha256_file(raw.path) == raw.spec.weights_sha256
    if arch is None and raw.spec is not None:
        with torch.device("meta"):
            meta = rebuild(raw.spec.arch, raw.spec.arch_kwargs, normalize=raw.spec.normalize)
        small = bool(meta.arch_kwargs["small_input"])
        info.arch, info.small_input, info.arch_source = raw.spec.arch, small, "spec"
    elif arch is not None:
        with torch.device("meta"):
            meta = create_model(arch, small_input=small_input)
        info.arch, info.small_input, info.arch_source = arch, small_input, "given"
    else:
        guesses = guess_arch(detected)
        best = guesses[0] if guesses else None
        if best is None or best.score <= 0:
            return info
        info.arch, info.small_input, info.arch_source = best.arch, best.small_input, "guessed"
        info.report = best.report
        info.report.path = str(raw.path)
        return info
    shapes, children = _backbone_of(meta)
    info.report, _ = match_backbone(detected, shapes, children, arch=info.arch or "")
    info.report.path = str(raw.path)
    return info
