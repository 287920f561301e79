"""Input sizes: what an architecture makes of an image side (the last feature map, the smallest side it
takes, the refusal when it cannot), its description for ``compress-edge models list``, and batch-norm
re-estimation. Shape inference runs on the meta device (no memory, no compute).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models.registry import (
    SMALL_INPUT_MAX,
    EmbeddingModel,
    _entry,
    create_model,
    is_vit,
    model_summary,
    rebuild,
)
from compress_edge.models.vit import patch_multiples

log = logging.getLogger(__name__)


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

    Runs on a meta-device copy of the architecture (``model`` itself when it is already there), so it
    costs neither memory nor compute.
    """
    on_meta = all(p.is_meta for p in model.parameters())
    meta = model if on_meta else _meta_model(model.arch, model.arch_kwargs)
    was_training = meta.training
    meta.eval()
    seen: list[tuple[int, int]] = []
    target = meta.backbone.get_submodule(model.feature_map) if model.feature_map else meta.backbone
    handle = target.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    try:
        meta(torch.empty(1, 3, int(image_size), int(image_size), device="meta"))
    except (RuntimeError, AssertionError):  # a window larger than what is left; a ViT's other side
        return None
    finally:
        handle.remove()
        meta.train(was_training)
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
            "%s leaves a 1x1 feature map of a %dpx image; its small-input variant keeps more detail "
            "(small_input=true)",
            model.arch,
            image_size,
        )


def _vit_size_message(model: EmbeddingModel, image_size: int) -> str:
    kw = model.arch_kwargs
    patch, built = int(kw["patch_size"]), int(kw["img_size"])
    if kw.get("dynamic_img_size") or image_size % patch:
        return (f"{model.arch} cuts images into {patch}px patches: {image_size}px is no multiple of {patch}; "
                f"use --image-size {patch_multiples(image_size, patch)[0]} or patch_size that divides it")
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
