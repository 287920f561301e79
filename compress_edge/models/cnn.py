"""The torchvision CNN backbones, registered by name. Each keeps torchvision's module names (so
torchvision state dicts load into ``model.backbone`` unchanged); only the stem changes for small inputs.
Builders never download weights."""

from __future__ import annotations

from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models.backbone import Backbone, register_model


def _tv():
    import torchvision.models as tvm

    return tvm


def _resnet(fn_name: str, small_input: bool) -> Backbone:
    net = getattr(_tv(), fn_name)(weights=None)
    if small_input:
        # CIFAR-style stem: the 7x7/2 conv and the max-pool would shrink 32 px to 8 px before layer1.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return Backbone(net, dim, "layer4")


@register_model("resnet18")
def resnet18(*, small_input: bool = False) -> Backbone:
    """ResNet-18 (11.2 M parameters, 512-d features)."""
    return _resnet("resnet18", small_input)


@register_model("resnet34")
def resnet34(*, small_input: bool = False) -> Backbone:
    """ResNet-34 (21.3 M parameters, 512-d features)."""
    return _resnet("resnet34", small_input)


@register_model("resnet50")
def resnet50(*, small_input: bool = False) -> Backbone:
    """ResNet-50 (23.5 M parameters, 2048-d features): the usual self-supervised teacher."""
    return _resnet("resnet50", small_input)


def _stride1_first_conv(features: nn.Sequential) -> None:
    """Stride 1 in the first conv of a torchvision Conv2dNormActivation stem (mobilenets, efficientnet)."""
    conv = features[0][0]
    conv.stride = (1, 1)


@register_model("alexnet")
def alexnet(*, small_input: bool = False) -> Backbone:
    """AlexNet (57 M parameters, 4096-d fc7 features), the CompRess small student of the paper."""
    net = _tv().alexnet(weights=None)
    if small_input:
        # 11x11/4 would leave 7 px of a 32 px image and the three max-pools nothing at all.
        net.features[0] = nn.Conv2d(3, 64, kernel_size=5, stride=1, padding=2)
    dim = net.classifier[6].in_features
    # fc7 (after its ReLU) is the feature; the dropouts before fc6/fc7 are AlexNet's own, kept as is.
    net.classifier[6] = nn.Identity()
    return Backbone(net, dim, "features")


@register_model("mobilenet_v2")
def mobilenet_v2(*, small_input: bool = False, width_mult: float = 1.0) -> Backbone:
    """MobileNetV2 (2.2 M parameters at width 1.0, 1280-d features); width_mult scales the channels."""
    width_mult = float(width_mult)
    if not width_mult > 0:
        raise ModelError(f"width_mult must be positive, got {width_mult}")
    net = _tv().mobilenet_v2(weights=None, width_mult=width_mult)
    if small_input:
        _stride1_first_conv(net.features)
    dim = net.classifier[1].in_features
    # The dropout only regularises the ImageNet classifier: drop it with the classifier.
    net.classifier = nn.Identity()
    return Backbone(net, dim, "features")


def _mobilenet_v3(fn_name: str, small_input: bool) -> Backbone:
    net = getattr(_tv(), fn_name)(weights=None)
    if small_input:
        _stride1_first_conv(net.features)
    # Keep the pre-logits layer (classifier.0, Linear + Hardswish): it is part of the network's
    # feature extractor in the paper and in torchvision's weights; remove dropout and logits.
    dim = net.classifier[3].in_features
    net.classifier[2] = nn.Identity()
    net.classifier[3] = nn.Identity()
    return Backbone(net, dim, "features")


@register_model("mobilenet_v3_small")
def mobilenet_v3_small(*, small_input: bool = False) -> Backbone:
    """MobileNetV3-Small (1.5 M parameters, 1024-d features)."""
    return _mobilenet_v3("mobilenet_v3_small", small_input)


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(*, small_input: bool = False) -> Backbone:
    """MobileNetV3-Large (4.2 M parameters, 1280-d features)."""
    return _mobilenet_v3("mobilenet_v3_large", small_input)


@register_model("efficientnet_b0")
def efficientnet_b0(*, small_input: bool = False) -> Backbone:
    """EfficientNet-B0 (4.0 M parameters, 1280-d features)."""
    net = _tv().efficientnet_b0(weights=None)
    if small_input:
        _stride1_first_conv(net.features)
    dim = net.classifier[1].in_features
    net.classifier = nn.Identity()
    return Backbone(net, dim, "features")
