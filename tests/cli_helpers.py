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


def randomize_bn(model, seed: int = 1) -> None:
    """Give every BatchNorm non-default running statistics, so that a checkpoint or copy that loses them shows."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def imports_torch(*modules: str) -> bool:
    """Whether importing ``modules`` in a fresh interpreter loads torch (the torch-free paths must not)."""
    import subprocess
    import sys

    code = f"import sys\nimport {', '.join(modules)}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"
