"""Backbone registry, architectures and the embedding model every command uses.

One registry, one factory (as timm does): each architecture is a builder function decorated with
``@register_model(name)`` that returns a backbone whose classifier is gone: a torchvision CNN with
``nn.Identity`` in its classifier's place (so torchvision state dicts load into ``model.backbone``
unchanged), or a timm Vision Transformer built with ``num_classes=0`` (timm's key names, which DINO,
DINOv2, iBOT and MoCo v3 share). ``create_model`` wraps it in an :class:`EmbeddingModel` with an
optional projection head. The table is :mod:`~compress_edge.models.backbone`; the builders are in
:mod:`~compress_edge.models.cnn` and :mod:`~compress_edge.models.vit`, imported here so that every
architecture is registered once this module is.

Builders never download weights: every model starts from a random initialisation; pretrained
weights come from a compress-edge model folder (``files.py``) or a third-party checkpoint
(``layouts.py``). This module imports neither: both sit above it. Input sizes are in ``sizes.py``.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models import cnn, vit  # noqa: F401 - importing them registers their architectures
from compress_edge.models.backbone import _REGISTRY, FAMILIES, _Entry
from compress_edge.models.spec import LUMA_WEIGHTS

#: Projection heads ``create_model`` knows; None means no head (the output is the backbone feature).
HEADS = ("linear", "mlp")
#: Output dimension of a projection head when none is given (MoCo / CompRess use 128).
DEFAULT_EMBED_DIM = 128
#: Images of this side or smaller are "small": ``resolve_model`` picks the small-input stem for them.
SMALL_INPUT_MAX = 64


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


def did_you_mean(name: object) -> str:
    """' (did you mean Y?)' for the architecture whose name is closest to ``name``, or '' for none close."""
    close = difflib.get_close_matches(str(name), list_models(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_arch_message(name: object) -> str:
    """'unknown architecture X (did you mean Y?); choose one of: ...'."""
    return f"unknown architecture {name!r}{did_you_mean(name)}; choose one of: {', '.join(list_models())}"


def is_vit(model: EmbeddingModel) -> bool:
    """Whether ``model`` is a Vision Transformer (its input side is fixed by img_size and patch_size)."""
    return _entry(model.arch).family == "vit"


# --------------------------------------------------------------------------------------------------
# The embedding model
# --------------------------------------------------------------------------------------------------
class GreyInput(nn.Module):
    """(B, 3, H, W) -> (B, 3, H, W): each pixel's three normalised channels mixed into one with the luma
    weights and given to all three, so the network sees brightness and no colour (``grey_input=True``).

    Part of the model, not of the preprocessing, so every consumer of the model (index, search, serve,
    ONNX, TensorRT, OpenVINO) applies it without knowing of it: it exports as a 1x1 convolution. The mix
    is of normalised channels, x_c = (p_c - mean_c) / std_c, so it is the luma of the pixels up to
    ImageNet's three nearly equal std values (0.229, 0.224, 0.225), and an offset. Its weights are a
    constant, not a parameter, and are not saved: a grey model's weights file has the keys of a colour
    one."""

    def __init__(self) -> None:
        super().__init__()
        mix = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1).expand(3, 3, 1, 1).clone()
        self.register_buffer("mix", mix, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.mix.to(dtype=x.dtype))


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
    is the last spatial map (used for shape checks, never by ``forward``). ``grey_input``: a
    :class:`GreyInput` comes first, as ``self.input`` (``nn.Identity`` otherwise).
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
        grey_input: bool = False,
    ) -> None:
        super().__init__()
        self.input = GreyInput() if grey_input else nn.Identity()
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
        return self.pool(self.backbone(self.input(x)))

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
    grey_input: bool = False,
    **arch_kwargs: Any,
) -> EmbeddingModel:
    """Build a randomly initialised :class:`EmbeddingModel` from the registry.

    small_input: stem for images of 64 px and below (stride 1, no early max-pool); a ViT has no stem
      and keeps it only as a record.
    grey_input: the model turns its input grey first (:class:`GreyInput`), for data whose colours vary
      from image to image and say nothing of what is in it; recorded in ``arch_kwargs`` only when True,
      so a colour model's record (and ModelSpec) is what it was before the option existed.
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
        accepted = ", ".join(["small_input", "grey_input", "head", "embed_dim", "normalize", *entry.defaults])
        raise ModelError(f"{name} does not take {', '.join(unknown)}; it accepts: {accepted}")
    if isinstance(head, str) and head.lower() in ("none", "identity", ""):
        head = None
    if head is not None and head not in HEADS:
        raise ModelError(f"unknown head {head!r}; choose one of: none, {', '.join(HEADS)}")
    if embed_dim is not None and int(embed_dim) <= 0:
        raise ModelError(f"embed_dim must be positive, got {embed_dim}")

    kwargs = {**entry.defaults, **{k: _coerce(name, k, v, entry.defaults[k]) for k, v in arch_kwargs.items()}}
    grey_input = _flag(grey_input)
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
        **({"grey_input": True} if grey_input else {}),
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
        grey_input=grey_input,
    )


def _flag(value: Any) -> bool:
    """A yes/no model option given as a bool or as the text of ``--arch-kwargs grey_input=true``."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ModelError(f"grey_input takes true or false, got {value!r}")
    return bool(value)


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
