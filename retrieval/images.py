"""From images: the library calls behind ``compress-edge index build / add / remove``.

Images (folders, files, datasets) are embedded by a model (an Embedder, or a model reference opened
here) into the index folder's embedding store, then indexed (:mod:`compress_edge.retrieval.build`),
added or removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.retrieval.build import build_index
from compress_edge.retrieval.faiss_index import can_remove
from compress_edge.retrieval.folder import RetrievalIndex
from compress_edge.retrieval.lock import expect_bytes, one_writer, writing
from compress_edge.retrieval.safety import check_model, is_inside, model_record, shown
from compress_edge.retrieval.shards import EMBEDDINGS_DIR, EmbeddingStore
from compress_edge.retrieval.sidecar import refuse_existing

from compress_edge.data.grammar import absolute_if_exists
from compress_edge.errors import IndexFileError

log = logging.getLogger(__name__)


def _open_embedder(model: Any, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                   image_size: int | None = None):
    """(embedder, owned): an Embedder as given (not ours to close), or a MODEL argument (folder, .onnx,
    .engine, .xml, arch name) opened by the one resolver, ``open_embedder`` (ours to close)."""
    if hasattr(model, "embed") and hasattr(model, "spec"):
        return model, False
    from compress_edge.export.runtimes import open_embedder

    return open_embedder(str(model), backend, device=device, threads=threads, image_size=image_size), True


def _model_ref(model: Any) -> str | None:
    ref = str(getattr(model, "path", model) or "")
    if not ref:
        return None
    return absolute_if_exists(ref)


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

    generation = refuse_existing(out, overwrite)
    if w > 1 and device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per rank
    embedder, owned = _open_embedder(model, backend, device, threads, image_size)
    try:
        gallery = open_gallery(list(data), data_root=data_root, progress=progress and r == 0)
        expect_bytes(out, 2 * len(gallery) * int(embedder.spec.embed_dim) * 4)
        model_file = model_record(embedder)  # the model file's sha256, read once: the resume key and the sidecar
        token = "|".join([os.environ.get("TORCHELASTIC_RUN_ID", "local"), str(generation), str(len(gallery)),
                          str(embedder.spec.weights_sha256), ",".join(map(str, data))])
        t0 = time.perf_counter()
        prefix = f"g{generation:04d}"
        extract_embeddings(embedder, gallery, out / EMBEDDINGS_DIR, prefix=prefix, batch_size=batch_size,
                           workers=workers, shard_rows=shard_rows or SHARD_ROWS, progress=progress and r == 0,
                           rank=r, world_size=w, extra={"token": token},
                           resume_key=_embedding_key(embedder.spec, model_file, gallery))
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
                           model_file=model_file, generation=generation, build_record=record,
                           threads=threads, **build_kwargs)
    finally:
        if owned:
            embedder.close()


def _embedding_key(spec: Any, model_file: dict[str, Any] | None, gallery: Any) -> str:
    """What makes a build's embeddings the same as an interrupted one's: the model (its weights and
    preprocessing, and the file run) and the images, in order (each file's size and time of change too)."""
    import hashlib

    h = hashlib.sha256(json.dumps([spec.to_dict(), model_file], sort_keys=True,
                                  default=str).encode())
    for f in gallery.files:
        try:
            st = os.stat(os.path.join(gallery.root or "", f))
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:  # a dataset id (fashion-mnist:train/00042), not a file
            stamp = ""
        h.update(f"{f}\0{stamp}\0".encode())
    return h.hexdigest()


@one_writer("index add", 0, "index_dir", existing=True)
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
    shard_rows: int | None = None,
) -> dict[str, Any]:
    """Embed new images (folders, files, datasets) and add them to the index in ``index_dir``.

    model: the embedder (default: the model the index was built with), checked against the index
    (see :func:`~compress_edge.retrieval.safety.check_model`; ``trust_model`` relaxes the hash checks).
    Images already in the index are skipped; an add stopped while embedding keeps its finished shards
    for the same command run again (as ``index build``). Returns {"added", "skipped", "ntotal"}.
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
        expect_bytes(idx.path, 2 * len(sub) * idx.dim * 4 + int(idx.meta["index"].get("bytes") or 0))
        start = int(idx.meta.get("next_id", 0))
        ids = np.arange(start, start + len(sub), dtype=np.int64)
        gen = int(idx.meta.get("generation", 0)) + 1
        manifest = extract_embeddings(embedder, sub, idx.path / EMBEDDINGS_DIR, prefix=f"g{gen:04d}-add{start}",
                                      ids=ids, batch_size=batch_size, workers=workers,
                                      shard_rows=shard_rows or SHARD_ROWS, progress=progress, rank=0, world_size=1,
                                      resume_key=_embedding_key(embedder.spec, model_record(embedder), sub))
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


@one_writer("index remove", 0, "index_dir", existing=True)
def remove_files(index_dir: str | os.PathLike, files: Sequence[str | os.PathLike], *,
                 missing_ok: bool = False) -> dict[str, Any]:
    """Remove images (by path) from the index in ``index_dir``. Returns {"removed", "missing", "ntotal"}.

    IndexFileError for paths not in the index (unless ``missing_ok``) and for index types that cannot
    remove (HNSW)."""
    idx = RetrievalIndex.open(index_dir, writable=True)
    expect_bytes(idx.path, int(idx.meta["index"].get("bytes") or 0))
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
