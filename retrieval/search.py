"""Images in, neighbours out: the query path of a device.

>>> from compress_edge.retrieval.search import open_index, Searcher
>>> index = open_index("runs/index")
>>> with Searcher(index, model="student.onnx") as searcher:
...     hits = searcher.search(["query.jpg"], k=5)[0]
...     labels = searcher.classify(["query.jpg"])

A :class:`Searcher` pairs an index with an :class:`~compress_edge.export.embedder.Embedder` and
refuses one whose ModelSpec is not the index's (an index built with model A cannot be queried with
model B). Torch-free with an ONNX model: numpy, PIL, onnxruntime and faiss only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.retrieval.folder import RetrievalIndex, open_index
from compress_edge.retrieval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, KnnResult, knn_classify
from compress_edge.retrieval.safety import check_finite, check_model, shown
from compress_edge.retrieval.shards import l2_normalize
from PIL import Image

from compress_edge.data.images import IMAGE_EXTENSIONS, scan_images
from compress_edge.errors import DataError, IndexFileError

__all__ = ["Hit", "Prediction", "Searcher", "open_index", "expand_queries"]


@dataclass
class Hit:
    """One neighbour: its rank (1 = nearest), id, cosine similarity, file (as stored), path (where
    it is now), label index and name (None when the index has no labels)."""

    rank: int
    id: int
    score: float
    file: str | None
    path: str | None
    label: int | None
    label_name: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prediction:
    """A kNN classification: the class (index and name), its share of the vote, every class's share."""

    label: int
    label_name: str | None
    confidence: float
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expand_queries(items: Sequence[str | os.PathLike]) -> list[str]:
    """Image files as given, and the images inside folders (recursively, sorted)."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out.extend(str(p) for p in scan_images(path, labelled=False).files)
        elif path.is_file():
            out.append(str(path))
        else:
            raise DataError(f"no such image or folder: {item}")
    if not out:
        raise DataError(f"no images among {', '.join(map(str, items))} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return out


class Searcher:
    """An index and the model that embeds its queries.

    index: a :class:`RetrievalIndex` or an index folder. model: an Embedder, or a model reference
    (.onnx, .engine, a compress-edge model folder); default: the model recorded when the index was
    built. Raises :class:`~compress_edge.errors.SpecMismatchError` when the model's spec is not the
    index's (and, unless ``trust_model``, one whose weights cannot be checked against it). root: where
    the gallery's files are now, when they moved since the build.
    """

    def __init__(self, index: RetrievalIndex | str | os.PathLike, model: Any = None, *, backend: str = "auto",
                 device: str = "cpu", threads: int | None = None, root: str | os.PathLike | None = None,
                 params: dict[str, Any] | None = None, trust_model: bool = False) -> None:
        self.index = index if isinstance(index, RetrievalIndex) else open_index(index)
        self.root = root
        self.params = dict(params or {})
        ref = model if model is not None else self.index.meta.get("model")
        if ref is None:
            raise IndexFileError(f"{self.index.path} records no model; pass the model the index was built with")
        if hasattr(ref, "embed") and hasattr(ref, "spec"):
            self.embedder, self._owned = ref, False
        else:
            if model is None and not _exists_or_name(str(ref)):
                raise IndexFileError(f"the model the index was built with ({shown(ref)}) is not here; pass it (or its "
                                     "ONNX export) with --model")
            from compress_edge.export.runtimes import open_embedder

            self.embedder = open_embedder(str(ref), backend, device=device, threads=threads)
            self._owned = True
        try:
            check_model(self.index.spec, self.embedder, self.index.meta, what=f"the index {shown(self.index.path)}",
                        trust=trust_model)
        except Exception:
            self.close()
            raise

    # -- embedding -------------------------------------------------------------------------------------
    def embed(self, images: Sequence[Image.Image | str | os.PathLike] | np.ndarray) -> np.ndarray:
        """L2-normalised float32 (N, D) embeddings of images (PIL images, paths or a preprocessed batch)."""
        if isinstance(images, np.ndarray):
            x = self.embedder.embed(images)
        else:
            items = list(images)
            paths = [i for i in items if not isinstance(i, Image.Image)]
            if len(paths) == len(items) and items:
                x = self.embedder.embed_paths([str(p) for p in items])
            else:
                x = self.embedder.embed(items)
        return l2_normalize(check_finite(x, getattr(self.embedder, "path", None) or self.embedder.spec.arch))

    # -- searching -------------------------------------------------------------------------------------
    def search(self, images: Sequence[Image.Image | str | os.PathLike] | np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The k nearest gallery images of each query image, nearest first."""
        return self.search_embeddings(self.embed(images), k)

    def search_embeddings(self, x: np.ndarray, k: int = 10) -> list[list[Hit]]:
        scores, ids = self.index.search(x, k, params=self.params or None)
        return [self._hits(s, i) for s, i in zip(scores, ids, strict=True)]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        idx = self.index
        hits = []
        pos = idx.positions(ids)
        for rank, (score, id_, p) in enumerate(zip(scores.tolist(), ids.tolist(), pos.tolist(), strict=True), 1):
            if id_ < 0 or p < 0:
                continue
            file = idx.files[p] if idx.files is not None else None
            label = int(idx.labels[p]) if idx.labels is not None and idx.labels[p] >= 0 else None
            name = idx.classes[label] if label is not None and label < len(idx.classes) else None
            path = idx.resolve(file, self.root) if file else None
            hits.append(Hit(rank=rank, id=int(id_), score=float(score), file=file, path=path, label=label,
                            label_name=name))
        return hits

    # -- classifying -----------------------------------------------------------------------------------
    def classify(self, images: Sequence[Image.Image | str | os.PathLike] | np.ndarray, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> list[Prediction]:
        """Weighted kNN (exp(similarity / T) votes) with the labels stored in the index."""
        result = self.classify_embeddings(self.embed(images), k=k, temperature=temperature)
        return predictions_of(result, self.index.classes)

    def classify_embeddings(self, x: np.ndarray, k: int = DEFAULT_K,
                            temperature: float = DEFAULT_TEMPERATURE) -> KnnResult:
        return knn_classify(self.index, x, k=k, temperature=temperature, params=self.params or None)

    def close(self) -> None:
        if getattr(self, "_owned", False) and self.embedder is not None:
            self.embedder.close()
        self.embedder = None

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def predictions_of(result: KnnResult, classes: Sequence[str]) -> list[Prediction]:
    out = []
    for pred, conf, row in zip(result.predictions.tolist(), result.confidence.tolist(), result.scores, strict=True):
        names = [classes[c] if c < len(classes) else str(c) for c in range(len(row))]
        out.append(Prediction(label=int(pred), label_name=names[pred] if pred >= 0 else None,
                              confidence=float(conf),
                              scores={n: float(v) for n, v in zip(names, row.tolist(), strict=True) if v > 0}))
    return out


def _exists_or_name(ref: str) -> bool:
    if Path(ref).exists():
        return True
    # An architecture name (random weights) is not a path; anything path-like must exist.
    return not (os.sep in ref or "/" in ref or Path(ref).suffix)
