"""Every output of express is written to a temporary sibling and renamed into place only when complete.

A crash or an error therefore never leaves a half-written file or folder under the final name, and an existing output
is only replaced at the very end of a successful run (and only with ``overwrite``). This module is the one home of that
mechanism: the tokenizer, pretraining checkpoints, model folders and fine-tuning outputs all use it.

Files are created with the permissions the user's umask gives any other file (``tempfile.mkstemp`` would make them
private, 0600), so a lab-mate can read a model on a shared filesystem.
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
_MARKERS = ("vocab.json", "manifest.json", "sketch.npz", "state.json", "gene_stats.parquet", "metrics.json",
            "training_args.json", "COMPLETE")


def _temporary(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a leftover of an interrupted write (a hidden ``.NAME.tmp-XXXXXXXX`` sibling)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early when ``path`` exists and may not be replaced (or is a non-empty folder that is not ours)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
        if path.is_dir() and any(path.iterdir()) and not any((path / m).exists() for m in _MARKERS):
            raise InputError(f"refusing to replace {path}: it is a non-empty folder that is not an express output")
    return path


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, *, overwrite: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it becomes ``path``, on error it is removed.

    ``durable``: fsync every file and the folders before the rename (checkpoints, which must survive a power cut).
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.mkdir()
    try:
        yield tmp
        if durable:
            for item in sorted(tmp.rglob("*")):
                if item.is_file():
                    _fsync(item)
            _fsync(tmp)
        _replace(tmp, path, overwrite)
        if durable:
            _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Like :func:`staged_dir` for a single file: yield a temporary path to write to."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        _replace(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` through a temporary sibling (replacing what was there)."""
    path = Path(path)
    with staged_file(path, overwrite=True) as tmp:
        with open(tmp, "xb") as f:
            f.write(payload)
    return path


def _replace(tmp: Path, path: Path, overwrite: bool) -> None:
    check_output(path, overwrite)  # it may have appeared while we were working
    old = None
    if path.exists() or path.is_symlink():
        old = _temporary(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
