"""Embeddings on disk, in shards, and the one extraction loop that writes them.

A gallery's embeddings live in ``INDEX_DIR/embeddings/`` as pairs of ``.npy`` files, float32 (n, D)
vectors and int64 (n,) ids, read back memory-mapped, so a gallery larger than memory is streamed
shard by shard (training sample, adding to the index, exact ground truth). Each writer (a build, a
``torchrun`` rank, an ``index add``) writes its own shards and then a small manifest naming them;
the index sidecar lists the manifests it uses, so shards left by an interrupted run are ignored.

Torch-free: numpy, PIL and the image helpers only (Fashion-MNIST galleries import ``compress_edge.data.datasets``,
which needs torch, when they are opened). DATA arguments are read with the one DATA grammar,
:mod:`compress_edge.data.grammar`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.retrieval.safety import check_finite
from PIL import Image

from compress_edge.data.grammar import names_dataset, resolve_path
from compress_edge.data.images import open_image, scan_images
from compress_edge.errors import DataError, IndexFileError
from compress_edge.eval.neighbors import l2_normalize
from compress_edge.signals import Interrupted
from compress_edge.storage import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

#: Rows per shard file (64 Ki rows of 128-d float32 = 32 MiB).
SHARD_ROWS = 65_536
EMBEDDINGS_DIR = "embeddings"
MANIFEST_SUFFIX = ".manifest.json"
#: The shards an interrupted writer finished (see :class:`ShardWriter`'s ``resume_key``).
PARTIAL_SUFFIX = ".partial.json"


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------
class ShardWriter:
    """Write embeddings (with their ids) as shards of ``shard_rows`` rows under ``folder``.

    ``prefix`` names this writer's files (``<prefix>-00000.npy``, ``<prefix>-00000.ids.npy``) and
    its manifest ``<prefix>.manifest.json``, written by :meth:`close` once every shard is on disk.
    Each file is written atomically.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, dim: int, shard_rows: int = SHARD_ROWS,
                 extra: dict[str, Any] | None = None, resume_key: str | None = None) -> None:
        if shard_rows <= 0:
            raise DataError(f"shard_rows must be positive, got {shard_rows}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.dim = int(dim)
        self.shard_rows = int(shard_rows)
        self.extra = dict(extra or {})
        self.shards: list[dict[str, Any]] = []
        self._x: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._buffered = 0
        self.rows = 0
        #: With a key, each full shard is recorded in ``<prefix>.partial.json`` as it is written, and a
        #: writer with the same key (the same model, images and split) starts after the shards there.
        self.resume_key = resume_key
        if resume_key is not None:
            self._resume()

    @property
    def buffered(self) -> int:
        """Rows written but not yet in a shard file."""
        return self._buffered

    @property
    def _partial(self) -> Path:
        return self.folder / f"{self.prefix}{PARTIAL_SUFFIX}"

    def _resume(self) -> None:
        try:
            record = json.loads(self._partial.read_text())
            shards = record["shards"]
            if (record["key"] != self.resume_key or record["dim"] != self.dim
                    or record["shard_rows"] != self.shard_rows
                    or not all((self.folder / sh["x"]).is_file() and (self.folder / sh["ids"]).is_file()
                               for sh in shards)):
                return
            rows = sum(int(sh["rows"]) for sh in shards)
        except (OSError, ValueError, KeyError, TypeError):  # none, or damaged: start afresh
            return
        self.shards, self.rows = list(shards), rows

    def write(self, x: np.ndarray, ids: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.dim or len(ids) != len(x):
            raise DataError(f"expected ({len(ids)}, {self.dim}) embeddings, got {x.shape}")
        self._x.append(x)
        self._ids.append(ids)
        self._buffered += len(x)
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        x = np.concatenate(self._x) if len(self._x) > 1 else self._x[0]
        ids = np.concatenate(self._ids) if len(self._ids) > 1 else self._ids[0]
        head_x, head_ids = x[:rows], ids[:rows]
        self._x = [x[rows:]] if rows < len(x) else []
        self._ids = [ids[rows:]] if rows < len(ids) else []
        self._buffered = len(x) - rows
        name = f"{self.prefix}-{len(self.shards):05d}"
        for suffix, arr in ((".npy", head_x), (".ids.npy", head_ids)):
            with atomic_path(self.folder / f"{name}{suffix}", suffix=".npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
        self.shards.append({"x": f"{name}.npy", "ids": f"{name}.ids.npy", "rows": int(len(head_x))})
        self.rows += len(head_x)
        if self.resume_key is not None:
            atomic_write_json(self._partial, {"key": self.resume_key, "dim": self.dim, "shard_rows": self.shard_rows,
                                              "shards": self.shards})

    def close(self) -> str:
        """Write what is buffered and the manifest; return the manifest's file name."""
        if self._buffered:
            self._flush(self._buffered)
        manifest = f"{self.prefix}{MANIFEST_SUFFIX}"
        atomic_write_json(self.folder / manifest, {"dim": self.dim, "rows": self.rows, "shards": self.shards,
                                                   **self.extra})
        self._partial.unlink(missing_ok=True)
        return manifest


@dataclass
class EmbeddingStore:
    """The embeddings named by some manifests under ``folder``, read memory-mapped.

    ``live``: when given, only rows whose id is in it count (ids removed from an index stay in the
    shards until the index is rebuilt).
    """

    folder: Path
    manifests: list[str]
    dim: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    live: np.ndarray | None = None  # sorted int64 ids

    @classmethod
    def open(cls, folder: str | os.PathLike, manifests: Sequence[str] | None = None,
             live: Sequence[int] | np.ndarray | None = None) -> EmbeddingStore:
        folder = Path(folder)
        if manifests is None:
            manifests = sorted(p.name for p in folder.glob(f"*{MANIFEST_SUFFIX}"))
        shards: list[dict[str, Any]] = []
        dim = None
        for name in manifests:
            path = folder / name
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise IndexFileError(f"the embeddings manifest {path} is missing; rebuild the index") from None
            except json.JSONDecodeError as exc:
                raise IndexFileError(f"the embeddings manifest {path} is damaged ({exc}); rebuild the index") from None
            if dim is not None and int(meta["dim"]) != dim:
                raise IndexFileError(f"{path} holds {meta['dim']}-d embeddings, the others {dim}-d")
            dim = int(meta["dim"])
            shards.extend(meta["shards"])
        live_arr = None if live is None else np.unique(np.asarray(live, dtype=np.int64))
        return cls(folder=folder, manifests=list(manifests), dim=int(dim or 0), shards=shards, live=live_arr)

    def __len__(self) -> int:
        if self.live is not None:
            return int(len(self.live))
        return int(sum(s["rows"] for s in self.shards))

    def _load(self, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        try:
            x = np.load(self.folder / shard["x"], mmap_mode="r")
            ids = np.load(self.folder / shard["ids"])
        except FileNotFoundError as exc:
            raise IndexFileError(f"embedding shard {exc.filename} is missing; rebuild the index") from None
        except ValueError as exc:
            raise IndexFileError(f"embedding shard {self.folder / shard['x']} is damaged ({exc}); rebuild") from None
        if x.ndim != 2 or x.shape[1] != self.dim or len(x) != len(ids) or len(x) != shard["rows"]:
            raise IndexFileError(f"embedding shard {self.folder / shard['x']} does not match its manifest; rebuild")
        return x, ids

    def iter_shards(self, exclude: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x float32 (n, D), ids int64 (n,)) per shard: live rows, minus ``exclude`` ids."""
        for shard in self.shards:
            x, ids = self._load(shard)
            keep = None
            if self.live is not None:
                keep = np.isin(ids, self.live, assume_unique=False)
            if exclude is not None and len(exclude):
                out = ~np.isin(ids, exclude)
                keep = out if keep is None else keep & out
            if keep is None:
                yield x, ids
            elif keep.any():
                yield np.asarray(x[keep]), ids[keep]

    def ids(self) -> np.ndarray:
        return np.concatenate([ids for _, ids in self.iter_shards()]) if self.shards else np.zeros(0, np.int64)

    def gather(self, wanted: np.ndarray) -> np.ndarray:
        """float32 (len(wanted), D): the vectors of ids ``wanted``, in that order."""
        wanted = np.asarray(wanted, dtype=np.int64)
        out = np.zeros((len(wanted), self.dim), dtype=np.float32)
        found = np.zeros(len(wanted), dtype=bool)
        pos = {int(v): i for i, v in enumerate(wanted.tolist())}
        for x, ids in self.iter_shards():
            hit = np.isin(ids, wanted)
            for row in np.flatnonzero(hit):
                i = pos[int(ids[row])]
                out[i] = x[row]
                found[i] = True
        if not found.all():
            missing = wanted[~found][:5].tolist()
            raise IndexFileError(f"ids {missing} are not in the stored embeddings; rebuild the index")
        return out

    def sample(self, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
        """float32 (min(n, len), D): rows drawn without replacement (for training an index)."""
        ids = self.ids()
        if exclude is not None and len(exclude):
            ids = ids[~np.isin(ids, exclude)]
        if n >= len(ids):
            return self.to_array(exclude=exclude)[0]
        return self.gather(np.sort(rng.choice(ids, size=n, replace=False)))

    def to_array(self, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Everything in memory: (x float32 (N, D), ids int64 (N,))."""
        xs, idss = [], []
        for x, ids in self.iter_shards(exclude=exclude):
            xs.append(np.asarray(x, dtype=np.float32))
            idss.append(ids)
        if not xs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(idss)


def write_embeddings(folder: str | os.PathLike, prefix: str, x: np.ndarray, ids: np.ndarray | None = None,
                     shard_rows: int = SHARD_ROWS) -> str:
    """Write an in-memory array as shards; return the manifest's name. ids default to 0..N-1."""
    x = np.asarray(x, dtype=np.float32)
    ids = np.arange(len(x), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    writer = ShardWriter(folder, prefix, x.shape[1], shard_rows)
    for i in range(0, len(x), shard_rows):
        writer.write(x[i : i + shard_rows], ids[i : i + shard_rows])
    return writer.close()


# --------------------------------------------------------------------------------------------------
# Galleries: what gets embedded
# --------------------------------------------------------------------------------------------------
@dataclass
class Gallery:
    """Images to embed and what the index records about each.

    files: per image, a path relative to ``root``, an absolute path, or a dataset id such as
    "fashion-mnist:train/00042". labels: class index per image (-1 unknown), or None for none.
    load(i): the i-th image (a PIL image or a path ``preprocess_batch`` accepts).
    """

    files: list[str]
    labels: list[int] | None
    classes: list[str]
    root: str | None
    load: Callable[[int], Image.Image | str]
    sources: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def open_gallery(data: Sequence[str], *, data_root: str | None = None, classes: Sequence[str] | None = None,
                 root: str | None = None, progress: bool | None = None) -> Gallery:
    """Open DATA arguments (folders, image files, fashion-mnist:train|test) as one :class:`Gallery`.

    Each is read with the DATA grammar (:mod:`compress_edge.data.grammar`): a dataset name (with its
    ``@N``) is opened by :func:`compress_edge.data.datasets.open_dataset`; anything else is an image
    file or folder, a relative one looked up under ``data_root`` when it is not in the working directory.

    classes: class names already in an index (labels are mapped by name; new names are appended).
    root: the folder file paths are recorded relative to (default: the common folder of the inputs).
    progress: False hides the "checking images" bar of a large folder (a command's --no-progress, or a
    rank other than 0); None shows it for large folders.
    """
    quiet = False if progress is False else None
    if not data:
        raise DataError("no images given: pass image folders, image files or fashion-mnist:train|test")
    class_names = list(classes or [])
    entries: list[tuple[str, Any, int]] = []  # (absolute path or dataset id, loader payload, label)
    sources = []
    datasets: dict[str, Any] = {}
    for item in data:
        if names_dataset(item):
            from compress_edge.data.datasets import open_dataset  # needs torch: only for this kind of DATA

            ds = open_dataset(item, data_root=data_root, progress=quiet)
            datasets[ds.name] = ds
            names = [class_names.index(c) if c in class_names else _append(class_names, c) for c in ds.classes]
            for i, f in enumerate(ds.files):
                entries.append((f, (ds.name, i), names[int(ds.labels[i])]))
            sources.append({"data": item, "kind": ds.kind, "images": len(ds)})
            continue
        path = resolve_path(item, data_root)
        if path.is_file():
            open_image(path)  # a clear error now for an unreadable file
            entries.append((str(path.resolve()), None, -1))
            sources.append({"data": item, "kind": "file", "images": 1})
            continue
        if not path.is_dir():
            raise DataError(f"no such file or folder: {item}; pass image folders, image files or "
                            "fashion-mnist:train|test")
        scan = scan_images(path, progress=quiet)
        names = [class_names.index(c) if c in class_names else _append(class_names, c) for c in scan.classes]
        for f, label in zip(scan.files, scan.labels, strict=True):
            entries.append((str(Path(f).resolve()), None, names[label] if label >= 0 else -1))
        sources.append({"data": item, "kind": "class-folder" if scan.labelled else "image-folder",
                        "images": len(scan.files), "skipped": len(scan.skipped)})

    disk = [p for p, payload, _ in entries if payload is None]
    if root is None and disk:
        root = os.path.commonpath([os.path.dirname(p) for p in disk])
    files = []
    for p, payload, _ in entries:
        if payload is not None:
            files.append(p)
        else:
            rel = os.path.relpath(p, root) if root else p
            files.append(p if rel.startswith("..") else rel)
    labels = [lab for _, _, lab in entries]
    has_labels = any(lab >= 0 for lab in labels)

    def load(i: int) -> Image.Image | str:
        path, payload, _ = entries[i]
        if payload is None:
            return path
        name, j = payload
        return datasets[name].get_image(j)

    return Gallery(files=files, labels=labels if (has_labels or class_names) else None, classes=class_names,
                   root=root, load=load, sources=sources)


def _append(names: list[str], name: str) -> int:
    names.append(name)
    return len(names) - 1


# --------------------------------------------------------------------------------------------------
# Extraction: the one loop that turns images into embeddings
# --------------------------------------------------------------------------------------------------
def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's rank and the world size: as given, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if w < 1 or not 0 <= r < w:
        raise DataError(f"rank {r} is not in a world of {w} processes")
    return r, w


def extract_embeddings(
    embedder: Any,
    gallery: Gallery,
    folder: str | os.PathLike,
    *,
    prefix: str,
    ids: np.ndarray | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    shard_rows: int = SHARD_ROWS,
    progress: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    extra: dict[str, Any] | None = None,
    resume_key: str | None = None,
) -> str:
    """Embed ``gallery`` with ``embedder`` and write L2-normalised shards; return the manifest name.

    ``resume_key`` (what makes the embeddings the same: model, images): shards finished by an
    interrupted call with the same key, prefix and rank are kept and the embedding goes on after them.

    Under ``torchrun`` (or with ``rank`` / ``world_size``) this process embeds only its contiguous
    part of the gallery and writes ``<prefix>-r<rank>`` shards. Images are decoded and preprocessed in
    ``workers`` threads while the previous batch is embedded. ``ids`` (int64 (N,)) default to 0..N-1.
    """
    r, w = rank_and_world(rank, world_size)
    n = len(gallery)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    lo, hi = r * n // w, (r + 1) * n // w
    spec = embedder.spec
    key = None if resume_key is None else f"{resume_key}|{r}/{w}"
    writer = ShardWriter(folder, f"{prefix}-r{r}", int(spec.embed_dim), shard_rows,
                         extra={"rank": r, "world_size": w, "first": lo, "last": hi, **(extra or {})}, resume_key=key)
    if writer.rows:
        log.info("continuing an interrupted embedding: %d of %d images are in the shards it finished", writer.rows,
                 hi - lo)
    from compress_edge.export.embedder import embed_batches

    def load(first: int, end: int) -> list:
        return [gallery.load(i) for i in range(first, end)]

    from compress_edge.progress import shows_bar, time_left

    t0, resumed_rows = time.perf_counter(), writer.rows
    lines = not shows_bar(progress)  # without a bar, a line per shard written, with the time left
    model = getattr(embedder, "path", None) or spec.arch
    try:
        for start, x in embed_batches(embedder, load, lo + writer.rows, hi, batch_size=batch_size, workers=workers,
                                      progress=progress):
            shards = len(writer.shards)
            writer.write(l2_normalize(check_finite(x, model)), ids[start : start + len(x)])
            if lines and len(writer.shards) > shards and writer.rows < hi - lo:
                log.info("embedded %d of %d images (shard %d written); about %s left", writer.rows, hi - lo,
                         len(writer.shards), time_left(time.perf_counter() - t0, writer.rows - resumed_rows,
                                                       hi - lo - writer.rows))
    except (KeyboardInterrupt, Interrupted):
        if key is not None and writer.rows:
            log.warning("stopped after %d of %d images: the %d in finished shards are kept, and the same command "
                        "run again continues from there", writer.rows + writer.buffered, hi - lo, writer.rows)
        raise
    manifest = writer.close()
    log.debug("rank %d embedded %d images in %.1f s", r, hi - lo, time.perf_counter() - t0)
    return manifest


def wait_for_manifests(folder: str | os.PathLike, names: Sequence[str], token: str,
                       timeout: float = 7 * 24 * 3600.0, poll: float = 2.0) -> None:
    """Wait until every manifest in ``names`` exists and carries ``token`` (the other ranks are done)."""
    folder = Path(folder)
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        still = []
        for name in pending:
            try:
                meta = json.loads((folder / name).read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError):
                still.append(name)
                continue
            if meta.get("token") != token:
                still.append(name)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise IndexFileError(f"gave up waiting for the other ranks' embeddings ({', '.join(pending)})")
            time.sleep(poll)
