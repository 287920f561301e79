"""IVF indexes with their inverted lists on disk (FAISS's OnDiskInvertedLists, ``index.ivfdata``):
filling them shard by shard, and adding to them by a merge."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import faiss
import numpy as np
from compress_edge.retrieval.faiss_index import quiet_native
from compress_edge.retrieval.shards import EmbeddingStore
from compress_edge.retrieval.sidecar import IVFDATA_FILE, TRAINED_FILE


def add_on_disk(trained: faiss.Index, store: EmbeddingStore, held: np.ndarray, gen_dir: Path) -> faiss.Index:
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
        with quiet_native():
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
    with quiet_native():
        ntotal = new.merge_from_multiple(lists.data(), lists.size(), False)
    ivf.replace_invlists(new, True)  # the old lists (and their mapping) are freed here
    new.this.disown()
    index.ntotal = ivf.ntotal = ntotal
    final = gen_dir / IVFDATA_FILE
    os.replace(tmp, final)  # the mapping follows the file
    new.filename = str(final)
