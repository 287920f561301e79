"""The machine a benchmark ran on, as its printed results name it (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), or what ``platform`` knows where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return fields.get("Model name", "").strip() or platform.processor()
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def describe() -> str:
    """CPU model, logical CPUs and Python version in one line."""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"
