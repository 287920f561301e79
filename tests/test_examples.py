"""Every script in examples/ runs, on tiny data; the device examples in a Python without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(python, script, *args, cwd):
    out = subprocess.run([str(python), str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture
def small_model(tmp_path):
    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True)
    save_model(model, spec_for(model, image_size=32), tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.slow
def test_distill_your_checkpoint(tmp_path, class_folder):
    import torchvision

    checkpoint = tmp_path / "my_resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)  # a plain torchvision state dict
    out = _run(sys.executable, "distill_your_checkpoint.py", "--images", class_folder, "--teacher-arch", "resnet18",
               "--teacher-weights", checkpoint, "--student-arch", "mobilenet_v3_small", "--image-size", "32",
               "--epochs", "1", "--batch-size", "6", "--queue-size", "12", "--out", tmp_path / "run", cwd=tmp_path)
    assert "trained 1 epochs" in out and (tmp_path / "run" / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_export_and_compare(tmp_path, class_folder, small_model):
    out = _run(sys.executable, "export_and_compare.py", "--model", small_model, "--images", class_folder,
               "--out", tmp_path / "exports", cwd=tmp_path)
    assert "onnx int8" in out and (tmp_path / "exports" / "model.int8-cpu.onnx").is_file()
    fp32 = next(line for line in out.splitlines() if line.strip().startswith("onnx fp32: cosine"))
    assert float(fp32.split("min")[1].split(",")[0]) > 0.9999


@pytest.mark.slow
def test_device_examples_run_without_torch(tmp_path, class_folder, small_model, torchfree_python):
    from compress_edge.export.onnx import export_onnx

    from compress_edge.models.resolve import load_model

    model, spec = load_model(small_model)
    onnx = tmp_path / "student.onnx"
    export_onnx(model, spec, onnx, exporter="torchscript", simplify=False)
    queries = sorted(class_folder.rglob("*.png"))[:2]
    out = _run(torchfree_python, "index_and_query_without_torch.py", "--model", onnx, "--gallery", class_folder,
               "--query", *queries, "--out", tmp_path / "idx", "-k", "3", cwd=tmp_path)
    assert "torch imported: False" in out and "#1 1.000" in out  # a gallery image finds itself first
    out = _run(torchfree_python, "classify_on_device.py", "--index", tmp_path / "idx", "--model", onnx, *queries,
               "-k", "5", cwd=tmp_path)
    assert "torch imported: False" in out
    assert out.count(":") >= 2 and "circle" in out
