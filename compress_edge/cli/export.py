"""``compress-edge export`` (ONNX, FP16, INT8, TensorRT, OpenVINO, with parity checks) and ``compress-edge bench``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import DEVICE_METAVAR, BackendOpt, CalibMethod, EngineSource, Exporter, console
from compress_edge.errors import CompressEdgeError

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


# The TensorRT engine's build options.
MinBatchOpt = Annotated[int, typer.Option("--min-batch", help="Smallest batch of the engine's profile.")]
OptBatchOpt = Annotated[int | None, typer.Option("--opt-batch", help="Batch the engine is tuned for (default: "
                                                 "--max-batch).")]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", help="Largest batch of the engine's profile.")]
WorkspaceOpt = Annotated[int, typer.Option("--workspace", help="TensorRT workspace limit in MiB.")]
TimingCacheOpt = Annotated[Path | None, typer.Option("--timing-cache", help="TensorRT timing cache reused across "
                                                     "builds (default: ~/.cache/compress-edge).")]


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
                                                   "preprocessed images (default: a run folder's training "
                                                   "images).")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images taken from --calib-data.")] = 256,
    calib_method: Annotated[CalibMethod, typer.Option("--calib-method", help="auto (try percentile (99.999), "
                                                      "minmax and entropy, and for int8-cpu of a model whose "
                                                      "weights are mostly MatMul (a ViT) dynamic quantisation; "
                                                      "keep the best parity), or one of them.")] = "auto",
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
    min_batch: MinBatchOpt = 1,
    opt_batch: OptBatchOpt = None,
    max_batch: MaxBatchOpt = 32,
    workspace: WorkspaceOpt = 1024,
    timing_cache: TimingCacheOpt = None,
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
    from compress_edge.export.pipeline import ExportOptions, ParityFailed, export_model

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
    backend: BackendOpt = "auto",
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
    from compress_edge.export.bench_models import bench_models

    bench_result = bench_models(models, backend=backend, sizes=batch or [1, 32], threads=threads, warmup=warmup,
                                iters=iters, min_seconds=min_seconds, device=device, image_size=image_size,
                                mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), data=data,
                                weights=weights)
    if as_json:
        typer.echo(json.dumps(bench_result.to_dict(), indent=2))
        return
    _print_bench(bench_result)


def _print_bench(result) -> None:
    """The table of a :class:`~compress_edge.export.bench_models.BenchResult`."""
    from rich.table import Table

    m, inputs, cosines = result.machine, result.inputs, result.min_cosine_vs_first
    table = Table(title=f"{m['cpu']}, {m['cores']} cores, {', '.join(m['simd']) or 'no AVX-512'}",
                  caption=f"inputs: {inputs.get('source', inputs['data'])}" if inputs["kind"] == "real"
                  else "inputs: random tensors (no images given)")
    for col in ("model", "backend", "precision", "threads", "batch", "p50 ms", "p95 ms", "img/s", "GFLOP/s",
                "peak MB", "cos vs 1st"):
        table.add_column(col, justify="left" if col in ("model", "backend", "precision") else "right")
    for r in result.rows:
        cos = cosines.get(r.model)
        table.add_row(_short_name(r.model), r.backend, r.precision, str(r.threads or "default"), str(r.batch), f"{r.p50_ms:.2f}",
                      f"{r.p95_ms:.2f}", f"{r.images_per_s:.0f}",
                      f"{r.achieved_gflops:.1f}" if r.achieved_gflops else "-",
                      f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-", f"{cos:.4f}" if cos is not None else "-")
    # Piped or captured output has no terminal width to fit: give the table room instead of folding it.
    from rich.console import Console

    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)


def _short_name(model: str) -> str:
    parts = Path(model).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else model
