"""``compress-edge serve`` against a real server process on 127.0.0.1: a real index built from generated
images with a real ONNX model, searched by upload and by id; bad uploads, thumbnails outside the gallery,
a model that does not match the index and a non-loopback host refused; the same server in a Python
without torch."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest
from cli_helpers import imports_torch, stop_process
from PIL import Image

CLASSES = ("circle", "square", "stripes")


# --------------------------------------------------------------------------------------------------
# Helpers: a free port, a server process, HTTP without extra packages
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m compress_edge serve ...`` on 127.0.0.1 and a free port, up once /health answers."""

    def __init__(self, index_dir: Path, *args: str, python: str | os.PathLike = sys.executable,
                 timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(python), "-m", "compress_edge", "serve", str(index_dir), "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"the server exited with {self.proc.returncode}: {err[-3000:]}")
            try:
                if request(self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health in time")

    def stop(self) -> str:
        stop_process(self.proc)
        return self.proc.stderr.read() if self.proc.stderr else ""


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def multipart(fields: dict[str, str], file: bytes | None, filename: str = "query.png") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file is not None:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(file + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(url: str, data: bytes | None, **fields: str) -> tuple[int, dict]:
    body, headers = multipart(fields, data)
    status, _, raw = request(url + "/search", body, headers)
    return status, json.loads(raw)


def search_id(url: str, payload: dict) -> tuple[int, dict]:
    status, _, raw = request(url + "/search", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return status, json.loads(raw)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb as PIL sees it before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def export_model(out: Path, seed: int, size: int = 32) -> Path:
    """A randomly initialised mobilenet_v3_small (its embeddings still rank the generated classes) as ONNX."""
    import torch
    from compress_edge.export.onnx import export_onnx

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = save_model(model, spec_for(model, image_size=size), out.with_suffix(""))  # the spec with its weights hash
    export_onnx(model, spec, out, exporter="torchscript", simplify=False)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_images):
    from compress_edge.retrieval.index import build_from_images

    root = tmp_path_factory.mktemp("serve")
    gallery = make_images(root / "gallery", classes=CLASSES, per_class=8, size=32)
    queries = make_images(root / "queries", classes=CLASSES, per_class=1, size=32, seed=11)
    onnx = export_model(root / "student.onnx", seed=2)
    other = export_model(root / "other.onnx", seed=5)
    index_dir = root / "index"
    build_from_images(str(onnx), [str(gallery)], index_dir, index="IVF4,Flat", queries=0, tune=False)
    return {"root": root, "gallery": gallery, "queries": queries, "onnx": onnx, "other": other, "index": index_dir}


@pytest.fixture(scope="module")
def server(built):
    srv = Server(built["index"], "--max-bytes", "200000", "--max-pixels", "1000000", "--max-k", "20")
    yield srv
    srv.stop()


def query_bytes(built, cls: str = "square") -> bytes:
    return (built["queries"] / cls / f"{cls}_000.png").read_bytes()


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------
def test_serve_imports_without_torch():
    assert not imports_torch("compress_edge.retrieval.serve", "compress_edge.cli.serve",
                             "starlette.applications", "uvicorn")


def test_health_info_and_page(server):
    status, _, raw = request(server.url + "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, _, raw = request(server.url + "/info")
    info = json.loads(raw)
    assert status == 200
    assert info["index"]["key"] == "IDMap2,IVF4,Flat" or info["index"]["key"].endswith("IVF4,Flat")
    assert info["index"]["vectors"] == 24 and info["index"]["classes"] == list(CLASSES)
    assert info["index"]["search_parameter"] == "nprobe"
    assert info["model"]["spec"]["arch"] == "mobilenet_v3_small" and info["model"]["backend"] == "onnxruntime"
    assert info["limits"]["max_k"] == 20 and info["limits"]["max_bytes"] == 200000
    status, headers, page = request(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/static/app.js" in page and b"http" not in page.replace(b"http-equiv", b"")  # no CDN
    for name in ("app.js", "style.css"):
        assert request(server.url + f"/static/{name}")[0] == 200
    assert request(server.url + "/static/..%2Fserve.py")[0] == 404
    status, _, raw = request(server.url + "/gallery?offset=0&limit=5")
    page = json.loads(raw)
    assert status == 200 and page["total"] == 24 and len(page["items"]) == 5
    assert page["items"][0]["label_name"] == "circle" and "path" not in page["items"][0]


def test_search_by_upload(server, built):
    status, out = upload(server.url, query_bytes(built, "square"), k="5", param="4")
    assert status == 200, out
    assert len(out["neighbours"]) == 5
    first = out["neighbours"][0]
    assert set(first) >= {"id", "path", "label", "label_name", "score", "rank"}
    assert first["label_name"] == "square" and first["path"].startswith("square/")
    scores = [n["score"] for n in out["neighbours"]]
    assert scores == sorted(scores, reverse=True) and all(-1.01 <= s <= 1.01 for s in scores)
    assert out["vote"]["label_name"] == "square" and 0 < out["vote"]["confidence"] <= 1
    assert out["search_params"] == {"nprobe": 4}
    t = out["timings"]
    assert t["embed_ms"] > 0 and t["search_ms"] >= 0 and t["decode_ms"] >= 0 and t["total_ms"] >= t["embed_ms"]
    assert out["versions"]["model"]["arch"] == "mobilenet_v3_small" and out["versions"]["index"]["file_sha256"]
    assert out["versions"]["model"]["weights_sha256"]
    # the same answers as the library gives
    from compress_edge.retrieval.search import Searcher

    with Searcher(built["index"], params={"nprobe": 4}) as searcher:
        hits = searcher.search([str(built["queries"] / "square" / "square_000.png")], k=5)[0]
    assert [n["id"] for n in out["neighbours"]] == [h.id for h in hits]


def test_search_by_id_leaves_the_item_out(server):
    status, out = search_id(server.url, {"id": 17, "k": 4, "param": 4})
    assert status == 200, out
    ids = [n["id"] for n in out["neighbours"]]
    assert 17 not in ids and len(ids) == 4
    assert out["query"] == {"kind": "id", "id": 17, "label": 2, "label_name": "stripes"}
    assert out["vote"]["label_name"] == "stripes"
    assert {n["label_name"] for n in out["neighbours"]} == {"stripes"}
    assert out["timings"]["embed_ms"] == 0.0
    assert search_id(server.url, {"id": 12345})[0] == 404
    assert search_id(server.url, {"id": "abc"})[0] == 400
    assert search_id(server.url, {"k": 3})[0] == 400


def test_k_and_param_may_come_in_the_query_string(server, built):
    """``POST /search?k=3`` as curl users write it: the body's fields win, a bad value is a 400, not ignored."""
    body, headers = multipart({}, query_bytes(built, "square"))
    status, _, raw = request(server.url + "/search?k=3&param=2", body, headers)
    out = json.loads(raw)
    assert status == 200 and len(out["neighbours"]) == 3 and out["search_params"] == {"nprobe": 2}, out
    body, headers = multipart({"k": "2"}, query_bytes(built, "square"))
    assert len(json.loads(request(server.url + "/search?k=6", body, headers)[2])["neighbours"]) == 2
    status, _, raw = request(server.url + "/search?k=4", json.dumps({"id": 17}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200 and len(json.loads(raw)["neighbours"]) == 4
    body, headers = multipart({}, query_bytes(built, "square"))
    assert request(server.url + "/search?k=many", body, headers)[0] == 400


@pytest.mark.parametrize(("payload", "status"), [
    ({"id": 0, "k": 0}, 400), ({"id": 0, "k": 21}, 400), ({"id": 0, "k": "many"}, 400),
    ({"id": 0, "param": 0}, 400), ({"id": 0, "param": 100000}, 400),
])
def test_request_bounds(server, payload, status):
    code, out = search_id(server.url, payload)
    assert code == status and out["error"]


def test_bad_uploads_are_refused_and_the_server_keeps_serving(server, built):
    good = query_bytes(built)
    buf = io.BytesIO()
    Image.new("RGB", (1200, 1200), (10, 20, 30)).save(buf, format="PNG")  # 1.44 M pixels > 1 M
    cases = {
        "empty": (b"", 400),
        "not an image": (b"hello, this is text and not a picture" * 10, 400),
        "PostScript (never handed to Ghostscript)": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 400),
        "truncated": (good[: len(good) // 2], 400),
        "bomb (PIL's limit)": (png_header(60000, 60000), 413),
        "bomb (the server's limit)": (png_header(2000, 2000), 413),
        "too many pixels": (buf.getvalue(), 413),
        "too many bytes": (os.urandom(300_000), 413),
    }
    for name, (data, expected) in cases.items():
        status, out = upload(server.url, data)
        assert status == expected, (name, out)
        assert isinstance(out.get("error"), str) and out["error"], name
        assert request(server.url + "/health")[0] == 200, name
    # no file field, a bad content type, a bad body
    status, out = upload(server.url, None, k="3")
    assert status == 400 and "image" in out["error"]
    assert request(server.url + "/search", b"x", {"Content-Type": "text/plain"})[0] == 415
    assert request(server.url + "/search", b"{not json", {"Content-Type": "application/json"})[0] == 400
    assert request(server.url + "/search", b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"})[0] == 400
    status, out = upload(server.url, good, k="3")
    assert status == 200 and len(out["neighbours"]) == 3


def test_thumbnails_by_id_only(server):
    status, headers, data = request(server.url + "/thumb/0")
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    assert request(server.url + "/thumb/999")[0] == 404
    assert request(server.url + "/thumb/abc")[0] == 400
    assert request(server.url + "/thumb/..%2F..%2Fetc%2Fpasswd")[0] in (400, 404)
    assert request(server.url + "/thumb?path=/etc/passwd")[0] == 404


def test_thumbnails_outside_the_gallery_are_refused(built, tmp_path):
    """A sidecar whose stored paths lead out of the gallery (../, an absolute path, a symlink): never read."""
    outside = built["root"] / "outside"
    outside.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(outside / "secret.png")
    link = built["gallery"] / "circle" / "zz_link.png"
    if not link.exists():
        link.symlink_to(outside / "secret.png")
    index_dir = tmp_path / "index"
    shutil.copytree(built["index"], index_dir)
    meta = json.loads((index_dir / "index.json").read_text())
    meta["files"][0] = "../outside/secret.png"
    meta["files"][1] = str(outside / "secret.png")
    meta["files"][2] = "circle/zz_link.png"
    meta["files"][3] = "../../../../../../../../etc/passwd"
    (index_dir / "index.json").write_text(json.dumps(meta))
    srv = Server(index_dir)
    try:
        for id_ in (0, 1, 2, 3):
            status, _, raw = request(srv.url + f"/thumb/{id_}")
            assert status == 403, (id_, raw)
            assert "outside the gallery" in json.loads(raw)["error"]
        assert request(srv.url + "/thumb/4")[0] == 200
        status, out = search_id(srv.url, {"id": 5, "k": 6})
        assert status == 200 and "/etc/passwd" not in json.dumps(out)
    finally:
        srv.stop()


def test_an_index_changed_while_serving_is_served_as_it_is_now(built, tmp_path):
    """``index add`` / ``index remove`` in another process while the server runs: the next requests (after
    at most about a second) see the new generation, without a restart."""
    import shutil

    from compress_edge.retrieval.index import add_images, remove_files

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    srv = Server(index)
    try:
        before = json.loads(request(srv.url + "/health")[2])["vectors"]
        added = add_images(index, [str(built["queries"])], model=str(built["onnx"]))["added"]
        assert added == len(CLASSES)
        deadline = time.monotonic() + 20
        while json.loads(request(srv.url + "/health")[2])["vectors"] != before + added:
            assert time.monotonic() < deadline, "the server still serves the old index"
            time.sleep(0.3)
        status, out = upload(srv.url, query_bytes(built, "stripes"), k="1")
        assert status == 200 and out["neighbours"][0]["path"].endswith("stripes_000.png"), out  # the added image
        assert out["neighbours"][0]["score"] > 0.9999 and out["versions"]["index"]["generation"] == 2
        new_id = out["neighbours"][0]["id"]
        remove_files(index, [str(built["queries"] / "stripes" / "stripes_000.png")])
        deadline = time.monotonic() + 20
        while search_id(srv.url, {"id": new_id, "k": 3})[0] != 404:
            assert time.monotonic() < deadline, "the server still serves a removed item"
            time.sleep(0.3)
    finally:
        log = srv.stop()
    assert "now serving generation 2" in log and "Traceback" not in log


def test_a_model_that_does_not_match_the_index_is_refused_at_start(built):
    port = str(free_port())
    run = subprocess.run([sys.executable, "-m", "compress_edge", "serve", str(built["index"]), "--model",
                          str(built["other"]), "--port", port], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "model" in lines[0]
    with socket.socket() as s:  # nothing listens
        assert s.connect_ex(("127.0.0.1", int(port))) != 0


def test_a_remote_host_needs_allow_remote(built):
    from compress_edge.retrieval.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    run = subprocess.run([sys.executable, "-m", "compress_edge", "serve", str(built["index"]), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "--allow-remote" in run.stderr and run.stderr.count("\n") == 1
    # with --allow-remote: a warning, then (on an address this machine does not have: nothing is exposed
    # here) a one-line refusal to listen
    run = subprocess.run([sys.executable, "-m", "compress_edge", "serve", str(built["index"]), "--host", "192.0.2.1",
                          "--allow-remote", "--port", "0"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})
    assert run.returncode == 1
    assert "anyone who can reach this address" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 192.0.2.1:0")


def test_a_busy_port_is_one_line(built):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "compress_edge", "serve", str(built["index"]), "--port", str(port)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in run.stderr


def test_concurrent_searches_beyond_the_limit_get_503(built):
    """One search at a time: of simultaneous searches, each is answered 200 or 503 (never hangs or fails
    otherwise), and the server still answers after."""
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(built["index"], "--max-concurrent", "1")
    try:
        data = query_bytes(built)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: upload(srv.url, data), range(16)))
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        assert all("error" in out for s, out in results if s == 503)
        assert upload(srv.url, data)[0] == 200
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_runs_without_torch(torchfree_python, built):
    """The device install (the `device` extra as pyproject.toml lists it, server stack included)
    serves the index; torch is never imported."""
    probe = subprocess.run([str(torchfree_python), "-c", "import starlette, uvicorn, multipart"], capture_output=True)
    assert probe.returncode == 0, "the device extra lacks the server stack: " + probe.stderr.decode()[-300:]
    srv = Server(built["index"], python=torchfree_python)
    try:
        status, out = upload(srv.url, query_bytes(built, "stripes"), k="3")
        assert status == 200, out
        assert out["vote"]["label_name"] == "stripes" and out["versions"]["model"]["backend"] == "onnxruntime"
        assert request(srv.url + "/thumb/0")[0] == 200
    finally:
        err = srv.stop()
    code = ("import sys\nimport compress_edge.retrieval.serve, compress_edge.cli.serve\n"
            "from compress_edge.retrieval.serve import SearchService, create_app\n"
            f"s = SearchService({str(built['index'])!r}); create_app(s)\n"
            "print('torch' in sys.modules)")
    run = subprocess.run([str(torchfree_python), "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:] + err[-1000:]
    assert run.stdout.strip().splitlines()[-1] == "False"
