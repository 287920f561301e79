"""``compress-edge export`` (ONNX, FP16, INT8, TensorRT, OpenVINO, with parity checks) and ``compress-edge bench``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import DEVICE_METAVAR, Backend, CalibMethod, EngineSource, Exporter, console
from compress_edge.errors import CompressEdgeError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np

ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Input side in pixels (an ONNX file without "
                                                                       "compress-edge metadata needs it).")]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406 (for an "
                                                            "ONNX file without metadata).")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")]


def parse_floats(value: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); CompressEdgeError for anything else."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise CompressEdgeError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {value!r}") from None
    if len(numbers) != 3:
        raise CompressEdgeError(f"{option} takes 3 numbers (one per RGB channel), got {len(numbers)}")
    return numbers


def _default_out(model: str) -> Path:
    path = Path(model)
    name = path.stem if path.suffix else path.name
    if name in ("student", "") and path.parent.name:
        name = path.parent.name
    return Path("exports") / (name or "model")


@app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="A compress-edge model or run folder, an architecture name (with "
                                              "--weights), or a .onnx file to quantise / build an engine from.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: exports/<model name>).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", hidden=True, help="Write model.onnx (always done: every other "
                                                                   "file starts from it).")] = True,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model.fp16.onnx (float16 compute, float32 I/O).")] = False,
    int8: Annotated[list[str] | None, typer.Option("--int8", metavar="<cpu|trt|openvino>", help="Also write an INT8 "
                                                    "model: 'cpu' (onnxruntime on x86), 'trt' (TensorRT) or "
                                                    "'openvino' (NNCF, implies --openvino); repeatable.")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Images for INT8 calibration and the parity "
                                                   "checks: an image folder, fashion-mnist:train|test, or a .npy of "
                                                   "preprocessed images.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images taken from --calib-data.")] = 256,
    calib_method: Annotated[CalibMethod, typer.Option("--calib-method", help="auto (try percentile (99.999), "
                                                      "minmax and entropy; keep the best parity), or one of "
                                                      "them.")] = "auto",
    parity_data: Annotated[str | None, typer.Option("--parity-data", help="Images for the parity checks "
                                                    "(default: --calib-data).")] = None,
    parity_images: Annotated[int, typer.Option("--parity-images", help="Images in the parity checks and the "
                                               "top-10 gallery.")] = 64,
    trt: Annotated[bool, typer.Option("--trt", help="Also build model.engine with TensorRT (or TensorRT-RTX).")] = False,
    openvino: Annotated[bool, typer.Option("--openvino", help="Also write the OpenVINO IR model.openvino.xml (+ .bin) "
                                           "for Intel CPUs, GPUs and NPUs; with --fp16 also model.openvino-fp16.xml, "
                                           "with --int8 openvino model.openvino-int8.xml.")] = False,
    trt_from: Annotated[EngineSource | None, typer.Option("--trt-from", help="Which ONNX the engine is built "
                                                          "from: fp32, fp16 or int8-trt (default: the lowest "
                                                          "precision asked for).")] = None,
    min_batch: Annotated[int, typer.Option("--min-batch", help="Smallest batch of the engine's profile.")] = 1,
    opt_batch: Annotated[int | None, typer.Option("--opt-batch", help="Batch the engine is tuned for (default: "
                                                  "--max-batch).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch of the engine's profile.")] = 32,
    workspace: Annotated[int, typer.Option("--workspace", help="TensorRT workspace limit in MiB.")] = 1024,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="TensorRT timing cache reused across "
                                                      "builds (default: ~/.cache/compress-edge).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 18 to 20.")] = 18,
    exporter: Annotated[Exporter, typer.Option("--exporter", help="auto (dynamo, then TorchScript), dynamo or "
                                          "torchscript.")] = "auto",
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="Simplify the graph with onnxslim.")] = True,
    weights: Annotated[str | None, typer.Option("--weights", help="Checkpoint for an architecture-name MODEL.")] = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="Fail when a parity check misses its goal.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Export a model for devices and prove every file gives the same embeddings.

    Writes model.onnx (ModelSpec in its metadata, dynamic batch), and as asked model.fp16.onnx,
    model.int8-cpu.onnx, model.int8-trt.onnx, model.engine (+ model.engine.json), the OpenVINO IR
    model.openvino.xml / -fp16 / -int8 (each + .bin), and export.json with the parity numbers (cosine,
    max difference, top-10 neighbour overlap against float32).

    Example: compress-edge export runs/distill --fp16 --int8 cpu --calib-data fashion-mnist:train --out exports/student
    """
    from compress_edge.export import ExportOptions, ParityFailed, export_model

    del onnx  # always on; the flag exists so that the documented command reads naturally
    opts = ExportOptions(
        model=model, out=str(out or _default_out(model)), weights=weights, image_size=image_size,
        mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), opset=opset, exporter=exporter,
        simplify=simplify, fp16=fp16, int8=[t.lower() for t in (int8 or [])], calib_data=calib_data,
        calib_images=calib_images, calib_method=calib_method, parity_data=parity_data, parity_images=parity_images,
        trt=trt, trt_from=trt_from, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        workspace_mib=workspace, timing_cache=str(timing_cache) if timing_cache else None, openvino=openvino,
        strict=strict, progress=progress,
    )
    from compress_edge.progress import bars

    try:
        with bars(progress):
            report = export_model(opts)
    except ParityFailed as exc:
        # Which file missed its goal, and by how much, comes before the one-line error.
        _show_export(exc.report, as_json)
        raise
    _show_export(report, as_json)


def _show_export(report: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_export(report)


def _print_export(report: dict) -> None:
    out = Path(report["out"])
    step = report["steps"].get("onnx", {})
    if "exporter" in step:
        console.print(
            f"{out / 'model.onnx'}: {step['exporter']} exporter, opset {step['opset']}, {step['nodes']} nodes"
            f"{', simplified' if step['simplified'] else ''}; batch 1 and 7 run", markup=False, highlight=False)
    for name, info in report["files"].items():
        if name != "model.onnx":
            console.print(f"{out / name}: {_size(info['bytes'])}", markup=False, highlight=False)
    from compress_edge.export.parity import ParityResult

    calib = report.get("calibration")
    if calib:
        asked = calib.get("requested_method")
        console.print(f"int8 calibration: {calib['count']} images from {calib['source']}, {calib['method']}"
                      f"{f' (asked for {asked})' if asked and asked != calib['method'] else ''}, "
                      f"batches of {calib.get('batch', '?')}", markup=False, highlight=False, soft_wrap=True)
    for result in report["parity"].values():
        console.print(ParityResult(**result).line(), markup=False, highlight=False, soft_wrap=True)
    engine = report["steps"].get("engine")
    if engine:
        console.print(f"engine: {engine['module']} {engine['version']}, from {engine['from']} ({engine['precision']}), "
                      f"{engine['gpu']}, batch {engine['profile']['min'][0]}..{engine['profile']['max'][0]}"
                      f"{'; parity ' + engine['parity'] if isinstance(engine.get('parity'), str) else ''}",
                      markup=False, highlight=False, soft_wrap=True)
    timing = report.get("timing")
    if timing and timing.get("files"):
        console.print(f"latency on this machine ({timing['machine']}; p50 of {timing['iters']} runs on the parity "
                      "images):", markup=False, highlight=False, soft_wrap=True)
        for t in timing["files"].values():
            console.print(f"  {t['file']}: {t['batch1_ms']:.2f} ms at batch 1, {t['batch32_ms']:.2f} ms at batch 32",
                          markup=False, highlight=False, soft_wrap=True)
    for note in report.get("notes", []):
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    rec = report.get("recommended")
    if rec:
        console.print(f"deploy: {out / rec['file']} ({rec['reason']})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report written to {out / 'export.json'}", markup=False, highlight=False)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


@app.command("bench")
def bench(
    models: Annotated[list[str], typer.Argument(metavar="MODEL", help="Model files to measure side by side: model folders / "
                                                     "architecture names (PyTorch), .onnx (onnxruntime), .engine "
                                                     "(TensorRT), .xml (OpenVINO).")],
    backend: Annotated[Backend, typer.Option("--backend", help="auto (by file type), torch, onnxruntime or "
                                                               "tensorrt.")] = "auto",
    batch: Annotated[list[int] | None, typer.Option("--batch", "-b", help="Batch sizes (repeatable; default 1 and 32).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (default: the runtime's).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before timing.")] = 5,
    iters: Annotated[int, typer.Option("--iters", help="Timed runs per batch size.")] = 30,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="Keep timing until this long.")] = 1.0,
    device: Annotated[str, typer.Option("--device", metavar=DEVICE_METAVAR, help="auto (the GPU when the runtime "
                                         "sees one), cpu, cuda or cuda:N (TensorRT always uses the GPU).")] = "auto",
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="Images to time and compare on: an image folder, "
                                             "fashion-mnist:test or a .npy (default: the calibration set "
                                             "export.json beside the model names).")] = None,
    weights: Annotated[str | None, typer.Option("--weights", help="A third-party checkpoint for the one "
                                                "architecture-name MODEL (e.g. resnet50 with a MoCo .pth).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Latency (p50, p95), throughput, peak memory and achieved GFLOP/s per model and batch size.

    The first model is the reference: every other one also gets the minimum cosine of its embeddings
    against it on the same images. Inputs are real images (--data, else the calibration set of the
    export); random tensors only when there are none, with a warning.

    Example: compress-edge bench runs/distill exports/student/model.onnx exports/student/model.int8-cpu.onnx --threads 2
    """
    from compress_edge.export.parity import cosine_per_row, synthetic_images
    from compress_edge.export.runtimes import benchmark, count_gflops, machine_info, open_embedder

    sizes = batch or [1, 32]
    source, where = (data, "--data") if data else _recorded_data(models)
    inputs = {"kind": "real", "data": source, "from": where} if source else {"kind": "random"}
    loaded: dict[tuple, np.ndarray] = {}
    rows, cosines = [], {}
    reference = pictures = None
    named = [m for m in models if not Path(m).exists()]
    if weights is not None and len(named) != 1:
        raise CompressEdgeError(f"--weights goes with one architecture-name MODEL, and {len(named)} are given; "
                                "bench one checkpoint at a time, or export it first and bench its model.onnx")
    for model in models:
        if weights is not None and model == named[0]:
            embedder = _weighted_embedder(model, weights, device=device, threads=threads, image_size=image_size,
                                          mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))
        else:
            embedder = open_embedder(model, backend, device=device, threads=threads, image_size=image_size,
                                     mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))
        try:
            real = _bench_images(embedder.spec, source, where, max(32, *sizes), loaded, inputs)
            rows += benchmark(embedder, sizes, warmup=warmup, iters=iters, min_seconds=min_seconds,
                              gflop_per_image=count_gflops(embedder.spec), label=model, images=real)
            test = (real[:32], "real") if real is not None else (synthetic_images(embedder.spec, 32), "synthetic")
            if pictures is None:
                pictures = test
            # Compared only on the same kind of input (a set that failed to load midway is not).
            same = test[1] == pictures[1] and test[0].shape[1:] == pictures[0].shape[1:]
            emb = embedder.embed(test[0]) if same else None
            if reference is None:
                reference = emb
            elif emb is not None and reference is not None and emb.shape == reference.shape:
                cosines[model] = float(cosine_per_row(reference, emb).min())
        finally:
            embedder.close()
    if inputs["kind"] == "random":
        log.warning("bench ran on random tensors and synthetic pictures, which say little about real inputs (an "
                    "INT8 model may answer them with zeros): pass --data with an image folder or fashion-mnist:test")
    result = {"machine": machine_info(), "inputs": inputs, "rows": [r.to_dict() for r in rows],
              "min_cosine_vs_first": cosines}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"{m['cpu']}, {m['cores']} cores, {', '.join(m['simd']) or 'no AVX-512'}",
                  caption=f"inputs: {inputs.get('source', inputs['data'])}" if inputs["kind"] == "real"
                  else "inputs: random tensors (no images given)")
    for col in ("model", "backend", "precision", "threads", "batch", "p50 ms", "p95 ms", "img/s", "GFLOP/s",
                "peak MB", "cos vs 1st"):
        table.add_column(col, justify="left" if col in ("model", "backend", "precision") else "right")
    for r in rows:
        cos = cosines.get(r.model)
        table.add_row(_short_name(r.model), r.backend, r.precision, str(r.threads or "default"), str(r.batch), f"{r.p50_ms:.2f}",
                      f"{r.p95_ms:.2f}", f"{r.images_per_s:.0f}",
                      f"{r.achieved_gflops:.1f}" if r.achieved_gflops else "-",
                      f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-", f"{cos:.4f}" if cos is not None else "-")
    # Piped or captured output has no terminal width to fit: give the table room instead of folding it.
    from rich.console import Console

    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)


def _recorded_data(models: list[str]) -> tuple[str | None, str]:
    """The calibration (else parity) images export.json beside a model names, and that file; (None, "")."""
    for model in models:
        path = Path(model)
        report_path = (path if path.is_dir() else path.parent) / "export.json"
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            continue
        for key in ("calibration", "check_images"):
            entry = report.get(key) if isinstance(report, dict) else None
            if not isinstance(entry, dict):
                continue
            recorded = entry.get("data")
            source = str(entry.get("source", ""))
            if not isinstance(recorded, str) and source.startswith("real (") and source.endswith(")"):
                recorded = source[len("real (") : -1]  # an export.json from before "data" was recorded
            if isinstance(recorded, str) and recorded:
                return recorded, str(report_path)
    return None, ""


def _bench_images(spec, source: str | None, where: str, n: int, loaded: dict, inputs: dict) -> np.ndarray | None:
    """``n`` real images preprocessed for ``spec`` (cached per preprocessing), or None without a source.

    A set named only by export.json that cannot be read any more (moved, relative to another folder)
    falls back to random input with a warning; --data that cannot be read is an error.
    """
    if source is None or inputs["kind"] != "real":
        return None
    from compress_edge.export.parity import load_check_images

    key = (spec.channels, spec.image_size, tuple(spec.mean), tuple(spec.std))
    if key not in loaded:
        try:
            loaded[key], inputs["source"] = load_check_images(source, spec, n, purpose="bench", progress=False)
        except CompressEdgeError as exc:
            if where == "--data":
                raise
            log.warning("cannot read the images %s names (%s)", where, exc)
            inputs.clear()
            inputs["kind"] = "random"
            return None
    return loaded[key]


def _weighted_embedder(arch: str, weights: str, *, device: str, threads: int | None, image_size: int | None,
                       mean, std):
    """A PyTorch embedder of an architecture name with a third-party checkpoint's backbone (bench --weights)."""
    from compress_edge.export.runtimes import TorchEmbedder
    from compress_edge.models.resolve import resolve_model

    model, spec = resolve_model(arch, weights=weights, image_size=image_size)
    return TorchEmbedder(arch, module=model, spec=spec, device=device, threads=threads, mean=mean, std=std)


def _short_name(model: str) -> str:
    parts = Path(model).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else model
