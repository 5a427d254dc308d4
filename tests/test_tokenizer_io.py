"""Streaming reads: chunks equal the whole matrix, gene-id handling, and the bad-input checks of the reader."""

import json
import threading

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tokenizer.errors import CorruptFileError, InputError, InvalidCountsError
from tokenizer.io import (
    H5adSource,
    SourcePlan,
    column_map,
    iter_chunks,
    read_floor,
    read_ahead,
    read_gene_columns,
    read_obs_totals,
)
from tokenizer.synthetic import synthetic_adata, write_synthetic_h5ad


@pytest.fixture
def adata():
    return synthetic_adata(n_cells=120, n_genes=60, seed=3)


def _rows_from_chunks(path, chunk_size, **kw):
    with H5adSource(path, **kw) as source:
        parts = [source.read_rows(a, min(a + chunk_size, source.n_obs)) for a in range(0, source.n_obs, chunk_size)]
        n_vars = source.n_vars
    return sp.vstack([sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.n_rows, n_vars)) for c in parts])


@pytest.mark.parametrize("chunk_size", [1, 7, 120, 500])
def test_csr_chunks_rebuild_the_matrix(tmp_path, adata, chunk_size):
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    rebuilt = _rows_from_chunks(path, chunk_size)
    assert (rebuilt != adata.X).nnz == 0
    assert read_floor(path, chunk_size=chunk_size) == adata.X.nnz


def test_read_ahead_yields_every_block_in_order_into_alternating_buffers(tmp_path, adata):
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    blocks = [(a, min(a + 17, adata.n_obs)) for a in range(0, adata.n_obs, 17)]
    threads_before = threading.active_count()
    with H5adSource(path) as source:
        got = [(c.start, c.indptr.copy(), c.indices.copy(), c.data.copy(), id(c.data.base))
               for c in read_ahead(source, blocks)]
        # the blocks must be usable until the next one is asked for: a consumer that copies them sees every row
        rebuilt = sp.vstack([sp.csr_matrix((d, i, p), shape=(len(p) - 1, adata.n_vars)) for _, p, i, d, _ in got])
        assert (rebuilt != adata.X).nnz == 0
        assert [g[0] for g in got] == [a for a, _ in blocks]
        # two buffer slots, used in turn (the next block is read while the caller holds this one)
        assert got[0][4] != got[1][4] and got[0][4] == got[2][4]
        # leaving early waits for the read in flight: no reader thread is left behind
        for _ in read_ahead(source, blocks):
            break
    assert threading.active_count() == threads_before


def test_read_ahead_raises_a_failed_read_where_its_block_was_due(adata):
    class Failing:
        def __init__(self):
            self.calls = []

        def read_rows(self, start, stop, reuse=False, slot=0):
            self.calls.append(start)
            if start == 20:
                raise CorruptFileError("block at row 20 is damaged")
            return start

    source = Failing()
    seen = []
    with pytest.raises(CorruptFileError, match="row 20 is damaged"):
        for start in read_ahead(source, [(0, 10), (10, 20), (20, 30), (30, 40)]):
            seen.append(start)
    assert seen == [0, 10]  # every block before the damaged one was delivered
    assert source.calls == [0, 10, 20]  # and nothing was read past it


def test_dense_matrix_and_layers(tmp_path, adata):
    dense = adata.copy()
    dense.X = adata.X.toarray().astype(np.float32)
    dense.layers["counts"] = adata.X.copy()
    path = tmp_path / "dense.h5ad"
    dense.write_h5ad(path)
    assert (_rows_from_chunks(path, 13) != adata.X).nnz == 0
    assert (_rows_from_chunks(path, 13, layer="counts") != adata.X).nnz == 0
    with pytest.raises(InputError, match="no layer 'spliced'; available layers: counts"):
        H5adSource(path, layer="spliced")


def test_raw_layer_uses_raw_var(tmp_path, adata):
    full = adata.copy()
    full.raw = full
    subset = full[:, :20].copy()
    path = tmp_path / "raw.h5ad"
    subset.write_h5ad(path)
    with H5adSource(path, layer="raw") as source:
        assert (source.n_obs, source.n_vars) == (120, 60)
        assert list(source.var().index) == list(adata.var_names)


def test_csc_is_refused_with_a_conversion_hint(tmp_path, adata):
    csc = adata.copy()
    csc.X = sp.csc_matrix(adata.X)
    path = tmp_path / "csc.h5ad"
    csc.write_h5ad(path)
    with pytest.raises(InputError, match=r"column-major \(CSC\).*tocsr\(\)"):
        H5adSource(path)


def test_not_an_h5ad(tmp_path):
    text = tmp_path / "notes.h5ad"
    text.write_text("this is not HDF5")
    with pytest.raises(CorruptFileError, match=f"{text}.*not a readable h5ad"):
        H5adSource(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(CorruptFileError, match="not an h5ad"):
        H5adSource(other)
    with pytest.raises(InputError, match="input file not found"):
        H5adSource(tmp_path / "missing.h5ad")


def test_truncated_file_is_reported(tmp_path, adata):
    path = tmp_path / "cut.h5ad"
    adata.write_h5ad(path)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 3])
    with pytest.raises(CorruptFileError, match="cut.h5ad"):
        H5adSource(path)


@pytest.mark.parametrize("bad, kind", [(-1.0, "a negative value"), (np.nan, "a NaN or infinite value"),
                                       (np.inf, "a NaN or infinite value"), (0.5, "a non-integer value")])
def test_bad_values_name_file_cell_and_gene(tmp_path, adata, bad, kind):
    broken = adata.copy()
    X = broken.X.astype(np.float32).tolil()
    X[37, 5] = bad
    broken.X = X.tocsr()
    path = tmp_path / "bad.h5ad"
    broken.write_h5ad(path)
    genes = read_gene_columns(H5adSource(path))
    plan = SourcePlan(np.arange(60), False, 60)
    with H5adSource(path) as source, pytest.raises(InvalidCountsError) as err:
        for _ in iter_chunks(source, plan, 0, source.n_obs, 16, genes.labels):
            pass
    message = str(err.value)
    assert str(path) in message and kind in message
    assert "cell 'cell37' (row 37)" in message and f"gene '{adata.var_names[5]}' (column 5)" in message


def test_non_integer_allowed_on_request_but_negative_never(tmp_path, adata):
    scaled = adata.copy()
    scaled.X = (adata.X * 0.5).astype(np.float32)
    path = tmp_path / "half.h5ad"
    scaled.write_h5ad(path)
    with H5adSource(path) as source:
        chunks = list(iter_chunks(source, SourcePlan(np.arange(60), False, 60, allow_non_integer=True), 0, 120, 50))
    np.testing.assert_allclose(np.concatenate([c.totals for c in chunks]), np.asarray(adata.X.sum(1)).ravel() * 0.5)


def test_gene_ids_map_and_duplicates_sum(tmp_path, adata):
    var = adata.var.copy()
    var["ensembl_id"] = var["ensembl_id"].astype(object)
    var.iloc[3, var.columns.get_loc("ensembl_id")] = ""
    var.iloc[4, var.columns.get_loc("ensembl_id")] = var["ensembl_id"].iloc[5]  # duplicate of column 5
    data = ad.AnnData(X=adata.X, obs=adata.obs, var=var)
    path = tmp_path / "ids.h5ad"
    data.write_h5ad(path)
    with H5adSource(path) as source:
        genes = read_gene_columns(source, gene_id_key="ensembl_id")
        assert genes.n_empty == 1 and genes.ids[3] == ""
        target = pd.Index(sorted(set(genes.ids) - {""}))
        col_map = column_map(genes.ids, target)
        assert col_map[3] == -1 and col_map[4] == col_map[5]
        chunk = next(iter_chunks(source, SourcePlan(col_map, True, len(target)), 0, 120, 120))
    merged = sp.csr_matrix((chunk.data, chunk.indices, chunk.indptr), shape=(120, len(target))).toarray()
    dense = adata.X.toarray()
    np.testing.assert_array_equal(merged[:, col_map[5]], dense[:, 4] + dense[:, 5])
    for row in range(120):  # ids come out ascending per row when merging
        ids = chunk.indices[chunk.indptr[row]:chunk.indptr[row + 1]]
        assert np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(chunk.totals, dense.sum(1))  # library sizes count every gene, mapped or not
    with pytest.raises(InputError, match="var has no column 'ensg'; available columns: ensembl_id, gene_symbol"):
        read_gene_columns(H5adSource(path), gene_id_key="ensg")


def test_gene_map_json(tmp_path, adata):
    data = adata.copy()
    data.var_names = [n.lower() if i == 50 else n for i, n in enumerate(adata.var_names)]
    path = tmp_path / "a.h5ad"
    data.write_h5ad(path)
    mapping = {s: e for s, e in zip(adata.var["gene_symbol"][:51], adata.var["ensembl_id"][:51])}
    map_path = tmp_path / "map.json"
    map_path.write_text(json.dumps(mapping))
    from tokenizer.io import load_gene_map

    with H5adSource(path) as source:
        genes = read_gene_columns(source, gene_map=load_gene_map(map_path))
    # exact matches, then the upper-cased id ('syn00050' -> 'SYN00050'); the rest are unmapped and dropped
    assert list(genes.ids[:51]) == list(adata.var["ensembl_id"][:51])
    assert genes.n_unmapped == 9 and set(genes.ids[51:]) == {""}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="JSON object"):
        load_gene_map(bad)


def test_obs_totals_must_cover_the_counts(tmp_path, adata):
    data = adata.copy()
    totals = np.asarray(adata.X.sum(1)).ravel().astype(float)
    data.obs["n_counts"] = totals * 2
    data.obs["too_small"] = totals / 2
    data.obs["label"] = "x"
    path = tmp_path / "a.h5ad"
    data.write_h5ad(path)
    with H5adSource(path) as source:
        np.testing.assert_array_equal(read_obs_totals(source, "n_counts"), totals * 2)
        chunk = next(iter_chunks(source, SourcePlan(np.arange(60), False, 60, read_obs_totals(source, "n_counts")),
                                 0, 120, 120))
        np.testing.assert_array_equal(chunk.totals, np.where(totals > 0, totals * 2, 0))
        plan = SourcePlan(np.arange(60), False, 60, read_obs_totals(source, "too_small"))
        with pytest.raises(InputError, match="smaller than the counts"):
            next(iter_chunks(source, plan, 0, 120, 120))
        with pytest.raises(InputError, match="not numeric"):
            read_obs_totals(source, "label")
        with pytest.raises(InputError, match="obs has no column 'nope'; available columns: cell_type, donor"):
            read_obs_totals(source, "nope")


def test_synthetic_writer_streams_a_valid_h5ad(tmp_path):
    path = write_synthetic_h5ad(tmp_path / "syn.h5ad", n_cells=250, n_genes=300, chunk_size=64, seed=1,
                                progress=False)
    adata = ad.read_h5ad(path)
    assert adata.shape == (250, 300) and adata.X.dtype == np.int32
    assert set(adata.obs.columns) == {"cell_type", "donor"} and adata.obs_names[0] == "cell0"
    again = write_synthetic_h5ad(tmp_path / "again.h5ad", n_cells=250, n_genes=300, chunk_size=64, seed=1,
                                 progress=False)
    assert (ad.read_h5ad(again).X != adata.X).nnz == 0  # seeded: the same file twice


def test_synthetic_defaults_look_like_10x():
    from tokenizer.synthetic import make_design, sample_cells

    X, _ = sample_cells(make_design(), 0, 300)  # 20,000 genes, median depth 3,000
    detected = np.diff(X.indptr) / X.shape[1]
    totals = np.asarray(X.sum(1)).ravel()
    assert 0.05 < detected.mean() < 0.10  # 10x-like sparsity
    assert 2000 < np.median(totals) < 4500 and totals.max() > 3 * np.median(totals)  # heavy right tail
    gene_totals = np.sort(np.asarray(X.sum(0)).ravel())[::-1]
    assert gene_totals[:200].sum() > 0.3 * totals.sum()  # a few hundred genes take a large share of the counts
