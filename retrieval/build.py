"""Building an index from stored embeddings: plan, train, add, tune on held-out queries, write."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from compress_edge.retrieval.exact import exact_knn
from compress_edge.retrieval.faiss_index import (
    faiss_message,
    faiss_threads,
    index_kind,
    make_faiss_index,
    to_gpu,
)
from compress_edge.retrieval.folder import RetrievalIndex
from compress_edge.retrieval.lock import expect_bytes, one_writer
from compress_edge.retrieval.ondisk import add_on_disk, ondisk_append
from compress_edge.retrieval.plan import (
    POINTS_PER_CENTROID,
    IndexPlan,
    default_memory_budget,
    parse_bytes,
    plan_index,
)
from compress_edge.retrieval.shards import EMBEDDINGS_DIR, EmbeddingStore, l2_normalize, write_embeddings
from compress_edge.retrieval.sidecar import (
    INDEX_FORMAT,
    INDEX_VERSION,
    named_classes,
    now_utc,
    refuse_existing,
    write_generation,
)
from compress_edge.retrieval.tune import TUNE_K, tune_index

from compress_edge.errors import CompressEdgeError, IndexFileError
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)


@one_writer("index build", 1, "out_dir")
def build_index(
    store: EmbeddingStore,
    out_dir: str | os.PathLike,
    *,
    spec: ModelSpec,
    files: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    root: str | None = None,
    index: str = "auto",
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    queries: int = 1000,
    on_disk: bool | None = None,
    gpu: bool = False,
    threads: int | None = None,
    points_per_centroid: int = POINTS_PER_CENTROID,
    seed: int = 0,
    tune: bool = True,
    model: str | None = None,
    model_file: dict[str, Any] | None = None,
    generation: int | None = None,
    build_record: dict[str, Any] | None = None,
) -> RetrievalIndex:
    """Build, tune and write an index over the embeddings in ``store`` (shards under out_dir/embeddings).

    files / labels / classes / root: what the sidecar records per id (ids are positions 0..N-1 in
    ``files`` and ``labels``). index: "auto" or an index_factory string. memory_budget: bytes (or
    "4G"); default half this machine's memory. queries: held-out vectors for tuning (taken out of the
    index while it is tuned, added back afterwards). on_disk: IVF inverted lists on disk (default: when
    ``auto`` decides so). gpu: FAISS on the GPU(s) for training and adding when available, and torch
    for the exact ground truth. model: the model reference recorded for queries; model_file: the
    {"path", "sha256"} of its file (an .onnx or an engine), checked when the index is queried.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    n, d = len(store), store.dim
    if n == 0:
        raise IndexFileError("no embeddings to index")
    budget = parse_bytes(memory_budget) or default_memory_budget()
    if not 0 < target_recall <= 1:
        raise CompressEdgeError(f"--target-recall must be in (0, 1], got {target_recall}")
    plan = plan_index(index, n, d, budget, points_per_centroid=points_per_centroid, on_disk=on_disk)
    expect_bytes(out, plan.est_bytes + n * d * 4)
    log.info("index %s for %d vectors of %d dims: %s", plan.key, n, d, plan.reason)
    rng = np.random.default_rng(seed)
    all_ids = store.ids()
    classes = _check_items(files, labels, classes, all_ids)
    gen_dir = out / f"v{generation or 1:04d}"
    with faiss_threads(threads):
        fidx, tuning, seconds = _train_add_tune(plan, store, all_ids, gen_dir, rng, queries=queries if tune else 0,
                                                gpu=gpu, target_recall=target_recall)
    build_seconds = time.perf_counter() - t_start
    meta: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": now_utc(),
        "updated": now_utc(),
        "spec": spec.to_dict(),
        "model": model,
        "model_file": model_file,
        "dim": d,
        "metric": "inner_product",
        "normalized": True,
        "index": {**plan.to_dict(), "choice": index, "memory_budget": budget,
                  "search_params": tuning.get("search_params", {}), "gpu": bool(gpu)},
        "tuning": tuning,
        "build": {"seconds": build_seconds, **seconds,
                  "threads": threads or faiss.omp_get_max_threads(), **(build_record or {})},
        "root": root,
        "classes": list(classes or []),
        "manifests": list(store.manifests),
        "next_id": int(all_ids.max()) + 1,
        "ids": np.sort(all_ids).tolist(),
        "files": None if files is None else [str(f) for f in files],
        "labels": None if labels is None else [int(v) for v in labels],
    }
    write_generation(fidx, out, gen_dir, meta)
    return RetrievalIndex.open(out, verify=False)


def _train_add_tune(plan: IndexPlan, store: EmbeddingStore, all_ids: np.ndarray, gen_dir: Path,
                    rng: np.random.Generator, *, queries: int, gpu: bool,
                    target_recall: float) -> tuple[faiss.Index, dict[str, Any], dict[str, float]]:
    """The FAISS index of ``plan`` trained and filled from ``store`` (ids ``all_ids``; its files in a fresh
    ``gen_dir``) and tuned on up to ``queries`` held-out vectors (0: not tuned); (index, tuning record,
    train and add seconds)."""
    n = len(store)
    # Held-out queries for tuning: kept out of the index until tuning is over.
    n_q = min(int(queries), n // 10) if queries and n >= 100 else 0
    held = np.sort(rng.choice(all_ids, size=n_q, replace=False)) if n_q else np.zeros(0, np.int64)
    xq = store.gather(held) if n_q else None

    fidx = make_faiss_index(plan.key, store.dim)
    t0 = time.perf_counter()
    fidx = _train(fidx, plan, store, rng, held, gpu)
    train_seconds = time.perf_counter() - t0

    if gen_dir.exists():
        shutil.rmtree(gen_dir)
    gen_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    fidx = _add_all(fidx, plan, store, held, gen_dir, gpu)
    add_seconds = time.perf_counter() - t0

    tuning: dict[str, Any] = {"skipped": True}
    if n_q:
        tuning = _tune_held_out(fidx, plan, store, xq, held, gen_dir, gpu=gpu, target_recall=target_recall)
    return fidx, tuning, {"train_seconds": train_seconds, "add_seconds": add_seconds}


def _check_items(files: Sequence[str] | None, labels: Sequence[int] | None, classes: Sequence[str] | None,
                 all_ids: np.ndarray) -> list[str]:
    """Files and labels, one per embedding by position; the class names for the sidecar."""
    n = len(all_ids)
    if files is not None and len(files) != n:
        raise IndexFileError(f"{len(files)} files for {n} embeddings")
    if labels is not None and len(labels) != n:
        raise IndexFileError(f"{len(labels)} labels for {n} embeddings")
    named = named_classes(classes, labels)
    if (files is not None or labels is not None) and not np.array_equal(np.sort(all_ids), np.arange(n)):
        raise IndexFileError("files and labels are given by position, so the embeddings need the ids 0..N-1")
    return named


def _train(fidx: faiss.Index, plan: IndexPlan, store: EmbeddingStore, rng: np.random.Generator,
           held: np.ndarray, gpu: bool) -> faiss.Index:
    """Train ``fidx`` (when it needs it) on a sample of the vectors not held out, on the GPU if asked."""
    if fidx.is_trained:
        return fidx
    n_train = max(1, min(len(store) - len(held), plan.train_points or 65_536))
    xt = store.sample(n_train, rng, exclude=held)
    log.info("training on %d vectors", len(xt))
    gpu_fidx = to_gpu(fidx) if gpu else None
    try:
        (gpu_fidx or fidx).train(xt)
    except RuntimeError as exc:
        raise IndexFileError(f"training {plan.key} on {len(xt)} vectors failed ({faiss_message(exc)}); an IVF "
                             "index needs at least 39 training vectors per list: use fewer lists or "
                             "--index auto") from None
    return faiss.index_gpu_to_cpu(gpu_fidx) if gpu_fidx is not None else fidx


def _add_all(fidx: faiss.Index, plan: IndexPlan, store: EmbeddingStore, held: np.ndarray, gen_dir: Path,
             gpu: bool) -> faiss.Index:
    """Add every stored vector but the held-out ones: into lists on disk, or shard by shard in memory
    (through a GPU copy when asked, except for HNSW)."""
    if plan.on_disk:
        return add_on_disk(fidx, store, held, gen_dir)
    target = to_gpu(fidx) if gpu and index_kind(fidx) != "hnsw" else None
    for x, ids in store.iter_shards(exclude=held):
        (target or fidx).add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
    return faiss.index_gpu_to_cpu(target) if target is not None else fidx


def _tune_held_out(fidx: faiss.Index, plan: IndexPlan, store: EmbeddingStore, xq: np.ndarray, held: np.ndarray,
                   gen_dir: Path, *, gpu: bool, target_recall: float) -> dict[str, Any]:
    """Tune ``fidx`` on the held-out queries against their exact neighbours, then add them back."""
    t0 = time.perf_counter()
    device = "cuda" if gpu and _torch_cuda() else "cpu"
    k = min(TUNE_K, len(store) - len(held))
    _, truth = exact_knn(xq, store, k, exclude=held, device=device)
    exact_seconds = time.perf_counter() - t0
    tuning = tune_index(fidx, xq, truth, target_recall=target_recall, k=k)
    tuning["exact_qps_all_threads"] = len(held) / max(exact_seconds, 1e-9)
    tuning["exact_device"] = device
    tuning["held_out"] = True
    if plan.on_disk:
        ondisk_append(fidx, xq, held, gen_dir)
    else:
        fidx.add_with_ids(xq, held)
    return tuning


def _torch_cuda() -> bool:
    from compress_edge.deps import available

    if not available("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


@one_writer("index build", 1, "out_dir")
def build_index_from_array(x: np.ndarray, out_dir: str | os.PathLike, *, spec: ModelSpec | None = None,
                           shard_rows: int | None = None, **kwargs: Any) -> RetrievalIndex:
    """``build_index`` for embeddings already in memory (N, D): written as shards first (ids 0..N-1)."""
    from compress_edge.retrieval.shards import SHARD_ROWS

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise IndexFileError(f"embeddings must be (N, D), got shape {x.shape}")
    out = Path(out_dir)
    generation = refuse_existing(out, kwargs.pop("overwrite", False))
    spec = spec or ModelSpec(arch="precomputed", embed_dim=int(x.shape[1]), source={"kind": "array"})
    manifest = write_embeddings(out / EMBEDDINGS_DIR, f"g{generation:04d}", l2_normalize(x),
                                shard_rows=shard_rows or SHARD_ROWS)
    store = EmbeddingStore.open(out / EMBEDDINGS_DIR, [manifest])
    return build_index(store, out, spec=spec, generation=generation, **kwargs)
