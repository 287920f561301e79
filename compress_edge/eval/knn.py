"""kNN evaluation of frozen embeddings: 1-NN accuracy (the CompRess paper's "NN", Table 1) and the
weighted kNN vote of :mod:`compress_edge.eval.neighbors` (DINO's protocol: k = 20, 200, T = 0.07), the
neighbours found by the one exact search, :func:`compress_edge.eval.neighbors.exact_topk`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compress_edge.errors import DataError
from compress_edge.eval.inputs import count_classes, require_labels
from compress_edge.eval.neighbors import DEFAULT_KS, DEFAULT_TEMPERATURE, exact_topk, knn_accuracies

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class KnnResult:
    """nn_top1: 1-NN accuracy. knn: {k: {"top1", "top5"}} of the weighted vote. Fractions in [0, 1]."""

    nn_top1: float
    knn: dict[int, dict[str, float]]
    temperature: float
    queries: int
    gallery: int
    num_classes: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["knn"] = {str(k): v for k, v in self.knn.items()}
        return d


def knn_from_neighbors(
    sims: np.ndarray,
    neighbor_labels: np.ndarray,
    labels: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    gallery_size: int | None = None,
) -> KnnResult:
    """Score queries whose neighbours were found elsewhere (an exact search, a FAISS index).

    sims, neighbor_labels: (Q, K) sorted by decreasing similarity, K >= max(ks). labels: (Q,).
    """
    labels = np.asarray(labels, dtype=np.int64)
    neighbor_labels = np.asarray(neighbor_labels, dtype=np.int64)
    c = count_classes(labels, neighbor_labels, given=num_classes)
    accs = knn_accuracies(sims, neighbor_labels, labels, c, ks=sorted({1, *map(int, ks)}), temperature=temperature)
    nn = accs.pop(1)["top1"] if 1 not in ks else accs[1]["top1"]
    return KnnResult(nn_top1=nn, knn=accs, temperature=float(temperature), queries=int(len(labels)),
                     gallery=int(gallery_size or 0), num_classes=c)


def knn_eval(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    device: str | torch.device = "auto",
    num_classes: int | None = None,
) -> KnnResult:
    """1-NN and weighted kNN accuracy of the test features against the train (gallery) features.

    Exact search (:func:`exact_topk`), then :func:`compress_edge.eval.neighbors.weighted_knn_vote`.
    """
    from compress_edge.devices import resolve_device

    started = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    require_labels(train_labels, "gallery (--train)")
    require_labels(test_labels, "query (--test)")
    if any(int(k) <= 0 for k in ks):
        raise DataError(f"k must be positive, got {list(ks)}")
    kmax = max([1, *map(int, ks)])
    if kmax > len(train_labels):
        log.warning("k=%d is more than the %d gallery images: all of them vote", kmax, len(train_labels))
    sims, idx = exact_topk(test_features, train_features, kmax, device=resolve_device(str(device)))
    result = knn_from_neighbors(sims, train_labels[idx], test_labels, ks=ks, temperature=temperature,
                                num_classes=count_classes(train_labels, test_labels, given=num_classes),
                                gallery_size=len(train_labels))
    result.seconds = round(time.perf_counter() - started, 3)
    return result
