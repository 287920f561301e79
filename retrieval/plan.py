"""Choosing an index: the FAISS key for N vectors of D dims within a memory budget, and its memory.

``index="auto"`` follows FAISS's guidelines ("Guidelines to choose an index" in the FAISS wiki): exact
``IDMap2,Flat`` for small N; ``HNSW32`` when its memory fits the budget (up to 250k vectors: beyond,
its build takes too long on a small machine); else ``IVF{nlist},Flat`` when the full vectors fit,
``IVF{nlist},SQ8`` when 1 byte a dimension does, else ``OPQ{M}_{D},IVF{nlist},PQ{M}``, else an IVF
index with its inverted lists on disk. nlist is 4 x sqrt(N) (the guideline's range is 4 to 16 x
sqrt(N)), trained on ``points_per_centroid`` (30 to 256) points per centroid.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from compress_edge.errors import CompressEdgeError, IndexFileError

#: Up to this many vectors, exact search is fast enough that an approximate index is not worth it.
EXACT_MAX_VECTORS = 10_000
#: HNSW links per node; HNSW is chosen up to this many vectors. Its build is the slowest of all
#: (1M 128-d vectors take about 6 minutes on 2 cores); above, IVF with the same full vectors.
HNSW_M = 32
HNSW_MAX_VECTORS = 250_000
#: Default points per centroid when training an IVF quantizer (FAISS asks for 30 to 256).
POINTS_PER_CENTROID = 64
PQ_TRAIN_POINTS = 39 * 256


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
    nlist = nlist_of(key) or 0
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


def nlist_of(key: str) -> int | None:
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
        nlist = nlist_of(key)
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
