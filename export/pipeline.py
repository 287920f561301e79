"""The export stage: :func:`export_model` writes every file ``compress-edge export`` asks for into one
folder and proves each gives the same embeddings, with ``export.json`` as the record.

Ultralytics-style: :data:`FORMATS` lists the formats after the float32 ``model.onnx`` in the order they
run, each with its method ``Exporter.export_<format>``; :func:`resolve` turns the caller's
:class:`ExportOptions` into an :class:`ExportPlan` (what each option implies, e.g. ``--int8 openvino``
brings the float32 IR, ``--trt`` the file its engine is built from) without changing the options.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress_edge.errors import CompressEdgeError, ExportError

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

#: The formats written after the float32 model.onnx, in the order they run: (format, files written, the
#: :class:`ExportPlan` field that asks for it). Each has its method ``Exporter.export_<format>``.
FORMATS = (
    ("fp16", "model.fp16.onnx", "fp16"),
    ("int8", "model.int8-cpu.onnx, model.int8-trt.onnx (the calibration images for every INT8 file)", "int8"),
    ("openvino", "model.openvino.xml, model.openvino-fp16.xml, model.openvino-int8.xml (each + .bin)", "openvino"),
    ("engine", "model.engine + model.engine.json", "trt"),
)


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
    #: ``exclusions.find_exclusions``); False quantises every node onnxruntime can.
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


@dataclass(frozen=True)
class ExportPlan:
    """What an export writes, resolved from its :class:`ExportOptions` by :func:`resolve`."""

    #: The precision of the model exported from: "fp32", or what an already reduced ONNX file records.
    source_precision: str
    fp16: bool
    #: INT8 targets, each once: "cpu" and "trt" (onnxruntime files), "openvino" (the NNCF IR).
    int8: tuple[str, ...]
    openvino: bool
    trt: bool
    #: The precision the engine is built from (its file is ``FILES[trt_source]``).
    trt_source: str
    #: The INT8 calibration images: ``--calib-data``, else a run folder's training data, else None.
    calib_data: str | None = None
    #: The parity images: ``--parity-data``, else the calibration images; None: synthetic pictures.
    check_data: str | None = None

    @property
    def onnx_int8(self) -> list[str]:
        """The INT8 targets written as ONNX files by onnxruntime's quantiser."""
        return [t for t in self.int8 if t != "openvino"]

    @property
    def openvino_precisions(self) -> list[str]:
        return ["fp32", *(["fp16"] if self.fp16 else []), *(["int8"] if "openvino" in self.int8 else [])]


def resolve(opts: ExportOptions) -> ExportPlan:
    """The :class:`ExportPlan` of ``opts``, or the one-line error of an option that cannot be met (before
    any file is written). ``opts`` is left as given."""
    from compress_edge.export.exported import ENGINE_SUFFIXES, ONNX_SUFFIXES
    from compress_edge.export.quantize import INT8_TARGETS

    from compress_edge.errors import DataError, ModelError

    int8 = list(dict.fromkeys(opts.int8))
    unknown = [t for t in int8 if t not in (*INT8_TARGETS, "openvino")]
    if unknown:
        raise ExportError(f"unknown --int8 target {unknown[0]!r}; choose one of: {', '.join(INT8_TARGETS)}, openvino")
    openvino = opts.openvino or "openvino" in int8  # the NNCF INT8 IR comes with the float32 one
    if openvino:  # before any work: a missing package is a one-line error, not a half-written folder
        _require_openvino(nncf="openvino" in int8)
    if opts.trt_from is not None and opts.trt_from not in ("fp32", "fp16", "int8-trt"):
        raise ExportError(f"--trt-from must be fp32, fp16 or int8-trt, got {opts.trt_from!r}")
    suffix = Path(opts.model).suffix.lower()
    source_precision = "fp32"
    if suffix in ONNX_SUFFIXES:
        # An already reduced file (model.int8-trt.onnx, to build its engine on the device) stays what it is.
        source_precision = _onnx_precision(opts.model)
        if source_precision != "fp32" and (opts.fp16 or int8 or openvino):
            raise ExportError(f"{opts.model} is already {source_precision}; --fp16, --int8 and --openvino start from "
                              "the float32 model.onnx")
    trt_source = opts.trt_from or ("int8-trt" if "trt" in int8 else "fp16" if opts.fp16 else source_precision)
    if source_precision != "fp32" and trt_source != source_precision:
        raise ExportError(f"{opts.model} is {source_precision}: the engine can only be built from it (--trt-from "
                          f"{source_precision})")
    # The engine's source file is written too when only --trt-from asks for it.
    fp16 = opts.fp16 or (opts.trt and trt_source == "fp16" and source_precision == "fp32")
    if opts.trt and trt_source == "int8-trt" and "trt" not in int8 and source_precision == "fp32":
        int8.append("trt")
    calib_data = opts.calib_data
    if calib_data is None:
        calib_data = run_training_data(opts.model)
        if calib_data is not None and (int8 or opts.parity_data is None):
            log.info("checking on the run's training images %s (its config.json); --calib-data / --parity-data "
                     "choose others", calib_data)
    if int8 and calib_data is None:
        raise DataError("--int8 needs calibration images: pass --calib-data (an image folder, fashion-mnist:train "
                        "or a .npy of preprocessed images)")
    if suffix in ENGINE_SUFFIXES:
        raise ModelError(f"{opts.model} is already a TensorRT engine; export starts from a model or an ONNX file")
    return ExportPlan(source_precision=source_precision, fp16=fp16, int8=tuple(int8), openvino=openvino,
                      trt=opts.trt, trt_source=trt_source, calib_data=calib_data,
                      check_data=opts.parity_data or calib_data)


#: A run folder trained on a folder of more images than this is not opened for its check images by default
#: (every image of a folder is decoded once when it is opened).
RUN_DATA_MAX_IMAGES = 50_000


def run_training_data(model: str) -> str | None:
    """The training images a distill or pretrain run folder (``model``, or its ``student/`` folder) records
    in config.json, when they are still there (or name Fashion-MNIST); else None."""
    from compress_edge.data.grammar import absolute_data, parse_data

    path = Path(model)
    if not path.is_dir():
        return None
    for folder in (path, path.parent):
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        for section in ("distill", "pretrain"):
            options = config.get(section) if isinstance(config, dict) else None
            data = options.get("data") if isinstance(options, dict) else None
            if not isinstance(data, str) or not data:
                continue
            try:
                found = absolute_data(data, options.get("data_root"))
                arg = parse_data(found)
            except CompressEdgeError:
                return None
            if arg.split is not None:
                return found  # Fashion-MNIST: read from its files, nothing to scan
            images = (config.get("plan") or {}).get("images") if isinstance(config.get("plan"), dict) else None
            if isinstance(images, int) and images > RUN_DATA_MAX_IMAGES:
                log.info("the run's %d training images are more than are worth checking one by one for a few "
                         "parity images; pass --calib-data / --parity-data (a folder of some of them)", images)
                return None
            return found if Path(arg.base).exists() else None
    return None


def _require_openvino(*, nncf: bool) -> None:
    """The error that names the extra when the openvino package (and with ``nncf``, nncf) is missing."""
    from compress_edge.deps import available, require

    for module, purpose in (("openvino", "the OpenVINO export"), ("nncf", "OpenVINO INT8 quantisation")):
        if (module == "openvino" or nncf) and not available(module):
            require(module, purpose)  # raises the error that names the extra


def export_model(opts: ExportOptions) -> dict[str, Any]:
    """Export ``opts.model`` into ``opts.out`` and prove each file gives the same embeddings.

    Writes ``model.onnx`` (always), ``model.fp16.onnx``, ``model.int8-cpu.onnx``,
    ``model.int8-trt.onnx``, ``model.engine`` + ``model.engine.json``, the OpenVINO IR
    ``model.openvino.xml`` (with ``--fp16`` also ``model.openvino-fp16.xml``, with ``--int8 openvino``
    ``model.openvino-int8.xml``; each with its .bin) as asked, and ``export.json``
    (spec, files, parity numbers, settings, versions). Returns that report. With ``strict``, a parity
    result below its goal raises :class:`ParityFailed` (with the report) after the report is written.
    """
    exporter = Exporter(opts, resolve(opts))
    exporter.export_onnx()
    exporter.prepare_checks()
    for name, _files, wanted in FORMATS:
        if getattr(exporter.plan, wanted):
            getattr(exporter, f"export_{name}")()
    return exporter.finish()


class Exporter:
    """One export in progress: the options, their plan, the report so far, and what the format steps
    share (the ModelSpec, the check images, the reference embeddings, the calibration images)."""

    def __init__(self, opts: ExportOptions, plan: ExportPlan) -> None:
        self.opts, self.plan = opts, plan
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.report: dict[str, Any] = {"model": str(opts.model), "out": str(self.out), "files": {}, "parity": {},
                                       "steps": {}}
        self.onnx_path = self.out / FILES[plan.source_precision]
        self.torch_model = self.spec = self.images = self.kind = self.reference = self.ref_name = None
        self.calib = self.calib_source = None
        #: The calibration method and batch each INT8 file really used, by parity key.
        self.used: dict[str, str] = {}
        self.batches: dict[str, int] = {}

    # -- float32 ONNX and the check images -------------------------------------------------------------
    def export_onnx(self) -> None:
        """model.onnx (or the given ONNX file, copied with its spec) and ``self.spec``."""
        from compress_edge.export.exported import ONNX_SUFFIXES

        opts = self.opts
        if Path(opts.model).suffix.lower() in ONNX_SUFFIXES:
            from compress_edge.export.backends import OnnxRuntimeEmbedder
            from compress_edge.export.onnx import check_dynamic_batch, with_spec

            source = OnnxRuntimeEmbedder(opts.model, image_size=opts.image_size, mean=opts.mean, std=opts.std)
            spec = source.spec
            source.close()
            if Path(opts.model).resolve() != self.onnx_path.resolve():
                with_spec(opts.model, self.onnx_path, spec, precision=self.plan.source_precision)
            self.report["steps"]["onnx"] = {"from": "onnx file",
                                            "batch_check": check_dynamic_batch(self.onnx_path, spec)}
        else:
            from compress_edge.export.onnx import export_onnx

            from compress_edge.models.resolve import resolve_model

            self.torch_model, spec = resolve_model(opts.model, weights=opts.weights, image_size=opts.image_size)
            if opts.mean is not None or opts.std is not None:
                spec = spec.replace(mean=tuple(opts.mean or spec.mean), std=tuple(opts.std or spec.std))
            result = export_onnx(self.torch_model, spec, self.onnx_path, opset=opts.opset, exporter=opts.exporter,
                                 simplify=opts.simplify)
            self.report["steps"]["onnx"] = result.to_dict()
        self.spec = spec
        self.report["spec"] = spec.to_dict()

    def prepare_checks(self) -> None:
        """The parity images and the reference embeddings every file is compared with: PyTorch's for a
        model (model.onnx itself checked against them), else the given ONNX file's."""
        from compress_edge.export import parity as par
        from compress_edge.export.backends import OnnxRuntimeEmbedder

        opts, spec = self.opts, self.spec
        check_data = self.plan.check_data
        if check_data is not None:
            images, image_source = par.load_check_images(check_data, spec, opts.parity_images,
                                                         purpose="parity checks", progress=opts.progress)
            self.kind = "real"
        else:
            log.warning("no --calib-data / --parity-data: parity is checked on synthetic pictures, not real images")
            images, image_source = par.synthetic_images(spec, opts.parity_images), "synthetic pictures"
            self.kind = "synthetic"
        self.images = images
        self.report["check_images"] = {"source": image_source, "count": int(len(images)), "data": check_data}

        ort32 = OnnxRuntimeEmbedder(self.onnx_path)
        ort_emb = ort32.embed(images)
        ort32.close()
        if self.torch_model is None:
            self.reference, self.ref_name = ort_emb, f"onnxruntime {self.plan.source_precision}"
            return
        from compress_edge.export.backends import TorchEmbedder

        self.reference = TorchEmbedder(opts.model, module=self.torch_model, spec=spec).embed(images)
        self.ref_name = "pytorch fp32"
        self.compare("fp32", ort_emb, name="onnxruntime fp32", goal_key="fp32", topk=False)

    def compare(self, key: str, got: Any, *, name: str, goal_key: str, goal: float | None = None,
                topk: bool = True) -> None:
        """``report["parity"][key]``: ``got`` against the reference embeddings, with the goals of ``goal_key``."""
        from compress_edge.export import parity as par

        self.report["parity"][key] = par.compare(
            self.reference, got, name=name, reference_name=self.ref_name,
            goal=par.GOALS[goal_key] if goal is None else goal,
            **({"topk_goal": par.TOPK_GOALS.get(goal_key)} if topk else {}), image_source=self.kind).to_dict()

    def check_onnx(self, key: str) -> None:
        """Parity of the ONNX file of ``key`` (a precision) on onnxruntime."""
        from compress_edge.export.backends import OnnxRuntimeEmbedder

        emb = OnnxRuntimeEmbedder(self.out / FILES[key])
        try:
            got = emb.embed(self.images)
        finally:
            emb.close()
        self.compare(key, got, name=f"onnxruntime {key}", goal_key=key)

    # -- the formats (FORMATS) ----------------------------------------------------------------------------
    def export_fp16(self) -> None:
        from compress_edge.export.quantize import to_fp16

        self.report["steps"]["fp16"] = to_fp16(self.onnx_path, self.out / FILES["fp16"], self.spec).to_dict()
        self.check_onnx("fp16")

    def export_int8(self) -> None:
        """The calibration images (for every INT8 file, the OpenVINO one too), and each onnxruntime INT8 file."""
        from compress_edge.export import parity as par
        from compress_edge.export.quantize import quantize_int8

        opts = self.opts
        self.calib, self.calib_source = par.load_check_images(self.plan.calib_data, self.spec, opts.calib_images,
                                                              purpose="INT8 calibration", progress=opts.progress)
        for target in self.plan.onnx_int8:
            key = f"int8-{target}"
            step = quantize_int8(self.onnx_path, self.out / FILES[key], self.spec, self.calib, target=target,
                                 calib_method=opts.calib_method, progress=opts.progress,
                                 parity_images=self.images, exclude=opts.int8_exclude).to_dict()
            self._record_calibration(key, step)
            self.check_onnx(key)

    def _record_calibration(self, key: str, step: dict[str, Any]) -> None:
        self.report["steps"][key] = step
        self.used[key] = step["settings"]["calibration"]
        self.batches[key] = step["settings"]["calibration_batch"]

    def export_openvino(self) -> None:
        """The OpenVINO IRs, each checked for parity and for a batch dimension that stays dynamic."""
        import numpy as np
        from compress_edge.export import openvino as ovx

        for precision in self.plan.openvino_precisions:
            path = self.out / ovx.IR_FILES[precision]
            if precision == "int8":
                step = ovx.quantize_int8(self.onnx_path, path, self.spec, self.calib,
                                         progress=self.opts.progress).to_dict()
                self._record_calibration("openvino-int8", step)
            else:
                step = ovx.convert(self.onnx_path, path, self.spec, fp16=precision == "fp16").to_dict()
                self.report["steps"][f"openvino-{precision}"] = step
            with ovx.OpenVinoEmbedder(path) as embedder:
                got = embedder.embed(self.images)
                alone = None
                if not np.allclose(embedder.embed(self.images[:1]), got[:1], atol=1e-4):
                    # A device answering one query at a time gets these: they are what parity measures.
                    alone = np.concatenate([embedder.embed(self.images[i : i + 1]) for i in range(len(self.images))])
            key = f"openvino-{precision}"
            self.compare(key, got if alone is None else alone, name=f"openvino {precision}", goal_key=precision,
                         goal=ovx.GOALS[precision])
            if alone is not None:
                diff = float(np.abs(alone - got).max())
                self.report["steps"][key]["batch_one_max_diff"] = diff
                log.warning("%s gives other embeddings for an image alone than in a batch (max |diff| %.3g, OpenVINO "
                            "%s); its parity is measured one image at a time, as a device searching single "
                            "queries runs it", path.name, diff, step["settings"]["openvino"])

    def export_engine(self) -> None:
        """model.engine from the plan's source file; its parity only where a GPU runs it."""
        from compress_edge.export.tensorrt import build_engine, gpu_name

        opts, source = self.opts, self.plan.trt_source
        built = build_engine(self.out / FILES[source], self.out / FILES["engine"], min_batch=opts.min_batch,
                             opt_batch=opts.opt_batch, max_batch=opts.max_batch, workspace_mib=opts.workspace_mib,
                             timing_cache=opts.timing_cache, module=opts.trt_module)
        self.report["steps"]["engine"] = {**built.to_dict(), "from": FILES[source]}
        if gpu_name() is None:
            self.report["steps"]["engine"]["parity"] = "not run: no GPU here (run the engine on the device)"
            return
        from compress_edge.export.backends import TensorRTEmbedder

        with TensorRTEmbedder(self.out / FILES["engine"]) as engine:
            got = engine.embed(self.images)
        self.compare("engine", got, name=f"tensorrt {source}", goal_key=source)

    # -- the report ------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """export.json written (files, timing, recommendation, versions); ParityFailed when strict and a
        file misses its goal."""
        from compress_edge.export.onnx import share
        from compress_edge.export.openvino import ir_files

        from compress_edge.storage import atomic_write_json, sha256_file

        report, out = self.report, self.out
        if self.plan.int8:
            report["calibration"] = self._calibration()
        for name in [*FILES.values(), FILES["engine"] + ".json", *ir_files()]:
            path = out / name
            if path.is_file():
                report["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        if self.opts.timing_iters > 0:
            report["timing"] = _time_files(out, self.images, self.plan.source_precision, iters=self.opts.timing_iters)
        report.update(_recommend(report, self.plan.source_precision))
        report["versions"] = _versions()
        report["seconds"] = round(time.perf_counter() - self.started, 2)
        failed = [k for k, v in report["parity"].items() if not v["passed"]]
        report["passed"] = not failed
        atomic_write_json(out / REPORT, report)
        share(out / REPORT)
        if failed and self.opts.strict:
            lines = "; ".join(_miss(k, report["parity"][k]) for k in failed)
            raise ParityFailed(
                f"the exported model does not give the same embeddings ({lines}); see {out / REPORT}, or pass "
                "--no-strict to keep the files anyway",
                report,
            )
        return report

    def _calibration(self) -> dict[str, Any]:
        """What the calibrators really did (a fallback to minmax shows here), not only what was asked."""
        methods = set(self.used.values())
        return {
            "source": self.calib_source, "data": str(self.plan.calib_data), "count": int(len(self.calib)),
            "requested_method": self.opts.calib_method,
            "method": methods.pop() if len(methods) == 1 else "; ".join(f"{k}: {v}" for k, v in self.used.items()),
            "batch": max(self.batches.values()), "per_file": self.used,
        }


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
    from compress_edge.export.bench import benchmark, machine_info
    from compress_edge.export.runtimes import open_embedder

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
        if isinstance(step, dict) and "batch_one_max_diff" in step:
            notes.append(f"{key} gives other embeddings for an image alone than in a batch (max |diff| "
                         f"{step['batch_one_max_diff']:.3g}): its parity was measured one image at a time")
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
            if "skipped" in c:
                return f"{c['method']} {c['skipped']}"
            overlap = "-" if c["topk_overlap"] is None else f"{c['topk_overlap']:.3f}"
            return f"{c['method']} top-{c['k']} overlap {overlap}, min cosine {c['min_cosine']:.4f}"

        notes.append(f"{key} calibration: {settings['calibration']} chosen ({settings.get('calibration_choice', '')}): "
                     + "; ".join(one(c) for c in candidates))
    return notes


def _onnx_precision(path: str) -> str:
    """The precision an ONNX file's metadata records ("fp32" when it records none)."""
    from compress_edge.export.exported import PRECISION_KEY
    from compress_edge.export.onnx import read_metadata

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

