"""ONNX export: dynamic batch, metadata round trip, parity on real images, OpenCV as a second consumer."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress_edge.export import onnx as ce_onnx
from compress_edge.export.exported import PRECISION_KEY
from compress_edge.export.parity import GOALS, compare, load_check_images
from compress_edge.export.runtimes import open_embedder

from compress_edge.errors import ExportError, ModelError
from compress_edge.models.resolve import create_model, recalibrate_batchnorm, save_model, spec_for


def make_student(images: np.ndarray, normalize: bool = True, seed: int = 0):
    """A tiny student whose BatchNorm statistics come from real images (a random init otherwise
    shrinks activations to ~1e-8 and every image gets the same embedding)."""
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", small_input=True, normalize=normalize)
    return recalibrate_batchnorm(model, torch.from_numpy(images))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("onnx")
    images_dir = make_images(root / "images", size=40)
    model = create_model("mobilenet_v3_small", small_input=True)
    spec = spec_for(model, image_size=32, source={"kind": "distill", "run": "test"})
    images, _ = load_check_images(images_dir, spec, 64)
    model = make_student(images)
    spec = save_model(model, spec, root / "student")
    result = ce_onnx.export_onnx(model, spec, root / "out" / "model.onnx")
    return {"model": model, "spec": spec, "path": Path(result.path), "result": result, "images": images,
            "images_dir": images_dir, "root": root}


def test_dynamo_export_runs_at_batch_1_and_7(exported):
    result = exported["result"]
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert result.batch_check == {"batch": [1, 7], "shape": [[1, 1024], [7, 1024]]}
    proto = onnx.load(str(exported["path"]))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    emb = open_embedder(exported["path"])
    for b in (1, 7):
        assert emb.embed(exported["images"][:b]).shape == (b, 1024)


def test_checker_and_simplification(exported):
    onnx.checker.check_model(onnx.load(str(exported["path"])), full_check=True)
    assert exported["result"].simplified  # onnxslim is installed in the dev environment
    # The dynamo exporter's debug metadata (stack traces, local paths) is not shipped.
    proto = onnx.load(str(exported["path"]))
    assert not any(len(n.metadata_props) for n in proto.graph.node)


def test_metadata_round_trip(exported):
    spec = exported["spec"]
    props = ce_onnx.read_metadata(exported["path"])
    assert props["Image.BitmapPixelFormat"] == "Rgb8"
    assert props["Image.NominalPixelRange"] == "Normalized_0_1"
    assert props[PRECISION_KEY] == "fp32"
    assert ce_onnx.read_spec(exported["path"]) == spec  # mean, std, size, channels, dim, normalised, provenance
    emb = open_embedder(exported["path"])  # onnxruntime's reading of the same metadata
    assert emb.spec == spec
    assert emb.spec.source == {"kind": "distill", "run": "test"}
    assert emb.precision == "fp32"


def test_parity_with_pytorch_on_real_images(exported):
    images = exported["images"]
    with torch.no_grad():
        ref = exported["model"](torch.from_numpy(images)).numpy()
    got = open_embedder(exported["path"]).embed(images)
    result = compare(ref, got, name="onnxruntime", reference_name="torch", goal=GOALS["fp32"])
    print(result.line())
    assert result.passed, result.line()
    assert result.min_cosine >= 0.9999
    assert result.max_abs_diff < 1e-4
    assert result.topk_overlap is not None and result.topk_overlap >= 0.9


def test_l2_normalisation_is_in_the_graph(exported):
    proto = onnx.load(str(exported["path"]))
    assert "ReduceL2" in {n.op_type for n in proto.graph.node}
    out = open_embedder(exported["path"]).embed(exported["images"][:5])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_unnormalised_model_exports_without_normalisation(exported, tmp_path):
    model = make_student(exported["images"], normalize=False)
    spec = spec_for(model, image_size=32)
    path = tmp_path / "raw.onnx"
    ce_onnx.export_onnx(model, spec, path, exporter="torchscript", opset=20)
    proto = onnx.load(str(path))
    assert "ReduceL2" not in {n.op_type for n in proto.graph.node}
    with torch.no_grad():
        ref = model(torch.from_numpy(exported["images"][:4])).numpy()
    np.testing.assert_allclose(open_embedder(path).embed(exported["images"][:4]), ref, atol=1e-4, rtol=1e-4)


def test_opencv_dnn_gives_the_same_embeddings(exported):
    cv2 = pytest.importorskip("cv2")
    images = np.ascontiguousarray(exported["images"][:7])
    net = cv2.dnn.readNetFromONNX(str(exported["path"]))
    net.setInput(images)
    got = np.asarray(net.forward(), dtype=np.float32).reshape(7, -1)
    ref = open_embedder(exported["path"]).embed(images)
    result = compare(ref, got, name="opencv dnn", reference_name="onnxruntime", goal=GOALS["fp32"])
    assert result.passed, result.line()
    assert result.max_abs_diff < 1e-4


def test_falls_back_to_torchscript_with_a_warning(exported, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("torch.export could not trace this model")

    monkeypatch.setattr(ce_onnx, "_export_dynamo", broken)
    with caplog.at_level(logging.WARNING, logger="compress_edge"):
        result = ce_onnx.export_onnx(exported["model"], exported["spec"], tmp_path / "m.onnx")
    assert result.exporter == "torchscript"
    assert "could not trace" in result.fallback_reason
    assert any("falling back to the TorchScript exporter" in r.getMessage() for r in caplog.records)
    assert result.batch_check["shape"] == [[1, 1024], [7, 1024]]
    assert ce_onnx.read_spec(result.path) == exported["spec"]
    # dynamo=True only: no fallback, a clear error.
    with pytest.raises(ExportError, match="dynamo ONNX exporter failed"):
        ce_onnx.export_onnx(exported["model"], exported["spec"], tmp_path / "n.onnx", exporter="dynamo")


def test_opset_out_of_range_is_refused(exported, tmp_path):
    with pytest.raises(ExportError, match="opset 17 is not supported"):
        ce_onnx.export_onnx(exported["model"], exported["spec"], tmp_path / "m.onnx", opset=17)


# -- bad input -------------------------------------------------------------------------------------


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    fake = tmp_path / "model.onnx"
    torch.save({"weights": torch.zeros(3)}, fake)  # a PyTorch checkpoint under an .onnx name
    with pytest.raises(ModelError, match="is not an ONNX model: it looks like a zip archive"):
        open_embedder(fake)
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(ModelError, match="is not an ONNX model"):
        open_embedder(text)


def test_onnx_without_metadata_asks_for_preprocessing(exported, tmp_path):
    proto = onnx.load(str(exported["path"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelError, match="no compress-edge metadata.*--mean, --std"):
        open_embedder(bare)
    emb = open_embedder(bare, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # the size is fixed in the graph
    assert emb.spec.image_size == 32 and emb.spec.embed_dim == 1024
    assert emb.spec.source["kind"] == "onnx-without-metadata"
    assert emb.embed(exported["images"][:2]).shape == (2, 1024)
    with pytest.raises(ModelError, match="takes 32x32 images, not 64x64"):
        open_embedder(bare, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
