"""Backbone registry, architectures and the embedding model every command uses.

One registry, one factory (as timm does): each architecture is a builder function decorated with
``@register_model(name)`` that returns a backbone whose classifier is gone: a torchvision CNN with
``nn.Identity`` in its classifier's place (so torchvision state dicts load into ``model.backbone``
unchanged), or a timm Vision Transformer built with ``num_classes=0`` (timm's key names, which DINO,
DINOv2, iBOT and MoCo v3 share). ``create_model`` wraps it in an :class:`EmbeddingModel` with an
optional projection head.

Builders never download weights: every model starts from a random initialisation; pretrained
weights come from a compress-edge model folder (``model_files.py``) or a third-party checkpoint
(``checkpoints.py``). This module imports neither: both sit above it.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_edge.errors import ModelError

log = logging.getLogger(__name__)

#: Projection heads ``create_model`` knows; None means no head (the output is the backbone feature).
HEADS = ("linear", "mlp")
#: Output dimension of a projection head when none is given (MoCo / CompRess use 128).
DEFAULT_EMBED_DIM = 128
#: Images of this side or smaller are "small": ``resolve_model`` picks the small-input stem for them.
SMALL_INPUT_MAX = 64


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """What a builder returns.

    module: maps (B, 3, H, W) images to pooled features (B, feature_dim).
    feature_dim: F.
    feature_map: name (within ``module``) of the submodule whose output is the last spatial map
        (B, C, h, w), before pooling.
    """

    module: nn.Module
    feature_dim: int
    feature_map: str
    pool: nn.Module | None = None  # (output of module) -> (B, F) when ``module`` gives tokens (ViTs)


#: Architecture families: torchvision CNNs and timm Vision Transformers.
FAMILIES = ("cnn", "vit")


@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Callable[..., Backbone]
    defaults: dict[str, Any]  # the builder's own keyword arguments (besides small_input) and defaults
    summary: str
    family: str = "cnn"


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, family: str = "cnn"
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator adding a backbone builder to the registry under ``name`` (``family``: "cnn" or "vit").

    The builder takes keyword-only arguments: ``small_input: bool`` and its own architecture options
    (with defaults, JSON-serialisable), and returns a :class:`Backbone`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")  # a programming error, not the user's

    def decorate(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")  # a programming error, not the user's
        params = inspect.signature(fn).parameters
        if "small_input" not in params:
            raise TypeError(f"builder {fn.__name__} must accept small_input")
        defaults = {
            k: p.default for k, p in params.items() if k != "small_input" and p.default is not p.empty
        }
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = _Entry(name, fn, defaults, summary, family)
        return fn

    return decorate


def list_models(family: str | None = None) -> list[str]:
    """Registered architecture names, sorted; only those of ``family`` ("cnn" or "vit") when given."""
    if family is not None and family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def model_family(name: str) -> str:
    """"cnn" or "vit" for a registered architecture."""
    return _entry(name).family


def model_summary(name: str) -> str:
    """One-line description of a registered architecture."""
    return _entry(name).summary


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ModelError(unknown_arch_message(name)) from None


def unknown_arch_message(name: object) -> str:
    """'unknown architecture X (did you mean Y?); choose one of: ...'."""
    names = list_models()
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown architecture {name!r}{hint}; choose one of: {', '.join(names)}"


# --------------------------------------------------------------------------------------------------
# Architectures. Each keeps torchvision's module names; only the stem changes for small inputs.
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Vision Transformers (timm). The backbone returns the final-norm tokens (B, N, C), class token first,
# then register tokens, then the patches; a TokenPool turns them into the embedding.
# --------------------------------------------------------------------------------------------------
#: How a ViT's tokens become its feature: the class token, the mean of the patch tokens (class and
#: register tokens left out), or both concatenated (DINO's and DINOv2's linear-probe feature).
POOLS = ("cls", "mean", "cls+mean")


class TokenPool(nn.Module):
    """(B, N, C) final-norm tokens -> (B, F): "cls" (F = C), "mean" (F = C) or "cls+mean" (F = 2C).

    ``prefix_tokens``: the class token and the register tokens in front of the patch tokens.
    Holds no tensors, so it changes no state dict.
    """

    def __init__(self, kind: str, prefix_tokens: int) -> None:
        super().__init__()
        self.kind = kind
        self.prefix_tokens = int(prefix_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return tokens[:, 0]
        mean = tokens[:, self.prefix_tokens :].mean(dim=1)
        if self.kind == "mean":
            return mean
        return torch.cat([tokens[:, 0], mean], dim=1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, prefix_tokens={self.prefix_tokens}"


def _vit(
    timm_name: str,
    *,
    img_size: int,
    patch_size: int,
    pool: str,
    dynamic_img_size: bool,
    num_heads: int,
    depth: int,
) -> Backbone:
    try:
        import timm
    except ImportError:
        raise ModelError(f"{timm_name} needs timm: pip install timm") from None
    img_size, patch_size, num_heads, depth = int(img_size), int(patch_size), int(num_heads), int(depth)
    if pool not in POOLS:
        raise ModelError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if patch_size <= 0 or img_size < patch_size or img_size % patch_size:
        raise ModelError(
            f"img_size must be a positive multiple of patch_size ({patch_size}); got img_size={img_size}"
        )
    if not isinstance(dynamic_img_size, bool):
        raise ModelError(f"dynamic_img_size must be true or false, got {dynamic_img_size!r}")
    if num_heads <= 0 or depth <= 0:
        raise ModelError(f"num_heads and depth must be positive, got {num_heads} and {depth}")
    # pretrained=False: never a download; global_pool="": the tokens, pooled by TokenPool.
    net = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=img_size,
        patch_size=patch_size,
        num_heads=num_heads,
        depth=depth,
        dynamic_img_size=dynamic_img_size,
    )
    dim = net.embed_dim * (2 if pool == "cls+mean" else 1)
    return Backbone(net, dim, "patch_embed.proj", TokenPool(pool, net.num_prefix_tokens))


def _register_vit(name: str, *, patch_size: int, num_heads: int, depth: int, summary: str) -> None:
    """Register timm's ``name`` (keyword options: img_size, patch_size, pool, dynamic_img_size,
    num_heads, depth (fewer blocks: a cheaper student); small_input is accepted and changes nothing:
    a ViT has no stem to shrink)."""

    def build(
        *,
        small_input: bool = False,
        img_size: int = 224,
        patch_size: int = patch_size,
        pool: str = "cls",
        dynamic_img_size: bool = False,
        num_heads: int = num_heads,
        depth: int = depth,
    ) -> Backbone:
        return _vit(name, img_size=img_size, patch_size=patch_size, pool=pool,
                    dynamic_img_size=dynamic_img_size, num_heads=num_heads, depth=depth)

    build.__name__ = name
    build.__doc__ = summary
    register_model(name, family="vit")(build)


for _name, _patch, _heads, _summary in (
    ("vit_tiny_patch16_224", 16, 3, "ViT-Ti/16 (5.5 M parameters, 192-d): a ViT student."),
    ("vit_small_patch16_224", 16, 6, "ViT-S/16 (21.7 M parameters, 384-d): DINO, iBOT; MoCo v3 with num_heads=12."),
    ("vit_small_patch8_224", 8, 6, "ViT-S/8 (21.7 M parameters, 384-d): DINO."),
    ("vit_base_patch16_224", 16, 12, "ViT-B/16 (85.8 M parameters, 768-d): DINO, iBOT, MoCo v3."),
    ("vit_base_patch8_224", 8, 12, "ViT-B/8 (85.8 M parameters, 768-d): DINO."),
    ("vit_small_patch14_dinov2", 14, 6, "ViT-S/14 (21.6 M parameters at 224 px, 384-d): DINOv2."),
    ("vit_base_patch14_dinov2", 14, 12, "ViT-B/14 (85.7 M parameters at 224 px, 768-d): DINOv2."),
    ("vit_large_patch14_dinov2", 14, 16, "ViT-L/14 (303 M parameters at 224 px, 1024-d): DINOv2."),
    ("vit_small_patch14_reg4_dinov2", 14, 6, "ViT-S/14 with 4 registers (21.6 M parameters at 224 px, 384-d): DINOv2."),
    ("vit_base_patch14_reg4_dinov2", 14, 12, "ViT-B/14 with 4 registers (85.7 M parameters at 224 px, 768-d): DINOv2."),
    ("vit_large_patch14_reg4_dinov2", 14, 16, "ViT-L/14 with 4 registers (303 M parameters at 224 px, 1024-d): DINOv2."),
):
    _register_vit(_name, patch_size=_patch, num_heads=_heads, depth=24 if "large" in _name else 12, summary=_summary)


def is_vit(model: EmbeddingModel) -> bool:
    """Whether ``model`` is a Vision Transformer (its input side is fixed by img_size and patch_size)."""
    return _entry(model.arch).family == "vit"


# --------------------------------------------------------------------------------------------------
# The embedding model
# --------------------------------------------------------------------------------------------------
def build_head(kind: str | None, feature_dim: int, embed_dim: int) -> nn.Module:
    """Projection head from F to D features.

    None: identity (D == F). "linear": Linear(F, D). "mlp": Linear(F, F)-BN-ReLU-Linear(F, D), the
    projection head of SimCLR (Chen et al., ICML 2020, with its BN) and MoCo v2 (Chen et al.,
    arXiv:2003.04297); the hidden width is F as in both.
    """
    if kind is None:
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(feature_dim, embed_dim)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(feature_dim, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(feature_dim, embed_dim),
        )
    raise ModelError(f"unknown head {kind!r}; choose one of: none, {', '.join(HEADS)}")


class EmbeddingModel(nn.Module):
    """Images (B, 3, H, W) -> embeddings (B, D), L2-normalised when ``normalize`` is True.

    ``backbone``: (B, 3, H, W) -> pooled features (B, F), with torchvision's module names; for a ViT,
    the tokens (B, N, C) with timm's names, turned into (B, F) by ``pool`` (a :class:`TokenPool`,
    ``nn.Identity`` for a CNN; it holds no tensors).
    ``head``: (B, F) -> (B, D); ``nn.Identity`` (D == F) or a projection (see :func:`build_head`).

    ``arch`` and ``arch_kwargs`` rebuild the same model: ``create_model(arch, normalize=normalize,
    **arch_kwargs)``; ``normalize`` is kept out of ``arch_kwargs`` because the spec stores it itself.
    ``feature_dim`` is F, ``embed_dim`` D; ``feature_map`` names the backbone submodule whose output
    is the last spatial map (used for shape checks, never by ``forward``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        arch: str,
        arch_kwargs: dict[str, Any],
        head: str | None = None,
        embed_dim: int | None = None,
        normalize: bool = True,
        feature_map: str | None = None,
        pool: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool if pool is not None else nn.Identity()
        self.feature_dim = int(feature_dim)
        self.embed_dim = int(embed_dim) if head is not None and embed_dim is not None else self.feature_dim
        self.head = build_head(head, self.feature_dim, self.embed_dim)
        self.head_kind = head
        self.normalize = bool(normalize)
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.feature_map = feature_map

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) pooled backbone features."""
        return self.pool(self.backbone(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, D), normalised when the model normalises."""
        z = self.head(features)
        return F.normalize(z, dim=1) if self.normalize else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D)."""
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, arch_kwargs={self.arch_kwargs}, F={self.feature_dim}, D={self.embed_dim}"


def create_model(
    name: str,
    *,
    small_input: bool = False,
    head: str | None = None,
    embed_dim: int | None = None,
    normalize: bool = True,
    **arch_kwargs: Any,
) -> EmbeddingModel:
    """Build a randomly initialised :class:`EmbeddingModel` from the registry.

    small_input: stem for images of 64 px and below (stride 1, no early max-pool); a ViT has no stem
      and keeps it only as a record.
    head: None (or "none") for no projection, "linear" or "mlp".
    embed_dim: D of the head (default 128); without a head D is the feature dim F.
    arch_kwargs: the architecture's own options (e.g. ``width_mult`` for mobilenet_v2; for a ViT
      ``img_size`` (the side its position embedding is built for), ``patch_size``, ``pool`` (one of
      :data:`POOLS`), ``dynamic_img_size`` (take other sides, resampling the position embedding at run
      time), ``num_heads`` and ``depth``).
    """
    entry = _entry(name)
    unknown = sorted(set(arch_kwargs) - set(entry.defaults))
    if unknown:
        accepted = ", ".join(["small_input", "head", "embed_dim", "normalize", *entry.defaults]) or "none"
        raise ModelError(f"{name} does not take {', '.join(unknown)}; it accepts: {accepted}")
    if isinstance(head, str) and head.lower() in ("none", "identity", ""):
        head = None
    if head is not None and head not in HEADS:
        raise ModelError(f"unknown head {head!r}; choose one of: none, {', '.join(HEADS)}")
    if embed_dim is not None and int(embed_dim) <= 0:
        raise ModelError(f"embed_dim must be positive, got {embed_dim}")

    kwargs = {**entry.defaults, **{k: _coerce(name, k, v, entry.defaults[k]) for k, v in arch_kwargs.items()}}
    backbone = entry.builder(small_input=bool(small_input), **kwargs)
    if head is None and embed_dim is not None and int(embed_dim) != backbone.feature_dim:
        raise ModelError(
            f"{name} gives {backbone.feature_dim}-d features; embed_dim={embed_dim} needs a projection "
            "head (head='linear' or 'mlp')"
        )
    if head is not None and embed_dim is None:
        embed_dim = DEFAULT_EMBED_DIM
    record = {
        "small_input": bool(small_input),
        "head": head,
        "embed_dim": int(embed_dim) if head is not None else None,
        **kwargs,
    }
    return EmbeddingModel(
        backbone.module,
        backbone.feature_dim,
        arch=name,
        arch_kwargs=record,
        head=head,
        embed_dim=embed_dim,
        normalize=normalize,
        feature_map=backbone.feature_map,
        pool=backbone.pool,
    )


def _coerce(arch: str, key: str, value: Any, default: Any) -> Any:
    """Cast an option to its default's type, so width_mult=1 and width_mult=1.0 record the same model."""
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except (TypeError, ValueError):
            raise ModelError(f"{arch} option {key} must be a number, got {value!r}") from None
    return value


def rebuild(arch: str, arch_kwargs: dict[str, Any], *, normalize: bool = True) -> EmbeddingModel:
    """``create_model`` from a saved ``arch`` / ``arch_kwargs`` pair (a ModelSpec's)."""
    if not isinstance(arch_kwargs, dict):
        raise ModelError(f"arch_kwargs must be a JSON object, got {type(arch_kwargs).__name__}")
    return create_model(arch, normalize=normalize, **arch_kwargs)


# --------------------------------------------------------------------------------------------------
# Input sizes: shape inference on the meta device (no memory, no compute)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What ``compress-edge models list`` shows for one architecture at one image size."""

    name: str
    small_input: bool
    image_size: int
    params: int
    feature_dim: int
    feature_map: tuple[int, int] | None  # (h, w) of the last spatial map; None: image too small
    summary: str
    arch_kwargs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "small_input": self.small_input,
            "image_size": self.image_size,
            "params": self.params,
            "feature_dim": self.feature_dim,
            "feature_map": list(self.feature_map) if self.feature_map else None,
            "summary": self.summary,
            "arch_kwargs": self.arch_kwargs,
        }


def _meta_model(arch: str, arch_kwargs: dict[str, Any]) -> EmbeddingModel:
    with torch.device("meta"):
        return rebuild(arch, arch_kwargs)


def feature_map_size(model: EmbeddingModel, image_size: int) -> tuple[int, int] | None:
    """(h, w) of the last spatial map for a square ``image_size`` input; None when it is too small.

    Runs on a meta-device copy of the architecture, so it costs neither memory nor compute.
    """
    meta = _meta_model(model.arch, model.arch_kwargs).eval()
    seen: list[tuple[int, int]] = []
    target = meta.backbone.get_submodule(model.feature_map) if model.feature_map else meta.backbone
    handle = target.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    try:
        meta(torch.empty(1, 3, int(image_size), int(image_size), device="meta"))
    except (RuntimeError, AssertionError):  # a window larger than what is left; a ViT's other side
        return None
    finally:
        handle.remove()
    return seen[-1] if seen else None


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every batch-norm layer's running statistics on ``batches`` (tensors (B, 3, H, W),
    or one tensor) as a cumulative average; returns the model in eval mode.

    A randomly initialised network needs it: with fresh statistics (mean 0, variance 1) its
    activations shrink layer by layer and every image gets nearly the same embedding.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch below
    model.train()
    for x in [batches] if isinstance(batches, torch.Tensor) else batches:
        model(x)
    return model.eval()


_WARNED: set[tuple[str, int]] = set()


#: The largest input side tried when looking for the smallest one a model takes.
_MAX_SEARCHED_SIZE = 4096


def smallest_input_size(arch: str, arch_kwargs: dict[str, Any], start: int = 1) -> int | None:
    """The smallest square side (from ``start`` on) that ``arch`` with ``arch_kwargs`` takes without
    a pooling or convolution window outgrowing what is left of the image; None when none up to 4096 px.

    Shape inference on the meta device: a bisection between a side that fails and one that works.
    """
    meta = _meta_model(arch, arch_kwargs).eval()

    def works(side: int) -> bool:
        try:
            meta(torch.empty(1, 3, side, side, device="meta"))
        except (RuntimeError, AssertionError):
            return False
        return True

    lo, hi = max(1, int(start)) - 1, max(1, int(start))  # lo fails (or is 0), hi is the candidate
    while not works(hi):
        if hi >= _MAX_SEARCHED_SIZE:
            return None
        lo, hi = hi, min(_MAX_SEARCHED_SIZE, hi * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def check_input_size(model: EmbeddingModel, image_size: int) -> None:
    """Raise ModelError when ``model`` cannot take ``image_size`` px images, naming the smallest size it
    takes (and its small-input stem when that would take these); warn when it barely can."""
    size = feature_map_size(model, image_size)
    small = bool(model.arch_kwargs.get("small_input"))
    if size is None and is_vit(model):
        raise ModelError(_vit_size_message(model, int(image_size)))
    if size is None:
        raise ModelError(_too_small_message(model, int(image_size), small))
    if is_vit(model):
        return
    if size == (1, 1) and not small and image_size <= SMALL_INPUT_MAX and (model.arch, image_size) not in _WARNED:
        _WARNED.add((model.arch, image_size))  # once per process, not at every checkpoint
        log.warning(
            "%s leaves a 1x1 feature map of a %dpx image; its small-input variant keeps more detail",
            model.arch,
            image_size,
        )


def _vit_size_message(model: EmbeddingModel, image_size: int) -> str:
    kw = model.arch_kwargs
    patch, built = int(kw["patch_size"]), int(kw["img_size"])
    if kw.get("dynamic_img_size") or image_size % patch:
        return (f"{model.arch} cuts images into {patch}px patches: {image_size}px is no multiple of {patch}; "
                f"use --image-size {max(patch, image_size // patch * patch)} or patch_size that divides it")
    return (f"{model.arch} was built for {built}px images (img_size={built}); build it for {image_size}px "
            f"(--arch-kwargs img_size={image_size}) or let it take any side (dynamic_img_size=true)")


def _too_small_message(model: EmbeddingModel, image_size: int, small: bool) -> str:
    smallest = smallest_input_size(model.arch, model.arch_kwargs, image_size + 1)
    fixes = [f"images of at least {smallest}px (--image-size {smallest})"] if smallest else []
    if not small:
        try:
            small_works = feature_map_size(_meta_model(model.arch, {**model.arch_kwargs, "small_input": True}),
                                           image_size) is not None
        except (ModelError, TypeError):  # an architecture without a small-input stem
            small_works = False
        if small_works:
            fixes.append("its small-input stem (small_input=True: --arch-kwargs small_input=true)")
    what = " or ".join(fixes) or "another architecture"
    return (f"{model.arch} cannot take {image_size}px images: a pooling or convolution window is larger than "
            f"what is left of them; use {what}")


def describe_model(
    name: str, *, image_size: int = 224, small_input: bool | None = None, **arch_kwargs: Any
) -> ModelInfo:
    """Parameter count, feature dim and last feature map of ``name`` at ``image_size`` (meta device).

    small_input None picks the variant ``resolve_model`` would: small for images of 64 px and below.
    A ViT is described built for ``image_size`` cut to whole patches (its img_size).
    """
    if small_input is None:
        small_input = image_size <= SMALL_INPUT_MAX
    entry = _entry(name)
    if entry.family == "vit":  # built for the side, cut to whole patches
        patch = int(arch_kwargs.get("patch_size", entry.defaults["patch_size"]))
        arch_kwargs.setdefault("img_size", max(patch, int(image_size) // patch * patch))
    with torch.device("meta"):
        model = create_model(name, small_input=small_input, **arch_kwargs)
    return ModelInfo(
        name=name,
        small_input=bool(small_input),
        image_size=int(image_size),
        params=sum(p.numel() for p in model.parameters()),
        feature_dim=model.feature_dim,
        feature_map=feature_map_size(model, model.arch_kwargs.get("img_size", image_size)),
        summary=model_summary(name),
        arch_kwargs=model.arch_kwargs,
    )
