"""TensorRT engines: build one from an exported ONNX file, and run it with torch CUDA tensors.

Module: ``tensorrt`` (TensorRT 10 or 11) when installed, else ``tensorrt_rtx`` (TensorRT-RTX, whose
ONNX parser and builder work without a GPU, so CI builds real engines).

The network is always *strongly typed*: its precision is the ONNX file's (float32, the fp16 export,
or the ``int8-trt`` QDQ export). TensorRT 11 removed the FP16 / INT8 builder flags and calibrators,
and on TensorRT 10 they add nothing here: the fp16 and int8-trt exports already carry the
precision (and their parity is checked against float32 before any engine is built), so there is one
build path for every version.

``model.engine`` gets a sidecar ``model.engine.json``: the ModelSpec, the TensorRT module and
version, the GPU (or "built without GPU"), the optimisation profile. An engine only runs with the
TensorRT version that built it; :class:`EngineRunner` refuses another one with a message that says to
rebuild it on the device.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.exported import PRECISION_KEY, _sniff, read_sidecar

from compress_edge.deps import install_hint
from compress_edge.errors import DependencyError, ExportError, ModelError
from compress_edge.models.spec import ModelSpec
from compress_edge.storage import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

#: Modules tried, in order.
TRT_MODULES = ("tensorrt", "tensorrt_rtx")
SIDECAR_FORMAT = "compress-edge-engine"
SIDECAR_VERSION = 1
NO_GPU = "built without GPU"


# --------------------------------------------------------------------------------------------------
# Which TensorRT
# --------------------------------------------------------------------------------------------------
def trt_module(name: str | None = None):
    """(module, its name): ``name`` when given, else the first of ``tensorrt``, ``tensorrt_rtx`` that imports.

    Raises DependencyError naming the extras that install one.
    """
    names = (name,) if name else TRT_MODULES
    errors = []
    for candidate in names:
        try:
            return importlib.import_module(candidate), candidate
        except ImportError as exc:  # also a broken install (missing libnvinfer): say so
            errors.append(f"{candidate}: {exc}")
    if name:
        raise DependencyError(
            f"the engine needs the '{name}' module, which is not installed here ({errors[0]}); "
            f"install it with: {install_hint(name)}"
        )
    raise DependencyError(
        "TensorRT is not installed (tried tensorrt and tensorrt_rtx); install it with: "
        f"{install_hint('tensorrt')} on a machine with an NVIDIA GPU, or {install_hint('tensorrt_rtx')}"
    )


def module_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def gpu_name() -> str | None:
    """The CUDA GPU's name (torch), or None when there is none (or no torch)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # a broken driver counts as no GPU
        return None
    return None


def _make_logger(trt, min_severity=None):
    """A TensorRT logger that keeps every message (for error reports) and forwards to logging."""
    severity_cls = trt.ILogger.Severity

    class Collecting(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):  # noqa: A003 - TensorRT's name
            name = getattr(severity, "name", str(severity))
            self.messages.append((name, msg))
            if severity in (severity_cls.INTERNAL_ERROR, severity_cls.ERROR):
                log.debug("TensorRT %s: %s", name, msg)
            elif severity == severity_cls.WARNING:
                log.debug("TensorRT warning: %s", msg)

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

    return Collecting()


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
@dataclass
class EngineBuild:
    """What :func:`build_engine` wrote."""

    path: str
    sidecar: str
    module: str
    version: str
    precision: str
    gpu: str
    profile: dict[str, list[int]]
    seconds: float
    bytes: int
    timing_cache: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _onnx_spec(onnx_path: Path, spec: ModelSpec | None) -> tuple[ModelSpec, str]:
    from compress_edge.export.onnx import read_metadata

    props = read_metadata(onnx_path)
    stored = ModelSpec.from_metadata(props, where=onnx_path)
    precision = props.get(PRECISION_KEY, "fp32")
    if spec is None:
        spec = stored
    if spec is None:
        raise ModelError(
            f"{onnx_path} carries no compress-edge metadata, so the engine's ModelSpec is unknown; pass "
            "--image-size, --mean and --std, or export the model with 'compress-edge export'"
        )
    return spec, precision


def default_timing_cache(module: str, version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compress-edge"
    return base / f"trt-timing-{module}-{version}.cache"


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    spec: ModelSpec | None = None,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
    workspace_mib: int = 1024,
    timing_cache: str | os.PathLike | None = None,
    module: str | None = None,
) -> EngineBuild:
    """Parse ``onnx_path``, build a strongly typed engine for batches ``min_batch..max_batch``
    (tuned for ``opt_batch``, default ``max_batch``), write it to ``engine_path`` with its sidecar.

    timing_cache: a file reused across builds (read when present, written after); None uses
    ``~/.cache/compress-edge/trt-timing-<module>-<version>.cache``. TensorRT-RTX ignores timing
    caches (it tunes at run time), so none is written for it.
    Raises ExportError with every parser error (node index, name and operator) when parsing fails.
    """
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path)
    if not onnx_path.is_file():
        raise ModelError(f"no ONNX file at {onnx_path}")
    opt_batch = _check_build_options(min_batch, opt_batch, max_batch, workspace_mib)
    spec, precision = _onnx_spec(onnx_path, spec)
    trt, name, version = _checked_module(module)
    start = time.perf_counter()
    logger = _make_logger(trt)
    builder, network = _parse(trt, logger, onnx_path, f"{name} {version}")
    inp, dims, notes = _profile(network, spec, onnx_path, (min_batch, opt_batch, max_batch))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(profile)
    cache_path = _use_timing_cache(config, name, version, timing_cache, notes)

    gpu = gpu_name()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        details = "; ".join(logger.errors()[-5:]) or "no message from TensorRT"
        raise ExportError(f"TensorRT ({name} {version}) could not build an engine from {onnx_path}: {details}")
    data = bytes(serialized)
    with atomic_path(engine_path, suffix=".engine") as tmp:
        tmp.write_bytes(data)
    if cache_path is not None:
        _save_timing_cache(config, cache_path, notes)
    sidecar_path = _write_sidecar(engine_path, {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "spec": spec.to_dict(),
        "precision": precision,
        "tensorrt": {"module": name, "version": version},
        "gpu": gpu or NO_GPU,
        "profile": {"input": inp.name, **dims},
        "strongly_typed": True,
        "workspace_mib": int(workspace_mib),
        "timing_cache": str(cache_path) if cache_path else None,
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "engine_sha256": sha256_file(engine_path),
        "host": platform.node(),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
    })
    return EngineBuild(
        path=str(engine_path),
        sidecar=str(sidecar_path),
        module=name,
        version=version,
        precision=precision,
        gpu=gpu or NO_GPU,
        profile=dims,
        seconds=time.perf_counter() - start,
        bytes=len(data),
        timing_cache=str(cache_path) if cache_path else None,
        notes=notes,
    )


def _check_build_options(min_batch: int, opt_batch: int | None, max_batch: int, workspace_mib: int) -> int:
    """The batch the engine is tuned for (default ``max_batch``); ExportError for a profile or workspace that
    cannot be built."""
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise ExportError(
            f"the batch profile needs 1 <= --min-batch <= --opt-batch <= --max-batch, got {min_batch}, "
            f"{opt_batch}, {max_batch}"
        )
    if workspace_mib <= 0:
        raise ExportError(f"--workspace must be positive (MiB), got {workspace_mib}")
    return opt_batch


def _checked_module(module: str | None):
    """(the TensorRT module, its name, its version); DependencyError for a TensorRT older than 10."""
    trt, name = trt_module(module)
    version = module_version(trt)
    if name == "tensorrt" and _major(version) < 10:
        raise DependencyError(
            f"TensorRT {version} is too old: compress-edge builds strongly typed networks, which need "
            f"TensorRT 10 or newer; install it with: {install_hint('tensorrt')}"
        )
    return trt, name, version


def _parse(trt, logger, onnx_path: Path, which: str):
    """(builder, network) of ``onnx_path`` parsed into a strongly typed network."""
    builder = trt.Builder(logger)
    # TensorRT 10 and TensorRT-RTX: opt in. TensorRT 11: always strongly typed, the flag kept but ignored.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"TensorRT ({which}) cannot parse {onnx_path}: {parser_errors(parser, logger)}")
    return builder, network


def _profile(network, spec: ModelSpec, onnx_path: Path, batches: tuple[int, int, int]):
    """(the network's one input, the profile's min / opt / max shapes, notes): the input checked against
    ``spec``; a fixed ONNX batch replaces the asked ``batches``."""
    if network.num_inputs != 1:
        raise ExportError(f"{onnx_path} has {network.num_inputs} inputs; an embedding model has one")
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    c, s = int(spec.channels), int(spec.image_size)
    if len(shape) != 4 or tuple(shape[1:]) != (c, s, s):
        raise ExportError(f"{onnx_path} takes input {shape}, but its ModelSpec says (batch, {c}, {s}, {s})")
    notes: list[str] = []
    if shape[0] != -1:
        if not (batches[0] == batches[1] == batches[2] == shape[0]):
            notes.append(f"the ONNX batch is fixed at {shape[0]}: profile set to it")
        batches = (int(shape[0]),) * 3
    return inp, {k: [b, c, s, s] for k, b in zip(("min", "opt", "max"), batches, strict=True)}, notes


def _use_timing_cache(config, name: str, version: str, timing_cache, notes: list[str]) -> Path | None:
    """The timing cache file the build reads (a new cache when it does not fit); None for TensorRT-RTX."""
    if name == "tensorrt_rtx":
        notes.append("TensorRT-RTX tunes kernels when the engine first runs; it has no build timing cache")
        return None
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(name, version)
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(f"timing cache {cache_path} does not fit this TensorRT/GPU: started a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return cache_path


def _save_timing_cache(config, cache_path: Path, notes: list[str]) -> None:
    try:
        cache_blob = bytes(config.get_timing_cache().serialize())
        with atomic_path(cache_path, suffix=".cache") as tmp:
            tmp.write_bytes(cache_blob)
    except OSError as exc:
        notes.append(f"could not save the timing cache to {cache_path} ({exc})")


def _write_sidecar(engine_path: Path, sidecar: dict[str, Any]) -> Path:
    """``<engine>.json`` written, and both files shared (readable by the group)."""
    from compress_edge.export.onnx import share

    sidecar_path = Path(str(engine_path) + ".json")
    atomic_write_json(sidecar_path, sidecar)
    share(engine_path)
    share(sidecar_path)
    return sidecar_path


def parser_errors(parser, logger=None) -> str:
    """Every ONNX parser error in full: description, node index, node name and operator, source."""
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = []
        for label, getter in (("node", "node"), ("name", "node_name"), ("op", "node_operator")):
            fn = getattr(err, getter, None)
            try:
                value = fn() if fn else None
            except Exception:
                value = None
            if value not in (None, "", -1):
                where.append(f"{label} {value!r}" if label != "node" else f"node #{value}")
        code = getattr(err, "code", None)
        code_text = f" [{code().name}]" if callable(code) and hasattr(code(), "name") else ""
        parts.append(f"{', '.join(where) or 'graph'}{code_text}: {err.desc()}")
    if not parts and logger is not None:
        parts = logger.errors()
    return "; ".join(parts) or "the parser gave no reason"


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------
def check_engine_file(path: Path) -> dict[str, Any]:
    """The sidecar of the engine at ``path`` after checking that the file is plausibly an engine."""
    if not path.is_file():
        raise ModelError(f"no engine at {path}: the path does not exist or is a folder")
    head = path.read_bytes()[:16]
    what = _sniff(head)
    if what is None and head[:1] == b"\x08":
        what = "an ONNX model"
    if what and what != "a TensorRT engine":
        raise ModelError(f"{path} is not a TensorRT engine: it looks like {what}")
    return read_sidecar(path)


def check_engine_version(sidecar: dict[str, Any], path: Path):
    """The TensorRT module that built the engine, or an error: missing module, another version."""
    built = sidecar.get("tensorrt") or {}
    name, version = built.get("module"), built.get("version")
    if name not in TRT_MODULES:
        raise ModelError(f"{path}.json does not say which TensorRT built the engine; build it again")
    trt, _ = trt_module(name)
    here = module_version(trt)
    if here != version:
        raise ModelError(
            f"{path} was built by {name} {version}, but this machine has {name} {here}: an engine runs only "
            "with the TensorRT version that built it; rebuild it on the device from the ONNX file "
            f"(compress-edge export {sidecar.get('onnx', {}).get('file', 'model.onnx')} --trt)"
        )
    return trt


class EngineRunner:
    """Runs a TensorRT engine on a CUDA GPU with torch tensors for input and output (no pycuda).

    Checks, in order: the file is an engine, its sidecar is there, the TensorRT that built it is
    installed in the same version, a GPU is present, the engine deserialises.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cuda") -> None:
        path = Path(path)
        self.sidecar = check_engine_file(path)
        self.spec = ModelSpec.from_dict(self.sidecar["spec"])
        self.precision = str(self.sidecar.get("precision", "unknown"))
        trt = check_engine_version(self.sidecar, path)
        try:
            import torch
        except ImportError:
            raise DependencyError(
                "running a TensorRT engine needs torch with CUDA (for GPU buffers); install it with: "
                "pip install torch"
            ) from None
        if not torch.cuda.is_available():
            raise ModelError(
                f"{path} is a TensorRT engine, which runs only on an NVIDIA GPU, and torch sees none here; "
                "use the ONNX file with onnxruntime on this machine"
            )
        self.device = device if device.startswith("cuda") else "cuda"
        self._torch = torch
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                details = "; ".join(self._logger.errors()[-3:])
                raise ModelError(
                    f"{path} cannot be loaded by {self.sidecar['tensorrt']['module']} ({details or 'no reason given'}); "
                    "it was built for another GPU or TensorRT: rebuild it on the device"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 1")
        self.input, self.output = inputs[0], outputs[0]
        lo, _opt, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._in_dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(self.input))
        self._out_dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(self.output))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, C, S, S) with min_batch <= n <= max_batch -> float32 (n, D)."""
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self._in_dtype)
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self._out_dtype, device=self.device)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ModelError(f"TensorRT failed to run the engine: {'; '.join(self._logger.errors()[-3:])}")
        stream.synchronize()
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.context = None
        self.engine = None


def _torch_dtype(torch, trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    try:
        return table[dtype]
    except KeyError:
        raise ModelError(f"the engine uses I/O of type {dtype}, which compress-edge does not feed") from None
