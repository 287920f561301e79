"""Export for devices: ONNX (with the ModelSpec inside), FP16 / INT8, TensorRT engines, OpenVINO IR,
and the one inference interface (:class:`~compress_edge.export.runtimes.Embedder`) that runs any of them.

Modules: ``onnx`` (export, metadata), ``quantize`` (fp16, int8-cpu, int8-trt), ``tensorrt``
(engine build and run), ``openvino`` (IR fp32 / fp16, NNCF int8, its Embedder), ``runtimes``
(Embedder backends; torch-free at import), ``parity``
(cosine / neighbour-overlap checks, check images). :func:`export_model` runs the whole stage and
writes ``export.json``. Heavy packages are imported where they are used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress_edge.export.runtimes import Embedder, open_embedder

from compress_edge.errors import ExportError

__all__ = ["Embedder", "ExportOptions", "ParityFailed", "export_model", "open_embedder", "FILES"]

log = logging.getLogger(__name__)

#: File names inside an export folder, by precision.
FILES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8-cpu": "model.int8-cpu.onnx",
    "int8-trt": "model.int8-trt.onnx",
    "engine": "model.engine",
}
REPORT = "export.json"


class ParityFailed(ExportError):
    """A strict export whose files miss a parity goal; ``report`` holds what was written to export.json."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExportOptions:
    """Everything ``compress-edge export`` takes (see the CLI help for each option)."""

    model: str
    out: str
    weights: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    opset: int = 18
    exporter: str = "auto"
    simplify: bool = True
    fp16: bool = False
    int8: list[str] = field(default_factory=list)
    calib_data: str | None = None
    calib_images: int = 256
    #: "auto": every calibration method is tried and the one with the best parity on the parity images
    #: kept (see ``quantize.quantize_int8``); or one of minmax, percentile, entropy.
    calib_method: str = "auto"
    #: int8-cpu: keep squeeze-excitation, hard-swish and the embedding head in float (see
    #: ``quantize.find_exclusions``); False quantises every node onnxruntime can.
    int8_exclude: bool = True
    parity_data: str | None = None
    parity_images: int = 64
    trt: bool = False
    trt_from: str | None = None
    min_batch: int = 1
    opt_batch: int | None = None
    max_batch: int = 32
    workspace_mib: int = 1024
    timing_cache: str | None = None
    trt_module: str | None = None
    openvino: bool = False
    strict: bool = True
    progress: bool = False
    #: Timed runs per batch size (1 and 32) of each CPU file on the parity images; 0 skips the timing.
    timing_iters: int = 5


def export_model(opts: ExportOptions) -> dict[str, Any]:
    """Export ``opts.model`` into ``opts.out`` and prove each file gives the same embeddings.

    Writes ``model.onnx`` (always), ``model.fp16.onnx``, ``model.int8-cpu.onnx``,
    ``model.int8-trt.onnx``, ``model.engine`` + ``model.engine.json``, the OpenVINO IR
    ``model.openvino.xml`` (with ``--fp16`` also ``model.openvino-fp16.xml``, with ``--int8 openvino``
    ``model.openvino-int8.xml``; each with its .bin) as asked, and ``export.json``
    (spec, files, parity numbers, settings, versions). Returns that report. With ``strict``, a parity
    result below its goal raises :class:`ParityFailed` (with the report) after the report is written.
    """
    import numpy as np
    from compress_edge.export import openvino as ovx
    from compress_edge.export import parity as par
    from compress_edge.export.quantize import INT8_TARGETS
    from compress_edge.export.runtimes import ENGINE_SUFFIXES, ONNX_SUFFIXES, OnnxRuntimeEmbedder

    from compress_edge.errors import DataError, ModelError
    from compress_edge.storage import atomic_write_json, sha256_file

    unknown = [t for t in opts.int8 if t not in (*INT8_TARGETS, "openvino")]
    if unknown:
        raise ExportError(f"unknown --int8 target {unknown[0]!r}; choose one of: {', '.join(INT8_TARGETS)}, openvino")
    if "openvino" in opts.int8:
        opts.openvino = True  # the NNCF INT8 IR comes with the float32 one
    if opts.openvino:  # before any work: a missing package is a one-line error, not a half-written folder
        from compress_edge.deps import available, require

        for module, purpose in (("openvino", "the OpenVINO export"), ("nncf", "OpenVINO INT8 quantisation")):
            if (module == "openvino" or "openvino" in opts.int8) and not available(module):
                require(module, purpose)  # raises the error that names the extra
    if opts.trt_from is not None and opts.trt_from not in ("fp32", "fp16", "int8-trt"):
        raise ExportError(f"--trt-from must be fp32, fp16 or int8-trt, got {opts.trt_from!r}")
    suffix = Path(opts.model).suffix.lower()
    source_precision = "fp32"
    if suffix in ONNX_SUFFIXES:
        # An already reduced file (model.int8-trt.onnx, to build its engine on the device) stays what it is.
        source_precision = _onnx_precision(opts.model)
        if source_precision != "fp32" and (opts.fp16 or opts.int8 or opts.openvino):
            raise ExportError(f"{opts.model} is already {source_precision}; --fp16, --int8 and --openvino start from "
                              "the float32 model.onnx")
    default_source = "int8-trt" if "trt" in opts.int8 else "fp16" if opts.fp16 else source_precision
    trt_source = opts.trt_from or default_source
    if source_precision != "fp32" and trt_source != source_precision:
        raise ExportError(f"{opts.model} is {source_precision}: the engine can only be built from it (--trt-from "
                          f"{source_precision})")
    if opts.trt and trt_source == "fp16" and not opts.fp16 and source_precision == "fp32":
        opts.fp16 = True
    if opts.trt and trt_source == "int8-trt" and "trt" not in opts.int8 and source_precision == "fp32":
        opts.int8 = [*opts.int8, "trt"]
    if opts.int8 and opts.calib_data is None:
        raise DataError("--int8 needs calibration images: pass --calib-data (an image folder, fashion-mnist:train "
                        "or a .npy of preprocessed images)")
    if suffix in ENGINE_SUFFIXES:
        raise ModelError(f"{opts.model} is already a TensorRT engine; export starts from a model or an ONNX file")

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"model": str(opts.model), "out": str(out), "files": {}, "parity": {}, "steps": {}}
    onnx_path = out / FILES[source_precision]

    # -- float32 ONNX ---------------------------------------------------------------------------------
    torch_model = None
    if suffix in ONNX_SUFFIXES:
        from compress_edge.export.onnx import check_dynamic_batch, with_spec

        source = OnnxRuntimeEmbedder(opts.model, image_size=opts.image_size, mean=opts.mean, std=opts.std)
        spec = source.spec
        source.close()
        if Path(opts.model).resolve() != onnx_path.resolve():
            with_spec(opts.model, onnx_path, spec, precision=source_precision)
        report["steps"]["onnx"] = {"from": "onnx file", "batch_check": check_dynamic_batch(onnx_path, spec)}
    else:
        from compress_edge.export.onnx import export_onnx

        from compress_edge.models.resolve import resolve_model

        torch_model, spec = resolve_model(opts.model, weights=opts.weights, image_size=opts.image_size)
        if opts.mean is not None or opts.std is not None:
            spec = spec.replace(mean=tuple(opts.mean or spec.mean), std=tuple(opts.std or spec.std))
        result = export_onnx(torch_model, spec, onnx_path, opset=opts.opset, exporter=opts.exporter,
                             simplify=opts.simplify)
        report["steps"]["onnx"] = result.to_dict()
    report["spec"] = spec.to_dict()

    # -- images for the checks ------------------------------------------------------------------------
    check_data = opts.parity_data or opts.calib_data
    if check_data is not None:
        images, image_source = par.load_check_images(check_data, spec, opts.parity_images, purpose="parity checks",
                                                     progress=opts.progress)
        kind = "real"
    else:
        log.warning("no --calib-data / --parity-data: parity is checked on synthetic pictures, not real images")
        images, image_source, kind = par.synthetic_images(spec, opts.parity_images), "synthetic pictures", "synthetic"
    report["check_images"] = {"source": image_source, "count": int(len(images)), "data": check_data}

    ort32 = OnnxRuntimeEmbedder(onnx_path)
    ort_emb = ort32.embed(images)
    ort32.close()
    if torch_model is not None:
        from compress_edge.export.runtimes import TorchEmbedder

        reference = TorchEmbedder(opts.model, module=torch_model, spec=spec).embed(images)
        ref_name = "pytorch fp32"
        report["parity"]["fp32"] = par.compare(reference, ort_emb, name="onnxruntime fp32", reference_name=ref_name,
                                               goal=par.GOALS["fp32"], image_source=kind).to_dict()
    else:
        reference, ref_name = ort_emb, f"onnxruntime {source_precision}"

    def check(precision: str, path: Path, goal_key: str) -> None:
        emb = OnnxRuntimeEmbedder(path)
        try:
            got = emb.embed(images)
        finally:
            emb.close()
        report["parity"][precision] = par.compare(reference, got, name=f"onnxruntime {precision}",
                                                  reference_name=ref_name, goal=par.GOALS[goal_key],
                                                  topk_goal=par.TOPK_GOALS.get(goal_key),
                                                  image_source=kind).to_dict()

    # -- reduced precision ------------------------------------------------------------------------------
    if opts.fp16:
        from compress_edge.export.quantize import to_fp16

        report["steps"]["fp16"] = to_fp16(onnx_path, out / FILES["fp16"], spec).to_dict()
        check("fp16", out / FILES["fp16"], "fp16")
    used: dict[str, str] = {}
    batches: dict[str, int] = {}
    calib = None
    if opts.int8:
        from compress_edge.export.quantize import quantize_int8

        calib, calib_source = par.load_check_images(opts.calib_data, spec, opts.calib_images,
                                                    purpose="INT8 calibration", progress=opts.progress)
        for target in [t for t in dict.fromkeys(opts.int8) if t != "openvino"]:
            key = f"int8-{target}"
            step = quantize_int8(onnx_path, out / FILES[key], spec, calib, target=target,
                                 calib_method=opts.calib_method, progress=opts.progress,
                                 parity_images=images, exclude=opts.int8_exclude).to_dict()
            report["steps"][key] = step
            used[key] = step["settings"]["calibration"]
            batches[key] = step["settings"]["calibration_batch"]
            check(key, out / FILES[key], key)

    # -- OpenVINO IR ----------------------------------------------------------------------------------------
    if opts.openvino:
        wanted = ["fp32", *(["fp16"] if opts.fp16 else []), *(["int8"] if "openvino" in opts.int8 else [])]
        for precision in wanted:
            path = out / ovx.IR_FILES[precision]
            if precision == "int8":
                step = ovx.quantize_int8(onnx_path, path, spec, calib, progress=opts.progress).to_dict()
                used["openvino-int8"] = step["settings"]["calibration"]
                batches["openvino-int8"] = step["settings"]["calibration_batch"]
            else:
                step = ovx.convert(onnx_path, path, spec, fp16=precision == "fp16").to_dict()
            report["steps"][f"openvino-{precision}"] = step
            with ovx.OpenVinoEmbedder(path) as embedder:
                got = embedder.embed(images)
                one = embedder.embed(images[:1])  # the batch dimension stays dynamic
            if not np.allclose(one, got[:1], atol=1e-4):
                raise ExportError(f"{path.name} gives another embedding for an image alone than in a batch of "
                                  f"{len(images)}; the conversion is broken (OpenVINO {step['settings']['openvino']})")
            report["parity"][f"openvino-{precision}"] = par.compare(
                reference, got, name=f"openvino {precision}", reference_name=ref_name, goal=ovx.GOALS[precision],
                topk_goal=par.TOPK_GOALS.get(precision), image_source=kind).to_dict()

    if opts.int8:
        # What the calibrators really did (a fallback to minmax shows here), not only what was asked.
        methods = set(used.values())
        report["calibration"] = {
            "source": calib_source, "data": str(opts.calib_data), "count": int(len(calib)),
            "requested_method": opts.calib_method,
            "method": methods.pop() if len(methods) == 1 else "; ".join(f"{k}: {v}" for k, v in used.items()),
            "batch": max(batches.values()), "per_file": used,
        }

    # -- TensorRT ------------------------------------------------------------------------------------------
    if opts.trt:
        from compress_edge.export.tensorrt import build_engine, gpu_name

        built = build_engine(out / FILES[trt_source], out / FILES["engine"], min_batch=opts.min_batch,
                             opt_batch=opts.opt_batch, max_batch=opts.max_batch, workspace_mib=opts.workspace_mib,
                             timing_cache=opts.timing_cache, module=opts.trt_module)
        report["steps"]["engine"] = {**built.to_dict(), "from": FILES[trt_source]}
        if gpu_name() is not None:
            from compress_edge.export.runtimes import TensorRTEmbedder

            with TensorRTEmbedder(out / FILES["engine"]) as engine:
                got = engine.embed(images)
            goal = par.GOALS["fp32" if trt_source == "fp32" else trt_source]
            report["parity"]["engine"] = par.compare(reference, got, name=f"tensorrt {trt_source}",
                                                     reference_name=ref_name, goal=goal,
                                                     topk_goal=par.TOPK_GOALS.get(trt_source),
                                                     image_source=kind).to_dict()
        else:
            report["steps"]["engine"]["parity"] = "not run: no GPU here (run the engine on the device)"

    # -- report -------------------------------------------------------------------------------------------
    for name in [*FILES.values(), FILES["engine"] + ".json", *ovx.ir_files()]:
        path = out / name
        if path.is_file():
            report["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if opts.timing_iters > 0:
        report["timing"] = _time_files(out, images, source_precision, iters=opts.timing_iters)
    report.update(_recommend(report, source_precision))
    report["versions"] = _versions()
    report["seconds"] = round(time.perf_counter() - started, 2)
    failed = [k for k, v in report["parity"].items() if not v["passed"]]
    report["passed"] = not failed
    atomic_write_json(out / REPORT, report)
    from compress_edge.export.onnx import share

    share(out / REPORT)
    if failed and opts.strict:
        lines = "; ".join(_miss(k, report["parity"][k]) for k in failed)
        raise ParityFailed(
            f"the exported model does not give the same embeddings ({lines}); see {out / REPORT}, or pass "
            "--no-strict to keep the files anyway",
            report,
        )
    return report


def _miss(key: str, entry: dict[str, Any]) -> str:
    """'int8-cpu: min cosine 0.61 < 0.98' / 'int8-cpu: top-10 overlap 0.19 < 0.9' for a failed parity entry."""
    misses = []
    if not entry["min_cosine"] >= entry["goal"]:
        misses.append(f"min cosine {entry['min_cosine']:.6f} < {entry['goal']}")
    from compress_edge.export.parity import overlap_below

    topk_goal, overlap = entry.get("topk_goal"), entry.get("topk_overlap")
    if overlap_below(overlap, topk_goal):
        misses.append(f"top-{entry.get('k', 10)} overlap {overlap:.3f} < {topk_goal}")
    return f"{key}: {', '.join(misses) or 'not finite'}"


def _cpu_files(source_precision: str) -> dict[str, str]:
    """Files that run on this machine's CPU, by parity key: the timed ones, which ``recommended`` picks
    from. int8-trt and the engine are for TensorRT on the device and are not timed here."""
    from compress_edge.export.openvino import IR_FILES

    files = {source_precision: FILES[source_precision]} if source_precision in ("fp32", "fp16", "int8-cpu") else {}
    if source_precision == "fp32":
        files.update({"fp16": FILES["fp16"], "int8-cpu": FILES["int8-cpu"]})
    files.update({f"openvino-{p}": name for p, name in IR_FILES.items()})
    return files


def _time_files(out: Path, images: Any, source_precision: str, *, iters: int) -> dict[str, Any]:
    """Batch-1 and batch-32 latency (p50 ms) of each CPU file in ``out`` on the parity ``images``.

    A short timing (2 warm-up runs, ``iters`` timed ones per batch size): enough to see a file that is
    twice as slow, not a benchmark (``compress-edge bench`` is).
    """
    from compress_edge.export.runtimes import benchmark, machine_info, open_embedder

    files: dict[str, dict[str, Any]] = {}
    for key, name in _cpu_files(source_precision).items():
        path = out / name
        if not path.is_file():
            continue
        with open_embedder(path) as embedder:
            rows = benchmark(embedder, (1, 32), warmup=2, iters=iters, images=images)
        files[key] = {"file": name, "backend": rows[0].backend,
                      **{f"batch{r.batch}_ms": round(r.p50_ms, 4) for r in rows}}
    m = machine_info()
    return {"machine": f"{m.get('cpu')}, {m.get('cores')} cores", "iters": iters, "statistic": "p50",
            "images": "the parity images", "files": files}


def _recommend(report: dict[str, Any], source_precision: str) -> dict[str, Any]:
    """``recommended`` (the fastest CPU file at batch 1 that passes parity; the float32 model.onnx when no
    other does) and ``notes`` (each INT8 file slower than float32 or below its parity goals, with numbers)."""
    parity, timed = report["parity"], report.get("timing", {}).get("files", {})
    base = FILES[source_precision]
    base_time = timed.get(source_precision)
    notes: list[str] = []
    for key, step in report.get("steps", {}).items():
        notes += _quantization_notes(key, step.get("settings", {}) if isinstance(step, dict) else {})
    for key, entry in parity.items():
        if "int8" not in key:
            continue
        if not entry["passed"]:
            notes.append(f"{key} fails parity ({_miss(key, entry).split(': ', 1)[1]})")
        t = timed.get(key)
        if t and base_time and (t["batch1_ms"] > base_time["batch1_ms"] or t["batch32_ms"] > base_time["batch32_ms"]):
            notes.append(f"{key} is slower than {source_precision} on this machine: {t['batch1_ms']:.2f} vs "
                         f"{base_time['batch1_ms']:.2f} ms at batch 1, {t['batch32_ms']:.2f} vs "
                         f"{base_time['batch32_ms']:.2f} ms at batch 32")
    others = [(t["batch1_ms"], key, t["file"]) for key, t in timed.items()
              if key != source_precision and parity.get(key, {}).get("passed", False)]
    if base_time is None:  # no timing (timing_iters=0) or a source that is not a CPU file
        return {"recommended": {"file": base, "key": source_precision, "reason": "not timed"}, "notes": notes}
    ms, key, name = min([(base_time["batch1_ms"], source_precision, base), *others])
    if key != source_precision:
        reason = (f"the fastest file that passes parity: {ms:.2f} ms at batch 1 vs {base_time['batch1_ms']:.2f} "
                  f"for {base}")
    elif others:
        reason = f"the fastest file that passes parity ({ms:.2f} ms at batch 1)"
    elif len(timed) > 1:
        reason = f"no other file passes parity ({ms:.2f} ms at batch 1)"
    else:
        reason = f"the only file ({ms:.2f} ms at batch 1)"
    return {"recommended": {"file": name, "key": key, "batch1_ms": ms, "reason": reason}, "notes": notes}


def _quantization_notes(key: str, settings: dict[str, Any]) -> list[str]:
    """What an INT8 step kept in float and why, and which calibration method it chose over which others
    (with each candidate's parity), as report notes."""
    notes = [f"{key} keeps {g['nodes']} nodes in float ({g['pattern']}): {g['reason']}"
             for g in settings.get("excluded", [])]
    candidates = settings.get("calibration_candidates")
    if candidates:
        def one(c: dict[str, Any]) -> str:
            if "error" in c:
                return f"{c['method']} failed ({c['error']})"
            overlap = "-" if c["topk_overlap"] is None else f"{c['topk_overlap']:.3f}"
            return f"{c['method']} top-{c['k']} overlap {overlap}, min cosine {c['min_cosine']:.4f}"

        notes.append(f"{key} calibration: {settings['calibration']} chosen ({settings.get('calibration_choice', '')}): "
                     + "; ".join(one(c) for c in candidates))
    return notes


def _onnx_precision(path: str) -> str:
    """The precision an ONNX file's metadata records ("fp32" when it records none)."""
    from compress_edge.export.onnx import read_metadata
    from compress_edge.export.runtimes import PRECISION_KEY

    from compress_edge.errors import ModelError

    if not Path(path).is_file():
        raise ModelError(f"no ONNX file at {path}")
    precision = read_metadata(path).get(PRECISION_KEY, "fp32")
    return precision if precision in FILES else "fp32"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("compress-edge", "torch", "onnx", "onnxruntime", "onnxslim", "tensorrt", "tensorrt-rtx-cu13",
                 "tensorrt_rtx", "openvino", "nncf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out

