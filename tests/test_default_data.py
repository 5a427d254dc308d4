"""The built-in default dataset: raw integer counts recovered from scanpy's pbmc68k_reduced, with a fixed split."""

import numpy as np
import scipy.sparse as sp

from tokenizer.data import pbmc68k_counts


def test_pbmc68k_counts_are_raw_integers_with_labels_and_split():
    adata = pbmc68k_counts()
    assert adata.shape == (700, 765)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    assert adata.X.data.min() >= 1  # explicit zeros removed, no negatives
    # the 765 genes are a subset of each cell's transcriptome: their sum never exceeds the stored library size
    sums = np.asarray(adata.X.sum(1)).ravel()
    assert np.all(sums <= adata.obs["n_counts"].to_numpy() + 0.5)
    assert adata.obs["cell_type"].nunique() == 10
    # stratified 80/20 split: every cell type has test cells, and the split is the same on every call
    split = adata.obs["split"].astype(str)
    assert split.value_counts().to_dict() == {"train": 558, "test": 142}
    per_type = adata.obs.groupby("cell_type", observed=True)["split"].apply(lambda s: (s == "test").sum())
    assert per_type.min() >= 1
    assert np.array_equal(split.to_numpy(), pbmc68k_counts().obs["split"].astype(str).to_numpy())


def test_pbmc68k_counts_invert_the_log_normalisation():
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    counts = pbmc68k_counts()
    logged = np.log1p(counts.X.toarray() / counts.obs["n_counts"].to_numpy()[:, None] * 10_000)
    # the stored logs are rounded to 3 decimals, so agreement is to within half a unit of the third
    np.testing.assert_allclose(logged, reduced.raw.X.toarray(), rtol=0, atol=5.1e-4)
