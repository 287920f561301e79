"""INT8 calibration: the images (checked, split into equal batches and fed to onnxruntime's
calibrators), the methods (minmax, percentile, entropy with finer histograms), and ``"auto"``, which
quantises with each method and keeps the file whose embeddings stay closest to float32."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress_edge.errors import DataError, ExportError
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "percentile", "entropy")
#: Dynamic quantisation (int8-cpu only): MatMul / Gemm weights int8 per channel, their activations
#: quantised at run time from each batch's own range, nothing calibrated. onnxruntime recommends it for
#: transformers, whose activation outliers (attention, LayerNorm, GELU) one static range clips.
DYNAMIC = "dynamic"
#: ``calib_method="auto"``: every method of :func:`candidate_methods` is tried and the one with the best
#: parity kept.
AUTO = "auto"
#: Dynamic quantisation is tried where MatMul / Gemm hold at least this share of the weights (a
#: transformer, or AlexNet's fully connected layers); a CNN's weights are mostly convolutions, which a
#: dynamic file would leave in float32.
DYNAMIC_MATMUL_SHARE = 0.5


#: The op types dynamic quantisation quantises, and whose weight share decides where it is tried.
MATMUL_OPS = ("MatMul", "Gemm")


def matmul_weight_share(proto) -> float:
    """The share of the graph's weight elements that feed MatMul / Gemm nodes (0 without weights)."""
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    by_op = {"matmul": 0, "other": 0}
    for node in proto.graph.node:
        n = sum(sizes.get(x, 0) for x in node.input[1:])
        by_op["matmul" if node.op_type in MATMUL_OPS else "other"] += n
    total = by_op["matmul"] + by_op["other"]
    return by_op["matmul"] / total if total else 0.0


def mostly_matmul(proto) -> bool:
    """Whether MatMul / Gemm hold most of the graph's weights (:data:`DYNAMIC_MATMUL_SHARE`): a
    transformer, which onnxruntime quantises dynamically and NNCF with its transformer recipe."""
    return matmul_weight_share(proto) >= DYNAMIC_MATMUL_SHARE


#: The calibrations that build histograms: onnxruntime keeps every calibration image's activations in
#: memory before building them, so their memory grows with the model's activations times the images.
HISTOGRAM_METHODS = ("percentile", "entropy")
#: What a histogram calibration may take of the memory available when it starts (the rest: the model,
#: onnxruntime's sessions). Measured: DINOv2 ViT-B/14 at 224 px, 32 images, about 19 GiB of activations
#: by this count, was killed for memory with 20 GiB available; ViT-B/16, about 13 GiB, ran.
HISTOGRAM_MEMORY_SHARE = 0.75
#: Fewer images than this make no histogram worth building: the method is skipped instead.
MIN_HISTOGRAM_IMAGES = 8


def activation_bytes(proto) -> int:
    """Bytes of the float32 activations one image produces in ``proto``, from its inferred shapes (the
    batch dimension left out; tensors without a known shape count as nothing)."""
    from onnx import TensorProto

    total = 0
    for vi in proto.graph.value_info:
        tt = vi.type.tensor_type
        if tt.elem_type != TensorProto.FLOAT or not tt.HasField("shape"):
            continue
        dims = [d.dim_value for d in tt.shape.dim[1:]]
        if dims and all(d > 0 for d in dims):
            total += 4 * int(np.prod(dims))
    return total


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; None where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_batch(proto, batch: int, available: int | None = None) -> int:
    """The largest calibration batch up to ``batch`` whose run fits in memory: onnxruntime's calibration
    session keeps every activation of a batch alive (measured on ViT-S/8 at 224 px, 1.1 GiB of activations
    an image: MinMax peaked at 4.5 GiB with batches of 2, and was killed for memory with batches of 16),
    so a run takes about twice the batch's activations."""
    available = available_memory() if available is None else available
    per_image = activation_bytes(proto)
    if available is None or per_image == 0:
        return batch
    return max(1, min(batch, int(HISTOGRAM_MEMORY_SHARE * available // (2 * per_image))))


def histogram_images(proto, images: int, available: int | None = None, batch: int = 1) -> tuple[int, str | None]:
    """How many of ``images`` calibration images a histogram calibration (percentile, entropy) of
    ``proto`` in batches of ``batch`` can hold in memory (onnxruntime keeps all their activations before
    building the histograms, beside the running batch's), and why it is fewer (None when all fit, or the
    memory cannot be told). 0: fewer than :data:`MIN_HISTOGRAM_IMAGES` fit, the methods are skipped."""
    available = available_memory() if available is None else available
    per_image = activation_bytes(proto)
    if available is None or per_image == 0 or (images + 2 * batch) * per_image <= HISTOGRAM_MEMORY_SHARE * available:
        return images, None
    fit = int(HISTOGRAM_MEMORY_SHARE * available // per_image) - 2 * batch
    why = (f"{images} images' activations would take about {_size(images * per_image)}, "
           f"{_size(available)} available")
    return (fit, why) if fit >= MIN_HISTOGRAM_IMAGES else (0, why)


def _size(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def candidate_methods(target: str, proto) -> tuple[str, ...]:
    """The methods ``"auto"`` tries for ``target``: the three calibrations, and for the CPU target dynamic
    quantisation where MatMul / Gemm hold most weights (:data:`DYNAMIC_MATMUL_SHARE`). TensorRT takes
    only explicit (static) Q/DQ."""
    if target == "cpu" and mostly_matmul(proto):
        return (*CALIB_METHODS, DYNAMIC)
    return CALIB_METHODS


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


def make_reader(calib: np.ndarray, input_name: str, batch_size: int, on_batch: Callable[[int], None] | None = None):
    """An onnxruntime CalibrationDataReader over ``calib`` in batches of ``batch_size`` (rewindable);
    ``on_batch(n)`` is called with each batch's size (a progress bar)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            batch = calib[self.i : self.i + batch_size]
            self.i += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
            return {input_name: batch}

        def rewind(self) -> None:
            self.i = 0

    return Reader()


def calibrate(run: Callable[[str, Path], None], src: str | os.PathLike, tmp: Path, calib_method: str, *,
              check_images: np.ndarray, check_kind: str, what: str,
              methods: tuple[str, ...] = CALIB_METHODS,
              skip: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Quantise with ``run(method, out)`` into ``tmp`` as ``calib_method`` asks; the file and the settings
    that record what was done.

    ``"auto"``: every one of ``methods``, the best by parity on ``check_images`` (``check_kind``:
    "calibration" or "parity") kept; those in ``skip`` (method: why) are recorded, not run. One method:
    that one (ExportError with the reason when it is in ``skip``), and minmax when a histogram method
    fails (degenerate activations, a constant tensor). ``what`` names the quantisation in errors ("INT8 quantisation (cpu)
    of model.onnx").
    """
    if calib_method == AUTO:
        raw, candidates = choose_method(src, tmp, run, check_images, methods, skip)
        return raw, {
            "calibration": raw.stem,
            "calibration_candidates": candidates,
            "calibration_choice": (
                f"tried {', '.join(methods)}; kept, of those meeting both goals, the highest top-{_topk()} "
                "neighbour overlap, then the highest min cosine, else the one closest to meeting both (the highest "
                f"of the lower of overlap / goal and min cosine / goal), against the float32 file on "
                f"{len(check_images)} {check_kind} images"
            ),
        }
    if skip and calib_method in skip:
        raise ExportError(f"{what}: {calib_method} calibration {skip[calib_method]}")
    raw = tmp / f"{calib_method}.onnx"
    try:
        run(calib_method, raw)
        return raw, {}
    except Exception as exc:
        if calib_method in ("minmax", DYNAMIC):
            raise ExportError(f"{what} failed: {type(exc).__name__}: {exc}") from None
        # Histogram calibration fails on degenerate activations (a constant tensor): MinMax does not.
        log.warning("%s calibration failed (%s); calibrating with minmax instead", calib_method, exc)
        settings = {"calibration": "minmax (fallback)",
                    "calibration_fallback_reason": f"{calib_method} failed: {type(exc).__name__}: {exc}"}
    raw = tmp / "minmax.onnx"
    try:
        run("minmax", raw)
    except Exception as exc2:
        raise ExportError(f"{what} failed: {type(exc2).__name__}: {exc2}") from None
    return raw, settings


#: Entropy (KL) calibration: activation histograms of ENTROPY_BINS bins, searched for the threshold
#: whose 128-level quantisation loses least. quantize_static builds its entropy calibrator with 128
#: bins for 128 levels, where the search has nothing to clip and returns the MinMax range; its
#: extra_options do not reach the bin count, so the ranges are computed here with create_calibrator.
ENTROPY_BINS = 512


def entropy_ranges(model: Path, cache: Path, reader, op_types, *, symmetric: bool) -> Path:
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


def choose_method(src, tmp: Path, run, images: np.ndarray, methods: tuple[str, ...] = CALIB_METHODS,
                  skip: dict[str, str] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Quantise with every one of ``methods`` into ``tmp`` and keep the best by parity on ``images``
    against ``src``'s embeddings (:func:`candidate_rank`).

    Returns the chosen file and every candidate's record (method, min/mean cosine, top-10 overlap,
    seconds, chosen; or the error that method raised)."""
    from compress_edge.export.parity import compare

    reference = _embed(src, images)
    candidates: list[dict[str, Any]] = []
    best: tuple[tuple[float, ...], Path, dict[str, Any]] | None = None
    for method in methods:
        if skip and method in skip:
            candidates.append({"method": method, "skipped": skip[method]})
            continue
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
        score = candidate_rank(entry)
        if best is None or score > best[0]:
            best = (score, out, entry)
    if best is None:
        raise ExportError("INT8 quantisation failed with every calibration method: "
                          + "; ".join(f"{c['method']}: {c.get('error') or c['skipped']}" for c in candidates))
    best[2]["chosen"] = True
    return best[1], candidates


def candidate_rank(entry: dict[str, Any]) -> tuple[float, ...]:
    """How good a calibration candidate's parity is, for ``max``: first, meeting both int8 goals (min
    cosine and top-10 overlap); among those, the highest overlap, then the highest min cosine (neighbours
    are what a search serves); among those missing a goal, the one closest to meeting both, the lower of
    overlap / its goal and min cosine / its goal. Ranking by overlap alone would keep, of two files with
    the same overlap, one whose worst embedding points elsewhere (min cosine 0.48 against 0.95 measured on
    efficientnet_b0)."""
    from compress_edge.export.parity import GOALS, TOPK_GOALS, overlap_below

    overlap, cosine = _num(entry.get("topk_overlap")), _num(entry.get("min_cosine"))
    o_goal, c_goal = TOPK_GOALS["int8-cpu"], GOALS["int8-cpu"]
    if not overlap_below(overlap, o_goal) and cosine >= c_goal:
        return (1.0, overlap, cosine)
    return (0.0, min(overlap / o_goal, cosine / c_goal), overlap)


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
