"""PyTorch embedding model -> ONNX file with the ModelSpec inside, checked and proven equal.

The graph: input ``images`` float32 (batch, C, S, S), output ``embeddings`` float32 (batch, D), the
batch dimension truly dynamic, L2 normalisation inside the graph when ``spec.normalize``.

torch's default exporter (dynamo, ``torch.export``) is tried first; when it fails the older
TorchScript exporter (``dynamo=False``) is used, with a warning. The result is canonicalised
(attributes equal to ONNX defaults dropped: OpenCV 5's importer mis-reads an explicit HardSigmoid
``beta``), optionally simplified with onnxslim, stamped with the ModelSpec in ``metadata_props``
and checked with ``onnx.checker`` and onnxruntime at batch 1 and 7.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from compress_edge.export.exported import PRECISION_KEY

from compress_edge.deps import available, require
from compress_edge.errors import ExportError, ModelError
from compress_edge.models.spec import ModelSpec
from compress_edge.storage import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BATCH_DIM = "batch"
#: Opsets the export supports (18: ReduceMean/ReduceL2 take axes as an input; 20: the newest torch emits well).
OPSETS = (18, 19, 20)
DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
#: Largest batch the dynamo exporter is told about (the graph itself has no limit).
_MAX_EXPORT_BATCH = 1 << 16


@dataclass
class OnnxExport:
    """What :func:`export_onnx` did."""

    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    simplified: bool
    nodes: int
    op_types: list[str]
    seconds: float
    fallback_reason: str | None = None
    batch_check: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# The graph that is exported
# --------------------------------------------------------------------------------------------------
def _graph_module(model, normalize: bool):
    """(B, C, S, S) -> (B, D): the model's features and head, L2-normalised in the graph when asked.

    Normalising here, written as x / max(||x||, eps) (what F.normalize computes), rather than through
    F.normalize keeps Shape/Expand nodes out of the graph; eps as F.normalize's.
    """
    import torch
    from torch import nn

    class EmbeddingGraph(nn.Module):
        def __init__(self, inner: nn.Module, normalize: bool) -> None:
            super().__init__()
            self.inner = inner
            self.normalize = normalize
            self.split = hasattr(inner, "forward_features") and hasattr(inner, "head")

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if self.split:
                z = self.inner.head(self.inner.forward_features(images))
            else:  # any other module: trust its own forward
                z = self.inner(images)
            if self.normalize:
                z = z / torch.linalg.vector_norm(z, ord=2, dim=1, keepdim=True).clamp_min(1e-12)
            return z

    return EmbeddingGraph(model, normalize).eval()


def _cpu_float_copy(model):
    import torch

    params = list(model.parameters())
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    if on_cpu:
        return model.eval()
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def export_onnx(
    model,
    spec: ModelSpec,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    simplify: bool = True,
    extra_metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Export ``model`` (an :class:`~compress_edge.models.resolve.EmbeddingModel` in eval mode, described by
    ``spec``) to ``path``. Raises ExportError when no exporter succeeds or the checks fail.

    exporter: "auto" (dynamo, then TorchScript with a warning), "dynamo" or "torchscript".
    simplify: run onnxslim when it is installed (skipped with a note otherwise).
    """
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of: {', '.join(map(str, OPSETS))}")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    path = Path(path)
    start = time.perf_counter()
    graph = _graph_module(_cpu_float_copy(model), bool(spec.normalize))
    example = torch.randn(2, spec.channels, spec.image_size, spec.image_size)

    fallback_reason = None
    used = exporter
    proto = None
    if exporter in ("auto", "dynamo"):
        try:
            proto = _export_dynamo(graph, example, opset)
            used = "dynamo"
        except Exception as exc:  # the dynamo exporter fails in many ways (export, decomposition, translation)
            if exporter == "dynamo":
                raise ExportError(f"the dynamo ONNX exporter failed: {_short(exc)}") from None
            fallback_reason = _short(exc)
            log.warning(
                "the dynamo ONNX exporter failed (%s); falling back to the TorchScript exporter (dynamo=False)",
                fallback_reason,
            )
    if proto is None:
        try:
            proto = _export_torchscript(graph, example, opset)
            used = "torchscript"
        except Exception as exc:
            raise ExportError(f"the TorchScript ONNX exporter failed too: {_short(exc)}") from None

    proto = _tidy(proto, opset)
    simplified = False
    if simplify:
        if available("onnxslim"):
            proto = _simplify(proto)
            simplified = True
        else:
            log.info("onnxslim is not installed: the graph is not simplified (pip install 'compress-edge[simplify]')")
    set_metadata(proto, spec, "fp32", {"compress_edge.exporter": used, **(extra_metadata or {})})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejects the exported graph: {_short(exc, 400)}") from None
    save_model_proto(proto, path)
    batch_check = check_dynamic_batch(path, spec)
    return OnnxExport(
        path=str(path),
        exporter=used,
        opset=opset,
        simplified=simplified,
        nodes=len(proto.graph.node),
        op_types=sorted({n.op_type for n in proto.graph.node}),
        seconds=time.perf_counter() - start,
        fallback_reason=fallback_reason,
        batch_check=batch_check,
    )


def _export_dynamo(graph, example, opset: int):
    import torch

    batch = torch.export.Dim(BATCH_DIM, min=1, max=_MAX_EXPORT_BATCH)
    # The exporter prints its progress and warns about its own internals: keep the CLI output clean.
    with _quiet():
        program = torch.onnx.export(
            graph,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}},
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    return program.model_proto


def _export_torchscript(graph, example, opset: int):
    import onnx
    import torch

    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            graph,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _quiet():
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        with quiet_logs("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo"):
            yield


@contextlib.contextmanager
def quiet_logs(*names: str):
    """The named loggers at ERROR while the block runs (exporters and quantizers log every pass)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Graph clean-up
# --------------------------------------------------------------------------------------------------
def _tidy(proto, opset: int):
    """Canonical names and dims, no exporter debug metadata, no attributes equal to ONNX defaults."""
    import onnx
    from onnx import defs, helper

    g = proto.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ExportError(f"the exported graph has {len(g.input)} inputs and {len(g.output)} outputs, expected 1 and 1")
    for value in (g.input[0], g.output[0]):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_param = BATCH_DIM
    # The dynamo exporter records stack traces and local paths on every node: not for shipping.
    for node in g.node:
        del node.metadata_props[:]
    del proto.metadata_props[:]
    del g.value_info[:]  # recomputed below; stale entries confuse some consumers

    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    scalar_types = (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING)
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = defs.get_schema(node.op_type, version)
        except Exception:  # an op this onnx does not know: leave it alone
            continue
        keep = []
        for attr in node.attribute:
            spec_attr = schema.attributes.get(attr.name)
            if (
                spec_attr is not None
                and attr.type in scalar_types
                and spec_attr.default_value.name
                and helper.get_attribute_value(attr) == helper.get_attribute_value(spec_attr.default_value)
            ):
                continue
            keep.append(attr)
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(f"ONNX shape inference fails on the exported graph: {_short(exc)}") from None
    return proto


def _simplify(proto):
    import onnxslim

    try:
        with _quiet():
            slim = onnxslim.slim(proto)
    except Exception as exc:  # simplification is an optimisation: never worth failing the export for
        log.warning("onnxslim could not simplify the graph (%s); keeping it as exported", _short(exc))
        return proto
    return slim if slim is not None else proto


# --------------------------------------------------------------------------------------------------
# Metadata and files
# --------------------------------------------------------------------------------------------------
def set_metadata(proto, spec: ModelSpec, precision: str, extra: dict[str, str] | None = None) -> None:
    """Write the ModelSpec, ONNX's ``Image.*`` keys and the precision into ``metadata_props``."""
    from compress_edge import __version__

    props = {
        **{p.key: p.value for p in proto.metadata_props},
        **spec.to_metadata(),
        PRECISION_KEY: precision,
        **(extra or {}),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    proto.producer_name = "compress-edge"
    proto.producer_version = __version__
    proto.doc_string = (
        f"{spec.arch} embedding model: images float32 (batch, {spec.channels}, {spec.image_size}, "
        f"{spec.image_size}) normalised with mean {list(spec.mean)} / std {list(spec.std)} -> embeddings "
        f"float32 (batch, {spec.embed_dim}){', L2-normalised' if spec.normalize else ''}; precision {precision}"
    )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    onnx = require("onnx", "reading ONNX metadata")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path} is not an ONNX model ({_short(exc)})") from None
    return {p.key: p.value for p in proto.metadata_props}


def read_spec(path: str | os.PathLike) -> ModelSpec | None:
    """The ModelSpec stored in an ONNX file, or None when it carries none."""
    return ModelSpec.from_metadata(read_metadata(path), where=path)


def save_model_proto(proto, path: str | os.PathLike) -> None:
    """Save ``proto`` to ``path`` atomically, as one file (weights inline, under 2 GB)."""
    import onnx

    data = proto.SerializeToString()
    with atomic_path(path, suffix=".onnx") as tmp:
        tmp.write_bytes(data)
    share(path)
    del onnx


def share(path: str | os.PathLike) -> None:
    """Give a written file the permissions of a plain new file (0666 minus the umask).

    Atomic writes go through a private temporary file (0600); a model file is meant to be read by
    others (a web server, another user on the device).
    """
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


def check_dynamic_batch(path: str | os.PathLike, spec: ModelSpec, batches: tuple[int, ...] = (1, 7)) -> dict:
    """Run ``path`` with onnxruntime at each batch size; ExportError unless every run gives (B, D)
    (and unit-norm rows when ``spec.normalize``). Returns {"batch": [...], "shape": [...]}."""
    ort = require("onnxruntime", "checking the exported graph")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    rng = np.random.default_rng(0)
    shapes = []
    for b in batches:
        x = rng.standard_normal((b, spec.channels, spec.image_size, spec.image_size)).astype(np.float32)
        out = sess.run([out_name], {in_name: x})[0]
        if out.shape != (b, spec.embed_dim):
            raise ExportError(
                f"{path} gives embeddings of shape {out.shape} for a batch of {b}, expected ({b}, {spec.embed_dim}): "
                "the batch dimension is not dynamic"
            )
        if spec.normalize:
            norms = np.linalg.norm(out.astype(np.float64), axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                raise ExportError(f"{path} does not L2-normalise its outputs (norms {norms.min():.4f}..{norms.max():.4f})")
        shapes.append(list(out.shape))
    return {"batch": list(batches), "shape": shapes}


def with_spec(src: str | os.PathLike, dst: str | os.PathLike, spec: ModelSpec, precision: str = "fp32") -> None:
    """Copy the ONNX file ``src`` to ``dst`` with ``spec`` written into its metadata."""
    onnx = require("onnx", "ONNX export")
    proto = onnx.load(str(src))
    set_metadata(proto, spec, precision)
    save_model_proto(proto, dst)
