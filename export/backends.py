"""The Embedder backends: PyTorch eager, onnxruntime and TensorRT (OpenVINO's is in
:mod:`compress_edge.export.openvino`, beside its export).

Torch-free at import time: torch is imported only inside the PyTorch and TensorRT backends, so the
device's query path (onnxruntime) runs without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.embedder import Embedder, GraphIO, ModelFileEmbedder
from compress_edge.export.exported import _sniff, override_norm

from compress_edge.deps import require
from compress_edge.devices import parse_device, torch_device_name, unknown_device
from compress_edge.errors import DependencyError, ModelError
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------
class TorchEmbedder(Embedder):
    """A compress-edge model (or an architecture name) run by PyTorch eager."""

    name = "torch"

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        threads: int | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        module: Any = None,
        spec: ModelSpec | None = None,
        weights: str | os.PathLike | None = None,
        weights_option: str = "--weights",
    ) -> None:
        torch = require("torch", "the PyTorch backend")
        self.device = torch_device_name(device or "cpu")
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        if module is not None:
            if spec is None:
                raise ModelError("a module given to TorchEmbedder needs its ModelSpec")
            self.model = module.to(self.device).eval()
            self.spec = spec
        else:
            self.model, self.spec = _resolve(model, weights, weights_option, image_size=image_size, device=self.device)
        self.spec = override_norm(self.spec, mean, std, str(model))
        self.path = str(model)
        self.precision = "fp32"
        self._torch = torch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return self.model(x).float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def _resolve(model: str, weights: Any, weights_option: str, **kwargs: Any) -> tuple[Any, ModelSpec]:
    """resolve_model, its refusals naming ``weights_option`` where they say --weights."""
    from compress_edge.models.resolve import resolve_model

    try:
        return resolve_model(model, weights=weights, **kwargs)
    except ModelError as exc:
        if weights_option == "--weights":
            raise
        raise ModelError(str(exc).replace("--weights", weights_option)) from None


# --------------------------------------------------------------------------------------------------
# onnxruntime (torch-free)
# --------------------------------------------------------------------------------------------------
class OnnxRuntimeEmbedder(ModelFileEmbedder):
    """An ONNX file run by onnxruntime (CPU or CUDA execution provider). Needs no torch.

    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    image_size / mean / std: required for an ONNX file without compress-edge metadata; for one with
    it, mean / std override the stored values (with a warning).
    optimization: onnxruntime's graph optimisation level: "all" (default), "extended", "basic" or "none".
    """

    name = "onnxruntime"
    kind = "ONNX file"

    def _load(self, path: Path, device: str, optimization: str = "all") -> GraphIO:
        ort = require("onnxruntime", "the onnxruntime backend")
        self.device, providers = _ort_providers(ort, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
            raise ModelError(_not_onnx_message(path, exc)) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        io = GraphIO(len(inputs), len(outputs), list(inputs[0].shape) if inputs else [],
                     list(outputs[0].shape) if outputs else [],
                     dict(self.session.get_modelmeta().custom_metadata_map or {}), probe=self._probe_dim)
        if io.is_embedding_graph:  # else refused by the caller
            self._input, self._output = inputs[0].name, outputs[0].name
            if inputs[0].type != "tensor(float)":
                raise ModelError(
                    f"{path} takes {inputs[0].type} input; compress-edge runs models with float32 image input"
                )
        return io

    def _probe_dim(self, image_size: int) -> int:
        x = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
        return int(np.asarray(self.session.run([self._output], {self._input: x})[0]).reshape(1, -1).shape[1])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self._output], {self._input: batch})
        return np.asarray(out, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "providers": list(self.session.get_providers())}

    def close(self) -> None:
        self.session = None


def _ort_providers(ort, device: str) -> tuple[str, list]:
    kind, index = parse_device(device or "cpu")
    have = ort.get_available_providers()
    if kind == "auto":
        kind = "cuda" if "CUDAExecutionProvider" in have else "cpu"
    if kind == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if kind != "cuda":
        raise unknown_device(device)
    if "CUDAExecutionProvider" not in have:
        raise DependencyError(
            f"onnxruntime here has no CUDA execution provider (it has: {', '.join(have)}); install "
            "onnxruntime-gpu for --device cuda, or use --device cpu"
        )
    name = "cuda" if index is None else f"cuda:{index}"
    return name, [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]


def _not_onnx_message(path: Path, exc: BaseException) -> str:
    head = path.read_bytes()[:16] if path.is_file() else b""
    what = _sniff(head)
    detail = " ".join(str(exc).split())
    if len(detail) > 200:
        detail = detail[:197] + "..."
    if what:
        return f"{path} is not an ONNX model: it looks like {what}; pass the model.onnx that 'compress-edge export' wrote"
    return f"{path} is not an ONNX model onnxruntime can load ({detail}); re-export it with 'compress-edge export'"



# --------------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------------
class TensorRTEmbedder(Embedder):
    """A TensorRT engine (``model.engine`` + ``model.engine.json``) run on a CUDA GPU.

    Input and output go through torch CUDA tensors (no pycuda). The engine must have been built by
    the TensorRT module and version installed here, on this kind of GPU.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, device: str = "cuda", **_: Any) -> None:
        from compress_edge.export.tensorrt import EngineRunner

        self._runner = EngineRunner(path, device=device)
        self.spec = self._runner.spec
        self.path = str(path)
        self.device = self._runner.device
        self.precision = self._runner.precision
        self.min_batch, self.max_batch = self._runner.min_batch, self._runner.max_batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._runner.run(batch)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "tensorrt": self._runner.sidecar.get("tensorrt")}

    def close(self) -> None:
        self._runner.close()

