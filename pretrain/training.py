"""Training pieces shared by pretraining and fine-tuning.

- command line: :func:`build_parser` / :func:`parse_args` turn one documented dataclass into CLI flags (with dashed
  aliases and a ``--config FILE`` option, JSON or YAML);
- :func:`seed_everything`, :func:`rng_state` / :func:`set_rng_state`;
- :func:`build_optimizer` (AdamW, no weight decay on biases and norms, fused on GPU) and :func:`build_scheduler`
  (linear warmup, then cosine, linear or constant);
- checkpoints: :func:`save_checkpoint` writes into a temporary folder, fsyncs every file, records sizes and SHA-256
  sums in ``checkpoint.json``, writes the ``COMPLETE`` marker last and renames the folder into place, so a process
  killed mid-write leaves only a hidden ``.tmp-*`` folder that is never taken for a checkpoint;
  :func:`load_checkpoint` verifies all of it before touching the model and raises :class:`CheckpointError` with
  what is wrong; :func:`latest_checkpoint` and :func:`rotate_checkpoints` manage ``checkpoint-<step>`` folders;
- :func:`atomic_directory`, the temp-then-rename folder writer used for checkpoints and final model folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import types
import typing
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Dataclass -> command line
# ---------------------------------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _bool_value(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def build_parser(cls: type, *, description: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with one flag per field of the dataclass ``cls``.

    ``field(metadata={"help": ...})`` gives the help text. ``--some_name`` and ``--some-name`` are both accepted.
    ``bool`` fields become ``--flag`` / ``--no-flag``; ``list[X]`` fields take one or more values and may be repeated
    (``--dataset A --dataset B`` or ``--dataset A B``); ``Literal`` fields list their choices. Every parser also has
    ``--config FILE`` (JSON or YAML mapping of field names to values) whose values the command line overrides.
    """
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON or YAML file of arguments; flags given on the command line take precedence")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", " ")}
        default = _field_default(f)
        if default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default to become a command-line flag")
        kwargs["default"] = default
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple, Sequence):
            (item,) = typing.get_args(tp)[:1] or (str,)
            kwargs.update(nargs="+", action="extend", type=item, default=None)
            kwargs["help"] += f" (default: {default})"
        elif origin is typing.Literal:
            choices = typing.get_args(tp)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported argument type {tp!r}")
        if optional and "type" in kwargs and tp is not str:
            inner = kwargs["type"]
            kwargs["type"] = lambda text, inner=inner: None if text.lower() in ("none", "null") else inner(text)
        parser.add_argument(*names, **kwargs)
    return parser


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) mapping of argument names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON ({err}); YAML files need a .yaml suffix") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of argument names to values, not {type(data)}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(cls: type, argv: Sequence[str] | None = None, *, description: str | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls`` (:func:`build_parser`)."""
    parser = build_parser(cls, description=description)
    known, _ = parser.parse_known_args(argv)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    config = load_config_file(known.config) if known.config else {}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        parser.error(f"unknown keys in {known.config}: {unknown}; valid keys are the flags in --help")
    scalar_config = {k: v for k, v in config.items() if not isinstance(v, list)}
    parser.set_defaults(**scalar_config)
    namespace = parser.parse_args(argv)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        value = getattr(namespace, name)
        is_list = typing.get_origin(_unwrap_optional(hints[name])[0]) in (list, tuple, Sequence)
        if is_list:
            if value is None and name in config:
                value = config[name]
            if value is None:
                value = _field_default(f)
            if isinstance(value, str):  # a single value in a config file
                value = [value]
        values[name] = value
    return cls(**values)


def args_to_dict(args: Any) -> dict[str, Any]:
    """A dataclass of arguments as a JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and random states
# ---------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global random states (Python, NumPy, torch CPU and CUDA), ready for ``torch.save``."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norm scales and other vectors are not decayed).

    ``fused=None`` uses the fused CUDA kernel when every parameter is on a GPU.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, kind: str = "cosine",
                  min_lr_ratio: float = 0.0) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup_steps``, then
    ``cosine``/``linear`` decay to ``min_lr_ratio`` at ``total_steps``, or ``constant``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                    kind: str = "cosine", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule of :func:`lr_multiplier` (step it once per optimizer step)."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind,
                             min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------------------
# Atomic folders and checkpoints
# ---------------------------------------------------------------------------------------------------------------------

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_INDEX = "checkpoint.json"
TRAINER_STATE = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = True, marker: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success fsync its files, write ``COMPLETE`` (when ``marker``)
    and rename it to ``final`` (replacing an existing ``final`` only when ``overwrite``). On error the temporary
    folder is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists")
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_file(path)
        if marker:
            (tmp / COMPLETE_MARKER).write_text("complete\n")
            _fsync_file(tmp / COMPLETE_MARKER)
        _fsync_dir(tmp)
        if final.exists():
            old = final.parent / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    for leftover in output_dir.glob(f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}*"):
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
    with atomic_directory(directory) as tmp:
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
