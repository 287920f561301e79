"""ModelSpec: the one contract that travels with every artifact (checkpoint, ONNX file, engine, index).

Torch-free on purpose: the query path on a device reads it with numpy and onnxruntime only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress_edge.errors import ModelError, SpecMismatchError

SPEC_VERSION = 1
SPEC_FILENAME = "model.json"
WEIGHTS_FILENAME = "model.safetensors"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ITU-R BT.601 luma weights of red, green and blue: how much each channel counts in a grey image.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def is_grey_input(spec: ModelSpec) -> bool:
    """Whether the model of ``spec`` turns its input grey first (``grey_input`` in its arch_kwargs)."""
    return bool((spec.arch_kwargs or {}).get("grey_input"))


@dataclass(frozen=True)
class ModelSpec:
    """Everything a consumer needs to feed a model and trust its output.

    arch / arch_kwargs: registry name and the keyword arguments given to ``create_model``.
    image_size: square input side in pixels; channels: input channels (3).
    mean / std: per-channel normalisation applied to [0, 1] pixels.
    embed_dim: D of the (B, D) output; normalize: outputs are L2-normalised.
    weights_sha256: hash of the weights file the embeddings came from (None when unknown).
    source: provenance, e.g. {"kind": "distill", "method": "compress-2q", "teacher": "...", "run": "..."}.
    """

    arch: str
    embed_dim: int
    image_size: int = 224
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    normalize: bool = True
    weights_sha256: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if not isinstance(self.arch, str) or not self.arch:
            problems.append("arch must be a non-empty string")
        if int(self.embed_dim) <= 0:
            problems.append(f"embed_dim must be positive, got {self.embed_dim}")
        if int(self.image_size) <= 0:
            problems.append(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean and std need {self.channels} values each")
        if any(s <= 0 for s in self.std):
            problems.append("std values must be positive")
        if problems:
            raise ModelError("invalid ModelSpec: " + "; ".join(problems))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise ModelError("a ModelSpec must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("arch", "embed_dim") if k not in data]
        if missing:
            raise ModelError(f"ModelSpec is missing {', '.join(missing)}; was it written by compress-edge?")
        version = int(data.get("version", SPEC_VERSION))
        if version > SPEC_VERSION:
            raise ModelError(
                f"ModelSpec version {version} is newer than this compress-edge understands "
                f"({SPEC_VERSION}); upgrade compress-edge"
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str, where: str | os.PathLike | None = None) -> ModelSpec:
        """Parse a spec; ``where`` (a file, or "the metadata of FILE") is named in every refusal."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            place = f" in {where}" if where is not None else ""
            raise ModelError(f"the ModelSpec{place} is not valid JSON ({exc}); it was damaged or edited: save or "
                             "export the model again") from None
        try:
            return cls.from_dict(data)
        except ModelError as exc:
            if where is None:
                raise
            raise ModelError(f"{where}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        from compress_edge.storage import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelSpec:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        if not path.is_file():
            raise ModelError(f"no ModelSpec at {path}; pass a model folder that holds {SPEC_FILENAME}")
        return cls.from_json(path.read_text(encoding="utf-8"), where=path)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    # -- compatibility ---------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The fields that decide whether two embeddings live in the same space."""
        return {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "embed_dim": int(self.embed_dim),
            "image_size": int(self.image_size),
            "channels": int(self.channels),
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "normalize": bool(self.normalize),
            "weights_sha256": self.weights_sha256,
        }

    def check_compatible(self, other: ModelSpec, what: str = "this artifact") -> None:
        """Raise SpecMismatchError when ``other`` would not give embeddings comparable with ``self``.

        A weights hash missing on either side is not counted as a difference.
        """
        a, b = self.identity(), other.identity()
        if a["weights_sha256"] is None or b["weights_sha256"] is None:
            a.pop("weights_sha256")
            b.pop("weights_sha256")
        diffs = [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]
        if diffs:
            raise SpecMismatchError(
                f"{what} was made with a different model ({'; '.join(diffs[:3])}); "
                "use the model it was built with, or rebuild it with this one"
            )

    # -- ONNX metadata_props ------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        """String key/values for ONNX ``metadata_props`` (the spec plus ONNX's ``Image.*`` keys)."""
        return {
            "compress_edge.models.spec": json.dumps(self.to_dict()),
            "Image.BitmapPixelFormat": "Rgb8",
            "Image.ColorSpaceGamma": "SRGB",
            "Image.NominalPixelRange": "Normalized_0_1",
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], where: str | os.PathLike | None = None) -> ModelSpec | None:
        """The spec in ONNX ``metadata_props``, or None; ``where`` is the file, named in a refusal."""
        text = props.get("compress_edge.models.spec")
        if not text:
            return None
        return cls.from_json(text, where=f"the metadata of {where}" if where is not None else None)

