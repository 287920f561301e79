"""FAISS index objects: made from a factory key, their kind and search parameter, a GPU copy, the
OpenMP threads they use, and FAISS's messages and native output kept short."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import faiss

from compress_edge.errors import IndexFileError

log = logging.getLogger(__name__)


#: The largest k (and nprobe) FAISS GPU indexes take; larger searches run on the CPU.
GPU_MAX_K = 2048
OPQ_ITERATIONS = 20
OPQ_TRAIN_POINTS = 32_768
KEY_EXAMPLES = "IDMap2,Flat; HNSW32,Flat; IVF1024,SQ8; OPQ16_64,IVF1024,PQ16; IVF4096,Flat"


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


def faiss_message(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    # FAISS messages start with "Error in <C++ signature> at <file>:<line>: "; keep the reason.
    m = re.search(r"at \S+:\d+: (.*)$", text)
    if m:
        text = m.group(1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
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


def make_faiss_index(key: str, d: int) -> faiss.Index:
    """``faiss.index_factory(d, key, inner product)``, wrapped in an id map when the index cannot take
    ids itself (IVF indexes can; Flat and HNSW cannot)."""
    try:
        index = faiss.index_factory(int(d), key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexFileError(f"FAISS cannot build the index {key!r} for {d}-d vectors ({faiss_message(exc)}); "
                             f"examples of index_factory strings: {KEY_EXAMPLES}") from None
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                # FAISS's defaults (50 iterations on up to 65k points) take many minutes on a small
                # machine; 20 iterations on 32k points give nearly the same rotation.
                vt.niter = min(vt.niter, OPQ_ITERATIONS)
                vt.max_train_points = min(vt.max_train_points, OPQ_TRAIN_POINTS)
    if "IDMap" not in key and ivf_of(index) is None:
        index = faiss.IndexIDMap(index) if isinstance(_core(index), faiss.IndexHNSW) else faiss.IndexIDMap2(index)
    return index


def _core(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def search_parameter(index: faiss.Index) -> str | None:
    """The parameter that trades speed for recall: "efSearch" (HNSW), "nprobe" (IVF), None (exact)."""
    core = _core(index)
    if isinstance(core, faiss.IndexHNSW):
        return "efSearch"
    if ivf_of(index) is not None:
        return "nprobe"
    return None


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    ps = faiss.ParameterSpace()
    for name, value in (params or {}).items():
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError as exc:
            raise IndexFileError(f"this index ({type(_core(index)).__name__}) has no search parameter {name!r} "
                                 f"({faiss_message(exc)}); it takes: {search_parameter(index) or 'none'}") from None


def index_kind(index: faiss.Index) -> str:
    core = _core(index)
    if isinstance(core, faiss.IndexHNSW):
        return "hnsw"
    if ivf_of(index) is not None:
        return "ivf"
    if isinstance(core, faiss.IndexFlat):
        return "flat"
    return type(core).__name__


def can_remove(index: faiss.Index) -> tuple[bool, str]:
    kind = index_kind(index)
    if kind == "hnsw":
        return False, "an HNSW graph cannot remove vectors (FAISS does not support it)"
    return True, ""


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
        log.warning("FAISS has no GPU version of %s (%s); using the CPU", type(_core(index)).__name__, faiss_message(exc))
        return None
