"""FAISS indexes over L2-normalised embeddings: the public names of the modules that choose, build,
tune, open, add to and remove from an index folder, in one place for callers.

Each job has its module (see :mod:`compress_edge.retrieval`):

- :mod:`~compress_edge.retrieval.plan`: which index (``auto``), its memory, sizes like ``4G``
- :mod:`~compress_edge.retrieval.faiss_index`: FAISS index objects (factory key, kind, search
  parameter, GPU copy, threads)
- :mod:`~compress_edge.retrieval.exact`: exact search over the stored embeddings
- :mod:`~compress_edge.retrieval.tune`: recall, queries per second, the search-parameter sweep
- :mod:`~compress_edge.retrieval.sidecar`: the folder on disk (sidecar, generations)
- :mod:`~compress_edge.retrieval.lock`: one writer per folder
- :mod:`~compress_edge.retrieval.ondisk`: inverted lists on disk
- :mod:`~compress_edge.retrieval.folder`: :class:`RetrievalIndex`, an index folder opened
- :mod:`~compress_edge.retrieval.build`: building from stored embeddings or an array
- :mod:`~compress_edge.retrieval.images`: building, adding and removing from images

Torch-free: faiss and numpy. torch is imported only for exact search on a GPU.
"""

from __future__ import annotations

from compress_edge.retrieval.build import build_index, build_index_from_array
from compress_edge.retrieval.exact import exact_knn
from compress_edge.retrieval.faiss_index import (
    GPU_MAX_K,
    KEY_EXAMPLES,
    can_remove,
    faiss_threads,
    gpu_count,
    index_kind,
    make_faiss_index,
    search_parameter,
    set_search_params,
    to_gpu,
)
from compress_edge.retrieval.folder import MMAP_MIN_BYTES, VERIFY_MAX_BYTES, RetrievalIndex, open_index
from compress_edge.retrieval.images import add_images, build_from_images, remove_files
from compress_edge.retrieval.lock import writing
from compress_edge.retrieval.ondisk import ondisk_append
from compress_edge.retrieval.plan import (
    EXACT_MAX_VECTORS,
    HNSW_M,
    HNSW_MAX_VECTORS,
    POINTS_PER_CENTROID,
    IndexPlan,
    choose_index,
    default_memory_budget,
    estimate_bytes,
    format_bytes,
    ivf_nlist,
    parse_bytes,
    plan_index,
)
from compress_edge.retrieval.sidecar import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_VERSION,
    IVFDATA_FILE,
    SIDECAR,
    TRAINED_FILE,
    check_sidecar,
    read_sidecar,
    write_generation,
)
from compress_edge.retrieval.tune import SWEEPS, TUNE_K, measure_qps, recall_at, tune_index

__all__ = [
    "EXACT_MAX_VECTORS", "GPU_MAX_K", "HNSW_MAX_VECTORS", "HNSW_M", "INDEX_FILE", "INDEX_FORMAT", "INDEX_VERSION",
    "IVFDATA_FILE", "KEY_EXAMPLES", "MMAP_MIN_BYTES", "POINTS_PER_CENTROID", "SIDECAR", "SWEEPS", "TRAINED_FILE",
    "TUNE_K", "VERIFY_MAX_BYTES", "IndexPlan", "RetrievalIndex", "add_images", "build_from_images", "build_index",
    "build_index_from_array", "can_remove", "check_sidecar", "choose_index", "default_memory_budget",
    "estimate_bytes", "exact_knn", "faiss_threads", "format_bytes", "gpu_count", "index_kind", "ivf_nlist",
    "make_faiss_index", "measure_qps", "ondisk_append", "open_index", "parse_bytes", "plan_index", "read_sidecar",
    "recall_at", "remove_files", "search_parameter", "set_search_params", "to_gpu", "tune_index", "write_generation",
    "writing",
]
