"""The library behind ``compress-edge eval``: a MODEL argument opened by the one resolver
(:func:`compress_edge.export.runtimes.open_embedder`), DATA arguments embedded (features cached), and
the protocols of the protocol modules (:mod:`compress_edge.eval.knn`, ``linear``, ``clustering``, ``agreement``) run on them. The command line parses and prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress_edge.errors import CompressEdgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureOptions:
    """How DATA arguments are read and embedded (the options every ``eval`` command shares)."""

    data_root: str | None = None
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    cache_dir: Path | None = None
    no_cache: bool = False
    progress: bool = True


def open_model(ref: str, *, device: str, image_size: int | None, weights: str | None = None,
               weights_option: str = "--weights") -> tuple[Any, Any, str]:
    """(embedder, spec, backend "name precision") for a MODEL argument (an architecture name with
    ``weights``: its checkpoint, given with ``weights_option``), opened by ``open_embedder``."""
    from compress_edge.export import runtimes

    emb = runtimes.open_embedder(ref, device=device, image_size=image_size, weights=weights,
                                 weights_option=weights_option)
    if emb.spec.source.get("kind") == "random-init":
        log.warning("%s is an architecture name: its weights are random (a baseline, not a trained model)", ref)
    return emb, emb.spec, f"{emb.name} {emb.precision}"


def describe(ref: str, spec: Any, backend: str) -> dict[str, Any]:
    """What a report says about the model it measured."""
    return {"model": ref, "arch": spec.arch, "backend": backend, "image_size": spec.image_size,
            "embed_dim": spec.embed_dim}


def features(model: Any, spec: Any, data: str, opts: FeatureOptions):
    """(features (N, D), labels (N,), dataset) of the DATA argument ``data`` embedded by ``model``."""
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.features import extract_features

    dataset = open_dataset(data, data_root=opts.data_root, progress=opts.progress)  # no "checking images" bar
    x, y = extract_features(model, dataset, spec=spec, batch_size=opts.batch_size, device=opts.device,
                            workers=opts.workers, cache_dir=opts.cache_dir, use_cache=not opts.no_cache,
                            progress=opts.progress)
    return x, y, dataset


@dataclass
class KnnRun:
    """What ``eval knn`` measured: the protocol's result, the queries' spread, the gallery searched (DATA
    or the index folder) and, when asked for, the baselines."""

    result: Any
    spread: Any
    gallery: str
    baselines: dict[str, Any] | None = None
    #: Test images that are also gallery images (exact search over --train only).
    test_in_gallery: int = 0


def knn(model: Any, spec: Any, *, name: str, test: str, train: str | None, index: Path | None, ks: list[int],
        temperature: float, baselines: bool, opts: FeatureOptions) -> KnnRun:
    """kNN of the ``test`` queries against the ``train`` gallery (exact search) or the ``index`` folder;
    a warning when the query embeddings have collapsed (``name`` is the model's, in that warning)."""
    from compress_edge.eval.knn import knn_eval
    from compress_edge.eval.quality import embedding_spread, spread_warnings

    xte, yte, test_ds = features(model, spec, test, opts)
    shared = 0
    if index is not None:
        result = knn_with_index(index, spec, xte, yte, test_ds.classes, ks, temperature)
        gallery = str(index)
    else:
        xtr, ytr, train_ds = features(model, spec, train, opts)
        result = knn_eval(xtr, ytr, xte, yte, ks=ks, temperature=temperature, device=opts.device)
        gallery = train
        shared = warn_shared_images(train_ds, test_ds)
    spread = embedding_spread(xte)
    for warning in spread_warnings(spread, name):
        log.warning("%s", warning)
    run = KnnRun(result, spread, gallery, test_in_gallery=shared)
    if baselines:
        run.baselines = knn_baselines(train, test, spec, ks=ks, temperature=temperature, opts=opts)
    return run


def warn_shared_images(gallery, queries) -> int:
    """Warn when query images are also gallery images (each then finds itself: 1-NN reads 100 % on
    them); returns how many are."""
    shared = len(set(map(str, queries.files)) & set(map(str, gallery.files)))
    if shared:
        log.warning("%d of the %d test images are also in the gallery (--train): each finds itself, so the "
                    "scores are inflated; pass test images kept apart from the gallery", shared, len(queries))
    return shared


def knn_baselines(train: str, test: str, spec, *, ks: list[int], temperature: float, opts: FeatureOptions) -> dict:
    """kNN of raw pixels and of the same network with random weights on the same gallery and queries."""
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.features import extract_features
    from compress_edge.eval.knn import knn_eval
    from compress_edge.eval.quality import random_weights_model, raw_pixel_features
    from compress_edge.models.spec import is_grey_input

    gallery = open_dataset(train, data_root=opts.data_root, progress=opts.progress)
    queries = open_dataset(test, data_root=opts.data_root, progress=opts.progress)
    twin = random_weights_model(spec, gallery)
    kw = dict(spec=spec, batch_size=opts.batch_size, device=opts.device, workers=opts.workers,
              use_cache=False, progress=opts.progress)
    pairs = {"raw pixels": (raw_pixel_features(gallery, spec.image_size), raw_pixel_features(queries, spec.image_size)),
             "random weights": (extract_features(twin, gallery, **kw)[0], extract_features(twin, queries, **kw)[0])}
    if is_grey_input(spec):  # what the model sees: a model blind to colour is compared with grey pixels too
        pairs["raw pixels, grey"] = (raw_pixel_features(gallery, spec.image_size, grey=True),
                                     raw_pixel_features(queries, spec.image_size, grey=True))
    out = {}
    for name, (g, q) in pairs.items():
        r = knn_eval(g, gallery.labels, q, queries.labels, ks=ks, temperature=temperature, device=opts.device)
        out[name] = {"nn_top1": r.nn_top1, "knn_top1": r.knn[ks[0]]["top1"], "k": ks[0]}
    return out


def knn_with_index(index_dir: Path, spec, xte, yte, test_classes: list[str], ks: list[int], temperature: float):
    """kNN of the queries ``xte`` against an index folder built with the same model; the test labels are
    brought into the index's numbering of the classes (by name)."""
    try:
        from compress_edge.retrieval.index import open_index
        from compress_edge.retrieval.knn import knn_classify
    except ImportError as exc:
        raise CompressEdgeError(f"--index needs compress_edge.retrieval, which is not available yet ({exc}); "
                                "pass --train DATA to search the gallery exactly") from None
    from compress_edge.eval.knn import knn_from_neighbors

    idx = open_index(index_dir)
    idx.spec.check_compatible(spec, what=f"the index {index_dir}")
    if idx.labels is None:
        raise CompressEdgeError(f"the index {index_dir} holds no labels; build it from a class folder or "
                                "fashion-mnist to evaluate kNN with it")
    names = list(idx.classes)
    labels = remap_labels(yte, test_classes, names, where=f"the index {index_dir}")
    found = knn_classify(idx, xte, k=max([1, *ks]), temperature=temperature)
    return knn_from_neighbors(found.similarities, found.neighbour_labels, labels, ks=ks, temperature=temperature,
                              num_classes=max(len(names), int(labels.max()) + 1), gallery_size=idx.ntotal)


def remap_labels(labels, classes: list[str], into: list[str], *, where: str):
    """``labels`` (numbers into ``classes``) renumbered into ``into`` by class name; CompressEdgeError
    naming ``where`` when a class is not there."""
    import numpy as np

    missing = [c for c in classes if c not in into]
    if missing:
        raise CompressEdgeError(f"{where} has no class {missing[0]!r} of the test data; its classes "
                                f"are: {', '.join(into[:10])}")
    remap = np.array([into.index(c) for c in classes], dtype=np.int64)
    return remap[labels]


def linear(model: Any, spec: Any, *, train: str, test: str, weight_decay: float | None, max_iter: int, seed: int,
           opts: FeatureOptions):
    """The linear probe: fitted on the ``train`` features, scored on the ``test`` features."""
    from compress_edge.eval.linear import linear_probe

    xtr, ytr, _ = features(model, spec, train, opts)
    xte, yte, _ = features(model, spec, test, opts)
    return linear_probe(xtr, ytr, xte, yte, weight_decay=weight_decay, max_iter=max_iter, device=opts.device,
                        seed=seed)


def cluster(model: Any, spec: Any, *, train: str, test: str | None, clusters: int | None, seed: int, niter: int,
            nredo: int, opts: FeatureOptions):
    """Cluster alignment: k-means on the ``train`` features, scored on ``test`` (default: ``train``)."""
    from compress_edge.eval.clustering import cluster_alignment

    xtr, ytr, _ = features(model, spec, train, opts)
    xte, yte = (xtr, ytr) if test is None else features(model, spec, test, opts)[:2]
    return cluster_alignment(xtr, ytr, xte, yte, num_clusters=clusters, seed=seed, niter=niter, nredo=nredo)


def agreement(teacher: str, student: str, data: str, *, teacher_weights: str | None, student_weights: str | None,
              ks: list[int], queries: int, seed: int, opts: FeatureOptions) -> tuple[dict, dict, Any]:
    """(teacher described, student described, result) of how well the student keeps the teacher's
    neighbours on the images of ``data``; each MODEL argument may be an architecture name with weights."""
    from compress_edge.eval.agreement import neighbor_agreement

    t_net, t_spec, t_backend = open_model(teacher, device=opts.device, image_size=None, weights=teacher_weights,
                                          weights_option="--teacher-weights")
    xt, _, _ = features(t_net, t_spec, data, opts)
    s_net, s_spec, s_backend = open_model(student, device=opts.device, image_size=None, weights=student_weights,
                                          weights_option="--student-weights")
    xs, _, _ = features(s_net, s_spec, data, opts)
    result = neighbor_agreement(xt, xs, ks=ks, max_queries=queries, seed=seed, device=opts.device)
    return describe(teacher, t_spec, t_backend), describe(student, s_spec, s_backend), result
