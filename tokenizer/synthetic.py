"""Realistic synthetic UMI count matrices, for tests and benchmarks (``scripts/make_synthetic.py``).

The model follows what droplet (10x) data look like:

- gene expression shares ``p_g`` are heavy-tailed (log-normal, sigma 2: a few hundred genes take most of the
  counts, most genes are rare);
- cell types rescale a random 5% of the genes each by log-normal factors (sigma 1.5), so genes co-vary in modules;
- library sizes are log-normal (median ``depth``, sigma 0.6, a heavy right tail);
- counts are negative binomial (gamma-Poisson) with per-gene inverse dispersion ``r_g`` log-normal around 2:
  ``x ~ NB(mean = L_c * p_g,type, r_g)``.

With the defaults (20,000 genes, median depth 3,000) about 8% of genes are detected per cell, as in 10x data.
Cells are generated in chunks by a compiled sampler (one uniform draw per cell and gene, an inverse-CDF walk only for
the non-zero ones), seeded per chunk, so a 200k-cell file is written without ever holding the matrix in memory and
the same seed always gives the same file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class SyntheticDesign:
    """Gene and cell-type parameters shared by all chunks of one synthetic corpus."""

    shares: np.ndarray  # (n_types, n_genes) expression shares, rows sum to 1
    inverse_dispersion: np.ndarray  # (n_genes,)
    gene_ids: np.ndarray
    gene_symbols: np.ndarray
    cell_types: list[str]
    donors: list[str]
    depth: float
    depth_sigma: float
    seed: int


def make_design(n_genes: int = 20_000, *, n_cell_types: int = 8, n_donors: int = 12, depth: float = 3000.0,
                depth_sigma: float = 0.6, seed: int = 0) -> SyntheticDesign:
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 2.0, n_genes)
    shares = np.tile(base, (n_cell_types, 1))
    for t in range(n_cell_types):
        module = rng.choice(n_genes, max(1, n_genes // 20), replace=False)
        shares[t, module] *= rng.lognormal(0.0, 1.5, len(module))
    shares /= shares.sum(1, keepdims=True)
    inverse_dispersion = rng.lognormal(math.log(2.0), 0.5, n_genes)
    gene_ids = np.array([f"ENSG9{i:010d}" for i in range(n_genes)])
    gene_symbols = np.array([f"SYN{i:05d}" for i in range(n_genes)])
    return SyntheticDesign(shares, inverse_dispersion, gene_ids, gene_symbols,
                           [f"type_{t}" for t in range(n_cell_types)], [f"donor_{d}" for d in range(n_donors)],
                           depth, depth_sigma, seed)


@numba.njit(cache=True)
def _sample_chunk(shares, inverse_dispersion, cell_type, library, seed):
    """CSR (indptr, indices, data) of NB counts for one chunk of cells."""
    np.random.seed(seed)
    n_cells, n_genes = cell_type.shape[0], shares.shape[1]
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    cap = n_cells * 64
    indices = np.empty(cap, dtype=np.int32)
    data = np.empty(cap, dtype=np.int32)
    nnz = 0
    for i in range(n_cells):
        row = shares[cell_type[i]]
        for g in range(n_genes):
            mu = library[i] * row[g]
            r = inverse_dispersion[g]
            u = np.random.random()
            x = 0
            if u < 1.0 - mu:
                continue  # P(x > 0) <= E[x] = mu (Markov), so this draw is a zero: no need for the exact P(x = 0)
            if mu < 30.0:
                p0 = math.exp(-r * math.log1p(mu / r))
                if u >= p0:
                    ratio = mu / (r + mu)
                    pmf, cdf, k = p0, p0, 0
                    while cdf < u and k < 100_000:
                        pmf *= (k + r) / (k + 1) * ratio
                        k += 1
                        cdf += pmf
                    x = max(k, 1)
            else:  # large means: gamma-Poisson, redrawn on the rare zero
                while x == 0:
                    x = np.random.poisson(np.random.gamma(r, mu / r))
            if x > 0:
                if nnz == cap:
                    cap *= 2
                    indices = np.concatenate((indices, np.empty(cap - indices.shape[0], dtype=np.int32)))
                    data = np.concatenate((data, np.empty(cap - data.shape[0], dtype=np.int32)))
                indices[nnz] = g
                data[nnz] = x
                nnz += 1
        indptr[i + 1] = nnz
    return indptr, indices[:nnz], data[:nnz]


def sample_cells(design: SyntheticDesign, start: int, n_cells: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Cells ``[start, start + n_cells)`` of the corpus, seeded by ``(seed, start)`` (reproducible for a given
    chunk size)."""
    rng = np.random.default_rng([design.seed, start])
    cell_type = rng.integers(0, len(design.cell_types), n_cells)
    donor = rng.integers(0, len(design.donors), n_cells)
    library = rng.lognormal(math.log(design.depth), design.depth_sigma, n_cells)
    seed = int(rng.integers(0, 2**31 - 1))
    indptr, indices, data = _sample_chunk(design.shares, design.inverse_dispersion, cell_type, library, seed)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, design.shares.shape[1]))
    obs = pd.DataFrame({
        "cell_type": pd.Categorical.from_codes(cell_type, design.cell_types),
        "donor": pd.Categorical.from_codes(donor, design.donors),
    }, index=[f"cell{start + i}" for i in range(n_cells)])
    return X, obs


def synthetic_adata(n_cells: int = 300, n_genes: int = 500, *, seed: int = 0, depth: float = 1500.0, **kwargs):
    """A small in-memory AnnData of synthetic raw counts (CSR int32) with ``cell_type`` and ``donor`` in obs."""
    import anndata as ad

    design = make_design(n_genes, depth=depth, seed=seed, **kwargs)
    X, obs = sample_cells(design, 0, n_cells)
    var = pd.DataFrame({"ensembl_id": design.gene_ids, "gene_symbol": design.gene_symbols},
                       index=pd.Index(design.gene_symbols))
    return ad.AnnData(X=X, obs=obs, var=var)


def write_synthetic_h5ad(path: str | os.PathLike, n_cells: int, n_genes: int = 20_000, *, chunk_size: int = 5_000,
                         seed: int = 0, depth: float = 3000.0, compression: str | None = None, progress: bool = True,
                         **kwargs) -> Path:
    """Write a synthetic h5ad chunk by chunk (CSR ``X`` int32, ``obs``: cell_type, donor; ``var``: ensembl_id,
    gene_symbol). Memory stays at one chunk whatever ``n_cells`` is."""
    import anndata as ad
    import h5py
    from tqdm import tqdm

    from .output import staged_file

    design = make_design(n_genes, depth=depth, seed=seed, **kwargs)
    path = Path(path)
    obs_parts = []
    with staged_file(path, overwrite=True) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, n_genes])
        opts = dict(maxshape=(None,), chunks=(1 << 18,), compression=compression)
        data = group.create_dataset("data", shape=(0,), dtype=np.int32, **opts)
        indices = group.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz = 0
        for start in tqdm(range(0, n_cells, chunk_size), desc=f"writing {path.name}", disable=not progress):
            n = min(chunk_size, n_cells - start)
            X, obs = sample_cells(design, start, n)
            data.resize((nnz + X.nnz,))
            indices.resize((nnz + X.nnz,))
            data[nnz:] = X.data
            indices[nnz:] = X.indices
            indptr[start + 1:start + n + 1] = X.indptr[1:] + nnz
            nnz += X.nnz
            obs_parts.append(obs)
        obs = pd.concat(obs_parts)
        var = pd.DataFrame({"ensembl_id": design.gene_ids, "gene_symbol": design.gene_symbols},
                           index=pd.Index(design.gene_symbols))
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, name, {})
    return path


def synthetic_corpus(data_dir: str | os.PathLike, n_cells: int, n_genes: int = 20_000, *, seed: int = 0,
                     compression: str | None = None) -> Path:
    """``data_dir/synthetic_<cells>x<genes>_s<seed>[_<compression>].h5ad``, written on first use (the benchmarks'
    corpora: the same arguments always give the same file)."""
    suffix = f"_{compression}" if compression else ""
    path = Path(data_dir) / f"synthetic_{n_cells}x{n_genes}_s{seed}{suffix}.h5ad"
    if not path.is_file():
        write_synthetic_h5ad(path, n_cells, n_genes, seed=seed, compression=compression, progress=False)
    return path
