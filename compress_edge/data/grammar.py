"""The DATA grammar: what a DATA argument names, parsed in one place (stdlib only, no torch).

A DATA argument is one of:

- a class folder ``ROOT/<class>/<image>`` (labels from the sorted folder names, as ImageFolder);
- an unlabelled image folder (read recursively);
- ``fashion-mnist:train`` or ``fashion-mnist:test`` (also spelt ``fashion_mnist`` / ``fashionmnist``,
  any case);
- any of these followed by ``@N``: N of its images, drawn without replacement with a fixed seed and
  kept in their original order (``fashion-mnist:train@10000``), for quick runs on a small machine.

A relative folder that does not exist in the working directory is looked up under ``--data-root``.
A Fashion-MNIST image is recorded by its dataset id, ``fashion-mnist:<split>/<index, 5 digits>``
(:func:`dataset_id`), read back by :func:`parse_dataset_id`.

Used by :func:`compress_edge.data.datasets.open_dataset` (training, evaluation, ``data info``) and by
:func:`compress_edge.retrieval.shards.open_gallery` (the images an index is built from, which also
accepts image files), so both read a DATA argument the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compress_edge.errors import DataError

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_SPLITS = ("train", "test")
# Every spelling of the dataset's name before the ":".
_FASHION_MNIST_NAMES = (FASHION_MNIST, "fashion_mnist", "fashionmnist")

ACCEPTED_DATA = (
    "a class folder (DIR/<class>/<image>), an unlabelled image folder, "
    "fashion-mnist:train or fashion-mnist:test"
)


@dataclass(frozen=True)
class DataArg:
    """A parsed DATA argument.

    text: the argument, stripped. base: what ``@N`` draws from (``text`` itself without ``@N``).
    count: the N of a trailing ``@N``, else None. split: the Fashion-MNIST split it names (through
    any ``@N``), None when it is a folder.
    """

    text: str
    base: str
    count: int | None
    split: str | None


def parse_data(data: str) -> DataArg:
    """Parse a DATA argument (see the module docstring); raises DataError for an empty one, a
    Fashion-MNIST name without a split or with an unknown one."""
    if not isinstance(data, str) or not data.strip():
        raise DataError(f"DATA is empty; pass {ACCEPTED_DATA}")
    text = data.strip()
    base, at, count = text.rpartition("@")
    if at and count.isdecimal():  # not isdigit(): int() refuses "²"
        return DataArg(text=text, base=base, count=int(count), split=parse_data(base).split)
    return DataArg(text=text, base=text, count=None, split=fashion_mnist_split(text))


def names_dataset(data: str) -> bool:
    """Whether ``data`` names a dataset (``fashion-mnist:...``) rather than a file or folder."""
    return data.partition(":")[0].lower() in _FASHION_MNIST_NAMES


def fashion_mnist_split(data: str) -> str | None:
    """The Fashion-MNIST split named by ``data``, or None when ``data`` is meant as a folder."""
    if not names_dataset(data):
        return None
    _, sep, split = data.partition(":")
    if not sep:
        raise DataError(f"say which split: {FASHION_MNIST}:train or {FASHION_MNIST}:test")
    split = split.lower()
    if split not in FASHION_MNIST_SPLITS:
        raise DataError(
            f"unknown Fashion-MNIST split {split!r}; pass {FASHION_MNIST}:train or {FASHION_MNIST}:test"
        )
    return split


def dataset_id(split: str, index: int) -> str:
    """The id that records image ``index`` of a Fashion-MNIST split ("fashion-mnist:train/00042")."""
    return f"{FASHION_MNIST}:{split}/{index:05d}"


def is_dataset_id(file: str) -> bool:
    """Whether a recorded file is a dataset id (see :func:`dataset_id`) rather than a path."""
    return file.lower().startswith(f"{FASHION_MNIST}:")


def parse_dataset_id(file: str) -> tuple[str, int] | None:
    """The split and index a dataset id records ("fashion-mnist:test/00042" -> ("test", 42)); None when
    ``file`` is not a dataset id or is a malformed one (an unknown split, a missing or non-digit index,
    anything after it). The name and split are read in any case; the index is one or more digits."""
    if not isinstance(file, str) or not is_dataset_id(file):
        return None
    split, sep, number = file[len(FASHION_MNIST) + 1 :].partition("/")
    split = split.lower()
    if not sep or split not in FASHION_MNIST_SPLITS or not number.isdecimal():
        return None
    return split, int(number)


def resolve_path(data: str, data_root: str | os.PathLike | None) -> Path:
    """The file or folder a path DATA names: ``~`` expanded; a relative path that does not exist
    here is taken under ``data_root`` when it exists there. Not checked to exist."""
    path = Path(os.path.expanduser(data))
    if not path.exists() and data_root is not None and not path.is_absolute():
        under = Path(os.path.expanduser(os.fspath(data_root))) / path
        if under.exists():
            path = under
    return path


def absolute_if_exists(ref: str) -> str:
    """A path that exists, made absolute (``~`` expanded), as run folders, caches and index sidecars
    record what they were made from; anything else (an architecture name, a missing file) as given."""
    path = Path(os.path.expanduser(ref))
    return str(path.resolve()) if path.exists() else ref


def absolute_data(data: str, data_root: str | os.PathLike | None = None) -> str:
    """``data`` with its folder made absolute (any ``@N`` kept), as a run folder records it so that
    ``--resume`` finds the images from any working directory; a dataset name, or a path that does not
    exist (here or under ``data_root``), is returned as given."""
    arg = parse_data(data)
    if arg.split is not None:
        return data
    path = resolve_path(arg.base, data_root)
    if not path.exists():
        return data
    return str(path.resolve()) + arg.text[len(arg.base):]


def resolve_folder(data: str, data_root: str | os.PathLike | None) -> Path:
    """The folder a folder DATA names (:func:`resolve_path`); raises DataError naming the accepted
    forms when it is missing, a file, or an unknown ``name:...`` dataset."""
    path = resolve_path(data, data_root)
    if not path.exists():
        if ":" in data and os.path.sep not in data.split(":", 1)[0]:
            raise DataError(f"unknown dataset {data!r}; DATA is {ACCEPTED_DATA}")
        raise DataError(f"no such folder: {data}; DATA is {ACCEPTED_DATA}")
    if not path.is_dir():
        raise DataError(f"{data} is a file, not a folder; DATA is {ACCEPTED_DATA}")
    return path
