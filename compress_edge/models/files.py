"""compress-edge model files: the spec of a model, and the folder that holds both.

A saved model is a folder with ``model.safetensors`` (the weights, never pickled) and ``model.json``
(the :class:`~compress_edge.models.spec.ModelSpec`, holding the sha256 of the weights file).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_edge.errors import ModelError
from compress_edge.models.registry import EmbeddingModel, rebuild
from compress_edge.models.sizes import check_input_size
from compress_edge.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPEC_FILENAME,
    WEIGHTS_FILENAME,
    ModelSpec,
)
from compress_edge.storage import atomic_path, sha256_file

log = logging.getLogger(__name__)

#: Safetensors metadata key holding the spec (without its hash), so a lone weights file describes itself.
SPEC_METADATA_KEY = "compress_edge.models.spec"


def spec_for(
    model: EmbeddingModel,
    *,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    source: dict[str, Any] | None = None,
) -> ModelSpec:
    """The ModelSpec describing ``model`` fed ``image_size`` px images normalised with mean/std.

    Raises ModelError when the architecture cannot take images that small.
    """
    check_input_size(model, image_size)
    return ModelSpec(
        arch=model.arch,
        embed_dim=model.embed_dim,
        image_size=int(image_size),
        arch_kwargs=dict(model.arch_kwargs),
        mean=tuple(mean),
        std=tuple(std),
        normalize=model.normalize,
        source=dict(source or {}),
    )


def _spec_disagreements(model: EmbeddingModel, spec: ModelSpec) -> list[str]:
    # Through JSON so that a tuple in the model and a list in a loaded spec compare equal.
    model_kwargs = json.loads(json.dumps(model.arch_kwargs))
    spec_kwargs = json.loads(json.dumps(spec.arch_kwargs))
    problems = []
    if spec.arch != model.arch:
        problems.append(f"arch {spec.arch!r} vs model {model.arch!r}")
    if spec_kwargs != model_kwargs:
        problems.append(f"arch_kwargs {spec_kwargs} vs model {model_kwargs}")
    if int(spec.embed_dim) != model.embed_dim:
        problems.append(f"embed_dim {spec.embed_dim} vs model {model.embed_dim}")
    if bool(spec.normalize) != model.normalize:
        problems.append(f"normalize {spec.normalize} vs model {model.normalize}")
    return problems


def save_model(model: EmbeddingModel, spec: ModelSpec, folder: str | os.PathLike, *, half: bool = False) -> ModelSpec:
    """Write ``folder/model.safetensors`` and ``folder/model.json``; return the spec written.

    The spec written carries the sha256 of the weights file. Both files are written atomically, the
    weights first: a crash in between leaves a spec whose hash no longer matches, which load refuses.
    ``half`` stores floating-point tensors as float16 (half the bytes; loading casts them back to the
    model's float32).
    """
    from safetensors.torch import save_file

    problems = _spec_disagreements(model, spec)
    if problems:
        raise ModelError(
            f"the spec does not describe this model ({'; '.join(problems)}); build it with spec_for"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors that share no memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": "pt", SPEC_METADATA_KEY: spec.replace(weights_sha256=None).to_json()}
    weights_path = folder / WEIGHTS_FILENAME
    with atomic_path(weights_path, suffix=".safetensors") as tmp:
        mode = tmp.stat().st_mode & 0o777  # what a plain open() gives under the umask
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)  # save_file writes a new file, 0600: give back the mode the others get
    written = spec.replace(weights_sha256=sha256_file(weights_path))
    written.save(folder / SPEC_FILENAME)
    log.debug("saved %s (%d tensors) to %s", model.arch, len(tensors), folder)
    return written


def model_files(path: str | os.PathLike) -> tuple[Path | None, Path]:
    """(spec path or None, weights path) for a model folder, a run folder, or either file.

    Accepted: a folder holding model.json + model.safetensors; a run folder with a ``student/``
    subfolder holding them; the ``.safetensors`` file or the ``.json`` spec itself.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"no model at {path}: the path does not exist")
    if path.is_dir():
        for folder in (path, path / "student"):
            if (folder / WEIGHTS_FILENAME).is_file() or (folder / SPEC_FILENAME).is_file():
                spec = folder / SPEC_FILENAME
                weights = folder / WEIGHTS_FILENAME
                if not weights.is_file():
                    raise ModelError(f"{folder} holds {SPEC_FILENAME} but no {WEIGHTS_FILENAME}")
                return (spec if spec.is_file() else None), weights
        raise ModelError(
            f"{path} holds no {WEIGHTS_FILENAME} + {SPEC_FILENAME} (nor a student/ subfolder with them); "
            "pass a model folder written by compress-edge"
        )
    if path.suffix == ".safetensors":
        for spec in (path.with_suffix(".json"), path.parent / SPEC_FILENAME):
            if spec.is_file():
                return spec, path
        return None, path
    if path.suffix == ".json":
        for weights in (path.with_suffix(".safetensors"), path.parent / WEIGHTS_FILENAME):
            if weights.is_file():
                return path, weights
        raise ModelError(f"no weights beside {path}: expected {path.with_suffix('.safetensors').name}")
    raise ModelError(
        f"{path} is not a compress-edge model (its folder with model.json + model.safetensors, either "
        f"file, or a run folder with student/); for a third-party checkpoint pass its architecture name "
        f"as MODEL and the file as --weights {shlex.quote(path.name)}"
    )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file; ModelError when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc}); is it complete?") from None
    return tensors, metadata


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[EmbeddingModel, ModelSpec]:
    """Load a compress-edge model (see :func:`model_files` for the accepted paths), in eval mode.

    Refuses with ModelError weights and spec that disagree: a weights file whose sha256 is not the
    one the spec recorded, missing or unexpected tensors, shapes or an embed_dim the spec's
    architecture does not have.
    """
    spec_path, weights_path = model_files(path)
    if spec_path is not None:
        spec = ModelSpec.load(spec_path)
        if spec.weights_sha256:
            actual = sha256_file(weights_path)
            if actual != spec.weights_sha256:
                raise ModelError(
                    f"{weights_path} is not the file {spec_path.name} was written for (sha256 {actual[:12]}… "
                    f"vs {spec.weights_sha256[:12]}…): it was changed or replaced; save the model again"
                )
        else:
            log.warning("%s records no weights hash; the weights file cannot be verified", spec_path)
        tensors, _ = read_safetensors(weights_path)
    else:
        tensors, metadata = read_safetensors(weights_path)
        if SPEC_METADATA_KEY not in metadata:
            raise ModelError(
                f"no {SPEC_FILENAME} beside {weights_path}, and the file carries no spec; pass the "
                "folder compress-edge wrote, or for a third-party file its architecture name as MODEL "
                f"and the file as --weights {shlex.quote(weights_path.name)}"
            )
        log.warning("no %s beside %s: using the spec stored inside it", SPEC_FILENAME, weights_path)
        spec = ModelSpec.from_json(metadata[SPEC_METADATA_KEY], where=f"the metadata of {weights_path}")

    try:
        model = rebuild(spec.arch, spec.arch_kwargs, normalize=spec.normalize)
    except ModelError as exc:
        raise ModelError(f"cannot rebuild the model of {spec_path or weights_path}: {exc}") from None
    if model.embed_dim != int(spec.embed_dim):
        raise ModelError(
            f"{spec_path} says embed_dim={spec.embed_dim} but {spec.arch} with {spec.arch_kwargs} "
            f"gives {model.embed_dim}: the spec was edited or belongs to another model"
        )
    _check_state_dict(model, tensors, weights_path)
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return model, spec


def _check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape (file vs spec: {', '.join(shapes[:3])})")
    if problems:
        raise ModelError(
            f"the weights in {where} do not fit the model its spec describes: tensors {'; '.join(problems)}"
        )
