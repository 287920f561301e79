"""Models: the architecture registry (``backbone``, ``cnn``, ``vit``, ``registry``, ``sizes``), third-party
checkpoints (``formats``, ``layouts``, ``inspection``), compress-edge model folders (``files``: safetensors
+ ``spec``), and ``resolve`` (a MODEL argument as a torch model, the PyTorch branch of the one MODEL
resolver, ``compress_edge.export.runtimes.open_embedder``). Nothing is imported here, so
``compress_edge.models.spec`` stays torch-free."""
