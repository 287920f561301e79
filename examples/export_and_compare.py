"""Export a student to ONNX and INT8, then compare the backends on the same images.

    python examples/export_and_compare.py --model runs/my-student --images photos/ --out exports/my-student
"""

import argparse
import time

import numpy as np
from compress_edge.export.pipeline import ExportOptions, export_model
from compress_edge.export.runtimes import open_embedder

from compress_edge.data.images import scan_images

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="a compress-edge model or run folder")
parser.add_argument("--images", required=True, help="images for calibration and the comparison")
parser.add_argument("--out", default="exports/model")
args = parser.parse_args()

# 1. Export: model.onnx (checked against PyTorch) and model.int8-cpu.onnx (calibrated on the images).
report = export_model(ExportOptions(model=args.model, out=args.out, int8=["cpu"], calib_data=args.images,
                                    calib_images=64, parity_data=args.images, strict=False))
for name, parity in report["parity"].items():
    print(f"{name:>10}: min cosine vs PyTorch {parity['min_cosine']:.5f}")

# 2. Embed the same images with each backend, through the one Embedder interface.
files = scan_images(args.images).files[:32]
backends = {"pytorch": args.model, "onnx fp32": f"{args.out}/model.onnx", "onnx int8": f"{args.out}/model.int8-cpu.onnx"}
embeddings = {}
for name, model in backends.items():
    with open_embedder(model) as embedder:
        embedder.embed_paths(files[:2])  # warm-up
        start = time.perf_counter()
        embeddings[name] = embedder.embed_paths(files)
        seconds = time.perf_counter() - start
    print(f"{name:>10}: {len(files) / seconds:8.1f} images/s, {embeddings[name].shape[1]}-d")

# 3. Same embeddings? Cosine of each backend against PyTorch, image by image.
for name, x in embeddings.items():
    cosine = np.sum(x * embeddings["pytorch"], axis=1)
    print(f"{name:>10}: cosine vs pytorch min {cosine.min():.5f}, mean {cosine.mean():.5f}")
