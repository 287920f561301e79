"""Is the exported model the same model? Cosine, absolute difference and neighbour overlap.

numpy only (no torch), so the same checks run on a device. Images for the checks come from
:func:`load_check_images`: real images of the user's data when given, never only random tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress_edge.errors import DataError
from compress_edge.eval.neighbors import l2_normalize
from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

#: Minimum cosine similarity each precision should reach against the float32 model.
GOALS = {"fp32": 0.9999, "fp16": 0.999, "int8-cpu": 0.98, "int8-trt": 0.98, "engine": 0.999}
#: Neighbours compared by the gallery check.
TOPK = 10
#: Minimum top-10 neighbour overlap an INT8 file must reach as well as its cosine goal (issue 15: on
#: mobilenet_v3_large a min cosine of 0.9993 came with an overlap of 0.19: a file that finds other
#: neighbours). "int8" is the OpenVINO INT8 IR. The float files keep the cosine goal alone; their
#: overlap is recorded.
TOPK_GOALS = {"int8-cpu": 0.9, "int8-trt": 0.9, "int8": 0.9}
#: An overlap is a mean of fractions: 0.9 can come out as 0.8999999999999999.
_OVERLAP_TOLERANCE = 1e-9


def overlap_below(overlap: float | None, goal: float | None) -> bool:
    """Whether a measured top-k ``overlap`` misses ``goal`` (False when either is None)."""
    return goal is not None and overlap is not None and overlap < goal - _OVERLAP_TOLERANCE


@dataclass
class ParityResult:
    """How close ``name``'s embeddings are to ``reference``'s on the same ``images`` inputs.

    min_cosine / mean_cosine: cosine similarity per image (min and mean over images).
    max_abs_diff: largest absolute difference of any embedding value.
    topk_overlap: mean fraction of each image's k nearest gallery neighbours (cosine, itself left
    out) that both models find; None when the gallery has fewer than 2 images.
    goal: the min_cosine goal; topk_goal: the topk_overlap goal (None: none, as for float files);
    passed: whether both were reached (an overlap that cannot be measured, with fewer than 2 images,
    does not fail the file).
    """

    name: str
    reference: str
    images: int
    image_source: str
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    topk_overlap: float | None
    k: int
    goal: float
    passed: bool
    topk_goal: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        overlap = f", top-{self.k} overlap {self.topk_overlap:.3f}" if self.topk_overlap is not None else ""
        misses = []
        if not self.min_cosine >= self.goal:
            misses.append(f"BELOW GOAL {self.goal}")
        if overlap_below(self.topk_overlap, self.topk_goal):
            misses.append(f"top-{self.k} overlap BELOW GOAL {self.topk_goal}")
        verdict = "ok" if self.passed else "; ".join(misses) or "FAILED"
        return (
            f"{self.name} vs {self.reference} on {self.images} {self.image_source} images: min cosine "
            f"{self.min_cosine:.6f} (mean {self.mean_cosine:.6f}), max |diff| {self.max_abs_diff:.2e}{overlap} "
            f"[{verdict}]"
        )


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` with row i of ``b`` (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different shapes: {a.shape} vs {b.shape}")
    return np.sum(l2_normalize(a, dtype=np.float64) * l2_normalize(b, dtype=np.float64), axis=1)


def topk_overlap(reference: np.ndarray, test: np.ndarray, k: int = TOPK) -> float | None:
    """Mean |kNN_ref(i) ∩ kNN_test(i)| / k over the gallery, each image searched against the others.

    Both galleries hold the same images embedded by two models (N, D); k is capped at N - 1.
    """
    n = reference.shape[0]
    if n < 2:
        return None
    k = min(k, n - 1)

    def knn(x: np.ndarray) -> np.ndarray:
        u = l2_normalize(x, dtype=np.float64)
        sims = u @ u.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    a, b = knn(reference), knn(test)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))


def compare(
    reference: np.ndarray,
    test: np.ndarray,
    *,
    name: str,
    reference_name: str,
    goal: float,
    topk_goal: float | None = None,
    image_source: str = "real",
    k: int = TOPK,
) -> ParityResult:
    """A :class:`ParityResult` of ``test`` (N, D) against ``reference`` (N, D).

    Passed: min cosine >= ``goal`` and, with ``topk_goal``, top-k overlap >= ``topk_goal``.
    """
    reference = np.asarray(reference, dtype=np.float32)
    test = np.asarray(test, dtype=np.float32)
    cos = cosine_per_row(reference, test)
    finite = bool(np.isfinite(test).all())
    min_cos = float(cos.min()) if finite else float("nan")
    overlap = topk_overlap(reference, test, k) if finite else None
    overlap_ok = not overlap_below(overlap, topk_goal)
    return ParityResult(
        name=name,
        reference=reference_name,
        images=int(reference.shape[0]),
        image_source=image_source,
        min_cosine=min_cos,
        mean_cosine=float(cos.mean()) if finite else float("nan"),
        max_abs_diff=float(np.max(np.abs(reference - test))) if finite else float("inf"),
        topk_overlap=overlap,
        k=min(k, max(1, reference.shape[0] - 1)),
        goal=float(goal),
        passed=finite and min_cos >= goal and overlap_ok,
        topk_goal=None if topk_goal is None else float(topk_goal),
    )


# --------------------------------------------------------------------------------------------------
# Images for parity checks and calibration
# --------------------------------------------------------------------------------------------------
def load_check_images(
    data: str | os.PathLike | None,
    spec: ModelSpec,
    n: int,
    *,
    purpose: str = "parity checks",
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[np.ndarray, str]:
    """Up to ``n`` preprocessed images (float32 (n, C, S, S)) for ``spec``, and where they came from.

    data: a folder of images or a class folder, ``fashion-mnist:train|test``, or a ``.npy`` file of
    images already preprocessed for this model (float32 (N, C, S, S)). Images are picked evenly
    across the dataset (so every class is represented), in a fixed order.
    progress: False hides the "checking images" bar a large folder shows.
    Raises DataError for a ``.npy`` array of the wrong shape or channel count, and for no images.
    """
    if n <= 0:
        raise DataError(f"the number of images for {purpose} must be positive, got {n}")
    path = Path(os.fspath(data)) if data is not None else None
    if path is not None and path.suffix.lower() == ".npy":
        return _from_npy(path, spec, n, purpose), f"preprocessed array {path.name}"
    if data is None:
        raise DataError(f"no images for {purpose}; pass --calib-data (an image folder or fashion-mnist:test)")
    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.images import preprocess_batch

    ds = open_dataset(str(data), progress=progress)
    if len(ds) == 0:
        raise DataError(f"{data} holds no images for {purpose}")
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
    if getattr(ds, "kind", "") in ("class-folder", "image-folder"):
        items: list = [ds.files[i] for i in idx]  # decoded in threads by preprocess_batch
    else:
        items = [ds.get_image(int(i)) for i in idx]
    if len(items) < n:
        log.info("%s holds %d images; using all of them for %s (asked for %d)", data, len(items), purpose, n)
    arr = preprocess_batch(items, spec.image_size, spec.mean, spec.std)
    return arr, f"real ({ds.name})"


def _from_npy(path: Path, spec: ModelSpec, n: int, purpose: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc})") from None
    expected = (spec.channels, spec.image_size, spec.image_size)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
        what = "channel count" if arr.ndim == 4 and arr.shape[1] != spec.channels else "size"
        raise DataError(
            f"{path} holds images of shape {tuple(arr.shape)} (wrong {what}); {purpose} for this model need "
            f"(N, {', '.join(map(str, expected))}) preprocessed with its mean/std, or pass an image folder"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path} holds {arr.dtype}; preprocessed images must be float32 (normalised)")
    if arr.shape[0] == 0:
        raise DataError(f"{path} holds no images")
    idx = np.unique(np.linspace(0, arr.shape[0] - 1, num=min(n, arr.shape[0])).round().astype(int))
    return np.ascontiguousarray(arr[idx], dtype=np.float32)


def synthetic_images(spec: ModelSpec, n: int, seed: int = 0) -> np.ndarray:
    """Structured test pictures (shapes and gradients on noise), preprocessed: (n, C, S, S).

    A stand-in for real images only when the user gives none; reports say so.
    """
    from PIL import Image

    from compress_edge.data.images import preprocess_batch

    rng = np.random.default_rng(seed)
    size = max(32, int(spec.image_size))
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(n):
        base = rng.uniform(0, 1, 3)[None, None, :] * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.35)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if i % 2 else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        base[mask] = rng.uniform(0, 1, 3)
        noisy = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        images.append(Image.fromarray((noisy * 255).astype(np.uint8)))
    return preprocess_batch(images, spec.image_size, spec.mean, spec.std)
