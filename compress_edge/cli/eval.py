"""(being written)"""

from compress_edge.cli import app  # noqa: F401
