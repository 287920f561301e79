"""Weighted k-nearest-neighbour classification over an index or an array of embeddings.

The rule of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", sec. 3.4), used by CompRess, MoCo and DINO for kNN evaluation: the k nearest gallery
embeddings (cosine similarity s_i) vote for their labels with weight exp(s_i / T); the class with
the largest total wins. Defaults k = 20, T = 0.07.

One function, :func:`knn_classify`, serves ``compress-edge classify``, the ``eval knn`` command and
the benchmarks, over an approximate index (through FAISS, as a device searches) or over exact search
(an array, or an index with ``exact=True``), so the two accuracies can be set side by side.

Torch-free: numpy and faiss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from compress_edge.retrieval.exact import exact_knn
from compress_edge.retrieval.folder import RetrievalIndex
from compress_edge.retrieval.shards import l2_normalize

from compress_edge.errors import CompressEdgeError
from compress_edge.eval.neighbors import DEFAULT_TEMPERATURE, weighted_knn_vote

DEFAULT_K = 20


@dataclass
class KnnResult:
    """predictions int64 (n,): the winning class (-1 when no neighbour has a label).
    scores float64 (n, C): each class's share of the vote weight (rows sum to 1, or 0 without votes).
    neighbour_ids int64 (n, k), similarities float32 (n, k), neighbour_labels int64 (n, k)."""

    predictions: np.ndarray
    scores: np.ndarray
    neighbour_ids: np.ndarray
    similarities: np.ndarray
    neighbour_labels: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        """Score of the predicted class, per query (0 where nothing was predicted)."""
        if self.scores.shape[1] == 0:
            return np.zeros(len(self.predictions))
        return np.where(self.predictions >= 0, self.scores[np.arange(len(self.scores)),
                                                          np.clip(self.predictions, 0, None)], 0.0)

    def accuracy(self, labels: Sequence[int] | np.ndarray) -> float:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(self.predictions):
            raise CompressEdgeError(f"{len(labels)} labels for {len(self.predictions)} predictions")
        return float((self.predictions == labels).mean()) if len(labels) else float("nan")


def knn_vote(similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int,
             temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Class scores (n, C) float64 from neighbours' similarities and labels (n, k), rows summing to 1.

    The vote is :func:`compress_edge.eval.neighbors.weighted_knn_vote` (each neighbour with a label >= 0
    adds exp(s / T) to its class), the one every kNN of compress-edge uses, so ``classify`` and
    ``eval knn`` score a query the same; here rows are normalised into confidences. Neighbours with
    label -1 or a non-finite similarity (FAISS's padding) do not vote.
    """
    if temperature <= 0:
        raise CompressEdgeError(f"the temperature must be positive, got {temperature}")
    s = np.asarray(similarities, dtype=np.float64)
    lab = np.asarray(neighbour_labels, dtype=np.int64)
    finite = np.isfinite(s)
    scores = weighted_knn_vote(np.where(finite, s, 0.0), np.where(finite, lab, -1), int(num_classes), temperature)
    total = scores.sum(axis=1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def knn_classify(
    index_or_embeddings: RetrievalIndex | np.ndarray,
    queries: np.ndarray,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    query_ids: Sequence[int] | np.ndarray | None = None,
    exact: bool = False,
    params: dict[str, Any] | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
) -> KnnResult:
    """Classify query embeddings (n, D) by a weighted vote of their k nearest gallery neighbours.

    index_or_embeddings: a :class:`RetrievalIndex` (its stored labels; searched through its FAISS
      index, or exactly over its stored embeddings with ``exact=True``), or a gallery array (N, D)
      searched exactly, with ``labels`` (N,).
    query_ids: the gallery ids of the queries when they are gallery items themselves (leave-one-out:
      each query's own entry is dropped from its neighbours).
    params: search parameters for the index (e.g. {"nprobe": 64}) in place of the tuned ones.
    Returns a :class:`KnnResult`; vectors are L2-normalised here.
    """
    if k <= 0:
        raise CompressEdgeError(f"k must be positive, got {k}")
    xq = l2_normalize(np.asarray(queries, dtype=np.float32).reshape(len(queries), -1))
    own = None if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    extra = 1 if own is not None else 0

    if isinstance(index_or_embeddings, RetrievalIndex):
        idx = index_or_embeddings
        if idx.labels is None or not (idx.labels >= 0).any():
            raise CompressEdgeError(f"the index {idx.path} holds no labels; build it from a class folder "
                                    "(DIR/<class>/<image>) or a labelled dataset to classify with it")
        n_classes = num_classes or max(len(idx.classes), int(idx.labels.max()) + 1)

        def search(x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            if exact:
                return idx.exact_search(x, kk, device=device, normalize=False)
            return idx.search(x, kk, params=params, normalize=False)

        def label_of(ids: np.ndarray) -> np.ndarray:
            return idx.labels_of(ids)
    else:
        gallery = l2_normalize(np.asarray(index_or_embeddings, dtype=np.float32))
        if labels is None:
            raise CompressEdgeError("kNN over an array of embeddings needs their labels")
        lab = np.asarray(labels, dtype=np.int64)
        if len(lab) != len(gallery):
            raise CompressEdgeError(f"{len(lab)} labels for {len(gallery)} gallery embeddings")
        n_classes = num_classes or int(lab.max()) + 1

        def search(x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            return exact_knn(x, gallery, kk, device=device)

        def label_of(ids: np.ndarray) -> np.ndarray:
            return np.where(ids >= 0, lab[np.clip(ids, 0, None)], -1)

    sims_all, ids_all = [], []
    for start in range(0, len(xq), batch_size):
        s, i = search(xq[start : start + batch_size], k + extra)
        if own is not None:
            s, i = _drop_self(s, i, own[start : start + batch_size], k)
        sims_all.append(s[:, :k])
        ids_all.append(i[:, :k])
    sims = np.concatenate(sims_all) if sims_all else np.zeros((0, k), np.float32)
    nbr = np.concatenate(ids_all) if ids_all else np.zeros((0, k), np.int64)
    nbr_labels = label_of(nbr)
    scores = knn_vote(sims, nbr_labels, n_classes, temperature)
    has_vote = scores.sum(axis=1) > 0
    predictions = np.where(has_vote, scores.argmax(axis=1), -1).astype(np.int64)
    return KnnResult(predictions=predictions, scores=scores, neighbour_ids=nbr, similarities=sims,
                     neighbour_labels=nbr_labels)


def _drop_self(s: np.ndarray, i: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (or, when absent, its last neighbour), keeping k columns."""
    is_self = i == own[:, None]
    none = ~is_self.any(axis=1)
    is_self[none, -1] = True
    keep = ~is_self
    s2 = s[keep].reshape(len(s), -1)[:, :k]
    i2 = i[keep].reshape(len(i), -1)[:, :k]
    return s2, i2
