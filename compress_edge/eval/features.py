"""Feature extraction: :func:`extract_features`, THE one function that turns a dataset into L2-normalised
embeddings for every evaluation protocol (as dinov2's ``extract_features`` serves its kNN and linear
evaluations), and its cache on disk.

It takes a compress-edge model (a torch module with its ModelSpec) or anything with ``spec`` and
``embed(float32 (N, C, S, S)) -> (N, D)`` (an ``Embedder`` of ``compress_edge.export``: ONNX,
TensorRT), and caches the features keyed by the model's identity and the data's fingerprint, so a
second evaluation of the same model on the same data costs a file read.

The loop is the project's one extraction loop, :func:`compress_edge.export.embedder.embed_batches`
(prefetching, progress, the eval preprocessing's normalisation); a torch DataLoader stays the batch
source, its worker processes decoding each image and cutting its eval view (shorter side resized,
centre crop) so only S x S x 3 bytes an image cross from the workers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from compress_edge.data.images import resize_shorter_center_crop
from compress_edge.errors import DataError, ModelError
from compress_edge.eval.neighbors import l2_normalize
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

FEATURES_FORMAT = "compress-edge-features/1"
CACHE_ENV = "COMPRESS_EDGE_CACHE"


def default_cache_dir() -> Path:
    """Where features are cached: ``$COMPRESS_EDGE_CACHE/features`` when the variable is set, else
    ``~/.cache/compress-edge/features`` (``$XDG_CACHE_HOME`` is honoured)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(os.path.expanduser(root)) / "features"
    from compress_edge.data.fashion_mnist import cache_dir

    return cache_dir() / "features"


def _file_digest(path: Path) -> str:
    from compress_edge.storage import sha256_file

    return sha256_file(path)


def model_identity(model: Any, spec: ModelSpec) -> dict[str, Any] | None:
    """What decides a model's features, for the cache key; None when it cannot be told (no caching).

    A torch module: the sha256 of its state dict (weights and batch-norm statistics, so a random
    initialisation is identified too). An embedder: its backend and precision, and the sha256 of its
    model file (an .onnx, an engine), else of its torch module, else the spec's ``weights_sha256``.
    The spec's identity (architecture, image size, mean/std) is part of it either way.
    """
    from compress_edge.train.teacher_cache import tensor_hash

    ident: dict[str, Any] = {"spec": spec.identity()}
    if isinstance(model, torch.nn.Module):
        ident.update(backend="torch", precision="fp32", weights=tensor_hash(model))
        return ident
    ident.update(backend=str(getattr(model, "name", type(model).__name__)),
                 precision=str(getattr(model, "precision", "unknown")))
    path = Path(str(getattr(model, "path", "") or ""))
    inner = getattr(model, "model", None)
    if str(path) not in ("", ".") and path.is_file():
        ident["weights"] = "file:" + _file_digest(path)
    elif isinstance(inner, torch.nn.Module):
        ident["weights"] = tensor_hash(inner)
    elif spec.weights_sha256:
        ident["weights"] = spec.weights_sha256
    else:
        return None
    return ident


def features_key(model_ident: dict[str, Any], data_fingerprint: str, n: int) -> str:
    """The cache file's name (sha256 hex) for a model identity and a dataset."""
    blob = json.dumps({"format": FEATURES_FORMAT, "model": model_ident, "data": data_fingerprint, "n": int(n)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _spec_of(model: Any, spec: ModelSpec | None) -> ModelSpec:
    if spec is not None:
        return spec
    found = getattr(model, "spec", None)
    if isinstance(found, ModelSpec):
        return found
    raise ModelError(
        "extract_features needs the model's ModelSpec (image size, mean/std): pass spec=, or an embedder "
        "with a .spec (compress_edge.models.resolve.resolve_model returns both)"
    )


def extract_features(
    model_or_embedder: Any,
    dataset: Any,
    *,
    spec: ModelSpec | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every image of ``dataset``: (features float32 (N, D) L2-normalised, labels int64 (N,)).

    model_or_embedder: a torch module mapping (B, C, S, S) to (B, D) (an EmbeddingModel), with
      ``spec``; or an object with ``spec`` and ``embed(float32 array (B, C, S, S)) -> (B, D)``
      (an export ``Embedder``: ONNX Runtime, TensorRT, PyTorch).
    dataset: an :class:`~compress_edge.data.datasets.ImageDataset` (any dataset with a ``transform``
      attribute whose items are (PIL image, label, ...) works; without ``fingerprint()`` nothing is cached). Its images are fed through the
      eval preprocessing of ``spec`` (resize, centre crop, mean/std) on a copy; the dataset is untouched.
    device: for a torch module ("auto": CUDA when present); the module is moved there and run in eval
      mode (its training mode is restored afterwards). workers: DataLoader processes.
    cache_dir: the features cache (default :func:`default_cache_dir`); ``use_cache=False`` neither
      reads nor writes it. Labels are -1 for unlabelled images.
    """
    spec = _spec_of(model_or_embedder, spec)
    is_module = isinstance(model_or_embedder, torch.nn.Module)
    if not is_module and not callable(getattr(model_or_embedder, "embed", None)):
        raise ModelError(f"cannot extract features with a {type(model_or_embedder).__name__}: pass a torch "
                         "module with its spec, or an embedder with .spec and .embed()")
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    name = getattr(dataset, "name", type(dataset).__name__)
    cache_file = _cache_file(model_or_embedder, spec, dataset, cache_dir) if use_cache else None
    if cache_file is not None:
        cached = _read_cache(cache_file, len(dataset))
        if cached is not None:
            log.info("features of %s on %s read from the cache (%s)", spec.arch, name, cache_file)
            return cached

    started = time.perf_counter()
    was_training = bool(is_module and model_or_embedder.training)
    try:
        feats, labels = _embed_dataset(_as_embedder(model_or_embedder, spec, device), spec, dataset, name,
                                       batch_size=batch_size, workers=workers, progress=progress)
    finally:
        if was_training:
            model_or_embedder.train()
    feats = l2_normalize(feats)
    log.debug("extracted %d x %d features in %.1f s", len(feats), feats.shape[1], time.perf_counter() - started)
    if cache_file is not None:
        _write_cache(cache_file, feats, labels, spec, dataset, name, seconds=time.perf_counter() - started)
    return feats, labels


def _as_embedder(model: Any, spec: ModelSpec, device: str | torch.device) -> Any:
    """The model as the extraction loop runs it (``spec``, ``name``, ``embed``): an embedder's ``embed``
    with ``spec`` (the one given decides the preprocessing, as it decides the cache key); a torch module
    in the PyTorch backend's :class:`~compress_edge.export.backends.TorchEmbedder` (on ``device``, eval mode)."""
    if not isinstance(model, torch.nn.Module):
        return SimpleNamespace(spec=spec, name=getattr(model, "name", "model"), embed=model.embed)
    from compress_edge.export.backends import TorchEmbedder

    return TorchEmbedder(spec.arch, device=str(device), module=model, spec=spec)


def _eval_view(img: Image.Image, image_size: int) -> torch.Tensor:
    """In the loader's workers: an image's eval view (:func:`resize_shorter_center_crop`) as uint8
    (S, S, 3): a tensor reaches the main process through shared memory, where a pickled image would go
    through the workers' pipe, and a worker whose parent has died cannot exit while that pipe is full."""
    return torch.from_numpy(np.array(resize_shorter_center_crop(img, image_size)))


def _embed_dataset(embedder: Any, spec: ModelSpec, dataset: Any, name: str, *, batch_size: int, workers: int,
                   progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``dataset`` through the one extraction loop (``embed_batches``): raw embeddings
    (N, D) and labels (N,). A DataLoader is the batch source: its workers decode each image and cut its
    eval view (:func:`_eval_view`, the transform of a copy of the dataset); the loop normalises the
    view (the rest of ``preprocess_eval``: the inputs are bit for bit those of ``EvalTransform``)."""
    from compress_edge.data.loaders import make_loader
    from compress_edge.export.embedder import embed_batches

    n = len(dataset)
    data = copy.copy(dataset)
    if hasattr(data, "transform"):
        data.transform = partial(_eval_view, image_size=int(spec.image_size))
    loader = make_loader(data, batch_size, shuffle=False, workers=workers)
    batches = iter(loader)  # in this thread: the loader starts its workers with the stop signals held
    labels = np.empty(n, dtype=np.int64)

    def load(lo: int, hi: int) -> list[Image.Image]:  # runs in the loop's prefetch thread, in order
        batch = next(batches, None)
        if batch is None:
            raise DataError(f"{name} yielded {lo} images where it has {n}")
        views, y = batch[0], batch[1]
        if not (isinstance(views, torch.Tensor) and views.dtype == torch.uint8 and views.ndim == 4):
            raise DataError(f"{name} has no transform for extract_features to set: it takes a dataset of "
                            "PIL images with a transform attribute (an ImageDataset)")
        labels[lo : lo + len(y)] = np.asarray(y, dtype=np.int64)
        return [Image.fromarray(view) for view in views.numpy()]

    feats = np.empty((n, int(spec.embed_dim)), dtype=np.float32)
    row = 0
    for lo, x in embed_batches(embedder, load, 0, n, batch_size=batch_size, progress=progress):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != feats.shape[1]:
            raise ModelError(f"the model returned embeddings of shape {x.shape}, its spec says "
                             f"{spec.embed_dim} dimensions: the model and its spec disagree")
        feats[lo : lo + len(x)] = x
        row += len(x)
    if row != n:
        raise DataError(f"{name} yielded {row} images where it has {n}")
    return feats, labels


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
def _cache_file(model: Any, spec: ModelSpec, dataset: Any, cache_dir: str | os.PathLike | None) -> Path | None:
    """Where the features of ``model`` on ``dataset`` are cached; None when they cannot be (a dataset
    without ``fingerprint()``, a model whose weights cannot be identified)."""
    if not callable(getattr(dataset, "fingerprint", None)):
        return None
    ident = model_identity(model, spec)
    if ident is None:
        log.debug("the model's weights cannot be identified: its features are not cached")
        return None
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{features_key(ident, dataset.fingerprint(), len(dataset))}.npz"


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            feats, labels = np.asarray(z["features"], dtype=np.float32), np.asarray(z["labels"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring the damaged features cache %s (%s)", path, exc)
        return None
    if feats.ndim != 2 or len(feats) != n or len(labels) != n:
        log.warning("ignoring the features cache %s: it holds %d rows, the data %d", path, len(feats), n)
        return None
    return feats, labels


def _write_cache(path: Path, feats: np.ndarray, labels: np.ndarray, spec: ModelSpec, dataset: Any, name: str, *,
                 seconds: float) -> None:
    from compress_edge.storage import atomic_path, atomic_write_json

    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, features=feats, labels=labels)
    atomic_write_json(path.with_suffix(".json"), {
        "format": FEATURES_FORMAT, "model": spec.arch, "spec": spec.to_dict(), "data": name,
        "data_fingerprint": dataset.fingerprint(), "images": len(feats), "dim": int(feats.shape[1]),
        "seconds": round(seconds, 2),
    })
