"""Cell (and gene) embeddings of a raw-count h5ad from an express or a Geneformer-format checkpoint.

    express-embed MODEL_DIR cells.h5ad --out cells_embedded.h5ad            # obsm['X_express']
    express-embed MODEL_DIR cells.h5ad --inplace --key_added X_mine --pooling mean --batch_size 128
    express-embed GENEFORMER_DIR cells.h5ad --geneformer_dicts ../shared/data/geneformer/gc95M \\
        --out cells_gf.h5ad --gene_embeddings genes.parquet --device cuda

Python::

    from finetune.embed import embed_cells, load_encoder

    encoder = load_encoder("runs/mine/final")                 # or a Geneformer folder + geneformer_dicts=...
    result = embed_cells(adata, encoder, gene_embeddings=True)  # adata.obsm['X_express'], result.genes

**Models.** An express checkpoint (``pretrain/run.py``'s ``final/``, or a fine-tuned model folder: ``config.json``,
``model.safetensors``, the vocabulary and ``tokenization.json``) tokenizes cells with its own vocabulary and spec;
the cell embedding is the encoder's pooled output (``config.classifier_pooling``; for a VAE folder too, where
``finetune.api.embed`` gives the posterior mean instead). A Geneformer-format checkpoint
(a ``transformers`` BERT folder) needs Geneformer's token and median dictionaries as JSON (``--geneformer_dicts``,
or the files inside the model folder); cells are tokenized with express's Geneformer mode (V1: 2,048 genes, V2:
``<cls>`` + 4,094 genes + ``<eos>``, from the model's ``max_position_embeddings``), genes are read from
``var['ensembl_id']`` when present and library sizes from ``obs['n_counts']`` when present, and the embedding is
pooled as Geneformer's ``EmbExtractor`` does by default: the mean over gene tokens (``<cls>``/``<eos>`` left out) of
the second-to-last layer's hidden states.

**Options.** ``--pooling mean|cls`` overrides the pooling (``cls`` needs a ``<cls>`` token: express, Geneformer V2);
``--layer L`` pools ``hidden_states[L]`` as ``transformers`` numbers them (0 = the embeddings, -1 = the last layer;
default: the express encoder's output after its final norm, Geneformer's -2). ``--gene_embeddings FILE.parquet``
also writes, per vocabulary gene seen in the cells, the mean of its token's hidden state (same layer) over the cells
where it is detected (sampled zero-count genes are not counted). ``--counts_layer`` names the AnnData layer of raw
counts (``layer=`` in the Python API, where the hidden layer is ``hidden_layer=``). Cells that cannot be tokenized (no counts, no gene of
the vocabulary) get NaN rows, with a warning.

Batches of similar length on ``--device`` (default ``cuda`` when available), bf16 autocast on a GPU (``--no_bf16``
for float32). The output h5ad (the input with ``obsm[key_added]``) and the Parquet file are written to temporary
siblings and renamed when complete; an existing output is replaced only with ``--overwrite``. Bad input (a missing
file, a folder that is not a model, a log-normalised matrix) exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from tokenizer import GeneVocab, InputError, TokenizationSpec, TokenizedCells
from tokenizer.errors import CorruptFileError
from tokenizer.geneformer import GeneformerDicts, geneformer_spec, load_geneformer_dicts

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
AUTO = "auto"
GENEFORMER_DEFAULT_LAYER = -2  # EmbExtractor's default emb_layer=-1: the second-to-last layer's output
GENEFORMER_GENE_ID_KEY = "ensembl_id"
GENEFORMER_TOTAL_COUNTS_KEY = "n_counts"
SOURCE = "adata"  # the source name new cells are tokenized under (it keys the per-cell zero sampling)


# ---------------------------------------------------------------------------------------------------------------------
# A model ready to embed cells
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CellEncoder:
    """A loaded model with what it needs to tokenize and embed new cells.

    ``kind`` is ``"express"`` (an :class:`~modeling.ExpressModel`) or ``"geneformer"`` (a ``transformers`` BERT
    encoder read with Geneformer's dictionaries); ``pooling`` and ``layer`` say how a cell embedding is read from it
    (see :func:`load_encoder`).
    """

    model: torch.nn.Module
    kind: Literal["express", "geneformer"]
    vocab: GeneVocab
    spec: TokenizationSpec
    path: Path
    pooling: str
    layer: int | None
    device: torch.device
    dicts: GeneformerDicts | None = None
    bf16: bool = True

    @property
    def n_special(self) -> int:
        return self.vocab.n_special

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    # --- tokenizing -------------------------------------------------------------------------------------------------
    def tokenize(self, adata, *, layer: str | None = None, gene_id_key: str | None = AUTO,
                 total_counts_key: str | None = AUTO, allow_non_integer: bool = False,
                 where: str = "the AnnData") -> TokenizedCells:
        """``adata``'s cells as this model reads them (``tokenizer.tokenize_adata`` with the model's vocabulary and
        spec, or in Geneformer mode with its dictionaries). ``gene_id_key`` / ``total_counts_key`` ``"auto"``: for a
        Geneformer model ``var['ensembl_id']`` / ``obs['n_counts']`` when present, else var_names / row sums.
        Cells without counts or vocabulary genes are left out (``cell_id`` says which remain); non-integer counts
        are refused unless ``allow_non_integer``."""
        from tokenizer import tokenize_adata

        if adata.obs_names.has_duplicates:
            raise InputError(f"{where}: cell names (obs_names) must be unique to tell cells apart "
                             "(adata.obs_names_make_unique())")
        geneformer = self.dicts is not None
        if gene_id_key == AUTO:
            gene_id_key = GENEFORMER_GENE_ID_KEY if geneformer and GENEFORMER_GENE_ID_KEY in adata.var else None
        if total_counts_key == AUTO:
            total_counts_key = GENEFORMER_TOTAL_COUNTS_KEY if geneformer and \
                GENEFORMER_TOTAL_COUNTS_KEY in adata.obs else None
        try:
            if geneformer:
                cells = tokenize_adata(adata, geneformer_dicts=self.dicts, model_input_size=self.spec.max_length,
                                       gene_id_key=gene_id_key, layer=layer, total_counts_key=total_counts_key,
                                       allow_non_integer=allow_non_integer, source_name=SOURCE)
            else:
                cells = tokenize_adata(adata, self.vocab, spec=self.spec, gene_id_key=gene_id_key, layer=layer,
                                       total_counts_key=total_counts_key, allow_non_integer=allow_non_integer,
                                       source_name=SOURCE)
        except InputError as err:  # name the user's file rather than the in-memory source, and this tool's flag
            text = str(err).replace("--layer ", "--counts_layer ")
            text = where + text[len(SOURCE):] if text.startswith(SOURCE) else f"{where}: {text}"
            raise type(err)(text) from None
        if len(cells) == 0:
            raise InputError(f"{where}: no cell could be tokenized for {self.path} (every cell has zero counts or no "
                             "gene of the model's vocabulary; check the gene ids, e.g. --gene_id_key)")
        return cells

    # --- the forward pass -------------------------------------------------------------------------------------------
    def collator(self):
        from pretrain.data import ExpressCollator

        return ExpressCollator(self.vocab, mlm_probability=0.0)

    def _autocast(self):
        enabled = self.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell embeddings ``(B, H)`` and the hidden states they were pooled from ``(B, T, H)``, in float32, for a
        batch of the collator."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids, mask, is_zero = batch["input_ids"], batch["attention_mask"], batch["is_zero"]
        with self._autocast():
            if self.kind == "express":
                out = self.model(input_ids=ids, values=batch["values"], is_zero=is_zero, attention_mask=mask,
                                 output_hidden_states=self.layer is not None)
                states = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
            else:
                out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                states = out.hidden_states[self.layer]
        states = states.float()  # (B, T, H)
        if self.kind == "express":
            return self.model.pool(states, ids, mask, is_zero), states  # config.classifier_pooling = self.pooling
        if self.pooling == "cls":
            return states[:, 0], states
        keep = gene_positions(ids, mask, is_zero, self.n_special).unsqueeze(-1).float()  # (B, T, 1)
        return (states * keep).sum(1) / keep.sum(1).clamp_min(1.0), states

    def batches(self, rows: Sequence[dict], batch_size: int, *, progress: bool = False,
                desc: str = "embedding") -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """``(positions, batch)`` over ``rows`` (dicts of ``input_ids``/``values``/``is_zero``), longest first so
        that cells of similar length share a batch."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        lengths = np.array([len(r["input_ids"]) for r in rows])
        order = np.argsort(-lengths, kind="stable")
        collate = self.collator()
        starts = range(0, len(rows), batch_size)
        for start in tqdm(starts, desc=desc, disable=None if progress and len(starts) > 1 else True):
            positions = order[start:start + batch_size]
            yield positions, collate([rows[i] for i in positions])


def gene_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, is_zero: torch.Tensor,
                   n_special: int) -> torch.Tensor:
    """``(B, T)`` bool: the tokens of detected genes (not special tokens, padding or sampled zeros)."""
    return attention_mask.bool() & (input_ids >= n_special) & ~is_zero.bool()


def cell_rows(cells: TokenizedCells) -> list[dict[str, np.ndarray]]:
    """Every tokenized cell as a dict of ``input_ids``, ``values`` and ``is_zero`` arrays (what the collator reads)."""
    from pretrain.data import CellDataset

    columns = [c for c in ("input_ids", "values", "is_zero") if c in cells.dataset.column_names]
    dataset = CellDataset([cells.dataset], columns=columns)
    rows = dataset.__getitems__(list(range(len(dataset))))
    for row in rows:
        row.setdefault("is_zero", np.zeros(len(row["input_ids"]), dtype=np.int8))
    return [{k: row[k] for k in ("input_ids", "values", "is_zero")} for row in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU falls back to the CPU with a
    warning."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("no CUDA device is available: running on the CPU")
        return torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda, got {device}")
    return device


def _read_config(path: Path) -> dict:
    import json

    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a model folder (no config.json); pass an express model folder "
                         "(pretrain/run.py's final/, or a fine-tuned model) or a Geneformer checkpoint")
    try:
        return json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise CorruptFileError(f"{path / 'config.json'} is not valid JSON ({err})") from None


def _check_layer(layer: int | None, n_layers: int, path: Path) -> None:
    if layer is not None and not -(n_layers + 1) <= layer <= n_layers:
        raise InputError(f"layer {layer} does not exist in {path}: it has {n_layers} layers, so hidden_states[L] "
                         f"takes L in [{-(n_layers + 1)}, {n_layers}] (0 = embeddings, -1 = last layer)")


def _load_express(path: Path, config: dict, pooling: str | None, layer: int | None,
                  geneformer_dicts) -> tuple[torch.nn.Module, GeneVocab, TokenizationSpec, GeneformerDicts | None]:
    from transformers import AutoModel

    import modeling  # noqa: F401 - registers the express classes with the Auto classes
    from modeling import ExpressModel

    if config.get("encoder", "transformer") != "transformer":
        raise InputError(f"{path} has an MLP cell encoder: embeddings and perturbations need a transformer")
    try:
        vocab = GeneVocab.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{path} is not an express model with its vocabulary: {err}") from None
    try:
        spec = TokenizationSpec.load(path).replace(measured_genes={})  # new cells measure their own genes
    except FileNotFoundError:
        logger.warning("%s has no tokenization.json: new cells are tokenized with the tokenizer's defaults", path)
        spec = TokenizationSpec()
    dicts = None
    if spec.mode == "geneformer":
        if geneformer_dicts is None:
            raise InputError(f"{path} was trained on Geneformer-mode tokens: pass --geneformer_dicts DIR")
        dicts = load_geneformer_dicts(geneformer_dicts)
        if dicts.vocab.fingerprint() != vocab.fingerprint():
            raise InputError(f"the dictionaries in {geneformer_dicts} are not the vocabulary of {path}")
    elif geneformer_dicts is not None:
        raise InputError(f"--geneformer_dicts is for Geneformer checkpoints; {path} is an express model with its own "
                         "vocabulary")
    try:
        loaded = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the express model in {path}: {err}") from None
    model = loaded if isinstance(loaded, ExpressModel) else getattr(loaded, "express", None)
    if not isinstance(model, ExpressModel):
        raise InputError(f"{path} holds no express transformer encoder")
    if vocab.vocab_size != model.config.vocab_size:
        raise InputError(f"{path}: the vocabulary has {vocab.vocab_size} tokens but the model "
                         f"{model.config.vocab_size}")
    if pooling is not None:
        if pooling == "cls" and not spec.add_cls:
            raise InputError(f"--pooling cls needs a <cls> token, but {path} tokenizes cells without one")
        model.config.classifier_pooling = pooling  # ExpressModel.pool reads it
    _check_layer(layer, model.config.num_hidden_layers, path)
    return model, vocab, spec, dicts


def _load_geneformer(path: Path, config: dict, pooling: str | None, layer: int | None, geneformer_dicts):
    from transformers import AutoModel

    if geneformer_dicts is None:
        if (path / "token_dictionary.json").is_file():
            geneformer_dicts = path
        else:
            kind = config.get("model_type", "transformers")
            raise InputError(f"{path} is a {kind} checkpoint, not an express model: "
                             "pass --geneformer_dicts DIR (Geneformer's token and gene median dictionaries as JSON)")
    dicts = load_geneformer_dicts(geneformer_dicts)
    if int(config.get("vocab_size", -1)) != dicts.vocab.vocab_size:
        raise InputError(f"{path} has vocab_size {config.get('vocab_size')} but the token dictionary in "
                         f"{geneformer_dicts} holds {dicts.vocab.vocab_size} tokens: use the dictionaries the model "
                         "was trained with (gc30M for V1 models, gc95M for V2)")
    positions = int(config.get("max_position_embeddings", 0))
    spec = geneformer_spec(dicts, positions if positions in (2048, 4096) else None)
    if positions and spec.max_length > positions:
        raise InputError(f"{path} reads at most {positions} tokens but Geneformer's V2 encoding has {spec.max_length}")
    from transformers.utils import logging as hf_logging

    kwargs = {"add_pooling_layer": False} if config.get("model_type") == "bert" else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the masked-LM head's weights, which are not needed here
    try:
        model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the checkpoint in {path}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        absent = sorted(info["missing_keys"] or info["mismatched_keys"])[:3]
        raise InputError(f"{path} lacks encoder weights (e.g. {absent}): it is not a complete checkpoint")
    pooling = pooling or "mean"
    if pooling == "cls" and not spec.add_cls:
        raise InputError(f"--pooling cls needs a <cls> token: {path} reads Geneformer V1 cells, which have none")
    layer = GENEFORMER_DEFAULT_LAYER if layer is None else layer
    _check_layer(layer, int(model.config.num_hidden_layers), path)
    return model, dicts.vocab, spec, dicts, pooling, layer


def load_encoder(model_dir: str | os.PathLike | CellEncoder, *, geneformer_dicts: str | os.PathLike | None = None,
                 pooling: str | None = None, layer: int | None = None, device: str | torch.device | None = None,
                 bf16: bool = True) -> CellEncoder:
    """Load an express or Geneformer-format checkpoint for embedding (evaluation mode, on ``device``).

    Args:
        model_dir: an express model folder (``config.json``, weights, vocabulary, ``tokenization.json``) or a
            ``transformers`` BERT folder of a Geneformer model. A :class:`CellEncoder` is returned as it is.
        geneformer_dicts: folder of Geneformer's JSON dictionaries (default: the model folder, when it holds them).
        pooling: ``"mean"`` or ``"cls"``; default the express config's ``classifier_pooling``, Geneformer's mean.
        layer: pool ``hidden_states[layer]``; default the express encoder's output, Geneformer's -2.
        device: ``"cpu"``, ``"cuda"``; default ``cuda`` when available. bf16: autocast on a GPU.
    """
    if isinstance(model_dir, CellEncoder):
        return model_dir
    if pooling is not None and pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    path = Path(model_dir)
    config = _read_config(path)
    device = resolve_device(device)
    if config.get("model_type") in ("express", "express_vae"):
        model, vocab, spec, dicts = _load_express(path, config, pooling, layer, geneformer_dicts)
        kind, pooling = "express", model.config.classifier_pooling
    else:
        model, vocab, spec, dicts, pooling, layer = _load_geneformer(path, config, pooling, layer, geneformer_dicts)
        kind = "geneformer"
    model.eval().to(device)
    if device.type == "cpu":
        model.float()
    return CellEncoder(model=model, kind=kind, vocab=vocab, spec=spec, path=path, pooling=pooling, layer=layer,
                       device=device, dicts=dicts, bf16=bf16)


# ---------------------------------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Embeddings:
    """What :func:`embed_cells` computed: ``cells`` ``(n_obs, H)`` in the AnnData's order (NaN rows for cells that
    could not be tokenized) and, when asked for, ``genes``: one row per vocabulary gene detected in the cells
    (``token_id``, ``gene_id``, ``gene_symbol``, ``n_cells``, ``emb_0`` ... ``emb_{H-1}``)."""

    cells: np.ndarray
    genes: pd.DataFrame | None = None
    seconds: float = 0.0

    @property
    def cells_per_second(self) -> float:
        return len(self.cells) / self.seconds if self.seconds > 0 else float("nan")


def gene_table(vocab: GeneVocab, sums: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """Per-gene mean embeddings from per-token sums ``(vocab_size, H)`` and counts ``(vocab_size,)``."""
    seen = np.flatnonzero(counts > 0)
    seen = seen[seen >= vocab.n_special]
    means = (sums[seen] / counts[seen, None]).astype(np.float32)
    symbols = vocab.gene_symbols or [""] * vocab.n_genes
    frame = pd.DataFrame({
        "token_id": seen.astype(np.int64),
        "gene_id": [vocab.id_to_token(int(t)) for t in seen],
        "gene_symbol": [symbols[int(t) - vocab.n_special] for t in seen],
        "n_cells": counts[seen].astype(np.int64),
    })
    dims = pd.DataFrame(means, columns=[f"emb_{j}" for j in range(means.shape[1])])
    return pd.concat([frame, dims], axis=1)


def embed_cells(
    adata, model: str | os.PathLike | CellEncoder, *, key_added: str | None = "X_express", pooling: str | None = None,
    hidden_layer: int | None = None, batch_size: int = 64, device: str | None = None,
    geneformer_dicts: str | os.PathLike | None = None, gene_embeddings: bool = False, layer: str | None = None,
    gene_id_key: str | None = AUTO, total_counts_key: str | None = AUTO, allow_non_integer: bool = False,
    bf16: bool = True, progress: bool = True, where: str = "the AnnData",
) -> Embeddings:
    """Embed every cell of a raw-count AnnData; the embeddings go into ``adata.obsm[key_added]`` (unless None).

    Args:
        model: a model folder (see :func:`load_encoder`) or a loaded :class:`CellEncoder` (then ``pooling``,
            ``hidden_layer``, ``device``, ``geneformer_dicts`` and ``bf16`` are the encoder's own).
        pooling, hidden_layer: how the cell embedding is read (see :func:`load_encoder`).
        gene_embeddings: also return per-gene contextual embeddings (``Embeddings.genes``).
        layer: the AnnData layer of raw counts (default ``X``; ``"raw"`` for ``raw.X``).
        gene_id_key, total_counts_key, allow_non_integer: var column of gene ids, obs column of library sizes
            (``"auto"``: see :meth:`CellEncoder.tokenize`), accept non-integer counts.
        where: what messages call the data (the file name).
    """
    encoder = load_encoder(model, geneformer_dicts=geneformer_dicts, pooling=pooling, layer=hidden_layer,
                           device=device, bf16=bf16)
    started = time.perf_counter()
    cells = encoder.tokenize(adata, layer=layer, gene_id_key=gene_id_key, total_counts_key=total_counts_key,
                             allow_non_integer=allow_non_integer, where=where)
    rows = cell_rows(cells)
    width = None
    embedded = None
    sums = counts = None
    for positions, batch in encoder.batches(rows, batch_size, progress=progress):
        cell, states = encoder.forward(batch)
        if embedded is None:
            width = cell.shape[1]
            embedded = np.zeros((len(rows), width), dtype=np.float32)
            if gene_embeddings:
                sums = torch.zeros(encoder.vocab.vocab_size, states.shape[-1], dtype=torch.float64,
                                   device=encoder.device)
                counts = torch.zeros(encoder.vocab.vocab_size, dtype=torch.float64, device=encoder.device)
        embedded[positions] = cell.cpu().numpy()
        if gene_embeddings:
            ids = batch["input_ids"].to(encoder.device)
            keep = gene_positions(ids, batch["attention_mask"].to(encoder.device), batch["is_zero"].to(encoder.device),
                                  encoder.n_special)
            sums.index_add_(0, ids[keep], states[keep].double())
            counts.index_add_(0, ids[keep], torch.ones_like(ids[keep], dtype=torch.float64))
    out = np.full((adata.n_obs, width), np.nan, dtype=np.float32)
    position = pd.Index(np.asarray(adata.obs_names).astype(str)).get_indexer(cells.dataset["cell_id"])
    out[position] = embedded
    missing = adata.n_obs - len(rows)
    if missing:
        logger.warning("%s: %d cells have no counts or no gene of the model's vocabulary; their embeddings are NaN",
                       where, missing)
    genes = gene_table(encoder.vocab, sums.cpu().numpy(), counts.cpu().numpy()) if gene_embeddings else None
    seconds = time.perf_counter() - started
    if key_added:
        adata.obsm[key_added] = out
    logger.info("embedded %d cells in %.1f s (%.0f cells/s) with %s (%s pooling, layer %s)", len(rows), seconds,
                len(rows) / max(seconds, 1e-9), encoder.path, encoder.pooling,
                "final" if encoder.layer is None else encoder.layer)
    return Embeddings(out, genes, seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def read_h5ad(path: str | os.PathLike):
    """An h5ad file, in memory, with one clear error when it is missing or unreadable."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such h5ad file: {path}")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - h5py and anndata raise many kinds for a file that is not an h5ad
        raise CorruptFileError(f"{path} is not a readable h5ad file ({type(err).__name__}: {err})") from None


_TRUTHY = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def parse_tool_args(cls: type, argv: Sequence[str] | None, *, prog: str, positionals: Sequence[str]):
    """Parse ``argv`` into the dataclass ``cls`` (``transformers.HfArgumentParser``, with ``--config FILE`` as in
    :mod:`pretrain.args`); the fields named in ``positionals`` may also be given as leading positional arguments
    (``express-embed MODEL_DIR INPUT.h5ad ...``)."""
    from pretrain.args import build_parser, load_config_file

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, prog=prog, description=(cls.__doc__ or "").strip(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar=" ".join(p.upper() for p in positionals),
                        help="the same as " + ", ".join(f"--{p}" for p in positionals))
    # HfArgumentParser's flags take an optional value (--flag false): make a bare flag followed by a path explicit
    flags = {f"--{f.name}" for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    flags |= {f.replace("_", "-") for f in flags}
    fixed: list[str] = []
    for i, token in enumerate(argv):
        fixed.append(token)
        if token in flags and (i + 1 == len(argv) or argv[i + 1].lower() not in _TRUTHY):
            fixed.append("true")
    known, _ = parser.parse_known_args(fixed)
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    namespace = vars(parser.parse_intermixed_args(fixed))
    namespace.pop("config")
    paths = namespace.pop("paths")
    if len(paths) > len(positionals):
        parser.error(f"too many positional arguments: {paths}; expected {' '.join(p.upper() for p in positionals)}")
    for name, value in zip(positionals, paths):
        if namespace.get(name) is not None:
            parser.error(f"{name.upper()} is given twice (positionally and as --{name})")
        namespace[name] = value
    unknown = set(namespace) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        parser.error(f"unknown arguments: {sorted(unknown)}")
    return cls(**namespace)


@dataclass
class EmbedArgs:
    """express-embed MODEL_DIR INPUT.h5ad --out OUTPUT.h5ad: cell embeddings of a raw-count h5ad into obsm.

examples:
  express-embed runs/mine/final cells.h5ad --out cells_embedded.h5ad
  express-embed runs/mine/final cells.h5ad --inplace --key_added X_mine --pooling mean
  express-embed gf-12L-95M cells.h5ad --geneformer_dicts ../shared/data/geneformer/gc95M --out gf.h5ad \\
      --gene_embeddings genes.parquet --device cuda --batch_size 32
"""

    model_dir: str | None = field(default=None, metadata={
        "help": "express model folder, or a Geneformer-format (transformers BERT) checkpoint; required"})
    input: str | None = field(default=None, metadata={"help": "raw-count h5ad; required"})
    out: str | None = field(default=None, metadata={"help": "output h5ad (the input with obsm[key_added])"})
    inplace: bool = field(default=False, metadata={"help": "write the embeddings into INPUT.h5ad instead of --out"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing output files"})
    key_added: str = field(default="X_express", metadata={"help": "obsm key of the cell embeddings"})
    pooling: Literal["mean", "cls"] | None = field(default=None, metadata={
        "help": "cell embedding: mean over detected genes or the <cls> state (default: the express model's "
                "classifier_pooling; mean for Geneformer)"})
    layer: int | None = field(default=None, metadata={
        "help": "pool hidden_states[L] (0 = embeddings, -1 = last layer; default: the express encoder's output, "
                "-2 for Geneformer)"})
    batch_size: int = field(default=64, metadata={"help": "cells per forward pass"})
    device: Literal["cpu", "cuda"] | None = field(default=None, metadata={"help": "default: cuda when available"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on a GPU (--no_bf16: float32)"})
    geneformer_dicts: str | None = field(default=None, metadata={
        "help": "folder of Geneformer's token/median dictionaries as JSON (Geneformer checkpoints)"})
    gene_embeddings: str | None = field(default=None, metadata={
        "help": "also write per-gene contextual embeddings to this Parquet file"})
    counts_layer: str | None = field(default=None, metadata={
        "help": "AnnData layer holding the raw counts (default X; 'raw' for raw.X)"})
    gene_id_key: str | None = field(default=AUTO, metadata={
        "help": "var column of gene ids (auto: var['ensembl_id'] for Geneformer when present, else var_names)"})
    total_counts_key: str | None = field(default=AUTO, metadata={
        "help": "obs column of library sizes (auto: obs['n_counts'] for Geneformer when present, else row sums)"})
    allow_non_integer: bool = field(default=False, metadata={"help": "accept non-integer counts"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of an error"})

    def __post_init__(self) -> None:
        missing = [f"{name.upper()}" for name in ("model_dir", "input") if not getattr(self, name)]
        if missing:
            raise InputError(f"express-embed needs {' and '.join(missing)} (express-embed MODEL_DIR INPUT.h5ad --out "
                             "OUTPUT.h5ad)")
        if bool(self.out) == self.inplace:
            raise InputError("give either --out OUTPUT.h5ad or --inplace")
        if self.batch_size < 1:
            raise InputError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.gene_embeddings and not str(self.gene_embeddings).endswith(".parquet"):
            raise InputError(f"--gene_embeddings writes Parquet: give a .parquet path, not {self.gene_embeddings}")


def main(args: EmbedArgs) -> dict[str, Any]:
    """Embed INPUT's cells and write the outputs; returns a summary (paths, cells, seconds, cells/s)."""
    from tokenizer.output import check_output, staged_file

    source = Path(args.input)
    target = source if args.inplace else Path(args.out)
    if not args.inplace:  # fail before any work
        if target.resolve() == source.resolve():
            raise InputError("--out is the input file; use --inplace to write into it")
        check_output(target, args.overwrite)
    if args.gene_embeddings:
        check_output(args.gene_embeddings, args.overwrite)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    adata = read_h5ad(source)
    encoder = load_encoder(args.model_dir, geneformer_dicts=args.geneformer_dicts, pooling=args.pooling,
                           layer=args.layer, device=args.device, bf16=args.bf16)
    result = embed_cells(adata, encoder, key_added=args.key_added, batch_size=args.batch_size,
                         gene_embeddings=bool(args.gene_embeddings), layer=args.counts_layer,
                         gene_id_key=args.gene_id_key, total_counts_key=args.total_counts_key,
                         allow_non_integer=args.allow_non_integer, progress=args.progress, where=str(source))
    adata.uns[f"{args.key_added}_params"] = {
        "model": str(encoder.path), "kind": encoder.kind, "pooling": encoder.pooling,
        "layer": "final" if encoder.layer is None else int(encoder.layer),
    }
    with staged_file(target, overwrite=True if args.inplace else args.overwrite) as tmp:
        adata.write_h5ad(tmp)
        if args.gene_embeddings:
            with staged_file(args.gene_embeddings, overwrite=args.overwrite) as genes_tmp:
                result.genes.to_parquet(genes_tmp, index=False)
    summary = {"out": str(target), "gene_embeddings": args.gene_embeddings, "n_cells": int(adata.n_obs),
               "dim": int(result.cells.shape[1]), "seconds": round(result.seconds, 3),
               "cells_per_second": round(result.cells_per_second, 1)}
    logger.info("wrote %s", summary)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """``express-embed``: exit code 0, 2 for bad input (one line), 1 otherwise (``--debug``: the traceback)."""
    from tokenizer.errors import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    return run_cli("express-embed", lambda: main(parse_tool_args(EmbedArgs, argv, prog="express-embed",
                                                                 positionals=("model_dir", "input"))),
                   debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(cli())
