"""What a model costs: parameters, FLOPs (fvcore), weight bytes, per module; teacher vs student.

FLOPs are fvcore's count (``fvcore.nn.FlopCountAnalysis``): one fused multiply-add counts as ONE
FLOP, which is the convention of the CompRess paper and of most vision papers (ResNet-50 at 224 px:
about 4.1 GFLOPs). Operators fvcore has no formula for (element-wise adds, activations, pooling,
the final L2 normalisation) are left out of the totals; they are collected into one summary line
instead of one log line per call.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress_edge.models.spec import ModelSpec

log = logging.getLogger(__name__)

FLOPS_NOTE = "FLOPs (fvcore counts one multiply-add as one FLOP)"


@dataclass
class ModuleRow:
    """One line of the per-module table."""

    name: str
    type: str
    depth: int
    params: int
    flops: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelProfile:
    """The cost of one model at one input size.

    params: parameters; flops: fvcore FLOPs for one image (a multiply-add is one FLOP);
    weight_bytes: bytes of the state dict (parameters and buffers, as stored); file_bytes: size of
    the model file profiled, when it was one (an .onnx, maybe quantised); embed_dim: D of the
    embeddings; unsupported: operators fvcore could not count, and how often they ran.
    """

    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    image_size: int
    params: int
    flops: int
    weight_bytes: int
    embed_dim: int
    feature_dim: int | None
    modules: list[ModuleRow] = field(default_factory=list)
    unsupported: dict[str, int] = field(default_factory=dict)
    file_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops_note"] = FLOPS_NOTE
        return d


def count_flops(model: nn.Module, inputs: torch.Tensor) -> tuple[int, Counter, Counter, tuple[int, ...]]:
    """fvcore's count: (total FLOPs, FLOPs per module name, unsupported operator counts, output shape).

    The model is traced in eval mode on CPU with fvcore's own warnings switched off: what they would
    have said (operators without a FLOP formula) is returned as a Counter for one summary line;
    any other warning raised while tracing is logged once at debug level.
    """
    was_training = model.training
    model.eval()
    fv_logger = logging.getLogger("fvcore")
    level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    threads = torch.get_num_threads()
    # One image: more threads save little, and on a busy machine each op would wait for a free core.
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from fvcore.nn import FlopCountAnalysis  # its import warns about torch.jit.script

            analysis = FlopCountAnalysis(model, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(analysis.total())
            by_module = Counter({k: int(v) for k, v in analysis.by_module().items()})
            unsupported = Counter(analysis.unsupported_ops())
    finally:
        torch.set_num_threads(threads)
        hook.remove()
        fv_logger.setLevel(level)
        model.train(was_training)
    if caught:
        kinds = Counter(w.category.__name__ for w in caught)
        log.debug("tracing for the FLOP count raised %s", ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    return total, by_module, unsupported, shapes[-1] if shapes else ()


def count_params(model: nn.Module) -> Counter:
    """Parameters per module name ("" is the whole model), shared parameters counted once."""
    counts: Counter = Counter()
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")[:-1]
        counts[""] += p.numel()
        for i in range(1, len(parts) + 1):
            counts[".".join(parts[:i])] += p.numel()
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state dict: every parameter and buffer at its own dtype (what a checkpoint holds)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def profile_model(
    model: nn.Module,
    image_size: int,
    *,
    depth: int = 2,
    channels: int = 3,
    name: str | None = None,
    spec: ModelSpec | None = None,
) -> ModelProfile:
    """Parameters, FLOPs (fvcore, one image of ``image_size`` px) and the per-module table down to
    ``depth`` (1: the network's layers, i.e. the children of an EmbeddingModel's backbone and its head;
    2: their children; ...). Modules with neither parameters nor FLOPs are left out."""
    if depth < 0:
        raise ValueError(f"depth must be 0 or more, got {depth}")
    model = model.to("cpu")
    x = torch.zeros(1, int(channels), int(image_size), int(image_size))
    flops, by_module, unsupported, out_shape = count_flops(model, x)
    params = count_params(model)
    rows = []
    # An EmbeddingModel wraps its network in ``backbone``: depth counts from the network's own layers.
    wrapped = isinstance(getattr(model, "backbone", None), nn.Module)
    for mod_name, module in model.named_modules():
        rel = mod_name[len("backbone.") :] if wrapped and mod_name.startswith("backbone.") else mod_name
        if not mod_name or (wrapped and mod_name == "backbone"):
            continue
        level = rel.count(".") + 1
        if level > depth:
            continue
        p, f = int(params.get(mod_name, 0)), int(by_module.get(mod_name, 0))
        if p or f:
            rows.append(ModuleRow(mod_name, type(module).__name__, level, p, f))
    arch = getattr(model, "arch", None) or (spec.arch if spec else type(model).__name__)
    arch_kwargs = dict(getattr(model, "arch_kwargs", None) or (spec.arch_kwargs if spec else {}))
    embed_dim = getattr(model, "embed_dim", None) or (spec.embed_dim if spec else None) or out_shape[-1]
    return ModelProfile(
        name=name or arch, arch=arch, arch_kwargs=arch_kwargs, image_size=int(image_size),
        params=int(params.get("", 0)), flops=flops, weight_bytes=weight_bytes(model), embed_dim=int(embed_dim),
        feature_dim=getattr(model, "feature_dim", None), modules=rows, unsupported=dict(unsupported),
    )


def profile_spec(spec: ModelSpec, *, depth: int = 2, name: str | None = None,
                 image_size: int | None = None) -> ModelProfile:
    """Profile the architecture a ModelSpec describes (random weights: costs do not depend on them),
    e.g. for an exported file whose spec is all that is known."""
    from compress_edge.models.resolve import rebuild

    model = rebuild(spec.arch, spec.arch_kwargs, normalize=spec.normalize)
    return profile_model(model, image_size or spec.image_size, depth=depth, channels=spec.channels,
                         name=name, spec=spec)


def resolve_for_profile(
    ref: str, *, image_size: int | None = None, arch_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, ModelSpec]:
    """A MODEL argument as (model, spec) for profiling: a compress-edge model or run folder, or an
    architecture name with its options (``arch_kwargs``, e.g. width_mult; ``small_input`` defaults to
    True at 64 px and below, as :func:`compress_edge.models.resolve.resolve_model` picks it)."""
    from compress_edge.errors import ModelError
    from compress_edge.models.resolve import (
        SMALL_INPUT_MAX,
        create_model,
        list_models,
        resolve_model,
        spec_for,
    )

    kwargs = dict(arch_kwargs or {})
    if ref in list_models() and kwargs:
        size = int(image_size or 224)
        kwargs.setdefault("small_input", size <= SMALL_INPUT_MAX)
        model = create_model(ref, **kwargs)
        return model.eval(), spec_for(model, image_size=size, source={"kind": "random-init"})
    if kwargs:
        raise ModelError(f"architecture options go with an architecture name, not with the model {ref}, "
                         "which records its own")
    return resolve_model(ref, image_size=image_size)


def compare(teacher: ModelProfile, student: ModelProfile) -> dict[str, Any]:
    """Teacher / student ratios (how many times cheaper the student is) and the embedding dims."""

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "params_ratio": ratio(teacher.params, student.params),
        "flops_ratio": ratio(teacher.flops, student.flops),
        "weight_bytes_ratio": ratio(teacher.weight_bytes, student.weight_bytes),
        "file_bytes_ratio": ratio(teacher.file_bytes or 0, student.file_bytes or 0)
        if teacher.file_bytes and student.file_bytes else None,
        "teacher_embed_dim": teacher.embed_dim,
        "student_embed_dim": student.embed_dim,
    }


def unsupported_summary(*profiles: ModelProfile) -> str | None:
    """One line naming the operators fvcore could not count across ``profiles`` (None when none)."""
    total: Counter = Counter()
    for p in profiles:
        total.update(p.unsupported)
    if not total:
        return None
    ops = ", ".join(f"{op} x{n}" for op, n in total.most_common())
    return (f"not counted (fvcore has no FLOP formula for {len(total)} operator kinds, mostly cheap "
            f"element-wise ones): {ops}")


def human(n: float, unit: str = "") -> str:
    """3.2 G, 540.1 M, 12.3 K: a count with an SI prefix."""
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def human_bytes(n: float) -> str:
    for div, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {prefix}"
    return f"{n:.0f} B"
