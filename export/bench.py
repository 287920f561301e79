"""Benchmarking any Embedder: latency, throughput, peak memory and achieved GFLOP/s, and the machine
the numbers were taken on.

Torch-free at import time: torch and fvcore are imported only to count FLOPs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from compress_edge.export.embedder import Embedder

from compress_edge.deps import available
from compress_edge.errors import DataError, ModelError
from compress_edge.models.spec import ModelSpec


@dataclass
class BenchRow:
    """One (embedder, batch size) measurement. Times in milliseconds per batch.

    gflop_per_image: fvcore's count for one image (one multiply-add counted as one flop, as fvcore
    does); achieved_gflops: that count times images per second. peak_rss_mb: the process's largest
    resident memory while this row ran (all models loaded so far included).
    """

    model: str
    backend: str
    precision: str
    device: str
    threads: int | None
    batch: int
    image_size: int
    warmup: int
    iters: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    images_per_s: float
    gflop_per_image: float | None
    achieved_gflops: float | None
    peak_rss_mb: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark(
    embedder: Embedder,
    batch_sizes: Sequence[int] = (1, 32),
    *,
    warmup: int = 5,
    iters: int = 30,
    min_seconds: float = 0.0,
    gflop_per_image: float | None = None,
    label: str | None = None,
    images: np.ndarray | None = None,
) -> list[BenchRow]:
    """Time ``embedder`` on batches of each size (after ``warmup`` runs).

    images: preprocessed real images float32 (N, C, S, S) the batches are filled from (repeated when
    a batch is larger than N); None times random tensors, which a quantised model may answer with
    zeros (callers should say so). Runs ``iters`` timed batches, more while the total stays under
    ``min_seconds``. Latency is wall time of ``_embed_array`` (model run plus the copy out; decoding
    and preprocessing excluded).
    """
    rng = np.random.default_rng(0)
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(embedder.input_shape) or not len(images):
            raise DataError(f"images of shape {tuple(images.shape)} for a model that takes "
                            f"(N, {', '.join(map(str, embedder.input_shape))}); preprocess them for this model")
    rows = []
    for b in batch_sizes:
        if b <= 0:
            raise DataError(f"batch sizes must be positive, got {b}")
        if images is not None:
            x = np.ascontiguousarray(images[np.arange(int(b)) % len(images)])
        else:
            x = rng.standard_normal((int(b), *embedder.input_shape)).astype(np.float32)
        for _ in range(max(0, warmup)):
            embedder._embed_array(x)
        times: list[float] = []
        with _RssSampler() as rss:
            total = 0.0
            while len(times) < max(1, iters) or total < min_seconds:
                t0 = time.perf_counter()
                embedder._embed_array(x)
                dt = time.perf_counter() - t0
                times.append(dt)
                total += dt
        arr = np.asarray(times) * 1000.0
        mean = float(arr.mean())
        ips = float(b / (mean / 1000.0))
        rows.append(
            BenchRow(
                model=label or str(embedder.path),
                backend=embedder.name,
                precision=embedder.precision,
                device=embedder.device,
                threads=embedder.threads,
                batch=int(b),
                image_size=int(embedder.spec.image_size),
                warmup=int(warmup),
                iters=len(times),
                p50_ms=float(np.percentile(arr, 50)),
                p95_ms=float(np.percentile(arr, 95)),
                mean_ms=mean,
                images_per_s=ips,
                gflop_per_image=gflop_per_image,
                achieved_gflops=gflop_per_image * ips if gflop_per_image else None,
                peak_rss_mb=rss.peak_mb,
            )
        )
    return rows


class _RssSampler:
    """Samples this process's resident memory every few milliseconds in a thread (Linux /proc)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = None
        self._thread = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _read(self) -> int:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def __enter__(self) -> _RssSampler:
        import threading

        self.peak = self._read()
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self._read())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def peak_mb(self) -> float | None:
        return round(self.peak / 2**20, 1) if self.peak else None


def count_gflops(spec: ModelSpec) -> float | None:
    """fvcore's GFLOP count for one image through the architecture ``spec`` describes (None when
    the architecture is unknown here, or torch / fvcore are not installed)."""
    key = json.dumps(spec.identity(), sort_keys=True)
    if key not in _GFLOPS:
        _GFLOPS[key] = _count_gflops(spec)
    return _GFLOPS[key]


_GFLOPS: dict[str, float | None] = {}


def _count_gflops(spec: ModelSpec) -> float | None:
    if not (available("torch") and available("fvcore")):
        return None
    import torch

    from compress_edge.eval.profile import count_flops
    from compress_edge.models.resolve import rebuild

    try:
        model = rebuild(spec.arch, spec.arch_kwargs, normalize=spec.normalize).eval()
    except ModelError:
        return None
    total, _, _, _ = count_flops(model, torch.zeros(1, spec.channels, spec.image_size, spec.image_size))
    return float(total) / 1e9


def machine_info() -> dict[str, Any]:
    """CPU model, core count and the SIMD flags that decide INT8 speed (Linux), for bench reports."""
    import platform

    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": [f for f in wanted if f in flags],
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
