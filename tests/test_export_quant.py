"""Reduced precision: fp16 and int8-cpu parity (cosine, top-10 overlap), the int8-trt graph's form,
and calibration data that does not fit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from compress_edge.export import calibration as qc
from compress_edge.export import exclusions as qx
from compress_edge.export import onnx as ce_onnx
from compress_edge.export import quantize as q
from compress_edge.export.parity import GOALS, TOPK_GOALS, ParityResult, compare, load_check_images
from compress_edge.export.pipeline import ExportOptions, ParityFailed, export_model
from compress_edge.export.runtimes import open_embedder
from onnx import TensorProto, numpy_helper

from compress_edge.errors import DataError
from compress_edge.models.resolve import create_model, recalibrate_batchnorm, save_model, spec_for


def _student(images: np.ndarray):
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True)
    return recalibrate_batchnorm(model, torch.from_numpy(images))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("quant")
    images_dir = make_images(root / "images", size=40)
    spec = spec_for(create_model("mobilenet_v3_small", small_input=True), image_size=32)
    images, _ = load_check_images(images_dir, spec, 64)
    model = _student(images)
    spec = save_model(model, spec, root / "student")
    path = root / "model.onnx"
    ce_onnx.export_onnx(model, spec, path, exporter="torchscript")
    ref = open_embedder(path).embed(images)
    return {"path": path, "spec": spec, "images": images, "ref": ref, "root": root, "images_dir": images_dir}


def _inits(proto):
    return {i.name: i for i in proto.graph.initializer}


@pytest.fixture(scope="module")
def cli_export(fp32):
    """One ``compress-edge export`` of the fixture's ONNX file with fp16 and int8-cpu (automatic
    calibration on 12 images, the default timing), read by the tests of the report, its notes and its
    choice of file: each of them ran the same export (about 20 s) on its own before."""
    from typer.testing import CliRunner

    from compress_edge.cli import app

    out = fp32["root"] / "cli-export"
    result = CliRunner().invoke(app, ["export", str(fp32["path"]), "--fp16", "--int8", "cpu", "--calib-data",
                                      str(fp32["images_dir"]), "--calib-images", "12", "--out", str(out),
                                      "--no-strict", "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "report": json.loads((out / "export.json").read_text())}


def test_fp16_parity(fp32):
    dst = fp32["root"] / "model.fp16.onnx"
    q.to_fp16(fp32["path"], dst, fp32["spec"])
    proto = onnx.load(str(dst))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 in
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 out
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)  # float16 conv weights
    emb = open_embedder(dst)
    assert emb.precision == "fp16" and emb.spec == fp32["spec"]
    result = compare(fp32["ref"], emb.embed(fp32["images"]), name="fp16", reference_name="fp32", goal=GOALS["fp16"])
    print(result.line())
    assert result.passed, result.line()  # cosine >= 0.999
    assert result.topk_overlap is not None and result.k == 10


def test_int8_cpu_parity_and_form(fp32):
    dst = fp32["root"] / "model.int8-cpu.onnx"
    out = q.quantize_int8(fp32["path"], dst, fp32["spec"], fp32["images"], target="cpu")
    assert out.calib_images == len(fp32["images"])
    proto = onnx.load(str(dst))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = _inits(proto)
    act_zp = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert act_zp and all(z.data_type == TensorProto.UINT8 for z in act_zp)  # unsigned activations
    emb = open_embedder(dst)
    assert emb.precision == "int8-cpu"
    result = compare(fp32["ref"], emb.embed(fp32["images"]), name="int8-cpu", reference_name="fp32",
                     goal=GOALS["int8-cpu"])
    print(result.line())  # a random-weight MobileNetV3 quantises worse than a trained student
    assert result.min_cosine > 0.8
    assert result.topk_overlap is not None
    # 7-bit weights exactly where this CPU's 8-bit kernels saturate (no VNNI), recorded with the reason
    assert out.settings["reduce_range"] is q.int8_saturates()
    assert ("reduce_range_reason" in out.settings) is q.int8_saturates()
    weights = [v for v in inits.values() if v.data_type == TensorProto.INT8 and len(v.dims) == 4]
    largest = max(int(np.abs(numpy_helper.to_array(w).astype(np.int32)).max()) for w in weights)
    assert largest <= 64 if q.int8_saturates() else largest == 127


VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_int8_saturates_on_x86_without_vnni_only():
    assert q.int8_saturates(AVX2, "x86_64") is True
    assert q.int8_saturates(VNNI, "x86_64") is False
    assert q.int8_saturates(AVX2.replace("fma", "avx_vnni"), "AMD64") is False
    assert q.int8_saturates(AVX2, "aarch64") is False  # Arm's dot product does not saturate
    assert q.int8_saturates("processor\t: 0\n", "x86_64") is False  # flags unknown: full range
    assert q.int8_recipe("trt").reduce_range is False  # TensorRT's GPU kernels do not saturate


def test_int8_trt_graph_is_what_tensorrt_takes(fp32):
    dst = fp32["root"] / "model.int8-trt.onnx"
    q.quantize_int8(fp32["path"], dst, fp32["spec"], fp32["images"], target="trt")
    proto = onnx.load(str(dst))
    assert q.check_trt_int8(proto) == []
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no com.microsoft
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    inits = _inits(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    zero_points = [inits[n.input[2]] for n in proto.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points
    for zp in zero_points:  # symmetric, signed
        assert zp.data_type == TensorProto.INT8
        assert not np.any(numpy_helper.to_array(zp))
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert convs
    for node in convs:
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        scale = numpy_helper.to_array(inits[dq.input[1]])
        weight = numpy_helper.to_array(inits[dq.input[0]])
        assert scale.ndim == 1 and scale.shape[0] == weight.shape[0] > 1  # per output channel
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            assert bias in inits and inits[bias].data_type == TensorProto.FLOAT  # bias not quantised
    result = compare(fp32["ref"], open_embedder(dst).embed(fp32["images"]), name="int8-trt",
                     reference_name="fp32", goal=GOALS["int8-trt"])
    print(result.line())
    assert result.min_cosine > 0.7


def test_check_trt_int8_finds_asymmetric_graphs(fp32):
    proto = onnx.load(str(fp32["root"] / "model.int8-cpu.onnx")) if (fp32["root"] / "model.int8-cpu.onnx").exists() \
        else None
    if proto is None:
        dst = fp32["root"] / "cpu2.onnx"
        q.quantize_int8(fp32["path"], dst, fp32["spec"], fp32["images"][:8], target="cpu")
        proto = onnx.load(str(dst))
    assert any("not INT8" in p for p in q.check_trt_int8(proto))


# -- calibration data that does not fit -----------------------------------------------------------------


def test_calibration_array_of_wrong_channel_count_or_size(fp32, tmp_path):
    gray = tmp_path / "gray.npy"
    np.save(gray, np.zeros((4, 1, 32, 32), np.float32))
    with pytest.raises(DataError, match="wrong channel count"):
        load_check_images(gray, fp32["spec"], 8, purpose="INT8 calibration")
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((4, 3, 28, 28), np.float32))
    with pytest.raises(DataError, match=r"wrong size.*\(N, 3, 32, 32\)"):
        load_check_images(small, fp32["spec"], 8, purpose="INT8 calibration")
    with pytest.raises(DataError, match="wrong size or channel count"):
        q.quantize_int8(fp32["path"], tmp_path / "x.onnx", fp32["spec"], np.zeros((2, 1, 32, 32), np.float32))
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((4, 3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="float32"):
        load_check_images(ints, fp32["spec"], 8)


def test_npy_calibration_data_is_used(fp32, tmp_path):
    arr = tmp_path / "calib.npy"
    np.save(arr, fp32["images"])
    got, source = load_check_images(arr, fp32["spec"], 10)
    assert got.shape == (10, 3, 32, 32) and "calib.npy" in source


def test_int8_without_calibration_data_is_refused(fp32, tmp_path):
    with pytest.raises(DataError, match="--calib-data"):
        export_model(ExportOptions(model=str(fp32["path"]), out=str(tmp_path / "o"), int8=["cpu"]))


def test_a_run_folder_is_calibrated_and_checked_on_its_own_training_images(fp32, tmp_path):
    """Exporting a training run's folder without --calib-data takes the images its config.json records
    (while they are there); the options given still win, and a run whose images are gone is refused."""
    import shutil

    from compress_edge.export.pipeline import resolve

    run = tmp_path / "run"
    shutil.copytree(fp32["root"] / "student", run / "student")
    data = tmp_path / "images"
    shutil.copytree(fp32["images_dir"], data)
    (run / "config.json").write_text(json.dumps({"distill": {"data": f"{data}@16", "data_root": None}}))
    for model in (run, run / "student"):
        plan = resolve(ExportOptions(model=str(model), out=str(tmp_path / "o"), int8=["cpu"]))
        assert (plan.calib_data, plan.check_data) == (f"{data}@16", f"{data}@16")
    given = resolve(ExportOptions(model=str(run), out=str(tmp_path / "o"), parity_data="fashion-mnist:test"))
    assert (given.calib_data, given.check_data) == (f"{data}@16", "fashion-mnist:test")
    report = export_model(ExportOptions(model=str(run), out=str(tmp_path / "o"), int8=["cpu"], calib_images=8,
                                        parity_images=12, calib_method="minmax", timing_iters=0, strict=False))
    assert report["calibration"]["data"] == f"{data}@16" and report["calibration"]["count"] == 8
    assert report["check_images"] == {"source": f"real ({data}@16)", "count": 12, "data": f"{data}@16"}
    # A folder of very many images is not scanned for a few check images unless asked.
    (run / "config.json").write_text(json.dumps({"distill": {"data": str(data)}, "plan": {"images": 60_000}}))
    assert resolve(ExportOptions(model=str(run), out=str(tmp_path / "o"))).check_data is None
    shutil.rmtree(data)
    (run / "config.json").write_text(json.dumps({"distill": {"data": str(data)}, "plan": {"images": 18}}))
    with pytest.raises(DataError, match="--calib-data"):
        resolve(ExportOptions(model=str(run), out=str(tmp_path / "o2"), int8=["cpu"]))


def test_export_from_an_onnx_file_reports_reduced_precision(cli_export):
    report = cli_export["report"]
    assert set(report["parity"]) == {"fp16", "int8-cpu"}
    for key in ("fp16", "int8-cpu"):
        entry = report["parity"][key]
        assert entry["reference"] == "onnxruntime fp32" and entry["image_source"] == "real"
        assert entry["min_cosine"] > 0.5 and entry["topk_overlap"] is not None
    assert report["calibration"]["count"] == 12
    assert (cli_export["out"] / "export.json").is_file()
    assert report["files"]["model.int8-cpu.onnx"]["bytes"] > 0


@pytest.mark.parametrize("target", ["cpu", "trt"])
@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_a_count_that_is_no_multiple_of_the_batch(fp32, tmp_path, target, method):
    # 18 images in batches of 16 left a ragged batch of 2 that onnxruntime's histogram calibrators
    # cannot stack: the export fell back to minmax. Equal batches keep the method asked for.
    calib = fp32["images"][:18]
    assert len(calib) == 18
    out = q.quantize_int8(fp32["path"], tmp_path / "q.onnx", fp32["spec"], calib, target=target,
                          calib_method=method, batch_size=16)
    assert out.settings["calibration"] == method
    assert out.settings["calibration_batch"] == 9 and out.calib_images == 18


# -- the parity gate: top-10 neighbour overlap as well as cosine; which file to deploy ---------------------


def _collapsed_onnx(fp32, path):
    """The fixture's student with a collapsed embedding: its last Linear scaled by 0.01 and shifted by
    4, so that every image's embedding lies close to one shared direction (as an undertrained
    student's can). The differences between images, which neighbour search ranks by, are small next
    to an INT8 step: cosine stays ~1 while the neighbours change."""
    model = _student(fp32["images"])
    linear = model.backbone.classifier[0]
    with torch.no_grad():
        linear.weight.mul_(0.01)
        linear.bias.mul_(0.01).add_(4.0)
    ce_onnx.export_onnx(model.eval(), fp32["spec"], path, exporter="torchscript")
    return path


def test_int8_that_passes_cosine_but_not_top10_overlap_is_failed(fp32, tmp_path):
    source = _collapsed_onnx(fp32, tmp_path / "collapsed.onnx")
    # Every node quantised (the embedding head too) and one calibration method: the file the gate was
    # written against.
    opts = dict(model=str(source), int8=["cpu"], calib_data=str(fp32["images_dir"]), timing_iters=2,
                calib_method="percentile", int8_exclude=False)
    report = export_model(ExportOptions(out=str(tmp_path / "o"), strict=False, **opts))
    entry = report["parity"]["int8-cpu"]
    print(ParityResult(**entry).line())
    assert entry["min_cosine"] >= GOALS["int8-cpu"] == entry["goal"]  # the cosine goal is met (0.99999 measured)
    assert entry["topk_goal"] == TOPK_GOALS["int8-cpu"] == 0.9
    assert entry["topk_overlap"] < 0.9  # 0.76 measured: other neighbours
    assert entry["passed"] is False and report["passed"] is False
    assert "top-10 overlap BELOW GOAL 0.9" in ParityResult(**entry).line()
    assert "BELOW GOAL 0.98" not in ParityResult(**entry).line()
    # The file is not recommended, and the report says why with the numbers.
    assert report["recommended"]["file"] == "model.onnx"
    assert any(n.startswith(f"int8-cpu fails parity (top-10 overlap {entry['topk_overlap']:.3f} < 0.9")
               for n in report["notes"]), report["notes"]
    # Strict: the export fails, naming the overlap, after writing the report.
    with pytest.raises(ParityFailed, match=r"int8-cpu: top-10 overlap 0\.\d+ < 0\.9") as caught:
        export_model(ExportOptions(out=str(tmp_path / "strict"), **opts))
    assert caught.value.report["parity"]["int8-cpu"]["passed"] is False
    assert (tmp_path / "strict" / "export.json").is_file()
    # With the embedding head kept in float (the default) the same model finds the same neighbours.
    kept = export_model(ExportOptions(out=str(tmp_path / "kept"), strict=False,
                                      **{**opts, "int8_exclude": True}))["parity"]["int8-cpu"]
    print(ParityResult(**kept).line())
    assert kept["topk_overlap"] > entry["topk_overlap"]  # 0.933 vs 0.76 measured (VNNI); 0.878 vs 0.617 (AVX2)
    # With full-range weights (a VNNI CPU) it clears the gate; the 7-bit weights of an AVX2-only CPU
    # (int8_saturates) cost this near-collapsed embedding a few neighbours (0.878 measured).
    assert kept["passed"] or q.int8_saturates()


def test_export_times_the_files_and_says_which_to_deploy(cli_export):
    out, output, report = cli_export["out"], cli_export["output"], cli_export["report"]
    timed = report["timing"]["files"]
    assert set(timed) == {"fp32", "fp16", "int8-cpu"}
    for entry in timed.values():
        assert entry["batch1_ms"] > 0 and entry["batch32_ms"] > 0 and (out / entry["file"]).is_file()
        assert f"{entry['file']}: {entry['batch1_ms']:.2f} ms at batch 1" in output
    assert report["timing"]["iters"] == 5 and report["timing"]["machine"]
    # recommended: the fastest file at batch 1 among those that pass parity (model.onnx always counts).
    passing = [k for k in timed if k == "fp32" or report["parity"][k]["passed"]]
    best = min(passing, key=lambda k: timed[k]["batch1_ms"])
    rec = report["recommended"]
    assert rec["key"] == best and rec["file"] == timed[best]["file"]
    assert f"deploy: {out / rec['file']} (" in output
    # An INT8 file slower than float32 (at batch 1 or 32) or below its goals is named, with the numbers.
    int8, base = timed["int8-cpu"], timed["fp32"]
    slower = int8["batch1_ms"] > base["batch1_ms"] or int8["batch32_ms"] > base["batch32_ms"]
    says_slower = [n for n in report["notes"] if n.startswith("int8-cpu is slower than fp32")]
    assert bool(says_slower) == slower
    if slower:
        assert f"{int8['batch1_ms']:.2f} vs {base['batch1_ms']:.2f} ms at batch 1" in says_slower[0]
    assert any(n.startswith("int8-cpu fails parity") for n in report["notes"]) == \
        (not report["parity"]["int8-cpu"]["passed"])
    for note in report["notes"]:
        assert f"note: {note}" in output
    print(output)


def test_no_timing_recommends_the_float32_file(fp32, tmp_path):
    report = export_model(ExportOptions(model=str(fp32["path"]), out=str(tmp_path / "o"), timing_iters=0))
    assert "timing" not in report
    assert report["recommended"] == {"file": "model.onnx", "key": "fp32", "reason": "not timed"}


# -- per-architecture INT8: what is kept in float, and the calibration method chosen by parity -------------


def _se_graph():
    """A small float graph with each pattern find_exclusions looks for, and one it must not take:
    Conv -> SiLU (x * Sigmoid(x), a gate of x by x itself, not squeeze-excitation) -> squeeze-excitation
    (ReduceMean -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> HardSwish -> pool -> Gemm -> L2 norm."""
    from onnx import helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["a_sig"], name="silu_sigmoid"),
        helper.make_node("Mul", ["a", "a_sig"], ["b"], name="silu_mul"),
        helper.make_node("ReduceMean", ["b", "axes"], ["p"], name="se_pool", keepdims=1),
        helper.make_node("Conv", ["p", "w1"], ["r"], name="se_reduce"),
        helper.make_node("Relu", ["r"], ["r1"], name="se_relu"),
        helper.make_node("Conv", ["r1", "w2"], ["e"], name="se_expand"),
        helper.make_node("HardSigmoid", ["e"], ["g"], name="se_gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["b", "g"], ["c"], name="se_scale"),
        helper.make_node("HardSwish", ["c"], ["h"], name="act"),
        helper.make_node("GlobalAveragePool", ["h"], ["gp"], name="pool"),
        helper.make_node("Flatten", ["gp"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["emb"], name="proj", transB=1),
        helper.make_node("ReduceL2", ["emb", "axes1"], ["n"], name="norm", keepdims=1),
        helper.make_node("Clip", ["n", "eps"], ["n1"], name="floor"),
        helper.make_node("Div", ["emb", "n1"], ["y"], name="normalise"),
    ]
    inits = [init("w0", 8, 3, 3, 3), init("w1", 2, 8, 1, 1), init("w2", 8, 2, 1, 1), init("w3", 6, 8), init("b3", 6),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_find_exclusions_by_pattern_with_reasons():
    groups = {g["pattern"]: g for g in qx.find_exclusions(_se_graph())}
    assert set(groups) == {"squeeze-excitation", "hard-swish", "embedding-head"}
    assert groups["squeeze-excitation"]["nodes"] == ["se_pool", "se_reduce", "se_relu", "se_expand", "se_gate",
                                                     "se_scale"]
    assert groups["hard-swish"]["nodes"] == ["act"]
    assert groups["embedding-head"]["nodes"] == ["proj", "norm", "floor", "normalise"]
    # x * Sigmoid(x) gates x by itself: no global pool, so not squeeze-excitation, and stays quantised.
    assert not {"silu_mul", "silu_sigmoid", "stem"} & {n for g in groups.values() for n in g["nodes"]}
    for pattern, group in groups.items():
        assert group["reason"] == qx.EXCLUSION_REASONS[pattern] and len(group["reason"]) > 40


def test_mobilenet_v3_squeeze_excitation_is_kept_in_float(fp32, tmp_path):
    dst = tmp_path / "model.int8-cpu.onnx"
    out = q.quantize_int8(fp32["path"], dst, fp32["spec"], fp32["images"][:16], target="cpu")
    excluded = {g["pattern"]: g for g in out.settings["excluded"]}
    assert set(excluded) == {"squeeze-excitation", "hard-swish", "embedding-head"}
    se = excluded["squeeze-excitation"]
    assert se["reason"] == qx.EXCLUSION_REASONS["squeeze-excitation"] and se["nodes"] == len(se["names"])
    proto = onnx.load(str(dst))
    by_name = {n.name: n for n in proto.graph.node}
    producers = {o: n for n in proto.graph.node for o in n.output}
    # MobileNetV3-Small has 9 squeeze-excitation blocks: each one channel product and two 1x1 convs.
    se_convs = [by_name[n] for n in se["names"] if by_name[n].op_type == "Conv"]
    assert sum(by_name[n].op_type == "Mul" for n in se["names"]) == 9 and len(se_convs) == 18
    for conv in se_convs:  # float weights: no DequantizeLinear in front of them
        assert conv.input[1] not in producers or producers[conv.input[1]].op_type != "DequantizeLinear"
    other = [n for n in proto.graph.node if n.op_type == "Conv" and n.name not in se["names"]]
    assert other and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in other)
    head = [by_name[n] for n in excluded["embedding-head"]["names"]]
    assert [n.op_type for n in head][0] == "Gemm" and "ReduceL2" in {n.op_type for n in head}
    # The TensorRT target quantises its own op types and keeps nothing else in float.
    trt = q.quantize_int8(fp32["path"], tmp_path / "trt.onnx", fp32["spec"], fp32["images"][:16], target="trt")
    assert trt.settings["excluded"] == []


def test_calibration_rank_prefers_meeting_both_goals_then_overlap_else_the_closest():
    def best(*cands):
        return max(cands, key=qc.candidate_rank)["method"]

    # Of two passing files, the better neighbours; a passing file over a failing one with more overlap.
    assert best({"method": "a", "topk_overlap": 0.95, "min_cosine": 0.999},
                {"method": "b", "topk_overlap": 0.97, "min_cosine": 0.99}) == "b"
    assert best({"method": "a", "topk_overlap": 0.92, "min_cosine": 0.985},
                {"method": "b", "topk_overlap": 0.99, "min_cosine": 0.97}) == "a"
    # Neither passes (efficientnet_b0 at 32 px, measured): the same overlap, but one file's worst embedding
    # points elsewhere: the other is kept.
    assert best({"method": "percentile", "topk_overlap": 0.959, "min_cosine": 0.9502},
                {"method": "entropy", "topk_overlap": 0.961, "min_cosine": 0.4763}) == "percentile"
    # A candidate with no measurable overlap ranks below one with any.
    assert best({"method": "a", "topk_overlap": None, "min_cosine": 0.99},
                {"method": "b", "topk_overlap": 0.5, "min_cosine": 0.9}) == "b"


def test_auto_calibration_keeps_the_method_with_the_best_parity(fp32, tmp_path):
    dst = tmp_path / "auto.onnx"
    out = q.quantize_int8(fp32["path"], dst, fp32["spec"], fp32["images"][:16], target="cpu", calib_method="auto",
                          parity_images=fp32["images"])
    candidates = out.settings["calibration_candidates"]
    # every one tried, and recorded; no dynamic quantisation for a CNN (it would quantise the head alone)
    assert [c["method"] for c in candidates] == list(qc.CALIB_METHODS)
    assert qc.matmul_weight_share(onnx.load(str(fp32["path"]))) < qc.DYNAMIC_MATMUL_SHARE
    measured = [c for c in candidates if "error" not in c]
    assert measured and all(c["k"] == 10 and c["topk_overlap"] is not None for c in measured)
    chosen = [c for c in candidates if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["method"] == out.settings["calibration"]
    best = max(measured, key=qc.candidate_rank)
    assert chosen[0] is best
    assert "top-10 neighbour overlap, then the highest min cosine" in out.settings["calibration_choice"]
    assert f"on {len(fp32['images'])} parity images" in out.settings["calibration_choice"]
    # The file written is the chosen candidate: its parity is the recorded one.
    got = compare(fp32["ref"], open_embedder(dst).embed(fp32["images"]), name="int8", reference_name="fp32",
                  goal=GOALS["int8-cpu"])
    assert got.min_cosine == pytest.approx(best["min_cosine"], abs=1e-5)
    assert got.topk_overlap == pytest.approx(best["topk_overlap"])
    assert onnx.load(str(dst)).metadata_props and dict(
        (p.key, p.value) for p in onnx.load(str(dst)).metadata_props)["compress_edge.calibration"] == best["method"]


def test_entropy_calibration_is_not_minmax_again(fp32, tmp_path):
    # quantize_static's own entropy calibrator (128 bins for 128 levels) returns the MinMax ranges: the
    # same file. With ENTROPY_BINS the KL search clips, and the file differs.
    files = {}
    for method in ("minmax", "entropy"):
        q.quantize_int8(fp32["path"], tmp_path / f"{method}.onnx", fp32["spec"], fp32["images"][:16],
                        calib_method=method)
        files[method] = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"{method}.onnx")).graph
                         .initializer if i.name.endswith("_scale")}
    assert files["minmax"].keys() == files["entropy"].keys()
    assert any(not np.allclose(files["minmax"][k], files["entropy"][k]) for k in files["minmax"])


def test_unknown_calibration_method_is_one_line(fp32, tmp_path):
    with pytest.raises(Exception, match=r"unknown calibration method 'kl'; choose one of: minmax, percentile, "
                                        r"entropy, dynamic, auto"):
        q.quantize_int8(fp32["path"], tmp_path / "x.onnx", fp32["spec"], fp32["images"][:4], calib_method="kl")


def test_export_notes_say_what_int8_keeps_in_float_and_each_calibration_candidate(cli_export):
    report = cli_export["report"]
    settings = report["steps"]["int8-cpu"]["settings"]
    assert report["calibration"]["requested_method"] == "auto"
    assert report["calibration"]["method"] == settings["calibration"] in qc.CALIB_METHODS
    notes = report["notes"]
    for group in settings["excluded"]:
        assert f"int8-cpu keeps {group['nodes']} nodes in float ({group['pattern']}): {group['reason']}" in notes
    [line] = [n for n in notes if n.startswith("int8-cpu calibration: ")]
    assert line.startswith(f"int8-cpu calibration: {settings['calibration']} chosen (")
    for c in settings["calibration_candidates"]:
        if "error" in c:
            assert f"{c['method']} failed" in line
        else:
            assert f"{c['method']} top-10 overlap {c['topk_overlap']:.3f}, min cosine {c['min_cosine']:.4f}" in line


def test_calibration_takes_as_many_images_and_as_large_batches_as_fit_in_memory(fp32, tmp_path, monkeypatch):
    """onnxruntime's calibration session keeps a whole batch's activations alive (ViT-S/8 at 224 px was killed
    for memory in MinMax with batches of 16), and its percentile and entropy calibrators hold every image's
    (a DINOv2 ViT-B/14 at 224 px was killed on 32 images): the batch shrinks to what fits, the histogram
    methods get an even subset that fits, or are skipped with the reason; minmax and dynamic take every image."""
    pre, _ = q._prepare(fp32["path"], tmp_path, exclude=True)  # the graph the calibrators read
    graph = onnx.load(str(pre))
    per = qc.activation_bytes(graph)
    assert per > 0
    share = qc.HISTOGRAM_MEMORY_SHARE
    assert qc.memory_batch(graph, 16, available=int(64 * per / share)) == 16
    assert qc.memory_batch(graph, 16, available=int(10 * per / share)) == 5  # twice the batch's activations
    assert qc.memory_batch(graph, 16, available=per) == 1
    assert qc.histogram_images(graph, 64, available=int(66 * per / share) + 1) == (64, None)
    n, why = qc.histogram_images(graph, 64, available=int(20 * per / share) + 1)
    assert n == 18 and "64 images' activations" in why  # 20 fit, less a running batch of 1 (twice)
    assert qc.histogram_images(graph, 64, available=int(9 * per / share))[0] == 0  # too few: skipped

    images = fp32["images"][:32]
    monkeypatch.setattr(qc, "available_memory", lambda: int((len(images) + 12) * per / share))
    out = q.quantize_int8(fp32["path"], tmp_path / "subset.onnx", fp32["spec"], images, calib_method="auto",
                          parity_images=fp32["images"])
    used = out.settings["histogram_calibration_images"]
    assert 8 <= used["images"] < len(images) and "even subset" in used["reason"]
    assert all("error" not in c and "skipped" not in c for c in out.settings["calibration_candidates"])

    monkeypatch.setattr(qc, "available_memory", lambda: int(2 * per / share))
    out = q.quantize_int8(fp32["path"], tmp_path / "skip.onnx", fp32["spec"], images, calib_method="auto",
                          parity_images=fp32["images"])
    assert out.settings["calibration_batch"] == 1 and "would not fit" in out.settings["calibration_batch_reason"]
    skipped = {c["method"] for c in out.settings["calibration_candidates"] if "skipped" in c}
    assert skipped == {"percentile", "entropy"} and out.settings["calibration"] == "minmax"
    with pytest.raises(Exception, match=f"percentile calibration skipped: {len(images)} images' activations .* MiB"):
        q.quantize_int8(fp32["path"], tmp_path / "x.onnx", fp32["spec"], images, calib_method="percentile")
