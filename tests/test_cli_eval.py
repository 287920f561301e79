"""``compress-edge eval`` and ``compress-edge profile`` through Typer's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compress_edge.cli import app

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    """A saved (random) small-input student at 24 px."""
    import torch

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    save_model(model, spec_for(model, image_size=24), tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def splits(tmp_path, make_images):
    train = make_images(tmp_path / "train", per_class=6, seed=0)
    test = make_images(tmp_path / "test", per_class=3, seed=1)
    return str(train), str(test)


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _common(tmp_path):
    return ["--cache-dir", str(tmp_path / "features"), "--workers", "0", "--device", "cpu", "--json"]


def test_profile_json_and_table():
    result = runner.invoke(app, ["profile", "resnet18", "mobilenet_v3_small", "--image-size", "32", "--json",
                                 "--student-kwargs", "small_input=false"])
    out = _json(result)
    assert out["teacher"]["arch"] == "resnet18" and out["teacher"]["arch_kwargs"]["small_input"] is True
    assert out["student"]["arch_kwargs"]["small_input"] is False
    assert out["ratios"]["flops_ratio"] == pytest.approx(out["teacher"]["flops"] / out["student"]["flops"], rel=1e-3)
    assert out["ratios"]["flops_ratio"] > 100
    assert out["flops_note"] == "FLOPs (fvcore counts one multiply-add as one FLOP)"
    assert "aten::add_" in out["not_counted"]

    text = runner.invoke(app, ["profile", "resnet18", "mobilenet_v3_small", "--image-size", "32", "--depth", "1"])
    assert text.exit_code == 0, text.output
    assert text.stdout.count("FLOPs (fvcore counts one multiply-add as one FLOP)") == 1
    assert text.stdout.count("not counted") == 1 and "Unsupported operator" not in text.output
    assert "cheaper in FLOPs" in text.stdout and "backbone.layer4" in text.stdout
    # The default depth, rendered 80 columns wide (no terminal): every figure and header stays whole
    # (mobilenet_v2's table was one column too wide for "% FLOPs").
    text = runner.invoke(app, ["profile", "resnet18", "mobilenet_v2", "--image-size", "32"])
    assert "backbone.features.18" in text.stdout and "…" not in text.stdout, text.stdout


def test_profile_reads_a_trained_model_at_its_own_size(model_dir):
    out = _json(runner.invoke(app, ["profile", "resnet18", str(model_dir), "--json", "--depth", "0"]))
    assert out["teacher"]["image_size"] == 224 and out["student"]["image_size"] == 24
    assert out["student"]["modules"] == []
    bad = runner.invoke(app, ["profile", "resnet18", str(model_dir), "--student-kwargs", "width_mult=0.5"])
    assert bad.exit_code == 1 and "architecture name" in bad.output


def test_eval_knn_linear_cluster_on_a_saved_model(model_dir, splits, tmp_path):
    train, test = splits
    knn = _json(runner.invoke(app, ["eval", "knn", str(model_dir), "--train", train, "--test", test, "-k", "3",
                                    "-k", "5", *_common(tmp_path)]))
    assert knn["queries"] == 9 and knn["gallery"] == 18 and set(knn["knn"]) == {"3", "5"}
    assert 0 <= knn["nn_top1"] <= 1 and knn["arch"] == "mobilenet_v3_small" and knn["backend"] == "torch fp32"
    assert knn["test_in_gallery"] == 0
    cached = sorted((tmp_path / "features").glob("*.npz"))
    assert len(cached) == 2  # train and test features
    stamps = [p.stat().st_mtime_ns for p in cached]

    linear = _json(runner.invoke(app, ["eval", "linear", str(model_dir), "--train", train, "--test", test,
                                       "--weight-decay", "0.001", *_common(tmp_path)]))
    assert 0 <= linear["top1"] <= linear["top5"] <= 1 and linear["weight_decay"] == 0.001
    cluster = _json(runner.invoke(app, ["eval", "cluster", str(model_dir), "--train", train, "--test", test,
                                        *_common(tmp_path)]))
    assert cluster["num_clusters"] == cluster["num_classes"] == 3 and 0 <= cluster["accuracy"] <= 1
    # The second and third evaluations read the cached features: nothing new was written.
    assert sorted((tmp_path / "features").glob("*.npz")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps

    table = runner.invoke(app, ["eval", "knn", str(model_dir), "--train", train, "--test", test,
                                "--cache-dir", str(tmp_path / "features"), "--workers", "0", "--no-progress"])
    assert table.exit_code == 0, table.output
    assert "1-NN top-1 %" in table.stdout and "200-NN top-1 %" in table.stdout


def test_eval_knn_says_when_the_test_images_are_gallery_images(model_dir, splits, tmp_path):
    train, _ = splits
    knn = _json(runner.invoke(app, ["eval", "knn", str(model_dir), "--train", train, "--test", train, "-k", "3",
                                    *_common(tmp_path)]))
    assert knn["test_in_gallery"] == knn["queries"] == 18 and knn["nn_top1"] == 1.0  # each query found itself


def test_eval_agreement_of_a_model_with_itself_is_perfect(model_dir, splits, tmp_path):
    out = _json(runner.invoke(app, ["eval", "agreement", str(model_dir), str(model_dir), splits[0], "-k", "4",
                                    *_common(tmp_path)]))
    assert out["overlap"] == {"4": pytest.approx(1.0)} and out["spearman"] == pytest.approx(1.0, abs=1e-6)
    assert out["images"] == 18 and out["teacher"]["arch"] == out["student"]["arch"]


def test_eval_errors_are_one_line(model_dir, splits, tmp_path):
    train, test = splits
    both = runner.invoke(app, ["eval", "knn", str(model_dir), "--test", test])
    assert both.exit_code == 1 and "either --train DATA or --index" in both.output
    unknown = runner.invoke(app, ["eval", "knn", "resnet81", "--train", train, "--test", test])
    assert unknown.exit_code == 1 and "did you mean resnet18" in unknown.output
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((tmp_path / "test").rglob("*.png"))[:4]:
        (flat / p.name).write_bytes(p.read_bytes())
    unlabelled = runner.invoke(app, ["eval", "linear", str(model_dir), "--train", train, "--test", str(flat),
                                     *_common(tmp_path)])
    assert unlabelled.exit_code == 1 and "labels" in unlabelled.output
    assert "Traceback" not in unlabelled.output


def test_an_exported_model_is_opened_through_export_runtimes(model_dir, splits, tmp_path, monkeypatch):
    """MODEL ending in .onnx goes to compress_edge.export.runtimes.open_embedder (faked here)."""
    runtimes = pytest.importorskip("compress_edge.export.runtimes")
    import torch

    from compress_edge.models.resolve import load_model

    model, spec = load_model(model_dir)
    seen = {}

    class FakeEmbedder:
        name, precision, path = "onnxruntime", "fp32", ""

        def __init__(self):
            self.spec = spec

        def embed(self, images):
            with torch.no_grad():
                return model(torch.from_numpy(images)).numpy()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    real_open = runtimes.open_embedder

    def fake_open(path, backend="auto", **kw):
        if not str(path).endswith(".onnx"):  # every MODEL goes through open_embedder: fake only the .onnx
            return real_open(path, backend, **kw)
        seen["path"] = str(path)
        return FakeEmbedder()

    monkeypatch.setattr(runtimes, "open_embedder", fake_open)
    train, test = splits
    args = ["--train", train, "--test", test, "-k", "3", "--workers", "0", "--device", "cpu", "--json", "--no-cache"]
    via_export = _json(runner.invoke(app, ["eval", "knn", str(tmp_path / "model.onnx"), *args]))
    direct = _json(runner.invoke(app, ["eval", "knn", str(model_dir), *args]))
    assert seen["path"].endswith("model.onnx") and via_export["backend"] == "onnxruntime fp32"
    assert via_export["nn_top1"] == direct["nn_top1"] and via_export["knn"] == direct["knn"]


def test_eval_knn_with_an_index_maps_classes_by_name(model_dir, splits, tmp_path, monkeypatch):
    """--index: neighbours from compress_edge.retrieval (faked here), labels in the index's numbering."""
    index_mod = pytest.importorskip("compress_edge.retrieval.index")
    knn_mod = pytest.importorskip("compress_edge.retrieval.knn")
    from types import SimpleNamespace

    from compress_edge.models.resolve import load_model

    _, spec = load_model(model_dir)
    names = ["stripes", "square", "circle"]  # the index numbers the classes otherwise than the test folder
    fake_index = SimpleNamespace(spec=spec, labels=np.array([0, 1, 2]), classes=names, ntotal=3)
    monkeypatch.setattr(index_mod, "open_index", lambda path, **kw: fake_index)

    def fake_classify(idx, queries, *, k, temperature, **kw):
        n = len(queries)
        # Every query's single neighbour is labelled "circle" (index class 2): right for the 3 circles.
        return SimpleNamespace(similarities=np.ones((n, 1), np.float32), neighbour_labels=np.full((n, 1), 2))

    monkeypatch.setattr(knn_mod, "knn_classify", fake_classify)
    out = _json(runner.invoke(app, ["eval", "knn", str(model_dir), "--index", str(tmp_path / "idx"), "--test",
                                    splits[1], "-k", "1", *_common(tmp_path)]))
    assert out["nn_top1"] == pytest.approx(3 / 9) and out["gallery"] == 3


@pytest.fixture(scope="module")
def folder_300(tmp_path_factory):
    """300 tiny real PNGs in two classes: a folder scan shows its "checking images" bar at this size
    when the threshold is lowered to 300 (see the test)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder300")
    rng = np.random.default_rng(0)
    for i in range(300):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(cls / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("flag", ["--no-progress", "--progress"])
def test_no_progress_hides_the_checking_images_bar(model_dir, folder_300, tmp_path, monkeypatch, flag):
    import compress_edge.data.images as images

    monkeypatch.setattr(images, "_PROGRESS_MIN_FILES", 300)
    shown = flag == "--progress"
    knn = runner.invoke(app, ["eval", "knn", str(model_dir), "--train", str(folder_300), "--test", str(folder_300),
                              "-k", "3", "--workers", "0", "--device", "cpu", "--no-cache", flag])
    assert knn.exit_code == 0, knn.output
    assert ("checking images" in knn.output) == shown
    info = runner.invoke(app, ["data", "info", str(folder_300), flag])
    assert info.exit_code == 0, info.output
    assert ("checking images" in info.output) == shown and "images: 300" in info.output


def test_open_gallery_without_progress_shows_no_bar(folder_300, monkeypatch, capsys):
    from compress_edge.retrieval.shards import open_gallery

    import compress_edge.data.images as images

    monkeypatch.setattr(images, "_PROGRESS_MIN_FILES", 300)
    assert len(open_gallery([str(folder_300)], progress=False).files) == 300
    assert "checking images" not in capsys.readouterr().err


def test_demo_export_stage_times_the_backends_on_its_test_images(model_dir, splits, tmp_path, monkeypatch):
    """The demo's latency table (stage_export) describes real inputs: benchmark() gets the demo's test
    images, preprocessed for the model, never random tensors. (Export itself is faked: only the
    timing's inputs are under test here.)"""
    import compress_edge.export.bench as bench_mod
    import compress_edge.export.pipeline as export_pkg
    import compress_edge.export.runtimes as runtimes

    from compress_edge.demo import Demo, DemoSettings, stage_export

    real_open, real_bench = runtimes.open_embedder, bench_mod.benchmark
    monkeypatch.setattr(export_pkg, "export_model", lambda opts: {"files": [], "parity": {}, "steps": {}})
    monkeypatch.setattr(runtimes, "open_embedder", lambda ref, **kw: real_open(str(model_dir), threads=1))
    seen = []

    def bench(embedder, batch_sizes, **kw):
        seen.append(kw.get("images"))
        return real_bench(embedder, batch_sizes, **{**kw, "warmup": 0, "iters": 1})

    monkeypatch.setattr(bench_mod, "benchmark", bench)
    demo = Demo(tmp_path / "demo", DemoSettings(test_data=splits[1], device="cpu", workers=0), progress=False)
    demo.results["distill"] = {"student": str(model_dir)}
    out = stage_export(demo)
    assert len(seen) == 3 and all(x is not None for x in seen)
    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.images import preprocess_batch
    from compress_edge.models.resolve import load_model

    _, spec = load_model(model_dir)
    test = open_dataset(splits[1])
    want = preprocess_batch([test.get_image(i) for i in range(len(test))], spec.image_size, spec.mean, spec.std)
    np.testing.assert_allclose(seen[0], want, atol=1e-6)
    assert out["latency_inputs"] == {"kind": "real", "data": splits[1], "images": len(test)}
    assert len(out["latency"]) == 6
