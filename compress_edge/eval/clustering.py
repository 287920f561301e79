"""Cluster alignment of frozen embeddings (the CompRess paper's protocol): spherical k-means (faiss) of
the train features, clusters matched to classes by the Hungarian algorithm, and the clustering metrics
(accuracy under the best matching, NMI, ARI) with numpy / scipy, no scikit-learn."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from compress_edge.errors import DataError
from compress_edge.eval.inputs import SMALL_PROBLEM, count_classes, require_labels


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts (max(a)+1, max(b)+1) of each pair of non-negative integer labels."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two label vectors of the same length are needed, got {a.shape} and {b.shape}")
    if len(a) and (a.min() < 0 or b.min() < 0):
        raise ValueError("labels must be non-negative")
    ra = int(a.max()) + 1 if len(a) else 0
    rb = int(b.max()) + 1 if len(b) else 0
    return np.bincount(a * rb + b, minlength=ra * rb).reshape(ra, rb)


def hungarian_match(clusters: np.ndarray, labels: np.ndarray, num_clusters: int | None = None,
                    num_classes: int | None = None) -> np.ndarray:
    """The one-to-one cluster -> class map that labels the most images right (Kuhn-Munkres, scipy).

    Returns int64 (num_clusters,): the class of each cluster, -1 for clusters left unmatched (more
    clusters than classes).
    """
    from scipy.optimize import linear_sum_assignment

    table = contingency(clusters, labels)
    k = max(int(num_clusters or 0), table.shape[0])
    c = max(int(num_classes or 0), table.shape[1])
    full = np.zeros((k, c), dtype=np.int64)
    full[: table.shape[0], : table.shape[1]] = table
    rows, cols = linear_sum_assignment(full, maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def cluster_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``clusters`` under their best one-to-one matching to ``labels`` (1.0 for a perfect
    clustering whatever the cluster numbering)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    mapping = hungarian_match(clusters, labels)
    return float((mapping[clusters] == labels).mean())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """NMI with the arithmetic-mean normalisation: I(a; b) / ((H(a) + H(b)) / 2), natural logs.

    1.0 when both labellings are the same partition (including both trivial).
    """
    table = contingency(a, b).astype(np.float64)
    n = table.sum()
    if n == 0:
        return float("nan")
    ha, hb = _entropy(table.sum(1)), _entropy(table.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    pij = table / n
    outer = np.outer(table.sum(1), table.sum(0)) / (n * n)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / outer[nz])).sum())
    return max(0.0, mi / ((ha + hb) / 2))


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI of Hubert and Arabie (1985): 1.0 for identical partitions, about 0 for random ones."""
    table = contingency(a, b).astype(np.float64)
    n = table.sum()

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    total = n * (n - 1) / 2
    if total == 0:
        return 1.0
    expected = sa * sb / total
    maximum = (sa + sb) / 2
    if maximum == expected:  # both partitions trivial (one cluster, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))


@dataclass
class ClusterResult:
    """accuracy: test images labelled by the Hungarian map learned on the train split; train_accuracy:
    the same map on the train split; nmi / ari: of the test assignments against the test labels."""

    accuracy: float
    nmi: float
    ari: float
    train_accuracy: float
    train_nmi: float
    num_clusters: int
    num_classes: int
    seed: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kmeans_assign(features: np.ndarray, num_clusters: int, *, seed: int = 0, niter: int = 50,
                  nredo: int = 5, spherical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means on ``features`` (N, D): (centroids float32 (K, D), assignments int64 (N,)).

    Spherical (centroids renormalised each iteration, the cosine k-means of L2-normalised features),
    with a fixed seed and every point used for training; the best of ``nredo`` runs (faiss starts from
    random points, so one run can merge two clusters and split another).
    """
    from compress_edge.deps import require

    faiss = require("faiss", "k-means clustering")
    x = np.ascontiguousarray(features, dtype=np.float32)
    k = int(num_clusters)
    if not 1 <= k <= len(x):
        raise DataError(f"cannot make {k} clusters of {len(x)} images; use between 1 and {len(x)} clusters")
    km = faiss.Kmeans(x.shape[1], k, niter=int(niter), nredo=int(nredo), seed=int(seed), spherical=spherical,
                      verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, len(x) // k + 1))
    threads = faiss.omp_get_max_threads()
    if x.size <= SMALL_PROBLEM:  # OpenMP threads spin between the many short steps of a small problem
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return km.centroids.copy(), assign_to_centroids(x, km.centroids)


def assign_to_centroids(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (N,) of the nearest centroid (by L2, what k-means minimises) of each row."""
    x = np.asarray(features, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    d = (x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    return d.argmin(axis=1).astype(np.int64)


def cluster_alignment(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    *,
    num_clusters: int | None = None,
    seed: int = 0,
    niter: int = 50,
    nredo: int = 5,
) -> ClusterResult:
    """The CompRess paper's cluster alignment.

    k-means (faiss, spherical, ``seed``, best of ``nredo`` runs) of the train features into
    ``num_clusters`` clusters (default: as many as classes); clusters matched one-to-one to classes by
    the Hungarian algorithm on the train labels; each test image takes the class of its nearest
    centroid's match; accuracy, NMI and ARI of the test split (of the train split when no test
    features are given).
    """
    started = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    require_labels(train_labels, "train")
    if test_features is None:
        test_features, test_labels = train_features, train_labels
    test_labels = np.asarray(test_labels, dtype=np.int64)
    require_labels(test_labels, "test")
    c = count_classes(train_labels, test_labels)
    k = int(num_clusters) if num_clusters is not None else c
    centroids, train_assign = kmeans_assign(train_features, k, seed=seed, niter=niter, nredo=nredo)
    mapping = hungarian_match(train_assign, train_labels, k, c)
    test_assign = assign_to_centroids(test_features, centroids)
    return ClusterResult(
        accuracy=float((mapping[test_assign] == test_labels).mean()),
        nmi=normalized_mutual_info(test_assign, test_labels),
        ari=adjusted_rand_index(test_assign, test_labels),
        train_accuracy=float((mapping[train_assign] == train_labels).mean()),
        train_nmi=normalized_mutual_info(train_assign, train_labels),
        num_clusters=k, num_classes=c, seed=int(seed), seconds=round(time.perf_counter() - started, 3),
    )
