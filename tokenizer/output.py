"""Outputs are written to a temporary sibling and renamed into place only when complete.

A crash or an error therefore never leaves a half-written folder under the final name, and an existing output is only
replaced at the very end of a successful run (and only with ``overwrite``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError, OutputExistsError

# Files whose presence marks a folder as one of ours, so ``overwrite`` never deletes an unrelated folder.
_MARKERS = ("vocab.json", "manifest.json", "sketch.npz", "state.json", "gene_stats.parquet")


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early when ``path`` exists and may not be replaced."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
        if path.is_dir() and any(path.iterdir()) and not any((path / m).exists() for m in _MARKERS):
            raise InputError(f"refusing to replace {path}: it is a non-empty folder that is not an express output")
    return path


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it becomes ``path``, on error it is removed."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Like :func:`staged_dir` for a single file."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _replace(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _replace(tmp: Path, path: Path, overwrite: bool) -> None:
    check_output(path, overwrite)  # it may have appeared while we were working
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
