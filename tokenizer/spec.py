"""How cells are tokenized: one description that every stage reads.

A :class:`TokenizationSpec` is written once, by the tokenizer, into a dataset folder's ``manifest.json`` (under the key
``"tokenization"``); a pretrained or fine-tuned model carries the same JSON beside its weights as
``tokenization.json``. Pretraining re-tokenizes binomially split cells with it (molecular cross-validation), and
fine-tuning and the embedding tools tokenize new cells with the spec their model was trained on.

``measured_genes`` records, per source file (the dataset's ``source`` column), the vocabulary token ids that file
measures: the tokenizer samples zero-expressed genes only among them, so every re-tokenization must too. On disk they
are stored as ``[start, stop)`` runs of token ids, which keeps the JSON small (a file usually measures long runs of
the vocabulary).

``input_genes`` (optional) is a fixed gene panel: only those token ids are read, as detected genes and as sampled
zeros (the library size still counts every gene). A model pretrained on a panel (``express-pretrain
--gene_selection hvg``) records it, so the tokenizer, fine-tuning and the embedding tools read new cells through the
same panel.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptFileError, InputError

TOKENIZATION_FILE = "tokenization.json"
MODES = ("express", "geneformer")


@dataclass
class TokenizationSpec:
    """How a cell becomes tokens.

    Args:
        mode: ``"express"`` (median-normalised rank tokens with sampled zeros) or ``"geneformer"`` (Geneformer's own
            encoding from its dictionaries: no zero sampling, values ranked in float64).
        top_k: detected genes kept per cell, highest normalised value first.
        n_zeros: zero-count genes sampled per cell among the genes its source file measures.
        seed: global seed of the per-cell zero sampling (each cell's stream also depends on its file and row).
        target_sum: library size every cell is scaled to before dividing by the gene medians.
        add_cls: prepend ``<cls>``.
        add_eos: append ``<eos>`` (Geneformer V2).
        measured_genes: per source file, the sorted vocabulary token ids it measures.
        input_genes: a fixed gene panel (vocabulary token ids): the only genes read; None reads every gene.
    """

    mode: str = "express"
    top_k: int = 256
    n_zeros: int = 50
    seed: int = 0
    target_sum: float = 10_000.0
    add_cls: bool = True
    add_eos: bool = False
    measured_genes: dict[str, np.ndarray] = field(default_factory=dict)
    input_genes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"tokenization mode must be one of {MODES}, got {self.mode!r}")
        self.top_k, self.n_zeros, self.seed = int(self.top_k), int(self.n_zeros), int(self.seed)
        self.target_sum = float(self.target_sum)
        if self.top_k < 1 or self.n_zeros < 0:
            raise InputError(f"top_k must be >= 1 and n_zeros >= 0, got {self.top_k} and {self.n_zeros}")
        if not self.target_sum > 0:
            raise InputError(f"target_sum must be > 0, got {self.target_sum}")
        if self.mode == "geneformer" and self.n_zeros:
            raise InputError("Geneformer's encoding samples no zero genes: n_zeros must be 0 in geneformer mode")
        self.measured_genes = {str(k): np.unique(np.asarray(v, dtype=np.int64))
                               for k, v in self.measured_genes.items()}
        if self.input_genes is not None:
            self.input_genes = np.unique(np.asarray(self.input_genes, dtype=np.int64))
            if len(self.input_genes) == 0:
                raise InputError("input_genes is an empty gene panel: give at least one gene (or None for all)")

    @property
    def max_length(self) -> int:
        """The most tokens a cell can have: special tokens, ``top_k`` detected genes and ``n_zeros`` zeros."""
        return self.top_k + self.n_zeros + int(self.add_cls) + int(self.add_eos)

    def zero_candidates(self, source: str | None) -> np.ndarray | None:
        """Token ids a cell of ``source`` may sample as zeros: the genes it measures, within the panel when there is
        one (None: not recorded and no panel, use every vocabulary gene)."""
        measured = self.measured_genes.get(str(source)) if source is not None else None
        if self.input_genes is None:
            return measured
        if measured is None:
            return self.input_genes
        return np.intersect1d(measured, self.input_genes, assume_unique=True)

    def read_genes(self, ids: np.ndarray) -> np.ndarray:
        """Which of the token ids ``ids`` are read (bool mask): all of them, or those in the gene panel."""
        ids = np.asarray(ids)
        return np.ones(ids.shape, dtype=bool) if self.input_genes is None else np.isin(ids, self.input_genes)

    def same_encoding(self, other: TokenizationSpec) -> bool:
        """Whether ``other`` encodes cells the same way (the sources measured may differ)."""
        return self.encoding() == other.encoding()

    def encoding(self) -> dict[str, Any]:
        """Every field but ``measured_genes`` (the gene panel as ``[start, stop)`` runs), JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("measured_genes", "input_genes")}
        return {**out, "input_genes": None if self.input_genes is None else _runs(self.input_genes)}

    def replace(self, **changes: Any) -> TokenizationSpec:
        return dataclasses.replace(self, **changes)

    # --- JSON --------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**self.encoding(), "measured_genes": {k: _runs(v) for k, v in sorted(self.measured_genes.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "tokenization spec") -> TokenizationSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CorruptFileError(f"{where}: unknown field(s) {unknown}; a tokenization spec has {sorted(known)}")
        values = dict(data)
        values["measured_genes"] = {k: _from_runs(v, where) for k, v in dict(data.get("measured_genes") or {}).items()}
        if values.get("input_genes") is not None:
            values["input_genes"] = _from_runs(values["input_genes"], where, "input_genes must be [start, stop) runs")
        return cls(**values)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenization.json`` into ``directory`` (atomically)."""
        from .output import write_bytes

        path = Path(directory) / TOKENIZATION_FILE
        write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenizationSpec:
        """Read ``tokenization.json`` from a model folder, or the ``"tokenization"`` entry of a dataset manifest."""
        directory = Path(directory)
        path = directory / TOKENIZATION_FILE
        if path.is_file():
            return cls.from_dict(_read_json(path), where=str(path))
        from .tokenize import MANIFEST_FILE

        manifest = directory / MANIFEST_FILE
        if manifest.is_file():
            return cls.from_manifest(_read_json(manifest), where=str(manifest))
        raise FileNotFoundError(f"{directory} holds no {TOKENIZATION_FILE} (nor a dataset {MANIFEST_FILE})")

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], *, where: str = "manifest") -> TokenizationSpec:
        if "tokenization" not in manifest:
            raise CorruptFileError(f"{where} has no 'tokenization' entry; tokenize the data again with this version")
        return cls.from_dict(manifest["tokenization"], where=where)


def _runs(ids: np.ndarray) -> list[list[int]]:
    """Sorted unique ids as ``[start, stop)`` runs of consecutive values."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(ids)]])
    return [[int(ids[a]), int(ids[b - 1]) + 1] for a, b in zip(starts, stops)]


def _from_runs(runs: Any, where: str,
               what: str = "measured_genes must map each source to [start, stop) runs") -> np.ndarray:
    try:
        parts = [np.arange(int(a), int(b), dtype=np.int64) for a, b in runs]
    except (TypeError, ValueError):
        raise CorruptFileError(f"{where}: {what}") from None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptFileError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} must hold a JSON object")
    return data
