"""Fashion-MNIST's files: where a copy is found, reading its IDX files, downloading it (no torch to import).

The four IDX files (gzipped or raw) are looked for in ``--data-root``, $COMPRESS_EDGE_DATA, the cache
folder (each also with a ``fashion-mnist/`` subfolder and torchvision's ``FashionMNIST/raw/``), then
Debian's ``/usr/share/datasets/fashion-mnist``. They are read with torchvision's reader, imported only
when a file is read, so this module loads where torch is not installed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from compress_edge.data.grammar import FASHION_MNIST
from compress_edge.errors import DataError
from compress_edge.storage import atomic_path

logger = logging.getLogger(__name__)

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


def fashion_mnist_folder(split: str, data_root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder that holds ``split``'s IDX files (:func:`find_fashion_mnist`); with ``download``, a
    missing copy is downloaded into ``data_root`` (else $COMPRESS_EDGE_DATA, else the cache folder).
    Raises DataError naming the folders searched and the fixes."""
    folder = find_fashion_mnist(split, data_root)
    if folder is not None:
        return folder
    if not download:
        searched = ", ".join(str(d) for d in _search_bases(data_root))
        raise DataError(
            f"Fashion-MNIST ({split} split) not found in {searched} (nor a fashion-mnist/ "
            "subfolder of them); apt-get install dataset-fashion-mnist, or pass --download, "
            "or --data-root DIR (a folder with the IDX files)"
        )
    return download_fashion_mnist(_download_dir(data_root))


def read_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``split`` read from ``folder``: images uint8 (N, 28, 28), labels int64 (N,) and the two IDX
    files' paths. Raises DataError when the files are missing, damaged or do not match."""
    images_path, labels_path = _fmnist_files(folder, split)
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
    return images, labels, [str(images_path), str(labels_path)]


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
