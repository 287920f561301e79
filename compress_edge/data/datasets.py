"""The datasets a DATA argument opens (torch ``Dataset``s): image folders, Fashion-MNIST, subsets.

:func:`open_dataset` reads DATA with the one grammar (:mod:`compress_edge.data.grammar`): a class
folder, an unlabelled image folder, ``fashion-mnist:train|test``, each optionally ``@N``.

Every dataset yields ``(image, label, index)``: the index lets a teacher cache and the CompRess
memory bank address a sample; ``label`` is -1 when there are none. Transforms are in
:mod:`compress_edge.data.transforms`, loaders in :mod:`compress_edge.data.loaders`.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from compress_edge.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_folder, read_fashion_mnist
from compress_edge.data.grammar import FASHION_MNIST, dataset_id, parse_data, resolve_folder
from compress_edge.data.images import open_image, scan_images
from compress_edge.errors import DataError

logger = logging.getLogger(__name__)


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
        images, labels, self.idx_files = read_fashion_mnist(folder, split)
        self.split = split
        self.images = images
        super().__init__(
            name=f"{FASHION_MNIST}:{split}",
            classes=FASHION_MNIST_CLASSES,
            labels=labels.astype(np.int64),
            files=[dataset_id(split, i) for i in range(len(labels))],
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
    """Open a DATA argument (:mod:`compress_edge.data.grammar` has the forms) as an :class:`ImageDataset`.

    data_root: where to look for Fashion-MNIST first (and where ``download`` writes it); a relative
    folder DATA that does not exist in the working directory is also looked up under it.
    download: fetch Fashion-MNIST when no copy is found. labelled: force a folder to be read as a
    class folder (True) or unlabelled (False); None decides from its layout. verbose: log what was
    opened at INFO level. progress: False hides the "checking images" bar a large folder shows
    (pass the command's --progress/--no-progress). Raises DataError naming the accepted forms for
    anything else.
    """
    arg = parse_data(data)
    if arg.count is not None:
        full = open_dataset(arg.base, data_root=data_root, download=download, transform=transform, verbose=verbose,
                            labelled=labelled, progress=progress)
        return SubsetDataset(arg.text, full, arg.count)
    if arg.split is not None:
        if labelled is False:
            raise DataError("fashion-mnist always has labels; leave the labels option at its default")
        folder = fashion_mnist_folder(arg.split, data_root, download)
        ds: ImageDataset = FashionMNISTDataset(arg.split, folder, transform=transform)
    else:
        if download:
            raise DataError(f"--download only applies to fashion-mnist:train|test, and {arg.text!r} is a folder")
        root = resolve_folder(arg.text, data_root)
        # True leaves the bar to folders large enough to need one; False means none at all.
        ds = FolderDataset(arg.text, root, labelled=labelled, transform=transform,
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
