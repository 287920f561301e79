"""The DATA grammar (compress_edge.data.grammar): the spellings it accepts, ``@N`` subsets, its one-line
errors, folder lookup under --data-root, dataset ids, and that it loads without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from compress_edge.retrieval.safety import dataset_id_ok

from compress_edge.data import grammar as G
from compress_edge.errors import DataError


@pytest.mark.parametrize(
    ("data", "split"),
    [
        ("fashion-mnist:train", "train"),
        ("fashion-mnist:test", "test"),
        ("fashion_mnist:test", "test"),
        ("fashionmnist:train", "train"),
        ("Fashion-MNIST:TEST", "test"),
        ("FASHIONMNIST:Train", "train"),
        ("  fashion-mnist:test \n", "test"),
    ],
)
def test_fashion_mnist_spellings(data, split):
    arg = G.parse_data(data)
    assert arg == G.DataArg(text=data.strip(), base=data.strip(), count=None, split=split)
    assert G.names_dataset(data.strip())


@pytest.mark.parametrize("data", ["images", "./images", "/abs/images", "~/images", "a/b:c", "mnist:test"])
def test_folders_have_no_split(data):
    arg = G.parse_data(data)
    assert arg.split is None and arg.count is None and arg.base == data
    assert not G.names_dataset(data)


@pytest.mark.parametrize(
    ("data", "base", "count", "split"),
    [
        ("fashion-mnist:train@10000", "fashion-mnist:train", 10000, "train"),
        ("fashion_mnist:TEST@0", "fashion_mnist:TEST", 0, "test"),
        ("images@25", "images", 25, None),
        ("my@folder@3", "my@folder", 3, None),  # only the last "@" counts
        ("/data/x@007", "/data/x", 7, None),
    ],
)
def test_at_n_subsets(data, base, count, split):
    assert G.parse_data(data) == G.DataArg(text=data, base=base, count=count, split=split)


@pytest.mark.parametrize("data", ["images@", "images@ten", "images@-3", "images@1.5", "images@²", "a@b"])
def test_an_at_without_digits_is_part_of_the_folder_name(data):
    arg = G.parse_data(data)
    assert arg.count is None and arg.base == data and arg.split is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "DATA is empty; pass a class folder"),
        ("   ", "DATA is empty"),
        (None, "DATA is empty"),
        ("@5", "DATA is empty"),
        ("fashion-mnist", "say which split: fashion-mnist:train or fashion-mnist:test"),
        ("fashion_mnist@100", "say which split"),
        ("fashion-mnist:val", "unknown Fashion-MNIST split 'val'; pass fashion-mnist:train or"),
        ("fashion-mnist:", "unknown Fashion-MNIST split ''"),
        ("fashion-mnist:test@", "unknown Fashion-MNIST split 'test@'"),
        ("fashion-mnist:test@-1", "unknown Fashion-MNIST split 'test@-1'"),
        ("fashion-mnist:test@²", "unknown Fashion-MNIST split"),  # a DataError, not int()'s ValueError
        ("fashion-mnist:val@10", "unknown Fashion-MNIST split 'val'"),
    ],
)
def test_bad_data_is_one_line_data_error(data, message):
    with pytest.raises(DataError, match=message) as err:
        G.parse_data(data)
    assert "\n" not in str(err.value)


def test_resolve_folder_here_then_under_data_root(tmp_path, monkeypatch):
    here, root = tmp_path / "here", tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "both").mkdir()
    (here / "both").mkdir(parents=True)
    monkeypatch.chdir(here)
    assert G.resolve_folder("images", root) == root / "images"
    assert G.resolve_folder("images", str(root)) == root / "images"
    # A folder that exists in the working directory wins over the one under --data-root.
    assert G.resolve_folder("both", root).resolve() == (here / "both").resolve()
    with pytest.raises(DataError, match="no such folder: images; DATA is a class folder"):
        G.resolve_folder("images", None)


def test_resolve_folder_expands_home_in_data_and_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d" / "images").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "d")
    assert G.resolve_folder("~/d/images", None) == tmp_path / "d" / "images"
    monkeypatch.chdir("/")
    assert G.resolve_folder("images", "~/d") == tmp_path / "d" / "images"


def test_an_absolute_path_is_not_looked_up_under_data_root(tmp_path):
    (tmp_path / "root" / "abs").mkdir(parents=True)
    missing = tmp_path / "abs"
    assert G.resolve_path(str(missing), tmp_path / "root") == missing
    with pytest.raises(DataError, match="no such folder"):
        G.resolve_folder(str(missing), tmp_path / "root")


def test_resolve_path_keeps_a_missing_path(tmp_path):
    assert G.resolve_path("nothing/here", tmp_path) == Path("nothing/here")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("cifar10:train", "unknown dataset 'cifar10:train'; DATA is a class folder"),
        ("imagenet:val@10", "unknown dataset 'imagenet:val@10'"),
        ("no/such:folder", "no such folder: no/such:folder; DATA is"),  # a "/" before ":": a path
        ("missing", "no such folder: missing; DATA is a class folder"),
    ],
)
def test_resolve_folder_errors(tmp_path, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        G.resolve_folder(data, tmp_path)
    assert "\n" not in str(err.value)
    assert G.ACCEPTED_DATA in str(err.value)


def test_resolve_folder_refuses_a_file(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "photo.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"photo.png is a file, not a folder; DATA is a class folder"):
        G.resolve_folder("photo.png", tmp_path / "root")


@pytest.mark.parametrize(("split", "index"), [("train", 0), ("test", 42), ("train", 59999), ("test", 123456)])
def test_dataset_id_round_trip(split, index):
    file = G.dataset_id(split, index)
    assert file.startswith("fashion-mnist:") and G.is_dataset_id(file)
    assert G.parse_dataset_id(file) == (split, index)
    assert dataset_id_ok(file)


def test_dataset_id_spelling():
    assert G.dataset_id("test", 42) == "fashion-mnist:test/00042"
    assert G.parse_dataset_id("FASHION-MNIST:Test/7") == ("test", 7)


@pytest.mark.parametrize(
    "file",
    [
        "fashion-mnist:../../etc/passwd",
        "fashion-mnist:test/../../etc/passwd",
        "fashion-mnist:test/",
        "fashion-mnist:test/42/",
        "fashion-mnist:test/-1",
        "fashion-mnist:test/ 42",
        "fashion-mnist:test/42\n",
        "fashion-mnist:test/4²",
        "fashion-mnist:val/00001",
        "fashion-mnist:test",
        "fashion-mnist:/00001",
    ],
)
def test_malformed_dataset_ids(file):
    assert G.is_dataset_id(file)  # recorded as a dataset item...
    assert G.parse_dataset_id(file) is None  # ...but not one the grammar reads
    assert not dataset_id_ok(file)


@pytest.mark.parametrize("file", ["images/a.png", "fashion_mnist:test/00001", "/x/fashion-mnist:test/1", ""])
def test_paths_are_not_dataset_ids(file):
    assert not G.is_dataset_id(file)
    assert G.parse_dataset_id(file) is None
    assert not dataset_id_ok(file)


def test_grammar_and_retrieval_readers_load_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any "import torch" now fails
        from compress_edge.data import grammar
        from compress_edge.retrieval import safety
        from compress_edge.retrieval.grid import load_item
        assert grammar.parse_data("fashion-mnist:test@5").split == "test"
        assert grammar.parse_dataset_id("fashion-mnist:train/00042") == ("train", 42)
        assert safety.dataset_id_ok("fashion-mnist:test/1")
        assert load_item("fashion-mnist:val/1") is None  # malformed: refused before torch
        assert load_item("fashion-mnist:test/1") is None  # needs torch: a blank tile, no exception
        loaded = [m for m, mod in sys.modules.items() if mod is not None]
        print(json.dumps([m for m in loaded if m.split(".")[0] == "torch" or m.startswith("compress_edge.data")]))
        """
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "compress_edge.data.grammar" in loaded
    assert not [m for m in loaded if m.split(".")[0] == "torch" or m == "compress_edge.data.datasets"], loaded


def test_absolute_data_anchors_a_folder_and_keeps_the_rest(tmp_path, monkeypatch):
    from compress_edge.data.grammar import absolute_data

    (tmp_path / "root" / "pics").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert absolute_data("root/pics@5") == f"{tmp_path / 'root' / 'pics'}@5"
    assert absolute_data("pics", data_root="root") == str(tmp_path / "root" / "pics")  # found under --data-root
    assert absolute_data("fashion-mnist:train@100") == "fashion-mnist:train@100"
    assert absolute_data("gone") == "gone"  # nothing to anchor: left for the error that names it
