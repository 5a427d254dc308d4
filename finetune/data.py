"""From raw-count AnnData to what the fine-tuning heads read.

- :func:`load_h5ad`, :func:`split_adata`: read a file; split one AnnData into train and held-out cells by an obs
  column.
- :func:`log_normalize`: ``log1p(counts / library * 1e4)`` (library = the cell's total over all its genes), the MLP
  encoder's and the classical baselines' input.
- :func:`select_genes`: highly variable genes of the training cells (Seurat dispersion ranking on log-normalised
  counts), the MLP encoder's input and the VAE decoder's output.
- :func:`normalize_proteins`: protein levels on the scale the ADT task is scored on.
- :class:`CellTable` / :func:`build_table`: one AnnData aligned to a model's genes, batches, labels and proteins;
  :class:`TableCollator` turns rows of it into model keyword arguments (tokenizing with the pretrained vocabulary
  for the transformer encoder, through the shared :class:`pretrain.data.ExpressCollator`).

Protein normalisation (``protein_norm``):

- ``"clr"`` (default): centred log-ratio per protein across cells, ``log1p(x / g_p)`` with
  ``g_p = exp(mean_cells log1p(x_p))`` -- muon's ``prot.pp.clr`` with its default axis, the normalisation of the
  NeurIPS 2021 CITE-seq data. The reference ``log g_p`` is fitted on the training cells and stored with the model,
  so held-out cells are normalised without looking at each other;
- ``"clr_cell"``: centred log-ratio per cell across proteins (Seurat ``margin = 2``), needs no reference;
- ``"log1p_cpt"``: ``log1p(x / total * 1e3)`` (counts per thousand), needs no reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

logger = logging.getLogger(__name__)

PROTEIN_NORMS = ("clr", "clr_cell", "log1p_cpt")
UNLABELLED = -100


class FinetuneDataError(ValueError):
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
        raise FinetuneDataError(f"obs[{split_key!r}] has no cells with value(s) {missing}; it has {sorted(values.unique())}")
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
def log_normalize(counts: sp.csr_matrix, library: np.ndarray | None = None, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(counts / library * target_sum)``; ``library`` defaults to the row sums."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    if library is None:
        library = np.asarray(counts.sum(1)).ravel()
    scale = target_sum / np.maximum(np.asarray(library, dtype=np.float64), 1.0)
    out = sp.diags(scale.astype(np.float32)) @ counts
    out = sp.csr_matrix(out)
    np.log1p(out.data, out=out.data)
    return out


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
    """Protein counts (..., cells, proteins) on the normalised scale (see the module docstring)."""
    x = np.asarray(counts, dtype=np.float64)
    if method == "clr":
        if reference is None or len(reference) != x.shape[-1]:
            raise ValueError("per-protein CLR needs the reference log geometric means fitted on the training cells")
        return np.log1p(x / np.exp(np.asarray(reference)))
    if method == "clr_cell":
        return np.log1p(x / np.exp(np.log1p(x).mean(-1, keepdims=True)))
    if method == "log1p_cpt":
        return np.log1p(x / np.maximum(x.sum(-1, keepdims=True), 1.0) * 1e3)
    raise ValueError(f"protein_norm must be one of {PROTEIN_NORMS}, got {method!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Cell tables
# ---------------------------------------------------------------------------------------------------------------------
def encode_labels(values: Sequence, categories: Sequence[str], *, unlabelled: Sequence[str] = ()) -> np.ndarray:
    """Category index per cell; ``UNLABELLED`` (-100) for missing values, ``unlabelled`` markers and values that are
    not among ``categories`` (held-out cell types the model was not trained on)."""
    index = {c: i for i, c in enumerate(categories)}
    skip = {str(u) for u in unlabelled}
    out = np.full(len(values), UNLABELLED, dtype=np.int64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) in skip:
            continue
        out[i] = index.get(str(v), UNLABELLED)
    return out


def label_categories(values: Sequence, *, unlabelled: Sequence[str] = ()) -> list[str]:
    """Sorted distinct labels, leaving out missing values and ``unlabelled`` markers."""
    skip = {str(u) for u in unlabelled} | {"nan", "None"}
    return sorted({str(v) for v in pd.Series(values).dropna()} - skip)


@dataclass
class TokenRows:
    """Tokenized cells as flat arrays with offsets, in the AnnData's cell order."""

    offsets: np.ndarray  # (n + 1,)
    input_ids: np.ndarray
    values: np.ndarray
    is_zero: np.ndarray

    @classmethod
    def from_dataset(cls, dataset, obs_names: np.ndarray, cls_id: int) -> TokenRows:
        """Reorder a tokenized ``datasets.Dataset`` to ``obs_names``; cells the tokenizer left out (no vocabulary
        gene) become a lone ``<cls>`` token, with a warning."""
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        cols = {name: table.column(name).combine_chunks() for name in ("input_ids", "values", "is_zero")}
        offsets = np.asarray(cols["input_ids"].offsets)
        flat = {name: np.asarray(col.values) for name, col in cols.items()}
        cell_ids = np.asarray(table.column("cell_id").to_pylist(), dtype=str)
        position = {c: i for i, c in enumerate(cell_ids)}
        if len(position) != len(cell_ids):
            raise FinetuneDataError("cell names (obs_names) must be unique to match tokenized cells back to them")
        rows = np.array([position.get(c, -1) for c in obs_names], dtype=np.int64)
        missing = int((rows < 0).sum())
        if missing:
            logger.warning("%d cells have no gene of the model's vocabulary; they are encoded as <cls> alone", missing)
        lengths = np.where(rows >= 0, np.diff(offsets)[np.maximum(rows, 0)], 1)
        new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])
        gather = np.concatenate([np.arange(offsets[r], offsets[r + 1]) if r >= 0 else np.array([-1])
                                 for r in rows]) if len(rows) else np.zeros(0, dtype=np.int64)
        out = {}
        for name, values in flat.items():
            picked = values[np.maximum(gather, 0)].copy()
            picked[gather < 0] = cls_id if name == "input_ids" else 0
            out[name] = picked
        return cls(new_offsets, out["input_ids"], out["values"], out["is_zero"])

    def rows(self, indices: np.ndarray) -> list[dict[str, np.ndarray]]:
        out = []
        for i in indices:
            lo, hi = self.offsets[i], self.offsets[i + 1]
            out.append({"input_ids": self.input_ids[lo:hi], "values": self.values[lo:hi],
                        "is_zero": self.is_zero[lo:hi]})
        return out


@dataclass
class CellTable:
    """One AnnData prepared for a model. Row ``i`` of every array is cell ``i``."""

    obs_names: np.ndarray
    counts: sp.csr_matrix | None  # (n, G) raw counts of the decoder genes (VAE)
    library: np.ndarray | None  # (n,) sum over the decoder genes
    log_inputs: sp.csr_matrix | None  # (n, G_in) MLP input
    batch_index: np.ndarray  # (n,) training-batch id, -1 for unseen batches or no batch key
    labels: np.ndarray  # (n,) class id, -100 = unlabelled
    proteins: np.ndarray | None  # (n, P) raw protein counts
    protein_targets: np.ndarray | None  # (n, P) normalised
    tokens: TokenRows | None = None  # transformer encoder input

    def __len__(self) -> int:
        return len(self.obs_names)


def build_table(
    adata: ad.AnnData, settings, *, label_key: str | None = None, label_names: Sequence[str] = (),
    batch_key: str | None = None, protein_key: str | None = None, gene_id_key: str | None = None,
    layer: str | None = None, vocab=None, unlabelled: Sequence[str] = (), labelled_key: str | None = None,
    tokenize_kwargs: dict | None = None, need_counts: bool = True,
) -> CellTable:
    """Align ``adata`` to a model's :class:`~modeling.modeling_vae.HeadSettings` (genes, batches, proteins) and its
    label names (``config.id2label`` order).

    ``labelled_key``: optional boolean obs column; cells where it is False are treated as unlabelled, whatever their
    label says (semi-supervised training without label leakage).
    """
    counts = counts_matrix(adata, layer)
    names = gene_names(adata, gene_id_key)
    total = np.asarray(counts.sum(1)).ravel()
    if np.any(total <= 0):
        bad = adata.obs_names[int(np.argmax(total <= 0))]
        raise FinetuneDataError(f"cell {bad!r} has no counts at all; filter empty cells before fine-tuning")

    decoder = align_genes(counts, names, settings.decoder_genes, what="data") if need_counts and settings.decoder_genes \
        else None
    library = np.asarray(decoder.sum(1)).ravel().astype(np.float32) if decoder is not None else None
    if library is not None and np.any(library <= 0):
        n_empty = int((library <= 0).sum())
        logger.warning("%d cells have no counts over the decoder genes; their library is set to 1", n_empty)
        library = np.maximum(library, 1.0)
    log_inputs = None
    if settings.encoder == "mlp":
        log_inputs = align_genes(log_normalize(counts, total), names, settings.input_genes, what="data")

    batch_index = np.full(adata.n_obs, -1, dtype=np.int64)
    if settings.batch_categories and batch_key is None:
        logger.info("no batch_key given: cells are decoded without a batch one-hot (the encoder never reads batches)")
    elif settings.batch_categories:
        if batch_key not in adata.obs:
            raise FinetuneDataError(f"batch key {batch_key!r} is not an obs column; columns: {list(adata.obs.columns)}")
        lookup = {b: i for i, b in enumerate(settings.batch_categories)}
        batch_index = np.array([lookup.get(str(b), -1) for b in adata.obs[batch_key]], dtype=np.int64)
        unseen = sorted({str(b) for b, i in zip(adata.obs[batch_key], batch_index) if i < 0})
        if unseen:
            logger.info("batches %s were not seen in training: decoded without a batch one-hot", unseen[:5])

    labels = np.full(adata.n_obs, UNLABELLED, dtype=np.int64)
    if label_key is not None:
        if label_key not in adata.obs:
            raise FinetuneDataError(f"label key {label_key!r} is not an obs column; columns: {list(adata.obs.columns)}")
        labels = encode_labels(adata.obs[label_key].tolist(), list(label_names), unlabelled=unlabelled)
    if labelled_key is not None:
        if labelled_key not in adata.obs:
            raise FinetuneDataError(f"labelled key {labelled_key!r} is not an obs column")
        labels[~adata.obs[labelled_key].to_numpy().astype(bool)] = UNLABELLED

    proteins = targets = None
    if protein_key is not None and settings.proteins:
        proteins, _ = protein_counts(adata, protein_key, settings.proteins)
        targets = normalize_proteins(proteins, settings.protein_norm, settings.protein_reference or None)

    tokens = None
    if settings.encoder == "transformer":
        if vocab is None:
            raise FinetuneDataError("the transformer encoder needs the pretrained vocabulary to tokenize cells")
        from tokenizer.tokenize import tokenize_adata

        dataset = tokenize_adata(adata, vocab, gene_id_key=gene_id_key, layer=layer, **(tokenize_kwargs or {}))
        tokens = TokenRows.from_dataset(dataset, adata.obs_names.to_numpy().astype(str), vocab.cls_id)
    return CellTable(
        obs_names=adata.obs_names.to_numpy().astype(str), counts=decoder, library=library, log_inputs=log_inputs,
        batch_index=batch_index, labels=labels, proteins=proteins,
        protein_targets=None if targets is None else targets.astype(np.float32), tokens=tokens,
    )


class TableDataset(torch.utils.data.Dataset):
    """Cell indices of a :class:`CellTable` (the collator gathers the rows)."""

    def __init__(self, table: CellTable, indices: np.ndarray | None = None):
        self.table = table
        self.indices = np.arange(len(table)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return int(self.indices[i])


@dataclass
class TableCollator:
    """Cell indices -> model keyword arguments: ``log_counts`` (MLP) or padded tokens (transformer), plus
    ``counts``/``library``/``batch_index``/``labels``/``proteins``/``protein_targets`` as the table has them."""

    table: CellTable
    token_collator: object | None = None  # pretrain.data.ExpressCollator for the transformer encoder

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        t = self.table
        batch: dict[str, torch.Tensor] = {}
        if t.log_inputs is not None:
            batch["log_counts"] = torch.from_numpy(t.log_inputs[idx].toarray())
        if t.tokens is not None:
            batch.update(self.token_collator(t.tokens.rows(idx)))
        if t.counts is not None:
            batch["counts"] = torch.from_numpy(t.counts[idx].toarray())
            batch["library"] = torch.from_numpy(t.library[idx])
        batch["batch_index"] = torch.from_numpy(t.batch_index[idx])
        batch["labels"] = torch.from_numpy(t.labels[idx])
        if t.proteins is not None:
            batch["proteins"] = torch.from_numpy(t.proteins[idx].astype(np.float32))
            batch["protein_targets"] = torch.from_numpy(t.protein_targets[idx])
        return batch
