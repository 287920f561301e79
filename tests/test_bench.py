"""``compress-edge bench`` and ``compress-edge export`` end to end through the CLI, and the benchmark rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from compress_edge.export.bench import benchmark, count_gflops, machine_info
from compress_edge.export.runtimes import open_embedder
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.data.images import preprocess_batch, scan_images
from compress_edge.errors import DataError
from compress_edge.models.resolve import create_model, recalibrate_batchnorm, save_model, spec_for
from compress_edge.models.spec import ModelSpec

runner = CliRunner()
HAVE_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))


@pytest.fixture(scope="module")
def student(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("bench")
    images = make_images(root / "images", size=40)
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True)
    spec = spec_for(model, image_size=32, source={"kind": "distill", "run": "unit"})
    files = scan_images(images).files
    recalibrate_batchnorm(model, torch.from_numpy(preprocess_batch(files, 32, spec.mean, spec.std)))
    save_model(model.eval(), spec, root / "run" / "student")
    return {"root": root, "images": images, "run": root / "run"}


@pytest.fixture(scope="module")
def exported(student):
    out = student["root"] / "export"
    args = ["export", str(student["run"]), "--onnx", "--fp16", "--int8", "cpu", "--calib-data", str(student["images"]),
            "--calib-images", "12", "--parity-images", "18", "--out", str(out), "--no-strict", "--no-progress",
            "--exporter", "torchscript"]  # the dynamo path is covered in test_export_onnx; this one is faster
    if HAVE_TRT:
        args += ["--trt", "--trt-from", "fp32", "--max-batch", "8", "--timing-cache", str(student["root"] / "tc")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output}


def test_export_cli_writes_every_file_and_the_report(student, exported):
    out = exported["out"]
    for name in ("model.onnx", "model.fp16.onnx", "model.int8-cpu.onnx", "export.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "export.json").read_text())
    assert report["spec"]["source"] == {"kind": "distill", "run": "unit"}
    assert report["steps"]["onnx"]["exporter"] == "torchscript"
    assert report["parity"]["fp32"]["reference"] == "pytorch fp32"
    assert report["parity"]["fp32"]["passed"] and report["parity"]["fp32"]["min_cosine"] >= 0.9999
    assert report["parity"]["fp16"]["passed"]
    assert report["parity"]["int8-cpu"]["topk_overlap"] is not None
    assert report["check_images"]["source"].startswith("real")
    text = exported["output"]
    assert "min cosine" in text and "max |diff|" in text and "top-10 overlap" in text
    if HAVE_TRT:
        assert (out / "model.engine").is_file() and (out / "model.engine.json").is_file()
        side = json.loads((out / "model.engine.json").read_text())
        assert side["profile"]["max"][0] == 8
        assert "engine:" in text


def test_export_cli_strict_fails_on_a_missed_goal(student, tmp_path):
    # A 2-image calibration of a random-weight MobileNetV3 cannot reach cosine 0.98 in int8.
    result = runner.invoke(app, ["export", str(student["run"]), "--int8", "trt", "--calib-data", str(student["images"]),
                                 "--calib-images", "2", "--out", str(tmp_path / "o"), "--exporter", "torchscript",
                                 "--no-progress"])
    assert result.exit_code == 1
    assert "does not give the same embeddings" in result.output and "--no-strict" in result.output
    assert (tmp_path / "o" / "export.json").is_file()  # the numbers are kept
    # The per-file lines (which file missed, by how much) are printed first, then the error.
    text = result.output
    assert "onnxruntime int8-trt vs pytorch fp32" in text and "BELOW GOAL 0.98" in text
    assert "onnxruntime fp32 vs pytorch fp32" in text and "max |diff|" in text
    assert text.index("BELOW GOAL") < text.index("does not give the same embeddings")
    assert "report written to" in text


def test_export_cli_strict_failure_as_json_still_prints_the_report(student, tmp_path):
    result = runner.invoke(app, ["export", str(student["run"]), "--int8", "trt", "--calib-data", str(student["images"]),
                                 "--calib-images", "2", "--out", str(tmp_path / "o"), "--exporter", "torchscript",
                                 "--no-progress", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["parity"]["int8-trt"]["passed"] is False
    assert "does not give the same embeddings" in result.stderr


def test_calibration_with_a_ragged_last_batch_uses_the_method_asked_for(student, make_images, tmp_path):
    # 25 images do not split into batches of 16: onnxruntime's percentile calibrator used to fail on
    # the ragged last batch and the export fell back to minmax while export.json said "percentile".
    images = make_images(tmp_path / "calib", per_class=9, size=40)
    out = tmp_path / "o"
    result = runner.invoke(app, ["export", str(student["run"]), "--int8", "cpu", "--calib-data", str(images),
                                 "--calib-images", "25", "--calib-method", "percentile", "--out", str(out),
                                 "--exporter", "torchscript", "--no-progress", "--no-strict"])
    assert result.exit_code == 0, result.output
    assert "calibrating with minmax instead" not in result.output
    report = json.loads((out / "export.json").read_text())
    step = report["steps"]["int8-cpu"]
    assert step["settings"]["calibration"] == "percentile"  # what the calibrator really ran
    assert step["calib_images"] == 25 and 25 % step["settings"]["calibration_batch"] == 0
    calib = report["calibration"]
    assert calib["method"] == "percentile" and calib["requested_method"] == "percentile"
    assert calib["count"] == 25 and calib["batch"] == 5 and calib["per_file"] == {"int8-cpu": "percentile"}
    assert "int8 calibration: 25 images" in result.output and "percentile, batches of 5" in result.output


def test_calibration_batch_splits_the_images_evenly():
    from compress_edge.export.calibration import calibration_batch

    assert calibration_batch(250, 16) == 10
    assert calibration_batch(256, 16) == 16
    assert calibration_batch(12, 16) == 12
    assert calibration_batch(251, 16) == 1  # a prime: one image at a time, every image still used once


def test_bench_cli_json(student, exported):
    out = exported["out"]
    result = runner.invoke(app, ["bench", str(student["run"]), str(out / "model.onnx"), str(out / "model.int8-cpu.onnx"),
                                 "--batch", "1", "--batch", "4", "--iters", "3", "--warmup", "1", "--min-seconds", "0",
                                 "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("torch", 1), ("torch", 4), ("onnxruntime", 1), ("onnxruntime", 4), ("onnxruntime", 1), ("onnxruntime", 4)]
    assert [r["precision"] for r in rows[2:]] == ["fp32", "fp32", "int8-cpu", "int8-cpu"]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["images_per_s"] > 0 and r["iters"] == 3
        assert r["gflop_per_image"] > 0 and r["achieved_gflops"] > 0 and r["peak_rss_mb"] > 0
        assert r["threads"] == 2
    assert data["min_cosine_vs_first"][str(out / "model.onnx")] > 0.9999
    assert data["machine"]["cores"] >= 1
    # No --data: the calibration set that export.json beside the ONNX files names, not random tensors.
    assert data["inputs"]["kind"] == "real" and data["inputs"]["data"] == str(student["images"])
    assert data["inputs"]["from"] == str(out / "export.json")
    assert data["min_cosine_vs_first"][str(out / "model.int8-cpu.onnx")] > 0.8
    assert "random tensors" not in result.output


def test_bench_cli_table(exported):
    result = runner.invoke(app, ["bench", str(exported["out"] / "model.onnx"), "-b", "2", "--iters", "2",
                                 "--warmup", "0", "--min-seconds", "0"])
    assert result.exit_code == 0, result.output
    assert "p50 ms" in result.output and "onnxruntime" in result.output


def test_bench_and_export_refuse_bad_input(exported, tmp_path):
    import onnx

    proto = onnx.load(str(exported["out"] / "model.onnx"))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    result = runner.invoke(app, ["bench", str(bare), "--iters", "1"])
    assert result.exit_code == 1 and "--mean, --std" in result.output
    result = runner.invoke(app, ["bench", str(bare), "--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"])
    assert result.exit_code == 1 and "--mean takes 3 numbers" in result.output
    result = runner.invoke(app, ["bench", str(bare), "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", "-b", "1",
                                 "--iters", "1", "--warmup", "0", "--min-seconds", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["gflop_per_image"] is None  # unknown architecture
    result = runner.invoke(app, ["export", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    result = runner.invoke(app, ["export", str(bare), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--image-size" in result.output
    result = runner.invoke(app, ["export", str(exported["out"] / "model.onnx"), "--int8", "arm",
                                 "--calib-data", "x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "choose one of: cpu, trt" in result.output
    fake = tmp_path / "model.engine"
    fake.write_bytes(b"not an engine")
    result = runner.invoke(app, ["bench", str(fake)])
    assert result.exit_code == 1 and "model.engine.json" in result.output


def test_benchmark_rows_and_gflops(exported):
    emb = open_embedder(exported["out"] / "model.onnx", threads=1)
    rows = benchmark(emb, (1, 3), warmup=1, iters=4, gflop_per_image=0.5)
    assert [r.batch for r in rows] == [1, 3]
    for r in rows:
        assert r.iters == 4 and r.p50_ms <= r.p95_ms
        assert r.achieved_gflops == pytest.approx(0.5 * r.images_per_s)
    spec = emb.spec
    flops = count_gflops(spec)
    assert flops and 0.001 < flops < 1.0  # MobileNetV3-Small at 32 px: a few MFLOP
    assert count_gflops(ModelSpec(arch="external-onnx", embed_dim=8, image_size=32)) is None
    info = machine_info()
    assert info["cpu"] and isinstance(info["simd"], list)
    assert np.isfinite(rows[0].images_per_s)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """1000 tiny real PNGs: enough for the "checking images" bar of a folder scan."""
    from PIL import Image

    from compress_edge.data.images import _PROGRESS_MIN_FILES

    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    for i in range(_PROGRESS_MIN_FILES):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("flag", ["--no-progress", "--progress"])
def test_export_no_progress_hides_the_checking_images_bar(exported, big_folder, tmp_path, flag):
    result = runner.invoke(app, ["export", str(exported["out"] / "model.onnx"), "--parity-data", str(big_folder),
                                 "--parity-images", "8", "--out", str(tmp_path / "o"), flag])
    assert result.exit_code == 0, result.output
    assert ("checking images" in result.output) == (flag == "--progress")


def _bench(*args):
    result = runner.invoke(app, ["bench", *map(str, args), "-b", "2", "--iters", "1", "--warmup", "0",
                                 "--min-seconds", "0", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.output


def test_bench_without_images_warns_that_it_runs_on_random_tensors(exported, tmp_path):
    import shutil

    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.onnx", "model.int8-cpu.onnx"):  # no export.json beside them
        shutil.copy(exported["out"] / name, lone / name)
    data, output = _bench(lone / "model.onnx", lone / "model.int8-cpu.onnx")
    assert data["inputs"] == {"kind": "random"}
    assert "random tensors" in output and "--data" in output


def test_bench_on_data_uses_those_images(student, exported, make_images, tmp_path):
    other = make_images(tmp_path / "other", classes=("a", "b"), per_class=5, size=36, seed=3)
    out = exported["out"]
    data, output = _bench(out / "model.onnx", out / "model.int8-cpu.onnx", "--data", other)
    assert data["inputs"]["kind"] == "real" and data["inputs"]["data"] == str(other)
    assert data["inputs"]["from"] == "--data" and data["inputs"]["source"] == f"real ({other})"
    assert "random tensors" not in output
    # The int8 model describes real images: its embeddings follow the float model's, not zeros.
    from compress_edge.export.parity import load_check_images

    with open_embedder(out / "model.int8-cpu.onnx", threads=1) as emb:
        images, _ = load_check_images(other, emb.spec, 10)
        got = emb.embed(images)
    assert np.abs(got).max() > 0 and np.linalg.matrix_rank(got) > 1
    assert data["min_cosine_vs_first"][str(out / "model.int8-cpu.onnx")] > 0.5  # images unlike its calibration set
    result = runner.invoke(app, ["bench", str(out / "model.onnx"), "--data", str(tmp_path / "missing"), "--iters", "1"])
    assert result.exit_code == 1 and "no such folder" in result.output


def test_benchmark_fills_batches_from_real_images(exported):
    from compress_edge.export.parity import load_check_images

    emb = open_embedder(exported["out"] / "model.onnx", threads=1)
    images, _ = load_check_images(str(exported["out"].parent / "images"), emb.spec, 3)
    rows = benchmark(emb, (5,), warmup=0, iters=1, images=images)  # a batch larger than the set repeats it
    assert rows[0].batch == 5
    with pytest.raises(DataError, match="preprocess them for this model"):
        benchmark(emb, (1,), iters=1, images=images[:, :, :8, :8])


def _bench_export():
    spec = importlib.util.spec_from_file_location("bench_export", Path(__file__).parent.parent / "benchmarks" /
                                                  "bench_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_export_int8_sweep_prints_every_candidate_and_the_goal(student, tmp_path, capsys):
    bench = _bench_export()
    images = str(student["images"])
    bench.main(["--int8-sweep", "--sweep-archs", "mobilenet_v3_small", "--sweep-sizes", "32", "--calib-data", images,
                "--data", images, "--calib-images", "8", "--parity-images", "18", "--timing-iters", "1",
                "--threads", "1", "--out", str(tmp_path), "--json"])
    results = json.loads(capsys.readouterr().out)
    [row] = results["rows"]
    assert row["arch"] == "mobilenet_v3_small" and row["size"] == 32
    assert set(row["excluded"]) == {"squeeze-excitation", "hard-swish", "embedding-head"}
    assert [c["method"] for c in row["candidates"]] == ["minmax", "percentile", "entropy"]
    assert [c["method"] for c in row["candidates"] if c.get("chosen")] == [row["chosen"]]
    assert "vit_tiny_patch16_224" in results["not_measured"] and "mobilenet_v3_small" not in results["not_measured"]
    bench.print_sweep(results)
    table = capsys.readouterr().out
    p = row["parity"]
    [line] = [x for x in table.splitlines() if x.startswith("| mobilenet_v3_small | 32 |")]
    assert f"| {p['min_cosine']:.4f} | {p['topk_overlap']:.3f} | {'met' if p['passed'] else 'NOT MET'} |" in line
    for c in row["candidates"]:
        assert ("failed" if "error" in c else f"{c['topk_overlap']:.3f} / {c['min_cosine']:.4f}") in line
    assert "not measured" in table and "vit_tiny_patch16_224" in table


def test_bench_export_has_a_vit_row():
    bench = _bench_export()
    assert any(arch.startswith("vit_") for arch, _, _ in bench.CONFIGS.values())
    assert "vit_tiny_patch16_224" in bench.SWEEP_VITS


def test_whitening_check_fits_on_the_gallery_and_applies_the_same_map_to_the_queries():
    spec = importlib.util.spec_from_file_location("whitening_check", Path(__file__).parent.parent / "benchmarks" /
                                                  "whitening_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(300, 300)) * np.linspace(3, 0.01, 300)  # a few large directions, many small
    gallery, queries = rng.normal(size=(2000, 300)) @ mixing.T + 5, rng.normal(size=(50, 300)) @ mixing.T + 5
    got = {name: (g, q) for name, g, q in module.variants(gallery, queries)}
    assert list(got)[:2] == ["plain", "centred"] and "pca256 p=1.0" in got
    np.testing.assert_array_equal(got["plain"][0], gallery)
    assert np.abs(got["centred"][0].mean(0)).max() < 1e-9  # centred on the gallery's mean ...
    np.testing.assert_allclose(got["centred"][1], queries - gallery.mean(0))  # ... which the queries lose too
    white = got["pca128 p=1.0"][0]
    assert white.shape == (2000, 128)
    np.testing.assert_allclose(np.cov(white.T), np.eye(128), atol=1e-6)  # whitened: unit covariance
    pca = np.var(got["pca64 p=0.0"][0], axis=0)
    assert np.all(np.diff(pca) <= 1e-9)  # PCA alone: variances in decreasing order
