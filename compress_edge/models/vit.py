"""The timm Vision Transformer backbones, registered by name (timm's key names, which DINO, DINOv2, iBOT
and MoCo v3 share), and :class:`TokenPool`, which turns their tokens into the feature. Built with
``pretrained=False``: never a download."""

from __future__ import annotations

import torch
from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models.backbone import Backbone, register_model

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


def patch_multiples(size: int, patch: int) -> list[int]:
    """The sides nearest ``size`` that a ``patch`` px patch grid covers: the multiple below (when there is
    one) and the one above; ``[size]`` when it is one already."""
    if size >= patch and size % patch == 0:
        return [size]
    below = size // patch * patch
    return [n for n in (below, below + patch) if n >= patch]

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
    if patch_size <= 0:
        raise ModelError(f"patch_size must be positive, got {patch_size}")
    if img_size < patch_size or img_size % patch_size:
        near = " or ".join(str(n) for n in patch_multiples(img_size, patch_size))
        raise ModelError(f"img_size must be a positive multiple of patch_size ({patch_size}); got img_size={img_size}: "
                         f"use img_size {near} (with the same --image-size) or a model with another patch size")
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
