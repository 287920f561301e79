"""Profiling: FLOPs agree with fvcore's own count and the published figures; parameters, tables,
ratios, and fvcore's unsupported-operator warnings folded into one line."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from compress_edge.eval.profile import (
    FLOPS_NOTE,
    compare,
    count_params,
    profile_model,
    unsupported_summary,
    weight_bytes,
)
from compress_edge.models.resolve import create_model


def _fvcore_total(model, size):
    """fvcore's count through its own entry point, independent of compress_edge.eval.profile."""
    from fvcore.nn import FlopCountAnalysis

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, size, size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torchvision_profiles():
    """(model, our profile, fvcore's own total) of torchvision's resnet50 and mobilenet_v2 at 224 px."""
    out = {}
    for name in ("resnet50", "mobilenet_v2"):
        model = getattr(torchvision.models, name)(weights=None)
        out[name] = (model, profile_model(model, 224, depth=1), _fvcore_total(model, 224))
    return out


@pytest.mark.parametrize(
    ("name", "low", "high", "params"),
    [("resnet50", 4.05e9, 4.15e9, 25_557_032), ("mobilenet_v2", 0.30e9, 0.32e9, 3_504_872)],
)
def test_flops_of_torchvision_models_match_fvcore_and_the_published_counts(torchvision_profiles, name, low, high,
                                                                           params):
    model, prof, fvcore_own = torchvision_profiles[name]
    assert prof.flops == fvcore_own
    assert low <= prof.flops <= high  # ResNet-50 4.1 G, MobileNetV2 0.3 G multiply-adds at 224 px
    assert prof.params == params == sum(p.numel() for p in model.parameters())
    assert prof.weight_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_the_registry_backbone_costs_the_torchvision_model_minus_its_classifier(torchvision_profiles):
    _, tv, _ = torchvision_profiles["mobilenet_v2"]
    ours = profile_model(create_model("mobilenet_v2"), 224)
    assert tv.flops - ours.flops == 1280 * 1000  # the removed Linear(1280, 1000): one FLOP per multiply-add
    assert tv.params - ours.params == 1280 * 1000 + 1000
    assert ours.embed_dim == 1280 and ours.arch == "mobilenet_v2"
    assert tv.embed_dim == 1000  # a plain module: the dimension of its output


def test_per_module_rows_respect_the_depth_and_add_up(torchvision_profiles):
    _, prof, _ = torchvision_profiles["resnet50"]
    assert {r.depth for r in prof.modules} == {1}
    names = [r.name for r in prof.modules]
    assert "layer3" in names and "fc" in names
    assert sum(r.flops for r in prof.modules) == prof.flops
    assert sum(r.params for r in prof.modules) == prof.params

    deep = profile_model(create_model("resnet18", small_input=True), 32, depth=2)
    assert max(r.depth for r in deep.modules) == 2
    top = [r for r in deep.modules if r.depth == 1]  # an EmbeddingModel counts depth from its network's layers
    assert [r.name for r in top][:2] == ["backbone.conv1", "backbone.bn1"]
    assert sum(r.flops for r in top) == deep.flops
    assert profile_model(create_model("resnet18"), 64, depth=0).modules == []


def test_unsupported_operators_become_one_line_not_one_warning_each(caplog):
    model = create_model("mobilenet_v3_small", small_input=True)
    with caplog.at_level(logging.DEBUG, logger="fvcore"):
        prof = profile_model(model, 32)
    assert not [r for r in caplog.records if r.name.startswith("fvcore")]
    assert prof.unsupported["aten::hardswish_"] > 1
    line = unsupported_summary(prof, prof)
    assert "\n" not in line and f"aten::hardswish_ x{2 * prof.unsupported['aten::hardswish_']}" in line
    assert unsupported_summary() is None


def test_ratios_and_helpers():
    teacher = profile_model(create_model("resnet18", small_input=True), 32, depth=0)
    student = profile_model(create_model("mobilenet_v3_small", small_input=True), 32, depth=0)
    ratios = compare(teacher, student)
    assert ratios["flops_ratio"] == pytest.approx(teacher.flops / student.flops, rel=1e-3)
    assert ratios["flops_ratio"] > 10 and ratios["params_ratio"] > 5
    assert (ratios["teacher_embed_dim"], ratios["student_embed_dim"]) == (512, 1024)
    assert ratios["file_bytes_ratio"] is None
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert count_params(net) == {"": 24, "0": 16, "1": 8}
    assert weight_bytes(net) == 24 * 4 + 8 * 4 + 8  # running mean/var float32, num_batches_tracked int64
    assert "one multiply-add as one FLOP" in FLOPS_NOTE and teacher.to_dict()["flops_note"] == FLOPS_NOTE
