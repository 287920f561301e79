"""Does a post-processing of the embeddings widen a model's lead over raw pixels? Centring and PCA
whitening, fitted on the gallery (no labels), applied to a model's features and to the raw pixels alike.

Whitening is a common last step of image retrieval: it spreads the similarity over the embedding's
directions instead of its few largest ones. It raises cosine kNN, but a comparison with raw pixels is
only fair when both get the same step. This script measures both on the same gallery and queries:
weighted 20-NN and 1-NN of plain cosine, of centred features, and of PCA to d dimensions scaled by
eigenvalue^(-p/2) (p = 0: PCA only, 0.5: half whitening, 1: whitening).

Run:  python benchmarks/whitening_check.py [MODEL] --train fashion-mnist:train@20000 --test fashion-mnist:test@2000
(MODEL: default the demo's shipped teacher.) Prints a table; --json FILE writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from compress_edge.eval.knn import knn_eval
from compress_edge.eval.measure import FeatureOptions, features, open_model
from compress_edge.eval.neighbors import l2_normalize
from compress_edge.eval.quality import raw_pixel_features

DIMS = (64, 128, 256)
POWERS = (0.0, 0.5, 1.0)


def variants(gallery: np.ndarray, queries: np.ndarray):
    """(name, gallery, queries) for plain, centred and each PCA dimension and power, fitted on ``gallery``."""
    gallery, queries = gallery.astype(np.float64), queries.astype(np.float64)
    yield "plain", gallery, queries
    mean = gallery.mean(0)
    g, q = gallery - mean, queries - mean
    yield "centred", g, q
    eigval, eigvec = np.linalg.eigh(np.cov(g.T))
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    for d in DIMS:
        if d >= g.shape[1]:
            continue
        for p in POWERS:
            proj = eigvec[:, :d] / np.maximum(eigval[:d], 1e-12) ** (p / 2)
            yield f"pca{d} p={p}", g @ proj, q @ proj


def knn_scores(gallery, gallery_labels, queries, query_labels) -> dict[str, float]:
    """1-NN and weighted 20-NN in % of L2-normalised queries searched among an L2-normalised gallery."""
    r = knn_eval(gallery, gallery_labels, queries, query_labels, ks=[20], device="cpu")
    return {"nn_top1": round(100 * r.nn_top1, 2), "knn20_top1": round(100 * r.knn[20]["top1"], 2)}


def scores(gallery, gallery_labels, queries, query_labels) -> dict[str, dict[str, float]]:
    return {name: knn_scores(l2_normalize(g), gallery_labels, l2_normalize(q), query_labels)
            for name, g, q in variants(gallery, queries)}


def model_and_pixels_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a check that scores a model against raw pixels on the demo's split (this script's
    and mirror_check.py's): MODEL (default the demo's shipped teacher), --train, --test, --raw-size, --json."""
    import compress_edge

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(Path(compress_edge.__file__).parent / "assets"
                                                         / "fashion-mnist-teacher"))
    parser.add_argument("--train", default="fashion-mnist:train@20000", help="The gallery.")
    parser.add_argument("--test", default="fashion-mnist:test@2000", help="The queries.")
    parser.add_argument("--raw-size", type=int, default=32, help="Side of the raw-pixel baseline's images.")
    parser.add_argument("--json", help="Also write the numbers to this file.")
    return parser


def setting(args: argparse.Namespace, spec) -> str:
    """The line that heads the table: which model, which raw pixels, which gallery and queries."""
    return (f"model {args.model} at {spec.image_size} px; raw pixels at {args.raw_size} px; gallery {args.train}, "
            f"queries {args.test}")


def finish(args: argparse.Namespace, rows: dict, started: float) -> None:
    """Print the seconds since ``started``; with --json, write the scores beside the setting."""
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "train": args.train, "test": args.test,
                                               "raw_size": args.raw_size, "scores": rows}, indent=2))


def main() -> None:
    args = model_and_pixels_parser(__doc__).parse_args()

    started = time.perf_counter()
    embedder, spec, _ = open_model(args.model, device="cpu", image_size=None)
    opts = FeatureOptions(workers=1, device="cpu", progress=False)
    xtr, ytr, gallery = features(embedder, spec, args.train, opts)
    xte, yte, queries = features(embedder, spec, args.test, opts)
    rows = {"model": scores(xtr, ytr, xte, yte),
            "raw pixels": scores(raw_pixel_features(gallery, args.raw_size), ytr,
                                 raw_pixel_features(queries, args.raw_size), yte)}
    print(setting(args, spec))
    print(f"{'post-processing':16s} {'model w20':>10s} {'raw w20':>8s} {'lead':>6s} {'model 1-NN':>11s} {'raw 1-NN':>9s}")
    for name, m in rows["model"].items():
        r = rows["raw pixels"].get(name)
        if r is None:
            continue
        print(f"{name:16s} {m['knn20_top1']:10.2f} {r['knn20_top1']:8.2f} {m['knn20_top1'] - r['knn20_top1']:+6.2f} "
              f"{m['nn_top1']:11.2f} {r['nn_top1']:9.2f}")
    finish(args, rows, started)


if __name__ == "__main__":
    main()
