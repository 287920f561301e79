"""Reading images and the one evaluation preprocessing, with numpy and PIL only.

Torch-free on purpose: a device's query path decodes and preprocesses images with this module and
feeds onnxruntime, so the numbers a model sees there are the numbers it saw during evaluation.

- :func:`open_image` turns any file PIL can read into a fully decoded 8-bit RGB image, or raises
  :class:`UnreadableImage` with a short reason.
- :func:`scan_images` lists a class folder or an unlabelled image folder, decoding every file once so
  that a broken file is found at scan time, never in the middle of an epoch.
- :func:`preprocess_eval` / :func:`preprocess_batch` are THE eval preprocessing (resize the shorter
  side, centre crop, scale to [0, 1], normalise); ``compress_edge.data.transforms`` reuses them bit for bit.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from compress_edge.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Folders that hold no data even though they are not hidden (macOS zip resource forks).
_IGNORED_DIRS = frozenset({"__MACOSX"})

# Scanning a folder of this many files or more shows a progress bar (when rich is installed).
_PROGRESS_MIN_FILES = 1000

# warnings.catch_warnings changes process-wide state, so two threads opening images at once could
# undo each other's filter; opening (header parsing only, cheap) is serialised, decoding is not.
_OPEN_LOCK = threading.Lock()


class UnreadableImage(DataError):
    """A file that is not an image PIL can decode (empty, truncated, not an image, too large)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# -- decoding ----------------------------------------------------------------------------------------


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB PIL image (H x W, mode "RGB").

    Grayscale and palette images become 3 channels, CMYK is converted, 16-bit and 32-bit images are
    rescaled to 8 bit (not clipped), transparency is composited on white and the EXIF orientation is
    applied. Raises :class:`UnreadableImage` for an empty, truncated, damaged or non-image file, and
    for an image over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except OSError as exc:
        raise UnreadableImage(path, f"cannot access the file ({exc.strerror or exc})") from None
    if size == 0:
        raise UnreadableImage(path, "empty file (0 bytes)")

    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; here both count as too large,
            # without lowering the limit for anyone else.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(path, _too_large_reason(None)) from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image, or a format PIL cannot read") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise UnreadableImage(path, f"damaged image header ({_short(exc)})") from None

    try:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            # Some formats learn their size late; check again rather than trust the open() check.
            raise UnreadableImage(path, _too_large_reason(im.size))
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError) as exc:
            raise UnreadableImage(path, f"truncated or damaged ({_short(exc)})") from None
        _exif_transpose(im)
        try:
            rgb = to_rgb(im)
        except ValueError as exc:
            raise UnreadableImage(path, f"unsupported colour mode {im.mode!r} ({_short(exc)})") from None
    finally:
        im.close()
    return rgb


def to_rgb(im: Image.Image) -> Image.Image:
    """Return a new, loaded 8-bit RGB copy of ``im`` (see :func:`open_image` for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("1", "L", "CMYK", "YCbCr", "HSV"):
        return im.convert("RGB")
    if mode == "P":
        if "transparency" in im.info:
            return _on_white(im.convert("RGBA"))
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(im.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(np.asarray(im), mode)).convert("RGB")
    # Any other mode PIL knows (LAB, ...): let PIL try, a ValueError means it cannot.
    return im.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    # Transparent pixels are usually "no content"; white is what a viewer shows and what product
    # photos (the typical RGBA input) are shot on. Black would invent dark shapes.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float single-channel array (H, W) to uint8 (H, W).

    Integers in [0, 65535] are 16-bit samples: divided by 257 so that 65535 -> 255 (a plain cast
    would clip everything above 255 to white). Other ranges are stretched from min..max; floats
    already in [0, 1] are multiplied by 255.
    """
    a = arr.astype(np.float64)
    if a.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = a * 255.0
    elif mode != "F" and lo >= 0 and hi <= 65535:
        out = a / 257.0
    elif hi > lo:
        out = (a - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(a)
    return np.clip(np.rint(np.nan_to_num(out)), 0, 255).astype(np.uint8)


def _exif_transpose(im: Image.Image) -> None:
    """Turn a loaded image upright by its EXIF orientation, in place (PIL.ImageOps.exif_transpose)."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:  # a damaged EXIF block is no reason to refuse the pixels
        logger.debug("ignoring the EXIF orientation of %s: %s", getattr(im, "filename", "an image"), _short(exc))


def _too_large_reason(size: tuple[int, int] | None) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return (
        f"{what}, over PIL's decompression-bomb limit of {limit} pixels "
        "(raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
    )


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 120 else text[:117] + "..."


# -- scanning folders --------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """What :func:`scan_images` found.

    files: readable image files, sorted (class folder: by class then path; else by path).
    labels: class index per file, -1 for an unlabelled folder; same length as ``files``.
    classes: class names (sorted subfolder names), empty for an unlabelled folder.
    skipped: (path, reason) for every candidate file that could not be decoded.
    root: the folder scanned (absolute); labelled: whether it was read as a class folder.
    """

    files: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None
    labelled: bool = False

    def __len__(self) -> int:
        return len(self.files)


def is_image_file(name: str | os.PathLike) -> bool:
    """True when the file name has an image extension and is not hidden."""
    name = os.fspath(name)
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def scan_images(
    root: str | os.PathLike,
    labelled: bool | None = None,
    *,
    verify: bool = True,
    workers: int | None = None,
    progress: bool | None = None,
) -> ScanResult:
    """List the images under ``root`` and decode each once.

    labelled=None decides from the layout: a folder whose top level holds no images and at least two
    subfolders, each with images, is a class folder (labels from the sorted subfolder names, as
    torchvision's ImageFolder); anything else is an unlabelled folder read recursively.
    labelled=True / False forces one reading. Hidden files and folders are ignored; symlinked
    folders are followed, each real folder once (a symlink loop ends). In a class folder, a symlink
    from one class into another is left to the class it leads to; a class subfolder that is a second
    name for another class (or for the folder itself) is refused with a DataError naming it.

    verify=True decodes every candidate with :func:`open_image` in ``workers`` threads; the ones that
    fail are left out, listed in ``skipped`` and counted in one logged warning. ``progress`` shows a
    progress bar (None: when there are many files). Raises DataError for a missing folder, a folder
    without image files, or one where no image can be read.
    """
    root = Path(os.path.expanduser(os.fspath(root))).absolute()
    top_files, subdirs = _list_folder(root)
    labelled, classes, per_dir = _read_layout(root, top_files, subdirs, labelled)
    skipped: list[tuple[str, str]] = []
    if labelled:
        # Images beside the class folders belong to no class; say so rather than drop them quietly.
        skipped.extend((str(p), "outside the class subfolders") for p in top_files)
        candidates = [p for ci, name in enumerate(classes) for p in per_dir[name]]
        cand_labels = [ci for ci, name in enumerate(classes) for _ in per_dir[name]]
    else:
        candidates = top_files + [p for name in subdirs for p in per_dir[name]]
        candidates.sort(key=lambda p: p.relative_to(root).parts)
        cand_labels = [-1] * len(candidates)
    if not candidates:
        raise DataError(
            f"{root} holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); pass a "
            "folder of images, or a class folder (one subfolder of images per class)"
        )
    files, labels = _keep_readable(root, candidates, cand_labels, skipped,
                                   _verify(candidates, workers, progress) if verify else [None] * len(candidates))
    return ScanResult(
        files=files, labels=labels, classes=classes, skipped=skipped, root=root, labelled=labelled
    )


def _list_folder(root: Path) -> tuple[list[Path], list[str]]:
    """The image files at the top of ``root`` and its visible subfolders' names, sorted; raises
    DataError for a missing folder, a file, or one that cannot be listed."""
    if not root.exists():
        raise DataError(
            f"no such folder: {root}; pass a folder of images, or a class folder "
            "(one subfolder of images per class)"
        )
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pass the folder that holds the images")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {root} ({exc.strerror or exc}); check its permissions") from None
    top_files = [Path(e.path) for e in entries if _entry_is_file(e) and is_image_file(e.name)]
    subdirs = [e.name for e in entries if _entry_is_dir(e) and _visible_dir(e.name)]
    return top_files, subdirs


#: At most this many images beside subfolders of images look like strays in a class folder (more: a
#: folder meant to be read without labels, which gets no warning).
_STRAY_TOP_FILES = 3


def _say_why_unlabelled(root: Path, top_files: list[Path], empty: list[str]) -> None:
    """Warn when a folder with several subfolders of images is read without labels: the layout almost
    made it a class folder, and the user likely meant one."""
    reasons = []
    if top_files:
        reasons.append(f"{len(top_files)} image(s) at its top level ({top_files[0].name}"
                       f"{', ...' if len(top_files) > 1 else ''})")
    if empty:
        reasons.append(f"subfolder(s) without images ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''})")
    logger.warning("%s is read as an unlabelled image folder, not a class folder, because of %s; for class "
                   "labels keep images only in its class subfolders", root, " and ".join(reasons))


def _read_layout(
    root: Path, top_files: list[Path], subdirs: list[str], labelled: bool | None
) -> tuple[bool, list[str], dict[str, list[Path]]]:
    """Decide how ``root`` is read (see :func:`scan_images`) and walk it: (labelled, classes, the
    image files under each subfolder). Raises DataError for a class folder with a class that is a
    second name of another, or without a class subfolder that holds images."""
    root_real = os.path.realpath(root)
    per_dir, aliases, crossed = _walk_classes(root, root_real, subdirs) if labelled is not False else ({}, {}, True)
    if labelled is None:
        with_images = [name for name in subdirs if per_dir[name]]
        labelled = not top_files and len(with_images) >= 2 and len(with_images) + len(aliases) == len(subdirs)
        logger.debug("%s read as %s", root, "a class folder" if labelled else "an unlabelled image folder")
        if not labelled and len(with_images) >= 2 and len(top_files) <= _STRAY_TOP_FILES:
            _say_why_unlabelled(root, top_files, [n for n in subdirs if not per_dir[n] and n not in aliases])
    if labelled and aliases:
        name, other = next(iter(aliases.items()))
        what = f"the class folder {root / other}" if other else f"{root} itself, which holds it"
        raise DataError(
            f"the class folder {root / name} is a symlink to {what}; remove the link or give that class "
            "its own folder"
        )
    if not labelled:
        if crossed:  # an unlabelled folder: every real folder read once, whichever name led to it
            visited: set[str] = {root_real}
            per_dir = {name: _walk(root / name, visited) for name in subdirs}
        return False, [], per_dir
    classes = [name for name in subdirs if per_dir[name]]
    if not classes:
        raise DataError(
            f"{root} has no class subfolders with images; arrange the images as "
            f"{root}/<class>/<image>, or read it as an unlabelled image folder"
        )
    for name in subdirs:
        if not per_dir[name]:
            logger.debug("ignoring %s: no image files in it", root / name)
    return True, classes, per_dir


def _keep_readable(
    root: Path, candidates: list[Path], cand_labels: list[int], skipped: list[tuple[str, str]],
    reasons: list[str | None],
) -> tuple[list[Path], list[int]]:
    """The candidates that decoded (``reasons[i]`` None) and their labels; the others are added to
    ``skipped`` and counted in one warning. Raises DataError when none decoded."""
    files: list[Path] = []
    labels: list[int] = []
    for path, label, reason in zip(candidates, cand_labels, reasons, strict=True):
        if reason is None:
            files.append(path)
            labels.append(label)
        else:
            skipped.append((str(path), reason))
    if skipped:
        logger.warning(
            "skipped %d unreadable image file%s under %s (run with --verbose to list them)",
            len(skipped),
            "" if len(skipped) == 1 else "s",
            root,
        )
        for path, reason in skipped:
            logger.debug("skipped %s: %s", path, reason)
    if not files:
        example = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(
            f"none of the {len(candidates)} image files under {root} could be read{example}; "
            "pass a folder that holds readable images"
        )
    return files, labels


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _entry_is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False


def _visible_dir(name: str) -> bool:
    return not name.startswith(".") and name not in _IGNORED_DIRS


def _walk(folder: Path, visited: set[str]) -> list[Path]:
    """Image files under ``folder`` (recursive, symlinks followed, each real folder once), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            # A symlink back to a folder already read (a loop, or a second name for it).
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if _visible_dir(d))
        base = Path(dirpath)
        for name in filenames:
            if is_image_file(name) and os.path.isfile(os.path.join(dirpath, name)):
                found.append(base / name)
    found.sort(key=lambda p: p.relative_to(folder).parts)
    return found


def _walk_classes(root: Path, root_real: str, subdirs: list[str]) -> tuple[dict[str, list[Path]], dict[str, str], bool]:
    """The image files of each subfolder read as a class: symlinks followed, but a folder that is (or
    lies inside) another class's folder is left to that class, and each real folder is read once per
    class. Also returns the subfolders that are second names for another class (name -> that class)
    or for ``root`` or a folder above it (name -> ""), and whether any real folder was reached
    from two classes (then an unlabelled reading must walk again)."""
    owners: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for name in subdirs:
        real = os.path.realpath(root / name)
        if real in owners:
            aliases[name] = owners[real]
        elif real == root_real or root_real.startswith(real.rstrip(os.sep) + os.sep):
            aliases[name] = ""
        else:
            owners[real] = name

    def owner(real: str) -> str | None:
        while True:
            if real in owners:
                return owners[real]
            parent = os.path.dirname(real)
            if parent == real:
                return None
            real = parent

    per_dir: dict[str, list[Path]] = {}
    seen: set[str] = set()
    crossed = False
    for name in subdirs:
        if name in aliases:
            per_dir[name] = []
            continue
        folder = root / name
        visited = {root_real}
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited or owner(real) not in (None, name):
                crossed = True  # a loop, a second name, or a link into another class
                dirnames[:] = []
                continue
            visited.add(real)
            if real in seen:
                crossed = True
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if _visible_dir(d))
            base = Path(dirpath)
            found.extend(base / f for f in filenames if is_image_file(f) and os.path.isfile(os.path.join(dirpath, f)))
        found.sort(key=lambda p: p.relative_to(folder).parts)
        per_dir[name] = found
    return per_dir, aliases, crossed or bool(aliases)


def _check(path: Path) -> str | None:
    try:
        open_image(path)
    except UnreadableImage as exc:
        return exc.reason
    except Exception as exc:  # a decoder bug on one odd file must not stop a scan of a million
        return f"cannot decode ({exc.__class__.__name__}: {_short(exc)})"
    return None


def default_workers() -> int:
    """Threads for decoding: PIL releases the GIL while decoding, so more threads than cores pay."""
    return min(32, (os.cpu_count() or 1) + 4)


def _verify(paths: list[Path], workers: int | None, progress: bool | None) -> list[str | None]:
    workers = max(1, workers or default_workers())
    show = progress if progress is not None else len(paths) >= _PROGRESS_MIN_FILES
    from compress_edge.progress import optional_bar  # the package's bar, on the CLI's stderr console

    bar = optional_bar(show)
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
        if bar is None:
            return list(pool.map(_check, paths))
        with bar:
            task = bar.add_task("checking images", total=len(paths))
            for reason in pool.map(_check, paths):
                reasons.append(reason)
                bar.advance(task)
    return reasons


# -- evaluation preprocessing ------------------------------------------------------------------------


def resize_shorter_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Resize so the shorter side is ``image_size`` (PIL bilinear), then centre crop S x S.

    Sizes are rounded as torchvision's ``Resize(S)`` + ``CenterCrop(S)`` round them.
    """
    size = int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def to_normalized_array(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB PIL image (H x W) -> float32 array (3, H, W): pixels / 255, minus mean, over std.

    The one pixel-to-number conversion: the eval path and the training augmentation both end here.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    if m.shape[-1] != 3 or s.shape[-1] != 3:
        raise ValueError(f"mean and std need 3 values each, got {len(mean)} and {len(std)}")
    return np.ascontiguousarray(((arr - m) / s).transpose(2, 0, 1), dtype=np.float32)


def preprocess_eval(
    img: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """THE eval preprocessing: PIL image -> float32 array (3, S, S), S = ``image_size``.

    Shorter side resized to S (PIL bilinear), centre crop S x S, pixels scaled to [0, 1], then
    ``(x - mean) / std`` per channel. Non-RGB images are converted as :func:`open_image` does.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    return to_normalized_array(resize_shorter_center_crop(img, image_size), mean, std)


def preprocess_batch(
    images_or_paths: Iterable[Image.Image | str | os.PathLike],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    workers: int | None = None,
) -> np.ndarray:
    """Preprocess many images (PIL images or paths, decoded with :func:`open_image`) in threads.

    Returns float32 (N, 3, S, S); (0, 3, S, S) for no input. An unreadable path raises
    :class:`UnreadableImage`.
    """
    items = list(images_or_paths)
    out = np.empty((len(items), 3, int(image_size), int(image_size)), dtype=np.float32)
    if not items:
        return out

    def one(i: int) -> None:
        item = items[i]
        img = item if isinstance(item, Image.Image) else open_image(item)
        out[i] = preprocess_eval(img, image_size, mean, std)

    n_workers = max(1, min(workers or default_workers(), len(items)))
    if n_workers == 1:
        for i in range(len(items)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="preprocess") as pool:
            # list() re-raises the first worker exception here.
            list(pool.map(one, range(len(items))))
    return out
