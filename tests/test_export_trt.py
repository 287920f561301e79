"""TensorRT: real engines built from the fp32, fp16 and int8-trt exports (TensorRT-RTX builds without a
GPU), the sidecar JSON, parser errors, and engines that cannot run here."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress_edge.export import onnx as ce_onnx
from compress_edge.export import quantize as q
from compress_edge.export import tensorrt as ce_trt
from compress_edge.export.parity import load_check_images
from compress_edge.export.runtimes import open_embedder
from onnx import TensorProto, helper

from compress_edge.errors import DependencyError, ExportError, ModelError
from compress_edge.models.resolve import create_model, spec_for

HAVE_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
HAVE_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("trt")
    images_dir = make_images(root / "images", size=40)
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = spec_for(model, image_size=32)
    images, _ = load_check_images(images_dir, spec, 16)
    paths = {"fp32": root / "model.onnx", "fp16": root / "model.fp16.onnx", "int8-trt": root / "model.int8-trt.onnx"}
    ce_onnx.export_onnx(model, spec, paths["fp32"], exporter="torchscript")
    q.to_fp16(paths["fp32"], paths["fp16"], spec)
    q.quantize_int8(paths["fp32"], paths["int8-trt"], spec, images, target="trt")
    return {"root": root, "spec": spec, "paths": paths, "images": images}


@pytest.fixture(scope="module")
def engines(exports):
    built = {}
    for precision, path in exports["paths"].items():
        engine = exports["root"] / f"{precision}.engine"
        built[precision] = ce_trt.build_engine(path, engine, min_batch=1, opt_batch=4, max_batch=8,
                                               workspace_mib=256, timing_cache=exports["root"] / "timing.cache")
    return built


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-trt"])
def test_engines_build_from_every_export(exports, engines, precision):
    build = engines[precision]
    engine = Path(build.path)
    assert engine.is_file() and engine.stat().st_size > 10_000
    assert build.precision == precision
    side = json.loads(Path(build.sidecar).read_text())
    assert side["spec"] == exports["spec"].to_dict()
    assert side["precision"] == precision
    trt, name = ce_trt.trt_module()
    assert side["tensorrt"] == {"module": name, "version": trt.__version__}
    assert side["gpu"] == (torch.cuda.get_device_name(0) if HAVE_GPU else "built without GPU")
    assert side["profile"] == {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}
    assert side["strongly_typed"] is True
    assert side["onnx"]["file"] == exports["paths"][precision].name


def test_timing_cache_is_reused_or_explained(exports, engines):
    build = engines["fp32"]
    if build.module == "tensorrt_rtx":
        assert build.timing_cache is None and any("timing cache" in n for n in build.notes)
    else:
        assert Path(build.timing_cache).is_file()
        again = ce_trt.build_engine(exports["paths"]["fp32"], exports["root"] / "again.engine", max_batch=8,
                                    timing_cache=build.timing_cache)
        assert again.timing_cache == build.timing_cache


def test_parser_errors_name_the_node(exports, tmp_path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 8])
    node = helper.make_node("MysteryPool", ["images"], ["embeddings"], name="the_bad_node", domain="com.example")
    graph = helper.make_graph([node], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    spec = exports["spec"].replace(embed_dim=8)
    ce_onnx.set_metadata(proto, spec, "fp32")
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ExportError) as err:
        ce_trt.build_engine(bad, tmp_path / "bad.engine")
    message = str(err.value)
    assert "cannot parse" in message and "the_bad_node" in message and "MysteryPool" in message
    assert not (tmp_path / "bad.engine").exists()


def test_bad_profile_is_refused(exports, tmp_path):
    with pytest.raises(ExportError, match="--min-batch <= --opt-batch <= --max-batch"):
        ce_trt.build_engine(exports["paths"]["fp32"], tmp_path / "m.engine", min_batch=8, max_batch=4)


def test_onnx_without_metadata_cannot_become_an_engine(exports, tmp_path):
    proto = onnx.load(str(exports["paths"]["fp32"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelError, match="--image-size, --mean and --std"):
        ce_trt.build_engine(bare, tmp_path / "m.engine")


def test_missing_tensorrt_names_the_extra(exports, tmp_path, monkeypatch):
    real = importlib.import_module

    def no_trt(name, *args, **kwargs):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ce_trt.importlib, "import_module", no_trt)
    with pytest.raises(DependencyError, match=r"compress-edge\[trt\]'.*compress-edge\[trt-rtx\]"):
        ce_trt.build_engine(exports["paths"]["fp32"], tmp_path / "m.engine")


def _copy_engine(build, dest: Path) -> Path:
    shutil.copy(build.path, dest)
    shutil.copy(build.sidecar, str(dest) + ".json")
    return dest


def test_engine_from_another_tensorrt_version_must_be_rebuilt(engines, tmp_path):
    engine = _copy_engine(engines["fp32"], tmp_path / "model.engine")
    side_path = Path(str(engine) + ".json")
    side = json.loads(side_path.read_text())
    side["tensorrt"]["version"] = "0.9.0"
    side_path.write_text(json.dumps(side))
    with pytest.raises(ModelError, match=r"built by .* 0\.9\.0.*rebuild it on the device"):
        open_embedder(engine)


def test_engine_built_by_a_module_not_installed(engines, tmp_path, monkeypatch):
    engine = _copy_engine(engines["fp32"], tmp_path / "model.engine")
    side_path = Path(str(engine) + ".json")
    side = json.loads(side_path.read_text())
    other = "tensorrt" if side["tensorrt"]["module"] == "tensorrt_rtx" else "tensorrt_rtx"
    side["tensorrt"]["module"] = other
    side_path.write_text(json.dumps(side))
    if importlib.util.find_spec(other) is None:
        with pytest.raises(DependencyError, match="install it with"):
            open_embedder(engine)
    else:  # both installed: then it is a version question
        with pytest.raises(ModelError):
            open_embedder(engine)


def test_a_file_that_is_not_an_engine_is_refused(exports, engines, tmp_path):
    fake = tmp_path / "model.engine"
    shutil.copy(exports["paths"]["fp32"], fake)
    shutil.copy(engines["fp32"].sidecar, str(fake) + ".json")
    with pytest.raises(ModelError, match="is not a TensorRT engine: it looks like an ONNX model"):
        open_embedder(fake)
    lonely = tmp_path / "lonely.engine"
    shutil.copy(engines["fp32"].path, lonely)
    with pytest.raises(ModelError, match="no lonely.engine.json"):
        open_embedder(lonely)


@pytest.mark.skipif(HAVE_GPU, reason="checks the message shown where there is no GPU")
def test_running_an_engine_without_gpu_says_what_to_do(engines):
    with pytest.raises(ModelError, match="only on an NVIDIA GPU.*onnxruntime"):
        open_embedder(engines["fp32"].path)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,goal", [("fp32", 0.9999), ("fp16", 0.999), ("int8-trt", 0.9)])
def test_engine_gives_the_same_embeddings_on_gpu(exports, engines, precision, goal):
    from compress_edge.export.parity import compare

    engine = open_embedder(engines[precision].path)
    assert engine.name == "tensorrt" and engine.max_batch == 8
    images = exports["images"]
    ref = open_embedder(exports["paths"]["fp32"]).embed(images)
    got = engine.embed(images)  # 16 images: two runs of the batch-8 profile
    assert got.shape == ref.shape and got.dtype == np.float32
    result = compare(ref, got, name=precision, reference_name="fp32", goal=goal)
    assert result.passed, result.line()
    engine.close()


def test_engine_rebuilt_from_a_reduced_export_keeps_its_precision(exports, tmp_path):
    from compress_edge.export.pipeline import ExportOptions, export_model

    out = tmp_path / "device"
    report = export_model(ExportOptions(model=str(exports["paths"]["int8-trt"]), out=str(out), trt=True, max_batch=4))
    assert report["steps"]["engine"]["from"] == "model.int8-trt.onnx"
    assert report["steps"]["engine"]["precision"] == "int8-trt"
    assert not (out / "model.onnx").exists()  # the int8 file is not passed off as float32
    side = json.loads((out / "model.engine.json").read_text())
    assert side["precision"] == "int8-trt" and side["spec"] == exports["spec"].to_dict()
    with pytest.raises(ExportError, match="already int8-trt"):
        export_model(ExportOptions(model=str(exports["paths"]["int8-trt"]), out=str(tmp_path / "x"), fp16=True))
