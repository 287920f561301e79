"""The request handlers of ``compress-edge serve`` (:func:`compress_edge.retrieval.serve.create_app`
routes each path to one of them): reading and bounding requests, the busy limit, the JSON answers and
the error answers. Imported only with the server packages (starlette) installed."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from compress_edge.retrieval.serve import (
    FORM_OVERHEAD,
    STATIC_DIR,
    STATIC_FILES,
    RequestError,
    SearchService,
    _integer,
    _short,
    decode_upload,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

#: Headers of every answer but thumbnails.
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"


class Routes:
    """The handlers of one :class:`SearchService`, with the page's files read once and the count of
    searches running (the busy limit)."""

    def __init__(self, service: SearchService) -> None:
        self.service = service
        self.limits = service.limits
        self.pages = {name: (STATIC_DIR / name).read_bytes() for name in STATIC_FILES}
        self.running = 0

    def error(self, status: int, message: str, **extra: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers={**HEADERS, **extra})

    # -- GET -----------------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC_FILES:
            return self.error(404, "no such file")
        return Response(self.pages[name], media_type=STATIC_FILES[name],
                        headers={**HEADERS, "Content-Security-Policy": CSP})

    async def health(self, request: Request) -> Response:
        await run_in_threadpool(self.service.refresh)
        return JSONResponse({"status": "ok", "vectors": self.service.index.ntotal, "busy": self.running},
                            headers=HEADERS)

    async def info(self, request: Request) -> Response:
        await run_in_threadpool(self.service.refresh)
        return JSONResponse(self.service.info(), headers=HEADERS)

    async def gallery(self, request: Request) -> Response:
        await run_in_threadpool(self.service.refresh)
        q = request.query_params
        return JSONResponse(self.service.gallery(_integer(q.get("offset", 0), "offset"),
                                                 _integer(q.get("limit", 48), "limit")), headers=HEADERS)

    async def thumb(self, request: Request) -> Response:
        id_ = _integer(request.path_params["id"], "id")
        data = await run_in_threadpool(self.service.thumbnail, id_)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600",
                                                               "X-Content-Type-Options": "nosniff"})

    # -- POST /search --------------------------------------------------------------------------------
    async def search(self, request: Request) -> Response:
        t0 = time.perf_counter()
        await run_in_threadpool(self.service.refresh)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise RequestError(415, "POST /search takes multipart/form-data (an image in the field 'image') "
                                    'or application/json {"id": N}')
        body = await read_body(request, FORM_OVERHEAD if kind == "application/json" else
                               self.limits.max_bytes + FORM_OVERHEAD)
        data = payload = None
        if kind == "application/json":
            payload, k, params = self.read_json(body, request.query_params)
        else:
            data, k, params = await self.read_form(request, body)
        # The limit is on the work (decoding, embedding, searching) running at once; uploads still
        # arriving are bounded by their size and by uvicorn's limit on connections.
        if self.running >= self.limits.max_concurrent:
            return self.error(503, f"busy: {self.running} searches are running (the limit is "
                                   f"{self.limits.max_concurrent}); try again", **{"Retry-After": "1"})
        self.running += 1
        try:
            if data is None:
                out = await run_in_threadpool(self.service.search_id, payload["id"], k, params)
            else:
                out = await self.search_upload(data, k, params)
        finally:
            self.running -= 1
        out["timings"]["total_ms"] = (time.perf_counter() - t0) * 1e3
        return JSONResponse(out, headers=HEADERS)

    async def search_upload(self, data: bytes, k: int, params: dict[str, int] | None) -> dict[str, Any]:
        t1 = time.perf_counter()
        image = await run_in_threadpool(decode_upload, data, self.limits)
        decode_ms = (time.perf_counter() - t1) * 1e3
        out = await run_in_threadpool(self.service.search_image, image, k, params)
        out["timings"]["decode_ms"] = decode_ms
        out["query"]["bytes"] = len(data)
        return out

    def read_json(self, body: bytes, query: Mapping[str, str]) -> tuple[dict[str, Any], int, dict[str, int] | None]:
        """(payload, k, search parameters) of a JSON body ``{"id": N, "k": 10, "param": 16}`` (``k`` and
        ``param`` also from the query string, ``?k=5``, when the body has none)."""
        try:
            payload = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(payload, dict) or "id" not in payload:
            raise RequestError(400, 'send JSON {"id": N, "k": 10} (a gallery id) or a multipart image upload')
        return payload, *self.k_and_param(payload, query)

    async def read_form(self, request: Request, body: bytes) -> tuple[bytes, int, dict[str, int] | None]:
        """(image bytes, k, search parameters) of a multipart body already read (and bounded); ``k`` and
        ``param`` from its fields, else from the query string."""
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        except HTTPException as exc:
            raise RequestError(400, f"the multipart body cannot be read ({exc.detail})") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, "send the image as the multipart file field 'image'")
            return await upload.read(), *self.k_and_param(form, request.query_params)
        finally:
            await form.close()

    def k_and_param(self, fields: Mapping[str, Any], query: Mapping[str, str]) -> tuple[int, dict[str, int] | None]:
        """The checked ``k`` and search parameter of a request: its body's fields first, then its query string."""
        def value(name: str) -> Any:
            got = fields.get(name)
            return query.get(name) if got is None else got

        return self.service.check_k(value("k")), self.service.check_param(value("param"))

    # -- errors --------------------------------------------------------------------------------------
    async def on_request_error(self, request: Request, exc: Exception) -> Response:
        return self.error(getattr(exc, "status", 400), str(exc))  # registered for RequestError only

    async def on_library_error(self, request: Request, exc: Exception) -> Response:
        return self.error(400, " ".join(str(exc).split()))

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return self.error(status, str(getattr(exc, "detail", "")) or "error")

    async def on_bug(self, request: Request, exc: Exception) -> Response:
        log.error("internal error on %s: %s: %s", request.url.path, exc.__class__.__name__, _short(exc))
        return self.error(500, f"internal error: {exc.__class__.__name__}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes: by its Content-Length, and as it arrives."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if declared > limit:
            raise RequestError(413, f"the request has {declared:,} bytes; the limit is {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request has more than {limit:,} bytes")
    return bytes(body)
