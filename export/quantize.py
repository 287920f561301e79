"""Reduced precision from the float32 ONNX file: FP16, INT8 for x86 CPUs, INT8 for TensorRT.

- ``fp16``: float16 weights and compute, float32 input and output (casts at the edges), so every
  caller keeps feeding float32 images.
- ``int8-cpu``: onnxruntime static quantisation in QDQ format with the settings onnxruntime runs
  fastest on x86 (VNNI) CPUs: unsigned 8-bit activations (asymmetric), signed 8-bit per-channel
  symmetric weights, calibrated on images. Full range on VNNI and non-x86 CPUs; 7-bit weights
  (``reduce_range``) on an x86 CPU without VNNI, whose 8-bit dot product (AVX2's ``vpmaddubsw``)
  saturates its 16-bit sums (:func:`int8_saturates`).
  Squeeze-excitation blocks, hard-swish and the embedding head stay in float
  (:func:`find_exclusions`, each with its reason); ``calib_method="auto"`` tries every calibration
  method and keeps the one with the best parity.
- ``int8-trt``: what TensorRT's explicit quantisation takes: signed 8-bit symmetric activations
  and weights (zero points 0), per-channel weights, biases left in float, only standard ONNX
  ``QuantizeLinear`` / ``DequantizeLinear`` (no ``com.microsoft`` operators).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.calibration import (
    AUTO,
    CALIB_METHODS,
    DYNAMIC,
    HISTOGRAM_METHODS,
    MATMUL_OPS,
    calibrate,
    calibration_batch,
    candidate_methods,
    check_calibration,
    entropy_ranges,
    histogram_images,
    make_reader,
    memory_batch,
)
from compress_edge.export.exclusions import find_exclusions, name_nodes
from compress_edge.export.onnx import INPUT_NAME, save_model_proto, set_metadata

from compress_edge.deps import require
from compress_edge.errors import ExportError
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

#: Op types quantised for TensorRT: the compute-heavy ones; TensorRT fuses the rest around them.
TRT_OP_TYPES = ["Conv", "Gemm", "MatMul", "ConvTranspose"]


@dataclass(frozen=True)
class Int8Recipe:
    """The quantize_static settings of one INT8 target, written once: :func:`quantize_int8` passes them
    to onnxruntime and :func:`int8_settings` shows them in export.json. Both targets quantise weights to
    QInt8, symmetric, per channel, in QDQ format; full range unless ``reduce_range`` (7-bit weights)."""

    #: onnxruntime QuantType of the activations ("QUInt8" or "QInt8").
    activations: str
    activation_symmetric: bool
    #: The op types quantised; None: onnxruntime's defaults.
    op_types: list[str] | None
    quantize_bias: bool
    #: 7-bit weights: for x86 CPUs without VNNI (:func:`int8_saturates`).
    reduce_range: bool = False

    def quantize_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of onnxruntime's quantize_static (all but the model paths, reader and calibration)."""
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ, "weight_type": QuantType.QInt8, "per_channel": True,
            "reduce_range": self.reduce_range, "activation_type": getattr(QuantType, self.activations),
            **({"op_types_to_quantize": self.op_types} if self.op_types else {}),
            # Percentile (99.999) clips the rare outliers MinMax would stretch the range for. Only standard
            # ONNX QuantizeLinear / DequantizeLinear (no com.microsoft operators).
            "extra_options": {"WeightSymmetric": True, "CalibPercentile": 99.999,
                              "ActivationSymmetric": self.activation_symmetric, "QuantizeBias": self.quantize_bias,
                              "UseQDQContribOps": False},
        }


@dataclass(frozen=True)
class DynamicRecipe:
    """quantize_dynamic's settings, written once: :meth:`quantize_kwargs` passes them to onnxruntime and
    :meth:`settings` shows them in export.json (replacing the static recipe's lines)."""

    weights: str = "QInt8"
    per_channel: bool = True
    op_types: tuple[str, ...] = MATMUL_OPS
    reduce_range: bool = False

    def quantize_kwargs(self) -> dict[str, Any]:
        from onnxruntime.quantization import QuantType

        return {"weight_type": getattr(QuantType, self.weights), "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "op_types_to_quantize": list(self.op_types)}

    def settings(self) -> dict[str, Any]:
        return {
            "format": "dynamic (DynamicQuantizeLinear + MatMulInteger)",
            "activations": "QUInt8, quantised at run time from each batch's own range (no calibration)",
            "weights": f"{self.weights} symmetric, {'per-channel' if self.per_channel else 'per-tensor'}"
                       f"{', 7-bit (reduce_range)' if self.reduce_range else ''}",
            "op_types": list(self.op_types),
            "bias": "float (not quantised)",
        }


DYNAMIC_RECIPE = DynamicRecipe()


#: What each INT8 target is: x86 CPUs (VNNI) run unsigned asymmetric activations fastest; TensorRT's
#: explicit quantisation takes signed symmetric ones (zero points 0) and float biases.
INT8_RECIPES = {
    "cpu": Int8Recipe(activations="QUInt8", activation_symmetric=False, op_types=None, quantize_bias=True),
    "trt": Int8Recipe(activations="QInt8", activation_symmetric=True, op_types=TRT_OP_TYPES, quantize_bias=False),
}
INT8_TARGETS = tuple(INT8_RECIPES)

#: x86 CPU flags whose 8-bit dot product accumulates in 32 bits (no saturation).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
#: Why weights get 7 bits where :func:`int8_saturates`; each INT8 tool's reason continues it.
SATURATION_CAUSE = ("this x86 CPU has no VNNI: its 8-bit dot product (vpmaddubsw) adds pairs of products in 16 "
                    "bits and saturates")
REDUCE_RANGE_REASON = (f"{SATURATION_CAUSE}, so weights are quantised to 7 bits (reduce_range, onnxruntime's remedy "
                       "for such CPUs); a file made here runs on VNNI CPUs too")


def int8_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (``/proc/cpuinfo`` flags), where onnxruntime's u8 x s8 kernels
    can saturate their 16-bit intermediate sums; False on VNNI, on other architectures and where the
    flags cannot be read. ``cpuinfo`` and ``machine`` stand in for this machine's (for tests)."""
    import platform

    if (machine or platform.machine()).lower() not in _X86:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is not None and not VNNI_FLAGS & set(flags)


def int8_recipe(target: str) -> Int8Recipe:
    """The recipe of ``target`` on this machine (7-bit weights for the CPU target where it saturates)."""
    recipe = INT8_RECIPES[target]
    return dataclasses.replace(recipe, reduce_range=target == "cpu" and int8_saturates())


def dynamic_recipe() -> DynamicRecipe:
    return dataclasses.replace(DYNAMIC_RECIPE, reduce_range=int8_saturates())


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
    """The quantize_static settings for ``target`` ("cpu" or "trt") as export.json records them."""
    if target not in INT8_TARGETS:
        raise ExportError(f"unknown INT8 target {target!r}; choose one of: {', '.join(INT8_TARGETS)}")
    if calib_method not in (*CALIB_METHODS, DYNAMIC, AUTO):
        raise ExportError(f"unknown calibration method {calib_method!r}; choose one of: "
                          f"{', '.join((*CALIB_METHODS, DYNAMIC, AUTO))}")
    if calib_method == DYNAMIC and target != "cpu":
        raise ExportError(f"dynamic quantisation is for the CPU target only; int8-{target} needs a calibration "
                          f"({', '.join(CALIB_METHODS)} or auto)")
    r = int8_recipe(target)
    return {
        "format": "QDQ",
        "activations": f"{r.activations} {'symmetric' if r.activation_symmetric else '(asymmetric)'}",
        "weights": f"QInt8 symmetric, per-channel{', 7-bit (reduce_range)' if r.reduce_range else ''}",
        "reduce_range": r.reduce_range,
        **({"reduce_range_reason": REDUCE_RANGE_REASON} if r.reduce_range else {}),
        "calibration": calib_method,
        "op_types": list(r.op_types) if r.op_types else "onnxruntime defaults",
        "bias": "int32 (onnxruntime default)" if r.quantize_bias else "float (not quantised)",
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
    exclude: bool = True,
    parity_images: np.ndarray | None = None,
) -> QuantizeResult:
    """Statically quantise ``src`` (float32 ONNX) into ``dst`` for ``target``.

    calib: preprocessed calibration images float32 (N, C, S, S) (see ``parity.load_check_images``).
    calib_method: one of :data:`CALIB_METHODS`, ``"dynamic"`` (``target="cpu"`` only), or ``"auto"``:
      each of ``calibration.candidate_methods`` is tried (dynamic where MatMul / Gemm hold most weights)
      and the file whose embeddings of ``parity_images`` (default: ``calib``) are closest to ``src``'s is
      kept (``calibration.candidate_rank``: meeting both goals first, then the highest top-10 neighbour
      overlap, then the highest min cosine). ``settings["calibration_candidates"]`` holds every method's
      parity (or its error, or why it was skipped). Percentile and entropy calibrate on as many of
      ``calib`` as fit in memory (``calibration.histogram_images``; recorded when fewer).
    exclude: for ``target="cpu"``, keep in float the node groups :func:`find_exclusions` finds
      (squeeze-excitation, hard-swish, the embedding head), each with its reason in
      ``settings["excluded"]``. The TensorRT target quantises its own op types and excludes nothing.
    """
    require("onnxruntime", "INT8 quantisation")
    onnx = require("onnx", "INT8 quantisation")
    settings = int8_settings(target, calib_method)
    calib = check_calibration(calib, spec)
    input_name = _input_name(src)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="compress-edge-q-") as tmp:
        pre, exclusions = _prepare(src, Path(tmp), exclude=target == "cpu" and exclude)
        settings["excluded"] = [{"pattern": g["pattern"], "nodes": len(g["nodes"]), "names": g["nodes"],
                                 "reason": g["reason"]} for g in exclusions]
        graph = onnx.load(str(pre), load_external_data=False)
        # onnxruntime's histogram calibrators (percentile, entropy) stack every batch's outputs into one
        # array: a ragged last batch makes them fail. Equal batches that cover every image once instead,
        # each small enough for its run to fit in memory.
        fits = memory_batch(graph, batch_size)
        asked, batch_size = batch_size, calibration_batch(len(calib), fits)
        settings["calibration_batch"] = batch_size
        if fits < min(asked, len(calib)):
            settings["calibration_batch_reason"] = f"a batch of {fits + 1} images' activations would not fit in memory"
        readers, skip = _readers(graph, calib, batch_size, settings)
        run = _Quantizer(pre, Path(tmp), int8_recipe(target), [n for g in exclusions for n in g["nodes"]],
                         readers, input_name, progress=progress, label=f"calibrating int8-{target}")
        check = calib if parity_images is None else np.ascontiguousarray(parity_images, dtype=np.float32)
        raw, chosen = calibrate(run, src, Path(tmp), calib_method, check_images=check,
                                check_kind="calibration" if parity_images is None else "parity",
                                what=f"INT8 quantisation ({target}) of {src}", methods=candidate_methods(target, graph),
                                skip=skip)
        settings.update(chosen)
        if settings["calibration"] == DYNAMIC:
            settings.update(dynamic_recipe().settings())
        proto = onnx.load(str(raw))
    _drop_unused_domains(proto)
    set_metadata(
        proto,
        spec,
        f"int8-{target}",
        {"compress_edge.source": Path(src).name, "compress_edge.calib_images": str(len(calib)),
         "compress_edge.calibration": str(settings["calibration"])},
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


def _readers(graph, calib: np.ndarray, batch_size: int,
             settings: dict[str, Any]) -> tuple[dict[str, tuple[np.ndarray, int]], dict[str, str] | None]:
    """The calibration images and batch of each static method: all of them, but for the histogram
    methods only as many as fit in memory (an even subset, recorded in ``settings``); and the methods to
    skip (method: why) when too few fit."""
    n, why = histogram_images(graph, len(calib), batch=batch_size)
    readers = {m: (calib, batch_size) for m in CALIB_METHODS}
    if why is None:
        return readers, None
    if n == 0:
        return readers, {m: f"skipped: {why}; pass fewer --calib-images, or --calib-method minmax or dynamic"
                         for m in HISTOGRAM_METHODS}
    subset = calib[np.linspace(0, len(calib) - 1, n).round().astype(int)]
    settings["histogram_calibration_images"] = {"images": n, "reason": f"{why}: an even subset of {n}"}
    readers.update({m: (subset, calibration_batch(n, batch_size)) for m in HISTOGRAM_METHODS})
    return readers, None


def _prepare(src: str | os.PathLike, tmp: Path, *, exclude: bool) -> tuple[Path, list[dict[str, Any]]]:
    """The graph quantize_static reads (pre-processed into ``tmp`` when onnxruntime can) and, with
    ``exclude``, the node groups of it kept in float (:func:`find_exclusions`)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx = require("onnx", "INT8 quantisation")
    pre = tmp / "pre.onnx"
    try:
        # Shape inference and onnxruntime's basic (standard-op) graph optimisation first, as
        # onnxruntime recommends: quantisation then sees folded constants and known shapes.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception as exc:
        log.debug("quantisation pre-processing failed (%s); quantising the graph as exported", exc)
        pre = Path(src)
    if not exclude:
        return pre, []
    # The exclusions name nodes of the graph quantize_static reads: the pre-processed one, whose
    # optimiser leaves the nodes it creates (hard-swish split into HardSigmoid * x) unnamed.
    proto_pre = onnx.load(str(pre))
    if name_nodes(proto_pre.graph):
        pre = tmp / "named.onnx"
        onnx.save_model(proto_pre, str(pre))
    return pre, find_exclusions(proto_pre)


class _Quantizer:
    """``run(method, out)``: quantize_static of ``pre`` with ``recipe``, calibrated by ``method``, into ``out``
    (what :func:`calibration.calibrate` calls once per method it tries), with one progress bar."""

    def __init__(self, pre: Path, tmp: Path, recipe: Int8Recipe, excluded: list[str],
                 readers: dict[str, tuple[np.ndarray, int]], input_name: str, *, progress: bool, label: str) -> None:
        from compress_edge.progress import optional_bar

        self.pre, self.tmp, self.recipe, self.excluded, self.readers = pre, tmp, recipe, excluded, readers
        self.input_name = input_name
        self.bar = optional_bar(progress)
        self.task = self.bar.add_task(label, total=None) if self.bar is not None else None

    def _advance(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def __call__(self, method: str, out: Path) -> None:
        from onnxruntime.quantization import CalibrationMethod, quantize_dynamic, quantize_static

        if method == DYNAMIC:  # nothing to calibrate
            with _quiet_stdout(), _quiet_ort_warnings():
                quantize_dynamic(str(self.pre), str(out), **dynamic_recipe().quantize_kwargs(),
                                 nodes_to_exclude=self.excluded or None)
            return
        bar = self.bar
        images, batch = self.readers[method]
        reader = lambda: make_reader(images, self.input_name, batch, None if bar is None else self._advance)  # noqa: E731
        kwargs = self.recipe.quantize_kwargs()
        if bar is not None:
            # entropy reads the images twice: once for the histograms, once for the input's range
            bar.reset(self.task, total=len(images) * (2 if method == "entropy" else 1))
            bar.start()
        try:
            with _quiet_stdout(), _quiet_ort_warnings():
                cache = None
                if method == "entropy":
                    cache = entropy_ranges(self.pre, self.tmp / "entropy-ranges.json", reader(),
                                           self.recipe.op_types, symmetric=self.recipe.activation_symmetric)
                quantize_static(
                    str(self.pre), str(out), None if cache else reader(), calibration_cache_path=cache,
                    calibrate_method=getattr(CalibrationMethod, _ORT_METHODS[method]),
                    nodes_to_exclude=self.excluded or None, **kwargs,
                )
        finally:
            if bar is not None:
                bar.stop()


#: onnxruntime's CalibrationMethod member of each calibration method.
_ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


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


@contextlib.contextmanager
def _quiet_ort_warnings():
    # onnxruntime's quantiser logs a root-logger warning per LayerNormalization weight it cannot
    # quantise per channel (rank 1): dozens of lines per ViT that say nothing to the user.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


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
