"""``compress-edge index build|add|remove|info``, ``search`` and ``classify`` end to end on generated
images, through Typer's CliRunner, with a small real model (PyTorch and its ONNX export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from compress_edge.cli import app

runner = CliRunner()
CLASSES = ("circle", "square", "stripes")


def make_model(root: Path, size: int = 32, seed: int = 2) -> Path:
    """A randomly initialised mobilenet_v3_small saved as a model folder. Its embeddings still rank the
    generated classes (distinct colours and shapes) correctly for this seed."""
    import torch

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    save_model(model, spec_for(model, image_size=size), root)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("cli")
    images = make_images(root / "gallery", classes=CLASSES, per_class=8, size=32)
    queries = make_images(root / "queries", classes=CLASSES, per_class=2, size=32, seed=11)
    model_dir = make_model(root / "student")
    index_dir = root / "index"
    result = runner.invoke(app, ["index", "build", str(model_dir), str(images), "--out", str(index_dir),
                                 "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    return {"root": root, "images": images, "queries": queries, "model": model_dir, "index": index_dir,
            "info": json.loads(result.stdout)}


def test_build_writes_a_described_index(built):
    info = built["info"]
    assert info["key"] == "IDMap2,Flat" and info["vectors"] == 24
    assert info["classes"] == list(CLASSES) and info["labelled"]
    side = json.loads((built["index"] / "index.json").read_text())
    assert side["files"][0] == "circle/circle_000.png"  # relative to the gallery root
    assert side["root"] == str(built["images"].resolve())
    assert side["spec"]["arch"] == "mobilenet_v3_small" and side["spec"]["weights_sha256"]
    assert side["model"] == str(built["model"].resolve())
    assert side["labels"][:9] == [0] * 8 + [1]

    table = runner.invoke(app, ["index", "info", str(built["index"])])
    assert table.exit_code == 0, table.output
    assert "IDMap2,Flat" in table.stdout and "24 x" in table.stdout


def test_search_prints_neighbours_json_and_a_grid(built, tmp_path):
    queries = [str(built["queries"] / c / f"{c}_000.png") for c in CLASSES]
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["search", str(built["index"]), *queries, "-k", "4", "--json", "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["query"] for r in rows] == queries
    for row, cls in zip(rows, CLASSES, strict=True):
        hits = row["neighbours"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4]
        assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))
        assert Path(hits[0]["path"]).is_file()
        assert sum(h["label_name"] == cls for h in hits) >= 3
    with Image.open(grid) as im:
        assert im.size[0] > 5 * 128 and im.size[1] > 3 * 128  # 3 rows of query + 4 neighbours

    table = runner.invoke(app, ["search", str(built["index"]), queries[0], "-k", "2"])
    assert table.exit_code == 0 and "circle" in table.stdout


def test_classify_labels_the_queries(built):
    result = runner.invoke(app, ["classify", str(built["index"]), str(built["queries"]), "--json"])
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)
    assert len(preds) == 6
    right = sum(Path(p["image"]).parent.name == p["label_name"] for p in preds)
    assert right >= 5
    assert all(0 < p["confidence"] <= 1 for p in preds)
    table = runner.invoke(app, ["classify", str(built["index"]), str(built["queries"] / "square"), "-k", "5",
                                "-T", "0.1"])
    assert table.exit_code == 0 and "square" in table.stdout


def test_mismatched_model_is_refused(built, tmp_path):
    other = make_model(tmp_path / "other", size=40, seed=1)
    query = str(built["queries"] / "circle" / "circle_000.png")
    result = runner.invoke(app, ["search", str(built["index"]), query, "--model", str(other)])
    assert result.exit_code == 1
    assert "different model" in result.output and "image_size" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_add_and_remove_from_the_command_line(built, tmp_path, make_images):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    new = make_images(tmp_path / "new", classes=("circle", "triangle"), per_class=2, size=32,
                                        seed=5)
    result = runner.invoke(app, ["index", "add", str(index), str(new), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"added": 4, "skipped": 0, "ntotal": 28}
    again = runner.invoke(app, ["index", "add", str(index), str(new), "--json"])
    assert json.loads(again.stdout)["skipped"] == 4
    side = json.loads((index / "index.json").read_text())
    assert side["classes"] == [*CLASSES, "triangle"]

    gone = [str(new / "triangle" / "triangle_000.png"), "circle/circle_003.png"]
    result = runner.invoke(app, ["index", "remove", str(index), *gone, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == 2
    search = runner.invoke(app, ["search", str(index), gone[0], "-k", "3", "--json"])
    assert all(not h["path"].endswith("triangle_000.png") for h in json.loads(search.stdout)[0]["neighbours"])

    missing = runner.invoke(app, ["index", "remove", str(index), "nope.png"])
    assert missing.exit_code == 1 and "not in the index" in missing.output


def test_hnsw_remove_and_damaged_index_are_one_line_errors(built, tmp_path):
    index = tmp_path / "hnsw"
    result = runner.invoke(app, ["index", "build", str(built["model"]), str(built["images"]), "--out", str(index),
                                 "--index", "HNSW16,Flat", "--no-progress"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["index", "build", str(built["model"]), str(built["images"]), "--out", str(index)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    result = runner.invoke(app, ["index", "remove", str(index), "circle/circle_000.png"])
    assert result.exit_code == 1 and "HNSW graph cannot remove" in result.output

    side = json.loads((index / "index.json").read_text())
    file = index / side["index"]["file"]
    file.write_bytes(file.read_bytes()[:100])
    result = runner.invoke(app, ["search", str(index), str(built["queries"] / "circle" / "circle_000.png")])
    assert result.exit_code == 1 and "damaged" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_arguments_are_explained(built, tmp_path):
    result = runner.invoke(app, ["search", str(tmp_path / "none"), "x.png"])
    assert result.exit_code == 1 and "no such image" in result.output
    q = str(built["queries"] / "circle" / "circle_000.png")
    result = runner.invoke(app, ["search", str(tmp_path / "none"), q])
    assert result.exit_code == 1 and "no index at" in result.output
    result = runner.invoke(app, ["search", str(built["index"]), q, "--param", "nprobe"])
    assert result.exit_code == 1 and "name=value" in result.output
    result = runner.invoke(app, ["index", "build", str(built["model"]), str(built["images"]), "--out",
                                 str(tmp_path / "x"), "--index", "Bogus7", "--no-progress"])
    assert result.exit_code == 1 and "index_factory" in result.output


def test_build_with_weights_saves_the_checkpoint_as_the_index_model(built, tmp_path):
    """``index build ARCH --weights FILE``: the third-party checkpoint becomes OUT/model, the index
    records it, and search and add embed with those weights (README "Build an index")."""
    import numpy as np
    import torch
    import torchvision

    from compress_edge.models.resolve import load_model, resolve_model

    torch.manual_seed(7)
    ckpt = tmp_path / "third-party.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), ckpt)
    index = tmp_path / "index"
    args = ["index", "build", "mobilenet_v3_small", str(built["images"]), "--out", str(index), "--weights", str(ckpt),
            "--image-size", "32", "--no-progress"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # --json prints JSON alone: the note about the model goes to the log
    assert info["vectors"] == 24 and info["model"] == str(index / "model")
    assert "saved as a model folder" in result.stderr
    side = json.loads((index / "index.json").read_text())
    assert side["model"] == str((index / "model").resolve())
    assert side["spec"]["source"] == {"kind": "checkpoint", "path": str(ckpt), "format": "torchvision"}

    # OUT/model holds the checkpoint's weights: it embeds as the architecture with --weights does
    saved, _ = load_model(index / "model")
    direct, _ = resolve_model("mobilenet_v3_small", weights=str(ckpt), image_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(saved(x), direct(x), atol=1e-6)

    # search and add use the recorded model: a gallery image finds itself, new images are embedded alike
    query = str(built["images"] / "square" / "square_002.png")
    found = runner.invoke(app, ["search", str(index), query, "-k", "1", "--json"])
    assert found.exit_code == 0, found.output
    hit = json.loads(found.stdout)[0]["neighbours"][0]
    assert hit["file"] == "square/square_002.png" and np.isclose(hit["score"], 1.0, atol=1e-4)
    added = runner.invoke(app, ["index", "add", str(index), str(built["queries"]), "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["ntotal"] == 30

    # an index already there: refused before anything is written, unless --overwrite
    stamp = (index / "model" / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert (index / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    table = runner.invoke(app, [*args, "--overwrite"])
    assert table.exit_code == 0, table.output
    assert "24 x 1024" in table.stdout and "saved as a model folder in" in " ".join(table.stderr.split())

    # --weights goes with an architecture name, not with a model folder
    wrong = runner.invoke(app, ["index", "build", str(built["model"]), str(built["images"]), "--out",
                                str(tmp_path / "x"), "--weights", str(ckpt), "--no-progress"])
    assert wrong.exit_code == 1 and "--weights goes with an architecture name" in wrong.output
    assert not (tmp_path / "x" / "index.json").exists()
