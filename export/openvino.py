"""OpenVINO for Intel CPUs, integrated GPUs and NPUs: IR files from the float32 ONNX, and their Embedder.

- ``model.openvino.xml`` (+ ``.bin``): the ONNX graph converted by ``openvino.convert_model``, float32
  weights.
- ``model.openvino-fp16.xml``: the same with float16 weights (``save_model(compress_to_fp16=True)``):
  half the file; a GPU or NPU computes in float16, a CPU decompresses the weights and computes in
  float32.
- ``model.openvino-int8.xml``: NNCF post-training quantisation (``nncf.quantize``, performance preset:
  symmetric int8 activations and per-channel weights, min-max ranges, no bias correction; 7-bit
  weights in every layer on an x86 CPU without VNNI, NNCF's ``OverflowFix.ENABLE``) calibrated
  on the same images as the ONNX INT8 files; for a transformer (MatMul / Gemm hold most weights)
  NNCF's ``ModelType.TRANSFORMER`` and its mixed preset instead. NNCF's default fast bias correction cost parity on the
  trained MobileNetV2 student at 32 px (min cosine 0.891, top-10 overlap 0.873 on 200 Fashion-MNIST
  test images; without it 0.992 and 0.956), so it is off.

The ModelSpec travels inside the IR (``rt_info`` ``compress_edge/metadata``: the ONNX file's metadata
as JSON, with the precision), so a device needs nothing but the .xml and its .bin.

Importing this module needs neither torch nor openvino: :class:`OpenVinoEmbedder` is the device's
query path (numpy, PIL and openvino only); the export functions need onnx and, for INT8, nncf.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.embedder import GraphIO, ModelFileEmbedder
from compress_edge.export.exported import PRECISION_KEY
from compress_edge.export.onnx import quiet_logs
from compress_edge.export.quantize import SATURATION_CAUSE, QuantizeResult, int8_saturates

from compress_edge.deps import require
from compress_edge.errors import DependencyError, ExportError, ModelError
from compress_edge.models.spec import ModelSpec

#: Recorded in export.json where NNCF quantises every layer's weights to 7 bits (see :func:`quantize_int8`).
OVERFLOW_FIX_REASON = (f"{SATURATION_CAUSE}, so every layer's weights use 7 bits (NNCF's OverflowFix.ENABLE; its "
                       "default fixes the first layer only)")

log = logging.getLogger(__name__)

#: IR file names inside an export folder, by OpenVINO precision (each with a .bin beside it).
IR_FILES = {
    "fp32": "model.openvino.xml",
    "fp16": "model.openvino-fp16.xml",
    "int8": "model.openvino-int8.xml",
}
#: The precision each IR records (``Embedder.precision``).
PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-openvino"}
#: Minimum cosine against the float32 reference (the goals of the ONNX files of the same precision).
GOALS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
#: Where the ModelSpec lives in the IR's rt_info.
METADATA_PATH = ["compress_edge", "metadata"]
#: Devices an IR is compiled for (OpenVINO's names, lower-case as the command line takes them).
DEVICES = ("auto", "cpu", "gpu", "gpu.N", "npu")


def bin_path(xml: str | os.PathLike) -> Path:
    """The weights file beside an IR ``.xml``."""
    return Path(xml).with_suffix(".bin")


def ir_files() -> list[str]:
    """Every file name an OpenVINO export can write (.xml and .bin), for export.json."""
    return [n for xml in IR_FILES.values() for n in (xml, bin_path(xml).name)]


# --------------------------------------------------------------------------------------------------
# Export: ONNX -> IR (fp32, fp16), NNCF int8
# --------------------------------------------------------------------------------------------------
def convert(
    src: str | os.PathLike, dst: str | os.PathLike, spec: ModelSpec, *, fp16: bool = False
) -> QuantizeResult:
    """The float32 ONNX file ``src`` -> OpenVINO IR ``dst`` (.xml + .bin), float16 weights with ``fp16``."""
    ov = _openvino("the OpenVINO export")
    start = time.perf_counter()
    model = _convert(ov, src)
    key = "fp16" if fp16 else "fp32"
    _write_ir(ov, model, dst, _metadata(src, spec, PRECISIONS[key]), compress_to_fp16=fp16)
    return QuantizeResult(
        path=str(dst),
        precision=PRECISIONS[key],
        seconds=time.perf_counter() - start,
        settings={"openvino": ov.get_version(), "weights": "float16" if fp16 else "float32",
                  "compute": "float16 on GPU/NPU, float32 on CPU" if fp16 else "float32", "io": "float32"},
    )


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    spec: ModelSpec,
    calib: np.ndarray,
    *,
    progress: bool = False,
    transformer: bool | None = None,
) -> QuantizeResult:
    """NNCF post-training INT8 quantisation of the float32 ONNX ``src`` into the IR ``dst``.

    calib: preprocessed calibration images float32 (N, C, S, S), the ones the ONNX INT8 files use;
    NNCF collects its statistics over all N, one image at a time.
    transformer: quantise as NNCF's ``ModelType.TRANSFORMER`` (its mixed preset: asymmetric activations,
      and the attention's and normalisation's patterns kept in float) instead of the CNN recipe. None:
      when MatMul / Gemm hold most of the weights (``calibration.mostly_matmul``), as for dynamic
      quantisation in onnxruntime.
    """
    import onnx
    from compress_edge.export.calibration import check_calibration, mostly_matmul

    from compress_edge.progress import optional_bar

    ov = _openvino("OpenVINO INT8 quantisation")
    with quiet_logs("torch", "nncf"):  # nncf looks at every framework it knows on import
        nncf = require("nncf", "OpenVINO INT8 quantisation")
    calib = check_calibration(calib, spec)
    if transformer is None:
        transformer = mostly_matmul(onnx.load(str(src), load_external_data=False))
    start = time.perf_counter()
    model = _convert(ov, src)
    # NNCF's default fixes the overflow in the first layer only; where this CPU's 8-bit dot product
    # saturates (x86 without VNNI) every layer gets 7-bit weights, as the int8-cpu ONNX file does.
    saturates = int8_saturates()
    overflow_fix = nncf.OverflowFix.ENABLE if saturates else nncf.OverflowFix.FIRST_LAYER
    bar = optional_bar(progress)
    task = bar.add_task("calibrating openvino-int8", total=len(calib)) if bar is not None else None

    def one(i: int) -> np.ndarray:
        if bar is not None and i < len(calib):
            bar.update(task, completed=i + 1)
        return calib[i : i + 1]

    if bar is not None:
        bar.start()
    try:
        with quiet_logs("nncf", "torch"), contextlib.redirect_stdout(io.StringIO()):  # nncf prints its own bars
            quantized = nncf.quantize(
                model,
                nncf.Dataset(list(range(len(calib))), one),
                subset_size=len(calib),
                advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True,
                                                                         overflow_fix=overflow_fix),
                **({"model_type": nncf.ModelType.TRANSFORMER} if transformer
                   else {"preset": nncf.QuantizationPreset.PERFORMANCE}),
            )
    except Exception as exc:
        raise ExportError(f"NNCF INT8 quantisation of {src} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if bar is not None:
            bar.stop()
    _write_ir(ov, quantized, dst, _metadata(src, spec, PRECISIONS["int8"], calib_images=len(calib)),
              compress_to_fp16=False)
    return QuantizeResult(
        path=str(dst),
        precision=PRECISIONS["int8"],
        seconds=time.perf_counter() - start,
        settings={
            "openvino": ov.get_version(),
            "nncf": getattr(nncf, "__version__", "unknown"),
            "tool": "nncf.quantize (post-training)",
            **({"model_type": "transformer (MatMul / Gemm hold most weights)", "preset": "mixed (NNCF's for "
                "transformers)", "activations": "int8 asymmetric, per-tensor"} if transformer else
               {"preset": "performance", "activations": "int8 symmetric, per-tensor"}),
            "weights": "int8 symmetric, per-channel" + (", 7-bit (overflow fix, every layer)" if saturates else ""),
            "overflow_fix": overflow_fix.value,
            **({"overflow_fix_reason": OVERFLOW_FIX_REASON} if saturates else {}),
            "calibration": "nncf min-max statistics",
            "calibration_batch": 1,
            "bias_correction": False,
        },
        calib_images=int(len(calib)),
    )


def _convert(ov, src: str | os.PathLike):
    try:
        return ov.convert_model(str(src))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ExportError(f"OpenVINO cannot convert {src} ({type(exc).__name__}: {detail})") from None


def _metadata(src: str | os.PathLike, spec: ModelSpec, precision: str, calib_images: int = 0) -> dict[str, str]:
    from compress_edge.export.onnx import read_metadata

    props = {**read_metadata(src), **spec.to_metadata(), PRECISION_KEY: precision,
             "compress_edge.source": Path(src).name}
    if calib_images:
        props["compress_edge.calib_images"] = str(calib_images)
    return props


def _write_ir(ov, model, dst: str | os.PathLike, props: dict[str, str], *, compress_to_fp16: bool) -> None:
    """Save ``model`` as ``dst`` (.xml) and its .bin, both or neither (written aside, then moved)."""
    from compress_edge.export.onnx import share

    dst = Path(dst)
    if dst.suffix.lower() != ".xml":
        raise ExportError(f"an OpenVINO IR is written as a .xml file (and its .bin), not {dst.name}")
    model.set_rt_info(json.dumps(props, sort_keys=True), METADATA_PATH)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".openvino-", dir=dst.parent) as tmp:
        staged = Path(tmp) / dst.name
        try:
            ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        except Exception as exc:
            raise ExportError(f"cannot write {dst} ({type(exc).__name__}: {exc})") from None
        os.replace(bin_path(staged), bin_path(dst))  # the weights first: an .xml never points at old ones
        os.replace(staged, dst)
    for path in (dst, bin_path(dst)):
        share(path)


def _openvino(purpose: str):
    return require("openvino", purpose)


# --------------------------------------------------------------------------------------------------
# The Embedder (torch-free)
# --------------------------------------------------------------------------------------------------
class OpenVinoEmbedder(ModelFileEmbedder):
    """An OpenVINO IR (``model.xml`` + ``model.bin``) compiled for an Intel CPU, GPU or NPU.

    device: "cpu", "gpu", "gpu.N", "npu" or "auto" (the GPU when OpenVINO sees one, else the CPU).
    threads: CPU inference threads (None: OpenVINO's default).
    inference_precision: OpenVINO's INFERENCE_PRECISION_HINT; default "f32" on the CPU (a CPU with
      bfloat16 units would otherwise compute in bf16 and miss float32 parity), the device's own elsewhere.
    image_size / mean / std: required for an IR without compress-edge metadata (as for ONNX).
    """

    name = "openvino"
    kind = "OpenVINO model"

    def _load(self, path: Path, device: str, inference_precision: str | None = None) -> GraphIO:
        ov = _openvino("the OpenVINO backend")
        if not bin_path(path).is_file():
            raise ModelError(f"no {bin_path(path).name} beside {path}: an OpenVINO model is the .xml and its .bin; "
                             "copy both")
        with open(path, "rb") as fh:
            head = fh.read(4096)
        if b"<net" not in head:  # not an IR: OpenVINO would try every other frontend on it, noisily
            raise ModelError(f"{path} is not an OpenVINO model (no <net> element: not an IR .xml); write one with "
                             "'compress-edge export --openvino'")
        core = ov.Core()
        try:
            model = core.read_model(str(path), str(bin_path(path)))
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ModelError(f"{path} is not an OpenVINO model OpenVINO can read ({detail}); write it again with "
                             "'compress-edge export --openvino'") from None
        inputs, outputs = model.inputs, model.outputs
        io = GraphIO(len(inputs), len(outputs), _dims(inputs[0].get_partial_shape()) if inputs else [],
                     _dims(outputs[0].get_partial_shape()) if outputs else [], read_ir_metadata(model))
        if not io.is_embedding_graph:
            return io  # refused by the caller, before compiling
        self.device, ov_device = _ov_device(core, device)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if inference_precision is None and ov_device == "CPU":
            inference_precision = "f32"
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        if self.threads and ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            self._compiled = core.compile_model(model, ov_device, config)
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise ModelError(f"OpenVINO cannot compile {path} for {ov_device} ({detail})") from None
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)
        self._version = ov.get_version()
        self._inference_precision = inference_precision or "device default"
        return io

    def _run(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: batch})
        return np.asarray(result[self._output], dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "openvino": self._version, "inference_precision": self._inference_precision}

    def close(self) -> None:
        self._request = self._compiled = None


def read_ir_metadata(model: Any) -> dict[str, str]:
    """The compress-edge metadata an IR carries (an ``openvino.Model``, or the path of a .xml); {} if none."""
    if isinstance(model, (str, os.PathLike)):
        ov = _openvino("reading an OpenVINO model")
        model = ov.Core().read_model(str(model))
    if not model.has_rt_info(METADATA_PATH):
        return {}
    text = model.get_rt_info(METADATA_PATH).astype(str)
    try:
        props = json.loads(text)
    except json.JSONDecodeError:
        raise ModelError("the compress-edge metadata in this OpenVINO model is not valid JSON: the .xml was edited; "
                         "export it again") from None
    return {str(k): str(v) for k, v in props.items()} if isinstance(props, dict) else {}


def _dims(shape) -> list:
    """An OpenVINO PartialShape as a list (int for a static dimension, None for a dynamic one)."""
    if shape.rank.is_dynamic:
        return []
    return [d.get_length() if d.is_static else None for d in shape]


def _ov_device(core, device: str) -> tuple[str, str]:
    """(the name an Embedder reports, OpenVINO's device name) for the command line's ``device``."""
    device = (device or "cpu").lower()
    have = list(core.available_devices)
    if device == "auto":
        device = "gpu" if any(d.startswith("GPU") for d in have) else "cpu"
    if device.startswith("cuda"):
        raise ModelError(f"OpenVINO runs on Intel CPUs, GPUs and NPUs, not {device!r}; use --device cpu, gpu or npu "
                         "(or a .onnx / .engine file for an NVIDIA GPU)")
    wanted = device.upper()
    if wanted not in have and not (wanted == "GPU" and any(d.startswith("GPU") for d in have)):
        if device not in ("cpu", "gpu", "npu") and not device.startswith("gpu."):
            raise ModelError(f"unknown device {device!r} for OpenVINO; choose one of: {', '.join(DEVICES)}")
        raise DependencyError(f"OpenVINO sees no {wanted} here (it sees: {', '.join(have) or 'nothing'}); install "
                              f"the device's driver, or use --device cpu")
    return device, wanted
