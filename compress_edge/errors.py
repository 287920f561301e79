"""Exception types. Library code raises them with a message that names the fix; only the CLI turns
them into a one-line message and an exit code."""

from __future__ import annotations


class CompressEdgeError(Exception):
    """A problem the user can fix: bad input, a missing file or package, a mismatch.

    The message is one sentence that says what went wrong and what to do about it.
    """


class DataError(CompressEdgeError):
    """A dataset argument or its files are unusable."""


class ModelError(CompressEdgeError):
    """An unknown architecture, a bad checkpoint, weights that do not fit."""


class SpecMismatchError(CompressEdgeError):
    """Two artifacts were made with different models (an index queried with another model)."""


class DependencyError(CompressEdgeError):
    """An optional package is missing; the message names the extra that installs it."""


class ExportError(CompressEdgeError):
    """An export, a parity check or an engine build failed."""


class IndexFileError(CompressEdgeError):
    """A retrieval index is damaged, of the wrong kind for an operation, or missing."""


class TrainingError(CompressEdgeError):
    """Training cannot go on (non-finite loss, a run folder that does not fit the options)."""
