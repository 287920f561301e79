"""Teacher-student agreement on the same images: how many of the teacher's nearest neighbours the
student keeps (through the one exact search, :func:`compress_edge.eval.neighbors.exact_topk`), and the
Spearman rank correlation of their similarities."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compress_edge.errors import DataError
from compress_edge.eval.neighbors import BLOCK_CPU, exact_topk

if TYPE_CHECKING:
    import torch


@dataclass
class AgreementResult:
    """overlap: {k: mean fraction of the teacher's k nearest neighbours that are among the student's};
    spearman: mean (and std) over queries of the Spearman correlation between the teacher's and the
    student's similarities of the query to every other image."""

    overlap: dict[int, float]
    spearman: float
    spearman_std: float
    queries: int
    images: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overlap"] = {str(k): v for k, v in self.overlap.items()}
        return d


def _row_ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=1).astype(np.float64)


def neighbor_agreement(
    teacher_features: np.ndarray,
    student_features: np.ndarray,
    *,
    ks: Sequence[int] = (10, 100),
    max_queries: int | None = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> AgreementResult:
    """How well the student keeps the teacher's neighbourhoods, on the same N images.

    Each query (all images, or ``max_queries`` drawn with ``seed``) is searched among the other N - 1
    images in the teacher's space and in the student's (each with its own dimension). Reports the
    top-k overlap for each k of ``ks`` and the Spearman rank correlation of the two similarity vectors
    (N - 1 values each; ties take average ranks), averaged over queries.
    """
    from compress_edge.devices import resolve_device

    started = time.perf_counter()
    t = np.ascontiguousarray(teacher_features, dtype=np.float32)
    s = np.ascontiguousarray(student_features, dtype=np.float32)
    if len(t) != len(s):
        raise DataError(f"the teacher has features of {len(t)} images and the student of {len(s)}: "
                        "agreement needs the same images")
    n = len(t)
    if n < 3:
        raise DataError(f"agreement needs at least 3 images, got {n}")
    ks = sorted({min(int(k), n - 1) for k in ks if int(k) > 0})
    if not ks:
        raise DataError("k must be positive")
    rng = np.random.default_rng(seed)
    if max_queries is not None and n > max_queries:
        qidx = np.sort(rng.choice(n, size=int(max_queries), replace=False))
    else:
        qidx = np.arange(n)
    kmax = ks[-1]
    dev = resolve_device(str(device))
    _, nt = exact_topk(t[qidx], t, kmax, device=dev, self_index=qidx)
    _, ns = exact_topk(s[qidx], s, kmax, device=dev, self_index=qidx)
    overlap = {}
    for k in ks:
        hits = [len(np.intersect1d(a[:k], b[:k], assume_unique=True)) for a, b in zip(nt, ns, strict=True)]
        overlap[k] = float(np.mean(hits) / k)

    rhos = _spearman(t, s, qidx)
    return AgreementResult(overlap=overlap, spearman=float(np.nanmean(rhos)), spearman_std=float(np.nanstd(rhos)),
                           queries=int(len(qidx)), images=n, seconds=round(time.perf_counter() - started, 3))


def _spearman(t: np.ndarray, s: np.ndarray, qidx: np.ndarray) -> np.ndarray:
    """Spearman correlation (float64 (Q,), nan where a ranking is constant) of each query's similarities
    to the other N - 1 images in the teacher's space ``t`` and the student's ``s``, ``BLOCK_CPU`` at a time."""
    n = len(t)
    rhos = np.empty(len(qidx), dtype=np.float64)
    chunk = max(1, BLOCK_CPU // (4 * n))
    keep = np.ones(n, dtype=bool)
    for start in range(0, len(qidx), chunk):
        rows = qidx[start : start + chunk]
        st, ss = t[rows] @ t.T, s[rows] @ s.T
        mask = np.broadcast_to(keep, st.shape).copy()
        mask[np.arange(len(rows)), rows] = False  # a query's similarity to itself says nothing
        rt = _row_ranks(st[mask].reshape(len(rows), n - 1))
        rs = _row_ranks(ss[mask].reshape(len(rows), n - 1))
        rt -= rt.mean(1, keepdims=True)
        rs -= rs.mean(1, keepdims=True)
        denom = np.sqrt((rt * rt).sum(1) * (rs * rs).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rhos[start : start + len(rows)] = np.where(denom > 0, (rt * rs).sum(1) / denom, np.nan)
    return rhos
