"""Helpers shared by the tests (importable: pyproject.toml puts tests/ on the path)."""

from __future__ import annotations

# A Python whose imports of the named packages fail, as on an install without them.
_BLOCKING_CLI = """
import sys

BLOCKED = set(sys.argv[1].split(","))


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())
sys.argv = ["compress-edge", *sys.argv[2:]]
from compress_edge.cli import main

main()
"""


def cli_without(packages: str, *args: str):
    """Run ``compress-edge ARGS`` in a Python where importing any of ``packages`` (comma-separated top-level
    names) fails, as on an install without them: the CompletedProcess, text output captured."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _BLOCKING_CLI, packages, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def stop_process(proc, timeout: float = 20) -> None:
    """Ask a child process to stop (SIGTERM), and kill it when it has not within ``timeout`` seconds."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
