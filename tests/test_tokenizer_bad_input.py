"""Each bad input the issue lists, end to end through fit and tokenize."""

import json
import logging

import anndata as ad
import datasets
import numpy as np
import pytest
import scipy.sparse as sp

from tokenizer import GeneVocab, TokenizationSpec, fit_statistics, tokenize_files
from tokenizer.errors import CorruptFileError, InputError, InvalidCountsError, OutputExistsError
from tokenizer.synthetic import synthetic_adata


@pytest.fixture
def good(tmp_path):
    adata = synthetic_adata(n_cells=80, n_genes=50, seed=7)
    path = tmp_path / "good.h5ad"
    adata.write_h5ad(path)
    stats = tmp_path / "stats"
    fit_statistics([path], stats, progress=False)
    return adata, path, stats


def _write(tmp_path, adata, name):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("value, words", [(0.3, "non-integer"), (-2.0, "negative"), (np.nan, "NaN")])
def test_non_integer_negative_nan_values(tmp_path, good, value, words):
    adata, _, stats = good
    bad = adata.copy()
    X = bad.X.astype(np.float64).tolil()
    X[61, 17] = value
    bad.X = X.tocsr()
    path = _write(tmp_path, bad, "bad.h5ad")
    for run in (lambda: fit_statistics([path], tmp_path / "s", progress=False),
                lambda: tokenize_files([path], stats, tmp_path / "t", progress=False)):
        with pytest.raises(InvalidCountsError) as err:
            run()
        assert f"{path}" in str(err.value) and words in str(err.value)
        assert "cell 'cell61' (row 61)" in str(err.value) and f"'{adata.var_names[17]}'" in str(err.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    if value == 0.3:  # the explicit opt-in
        vocab = fit_statistics([path], None, allow_non_integer=True, progress=False)
        assert vocab.n_genes == 50
        with pytest.raises(InputError, match="--keep_counts .* cannot be combined with --allow_non_integer"):
            tokenize_files([path], stats, tmp_path / "t", allow_non_integer=True, keep_counts=True, progress=False)
        tokenize_files([path], stats, tmp_path / "t", allow_non_integer=True, progress=False)
    else:  # negative and NaN values are refused even then
        with pytest.raises(InvalidCountsError):
            fit_statistics([path], None, allow_non_integer=True, progress=False)


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_column_index_outside_the_matrix(tmp_path, good, dtype):
    """A damaged CSR matrix (a stored column index past the last gene) is refused, naming the file and cell."""
    import h5py

    adata, _, stats = good
    bad = adata.copy()
    bad.X = bad.X.astype(dtype)
    path = _write(tmp_path, bad, "damaged.h5ad")
    with h5py.File(path, "r+") as f:
        indptr = f["X/indptr"][:]
        f["X/indices"][indptr[33] + 1] = 50  # cell 33: column 50 of 50
    message = r"column index 50 at cell 'cell33' \(row 33\), outside its 50 columns"
    for run in (lambda: fit_statistics([path], tmp_path / "s", progress=False),
                lambda: tokenize_files([path], stats, tmp_path / "t", progress=False)):
        with pytest.raises(CorruptFileError, match=message):
            run()
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_genes_missing_from_the_vocabulary_are_counted(tmp_path, good):
    adata, _, stats = good
    extra = ad.AnnData(X=sp.csr_matrix(np.ones((80, 3), dtype=np.int32)), obs=adata.obs,
                       var=dict(gene_symbol=["NEW1", "NEW2", "NEW3"]))
    extra.var_names = ["NEW1", "NEW2", "NEW3"]
    wider = ad.concat([adata, extra], axis=1, merge="first")
    path = _write(tmp_path, wider, "wider.h5ad")
    out = tokenize_files([path], stats, tmp_path / "t", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["genes_missing_from_vocab"] == 3
    assert manifest["counts"]["genes_missing_from_vocab"]["examples"] == ["NEW1", "NEW2", "NEW3"]
    ds = datasets.load_from_disk(str(out))
    # the missing genes are not tokens, but their counts are part of each cell's library size
    np.testing.assert_array_equal(ds["total_counts"], np.asarray(wider.X.sum(1)).ravel())


def test_duplicate_gene_ids_are_summed_with_a_warning(tmp_path, good, caplog):
    adata, _, stats = good
    dup = adata.copy()
    names = list(adata.var_names)
    names[10] = names[11]
    dup.var_names = names
    dup.var["gene_symbol"] = names
    path = _write(tmp_path, dup, "dup.h5ad")
    with caplog.at_level(logging.WARNING, logger="tokenizer"):
        vocab = fit_statistics([path], None, progress=False)
    assert "1 gene ids occur more than once" in caplog.text and names[11] in caplog.text
    assert vocab.n_genes == 49
    summed = np.asarray((adata.X[:, 10] + adata.X[:, 11]).todense()).ravel()
    assert vocab.n_cells[vocab.gene_ids.index(names[11])] == int((summed > 0).sum())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenizer"):
        out = tokenize_files([path], stats, tmp_path / "t", keep_counts=True, progress=False)
    assert "occur in more than one column" in caplog.text and "summed" in caplog.text
    ds = datasets.load_from_disk(str(out))
    token = GeneVocab.load(stats).token_to_id[names[11]]
    for i in range(80):
        counts = dict(zip(ds[i]["counts_ids"], ds[i]["counts"]))
        assert counts.get(token, 0) == summed[i]


def test_zero_count_cells_are_skipped_and_counted(tmp_path, good):
    adata, _, stats = good
    X = adata.X.tolil()
    X[[0, 5, 79]] = 0
    empty = adata.copy()
    empty.X = X.tocsr()
    empty.X.eliminate_zeros()
    path = _write(tmp_path, empty, "empty.h5ad")
    vocab = fit_statistics([path], None, progress=False)
    assert vocab.meta["cells_used"] == 77 and vocab.meta["cells_skipped_zero_counts"] == 3
    out = tokenize_files([path], stats, tmp_path / "t", progress=False)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["cells_written"] == 77 and counts["cells_skipped"]["zero_counts"] == 3
    assert "cell0" not in datasets.load_from_disk(str(out))["cell_id"]


def test_missing_obs_column_lists_the_available_ones(tmp_path, good):
    _, path, stats = good
    with pytest.raises(InputError, match=r"obs has no column 'tissue'; available columns: cell_type, donor"):
        tokenize_files([path], stats, tmp_path / "t", obs_keys=["tissue"], progress=False)
    with pytest.raises(InputError, match=r"obs has no column 'patient'"):
        fit_statistics([path], None, donor_key="patient", progress=False)
    with pytest.raises(InputError, match=r"obs has no column 'nc'"):
        fit_statistics([path], None, total_counts_key="nc", progress=False)


def test_corrupt_or_non_h5ad_files_are_named(tmp_path, good):
    _, path, stats = good
    text = tmp_path / "table.csv"
    text.write_text("gene,count\nA,1\n")
    truncated = tmp_path / "cut.h5ad"
    truncated.write_bytes(path.read_bytes()[:4096])
    for bad in (text, truncated):
        with pytest.raises(CorruptFileError, match=str(bad)):
            fit_statistics([path, bad], tmp_path / "s", progress=False)
        with pytest.raises(CorruptFileError, match=str(bad)):
            tokenize_files([path, bad], stats, tmp_path / "t", progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, good):
    _, path, stats = good
    with pytest.raises(OutputExistsError, match="already exists"):
        fit_statistics([path], stats, progress=False)
    before = (stats / "gene_stats.parquet").read_bytes()
    fit_statistics([path], stats, overwrite=True, min_cells=70, progress=False)
    assert (stats / "gene_stats.parquet").read_bytes() != before
    out = tmp_path / "t"
    tokenize_files([path], stats, out, progress=False)
    with pytest.raises(OutputExistsError):
        tokenize_files([path], stats, out, progress=False)
    tokenize_files([path], stats, out, overwrite=True, spec=TokenizationSpec(top_k=5), progress=False)
    assert max(datasets.load_from_disk(str(out))["length"]) <= 1 + 5 + 50
