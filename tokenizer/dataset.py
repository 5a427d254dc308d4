"""Tokenized cells together with the vocabulary and the spec they were encoded with.

:class:`TokenizedCells` is what the tokenizer produces: :func:`~tokenizer.tokenize.tokenize_adata` returns one for
cells tokenized in memory, and :meth:`TokenizedCells.load` opens a folder written by ``express-tokenize tokenize``
(memory-mapped Arrow). Training reads both the same way (``pretrain.data``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetFormatError, VocabularyMismatchError
from .spec import TokenizationSpec
from .vocab import GeneVocab

REQUIRED_COLUMNS = ("input_ids", "values")
COUNT_COLUMNS = ("counts_ids", "counts")


@dataclass
class TokenizedCells:
    """One part of a corpus: a ``datasets.Dataset`` of tokenized cells (a row per cell), its vocabulary and spec.

    ``path`` and ``manifest`` are set for a dataset folder; ``name`` names the part in messages and logs.
    """

    dataset: Any  # datasets.Dataset
    vocab: GeneVocab
    spec: TokenizationSpec
    name: str = "cells"
    path: Path | None = None
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def has_counts(self) -> bool:
        """Whether every cell's raw counts were kept (``--keep_counts``; MCV and count targets need them)."""
        return all(c in self.dataset.column_names for c in COUNT_COLUMNS)

    @property
    def lengths(self) -> np.ndarray:
        """``(n_cells,)`` tokens per cell (the ``length`` column, or the ``input_ids`` list lengths)."""
        table = self.dataset.with_format("arrow")
        if "length" in self.dataset.column_names:
            return np.asarray(table["length"].to_numpy(), dtype=np.int64)
        return np.asarray(table["input_ids"].combine_chunks().value_lengths().to_numpy(), dtype=np.int64)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenizedCells:
        """Open a tokenized dataset folder (Arrow data, vocabulary files, ``manifest.json``) with clear errors."""
        import datasets

        from .tokenize import MANIFEST_FILE

        path = Path(path)
        if not path.is_dir():
            raise DatasetFormatError(f"tokenized dataset {path} does not exist; make it with "
                                     "`express-tokenize tokenize`")
        try:
            vocab = GeneVocab.load(path)
        except FileNotFoundError as err:
            raise VocabularyMismatchError(
                f"dataset {path} has no vocabulary: {err}. Tokenize it with `express-tokenize tokenize`, which writes "
                "vocab.json, gene_stats.parquet and stats.json beside the data"
            ) from None
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise DatasetFormatError(f"dataset {path} has no {MANIFEST_FILE}; it was not written by express-tokenize")
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest.get("vocab_fingerprint")
        if recorded is not None and recorded != vocab.fingerprint():
            raise VocabularyMismatchError(
                f"dataset {path}: its {MANIFEST_FILE} records vocabulary {recorded} but the vocabulary files beside "
                f"it are {vocab.fingerprint()}; the folder was modified after tokenization — tokenize it again"
            )
        spec = TokenizationSpec.from_manifest(manifest, where=str(manifest_path))
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DatasetFormatError(f"dataset {path} holds no Arrow data readable by datasets.load_from_disk: {err}")
        if not isinstance(dataset, datasets.Dataset):
            raise DatasetFormatError(f"dataset {path} is a DatasetDict; point at one split's folder")
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise DatasetFormatError(f"dataset {path} lacks the columns {missing} of a tokenized dataset")
        return cls(dataset, vocab, spec, name=path.name, path=path, manifest=manifest)


def check_same_vocab(named_vocabs: Sequence[tuple[str, GeneVocab]], *, hint: str = "") -> GeneVocab:
    """Raise :class:`VocabularyMismatchError` unless every vocabulary has the same fingerprint; return the first."""
    if not named_vocabs:
        raise ValueError("no vocabularies to compare")
    fingerprints = {name: vocab.fingerprint() for name, vocab in named_vocabs}
    if len(set(fingerprints.values())) > 1:
        listing = "; ".join(f"{name}: {fp} ({v.n_genes} genes)" for (name, v), fp in
                            zip(named_vocabs, fingerprints.values()))
        raise VocabularyMismatchError(
            f"vocabularies differ ({listing}). Everything trained together must use one vocabulary: tokenize all "
            f"datasets with the same statistics folder (`express-tokenize tokenize --stats SAME_DIR`).{hint}"
        )
    return named_vocabs[0][1]
