"""The one inference interface, :class:`Embedder`: ``embed(images) -> float32 (N, D)`` whatever runs the
model, and :func:`embed_batches`, the prefetching extraction loop over any embedder.

Torch-free: numpy, PIL and :mod:`compress_edge.data.images` only. The backends are in
:mod:`compress_edge.export.backends` (and OpenVINO's in :mod:`compress_edge.export.openvino`);
:func:`compress_edge.export.runtimes.open_embedder` opens any MODEL argument as one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from compress_edge.data.images import default_workers, preprocess_batch
from compress_edge.errors import DataError, ModelError
from compress_edge.models.spec import ModelSpec

ImagesLike = Sequence[Image.Image | str | os.PathLike] | Image.Image | np.ndarray


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


@dataclass(frozen=True)
class GraphIO:
    """What a model file's graph says about itself: its inputs and outputs (counts, shapes of the
    first), its compress-edge metadata, and a way to learn the embedding size by running it (or None)."""

    inputs: int
    outputs: int
    input_shape: list
    output_shape: list
    props: dict[str, str]
    probe: Callable[[int], int] | None = None

    @property
    def is_embedding_graph(self) -> bool:
        """One image input and at least one output (the first is the embedding)."""
        return self.inputs == 1 and self.outputs >= 1


class ModelFileEmbedder(Embedder):
    """An Embedder over one exported model file (an ONNX file, an OpenVINO IR), its constructor written
    once: the file checked, opened by the subclass's :meth:`_load` (which returns its :class:`GraphIO`),
    one image input and one embedding output required, the ModelSpec read from the metadata (or from
    ``image_size`` / ``mean`` / ``std`` for a file without any), and a fixed batch adopted.

    ``options``: the backend's own (onnxruntime's ``optimization``, OpenVINO's ``inference_precision``).
    """

    #: What the file is, in errors ("ONNX file").
    kind = "model file"

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, **options: Any) -> None:
        from compress_edge.export.exported import PRECISION_KEY, spec_from_onnx_metadata

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no {self.kind} at {path}: the path does not exist or is a folder")
        self.path = str(path)
        self.threads = int(threads) if threads else None
        io = self._load(path, device, **options)
        if not io.is_embedding_graph:
            raise ModelError(f"{path} has {io.inputs} inputs and {io.outputs} outputs; an embedding model has "
                             "one image input and one embedding output")
        self.precision = io.props.get(PRECISION_KEY, "unknown")
        self.spec = spec_from_onnx_metadata(io.props, path, input_shape=io.input_shape, output_shape=io.output_shape,
                                            image_size=image_size, mean=mean, std=std, probe=io.probe)
        batch = io.input_shape[0] if io.input_shape else None
        if isinstance(batch, int) and batch > 0:
            # A fixed-batch file (not written by compress-edge): feed it exactly that many images.
            self.max_batch = self.min_batch = batch

    def _load(self, path: Path, device: str, **options: Any) -> GraphIO:
        """Open ``path`` for ``device`` (``self.threads`` threads), set ``self.device``, and say what the graph is."""
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
    preprocessed in ``workers`` threads while the previous batch is embedded. It may instead give a
    float32 array (n, C, S, S) already preprocessed (any n: e.g. several views of each image). ``batch_size`` is
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
        if isinstance(items, np.ndarray):  # already preprocessed (the teacher cache's augmented views)
            return items
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

