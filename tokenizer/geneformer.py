"""Geneformer's published dictionaries as an express vocabulary (Geneformer-compatible tokenization).

Geneformer (Theodoris et al. 2023) encodes a cell by normalising each gene's count by the cell's total count
(x 10,000) and by the gene's non-zero median over its pretraining corpus, ranking the genes of its token dictionary
by that value, and truncating: V1 models (gc30M dictionaries) read the top 2,048 genes and no special tokens; V2
models (gc95M) read ``<cls>``, the top 4,094 genes and ``<eos>`` (4,096 in total). Gene ids are Ensembl ids,
optionally collapsed through its ``ensembl_mapping_dict`` (upper-cased id -> canonical id, several ids may map to one
gene, whose counts are then summed). There is no zero sampling.

The dictionaries are read from JSON (see ``../shared/data/geneformer/``); Geneformer ships them as pickles, which
express never loads.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptFileError, InputError
from .spec import TokenizationSpec
from .vocab import GeneVocab

logger = logging.getLogger(__name__)

TOKEN_FILE = "token_dictionary.json"
MEDIAN_FILE = "gene_median_dictionary.json"
MAPPING_FILE = "ensembl_mapping_dict.json"
NAME_FILE = "gene_name_id_dict.json"
MODEL_INPUT_SIZES = {2048: "V1", 4096: "V2"}


@dataclass
class GeneformerDicts:
    """Geneformer's dictionaries as a vocabulary plus the id-collapsing map."""

    vocab: GeneVocab
    mapping: dict[str, str] | None  # upper-cased gene id -> gene id (not every target is in the token dictionary)
    directory: Path

    @property
    def has_special_tokens(self) -> bool:
        return "<cls>" in self.vocab.special_tokens and "<eos>" in self.vocab.special_tokens


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not a JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} must hold a JSON object")
    return data


def _upper_keys(raw: dict[str, str]) -> dict[str, str]:
    """``raw`` with upper-cased keys, as Geneformer looks ids up. The keys of Geneformer's own mapping are upper-case
    already (Ensembl ids and a few numbers): then ``raw`` itself is returned, which saves upper-casing its 174,000
    keys (0.2 s). The check is done in C (``str.isupper``) on every key, in Python only on the few it rejects."""
    if all(k == k.upper() for k in itertools.filterfalse(str.isupper, raw)):
        return raw
    return {k.upper(): v for k, v in raw.items()}


def load_geneformer_dicts(directory: str | os.PathLike) -> GeneformerDicts:
    """Read ``token_dictionary.json`` and ``gene_median_dictionary.json`` (and, when present,
    ``ensembl_mapping_dict.json`` and ``gene_name_id_dict.json`` for symbols) from ``directory``."""
    directory = Path(directory)
    missing = [n for n in (TOKEN_FILE, MEDIAN_FILE) if not (directory / n).is_file()]
    if missing:
        raise InputError(f"{directory} lacks {', '.join(missing)}; --geneformer_dicts needs Geneformer's token and "
                         "gene median dictionaries as JSON")
    tokens = _read_json(directory / TOKEN_FILE)
    medians = _read_json(directory / MEDIAN_FILE)
    ordered = sorted(tokens.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise CorruptFileError(f"{directory / TOKEN_FILE}: token ids are not 0..{len(ordered) - 1}")
    specials = [t for t, _ in ordered if t.startswith("<") and t.endswith(">")]
    if [t for t, _ in ordered[: len(specials)]] != specials:
        raise CorruptFileError(f"{directory / TOKEN_FILE}: special tokens must come before the genes")
    genes = [t for t, _ in ordered[len(specials):]]
    no_median = [g for g in genes if not (isinstance(medians.get(g), (int, float)) and medians[g] > 0)]
    if no_median:
        raise CorruptFileError(f"{directory / MEDIAN_FILE} has no positive median for {len(no_median)} dictionary "
                               f"genes (e.g. {', '.join(no_median[:3])})")
    symbols = None
    if (directory / NAME_FILE).is_file():
        best: dict[str, str] = {}
        for name, gene in _read_json(directory / NAME_FILE).items():
            if gene not in best or name < best[gene]:
                best[gene] = name
        symbols = [best.get(g, "") for g in genes]
    mapping = None
    if (directory / MAPPING_FILE).is_file():
        mapping = _upper_keys(_read_json(directory / MAPPING_FILE))
    n = len(genes)
    vocab = GeneVocab(
        gene_ids=genes,
        medians=np.array([medians[g] for g in genes], dtype=np.float64),
        n_cells=np.zeros(n, dtype=np.int64),
        zero_fraction=np.zeros(n),
        group_ids=np.ones((n, 0), dtype=np.int32),
        gene_symbols=symbols,
        meta={"kind": "geneformer dictionaries", "source": str(directory),
              "note": "medians from Geneformer's corpus; detection counts and zero fractions are not available"},
        special_tokens=tuple(specials),
    )
    return GeneformerDicts(vocab, mapping, directory)


def geneformer_spec(dicts: GeneformerDicts, model_input_size: int | None) -> TokenizationSpec:
    """Geneformer's encoding for a model input size: 2048 -> V1 (top 2,048 genes, no special tokens), 4096 -> V2
    (``<cls>``, the top 4,094 genes, ``<eos>``); ``None`` picks V2 for dictionaries with special tokens."""
    if model_input_size is None:
        model_input_size = 4096 if dicts.has_special_tokens else 2048
    if model_input_size not in MODEL_INPUT_SIZES:
        raise InputError(f"--model_input_size must be 2048 (Geneformer V1) or 4096 (V2), got {model_input_size}")
    if MODEL_INPUT_SIZES[model_input_size] == "V2":
        if not dicts.has_special_tokens:
            raise InputError(f"{dicts.directory}: model_input_size 4096 (Geneformer V2) needs <cls> and <eos> in the "
                             "token dictionary (use the gc95M dictionaries, or --model_input_size 2048)")
        return TokenizationSpec(mode="geneformer", top_k=model_input_size - 2, n_zeros=0, add_cls=True, add_eos=True)
    if dicts.has_special_tokens:
        logger.warning("%s holds <cls>/<eos> (V2 dictionaries) but model_input_size 2048 is the V1 setting: "
                       "no special tokens are added", dicts.directory)
    return TokenizationSpec(mode="geneformer", top_k=model_input_size, n_zeros=0, add_cls=False, add_eos=False)
