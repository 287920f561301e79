"""The library behind ``compress-edge profile``: the profile (parameters, FLOPs, bytes of weights) of one
MODEL argument, whatever it is: an exported file (its architecture rebuilt from its spec), a model or run
folder, or an architecture name with its options or a third-party checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress_edge.errors import CompressEdgeError, ModelError


def profile_ref(ref: str, *, image_size: int | None, arch_kwargs: dict[str, Any], depth: int,
                weights: str | None, role: str) -> Any:
    """The :class:`~compress_edge.eval.profile.ModelProfile` of ``ref`` (the ``role``'s MODEL argument: its
    options are ``--{role}-kwargs`` and ``--{role}-weights``, named in refusals)."""
    from compress_edge.eval.profile import profile_model, profile_spec, resolve_for_profile
    from compress_edge.export.exported import is_exported

    option = f"--{role}-weights"
    if is_exported(ref):
        if arch_kwargs or weights:
            raise CompressEdgeError(f"architecture options and {option} go with an architecture name, not with {ref}")
        from compress_edge.export.runtimes import exported_spec

        # fvcore counts a torch graph: the exported file's architecture is rebuilt from its spec.
        prof = profile_spec(exported_spec(ref), depth=depth, name=ref, image_size=image_size)
        prof.file_bytes = Path(ref).stat().st_size
        return prof
    if weights is not None:
        if arch_kwargs:
            raise ModelError(f"{option} sets the architecture's options itself: drop --{role}-kwargs")
        from compress_edge.export.runtimes import open_embedder

        emb = open_embedder(ref, "torch", image_size=image_size, weights=weights, weights_option=option)
        model, spec = emb.model, emb.spec
    else:
        try:
            model, spec = resolve_for_profile(ref, image_size=image_size, arch_kwargs=arch_kwargs)
        except ModelError as exc:  # the library names --weights: say the option of this command
            raise ModelError(str(exc).replace("--weights", option)) from None
    return profile_model(model, spec.image_size, depth=depth, channels=spec.channels, name=ref, spec=spec)
