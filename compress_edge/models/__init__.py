"""Models: the architecture registry (``registry``), third-party checkpoint layouts (``layouts``),
compress-edge model folders (``files``: safetensors + ``spec``), and the one MODEL resolver
(``resolve``). Nothing is imported here, so ``compress_edge.models.spec`` stays torch-free."""
