"""A MODEL argument as a torch model: :func:`resolve_model`, the PyTorch branch of the one MODEL resolver
(:func:`compress_edge.export.runtimes.open_embedder`, which opens any MODEL argument as an Embedder), and the
call for code that needs the torch module itself (training, export, profiling).

Who imports whom (nothing runs back up):

    spec.py         ModelSpec (torch-free)
    backbone.py     the table of architectures: Backbone, register_model
    cnn.py, vit.py  the builders: torchvision CNNs, timm ViTs (and TokenPool)        -> backbone
    registry.py     names -> EmbeddingModel: create_model, rebuild, list_models       -> backbone, cnn, vit
    sizes.py        input sizes, describe_model, recalibrate_batchnorm                -> registry
    files.py        spec_for, save_model / load_model (compress-edge model folders)   -> registry, sizes, spec
    formats.py      third-party checkpoints: read safely, recognise the layout        -> files
    layouts.py      match and load the backbone, guess the architecture, refuse       -> formats, registry
    inspection.py   what ``compress-edge models inspect`` shows                       -> layouts
    resolve.py      resolve_model (folder, file, or name + --weights)                 -> all of them

The model names of those modules are re-exported here, so ``compress_edge.models.resolve`` stays the one
import for callers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from compress_edge.errors import ModelError
from compress_edge.models.backbone import _REGISTRY, FAMILIES, Backbone, register_model
from compress_edge.models.cnn import (
    alexnet,
    efficientnet_b0,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
    resnet18,
    resnet34,
    resnet50,
)
from compress_edge.models.files import (
    SPEC_METADATA_KEY,
    load_model,
    model_files,
    read_safetensors,
    save_model,
    spec_for,
)
from compress_edge.models.layouts import checkpoint_stem, checkpoint_vit_options, load_backbone_weights
from compress_edge.models.registry import (
    DEFAULT_EMBED_DIM,
    HEADS,
    SMALL_INPUT_MAX,
    EmbeddingModel,
    build_head,
    create_model,
    did_you_mean,
    is_vit,
    list_models,
    model_family,
    model_summary,
    rebuild,
    unknown_arch_message,
)
from compress_edge.models.sizes import (
    ModelInfo,
    check_input_size,
    describe_model,
    feature_map_size,
    recalibrate_batchnorm,
    smallest_input_size,
)
from compress_edge.models.spec import ModelSpec
from compress_edge.models.vit import POOLS, TokenPool

__all__ = [
    "DEFAULT_EMBED_DIM",
    "FAMILIES",
    "HEADS",
    "MODEL_FORMS",
    "POOLS",
    "SMALL_INPUT_MAX",
    "SPEC_METADATA_KEY",
    "Backbone",
    "EmbeddingModel",
    "ModelInfo",
    "TokenPool",
    "alexnet",
    "build_head",
    "check_input_size",
    "create_model",
    "describe_model",
    "did_you_mean",
    "efficientnet_b0",
    "feature_map_size",
    "is_vit",
    "list_models",
    "load_model",
    "looks_like_path",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "model_family",
    "model_files",
    "model_summary",
    "read_safetensors",
    "rebuild",
    "recalibrate_batchnorm",
    "register_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resolve_model",
    "save_model",
    "smallest_input_size",
    "spec_for",
    "unknown_arch_message",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The one entry point for a MODEL argument
# --------------------------------------------------------------------------------------------------
MODEL_FORMS = (
    "a compress-edge model folder (model.json + model.safetensors) or its run folder (with student/), "
    "its .safetensors/.json file, or an architecture name ({names}) with --weights for a checkpoint"
)


def looks_like_path(ref: str) -> bool:
    """Whether a MODEL argument that does not exist was meant as a path rather than an architecture name."""
    return os.sep in ref or "/" in ref or ref.startswith(".") or Path(ref).suffix != ""


def resolve_model(
    ref: str,
    *,
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    small_input: bool | None = None,
    weights_key: str | None = None,
) -> tuple[EmbeddingModel, ModelSpec]:
    """Turn a MODEL argument into (model in eval mode, its spec).

    ref: a compress-edge model or run folder (or its .safetensors / .json file), or an architecture
      name. A name gives a random initialisation (enough for profiling) unless ``weights`` names a
      third-party checkpoint or compress-edge model, whose backbone is then loaded (checkpoints.py).
    image_size: input side; for a saved model it overrides the spec's (with a warning); for a name
      it defaults to 224.
    small_input: for a name, the small-input stem; None picks the stem the checkpoint's tensors fit
      (a CIFAR-style ResNet's 3x3 conv1), and without weights the small stem for images of 64 px and
      below. A ViT name is built for ``image_size`` (img_size), its checkpoint's position embedding
      resampled to that grid.
    weights_key: which network of a multi-network checkpoint to load (DINO: "teacher", "student").
    """
    ref = str(ref)
    path = Path(ref)
    if path.exists():
        if weights is not None:
            raise ModelError(
                f"--weights goes with an architecture name, not with the model {ref}, which has its own"
            )
        model, spec = load_model(path, device=device)
        if image_size is not None and int(image_size) != spec.image_size:
            check_input_size(model, int(image_size))
            log.warning(
                "%s was made for %dpx images; using %dpx as asked (embeddings may differ)",
                ref,
                spec.image_size,
                image_size,
            )
            spec = spec.replace(image_size=int(image_size))
        return model, spec

    if ref in _REGISTRY:
        size = int(image_size) if image_size is not None else 224
        if small_input is None and weights is not None and _REGISTRY[ref].family == "cnn":
            small_input = checkpoint_stem(weights, ref, key=weights_key)  # the stem the weights were trained with
            if small_input:
                log.info("%s has %s's small-input stem: using it", weights, ref)
        elif small_input is None:
            small_input = size <= SMALL_INPUT_MAX
        # A ViT is built for the asked side: a checkpoint's position embedding is resampled to it once.
        vit_options: dict[str, Any] = {}
        if _REGISTRY[ref].family == "vit":
            vit_options["img_size"] = size
            if weights is not None:
                vit_options.update(checkpoint_vit_options(weights, key=weights_key))  # MoCo v3's ViT-S heads
        model = create_model(ref, small_input=small_input, **vit_options)
        source: dict[str, Any] = {"kind": "random-init"}
        if weights is not None:
            report = load_backbone_weights(model, weights, key=weights_key)
            source = {"kind": "checkpoint", "path": str(weights), "format": report.format}
            if report.container:
                source["key"] = report.container
        spec = spec_for(model, image_size=size, source=source)
        return model.to(device).eval(), spec

    names = ", ".join(list_models())
    if looks_like_path(ref):
        raise ModelError(f"no such file or folder: {ref}; MODEL is {MODEL_FORMS.format(names=names)}")
    raise ModelError(
        f"{ref!r} is neither a path nor a known architecture{did_you_mean(ref)}; MODEL is "
        f"{MODEL_FORMS.format(names=names)}"
    )
