"""Evaluation of frozen embeddings: kNN, linear probe, cluster alignment, teacher-student agreement.

Every evaluation starts from :func:`extract_features`, THE one function that turns a dataset into
L2-normalised embeddings (as dinov2's ``extract_features`` serves its kNN and linear evaluations). It
takes a compress-edge model (a torch module with its ModelSpec) or anything with ``spec`` and
``embed(float32 (N, C, S, S)) -> (N, D)`` (an ``Embedder`` of ``compress_edge.export``: ONNX,
TensorRT), and caches the features on disk keyed by the model's identity and the data's fingerprint,
so a second evaluation of the same model on the same data costs a file read.

The evaluations (CompRess, Abbasi Koohpayegani et al., NeurIPS 2020, Table 1; DINO's kNN protocol):

- :func:`knn_eval`: 1-NN accuracy (the paper's "NN") and the weighted kNN vote of
  :mod:`compress_edge.eval.neighbors` (k = 20, 200, T = 0.07), exact search by chunked matrix products.
- :func:`linear_probe`: multinomial logistic regression on frozen features, full-batch L-BFGS.
- :func:`cluster_alignment`: spherical k-means (faiss) on the train features, clusters matched to
  classes by the Hungarian algorithm on the train labels, accuracy of that labelling on the test
  features; NMI and ARI.
- :func:`neighbor_agreement`: how many of the teacher's neighbours the student keeps, and the
  Spearman rank correlation of their similarities, on the same images.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress_edge.errors import DataError, ModelError
from compress_edge.eval.neighbors import (
    BLOCK_CPU,
    DEFAULT_KS,
    DEFAULT_TEMPERATURE,
    exact_topk,
    knn_accuracies,
    l2_normalize,
)
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

FEATURES_FORMAT = "compress-edge-features/1"
CACHE_ENV = "COMPRESS_EDGE_CACHE"


# --------------------------------------------------------------------------------------------------
# Feature extraction (the one function) and its cache
# --------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where features are cached: ``$COMPRESS_EDGE_CACHE/features`` when the variable is set, else
    ``~/.cache/compress-edge/features`` (``$XDG_CACHE_HOME`` is honoured)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(os.path.expanduser(root)) / "features"
    from compress_edge.data.datasets import cache_dir

    return cache_dir() / "features"


def _file_digest(path: Path) -> str:
    from compress_edge.storage import sha256_file

    return sha256_file(path)


def model_identity(model: Any, spec: ModelSpec) -> dict[str, Any] | None:
    """What decides a model's features, for the cache key; None when it cannot be told (no caching).

    A torch module: the sha256 of its state dict (weights and batch-norm statistics, so a random
    initialisation is identified too). An embedder: its backend and precision, and the sha256 of its
    model file (an .onnx, an engine), else of its torch module, else the spec's ``weights_sha256``.
    The spec's identity (architecture, image size, mean/std) is part of it either way.
    """
    from compress_edge.train.teacher_cache import tensor_hash

    ident: dict[str, Any] = {"spec": spec.identity()}
    if isinstance(model, torch.nn.Module):
        ident.update(backend="torch", precision="fp32", weights=tensor_hash(model))
        return ident
    ident.update(backend=str(getattr(model, "name", type(model).__name__)),
                 precision=str(getattr(model, "precision", "unknown")))
    path = Path(str(getattr(model, "path", "") or ""))
    inner = getattr(model, "model", None)
    if str(path) not in ("", ".") and path.is_file():
        ident["weights"] = "file:" + _file_digest(path)
    elif isinstance(inner, torch.nn.Module):
        ident["weights"] = tensor_hash(inner)
    elif spec.weights_sha256:
        ident["weights"] = spec.weights_sha256
    else:
        return None
    return ident


def features_key(model_ident: dict[str, Any], data_fingerprint: str, n: int) -> str:
    """The cache file's name (sha256 hex) for a model identity and a dataset."""
    blob = json.dumps({"format": FEATURES_FORMAT, "model": model_ident, "data": data_fingerprint, "n": int(n)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _spec_of(model: Any, spec: ModelSpec | None) -> ModelSpec:
    if spec is not None:
        return spec
    found = getattr(model, "spec", None)
    if isinstance(found, ModelSpec):
        return found
    raise ModelError(
        "extract_features needs the model's ModelSpec (image size, mean/std): pass spec=, or an embedder "
        "with a .spec (compress_edge.models.resolve.resolve_model returns both)"
    )


def extract_features(
    model_or_embedder: Any,
    dataset: Any,
    *,
    spec: ModelSpec | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every image of ``dataset``: (features float32 (N, D) L2-normalised, labels int64 (N,)).

    model_or_embedder: a torch module mapping (B, C, S, S) to (B, D) (an EmbeddingModel), with
      ``spec``; or an object with ``spec`` and ``embed(float32 array (B, C, S, S)) -> (B, D)``
      (an export ``Embedder``: ONNX Runtime, TensorRT, PyTorch).
    dataset: an :class:`~compress_edge.data.datasets.ImageDataset` (any dataset yielding (image, label, ...)
      works; without ``fingerprint()`` nothing is cached). Its images are fed through the eval
      preprocessing of ``spec`` (resize, centre crop, mean/std) on a copy; the dataset is untouched.
    device: for a torch module ("auto": CUDA when present); the module is moved there and run in eval
      mode (its training mode is restored afterwards). workers: DataLoader processes.
    cache_dir: the features cache (default :func:`default_cache_dir`); ``use_cache=False`` neither
      reads nor writes it. Labels are -1 for unlabelled images.
    """
    from compress_edge.data.datasets import eval_transform, make_loader
    from compress_edge.devices import resolve_device
    from compress_edge.progress import track
    from compress_edge.storage import atomic_path, atomic_write_json

    spec = _spec_of(model_or_embedder, spec)
    is_module = isinstance(model_or_embedder, torch.nn.Module)
    if not is_module and not callable(getattr(model_or_embedder, "embed", None)):
        raise ModelError(f"cannot extract features with a {type(model_or_embedder).__name__}: pass a torch "
                         "module with its spec, or an embedder with .spec and .embed()")
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)
    name = getattr(dataset, "name", type(dataset).__name__)

    cache_file = None
    if use_cache and callable(getattr(dataset, "fingerprint", None)):
        ident = model_identity(model_or_embedder, spec)
        if ident is not None:
            folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            cache_file = folder / f"{features_key(ident, dataset.fingerprint(), n)}.npz"
            cached = _read_cache(cache_file, n)
            if cached is not None:
                log.info("features of %s on %s read from the cache (%s)", spec.arch, name, cache_file)
                return cached
        else:
            log.debug("the model's weights cannot be identified: its features are not cached")

    data = copy.copy(dataset)
    if hasattr(data, "transform"):
        data.transform = eval_transform(spec.image_size, spec.mean, spec.std)
    loader = make_loader(data, batch_size, shuffle=False, workers=workers)
    dev = resolve_device(str(device)) if is_module else None
    was_training = bool(is_module and model_or_embedder.training)
    if is_module:
        model_or_embedder = model_or_embedder.to(dev).eval()
    feats = np.empty((n, int(spec.embed_dim)), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    row = 0
    started = time.perf_counter()
    steps = (n + batch_size - 1) // batch_size
    with torch.inference_mode():
        for batch in track(loader, f"features ({spec.arch}, {name})", total=steps, enabled=progress):
            images, y = batch[0], batch[1]
            if is_module:
                out = model_or_embedder(images.to(dev, non_blocking=True)).float().cpu().numpy()
            else:
                out = np.asarray(model_or_embedder.embed(images.numpy()), dtype=np.float32)
            b = out.shape[0]
            if out.ndim != 2 or out.shape[1] != feats.shape[1]:
                raise ModelError(f"the model returned embeddings of shape {out.shape}, its spec says "
                                 f"{spec.embed_dim} dimensions: the model and its spec disagree")
            feats[row : row + b] = out
            labels[row : row + b] = np.asarray(y, dtype=np.int64)
            row += b
    if was_training:
        model_or_embedder.train()
    if row != n:
        raise DataError(f"{name} yielded {row} images where it has {n}")
    feats = l2_normalize(feats)
    log.debug("extracted %d x %d features in %.1f s", n, feats.shape[1], time.perf_counter() - started)

    if cache_file is not None:
        with atomic_path(cache_file, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, features=feats, labels=labels)
        atomic_write_json(cache_file.with_suffix(".json"), {
            "format": FEATURES_FORMAT, "model": spec.arch, "spec": spec.to_dict(), "data": name,
            "data_fingerprint": dataset.fingerprint(), "images": n, "dim": int(feats.shape[1]),
            "seconds": round(time.perf_counter() - started, 2),
        })
    return feats, labels


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            feats, labels = np.asarray(z["features"], dtype=np.float32), np.asarray(z["labels"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring the damaged features cache %s (%s)", path, exc)
        return None
    if feats.ndim != 2 or len(feats) != n or len(labels) != n:
        log.warning("ignoring the features cache %s: it holds %d rows, the data %d", path, len(feats), n)
        return None
    return feats, labels


# --------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------
@dataclass
class KnnResult:
    """nn_top1: 1-NN accuracy. knn: {k: {"top1", "top5"}} of the weighted vote. Fractions in [0, 1]."""

    nn_top1: float
    knn: dict[int, dict[str, float]]
    temperature: float
    queries: int
    gallery: int
    num_classes: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["knn"] = {str(k): v for k, v in self.knn.items()}
        return d


def _num_classes(*label_sets: np.ndarray, given: int | None = None) -> int:
    if given is not None:
        return int(given)
    highest = max((int(y.max()) for y in label_sets if len(y)), default=-1)
    return highest + 1


def _require_labels(labels: np.ndarray, what: str) -> None:
    if len(labels) == 0 or (labels < 0).any():
        raise DataError(f"the {what} images need class labels (a class folder DIR/<class>/<image> or "
                        "fashion-mnist); unlabelled images cannot be scored")


def knn_from_neighbors(
    sims: np.ndarray,
    neighbor_labels: np.ndarray,
    labels: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    gallery_size: int | None = None,
) -> KnnResult:
    """Score queries whose neighbours were found elsewhere (an exact search, a FAISS index).

    sims, neighbor_labels: (Q, K) sorted by decreasing similarity, K >= max(ks). labels: (Q,).
    """
    labels = np.asarray(labels, dtype=np.int64)
    neighbor_labels = np.asarray(neighbor_labels, dtype=np.int64)
    c = _num_classes(labels, neighbor_labels, given=num_classes)
    accs = knn_accuracies(sims, neighbor_labels, labels, c, ks=sorted({1, *map(int, ks)}), temperature=temperature)
    nn = accs.pop(1)["top1"] if 1 not in ks else accs[1]["top1"]
    return KnnResult(nn_top1=nn, knn=accs, temperature=float(temperature), queries=int(len(labels)),
                     gallery=int(gallery_size or 0), num_classes=c)


def knn_eval(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    device: str | torch.device = "auto",
    num_classes: int | None = None,
) -> KnnResult:
    """1-NN and weighted kNN accuracy of the test features against the train (gallery) features.

    Exact search (:func:`exact_topk`), then :func:`compress_edge.eval.neighbors.weighted_knn_vote`.
    """
    from compress_edge.devices import resolve_device

    started = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    _require_labels(train_labels, "gallery (--train)")
    _require_labels(test_labels, "query (--test)")
    if any(int(k) <= 0 for k in ks):
        raise DataError(f"k must be positive, got {list(ks)}")
    kmax = max([1, *map(int, ks)])
    if kmax > len(train_labels):
        log.warning("k=%d is more than the %d gallery images: all of them vote", kmax, len(train_labels))
    sims, idx = exact_topk(test_features, train_features, kmax, device=resolve_device(str(device)))
    result = knn_from_neighbors(sims, train_labels[idx], test_labels, ks=ks, temperature=temperature,
                                num_classes=_num_classes(train_labels, test_labels, given=num_classes),
                                gallery_size=len(train_labels))
    result.seconds = round(time.perf_counter() - started, 3)
    return result


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------
#: Weight decays tried on a held-out part of the train features when none is given.
WEIGHT_DECAYS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclass
class LinearResult:
    """top1 / top5 on the test features; weight_decay used; validation top-1 of each candidate."""

    top1: float
    top5: float
    weight_decay: float
    validation: dict[str, float] = field(default_factory=dict)
    train_top1: float = 0.0
    iterations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
                  init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multinomial logistic regression, mean cross-entropy + wd/2 ||W||^2, full-batch L-BFGS."""
    d = x.shape[1]
    w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iters = int(opt.state[w].get("n_iter", 0))
    return w.detach(), b.detach(), iters


def _topk_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == y[:, None]).any(dim=1).float().mean())


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    weight_decay: float | None = None,
    candidates: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = 200,
    val_fraction: float = 0.1,
    search_images: int = 5000,
    device: str | torch.device = "auto",
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearResult:
    """Top-1 / top-5 of a linear classifier trained on frozen train features, on the test features.

    Features are standardised with the train statistics; the classifier is multinomial logistic
    regression fitted to convergence by full-batch L-BFGS (seconds on a CPU for tens of thousands of
    images). ``weight_decay`` None picks it among ``candidates`` by top-1 on a held-out
    ``val_fraction`` of the train features (class-stratified, ``seed``), fitting at most
    ``search_images`` of the others (a random sample; the decay found is rescaled by images, as the
    loss is a mean), trying weaker decays until two in a row do worse; then refits on all of them.
    """
    from compress_edge.devices import resolve_device

    dev = resolve_device(str(device))
    small = dev.type == "cpu" and np.asarray(train_features).size <= _SMALL_PROBLEM
    # L-BFGS runs many small operations: on a small problem, waking a second CPU thread for each one
    # costs more than it saves (7x slower on a busy 2-core machine).
    with _cpu_threads(1) if small else contextlib.nullcontext():
        return _linear_probe(train_features, train_labels, test_features, test_labels, dev,
                             weight_decay=weight_decay, candidates=candidates, max_iter=max_iter,
                             val_fraction=val_fraction, search_images=search_images, seed=seed,
                             num_classes=num_classes)


#: Feature arrays up to this many elements are fitted on one CPU thread.
_SMALL_PROBLEM = 1 << 22


@contextlib.contextmanager
def _cpu_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _linear_probe(train_features, train_labels, test_features, test_labels, dev, *, weight_decay, candidates,
                  max_iter, val_fraction, search_images, seed, num_classes) -> LinearResult:
    started = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    _require_labels(train_labels, "train")
    _require_labels(test_labels, "test")
    c = _num_classes(train_labels, test_labels, given=num_classes)
    xtr = torch.from_numpy(np.ascontiguousarray(train_features, dtype=np.float32)).to(dev)
    xte = torch.from_numpy(np.ascontiguousarray(test_features, dtype=np.float32)).to(dev)
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.from_numpy(train_labels).to(dev)
    yte = torch.from_numpy(test_labels).to(dev)

    validation: dict[str, float] = {}
    if weight_decay is None:
        if not candidates:
            raise DataError("no weight decay to try: pass weight_decay or candidates")
        rng = np.random.default_rng(seed)
        held = np.zeros(len(train_labels), dtype=bool)
        for cls in np.unique(train_labels):
            members = np.flatnonzero(train_labels == cls)
            take = int(round(len(members) * val_fraction))
            if 0 < take < len(members):
                held[rng.choice(members, size=take, replace=False)] = True
        if not held.any():
            weight_decay = float(sorted(candidates)[len(candidates) // 2])
            log.warning("too few train images to hold some out: using weight decay %g", weight_decay)
        else:
            fit = np.flatnonzero(~held)
            if len(fit) > search_images:  # choose on a random sample of them, then rescale (below)
                fit = np.sort(rng.permutation(fit)[:search_images])
            fit_idx = torch.from_numpy(fit).to(dev)
            val_idx = torch.from_numpy(np.flatnonzero(held)).to(dev)
            init = None
            best = (-1.0, 0.0)
            drops = 0
            for wd in sorted(candidates, reverse=True):  # strongest first, each warm-starts the next
                w, b, _ = _fit_logistic(xtr[fit_idx], ytr[fit_idx], c, float(wd), max_iter, init)
                init = (w, b)
                acc = _topk_hits(xtr[val_idx] @ w + b, ytr[val_idx], 1)
                validation[f"{wd:g}"] = acc
                if acc > best[0]:
                    best, drops = (acc, float(wd)), 0
                else:
                    drops += 1
                    if drops == 2:  # weaker decays only overfit more, and they take the longest to fit
                        break
            # The loss is a mean over images, so one prior on W is a decay proportional to 1/images:
            # the decay chosen on the sample is rescaled to the whole training set.
            weight_decay = best[1] * len(fit) / len(train_labels)
    w, b, iters = _fit_logistic(xtr, ytr, c, float(weight_decay), max_iter)
    logits = xte @ w + b
    return LinearResult(top1=_topk_hits(logits, yte, 1), top5=_topk_hits(logits, yte, 5),
                        weight_decay=float(weight_decay), validation=validation,
                        train_top1=_topk_hits(xtr @ w + b, ytr, 1), iterations=iters,
                        seconds=round(time.perf_counter() - started, 3))


# --------------------------------------------------------------------------------------------------
# Clustering metrics (numpy / scipy; no scikit-learn)
# --------------------------------------------------------------------------------------------------
def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts (max(a)+1, max(b)+1) of each pair of non-negative integer labels."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two label vectors of the same length are needed, got {a.shape} and {b.shape}")
    if len(a) and (a.min() < 0 or b.min() < 0):
        raise ValueError("labels must be non-negative")
    ra = int(a.max()) + 1 if len(a) else 0
    rb = int(b.max()) + 1 if len(b) else 0
    return np.bincount(a * rb + b, minlength=ra * rb).reshape(ra, rb)


def hungarian_match(clusters: np.ndarray, labels: np.ndarray, num_clusters: int | None = None,
                    num_classes: int | None = None) -> np.ndarray:
    """The one-to-one cluster -> class map that labels the most images right (Kuhn-Munkres, scipy).

    Returns int64 (num_clusters,): the class of each cluster, -1 for clusters left unmatched (more
    clusters than classes).
    """
    from scipy.optimize import linear_sum_assignment

    table = contingency(clusters, labels)
    k = max(int(num_clusters or 0), table.shape[0])
    c = max(int(num_classes or 0), table.shape[1])
    full = np.zeros((k, c), dtype=np.int64)
    full[: table.shape[0], : table.shape[1]] = table
    rows, cols = linear_sum_assignment(full, maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def cluster_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``clusters`` under their best one-to-one matching to ``labels`` (1.0 for a perfect
    clustering whatever the cluster numbering)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    mapping = hungarian_match(clusters, labels)
    return float((mapping[clusters] == labels).mean())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """NMI with the arithmetic-mean normalisation: I(a; b) / ((H(a) + H(b)) / 2), natural logs.

    1.0 when both labellings are the same partition (including both trivial).
    """
    table = contingency(a, b).astype(np.float64)
    n = table.sum()
    if n == 0:
        return float("nan")
    ha, hb = _entropy(table.sum(1)), _entropy(table.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    pij = table / n
    outer = np.outer(table.sum(1), table.sum(0)) / (n * n)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / outer[nz])).sum())
    return max(0.0, mi / ((ha + hb) / 2))


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI of Hubert and Arabie (1985): 1.0 for identical partitions, about 0 for random ones."""
    table = contingency(a, b).astype(np.float64)
    n = table.sum()

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    total = n * (n - 1) / 2
    if total == 0:
        return 1.0
    expected = sa * sb / total
    maximum = (sa + sb) / 2
    if maximum == expected:  # both partitions trivial (one cluster, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))


@dataclass
class ClusterResult:
    """accuracy: test images labelled by the Hungarian map learned on the train split; train_accuracy:
    the same map on the train split; nmi / ari: of the test assignments against the test labels."""

    accuracy: float
    nmi: float
    ari: float
    train_accuracy: float
    train_nmi: float
    num_clusters: int
    num_classes: int
    seed: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kmeans_assign(features: np.ndarray, num_clusters: int, *, seed: int = 0, niter: int = 50,
                  nredo: int = 5, spherical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means on ``features`` (N, D): (centroids float32 (K, D), assignments int64 (N,)).

    Spherical (centroids renormalised each iteration, the cosine k-means of L2-normalised features),
    with a fixed seed and every point used for training; the best of ``nredo`` runs (faiss starts from
    random points, so one run can merge two clusters and split another).
    """
    from compress_edge.deps import require

    faiss = require("faiss", "k-means clustering")
    x = np.ascontiguousarray(features, dtype=np.float32)
    k = int(num_clusters)
    if not 1 <= k <= len(x):
        raise DataError(f"cannot make {k} clusters of {len(x)} images; use between 1 and {len(x)} clusters")
    km = faiss.Kmeans(x.shape[1], k, niter=int(niter), nredo=int(nredo), seed=int(seed), spherical=spherical,
                      verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, len(x) // k + 1))
    threads = faiss.omp_get_max_threads()
    if x.size <= _SMALL_PROBLEM:  # OpenMP threads spin between the many short steps of a small problem
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return km.centroids.copy(), assign_to_centroids(x, km.centroids)


def assign_to_centroids(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (N,) of the nearest centroid (by L2, what k-means minimises) of each row."""
    x = np.asarray(features, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    d = (x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    return d.argmin(axis=1).astype(np.int64)


def cluster_alignment(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    *,
    num_clusters: int | None = None,
    seed: int = 0,
    niter: int = 50,
    nredo: int = 5,
) -> ClusterResult:
    """The CompRess paper's cluster alignment.

    k-means (faiss, spherical, ``seed``, best of ``nredo`` runs) of the train features into ``num_clusters`` clusters (default:
    as many as classes); clusters matched one-to-one to classes by the Hungarian algorithm on the train
    labels; each test image takes the class of its nearest centroid's match; accuracy, NMI and ARI of
    the test split (of the train split when no test features are given).
    """
    started = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    _require_labels(train_labels, "train")
    if test_features is None:
        test_features, test_labels = train_features, train_labels
    test_labels = np.asarray(test_labels, dtype=np.int64)
    _require_labels(test_labels, "test")
    c = _num_classes(train_labels, test_labels)
    k = int(num_clusters) if num_clusters is not None else c
    centroids, train_assign = kmeans_assign(train_features, k, seed=seed, niter=niter, nredo=nredo)
    mapping = hungarian_match(train_assign, train_labels, k, c)
    test_assign = assign_to_centroids(test_features, centroids)
    return ClusterResult(
        accuracy=float((mapping[test_assign] == test_labels).mean()),
        nmi=normalized_mutual_info(test_assign, test_labels),
        ari=adjusted_rand_index(test_assign, test_labels),
        train_accuracy=float((mapping[train_assign] == train_labels).mean()),
        train_nmi=normalized_mutual_info(train_assign, train_labels),
        num_clusters=k, num_classes=c, seed=int(seed), seconds=round(time.perf_counter() - started, 3),
    )


# --------------------------------------------------------------------------------------------------
# Teacher-student agreement
# --------------------------------------------------------------------------------------------------
@dataclass
class AgreementResult:
    """overlap: {k: mean fraction of the teacher's k nearest neighbours that are among the student's};
    spearman: mean (and std) over queries of the Spearman correlation between the teacher's and the
    student's similarities of the query to every other image."""

    overlap: dict[int, float]
    spearman: float
    spearman_std: float
    queries: int
    images: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overlap"] = {str(k): v for k, v in self.overlap.items()}
        return d


def _row_ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=1).astype(np.float64)


def neighbor_agreement(
    teacher_features: np.ndarray,
    student_features: np.ndarray,
    *,
    ks: Sequence[int] = (10, 100),
    max_queries: int | None = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> AgreementResult:
    """How well the student keeps the teacher's neighbourhoods, on the same N images.

    Each query (all images, or ``max_queries`` drawn with ``seed``) is searched among the other N - 1
    images in the teacher's space and in the student's (each with its own dimension). Reports the
    top-k overlap for each k of ``ks`` and the Spearman rank correlation of the two similarity vectors
    (N - 1 values each; ties take average ranks), averaged over queries.
    """
    from compress_edge.devices import resolve_device

    started = time.perf_counter()
    t = np.ascontiguousarray(teacher_features, dtype=np.float32)
    s = np.ascontiguousarray(student_features, dtype=np.float32)
    if len(t) != len(s):
        raise DataError(f"the teacher has features of {len(t)} images and the student of {len(s)}: "
                        "agreement needs the same images")
    n = len(t)
    if n < 3:
        raise DataError(f"agreement needs at least 3 images, got {n}")
    ks = sorted({min(int(k), n - 1) for k in ks if int(k) > 0})
    if not ks:
        raise DataError("k must be positive")
    rng = np.random.default_rng(seed)
    if max_queries is not None and n > max_queries:
        qidx = np.sort(rng.choice(n, size=int(max_queries), replace=False))
    else:
        qidx = np.arange(n)
    kmax = ks[-1]
    dev = resolve_device(str(device))
    _, nt = exact_topk(t[qidx], t, kmax, device=dev, self_index=qidx)
    _, ns = exact_topk(s[qidx], s, kmax, device=dev, self_index=qidx)
    overlap = {}
    for k in ks:
        hits = [len(np.intersect1d(a[:k], b[:k], assume_unique=True)) for a, b in zip(nt, ns, strict=True)]
        overlap[k] = float(np.mean(hits) / k)

    rhos = np.empty(len(qidx), dtype=np.float64)
    chunk = max(1, BLOCK_CPU // (4 * n))
    keep = np.ones(n, dtype=bool)
    for start in range(0, len(qidx), chunk):
        rows = qidx[start : start + chunk]
        st, ss = t[rows] @ t.T, s[rows] @ s.T
        mask = np.broadcast_to(keep, st.shape).copy()
        mask[np.arange(len(rows)), rows] = False  # a query's similarity to itself says nothing
        rt = _row_ranks(st[mask].reshape(len(rows), n - 1))
        rs = _row_ranks(ss[mask].reshape(len(rows), n - 1))
        rt -= rt.mean(1, keepdims=True)
        rs -= rs.mean(1, keepdims=True)
        denom = np.sqrt((rt * rt).sum(1) * (rs * rs).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rhos[start : start + len(rows)] = np.where(denom > 0, (rt * rs).sum(1) / denom, np.nan)
    return AgreementResult(overlap=overlap, spearman=float(np.nanmean(rhos)), spearman_std=float(np.nanstd(rhos)),
                           queries=int(len(qidx)), images=n, seconds=round(time.perf_counter() - started, 3))
