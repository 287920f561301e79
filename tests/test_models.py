"""models.py: the registry, EmbeddingModel, model files and MODEL arguments (CPU, tiny inputs)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from cli_helpers import randomize_bn
from safetensors.torch import load_file, save_file
from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models.resolve import (
    EmbeddingModel,
    create_model,
    describe_model,
    feature_map_size,
    list_models,
    load_model,
    rebuild,
    resolve_model,
    save_model,
    spec_for,
)
from compress_edge.models.spec import SPEC_FILENAME, WEIGHTS_FILENAME, ModelSpec
from compress_edge.storage import sha256_file

ARCHS = list_models("cnn")  # the torchvision CNNs; the ViTs are tested in test_vit.py
PROMISED = {
    "alexnet",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(size: int = 32, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- registry ---------------------------------------------------------------------------------------
def test_registry_holds_the_promised_architectures():
    assert set(ARCHS) == PROMISED


@pytest.mark.parametrize("arch", ARCHS)
def test_small_input_variant_embeds_32px_images(arch):
    torch.manual_seed(0)
    model = create_model(arch, small_input=True).eval()
    with torch.no_grad():
        z = model(images(32))
        assert z.shape == (2, model.feature_dim) == (2, model.embed_dim)
        assert torch.isfinite(z).all()
        # Batch statistics: with untouched running statistics a random mobilenet's eval-mode
        # features are ~1e-12 long, below what normalisation can tell from zero.
        z = model.train()(images(32))
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    # "A sensible spatial map": more than one position is left of a 32 px image before pooling.
    h, w = feature_map_size(model, 32)
    assert h >= 2 and w >= 2


@pytest.mark.parametrize("arch", ARCHS)
def test_imagenet_stem_embeds_224px_images(arch):
    torch.manual_seed(0)
    model = create_model(arch).eval()
    with torch.no_grad():
        z = model(images(224))
    assert z.shape == (2, model.feature_dim)
    assert torch.isfinite(z).all()
    assert feature_map_size(model, 224) == (7, 7) or arch == "alexnet"


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_keeps_torchvision_names_and_shapes(arch):
    # On the meta device: key names and shapes without the memory or the init time.
    with torch.device("meta"):
        tv = getattr(torchvision.models, arch)(weights=None)
        model = create_model(arch)
    tv_sd = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
    assert set(ours) <= set(tv_sd)
    assert all(tv_sd[k] == shape for k, shape in ours.items())
    # What torchvision has beyond the backbone is only its ImageNet classifier.
    extra = set(tv_sd) - set(ours)
    assert extra and all(k.startswith(("fc.", "classifier.")) for k in extra)


@pytest.mark.parametrize(("head", "dim"), [(None, 512), ("linear", 64), ("mlp", 128)])
def test_heads_project_to_embed_dim(head, dim):
    torch.manual_seed(0)
    model = create_model("resnet18", small_input=True, head=head, embed_dim=64 if head == "linear" else None)
    assert model.embed_dim == dim and model.feature_dim == 512
    model.train()  # the MLP head's BatchNorm1d must work on a training batch of 2
    z = model(images(32))
    assert z.shape == (2, dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    feats = model.forward_features(images(32))
    assert feats.shape == (2, 512)


def test_mlp_head_is_linear_bn_relu_linear():
    model = create_model("resnet18", small_input=True, head="mlp", embed_dim=32)
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.head[0].in_features == 512 and model.head[-1].out_features == 32


def test_normalize_false_keeps_raw_features():
    torch.manual_seed(0)
    model = create_model("resnet18", small_input=True, normalize=False).eval()
    with torch.no_grad():
        z = model(images(32))
        feats = model.forward_features(images(32))
    assert torch.equal(z, feats)
    assert not torch.allclose(z.norm(dim=1), torch.ones(2))


def test_arch_kwargs_rebuild_the_same_model():
    model = create_model("mobilenet_v2", small_input=True, head="mlp", embed_dim=64, width_mult=0.5)
    assert model.arch_kwargs == {"small_input": True, "head": "mlp", "embed_dim": 64, "width_mult": 0.5}
    kwargs = json.loads(json.dumps(model.arch_kwargs))  # as a spec stores them
    again = rebuild(model.arch, kwargs)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    # width_mult is honoured, and an int records the same model as the float.
    full = create_model("mobilenet_v2", width_mult=1)
    assert full.arch_kwargs["width_mult"] == 1.0 and isinstance(full.arch_kwargs["width_mult"], float)
    assert sum(p.numel() for p in again.backbone.parameters()) < sum(
        p.numel() for p in full.backbone.parameters()
    )


def test_unknown_arch_lists_the_names_and_a_close_match():
    with pytest.raises(ModelError) as err:
        create_model("resnet19")
    message = str(err.value)
    assert "did you mean resnet18" in message
    assert all(name in message for name in ARCHS)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"width_mult": 0.5}, "does not take width_mult"),
        ({"head": "transformer"}, "unknown head"),
        ({"embed_dim": 64}, "needs a projection head"),
        ({"embed_dim": -3, "head": "linear"}, "must be positive"),
    ],
)
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(ModelError, match=words):
        create_model("resnet18", **kwargs)


def test_describe_model_counts_parameters_without_building_weights():
    info = describe_model("resnet18", image_size=32)
    assert info.small_input is True  # chosen from the image size
    assert info.params == sum(p.numel() for p in create_model("resnet18", small_input=True).parameters())
    assert info.feature_dim == 512 and info.feature_map == (4, 4)
    assert describe_model("alexnet", image_size=32, small_input=False).feature_map is None


# --- specs and model files --------------------------------------------------------------------------
def test_spec_for_describes_the_model():
    model = create_model("resnet18", small_input=True, head="linear", embed_dim=32)
    spec = spec_for(model, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, source={"kind": "test"})
    assert spec.arch == "resnet18" and spec.embed_dim == 32 and spec.image_size == 32
    assert spec.arch_kwargs == model.arch_kwargs and spec.normalize is True
    assert spec.mean == (0.5, 0.5, 0.5) and spec.source == {"kind": "test"}


def test_spec_for_refuses_an_image_size_the_architecture_cannot_take():
    with pytest.raises(ModelError, match="small_input=True"):
        spec_for(create_model("alexnet"), image_size=32)


def _trained_like(arch: str = "resnet18", **kwargs) -> EmbeddingModel:
    torch.manual_seed(0)
    model = create_model(arch, small_input=True, **kwargs)
    randomize_bn(model)
    return model.eval()


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("resnet18", {"head": "mlp", "embed_dim": 32}),
        ("mobilenet_v2", {"head": "linear", "embed_dim": 16, "width_mult": 0.5}),
        ("efficientnet_b0", {"normalize": False}),
    ],
)
def test_save_load_round_trip_gives_identical_embeddings(tmp_path, arch, kwargs):
    model = _trained_like(arch, **kwargs)
    spec = spec_for(model, image_size=32, source={"kind": "test"})
    written = save_model(model, spec, tmp_path / "m")
    # Only the two files: the atomic writes left no temporary behind.
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [SPEC_FILENAME, WEIGHTS_FILENAME]
    assert written.weights_sha256 == sha256_file(tmp_path / "m" / WEIGHTS_FILENAME)
    assert ModelSpec.load(tmp_path / "m") == written

    loaded, loaded_spec = load_model(tmp_path / "m")
    assert loaded_spec == written
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images(32)), model(images(32)))


def test_load_model_accepts_each_file_and_a_run_folder(tmp_path):
    model = _trained_like()
    written = save_model(model, spec_for(model, image_size=32), tmp_path / "run" / "student")
    folder = tmp_path / "run" / "student"
    for ref in (tmp_path / "run", folder, folder / WEIGHTS_FILENAME, folder / SPEC_FILENAME):
        loaded, spec = load_model(ref)
        assert spec == written
        with torch.no_grad():
            assert torch.equal(loaded(images(32)), model(images(32)))


def test_a_lone_weights_file_carries_its_spec(tmp_path):
    model = _trained_like()
    written = save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    lone = tmp_path / "elsewhere" / "copy.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "m" / WEIGHTS_FILENAME).read_bytes())
    loaded, spec = load_model(lone)
    assert spec == written.replace(weights_sha256=None)
    with torch.no_grad():
        assert torch.equal(loaded(images(32)), model(images(32)))


def test_tampered_weights_are_refused(tmp_path):
    model = _trained_like()
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILENAME
    tensors = load_file(weights)
    tensors["backbone.conv1.weight"] = tensors["backbone.conv1.weight"] + 1  # a valid file, other weights
    save_file(tensors, weights)
    with pytest.raises(ModelError, match="changed or replaced"):
        load_model(tmp_path / "m")


def _rewrite_spec(folder: Path, **changes) -> None:
    data = json.loads((folder / SPEC_FILENAME).read_text())
    data.update(changes)
    (folder / SPEC_FILENAME).write_text(json.dumps(data))


def test_spec_whose_embed_dim_disagrees_is_refused(tmp_path):
    model = _trained_like(head="linear", embed_dim=32)
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    _rewrite_spec(tmp_path / "m", embed_dim=64)
    with pytest.raises(ModelError, match="embed_dim=64"):
        load_model(tmp_path / "m")


def test_spec_of_another_architecture_is_refused(tmp_path):
    model = _trained_like()
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    spec = json.loads((tmp_path / "m" / SPEC_FILENAME).read_text())
    _rewrite_spec(tmp_path / "m", arch_kwargs={**spec["arch_kwargs"], "small_input": False})
    with pytest.raises(ModelError, match=r"of another shape.*conv1\.weight"):
        load_model(tmp_path / "m")


def test_weights_missing_a_tensor_are_refused_even_with_a_matching_hash(tmp_path):
    model = _trained_like()
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILENAME
    tensors = load_file(weights)
    del tensors["backbone.layer4.1.bn2.running_var"]
    save_file(tensors, weights)
    _rewrite_spec(tmp_path / "m", weights_sha256=sha256_file(weights))
    with pytest.raises(ModelError, match=r"1 missing \(backbone\.layer4\.1\.bn2\.running_var\)"):
        load_model(tmp_path / "m")


def test_save_model_refuses_a_spec_of_another_model(tmp_path):
    spec = spec_for(create_model("resnet18", small_input=True), image_size=32)
    with pytest.raises(ModelError, match="does not describe this model"):
        save_model(create_model("resnet34", small_input=True), spec, tmp_path / "m")
    assert not (tmp_path / "m" / WEIGHTS_FILENAME).exists()


@pytest.mark.parametrize("name", ["missing", "empty-folder", "notes.txt", "broken.safetensors"])
def test_load_model_says_what_it_needs(tmp_path, name):
    path = tmp_path / name
    if name == "empty-folder":
        path.mkdir()
    elif name != "missing":
        path.write_text("not a model")
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert str(path) in str(err.value)


# --- resolve_model ----------------------------------------------------------------------------------
def test_resolve_model_loads_a_folder(tmp_path):
    model = _trained_like()
    written = save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    loaded, spec = resolve_model(str(tmp_path / "m"))
    assert spec == written
    with torch.no_grad():
        assert torch.equal(loaded(images(32)), model(images(32)))


def test_resolve_model_overrides_the_image_size_with_a_warning(tmp_path, caplog):
    model = _trained_like()
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    _, spec = resolve_model(str(tmp_path / "m"), image_size=48)
    assert spec.image_size == 48
    assert "made for 32px" in caplog.text


def test_resolve_model_builds_an_architecture_name():
    model, spec = resolve_model("resnet18", image_size=32)
    assert model.arch_kwargs["small_input"] is True  # small images get the small-input stem
    assert spec.image_size == 32 and spec.source == {"kind": "random-init"}
    assert not model.training
    model, spec = resolve_model("mobilenet_v3_small")
    assert spec.image_size == 224 and model.arch_kwargs["small_input"] is False


def test_resolve_model_loads_third_party_weights_into_a_name(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    randomize_bn(net)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model, spec = resolve_model("resnet18", weights=str(tmp_path / "r18.pth"), image_size=64)
    # A pretrained checkpoint has the ImageNet stem, whatever the image size.
    assert model.arch_kwargs["small_input"] is False
    assert spec.source["kind"] == "checkpoint" and spec.source["format"] == "torchvision"
    net.eval().fc = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model(images(64)), F.normalize(net(images(64)), dim=1), atol=1e-5)


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("resnet19", "did you mean resnet18"),
        ("./no/such/model", "no such file or folder"),
        ("weights.pth", "no such file or folder"),
    ],
)
def test_resolve_model_says_which_forms_it_accepts(ref, words):
    with pytest.raises(ModelError) as err:
        resolve_model(ref)
    message = str(err.value)
    assert words in message
    assert "model folder" in message and "architecture name" in message and "resnet50" in message


def test_resolve_model_refuses_weights_for_a_saved_model(tmp_path):
    model = _trained_like()
    save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    with pytest.raises(ModelError, match="--weights goes with an architecture name"):
        resolve_model(str(tmp_path / "m"), weights="other.pth")


def test_library_never_unpickles_without_weights_only():
    # Every torch.load call in the model layer passes weights_only=True (found in the syntax tree,
    # so the conversion recipe quoted in an error message does not count).
    root = Path(__file__).resolve().parents[1] / "compress_edge"
    calls = 0
    for name in sorted(p.name for p in (root / "models").glob("*.py")):
        name = f"models/{name}"
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant), name
                assert flags["weights_only"].value is True, name
    assert calls >= 1


def test_resolve_model_points_a_third_party_file_to_weights(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match=r"architecture name as MODEL and the file as --weights r18\.pth"):
        resolve_model(str(tmp_path / "r18.pth"))
