"""Build a FAISS index of an image folder with an exported ONNX model, and query it: onnxruntime,
faiss and numpy only (this script never imports torch, so it runs on a device without PyTorch).

    python examples/index_and_query_without_torch.py --model student.onnx --gallery photos/ \
        --query query.jpg --out idx
"""

import argparse
import sys

from compress_edge.retrieval.index import build_from_images
from compress_edge.retrieval.search import Searcher

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="an .onnx file exported by compress-edge")
parser.add_argument("--gallery", required=True, help="the images to search")
parser.add_argument("--query", required=True, nargs="+", help="query images")
parser.add_argument("--out", default="idx")
parser.add_argument("-k", type=int, default=5)
args = parser.parse_args()

# 1. Index the gallery: embeddings in shards, an index chosen for its size, tuned for recall.
index = build_from_images(args.model, [args.gallery], args.out)
print(f"index {index.key} of {index.ntotal} images in {args.out}")

# 2. Query it with the same model (a model whose ModelSpec differs is refused).
with Searcher(args.out, model=args.model) as searcher:
    for query, hits in zip(args.query, searcher.search(args.query, k=args.k), strict=True):
        print(query)
        for hit in hits:
            print(f"  #{hit.rank} {hit.score:.3f} {hit.path}")

print("torch imported:", "torch" in sys.modules)
