"""The README's promises, checked: its extras table against pyproject.toml, and its troubleshooting
table against what the commands print (each row triggered here, its message looked for)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli_without
from typer.testing import CliRunner

from compress_edge.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
runner = CliRunner()
WIDE = {"COLUMNS": "400", "NO_COLOR": "1"}


def _table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after ``heading``, header and rule left out."""
    section = README[README.index(heading):]
    lines = [line for line in section.splitlines()[1:] if line.startswith("|") or not line.strip()]
    rows, started = [], False
    for line in lines:
        if not line.strip():
            if started:
                break
            continue
        started = True
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows[2:]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# --------------------------------------------------------------------------------------------------
# Extras
# --------------------------------------------------------------------------------------------------
def test_the_extras_table_matches_pyproject():
    extras = _pyproject()["optional-dependencies"]
    rows = {extra.strip("`"): what for extra, what in _table("### Extras")}
    assert set(rows) == set(extras), "extras in the README vs pyproject.toml"
    for extra, what in rows.items():
        named = {n.lower() for n in re.findall(r"`([^`]+)`", what) if not n.startswith("-")}
        assert named == _requirement_names(extras[extra]), f"README row of [{extra}] vs pyproject.toml"


def test_the_device_install_line_lists_the_device_extra():
    line = next(line for line in README.splitlines() if "the [device] extra's list" in line)
    listed = set(line.split("#")[0].split()[2:])  # after 'pip install'
    assert listed == _requirement_names(_pyproject()["optional-dependencies"]["device"])


# --------------------------------------------------------------------------------------------------
# Troubleshooting: every row is triggered and its message found
# --------------------------------------------------------------------------------------------------
PLACEHOLDERS = ("N", "E", "S", "X", "Y", "DIR", "FILE", "ARCH", "MODULE")


def _pattern(fragment: str) -> re.Pattern:
    """A README message as a regex: '...' any text, a capitalised placeholder one word."""
    out = ""
    for part in re.split(r"(\s*\.\.\.\s*|\b(?:" + "|".join(PLACEHOLDERS) + r")\b)", fragment.strip()):
        out += ".*?" if part.strip() == "..." else r"\S+" if part in PLACEHOLDERS else re.escape(part)
    return re.compile(out)


def _rows() -> list[tuple[list[str], str]]:
    rows = _table("### Errors you may meet")
    return [(re.findall(r"`([^`]+)`", message), fix) for message, fix in rows]


def _invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env=WIDE)
    return result.exit_code, result.output


def _teacher(folder: Path, image_size: int = 24, seed: int = 0) -> Path:
    import torch

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", small_input=True)
    save_model(model, spec_for(model, image_size=image_size, source={"kind": "test"}), folder)
    return folder


def _fake_engine(tmp: Path, module: str, version: str) -> Path:
    from compress_edge.models.resolve import create_model, spec_for

    engine = tmp / "model.engine"
    engine.write_bytes(bytes(64))
    spec = spec_for(create_model("mobilenet_v3_small", small_input=True), image_size=24, source={"kind": "test"})
    Path(f"{engine}.json").write_text(json.dumps({"spec": spec.to_dict(),
                                                  "tensorrt": {"module": module, "version": version}}))
    return engine




def _fmnist_missing(tmp, images, monkeypatch):
    import compress_edge.data.fashion_mnist as data

    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())
    monkeypatch.delenv("COMPRESS_EDGE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    monkeypatch.chdir(tmp)
    return [_invoke("data", "info", "fashion-mnist:train", "--data-root", tmp / "empty")]


def _unreadable(tmp, images, monkeypatch):
    broken = tmp / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png"):
        (broken / name).write_text("not an image")
    mixed = tmp / "mixed"
    mixed.mkdir()
    for name in ("a.jpg", "b.png"):
        (mixed / name).write_text("not an image")
    (mixed / "c.png").write_bytes(next(images.rglob("*.png")).read_bytes())
    return [_invoke("data", "info", broken), _invoke("data", "info", mixed)]


def _random_teacher(tmp, images, monkeypatch):
    return [_invoke("distill", images, "--teacher", teacher, "--out", tmp / "run", "--workers", "0")
            for teacher in ("resnet50", "runs/teacher", "resnet81")]


def _weights_do_not_fit(tmp, images, monkeypatch):
    import torch
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}, tmp / "moco.pth")
    return [_invoke("distill", images, "--teacher", "mobilenet_v2", "--teacher-weights", tmp / "moco.pth",
                    "--out", tmp / "run", "--workers", "0")]


class Pickled:  # an object a checkpoint should not hold
    pass


def _pickled(tmp, images, monkeypatch):
    import torch

    torch.save({"model": Pickled()}, tmp / "trained.pth")
    return [_invoke("models", "inspect", tmp / "trained.pth")]


def _teacher_cache(tmp, images, monkeypatch):
    teacher = _teacher(tmp / "teacher")
    made = _invoke("cache-teacher", images, "--teacher", teacher, "--out", tmp / "cache", "--workers", "0",
                   "--no-progress", "--batch-size", "8")
    assert made[0] == 0, made[1]
    fewer = tmp / "fewer"
    for path in sorted(images.rglob("*.png"))[:12]:
        (fewer / path.parent.name).mkdir(parents=True, exist_ok=True)
        (fewer / path.parent.name / path.name).write_bytes(path.read_bytes())
    return [_invoke("distill", images, "--teacher-cache", tmp / "cache", "--image-size", "32", "--out", tmp / "r1",
                    "--workers", "0", "--no-progress"),
            _invoke("distill", fewer, "--teacher-cache", tmp / "cache", "--out", tmp / "r2", "--workers", "0",
                    "--no-progress"),
            _invoke("distill", images, "--teacher-cache", tmp / "cache", "--teacher", _teacher(tmp / "other", seed=1),
                    "--out", tmp / "r3", "--workers", "0", "--no-progress")]


def _run_exists(tmp, images, monkeypatch):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    return [_invoke("distill", images, "--teacher", _teacher(tmp / "teacher"), "--out", tmp / "run",
                    "--workers", "0")]


def _nan_loss(tmp, images, monkeypatch):
    return [_invoke("pretrain", images, "--arch", "mobilenet_v3_small", "--image-size", "32", "--batch-size", "6",
                    "--epochs", "2", "--lr", "1e30", "--holdout", "0", "--workers", "0", "--no-progress",
                    "--out", tmp / "run")]


def _small_dataset(tmp, images, monkeypatch):
    return [_invoke("pretrain", images, "--arch", "mobilenet_v3_small", "--image-size", "32", "--batch-size", "64",
                    "--workers", "0", "--no-progress", "--out", tmp / "run")]


def _different_model(tmp, images, monkeypatch):
    built = _invoke("index", "build", _teacher(tmp / "a"), images, "--out", tmp / "index", "--no-progress",
                    "--queries", "4")
    assert built[0] == 0, built[1]
    query = next(images.rglob("*.png"))
    return [_invoke("search", tmp / "index", query, "--model", _teacher(tmp / "b", image_size=32, seed=1))]


def _engine_version(tmp, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="99.0"))  # what is installed
    return [_invoke("bench", _fake_engine(tmp, "tensorrt", "10.0"))]


def _not_installed(tmp, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # 'import tensorrt' fails as on a machine without it
    engine = _invoke("bench", _fake_engine(tmp, "tensorrt", "10.0"))
    without_torch = cli_without("torch,torchvision", "models", "list")
    assert "Traceback" not in without_torch.stderr
    return [engine, (without_torch.returncode, without_torch.stderr)]


def _onnx(tmp: Path, size: int = 32) -> Path:
    """A random mobilenet_v3_small exported to ``tmp/model.onnx`` (ModelSpec in its metadata)."""
    import torch
    from compress_edge.export.onnx import export_onnx

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(2)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = save_model(model, spec_for(model, image_size=size, source={"kind": "test"}), tmp / "student")
    export_onnx(model, spec, tmp / "model.onnx", exporter="torchscript", simplify=False)
    return tmp / "model.onnx"


def _change_weights(onnx_file: Path, how) -> Path:
    """``onnx_file`` with its largest float initializer passed through ``how`` (still parses, metadata kept)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_file))
    init = max((i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
               key=lambda i: int(np.prod(i.dims)))
    init.CopyFrom(numpy_helper.from_array(how(numpy_helper.to_array(init).copy()).astype(np.float32), init.name))
    onnx.save(m, str(onnx_file))
    return onnx_file


def _built_index(tmp: Path, images: Path, model) -> Path:
    built = _invoke("index", "build", model, images, "--out", tmp / "index", "--no-progress")
    assert built[0] == 0, built[1]
    return tmp / "index"


def _edit_sidecar(index: Path, change) -> None:
    meta = json.loads((index / "index.json").read_text())
    change(meta)
    (index / "index.json").write_text(json.dumps(meta))


def _no_weights_hash(tmp, images, monkeypatch):
    index = _built_index(tmp, images, _teacher(tmp / "model"))
    _edit_sidecar(index, lambda meta: meta["spec"].update(weights_sha256=None))
    query = next(images.rglob("*.png"))
    return [_invoke("search", index, query), _invoke("search", index, query, "--trust-model")]


def _tampered_model(tmp, images, monkeypatch):
    onnx_file = _onnx(tmp)
    index = _built_index(tmp, images, onnx_file)
    _change_weights(onnx_file, lambda a: a * 1.05)
    return [_invoke("search", index, next(images.rglob("*.png")))]


def _nan_embeddings(tmp, images, monkeypatch):
    nan = _change_weights(_onnx(tmp), lambda a: np.full_like(a, np.nan))
    return [_invoke("index", "build", nan, images, "--out", tmp / "index", "--no-progress")]


def _damaged_sidecar(tmp, images, monkeypatch):
    index = _built_index(tmp, images, _teacher(tmp / "model"))
    _edit_sidecar(index, lambda meta: meta.update(labels=[99] + meta["labels"][1:]))
    return [_invoke("search", index, next(images.rglob("*.png")))]


_HOLD_LOCK = ("import sys, time\n"
              "from compress_edge.storage import folder_lock\n"
              "with folder_lock(sys.argv[1], what='pretrain'):\n"
              "    print('held', flush=True)\n"
              "    time.sleep(300)\n")


def _folder_in_use(tmp, images, monkeypatch):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp / "run")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "held"
        return [_invoke("pretrain", images, "--arch", "mobilenet_v3_small", "--image-size", "32", "--batch-size", "6",
                        "--epochs", "1", "--workers", "0", "--no-progress", "--out", tmp / "run")]
    finally:
        holder.kill()
        holder.wait()


#: The first words of a row's message -> what makes a command print it.
TRIGGERS = {
    "Fashion-MNIST (train split) not found": _fmnist_missing,
    "none of the N image files": _unreadable,
    "--teacher resnet50 is an architecture without weights": _random_teacher,
    "the weights in FILE do not fit": _weights_do_not_fit,
    "FILE holds Python objects": _pickled,
    "the teacher cache DIR was made": _teacher_cache,
    "DIR already holds a run": _run_exists,
    "the loss became nan": _nan_loss,
    "the dataset has N images": _small_dataset,
    "the index DIR was made with a different model": _different_model,
    "the index DIR cannot be checked": _no_weights_hash,
    "FILE was changed since": _tampered_model,
    "the model FILE gives non-finite embeddings": _nan_embeddings,
    "DIR/index.json is damaged": _damaged_sidecar,
    "DIR is in use by another process": _folder_in_use,
    "FILE was built by MODULE X": _engine_version,
    "the package 'torch' this command needs": _not_installed,
}


def test_every_troubleshooting_row_has_a_trigger():
    firsts = [fragments[0] for fragments, _ in _rows()]
    assert all(any(f.startswith(key) for f in firsts) for key in TRIGGERS), "a trigger whose row is gone"
    assert all(any(f.startswith(key) for key in TRIGGERS) for f in firsts), "a row without a trigger"


@pytest.mark.parametrize("key", list(TRIGGERS))
def test_troubleshooting_row_matches_what_the_command_prints(key, tmp_path, make_images, monkeypatch):
    fragments = next(fr for fr, _ in _rows() if fr[0].startswith(key))
    images = make_images(tmp_path / "images", per_class=6)
    results = TRIGGERS[key](tmp_path, images, monkeypatch)
    assert any(code == 1 for code, _ in results), results
    for code, output in results:
        assert "Traceback" not in output and "internal error" not in output, output
        if code != 0:
            assert code == 1, output
            errors = [line for line in output.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, output
    printed = " ".join(" ".join(output.split()) for _, output in results)
    for fragment in fragments:
        assert _pattern(fragment).search(printed), f"README says {fragment!r}; the command printed:\n{printed}"


def test_the_row_patterns():
    assert _pattern("the loss became nan at epoch E, step S").search("the loss became nan at epoch 1, step 2; try")
    assert not _pattern("the loss became nan at epoch E, step S").search("the loss became inf at epoch 1, step 2")
    assert _pattern("Fashion-MNIST (train split) not found in ...").search("Fashion-MNIST (train split) not found in /x")
