"""Exceptions for bad user input.

Everything the user can fix (a log-normalised matrix, a missing obs column, an existing output folder, a file that is
not an h5ad) raises a subclass of :class:`InputError` with a message that says what is wrong, where, and what to do.
The CLI turns these into one-line messages and exit code 2; anything else is a bug (exit code 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input the user can fix (bad values, missing columns, unreadable files, conflicting options)."""


class InvalidCountsError(InputError):
    """The count matrix holds negative, NaN/inf or (without ``allow_non_integer``) non-integer values."""


class CorruptFileError(InputError):
    """A file that is not a readable h5ad (or not the expected JSON/Parquet/npz)."""


class OutputExistsError(InputError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


class VocabularyMismatchError(InputError):
    """Datasets (or a dataset and a model) were tokenized with different vocabularies."""


class DatasetFormatError(InputError):
    """A folder is not a tokenized dataset, or lacks columns a task needs."""


def run_cli(prog: str, body: Callable[[], object], *, debug: bool = False) -> int:
    """Run a command-line tool's body and return its exit code, the same way for every express command.

    0 on success; bad input the user can fix (:class:`InputError`, a missing or existing file) gives a one-line
    message and 2; Ctrl-C gives 130; anything else is a bug: a one-line message and 1. ``debug`` re-raises instead,
    with the traceback.
    """
    try:
        body()
    except SystemExit as exit_:  # argparse's usage errors (2, after printing their message) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 1
    except (InputError, FileNotFoundError, FileExistsError) as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command-line tool
        if debug:
            raise
        print(f"{prog}: unexpected error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0
