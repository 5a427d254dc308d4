"""``.loom`` input as Geneformer reads it (genes in rows with row attribute ``ensembl_id``, cells in columns): the same
dataset as from the h5ad holding the same counts, in express and Geneformer mode, and clear errors."""

import json

import datasets
import numpy as np
import pytest
from conftest import shared_path

from tokenizer.cli import main
from tokenizer.errors import CorruptFileError, InputError
from tokenizer.io import LoomSource
from tokenizer.stats import fit_statistics
from tokenizer.synthetic import synthetic_adata
from tokenizer.tokenize import tokenize_files

loompy = pytest.importorskip("loompy", reason="writing the test's loom files needs loompy (pip install loompy)")


def write_pair(directory, adata, *, cell_ids=True, layer=None):
    """``directory/h5ad/cells.h5ad`` and ``directory/loom/cells.loom`` holding the same cells (a loom file is named
    by its stem, like an h5ad, so both give the same ``source`` column)."""
    (directory / "h5ad").mkdir(parents=True)
    (directory / "loom").mkdir(parents=True)
    h5ad, loom = directory / "h5ad" / "cells.h5ad", directory / "loom" / "cells.loom"
    adata.write_h5ad(h5ad)
    col_attrs = {"n_counts": adata.obs["n_counts"].to_numpy(),
                 "cell_type": adata.obs["cell_type"].astype(str).to_numpy()}
    if cell_ids:
        col_attrs["CellID"] = adata.obs_names.to_numpy().astype(str)
    layers = {"": adata.X.T.toarray().astype(np.float32)}
    if layer:
        layers = {"": np.zeros_like(layers[""]), layer: layers[""]}  # the counts only in the named layer
    row_attrs = {"ensembl_id": adata.var["ensembl_id"].to_numpy().astype(str),
                 "Gene": adata.var_names.to_numpy().astype(str)}
    loompy.create(str(loom), layers, row_attrs, col_attrs)
    return h5ad, loom


@pytest.fixture
def adata():
    a = synthetic_adata(150, 300, seed=3)
    a.obs["n_counts"] = np.asarray(a.X.sum(1)).ravel().astype(np.float64)
    a.var.index = a.var["gene_symbol"].to_numpy()
    return a


def tables_equal(a, b):
    """The same dataset, except for which zero-count genes were sampled: that is seeded by the file name (with its
    suffix), so a.h5ad and a.loom sample different zeros."""
    x, y = datasets.load_from_disk(str(a)), datasets.load_from_disk(str(b))
    assert x.column_names == y.column_names
    rest = [c for c in x.column_names if c != "input_ids"]
    assert x.data.table.select(rest).equals(y.data.table.select(rest))
    zeros = x["is_zero"] if "is_zero" in x.column_names else [[0] * n for n in x["length"]]
    for ids_x, ids_y, z in zip(x["input_ids"], y["input_ids"], zeros):
        assert [t for t, zero in zip(ids_x, z) if not zero] == [t for t, zero in zip(ids_y, z) if not zero]


def test_loom_tokenizes_as_the_h5ad(tmp_path, adata):
    h5ad, loom = write_pair(tmp_path, adata)
    source = LoomSource(loom)
    assert (source.n_obs, source.n_vars) == (150, 300)
    assert list(source.obs_names()[:2]) == list(adata.obs_names[:2]) and "CellID" not in source.obs_keys()
    source.close()
    # statistics fitted on either file are the same, and so are the tokens
    stats = fit_statistics([loom], tmp_path / "stats", gene_id_key="ensembl_id", progress=False)
    from_h5ad = fit_statistics([h5ad], None, gene_id_key="ensembl_id", progress=False)
    assert stats.gene_ids == from_h5ad.gene_ids and np.array_equal(stats.medians, from_h5ad.medians)
    kw = {"obs_keys": "cell_type", "total_counts_key": "n_counts", "keep_counts": True, "progress": False}
    a = tokenize_files([h5ad], tmp_path / "stats", tmp_path / "a", gene_id_key="ensembl_id", **kw)
    b = tokenize_files([loom], tmp_path / "stats", tmp_path / "b", num_workers=2, chunk_size=40, **kw)
    tables_equal(a, b)  # the loom's genes are read from ensembl_id without --gene_id_key


def test_loom_in_geneformer_mode_and_a_layer(tmp_path, adata):
    dicts = shared_path("geneformer/gc95M")
    tokens = json.loads((dicts / "token_dictionary.json").read_text())
    genes = [g for g, _ in sorted(tokens.items(), key=lambda kv: kv[1]) if not g.startswith("<")]
    adata.var["ensembl_id"] = genes[: adata.n_vars]
    h5ad, loom = write_pair(tmp_path, adata, layer="counts")
    args = ["tokenize", "--geneformer_dicts", str(dicts), "--model_input_size", "4096", "--gene_id_key", "ensembl_id",
            "--total_counts_key", "n_counts", "--quiet"]
    assert main([*args[:1], str(h5ad), *args[1:], "--out", str(tmp_path / "a")]) == 0
    assert main([*args[:1], str(loom), *args[1:], "--layer", "counts", "--out", str(tmp_path / "b")]) == 0
    tables_equal(tmp_path / "a", tmp_path / "b")
    ds = datasets.load_from_disk(str(tmp_path / "b"))
    assert all(ids[0] == tokens["<cls>"] and ids[-1] == tokens["<eos>"] for ids in ds["input_ids"])


def test_loom_without_cell_ids_names_cells_by_column(tmp_path, adata):
    _, loom = write_pair(tmp_path, adata, cell_ids=False)
    fit_statistics([loom], tmp_path / "stats", progress=False)
    ds = datasets.load_from_disk(str(tokenize_files([loom], tmp_path / "stats", tmp_path / "t", progress=False)))
    assert ds["cell_id"][:3] == ["0", "1", "2"]


def test_loom_errors_are_one_line_with_exit_code_2(tmp_path, adata, capsys):
    h5ad, loom = write_pair(tmp_path / "pair", adata)
    fit_statistics([h5ad], tmp_path / "stats", progress=False)
    no_ids = tmp_path / "no_ids.loom"
    loompy.create(str(no_ids), adata.X.T.toarray(), {"Gene": adata.var_names.to_numpy().astype(str)},
                  {"CellID": adata.obs_names.to_numpy().astype(str)})
    with pytest.raises(InputError, match="no row attribute 'ensembl_id'.*row attributes here: Gene"):
        LoomSource(no_ids)
    assert main(["tokenize", str(no_ids), "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ensembl_id" in err and not (tmp_path / "t").exists()
    with pytest.raises(InputError, match="has no layer 'spliced'; available layers: \\(none\\)"):
        LoomSource(loom, layer="spliced")
    not_loom = tmp_path / "cells.loom"
    not_loom.write_bytes(h5ad.read_bytes())  # an h5ad under a .loom name
    with pytest.raises(CorruptFileError, match="not a loom file"):
        LoomSource(not_loom)
    (tmp_path / "text.loom").write_text("not HDF5")
    with pytest.raises(CorruptFileError, match="not a readable loom"):
        LoomSource(tmp_path / "text.loom")
