"""express tokenizer: corpus statistics, rank-token encoding and tokenized datasets.

Python API::

    from tokenizer import GeneVocab, TokenizationSpec, TokenizedCells, fit_statistics, tokenize_adata, tokenize_files

    vocab = fit_statistics(["a.h5ad", "b.h5ad"], "stats", num_workers=4)
    tokenize_files(["a.h5ad", "b.h5ad"], "stats", "tokens", obs_keys=["cell_type"], keep_counts=True,
                   spec=TokenizationSpec(top_k=256, n_zeros=50))
    cells = TokenizedCells.load("tokens")                    # dataset + vocabulary + spec
    cells = tokenize_adata(adata, GeneVocab.load("stats"))   # the same, in memory

Heavy modules (numba's kernels, pandas) are imported on first use, so ``import tokenizer`` stays light: the command
line (``python -m tokenizer.cli``) starts without them and imports only what its command needs.
"""

from .errors import (
    CorruptFileError,
    DatasetFormatError,
    InputError,
    InvalidCountsError,
    OutputExistsError,
    VocabularyMismatchError,
)
from .spec import TOKENIZATION_FILE, TokenizationSpec

__all__ = [
    "CorruptFileError",
    "DatasetFormatError",
    "GeneVocab",
    "InputError",
    "InvalidCountsError",
    "OutputExistsError",
    "RankTokens",
    "SPECIAL_TOKENS",
    "TOKENIZATION_FILE",
    "TokenizationSpec",
    "TokenizedCells",
    "VocabularyMismatchError",
    "accumulate_statistics",
    "encode_count_rows",
    "fit_statistics",
    "load_geneformer_dicts",
    "merge_statistics",
    "mix_seeds",
    "rank_encode",
    "tokenize_adata",
    "tokenize_files",
]

_LAZY = {
    "RankTokens": "encode",
    "encode_count_rows": "encode",
    "mix_seeds": "encode",
    "rank_encode": "encode",
    "SPECIAL_TOKENS": "vocab",
    "GeneVocab": "vocab",
    "fit_statistics": "stats",
    "merge_statistics": "stats",
    "accumulate_statistics": "stats",
    "tokenize_files": "tokenize",
    "tokenize_adata": "tokenize",
    "load_geneformer_dicts": "geneformer",
    "TokenizedCells": "dataset",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
