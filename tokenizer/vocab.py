"""The gene vocabulary and its per-gene statistics, as saved beside every statistics folder and tokenized dataset.

On disk (never pickles):

- ``vocab.json``: ``{token: token_id}``, special tokens first (``<pad>`` 0, ``<mask>`` 1, ``<cls>`` 2, ``<eos>`` 3),
  then the genes in token order;
- ``gene_stats.parquet``: one row per vocabulary gene, in token order: ``token_id``, ``gene_id``, ``gene_symbol``,
  ``median``, ``n_cells``, ``zero_fraction``, optionally ``donor_zero_fraction``, and ``group_l1``, ``group_l2``, ...
  (group ids start at 1; 0 is kept for special tokens);
- ``stats.json``: how the statistics were made (inputs, cell counts, sketch accuracy, hierarchy source, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<mask>", "<cls>", "<eos>")
PAD, MASK, CLS, EOS = SPECIAL_TOKENS
VOCAB_FILE = "vocab.json"
STATS_FILE = "gene_stats.parquet"
META_FILE = "stats.json"



@dataclass
class GeneVocab:
    """Vocabulary genes (token id = ``n_special + index``) with their corpus statistics and hierarchy groups."""

    gene_ids: list[str]
    medians: np.ndarray  # (n_genes,) non-zero median of counts / total * 10_000
    n_cells: np.ndarray  # (n_genes,) cells in which the gene is detected
    zero_fraction: np.ndarray  # (n_genes,) share of cells with a zero count
    group_ids: np.ndarray  # (n_genes, n_levels) int32, ids >= 1
    donor_zero_fraction: np.ndarray | None = None  # (n_genes,) share of donors never detecting the gene
    gene_symbols: list[str] | None = None
    meta: dict = field(default_factory=dict)
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS

    def __post_init__(self) -> None:
        n = len(self.gene_ids)
        self.medians = np.asarray(self.medians, dtype=np.float64)
        self.n_cells = np.asarray(self.n_cells, dtype=np.int64)
        self.zero_fraction = np.asarray(self.zero_fraction, dtype=np.float64)
        self.group_ids = np.asarray(self.group_ids, dtype=np.int32).reshape(n, -1)
        for name in ("medians", "n_cells", "zero_fraction"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({n},)")
        if len(set(self.gene_ids)) != n:
            raise ValueError("gene ids in a vocabulary must be unique")
        if n and not np.all(self.medians > 0):
            bad = self.gene_ids[int(np.argmin(self.medians > 0))]
            raise ValueError(f"every vocabulary gene needs a positive median (gene {bad!r} has none)")
        if self.group_ids.size and self.group_ids.min() < 1:
            raise ValueError("group ids start at 1 (0 is reserved for special tokens)")
        self._token_to_id: dict[str, int] | None = None

    # --- sizes and ids -------------------------------------------------------------------------------------------
    @property
    def n_special(self) -> int:
        return len(self.special_tokens)

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)

    @property
    def vocab_size(self) -> int:
        return self.n_special + self.n_genes

    @property
    def n_levels(self) -> int:
        return self.group_ids.shape[1]

    @property
    def n_groups(self) -> list[int]:
        """Embedding-table size per hierarchy level (largest group id + 1, so 0 stays for special tokens)."""
        return [int(self.group_ids[:, level].max(initial=0)) + 1 for level in range(self.n_levels)]

    def special_id(self, token: str) -> int:
        return self.special_tokens.index(token)

    @property
    def pad_id(self) -> int:
        return self.special_id(PAD)

    @property
    def mask_id(self) -> int:
        return self.special_id(MASK)

    @property
    def cls_id(self) -> int:
        return self.special_id(CLS)

    @property
    def eos_id(self) -> int:
        return self.special_id(EOS)

    @property
    def token_to_id(self) -> dict[str, int]:
        if self._token_to_id is None:
            tokens = list(self.special_tokens) + list(self.gene_ids)
            self._token_to_id = {t: i for i, t in enumerate(tokens)}
        return self._token_to_id

    def id_to_token(self, token_id: int) -> str:
        if token_id < self.n_special:
            return self.special_tokens[token_id]
        return self.gene_ids[token_id - self.n_special]

    def encode_gene_ids(self, genes: Sequence[str]) -> np.ndarray:
        """Token id of each gene, ``-1`` where the gene is not in the vocabulary (or is a special token)."""
        lookup = self.token_to_id
        n_special = self.n_special
        return np.array([i if (i := lookup.get(g, -1)) >= n_special else -1 for g in genes], dtype=np.int64)

    # --- per-token arrays (what the encoder and the model read) ------------------------------------------------------
    @property
    def token_medians(self) -> np.ndarray:
        """``(vocab_size,)`` medians, 1.0 for special tokens."""
        return np.concatenate([np.ones(self.n_special), self.medians])

    @property
    def token_zero_fraction(self) -> np.ndarray:
        """``(vocab_size,)`` zero fractions, 0.0 for special tokens (the model's zero-fraction buffer)."""
        return np.concatenate([np.zeros(self.n_special), self.zero_fraction]).astype(np.float32)

    @property
    def token_group_ids(self) -> np.ndarray:
        """``(vocab_size, n_levels)`` group ids, 0 for special tokens (the model's hierarchy buffer)."""
        pad = np.zeros((self.n_special, self.n_levels), dtype=np.int64)
        return np.concatenate([pad, self.group_ids.astype(np.int64)])

    @property
    def gene_token_ids(self) -> np.ndarray:
        """Token ids of all vocabulary genes (the default zero-sampling candidates)."""
        return np.arange(self.n_special, self.vocab_size, dtype=np.int64)

    # --- persistence -----------------------------------------------------------------------------------------------
    def _columns(self) -> dict[str, np.ndarray | list]:
        """The columns of ``gene_stats.parquet``, in order."""
        columns: dict[str, np.ndarray | list] = {
            "token_id": np.arange(self.n_special, self.vocab_size, dtype=np.int64),
            "gene_id": list(self.gene_ids),
            "gene_symbol": list(self.gene_symbols) if self.gene_symbols is not None else [""] * self.n_genes,
            "median": self.medians,
            "n_cells": self.n_cells,
            "zero_fraction": self.zero_fraction,
        }
        if self.donor_zero_fraction is not None:
            columns["donor_zero_fraction"] = np.asarray(self.donor_zero_fraction, dtype=np.float64)
        for level in range(self.n_levels):
            columns[f"group_l{level + 1}"] = np.ascontiguousarray(self.group_ids[:, level])
        return columns

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self._columns())

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.json``, ``gene_stats.parquet`` and ``stats.json`` into ``directory`` (each atomically)."""
        from .output import staged_file, write_bytes

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes(directory / VOCAB_FILE, json.dumps(self.token_to_id).encode())
        import pyarrow.parquet as pq

        from .arrow import table

        with staged_file(directory / STATS_FILE, overwrite=True) as tmp:
            # written without pandas, which a tokenize run then never imports (a fifth of a second)
            pq.write_table(table(self._columns()), tmp)
        meta = dict(self.meta, special_tokens=list(self.special_tokens), n_genes=self.n_genes,
                    n_levels=self.n_levels, n_groups=self.n_groups)
        write_bytes(directory / META_FILE, json.dumps(meta, indent=2, default=_json_default).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GeneVocab:
        """Read a vocabulary saved by :meth:`save` (a statistics folder, a tokenized dataset or a checkpoint)."""
        directory = Path(directory)
        missing = [n for n in (VOCAB_FILE, STATS_FILE) if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} holds no express vocabulary (missing {', '.join(missing)}); "
                "make one with `express-tokenize fit`"
            )
        vocab_json = json.loads((directory / VOCAB_FILE).read_text())
        meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).is_file() else {}
        specials = tuple(meta.get("special_tokens", SPECIAL_TOKENS))
        import pandas as pd

        frame = pd.read_parquet(directory / STATS_FILE)
        frame = frame.sort_values("token_id", kind="stable")
        expected = np.arange(len(specials), len(specials) + len(frame))
        if not np.array_equal(frame["token_id"].to_numpy(), expected):
            raise ValueError(f"{directory / STATS_FILE}: token ids are not contiguous from {len(specials)}")
        level_cols = sorted((c for c in frame.columns if c.startswith("group_l")), key=lambda c: int(c[7:]))
        vocab = cls(
            gene_ids=frame["gene_id"].astype(str).tolist(),
            medians=frame["median"].to_numpy(),
            n_cells=frame["n_cells"].to_numpy(),
            zero_fraction=frame["zero_fraction"].to_numpy(),
            group_ids=frame[level_cols].to_numpy() if level_cols else np.ones((len(frame), 0), dtype=np.int32),
            donor_zero_fraction=frame["donor_zero_fraction"].to_numpy()
            if "donor_zero_fraction" in frame
            else None,
            gene_symbols=frame["gene_symbol"].astype(str).tolist() if "gene_symbol" in frame else None,
            meta={k: v for k, v in meta.items() if k not in ("special_tokens", "n_genes", "n_levels", "n_groups")},
            special_tokens=specials,
        )
        if vocab_json != vocab.token_to_id:
            raise ValueError(f"{directory / VOCAB_FILE} disagrees with {directory / STATS_FILE}")
        return vocab

    def fingerprint(self) -> str:
        """Short hash of the token -> id mapping, to check a dataset and a checkpoint share one vocabulary."""
        import hashlib

        return hashlib.sha256(json.dumps(self.token_to_id, sort_keys=True).encode()).hexdigest()[:16]


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
