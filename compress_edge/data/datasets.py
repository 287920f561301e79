"""Datasets and transforms (torch): image folders, Fashion-MNIST, eval and training views.

A DATA argument is one of:

- a class folder ``ROOT/<class>/<image>`` (labels from the sorted folder names, as ImageFolder);
- an unlabelled image folder (read recursively);
- ``fashion-mnist:train`` or ``fashion-mnist:test``, read from the IDX files with torchvision's reader;
- any of these followed by ``@N``: N of its images, drawn without replacement with a fixed seed and
  kept in their original order (``fashion-mnist:train@10000``), for quick runs on a small machine.

Every dataset yields ``(image, label, index)``: the index lets a teacher cache and the CompRess
memory bank address a sample; ``label`` is -1 when there are none.

The eval transform is :func:`compress_edge.data.images.preprocess_eval` wrapped in a tensor, so the torch
path and the torch-free device path give bit-identical inputs. :class:`TrainAugment` draws its random
choices into a fixed-length parameter vector that can be stored and replayed exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import operator
import os
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler

from compress_edge.errors import DataError
from compress_edge.data.images import open_image, preprocess_eval, scan_images, to_normalized_array, to_rgb
from compress_edge.models.spec import IMAGENET_MEAN, IMAGENET_STD
from compress_edge.storage import atomic_path

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# The split's (images, labels) file stems; each may be gzipped (.gz) or raw.
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official location first, then a mirror; COMPRESS_EDGE_FMNIST_URL (comma-separated) replaces both.
FASHION_MNIST_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
FMNIST_URL_ENV = "COMPRESS_EDGE_FMNIST_URL"
DATA_ENV = "COMPRESS_EDGE_DATA"
# Debian's dataset-fashion-mnist package installs the four .gz files here.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
# md5 of the official .gz files (as published by Zalando and torchvision) and sha256 of their
# decompressed IDX content: repackaged copies (Debian recompresses) differ in the first, not the second.
_FMNIST_GZ_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_FMNIST_RAW_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

#: Fashion-MNIST's pixel mean and standard deviation (grey, repeated over the three channels).
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

ACCEPTED_DATA = (
    "a class folder (DIR/<class>/<image>), an unlabelled image folder, "
    "fashion-mnist:train or fashion-mnist:test"
)


# -- datasets ----------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """A sequence of RGB images with optional labels; item ``i`` is ``(image, label, i)``.

    image: ``transform(pil_rgb)`` (e.g. a float tensor (3, S, S)), or the PIL image without a
    transform. label: class index, -1 when unlabelled.

    Attributes: ``name`` (the DATA string), ``kind`` ("class-folder", "image-folder",
    "fashion-mnist"), ``classes``, ``labels`` (int64 (N,)), ``files`` (paths, or synthetic ids such
    as "fashion-mnist:train/00042"), ``location`` (the folder read), ``skipped`` ((path, reason)).
    Picklable, so it works in DataLoader worker processes.
    """

    kind: str = "dataset"

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        labels: np.ndarray,
        files: Sequence[str],
        location: str,
        transform: Callable[[Image.Image], Any] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.name = name
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.files = list(files)
        self.location = location
        self.transform = transform
        self.skipped = list(skipped)
        self._fingerprint: str | None = None
        if len(self.labels) != len(self.files):
            raise ValueError(f"{len(self.labels)} labels for {len(self.files)} files")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and len(self.labels) > 0 and bool((self.labels >= 0).all())

    def _index(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return i

    def get_image(self, index: int) -> Image.Image:
        """The decoded RGB PIL image of item ``index`` (no transform)."""
        return self._load(self._index(index))

    def _load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        i = self._index(index)
        img = self._load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i]), i

    def class_counts(self) -> list[int]:
        """Images per class, in ``classes`` order (empty when unlabelled)."""
        if not self.classes:
            return []
        known = self.labels[self.labels >= 0]
        return np.bincount(known, minlength=len(self.classes)).astype(int).tolist()

    def fingerprint(self) -> str:
        """sha256 hex digest that changes when the images or their order change."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``compress-edge data info`` shows)."""
        return {
            "data": self.name,
            "kind": self.kind,
            "location": self.location,
            "images": len(self),
            "labelled": self.has_labels,
            "classes": [
                {"index": i, "name": c, "images": n}
                for i, (c, n) in enumerate(zip(self.classes, self.class_counts(), strict=True))
            ],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {len(self.classes)} classes)"


class FolderDataset(ImageDataset):
    """Images read from files found by :func:`compress_edge.data.images.scan_images`."""

    def __init__(
        self, name: str, root: Path, labelled: bool | None = None, transform=None, progress: bool | None = None
    ) -> None:
        scan = scan_images(root, labelled=labelled, progress=progress)
        self.kind = "class-folder" if scan.labelled else "image-folder"
        self.root = str(scan.root)
        super().__init__(
            name=name,
            classes=scan.classes,
            labels=np.asarray(scan.labels, dtype=np.int64),
            files=[str(p) for p in scan.files],
            location=self.root,
            transform=transform,
            skipped=scan.skipped,
        )

    def _load(self, i: int) -> Image.Image:
        return open_image(self.files[i])

    def _compute_fingerprint(self) -> str:
        # The resolved root rather than the DATA string, so "imgs" and "/abs/imgs/" agree; sizes and
        # mtimes catch an edited file without reading every byte again.
        h = hashlib.sha256()
        h.update(f"{self.kind}\0{os.path.realpath(self.root)}\0".encode("utf-8", "surrogateescape"))
        for path, label in zip(self.files, self.labels.tolist(), strict=True):
            st = os.stat(path)
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


class FashionMNISTDataset(ImageDataset):
    """Fashion-MNIST held in memory as uint8 (N, 28, 28); images come out as 28 x 28 RGB."""

    kind = "fashion-mnist"

    def __init__(self, split: str, folder: Path, transform=None) -> None:
        images_path, labels_path = _fmnist_files(folder, split)
        images, labels = _read_fmnist_pair(images_path, labels_path)
        self.split = split
        self.images = images
        self.idx_files = [str(images_path), str(labels_path)]
        super().__init__(
            name=f"{FASHION_MNIST}:{split}",
            classes=FASHION_MNIST_CLASSES,
            labels=labels.astype(np.int64),
            files=[f"{FASHION_MNIST}:{split}/{i:05d}" for i in range(len(labels))],
            location=str(folder),
            transform=transform,
        )

    def _load(self, i: int) -> Image.Image:
        # Grayscale to 3 equal channels, so every model takes RGB.
        return Image.fromarray(self.images[i]).convert("RGB")

    def _compute_fingerprint(self) -> str:
        # The IDX payload (not the .gz bytes): a recompressed copy of the same data agrees.
        h = hashlib.sha256()
        h.update(f"{self.name}\0{self.images.shape}\0".encode())
        h.update(hashlib.sha256(self.images.tobytes()).digest())
        h.update(hashlib.sha256(self.labels.astype(np.uint8).tobytes()).digest())
        return h.hexdigest()


def open_dataset(
    data: str,
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    transform: Callable[[Image.Image], Any] | None = None,
    verbose: bool = False,
    labelled: bool | None = None,
    progress: bool | None = None,
) -> ImageDataset:
    """Open a DATA argument (see the module docstring for the forms) as an :class:`ImageDataset`.

    data_root: where to look for Fashion-MNIST first (and where ``download`` writes it); a relative
    folder DATA that does not exist in the working directory is also looked up under it.
    download: fetch Fashion-MNIST when no copy is found. labelled: force a folder to be read as a
    class folder (True) or unlabelled (False); None decides from its layout. verbose: log what was
    opened at INFO level. progress: False hides the "checking images" bar a large folder shows
    (pass the command's --progress/--no-progress). Raises DataError naming the accepted forms for
    anything else.
    """
    if not isinstance(data, str) or not data.strip():
        raise DataError(f"DATA is empty; pass {ACCEPTED_DATA}")
    data = data.strip()
    base, at, count = data.rpartition("@")
    if at and count.isdigit():
        full = open_dataset(base, data_root=data_root, download=download, transform=transform, verbose=verbose,
                            labelled=labelled, progress=progress)
        return SubsetDataset(data, full, int(count))
    named = _parse_named(data)
    if named is not None:
        if labelled is False:
            raise DataError("fashion-mnist always has labels; leave the labels option at its default")
        folder = find_fashion_mnist(named, data_root)
        if folder is None:
            if not download:
                searched = ", ".join(str(d) for d in _search_bases(data_root))
                raise DataError(
                    f"Fashion-MNIST ({named} split) not found in {searched} (nor a fashion-mnist/ "
                    "subfolder of them); apt-get install dataset-fashion-mnist, or pass --download, "
                    "or --data-root DIR (a folder with the IDX files)"
                )
            folder = download_fashion_mnist(_download_dir(data_root))
        ds: ImageDataset = FashionMNISTDataset(named, folder, transform=transform)
    else:
        if download:
            raise DataError(f"--download only applies to fashion-mnist:train|test, and {data!r} is a folder")
        root = _resolve_folder(data, data_root)
        # True leaves the bar to folders large enough to need one; False means none at all.
        ds = FolderDataset(data, root, labelled=labelled, transform=transform,
                           progress=False if progress is False else None)
    if verbose:
        logger.info(
            "%s: %s with %d images, %d classes, from %s",
            ds.name,
            ds.kind,
            len(ds),
            len(ds.classes),
            ds.location,
        )
    return ds


class SubsetDataset(ImageDataset):
    """``count`` images of another dataset, drawn without replacement (seed 0), in their order; or the
    images at ``indices`` when given (``count`` is then ignored)."""

    def __init__(self, name: str, base: ImageDataset, count: int = 0, *, indices: Sequence[int] | None = None) -> None:
        if indices is None:
            if count < 1:
                raise DataError(f"{name}: the count after @ must be at least 1")
            if count > len(base):
                raise DataError(f"{name}: asks for {count} images but {base.name} has {len(base)}")
            indices = np.sort(np.random.default_rng(0).choice(len(base), size=count, replace=False))
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.kind = base.kind
        super().__init__(
            name=name,
            classes=base.classes,
            labels=base.labels[self.indices],
            files=[base.files[i] for i in self.indices],
            location=base.location,
            transform=base.transform,
            skipped=base.skipped,
        )
        if count:  # a DATA@N subset owns its base; a view by indices leaves it as it is
            base.transform = None

    def _load(self, i: int) -> Image.Image:
        return self.base._load(int(self.indices[i]))

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(self.indices.astype(np.int64).tobytes())
        return h.hexdigest()


def _parse_named(data: str) -> str | None:
    """The Fashion-MNIST split named by ``data``, or None when ``data`` is meant as a folder."""
    head, sep, split = data.partition(":")
    if head.lower() in (FASHION_MNIST, "fashion_mnist", "fashionmnist"):
        if not sep:
            raise DataError(f"say which split: {FASHION_MNIST}:train or {FASHION_MNIST}:test")
        split = split.lower()
        if split not in FASHION_MNIST_SPLITS:
            raise DataError(
                f"unknown Fashion-MNIST split {split!r}; pass {FASHION_MNIST}:train or {FASHION_MNIST}:test"
            )
        return split
    return None


def _resolve_folder(data: str, data_root: str | os.PathLike | None) -> Path:
    path = Path(os.path.expanduser(data))
    if not path.exists() and data_root is not None and not path.is_absolute():
        under = Path(os.path.expanduser(os.fspath(data_root))) / path
        if under.exists():
            path = under
    if not path.exists():
        if ":" in data and os.path.sep not in data.split(":", 1)[0]:
            raise DataError(f"unknown dataset {data!r}; DATA is {ACCEPTED_DATA}")
        raise DataError(f"no such folder: {data}; DATA is {ACCEPTED_DATA}")
    if not path.is_dir():
        raise DataError(f"{data} is a file, not a folder; DATA is {ACCEPTED_DATA}")
    return path


# -- Fashion-MNIST files -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """compress-edge's cache folder: $XDG_CACHE_HOME/compress-edge, default ~/.cache/compress-edge."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compress-edge"


def _search_bases(data_root: str | os.PathLike | None) -> list[Path]:
    bases: list[Path] = []
    if data_root is not None:
        bases.append(Path(os.path.expanduser(os.fspath(data_root))))
    if os.environ.get(DATA_ENV):
        bases.append(Path(os.path.expanduser(os.environ[DATA_ENV])))
    bases.append(cache_dir())
    return bases + list(SYSTEM_DATA_DIRS)


def fashion_mnist_dirs(data_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for Fashion-MNIST, in order.

    data_root, $COMPRESS_EDGE_DATA, the cache folder (each also with a fashion-mnist/ subfolder, and
    torchvision's FashionMNIST/raw/ so a copy it downloaded is found), then Debian's folder.
    """
    out: list[Path] = []
    for base in _search_bases(data_root):
        if base in SYSTEM_DATA_DIRS:
            out.append(base)
        else:
            out.extend([base, base / FASHION_MNIST, base / "FashionMNIST" / "raw"])
    return out


def find_fashion_mnist(split: str, data_root: str | os.PathLike | None = None) -> Path | None:
    """The first folder of :func:`fashion_mnist_dirs` that holds both IDX files of ``split``."""
    for folder in fashion_mnist_dirs(data_root):
        if _fmnist_files(folder, split, required=False) is not None:
            return folder
    return None


def _fmnist_files(folder: Path, split: str, required: bool = True):
    found = []
    for stem in _FMNIST_FILES[split]:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            if required:
                raise DataError(
                    f"{folder} lacks {stem}(.gz); pass --data-root DIR with the Fashion-MNIST files"
                )
            return None
    return tuple(found)


def _read_fmnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
            "the files are from different splits or damaged: delete them and pass --download"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{labels_path} has label {int(labels.max())}, Fashion-MNIST has 10 classes; "
            "the file is damaged: delete it and pass --download"
        )
    return images, labels


def read_idx(path: str | os.PathLike, what: str) -> np.ndarray:
    """Read a Fashion-MNIST IDX file (gzipped or raw) with torchvision's reader, as a read-only array.

    what: "images" (uint8 (N, rows, cols)) or "labels" (int64 (N,)). Raises DataError for a damaged
    file or one of the other kind.
    """
    if what not in ("images", "labels"):
        raise ValueError(f"what must be 'images' or 'labels', got {what!r}")
    path = Path(path)
    st = path.stat()
    return _read_idx_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, what)


@lru_cache(maxsize=4)
def _read_idx_cached(path: str, size: int, mtime_ns: int, what: str) -> np.ndarray:
    # Keyed on size and mtime: re-opening the same split (CLI, tests, eval after training) skips
    # the gunzip; a replaced file is read again.
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if what == "images" else read_label_file
    damaged = f"{path} is damaged"
    fix = "delete it and pass --download, or apt-get install --reinstall dataset-fashion-mnist"
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        if gzipped:
            # torchvision reads raw IDX files only (its download step unpacks them); Debian ships .gz.
            with tempfile.TemporaryDirectory(prefix="compress-edge-idx-") as tmp:
                raw = os.path.join(tmp, Path(path).stem)
                with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                tensor = reader(raw)
        else:
            tensor = reader(path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{damaged} ({_short(exc)}); {fix}") from None
    except (ValueError, TypeError) as exc:  # a readable IDX file of another shape or type
        raise DataError(f"{path} is not an IDX {what} file ({_short(exc)}); {fix}") from None
    except (AssertionError, RuntimeError, IndexError) as exc:  # header and payload disagree
        raise DataError(f"{damaged} ({_short(exc) or 'its header does not fit its data'}); {fix}") from None
    arr = tensor.numpy()
    arr.flags.writeable = False  # shared by every dataset opened on this file
    return arr


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _download_dir(data_root: str | os.PathLike | None) -> Path:
    if data_root is not None:
        return Path(os.path.expanduser(os.fspath(data_root))) / FASHION_MNIST
    if os.environ.get(DATA_ENV):
        return Path(os.path.expanduser(os.environ[DATA_ENV])) / FASHION_MNIST
    return cache_dir() / FASHION_MNIST


def fashion_mnist_urls() -> list[str]:
    """Base URLs to download from, in order ($COMPRESS_EDGE_FMNIST_URL, comma-separated, wins)."""
    env = os.environ.get(FMNIST_URL_ENV, "").strip()
    urls = [u.strip() for u in env.split(",") if u.strip()] if env else list(FASHION_MNIST_URLS)
    return [u if u.endswith("/") else u + "/" for u in urls]


def download_fashion_mnist(dest: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download the four Fashion-MNIST .gz files into ``dest`` and check them; returns ``dest``.

    Each file is tried from every base URL of :func:`fashion_mnist_urls` in turn, checked against
    the known md5 of the official file or the sha256 of its content, and renamed into place only
    when it is good. Files already in ``dest`` that check out are kept.
    """
    dest = Path(dest)
    urls = fashion_mnist_urls()
    for name in _FMNIST_GZ_MD5:
        target = dest / name
        if target.is_file() and _fmnist_checksum_ok(target, name):
            continue
        errors: list[str] = []
        for base in urls:
            url = base + name
            logger.info("downloading %s", url)
            try:
                with atomic_path(target) as tmp:
                    _fetch(url, tmp, timeout)
                    if not _fmnist_checksum_ok(tmp, name):
                        raise _ChecksumError(f"{url}: checksum mismatch")
            except (urllib.error.URLError, OSError, _ChecksumError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
                logger.debug("download failed: %s", errors[-1])
                continue
            break
        else:
            raise DataError(
                f"could not download {name} ({'; '.join(errors)}); check the network, set "
                f"{FMNIST_URL_ENV} to a mirror, or apt-get install dataset-fashion-mnist"
            )
    return dest


class _ChecksumError(Exception):
    pass


def _fetch(url: str, out: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "compress-edge"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(out, "wb") as fh:
        while block := response.read(1 << 20):
            fh.write(block)


def _fmnist_checksum_ok(path: Path, name: str) -> bool:
    with open(path, "rb") as fh:
        data = fh.read()
    if hashlib.md5(data, usedforsecurity=False).hexdigest() == _FMNIST_GZ_MD5[name]:
        return True
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return False
    return hashlib.sha256(raw).hexdigest() == _FMNIST_RAW_SHA256[name]


# -- image size and normalisation ------------------------------------------------------------------------


def default_normalisation(data: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std a model trained from scratch on DATA uses: Fashion-MNIST's own, else ImageNet's."""
    if data.startswith(FASHION_MNIST):
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


#: The automatic training size is a multiple of this, between these bounds.
SIZE_STEP, SIZE_MIN, SIZE_MAX = 32, 32, 224


def native_image_size(dataset: ImageDataset, *, sample: int = 256, seed: int = 0) -> int:
    """The training size that fits ``dataset``'s images: the median shorter side of up to ``sample``
    of them, rounded to the nearest multiple of 32 and kept within [32, 224] px. Upscaling small
    images only costs compute; downscaling large ones below 224 px loses what ImageNet-sized models
    see."""
    n = len(dataset)
    chosen = np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False) if n else []
    sides = [min(dataset.get_image(int(i)).size) for i in chosen]
    if not sides:
        return SIZE_MAX
    median = float(np.median(sides))
    return int(min(SIZE_MAX, max(SIZE_MIN, SIZE_STEP * round(median / SIZE_STEP))))


# -- transforms ----------------------------------------------------------------------------------------


class EvalTransform:
    """PIL image -> float32 tensor (3, S, S): exactly :func:`compress_edge.data.images.preprocess_eval`."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_eval(img, self.image_size, self.mean, self.std))

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> EvalTransform:
    """The eval preset (picklable): shorter side to S, centre crop, [0, 1], normalise."""
    return EvalTransform(image_size, mean, std)


@dataclass(frozen=True)
class _Slots:
    """Positions in the parameter vector of :class:`TrainAugment` (float32, length PARAM_DIM)."""

    top: int = 0  # crop box in source pixels
    left: int = 1
    height: int = 2
    width: int = 3
    flip: int = 4  # 1: horizontal flip
    jitter: int = 5  # 1: colour jitter applied
    brightness: int = 6  # jitter factors (1, 1, 1, 0 when not applied)
    contrast: int = 7
    saturation: int = 8
    hue: int = 9
    order: int = 10  # 10..13: the jitter operations' order, a permutation of 0..3
    gray: int = 14  # 1: to grayscale (3 channels)
    blur: int = 15  # gaussian blur sigma, 0: no blur
    src_width: int = 16  # size of the image the parameters were drawn for
    src_height: int = 17


SLOTS = _Slots()
PARAM_DIM = 18


class TrainAugment:
    """SimCLR / MoCo v2 training view with replayable randomness: PIL image -> tensor (3, S, S).

    Random resized crop (area ``scale``, aspect ``ratio``), horizontal flip (p ``flip_p``), colour
    jitter (brightness, contrast, saturation, hue) in random order with p ``jitter_p``, grayscale
    (p ``gray_p``), gaussian blur with sigma in ``blur_sigma`` (p ``blur_p``), then the same
    [0, 1] + mean/std conversion as the eval path. (Chen et al. 2020, SimCLR; Chen et al. 2020,
    "Improved Baselines with Momentum Contrastive Learning".)

    ``sample_params(rng, w, h)`` draws every random choice into a float32 vector (PARAM_DIM,);
    ``apply(img, params)`` is deterministic given it, so a teacher cache can store the parameters
    of each view and replay the very same view for the student. ``aug(img)`` samples with a
    generator seeded from torch's RNG, which DataLoader seeds per worker.
    """

    param_dim = PARAM_DIM

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= jitter[3] <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {jitter[3]}")
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(v) for v in jitter)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

    @classmethod
    def for_image_size(cls, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD, **overrides: Any) -> TrainAugment:
        """The SimCLR / MoCo v2 view with its blur scaled to the image: MoCo v2's sigma range (0.1, 2.0)
        px is for 224 px images, so at S px it is (0.1, 2.0) * S / 224; where even its largest sigma
        is under half a pixel (S < 56) there is no blur (it would only cost time). A sigma of 2 px on a
        32 px image would erase what tells fine classes apart."""
        k = float(image_size) / 224.0
        blur = (0.1 * k, 2.0 * k)
        settings: dict[str, Any] = {"blur_sigma": blur, "blur_p": 0.5 if blur[1] >= 0.5 else 0.0}
        return cls(image_size, mean, std, **{**settings, **overrides})

    # -- sampling --------------------------------------------------------------------------------------
    def sample_params(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """Draw one view's random choices for a ``width`` x ``height`` image: float32 (PARAM_DIM,)."""
        p = np.zeros(PARAM_DIM, dtype=np.float32)
        top, left, h, w = self._crop_box(rng, int(width), int(height))
        p[SLOTS.top], p[SLOTS.left], p[SLOTS.height], p[SLOTS.width] = top, left, h, w
        p[SLOTS.flip] = float(rng.random() < self.flip_p)
        b, c, s, hue = self.jitter
        # Always draw the same amount of randomness, so one choice does not shift the next ones.
        factors = (
            rng.uniform(max(0.0, 1 - b), 1 + b),
            rng.uniform(max(0.0, 1 - c), 1 + c),
            rng.uniform(max(0.0, 1 - s), 1 + s),
            rng.uniform(-hue, hue),
        )
        order = rng.permutation(4)
        if rng.random() < self.jitter_p:
            p[SLOTS.jitter] = 1.0
            p[SLOTS.brightness : SLOTS.hue + 1] = factors
        else:
            p[SLOTS.brightness : SLOTS.hue + 1] = (1.0, 1.0, 1.0, 0.0)
        p[SLOTS.order : SLOTS.order + 4] = order
        p[SLOTS.gray] = float(rng.random() < self.gray_p)
        sigma = rng.uniform(*self.blur_sigma)
        p[SLOTS.blur] = sigma if rng.random() < self.blur_p else 0.0
        p[SLOTS.src_width], p[SLOTS.src_height] = width, height
        return p

    def _crop_box(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, drawing from a numpy generator.
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    # -- applying ---------------------------------------------------------------------------------------
    def apply(self, img: Image.Image, params: np.ndarray, *, drawn_at: int | None = None) -> torch.Tensor:
        """Build the view described by ``params`` (from :meth:`sample_params`): float32 (3, S, S).

        The crop is in source pixels and the colour changes have no size, so the same params give the
        same view at any output size S; ``drawn_at`` is the output size the params were drawn for
        (default S), and the blur's sigma, drawn in its pixels, is scaled to S.
        """
        p = np.asarray(params, dtype=np.float32)
        if p.shape != (PARAM_DIM,):
            raise ValueError(f"params must have shape ({PARAM_DIM},), got {p.shape}")
        if img.mode != "RGB":
            img = to_rgb(img)
        if (int(p[SLOTS.src_width]), int(p[SLOTS.src_height])) != img.size:
            raise ValueError(
                f"params were drawn for a {int(p[SLOTS.src_width])}x{int(p[SLOTS.src_height])} image, "
                f"this one is {img.size[0]}x{img.size[1]}"
            )
        size = [self.image_size, self.image_size]
        img = TF.resized_crop(
            img,
            int(p[SLOTS.top]),
            int(p[SLOTS.left]),
            int(p[SLOTS.height]),
            int(p[SLOTS.width]),
            size,
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=True,
        )
        if p[SLOTS.flip] > 0.5:
            img = TF.hflip(img)
        if p[SLOTS.jitter] > 0.5:
            ops = (
                lambda x: TF.adjust_brightness(x, float(p[SLOTS.brightness])),
                lambda x: TF.adjust_contrast(x, float(p[SLOTS.contrast])),
                lambda x: TF.adjust_saturation(x, float(p[SLOTS.saturation])),
                lambda x: TF.adjust_hue(x, float(p[SLOTS.hue])),
            )
            for k in p[SLOTS.order : SLOTS.order + 4].astype(int):
                img = ops[k](img)
        if p[SLOTS.gray] > 0.5:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p[SLOTS.blur] > 0:
            # PIL's blur, as MoCo v2 does: the radius is the sigma.
            scale = self.image_size / float(drawn_at) if drawn_at else 1.0
            img = img.filter(ImageFilter.GaussianBlur(radius=float(p[SLOTS.blur]) * scale))
        return torch.from_numpy(to_normalized_array(img, self.mean, self.std))

    def sample_and_apply(
        self, img: Image.Image, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """One random view and the parameters that rebuild it: (float32 (3, S, S), (PARAM_DIM,))."""
        if rng is None:
            rng = _torch_seeded_rng()
        params = self.sample_params(rng, *img.size)
        return self.apply(img, params), params

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.sample_and_apply(img)[0]

    def __repr__(self) -> str:
        return (
            f"TrainAugment(image_size={self.image_size}, scale={self.scale}, flip_p={self.flip_p}, "
            f"jitter={self.jitter}, jitter_p={self.jitter_p}, gray_p={self.gray_p}, "
            f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma})"
        )


def _torch_seeded_rng() -> np.random.Generator:
    # Drawn from torch's RNG so torch.manual_seed and DataLoader's per-worker seeds decide the views.
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return np.random.default_rng(seed)


# -- loading -------------------------------------------------------------------------------------------


def default_loader_workers() -> int:
    """DataLoader worker processes: the cores less one for the main process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0, then: Callable[[int], None] | None = None) -> None:
    """A loader worker's first act: ignore SIGINT and SIGTERM, then run ``then(worker_id)``.

    Ctrl-C, ``kill -TERM -- -PGID`` and ``docker stop`` signal the whole process group; the main
    process decides what a stop means (finish the step, save, exit) and ends its workers itself. The
    worker starts with both signals held (:class:`StopSafeLoader`); ignoring them drops any that
    arrived meanwhile, and only then are they released.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if then is not None:
        then(worker_id)


class StopSafeLoader(DataLoader):
    """A DataLoader whose worker processes leave Ctrl-C and SIGTERM to the main process.

    A worker forked while a stop signal reaches the process group would otherwise die of it in the
    moment between its start and its ``worker_init_fn`` (torch's worker handler re-raises a SIGTERM
    that its parent did not send), and the run would end in "DataLoader worker exited unexpectedly"
    instead of stopping cleanly. So the signals are held (blocked, not lost) while workers start;
    the main process gets them as soon as its workers exist, the workers never.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = partial(ignore_stop_signals, then=kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int | None = None,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    pin_memory: bool | None = None,
    *,
    seed: int | None = None,
    collate_fn: Callable | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader with defaults that fit this package.

    workers=None: :func:`default_loader_workers`; workers > 0 keeps them alive between epochs
    (persistent) and prefetches. pin_memory=None: pinned when CUDA is available. A ``sampler``
    (e.g. DistributedSampler) replaces ``shuffle``. ``seed`` fixes the shuffling order.
    ``worker_init_fn`` runs in each worker process as it starts; workers ignore stop signals
    (:class:`StopSafeLoader`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    workers = default_loader_workers() if workers is None else int(workers)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return StopSafeLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn,
        **kwargs,
    )
