"""Zero-shot evaluation of frozen cell embeddings, the baselines on the same cells, and the diagnostics behind them.

Embeddings of a model (:func:`model_embeddings`): the ``<cls>`` state, the mean over detected genes (special tokens and
sampled zeros left out) and both concatenated, from one forward pass. Baselines on the same cells and tokens:

- ``pca``: PCA (50) of scaled, log-normalised highly variable genes (the field's reference, "lift over PCA");
- ``bag_of_genes``: each cell's top-k genes as a binary vector, reduced with a 50-component truncated SVD (the
  information in the tokens, without a model);
- ``group_histogram``: the share of each cell's top-k genes in each hierarchy group (what random group embeddings
  average to).

Each embedding is scored raw, z-scored (per dimension) and cosine-normalised (:func:`knn_scores`: out-of-fold k-NN
accuracy and macro-F1, stratified folds). Diagnostics: the norms of the per-gene and per-group embedding rows and of
their projected contributions (:func:`embedding_norms`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tokenizer import TokenizationSpec, TokenizedCells

POOLINGS = ("cls", "mean", "cls_mean")
SCALINGS = ("raw", "zscore", "cosine")


@torch.no_grad()
def model_embeddings(model, cells: TokenizedCells, rows: np.ndarray, *, spec: TokenizationSpec | None = None,
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{"cls", "mean", "cls_mean"}`` embeddings of ``cells.dataset`` rows ``rows`` by an ``ExpressModel`` (or a
    model with an ``express`` encoder). ``spec``: how the model reads cells (its ``tokenization.json``): the stored
    tokens are cut to its ``top_k`` genes and ``n_zeros`` zeros, and re-encoded from the kept counts through its
    gene panel when it has one, so the model sees cells as in pretraining."""
    from pretrain.data import CellDataset, ExpressCollator

    encoder = getattr(model, "express", model)
    encoder.eval()
    columns = ["input_ids", "values", "is_zero"]
    if spec is None:
        collator = ExpressCollator(cells.vocab, mlm_probability=0.0)
    else:
        stored = cells.spec
        read = stored.replace(top_k=min(spec.top_k, stored.top_k), n_zeros=min(spec.n_zeros, stored.n_zeros),
                              input_genes=spec.input_genes)
        panel = spec.input_genes is not None
        collator = ExpressCollator(cells.vocab, mlm_probability=0.0, specs=[read], truncate=True,
                                   gene_selection="panel" if panel else "top")
        if panel:
            columns += ["counts_ids", "counts", "total_counts", "source"]
    dataset = CellDataset([cells.dataset], [rows], columns=columns)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in POOLINGS}
    for start in range(0, len(dataset), batch_size):
        batch = collator(dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset))))))
        hidden = encoder(input_ids=batch["input_ids"], values=batch["values"], is_zero=batch["is_zero"],
                         attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
        genes = (batch["attention_mask"].bool() & (batch["input_ids"] >= cells.vocab.n_special) &
                 (batch["is_zero"] == 0)).unsqueeze(-1).float()
        cls, mean = hidden[:, 0], (hidden * genes).sum(1) / genes.sum(1).clamp_min(1)
        parts["cls"].append(cls.numpy())
        parts["mean"].append(mean.numpy())
        parts["cls_mean"].append(torch.cat([cls, mean], -1).numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _detected_tokens(cells: TokenizedCells, rows: np.ndarray) -> list[np.ndarray]:
    part = cells.dataset.data.table.select(["input_ids", "is_zero"]).take(rows)
    ids, zeros = part["input_ids"].to_pylist(), part["is_zero"].to_pylist()
    n = cells.vocab.n_special
    return [np.asarray([t for t, z in zip(i, zz) if t >= n and not z], dtype=np.int64) for i, zz in zip(ids, zeros)]


def bag_of_genes(cells: TokenizedCells, rows: np.ndarray, *, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """Each cell's detected top-k genes as a binary vocabulary vector, reduced with truncated SVD."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    tokens = _detected_tokens(cells, rows)
    indptr = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
    matrix = sp.csr_matrix((np.ones(indptr[-1]), np.concatenate(tokens), indptr),
                           shape=(len(tokens), cells.vocab.vocab_size))
    k = min(n_components, matrix.shape[0] - 1, matrix.shape[1] - 1)
    return TruncatedSVD(k, random_state=seed).fit_transform(matrix)


def group_histogram(cells: TokenizedCells, rows: np.ndarray) -> np.ndarray:
    """The share of each cell's detected top-k genes in each hierarchy group, every level side by side."""
    groups = cells.vocab.token_group_ids  # (V, L)
    sizes = cells.vocab.n_groups
    out = []
    for tokens in _detected_tokens(cells, rows):
        levels = [np.bincount(groups[tokens, level], minlength=size) / max(len(tokens), 1)
                  for level, size in enumerate(sizes)]
        out.append(np.concatenate(levels) if levels else np.zeros(0))
    return np.asarray(out, dtype=np.float64)


def pca_features(adata, *, n_components: int = 50, n_top_genes: int = 2000, seed: int = 0) -> np.ndarray:
    """PCA of scaled, log-normalised highly variable genes of ``adata`` (its cells in order)."""
    import scanpy as sc

    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    if n_top_genes < adata.n_vars:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes)
        adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.scale(adata, max_value=10)
    n_comps = min(n_components, adata.n_obs - 1, adata.n_vars - 1)
    sc.pp.pca(adata, n_comps=n_comps, random_state=seed)
    return np.asarray(adata.obsm["X_pca"])


def scaled(features: np.ndarray, how: str) -> np.ndarray:
    """``raw``, ``zscore`` (each dimension to mean 0, sd 1) or ``cosine`` (each cell to unit length)."""
    x = np.asarray(features, dtype=np.float64)
    if how == "zscore":
        return (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    if how == "cosine":
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if how != "raw":
        raise ValueError(f"scaling must be one of {SCALINGS}, got {how!r}")
    return x


def knn_scores(features: np.ndarray, labels: np.ndarray, *, k: int = 15, folds: int = 5, seed: int = 0) -> dict:
    """Out-of-fold k-NN (stratified ``folds``-fold) accuracy and macro-F1 of ``labels`` from ``features``."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    predictions = np.empty_like(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes smaller than the number of folds
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for train, test in splitter.split(features, labels):
            knn = KNeighborsClassifier(n_neighbors=min(k, len(train)))
            predictions[test] = knn.fit(features[train], labels[train]).predict(features[test])
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro"))}


def score_embedding(features: np.ndarray, labels: np.ndarray, *, seed: int = 0, full: bool = True) -> dict:
    """k-NN scores raw, z-scored and cosine-normalised; with ``full`` also the label silhouette and NMI/ARI."""
    from finetune import metrics as M

    out = {how: knn_scores(scaled(features, how), labels, seed=seed) for how in SCALINGS}
    if full:
        out["label_silhouette"] = M.label_silhouette(features, labels)
        out.update(M.cluster_agreement(features, labels, seed=seed))
    return out


@torch.no_grad()
def embedding_norms(model) -> dict[str, float]:
    """Mean L2 norm of the per-gene and per-group embedding rows, and of each one's contribution after the
    projection to the hidden size (how much of a token is identity, how much its groups), and of the rank table."""
    embeddings = getattr(model, "express", model).embeddings
    genes = embeddings.gene_embeddings.weight[4:]
    weight = embeddings.gene_projection.weight  # (H, Dg + sum(Dl)) with concat
    out = {"gene_row": float(genes.norm(dim=1).mean()),
           "gene_projected": float((genes @ weight[:, : genes.shape[1]].T).norm(dim=1).mean())}
    start = genes.shape[1]
    for level, table in enumerate(embeddings.group_embeddings):
        rows = table.weight[1:]
        out[f"group_l{level + 1}_row"] = float(rows.norm(dim=1).mean())
        if weight.shape[1] > genes.shape[1]:
            part = weight[:, start:start + rows.shape[1]]
            out[f"group_l{level + 1}_projected"] = float((rows @ part.T).norm(dim=1).mean())
            start += rows.shape[1]
    if embeddings.position_embeddings is not None:
        out["rank_row"] = float(embeddings.position_embeddings.weight[:300].norm(dim=1).mean())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The zero-shot task
# ---------------------------------------------------------------------------------------------------------------------
from .suite import note, register  # noqa: E402 -- the task registry (suite imports this module lazily)


def labelled_datasets(bench) -> list[str]:
    """Datasets with cell-type labels (the stimulation file's labels cover only its control cells: left out)."""
    return [n for n, d in bench.datasets.items() if d.label_key is not None and d.name != "kang_stim"]


def eval_cells(bench, name: str, seed: int) -> tuple[TokenizedCells, np.ndarray, np.ndarray]:
    """The tokenized cells of ``name`` the zero-shot scores read: labelled ones, subsampled to the budget's
    ``eval_cells`` (seeded)."""
    import pandas as pd

    from .common import subsample

    cells = TokenizedCells.load(bench.corpus.complete[name])
    data = bench.datasets[name]
    labels = np.asarray(cells.dataset[data.label_key], dtype=object).astype(str)
    keep = np.flatnonzero(data.labelled(pd.DataFrame({data.label_key: labels})))
    keep = keep[subsample(len(keep), bench.budget.eval_cells, seed)]
    return cells, keep, labels[keep]


def eval_adata(bench, name: str, cells: TokenizedCells, rows: np.ndarray):
    """The raw-count cells of ``rows`` (in that order) from the dataset's file."""
    import anndata as ad

    adata = ad.read_h5ad(bench.corpus.files[name])
    ids = np.asarray(cells.dataset.select(rows.tolist())["cell_id"], dtype=object)
    index = adata.obs_names.get_indexer(ids)
    if (index < 0).any():
        raise ValueError(f"{name}: {int((index < 0).sum())} tokenized cells are not in {bench.corpus.files[name]}")
    return adata[index].copy()


def express_embedding(model_path, cells: TokenizedCells, rows: np.ndarray) -> tuple[np.ndarray, dict]:
    """A pretrained model's cell embedding (its own ``classifier_pooling``) and every pooling's embedding, with the
    cells read as its ``tokenization.json`` says."""
    from modeling import ExpressForMaskedModeling

    model = ExpressForMaskedModeling.from_pretrained(model_path)
    pooled = model_embeddings(model, cells, rows, spec=TokenizationSpec.load(model_path))
    return pooled[model.config.classifier_pooling], pooled


@register("zeroshot", labelled_datasets, primary="macro_f1",
          description="frozen embeddings of labelled cells, no fine-tuning: 5-fold k-NN (k=15) accuracy and "
                      "macro-F1, label silhouette, NMI/ARI of k-means clusters")
def zeroshot_task(bench, name: str, seed: int) -> dict:
    """Frozen embeddings of ``name``'s labelled cells: express pretrained / at random weights (the model's own
    pooling; every pooling as diagnostics), PCA, the bag of genes, the group histogram, and scVI's latent."""
    from . import scvi_arms
    from .common import model_dir

    cells, rows, labels = eval_cells(bench, name, seed)
    adata = eval_adata(bench, name, cells, rows)
    features = {"pca": pca_features(adata, seed=seed), "bag_of_genes": bag_of_genes(cells, rows, seed=seed),
                "group_histogram": group_histogram(cells, rows)}
    diagnostics = {}
    for arm, variant in (("express_pretrained", "default"), ("express_random_init", "random")):
        features[arm], pooled = express_embedding(model_dir(bench, seed, variant), cells, rows)
        for pooling, emb in pooled.items():
            diagnostics[f"{arm}_{pooling}"] = _flat(score_embedding(emb, labels, seed=seed, full=False))
    if scvi_arms.missing() is None:
        data = bench.datasets[name]
        features["scvi"] = scvi_arms.scvi_latent(adata, batch_key=data.batch_key, epochs=bench.budget.scvi_epochs,
                                                 seed=seed)
    else:
        note(f"scvi-tools arms skipped: {scvi_arms.missing()}")
    scores = {arm: _flat(score_embedding(x, labels, seed=seed)) for arm, x in features.items()}
    return {"embeddings": scores, "poolings (diagnostic)": diagnostics}


def _flat(score: dict) -> dict[str, float]:
    """``{"raw": {"macro_f1": ..}, "label_silhouette": ..}`` -> ``{"macro_f1": .., "macro_f1_cosine": .., ...}``."""
    out = {}
    for key, value in score.items():
        if isinstance(value, dict):
            for metric, v in value.items():
                out[metric if key == "raw" else f"{metric}_{key}"] = v
        else:
            out[key] = value
    return out
