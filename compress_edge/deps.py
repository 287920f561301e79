"""Optional dependencies: imported where they are used, with a one-line error naming the extra.

The one place that maps a module to what installs it: :func:`require` raises a DependencyError with
it, and the command line turns a ModuleNotFoundError for any module below into the same one line
(:func:`missing_package_message`). tests/test_cli.py checks the table against pyproject.toml.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from types import ModuleType

from compress_edge.errors import DependencyError

# module name -> (extra of compress-edge in pyproject.toml, or None for a core dependency; pip package)
_EXTRAS: dict[str, tuple[str | None, str]] = {
    # core dependencies that the torch-free [device] install leaves out
    "torch": (None, "torch torchvision"),
    "torchvision": (None, "torch torchvision"),
    "onnx": (None, "onnx"),
    "onnxscript": (None, "onnxscript"),
    "fvcore": (None, "fvcore"),
    "safetensors": (None, "safetensors"),
    "scipy": (None, "scipy"),
    "matplotlib": (None, "matplotlib"),
    # the [device] set (also core dependencies)
    "numpy": ("device", "numpy"),
    "PIL": ("device", "pillow"),
    "onnxruntime": ("device", "onnxruntime"),
    "faiss": ("device", "faiss-cpu"),
    "typer": ("device", "typer"),
    "rich": ("device", "rich"),
    # extras
    "tensorrt": ("trt", "tensorrt"),
    "tensorrt_rtx": ("trt-rtx", "tensorrt-rtx-cu13"),
    "onnxslim": ("simplify", "onnxslim"),
    "openvino": ("openvino", "openvino"),
    "nncf": ("openvino", "nncf"),
    "cv2": ("opencv", "opencv-python-headless"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
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
    if module in _EXTRAS:
        return f"pip install {package} (a dependency of compress-edge that the torch-free [device] install leaves out)"
    return f"pip install {package}"


def known_module(name: str | None) -> str | None:
    """The entry of the table that ``name`` (a module, or a submodule of one) belongs to, or None."""
    if not name:
        return None
    for module in sorted(_EXTRAS, key=len, reverse=True):
        if name == module or name.startswith(module + "."):
            return module
    return None


def missing_package_message(exc: ModuleNotFoundError) -> str | None:
    """The one-line message for a ModuleNotFoundError of a known package, or None (then it is a bug)."""
    module = known_module(getattr(exc, "name", None))
    if module is None:
        return None
    package = _EXTRAS[module][1].split()[0]
    return f"the package '{package}' this command needs is not installed; install it with: {install_hint(module)}"


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
