"""The teacher, run once over the data: embeddings stored float16, memory-mapped, in shards.

Layout of a cache folder::

    meta.json              fingerprint, dimensions, mode, views, shard list (written last)
    emb-00000.npy          (rows, V, Dt) float16, memory-mapped when read
    params-00000.npy       (rows, V, P) float32, the augmentation parameters of each view (mode "views")

Two modes. ``center``: one evaluation view (resize, centre crop) per image, as in the paper; the
student then trains on augmented views of an image whose teacher embedding came from another view.
``views``: K augmented views per image; their parameters are recorded and replayed exactly for the
student, so that teacher and student see the same pixels.

A shard is written to a temporary name and renamed when complete, and ``meta.json`` comes last: an
interrupted run leaves no half shard behind, and running it again continues from the first missing
shard. SIGINT or SIGTERM (also sent to the whole process group, as by ``docker stop``) stops the run
once the shard being made is written; a second signal stops at once, without that shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from compress_edge.errors import DataError
from compress_edge.storage import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

CACHE_FORMAT = "compress-edge-teacher-cache/1"
MODES = ("center", "views")


def tensor_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, bytes): the teacher's weights identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_parts(*, dataset_fingerprint: str, image_size: int, mean, std, mode: str, views: int,
                      augment: dict[str, Any], seed: int) -> dict[str, Any]:
    """What a cache depends on besides the teacher: the data, the transform, the views."""
    return {
        "dataset": dataset_fingerprint,
        "transform": {
            "image_size": int(image_size),
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "mode": mode,
            "views": int(views),
            "augment": augment if mode == "views" else None,
            "seed": int(seed) if mode == "views" else None,
        },
    }


def fingerprint(parts: dict[str, Any], teacher_sha256: str) -> str:
    blob = json.dumps({**parts, "teacher": teacher_sha256}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class TeacherCache:
    """A cache folder opened for reading: ``embedding(i, view)`` and ``params(i, view)``."""

    root: Path
    meta: dict[str, Any]
    _emb: list[np.ndarray]
    _params: list[np.ndarray] | None

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def views(self) -> int:
        return int(self.meta["views"])

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _locate(self, index: int) -> tuple[int, int]:
        rows = int(self.meta["shard_rows"])
        return index // rows, index % rows

    def embedding(self, index: int, view: int = 0) -> np.ndarray:
        s, r = self._locate(index)
        return np.asarray(self._emb[s][r, view], dtype=np.float32)

    def params(self, index: int, view: int) -> np.ndarray:
        if self._params is None:
            raise DataError("this teacher cache holds centre views only; it has no augmentation parameters")
        s, r = self._locate(index)
        return np.asarray(self._params[s][r, view], dtype=np.float32)

    def all_embeddings(self, view: int = 0) -> np.ndarray:
        """(N, Dt) float32 of one view (for evaluation and agreement measures)."""
        return np.concatenate([np.asarray(e[:, view], dtype=np.float32) for e in self._emb])

    def check(self, parts: dict[str, Any], teacher_sha256: str | None = None) -> None:
        """Refuse a cache made from other data, another transform or (when given) another teacher."""
        have = self.meta.get("parts", {})
        if have.get("dataset") != parts["dataset"]:
            raise DataError(
                f"the teacher cache {self.root} was made from other data (its file list or files differ); "
                "run cache-teacher again on this data"
            )
        mine, theirs = parts["transform"], have.get("transform", {})
        diffs = [f"{k} {theirs.get(k)!r} in the cache vs {mine[k]!r} now" for k in mine if theirs.get(k) != mine[k]]
        if diffs:
            raise DataError(
                f"the teacher cache {self.root} was made with another transform ({'; '.join(diffs[:3])}); "
                "use the same options or run cache-teacher again"
            )
        if teacher_sha256 is not None and self.meta.get("teacher_sha256") != teacher_sha256:
            raise DataError(f"the teacher cache {self.root} was made by another teacher; run cache-teacher again")
        if fingerprint(have, self.meta.get("teacher_sha256", "")) != self.meta.get("fingerprint"):
            raise DataError(f"the teacher cache {self.root} has a damaged meta.json; run cache-teacher again")


def open_cache(root: str | os.PathLike) -> TeacherCache:
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{root} is not a complete teacher cache (no meta.json); run 'compress-edge cache-teacher' "
            "to make one, or again to finish an interrupted one"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{meta_path} is damaged; run cache-teacher again") from None
    if meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{root} is not a compress-edge teacher cache (format {meta.get('format')!r})")
    try:
        emb = [np.load(root / name, mmap_mode="r") for name in meta["emb_shards"]]
        params = [np.load(root / name, mmap_mode="r") for name in meta["param_shards"]] if meta["mode"] == "views" else None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"a shard of the teacher cache {root} is missing or damaged ({exc}); run cache-teacher again") from None
    if sum(len(e) for e in emb) != meta["count"]:
        raise DataError(f"the teacher cache {root} holds fewer rows than its meta.json says; run cache-teacher again")
    return TeacherCache(root, meta, emb, params)


class _ViewsDataset(Dataset):
    """For index i: the K views the teacher embeds, (K, 3, S, S), and their parameters (K, P)."""

    def __init__(self, base, mode: str, views: int, eval_tf, augment, seed: int):
        self.base, self.mode, self.views, self.eval_tf, self.augment, self.seed = base, mode, views, eval_tf, augment, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img = self.base.get_image(i)
        if self.mode == "center":
            return self.eval_tf(img).unsqueeze(0), torch.zeros(1, 1), i
        rng = np.random.default_rng([self.seed, i])  # per image: independent of worker and order
        params = [self.augment.sample_params(rng, img.width, img.height) for _ in range(self.views)]
        x = torch.stack([self.augment.apply(img, p) for p in params])
        return x, torch.from_numpy(np.stack(params).astype(np.float32)), i


def build_cache(
    teacher: Any,
    dataset,
    out: str | os.PathLike,
    *,
    parts: dict[str, Any],
    teacher_sha256: str,
    mode: str,
    views: int,
    eval_tf,
    augment,
    seed: int,
    batch_size: int = 256,
    workers: int = 2,
    shard_rows: int = 65_536,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> TeacherCache:
    """Embed ``dataset`` with ``teacher`` (an Embedder: ``spec``, ``embed``; the frozen network in a
    :class:`~compress_edge.export.backends.TorchEmbedder`) into a cache folder (see the module docstring)."""
    import time

    from compress_edge.progress import progress_bar, shows_bar, time_left
    from compress_edge.signals import StopRequest
    from compress_edge.train.engine import TrainingStopped

    views = _views_of(mode, views)
    out = Path(out)
    fp = fingerprint(parts, teacher_sha256)
    done = _claim_folder(out, fp)
    if done is not None:
        return done

    n = len(dataset)
    n_shards = (n + shard_rows - 1) // shard_rows
    ds = _ViewsDataset(dataset, mode, views, eval_tf, augment, seed)
    dim = None
    emb_names, param_names = [], []
    lines = not shows_bar(progress)  # without a bar, a line per shard written, with the time left
    start, embedded = time.perf_counter(), 0
    with StopRequest(then="stopping once the current shard is written") as stop, progress_bar() as bar:
        task = bar.add_task("teacher cache", total=n, visible=progress)
        for s in range(n_shards):
            lo, hi = s * shard_rows, min(n, (s + 1) * shard_rows)
            emb_name, param_name = f"emb-{s:05d}.npy", f"params-{s:05d}.npy"
            emb_names.append(emb_name)
            param_names.append(param_name)
            if (out / emb_name).is_file() and (mode == "center" or (out / param_name).is_file()):
                dim = int(np.load(out / emb_name, mmap_mode="r").shape[2])
                bar.advance(task, hi - lo)
                continue  # finished by an earlier, interrupted run
            shard = torch.utils.data.Subset(ds, range(lo, hi))
            emb, params = _embed_shard(teacher, shard, mode, views, batch_size=batch_size, workers=workers,
                                       advance=lambda b: bar.advance(task, b))
            dim = emb.shape[2]
            _save_npy(out / emb_name, emb)
            if mode == "views":
                _save_npy(out / param_name, params)
            embedded += hi - lo
            if lines:
                left = time_left(time.perf_counter() - start, embedded, n - hi)
                logger.info("teacher cache: shard %d/%d written (%d of %d images)%s", s + 1, n_shards, hi, n,
                            f"; about {left} left" if hi < n else "")
            if stop.signal is not None and s < n_shards - 1:
                raise TrainingStopped(
                    f"cache-teacher stopped after {hi} of {n} images ({s + 1} of {n_shards} shards written to "
                    f"{out}); run the same cache-teacher command again to continue from there"
                )
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "parts": parts,
        "teacher_sha256": teacher_sha256,
        "mode": mode,
        "views": views,
        "dim": dim,
        "count": n,
        "shard_rows": shard_rows,
        "emb_shards": emb_names,
        "param_shards": param_names if mode == "views" else [],
        "dtype": "float16",
        **(extra_meta or {}),
    }
    atomic_write_json(out / "meta.json", meta)
    (out / "building.json").unlink(missing_ok=True)
    return open_cache(out)


def _views_of(mode: str, views: int) -> int:
    """Views per image: 1 in mode ``center``, ``views`` (at least 1) in mode ``views``."""
    if mode not in MODES:
        raise DataError(f"unknown cache mode {mode!r}; use one of {', '.join(MODES)}")
    views = 1 if mode == "center" else int(views)
    if views < 1:
        raise DataError("--views must be at least 1")
    return views


def _claim_folder(out: Path, fp: str) -> TeacherCache | None:
    """Make ``out`` the folder of the cache with fingerprint ``fp``: the cache when it is already complete
    there, else None, with ``building.json`` saying which cache the shards present belong to. A folder
    that holds (part of) another cache is refused."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "building.json"
    if (out / "meta.json").is_file():
        existing = open_cache(out)
        if existing.meta.get("fingerprint") == fp:
            logger.info("teacher cache %s is already complete", out)
            return existing
        raise DataError(f"{out} already holds a different teacher cache; choose another --out or delete it")
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") != fp:
        raise DataError(f"{out} holds part of a different teacher cache; choose another --out or delete it")
    atomic_write_json(stamp, {"fingerprint": fp})
    return None


def _embed_shard(teacher: Any, shard, mode: str, views: int, *, batch_size: int, workers: int,
                 advance) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's L2-normalised embeddings of one shard, (rows, V, Dt) float16, and the views'
    parameters, (rows, V, P) (None in mode ``center``); ``advance(images)`` after each batch. The views
    go through the one extraction loop (``embed_batches``) as preprocessed arrays, ``batch_size`` views
    (rounded down to whole images) a run."""
    from compress_edge.data.loaders import StopSafeLoader
    from compress_edge.eval.neighbors import l2_normalize
    from compress_edge.export.embedder import embed_batches

    images_per_batch = max(1, batch_size // views)
    batches = iter(StopSafeLoader(shard, batch_size=images_per_batch, num_workers=workers))  # in this thread
    emb = np.empty((len(shard), views, int(teacher.spec.embed_dim)), dtype=np.float16)
    param_rows: list[np.ndarray] = []

    def load(lo: int, hi: int) -> np.ndarray:  # in the loop's prefetch thread, in order
        x, params, _ = next(batches)
        if mode == "views":
            param_rows.append(params.numpy())
        return x.flatten(0, 1).numpy()

    for lo, feats in embed_batches(teacher, load, 0, len(shard), batch_size=images_per_batch):
        b = len(feats) // views
        emb[lo : lo + b] = l2_normalize(feats).reshape(b, views, -1)
        advance(b)
    return emb, (np.concatenate(param_rows) if mode == "views" else None)


def _save_npy(target: Path, array: np.ndarray) -> None:
    # Through a file handle: np.save would append ".npy" to the temporary name.
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


class CachedTeacherDataset(Dataset):
    """Student images with the cached teacher embedding of the same image: (image, teacher (Dt,), i).

    Mode ``views``: a random recorded view k, its parameters replayed for the student (same pixels;
    at the student's own size when ``augment`` has another one). Mode ``center``: a fresh random
    augmentation for the student (the paper's setting).
    """

    def __init__(self, base, cache: TeacherCache, augment):
        if len(base) != len(cache):
            raise DataError(f"the teacher cache holds {len(cache)} images, the data {len(base)}; they do not match")
        self.base, self.cache, self.augment = base, cache, augment
        self.drawn_at = int(cache.meta["parts"]["transform"]["image_size"])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img = self.base.get_image(i)
        if self.cache.mode == "views":
            k = int(torch.randint(self.cache.views, (1,)).item())
            x = self.augment.apply(img, self.cache.params(i, k), drawn_at=self.drawn_at)
        else:
            k = 0
            x = self.augment(img)
        return x, torch.from_numpy(self.cache.embedding(i, k)), i


class PairedViews:
    """One random view of an image at two sizes, for a live teacher that takes larger images than its
    student: PIL image -> (student view (3, s, s), teacher view (3, S, S)), the same crop, flip,
    colours and (scaled) blur. The parameters are drawn by the teacher's augmentation."""

    def __init__(self, student_augment, teacher_augment):
        self.student, self.teacher = student_augment, teacher_augment

    def __call__(self, img):
        x_teacher, params = self.teacher.sample_and_apply(img)
        return self.student.apply(img, params, drawn_at=self.teacher.image_size), x_teacher


class WithCenterView:
    """PIL image -> (student view: a random augmentation, teacher view: the whole image as evaluated,
    resized and centre-cropped), for a live teacher that embeds the centre view (``--teacher-view
    center``), as the cache's mode ``center`` does."""

    def __init__(self, student_augment, center):
        self.student, self.center = student_augment, center

    def __call__(self, img):
        return self.student(img), self.center(img)


class PairedDataset(Dataset):
    """(student view, teacher view, index) from a dataset whose transform is :class:`PairedViews` or
    :class:`WithCenterView`."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        (student, teacher), _, index = self.base[i]
        return student, teacher, index
