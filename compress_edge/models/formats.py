"""Third-party checkpoints: read safely and recognise the layout (the format); :mod:`~compress_edge.models.layouts`
loads the backbone from it or refuses clearly.

A self-supervised checkpoint is rarely a plain torchvision state dict. The layouts handled here:

==============  ==============================================================================
format          layout (keys of the state dict; what is dropped)
==============  ==============================================================================
torchvision     plain keys (``conv1.weight``); the classifier (``fc.``/``classifier.``) is ignored
moco            MoCo v1/v2: ``state_dict`` with ``module.encoder_q.``; drops ``fc.`` (its MLP head),
                ``module.encoder_k.`` and the queue
moco-v3         MoCo v3 (ResNet or ViT): ``state_dict`` with ``module.base_encoder.``; drops its
                ``fc.``/``head.`` projector, ``module.momentum_encoder.`` and ``module.predictor.``
simclr          converted SimCLR: ``{"state_dict": plain keys}`` (simclr-converter), ``encoder.`` +
                ``projector.`` (Spijkervet/SimCLR) or ``backbone.`` with ``backbone.fc.`` (sthalles)
swav            ``module.`` keys at the top or under ``state_dict``; drops ``projection_head.`` and
                ``prototypes.``
dino            ``teacher``/``student`` dicts with ``module.``/``backbone.`` prefixes; drops ``head.``;
                the teacher unless ``key="student"`` (DINO, iBOT; CNNs and ViTs); a single ViT dict
                under ``backbone.``/``module.backbone.`` too
timm            a plain ViT backbone with timm's keys (``cls_token``, ``pos_embed``, ``blocks.``): the
                DINO and iBOT backbone files, timm state dicts; drops ``head.``
dinov2          a DINOv2 backbone: ``mask_token`` (dropped), ``register_tokens`` (timm's ``reg_token``,
                the class token's position folded into it), chunked ``blocks.i.j.`` renumbered
lightning       PyTorch Lightning: ``state_dict`` with ``backbone.`` / ``model.backbone.`` (also the
                ``nn.Sequential(*children)`` numbering lightly uses)
compress-edge   a compress-edge model folder or its ``model.safetensors``: ``backbone.``; drops ``head.``
generic         anything else: the prefix under which most of the backbone's keys are found
==============  ==============================================================================

A ViT checkpoint's position embedding is resampled (timm's ``resample_abs_pos_embed``) to the grid
of the model it is loaded into, so a 224 px (or DINOv2's 518 px) checkpoint serves other image sizes.

Files are read with ``torch.load(weights_only=True)`` or safetensors: never unpickling code. A file
that holds Python objects besides tensors is refused with the one-off conversion to do instead.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress_edge.errors import ModelError
from compress_edge.models.files import SPEC_METADATA_KEY, model_files, read_safetensors
from compress_edge.models.spec import SPEC_FILENAME, ModelSpec

FORMATS = (
    "torchvision",
    "moco",
    "moco-v3",
    "simclr",
    "swav",
    "dino",
    "timm",
    "dinov2",
    "lightning",
    "compress-edge",
    "generic",
)


#: After the backbone prefix is stripped: classification and projection heads, ignored when the
#: backbone has no such tensor (the torchvision classifier, SimCLR/MoCo/SwAV/DINO projectors).
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "projector.", "projection_head.", "prototypes.")

# Containers a training script wraps its state dict in, in the order they are tried.
_CONTAINERS = ("state_dict", "model", "model_state_dict", "model_state", "network", "net", "weights")


@dataclass(frozen=True)
class _Layout:
    name: str
    prefixes: tuple[str, ...]  # where the backbone may live; the one matching the most keys wins
    heads: tuple[str, ...] = HEAD_PREFIXES


LAYOUTS: dict[str, _Layout] = {
    "torchvision": _Layout("torchvision", ("",)),
    "moco": _Layout("moco", ("module.encoder_q.", "encoder_q.")),
    "moco-v3": _Layout("moco-v3", ("module.base_encoder.", "base_encoder.")),
    "simclr": _Layout(
        "simclr", ("module.encoder.", "encoder.", "module.backbone.", "backbone.", "module.", "")
    ),
    # lightly's SwAV keeps the backbone under backbone. beside projection_head. and prototypes.
    "swav": _Layout("swav", ("module.", "module.backbone.", "backbone.", "")),
    "dino": _Layout("dino", ("module.backbone.", "backbone.", "module.", "")),
    "timm": _Layout("timm", ("", "module.", "backbone.", "module.backbone.")),
    "dinov2": _Layout("dinov2", ("", "module.", "backbone.", "module.backbone.")),
    "lightning": _Layout(
        "lightning", ("model.backbone.", "backbone.", "model.encoder.", "encoder.", "model.", "")
    ),
    "compress-edge": _Layout("compress-edge", ("backbone.",), heads=("head.",)),
}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass
class RawCheckpoint:
    """A checkpoint file read into memory: its top-level mapping and, for our own files, the spec."""

    path: Path
    top: dict[str, Any]
    spec: ModelSpec | None = None  # set for compress-edge models

    @property
    def is_own(self) -> bool:
        return self.spec is not None


def _trusted_conversion(path: Path) -> str:
    # repr(): a file name is data, and pasting the suggested line must never run code hidden in it.
    return (
        "if you trust the file, convert it once in a Python session: "
        f"ckpt = torch.load({str(path)!r}, weights_only=False); sd = ckpt.get('state_dict', ckpt) "
        "(ckpt['teacher'] for DINO); torch.save({k: v for k, v in sd.items()}, 'weights.pth') "
        "(or safetensors.torch.save_file), then pass weights.pth"
    )


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and head[8:9] == b"{"


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a checkpoint without running code from it.

    path: a PyTorch file (.pt, .pth, .pth.tar, .ckpt: zip or legacy pickle), a .safetensors file, or
    a compress-edge model / run folder. Raises ModelError for anything else, an empty or damaged
    file, or a pickle that holds Python objects besides tensors and containers.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"no checkpoint at {path}: the path does not exist")
    if path.is_dir():
        spec_path, weights = model_files(path)
        return _read_own(weights, spec_path)
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes): the download or copy was probably cut short")
    with open(path, "rb") as fh:
        head = fh.read(16)

    if path.suffix == ".safetensors" or _is_safetensors(head):
        spec_path = None
        for candidate in (path.with_suffix(".json"), path.parent / SPEC_FILENAME):
            if candidate.is_file():
                spec_path = candidate
                break
        return _read_own(path, spec_path)

    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ModelError(
            f"{path} is not a checkpoint: expected a PyTorch file (.pt/.pth/.pth.tar/.ckpt) or .safetensors"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" not in text.lower() and "weights_only" not in text:
            raise ModelError(
                f"{path} is not a readable PyTorch checkpoint ({text.splitlines()[0]})"
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        raise ModelError(
            f"{path} holds Python objects{what} besides tensors, and compress-edge never unpickles code "
            f"from a file; {_trusted_conversion(path)}"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ModelError(
            f"{path} is not a readable PyTorch checkpoint ({exc.__class__.__name__}: {str(exc)[:120]}); "
            "is the file complete?"
        ) from None
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
        )
    return RawCheckpoint(path, dict(obj))


def _read_own(weights: Path, spec_path: Path | None) -> RawCheckpoint:
    tensors, metadata = read_safetensors(weights)
    spec = None
    if spec_path is not None:
        spec = ModelSpec.load(spec_path)
    elif SPEC_METADATA_KEY in metadata:
        spec = ModelSpec.from_json(metadata[SPEC_METADATA_KEY], where=f"the metadata of {weights}")
    return RawCheckpoint(weights, tensors, spec)


# --------------------------------------------------------------------------------------------------
# Recognising the layout
# --------------------------------------------------------------------------------------------------
def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return tensors > 0 and tensors >= 0.9 * len(obj) and all(isinstance(k, str) for k in obj)


@dataclass
class Detected:
    """The state dict found in a checkpoint and the layout it was saved in."""

    format: str
    tensors: dict[str, torch.Tensor]
    container: str | None  # the top-level key holding the state dict ("state_dict", "teacher"), if any
    arch_hint: str | None = None  # an architecture name recorded in the file (MoCo saves "arch")


def detect_format(raw: RawCheckpoint, *, fmt: str = "auto", key: str | None = None) -> Detected:
    """Find the state dict in ``raw`` and name its layout (one of :data:`FORMATS`).

    fmt: "auto" to detect, or a format name to force. key: the top-level entry to read (DINO's
    "teacher" or "student", or any container); None picks the teacher of a DINO file.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ModelError(f"unknown checkpoint format {fmt!r}; choose one of: auto, {', '.join(FORMATS)}")
    top = raw.top
    hint = top.get("arch") if isinstance(top.get("arch"), str) else None
    if raw.is_own:
        hint = raw.spec.arch if raw.spec else hint
        return Detected("compress-edge" if fmt == "auto" else fmt, dict(top), None, hint)

    sd, container = _unwrap(top, key, raw.path)
    name = fmt if fmt != "auto" else _recognise(top, sd, container)
    return Detected(name, sd, container, hint)


def _unwrap(top: dict[str, Any], key: str | None, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if key is not None:
        if not _is_state_dict(top.get(key)):
            entries = [k for k, v in top.items() if _is_state_dict(v)]
            raise ModelError(
                f"{path} has no state dict under {key!r}; it has: {', '.join(map(str, entries)) or 'none'}"
            )
        return dict(top[key]), key
    # DINO keeps both networks; the teacher (an EMA of the student) is the one its papers evaluate.
    for candidate in ("teacher", "student", *_CONTAINERS):
        if _is_state_dict(top.get(candidate)):
            return dict(top[candidate]), candidate
    if _is_state_dict(top):
        return {k: v for k, v in top.items() if isinstance(v, torch.Tensor)}, None
    shown = ", ".join(map(str, list(top)[:8]))
    raise ModelError(
        f"{path} holds no state dict (its top-level entries: {shown}); "
        "pass the entry that holds the weights with key="
    )


def _recognise(top: Mapping[str, Any], sd: Mapping[str, torch.Tensor], container: str | None) -> str:
    keys = list(sd)

    def any_startswith(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if container in ("teacher", "student"):
        return "dino"
    if any("encoder_q." in k for k in keys):
        return "moco"
    if any("base_encoder." in k for k in keys):
        return "moco-v3"
    if any(k.endswith("pos_embed") for k in keys) and any(k.endswith("cls_token") for k in keys):  # a ViT
        if any(k.endswith(("mask_token", "register_tokens")) for k in keys):
            return "dinov2"
        if any_startswith("backbone.", "module.backbone."):
            return "dino"  # one network of a DINO / iBOT checkpoint, saved on its own
        if any_startswith("cls_token", "pos_embed", "module.cls_token", "module.pos_embed"):
            return "timm"
    if any(k.startswith("pytorch-lightning_version") or "lightning" in k for k in top if isinstance(k, str)):
        return "lightning"
    if any_startswith("module.prototypes", "module.projection_head", "prototypes.", "projection_head."):
        return "swav"
    if any_startswith("projector.", "encoder.", "module.encoder.") or any_startswith("backbone.fc."):
        return "simclr"
    if container == "state_dict" and set(top) == {"state_dict"} and not any_startswith("module."):
        return "simclr"  # simclr-converter saves exactly {"state_dict": torchvision keys}
    if any_startswith("backbone.", "model.backbone."):
        return "lightning"
    if any_startswith("module."):
        return "swav" if container is None else "generic"
    return "torchvision" if container is None else "generic"
