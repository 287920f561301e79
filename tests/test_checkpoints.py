"""checkpoints.py: every third-party layout, built here from a random torchvision model with the real
key layout, must give the source model's embeddings; unsafe, damaged and wrong files are refused."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from cli_helpers import randomize_bn
from safetensors.torch import save_file
from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models.formats import detect_format, read_checkpoint
from compress_edge.models.inspection import inspect_checkpoint
from compress_edge.models.layouts import MIN_MATCHED, load_backbone_weights
from compress_edge.models.resolve import create_model, list_models, save_model, spec_for

SIZE = 64  # the smallest side every ImageNet stem takes (AlexNet needs 63 px)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def source_net(arch: str = "resnet18", seed: int = 0) -> nn.Module:
    """A torchvision model with random weights and BN statistics, as a trained one would have."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    randomize_bn(net, seed + 1)
    return net.eval()


def reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The source's embeddings, computed independently of compress-edge: logits layer removed,
    features L2-normalised (dropout is the identity in eval mode)."""
    import copy

    net = copy.deepcopy(net).eval()
    if hasattr(net, "fc"):
        net.fc = nn.Identity()
    else:
        net.classifier[-1] = nn.Identity()
    with torch.no_grad():
        return F.normalize(net(x), dim=1)


def images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def embeds_like(path: Path, net: nn.Module, arch: str = "resnet18", **kwargs):
    """Load ``path`` into a fresh ``arch`` and check it embeds like ``net``; return the report."""
    torch.manual_seed(123)  # another random init than the source's
    model = create_model(arch)
    report = load_backbone_weights(model, path, **kwargs)
    model.eval()
    with torch.no_grad():
        got = model(images())
    assert torch.allclose(got, reference(net, images()), atol=1e-5), report
    return report


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def without_fc(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def mlp_head(prefix: str, dims=(512, 512, 128), bn: bool = False) -> dict:
    """Projection-head tensors as nn.Sequential(Linear, [BN], ReLU, Linear) names them."""
    a, h, d = dims
    out = {f"{prefix}0.weight": torch.randn(h, a), f"{prefix}0.bias": torch.randn(h)}
    last = 2
    if bn:
        out |= {f"{prefix}1.weight": torch.ones(h), f"{prefix}1.bias": torch.zeros(h)}
        out |= {f"{prefix}1.running_mean": torch.zeros(h), f"{prefix}1.running_var": torch.ones(h)}
        out |= {f"{prefix}1.num_batches_tracked": torch.tensor(5)}
        last = 3
    out |= {f"{prefix}{last}.weight": torch.randn(d, h), f"{prefix}{last}.bias": torch.randn(d)}
    return out


def optimizer_state(n: int = 3) -> dict:
    return {
        "state": {i: {"momentum_buffer": torch.randn(4)} for i in range(n)},
        "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": list(range(n))}],
    }


# --- each layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list_models("cnn"))
def test_torchvision_state_dict_loads_and_its_classifier_is_ignored(tmp_path, arch):
    net = source_net(arch)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    report = embeds_like(tmp_path / "tv.pth", net, arch)
    assert report.format == "torchvision" and report.prefix == ""
    assert report.matched == report.total and not report.missing and not report.unexpected
    assert report.ignored and all(k.startswith(("fc.", "classifier.")) for k in report.ignored)


def test_moco_v2(tmp_path):
    # main_moco.py: DDP(MoCo) state dict; encoder_q's fc became the MLP head; encoder_k is the
    # momentum copy (other weights here, so loading it by mistake shows).
    q, k = source_net(seed=0), source_net(seed=10)
    enc_q = without_fc(q.state_dict()) | mlp_head("fc.")
    enc_k = without_fc(k.state_dict()) | mlp_head("fc.")
    state = prefixed(enc_q, "module.encoder_q.") | prefixed(enc_k, "module.encoder_k.")
    state |= {"module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": optimizer_state()}
    torch.save(ckpt, tmp_path / "moco_v2_200ep.pth.tar")
    report = embeds_like(tmp_path / "moco_v2_200ep.pth.tar", q)
    assert report.format == "moco" and report.prefix == "module.encoder_q."
    assert report.container == "state_dict" and report.arch_hint == "resnet18"
    assert "module.encoder_q.fc.0.weight" in report.ignored and "module.queue" in report.ignored


def test_moco_v3(tmp_path):
    # moco-v3 main_moco.py: base_encoder's fc is the projector (Linear-BN-ReLU-Linear...), beside the
    # momentum encoder and the predictor.
    base, momentum = source_net(seed=0), source_net(seed=20)
    base_sd = without_fc(base.state_dict()) | mlp_head("fc.", (512, 64, 32), bn=True)
    mom_sd = without_fc(momentum.state_dict()) | mlp_head("fc.", (512, 64, 32), bn=True)
    state = prefixed(base_sd, "module.base_encoder.") | prefixed(mom_sd, "module.momentum_encoder.")
    state |= mlp_head("module.predictor.", (32, 64, 32), bn=True)
    ckpt = {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": optimizer_state()}
    ckpt["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10}
    torch.save(ckpt, tmp_path / "mocov3.pth.tar")
    report = embeds_like(tmp_path / "mocov3.pth.tar", base)
    assert report.format == "moco-v3" and report.prefix == "module.base_encoder."
    assert any(k.startswith("module.momentum_encoder.") for k in report.ignored)
    assert any(k.startswith("module.predictor.") for k in report.ignored)


@pytest.mark.parametrize("layout", ["simclr-converter", "spijkervet", "sthalles"])
def test_simclr(tmp_path, layout):
    net = source_net()
    sd = net.state_dict()
    if layout == "simclr-converter":  # convert.py: torch.save({'state_dict': model.state_dict()})
        ckpt = {"state_dict": sd}
    elif layout == "spijkervet":  # SimCLR(encoder with fc=Identity, projector) state dict
        ckpt = prefixed(without_fc(sd), "encoder.") | mlp_head("projector.", (512, 512, 64))
    else:  # ResNetSimCLR: backbone with fc = Sequential(Linear, ReLU, Linear)
        state = prefixed(without_fc(sd) | mlp_head("fc.", (512, 512, 128)), "backbone.")
        ckpt = {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": optimizer_state()}
    torch.save(ckpt, tmp_path / "simclr.pth")
    report = embeds_like(tmp_path / "simclr.pth", net)
    assert report.format == "simclr"


@pytest.mark.parametrize("wrapped", [False, True])
def test_swav(tmp_path, wrapped):
    # The hub file is a bare DDP state dict; training checkpoints wrap it in "state_dict".
    net = source_net()
    state = prefixed(without_fc(net.state_dict()), "module.")
    state |= mlp_head("module.projection_head.", (512, 256, 128), bn=True)
    state |= {"module.prototypes.weight": torch.randn(300, 128)}
    ckpt = {"epoch": 800, "state_dict": state, "optimizer": optimizer_state()} if wrapped else state
    torch.save(ckpt, tmp_path / "swav.pth.tar")
    report = embeds_like(tmp_path / "swav.pth.tar", net)
    assert report.format == "swav" and report.prefix == "module."
    assert "module.prototypes.weight" in report.ignored


def _dino(tmp_path: Path) -> tuple[Path, nn.Module, nn.Module]:
    teacher, student = source_net(seed=0), source_net(seed=30)
    head = {"head.mlp.0.weight": torch.randn(64, 512), "head.last_layer.weight_g": torch.ones(256, 1)}
    head["head.last_layer.weight_v"] = torch.randn(256, 64)
    ckpt = {
        # main_dino.py: the teacher is saved without DDP, the student inside it.
        "teacher": prefixed(without_fc(teacher.state_dict()), "backbone.") | head,
        "student": prefixed(prefixed(without_fc(student.state_dict()), "backbone.") | head, "module."),
        "optimizer": optimizer_state(),
        "epoch": 100,
        "dino_loss": {"center": torch.zeros(1, 256)},
    }
    torch.save(ckpt, tmp_path / "dino.pth")
    return tmp_path / "dino.pth", teacher, student


def test_dino_takes_the_teacher_by_default(tmp_path):
    path, teacher, _ = _dino(tmp_path)
    report = embeds_like(path, teacher)
    assert report.format == "dino" and report.container == "teacher" and report.prefix == "backbone."
    assert "head.mlp.0.weight" in report.ignored


def test_dino_student_on_request(tmp_path):
    path, _, student = _dino(tmp_path)
    report = embeds_like(path, student, key="student")
    assert report.format == "dino" and report.container == "student" and report.prefix == "module.backbone."


@pytest.mark.parametrize("layout", ["lightly-sequential", "model.backbone"])
def test_lightning(tmp_path, layout):
    net = source_net()
    sd = without_fc(net.state_dict())
    if layout == "lightly-sequential":
        # lightly's examples: backbone = nn.Sequential(*list(resnet.children())[:-1])
        seq = nn.Sequential(*list(net.children())[:-1])
        state = prefixed(seq.state_dict(), "backbone.") | mlp_head("projection_head.layers.")
    else:
        state = prefixed(sd, "model.backbone.") | mlp_head("model.head.")
    ckpt = {
        "epoch": 9,
        "global_step": 1000,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [optimizer_state()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.06, "max_epochs": 10},
    }
    torch.save(ckpt, tmp_path / "epoch=9.ckpt")
    report = embeds_like(tmp_path / "epoch=9.ckpt", net)
    assert report.format == "lightning"


def test_compress_edge_model_folder_and_file(tmp_path):
    torch.manual_seed(0)
    student = create_model("resnet18", head="mlp", embed_dim=32)
    randomize_bn(student)
    save_model(student, spec_for(student, image_size=SIZE), tmp_path / "run" / "student")
    for path in (tmp_path / "run", tmp_path / "run" / "student" / "model.safetensors"):
        model = create_model("resnet18")  # no head: only the backbone is taken
        report = load_backbone_weights(model, path)
        assert report.format == "compress-edge" and report.prefix == "backbone."
        assert any(k.startswith("head.") for k in report.ignored)
        with torch.no_grad():
            want = F.normalize(student.eval().forward_features(images()), dim=1)
            assert torch.allclose(model.eval()(images()), want, atol=1e-5)


def test_safetensors_and_legacy_pickle_files(tmp_path):
    net = source_net()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "r18.safetensors")
    torch.save(sd, tmp_path / "r18_legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("r18.safetensors", "r18_legacy.pth"):
        assert embeds_like(tmp_path / name, net).format == "torchvision"


def test_half_precision_checkpoint_loads_into_float32(tmp_path):
    net = source_net()
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, tmp_path / "h.pth"
    )
    model = create_model("resnet18")
    load_backbone_weights(model, tmp_path / "h.pth")
    assert model.backbone.conv1.weight.dtype == torch.float32
    assert torch.allclose(model.backbone.conv1.weight, net.conv1.weight.half().float())


def test_forced_format_and_the_log(tmp_path, caplog):
    net = source_net()
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    with caplog.at_level(logging.DEBUG, logger="compress_edge.models.layouts"):
        report = load_backbone_weights(create_model("resnet18"), tmp_path / "tv.pth", fmt="generic")
    assert report.format == "generic" and report.matched == report.total
    assert f"loaded {report.total}/{report.total} backbone tensors" in caplog.text
    assert "ignored: ['fc.weight', 'fc.bias']" in caplog.text  # the full lists at DEBUG
    with pytest.raises(ModelError, match="unknown checkpoint format 'mocov9'"):
        load_backbone_weights(create_model("resnet18"), tmp_path / "tv.pth", fmt="mocov9")


def test_a_few_missing_tensors_load_with_a_warning_and_many_are_refused(tmp_path, caplog):
    net = source_net()
    sd = net.state_dict()
    few = {k: v for k, v in sd.items() if not k.startswith("layer4.1.bn2.")}  # 4 of 100 tensors
    torch.save(few, tmp_path / "few.pth")
    with caplog.at_level(logging.WARNING):
        report = load_backbone_weights(create_model("resnet18"), tmp_path / "few.pth")
    assert report.matched == report.total - 4 and report.fraction >= MIN_MATCHED
    assert "layer4.1.bn2.weight" in report.missing and "kept at random init" in caplog.text

    many = {k: v for k, v in sd.items() if not k.startswith("layer4.")}
    torch.save(many, tmp_path / "many.pth")
    with pytest.raises(ModelError, match=r"backbone tensors matched.*missing layer4\.0\.conv1\.weight"):
        load_backbone_weights(create_model("resnet18"), tmp_path / "many.pth")


# --- refusals ---------------------------------------------------------------------------------------
class Payload:
    """Unpickling this object would create a file: a stand-in for code run from a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    net = source_net()
    torch.save({"state_dict": net.state_dict(), "payload": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ModelError) as err:
        load_backbone_weights(create_model("resnet18"), tmp_path / "evil.pth")
    message = str(err.value)
    assert "never unpickles code" in message
    assert "weights_only=False" in message and "torch.save({k: v for k, v in sd.items()}" in message
    assert not marker.exists()


def test_dino_training_checkpoint_with_args_is_refused_with_the_conversion(tmp_path):
    # main_dino.py saves its argparse.Namespace beside the weights.
    net = source_net()
    ckpt = {"teacher": prefixed(net.state_dict(), "backbone."), "args": argparse.Namespace(arch="resnet18")}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(ModelError, match=r"holds Python objects \(argparse\.Namespace\)"):
        load_backbone_weights(create_model("resnet18"), tmp_path / "checkpoint.pth")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (b"these are not the weights you are looking for", "is not a checkpoint"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("a tensor", "not a state dict"),
        ("no tensors", "holds no state dict"),
    ],
)
def test_files_that_are_no_checkpoint_are_refused(tmp_path, content, words):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save(source_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "a tensor":
        torch.save(torch.zeros(3), path)
    elif content == "no tensors":
        torch.save({"epoch": 3, "note": "weights went elsewhere"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=words):
        load_backbone_weights(create_model("resnet18"), path)


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone_weights(create_model("resnet18"), tmp_path / "nope.pth")


@pytest.mark.parametrize(
    ("source", "target", "words"),
    [
        (
            "resnet34",
            "resnet18",
            r"unexpected module\.encoder_q\.layer1\.2\..*looks like a resnet34 checkpoint.*--teacher resnet34 --teacher-weights",
        ),
        ("resnet18", "resnet50", r"of another shape.*--teacher resnet18 --teacher-weights"),
        ("mobilenet_v2", "resnet18", r"0/\d+ backbone tensors matched.*--teacher mobilenet_v2 --teacher-weights"),
    ],
)
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, source, target, words):
    torch.save(
        {"state_dict": prefixed(source_net(source).state_dict(), "module.encoder_q.")}, tmp_path / "c.pth"
    )
    model = create_model(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=words) as err:
        load_backbone_weights(model, tmp_path / "c.pth")
    assert "moco format, under 'state_dict'" in str(err.value)
    # Refused before anything was copied.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_imagenet_stem_into_a_small_input_model_is_refused(tmp_path):
    torch.save(source_net().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ModelError, match=r"conv1\.weight: file \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\)"):
        load_backbone_weights(create_model("resnet18", small_input=True), tmp_path / "tv.pth")


def test_an_unknown_key_lists_the_entries(tmp_path):
    path, _, _ = _dino(tmp_path)
    with pytest.raises(ModelError, match="no state dict under 'ema'.*teacher, student"):
        load_backbone_weights(create_model("resnet18"), path, key="ema")


# --- inspection -------------------------------------------------------------------------------------
def test_inspect_guesses_the_architecture(tmp_path):
    torch.save(
        {"epoch": 1, "state_dict": prefixed(source_net("resnet34").state_dict(), "module.")},
        tmp_path / "c.pth",
    )
    info = inspect_checkpoint(tmp_path / "c.pth")
    assert info.arch == "resnet34" and info.arch_source == "guessed" and info.small_input is False
    assert info.report is not None and info.report.fits()
    assert detect_format(read_checkpoint(tmp_path / "c.pth")).container == "state_dict"


def test_inspect_against_a_given_architecture_reports_without_raising(tmp_path):
    torch.save(source_net("resnet34").state_dict(), tmp_path / "c.pth")
    info = inspect_checkpoint(tmp_path / "c.pth", arch="resnet18")
    assert info.arch_source == "given" and not info.report.fits() and info.report.unexpected


def test_inspect_a_compress_edge_model(tmp_path):
    model = create_model("resnet18", small_input=True, head="linear", embed_dim=16)
    written = save_model(model, spec_for(model, image_size=32), tmp_path / "m")
    info = inspect_checkpoint(tmp_path / "m")
    assert info.format == "compress-edge" and info.spec == written and info.weights_verified is True
    assert info.arch == "resnet18" and info.small_input is True and info.report.fits()


@pytest.mark.parametrize("small", [False, True])
def test_a_cifar_style_resnet_checkpoint_gets_its_small_stem(tmp_path, small):
    from compress_edge.models.resolve import resolve_model

    torch.manual_seed(0)
    net = create_model("resnet18", small_input=small).eval()
    randomize_bn(net)
    path = tmp_path / "resnet18.pth"
    torch.save({**net.backbone.state_dict(), "fc.weight": torch.randn(10, 512), "fc.bias": torch.zeros(10)}, path)
    loaded, spec = resolve_model("resnet18", weights=path, image_size=32)
    assert spec.arch_kwargs["small_input"] is small  # read from conv1: 3x3 (CIFAR-style) or 7x7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)
