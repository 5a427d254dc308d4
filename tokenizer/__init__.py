"""express tokenizer: corpus statistics, rank-token encoding and tokenized datasets."""

from .encode import RankTokens, encode_count_rows, mix_seeds, rank_encode
from .vocab import SPECIAL_TOKENS, GeneVocab

__all__ = ["GeneVocab", "RankTokens", "SPECIAL_TOKENS", "encode_count_rows", "mix_seeds", "rank_encode"]
