"""Optional dependencies: imported where they are used, with a one-line error naming the extra."""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from types import ModuleType

from compress_edge.errors import DependencyError

# module name -> (pip extra of compress-edge, plain pip package)
_EXTRAS: dict[str, tuple[str | None, str]] = {
    "torch": (None, "torch torchvision"),
    "torchvision": (None, "torch torchvision"),
    "onnx": (None, "onnx"),
    "onnxruntime": ("device", "onnxruntime"),
    "faiss": ("device", "faiss-cpu"),
    "fvcore": (None, "fvcore"),
    "tensorrt": ("trt", "tensorrt"),
    "tensorrt_rtx": ("trt-rtx", "tensorrt-rtx-cu13"),
    "onnxslim": ("simplify", "onnxslim"),
    "cv2": ("opencv", "opencv-python-headless"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
    "scipy": (None, "scipy"),
}


@cache
def available(module: str) -> bool:
    """True when ``module`` can be imported (looked up once, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str) -> str:
    extra, package = _EXTRAS.get(module, (None, module))
    if extra:
        return f"pip install 'compress-edge[{extra}]' (or: pip install {package})"
    return f"pip install {package}"


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise a DependencyError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" needed for {purpose}" if purpose else ""
        raise DependencyError(
            f"the package '{module}'{what} is not installed ({exc.__class__.__name__}: {exc}); "
            f"install it with: {install_hint(module)}"
        ) from None
