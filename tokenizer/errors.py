"""Exceptions for bad user input.

Everything the user can fix (a log-normalised matrix, a missing obs column, an existing output folder, a file that is
not an h5ad) raises a subclass of :class:`InputError` with a message that says what is wrong, where, and what to do.
The CLI turns these into one-line messages and exit code 2; anything else is a bug (exit code 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input the user can fix (bad values, missing columns, unreadable files, conflicting options)."""


class InvalidCountsError(InputError):
    """The count matrix holds negative, NaN/inf or (without ``allow_non_integer``) non-integer values."""


class CorruptFileError(InputError):
    """A file that is not a readable h5ad (or not the expected JSON/Parquet/npz)."""


class OutputExistsError(InputError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""
