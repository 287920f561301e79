"""Load test of ``compress-edge serve`` on loopback: N search requests from C concurrent clients.

A real server process (``python -m compress_edge serve``) on 127.0.0.1 and a free port; each client
thread keeps one HTTP/1.1 connection and sends its share of the requests back to back. A request is a
multipart upload of a PNG query image (decoded, embedded and searched by the server; ``--mode upload``),
a JSON search by gallery id (stored embedding, no model run; ``--mode id``) or either in turn
(``--mode mixed``). Printed: latency seen by the clients (p50 / p95 / p99 / max), throughput, the
server's own timings (decode, embed, search), and the failures: any answer but 200, split into 503
(over ``--max-concurrent``) and others, and transport errors.

Without ``--index``, a gallery of generated images (3 classes of shapes on noise, ``--gallery`` images
at 32 px) is indexed with a randomly initialised mobilenet_v3_small exported to ONNX (needs torch for
the export; the server itself runs the ONNX file with onnxruntime). With ``--index DIR`` (and
``--queries DIR`` of images), an existing index is served with the model it records.

Usage: python benchmarks/bench_serve.py [--requests 200] [--clients 8] [--mode upload|id|mixed]
       [--index DIR --queries DIR] [--max-concurrent 8] [--threads 1] [--json out.json]
Takes about a minute on 2 (busy) CPU cores.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from machine import describe  # benchmarks/machine.py (scripts run with benchmarks/ on the path)


def machine() -> str:
    return describe()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """Three visually distinct classes (a disc, a square, stripes) on noise, as PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for ci, name in enumerate(("circle", "square", "stripes")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
            c = size / 2 + rng.uniform(-3, 3)
            if ci == 0:
                mask = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2
            elif ci == 1:
                mask = (abs(yy - c) < size / 3) & (abs(xx - c) < size / 3)
            else:
                mask = (xx // 3) % 2 == 0
            colour = np.array([(60 * ci) % 255, 200, (255 - 70 * ci) % 255]) - rng.integers(0, 40, 3)
            img[mask] = np.clip(colour, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i:04d}.png")
    return root


def build_default(work: Path, gallery: int) -> tuple[Path, Path]:
    """(index folder, query folder) of generated images, indexed with an ONNX mobilenet_v3_small."""
    import torch
    from compress_edge.export.onnx import export_onnx
    from compress_edge.retrieval.index import build_from_images

    from compress_edge.models.resolve import create_model, save_model, spec_for

    images = make_images(work / "gallery", per_class=max(1, gallery // 3))
    queries = make_images(work / "queries", per_class=20, seed=7)
    torch.manual_seed(2)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = save_model(model, spec_for(model, image_size=32), work / "student")
    onnx = work / "student.onnx"
    export_onnx(model, spec, onnx, exporter="torchscript", simplify=False)
    build_from_images(str(onnx), [str(images)], work / "index", progress=False)
    return work / "index", queries


class Server:
    def __init__(self, index_dir: Path, port: int, args: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen([sys.executable, "-m", "compress_edge", "serve", str(index_dir), "--port",
                                      str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.port = port
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit("the server did not answer /health within 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def multipart(data: bytes, k: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
               "Content-Type: image/png\r\n\r\n".encode())
    body.write(data + b"\r\n" + f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def run_clients(port: int, requests: list[tuple[str, bytes, str]], clients: int) -> list[dict]:
    """Send ``requests`` (kind, body, content type) from ``clients`` threads; one record per request."""
    records: list[dict] = [{} for _ in requests]
    lock = threading.Lock()
    next_index = [0]
    start = threading.Barrier(clients)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(requests):
                break
            kind, body, ctype = requests[i]
            t0 = time.perf_counter()
            rec: dict = {"kind": kind}
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": ctype})
                response = conn.getresponse()
                raw = response.read()
                rec["status"] = response.status
                if response.status == 200:
                    rec["timings"] = json.loads(raw)["timings"]
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                rec["status"] = None
                rec["error"] = f"{exc.__class__.__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            rec["ms"] = (time.perf_counter() - t0) * 1e3
            records[i] = rec
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarise(records: list[dict], seconds: float) -> dict:
    ms = np.array([r["ms"] for r in records])
    ok = [r for r in records if r.get("status") == 200]
    server = {}
    for key in ("decode_ms", "embed_ms", "search_ms", "total_ms"):
        vals = [r["timings"][key] for r in ok if key in r.get("timings", {})]
        if vals:
            server[key] = {"p50": float(np.percentile(vals, 50)), "p95": float(np.percentile(vals, 95))}
    return {
        "requests": len(records), "ok": len(ok),
        "failed": len(records) - len(ok),
        "busy_503": sum(r.get("status") == 503 for r in records),
        "other_status": sorted({r["status"] for r in records if r.get("status") not in (200, 503, None)}),
        "transport_errors": sum(r.get("status") is None for r in records),
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
                       "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "mean": float(ms.mean())},
        "seconds": seconds, "requests_per_second": len(records) / seconds,
        "server_timings_ms": server,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--mode", choices=("upload", "id", "mixed"), default="upload")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index", type=Path, help="An index folder to serve (default: build one of generated images).")
    ap.add_argument("--queries", type=Path, help="Query images for uploads (with --index).")
    ap.add_argument("--gallery", type=int, default=3000, help="Generated gallery images (without --index).")
    ap.add_argument("--max-concurrent", type=int, default=8, help="The server's limit of searches at once.")
    ap.add_argument("--threads", type=int, default=1, help="The server's CPU threads for the model.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        if args.index is None:
            t0 = time.perf_counter()
            index_dir, queries = build_default(work, args.gallery)
            print(f"built a gallery index of {args.gallery} generated images in {time.perf_counter() - t0:.1f} s")
        else:
            index_dir, queries = args.index, args.queries
            if args.mode != "id" and queries is None:
                raise SystemExit("--index needs --queries DIR (images to upload), or --mode id")
        files = sorted(p for p in Path(queries).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) \
            if queries else []
        info = json.loads(subprocess.run([sys.executable, "-m", "compress_edge", "index", "info", str(index_dir),
                                          "--json"], capture_output=True, text=True, check=True).stdout)
        n = int(info["vectors"])
        rng = np.random.default_rng(0)
        requests = []
        for i in range(args.requests):
            kind = args.mode if args.mode != "mixed" else ("upload" if i % 2 == 0 else "id")
            if kind == "upload":
                body, ctype = multipart(files[i % len(files)].read_bytes(), args.k)
            else:
                body, ctype = json.dumps({"id": int(rng.integers(0, n)), "k": args.k}).encode(), "application/json"
            requests.append((kind, body, ctype))

        port = free_port()
        server = Server(index_dir, port, ["--max-concurrent", str(args.max_concurrent), "--threads",
                                          str(args.threads)])
        try:
            run_clients(port, requests[: min(16, len(requests))], 1)  # warm-up (not counted)
            t0 = time.perf_counter()
            records = run_clients(port, requests, args.clients)
            seconds = time.perf_counter() - t0
        finally:
            server.stop()

    result = summarise(records, seconds)
    result.update({"mode": args.mode, "clients": args.clients, "k": args.k, "index": info["key"], "vectors": n,
                   "dim": info["dim"], "max_concurrent": args.max_concurrent, "threads": args.threads,
                   "machine": machine()})
    lat, srv = result["latency_ms"], result["server_timings_ms"]
    print(f"machine: {result['machine']}")
    print(f"server: {info['key']} index of {n:,} x {info['dim']} vectors, model threads {args.threads}, "
          f"--max-concurrent {args.max_concurrent}; {args.requests} {args.mode} requests (k={args.k}) from "
          f"{args.clients} concurrent clients on loopback")
    print(f"latency (client side): p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, "
          f"max {lat['max']:.1f} ms; {result['requests_per_second']:.1f} requests/s")
    print("server timings (p50 / p95): " + ", ".join(f"{k.removesuffix('_ms')} {v['p50']:.2f} / {v['p95']:.2f} ms"
                                                     for k, v in srv.items()))
    print(f"failures: {result['failed']} of {result['requests']} ({result['busy_503']} busy 503, "
          f"{result['transport_errors']} transport errors, other statuses {result['other_status'] or 'none'})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
