"""``compress-edge serve``: an index and its model behind a small HTTP API and a static web page.

>>> from compress_edge.retrieval.serve import SearchService, create_app
>>> service = SearchService("runs/index", model="student.onnx")
>>> app = create_app(service)          # an ASGI app: run it with uvicorn (what ``run_server`` does)

Routes (every answer but the page, its files and thumbnails is JSON; errors are ``{"error": ...}``
with a 4xx/5xx status):

- ``GET /``: the page (``static/index.html``, ``app.js``, ``style.css``, shipped in the package: no
  CDN, no build step).
- ``POST /search``: a multipart upload (field ``image``; optional fields ``k`` and ``param``) or JSON
  ``{"id": N, "k": 10, "param": 16}`` (a gallery item, searched with its stored embedding, itself left
  out); ``k`` and ``param`` also in the query string (``/search?k=5``), the body's first. Answers the
  neighbours (id, path as stored, label, score), the weighted kNN vote of a labelled index, timings
  (decode, embed, search ms) and the model and index versions.
- ``GET /health``, ``GET /info`` (ModelSpec, index type, size, search parameter, tuned recall, limits),
  ``GET /gallery?offset=&limit=`` (a page of gallery items), ``GET /thumb/{id}`` (a gallery image as a
  PNG thumbnail).

Safety. Thumbnails are looked up by id only: the path comes from the index, never from the request,
and a stored path that leads outside the gallery (``../``, an absolute path elsewhere, a symlink whose
target is elsewhere) is refused with 403. Requests are bounded: the upload's bytes (Content-Length and
the bytes actually read), its pixels (checked from the header before decoding: PIL's decompression-bomb
guard plus a limit of our own), k, the search parameter, and the number of searches running at once
(one more gets 503 at once rather than a queue). A bad upload (0 bytes, not an image, truncated, a
bomb) is a 4xx JSON answer; the server goes on serving.

An index changed by another process (``index add`` / ``remove`` commit a new generation, then its
sidecar) is reopened by the next request that finds the sidecar replaced (looked at at most once a
second), under the search lock; a generation that cannot be served is logged and the old one kept.

Why Starlette + uvicorn rather than the standard library: ``http.server`` is documented as not for
production (no request-size limits, one thread per connection, no keep-alive discipline) and the
stdlib no longer parses multipart bodies (``cgi`` was removed in Python 3.13), so a hand-written
parser would be the riskiest code here. Starlette (routing, requests, responses) with python-multipart
(the upload parser, with limits on parts and fields) and uvicorn (an asyncio HTTP/1.1 server) are
small, pure-Python or with wheels for ARM boards, well kept and torch-free; FastAPI would add pydantic
for five routes. The model and FAISS run in Starlette's thread pool so the event loop keeps answering
/health while a search runs.

Torch-free with an ONNX model (numpy, PIL, onnxruntime, faiss + the server packages of the ``device``
extra). Thumbnails of Fashion-MNIST items (an index built from ``fashion-mnist:train``) need the
PyTorch install that reads the dataset; without it they are answered 404 and the page shows a blank.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.retrieval.faiss_index import index_kind, search_parameter
from compress_edge.retrieval.folder import RetrievalIndex, open_index
from compress_edge.retrieval.knn import DEFAULT_TEMPERATURE, knn_classify
from compress_edge.retrieval.safety import check_model, is_inside, shown
from compress_edge.retrieval.search import Searcher, predictions_of
from compress_edge.retrieval.sidecar import SIDECAR
from PIL import Image, ImageOps, UnidentifiedImageError

from compress_edge import __version__
from compress_edge.data.images import to_rgb
from compress_edge.errors import CompressEdgeError, DependencyError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The page's files: name -> media type. Nothing else under static/ is served.
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
#: The largest value of a search parameter a request may ask for (FAISS's sweeps stop there too).
MAX_SEARCH_PARAM = 2048
#: Formats an upload may have. Others (EPS, which PIL hands to Ghostscript; PSD, ICO, ...) are refused
#: before any decoder runs.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
THUMB_SIZE = 160
#: How often (seconds) requests look whether another process changed the index being served.
RELOAD_CHECK_SECONDS = 1.0
THUMB_CACHE = 1024
GALLERY_PAGE_MAX = 200
#: Multipart framing (boundaries, part headers) on top of the image's own bytes; also the largest JSON body.
FORM_OVERHEAD = 64 * 1024
SERVER_PACKAGES = "starlette uvicorn python-multipart"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. max_bytes: an upload's size; max_pixels: its width x height
    (also checked before PIL decodes anything); max_k: neighbours; max_concurrent: searches running
    at once (the next one is refused with 503)."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_k: int = 100
    default_k: int = 10
    max_concurrent: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class RequestError(CompressEdgeError):
    """A request the server refuses: an HTTP status and a one-line reason sent back as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------
# Decoding an upload
# --------------------------------------------------------------------------------------------------
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


def decode_upload(data: bytes, limits: Limits) -> Image.Image:
    """The uploaded bytes as an 8-bit RGB image (EXIF orientation applied), or RequestError: 400 for
    0 bytes, not an image, a truncated or damaged one; 413 for too many bytes or pixels."""
    if not data:
        raise RequestError(400, "the upload is empty (0 bytes); send an image file")
    if len(data) > limits.max_bytes:
        raise RequestError(413, f"the upload has {len(data):,} bytes; the limit is {limits.max_bytes:,}")
    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image has more pixels than this server takes ({limits.max_pixels:,})") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"the upload is not an image in a format this server takes "
                                f"({', '.join(UPLOAD_FORMATS)})") from None
    except _DECODE_ERRORS as exc:
        raise RequestError(400, f"the image's header is damaged ({_short(exc)})") from None
    try:
        if im.width * im.height > limits.max_pixels:
            raise RequestError(413, f"the image is {im.width} x {im.height} pixels; the limit is "
                                    f"{limits.max_pixels:,} pixels")
        try:
            im.load()
        except _DECODE_ERRORS as exc:
            raise RequestError(400, f"the image is truncated or damaged ({_short(exc)})") from None
        upright = im
        with contextlib.suppress(Exception):  # a broken EXIF block: keep the pixels as they are
            upright = ImageOps.exif_transpose(im) or im
        try:
            return to_rgb(upright)
        except ValueError as exc:
            raise RequestError(400, f"unsupported colour mode {im.mode!r} ({_short(exc)})") from None
    finally:
        im.close()


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------
# The service: an index, its model, and what a request may ask of them
# --------------------------------------------------------------------------------------------------
class SearchService:
    """An index opened with the model that embeds its queries, answering the routes' questions.

    index / model / backend / device / threads / root / trust_model: as for :class:`Searcher` (the model
    defaults to the one the index records; one whose ModelSpec is not the index's is refused here, before
    the server starts). limits: see :class:`Limits`.
    """

    def __init__(self, index: RetrievalIndex | str | os.PathLike, model: Any = None, *, backend: str = "auto",
                 device: str = "cpu", threads: int | None = None, root: str | os.PathLike | None = None,
                 trust_model: bool = False, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.searcher = Searcher(index, model, backend=backend, device=device, threads=threads, root=root,
                                 trust_model=trust_model)
        self.index = self.searcher.index
        self.root = str(root) if root is not None else self.index.root
        self._trust_model = trust_model
        self._adopt(self.index)
        self._stamp = _sidecar_stamp(self.index.path)
        self._checked = time.monotonic()
        self._reload_lock = threading.Lock()
        # FAISS search parameters are set on the shared index for one call and restored after it: one
        # search at a time. Embedding (onnxruntime, thread-safe) runs outside the lock.
        self._search_lock = threading.Lock()
        # onnxruntime sessions run concurrently; a TensorRT execution context or a torch model in eval
        # mode shared by threads is not documented as safe: one embedding at a time for those.
        self._embed_lock = contextlib.nullcontext() if self.searcher.embedder.name == "onnxruntime" else threading.Lock()
        self._rows: tuple | None = None
        self._rows_lock = threading.Lock()
        self._thumb = functools.lru_cache(maxsize=THUMB_CACHE)(self._thumbnail)

    def _adopt(self, index: RetrievalIndex) -> None:
        """Serve ``index``: what every request reads of it, set together."""
        self.searcher.index = self.index = index
        self.parameter = search_parameter(index.index)
        self.labelled = index.labels is not None and bool((index.labels >= 0).any())

    # -- an index changed by another process (index add / remove) ----------------------------------------
    def refresh(self) -> bool:
        """Reopen the index when another process has committed a new generation of it (``index add`` or
        ``remove`` while the server runs): looked at (one ``stat``) at most every RELOAD_CHECK_SECONDS.
        A new generation that cannot be opened, or whose model is not this one, is logged and the one
        being served stays. Returns whether the index was reopened."""
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return False
        with self._reload_lock:
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return False
            self._checked = time.monotonic()
            stamp = _sidecar_stamp(self.index.path)
            if stamp is None or stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                index = open_index(self.index.path)
                check_model(index.spec, self.searcher.embedder, index.meta, what=f"the index {shown(index.path)}",
                            trust=self._trust_model)
            except CompressEdgeError as exc:
                log.warning("the index %s changed but cannot be served (%s); still serving generation %s",
                            shown(self.index.path), exc, self.index.meta.get("generation"))
                return False
            with self._search_lock, self._rows_lock:
                self._adopt(index)
                self._rows = None
                self._thumb.cache_clear()
            log.info("the index changed: now serving generation %s, %d vectors", index.meta.get("generation"),
                     index.ntotal)
            return True

    # -- what it is ------------------------------------------------------------------------------------
    def versions(self) -> dict[str, Any]:
        spec = self.index.spec
        meta = self.index.meta
        return {
            "compress_edge": __version__,
            "model": {"arch": spec.arch, "weights_sha256": spec.weights_sha256,
                      "file_sha256": (meta.get("model_file") or {}).get("sha256"),
                      "backend": self.searcher.embedder.name},
            "index": {"generation": meta.get("generation"), "file_sha256": meta["index"].get("file_sha256"),
                      "created": meta.get("created"), "updated": meta.get("updated")},
        }

    def info(self) -> dict[str, Any]:
        idx = self.index
        tuning = dict(idx.meta.get("tuning") or {})
        k = tuning.get("k", 10)
        embedder = self.searcher.embedder
        return {
            "model": {"spec": idx.spec.to_dict(), "backend": embedder.name, "file": Path(str(embedder.path)).name,
                      "precision": getattr(embedder, "precision", "unknown")},
            "index": {"key": idx.key, "kind": index_kind(idx.index), "vectors": idx.ntotal, "dim": idx.dim,
                      "bytes": idx.meta["index"].get("bytes"), "labelled": self.labelled, "classes": idx.classes,
                      "search_parameter": self.parameter, "search_params": idx.search_params,
                      "tuned": None if not tuning or tuning.get("skipped") else {
                          "k": k, "target_recall": tuning.get("target_recall"),
                          "recall_at_1": tuning.get("recall_at_1"), f"recall_at_{k}": tuning.get(f"recall_at_{k}"),
                          "recall_at_k": tuning.get(f"recall_at_{k}"), "target_met": tuning.get("target_met", True)}},
            "limits": {**self.limits.to_dict(), "max_search_param": MAX_SEARCH_PARAM},
            "temperature": DEFAULT_TEMPERATURE,
            "versions": self.versions(),
        }

    def gallery(self, offset: int = 0, limit: int = 48) -> dict[str, Any]:
        """A page of gallery items: id, label, the file's name (never where it lives)."""
        idx = self.index
        offset = max(0, int(offset))
        limit = max(1, min(int(limit), GALLERY_PAGE_MAX))
        items = []
        for pos in range(offset, min(offset + limit, len(idx.ids))):
            label = int(idx.labels[pos]) if idx.labels is not None and idx.labels[pos] >= 0 else None
            file = self.shown_file(idx.files[pos]) if idx.files is not None else None
            items.append({"id": int(idx.ids[pos]), "label": label,
                          "label_name": idx.classes[label] if label is not None and label < len(idx.classes) else None,
                          "name": Path(file).name if file else None, "thumb": f"/thumb/{int(idx.ids[pos])}" if file
                          else None})
        return {"total": int(len(idx.ids)), "offset": offset, "items": items}

    # -- checking a request's numbers --------------------------------------------------------------------
    def check_k(self, k: Any) -> int:
        if k is None or k == "":
            return min(self.limits.default_k, max(1, self.index.ntotal))
        value = _integer(k, "k")
        if not 1 <= value <= self.limits.max_k:
            raise RequestError(400, f"k must be between 1 and {self.limits.max_k}, got {value}")
        return value

    def check_param(self, value: Any) -> dict[str, int] | None:
        """{name: value} for the index's search parameter (nprobe / efSearch), or None for the tuned one."""
        if value is None or value == "":
            return None
        if self.parameter is None:
            raise RequestError(400, f"this index ({self.index.key}) searches exactly and takes no search parameter")
        number = _integer(value, self.parameter)
        if not 1 <= number <= MAX_SEARCH_PARAM:
            raise RequestError(400, f"{self.parameter} must be between 1 and {MAX_SEARCH_PARAM}, got {number}")
        return {self.parameter: number}

    # -- searching -------------------------------------------------------------------------------------
    def search_image(self, image: Image.Image, k: int, params: dict[str, int] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        with self._embed_lock:
            x = self.searcher.embed([image])
        embed_ms = (time.perf_counter() - t0) * 1e3
        out = self._search(x, k, params, own=None)
        out["timings"]["embed_ms"] = embed_ms
        out["query"] = {"kind": "upload", "width": image.width, "height": image.height}
        return out

    def search_id(self, id_: Any, k: int, params: dict[str, int] | None = None) -> dict[str, Any]:
        """The neighbours of a gallery item (its stored embedding; the item itself left out)."""
        value = _integer(id_, "id")
        if int(self.index.positions(np.array([value]))[0]) < 0:
            raise RequestError(404, f"id {value} is not in the index")
        t0 = time.perf_counter()
        x = self.stored_embedding(value)
        load_ms = (time.perf_counter() - t0) * 1e3
        out = self._search(x, k, params, own=value)
        out["timings"]["embed_ms"] = 0.0
        out["timings"]["load_ms"] = load_ms
        item = self.index.item(value)
        out["query"] = {"kind": "id", "id": value, "label": item["label"], "label_name": item["label_name"]}
        return out

    def stored_embedding(self, id_: int) -> np.ndarray:
        """(1, D) float32: the embedding stored for a gallery id, read from the memory-mapped shards (where
        each id lives is listed once, on the first call)."""
        with self._rows_lock:
            if self._rows is None:
                shards = list(self.index.store().iter_shards())
                ids = np.concatenate([i for _, i in shards]) if shards else np.zeros(0, np.int64)
                which = np.concatenate([np.full(len(i), n) for n, (_, i) in enumerate(shards)]) if shards else ids
                rows = np.concatenate([np.arange(len(i)) for _, i in shards]) if shards else ids
                order = np.argsort(ids, kind="stable")
                self._rows = (shards, ids[order], which[order], rows[order])
        shards, ids, which, rows = self._rows
        p = int(np.searchsorted(ids, id_))
        if p >= len(ids) or ids[p] != id_:
            raise RequestError(404, f"id {id_} has no stored embedding; rebuild the index")
        return np.asarray(shards[int(which[p])][0][int(rows[p])], dtype=np.float32)[None]

    def _search(self, x: np.ndarray, k: int, params: dict[str, int] | None, own: int | None) -> dict[str, Any]:
        idx = self.index
        vote = None
        with self._search_lock:
            t0 = time.perf_counter()  # FAISS's time, not the wait for the lock (that shows in total_ms)
            if self.labelled:
                result = knn_classify(idx, x, k=k, params=params, query_ids=None if own is None else [own])
                sims, ids = result.similarities[0], result.neighbour_ids[0]
            else:
                extra = 0 if own is None else 1
                s, i = idx.search(x, k + extra, params=params)
                keep = i[0] != own if own is not None else np.ones(i.shape[1], bool)
                sims, ids = s[0][keep][:k], i[0][keep][:k]
            search_ms = (time.perf_counter() - t0) * 1e3
        if self.labelled:
            pred = predictions_of(result, idx.classes)[0]
            vote = pred.to_dict() if pred.label >= 0 else None
        neighbours = []
        pos = idx.positions(ids)
        for rank, (score, id_, p) in enumerate(zip(sims.tolist(), ids.tolist(), pos.tolist(), strict=True), 1):
            if id_ < 0 or p < 0:
                continue
            label = int(idx.labels[p]) if idx.labels is not None and idx.labels[p] >= 0 else None
            file = self.shown_file(idx.files[p]) if idx.files is not None else None
            neighbours.append({
                "rank": rank, "id": int(id_), "score": float(score), "path": file, "label": label,
                "label_name": idx.classes[label] if label is not None and label < len(idx.classes) else None,
                "thumb": f"/thumb/{int(id_)}" if file else None,
            })
        return {"k": k, "search_params": {**idx.search_params, **(params or {})}, "neighbours": neighbours,
                "vote": vote, "timings": {"search_ms": search_ms}, "versions": self.versions()}

    # -- thumbnails -------------------------------------------------------------------------------------
    def thumbnail(self, id_: int) -> bytes:
        """A PNG (at most THUMB_SIZE px a side) of a gallery item, found by id. RequestError 404 for an
        unknown id or a file that cannot be read, 403 for a stored path outside the gallery."""
        if int(self.index.positions(np.array([id_]))[0]) < 0:
            raise RequestError(404, f"id {id_} is not in the index")
        return self._thumb(int(id_))

    def _thumbnail(self, id_: int) -> bytes:
        from compress_edge.retrieval.grid import load_item

        from compress_edge.data.grammar import is_dataset_id

        pos = int(self.index.positions(np.array([id_]))[0])
        file = self.index.files[pos] if self.index.files is not None else None
        path = self.index.resolve(file, self.root) if file else None
        if not file:
            raise RequestError(404, f"the index records no file for id {id_}")
        if path is None:
            raise RequestError(403, f"the path the index stores for id {id_} leads outside the gallery")
        if is_dataset_id(path):
            if not _has_torch():
                raise RequestError(404, f"{shown(path)} is a dataset item; reading it needs the PyTorch install")
            img = load_item(path)
        else:
            if not self.inside_gallery(path):
                raise RequestError(403, f"the file of id {id_} resolves outside the gallery")
            img = load_item(path)
        if img is None:
            raise RequestError(404, f"the image of id {id_} cannot be read")
        img = img.convert("RGB")
        scale = THUMB_SIZE / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def shown_file(self, file: str) -> str | None:
        """The stored path of an item as the index records it (relative to the gallery for a folder), or
        None when it leads outside the gallery: such a path is neither shown nor opened."""
        from compress_edge.data.grammar import is_dataset_id

        path = self.index.resolve(file, self.root) if file else None
        if path is None or not (is_dataset_id(path) or self.inside_gallery(path)):
            return None
        return file

    def inside_gallery(self, path: str) -> bool:
        """Whether ``path``, symlinks followed, lies inside the gallery root (or a folder images were
        added from): what :meth:`RetrievalIndex.resolve` checks on the written path, here on the real one."""
        real = os.path.realpath(path)
        allowed = [b for b in (self.root, self.index.root, *(self.index.meta.get("roots") or [])) if b]
        return any(is_inside(real, os.path.realpath(b)) for b in allowed)

    def close(self) -> None:
        self.searcher.close()


def _sidecar_stamp(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    """What changes when an index's sidecar is replaced (a commit renames a new file over it)."""
    try:
        st = os.stat(Path(folder) / SIDECAR)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RequestError(400, f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {shown(str(value)[:40])!r}") from None


@functools.cache
def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# --------------------------------------------------------------------------------------------------
# The HTTP side
# --------------------------------------------------------------------------------------------------
def _require_server() -> None:
    missing = []
    for module in ("starlette", "uvicorn", "multipart"):
        try:
            __import__(module)
        except ImportError:
            missing.append("python-multipart" if module == "multipart" else module)
    if missing:
        raise DependencyError(f"'compress-edge serve' needs {', '.join(missing)}; install it with: pip install "
                              f"'compress-edge[device]' (or: pip install {SERVER_PACKAGES})")


def create_app(service: SearchService):
    """The Starlette app of ``service``: the routes listed in the module's docstring, answered by
    :class:`~compress_edge.retrieval.routes.Routes`."""
    _require_server()
    from compress_edge.retrieval.routes import Routes
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    r = Routes(service)
    routes = [
        Route("/", r.page, methods=["GET"]),
        Route("/static/{name}", r.page, methods=["GET"]),
        Route("/health", r.health, methods=["GET"]),
        Route("/info", r.info, methods=["GET"]),
        Route("/gallery", r.gallery, methods=["GET"]),
        Route("/thumb/{id}", r.thumb, methods=["GET"]),
        Route("/search", r.search, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={
        RequestError: r.on_request_error, CompressEdgeError: r.on_library_error, HTTPException: r.on_http_error,
        Exception: r.on_bug,
    })


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_server(service: SearchService, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
               log_level: str = "warning", ready: Any = None) -> None:
    """Serve ``service`` with uvicorn until interrupted. A host other than a loopback address needs
    ``allow_remote`` (the page has no login: anyone who reaches the port can search and read thumbnails).
    ready: called with the bound (host, port) once the socket listens (port 0 picks a free port)."""
    _require_server()
    import uvicorn

    if not is_loopback(host) and not allow_remote:
        raise CompressEdgeError(f"--host {shown(host)} is reachable from other machines; the server has no login, "
                                "so pass --allow-remote to serve there anyway (or keep the default 127.0.0.1)")
    if not is_loopback(host):
        log.warning("serving on %s:%s: anyone who can reach this address can search the index and see its images "
                    "(no login, no TLS)", shown(host), port)
    import warnings

    # Oversized images are refused by our own pixel limit; PIL's warning would only repeat it on stderr.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    app = create_app(service)
    sock = listen_socket(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                            timeout_keep_alive=5, limit_concurrency=max(32, 8 * service.limits.max_concurrent))
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and ready is not None:
            bound = sock.getsockname()
            ready(bound[0], bound[1])
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (port 0: a free one), or CompressEdgeError in one line: bound
    here, not inside uvicorn, so that a busy port is a message and the bound port is known."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CompressEdgeError(f"cannot listen on {shown(host)}: {exc.strerror or exc}; check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CompressEdgeError(f"cannot listen on {shown(host)}:{port} ({exc.strerror or exc}); pick another "
                                "--port (or --host)") from None
    return sock
