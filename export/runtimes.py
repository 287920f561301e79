"""One inference interface, :class:`Embedder`, with PyTorch, onnxruntime, TensorRT and OpenVINO backends.

``embed(images) -> float32 (N, D)`` is the same call on every backend, so retrieval, evaluation and
benchmarks measure and search with the same code whatever runs the model.

Torch-free at import time on purpose: a device's query path is this module, ``compress_edge.data.images``
(numpy + PIL) and onnxruntime. torch is imported only inside the PyTorch and TensorRT backends.

Which backend :func:`open_embedder` picks for ``backend="auto"``:

- ``*.onnx``: onnxruntime; the ModelSpec comes from the file's ``metadata_props``.
- ``*.engine`` / ``*.plan``: TensorRT; the ModelSpec comes from the sidecar ``<engine>.json``.
- ``*.xml``: OpenVINO (an IR and its ``.bin``); the ModelSpec comes from the IR's ``rt_info``.
- anything else (a compress-edge model or run folder, an architecture name): PyTorch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from compress_edge.deps import available, require
from compress_edge.devices import parse_device, torch_device_name, unknown_device
from compress_edge.errors import DataError, DependencyError, ModelError
from compress_edge.data.images import default_workers, preprocess_batch
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

#: Backend names the command line's --backend offers, and the aliases open_embedder maps to them
#: (open_embedder also takes "openvino", which --backend auto picks for a .xml file).
BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
_ALIASES = {
    "auto": "auto",
    "torch": "torch",
    "pytorch": "torch",
    "onnxruntime": "onnxruntime",
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
    "tensorrt": "tensorrt",
    "trt": "tensorrt",
    "openvino": "openvino",
    "ov": "openvino",
}
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
IR_SUFFIXES = (".xml",)
#: ONNX metadata key for the precision of an exported file (fp32, fp16, int8-cpu, int8-trt).
PRECISION_KEY = "compress_edge.precision"

ImagesLike = Sequence[Image.Image | str | os.PathLike] | Image.Image | np.ndarray


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------
class Embedder:
    """Images -> float32 embeddings (N, D), whatever runs the model.

    Attributes: ``spec`` (the :class:`ModelSpec` the embeddings belong to), ``name`` (the backend:
    "torch", "onnxruntime", "tensorrt" or "openvino"), ``path`` (the model file or folder, or the architecture
    name), ``device``, ``threads``, ``precision`` ("fp32", "fp16", "int8-cpu", "int8-trt", "int8-openvino" or
    "unknown"), ``max_batch`` (largest batch one run takes; None: any).

    Subclasses implement :meth:`_run` on a preprocessed float32 batch (n, C, S, S) and return (n, D).
    """

    name: str = "base"
    spec: ModelSpec
    path: str = ""
    device: str = "cpu"
    threads: int | None = None
    precision: str = "unknown"
    max_batch: int | None = None
    min_batch: int = 1

    # -- the public calls -------------------------------------------------------------------------
    def embed(self, images: ImagesLike) -> np.ndarray:
        """Embed a list of PIL images (or image paths), or a float32 array (N, C, S, S) already
        preprocessed with :func:`compress_edge.data.images.preprocess_eval`. Returns float32 (N, D)."""
        return self._embed_array(self.preprocess(images))

    def embed_paths(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 64,
        workers: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Decode, preprocess and embed image files, ``batch_size`` at a time. Returns float32 (N, D).

        Decoding runs in a thread pool (``workers`` threads) while the previous batch is embedded.
        An unreadable file raises :class:`compress_edge.data.images.UnreadableImage`.
        """
        paths = list(paths)
        batches = embed_batches(self, lambda lo, hi: paths[lo:hi], 0, len(paths), batch_size=batch_size,
                                workers=workers, progress=progress)
        out = np.empty((len(paths), int(self.spec.embed_dim)), dtype=np.float32)
        if not paths:
            return out
        for row, x in batches:
            out[row : row + len(x)] = x
        return out

    def close(self) -> None:
        """Free the session / engine. The embedder cannot be used afterwards."""

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, device={self.device!r}, precision={self.precision!r}, "
            f"image_size={self.spec.image_size}, embed_dim={self.spec.embed_dim})"
        )

    def info(self) -> dict[str, Any]:
        """What a report or benchmark records about this embedder."""
        return {
            "backend": self.name,
            "path": str(self.path),
            "device": self.device,
            "threads": self.threads,
            "precision": self.precision,
            "image_size": int(self.spec.image_size),
            "embed_dim": int(self.spec.embed_dim),
        }

    # -- shared machinery -------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = int(self.spec.image_size)
        return (int(self.spec.channels), s, s)

    def preprocess(self, images: ImagesLike) -> np.ndarray:
        """The float32 batch (N, C, S, S) ``embed`` feeds the model."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray) or (
            not isinstance(images, (list, tuple)) and hasattr(images, "__array__")
        ):
            return self._check_array(np.asarray(images))
        if isinstance(images, (str, os.PathLike)):
            raise DataError(
                "embed() takes a list of images, not one path; use embed([path]) or embed_paths(paths)"
            )
        items = list(images)
        for item in items:
            if not isinstance(item, (Image.Image, str, os.PathLike)):
                raise DataError(
                    f"embed() takes PIL images, image paths or a float32 array (N, C, S, S); got a list "
                    f"holding {type(item).__name__}"
                )
        return preprocess_batch(items, self.spec.image_size, self.spec.mean, self.spec.std)

    def _check_array(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:
            x = x[None]
        expected = self.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise DataError(
                f"this model takes images of shape (N, {', '.join(map(str, expected))}), got an array of "
                f"shape {tuple(x.shape)}; preprocess with compress_edge.data.images.preprocess_eval at "
                f"{self.spec.image_size}px (or pass PIL images)"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(
                f"preprocessed images must be float32 (normalised with the model's mean/std), got {x.dtype}"
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    def _embed_array(self, x: np.ndarray) -> np.ndarray:
        n, d = x.shape[0], int(self.spec.embed_dim)
        if n == 0:
            return np.zeros((0, d), dtype=np.float32)
        step = self.max_batch or n
        parts = []
        for i in range(0, n, step):
            chunk = x[i : i + step]
            k = chunk.shape[0]
            if k < self.min_batch:  # a TensorRT profile may start above 1: pad, then drop the padding
                pad = np.zeros((self.min_batch - k, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            parts.append(np.asarray(self._run(chunk), dtype=np.float32)[:k])
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if out.shape != (n, d):
            raise ModelError(
                f"{self.path} returned embeddings of shape {out.shape}, expected ({n}, {d}) from its spec; "
                "the file and its spec disagree"
            )
        return np.ascontiguousarray(out, dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def embed_batches(
    embedder: Any,
    load: Callable[[int, int], Sequence[Image.Image | str | os.PathLike]],
    start: int,
    stop: int,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """The one extraction loop over any embedder (``.spec`` and ``.embed`` of a preprocessed batch):
    rows ``start`` to ``stop - 1``, ``batch_size`` at a time, yielded as (first row, embeddings (n, D)).

    ``load(lo, hi)`` gives the images of rows lo..hi-1 (PIL images or paths); they are decoded and
    preprocessed in ``workers`` threads while the previous batch is embedded. ``batch_size`` is
    checked now, the loop runs as it is iterated.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    return _embed_batches(embedder, load, start, stop, batch_size, max(1, workers or default_workers()), progress)


def _embed_batches(embedder: Any, load: Callable, start: int, stop: int, batch_size: int, workers: int,
                   progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    from compress_edge.progress import optional_bar

    spec = embedder.spec
    starts = list(range(start, stop, batch_size))

    def prepare(lo: int) -> np.ndarray:
        items = load(lo, min(lo + batch_size, stop))
        return preprocess_batch(items, spec.image_size, spec.mean, spec.std, workers=workers)

    bar = optional_bar(progress)
    task = bar.add_task(f"embedding ({getattr(embedder, 'name', 'model')})", total=stop - start) if bar else None
    if bar is not None:
        bar.start()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as prefetch:
            pending: Future | None = prefetch.submit(prepare, starts[0]) if starts else None
            for j, lo in enumerate(starts):
                batch = pending.result()  # type: ignore[union-attr]
                pending = prefetch.submit(prepare, starts[j + 1]) if j + 1 < len(starts) else None
                yield lo, embedder.embed(batch)
                if bar is not None:
                    bar.advance(task, len(batch))
    finally:
        if bar is not None:
            bar.stop()


# --------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------
class TorchEmbedder(Embedder):
    """A compress-edge model (or an architecture name) run by PyTorch eager."""

    name = "torch"

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        threads: int | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        module: Any = None,
        spec: ModelSpec | None = None,
    ) -> None:
        torch = require("torch", "the PyTorch backend")
        from compress_edge.models.resolve import resolve_model

        self.device = torch_device_name(device or "cpu")
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        if module is not None:
            if spec is None:
                raise ModelError("a module given to TorchEmbedder needs its ModelSpec")
            self.model = module.to(self.device).eval()
            self.spec = spec
        else:
            self.model, self.spec = resolve_model(model, image_size=image_size, device=self.device)
        self.spec = _override_norm(self.spec, mean, std, str(model))
        self.path = str(model)
        self.precision = "fp32"
        self._torch = torch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return self.model(x).float().cpu().numpy()

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------------------------------
# onnxruntime (torch-free)
# --------------------------------------------------------------------------------------------------
class OnnxRuntimeEmbedder(Embedder):
    """An ONNX file run by onnxruntime (CPU or CUDA execution provider). Needs no torch.

    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    image_size / mean / std: required for an ONNX file without compress-edge metadata; for one with
    it, mean / std override the stored values (with a warning).
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        threads: int | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimization: str = "all",
    ) -> None:
        ort = require("onnxruntime", "the onnxruntime backend")
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no ONNX file at {path}: the path does not exist or is a folder")
        self.path = str(path)
        self.device, providers = _ort_providers(ort, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
            raise ModelError(_not_onnx_message(path, exc)) from None
        self.threads = int(threads) if threads else None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelError(
                f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; an embedding model has one "
                "image input and one embedding output"
            )
        self._input, self._output = inputs[0].name, outputs[0].name
        if inputs[0].type != "tensor(float)":
            raise ModelError(
                f"{path} takes {inputs[0].type} input; compress-edge runs models with float32 image input"
            )
        meta = self.session.get_modelmeta()
        props = dict(meta.custom_metadata_map or {})
        self.precision = props.get(PRECISION_KEY, "unknown")
        self.spec = spec_from_onnx_metadata(
            props,
            path,
            input_shape=list(inputs[0].shape),
            output_shape=list(outputs[0].shape),
            image_size=image_size,
            mean=mean,
            std=std,
            probe=self._probe_dim,
        )
        batch_dim = inputs[0].shape[0] if inputs[0].shape else None
        if isinstance(batch_dim, int) and batch_dim > 0:
            # A fixed-batch file (not written by compress-edge): feed it exactly that many images.
            self.max_batch = self.min_batch = batch_dim

    def _probe_dim(self, image_size: int) -> int:
        x = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
        return int(np.asarray(self.session.run([self._output], {self._input: x})[0]).reshape(1, -1).shape[1])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self._output], {self._input: batch})
        return np.asarray(out, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "providers": list(self.session.get_providers())}

    def close(self) -> None:
        self.session = None


def _ort_providers(ort, device: str) -> tuple[str, list]:
    kind, index = parse_device(device or "cpu")
    have = ort.get_available_providers()
    if kind == "auto":
        kind = "cuda" if "CUDAExecutionProvider" in have else "cpu"
    if kind == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if kind != "cuda":
        raise unknown_device(device)
    if "CUDAExecutionProvider" not in have:
        raise DependencyError(
            f"onnxruntime here has no CUDA execution provider (it has: {', '.join(have)}); install "
            "onnxruntime-gpu for --device cuda, or use --device cpu"
        )
    name = "cuda" if index is None else f"cuda:{index}"
    return name, [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]


def _not_onnx_message(path: Path, exc: BaseException) -> str:
    head = path.read_bytes()[:16] if path.is_file() else b""
    what = _sniff(head)
    detail = " ".join(str(exc).split())
    if len(detail) > 200:
        detail = detail[:197] + "..."
    if what:
        return f"{path} is not an ONNX model: it looks like {what}; pass the model.onnx that 'compress-edge export' wrote"
    return f"{path} is not an ONNX model onnxruntime can load ({detail}); re-export it with 'compress-edge export'"


def _sniff(head: bytes) -> str | None:
    """A guess at what a file really is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt checkpoint?)"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle (a PyTorch checkpoint?)"
    if head[:8].lstrip().startswith((b"{", b"[")):
        return "a JSON file"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "an image"
    if len(head) >= 8 and int.from_bytes(head[:8], "little") < 10_000_000 and head[8:9] == b"{":
        return "a safetensors file"
    if b"ftrt" in head or head.startswith(b"ptrt"):
        return "a TensorRT engine"
    return None


def spec_from_onnx_metadata(
    props: dict[str, str],
    path: str | os.PathLike,
    *,
    input_shape: list | None = None,
    output_shape: list | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    probe: Any = None,
) -> ModelSpec:
    """The ModelSpec of an ONNX file from its ``metadata_props`` (``props``).

    A file without compress-edge metadata needs ``image_size``, ``mean`` and ``std`` (the export's
    preprocessing cannot be guessed); its embed_dim comes from the output shape, or from ``probe``
    (a function image_size -> D that runs the model once) when that shape is dynamic.
    """
    spec = ModelSpec.from_metadata(props, where=path)
    fixed_hw = None
    if input_shape and len(input_shape) == 4 and all(isinstance(v, int) and v > 0 for v in input_shape[2:]):
        fixed_hw = (int(input_shape[2]), int(input_shape[3]))
    if input_shape and len(input_shape) != 4:
        raise ModelError(f"{path} takes input of rank {len(input_shape)}; an image model takes (N, C, H, W)")
    if spec is None:
        missing = [
            name
            for name, value in (("--image-size", image_size or (fixed_hw and fixed_hw[0])), ("--mean", mean), ("--std", std))
            if not value
        ]
        if missing:
            raise ModelError(
                f"{path} carries no compress-edge metadata (no ModelSpec in metadata_props), so its "
                f"preprocessing is unknown; pass {', '.join(missing)} (e.g. --image-size 224 --mean "
                "0.485,0.456,0.406 --std 0.229,0.224,0.225), or re-export it with 'compress-edge export'"
            )
        size = int(image_size or fixed_hw[0])  # type: ignore[index]
        if fixed_hw is not None and fixed_hw != (size, size):
            raise ModelError(f"{path} takes {fixed_hw[0]}x{fixed_hw[1]} images, not {size}x{size}")
        dim = output_shape[-1] if output_shape else None
        if not (isinstance(dim, int) and dim > 0):
            dim = probe(size) if probe is not None else None
        if not dim:
            raise ModelError(f"cannot tell the embedding dimension of {path}")
        log.warning("%s has no compress-edge metadata: using %dpx, mean %s, std %s as given", path, size, mean, std)
        return ModelSpec(
            arch="external-onnx",
            embed_dim=int(dim),
            image_size=size,
            mean=tuple(mean),  # type: ignore[arg-type]
            std=tuple(std),  # type: ignore[arg-type]
            normalize=False,
            source={"kind": "onnx-without-metadata", "path": str(path)},
        )
    if image_size is not None and int(image_size) != spec.image_size:
        if fixed_hw is not None:
            raise ModelError(
                f"{path} was exported for {spec.image_size}px images and its graph has a fixed input size; "
                f"--image-size {image_size} cannot change it (export again at that size)"
            )
        log.warning("%s was made for %dpx images; using %dpx as asked", path, spec.image_size, image_size)
        spec = spec.replace(image_size=int(image_size))
    if fixed_hw is not None and fixed_hw != (spec.image_size, spec.image_size):
        raise ModelError(
            f"{path} takes {fixed_hw[0]}x{fixed_hw[1]} images but its metadata says {spec.image_size}px: "
            "the file was edited; export it again"
        )
    return _override_norm(spec, mean, std, str(path))


def _override_norm(
    spec: ModelSpec, mean: Sequence[float] | None, std: Sequence[float] | None, what: str
) -> ModelSpec:
    changes: dict[str, Any] = {}
    if mean is not None and tuple(float(v) for v in mean) != spec.mean:
        changes["mean"] = tuple(mean)
    if std is not None and tuple(float(v) for v in std) != spec.std:
        changes["std"] = tuple(std)
    if changes:
        log.warning("%s: overriding the stored normalisation with %s (embeddings will differ)", what, changes)
        spec = spec.replace(**changes)
    return spec


# --------------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------------
class TensorRTEmbedder(Embedder):
    """A TensorRT engine (``model.engine`` + ``model.engine.json``) run on a CUDA GPU.

    Input and output go through torch CUDA tensors (no pycuda). The engine must have been built by
    the TensorRT module and version installed here, on this kind of GPU.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, device: str = "cuda", **_: Any) -> None:
        from compress_edge.export.tensorrt import EngineRunner

        self._runner = EngineRunner(path, device=device)
        self.spec = self._runner.spec
        self.path = str(path)
        self.device = self._runner.device
        self.precision = self._runner.precision
        self.min_batch, self.max_batch = self._runner.min_batch, self._runner.max_batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._runner.run(batch)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "tensorrt": self._runner.sidecar.get("tensorrt")}

    def close(self) -> None:
        self._runner.close()


# --------------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------------
def backend_for(model: str | os.PathLike, backend: str = "auto") -> str:
    """The backend name ("torch", "onnxruntime", "tensorrt" or "openvino") ``open_embedder`` would use."""
    key = _ALIASES.get(str(backend).lower())
    if key is None:
        raise ModelError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    suffix = Path(str(model)).suffix.lower()
    if key == "auto":
        if suffix in ONNX_SUFFIXES:
            return "onnxruntime"
        if suffix in ENGINE_SUFFIXES:
            return "tensorrt"
        if suffix in IR_SUFFIXES:
            return "openvino"
        return "torch"
    if key == "onnxruntime" and suffix not in ONNX_SUFFIXES:
        raise ModelError(f"the onnxruntime backend runs a .onnx file, not {model}; export it first")
    if key == "tensorrt" and suffix not in ENGINE_SUFFIXES:
        raise ModelError(f"the TensorRT backend runs a .engine file, not {model}; build one with export --trt")
    if key == "openvino" and suffix not in IR_SUFFIXES:
        raise ModelError(f"the OpenVINO backend runs a .xml file (with its .bin), not {model}; write one with "
                         "'compress-edge export --openvino'")
    if key == "torch" and suffix in ONNX_SUFFIXES + ENGINE_SUFFIXES + IR_SUFFIXES:
        raise ModelError(
            f"the torch backend runs a compress-edge model folder or an architecture name, not {model}; "
            "use --backend auto"
        )
    return key


def open_embedder(
    model: str | os.PathLike,
    backend: str = "auto",
    *,
    device: str = "cpu",
    threads: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Embedder:
    """Open ``model`` for embedding.

    model: a compress-edge model/run folder or architecture name (PyTorch), a ``.onnx`` file
      (onnxruntime), a ``.engine`` file (TensorRT), or a ``.xml`` OpenVINO IR (OpenVINO).
    backend: "auto" (decide by what ``model`` is), "torch", "onnxruntime", "tensorrt" or "openvino".
    device: "cpu", "cuda", "cuda:N" or "auto" (TensorRT always runs on a GPU; OpenVINO takes "cpu",
      "gpu", "gpu.N", "npu", and "auto" for its GPU when it sees one).
    threads: CPU threads (torch intra-op / onnxruntime intra-op / OpenVINO inference threads).
    image_size / mean / std: needed for an ONNX file without compress-edge metadata; otherwise
      they override the stored spec (with a warning).
    """
    kind = backend_for(model, backend)
    if kind == "onnxruntime":
        return OnnxRuntimeEmbedder(model, device=device, threads=threads, image_size=image_size, mean=mean, std=std)
    if kind == "tensorrt":
        return TensorRTEmbedder(model, device="cuda" if device in ("cpu", "auto") else device)
    if kind == "openvino":
        from compress_edge.export.openvino import OpenVinoEmbedder

        return OpenVinoEmbedder(model, device=device, threads=threads, image_size=image_size, mean=mean, std=std)
    return TorchEmbedder(str(model), device=device, threads=threads, image_size=image_size, mean=mean, std=std)


# --------------------------------------------------------------------------------------------------
# Small helpers shared by parity checks and the benchmark
# --------------------------------------------------------------------------------------------------
def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON beside an engine (``model.engine.json``), or ModelError saying it is missing."""
    side = Path(str(engine_path) + ".json")
    if not side.is_file():
        raise ModelError(
            f"no {side.name} beside {engine_path}: an engine needs the sidecar JSON 'compress-edge export --trt' "
            "writes (it holds the ModelSpec and the TensorRT version)"
        )
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{side} is not valid JSON ({exc}); build the engine again") from None
    if not isinstance(data, dict) or "spec" not in data:
        raise ModelError(f"{side} holds no ModelSpec; build the engine again with 'compress-edge export --trt'")
    return data


# --------------------------------------------------------------------------------------------------
# Benchmark (latency, throughput, memory, achieved GFLOP/s) for any backend
# --------------------------------------------------------------------------------------------------
@dataclass
class BenchRow:
    """One (embedder, batch size) measurement. Times in milliseconds per batch.

    gflop_per_image: fvcore's count for one image (one multiply-add counted as one flop, as fvcore
    does); achieved_gflops: that count times images per second. peak_rss_mb: the process's largest
    resident memory while this row ran (all models loaded so far included).
    """

    model: str
    backend: str
    precision: str
    device: str
    threads: int | None
    batch: int
    image_size: int
    warmup: int
    iters: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    images_per_s: float
    gflop_per_image: float | None
    achieved_gflops: float | None
    peak_rss_mb: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark(
    embedder: Embedder,
    batch_sizes: Sequence[int] = (1, 32),
    *,
    warmup: int = 5,
    iters: int = 30,
    min_seconds: float = 0.0,
    gflop_per_image: float | None = None,
    label: str | None = None,
    images: np.ndarray | None = None,
) -> list[BenchRow]:
    """Time ``embedder`` on batches of each size (after ``warmup`` runs).

    images: preprocessed real images float32 (N, C, S, S) the batches are filled from (repeated when
    a batch is larger than N); None times random tensors, which a quantised model may answer with
    zeros (callers should say so). Runs ``iters`` timed batches, more while the total stays under
    ``min_seconds``. Latency is wall time of ``_embed_array`` (model run plus the copy out; decoding
    and preprocessing excluded).
    """
    rng = np.random.default_rng(0)
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(embedder.input_shape) or not len(images):
            raise DataError(f"images of shape {tuple(images.shape)} for a model that takes "
                            f"(N, {', '.join(map(str, embedder.input_shape))}); preprocess them for this model")
    rows = []
    for b in batch_sizes:
        if b <= 0:
            raise DataError(f"batch sizes must be positive, got {b}")
        if images is not None:
            x = np.ascontiguousarray(images[np.arange(int(b)) % len(images)])
        else:
            x = rng.standard_normal((int(b), *embedder.input_shape)).astype(np.float32)
        for _ in range(max(0, warmup)):
            embedder._embed_array(x)
        times: list[float] = []
        with _RssSampler() as rss:
            total = 0.0
            while len(times) < max(1, iters) or total < min_seconds:
                t0 = time.perf_counter()
                embedder._embed_array(x)
                dt = time.perf_counter() - t0
                times.append(dt)
                total += dt
        arr = np.asarray(times) * 1000.0
        mean = float(arr.mean())
        ips = float(b / (mean / 1000.0))
        rows.append(
            BenchRow(
                model=label or str(embedder.path),
                backend=embedder.name,
                precision=embedder.precision,
                device=embedder.device,
                threads=embedder.threads,
                batch=int(b),
                image_size=int(embedder.spec.image_size),
                warmup=int(warmup),
                iters=len(times),
                p50_ms=float(np.percentile(arr, 50)),
                p95_ms=float(np.percentile(arr, 95)),
                mean_ms=mean,
                images_per_s=ips,
                gflop_per_image=gflop_per_image,
                achieved_gflops=gflop_per_image * ips if gflop_per_image else None,
                peak_rss_mb=rss.peak_mb,
            )
        )
    return rows


class _RssSampler:
    """Samples this process's resident memory every few milliseconds in a thread (Linux /proc)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = None
        self._thread = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _read(self) -> int:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def __enter__(self) -> _RssSampler:
        import threading

        self.peak = self._read()
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self._read())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def peak_mb(self) -> float | None:
        return round(self.peak / 2**20, 1) if self.peak else None


def count_gflops(spec: ModelSpec) -> float | None:
    """fvcore's GFLOP count for one image through the architecture ``spec`` describes (None when
    the architecture is unknown here, or torch / fvcore are not installed)."""
    key = json.dumps(spec.identity(), sort_keys=True)
    if key not in _GFLOPS:
        _GFLOPS[key] = _count_gflops(spec)
    return _GFLOPS[key]


_GFLOPS: dict[str, float | None] = {}


def _count_gflops(spec: ModelSpec) -> float | None:
    if not (available("torch") and available("fvcore")):
        return None
    import torch

    from compress_edge.models.resolve import rebuild
    from compress_edge.eval.profile import count_flops

    try:
        model = rebuild(spec.arch, spec.arch_kwargs, normalize=spec.normalize).eval()
    except ModelError:
        return None
    total, _, _, _ = count_flops(model, torch.zeros(1, spec.channels, spec.image_size, spec.image_size))
    return float(total) / 1e9


def machine_info() -> dict[str, Any]:
    """CPU model, core count and the SIMD flags that decide INT8 speed (Linux), for bench reports."""
    import platform

    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": [f for f in wanted if f in flags],
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
