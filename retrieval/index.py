"""FAISS indexes over L2-normalised embeddings: choosing, building, tuning, opening, adding, removing.

An index folder (INDEX_DIR) holds:

- ``index.json``: the sidecar, and the commit point. It names the ModelSpec the embeddings came from,
  the items (ids, file paths relative to ``root``, labels, class names), the index key and search
  parameters, the tuning results and the build record, and which generation folder and embedding
  manifests are current.
- ``vNNNN/index.faiss`` (+ ``vNNNN/index.ivfdata`` for an on-disk IVF index): one generation of the
  FAISS index. A change (build, add, remove) writes a new generation folder and then the sidecar, each
  atomically, so a crash at any point leaves the previous index and sidecar intact.
- ``embeddings/``: the embeddings in shards (see :mod:`compress_edge.retrieval.shards`).
- ``.lock``: held (``flock``) by the one process changing the folder (build, add, remove); a second
  writer is refused naming the holder. Readers take no lock: they only ever see whole generations.

Opening checks the sidecar field by field (ids, files, labels within the classes, the files it
names stay inside the folder) and that the FAISS file and the embedding store are there. Stored
paths are shown and opened only when they resolve inside the gallery (:meth:`RetrievalIndex.resolve`).

Every vector is L2-normalised and searched with the inner product (cosine similarity).

Choosing an index (``index="auto"``) follows FAISS's guidelines ("Guidelines to choose an index" in
the FAISS wiki): exact ``IDMap2,Flat`` for small N; ``HNSW32`` when its memory fits the budget (up to
250k vectors: beyond, its build takes too long on a small machine); else ``IVF{nlist},Flat`` when the
full vectors fit, ``IVF{nlist},SQ8`` when 1 byte a dimension does, else ``OPQ{M}_{D},IVF{nlist},PQ{M}``,
else an IVF index with its inverted lists on disk. nlist is 4 x sqrt(N) (the guideline's range is 4 to 16 x sqrt(N)), trained on ``points_per_centroid``
(30 to 256) points per centroid.

Torch-free: faiss and numpy. torch is imported only for exact search on a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from compress_edge.retrieval.safety import check_model, dataset_id_ok, is_inside, model_record, shown
from compress_edge.retrieval.shards import (
    EMBEDDINGS_DIR,
    EmbeddingStore,
    l2_normalize,
    write_embeddings,
)

from compress_edge.errors import CompressEdgeError, IndexFileError
from compress_edge.neighbors import exact_topk, select_topk
from compress_edge.spec import ModelSpec
from compress_edge.storage import FolderBusy, atomic_path, atomic_write_json, folder_lock, sha256_file

log = logging.getLogger(__name__)

INDEX_FORMAT = "compress-edge-index"
INDEX_VERSION = 1
SIDECAR = "index.json"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
TRAINED_FILE = "trained.faiss"

#: Up to this many vectors, exact search is fast enough that an approximate index is not worth it.
EXACT_MAX_VECTORS = 10_000
#: HNSW links per node; HNSW is chosen up to this many vectors. Its build is the slowest of all
#: (1M 128-d vectors take about 6 minutes on 2 cores); above, IVF with the same full vectors.
HNSW_M = 32
HNSW_MAX_VECTORS = 250_000
#: Default points per centroid when training an IVF quantizer (FAISS asks for 30 to 256).
POINTS_PER_CENTROID = 64
#: Indexes larger than this are opened memory-mapped by default.
MMAP_MIN_BYTES = 1 << 30
#: Index files up to this size have their sha256 checked when opened.
VERIFY_MAX_BYTES = 256 << 20
#: The largest k (and nprobe) FAISS GPU indexes take; larger searches run on the CPU.
GPU_MAX_K = 2048
#: Values swept while tuning, by search parameter.
SWEEPS = {
    "nprobe": (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048),
    "efSearch": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048),
}
TUNE_K = 10
PQ_TRAIN_POINTS = 39 * 256
OPQ_ITERATIONS = 20
OPQ_TRAIN_POINTS = 32_768

KEY_EXAMPLES = "IDMap2,Flat; HNSW32,Flat; IVF1024,SQ8; OPQ16_64,IVF1024,PQ16; IVF4096,Flat"


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def parse_bytes(text: str | int | float | None) -> int | None:
    """'4G', '512M', '1.5GB', '2GiB', 1000000 -> bytes (powers of 1024); None or 'auto' -> None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "auto"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmgt]?)(i?b)?", s)
    if not m:
        raise CompressEdgeError(f"cannot read the size {text!r}; write it like 512M, 4G or 1.5GB")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_memory_budget() -> int:
    """Half of this machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads inside the block (None: leave as is)."""
    if not n:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    # FAISS messages start with "Error in <C++ signature> at <file>:<line>: "; keep the reason.
    m = re.search(r"at \S+:\d+: (.*)$", text)
    if m:
        text = m.group(1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    """Silence what FAISS's C++ code prints (file descriptors 1 and 2) for routine steps, such as
    "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename" and "resizing ... ivfdata"."""
    import ctypes
    import sys

    try:
        libc = ctypes.CDLL(None)
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                libc.fflush(None)  # what C stdio still buffers goes to /dev/null, not after us
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


_HELD = threading.local()


@contextlib.contextmanager
def writing(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """One writer per index folder: hold ``folder_lock`` on FOLDER/.lock (FolderBusy when another
    process holds it). Re-entrant within a thread, so a build that commits does not refuse itself."""
    key = os.path.normpath(os.path.abspath(folder))
    held = getattr(_HELD, "folders", None)
    if held is None:
        held = _HELD.folders = set()
    if key in held:
        yield
        return
    try:
        lock = folder_lock(folder, what=what)
        lock.__enter__()
    except FolderBusy as exc:
        raise FolderBusy(exc.folder, shown(exc.holder)) from None
    held.add(key)
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc):
            raise
        _drop_leftovers(Path(folder))
        kept = ("the partial files were removed, the previous index is unchanged" if (Path(folder) / SIDECAR).is_file()
                else "the partial files were removed")
        need = getattr(_HELD, "need", {}).get(key)
        try:
            free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        raise IndexFileError(f"no space left on the disk of {shown(folder)} ({free}"
                          f"{f'; this needs about {format_bytes(need)}' if need else ''}): free some space or use "
                          f"another folder, then run the command again ({kept})") from None
    finally:
        held.discard(key)
        getattr(_HELD, "need", {}).pop(key, None)
        lock.__exit__(None, None, None)


def _expect(folder: str | os.PathLike, nbytes: float) -> None:
    """Note the disk space a write into ``folder`` needs, for the message when the disk is full."""
    if not hasattr(_HELD, "need"):
        _HELD.need = {}
    _HELD.need[os.path.normpath(os.path.abspath(folder))] = int(nbytes)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)  # numpy's and FAISS's short writes carry no errno
    return "No space left" in text or bool(re.search(r"\d+ requested and \d+ written", text))


def _drop_leftovers(path: Path) -> None:
    """After a failed write: remove generation folders and embedding shards the sidecar does not use
    (all of them when there is no index yet)."""
    meta = None
    if (path / SIDECAR).is_file():
        try:
            meta = read_sidecar(path)
        except IndexFileError:
            return  # unsure what is in use: leave everything
    keep = (path / meta["index"]["file"]).parent if meta else None
    for old in path.glob("v[0-9][0-9][0-9][0-9]*"):
        if old.is_dir() and old != keep:
            shutil.rmtree(old, ignore_errors=True)
    if meta is not None:
        _drop_unused_shards(path, meta)
    else:
        shutil.rmtree(path / EMBEDDINGS_DIR, ignore_errors=True)


def _one_writer(what: str, pos: int, name: str, existing: bool = False):
    """Decorate a function that writes the index folder in its argument ``name`` (position ``pos``)
    to hold :func:`writing` while it runs. existing: say "no index at" before creating any lock."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = kwargs[name] if name in kwargs else args[pos]
            if existing:
                read_sidecar(folder)
            with writing(folder, what):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Choosing an index
# --------------------------------------------------------------------------------------------------
@dataclass
class IndexPlan:
    """The index to build: FAISS ``key``, why, its estimated memory, and how it is trained."""

    key: str
    reason: str
    est_bytes: int
    nlist: int | None = None
    train_points: int = 0
    on_disk: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ivf_nlist(n: int) -> int:
    """Inverted lists for N vectors: 4 x sqrt(N), kept at or under N / 39 so each centroid trains
    on enough points (FAISS warns below 39)."""
    nlist = int(round(4 * math.sqrt(max(n, 1))))
    return max(1, min(nlist, n // 39 if n >= 39 else 1))


def _opq_out_dim(d: int, m: int) -> int:
    out = min(d, 4 * m)
    return max(m, out - out % m)


def estimate_bytes(key: str, n: int, d: int) -> int:
    """Rough memory of a FAISS index from its factory key (vectors, links, codes, ids, centroids)."""
    nlist = _nlist_of(key) or 0
    ids = 8 if "IDMap2" in key else (8 if "IDMap" in key or nlist else 0)
    extra = 48 if "IDMap2" in key else 0  # the reverse id map (a hash table) held in memory
    m = re.search(r"HNSW(\d*)", key)
    links = 0
    if m:
        big_m = int(m.group(1) or 32)
        links = big_m * 2 * 4 + 16  # level-0 links (2M) plus levels, offsets and upper levels
    pq = re.search(r"PQ(\d+)", key)
    if pq:
        code = int(pq.group(1))
    elif "SQ8" in key:
        code = d
    elif "SQfp16" in key or "SQ16" in key:
        code = 2 * d
    elif "SQ4" in key:
        code = (d + 1) // 2
    else:
        code = 4 * d
    opq = re.search(r"OPQ(\d+)_(\d+)", key)
    fixed = nlist * d * 4 + (d * int(opq.group(2)) * 4 if opq else 0)
    return int(n * (code + ids + links + extra) + fixed)


def _nlist_of(key: str) -> int | None:
    m = re.search(r"IVF(\d+)", key)
    return int(m.group(1)) if m else None


def choose_index(n: int, d: int, memory_budget: int | None = None, *,
                 points_per_centroid: int = POINTS_PER_CENTROID) -> IndexPlan:
    """The index ``auto`` builds for ``n`` vectors of dimension ``d`` within ``memory_budget`` bytes."""
    budget = int(memory_budget or default_memory_budget())
    ppc = _check_ppc(points_per_centroid)
    within = f"within the memory budget of {format_bytes(budget)}"
    flat = estimate_bytes("IDMap2,Flat", n, d)
    if n <= EXACT_MAX_VECTORS and flat <= budget:
        return IndexPlan("IDMap2,Flat", f"exact search: {n} vectors (<= {EXACT_MAX_VECTORS}) are searched "
                         f"fast enough without an approximate index", flat)
    hnsw_key = f"IDMap,HNSW{HNSW_M},Flat"
    hnsw = estimate_bytes(hnsw_key, n, d)
    if n <= HNSW_MAX_VECTORS and hnsw <= budget:
        return IndexPlan(hnsw_key, f"HNSW: {format_bytes(hnsw)} fits {within}", hnsw)
    nlist = ivf_nlist(n)
    train = min(n, ppc * nlist)
    pq_train = min(n, max(train, PQ_TRAIN_POINTS))
    why_not = (f"HNSW needs {format_bytes(hnsw)}" if n <= HNSW_MAX_VECTORS
               else f"N > {HNSW_MAX_VECTORS:,} makes an HNSW build slow")
    flat_key = f"IVF{nlist},Flat"
    ivf_flat = estimate_bytes(flat_key, n, d)
    if ivf_flat <= budget:
        return IndexPlan(flat_key, f"IVF with full vectors: {why_not}, {format_bytes(ivf_flat)} fits {within}",
                         ivf_flat, nlist, train)
    sq8_key = f"IVF{nlist},SQ8"
    sq8 = estimate_bytes(sq8_key, n, d)
    if sq8 <= budget:
        return IndexPlan(sq8_key, f"IVF + 8-bit scalar quantizer: IVF,Flat needs {format_bytes(ivf_flat)}, "
                         f"{format_bytes(sq8)} fits {within}", sq8, nlist, train)
    for m in (64, 48, 32, 16, 8, 4):
        if m > d:
            continue
        dout = _opq_out_dim(d, m)
        key = f"OPQ{m}_{dout},IVF{nlist},PQ{m}"
        est = estimate_bytes(key, n, d)
        if est <= budget:
            return IndexPlan(key, f"OPQ + IVF-PQ ({m} bytes a vector): IVF,SQ8 needs {format_bytes(sq8)}, "
                             f"{format_bytes(est)} fits {within}", est, nlist, pq_train)
    return IndexPlan(sq8_key, f"IVF,SQ8 with its inverted lists on disk: even 4-byte PQ codes exceed "
                     f"{format_bytes(budget)}; the lists are memory-mapped from disk", nlist * d * 4, nlist, train,
                     on_disk=True)


def _check_ppc(points_per_centroid: int) -> int:
    if not 30 <= int(points_per_centroid) <= 256:
        raise CompressEdgeError(f"points per centroid must be between 30 and 256 (FAISS's range), "
                                f"got {points_per_centroid}")
    return int(points_per_centroid)


def plan_index(index: str, n: int, d: int, memory_budget: int | None = None, *,
               points_per_centroid: int = POINTS_PER_CENTROID, on_disk: bool | None = None) -> IndexPlan:
    """``choose_index`` for "auto", else a plan for the given index_factory string."""
    if not index or index.strip().lower() == "auto":
        plan = choose_index(n, d, memory_budget, points_per_centroid=points_per_centroid)
    else:
        key = index.strip()
        nlist = _nlist_of(key)
        ppc = _check_ppc(points_per_centroid)
        plan = IndexPlan(key, "as asked", estimate_bytes(key, n, d), nlist, min(n, ppc * nlist) if nlist else 0)
    if "PQ" in plan.key:  # 256 centroids per sub-quantizer want 39 x 256 training points
        plan.train_points = min(n, max(plan.train_points, PQ_TRAIN_POINTS))
    elif not plan.train_points:
        plan.train_points = min(n, 65_536)
    if on_disk is not None:
        plan.on_disk = bool(on_disk)
    if plan.on_disk and plan.nlist is None:
        raise IndexFileError(f"only IVF indexes keep their lists on disk; {plan.key} cannot (drop --on-disk, or "
                          "use e.g. IVF4096,SQ8)")
    return plan


def make_faiss_index(key: str, d: int) -> faiss.Index:
    """``faiss.index_factory(d, key, inner product)``, wrapped in an id map when the index cannot take
    ids itself (IVF indexes can; Flat and HNSW cannot)."""
    try:
        index = faiss.index_factory(int(d), key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexFileError(f"FAISS cannot build the index {key!r} for {d}-d vectors ({_short(exc)}); "
                          f"examples of index_factory strings: {KEY_EXAMPLES}") from None
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                # FAISS's defaults (50 iterations on up to 65k points) take many minutes on a small
                # machine; 20 iterations on 32k points give nearly the same rotation.
                vt.niter = min(vt.niter, OPQ_ITERATIONS)
                vt.max_train_points = min(vt.max_train_points, OPQ_TRAIN_POINTS)
    if "IDMap" not in key and _ivf(index) is None:
        index = faiss.IndexIDMap(index) if isinstance(_core(index), faiss.IndexHNSW) else faiss.IndexIDMap2(index)
    return index


def _unwrap(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def _core(index: faiss.Index) -> faiss.Index:
    return _unwrap(index)


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def search_parameter(index: faiss.Index) -> str | None:
    """The parameter that trades speed for recall: "efSearch" (HNSW), "nprobe" (IVF), None (exact)."""
    core = _core(index)
    if isinstance(core, faiss.IndexHNSW):
        return "efSearch"
    if _ivf(index) is not None:
        return "nprobe"
    return None


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    ps = faiss.ParameterSpace()
    for name, value in (params or {}).items():
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError as exc:
            raise IndexFileError(f"this index ({type(_core(index)).__name__}) has no search parameter {name!r} "
                              f"({_short(exc)}); it takes: {search_parameter(index) or 'none'}") from None


def index_kind(index: faiss.Index) -> str:
    core = _core(index)
    if isinstance(core, faiss.IndexHNSW):
        return "hnsw"
    if _ivf(index) is not None:
        return "ivf"
    if isinstance(core, faiss.IndexFlat):
        return "flat"
    return type(core).__name__


def can_remove(index: faiss.Index) -> tuple[bool, str]:
    kind = index_kind(index)
    if kind == "hnsw":
        return False, "an HNSW graph cannot remove vectors (FAISS does not support it)"
    return True, ""


# --------------------------------------------------------------------------------------------------
# Exact search (ground truth, and the reference kNN evaluation)
# --------------------------------------------------------------------------------------------------
def exact_knn(queries: np.ndarray, gallery: EmbeddingStore | np.ndarray, k: int, *,
              gallery_ids: np.ndarray | None = None, exclude: np.ndarray | None = None,
              device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores float32 (nq, k), ids int64 (nq, k)), -1 ids when short.

    gallery: a store (searched shard by shard, memory-mapped) or an array (N, D) with ``gallery_ids``
    (default 0..N-1). Each part is searched by :func:`compress_edge.neighbors.exact_topk` (numpy on
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


# --------------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------------
def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:, :k] ∩ truth[:, :k]| / k (recall@1: the top hit is the exact one)."""
    if len(truth) == 0:
        return float("nan")
    k = min(k, truth.shape[1])
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f, t, assume_unique=False)) / max(1, min(k, len(t)))
    return hits / len(truth)


def measure_qps(index: faiss.Index, xq: np.ndarray, k: int, threads: int | None = None,
                min_seconds: float = 0.3, max_repeats: int = 5) -> float:
    """Queries per second of ``index.search`` on the batch ``xq`` with ``threads`` OpenMP threads."""
    with faiss_threads(threads):
        index.search(xq[: min(len(xq), 16)], k)  # warm up
        done, elapsed = 0, 0.0
        for _ in range(max_repeats):
            t0 = time.perf_counter()
            index.search(xq, k)
            elapsed += time.perf_counter() - t0
            done += len(xq)
            if elapsed >= min_seconds:
                break
    return done / max(elapsed, 1e-9)


def tune_index(index: faiss.Index, xq: np.ndarray, truth: np.ndarray, *, target_recall: float = 0.95,
               k: int = TUNE_K, measure_single_thread: bool = True) -> dict[str, Any]:
    """Sweep the index's search parameter on queries ``xq`` (nq, D) with exact neighbours ``truth``
    (nq, >= k); keep the smallest value whose recall@k meets ``target_recall``.

    Returns the sweep (recall@1, recall@k, queries per second with all threads per value), the chosen
    value, whether the target was met, and queries per second at 1 thread and at all threads. The
    chosen value is left set on ``index``.
    """
    k = min(k, truth.shape[1])
    param = search_parameter(index)
    values: Sequence[Any] = [None]
    if param == "nprobe":
        nlist = _ivf(index).nlist
        values = [v for v in SWEEPS["nprobe"] if v <= nlist] or [nlist]
        if values[-1] != nlist and nlist <= SWEEPS["nprobe"][-1]:
            values.append(nlist)
    elif param == "efSearch":
        values = list(SWEEPS["efSearch"])
    sweep = []
    chosen = None
    for value in values:
        if param is not None:
            set_search_params(index, {param: value})
        t0 = time.perf_counter()
        _, found = index.search(xq, k)
        seconds = time.perf_counter() - t0
        row = {"value": value, "recall_at_1": recall_at(found, truth, 1), f"recall_at_{k}": recall_at(found, truth, k),
               "qps_all_threads": len(xq) / max(seconds, 1e-9)}
        sweep.append(row)
        if row[f"recall_at_{k}"] >= target_recall:
            chosen = row
            break
    met = chosen is not None
    if chosen is None:
        # Out of reach (quantized codes cap the recall): the cheapest setting within 0.01 of the best,
        # rather than the best at any cost.
        best = max(r[f"recall_at_{k}"] for r in sweep)
        chosen = next(r for r in sweep if r[f"recall_at_{k}"] >= best - 0.01)
        log.warning("no %s setting reaches recall@%d >= %.2f (best %.3f); keeping %s=%s (recall %.3f), the "
                    "cheapest within 0.01 of the best", param or "search", k, target_recall, best, param,
                    chosen["value"], chosen[f"recall_at_{k}"])
    params = {param: chosen["value"]} if param else {}
    set_search_params(index, params)
    result = {
        "target_recall": target_recall,
        "k": k,
        "queries": int(len(xq)),
        "parameter": param,
        "sweep": sweep,
        "search_params": params,
        "target_met": met,
        "recall_at_1": chosen["recall_at_1"],
        f"recall_at_{k}": chosen[f"recall_at_{k}"],
        "threads": faiss.omp_get_max_threads(),
        "qps_all_threads": measure_qps(index, xq, k),
    }
    if measure_single_thread:
        result["qps_1_thread"] = measure_qps(index, xq, k, threads=1)
    return result


# --------------------------------------------------------------------------------------------------
# GPU FAISS
# --------------------------------------------------------------------------------------------------
def gpu_count() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A GPU copy of ``index`` (all GPUs), or None when FAISS has no GPU support or the index type
    has no GPU version (HNSW); the reason is logged."""
    if gpu_count() == 0:
        log.warning("--gpu asked, but this FAISS has no GPU support (pip install 'compress-edge[gpu]'); "
                    "using the CPU")
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as exc:
        log.warning("FAISS has no GPU version of %s (%s); using the CPU", type(_core(index)).__name__, _short(exc))
        return None


# --------------------------------------------------------------------------------------------------
# The index folder
# --------------------------------------------------------------------------------------------------
class RetrievalIndex:
    """An index folder opened: the FAISS index, its sidecar and the stored embeddings.

    ``spec``: the ModelSpec of the embeddings. ``ids`` (int64, sorted), ``files``, ``labels`` (or
    None), ``classes``: the items. ``search`` / ``exact_search`` return (scores, ids); ``item`` turns
    an id into its file and label. Changes (``add``, ``remove``) are written by ``commit``.
    """

    def __init__(self, path: Path, meta: dict[str, Any], index: faiss.Index, *, writable: bool = False,
                 generation_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.meta = meta
        self.index = index
        self.writable = writable
        self._gen_dir = generation_dir
        self.spec = ModelSpec.from_dict(meta["spec"])
        self.ids = np.asarray(meta.get("ids") or [], dtype=np.int64)
        self.files: list[str] | None = meta.get("files")
        labels = meta.get("labels")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes: list[str] = list(meta.get("classes") or [])
        self._gpu_index = None
        self._file_to_id: dict[str, int] | None = None
        self._changed = False

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, mmap: bool | None = None, verify: bool | None = None,
             writable: bool = False, gpu: bool = False, threads: int | None = None) -> RetrievalIndex:
        """Open INDEX_DIR. mmap: memory-map the index (default: when it is over 1 GiB; never when
        ``writable``). verify: check the index file's sha256 (default: when it is at most 256 MiB;
        its size is always checked). writable: for ``add`` / ``remove`` then ``commit``."""
        if threads:
            faiss.omp_set_num_threads(int(threads))
        path = Path(path)
        for _ in range(5):  # a writer may replace the generation between reading the sidecar and the file
            meta = read_sidecar(path)
            check_sidecar(path, meta)
            info = meta["index"]
            file = path / info["file"]
            if file.is_file() or read_sidecar(path).get("generation") == meta.get("generation"):
                break
        if not file.is_file():
            raise IndexFileError(f"the index file {file} named by {path / SIDECAR} is missing; rebuild the index "
                              "with 'compress-edge index build'")
        size = file.stat().st_size
        if size != info.get("file_bytes", size):
            raise IndexFileError(f"{file} is damaged: {size} bytes where {info['file_bytes']} were written "
                              "(truncated or replaced); rebuild it with 'compress-edge index build'")
        if verify or (verify is None and size <= VERIFY_MAX_BYTES):
            digest = info.get("file_sha256")
            if digest and sha256_file(file) != digest:
                raise IndexFileError(f"{file} is damaged: its sha256 is not the one recorded in {SIDECAR}; "
                                  "rebuild it with 'compress-edge index build'")
        gen_dir = file.parent
        flags = 0
        if info.get("ivfdata"):
            flags |= faiss.IO_FLAG_ONDISK_SAME_DIR
            ivf = path / info["ivfdata"]
            if not ivf.is_file():
                raise IndexFileError(f"the on-disk lists {ivf} are missing; rebuild the index")
            if writable:
                # Changes go to a copy (the next generation); the current one stays as it is.
                gen_dir = _next_generation_dir(path, meta)
                shutil.copytree(file.parent, gen_dir)
                file = gen_dir / INDEX_FILE
        else:
            big = size > MMAP_MIN_BYTES
            if (mmap or (mmap is None and big)) and not writable:
                flags |= faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
                if _nlist_of(info.get("key", "")):
                    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        try:
            with _quiet_native() if info.get("ivfdata") else contextlib.nullcontext():
                index = faiss.read_index(str(file), flags)
        except RuntimeError as exc:
            raise IndexFileError(f"{file} is damaged or not a FAISS index ({_short(exc)}); rebuild it with "
                              "'compress-edge index build'") from None
        if index.ntotal != len(meta.get("ids") or []) or index.d != int(meta["dim"]):
            raise IndexFileError(f"{file} holds {index.ntotal} vectors of {index.d} dims but {SIDECAR} lists "
                              f"{len(meta.get('ids') or [])} of {meta['dim']}: they do not belong together; "
                              "rebuild the index")
        obj = cls(path, meta, index, writable=writable, generation_dir=gen_dir)
        set_search_params(index, info.get("search_params") or {})
        if gpu:
            obj.use_gpu()
        return obj

    def use_gpu(self) -> bool:
        """Search on the GPU(s) from now on (k above 2048 still runs on the CPU). False when not possible."""
        self._gpu_index = to_gpu(self.index)
        if self._gpu_index is not None:
            set_search_params(self._gpu_index, self.search_params)
        return self._gpu_index is not None

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def key(self) -> str:
        return str(self.meta["index"]["key"])

    @property
    def search_params(self) -> dict[str, Any]:
        return dict(self.meta["index"].get("search_params") or {})

    @property
    def root(self) -> str | None:
        return self.meta.get("root")

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"RetrievalIndex({str(self.path)!r}, {self.key}, {self.ntotal} vectors of {self.dim} dims)"

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in the item lists (-1 for -1 or unknown ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        return np.where((ids >= 0) & (self.ids[pos] == ids), pos, -1)

    def item(self, id_: int) -> dict[str, Any]:
        """{"id", "file", "path", "label", "label_name"} of one id."""
        pos = int(self.positions(np.array([id_]))[0])
        if pos < 0:
            raise IndexFileError(f"id {id_} is not in the index")
        file = self.files[pos] if self.files is not None else None
        label = int(self.labels[pos]) if self.labels is not None else None
        name = self.classes[label] if label is not None and 0 <= label < len(self.classes) else None
        return {"id": int(id_), "file": file, "path": self.resolve(file) if file else None,
                "label": label if label is None or label >= 0 else None, "label_name": name}

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """Labels (int64, shape of ``ids``) of ids; -1 where unknown or no label."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.labels is None:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = self.positions(ids.reshape(-1)).reshape(ids.shape)
        return np.where(pos >= 0, self.labels[np.clip(pos, 0, None)], -1)

    def resolve(self, file: str, root: str | os.PathLike | None = None) -> str | None:
        """Where an item's file is now: relative paths under ``root`` (default: the root recorded at build
        time), dataset ids and absolute paths (images added from outside the root) as they are.

        None, with a warning, for a stored path that leads outside the gallery (``../``, an absolute
        path outside the root and the folders images were added from, a malformed dataset id): the
        sidecar is data, and what it names is never shown or opened unchecked."""
        from compress_edge.retrieval.shards import is_dataset_id

        base = str(root) if root is not None else self.root
        if is_dataset_id(file):
            return file if dataset_id_ok(file) else self._outside(file)
        if os.path.isabs(file):
            allowed = [b for b in (base, self.root, *(self.meta.get("roots") or [])) if b]
            return os.path.normpath(file) if any(is_inside(file, b) for b in allowed) else self._outside(file)
        if not base:
            return self._outside(file)
        full = os.path.normpath(os.path.join(base, file))
        return full if is_inside(full, base) else self._outside(file)

    def _outside(self, file: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if file not in warned:
            warned.add(file)
            log.warning("skipped %s: the path %s stores leads outside the gallery %s", shown(file),
                        self.path / SIDECAR, shown(self.root))
        return None

    def store(self) -> EmbeddingStore:
        """The stored embeddings of the items in the index (memory-mapped shards)."""
        return EmbeddingStore.open(self.path / EMBEDDINGS_DIR, self.meta.get("manifests") or [], live=self.ids)

    # -- searching ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, params: dict[str, Any] | None = None,
               normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query: (scores float32 (nq, k), ids int64 (nq, k)); id -1 where the index
        holds fewer than k. ``params`` override the tuned search parameters for this call."""
        xq = self._queries(queries, normalize)
        if k <= 0:
            raise CompressEdgeError(f"k must be positive, got {k}")
        index = self.index
        if self._gpu_index is not None and k <= GPU_MAX_K and int((params or {}).get("nprobe", 0)) <= GPU_MAX_K:
            index = self._gpu_index
        if params:
            set_search_params(index, {**self.search_params, **params})
        try:
            return index.search(xq, k)
        finally:
            if params:
                set_search_params(index, self.search_params)

    def exact_search(self, queries: np.ndarray, k: int = 10, device: str = "cpu",
                     normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored embeddings (the reference the index is measured against)."""
        return exact_knn(self._queries(queries, normalize), self.store(), k, device=device)

    def _queries(self, queries: np.ndarray, normalize: bool) -> np.ndarray:
        xq = np.asarray(queries, dtype=np.float32)
        if xq.ndim == 1:
            xq = xq[None]
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise IndexFileError(f"queries of shape {xq.shape} do not fit an index of {self.dim}-d vectors")
        return l2_normalize(xq) if normalize else np.ascontiguousarray(xq)

    # -- changing -------------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise IndexFileError("this index was opened read-only; open it with writable=True to change it")

    def add(self, x: np.ndarray, files: Sequence[str] | None = None, labels: Sequence[int] | None = None,
            ids: np.ndarray | None = None, manifest: str | None = None) -> np.ndarray:
        """Add vectors (normalised here) with their files and labels; return their ids."""
        self._require_writable()
        x = self._queries(x, True)
        n = len(x)
        if ids is None:
            start = int(self.meta.get("next_id", int(self.ids.max()) + 1 if len(self.ids) else 0))
            ids = np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) and len(ids) and ids.min() <= self.ids.max():
            raise IndexFileError("new ids must be larger than those in the index")
        if files is not None and self.files is None and len(self.ids):
            raise IndexFileError("this index records no files; add vectors without files")
        try:
            if self.meta["index"].get("ivfdata"):
                ondisk_append(self.index, x, ids, self._gen_dir)
            else:
                self.index.add_with_ids(x, ids)
        except RuntimeError as exc:
            raise IndexFileError(f"this index ({self.key}) cannot add vectors ({_short(exc)}); rebuild it instead") from None
        self.ids = np.concatenate([self.ids, ids])
        if files is not None or self.files is not None:
            self.files = (self.files or []) + [str(f) for f in (files or [""] * n)]
        new_labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None or labels is not None:
            base = self.labels if self.labels is not None else np.full(len(self.ids) - n, -1, np.int64)
            self.labels = np.concatenate([base, new_labels])
            self.classes = _named_classes(self.classes, self.labels)
        self.meta["next_id"] = int(ids.max()) + 1 if n else self.meta.get("next_id", 0)
        if manifest:
            self.meta.setdefault("manifests", []).append(manifest)
        self._file_to_id = None
        self._changed = True
        return ids

    def ids_of_files(self, files: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> tuple[
            np.ndarray, list[str]]:
        """(ids, files not found) for paths as given on a command line (matched against the stored
        relative path, the resolved absolute path, or the stored string itself)."""
        if self.files is None:
            raise IndexFileError("this index records no files, so nothing can be removed by path")
        if self._file_to_id is None:
            table: dict[str, int] = {}
            for f, i in zip(self.files, self.ids.tolist(), strict=True):
                table[f] = i
                full = self.resolve(f, root)
                if full is not None:
                    table[os.path.normpath(full)] = i
            self._file_to_id = table
        found, missing = [], []
        for f in files:
            s = str(f)
            cand = [s, os.path.normpath(os.path.abspath(os.path.expanduser(s)))]
            hit = next((self._file_to_id[c] for c in cand if c in self._file_to_id), None)
            if hit is None:
                missing.append(s)
            else:
                found.append(hit)
        return np.unique(np.asarray(found, dtype=np.int64)), missing

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids; return how many were removed. IndexFileError for an index type that cannot."""
        self._require_writable()
        ok, why = can_remove(self.index)
        if not ok:
            raise IndexFileError(f"{why}; rebuild the index without those images ('compress-edge index build'), "
                              "or build an IVF or Flat index (e.g. --index IVF1024,SQ8) if you need to remove")
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        try:
            removed = int(self.index.remove_ids(ids))
        except RuntimeError as exc:
            raise IndexFileError(f"this index ({self.key}) cannot remove vectors ({_short(exc)}); rebuild it") from None
        keep = ~np.isin(self.ids, ids)
        self.ids = self.ids[keep]
        if self.files is not None:
            self.files = [f for f, k in zip(self.files, keep.tolist(), strict=True) if k]
        if self.labels is not None:
            self.labels = self.labels[keep]
        self._file_to_id = None
        self._changed = True
        return removed

    def commit(self, extra: dict[str, Any] | None = None) -> None:
        """Write the changed index as a new generation, then the sidecar (each atomically)."""
        self._require_writable()
        self.meta["ids"] = self.ids.tolist()
        self.meta["files"] = self.files
        self.meta["labels"] = None if self.labels is None else self.labels.tolist()
        self.meta["classes"] = self.classes
        self.meta["ntotal"] = self.ntotal
        self.meta["updated"] = _now()
        self.meta.update(extra or {})
        gen_dir = self._gen_dir if self.meta["index"].get("ivfdata") else _next_generation_dir(self.path, self.meta)
        with writing(self.path, "index commit"):
            write_generation(self.index, self.path, gen_dir, self.meta)
        self._gen_dir = gen_dir
        self._changed = False

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``compress-edge index info`` shows)."""
        m = self.meta
        return {
            "index_dir": str(self.path),
            "key": self.key,
            "kind": index_kind(self.index),
            "vectors": self.ntotal,
            "dim": self.dim,
            "on_disk": bool(m["index"].get("ivfdata")),
            "search_params": self.search_params,
            "bytes": m["index"].get("bytes"),
            "bytes_per_vector": m["index"].get("bytes_per_vector"),
            "model": m.get("model"),
            "spec": {"arch": self.spec.arch, "embed_dim": self.spec.embed_dim, "image_size": self.spec.image_size},
            "labelled": self.labels is not None and bool((self.labels >= 0).any()),
            "classes": self.classes,
            "root": self.root,
            "tuning": m.get("tuning"),
            "build": m.get("build"),
            "created": m.get("created"),
            "updated": m.get("updated"),
        }

    def close(self) -> None:
        self.index = None  # type: ignore[assignment]
        self._gpu_index = None


def open_index(path: str | os.PathLike, **kwargs: Any) -> RetrievalIndex:
    """Open an index folder (see :meth:`RetrievalIndex.open` for the options)."""
    return RetrievalIndex.open(path, **kwargs)


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    side = path / SIDECAR if path.is_dir() or not path.name.endswith(".json") else path
    if not side.is_file():
        raise IndexFileError(f"no index at {path} ({SIDECAR} is missing); build one with "
                          f"'compress-edge index build MODEL DATA --out {path}'")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{side} is damaged ({exc}); rebuild the index") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{side} is not a compress-edge index sidecar; rebuild the index")
    if int(meta.get("version", 0)) > INDEX_VERSION:
        raise IndexFileError(f"{side} was written by a newer compress-edge (format {meta['version']}); upgrade")
    for key in ("spec", "index", "dim"):
        if key not in meta:
            raise IndexFileError(f"{side} has no {key!r}; rebuild the index")
    return meta


_GENERATION_FILE = re.compile(r"v\d{4,}/index\.(faiss|ivfdata)")


def check_sidecar(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Check the sidecar field by field (ids, files, labels, classes, the files it names) and that the
    embedding store it lists is there; IndexFileError naming what is wrong otherwise."""
    side = Path(path) / SIDECAR

    def bad(what: str) -> IndexFileError:
        return IndexFileError(f"{side} is damaged: {what}; rebuild the index with 'compress-edge index build'")

    ids = meta.get("ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise bad("its ids are not a list of integers")
    if any(b <= a for a, b in zip(ids, ids[1:], strict=False)) or (ids and ids[0] < 0):
        raise bad("its ids are not sorted, distinct and non-negative")
    n = len(ids)
    files, labels, classes = meta.get("files"), meta.get("labels"), meta.get("classes") or []
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise bad("its file list is not a list of paths")
    if files is not None and len(files) != n:
        raise bad(f"it lists {len(files)} files for {n} ids")
    if files is None and isinstance(meta.get("build"), dict) and meta["build"].get("images"):
        raise bad("it was built from images but lists no files")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("its class list is not a list of names")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise bad("its labels are not a list of integers")
        if len(labels) != n:
            raise bad(f"it lists {len(labels)} labels for {n} ids")
        wrong = [v for v in labels if not -1 <= v < len(classes)]
        if wrong:
            raise bad(f"label {wrong[0]} is not one of its {len(classes)} classes" if classes
                      else "it has labels but no class names")
    for key in ("root",):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"its {key!r} is not a path")
    roots = meta.get("roots") or []
    if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
        raise bad("its 'roots' are not absolute folders")
    info = meta.get("index")
    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        raise bad("it names no index file")
    for key in ("file", "ivfdata"):
        if info.get(key) is not None and not (isinstance(info[key], str) and _GENERATION_FILE.fullmatch(info[key])):
            raise bad(f"its index file {shown(info[key])!r} is not a generation file inside the index folder")
    if not isinstance(meta.get("next_id", 0), int) or (ids and meta.get("next_id", ids[-1] + 1) <= ids[-1]):
        raise bad("its next_id is not above every id")
    _check_store(Path(path), meta, bad)


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _check_store(path: Path, meta: dict[str, Any], bad: Any) -> None:
    """The embedding store the sidecar lists: every manifest and every shard it names is there."""
    manifests = meta.get("manifests") or []
    if not isinstance(manifests, list) or not all(_plain_name(m) for m in manifests):
        raise bad("its manifests are not file names inside embeddings/")
    folder = path / EMBEDDINGS_DIR
    for name in manifests:
        file = folder / name
        try:
            shards = json.loads(file.read_text(encoding="utf-8"))["shards"]
        except FileNotFoundError:
            raise IndexFileError(f"the embedding store {folder} is missing {shown(name)} (removal and rebuilds need "
                              "it); rebuild the index with 'compress-edge index build'") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"the embeddings manifest {file} is damaged ({shown(_short(exc))}); rebuild the "
                              "index") from None
        for shard in shards if isinstance(shards, list) else [None]:
            names = [shard.get("x"), shard.get("ids")] if isinstance(shard, dict) else [None]
            if not all(_plain_name(v) for v in names):
                raise IndexFileError(f"the embeddings manifest {file} names shards outside {folder}; rebuild the index")
            for v in names:
                if not (folder / v).is_file():
                    raise IndexFileError(f"the embedding store {folder} is missing {shown(v)} (removal and rebuilds "
                                      "need it); rebuild the index with 'compress-edge index build'")


def _next_generation_dir(path: Path, meta: dict[str, Any]) -> Path:
    gen = int(meta.get("generation", 0)) + 1
    while (path / f"v{gen:04d}").exists():
        gen += 1
    return path / f"v{gen:04d}"


def write_generation(index: faiss.Index, path: Path, gen_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``index`` into ``gen_dir``, then the sidecar pointing at it; drop older generations."""
    gen_dir.mkdir(parents=True, exist_ok=True)
    file = gen_dir / INDEX_FILE
    cpu_index = index
    with atomic_path(file, suffix=".faiss") as tmp:
        faiss.write_index(cpu_index, str(tmp))
    info = meta["index"]
    info["file"] = str(file.relative_to(path))
    ivf = gen_dir / IVFDATA_FILE
    info["ivfdata"] = str(ivf.relative_to(path)) if ivf.exists() else None
    info["file_bytes"] = file.stat().st_size
    info["file_sha256"] = sha256_file(file)
    total = info["file_bytes"] + (ivf.stat().st_size if ivf.exists() else 0)
    info["bytes"] = total
    info["bytes_per_vector"] = total / max(1, index.ntotal)
    meta["generation"] = int(gen_dir.name[1:])
    meta["ntotal"] = int(index.ntotal)
    tuning = meta.get("tuning")
    if isinstance(tuning, dict) and not tuning.get("skipped"):
        tuning["bytes_per_vector"] = info["bytes_per_vector"]
        tuning["index_bytes"] = total
    atomic_write_json(path / SIDECAR, meta)
    for old in path.glob("v[0-9][0-9][0-9][0-9]"):
        if old.is_dir() and old != gen_dir:
            shutil.rmtree(old, ignore_errors=True)
    _drop_unused_shards(path, meta)


def _drop_unused_shards(path: Path, meta: dict[str, Any]) -> None:
    folder = path / EMBEDDINGS_DIR
    if not folder.is_dir():
        return
    keep = set()
    for name in meta.get("manifests") or []:
        keep.add(name)
        try:
            for s in json.loads((folder / name).read_text(encoding="utf-8"))["shards"]:
                keep.update((s["x"], s["ids"]))
        except (OSError, json.JSONDecodeError, KeyError):
            return  # leave everything when unsure
    for f in folder.iterdir():
        if f.is_file() and f.name not in keep and not f.name.startswith("."):
            with contextlib.suppress(OSError):
                f.unlink()


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------
@_one_writer("index build", 1, "out_dir")
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
    _expect(out, plan.est_bytes + n * d * 4)
    log.info("index %s for %d vectors of %d dims: %s", plan.key, n, d, plan.reason)
    rng = np.random.default_rng(seed)
    all_ids = store.ids()
    if files is not None and len(files) != n:
        raise IndexFileError(f"{len(files)} files for {n} embeddings")
    if labels is not None and len(labels) != n:
        raise IndexFileError(f"{len(labels)} labels for {n} embeddings")
    classes = _named_classes(classes, labels)
    if (files is not None or labels is not None) and not np.array_equal(np.sort(all_ids), np.arange(n)):
        raise IndexFileError("files and labels are given by position, so the embeddings need the ids 0..N-1")

    with faiss_threads(threads):
        # Held-out queries for tuning: kept out of the index until tuning is over.
        n_q = min(int(queries), n // 10) if tune and n >= 100 else 0
        held = np.sort(rng.choice(all_ids, size=n_q, replace=False)) if n_q else np.zeros(0, np.int64)
        xq = store.gather(held) if n_q else None

        fidx = make_faiss_index(plan.key, d)
        t0 = time.perf_counter()
        if not fidx.is_trained:
            n_train = max(1, min(n - n_q, plan.train_points or 65_536))
            xt = store.sample(n_train, rng, exclude=held)
            log.info("training on %d vectors", len(xt))
            gpu_fidx = to_gpu(fidx) if gpu else None
            try:
                (gpu_fidx or fidx).train(xt)
            except RuntimeError as exc:
                raise IndexFileError(f"training {plan.key} on {len(xt)} vectors failed ({_short(exc)}); an IVF "
                                  "index needs at least 39 training vectors per list: use fewer lists or "
                                  "--index auto") from None
            if gpu_fidx is not None:
                fidx = faiss.index_gpu_to_cpu(gpu_fidx)
            del xt
        train_seconds = time.perf_counter() - t0

        generation = generation or 1
        gen_dir = out / f"v{generation:04d}"
        if gen_dir.exists():
            shutil.rmtree(gen_dir)
        gen_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        if plan.on_disk:
            fidx = _add_on_disk(fidx, store, held, gen_dir)
        else:
            target = to_gpu(fidx) if gpu and index_kind(fidx) != "hnsw" else None
            for x, ids in store.iter_shards(exclude=held):
                (target or fidx).add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
            if target is not None:
                fidx = faiss.index_gpu_to_cpu(target)
        add_seconds = time.perf_counter() - t0

        tuning: dict[str, Any] = {"skipped": True}
        if n_q:
            t0 = time.perf_counter()
            device = "cuda" if gpu and _torch_cuda() else "cpu"
            k = min(TUNE_K, n - n_q)
            _, truth = exact_knn(xq, store, k, exclude=held, device=device)
            exact_seconds = time.perf_counter() - t0
            tuning = tune_index(fidx, xq, truth, target_recall=target_recall, k=k)
            tuning["exact_qps_all_threads"] = n_q / max(exact_seconds, 1e-9)
            tuning["exact_device"] = device
            tuning["held_out"] = True
            if plan.on_disk:
                ondisk_append(fidx, xq, held, gen_dir)
            else:
                fidx.add_with_ids(xq, held)
        params = tuning.get("search_params", {})

    build_seconds = time.perf_counter() - t_start
    meta: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": _now(),
        "updated": _now(),
        "spec": spec.to_dict(),
        "model": model,
        "model_file": model_file,
        "dim": d,
        "metric": "inner_product",
        "normalized": True,
        "index": {**plan.to_dict(), "choice": index, "memory_budget": budget, "search_params": params,
                  "gpu": bool(gpu)},
        "tuning": tuning,
        "build": {"seconds": build_seconds, "train_seconds": train_seconds, "add_seconds": add_seconds,
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


def _named_classes(classes: Sequence[str] | None, labels: Sequence[int] | np.ndarray | None) -> list[str]:
    """The class names, with a numeric name for each label beyond them (the sidecar names every label)."""
    names = [str(c) for c in classes or []]
    top = int(np.max(labels)) if labels is not None and len(labels) else -1
    return names + [str(i) for i in range(len(names), top + 1)]


def _torch_cuda() -> bool:
    from compress_edge.deps import available

    if not available("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _add_on_disk(trained: faiss.Index, store: EmbeddingStore, held: np.ndarray, gen_dir: Path) -> faiss.Index:
    """Fill an IVF index shard by shard into block files, then merge their lists into one on-disk
    ``index.ivfdata`` (FAISS's OnDiskInvertedLists), memory-mapped when searched. The trained, empty
    index is kept beside it (``trained.faiss``) for adding later."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss.write_index(trained, str(gen_dir / TRAINED_FILE))
    blocks_dir = gen_dir / ".blocks"
    blocks_dir.mkdir(parents=True, exist_ok=True)
    blocks = []
    try:
        for j, (x, ids) in enumerate(store.iter_shards(exclude=held)):
            block = faiss.read_index(str(gen_dir / TRAINED_FILE))
            block.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
            name = blocks_dir / f"block-{j:05d}.index"
            faiss.write_index(block, str(name))
            blocks.append(str(name))
            del block
        merged = faiss.read_index(str(gen_dir / TRAINED_FILE))
        with _quiet_native():
            merge_ondisk(merged, blocks, str(gen_dir / IVFDATA_FILE))
    finally:
        shutil.rmtree(blocks_dir, ignore_errors=True)
    return merged


def ondisk_append(index: faiss.Index, x: np.ndarray, ids: np.ndarray, gen_dir: Path) -> None:
    """Add vectors to an on-disk IVF index by merging its lists and a new block into a fresh
    ``index.ivfdata`` in ``gen_dir``.

    Adding straight into FAISS's OnDiskInvertedLists after a merge corrupts the lists (ids end up
    duplicated and overwritten), so additions always go through a merge.
    """
    ivf = faiss.extract_index_ivf(index)
    block = faiss.read_index(str(gen_dir / TRAINED_FILE))
    block.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    block_ivf = faiss.extract_index_ivf(block)
    tmp = gen_dir / f".{IVFDATA_FILE}.new"
    tmp.unlink(missing_ok=True)
    new = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
    lists = faiss.InvertedListsPtrVector()
    lists.push_back(ivf.invlists)
    lists.push_back(block_ivf.invlists)
    with _quiet_native():
        ntotal = new.merge_from_multiple(lists.data(), lists.size(), False)
    ivf.replace_invlists(new, True)  # the old lists (and their mapping) are freed here
    new.this.disown()
    index.ntotal = ivf.ntotal = ntotal
    final = gen_dir / IVFDATA_FILE
    os.replace(tmp, final)  # the mapping follows the file
    new.filename = str(final)


@_one_writer("index build", 1, "out_dir")
def build_index_from_array(x: np.ndarray, out_dir: str | os.PathLike, *, spec: ModelSpec | None = None,
                           shard_rows: int | None = None, **kwargs: Any) -> RetrievalIndex:
    """``build_index`` for embeddings already in memory (N, D): written as shards first (ids 0..N-1)."""
    from compress_edge.retrieval.shards import SHARD_ROWS

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise IndexFileError(f"embeddings must be (N, D), got shape {x.shape}")
    out = Path(out_dir)
    generation = _refuse_existing(out, kwargs.pop("overwrite", False))
    spec = spec or ModelSpec(arch="precomputed", embed_dim=int(x.shape[1]), source={"kind": "array"})
    manifest = write_embeddings(out / EMBEDDINGS_DIR, f"g{generation:04d}", l2_normalize(x),
                                shard_rows=shard_rows or SHARD_ROWS)
    store = EmbeddingStore.open(out / EMBEDDINGS_DIR, [manifest])
    return build_index(store, out, spec=spec, generation=generation, **kwargs)


def _refuse_existing(out: Path, overwrite: bool) -> int:
    """The generation a new build writes; IndexFileError when ``out`` holds an index and not overwrite."""
    side = out / SIDECAR
    if side.is_file():
        if not overwrite:
            raise IndexFileError(f"{out} already holds an index; pass --overwrite to replace it, or use "
                              "'compress-edge index add' to add images to it")
        try:
            return int(json.loads(side.read_text(encoding="utf-8")).get("generation", 0)) + 1
        except (json.JSONDecodeError, OSError):
            return 1
    return 1


# --------------------------------------------------------------------------------------------------
# From images: the library calls behind ``compress-edge index build / add / remove``
# --------------------------------------------------------------------------------------------------
def _open_embedder(model: Any, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                   image_size: int | None = None):
    """An Embedder as given, or opened from a model reference (folder, .onnx, .engine, arch name)."""
    if hasattr(model, "embed") and hasattr(model, "spec"):
        return model, False
    from compress_edge.export.runtimes import open_embedder

    return open_embedder(str(model), backend, device=device, threads=threads, image_size=image_size), True


def _model_ref(model: Any) -> str | None:
    ref = str(getattr(model, "path", model) or "")
    if not ref:
        return None
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def build_from_images(
    model: Any,
    data: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str = "cpu",
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    shard_rows: int | None = None,
    data_root: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    threads: int | None = None,
    **build_kwargs: Any,
) -> RetrievalIndex | None:
    """Embed the images of ``data`` with ``model`` (an Embedder or a model reference) and build an
    index in ``out_dir`` (see :func:`build_index` for ``build_kwargs``).

    Under ``torchrun`` every rank embeds its part and writes its own shards; rank 0 waits for the
    others, builds the index and returns it, the other ranks return None.
    """
    from compress_edge.retrieval.shards import rank_and_world

    out = Path(out_dir)
    r, w = rank_and_world(rank, world_size)
    stack = contextlib.ExitStack()
    if r == 0:  # rank 0 writes the index; the other ranks only their own shards
        stack.enter_context(writing(out, "index build"))
    with stack:
        return _build_from_images(model, data, out, backend=backend, device=device, image_size=image_size,
                                  batch_size=batch_size, workers=workers, shard_rows=shard_rows, data_root=data_root,
                                  progress=progress, overwrite=overwrite, r=r, w=w, threads=threads, **build_kwargs)


def _build_from_images(model: Any, data: Sequence[str], out: Path, *, backend: str, device: str,
                       image_size: int | None, batch_size: int, workers: int | None, shard_rows: int | None,
                       data_root: str | None, progress: bool, overwrite: bool, r: int, w: int,
                       threads: int | None, **build_kwargs: Any) -> RetrievalIndex | None:
    from compress_edge.retrieval.shards import (
        SHARD_ROWS,
        extract_embeddings,
        open_gallery,
        wait_for_manifests,
    )

    generation = _refuse_existing(out, overwrite)
    if w > 1 and device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per rank
    embedder, owned = _open_embedder(model, backend, device, threads, image_size)
    try:
        gallery = open_gallery(list(data), data_root=data_root, progress=progress and r == 0)
        _expect(out, 2 * len(gallery) * int(embedder.spec.embed_dim) * 4)
        token = "|".join([os.environ.get("TORCHELASTIC_RUN_ID", "local"), str(generation), str(len(gallery)),
                          str(embedder.spec.weights_sha256), ",".join(map(str, data))])
        t0 = time.perf_counter()
        prefix = f"g{generation:04d}"
        extract_embeddings(embedder, gallery, out / EMBEDDINGS_DIR, prefix=prefix, batch_size=batch_size,
                           workers=workers, shard_rows=shard_rows or SHARD_ROWS, progress=progress and r == 0,
                           rank=r, world_size=w, extra={"token": token})
        embed_seconds = time.perf_counter() - t0
        if r != 0:
            log.info("rank %d: embeddings written; rank 0 builds the index", r)
            return None
        manifests = [f"{prefix}-r{i}.manifest.json" for i in range(w)]
        wait_for_manifests(out / EMBEDDINGS_DIR, manifests, token)
        store = EmbeddingStore.open(out / EMBEDDINGS_DIR, manifests)
        record = {"embed_seconds": embed_seconds, "images": len(gallery), "data": list(map(str, data)),
                  "sources": gallery.sources, "backend": getattr(embedder, "name", None), "world_size": w,
                  "batch_size": batch_size}
        return build_index(store, out, spec=embedder.spec, files=gallery.files, labels=gallery.labels,
                           classes=gallery.classes, root=gallery.root, model=_model_ref(model),
                           model_file=model_record(embedder), generation=generation, build_record=record,
                           threads=threads, **build_kwargs)
    finally:
        if owned:
            embedder.close()


@_one_writer("index add", 0, "index_dir", existing=True)
def add_images(
    index_dir: str | os.PathLike,
    data: Sequence[str],
    *,
    model: Any = None,
    backend: str = "auto",
    device: str = "cpu",
    batch_size: int = 64,
    workers: int | None = None,
    data_root: str | None = None,
    progress: bool = False,
    trust_model: bool = False,
) -> dict[str, Any]:
    """Embed new images (folders, files, datasets) and add them to the index in ``index_dir``.

    model: the embedder (default: the model the index was built with), checked against the index
    (see :func:`~compress_edge.retrieval.safety.check_model`; ``trust_model`` relaxes the hash checks).
    Images already in the index are skipped. Returns {"added", "skipped", "ntotal"}.
    """
    from compress_edge.retrieval.shards import SHARD_ROWS, extract_embeddings, open_gallery

    idx = RetrievalIndex.open(index_dir, writable=True)
    ref = model if model is not None else idx.meta.get("model")
    if ref is None:
        raise IndexFileError(f"{index_dir} records no model; pass the model the index was built with (--model)")
    embedder, owned = _open_embedder(ref, backend, device)
    try:
        check_model(idx.spec, embedder, idx.meta, what=f"the index {shown(index_dir)}", trust=trust_model)
        gallery = open_gallery(list(data), data_root=data_root, classes=idx.classes, root=idx.root,
                               progress=progress)
        known = set(idx.files or [])
        keep = [i for i, f in enumerate(gallery.files) if f not in known]
        skipped = len(gallery) - len(keep)
        if skipped:
            log.info("%d of %d images are already in the index: skipped", skipped, len(gallery))
        if not keep:
            return {"added": 0, "skipped": skipped, "ntotal": idx.ntotal}
        sub = _subset(gallery, keep)
        _expect(idx.path, 2 * len(sub) * idx.dim * 4 + int(idx.meta["index"].get("bytes") or 0))
        start = int(idx.meta.get("next_id", 0))
        ids = np.arange(start, start + len(sub), dtype=np.int64)
        gen = int(idx.meta.get("generation", 0)) + 1
        manifest = extract_embeddings(embedder, sub, idx.path / EMBEDDINGS_DIR, prefix=f"g{gen:04d}-add{start}",
                                      ids=ids, batch_size=batch_size, workers=workers, shard_rows=SHARD_ROWS,
                                      progress=progress, rank=0, world_size=1)
        store = EmbeddingStore.open(idx.path / EMBEDDINGS_DIR, [manifest])
        x, got = store.to_array()
        idx.classes = list(gallery.classes)
        outside = [f for f in sub.files if os.path.isabs(f)]
        if outside:  # images outside the gallery root: their folder joins the folders the index may show
            roots = list(idx.meta.get("roots") or [])
            common = os.path.commonpath([os.path.dirname(f) for f in outside])
            if not any(is_inside(common, r) for r in roots):
                idx.meta["roots"] = [*roots, common]
        idx.add(x, files=sub.files if idx.files is not None or not len(idx.ids) else None,
                labels=sub.labels, ids=got, manifest=manifest)
        idx.commit()
        return {"added": int(len(got)), "skipped": skipped, "ntotal": idx.ntotal}
    finally:
        if owned:
            embedder.close()


def _subset(gallery: Any, keep: list[int]) -> Any:
    from compress_edge.retrieval.shards import Gallery

    return Gallery(files=[gallery.files[i] for i in keep],
                   labels=None if gallery.labels is None else [gallery.labels[i] for i in keep],
                   classes=gallery.classes, root=gallery.root, load=lambda j: gallery.load(keep[j]),
                   sources=gallery.sources)


@_one_writer("index remove", 0, "index_dir", existing=True)
def remove_files(index_dir: str | os.PathLike, files: Sequence[str | os.PathLike], *,
                 missing_ok: bool = False) -> dict[str, Any]:
    """Remove images (by path) from the index in ``index_dir``. Returns {"removed", "missing", "ntotal"}.

    IndexFileError for paths not in the index (unless ``missing_ok``) and for index types that cannot
    remove (HNSW)."""
    idx = RetrievalIndex.open(index_dir, writable=True)
    _expect(idx.path, int(idx.meta["index"].get("bytes") or 0))
    ok, why = can_remove(idx.index)
    if not ok:
        raise IndexFileError(f"cannot remove from {index_dir}: {why}; rebuild the index without those images "
                          "('compress-edge index build'), or build an IVF or Flat index (e.g. --index "
                          "IVF1024,SQ8) when images must be removable")
    ids, missing = idx.ids_of_files(files)
    if missing and not missing_ok:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise IndexFileError(f"not in the index: {shown(', '.join(missing[:3]))}{more}; 'compress-edge index info "
                          f"{index_dir}' shows where its images are")
    removed = idx.remove(ids) if len(ids) else 0
    if removed:
        idx.commit()
    return {"removed": int(removed), "missing": missing, "ntotal": idx.ntotal}
