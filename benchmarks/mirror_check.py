"""Does averaging a model's embedding with that of the mirrored image widen its lead over raw pixels?

A "flip test" is a common evaluation trick: embed the image and its left-right mirror and average the two
(L2-normalised) embeddings. SimCLR and MoCo train with random flips, so a teacher they made should be
nearly flip-invariant already, and the average should change little. This script measures it on the same
gallery and queries as the demo, for the model and, to be fair, for the raw pixels (image plus mirror).

Run:  python benchmarks/mirror_check.py [MODEL] --train fashion-mnist:train@20000 --test fashion-mnist:test@2000
(MODEL: default the demo's shipped teacher.) Prints a table; --json FILE writes the numbers.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from whitening_check import finish, knn_scores, model_and_pixels_parser, setting  # benchmarks/ is on the path

from compress_edge.data.datasets import open_dataset
from compress_edge.eval.features import extract_features
from compress_edge.eval.neighbors import l2_normalize
from compress_edge.eval.quality import raw_pixel_features
from compress_edge.models.resolve import load_model


class Mirrored(torch.nn.Module):
    """The model applied to the left-right mirror of each image."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flip(-1))


def mirror_averaged_pixels(pixels: np.ndarray, side: int) -> np.ndarray:
    """Raw-pixel rows (N, C * side * side) plus their mirrored rows, L2-normalised."""
    images = pixels.reshape(len(pixels), -1, side, side)
    return l2_normalize((images + images[..., ::-1]).reshape(len(pixels), -1))


def main() -> None:
    args = model_and_pixels_parser(__doc__).parse_args()

    started = time.perf_counter()
    model, spec = load_model(args.model)
    gallery, queries = open_dataset(args.train), open_dataset(args.test)

    def embed(module: torch.nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        return [extract_features(module, data, spec=spec, device="cpu", use_cache=False, progress=False)
                for data in (gallery, queries)]

    (g, gl), (q, ql) = embed(model)
    (mirror_g, _), (mirror_q, _) = embed(Mirrored(model))
    # extract_features L2-normalises each embedding: their normalised sum is the mirror-averaged embedding
    rows = {"model": knn_scores(g, gl, q, ql),
            "model, mirror-averaged": knn_scores(l2_normalize(g + mirror_g), gl, l2_normalize(q + mirror_q), ql)}
    raw_g, raw_q = raw_pixel_features(gallery, args.raw_size), raw_pixel_features(queries, args.raw_size)
    rows["raw pixels"] = knn_scores(raw_g, gl, raw_q, ql)
    rows["raw pixels, mirror-averaged"] = knn_scores(mirror_averaged_pixels(raw_g, args.raw_size), gl,
                                                     mirror_averaged_pixels(raw_q, args.raw_size), ql)
    print(setting(args, spec))
    print(f"{'features':28s} {'weighted 20-NN':>15s} {'1-NN':>7s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['knn20_top1']:15.2f} {r['nn_top1']:7.2f}")
    finish(args, rows, started)


if __name__ == "__main__":
    main()
