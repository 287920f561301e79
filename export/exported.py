"""What an exported model file says about itself, read without running it: the suffixes of each kind,
the precision key of ONNX metadata, an engine's sidecar JSON, the ModelSpec in ONNX ``metadata_props``,
and a guess at what a file that is none of these really is.

Torch-free and runtime-free: the standard library only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress_edge.errors import ModelError
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
IR_SUFFIXES = (".xml",)
#: ONNX metadata key for the precision of an exported file (fp32, fp16, int8-cpu, int8-trt).
PRECISION_KEY = "compress_edge.precision"


def is_exported(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names an exported model file (.onnx, a TensorRT engine or an OpenVINO IR)."""
    return Path(str(ref)).suffix.lower() in ONNX_SUFFIXES + ENGINE_SUFFIXES + IR_SUFFIXES


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON beside an engine (``model.engine.json``), or ModelError saying it is missing."""
    side = Path(str(engine_path) + ".json")
    if not side.is_file():
        raise ModelError(
            f"no {side.name} beside {engine_path}: an engine needs the sidecar JSON 'compress-edge export --trt' "
            "writes (it holds the ModelSpec and the TensorRT version)"
        )
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{side} is not valid JSON ({exc}); build the engine again") from None
    if not isinstance(data, dict) or "spec" not in data:
        raise ModelError(f"{side} holds no ModelSpec; build the engine again with 'compress-edge export --trt'")
    return data


def _sniff(head: bytes) -> str | None:
    """A guess at what a file really is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt checkpoint?)"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle (a PyTorch checkpoint?)"
    if head[:8].lstrip().startswith((b"{", b"[")):
        return "a JSON file"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "an image"
    if len(head) >= 8 and int.from_bytes(head[:8], "little") < 10_000_000 and head[8:9] == b"{":
        return "a safetensors file"
    if b"ftrt" in head or head.startswith(b"ptrt"):
        return "a TensorRT engine"
    return None


def spec_from_onnx_metadata(
    props: dict[str, str],
    path: str | os.PathLike,
    *,
    input_shape: list | None = None,
    output_shape: list | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    probe: Any = None,
) -> ModelSpec:
    """The ModelSpec of an ONNX file from its ``metadata_props`` (``props``).

    A file without compress-edge metadata needs ``image_size``, ``mean`` and ``std`` (the export's
    preprocessing cannot be guessed); its embed_dim comes from the output shape, or from ``probe``
    (a function image_size -> D that runs the model once) when that shape is dynamic.
    """
    spec = ModelSpec.from_metadata(props, where=path)
    fixed_hw = None
    if input_shape and len(input_shape) == 4 and all(isinstance(v, int) and v > 0 for v in input_shape[2:]):
        fixed_hw = (int(input_shape[2]), int(input_shape[3]))
    if input_shape and len(input_shape) != 4:
        raise ModelError(f"{path} takes input of rank {len(input_shape)}; an image model takes (N, C, H, W)")
    if spec is None:
        missing = [
            name
            for name, value in (("--image-size", image_size or (fixed_hw and fixed_hw[0])), ("--mean", mean), ("--std", std))
            if not value
        ]
        if missing:
            raise ModelError(
                f"{path} carries no compress-edge metadata (no ModelSpec in metadata_props), so its "
                f"preprocessing is unknown; pass {', '.join(missing)} (e.g. --image-size 224 --mean "
                "0.485,0.456,0.406 --std 0.229,0.224,0.225), or re-export it with 'compress-edge export'"
            )
        size = int(image_size or fixed_hw[0])  # type: ignore[index]
        if fixed_hw is not None and fixed_hw != (size, size):
            raise ModelError(f"{path} takes {fixed_hw[0]}x{fixed_hw[1]} images, not {size}x{size}")
        dim = output_shape[-1] if output_shape else None
        if not (isinstance(dim, int) and dim > 0):
            dim = probe(size) if probe is not None else None
        if not dim:
            raise ModelError(f"cannot tell the embedding dimension of {path}")
        log.warning("%s has no compress-edge metadata: using %dpx, mean %s, std %s as given", path, size, mean, std)
        return ModelSpec(
            arch="external-onnx",
            embed_dim=int(dim),
            image_size=size,
            mean=tuple(mean),  # type: ignore[arg-type]
            std=tuple(std),  # type: ignore[arg-type]
            normalize=False,
            source={"kind": "onnx-without-metadata", "path": str(path)},
        )
    if image_size is not None and int(image_size) != spec.image_size:
        if fixed_hw is not None:
            raise ModelError(
                f"{path} was exported for {spec.image_size}px images and its graph has a fixed input size; "
                f"--image-size {image_size} cannot change it (export again at that size)"
            )
        log.warning("%s was made for %dpx images; using %dpx as asked", path, spec.image_size, image_size)
        spec = spec.replace(image_size=int(image_size))
    if fixed_hw is not None and fixed_hw != (spec.image_size, spec.image_size):
        raise ModelError(
            f"{path} takes {fixed_hw[0]}x{fixed_hw[1]} images but its metadata says {spec.image_size}px: "
            "the file was edited; export it again"
        )
    return override_norm(spec, mean, std, str(path))


def override_norm(
    spec: ModelSpec, mean: Sequence[float] | None, std: Sequence[float] | None, what: str
) -> ModelSpec:
    changes: dict[str, Any] = {}
    if mean is not None and tuple(float(v) for v in mean) != spec.mean:
        changes["mean"] = tuple(mean)
    if std is not None and tuple(float(v) for v in std) != spec.std:
        changes["std"] = tuple(std)
    if changes:
        log.warning("%s: overriding the stored normalisation with %s (embeddings will differ)", what, changes)
        spec = spec.replace(**changes)
    return spec

