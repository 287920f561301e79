"""Linear probe of frozen embeddings: multinomial logistic regression fitted by full-batch L-BFGS,
the weight decay chosen on a held-out part of the train features (torch)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from compress_edge.errors import DataError
from compress_edge.eval.inputs import SMALL_PROBLEM, count_classes, require_labels

log = logging.getLogger(__name__)

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
    small = dev.type == "cpu" and np.asarray(train_features).size <= SMALL_PROBLEM
    # L-BFGS runs many small operations: on a small problem, waking a second CPU thread for each one
    # costs more than it saves (7x slower on a busy 2-core machine).
    with _cpu_threads(1) if small else contextlib.nullcontext():
        return _linear_probe(train_features, train_labels, test_features, test_labels, dev,
                             weight_decay=weight_decay, candidates=candidates, max_iter=max_iter,
                             val_fraction=val_fraction, search_images=search_images, seed=seed,
                             num_classes=num_classes)


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
    require_labels(train_labels, "train")
    require_labels(test_labels, "test")
    c = count_classes(train_labels, test_labels, given=num_classes)
    xtr = torch.from_numpy(np.ascontiguousarray(train_features, dtype=np.float32)).to(dev)
    xte = torch.from_numpy(np.ascontiguousarray(test_features, dtype=np.float32)).to(dev)
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.from_numpy(train_labels).to(dev)
    yte = torch.from_numpy(test_labels).to(dev)

    validation: dict[str, float] = {}
    if weight_decay is None:
        weight_decay, validation = _choose_weight_decay(
            xtr, ytr, train_labels, c, candidates=candidates, max_iter=max_iter, val_fraction=val_fraction,
            search_images=search_images, seed=seed)
    w, b, iters = _fit_logistic(xtr, ytr, c, float(weight_decay), max_iter)
    logits = xte @ w + b
    return LinearResult(top1=_topk_hits(logits, yte, 1), top5=_topk_hits(logits, yte, 5),
                        weight_decay=float(weight_decay), validation=validation,
                        train_top1=_topk_hits(xtr @ w + b, ytr, 1), iterations=iters,
                        seconds=round(time.perf_counter() - started, 3))


def _held_out(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A class-stratified mask of about ``fraction`` of the images (none of a class too small to split)."""
    held = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = int(round(len(members) * fraction))
        if 0 < take < len(members):
            held[rng.choice(members, size=take, replace=False)] = True
    return held


def _choose_weight_decay(xtr: torch.Tensor, ytr: torch.Tensor, train_labels: np.ndarray, c: int, *,
                         candidates: Sequence[float], max_iter: int, val_fraction: float, search_images: int,
                         seed: int) -> tuple[float, dict[str, float]]:
    """The weight decay of ``candidates`` with the best top-1 on a held-out part of the (standardised)
    train features, rescaled to all of them; and the validation top-1 of each candidate tried."""
    if not candidates:
        raise DataError("no weight decay to try: pass weight_decay or candidates")
    rng = np.random.default_rng(seed)
    held = _held_out(train_labels, val_fraction, rng)
    if not held.any():
        weight_decay = float(sorted(candidates)[len(candidates) // 2])
        log.warning("too few train images to hold some out: using weight decay %g", weight_decay)
        return weight_decay, {}
    fit = np.flatnonzero(~held)
    if len(fit) > search_images:  # choose on a random sample of them, then rescale (below)
        fit = np.sort(rng.permutation(fit)[:search_images])
    fit_idx = torch.from_numpy(fit).to(xtr.device)
    val_idx = torch.from_numpy(np.flatnonzero(held)).to(xtr.device)
    validation: dict[str, float] = {}
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
    return best[1] * len(fit) / len(train_labels), validation
