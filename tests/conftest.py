"""Shared fixtures: tiny generated images so every test runs on a CPU in seconds."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _few_threads():
    """Each test starts on OMP_NUM_THREADS torch threads (2 unless set; ./run.sh test sets 1 for each of its
    two pytest processes side by side), whatever a test before it set: more threads than cores makes
    OpenMP's spinning threads wait for each other, many times slower."""
    try:
        import torch
    except ImportError:  # the torch-free environment
        yield
        return
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0] or 2)))
    yield


def make_class_folder(root, classes=("circle", "square", "stripes"), per_class=6, size=24, seed=0):
    """Write a labelled image folder whose classes are visually distinct (shapes on noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
            c = size / 2 + rng.uniform(-2, 2)
            if ci % 3 == 0:
                mask = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2
            elif ci % 3 == 1:
                mask = (abs(yy - c) < size / 3) & (abs(xx - c) < size / 3)
            else:
                mask = (xx // 3) % 2 == 0
            colour = np.array([(60 * ci) % 255, 200, (255 - 70 * ci) % 255], dtype=np.uint8)
            img[mask] = colour
            Image.fromarray(img).save(d / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def make_images():
    """The generator above, for tests that need more than one folder or a module-scoped one
    (conftest is not importable under --import-mode=importlib)."""
    return make_class_folder


@pytest.fixture
def class_folder(tmp_path):
    return make_class_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """The CLI sets up its own handler on the 'compress_edge' logger; give caplog it back afterwards."""
    import logging

    logger = logging.getLogger("compress_edge")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture(scope="session")
def torchfree_python():
    """A Python without torch: the ``device`` extra as pyproject.toml lists it and compress-edge
    installed with --no-deps.

    The query path of a device is run in it. Built once in .venv-torchfree beside the project (kept
    between runs; rebuilt when pyproject.toml changes). Returns the interpreter's path.
    """
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    venv = root / ".venv-torchfree"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not (stamp.is_file() and stamp.stat().st_mtime >= (root / "pyproject.toml").stat().st_mtime):
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        import tomllib

        device = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["device"]
        subprocess.run([*pip, *device], check=True)
        subprocess.run([*pip, "--no-deps", "-e", str(root)], check=True)
        stamp.touch()
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the torch-free environment has torch"
    return python



@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny inputs gain nothing from a second thread, and on a shared, busy CPU OpenMP threads that spin
    waiting for each other make each forward ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def saved_teacher(tmp_path):
    """A small-input resnet18 with random weights saved as a compress-edge model folder (32 px)."""
    import torch

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(1)
    teacher = create_model("resnet18", small_input=True)
    spec = spec_for(teacher, image_size=32, source={"kind": "test"})
    folder = tmp_path / "teacher"
    save_model(teacher, spec, folder)
    return folder
