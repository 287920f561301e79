"""Reduced precision from the float32 ONNX file: FP16, INT8 for x86 CPUs, INT8 for TensorRT.

- ``fp16``: float16 weights and compute, float32 input and output (casts at the edges), so every
  caller keeps feeding float32 images.
- ``int8-cpu``: onnxruntime static quantisation in QDQ format with the settings onnxruntime runs
  fastest on x86 (VNNI) CPUs: unsigned 8-bit activations (asymmetric), signed 8-bit per-channel
  symmetric weights, full range (no ``reduce_range``: VNNI does not saturate), calibrated on images.
- ``int8-trt``: what TensorRT's explicit quantisation takes: signed 8-bit symmetric activations
  and weights (zero points 0), per-channel weights, biases left in float, only standard ONNX
  ``QuantizeLinear`` / ``DequantizeLinear`` (no ``com.microsoft`` operators).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.onnx import INPUT_NAME, save_model_proto, set_metadata

from compress_edge.deps import require
from compress_edge.errors import DataError, ExportError
from compress_edge.spec import ModelSpec

log = logging.getLogger(__name__)

INT8_TARGETS = ("cpu", "trt")
CALIB_METHODS = ("minmax", "percentile", "entropy")
#: Op types quantised for TensorRT: the compute-heavy ones; TensorRT fuses the rest around them.
TRT_OP_TYPES = ["Conv", "Gemm", "MatMul", "ConvTranspose"]


@dataclass
class QuantizeResult:
    path: str
    precision: str
    seconds: float
    settings: dict[str, Any]
    calib_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# FP16
# --------------------------------------------------------------------------------------------------
def to_fp16(src: str | os.PathLike, dst: str | os.PathLike, spec: ModelSpec) -> QuantizeResult:
    """``src`` (float32 ONNX) -> ``dst`` with float16 weights and compute, float32 I/O."""
    onnx = require("onnx", "the FP16 export")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    start = time.perf_counter()
    proto = onnx.load(str(src))
    try:
        half = convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=[], node_block_list=_normalisation_nodes(proto.graph)
        )
    except Exception as exc:
        raise ExportError(f"cannot convert {src} to float16 ({type(exc).__name__}: {exc})") from None
    _toposort(half.graph)  # the converter appends its input casts at the end of the node list
    set_metadata(half, spec, "fp16", {"compress_edge.source": Path(src).name})
    _check(half, dst)
    save_model_proto(half, dst)
    return QuantizeResult(
        path=str(dst),
        precision="fp16",
        seconds=time.perf_counter() - start,
        settings={"weights": "float16", "compute": "float16", "io": "float32"},
    )


# --------------------------------------------------------------------------------------------------
# INT8
# --------------------------------------------------------------------------------------------------
def int8_settings(target: str, calib_method: str = "percentile") -> dict[str, Any]:
    """The quantize_static settings for ``target`` ("cpu" or "trt"), as plain values."""
    if target not in INT8_TARGETS:
        raise ExportError(f"unknown INT8 target {target!r}; choose one of: {', '.join(INT8_TARGETS)}")
    if calib_method not in CALIB_METHODS:
        raise ExportError(f"unknown calibration method {calib_method!r}; choose one of: {', '.join(CALIB_METHODS)}")
    if target == "cpu":
        return {
            "format": "QDQ",
            "activations": "QUInt8 (asymmetric)",
            "weights": "QInt8 symmetric, per-channel",
            "reduce_range": False,
            "calibration": calib_method,
            "op_types": "onnxruntime defaults",
            "bias": "int32 (onnxruntime default)",
        }
    return {
        "format": "QDQ",
        "activations": "QInt8 symmetric",
        "weights": "QInt8 symmetric, per-channel",
        "reduce_range": False,
        "calibration": calib_method,
        "op_types": TRT_OP_TYPES,
        "bias": "float (not quantised)",
    }


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    spec: ModelSpec,
    calib: np.ndarray,
    *,
    target: str = "cpu",
    calib_method: str = "percentile",
    batch_size: int = 16,
    progress: bool = False,
) -> QuantizeResult:
    """Statically quantise ``src`` (float32 ONNX) into ``dst`` for ``target``.

    calib: preprocessed calibration images float32 (N, C, S, S) (see ``parity.load_check_images``).
    """
    ort_q = require("onnxruntime", "INT8 quantisation")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = int8_settings(target, calib_method)
    calib = check_calibration(calib, spec)
    # onnxruntime's histogram calibrators (percentile, entropy) stack every batch's outputs into one
    # array: a ragged last batch makes them fail. Equal batches that cover every image once instead.
    batch_size = calibration_batch(len(calib), batch_size)
    settings["calibration_batch"] = batch_size
    input_name = _input_name(src)
    start = time.perf_counter()

    from compress_edge.progress import optional_bar

    bar = optional_bar(progress)
    task = bar.add_task(f"calibrating int8-{target}", total=len(calib)) if bar is not None else None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            batch = calib[self.i : self.i + batch_size]
            self.i += len(batch)
            if bar is not None:
                bar.advance(task, len(batch))
            return {input_name: batch}

        def rewind(self) -> None:
            self.i = 0

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    # Percentile (99.999) clips the rare outliers MinMax would stretch the range for; it measured better
    # on trained MobileNets for both targets (symmetric TensorRT ranges gain most).
    extra: dict[str, Any] = {"WeightSymmetric": True, "CalibPercentile": 99.999}
    if target == "cpu":
        extra.update(ActivationSymmetric=False)
        kwargs: dict[str, Any] = {"activation_type": QuantType.QUInt8}
    else:
        extra.update(ActivationSymmetric=True, QuantizeBias=False, UseQDQContribOps=False)
        kwargs = {"activation_type": QuantType.QInt8, "op_types_to_quantize": TRT_OP_TYPES}

    with tempfile.TemporaryDirectory(prefix="compress-edge-q-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        raw = Path(tmp) / "q.onnx"
        try:
            # Shape inference and onnxruntime's basic (standard-op) graph optimisation first, as
            # onnxruntime recommends: quantisation then sees folded constants and known shapes.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:
            log.debug("quantisation pre-processing failed (%s); quantising the graph as exported", exc)
            pre = Path(src)

        def run(method: str) -> None:
            if bar is not None:
                bar.reset(task)
                bar.start()
            try:
                with _quiet_stdout():
                    quantize_static(
                        str(pre),
                        str(raw),
                        Reader(),
                        quant_format=QuantFormat.QDQ,
                        weight_type=QuantType.QInt8,
                        per_channel=True,
                        reduce_range=False,
                        calibrate_method=methods[method],
                        extra_options=extra,
                        **kwargs,
                    )
            finally:
                if bar is not None:
                    bar.stop()

        try:
            run(calib_method)
        except Exception as exc:
            if calib_method == "minmax":
                raise ExportError(f"INT8 quantisation ({target}) of {src} failed: {type(exc).__name__}: {exc}") from None
            # Histogram calibration fails on degenerate activations (a constant tensor): MinMax does not.
            log.warning("%s calibration failed (%s); calibrating with minmax instead", calib_method, exc)
            settings["calibration"] = "minmax (fallback)"
            settings["calibration_fallback_reason"] = f"{calib_method} failed: {type(exc).__name__}: {exc}"
            try:
                run("minmax")
            except Exception as exc2:
                raise ExportError(
                    f"INT8 quantisation ({target}) of {src} failed: {type(exc2).__name__}: {exc2}"
                ) from None
        onnx = require("onnx", "INT8 quantisation")
        proto = onnx.load(str(raw))
    del ort_q
    _drop_unused_domains(proto)
    set_metadata(
        proto,
        spec,
        f"int8-{target}",
        {"compress_edge.source": Path(src).name, "compress_edge.calib_images": str(len(calib))},
    )
    if target == "trt":
        problems = check_trt_int8(proto)
        if problems:
            raise ExportError(f"the int8-trt graph is not what TensorRT takes: {'; '.join(problems)}")
    _check(proto, dst)
    save_model_proto(proto, dst)
    return QuantizeResult(
        path=str(dst),
        precision=f"int8-{target}",
        seconds=time.perf_counter() - start,
        settings=settings,
        calib_images=int(len(calib)),
    )


def calibration_batch(n: int, batch_size: int) -> int:
    """The largest batch size up to ``batch_size`` that splits ``n`` images into equal batches."""
    batch_size = max(1, min(int(batch_size), int(n)))
    return next(b for b in range(batch_size, 0, -1) if n % b == 0)


def check_calibration(calib: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """``calib`` as contiguous float32 (N, C, S, S) for ``spec``, or DataError."""
    calib = np.asarray(calib)
    expected = (spec.channels, spec.image_size, spec.image_size)
    if calib.ndim != 4 or tuple(calib.shape[1:]) != expected:
        raise DataError(
            f"calibration images have shape {tuple(calib.shape)}; this model takes (N, {', '.join(map(str, expected))})"
            " (wrong size or channel count): pass images preprocessed for it, or an image folder"
        )
    if len(calib) == 0:
        raise DataError("no calibration images; pass --calib-data with at least one image")
    return np.ascontiguousarray(calib, dtype=np.float32)


def check_trt_int8(proto) -> list[str]:
    """What in ``proto`` TensorRT's explicit quantisation would not take (empty: nothing).

    Standard ONNX domains only; every QuantizeLinear / DequantizeLinear int8 with zero point 0;
    Conv / Gemm weights quantised per output channel; biases kept in float.
    """
    from onnx import TensorProto, numpy_helper

    problems = []
    domains = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if domains:
        problems.append(f"non-standard operator domains {domains}")
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is None:
                continue
            if zp.data_type != TensorProto.INT8:
                problems.append(f"{node.name}: zero point of type {TensorProto.DataType.Name(zp.data_type)}, not INT8")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{node.name}: non-zero zero point (asymmetric)")
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w = producers.get(node.input[1])
        if w is None or w.op_type != "DequantizeLinear":
            problems.append(f"{node.name}: weights not quantised")
            continue
        scale = inits.get(w.input[1])
        if scale is not None and len(scale.dims) != 1:
            problems.append(f"{node.name}: weights quantised per tensor, not per channel")
        if len(node.input) > 2 and node.input[2]:
            b = producers.get(node.input[2])
            if b is not None and b.op_type == "DequantizeLinear":
                problems.append(f"{node.name}: bias quantised")
    return problems


def _normalisation_nodes(graph) -> list[str]:
    """Names of the L2 normalisation nodes (ReduceL2 and everything after it), kept in float32:
    a float16 sum of squares overflows above 65504, and the 1e-12 floor underflows to 0."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    blocked: dict[str, None] = {}
    todo = [n for n in graph.node if n.op_type == "ReduceL2"]
    while todo:
        node = todo.pop()
        if node.name in blocked:
            continue
        blocked[node.name] = None
        for out in node.output:
            todo.extend(consumers.get(out, []))
    return list(blocked)


@contextlib.contextmanager
def _quiet_stdout():
    # onnxruntime's calibrators print their histogram settings to stdout; the CLI's stdout is for results.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _input_name(path: str | os.PathLike) -> str:
    onnx = require("onnx", "INT8 quantisation")
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    return names[0] if names else INPUT_NAME


def _drop_unused_domains(proto) -> None:
    """Remove opset imports no node uses (quantize_static declares com.microsoft ones regardless)."""
    used = {n.domain or "" for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (Kahn)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    ordered = []
    pending = nodes
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"the converted graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _check(proto, dst: str | os.PathLike) -> None:
    onnx = require("onnx", "checking ONNX files")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejects {Path(dst).name}: {exc}") from None
