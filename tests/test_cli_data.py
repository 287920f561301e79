"""``compress-edge data info`` through Typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress_edge.cli import app

runner = CliRunner()
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_info_class_folder(class_folder):
    (class_folder / "square" / "broken.jpg").write_text("not a jpeg")
    result = runner.invoke(app, ["data", "info", str(class_folder)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "class-folder" in out
    assert "images: 18" in out
    for name in ("circle", "square", "stripes"):
        assert name in out
    assert "3 classes" in out
    assert "skipped: 1 unreadable file" in out and "broken.jpg" in out
    assert "fingerprint:" in out


def test_info_json(class_folder):
    result = runner.invoke(app, ["data", "info", str(class_folder), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "class-folder" and info["images"] == 18 and info["labelled"] is True
    assert [(c["name"], c["images"]) for c in info["classes"]] == [
        ("circle", 6),
        ("square", 6),
        ("stripes", 6),
    ]
    assert info["skipped"] == []
    assert len(info["fingerprint"]) == 64


def test_info_unlabelled_folder(tmp_path, class_folder):
    result = runner.invoke(app, ["data", "info", str(class_folder / "circle"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "image-folder" and info["images"] == 6 and info["classes"] == []


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_info_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("COMPRESS_EDGE_DATA", raising=False)
    result = runner.invoke(app, ["data", "info", "fashion-mnist:test", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "fashion-mnist" and info["images"] == 10000
    assert [c["images"] for c in info["classes"]] == [1000] * 10
    assert info["classes"][9]["name"] == "Ankle boot"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cifar10:train"], "fashion-mnist:train"),
        (["/no/such/folder"], "no such folder"),
        (["fashion-mnist:validation"], "unknown Fashion-MNIST split"),
    ],
)
def test_info_bad_data_is_one_line_exit_1(args, needle):
    result = runner.invoke(app, ["data", "info", *args])
    assert result.exit_code == 1
    lines = _lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in result.output


def test_info_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["data", "info", str(tmp_path / "empty")])
    assert result.exit_code == 1
    lines = _lines(result.output)
    assert len(lines) == 1 and "holds no image files" in lines[0]


def test_info_missing_fashion_mnist(monkeypatch, tmp_path):
    from compress_edge.data import fashion_mnist as F

    monkeypatch.setattr(F, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("COMPRESS_EDGE_DATA", raising=False)
    result = runner.invoke(
        app, ["data", "info", "fashion-mnist:train", "--data-root", str(tmp_path / "none")]
    )
    assert result.exit_code == 1
    lines = _lines(result.output)
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0]


def test_info_help_has_example():
    result = runner.invoke(app, ["data", "info", "--help"])
    assert result.exit_code == 0
    assert "Example: compress-edge data info fashion-mnist:train" in result.output
    assert "--data-root" in result.output and "--download" in result.output and "--json" in result.output
