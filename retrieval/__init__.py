"""Retrieval on the device: FAISS indexes over embeddings, search, and kNN classification.

Modules: ``index`` (choose, build, tune, open, add, remove), ``shards`` (embeddings on disk and the
extraction loop), ``search`` (:class:`~compress_edge.retrieval.search.Searcher`: images in, neighbours
out), ``knn`` (weighted kNN classification), ``grid`` (a picture of queries and their neighbours).

The query path (``open_index``, ``Searcher`` with an ONNX model, ``knn_classify``) imports and runs
without torch: numpy, PIL, faiss and onnxruntime only. Nothing heavy is imported here.
"""

from __future__ import annotations
