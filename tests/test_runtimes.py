"""The Embedder interface: one embed() for every backend, and the onnxruntime one without torch."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from cli_helpers import imports_torch
from compress_edge.export import onnx as ce_onnx
from compress_edge.export.backends import OnnxRuntimeEmbedder, TorchEmbedder
from compress_edge.export.embedder import Embedder
from compress_edge.export.runtimes import backend_for, open_embedder
from PIL import Image

from compress_edge.data.images import open_image, preprocess_batch, scan_images
from compress_edge.errors import DataError, DependencyError, ModelError
from compress_edge.models.resolve import create_model, recalibrate_batchnorm, save_model, spec_for


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("runtimes")
    images_dir = make_images(root / "images", size=40)
    files = [str(p) for p in scan_images(images_dir).files]
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True)
    spec = spec_for(model, image_size=32)
    batch = torch.from_numpy(preprocess_batch(files, 32, spec.mean, spec.std))
    recalibrate_batchnorm(model, batch)  # statistics from the images, so embeddings differ per image
    spec = save_model(model, spec, root / "student")
    onnx_path = root / "model.onnx"
    ce_onnx.export_onnx(model, spec, onnx_path, exporter="torchscript")
    return {"root": root, "files": files, "folder": root / "student", "onnx": onnx_path, "spec": spec}


def test_auto_backend_follows_the_model(setup):
    assert backend_for(setup["folder"]) == "torch"
    assert backend_for("mobilenet_v2") == "torch"
    assert backend_for(setup["onnx"]) == "onnxruntime"
    assert backend_for("x/model.engine") == "tensorrt"
    with open_embedder(setup["folder"]) as t, open_embedder(setup["onnx"], threads=1) as o:
        assert isinstance(t, TorchEmbedder) and t.name == "torch"
        assert isinstance(o, OnnxRuntimeEmbedder) and o.name == "onnxruntime" and o.threads == 1
        assert isinstance(t, Embedder) and isinstance(o, Embedder)
        assert t.spec == o.spec == setup["spec"]
        assert o.info()["providers"] == ["CPUExecutionProvider"]


def test_every_input_form_gives_the_same_embeddings(setup):
    files = setup["files"][:6]
    emb = open_embedder(setup["onnx"])
    pil = [open_image(f) for f in files]
    arr = preprocess_batch(files, 32, setup["spec"].mean, setup["spec"].std)
    a = emb.embed(pil)
    assert a.dtype == np.float32 and a.shape == (6, 1024)
    np.testing.assert_array_equal(a, emb.embed(arr))
    np.testing.assert_array_equal(a, emb.embed(files))
    np.testing.assert_allclose(a, emb.embed_paths(files, batch_size=4, workers=2), atol=1e-6)
    np.testing.assert_allclose(a[:1], emb.embed(pil[0]), atol=1e-6)
    assert emb.embed([]).shape == (0, 1024)
    assert emb.embed_paths([]).shape == (0, 1024)


def test_torch_and_onnxruntime_agree(setup):
    files = setup["files"]
    t = open_embedder(setup["folder"], "torch").embed_paths(files, batch_size=5, progress=True)
    o = open_embedder(setup["onnx"], "onnxruntime").embed_paths(files, batch_size=7)
    assert t.shape == o.shape == (len(files), 1024)
    cos = np.sum(t * o, axis=1)
    assert cos.min() > 0.9999
    assert np.abs(t - o).max() < 1e-4


def test_non_rgb_and_odd_sized_images_are_preprocessed(setup, tmp_path):
    gray = Image.fromarray(np.arange(50 * 70, dtype=np.uint8).reshape(50, 70) % 251, mode="L")
    emb = open_embedder(setup["onnx"])
    out = emb.embed([gray, gray.convert("RGB")])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_bad_inputs_are_explained(setup, tmp_path):
    emb = open_embedder(setup["onnx"])
    with pytest.raises(DataError, match=r"shape \(N, 3, 32, 32\), got an array of shape \(2, 3, 28, 28\)"):
        emb.embed(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(DataError, match=r"\(N, 3, 32, 32\).*\(2, 1, 32, 32\)"):
        emb.embed(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(DataError, match="float32"):
        emb.embed(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="not one path"):
        emb.embed(setup["files"][0])
    with pytest.raises(DataError, match="holding int"):
        emb.embed([1, 2])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    from compress_edge.data.images import UnreadableImage

    with pytest.raises(UnreadableImage):
        emb.embed_paths([broken])


def test_backend_choices_are_checked(setup):
    with pytest.raises(ModelError, match="unknown backend 'tflite'; choose one of: auto, torch, onnxruntime"):
        open_embedder(setup["onnx"], "tflite")
    with pytest.raises(ModelError, match="torch backend runs a compress-edge model folder"):
        open_embedder(setup["onnx"], "torch")
    with pytest.raises(ModelError, match="onnxruntime backend runs a .onnx file"):
        open_embedder(setup["folder"], "onnxruntime")
    with pytest.raises(ModelError, match="unknown device 'tpu'"):
        open_embedder(setup["onnx"], device="tpu")


def test_one_device_choice():
    import torch

    from compress_edge.devices import DeviceError, parse_device, resolve_device, torch_device_name
    from compress_edge.errors import TrainingError
    from compress_edge.train.engine import resolve_device as train_resolve_device

    assert train_resolve_device is resolve_device
    assert parse_device(None) == parse_device("") == parse_device("AUTO") == ("auto", None)
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device(torch.device("cpu")) == parse_device("cpu:0") == ("cpu", None)  # as training took it
    for bad in ("tpu", "mps:1", "cuda:x"):
        with pytest.raises(DeviceError, match=f"unknown device '{bad}'"):
            parse_device(bad)
    assert issubclass(DeviceError, ModelError) and issubclass(DeviceError, TrainingError)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert torch_device_name("auto") == "cpu" and resolve_device("auto", 3) == torch.device("cpu")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    else:
        assert torch_device_name("auto") == "cuda" and resolve_device("auto", 1) == torch.device("cuda:1")
        assert resolve_device("cuda:0", 1) == torch.device("cuda:0")


def test_cuda_provider_missing_says_what_to_install(setup):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DependencyError, match="onnxruntime-gpu"):
        open_embedder(setup["onnx"], device="cuda")


def test_norm_override_warns_and_applies(setup, caplog):
    emb = open_embedder(setup["onnx"], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert emb.spec.mean == (0.5, 0.5, 0.5)
    assert any("overriding the stored normalisation" in r.getMessage() for r in caplog.records)


def test_runtimes_module_does_not_import_torch():
    assert not imports_torch("compress_edge.export.runtimes", "compress_edge.export")


@pytest.mark.slow
def test_onnxruntime_embedder_runs_without_torch(setup, torchfree_python, tmp_path):
    """The device's query path: no torch installed at all; same embeddings as PyTorch."""
    out = tmp_path / "emb.npy"
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from compress_edge.export.runtimes import open_embedder
        emb = open_embedder({str(setup["onnx"])!r}, threads=1)
        files = {json.dumps(setup["files"])}
        np.save({str(out)!r}, emb.embed_paths(files, batch_size=8, workers=2))
        print(json.dumps({{"torch": "torch" in sys.modules, "backend": emb.name, "spec": emb.spec.to_dict()}}))
        """
    )
    run = subprocess.run([str(torchfree_python), "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["torch"] is False and info["backend"] == "onnxruntime"
    assert info["spec"] == setup["spec"].to_dict()
    got = np.load(out)
    ref = open_embedder(setup["folder"], "torch").embed_paths(setup["files"])
    assert got.shape == ref.shape
    assert np.sum(got * ref, axis=1).min() > 0.9999
    assert np.abs(got - ref).max() < 1e-4


def _graph_file(path, inputs, batch=None):
    """A tiny ONNX file without compress-edge metadata: each input's spatial mean, (B, 3, 8, 8) -> (B, 3)."""
    from onnx import TensorProto, helper, save_model

    ins = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 3, 8, 8]) for name in inputs]
    nodes = [helper.make_node("ReduceMean", [inputs[0], "axes"], ["y"], keepdims=0)]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                              initializer=[axes])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_model_file_embedder_checks_the_graph_once_for_every_backend(tmp_path):
    """The checks every exported-file embedder shares (ModelFileEmbedder): a missing path, a graph with
    two image inputs, and a fixed-batch file (fed exactly its batch)."""
    with pytest.raises(ModelError, match=r"no ONNX file at .*missing\.onnx: the path does not exist"):
        OnnxRuntimeEmbedder(tmp_path / "missing.onnx")
    two = _graph_file(tmp_path / "two.onnx", ["a", "b"])
    with pytest.raises(ModelError, match="has 2 inputs and 1 outputs; an embedding model has one image input"):
        OnnxRuntimeEmbedder(two, image_size=8)
    fixed = OnnxRuntimeEmbedder(_graph_file(tmp_path / "fixed.onnx", ["images"], batch=4), image_size=8, threads=1,
                                mean=(0.5,) * 3, std=(0.25,) * 3)
    assert (fixed.min_batch, fixed.max_batch, fixed.spec.embed_dim) == (4, 4, 3)
    x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(fixed.embed(x), x.mean(axis=(2, 3)), atol=1e-5)  # 4, then 2 padded to 4
