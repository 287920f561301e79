"""Retrieval on the device: FAISS indexes over embeddings, search, and kNN classification.

Modules, one job each: ``plan`` (which index, its memory), ``faiss_index`` (FAISS index objects),
``exact`` (exact search over stored embeddings), ``tune`` (recall and the search-parameter sweep),
``sidecar`` (the index folder on disk), ``lock`` (one writer per folder), ``ondisk`` (inverted lists
on disk), ``folder`` (:class:`~compress_edge.retrieval.folder.RetrievalIndex`, a folder opened),
``build`` (an index from stored embeddings), ``images`` (build, add, remove from images); ``index``
gathers their public names. ``shards`` (embeddings on disk and the extraction loop), ``search``
(:class:`~compress_edge.retrieval.search.Searcher`: images in, neighbours out), ``knn`` (weighted kNN
classification), ``serve`` (the HTTP server), ``safety`` (what stored paths and models may be
trusted), ``grid`` (a picture of queries and their neighbours).

The query path (``open_index``, ``Searcher`` with an ONNX model, ``knn_classify``) imports and runs
without torch: numpy, PIL, faiss and onnxruntime only. Nothing heavy is imported here.
"""

from __future__ import annotations
