"""Reduced precision from the float32 ONNX file: FP16, INT8 for x86 CPUs, INT8 for TensorRT.

- ``fp16``: float16 weights and compute, float32 input and output (casts at the edges), so every
  caller keeps feeding float32 images.
- ``int8-cpu``: onnxruntime static quantisation in QDQ format with the settings onnxruntime runs
  fastest on x86 (VNNI) CPUs: unsigned 8-bit activations (asymmetric), signed 8-bit per-channel
  symmetric weights, full range (no ``reduce_range``: VNNI does not saturate), calibrated on images.
  Squeeze-excitation blocks, hard-swish and the embedding head stay in float
  (:func:`find_exclusions`, each with its reason); ``calib_method="auto"`` tries every calibration
  method and keeps the one with the best parity.
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
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

INT8_TARGETS = ("cpu", "trt")
CALIB_METHODS = ("minmax", "percentile", "entropy")
#: ``calib_method="auto"``: every method in CALIB_METHODS is tried and the one with the best parity kept.
AUTO = "auto"
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
    if calib_method not in (*CALIB_METHODS, AUTO):
        raise ExportError(f"unknown calibration method {calib_method!r}; choose one of: "
                          f"{', '.join((*CALIB_METHODS, AUTO))}")
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
    exclude: bool = True,
    parity_images: np.ndarray | None = None,
) -> QuantizeResult:
    """Statically quantise ``src`` (float32 ONNX) into ``dst`` for ``target``.

    calib: preprocessed calibration images float32 (N, C, S, S) (see ``parity.load_check_images``).
    calib_method: one of :data:`CALIB_METHODS`, or ``"auto"``: each is tried and the file whose
      embeddings of ``parity_images`` (default: ``calib``) are closest to ``src``'s is kept: the highest
      top-10 neighbour overlap, then the highest min cosine. ``settings["calibration_candidates"]``
      holds every method's parity (or its error).
    exclude: for ``target="cpu"``, keep in float the node groups :func:`find_exclusions` finds
      (squeeze-excitation, hard-swish, the embedding head), each with its reason in
      ``settings["excluded"]``. The TensorRT target quantises its own op types and excludes nothing.
    """
    require("onnxruntime", "INT8 quantisation")
    onnx = require("onnx", "INT8 quantisation")
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
    # Percentile (99.999) clips the rare outliers MinMax would stretch the range for.
    extra: dict[str, Any] = {"WeightSymmetric": True, "CalibPercentile": 99.999}
    if target == "cpu":
        extra.update(ActivationSymmetric=False)
        kwargs: dict[str, Any] = {"activation_type": QuantType.QUInt8}
    else:
        extra.update(ActivationSymmetric=True, QuantizeBias=False, UseQDQContribOps=False)
        kwargs = {"activation_type": QuantType.QInt8, "op_types_to_quantize": TRT_OP_TYPES}

    with tempfile.TemporaryDirectory(prefix="compress-edge-q-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # Shape inference and onnxruntime's basic (standard-op) graph optimisation first, as
            # onnxruntime recommends: quantisation then sees folded constants and known shapes.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:
            log.debug("quantisation pre-processing failed (%s); quantising the graph as exported", exc)
            pre = Path(src)
        # The exclusions name nodes of the graph quantize_static reads: the pre-processed one, whose
        # optimiser leaves the nodes it creates (hard-swish split into HardSigmoid * x) unnamed.
        exclusions = []
        if target == "cpu" and exclude:
            proto_pre = onnx.load(str(pre))
            if _name_nodes(proto_pre.graph):
                pre = Path(tmp) / "named.onnx"
                onnx.save_model(proto_pre, str(pre))
            exclusions = find_exclusions(proto_pre)
        excluded_nodes = [n for group in exclusions for n in group["nodes"]]
        settings["excluded"] = [{"pattern": g["pattern"], "nodes": len(g["nodes"]), "names": g["nodes"],
                                 "reason": g["reason"]} for g in exclusions]

        def run(method: str, out: Path) -> None:
            if bar is not None:
                bar.reset(task)
                bar.start()
            try:
                with _quiet_stdout(), _quiet_ort_warnings():
                    cache = None
                    if method == "entropy":
                        cache = _entropy_ranges(pre, Path(tmp) / "entropy-ranges.json", Reader(),
                                                kwargs.get("op_types_to_quantize"),
                                                symmetric=bool(extra["ActivationSymmetric"]))
                    quantize_static(
                        str(pre),
                        str(out),
                        None if cache else Reader(),
                        calibration_cache_path=cache,
                        quant_format=QuantFormat.QDQ,
                        weight_type=QuantType.QInt8,
                        per_channel=True,
                        reduce_range=False,
                        calibrate_method=methods[method],
                        nodes_to_exclude=excluded_nodes or None,
                        extra_options=extra,
                        **kwargs,
                    )
            finally:
                if bar is not None:
                    bar.stop()

        if calib_method == AUTO:
            check = calib if parity_images is None else np.ascontiguousarray(parity_images, dtype=np.float32)
            raw, candidates = _choose_method(src, Path(tmp), run, check)
            settings["calibration"] = raw.stem
            settings["calibration_candidates"] = candidates
            settings["calibration_choice"] = (
                f"tried {', '.join(CALIB_METHODS)}; kept the highest top-{_topk()} neighbour overlap, then the "
                f"highest min cosine, against the float32 file on {len(check)} "
                f"{'calibration' if parity_images is None else 'parity'} images"
            )
        else:
            raw = Path(tmp) / f"{calib_method}.onnx"
            try:
                run(calib_method, raw)
            except Exception as exc:
                if calib_method == "minmax":
                    raise ExportError(
                        f"INT8 quantisation ({target}) of {src} failed: {type(exc).__name__}: {exc}") from None
                # Histogram calibration fails on degenerate activations (a constant tensor): MinMax does not.
                log.warning("%s calibration failed (%s); calibrating with minmax instead", calib_method, exc)
                settings["calibration"] = "minmax (fallback)"
                settings["calibration_fallback_reason"] = f"{calib_method} failed: {type(exc).__name__}: {exc}"
                raw = Path(tmp) / "minmax.onnx"
                try:
                    run("minmax", raw)
                except Exception as exc2:
                    raise ExportError(
                        f"INT8 quantisation ({target}) of {src} failed: {type(exc2).__name__}: {exc2}"
                    ) from None
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


#: Entropy (KL) calibration: activation histograms of ENTROPY_BINS bins, searched for the threshold
#: whose 128-level quantisation loses least. quantize_static builds its entropy calibrator with 128
#: bins for 128 levels, where the search has nothing to clip and returns the MinMax range; its
#: extra_options do not reach the bin count, so the ranges are computed here with create_calibrator.
ENTROPY_BINS = 512


def _entropy_ranges(model: Path, cache: Path, reader, op_types, *, symmetric: bool) -> Path:
    """Entropy-calibrated activation ranges of ``model`` on ``reader``'s batches, saved where
    ``quantize_static(calibration_cache_path=...)`` reads them."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model, op_types, augmented_model_path=str(cache.with_suffix(".augmented.onnx")),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128, "symmetric": symmetric},
    )
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    # The image input keeps its full range: on mostly-background pictures (Fashion-MNIST) the KL search
    # clips it to the background level and the first layer sees a flat image.
    from onnxruntime.quantization.calibrate import TensorData

    for name, images in _graph_input_ranges(reader).items():
        if name in ranges.data:
            td = ranges.data[name]
            ranges.data[name] = TensorData(lowest=np.float32(images[0]), highest=np.float32(images[1]),
                                           **{k: getattr(td, k) for k in ("hist", "bins", "hist_edges")
                                              if hasattr(td, k)})
    save_tensors_data(ranges, cache)
    return cache


def _graph_input_ranges(reader) -> dict[str, tuple[float, float]]:
    """The min and max of each input over every batch ``reader`` gives (rewound before and after)."""
    reader.rewind()
    out: dict[str, tuple[float, float]] = {}
    while (batch := reader.get_next()) is not None:
        for name, x in batch.items():
            lo, hi = float(np.min(x)), float(np.max(x))
            old = out.get(name, (lo, hi))
            out[name] = (min(lo, old[0]), max(hi, old[1]))
    reader.rewind()
    return out


def _topk() -> int:
    from compress_edge.export.parity import TOPK

    return TOPK


def _choose_method(src, tmp: Path, run, images: np.ndarray) -> tuple[Path, list[dict[str, Any]]]:
    """Quantise with every calibration method into ``tmp`` and keep the best by parity on ``images``:
    the highest top-10 overlap with ``src``'s embeddings, then the highest min cosine.

    Returns the chosen file and every candidate's record (method, min/mean cosine, top-10 overlap,
    seconds, chosen; or the error that method raised)."""
    from compress_edge.export.parity import compare

    reference = _embed(src, images)
    candidates: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], Path, dict[str, Any]] | None = None
    for method in CALIB_METHODS:
        out = tmp / f"{method}.onnx"
        t0 = time.perf_counter()
        try:
            run(method, out)
            got = _embed(out, images)
        except Exception as exc:
            candidates.append({"method": method, "error": f"{type(exc).__name__}: {exc}"})
            continue
        r = compare(reference, got, name=method, reference_name="fp32", goal=0.0)
        entry = {"method": method, "min_cosine": r.min_cosine, "mean_cosine": r.mean_cosine,
                 "topk_overlap": r.topk_overlap, "k": r.k, "seconds": round(time.perf_counter() - t0, 2),
                 "chosen": False}
        candidates.append(entry)
        score = (_num(r.topk_overlap), _num(r.min_cosine))
        if best is None or score > best[0]:
            best = (score, out, entry)
    if best is None:
        raise ExportError("INT8 quantisation failed with every calibration method: "
                          + "; ".join(f"{c['method']}: {c['error']}" for c in candidates))
    best[2]["chosen"] = True
    return best[1], candidates


def _num(x: float | None) -> float:
    """A parity number for ranking: None (no overlap measurable) and NaN rank lowest."""
    return -1.0 if x is None or x != x else float(x)


def _embed(path: str | os.PathLike, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The first output of the ONNX file at ``path`` for ``images``, on onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)])


# ------------------------------------------------------------------------------------------------------
# What INT8 leaves in float: found from the graph's op patterns, each with its reason
# ------------------------------------------------------------------------------------------------------
#: Reasons recorded in the export for each pattern kept in float32 by the int8-cpu quantisation.
EXCLUSION_REASONS = {
    "squeeze-excitation": (
        "squeeze-excitation block (global pool -> 1x1 projections -> sigmoid gate -> channel product): the "
        "gate rescales whole channels, so one 8-bit step on it moves every value of a channel; it costs "
        "almost no compute (1x1 tensors) and is kept in float"
    ),
    "hard-swish": (
        "hard-swish / hard-sigmoid: its output range is lopsided (min -0.375, max unbounded) and onnxruntime "
        "has no 8-bit kernel for it, so quantising around it only adds rounding; kept in float"
    ),
    "embedding-head": (
        "embedding head (the last projection and what follows it up to the output): its rounding error goes "
        "straight into the embedding the search compares, with no later layer to average it out; kept in float"
    ),
}
#: Ops a squeeze-excitation gate is built of between its global pool and its channel product.
_SE_INNER = {"Conv", "Gemm", "MatMul", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Add", "Mul", "Div",
             "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"}
_SE_GATES = {"Sigmoid", "HardSigmoid"}
_WEIGHTED = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def find_exclusions(proto) -> list[dict[str, Any]]:
    """The node groups of ``proto`` (a float32 ONNX ModelProto) the int8-cpu file keeps in float.

    Found by op pattern, not by name, so any architecture's graph is read the same way:
    - ``squeeze-excitation``: a channel product ``Mul(x, gate)`` whose gate is computed from a global
      average pool of the same ``x`` through 1x1 projections and a sigmoid or hard-sigmoid;
    - ``hard-swish``: ``HardSwish`` and ``HardSigmoid`` nodes, and the ``Mul(x, HardSigmoid(x))`` form;
    - ``embedding-head``: the last weighted projection (Conv / Gemm / MatMul) before the output and every
      node after it, the L2 normalisation included.
    Returns ``[{"pattern", "nodes", "reason"}]``, one entry per pattern found (nodes in graph order); a
    node belongs to one entry only (the first pattern that claims it).
    """
    graph = proto.graph
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    order = {n.name: i for i, n in enumerate(graph.node)}
    inputs = {i.name for i in graph.input}

    def acts(node) -> list[str]:
        """The inputs of ``node`` computed from the image (not weights, constants or shapes)."""
        out = []
        for name in node.input:
            if not name or name in consts:
                continue
            p = producers.get(name)
            if (p is None and name not in inputs) or (p is not None and p.op_type in ("Constant", "Shape")):
                continue
            out.append(name)
        return out

    groups: dict[str, dict[str, None]] = {k: {} for k in EXCLUSION_REASONS}
    claimed: set[str] = set()

    # squeeze-excitation
    for mul in graph.node:
        if mul.op_type != "Mul":
            continue
        ins = acts(mul)
        if len(ins) != 2:
            continue
        for gate_in, x in (ins, ins[::-1]):
            block = _se_block(gate_in, x, producers, acts)
            if block:
                groups["squeeze-excitation"].update(dict.fromkeys([*block, mul.name]))
                break
    claimed |= set(groups["squeeze-excitation"])

    # hard-swish / hard-sigmoid outside squeeze-excitation blocks
    for node in graph.node:
        if node.name in claimed:
            continue
        if node.op_type in ("HardSwish", "HardSigmoid"):
            groups["hard-swish"][node.name] = None
        elif node.op_type == "Mul":
            ins = acts(node)
            for a, b in (ins, ins[::-1]) if len(ins) == 2 else ():
                p = producers.get(a)
                if p is not None and p.op_type == "HardSigmoid" and p.input[0] == b:
                    groups["hard-swish"][node.name] = None
                    break
    claimed |= set(groups["hard-swish"])

    # the embedding head: from the output back to the last weighted projection
    head: dict[str, None] = {}
    todo = [o.name for o in graph.output]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None or node.op_type == "Constant":
            continue
        head[node.name] = None
        if node.op_type in _WEIGHTED and any(i in consts for i in node.input[1:2]):
            continue  # the last projection: stop here
        for inp in acts(node):
            # A tensor that nodes outside the head also read (a residual stream) is where the head
            # ends; x in x / max(||x||, eps) is read by the norm and the division, both in the head
            # once the walk has passed them, so the walk goes on through it.
            if any(c.name not in head for c in consumers.get(inp, [])):
                continue
            todo.append(inp)
    groups["embedding-head"] = {n: None for n in head if n not in claimed}

    out = []
    for pattern, nodes in groups.items():
        if nodes:
            out.append({"pattern": pattern, "nodes": sorted(nodes, key=lambda n: order.get(n, 0)),
                        "reason": EXCLUSION_REASONS[pattern]})
    return out


def _name_nodes(graph) -> bool:
    """Give every unnamed or twice-named node of ``graph`` a unique name; whether any was renamed."""
    seen: set[str] = set()
    renamed = False
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
            renamed = True
        seen.add(node.name)
    return renamed


def _se_block(gate_in: str, x: str, producers: dict, acts) -> list[str] | None:
    """The nodes between a global pool of ``x`` and the gate tensor ``gate_in`` (pool included), when
    ``gate_in`` is a squeeze-excitation gate of ``x``; None otherwise."""
    start = producers.get(gate_in)
    if start is None or start.op_type not in _SE_GATES:
        return None
    block: dict[str, None] = {}
    todo, pooled = [start], False
    while todo:
        node = todo.pop()
        if node.name in block:
            continue
        if len(block) > 16:
            return None
        block[node.name] = None
        if _is_global_pool(node):
            if node.input[0] != x:
                return None
            pooled = True
            continue
        if node.op_type not in _SE_INNER:
            return None
        for name in acts(node):
            p = producers.get(name)
            if p is None:
                return None
            todo.append(p)
    return list(block) if pooled else None


def _is_global_pool(node) -> bool:
    """GlobalAveragePool, or a ReduceMean that keeps dims over the two spatial axes."""
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    attrs = {a.name: a for a in node.attribute}
    keep = attrs["keepdims"].i if "keepdims" in attrs else 1
    axes = list(attrs["axes"].ints) if "axes" in attrs else None
    return bool(keep) and (axes is None or sorted(axes) in ([2, 3], [-2, -1]) or len(node.input) > 1)


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
