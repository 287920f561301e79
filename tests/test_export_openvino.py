"""OpenVINO for real on the CPU: ``export --openvino`` (fp32 / fp16 IR, NNCF int8), parity of the OpenVINO
Embedder against PyTorch and onnxruntime on real images, the IR in ``bench`` and in index build / search
(also without torch), and one-line errors when openvino or nncf is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import torch  # noqa: E402
from cli_helpers import cli_without  # noqa: E402
from compress_edge.export.backends import TorchEmbedder  # noqa: E402
from compress_edge.export.exported import PRECISION_KEY  # noqa: E402
from compress_edge.export.openvino import IR_FILES, OpenVinoEmbedder, bin_path, read_ir_metadata  # noqa: E402
from compress_edge.export.parity import GOALS, compare, load_check_images, overlap_below  # noqa: E402
from compress_edge.export.quantize import int8_saturates  # noqa: E402
from compress_edge.export.runtimes import open_embedder  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from compress_edge.cli import app  # noqa: E402
from compress_edge.errors import DependencyError, ModelError  # noqa: E402
from compress_edge.models.resolve import create_model, recalibrate_batchnorm, save_model, spec_for  # noqa: E402

runner = CliRunner()
#: A random-weight MobileNetV3-Small (hard-swish, squeeze-excitation) quantises far worse than a trained
#: student: its NNCF int8 IR measured min cosine 0.69, mean 0.90, top-10 overlap 0.86 on these 18 images
#: (calibrated on 12) on a VNNI CPU; on an AVX2-only one 0.45 / 0.79 / 0.82 with NNCF's default overflow
#: fix (first layer only), 0.67 / 0.89 / 0.83 with 7-bit weights in every layer, which export uses there.
#: Its bound is a floor that catches a broken quantisation, not a quality goal; the project's goal
#: (GOALS["int8-cpu"], top-10 >= 0.9) is asserted on a ResNet-18, which measured 0.995 / 0.94.
MV3_INT8_FLOOR = {"min_cosine": 0.55, "mean_cosine": 0.85, "topk_overlap": 0.7}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("openvino")
    images_dir = make_images(root / "images", size=40)
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True)
    spec = spec_for(model, image_size=32, source={"kind": "distill", "run": "openvino-test"})
    images, _ = load_check_images(images_dir, spec, 64)
    model = recalibrate_batchnorm(model, torch.from_numpy(images))
    save_model(model.eval(), spec, root / "run" / "student")
    out = root / "export"
    result = runner.invoke(app, ["export", str(root / "run"), "--openvino", "--fp16", "--int8", "openvino",
                                 "--calib-data", str(images_dir), "--calib-images", "12", "--parity-images", "18",
                                 "--out", str(out), "--no-strict", "--no-progress", "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    torch_emb = TorchEmbedder(str(root / "run")).embed(images)
    return {"root": root, "out": out, "images": images, "images_dir": images_dir, "output": result.output,
            "report": json.loads((out / "export.json").read_text()), "torch": torch_emb}


def test_export_writes_the_ir_and_the_parity_table(exported):
    out, report = exported["out"], exported["report"]
    for xml in IR_FILES.values():
        assert (out / xml).is_file() and bin_path(out / xml).is_file(), xml
        assert {xml, bin_path(xml).name} <= set(report["files"])
    parity = report["parity"]
    assert {"fp32", "openvino-fp32", "openvino-fp16", "openvino-int8"} <= set(parity)
    for key in ("openvino-fp32", "openvino-fp16", "openvino-int8"):
        assert parity[key]["reference"] == "pytorch fp32" and parity[key]["image_source"] == "real"
        assert parity[key]["images"] == 18 and parity[key]["topk_overlap"] is not None
    assert parity["openvino-fp32"]["passed"] and parity["openvino-fp32"]["min_cosine"] >= 0.9999
    assert parity["openvino-fp16"]["passed"] and parity["openvino-fp16"]["goal"] == 0.999
    step = report["steps"]["openvino-int8"]
    assert step["calib_images"] == 12 and step["settings"]["tool"].startswith("nncf.quantize")
    saturates = int8_saturates()
    assert step["settings"]["overflow_fix"] == ("enable" if saturates else "first_layer_only")
    assert ("overflow_fix_reason" in step["settings"]) == saturates
    assert report["calibration"]["per_file"] == {"openvino-int8": "nncf min-max statistics"}
    assert "openvino" in report["versions"] and "nncf" in report["versions"]
    # float16 weights halve the file, int8 weights quarter it.
    size = {k: report["files"][bin_path(v).name]["bytes"] for k, v in IR_FILES.items()}
    assert size["fp16"] < 0.55 * size["fp32"] and size["int8"] < 0.35 * size["fp32"]
    assert "openvino fp32 vs pytorch fp32 on 18 real images" in exported["output"]


def test_the_ir_carries_the_model_spec(exported):
    onnx_spec = open_embedder(exported["out"] / "model.onnx").spec
    for key, precision in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8-openvino")):
        emb = open_embedder(exported["out"] / IR_FILES[key])
        assert isinstance(emb, OpenVinoEmbedder) and emb.name == "openvino"
        assert emb.spec == onnx_spec and emb.spec.source == {"kind": "distill", "run": "openvino-test"}
        assert emb.precision == precision and emb.device == "cpu"
        assert emb.info()["inference_precision"] == "f32"  # no silent bf16 on a CPU that has it
    props = read_ir_metadata(exported["out"] / IR_FILES["int8"])
    assert props[PRECISION_KEY] == "int8-openvino" and props["compress_edge.calib_images"] == "12"


@pytest.mark.parametrize("key", ["fp32", "fp16"])
def test_openvino_embeddings_match_pytorch_and_onnxruntime(exported, key):
    images = exported["images"]
    with open_embedder(exported["out"] / IR_FILES[key], threads=1) as emb:
        got = emb.embed(images)
        np.testing.assert_allclose(emb.embed(images[:1]), got[:1], atol=1e-5)  # batch 1 as in a batch
    ort = open_embedder(exported["out"] / "model.onnx").embed(images)
    goal = GOALS[key]
    for ref, ref_name in ((exported["torch"], "pytorch fp32"), (ort, "onnxruntime fp32")):
        result = compare(ref, got, name=f"openvino {key}", reference_name=ref_name, goal=goal)
        print(result.line())
        assert result.passed, result.line()
        assert result.topk_overlap >= 0.9, result.line()
        assert result.max_abs_diff < (1e-4 if key == "fp32" else 5e-3), result.line()


def test_nncf_int8_parity_within_its_bound(exported):
    import openvino as ov

    xml = exported["out"] / IR_FILES["int8"]
    ops = {op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ordered_ops()}
    assert "FakeQuantize" in ops  # quantised by NNCF, not a float copy
    got = open_embedder(xml).embed(exported["images"])
    result = compare(exported["torch"], got, name="openvino int8", reference_name="pytorch fp32", goal=0.98)
    print(result.line())
    for key, floor in MV3_INT8_FLOOR.items():
        assert getattr(result, key) >= floor, result.line()
    recorded = exported["report"]["parity"]["openvino-int8"]
    assert abs(recorded["min_cosine"] - result.min_cosine) < 1e-4  # export.json says what the file does


def test_nncf_int8_of_a_resnet_reaches_the_int8_goal(exported, tmp_path):
    from compress_edge.export import onnx as ce_onnx
    from compress_edge.export import openvino as ovx

    torch.manual_seed(0)
    model = create_model("resnet18", small_input=True)
    spec = spec_for(model, image_size=32)
    images = exported["images"]
    model = recalibrate_batchnorm(model, torch.from_numpy(images)).eval()
    ce_onnx.export_onnx(model, spec, tmp_path / "model.onnx", exporter="torchscript")
    calib = images[np.unique(np.linspace(0, len(images) - 1, 12).round().astype(int))]  # as --calib-images 12
    step = ovx.quantize_int8(tmp_path / "model.onnx", tmp_path / IR_FILES["int8"], spec, calib)
    assert step.precision == "int8-openvino" and step.calib_images == 12
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    got = open_embedder(tmp_path / IR_FILES["int8"]).embed(images)
    result = compare(ref, got, name="openvino int8", reference_name="pytorch fp32", goal=GOALS["int8-cpu"])
    print(result.line())
    assert result.passed, result.line()  # min cosine >= 0.98
    assert result.topk_overlap >= 0.9, result.line()


def test_an_ir_that_answers_one_image_otherwise_is_measured_one_image_at_a_time(exported, tmp_path):
    """MobileNetV3-Small with ImageNet's stem at 32 px (a 1x1 map): its NNCF int8 IR gives another embedding
    for an image alone than for the same image in a batch (measured here with OpenVINO 2026.4: max |diff|
    0.12). The export is not stopped: parity is taken one image at a time, as a device answering single
    queries sees it, export.json is written and a note says so."""
    from compress_edge.export.pipeline import ExportOptions, export_model

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=False)
    spec = spec_for(model, image_size=32)
    model = recalibrate_batchnorm(model, torch.from_numpy(exported["images"])).eval()
    save_model(model, spec, tmp_path / "model")
    report = export_model(ExportOptions(model=str(tmp_path / "model"), out=str(tmp_path / "out"), int8=["openvino"],
                                        calib_data=str(exported["images_dir"]), calib_images=12, parity_images=18,
                                        exporter="torchscript", strict=False, timing_iters=0))
    step = report["steps"]["openvino-int8"]
    with OpenVinoEmbedder(tmp_path / "out" / IR_FILES["int8"]) as ir:
        batch = ir.embed(exported["images"][:18])
        alone = np.concatenate([ir.embed(exported["images"][i : i + 1]) for i in range(18)])
    differs = float(np.abs(alone - batch).max())
    if differs <= 1e-4:
        pytest.skip(f"this OpenVINO answers an image alone as in a batch here (max |diff| {differs:.2g})")
    assert step["batch_one_max_diff"] == pytest.approx(differs, rel=1e-4)
    ref = TorchEmbedder(str(tmp_path / "model")).embed(exported["images"][:18])
    entry = report["parity"]["openvino-int8"]
    assert entry["min_cosine"] == pytest.approx(compare(ref, alone, name="a", reference_name="b",
                                                         goal=0.98).min_cosine, abs=1e-6)
    assert any("for an image alone than in a batch" in n for n in report["notes"])
    assert (tmp_path / "out" / "export.json").is_file()


def test_nncf_int8_of_a_vit_is_quantised_as_a_transformer(exported, tmp_path, make_images):
    """A ViT (weights mostly MatMul) gets NNCF's transformer recipe, a CNN its CNN one; both recorded.
    Parity on 60 images: with the fixture's 18 each image's top 10 is 10 of its 17 neighbours, and one
    swapped neighbour moved the overlap across 0.9."""
    from compress_edge.export import onnx as ce_onnx
    from compress_edge.export import openvino as ovx

    assert exported["report"]["steps"]["openvino-int8"]["settings"]["preset"] == "performance"  # the MobileNet
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    spec = spec_for(model, image_size=32)
    images, _ = load_check_images(make_images(tmp_path / "images", per_class=20, size=40), spec, 60)
    ce_onnx.export_onnx(model, spec, tmp_path / "vit.onnx")
    step = ovx.quantize_int8(tmp_path / "vit.onnx", tmp_path / IR_FILES["int8"], spec, images[::5])  # 4 per class
    assert step.settings["model_type"].startswith("transformer") and step.settings["preset"].startswith("mixed")
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    result = compare(ref, open_embedder(tmp_path / IR_FILES["int8"]).embed(images), name="openvino int8",
                     reference_name="pytorch fp32", goal=GOALS["int8-cpu"])
    print(result.line())
    assert result.passed and not overlap_below(result.topk_overlap, 0.9), result.line()


def test_bench_times_the_ir_beside_the_onnx_file(exported):
    out = exported["out"]
    result = runner.invoke(app, ["bench", str(out / "model.onnx"), str(out / IR_FILES["fp32"]),
                                 str(out / IR_FILES["int8"]), "-b", "1", "-b", "4", "--iters", "2", "--warmup", "1",
                                 "--min-seconds", "0", "--threads", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inputs"]["kind"] == "real"  # the calibration set export.json names
    rows = {(r["model"], r["batch"]): r for r in data["rows"]}
    for name, precision in ((IR_FILES["fp32"], "fp32"), (IR_FILES["int8"], "int8-openvino")):
        for b in (1, 4):
            row = rows[(str(out / name), b)]
            assert row["backend"] == "openvino" and row["precision"] == precision and row["images_per_s"] > 0
    assert data["min_cosine_vs_first"][str(out / IR_FILES["fp32"])] >= 0.9999


def in_own_process(*args: str):
    """``compress-edge ARGS`` in a new process. Running OpenVINO and FAISS inside the long pytest process,
    after the hundreds of tests before it have loaded torch, onnxruntime and TensorRT-RTX, ended the
    whole suite in a segmentation fault (seen twice in the full suite, never in this file alone or as
    a command); a user's command starts in a fresh process, and so do these."""
    return cli_without("", *args)


def test_index_build_and_search_with_the_ir_also_without_torch(exported, tmp_path):
    xml = exported["out"] / IR_FILES["fp32"]
    index = tmp_path / "index"
    # Each command in its own process, as a user runs them (see in_own_process).
    built = in_own_process("index", "build", str(xml), str(exported["images_dir"]), "--out", str(index),
                           "--no-progress", "--json")
    assert built.returncode == 0, built.stderr
    query = sorted((exported["images_dir"] / "square").glob("*.png"))[0]
    # The device's path: the index and the IR, no torch.
    result = cli_without("torch,torchvision", "search", str(index), str(query), "-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)[0]["neighbours"]
    assert hits[0]["path"].endswith(query.name) and hits[0]["score"] > 0.999
    assert sum(h["label_name"] == "square" for h in hits) >= 2


def test_a_changed_bin_is_caught_like_a_changed_onnx_file(exported, tmp_path):
    # An IR's weights are its .bin: the .xml alone says nothing about them.
    folder = tmp_path / "export"
    folder.mkdir()
    xml = folder / IR_FILES["fp32"]
    for part in (xml, xml.with_suffix(".bin"), exported["out"] / "export.json"):
        (folder / part.name).write_bytes((exported["out"] / part.name).read_bytes())
    index = tmp_path / "index"
    built = in_own_process("index", "build", str(xml), str(exported["images_dir"]), "--out", str(index),
                           "--no-progress", "--json")
    assert built.returncode == 0, built.stderr
    query = sorted((exported["images_dir"] / "square").glob("*.png"))[0]
    weights = bytearray(xml.with_suffix(".bin").read_bytes())
    weights[len(weights) // 2] ^= 0x40  # one weight changed; the file still loads
    xml.with_suffix(".bin").write_bytes(bytes(weights))
    result = in_own_process("search", str(index), str(query), "-k", "3", "--model", str(xml))
    assert result.returncode == 1, result.stderr
    assert "model.openvino.bin was changed since it was exported" in result.stderr, result.stderr
    (folder / "export.json").unlink()  # no export.json: the index's own record of the IR still catches it
    result = in_own_process("search", str(index), str(query), "-k", "3", "--model", str(xml))
    assert result.returncode == 1, result.stderr
    assert "model.openvino.xml or its model.openvino.bin was changed since the index" in result.stderr, result.stderr


def test_eval_takes_the_ir_like_the_onnx_file(exported):
    out, data = exported["out"], str(exported["images_dir"])
    args = ["--train", data, "--test", data, "-k", "3", "--workers", "0", "--json", "--no-cache", "--no-progress"]
    runs = {}
    for name, model in (("onnx", out / "model.onnx"), ("ir", out / IR_FILES["fp32"])):
        result = in_own_process("eval", "knn", str(model), *args)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads(result.stdout)
    assert runs["ir"]["backend"].startswith("openvino"), runs["ir"]
    assert runs["ir"]["nn_top1"] == runs["onnx"]["nn_top1"] and runs["ir"]["knn"] == runs["onnx"]["knn"]


def test_without_openvino_or_nncf_the_error_is_one_line(exported, tmp_path):
    out = exported["out"]
    cases = [
        ("openvino", ["bench", str(out / IR_FILES["fp32"]), "--iters", "1"]),
        ("openvino", ["export", str(out / "model.onnx"), "--openvino", "--out", str(tmp_path / "a"), "--no-progress"]),
        ("nncf", ["export", str(out / "model.onnx"), "--int8", "openvino", "--calib-data",
                  str(exported["images_dir"]), "--calib-images", "4", "--out", str(tmp_path / "b"), "--no-progress"]),
    ]
    for blocked, args in cases:
        result = cli_without(blocked, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: the package '{blocked}'"), lines[0]
        assert "pip install 'compress-edge[openvino]'" in lines[0] and "Traceback" not in result.stderr


def test_bad_input_is_refused_clearly(exported, tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_bytes((exported["out"] / IR_FILES["fp32"]).read_bytes())
    with pytest.raises(ModelError, match=r"no model\.bin beside .*copy both"):
        open_embedder(xml)
    with pytest.raises(ModelError, match="OpenVINO backend runs a .xml file"):
        open_embedder(exported["out"] / "model.onnx", "openvino")
    with pytest.raises(ModelError, match="Intel CPUs, GPUs and NPUs"):
        open_embedder(exported["out"] / IR_FILES["fp32"], device="cuda")
    import openvino as ov

    if "NPU" not in ov.Core().available_devices:
        with pytest.raises(DependencyError, match="OpenVINO sees no NPU"):
            open_embedder(exported["out"] / IR_FILES["fp32"], device="npu")
    bad = tmp_path / "notes.xml"
    bad.write_text("<notes/>")
    bad.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is not an OpenVINO model"):
        open_embedder(bad)
