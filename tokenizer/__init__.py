"""express tokenizer: corpus statistics, rank-token encoding and tokenized datasets.

Python API::

    from tokenizer import fit_statistics, tokenize_files, tokenize_adata, GeneVocab

    vocab = fit_statistics(["a.h5ad", "b.h5ad"], "stats", num_workers=4)
    tokenize_files(["a.h5ad", "b.h5ad"], "stats", "tokens", obs_keys=["cell_type"], keep_counts=True)
    dataset = tokenize_adata(adata, GeneVocab.load("stats"))   # in memory, for fine-tuning

Heavy modules are imported on first use, so ``import tokenizer`` stays light.
"""

from .encode import RankTokens, encode_count_rows, mix_seeds, rank_encode
from .errors import CorruptFileError, InputError, InvalidCountsError, OutputExistsError
from .vocab import SPECIAL_TOKENS, GeneVocab

__all__ = [
    "CorruptFileError",
    "GeneVocab",
    "InputError",
    "InvalidCountsError",
    "OutputExistsError",
    "RankTokens",
    "SPECIAL_TOKENS",
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
    "fit_statistics": "stats",
    "merge_statistics": "stats",
    "accumulate_statistics": "stats",
    "tokenize_files": "tokenize",
    "tokenize_adata": "tokenize",
    "load_geneformer_dicts": "geneformer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
