"""``compress-edge models list|inspect`` through the real app and its error boundary."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import compress_edge.cli.models  # noqa: F401 - registers the "models" group until cli/__init__ does
from compress_edge.cli import app
from compress_edge.models.resolve import create_model, list_models, save_model, spec_for

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def moco_file(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    return path


def test_list_json_has_every_architecture():
    result = invoke("models", "list", "--json", "--image-size", "32")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list_models()
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet18"]["feature_dim"] == 512 and by_name["resnet18"]["feature_map"] == [4, 4]
    assert all(r["small_input"] for r in rows)  # chosen for 32 px images
    assert by_name["resnet50"]["params"] == sum(
        p.numel() for p in create_model("resnet50", small_input=True).parameters()
    )


def test_list_says_when_an_image_is_too_small_for_a_stem():
    result = invoke("models", "list", "--json", "--image-size", "32", "--no-small-input")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["alexnet"]["feature_map"] is None and rows["resnet18"]["feature_map"] == [1, 1]


def test_list_table():
    result = invoke("models", "list")
    assert result.exit_code == 0, result.output
    for name in list_models():
        assert name in result.stdout
    assert "7x7" in result.stdout and "2048" in result.stdout
    # Rendered 80 columns wide (no terminal): every name and figure whole, none cut to an ellipsis.
    assert "303.2 M" in result.stdout and "…" not in result.stdout, result.stdout
    vit_row = next(line for line in result.stdout.splitlines() if "vit_tiny_patch16_224" in line)
    assert "patch 16" in vit_row and "ImageNet" not in vit_row and "small-input" not in vit_row, vit_row


def test_inspect_a_third_party_checkpoint(moco_file):
    result = invoke("models", "inspect", str(moco_file))
    assert result.exit_code == 0, result.output
    assert "moco" in result.stdout and "resnet18" in result.stdout and "guessed" in result.stdout
    assert "100/100 tensors matched" in result.stdout


def test_inspect_json(moco_file):
    result = invoke("models", "inspect", str(moco_file), "--arch", "resnet18", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "moco" and info["arch_source"] == "given" and info["fits"] is True
    assert info["report"]["matched"] == info["report"]["total"] == 100


def test_inspect_a_compress_edge_model(tmp_path):
    model = create_model("mobilenet_v3_small", small_input=True, head="linear", embed_dim=16)
    save_model(model, spec_for(model, image_size=32), tmp_path / "run" / "student")
    result = invoke("models", "inspect", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "compress-edge" in result.stdout and "matches the spec" in result.stdout
    assert '"embed_dim": 16' in result.stdout and '"arch": "mobilenet_v3_small"' in result.stdout


def test_inspect_an_exported_file_shows_its_runtime_precision_and_spec(tmp_path):
    from compress_edge.export.onnx import export_onnx

    from compress_edge.storage import sha256_file

    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    onnx_file = tmp_path / "model.onnx"
    export_onnx(model, spec, onnx_file, exporter="torchscript", simplify=False)
    result = invoke("models", "inspect", str(onnx_file), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["runtime"], info["precision"], info["sha256"]) == ("onnxruntime", "fp32", sha256_file(onnx_file))
    assert info["spec"]["arch"] == "mobilenet_v3_small" and info["spec"]["weights_sha256"] == spec.weights_sha256
    assert "no ONNX file at" in one_error_line(invoke("models", "inspect", str(tmp_path / "gone.onnx")))


def test_inspect_a_tampered_model_fails(tmp_path):
    model = create_model("resnet18", small_input=True)
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["backbone.bn1.bias"] += 1
    save_file(tensors, weights)
    assert "changed or replaced" in one_error_line(invoke("models", "inspect", str(tmp_path / "m")))


def test_inspect_with_the_wrong_arch_fails_and_names_the_right_one(moco_file):
    line = one_error_line(invoke("models", "inspect", str(moco_file), "--arch", "resnet50"))
    assert "do not fit resnet50" in line and "--teacher resnet18 --teacher-weights" in line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["models", "inspect", "no/such/file.pth"], "does not exist"),
        (["models", "inspect", "{moco}", "--arch", "resnet19"], "did you mean resnet18"),
        (["models", "inspect", "{empty}"], "empty"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_1(tmp_path, moco_file, args, words):
    (tmp_path / "empty.pth").write_bytes(b"")
    args = [a.format(moco=moco_file, empty=tmp_path / "empty.pth") for a in args]
    assert words in one_error_line(invoke(*args))


def test_help_texts_give_examples():
    for args in (["models", "--help"], ["models", "list", "--help"], ["models", "inspect", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Example: compress-edge models" in result.stdout
