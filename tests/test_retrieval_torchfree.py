"""The device's query path without torch: onnxruntime + faiss + numpy + PIL, in a Python where torch
is not installed at all. The index is built here with the PyTorch model and queried there with its
ONNX export (same ModelSpec), and the answers must be the ones PyTorch gives."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from cli_helpers import imports_torch


def test_retrieval_modules_import_without_torch():
    assert not imports_torch("compress_edge.retrieval.index", "compress_edge.retrieval.knn",
                             "compress_edge.retrieval.search", "compress_edge.retrieval.shards",
                             "compress_edge.retrieval.grid")


@pytest.mark.slow
def test_query_path_runs_without_torch(torchfree_python, tmp_path, make_images):
    import torch
    from compress_edge.export.onnx import export_onnx
    from compress_edge.retrieval.index import build_from_images
    from compress_edge.retrieval.search import Searcher

    from compress_edge.models.resolve import create_model, save_model, spec_for

    gallery = make_images(tmp_path / "gallery", per_class=6, size=32)
    queries = make_images(tmp_path / "queries", per_class=1, size=32, seed=11)
    query_files = sorted(str(p) for p in queries.rglob("*.png"))
    torch.manual_seed(2)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = save_model(model, spec_for(model, image_size=32), tmp_path / "student")
    onnx = tmp_path / "student.onnx"
    export_onnx(model, spec, onnx, exporter="torchscript", simplify=False)
    build_from_images(str(tmp_path / "student"), [str(gallery)], tmp_path / "index", index="IVF4,Flat",
                      queries=0, tune=False)
    with Searcher(tmp_path / "index") as searcher:  # the recorded PyTorch model
        ref_hits = [[h.id for h in hits] for hits in searcher.search(query_files, k=3)]
        ref_labels = [p.label_name for p in searcher.classify(query_files, k=5)]

    script = textwrap.dedent(
        f"""
        import json, sys
        from compress_edge.retrieval.search import Searcher, open_index
        from compress_edge.retrieval.knn import knn_classify
        from compress_edge.retrieval.grid import draw_grid
        from compress_edge.retrieval.index import build_from_images
        from compress_edge.errors import SpecMismatchError
        files = {json.dumps(query_files)}
        index = open_index({str(tmp_path / "index")!r})
        with Searcher(index, model={str(onnx)!r}) as s:
            hits = s.search(files, k=3)
            preds = s.classify(files, k=5)
            x = s.embed(files)
            knn = knn_classify(index, x, k=5).predictions.tolist()
            draw_grid([(f, f) for f in files], hits, {str(tmp_path / "grid.png")!r})
            backend = s.embedder.name
        # a whole index built on the device, from the ONNX model
        built = build_from_images({str(onnx)!r}, [{str(gallery)!r}], {str(tmp_path / "device-index")!r})
        try:
            bad = built.spec.replace(image_size=64)
            built.spec.check_compatible(bad, what="the index")
            refused = False
        except SpecMismatchError:
            refused = True
        print(json.dumps({{"torch": "torch" in sys.modules, "backend": backend,
                           "hits": [[h.id for h in row] for row in hits],
                           "labels": [p.label_name for p in preds], "knn": knn,
                           "device_index": [built.key, built.ntotal], "refused": refused}}))
        """
    )
    run = subprocess.run([str(torchfree_python), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["backend"] == "onnxruntime"
    assert got["hits"] == ref_hits
    assert got["labels"] == ref_labels
    assert got["device_index"] == ["IDMap2,Flat", 18]
    assert got["refused"] is True
    assert (tmp_path / "grid.png").stat().st_size > 1000

    # The command line too: compress-edge search / classify in the Python without torch.
    for command in ("search", "classify"):
        cli = subprocess.run([str(torchfree_python), "-m", "compress_edge", command, str(tmp_path / "index"),
                              *query_files, "--model", str(onnx), "--json"], capture_output=True, text=True)
        assert cli.returncode == 0, cli.stderr[-3000:]
        payload = json.loads(cli.stdout)
        assert json.dumps(payload).count(Path(query_files[0]).name) >= 1
