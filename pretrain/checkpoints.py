"""Checkpoints of a training run: atomic, verified, resumable.

:func:`save_checkpoint` writes into a temporary folder (:func:`tokenizer.output.staged_dir`), fsyncs every file,
records sizes and SHA-256 sums in ``checkpoint.json``, writes the ``COMPLETE`` marker last and renames the folder into
place, so a process killed mid-write leaves only a hidden temporary folder that is never taken for a checkpoint.
:func:`load_checkpoint` verifies all of it before touching the model and raises :class:`CheckpointError` with what is
wrong; :func:`latest_checkpoint` and :func:`rotate_checkpoints` manage ``checkpoint-<step>`` folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenizer.output import is_temporary, staged_dir

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_INDEX = "checkpoint.json"
TRAINER_STATE = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder (complete or not), by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest-step checkpoint with a ``COMPLETE`` marker (incomplete ones are skipped with a warning)."""
    for step, path in reversed(list_checkpoints(output_dir)):
        if (path / COMPLETE_MARKER).is_file():
            return path
        logger.warning("skipping %s: it has no %s marker (its writing was interrupted)", path, COMPLETE_MARKER)
    return None


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int | None) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, and hidden leftovers of interrupted writes."""
    output_dir = Path(output_dir)
    for leftover in output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
        if is_temporary(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    if keep_last is None or keep_last <= 0:
        return
    complete = [p for _, p in list_checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()]
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _json_dump(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def save_model_weights(model: torch.nn.Module, directory: Path, *, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (config + safetensors) when the model has it, else a bare ``model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, state_dict=state_dict)
    else:
        import safetensors.torch

        tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
        safetensors.torch.save_file(tensors, str(directory / MODEL_WEIGHTS))


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load weights written by :func:`save_model_weights` (single file or a sharded index) into ``model``.

    Keys absent from the files are accepted only when the model ties them to a loaded tensor (``save_pretrained``
    stores tied weights once); anything else missing or unexpected raises :class:`CheckpointError`.
    """
    import safetensors.torch

    directory = Path(directory)
    index = directory / f"{MODEL_WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / MODEL_WEIGHTS).is_file():
        files = [MODEL_WEIGHTS]
    else:
        raise CheckpointError(f"{directory} holds no {MODEL_WEIGHTS}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(safetensors.torch.load_file(str(directory / name)))
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"weights in {directory} do not fit the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]} (was it saved from a different architecture or config?)"
        )


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    trainer_state: Mapping[str, Any], rng_states: Sequence[Mapping[str, Any]] = (),
                    model_state_dict: dict | None = None, extra: Any = None) -> Path:
    """Atomically write a resumable checkpoint folder; call it from one process only.

    Contents: the model (``save_pretrained`` layout, so ``--init_from`` / ``from_pretrained`` can read it),
    ``optimizer.pt``, ``scheduler.json``, ``rng_state_<rank>.pt`` per process, ``trainer_state.json``, whatever
    ``extra(tmp_dir)`` writes (e.g. the vocabulary), then ``checkpoint.json`` (size and SHA-256 of every file) and
    finally ``COMPLETE``.
    """
    directory = Path(directory)
    with staged_dir(directory, overwrite=True, durable=True) as tmp:
        save_model_weights(model, tmp, state_dict=model_state_dict)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            _json_dump(scheduler.state_dict(), tmp / "scheduler.json")
        for rank, state in enumerate(rng_states):
            torch.save(dict(state), tmp / f"rng_state_{rank}.pt")
        _json_dump(dict(trainer_state), tmp / TRAINER_STATE)
        if extra is not None:
            extra(tmp)
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _json_dump({"format": 1, "files": files}, tmp / CHECKPOINT_INDEX)
        (tmp / COMPLETE_MARKER).write_text("complete\n")  # last: a folder without it is never taken for a checkpoint
    logger.info("saved checkpoint %s", directory)
    return directory


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint folder is complete and unaltered; return its trainer state, or raise
    :class:`CheckpointError` saying what is wrong."""
    directory = Path(directory)
    advice = (f"Delete {directory} to resume from the checkpoint before it, or pass another one with --resume_from.")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {COMPLETE_MARKER} marker: its writing was "
                              f"interrupted). {advice}")
    try:
        index = json.loads((directory / CHECKPOINT_INDEX).read_text())
        files = index["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {directory} has no readable {CHECKPOINT_INDEX} ({err}). {advice}") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} is missing. {advice}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} has {size} bytes, "
                                  f"{expected['size']} were written. {advice}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} does not match the checksum recorded "
                                  f"when it was written. {advice}")
    if TRAINER_STATE not in files:
        raise CheckpointError(f"checkpoint {directory} lacks {TRAINER_STATE}. {advice}")
    return json.loads((directory / TRAINER_STATE).read_text())


def load_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Verify then load a checkpoint; return ``(trainer_state, rng_state of this rank or None)``.

    Everything is verified (:func:`verify_checkpoint`) before the model or optimizer is modified. Files are read
    with ``torch.load(weights_only=True)`` (no pickled code runs).
    """
    directory = Path(directory)
    trainer_state = verify_checkpoint(directory)
    try:
        optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True) \
            if optimizer is not None else None
        scheduler_state = json.loads((directory / "scheduler.json").read_text()) if scheduler is not None else None
        rng_file = directory / f"rng_state_{rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {directory} lacks {Path(err.filename).name}, which resuming needs") from None
    except Exception as err:  # noqa: BLE001 - any unreadable state means the checkpoint is unusable
        raise CheckpointError(f"checkpoint {directory} could not be read: {type(err).__name__}: {err}") from err
    load_model_weights(model, directory)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"optimizer state in {directory} does not fit this model/optimizer: {err}") from err
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    return trainer_state, rng
