"""An index folder opened: :class:`RetrievalIndex` (search, exact search, items, add, remove, commit).

Opening checks the sidecar (:mod:`compress_edge.retrieval.sidecar`), the FAISS file's size and
sha256, and that the FAISS index and the sidecar belong together. Stored paths are shown and opened
only when they resolve inside the gallery (:meth:`RetrievalIndex.resolve`).

Every vector is L2-normalised and searched with the inner product (cosine similarity).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from compress_edge.retrieval.exact import exact_knn
from compress_edge.retrieval.faiss_index import (
    GPU_MAX_K,
    can_remove,
    faiss_message,
    index_kind,
    quiet_native,
    set_search_params,
    to_gpu,
)
from compress_edge.retrieval.lock import writing
from compress_edge.retrieval.ondisk import ondisk_append
from compress_edge.retrieval.plan import nlist_of
from compress_edge.retrieval.safety import dataset_id_ok, is_inside, shown
from compress_edge.retrieval.shards import EMBEDDINGS_DIR, EmbeddingStore, l2_normalize
from compress_edge.retrieval.sidecar import (
    INDEX_FILE,
    SIDECAR,
    check_sidecar,
    named_classes,
    next_generation_dir,
    now_utc,
    read_sidecar,
    write_generation,
)

from compress_edge.errors import CompressEdgeError, IndexFileError
from compress_edge.models.spec import ModelSpec
from compress_edge.storage import sha256_file

log = logging.getLogger(__name__)


#: Indexes larger than this are opened memory-mapped by default.
MMAP_MIN_BYTES = 1 << 30
#: Index files up to this size have their sha256 checked when opened.
VERIFY_MAX_BYTES = 256 << 20


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
        for attempt in range(5):
            meta = read_sidecar(path)
            try:
                index, gen_dir = _read_generation(path, meta, mmap=mmap, verify=verify, writable=writable)
                break
            except (IndexFileError, OSError):
                # A writer may replace the generation between reading the sidecar and its files (it drops
                # the old one once the new sidecar is in place): then read the new one.
                if attempt == 4 or read_sidecar(path).get("generation") == meta.get("generation"):
                    raise
        obj = cls(path, meta, index, writable=writable, generation_dir=gen_dir)
        set_search_params(index, meta["index"].get("search_params") or {})
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
        from compress_edge.data.grammar import is_dataset_id

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
            raise IndexFileError(f"this index ({self.key}) cannot add vectors ({faiss_message(exc)}); rebuild it instead") from None
        self.ids = np.concatenate([self.ids, ids])
        if files is not None or self.files is not None:
            self.files = (self.files or []) + [str(f) for f in (files or [""] * n)]
        new_labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None or labels is not None:
            base = self.labels if self.labels is not None else np.full(len(self.ids) - n, -1, np.int64)
            self.labels = np.concatenate([base, new_labels])
            self.classes = named_classes(self.classes, self.labels)
        self.meta["next_id"] = int(ids.max()) + 1 if n else self.meta.get("next_id", 0)
        if manifest:
            self.meta.setdefault("manifests", []).append(manifest)
        self._file_to_id = None
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
            raise IndexFileError(f"this index ({self.key}) cannot remove vectors ({faiss_message(exc)}); rebuild it") from None
        keep = ~np.isin(self.ids, ids)
        self.ids = self.ids[keep]
        if self.files is not None:
            self.files = [f for f, k in zip(self.files, keep.tolist(), strict=True) if k]
        if self.labels is not None:
            self.labels = self.labels[keep]
        self._file_to_id = None
        return removed

    def commit(self, extra: dict[str, Any] | None = None) -> None:
        """Write the changed index as a new generation, then the sidecar (each atomically)."""
        self._require_writable()
        self.meta["ids"] = self.ids.tolist()
        self.meta["files"] = self.files
        self.meta["labels"] = None if self.labels is None else self.labels.tolist()
        self.meta["classes"] = self.classes
        self.meta["ntotal"] = self.ntotal
        self.meta["updated"] = now_utc()
        self.meta.update(extra or {})
        gen_dir = self._gen_dir if self.meta["index"].get("ivfdata") else next_generation_dir(self.path, self.meta)
        with writing(self.path, "index commit"):
            write_generation(self.index, self.path, gen_dir, self.meta)
        self._gen_dir = gen_dir

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


def _read_generation(path: Path, meta: dict[str, Any], *, mmap: bool | None, verify: bool | None,
                     writable: bool) -> tuple[faiss.Index, Path]:
    """The FAISS index of the generation ``meta`` names, checked against it, and the generation folder
    changes go to; IndexFileError naming what is wrong."""
    check_sidecar(path, meta)
    info = meta["index"]
    file = path / info["file"]
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
            gen_dir = next_generation_dir(path, meta)
            shutil.copytree(file.parent, gen_dir)
            file = gen_dir / INDEX_FILE
    else:
        big = size > MMAP_MIN_BYTES
        if (mmap or (mmap is None and big)) and not writable:
            flags |= faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            if nlist_of(info.get("key", "")):
                flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        with quiet_native() if info.get("ivfdata") else contextlib.nullcontext():
            index = faiss.read_index(str(file), flags)
    except RuntimeError as exc:
        raise IndexFileError(f"{file} is damaged or not a FAISS index ({faiss_message(exc)}); rebuild it with "
                             "'compress-edge index build'") from None
    if index.ntotal != len(meta.get("ids") or []) or index.d != int(meta["dim"]):
        raise IndexFileError(f"{file} holds {index.ntotal} vectors of {index.d} dims but {SIDECAR} lists "
                             f"{len(meta.get('ids') or [])} of {meta['dim']}: they do not belong together; "
                             "rebuild the index")
    return index, gen_dir


def open_index(path: str | os.PathLike, **kwargs: Any) -> RetrievalIndex:
    """Open an index folder (see :meth:`RetrievalIndex.open` for the options)."""
    return RetrievalIndex.open(path, **kwargs)
