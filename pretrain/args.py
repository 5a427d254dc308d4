"""Command lines from one documented dataclass of arguments (``transformers.HfArgumentParser``), plus ``--config``.

``field(metadata={"help": ...})`` gives the help text; ``--some_name`` and ``--some-name`` are both accepted;
``bool`` fields take ``--flag`` / ``--no_flag``; ``list[X]`` fields take one or more values and may be repeated
(``--dataset A --dataset B``); ``Literal`` fields list their choices. ``--config FILE`` reads any of the arguments
from a JSON or YAML mapping, and flags given on the command line take precedence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from tokenizer.errors import InputError


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) mapping of argument names to values."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"config file {path} is not valid JSON ({err}); YAML files need a .yaml suffix") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of argument names to values, not {type(data)}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser(cls: type, **kwargs: Any) -> HfArgumentParser:
    """``HfArgumentParser`` for the dataclass ``cls``, with ``--config FILE``. A list field repeats when its
    metadata says ``"action": "extend"`` (``--dataset A --dataset B``)."""
    parser = HfArgumentParser(cls, **kwargs)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON or YAML file of arguments; flags given on the command line take precedence")
    return parser


def _list_fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return {f.name: f for f in dataclasses.fields(cls)
            if any(typing.get_origin(t) is list for t in (typing.get_args(hints[f.name]) or (hints[f.name],)))
            or typing.get_origin(hints[f.name]) is list}


def parse_args(cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``."""
    parser = build_parser(cls, prog=prog, description=(cls.__doc__ or "").strip().split("\n\n")[0])
    known, _ = parser.parse_known_args(argv)
    config = load_config_file(known.config) if known.config else {}
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls) if f.init})
    if unknown:
        parser.error(f"unknown keys in {known.config}: {unknown}; valid keys are the flags in --help")
    lists = _list_fields(cls)
    # a list given on the command line replaces the config file's (rather than extending it)
    parser.set_defaults(**{k: v for k, v in config.items() if k not in lists}, **{k: None for k in lists})
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    for name, f in lists.items():
        if namespace[name] is None:
            value = config.get(name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                               else f.default)
            namespace[name] = [value] if isinstance(value, str) else value
    return cls(**namespace)


def args_to_dict(args: Any) -> dict[str, Any]:
    """A dataclass of arguments as a JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))
