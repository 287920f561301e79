"""compress-edge: distil a big self-supervised image model into a small one and serve it on a device.

The package root imports nothing heavy: the query path on a device (``compress_edge.models.spec``,
``compress_edge.data.images``, ``compress_edge.export.runtimes``, ``compress_edge.retrieval``) must import
without torch installed.
"""

__version__ = "0.1.0"
