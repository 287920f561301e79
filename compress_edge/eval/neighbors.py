"""Exact nearest neighbours and weighted k-nearest-neighbour voting, with numpy only.

The one vote every kNN classifier of compress-edge uses: ``compress-edge eval knn`` (exact search),
``eval knn --index`` and retrieval's ``classify`` (FAISS search on a device). They find the
neighbours their own way and hand (similarities, neighbour labels) to :func:`weighted_knn_vote` or
:func:`knn_predict`, so every path scores a query the same.

The exact search is here too: :func:`exact_topk`, the one exact top-k by inner product, used by
``eval knn`` (:mod:`compress_edge.eval.knn`), neighbour agreement (:mod:`compress_edge.eval.agreement`)
and retrieval's ground truth and exact search (:mod:`compress_edge.retrieval.exact`). numpy on a CPU;
on a GPU the same loop runs its matrix products with torch, imported only then.

The vote is the one of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination") as used by DINO (Caron et al. 2021, ``eval_knn.py``): neighbour j of a query adds
``exp(sim_j / T)`` to the score of its class, with T = 0.07 and k = 20 or 200 in DINO's tables.

Torch-free on purpose: the query path of a device imports this module with numpy alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from compress_edge.errors import DataError, DependencyError

#: DINO's kNN temperature and neighbour counts.
DEFAULT_TEMPERATURE = 0.07
DEFAULT_KS = (20, 200)
#: Elements of one similarity block (queries x gallery) on a CPU and on a GPU.
BLOCK_CPU = 1 << 24
BLOCK_GPU = 1 << 28


def l2_normalize(x: np.ndarray, *, dtype: Any = np.float32, eps: float = 1e-12) -> np.ndarray:
    """(N, D) rows scaled to unit L2 norm (a zero row stays zero): a new C-contiguous ``dtype`` array.

    The one row normaliser (evaluation, quality checks, export parity, the index). DataError for
    anything but a 2-d array.
    """
    x = np.array(x, dtype=dtype, copy=True, order="C")
    if x.ndim != 2:
        raise DataError(f"embeddings must be a 2-d array (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, eps), out=x)
    return x


def exact_topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    device: Any = "cpu",
    self_index: np.ndarray | None = None,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows of each query by inner product: (sims float32 (Q, k), indices int64 (Q, k)),
    most similar first (equal scores: the lower row first).

    Queries go in chunks so that one (chunk, N) similarity block stays under 2^24 elements on a CPU
    (2^28 on a GPU), or ``block``. self_index: (Q,) gallery row of each query to leave out (a query
    searched among its own dataset). k is clipped to the gallery. device: "cpu" (numpy), or a torch
    device such as "cuda:0" (the gallery sits there once; torch is imported only then).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(gallery)
    k = min(int(k), n - (1 if self_index is not None else 0))
    if k <= 0:
        raise DataError("the gallery is empty: nothing to search")
    on_cpu = str(device) == "cpu"
    limit = block or (BLOCK_CPU if on_cpu else BLOCK_GPU)
    chunk = max(1, min(len(q), limit // max(n, 1)))
    search = _numpy_search(gallery, k) if on_cpu else _torch_search(gallery, k, str(device))
    sims = np.empty((len(q), k), dtype=np.float32)
    idx = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), chunk):
        stop = min(start + chunk, len(q))
        own = None if self_index is None else np.asarray(self_index[start:stop], dtype=np.int64)
        sims[start:stop], idx[start:stop] = search(q[start:stop], own)
    return sims, idx


def select_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row of ``scores`` (R, N), k <= N: (values (R, k), columns int64 (R, k)),
    largest first, equal values by column."""
    n = scores.shape[1]
    cols = _candidates(scores, k) if k < n else np.broadcast_to(np.arange(n), scores.shape)
    valid = cols >= 0
    vals = np.where(valid, np.take_along_axis(scores, np.maximum(cols, 0), axis=1), -np.inf)
    # Stable sort of the negated values over columns in ascending order: ties go to the lower column;
    # the padding (-1) comes last in its row, after any real -inf.
    order = np.lexsort((~valid, -vals), axis=1)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(cols, order, axis=1).astype(np.int64)


_GROUP = 64


def _candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row that hold its k largest (all of those equal to the k-th), in ascending
    order, padded with -1: (R, C), C >= k.

    The k-th largest of the maxima of groups of 64 columns is at most the row's k-th largest value, so
    the columns at or above it hold the top k; finding them reads the block twice, where a partition
    of every row would move it around (about 3x slower). With fewer than k groups the bound is the
    k-th largest itself; a row where this finds fewer than k (NaN) keeps every column."""
    r, n = scores.shape
    whole = n - n % _GROUP
    if whole // _GROUP >= k:
        maxima = scores[:, :whole].reshape(r, -1, _GROUP).max(axis=2)
    else:
        maxima = scores
    bound = np.partition(maxima, maxima.shape[1] - k, axis=1)[:, maxima.shape[1] - k]
    rows, cols = np.nonzero(scores >= bound[:, None])
    counts = np.bincount(rows, minlength=r)
    if counts.min() < k:
        return np.broadcast_to(np.arange(n), scores.shape)
    out = np.full((r, int(counts.max())), -1, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    out[rows, np.arange(len(rows)) - np.repeat(starts, counts)] = cols
    return out


def _numpy_search(gallery: np.ndarray, k: int):
    g = np.ascontiguousarray(gallery, dtype=np.float32)

    def search(q: np.ndarray, own: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        s = q @ g.T
        if own is not None:
            s[np.arange(len(q)), own] = -np.inf
        return select_topk(s, k)

    return search


def _torch_search(gallery: np.ndarray, k: int, device: str):
    from compress_edge.deps import require

    torch = require("torch", "exact search on a GPU")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DependencyError("exact search on a GPU needs torch with CUDA, and none is visible; use the CPU")
    dev = torch.device(device)
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(dev)

    def search(q: np.ndarray, own: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            s = torch.from_numpy(q).to(dev) @ g.T
            if own is not None:
                s[torch.arange(len(q), device=dev), torch.from_numpy(own).to(dev)] = -float("inf")
            d, i = torch.topk(s, k, dim=1)
            return d.float().cpu().numpy(), i.cpu().numpy().astype(np.int64)

    return search


def weighted_knn_vote(
    sims: np.ndarray,
    neighbor_labels: np.ndarray,
    num_classes: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Class scores of each query from its neighbours: float64 (Q, C).

    sims: (Q, k) similarities (cosine / inner product of L2-normalised embeddings) of each query's
      neighbours, any order. neighbor_labels: (Q, k) int class of each neighbour; a negative label
      (an unlabelled item, or FAISS's -1 padding when the gallery holds fewer than k) casts no vote.
    num_classes: C. temperature: T > 0; neighbour j adds ``exp(sims[q, j] / T)`` to class
      ``neighbor_labels[q, j]``.

    Computed in float64 as written (no max subtraction), so scores of different calls compare; with
    cosine similarities (at most 1) and T = 0.07 the largest weight is about 1.6e6.
    """
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbor_labels)
    if sims.ndim != 2 or labels.shape != sims.shape:
        raise ValueError(f"sims and neighbor_labels must both be (Q, k), got {sims.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"neighbor_labels must be integers, got {labels.dtype}")
    num_classes = int(num_classes)
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"a neighbour has label {int(labels.max())}, not below num_classes={num_classes}")
    q = sims.shape[0]
    weights = np.exp(sims / float(temperature))
    valid = labels >= 0
    rows = np.broadcast_to(np.arange(q)[:, None], labels.shape)
    flat = (rows[valid] * num_classes + labels[valid]).astype(np.int64)
    # astype: bincount of nothing (no labelled neighbour anywhere) comes back as int64.
    scores = np.bincount(flat, weights=weights[valid], minlength=q * num_classes).astype(np.float64)
    return scores.reshape(q, num_classes)


def knn_predict(
    sims: np.ndarray,
    neighbor_labels: np.ndarray,
    num_classes: int,
    *,
    k: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    topk: int = 1,
) -> np.ndarray:
    """Predicted classes of each query by the weighted vote of its ``k`` most similar neighbours.

    sims, neighbor_labels: (Q, K) as for :func:`weighted_knn_vote`, sorted by decreasing similarity
    (as FAISS and ``torch.topk`` return them); the first ``k`` columns vote (all when k is None).
    Returns int64 (Q,) when ``topk`` is 1, else (Q, topk) classes by decreasing score. Ties go to the
    lower class index; a query with no labelled neighbour gets -1.

    k = 1 is the nearest-neighbour classifier (the "NN" column of the CompRess tables).
    """
    sims = np.asarray(sims)
    neighbor_labels = np.asarray(neighbor_labels)
    if k is not None:
        if int(k) <= 0:
            raise ValueError(f"k must be positive, got {k}")
        sims, neighbor_labels = sims[:, : int(k)], neighbor_labels[:, : int(k)]
    scores = weighted_knn_vote(sims, neighbor_labels, num_classes, temperature)
    topk = max(1, min(int(topk), int(num_classes)))
    # Stable sort of the negated scores: equal scores keep class order, so ties go to the lower index.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :topk].astype(np.int64)
    order[scores.max(axis=1) <= 0] = -1
    return order[:, 0] if topk == 1 else order


def topk_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of queries whose label is among ``predictions`` ((Q,) or (Q, topk)); nan for none."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    if predictions.ndim == 1:
        predictions = predictions[:, None]
    return float((predictions == labels[:, None]).any(axis=1).mean())


def knn_accuracies(
    sims: np.ndarray,
    neighbor_labels: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = (1, *DEFAULT_KS),
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[int, dict[str, float]]:
    """{k: {"top1": ..., "top5": ...}} for each k of ``ks`` from one search of max(ks) neighbours.

    labels: (Q,) true classes of the queries. top5 is top-min(5, C).
    """
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        pred = knn_predict(sims, neighbor_labels, num_classes, k=k, temperature=temperature, topk=5)
        pred = pred if pred.ndim == 2 else pred[:, None]
        out[int(k)] = {"top1": topk_accuracy(pred[:, 0], labels), "top5": topk_accuracy(pred, labels)}
    return out
