"""From raw-count AnnData to the cells a fine-tuning head reads.

- :func:`load_h5ad`, :func:`split_adata`: read a file; split one AnnData into train and held-out cells by an obs
  column.
- :func:`log_normalize`: ``log1p(counts / library * 1e4)`` (scanpy's ``normalize_total`` and ``log1p``), the classical
  baselines' input.
- :func:`select_genes`: highly variable genes of the training cells (Seurat dispersion ranking on log-normalised
  counts), a head's gene panel (the MLP encoder's input and the VAE decoder's output).
- :func:`normalize_proteins`: protein levels on the scale the ADT task is scored on (``ExpressConfig.protein_norm``).
- :func:`cells_for_model`: one AnnData as a ``datasets.Dataset`` of the columns a model reads (the tokens, the gene
  panel's counts, labels, batches, proteins), in the AnnData's cell order, and :func:`collator_for` the collator
  that batches it. Training and prediction read it through the same dataset and collator as pretraining
  (:mod:`pretrain.data`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import torch

from modeling.configuration_express import PROTEIN_NORMS
from modeling.modeling_express import IGNORE_INDEX
from modeling.vae import normalize_protein_counts
from pretrain.data import encode_labels
from tokenizer import GeneVocab, InputError, TokenizationSpec

logger = logging.getLogger(__name__)

UNLABELLED = IGNORE_INDEX


class FinetuneDataError(InputError):
    """The AnnData given for fine-tuning lacks something or holds something it should not."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading and splitting
# ---------------------------------------------------------------------------------------------------------------------
def load_h5ad(path: str | Path) -> ad.AnnData:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such h5ad file: {path}")
    adata = ad.read_h5ad(path)
    adata.uns.setdefault("express_source", path.stem)
    return adata


def split_adata(adata: ad.AnnData, split_key: str, test_values: Sequence[str]) -> tuple[ad.AnnData, ad.AnnData]:
    """Cells whose ``obs[split_key]`` is one of ``test_values`` are held out; the rest train."""
    if split_key not in adata.obs:
        raise FinetuneDataError(f"split key {split_key!r} is not an obs column; columns: {list(adata.obs.columns)}")
    values = adata.obs[split_key].astype(str)
    test_values = [str(v) for v in test_values]
    missing = sorted(set(test_values) - set(values.unique()))
    if missing:
        raise FinetuneDataError(f"obs[{split_key!r}] has no cells with value(s) {missing}; it has "
                                f"{sorted(values.unique())}")
    test = values.isin(test_values).to_numpy()
    if test.all():
        raise FinetuneDataError(f"every cell has obs[{split_key!r}] in {test_values}: nothing left to train on")
    return adata[~test].copy(), adata[test].copy()


def counts_matrix(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """Raw counts as float32 CSR; raises if they are negative or not integers (log-normalised data by mistake)."""
    x = adata.layers[layer] if layer is not None else adata.X
    x = sp.csr_matrix(x, dtype=np.float32)
    sample = x.data[: 100_000]
    if sample.size and (sample.min() < 0 or not np.allclose(sample, np.round(sample))):
        where = f"layers[{layer!r}]" if layer else "X"
        raise FinetuneDataError(
            f"{where} does not hold raw counts (found negative or non-integer values); pass the raw UMI counts "
            "(layer=... if they are in a layer)"
        )
    return x


def gene_names(adata: ad.AnnData, gene_id_key: str | None = None) -> np.ndarray:
    if gene_id_key is None:
        return adata.var_names.to_numpy().astype(str)
    if gene_id_key not in adata.var:
        raise FinetuneDataError(f"gene id key {gene_id_key!r} is not a var column; columns: {list(adata.var.columns)}")
    return adata.var[gene_id_key].to_numpy().astype(str)


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation and gene selection
# ---------------------------------------------------------------------------------------------------------------------
def log_normalize(counts: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(counts / library * target_sum)`` with each cell's library its row sum (scanpy's ``normalize_total``
    then ``log1p``)."""
    import scanpy as sc

    cells = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(cells, target_sum=target_sum)
    sc.pp.log1p(cells)
    return sp.csr_matrix(cells.X)


def select_genes(adata: ad.AnnData, n_top_genes: int | None, *, gene_id_key: str | None = None,
                 layer: str | None = None) -> list[str]:
    """The ``n_top_genes`` most variable genes (Seurat flavour: normalised dispersion within mean bins) of the
    cells given, in their original order; all genes when ``n_top_genes`` is None or at least the gene count."""
    names = gene_names(adata, gene_id_key)
    valid = names != ""
    if n_top_genes is None or n_top_genes >= int(valid.sum()):
        return names[valid].tolist()
    import scanpy as sc

    counts = counts_matrix(adata, layer)
    tmp = ad.AnnData(X=log_normalize(counts), var=pd.DataFrame(index=pd.Index(names).astype(str)))
    tmp.var_names_make_unique()
    stats = sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
    keep = stats["highly_variable"].to_numpy() & valid
    return names[keep].tolist()


def align_genes(counts: sp.csr_matrix, names: np.ndarray, genes: Sequence[str], *, what: str = "data") -> sp.csr_matrix:
    """Columns of ``counts`` in the order of ``genes``; genes absent from ``names`` are zero (with a warning)."""
    position = {n: i for i, n in enumerate(names)}
    cols = np.array([position.get(g, -1) for g in genes], dtype=np.int64)
    missing = int((cols < 0).sum())
    if missing == len(genes):
        raise FinetuneDataError(
            f"none of the model's {len(genes)} genes is in the {what} (first model genes: {list(genes[:3])}, first "
            f"data genes: {list(names[:3])}); pass gene_id_key to match the identifiers the model was trained on"
        )
    if missing:
        logger.warning("%d of the model's %d genes are absent from the %s and read as zero", missing, len(genes), what)
    present = np.flatnonzero(cols >= 0)
    selector = sp.csr_matrix((np.ones(len(present), dtype=np.float32), (cols[present], present)),
                             shape=(counts.shape[1], len(genes)))
    return sp.csr_matrix(counts @ selector)


def protein_counts(adata: ad.AnnData, key: str, proteins: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Protein counts (cells, proteins) from ``obsm[key]`` (a DataFrame, or an array with ``uns[key + '_names']``),
    in the order of ``proteins`` when given."""
    if key not in adata.obsm:
        raise FinetuneDataError(f"no protein counts: obsm[{key!r}] is absent (obsm keys: {list(adata.obsm.keys())})")
    table = adata.obsm[key]
    if isinstance(table, pd.DataFrame):
        names = [str(c) for c in table.columns]
        values = table.to_numpy(dtype=np.float64)
    else:
        values = np.asarray(table.toarray() if sp.issparse(table) else table, dtype=np.float64)
        names = [str(c) for c in adata.uns.get(f"{key}_names", [f"protein_{i}" for i in range(values.shape[1])])]
    if values.size and (values.min() < 0 or not np.allclose(values, np.round(values))):
        raise FinetuneDataError(f"obsm[{key!r}] must hold raw protein counts (non-negative integers)")
    if proteins is None:
        return values, names
    index = {n: i for i, n in enumerate(names)}
    missing = [p for p in proteins if p not in index]
    if missing:
        raise FinetuneDataError(f"obsm[{key!r}] lacks protein(s) the model predicts: {missing[:5]}")
    return values[:, [index[p] for p in proteins]], list(proteins)


def fit_protein_reference(counts: np.ndarray, method: str) -> list[float]:
    """The per-protein reference of ``method`` fitted on training cells (``log g_p`` for ``"clr"``)."""
    if method not in PROTEIN_NORMS:
        raise ValueError(f"protein_norm must be one of {PROTEIN_NORMS}, got {method!r}")
    if method == "clr":
        return np.log1p(counts).mean(0).tolist()
    return []


def normalize_proteins(counts: np.ndarray, method: str = "clr", reference: Sequence[float] | None = None) -> np.ndarray:
    """Protein counts (..., cells, proteins) on the normalised scale: numpy in and out around the one definition,
    :func:`modeling.vae.normalize_protein_counts` (which the VAE's protein predictions use too)."""
    if method not in PROTEIN_NORMS:
        raise ValueError(f"protein_norm must be one of {PROTEIN_NORMS}, got {method!r}")
    x = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    return normalize_protein_counts(x, method, reference).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Cell tables
# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# Cells for a model
# ---------------------------------------------------------------------------------------------------------------------
SOURCE = "adata"  # the ``source`` of cells tokenized here, which keys the genes they measure


def measured_spec(adata: ad.AnnData, vocab: GeneVocab, spec: TokenizationSpec, *,
                  gene_id_key: str | None = None) -> TokenizationSpec:
    """``spec`` with the vocabulary genes ``adata`` measures (what a re-tokenization samples zeros among)."""
    ids = vocab.encode_gene_ids(list(gene_names(adata, gene_id_key)))
    return spec.replace(measured_genes={SOURCE: ids[ids >= 0]})


def _tokens_in_order(adata: ad.AnnData, vocab: GeneVocab, spec: TokenizationSpec, *, gene_id_key: str | None,
                     layer: str | None, keep_counts: bool = False) -> pa.Table:
    """``input_ids``/``values``/``is_zero`` of every cell of ``adata``, in its order (and ``counts_ids``/``counts``
    with ``keep_counts``). A cell with no gene of the vocabulary (which the tokenizer leaves out) is a lone ``<cls>``
    token, with a warning."""
    from tokenizer import tokenize_adata

    cells = tokenize_adata(adata, vocab, spec=spec, gene_id_key=gene_id_key, layer=layer, keep_counts=keep_counts,
                           source_name=SOURCE)
    columns = ["input_ids", "values", "is_zero", "cell_id"] + (["counts_ids", "counts", "source"] if keep_counts else [])
    table = cells.dataset.data.table.select(columns)
    position = {c: i for i, c in enumerate(table.column("cell_id").to_pylist())}
    if len(position) != len(table) or adata.obs_names.has_duplicates:
        raise FinetuneDataError("cell names (obs_names) must be unique to match tokenized cells back to them")
    rows = np.array([position.get(c, len(table)) for c in adata.obs_names], dtype=np.int64)
    missing = int((rows == len(table)).sum())
    if missing:
        logger.warning("%d cells have no gene of the model's vocabulary; they are encoded as <cls> alone", missing)
    lone = {"input_ids": [[vocab.cls_id]], "values": [[0.0]], "is_zero": [[0]], "cell_id": [""]}
    if keep_counts:
        lone.update(counts_ids=[[]], counts=[[]], source=[SOURCE])
    lone = pa.table(lone, schema=table.schema)
    return pa.concat_tables([table, lone]).take(pa.array(rows)).drop(["cell_id"])


def _ragged_column(matrix: sp.csr_matrix, values: bool = False) -> pa.Array:
    """A CSR matrix's rows as an Arrow list column of their column indices (or stored values)."""
    flat = matrix.data.astype(np.float32) if values else matrix.indices.astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(matrix.indptr.astype(np.int32)), pa.array(flat))


def cells_for_model(
    adata: ad.AnnData, config, *, vocab: GeneVocab | None = None, spec: TokenizationSpec | None = None,
    label_key: str | None = None, batch_key: str | None = None, protein_obsm_key: str | None = None,
    gene_id_key: str | None = None, layer: str | None = None, unlabelled: Sequence[str] = (),
    labelled_key: str | None = None, keep_counts: bool = False,
):
    """``adata`` as a ``datasets.Dataset`` of what a model with ``config`` reads, one row per cell in ``adata``'s
    order (with ``keep_counts``, also each cell's raw counts, which thinning re-tokenizes).

    Columns, by what the config asks for: the tokens (``config.encoder == "transformer"``; tokenized with ``vocab``
    and ``spec``), ``panel_ids``/``panel_counts`` (raw counts of ``config.gene_panel``, sparse) and ``total_counts``
    (each cell's library over all its genes), ``labels`` (with ``label_key``: class ids in ``config.id2label``
    order, -100 for unlabelled cells, unknown types, and cells where ``obs[labelled_key]`` is False -- whose labels
    are never read; for a protein regressor, the normalised protein levels), ``batch_index`` (VAE with
    ``batch_categories``; -1 for batches unseen in training) and ``protein_counts`` (VAE with ``proteins``).
    """
    import datasets

    counts = counts_matrix(adata, layer)
    total = np.asarray(counts.sum(1)).ravel()
    if np.any(total <= 0):
        bad = adata.obs_names[int(np.argmax(total <= 0))]
        raise FinetuneDataError(f"cell {bad!r} has no counts at all; filter empty cells before fine-tuning")
    columns: dict[str, pa.Array] = {}
    if config.encoder == "transformer":
        if vocab is None or spec is None:
            raise FinetuneDataError("the transformer encoder tokenizes cells with its vocabulary and spec")
        if spec.mode != "express":
            raise FinetuneDataError(f"this model was pretrained on {spec.mode}-mode tokens; fine-tuning tokenizes "
                                    "new cells in express mode only")
        tokens = _tokens_in_order(adata, vocab, spec, gene_id_key=gene_id_key, layer=layer, keep_counts=keep_counts)
        columns.update({name: tokens.column(name).combine_chunks() for name in tokens.column_names})
    if config.gene_panel:
        panel = align_genes(counts, gene_names(adata, gene_id_key), config.gene_panel, what="data")
        if config.model_type == "express_vae" and np.any(np.asarray(panel.sum(1)).ravel() <= 0):
            logger.warning("%d cells have no counts over the decoder genes; their library is set to 1",
                           int((np.asarray(panel.sum(1)).ravel() <= 0).sum()))
        columns["panel_ids"] = _ragged_column(panel)
        columns["panel_counts"] = _ragged_column(panel, values=True)
    columns["total_counts"] = pa.array(total.astype(np.float64))
    proteins = list(getattr(config, "proteins", []))
    regression = config.problem_type == "regression"
    if label_key is not None and not regression:
        names = [config.id2label[i] for i in sorted(config.id2label)]
        labels = encode_labels(require_obs(adata, label_key).tolist(), names, unlabelled=unlabelled)
        if labelled_key is not None:
            labels[~require_obs(adata, labelled_key).to_numpy().astype(bool)] = UNLABELLED
        columns["labels"] = pa.array(labels)
    if regression and protein_obsm_key is not None:
        names = [config.id2label[i] for i in sorted(config.id2label)]
        raw, _ = protein_counts(adata, protein_obsm_key, names)
        levels = normalize_proteins(raw, config.protein_norm, config.protein_reference or None)
        columns["labels"] = pa.array(list(levels.astype(np.float32)), type=pa.list_(pa.float32()))
    if proteins and protein_obsm_key is not None:
        raw, _ = protein_counts(adata, protein_obsm_key, proteins)
        columns["protein_counts"] = pa.array(list(raw.astype(np.float32)), type=pa.list_(pa.float32()))
    categories = list(getattr(config, "batch_categories", []))
    if categories:
        index = np.full(adata.n_obs, -1, dtype=np.int64)
        if batch_key is None:
            logger.info("no batch_key given: cells are decoded without a batch one-hot (the encoder never reads "
                        "batches)")
        else:
            lookup = {b: i for i, b in enumerate(categories)}
            values = require_obs(adata, batch_key).astype(str)
            index = np.array([lookup.get(b, -1) for b in values], dtype=np.int64)
            unseen = sorted(set(values[index < 0]))
            if unseen:
                logger.info("batches %s were not seen in training: decoded without a batch one-hot", unseen[:5])
        columns["batch_index"] = pa.array(index)
    return datasets.Dataset(pa.table(columns))


def collator_for(config, vocab: GeneVocab | None, dataset, *, spec: TokenizationSpec | None = None,
                 thinning: float = 0.0):
    """The shared collator (no masking) that batches :func:`cells_for_model`'s rows for a model with ``config``.

    ``thinning`` > 0: augmentation -- each visit keeps every count with a probability drawn from
    ``[1 - thinning, 1)`` (tokens re-encoded with ``spec`` from the kept counts; the panel's counts thinned alike)."""
    from pretrain.data import ExpressCollator

    passed = [c for c in ("total_counts", "labels", "batch_index", "protein_counts") if c in dataset.column_names]
    tokens = config.encoder == "transformer"
    fraction = (1.0 - thinning, 0.999) if thinning else None
    if thinning and tokens and "counts" not in dataset.column_names:
        raise FinetuneDataError("thinning re-tokenizes kept counts: make the cells with keep_counts=True")
    return ExpressCollator(vocab if tokens else None, mlm_probability=0.0, panel_size=len(config.gene_panel) or None,
                           pass_columns=passed, mcv_input_fraction=fraction if tokens else None, mcv_targets=False,
                           specs=[spec] if spec is not None else None,
                           panel_thinning=fraction if thinning and not tokens else None)


def require_obs(adata: ad.AnnData, key: str) -> pd.Series:
    """``obs[key]``, or a :class:`FinetuneDataError` listing the columns there are."""
    if key not in adata.obs:
        raise FinetuneDataError(f"{key!r} is not an obs column; columns: {list(adata.obs.columns)}")
    return adata.obs[key]
