"""``compress-edge bench``'s measurement: several models timed side by side on the same images (real
ones when there are any: ``--data``, else the calibration set their export.json names), each after the
first also compared with it (min cosine of the embeddings).

Torch-free at import time, like :mod:`compress_edge.export.bench`, which times one model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.bench import BenchRow

from compress_edge.errors import CompressEdgeError

log = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """What :func:`bench_models` measured: the machine, the inputs, one row per (model, batch size), and
    the min cosine of each later model's embeddings against the first's."""

    machine: dict[str, Any]
    inputs: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    min_cosine_vs_first: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``compress-edge bench --json`` prints."""
        return {"machine": self.machine, "inputs": self.inputs, "rows": [r.to_dict() for r in self.rows],
                "min_cosine_vs_first": self.min_cosine_vs_first}


def bench_models(
    models: list[str],
    *,
    backend: str = "auto",
    sizes: list[int] | tuple[int, ...] = (1, 32),
    threads: int | None = None,
    warmup: int = 5,
    iters: int = 30,
    min_seconds: float = 1.0,
    device: str = "auto",
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    data: str | None = None,
    weights: str | None = None,
) -> BenchResult:
    """Time each of ``models`` (any MODEL argument) at each batch size of ``sizes``; the first is the
    reference of the cosine comparison. ``weights``: a third-party checkpoint for the one
    architecture-name model. Random tensors (with a warning) only when there are no images."""
    from compress_edge.export.bench import benchmark, count_gflops, machine_info
    from compress_edge.export.parity import cosine_per_row, synthetic_images
    from compress_edge.export.runtimes import open_embedder

    sizes = list(sizes)
    source, where = (data, "--data") if data else recorded_data(models)
    inputs = {"kind": "real", "data": source, "from": where} if source else {"kind": "random"}
    loaded: dict[tuple, np.ndarray] = {}
    rows, cosines = [], {}
    reference = pictures = None
    named = [m for m in models if not Path(m).exists()]
    if weights is not None and len(named) != 1:
        raise CompressEdgeError(f"--weights goes with one architecture-name MODEL, and {len(named)} are given; "
                                "bench one checkpoint at a time, or export it first and bench its model.onnx")
    for model in models:
        checkpoint = weights if named and model == named[0] else None  # a third-party checkpoint: PyTorch
        embedder = open_embedder(model, "torch" if checkpoint is not None else backend, weights=checkpoint,
                                 device=device, threads=threads, image_size=image_size, mean=mean, std=std)
        try:
            real = _bench_images(embedder.spec, source, where, max(32, *sizes), loaded, inputs)
            rows += benchmark(embedder, sizes, warmup=warmup, iters=iters, min_seconds=min_seconds,
                              gflop_per_image=count_gflops(embedder.spec), label=model, images=real)
            test = (real[:32], "real") if real is not None else (synthetic_images(embedder.spec, 32), "synthetic")
            if pictures is None:
                pictures = test
            # Compared only on the same kind of input (a set that failed to load midway is not).
            same = test[1] == pictures[1] and test[0].shape[1:] == pictures[0].shape[1:]
            emb = embedder.embed(test[0]) if same else None
            if reference is None:
                reference = emb
            elif emb is not None and reference is not None and emb.shape == reference.shape:
                cosines[model] = float(cosine_per_row(reference, emb).min())
        finally:
            embedder.close()
    if inputs["kind"] == "random":
        log.warning("bench ran on random tensors and synthetic pictures, which say little about real inputs (an "
                    "INT8 model may answer them with zeros): pass --data with an image folder or fashion-mnist:test")
    return BenchResult(machine=machine_info(), inputs=inputs, rows=rows, min_cosine_vs_first=cosines)


def recorded_data(models: list[str]) -> tuple[str | None, str]:
    """The calibration (else parity) images export.json beside a model names, and that file; (None, "")."""
    for model in models:
        path = Path(model)
        report_path = (path if path.is_dir() else path.parent) / "export.json"
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            continue
        for key in ("calibration", "check_images"):
            entry = report.get(key) if isinstance(report, dict) else None
            if not isinstance(entry, dict):
                continue
            recorded = entry.get("data")
            source = str(entry.get("source", ""))
            if not isinstance(recorded, str) and source.startswith("real (") and source.endswith(")"):
                recorded = source[len("real (") : -1]  # an export.json from before "data" was recorded
            if isinstance(recorded, str) and recorded:
                return recorded, str(report_path)
    return None, ""


def _bench_images(spec, source: str | None, where: str, n: int, loaded: dict, inputs: dict) -> np.ndarray | None:
    """``n`` real images preprocessed for ``spec`` (cached per preprocessing), or None without a source.

    A set named only by export.json that cannot be read any more (moved, relative to another folder)
    falls back to random input with a warning; --data that cannot be read is an error.
    """
    if source is None or inputs["kind"] != "real":
        return None
    from compress_edge.export.parity import load_check_images

    key = (spec.channels, spec.image_size, tuple(spec.mean), tuple(spec.std))
    if key not in loaded:
        try:
            loaded[key], inputs["source"] = load_check_images(source, spec, n, purpose="bench", progress=False)
        except CompressEdgeError as exc:
            if where == "--data":
                raise
            log.warning("cannot read the images %s names (%s)", where, exc)
            inputs.clear()
            inputs["kind"] = "random"
            return None
    return loaded[key]
