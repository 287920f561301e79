"""Method names and the paper's defaults, torch-free so that the command line imports without torch
(a device runs ``compress-edge search`` and ``classify`` with onnxruntime, faiss and numpy only)."""

METHODS = ("compress-2q", "compress-2q-nomomentum", "compress-1q", "regression", "regression-bn")
PAPER_QUEUE_SIZE = 128_000  # CompRess, NeurIPS 2020
PAPER_TEMPERATURE = 0.04
