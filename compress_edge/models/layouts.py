"""Third-party checkpoints, once read and recognised (:mod:`~compress_edge.models.formats`): match their
tensors against a backbone (a ViT's position embedding resampled to the model's grid), guess the
architecture they fit, load the backbone, or refuse clearly with what to do instead."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from compress_edge.errors import ModelError
from compress_edge.models.formats import HEAD_PREFIXES, LAYOUTS, Detected, detect_format, read_checkpoint
from compress_edge.models.registry import (
    EmbeddingModel,
    create_model,
    list_models,
    model_family,
)

log = logging.getLogger(__name__)

#: Share of the backbone's tensors that must come from the checkpoint.
MIN_MATCHED = 0.9


# --------------------------------------------------------------------------------------------------
# Matching against a backbone
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a checkpoint gave a backbone.

    matched / total: backbone tensors found with the right shape / all of them (BN step counters
    left out of both). missing: backbone tensors not in the file; unexpected: tensors under the
    backbone's prefix that fit nowhere; mismatched: "key: file shape vs model shape"; ignored: heads
    and other networks saved beside the backbone (momentum encoder, projector, classifier).
    """

    format: str
    matched: int
    total: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    prefix: str = ""
    container: str | None = None
    path: str = ""
    arch: str = ""
    arch_hint: str | None = None

    @property
    def fraction(self) -> float:
        return self.matched / self.total if self.total else 0.0

    def fits(self, min_matched: float = MIN_MATCHED) -> bool:
        """True when the backbone's weights load: no shape mismatch, nothing unexpected, enough matched."""
        return not self.mismatched and not self.unexpected and self.fraction >= min_matched

    def describe(self) -> str:
        where = f", under {self.container!r}" if self.container else ""
        return f"{self.format} format{where}, backbone prefix {self.prefix!r}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "container": self.container,
            "prefix": self.prefix,
            "arch": self.arch,
            "matched": self.matched,
            "total": self.total,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "ignored": self.ignored,
            "arch_hint": self.arch_hint,
        }


def _counts(key: str) -> bool:
    # BatchNorm's step counter only matters for momentum=None; files from older code lack it.
    return not key.endswith("num_batches_tracked")


def _renumber(inside: dict[str, torch.Tensor], child_names: list[str]) -> dict[str, torch.Tensor]:
    """Map ``nn.Sequential(*list(net.children())[:-1])`` numbering (``4.0.conv1.weight``, lightly's
    examples) back to the child names (``layer1.0.conv1.weight``)."""
    out = {}
    for k, v in inside.items():
        first, _, rest = k.partition(".")
        if first.isdigit() and int(first) < len(child_names) and rest:
            k = f"{child_names[int(first)]}.{rest}"
        out[k] = v
    return out


def _candidate_prefixes(keys: list[str]) -> list[str]:
    prefixes = {""}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            prefixes.add(".".join(parts[:i]) + ".")
    return sorted(prefixes, key=len)


def match_backbone(
    detected: Detected,
    shapes: Mapping[str, tuple[int, ...]],
    child_names: list[str] | tuple[str, ...],
    *,
    arch: str = "",
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Compare a detected state dict with a backbone's tensor shapes (``{key: shape}``).

    The backbone prefix is the layout's candidate that holds the most backbone keys; when none holds
    half of them, every prefix found in the file is tried (an unknown wrapper). Returns the report
    and the tensors to load (backbone keys, right shapes).
    """
    sd = detected.tensors
    keys = list(sd)
    layout = LAYOUTS.get(detected.format)
    heads = layout.heads if layout else HEAD_PREFIXES
    renumber = not any(n.isdigit() for n in child_names)
    counted = [k for k in shapes if _counts(k)]

    def best_of(prefixes: list[str]) -> tuple[int, str, dict[str, torch.Tensor]] | None:
        best = None
        for prefix in prefixes:
            inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if not inside:
                continue
            options = [inside, _renumber(inside, child_names)] if renumber else [inside]
            for option in options:
                score = sum(1 for k in option if k in shapes)
                if best is None or score > best[0]:
                    best = (score, prefix, option)
        return best

    best = best_of(list(layout.prefixes)) if layout else None
    if best is None or best[0] < 0.5 * len(counted):
        fallback = best_of(_candidate_prefixes(keys))
        if fallback is not None and (best is None or fallback[0] > best[0]):
            best = fallback
    _, prefix, inside = best if best is not None else (0, "", {})

    matched: dict[str, torch.Tensor] = {}
    mismatched, unexpected, ignored = [], [], []
    if "pos_embed" in shapes:  # a ViT backbone
        inside, dropped = _adapt_vit(inside, shapes)
        ignored.extend(prefix + k for k in dropped)
    for k, v in inside.items():
        if k in shapes:
            if tuple(v.shape) == tuple(shapes[k]):
                matched[k] = v
            else:
                mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(shapes[k])}")
        elif k.startswith(heads):
            ignored.append(prefix + k)
        else:
            unexpected.append(prefix + k)
    # Other networks saved beside the backbone: momentum encoder, predictor, queue, DINO head.
    ignored.extend(k for k in keys if not k.startswith(prefix))
    report = LoadReport(
        format=detected.format,
        matched=sum(1 for k in counted if k in matched),
        total=len(counted),
        missing=[k for k in counted if k not in inside],
        unexpected=unexpected,
        ignored=ignored,
        mismatched=mismatched,
        prefix=prefix,
        container=detected.container,
        arch=arch,
        arch_hint=detected.arch_hint,
    )
    return report, matched


#: DINOv2 / iBOT tensors a ViT backbone has no use for at inference (the masked-image-modelling token).
_VIT_TRAINING_ONLY = ("mask_token", "masked_embed")


def _prefix_in_pos(tokens: int) -> int | None:
    """Leading non-patch entries (0 or 1, the class token's) of a square grid's position embedding."""
    for prefix in (0, 1):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return prefix
    return None


def _adapt_vit(
    inside: dict[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Bring a ViT state dict (prefix stripped) to timm's layout and the model's grid.

    DINOv2: chunked ``blocks.<chunk>.<i>.`` become ``blocks.<i>.``; ``register_tokens`` is timm's
    ``reg_token``; with registers timm adds no position to the class token (``no_embed_class``), so
    the class token's position is folded into ``cls_token``. Any layout: a position embedding for
    another grid is resampled (bicubic, timm's ``resample_abs_pos_embed``) to the model's. Returns
    the tensors and the keys dropped (``mask_token``, ``masked_embed``).
    """
    from timm.layers import resample_abs_pos_embed

    out: dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in inside.items():
        chunked = re.match(r"blocks\.\d+\.(\d+\..*)", k)
        if chunked and k not in shapes:
            k = f"blocks.{chunked.group(1)}"
        if k == "register_tokens" and "reg_token" in shapes:
            k = "reg_token"
        if k in _VIT_TRAINING_ONLY and k not in shapes:
            dropped.append(k)
            continue
        out[k] = v
    pos, target = out.get("pos_embed"), tuple(shapes["pos_embed"])
    if pos is None or tuple(pos.shape) == target or pos.ndim != 3 or pos.shape[-1] != target[-1]:
        return out, dropped
    have, want = _prefix_in_pos(pos.shape[1]), _prefix_in_pos(target[1])
    if have is None or want is None:
        return out, dropped  # not a square grid: left for the shape check to report
    if have == 1 and want == 0 and "cls_token" in out:  # DINOv2 with registers into timm's layout
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        pos, have = pos[:, 1:], 0
    if have == want:
        side = math.isqrt(target[1] - want)
        with torch.no_grad():
            pos = resample_abs_pos_embed(pos.float(), new_size=[side, side], num_prefix_tokens=have)
        log.debug("resampled the position embedding from %d to %d tokens", out["pos_embed"].shape[1], target[1])
    out["pos_embed"] = pos
    return out, dropped


def _backbone_of(model: EmbeddingModel) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
    return shapes, tuple(n for n, _ in model.backbone.named_children())


@functools.cache
def _signature(name: str, small_input: bool) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """Backbone tensor shapes and child names of a registered architecture (built on the meta device)."""
    with torch.device("meta"):
        meta = create_model(name, small_input=small_input)
    return _backbone_of(meta)


# --------------------------------------------------------------------------------------------------
# Guessing the architecture of a checkpoint
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchGuess:
    arch: str
    small_input: bool
    score: float  # matched / (backbone tensors + unexpected ones); 1.0 is a perfect fit
    report: LoadReport


def guess_arch(detected: Detected) -> list[ArchGuess]:
    """Every registered architecture (both stems) ranked by how well ``detected`` fits it, best first.

    Architectures are built once on the meta device (no memory); options such as width_mult keep
    their defaults.
    """
    guesses = []
    for name in list_models():
        for small in (False, True) if model_family(name) == "cnn" else (False,):  # a ViT has no stem
            shapes, children = _signature(name, small)
            report, _ = match_backbone(detected, shapes, children, arch=name)
            bad = len(report.unexpected) + len(report.mismatched)
            score = report.matched / (report.total + bad) if report.total else 0.0
            guesses.append(ArchGuess(name, small, score, report))
    guesses.sort(key=lambda g: (-g.score, g.small_input))
    return guesses


def checkpoint_stem(path: str | os.PathLike, arch: str, *, fmt: str = "auto", key: str | None = None) -> bool:
    """Whether the checkpoint at ``path`` was trained with ``arch``'s small-input stem (a CIFAR-style
    ResNet has a 3x3 ``conv1``, the ImageNet one a 7x7): the stem whose backbone it fits better.
    Architectures whose stems hold the same tensors (a stride differs) read as the ImageNet stem."""
    detected = detect_format(read_checkpoint(path), fmt=fmt, key=key)
    fits = {}
    for small in (False, True):
        report, _ = match_backbone(detected, *_signature(arch, small), arch=arch)
        fits[small] = (report.matched - len(report.mismatched), not small)
    return max(fits, key=fits.get)


def checkpoint_vit_options(path: str | os.PathLike, *, fmt: str = "auto", key: str | None = None) -> dict[str, Any]:
    """ViT options a checkpoint needs beyond its tensors' shapes: MoCo v3's ViT-S has 12 attention
    heads where DINO's and timm's have 6 (the same tensors either way)."""
    detected = detect_format(read_checkpoint(path), fmt=fmt, key=key)
    if detected.format != "moco-v3":
        return {}
    pos = [v for k, v in detected.tensors.items() if k.endswith("base_encoder.pos_embed")]
    return {"num_heads": 12} if pos and pos[0].shape[-1] == 384 else {}


def _suggestion(detected: Detected, arch: str) -> str:
    guesses = [g for g in guess_arch(detected) if g.score >= MIN_MATCHED]
    if guesses:
        g = guesses[0]
        variant = " with its small-input stem" if g.small_input else ""
        if g.arch == arch:
            return f"; it fits {g.arch}{variant}: " + (
                "pass small_input=True" if g.small_input else "use the ImageNet stem (small_input=False)"
            )
        return f"; it looks like a {g.arch} checkpoint{variant}: name that architecture instead: {g.arch} (distill --teacher {shlex.quote(g.arch)} --teacher-weights FILE)"
    if detected.arch_hint and detected.arch_hint != arch:
        return f"; the file says it was trained with {detected.arch_hint!r} (distill --teacher {shlex.quote(detected.arch_hint)} --teacher-weights FILE)"
    return "; no registered architecture fits it (" + ", ".join(list_models()) + ")"


def _head(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def refusal(report: LoadReport, detected: Detected, path: str | os.PathLike) -> str:
    """The one-line explanation of why a checkpoint does not fit ``report.arch``."""
    parts = [f"{report.matched}/{report.total} backbone tensors matched"]
    if report.mismatched:
        parts.append(f"{len(report.mismatched)} of another shape ({_head(report.mismatched, 2)})")
    if report.missing:
        parts.append(f"missing {_head(report.missing)}")
    if report.unexpected:
        parts.append(f"unexpected {_head(report.unexpected)}")
    return (
        f"the weights in {path} do not fit {report.arch} ({report.describe()}): "
        + "; ".join(parts)
        + _suggestion(detected, report.arch)
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _log_report(report: LoadReport, path: str | os.PathLike) -> None:
    log.info(
        "loaded %d/%d backbone tensors of %s from %s (%s); %d ignored",
        report.matched,
        report.total,
        report.arch,
        path,
        report.describe(),
        len(report.ignored),
    )
    if report.missing:
        log.warning(
            "%d backbone tensors missing, kept at random init: %s",
            len(report.missing),
            _head(report.missing, 5),
        )
    if report.unexpected:
        log.warning("%d unexpected tensors: %s", len(report.unexpected), _head(report.unexpected, 5))
    log.debug("missing: %s", report.missing)
    log.debug("unexpected: %s", report.unexpected)
    log.debug("mismatched: %s", report.mismatched)
    log.debug("ignored: %s", report.ignored)


def load_backbone_weights(
    model: EmbeddingModel,
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    key: str | None = None,
    min_matched: float = MIN_MATCHED,
) -> LoadReport:
    """Load the backbone of a checkpoint into ``model.backbone`` (the head is left as it is).

    fmt: "auto" or one of :data:`FORMATS`. key: DINO's "teacher" (default) or "student", or any
    top-level entry holding the state dict. Raises ModelError, naming the detected format, a few
    missing keys and the architecture the file looks like, when any shape differs, a tensor fits
    nowhere, or fewer than ``min_matched`` of the backbone's tensors are in the file.
    """
    raw = read_checkpoint(path)
    detected = detect_format(raw, fmt=fmt, key=key)
    shapes, children = _backbone_of(model)
    report, tensors = match_backbone(detected, shapes, children, arch=model.arch)
    report.path = str(raw.path)
    if not report.fits(min_matched):
        log.debug("refused: %s", report.to_dict())
        raise ModelError(refusal(report, detected, path))
    # Strict load of the full backbone: what the file lacks (a BN step counter, or the few
    # tensors min_matched lets pass) keeps the model's current value, and nothing is silently dropped.
    state = {**model.backbone.state_dict(), **tensors}
    model.backbone.load_state_dict(state, strict=True)
    _log_report(report, path)
    heads = model.arch_kwargs.get("num_heads")
    if report.format == "moco-v3" and model.feature_dim and "pos_embed" in shapes and shapes["pos_embed"][-1] == 384 \
            and heads != 12:
        # The same tensors either way: only the embeddings would tell.
        log.warning("MoCo v3's ViT-S has 12 attention heads, this %s has %s: build it with num_heads=12",
                    model.arch, heads)
    return report
