"""What an index folder holds is data, not instructions: names shown safely, stored paths kept
inside the gallery, embeddings checked for NaN, model files checked against their recorded sha256.

Torch-free: the standard library and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from compress_edge.data.grammar import parse_dataset_id
from compress_edge.errors import ModelError, SpecMismatchError

log = logging.getLogger(__name__)

#: Categories shown as escapes: control characters (ESC, BEL, newlines...), format characters
#: (bidirectional overrides, zero-width), line/paragraph separators, and the surrogates that stand
#: for undecodable bytes in file names.
_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def shown(text: Any) -> str:
    """``text`` with every control or invisible character written as a visible escape (ESC -> ``\\x1b``)."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch != " " and unicodedata.category(ch) in _HIDDEN:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if ord(ch) < 0xD800 or ord(ch) > 0xDFFF else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or below it, judged on the normalised absolute paths."""
    p = os.path.normpath(os.path.abspath(path))
    f = os.path.normpath(os.path.abspath(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def dataset_id_ok(file: str) -> bool:
    """A well-formed dataset item such as "fashion-mnist:test/00042" (read by the DATA grammar,
    :func:`compress_edge.data.grammar.parse_dataset_id`)."""
    return parse_dataset_id(file) is not None


def check_finite(x: np.ndarray, model: Any) -> np.ndarray:
    """``x`` when every value is finite; ModelError naming the model file otherwise."""
    x = np.asarray(x)
    bad = ~np.isfinite(x).all(axis=1) if x.ndim == 2 else ~np.isfinite(x)
    if bad.any():
        raise ModelError(f"the model {shown(model)} gives non-finite embeddings (NaN or inf) for {int(bad.sum())} of "
                         f"{len(bad)} images: its weights are damaged; export the model again or use another file")
    return x


# --------------------------------------------------------------------------------------------------
# Is this the model the index was built with?
# --------------------------------------------------------------------------------------------------
def model_file(ref: Any) -> Path | None:
    """The file whose bytes are the model (an .onnx or an engine); None for a model folder (its
    loader checks model.safetensors against the sha256 in model.json) or an architecture name."""
    path = Path(str(getattr(ref, "path", ref) or ""))
    return path.resolve() if str(path) and path.is_file() else None


def model_record(ref: Any) -> dict[str, Any] | None:
    """What an index records about the model file it was built with: {"path", "sha256"}."""
    file = model_file(ref)
    return None if file is None else {"path": str(file), "sha256": model_digest(file)}


def model_parts(file: Path) -> list[Path]:
    """The files whose bytes are the model: one, or an OpenVINO IR's .xml and its .bin (the weights)."""
    return [file, file.with_suffix(".bin")] if file.suffix == ".xml" else [file]


def model_digest(file: Path) -> str:
    """sha256 of a one-file model; of its parts' sha256s, in order, for an OpenVINO IR."""
    from compress_edge.storage import sha256_file

    parts = model_parts(file)
    if len(parts) == 1:
        return sha256_file(file)
    return hashlib.sha256("".join(sha256_file(p) for p in parts).encode()).hexdigest()


def check_model(index_spec: Any, embedder: Any, meta: dict[str, Any], *, what: str, trust: bool = False) -> None:
    """Refuse an embedder whose embeddings do not belong with an index.

    The ModelSpecs must agree (``check_compatible``), and a weights hash missing on either side counts
    as a mismatch unless ``trust``. The model file itself (an .onnx or an engine) must have the sha256
    recorded for it: by the index when it is the file the index was built with, or by an
    ``export.json`` beside it; a file neither records is used with a warning.
    """
    spec = embedder.spec
    index_spec.check_compatible(spec, what=what)
    missing = [name for name, s in (("the index", index_spec), (shown(getattr(embedder, "path", "the model")), spec))
               if not s.weights_sha256]
    if missing and not trust:
        raise SpecMismatchError(f"{what} cannot be checked against the model: {' and '.join(missing)} record(s) no "
                                "weights hash; use the model the index was built with, or pass --trust-model to "
                                "use this one anyway")
    file = model_file(embedder)
    if file is None:
        return
    from compress_edge.storage import sha256_file

    recorded = meta.get("model_file") or {}
    vouched = recorded.get("sha256") == model_digest(file)
    export = file.parent / "export.json"
    listed: dict[str, Any] = {}
    if export.is_file():
        try:
            listed = json.loads(export.read_text(encoding="utf-8")).get("files") or {}
        except (OSError, ValueError, AttributeError):
            listed = {}
    exported = True  # every part listed by export.json with its sha256
    for part in model_parts(file):
        want = (listed.get(part.name) or {}).get("sha256") if isinstance(listed, dict) else None
        if want is None:
            exported = False
        elif want != sha256_file(part) and not trust:
            raise ModelError(f"{shown(part)} was changed since it was exported (its sha256 is not the one "
                             f"{shown(export)} records); export the model again, or pass --trust-model to use it anyway")
    if recorded.get("path") == str(file) and not vouched and not trust:
        also = f" or its {file.with_suffix('.bin').name}" if len(model_parts(file)) > 1 else ""
        raise ModelError(f"{shown(file)}{also} was changed since {what} was built with it (its sha256 is not the one "
                         "the index records); use the original file, rebuild the index, or pass --trust-model")
    if not vouched and not exported and not trust:
        log.warning("cannot check that %s holds the weights %s was built with: no export.json beside it lists "
                    "it; keep the export.json of 'compress-edge export' beside exported models", shown(file), what)
