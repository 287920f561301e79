"""The index folder on disk (INDEX_DIR): its sidecar and its generations.

- ``index.json``: the sidecar, and the commit point. It names the ModelSpec the embeddings came from,
  the items (ids, file paths relative to ``root``, labels, class names), the index key and search
  parameters, the tuning results and the build record, and which generation folder and embedding
  manifests are current.
- ``vNNNN/index.faiss`` (+ ``vNNNN/index.ivfdata`` for an on-disk IVF index): one generation of the
  FAISS index. A change (build, add, remove) writes a new generation folder and then the sidecar, each
  atomically, so a crash at any point leaves the previous index and sidecar intact.
- ``embeddings/``: the embeddings in shards (see :mod:`compress_edge.retrieval.shards`).
- ``.lock``: held by the one process changing the folder (see :mod:`compress_edge.retrieval.lock`).

Reading checks the sidecar field by field (ids, files, labels within the classes, the files it names
stay inside the folder) and that the embedding store it lists is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from compress_edge.retrieval.faiss_index import faiss_message
from compress_edge.retrieval.safety import shown
from compress_edge.retrieval.shards import EMBEDDINGS_DIR

from compress_edge.errors import IndexFileError
from compress_edge.storage import atomic_path, atomic_write_json, sha256_file

INDEX_FORMAT = "compress-edge-index"
INDEX_VERSION = 1
SIDECAR = "index.json"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
TRAINED_FILE = "trained.faiss"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    side = path / SIDECAR if path.is_dir() or not path.name.endswith(".json") else path
    if not side.is_file():
        raise IndexFileError(f"no index at {path} ({SIDECAR} is missing); build one with "
                             f"'compress-edge index build MODEL DATA --out {path}'")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{side} is damaged ({exc}); rebuild the index") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{side} is not a compress-edge index sidecar; rebuild the index")
    if int(meta.get("version", 0)) > INDEX_VERSION:
        raise IndexFileError(f"{side} was written by a newer compress-edge (format {meta['version']}); upgrade")
    for key in ("spec", "index", "dim"):
        if key not in meta:
            raise IndexFileError(f"{side} has no {key!r}; rebuild the index")
    return meta


_GENERATION_FILE = re.compile(r"v\d{4,}/index\.(faiss|ivfdata)")


def check_sidecar(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Check the sidecar field by field (ids, files, labels, classes, the files it names) and that the
    embedding store it lists is there; IndexFileError naming what is wrong otherwise."""
    side = Path(path) / SIDECAR

    def bad(what: str) -> IndexFileError:
        return IndexFileError(f"{side} is damaged: {what}; rebuild the index with 'compress-edge index build'")

    ids = meta.get("ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise bad("its ids are not a list of integers")
    if any(b <= a for a, b in zip(ids, ids[1:], strict=False)) or (ids and ids[0] < 0):
        raise bad("its ids are not sorted, distinct and non-negative")
    n = len(ids)
    files, labels, classes = meta.get("files"), meta.get("labels"), meta.get("classes") or []
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise bad("its file list is not a list of paths")
    if files is not None and len(files) != n:
        raise bad(f"it lists {len(files)} files for {n} ids")
    if files is None and isinstance(meta.get("build"), dict) and meta["build"].get("images"):
        raise bad("it was built from images but lists no files")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("its class list is not a list of names")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise bad("its labels are not a list of integers")
        if len(labels) != n:
            raise bad(f"it lists {len(labels)} labels for {n} ids")
        wrong = [v for v in labels if not -1 <= v < len(classes)]
        if wrong:
            raise bad(f"label {wrong[0]} is not one of its {len(classes)} classes" if classes
                      else "it has labels but no class names")
    if meta.get("root") is not None and not isinstance(meta["root"], str):
        raise bad("its 'root' is not a path")
    roots = meta.get("roots") or []
    if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
        raise bad("its 'roots' are not absolute folders")
    info = meta.get("index")
    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        raise bad("it names no index file")
    for key in ("file", "ivfdata"):
        if info.get(key) is not None and not (isinstance(info[key], str) and _GENERATION_FILE.fullmatch(info[key])):
            raise bad(f"its index file {shown(info[key])!r} is not a generation file inside the index folder")
    if not isinstance(meta.get("next_id", 0), int) or (ids and meta.get("next_id", ids[-1] + 1) <= ids[-1]):
        raise bad("its next_id is not above every id")
    _check_store(Path(path), meta, bad)


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _check_store(path: Path, meta: dict[str, Any], bad: Any) -> None:
    """The embedding store the sidecar lists: every manifest and every shard it names is there."""
    manifests = meta.get("manifests") or []
    if not isinstance(manifests, list) or not all(_plain_name(m) for m in manifests):
        raise bad("its manifests are not file names inside embeddings/")
    folder = path / EMBEDDINGS_DIR
    for name in manifests:
        file = folder / name
        try:
            shards = json.loads(file.read_text(encoding="utf-8"))["shards"]
        except FileNotFoundError:
            raise IndexFileError(f"the embedding store {folder} is missing {shown(name)} (removal and rebuilds need "
                                 "it); rebuild the index with 'compress-edge index build'") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"the embeddings manifest {file} is damaged ({shown(faiss_message(exc))}); rebuild the "
                                 "index") from None
        for shard in shards if isinstance(shards, list) else [None]:
            names = [shard.get("x"), shard.get("ids")] if isinstance(shard, dict) else [None]
            if not all(_plain_name(v) for v in names):
                raise IndexFileError(f"the embeddings manifest {file} names shards outside {folder}; rebuild the index")
            for v in names:
                if not (folder / v).is_file():
                    raise IndexFileError(f"the embedding store {folder} is missing {shown(v)} (removal and rebuilds "
                                         "need it); rebuild the index with 'compress-edge index build'")


def named_classes(classes: Sequence[str] | None, labels: Sequence[int] | np.ndarray | None) -> list[str]:
    """The class names, with a numeric name for each label beyond them (the sidecar names every label)."""
    names = [str(c) for c in classes or []]
    top = int(np.max(labels)) if labels is not None and len(labels) else -1
    return names + [str(i) for i in range(len(names), top + 1)]


def next_generation_dir(path: Path, meta: dict[str, Any]) -> Path:
    gen = int(meta.get("generation", 0)) + 1
    while (path / f"v{gen:04d}").exists():
        gen += 1
    return path / f"v{gen:04d}"


def write_generation(index: faiss.Index, path: Path, gen_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``index`` into ``gen_dir``, then the sidecar pointing at it; drop older generations."""
    gen_dir.mkdir(parents=True, exist_ok=True)
    file = gen_dir / INDEX_FILE
    with atomic_path(file, suffix=".faiss") as tmp:
        faiss.write_index(index, str(tmp))
    info = meta["index"]
    info["file"] = str(file.relative_to(path))
    ivf = gen_dir / IVFDATA_FILE
    info["ivfdata"] = str(ivf.relative_to(path)) if ivf.exists() else None
    info["file_bytes"] = file.stat().st_size
    info["file_sha256"] = sha256_file(file)
    total = info["file_bytes"] + (ivf.stat().st_size if ivf.exists() else 0)
    info["bytes"] = total
    info["bytes_per_vector"] = total / max(1, index.ntotal)
    meta["generation"] = int(gen_dir.name[1:])
    meta["ntotal"] = int(index.ntotal)
    tuning = meta.get("tuning")
    if isinstance(tuning, dict) and not tuning.get("skipped"):
        tuning["bytes_per_vector"] = info["bytes_per_vector"]
        tuning["index_bytes"] = total
    atomic_write_json(path / SIDECAR, meta)
    for old in path.glob("v[0-9][0-9][0-9][0-9]"):
        if old.is_dir() and old != gen_dir:
            shutil.rmtree(old, ignore_errors=True)
    drop_unused_shards(path, meta)


def drop_unused_shards(path: Path, meta: dict[str, Any]) -> None:
    folder = path / EMBEDDINGS_DIR
    if not folder.is_dir():
        return
    keep = set()
    for name in meta.get("manifests") or []:
        keep.add(name)
        try:
            for s in json.loads((folder / name).read_text(encoding="utf-8"))["shards"]:
                keep.update((s["x"], s["ids"]))
        except (OSError, json.JSONDecodeError, KeyError):
            return  # leave everything when unsure
    for f in folder.iterdir():
        if f.is_file() and f.name not in keep and not f.name.startswith("."):
            with contextlib.suppress(OSError):
                f.unlink()


def refuse_existing(out: Path, overwrite: bool) -> int:
    """The generation a new build writes; IndexFileError when ``out`` holds an index and not overwrite."""
    side = out / SIDECAR
    if side.is_file():
        if not overwrite:
            raise IndexFileError(f"{out} already holds an index; pass --overwrite to replace it, or use "
                                 "'compress-edge index add' to add images to it")
        try:
            return int(json.loads(side.read_text(encoding="utf-8")).get("generation", 0)) + 1
        except (json.JSONDecodeError, OSError):
            return 1
    return 1
