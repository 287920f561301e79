"""The one MODEL resolver: :func:`open_embedder` turns any MODEL argument into an
:class:`~compress_edge.export.embedder.Embedder`, whatever runs it.

Which backend it picks for ``backend="auto"``:

- ``*.onnx``: onnxruntime; the ModelSpec comes from the file's ``metadata_props``.
- ``*.engine`` / ``*.plan``: TensorRT; the ModelSpec comes from the sidecar ``<engine>.json``.
- ``*.xml``: OpenVINO (an IR and its ``.bin``); the ModelSpec comes from the IR's ``rt_info``.
- anything else (a compress-edge model or run folder, an architecture name, with ``weights`` a
  third-party checkpoint): PyTorch, through :func:`compress_edge.models.resolve.resolve_model`.

Torch-free at import time on purpose: a device's query path is this module, ``compress_edge.data.images``
(numpy + PIL) and onnxruntime. torch is imported only when a PyTorch or TensorRT model is opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from compress_edge.export.backends import OnnxRuntimeEmbedder, TensorRTEmbedder, TorchEmbedder
from compress_edge.export.embedder import Embedder
from compress_edge.export.exported import (
    ENGINE_SUFFIXES,
    IR_SUFFIXES,
    ONNX_SUFFIXES,
    is_exported,
    read_sidecar,
)

from compress_edge.errors import ModelError
from compress_edge.models.spec import ModelSpec

#: Backend names the command line's --backend offers, and the aliases open_embedder maps to them
#: (open_embedder also takes "openvino", which --backend auto picks for a .xml file).
BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
_ALIASES = {
    "auto": "auto",
    "torch": "torch",
    "pytorch": "torch",
    "onnxruntime": "onnxruntime",
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
    "tensorrt": "tensorrt",
    "trt": "tensorrt",
    "openvino": "openvino",
    "ov": "openvino",
}


def backend_for(model: str | os.PathLike, backend: str = "auto") -> str:
    """The backend name ("torch", "onnxruntime", "tensorrt" or "openvino") ``open_embedder`` would use."""
    key = _ALIASES.get(str(backend).lower())
    if key is None:
        raise ModelError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    suffix = Path(str(model)).suffix.lower()
    if key == "auto":
        if suffix in ONNX_SUFFIXES:
            return "onnxruntime"
        if suffix in ENGINE_SUFFIXES:
            return "tensorrt"
        if suffix in IR_SUFFIXES:
            return "openvino"
        return "torch"
    if key == "onnxruntime" and suffix not in ONNX_SUFFIXES:
        raise ModelError(f"the onnxruntime backend runs a .onnx file, not {model}; export it first")
    if key == "tensorrt" and suffix not in ENGINE_SUFFIXES:
        raise ModelError(f"the TensorRT backend runs a .engine file, not {model}; build one with export --trt")
    if key == "openvino" and suffix not in IR_SUFFIXES:
        raise ModelError(f"the OpenVINO backend runs a .xml file (with its .bin), not {model}; write one with "
                         "'compress-edge export --openvino'")
    if key == "torch" and is_exported(model):
        raise ModelError(
            f"the torch backend runs a compress-edge model folder or an architecture name, not {model}; "
            "use --backend auto"
        )
    return key


def open_embedder(
    model: str | os.PathLike,
    backend: str = "auto",
    *,
    device: str = "cpu",
    threads: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    weights: str | os.PathLike | None = None,
    weights_option: str = "--weights",
) -> Embedder:
    """Open ``model`` for embedding: the one place a MODEL argument is resolved.

    model: a compress-edge model/run folder or architecture name (PyTorch), a ``.onnx`` file
      (onnxruntime), a ``.engine`` file (TensorRT), or a ``.xml`` OpenVINO IR (OpenVINO).
    backend: "auto" (decide by what ``model`` is), "torch", "onnxruntime", "tensorrt" or "openvino".
    device: "cpu", "cuda", "cuda:N" or "auto" (TensorRT always runs on a GPU; OpenVINO takes "cpu",
      "gpu", "gpu.N", "npu", and "auto" for its GPU when it sees one).
    threads: CPU threads (torch intra-op / onnxruntime intra-op / OpenVINO inference threads).
    image_size / mean / std: needed for an ONNX file without compress-edge metadata; otherwise
      they override the stored spec (with a warning).
    weights: a third-party checkpoint (or compress-edge model) for an architecture-name ``model``;
      ``weights_option`` is the option that gave it, named in refusals.
    """
    kind = backend_for(model, backend)
    if weights is not None and kind != "torch":
        raise ModelError(f"{weights_option} goes with an architecture name, not with {model}")
    if kind == "onnxruntime":
        return OnnxRuntimeEmbedder(model, device=device, threads=threads, image_size=image_size, mean=mean, std=std)
    if kind == "tensorrt":
        return TensorRTEmbedder(model, device="cuda" if device in ("cpu", "auto") else device)
    if kind == "openvino":
        from compress_edge.export.openvino import OpenVinoEmbedder

        return OpenVinoEmbedder(model, device=device, threads=threads, image_size=image_size, mean=mean, std=std)
    return TorchEmbedder(str(model), device=device, threads=threads, image_size=image_size, mean=mean, std=std,
                         weights=weights, weights_option=weights_option)



def exported_spec(ref: str | os.PathLike) -> ModelSpec:
    """The ModelSpec of an exported file without embedding anything: an ONNX file's or an IR's metadata
    (the file is opened on the CPU), an engine's sidecar (no GPU needed)."""
    if Path(str(ref)).suffix.lower() in ONNX_SUFFIXES + IR_SUFFIXES:
        with open_embedder(ref, device="cpu") as emb:
            return emb.spec
    return ModelSpec.from_dict(read_sidecar(ref)["spec"])
