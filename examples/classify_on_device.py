"""Classify images on a device by weighted kNN over a labelled index (onnxruntime + faiss, no torch).

    python examples/classify_on_device.py --index idx --model student.onnx photo1.jpg photo2.jpg
"""

import argparse
import sys

from compress_edge.retrieval.search import Searcher

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--index", required=True, help="an index built from a class folder")
parser.add_argument("--model", required=True, help="the .onnx model the index was built with")
parser.add_argument("images", nargs="+")
parser.add_argument("-k", type=int, default=20)
parser.add_argument("--temperature", type=float, default=0.07)
args = parser.parse_args()

# Each neighbour votes exp(similarity / T) for its label; the class with most weight wins.
with Searcher(args.index, model=args.model) as searcher:
    predictions = searcher.classify(args.images, k=args.k, temperature=args.temperature)
for image, prediction in zip(args.images, predictions, strict=True):
    print(f"{image}: {prediction.label_name} ({prediction.confidence:.0%})")

print("torch imported:", "torch" in sys.modules)
