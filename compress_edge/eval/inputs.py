"""What every evaluation protocol checks about its inputs: the class labels (:func:`require_labels`,
:func:`num_classes`) and the problem size (:data:`SMALL_PROBLEM`). numpy only."""

from __future__ import annotations

import numpy as np

from compress_edge.errors import DataError

#: Feature arrays up to this many elements are fitted (linear probe) or clustered (k-means) on one CPU
#: thread: on a small problem, waking a second thread for each of many short steps costs more than it saves.
SMALL_PROBLEM = 1 << 22


def count_classes(*label_sets: np.ndarray, given: int | None = None) -> int:
    """``given`` when set, else one more than the highest label of ``label_sets``."""
    if given is not None:
        return int(given)
    highest = max((int(y.max()) for y in label_sets if len(y)), default=-1)
    return highest + 1


def require_labels(labels: np.ndarray, what: str) -> None:
    """Refuse images without class labels (any label -1, or none at all)."""
    if len(labels) == 0 or (labels < 0).any():
        raise DataError(f"the {what} images need class labels (a class folder DIR/<class>/<image> or "
                        "fashion-mnist); unlabelled images cannot be scored")
