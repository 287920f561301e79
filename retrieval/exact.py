"""Exact search over an index's stored embeddings (the ground truth of tuning, and the reference kNN):
:func:`compress_edge.eval.neighbors.exact_topk` shard by shard, the shards' top-k merged."""

from __future__ import annotations

import numpy as np
from compress_edge.retrieval.shards import EmbeddingStore

from compress_edge.eval.neighbors import exact_topk, select_topk


def exact_knn(queries: np.ndarray, gallery: EmbeddingStore | np.ndarray, k: int, *,
              gallery_ids: np.ndarray | None = None, exclude: np.ndarray | None = None,
              device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores float32 (nq, k), ids int64 (nq, k)), -1 ids when short.

    gallery: a store (searched shard by shard, memory-mapped) or an array (N, D) with ``gallery_ids``
    (default 0..N-1). Each part is searched by :func:`compress_edge.eval.neighbors.exact_topk` (numpy on
    the CPU; "cuda"/"cuda:N" runs its matrix products with torch on the GPU), the parts' top-k merged.
    """
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    if isinstance(gallery, EmbeddingStore):
        parts = gallery.iter_shards(exclude=exclude)
    else:
        gids = np.arange(len(gallery), dtype=np.int64) if gallery_ids is None else np.asarray(gallery_ids)
        if exclude is not None and len(exclude):
            keep = ~np.isin(gids, exclude)
            parts = iter([(np.asarray(gallery)[keep], gids[keep])])
        else:
            parts = iter([(gallery, gids)])
    ds, ids = [np.full((len(xq), 0), -np.inf, np.float32)], [np.full((len(xq), 0), -1, np.int64)]
    for x, xid in parts:
        if len(x) == 0:
            continue
        d, pos = exact_topk(xq, x, k, device=device)
        ds.append(d)
        ids.append(np.asarray(xid, dtype=np.int64)[pos])
    d, i = np.concatenate(ds, axis=1), np.concatenate(ids, axis=1)
    if d.shape[1] > k:  # more than one part: the best k of theirs
        d, cols = select_topk(d, k)
        i = np.take_along_axis(i, cols, axis=1)
    if d.shape[1] < k:  # fewer vectors than k: pad as FAISS does
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return d.astype(np.float32), i.astype(np.int64)
