"""The built-in default dataset: scanpy's ``pbmc68k_reduced`` turned back into raw UMI counts.

``pbmc68k_reduced`` ships inside scanpy (no download). Its ``.raw`` holds ``log1p(counts / n_counts * 10_000)`` for
765 genes and ``obs['n_counts']`` the library sizes, so ``round(expm1(raw) * n_counts / 10_000)`` recovers the
integer counts (the relative rounding residue, at most 4e-4, is checked below). Cell types are ``obs['bulk_labels']``,
copied to ``obs['cell_type']`` for the project's defaults. ``obs['split']`` marks a fixed, stratified 80/20
``train``/``test`` split (seed 0) so the quick start can fine-tune and evaluate on cells it did not train on.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)


def pbmc68k_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes of raw integer counts (CSR int32) with ``obs['cell_type']`` (10 bulk labels)."""
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    logged = sp.csr_matrix(reduced.raw.X)
    n_counts = reduced.obs["n_counts"].to_numpy(dtype=np.float64)
    values = np.expm1(logged.data.astype(np.float64)) * np.repeat(n_counts, np.diff(logged.indptr)) / 10_000.0
    counts = np.rint(values)
    # float32 storage of the logs leaves a residue that grows with the count (0.08 at a count of 213)
    residue = float((np.abs(values - counts) / np.maximum(counts, 1.0)).max()) if len(values) else 0.0
    if residue > 1e-3:
        raise RuntimeError(f"pbmc68k_reduced did not invert to integer counts (largest relative residue {residue:.2e})")
    X = sp.csr_matrix((counts.astype(np.int32), logged.indices, logged.indptr), shape=logged.shape)
    X.eliminate_zeros()
    obs = reduced.obs[["bulk_labels", "louvain", "n_counts", "phase"]].copy()
    obs["cell_type"] = obs["bulk_labels"].astype(str).astype("category")
    obs["split"] = pd.Categorical(_stratified_split(obs["cell_type"].to_numpy(), test_fraction=0.2, seed=0))
    adata = ad.AnnData(X=X, obs=obs, var=reduced.raw.var[[]].copy())
    adata.var["gene_symbol"] = adata.var_names.to_numpy()
    adata.uns["source"] = "scanpy.datasets.pbmc68k_reduced (raw counts recovered from .raw and obs['n_counts'])"
    return adata


def _stratified_split(labels: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
    """'train'/'test' per cell: within each label, a seeded random ``test_fraction`` (at least one cell) is 'test'."""
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_test = max(1, int(round(test_fraction * len(members))))
        split[rng.choice(members, n_test, replace=False)] = "test"
    return split
