"""Export for devices: ONNX (with the ModelSpec inside), FP16 / INT8, TensorRT engines, OpenVINO IR,
and the one inference interface (:class:`~compress_edge.export.embedder.Embedder`) that runs any of them.

Modules: ``pipeline`` (:func:`~compress_edge.export.pipeline.export_model`: the whole stage, one method
per format, ``export.json``), ``onnx`` (export, metadata), ``quantize`` (fp16, int8-cpu, int8-trt),
``calibration`` (INT8 calibration images and methods), ``exclusions`` (what INT8 keeps in float),
``tensorrt`` (engine build and run), ``openvino`` (IR fp32 / fp16, NNCF int8, its Embedder),
``runtimes`` (the MODEL resolver; torch-free at import), ``parity`` (cosine / neighbour-overlap
checks, check images), ``bench`` / ``bench_models`` (timing). Heavy packages are imported where they
are used.
"""

from __future__ import annotations

from compress_edge.export.embedder import Embedder
from compress_edge.export.runtimes import open_embedder

__all__ = ["Embedder", "open_embedder"]
