"""Retrieval benchmark: ``auto`` indexes against exact flat search, in one run.

Datasets:

- ``clustered``: N normalised D-d vectors from a Gaussian mixture (4,000 centres, noise comparable
  to the spread of the centres), the shape real embeddings have: neighbours that are close but
  not trivially so. Queries are fresh draws from the same mixture.
- ``uniform``: N normalised Gaussian vectors, no structure at all: the hardest case there is for an
  approximate index (every point is nearly equidistant from every other). Reported as it comes.
- ``fashion-mnist``: the embeddings of Fashion-MNIST's 70,000 images (train + test) by a model
  (``--model``; default: a randomly initialised mobilenet_v3_small at 32 px, since no trained student
  ships with the package). Queries: 1,000 gallery images, leave-one-out (each query's own entry is
  dropped from both result lists). Also the kNN accuracy (k=20, T=0.07) of 2,000 test images through
  the index beside exact search.

For each, the index is built with ``compress_edge.retrieval.index`` (``index="auto"``, tuned to
recall@10 >= 0.95 on its own held-out queries) under the default memory budget and, for the clustered
set, under tighter budgets (``--budgets``: 160M gives IVF,SQ8, 48M OPQ + IVF-PQ), so the compressed
choices are measured too.
Recall@1 / recall@10 and single-thread queries per second are then measured on the benchmark's queries
(searched as one batch) for the index and for exact search (``faiss.knn``).

Usage: python benchmarks/bench_retrieval.py [--n 1000000] [--budgets auto,160M] [--model DIR|.onnx]
       [--datasets clustered,uniform,fashion-mnist] [--json rows.json]
Takes about 15 minutes on 2 (busy) CPU cores; ``--budgets auto,160M,48M`` adds about 8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from machine import describe  # benchmarks/machine.py (scripts run with benchmarks/ on the path)


def machine() -> str:
    return f"{describe()}, faiss {faiss.__version__}, numpy {np.__version__}"


def clustered(n: int, d: int, rng: np.random.Generator, centres: int = 4000, noise: float = 1.0) -> np.ndarray:
    c = rng.standard_normal((centres, d), dtype=np.float32)
    x = c[rng.integers(0, centres, n)]
    x += noise * rng.standard_normal((n, d), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def uniform(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def drop_self(d: np.ndarray, i: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    is_self = i == own[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return d[~is_self].reshape(len(d), -1)[:, :k], i[~is_self].reshape(len(i), -1)[:, :k]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(idx, xq: np.ndarray, truth: np.ndarray, k: int = 10, own: np.ndarray | None = None) -> dict:
    """Recall and 1-thread queries per second of the tuned index on the benchmark's queries."""
    extra = 1 if own is not None else 0
    faiss.omp_set_num_threads(1)
    try:
        idx.index.search(xq[:16], k + extra)  # warm up
        (d, i), seconds = timed(idx.index.search, xq, k + extra)
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    if own is not None:
        d, i = drop_self(d, i, own, k)
    return {"recall_at_1": recall(i, truth, 1), "recall_at_10": recall(i, truth, k), "qps_1_thread": len(xq) / seconds}


def exact(xq: np.ndarray, xb: np.ndarray, k: int = 10, own: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Exact neighbours (ids) and 1-thread queries per second of flat search."""
    extra = 1 if own is not None else 0
    faiss.omp_set_num_threads(1)
    try:
        (d, i), seconds = timed(faiss.knn, xq, xb, k + extra, faiss.METRIC_INNER_PRODUCT)
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    if own is not None:
        d, i = drop_self(d, i, own, k)
    return i, len(xq) / seconds


def row(dataset: str, budget: str, n: int, d: int, idx, m: dict, exact_qps: float) -> dict:
    info = idx.info()
    return {
        "dataset": dataset, "budget": budget, "n": n, "dim": d, "index": info["key"],
        "search_params": info["search_params"], "target_met_in_build": (info["tuning"] or {}).get("target_met"),
        **m, "exact_qps_1_thread": exact_qps, "speedup": m["qps_1_thread"] / exact_qps,
        "bytes_per_vector": info["bytes_per_vector"], "build_seconds": info["build"]["seconds"] +
        info["build"].get("embed_seconds", 0.0),
    }


def bench_synthetic(name: str, xb: np.ndarray, xq: np.ndarray, budgets: list[str], work: Path) -> list[dict]:
    from compress_edge.retrieval.index import build_index_from_array

    truth, exact_qps = exact(xq, xb)
    print(f"{name}: exact flat search {exact_qps:,.0f} queries/s at 1 thread", flush=True)
    rows = []
    for budget in budgets:
        out = work / f"{name}-{budget}"
        idx = build_index_from_array(xb, out, index="auto", memory_budget=None if budget == "auto" else budget,
                                     queries=1000, target_recall=0.95)
        r = row(name, budget, len(xb), xb.shape[1], idx, measure(idx, xq, truth), exact_qps)
        print(json.dumps(r), flush=True)
        rows.append(r)
        idx.close()
        shutil.rmtree(out, ignore_errors=True)
    return rows


def bench_fmnist(model: str | None, work: Path, rng: np.random.Generator) -> list[dict]:
    from compress_edge.retrieval.index import build_from_images
    from compress_edge.retrieval.knn import knn_classify

    note = "trained model " + str(model)
    if model is None:
        from compress_edge.models.resolve import create_model, save_model, spec_for

        net = create_model("mobilenet_v3_small", small_input=True).eval()
        model = str(work / "random-mobilenet_v3_small")
        save_model(net, spec_for(net, image_size=32, source={"kind": "random-init"}), model)
        note = "random-init mobilenet_v3_small at 32 px (no trained student)"
    out = work / "fmnist-index"
    idx = build_from_images(model, ["fashion-mnist:train", "fashion-mnist:test"], out, batch_size=256,
                            index="auto", queries=1000, target_recall=0.95, progress=False)
    xb, ids = idx.store().to_array()
    q = np.sort(rng.choice(len(xb), 1000, replace=False))
    truth, exact_qps = exact(xb[q], xb, own=ids[q])
    r = row("fashion-mnist", "auto", len(xb), xb.shape[1], idx, measure(idx, xb[q], truth, own=ids[q]), exact_qps)
    # kNN accuracy of test images (leave-one-out), through the index and by exact search.
    test = np.flatnonzero(np.char.startswith(np.asarray(idx.files), "fashion-mnist:test"))
    pick = np.sort(rng.choice(test, 2000, replace=False))
    labels = idx.labels[pick]
    approx = knn_classify(idx, xb[pick], query_ids=ids[pick]).accuracy(labels)
    exact_acc = knn_classify(idx, xb[pick], query_ids=ids[pick], exact=True).accuracy(labels)
    r.update({"knn_accuracy_index": approx, "knn_accuracy_exact": exact_acc, "model": note})
    print(json.dumps(r), flush=True)
    idx.close()
    shutil.rmtree(out, ignore_errors=True)
    return [r]


def table(rows: list[dict]) -> str:
    head = ("| data | N x D | budget | auto index | tuned | recall@1 | recall@10 | queries/s (1 thread) | "
            "exact queries/s | speed-up | bytes/vector | build s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        lines.append(
            f"| {r['dataset']} | {r['n']:,} x {r['dim']} | {r['budget']} | {r['index']} | {params} | "
            f"{r['recall_at_1']:.3f} | {r['recall_at_10']:.3f} | {r['qps_1_thread']:,.0f} | "
            f"{r['exact_qps_1_thread']:,.0f} | {r['speedup']:.1f}x | {r['bytes_per_vector']:.0f} | "
            f"{r['build_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="Synthetic vectors.")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--budgets", default="auto,160M", help="Memory budgets for the clustered set (48M: OPQ + "
                    "IVF-PQ, whose training adds several minutes on 2 cores).")
    ap.add_argument("--uniform-budgets", default="auto", help="Memory budgets for the uniform set.")
    ap.add_argument("--datasets", default="clustered,uniform,fashion-mnist")
    ap.add_argument("--model", default=None, help="Model for Fashion-MNIST (default: random-init).")
    ap.add_argument("--workdir", default=None, help="Scratch folder, created if missing (default: a temporary one).")
    ap.add_argument("--json", default=None, help="Also write the rows here.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.workdir is not None:
        work_root = Path(args.workdir)
        if work_root.exists() and not work_root.is_dir():
            ap.error(f"--workdir {work_root} is a file, not a folder; pass a folder (it is created if missing)")
        try:
            work_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            ap.error(f"cannot create --workdir {work_root} ({exc.strerror or exc}); pass a folder you can write to")

    print(f"machine: {machine()}", flush=True)
    rng = np.random.default_rng(args.seed)
    budgets = {"clustered": [b.strip() for b in args.budgets.split(",") if b.strip()],
               "uniform": [b.strip() for b in args.uniform_budgets.split(",") if b.strip()]}
    wanted = [d.strip() for d in args.datasets.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-", dir=args.workdir) as tmp:
        work = Path(tmp)
        rows: list[dict] = []
        for name in ("clustered", "uniform"):
            if name not in wanted:
                continue
            make = clustered if name == "clustered" else uniform
            both = make(args.n + args.queries, args.dim, rng)
            rows += bench_synthetic(name, both[: args.n], both[args.n :], budgets[name], work)
            del both
        if "fashion-mnist" in wanted:
            rows += bench_fmnist(args.model, work, rng)
    print()
    print(table(rows))
    for r in rows:
        if "knn_accuracy_index" in r:
            print(f"\nFashion-MNIST kNN accuracy (k=20, T=0.07, 2,000 test images, leave-one-out; {r['model']}): "
                  f"{r['knn_accuracy_index']:.4f} through the index, {r['knn_accuracy_exact']:.4f} exact")
    print(f"\nmachine: {machine()}\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
