"""Tokenization: the dataset contract, equality with a per-cell reference, order and determinism."""

import json

import datasets
import numpy as np
import pytest
import scipy.sparse as sp

from tokenizer import GeneVocab, TokenizationSpec, TokenizedCells, mix_seeds, rank_encode
from tokenizer.errors import InputError, OutputExistsError
from tokenizer.io import cell_keys, file_key
from tokenizer.stats import fit_statistics
from tokenizer.synthetic import synthetic_adata
from tokenizer.tokenize import tokenize_adata, tokenize_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    a = synthetic_adata(n_cells=300, n_genes=400, seed=11)
    b = synthetic_adata(n_cells=200, n_genes=400, seed=12)[:, 30:].copy()
    X = b.X.tolil()
    X[[3, 50]] = 0  # two empty cells
    X = X.tocsr()
    X.eliminate_zeros()
    b.X = X
    b.obs["score"] = np.linspace(0, 1, b.n_obs)
    a.obs["score"] = np.arange(a.n_obs)  # int in one file, float in the other -> float64
    paths = [root / "a.h5ad", root / "b.h5ad"]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    stats = root / "stats"
    fit_statistics(paths[:1], stats, min_cells=5, n_groups="8,3", progress=False)  # b's extra genes are unknown
    return paths, [a, b], stats


def _reference_cell(adata, row, vocab, top_k):
    """Plain per-cell reference of the ranked part: normalise, rank by float32 value, ties to the smaller id."""
    counts = adata.X[row].toarray().ravel().astype(np.float64)
    total = counts.sum()
    tokens = vocab.encode_gene_ids(list(adata.var_names))
    keep = (tokens >= 0) & (counts > 0)
    ids, x = tokens[keep], counts[keep]
    v = (x / total * 1e4 / vocab.token_medians[ids]).astype(np.float32)
    order = np.lexsort((ids, -v))[:top_k]
    return ids[order], v[order], ids, x, total


def test_manifest_records_the_spec_and_the_genes_each_input_measures(tmp_path, files):
    paths, adatas, stats = files
    spec = TokenizationSpec(top_k=20, n_zeros=5, seed=4)
    out = tokenize_files(paths, stats, tmp_path / "tokens", spec=spec, progress=False)
    cells = TokenizedCells.load(out)
    vocab = GeneVocab.load(stats)
    assert cells.spec.same_encoding(spec) and cells.spec.top_k == 20 and cells.spec.seed == 4
    measured = {name: np.unique(vocab.encode_gene_ids(list(a.var_names))) for name, a in zip("ab", adatas)}
    assert sorted(cells.spec.measured_genes) == ["a", "b"]
    for name in "ab":  # exactly the vocabulary genes of that file, from planning (no cell is read for it)
        np.testing.assert_array_equal(cells.spec.measured_genes[name], measured[name][measured[name] >= 0])
    # stored as [start, stop) runs: b lacks the first 30 genes, so its ids start later and form one run
    runs = json.loads((out / "manifest.json").read_text())["tokenization"]["measured_genes"]["b"]
    assert len(runs) == 1 and runs[0][0] > vocab.n_special
    # the same JSON round-trips through a model folder's tokenization.json
    cells.spec.save(tmp_path)
    again = TokenizationSpec.load(tmp_path)
    assert again.to_dict() == cells.spec.to_dict()
    with pytest.raises(InputError, match="unknown field"):
        TokenizationSpec.from_dict({"top_k": 3, "topk": 4})


def test_a_gene_panel_reads_only_its_genes_against_the_whole_library(tmp_path, files):
    """``input_genes``: detected genes and sampled zeros come from the panel only, ranked as before, with values
    normalised by the cell's whole library; the panel round-trips through the JSON."""
    paths, adatas, stats = files
    vocab = GeneVocab.load(stats)
    panel = vocab.gene_token_ids[::4]
    spec = TokenizationSpec(top_k=20, n_zeros=5, seed=4, input_genes=panel[::-1])  # any order: stored sorted
    out = tokenize_files(paths[:1], stats, tmp_path / "tokens", spec=spec, keep_counts=True, progress=False)
    ds = datasets.load_from_disk(str(out))
    cells = TokenizedCells.load(out)
    np.testing.assert_array_equal(cells.spec.input_genes, panel)
    measured = np.unique(vocab.encode_gene_ids(list(adatas[0].var_names)))
    np.testing.assert_array_equal(cells.spec.measured_genes["a"], np.intersect1d(measured[measured >= 0], panel))
    n_short = 0
    for row in range(0, 300, 11):
        ref_ids, ref_v, all_ids, all_x, total = _reference_cell(adatas[0], row, vocab, 10**6)
        in_panel = np.isin(ref_ids, panel)
        want_ids, want_v = ref_ids[in_panel][:20], ref_v[in_panel][:20]
        n_short += len(want_ids) < 20
        cell = ds[row]
        ids, zero = np.asarray(cell["input_ids"]), np.asarray(cell["is_zero"])
        np.testing.assert_array_equal(ids[1:][zero[1:] == 0], want_ids)
        np.testing.assert_array_equal(np.asarray(cell["values"], dtype=np.float32)[1:][zero[1:] == 0], want_v)
        zeros = ids[zero == 1]
        assert len(zeros) == 5 and set(zeros.tolist()) <= set(panel.tolist())
        assert not set(zeros.tolist()) & set(all_ids.tolist())
        assert cell["total_counts"] == total  # the library is the whole cell's
        assert set(cell["counts_ids"]) <= set(panel.tolist())
    assert n_short < 28  # most cells have 20 panel genes: the panel did not empty the cells
    cells.spec.save(tmp_path)
    assert TokenizationSpec.load(tmp_path).same_encoding(cells.spec)
    assert not TokenizationSpec.load(tmp_path).same_encoding(cells.spec.replace(input_genes=panel[1:]))
    with pytest.raises(InputError, match="empty gene panel"):
        TokenizationSpec(input_genes=[])
    with pytest.raises(InputError, match="another vocabulary"):
        tokenize_files(paths[:1], stats, tmp_path / "bad", spec=TokenizationSpec(input_genes=[vocab.vocab_size]),
                       progress=False)
    assert not (tmp_path / "bad").exists()


def test_dataset_contract_and_per_cell_reference(tmp_path, files):
    paths, adatas, stats = files
    out = tokenize_files(paths, stats, tmp_path / "tokens", spec=TokenizationSpec(top_k=40, n_zeros=10, seed=3),
                         obs_keys="cell_type,score", keep_counts=True, progress=False, chunk_size=64)
    ds = datasets.load_from_disk(str(out))
    vocab = GeneVocab.load(out)
    assert vocab.fingerprint() == GeneVocab.load(stats).fingerprint()
    assert ds.column_names == ["input_ids", "values", "is_zero", "length", "total_counts", "cell_id", "source",
                               "cell_type", "score", "counts_ids", "counts"]
    feats = ds.features
    assert feats["input_ids"].feature.dtype == "int32" and feats["values"].feature.dtype == "float32"
    assert feats["is_zero"].feature.dtype == "int8"
    assert feats["length"].dtype == "int32" and feats["total_counts"].dtype == "float64"
    assert feats["cell_type"].dtype == "string" and feats["score"].dtype == "float64"
    # rows keep the input order, without the two empty cells
    expected_ids = list(adatas[0].obs_names) + [n for i, n in enumerate(adatas[1].obs_names) if i not in (3, 50)]
    assert ds["cell_id"] == expected_ids
    assert ds["source"] == ["a"] * 300 + ["b"] * 198
    table = ds.with_format("numpy")
    candidates_b = set(vocab.encode_gene_ids(list(adatas[1].var_names)).tolist()) - {-1}
    for k in list(range(0, 300, 7)) + list(range(300, 498, 5)):
        which, row = (0, k) if k < 300 else (1, k - 300 + (k - 300 >= 3) + (k - 300 >= 49))
        adata = adatas[which]
        assert ds[k]["cell_id"] == adata.obs_names[row]
        ref_ids, ref_v, all_ids, all_x, total = _reference_cell(adata, row, vocab, 40)
        cell = ds[k]
        ids = np.asarray(cell["input_ids"])
        n = len(ref_ids)
        assert ids[0] == vocab.cls_id and cell["values"][0] == 0
        np.testing.assert_array_equal(ids[1:1 + n], ref_ids)
        np.testing.assert_array_equal(np.asarray(cell["values"][1:1 + n], dtype=np.float32), ref_v)
        zeros = ids[1 + n:]
        assert len(zeros) == 10 and len(set(zeros.tolist())) == 10
        assert not set(zeros.tolist()) & set(all_ids.tolist())  # sampled zeros are not detected ...
        if which == 1:
            assert set(zeros.tolist()) <= candidates_b  # ... and are genes this file measures
        assert cell["is_zero"] == [0] * (1 + n) + [1] * 10
        assert all(value == 0 for value in cell["values"][1 + n:])
        assert cell["length"] == 1 + n + 10
        assert cell["total_counts"] == total
        order = np.argsort(all_ids)
        assert cell["counts_ids"] == all_ids[order].tolist() and cell["counts"] == all_x[order].astype(int).tolist()
        assert cell["cell_type"] == str(adata.obs["cell_type"].iloc[row])
    np.testing.assert_array_equal(table["score"][:300], np.arange(300, dtype=float))
    # the zero sampling is seeded per cell by mix_seeds(seed, file key + row)
    a = adatas[0]
    rows = np.arange(300)
    tokens = vocab.encode_gene_ids(list(a.var_names))
    X = sp.csr_matrix(a.X)
    keep = tokens[X.indices] >= 0
    indptr = np.concatenate([[0], np.cumsum(np.add.reduceat(keep, X.indptr[:-1]))])
    direct = rank_encode(indptr, tokens[X.indices][keep], X.data[keep], np.asarray(X.sum(1)).ravel().astype(float),
                         vocab.token_medians, top_k=40, n_zeros=10, zero_candidates=np.unique(tokens[tokens >= 0]),
                         cell_seeds=mix_seeds(3, cell_keys(file_key(str(paths[0])), rows)), cls_id=vocab.cls_id)
    for i in range(0, 300, 13):
        np.testing.assert_array_equal(direct.cell(i)[0], ds[i]["input_ids"])


def test_manifest_counts_and_vocab_files(tmp_path, files):
    paths, adatas, stats = files
    out = tokenize_files(paths, stats, tmp_path / "tokens", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["tokenization"]
    assert spec["mode"] == "express" and spec["add_cls"] and not spec["add_eos"]
    assert spec["top_k"] == 256 and spec["n_zeros"] == 50 and spec["seed"] == 0 and spec["target_sum"] == 10_000
    counts = manifest["counts"]
    assert counts["cells_in"] == 500 and counts["cells_written"] == 498
    assert counts["cells_skipped"] == {"zero_counts": 2, "no_vocabulary_genes": 0}
    vocab = GeneVocab.load(stats)
    missing_b = len(set(adatas[1].var_names) - set(vocab.gene_ids))
    assert [i["genes_missing_from_vocab"] for i in manifest["inputs"]] == [400 - vocab.n_genes, missing_b]
    assert manifest["vocab_fingerprint"] == vocab.fingerprint()
    ds = datasets.load_from_disk(str(out))
    assert counts["tokens"] == int(np.sum(ds["length"]))
    assert counts["length"]["max"] == max(ds["length"])
    for name in ("vocab.json", "gene_stats.parquet", "stats.json"):
        assert (out / name).is_file()
    # dataset_info.json is written without importing datasets: it must say what datasets itself would
    written = json.loads((out / "dataset_info.json").read_text())["features"]
    assert written == datasets.Features.from_arrow_schema(ds.data.schema).to_dict()
    assert not list(tmp_path.glob(".tokens*"))  # no temporary folder left behind


def test_output_is_the_same_whatever_the_workers_and_chunks(tmp_path, files):
    paths, _, stats = files
    spec = TokenizationSpec(top_k=30, n_zeros=8, seed=9)
    kw = dict(obs_keys=["donor"], keep_counts=True, progress=False)
    one = tokenize_files(paths, stats, tmp_path / "one", spec=spec, chunk_size=2048, **kw)
    two = tokenize_files(paths, stats, tmp_path / "two", spec=spec, num_workers=2, chunk_size=17, **kw)
    a, b = datasets.load_from_disk(str(one)), datasets.load_from_disk(str(two))
    assert len(list(two.glob("data-*.arrow"))) > 2  # several shards, listed in order
    assert a.data.table.equals(b.data.table)
    other = datasets.load_from_disk(str(tokenize_files(paths, stats, tmp_path / "seed", spec=spec.replace(seed=10),
                                                       **kw)))
    assert a["input_ids"] != other["input_ids"]  # the seed changes the sampled zeros
    assert [x[:5] for x in a["input_ids"]] == [x[:5] for x in other["input_ids"]]  # but not the ranked genes


def test_tokenize_adata_matches_the_file_output(tmp_path, files):
    paths, adatas, stats = files
    vocab = GeneVocab.load(stats)
    kw = dict(spec=TokenizationSpec(top_k=25, n_zeros=5, seed=1), obs_keys=["cell_type"], keep_counts=True)
    cells = tokenize_adata(adatas[1], vocab, source_name="b.h5ad", **kw)
    on_disk = TokenizedCells.load(tokenize_files(paths[1:], stats, tmp_path / "b", progress=False, **kw))
    in_memory = cells.dataset
    assert isinstance(in_memory, datasets.Dataset) and in_memory.num_rows == 198
    for column in on_disk.dataset.column_names:
        if column != "source":
            assert in_memory[column] == on_disk.dataset[column], column
    # the same spec, with the measured genes of the one source (named as given)
    assert cells.spec.encoding() == on_disk.spec.encoding()
    np.testing.assert_array_equal(cells.spec.measured_genes["b.h5ad"], on_disk.spec.measured_genes["b"])
    dense = adatas[1].copy()
    dense.X = dense.X.toarray()
    again = tokenize_adata(dense, vocab, source_name="b.h5ad", **kw)
    assert again.dataset["input_ids"] == on_disk.dataset["input_ids"]


def test_total_counts_key_and_gene_id_key(tmp_path, files):
    paths, adatas, stats = files
    a = adatas[0].copy()
    totals = np.asarray(a.X.sum(1)).ravel() * 3.0
    a.obs["n_counts"] = totals
    vocab = GeneVocab.load(stats)
    ds = tokenize_adata(a, vocab, total_counts_key="n_counts", spec=TokenizationSpec(n_zeros=0, top_k=5)).dataset
    np.testing.assert_array_equal(ds["total_counts"], totals)
    ref_ids, ref_v, *_ = _reference_cell(a, 0, vocab, 5)
    np.testing.assert_allclose(ds[0]["values"][1:], ref_v / 3, rtol=1e-6)
    by_ensembl = fit_statistics([a], None, gene_id_key="ensembl_id", progress=False)
    assert by_ensembl.gene_ids[0].startswith("ENSG9")
    ds = tokenize_adata(a, by_ensembl, gene_id_key="ensembl_id", spec=TokenizationSpec(n_zeros=0)).dataset
    assert ds.num_rows == 300
    with pytest.raises(InputError, match="none of its 400 genes is in the vocabulary"):
        tokenize_adata(a, by_ensembl)  # symbols against an Ensembl vocabulary


def test_existing_output_and_failed_runs_leave_nothing_behind(tmp_path, files):
    paths, adatas, stats = files
    out = tmp_path / "tokens"
    tokenize_files(paths[:1], stats, out, progress=False)
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        tokenize_files(paths[:1], stats, out, progress=False)
    before = json.loads((out / "manifest.json").read_text())["counts"]["cells_written"]
    broken = adatas[0].copy()
    X = broken.X.astype(np.float32).tolil()
    X[250, 2] = -3
    broken.X = X.tocsr()
    bad = tmp_path / "bad.h5ad"
    broken.write_h5ad(bad)
    with pytest.raises(InputError, match="negative value"):
        tokenize_files([paths[1], bad], stats, out, overwrite=True, progress=False, chunk_size=50)
    # the previous dataset is untouched and no temporary folder is left
    assert json.loads((out / "manifest.json").read_text())["counts"]["cells_written"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad", "tokens"]
    tokenize_files(paths[1:], stats, out, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["counts"]["cells_written"] == 198
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("precious")
    with pytest.raises(InputError, match="not an express output"):
        tokenize_files(paths[1:], stats, unrelated, overwrite=True, progress=False)


def test_obs_keys_must_exist_and_not_collide(tmp_path, files):
    paths, _, stats = files
    with pytest.raises(InputError, match=r"obs has no column 'tissue'; available columns: cell_type, donor, score"):
        tokenize_files(paths, stats, tmp_path / "t", obs_keys="cell_type,tissue", progress=False)
    with pytest.raises(InputError, match="collide"):
        tokenize_files(paths, stats, tmp_path / "t", obs_keys="length", progress=False)
    assert not (tmp_path / "t").exists()


def test_missing_obs_values_become_nulls(files):
    _, adatas, stats = files
    a = adatas[0][:20].copy()
    a.obs["cell_type"] = a.obs["cell_type"].cat.add_categories(["x"])
    a.obs.loc[a.obs_names[3], "cell_type"] = np.nan
    ds = tokenize_adata(a, GeneVocab.load(stats), obs_keys=["cell_type"]).dataset
    assert ds[3]["cell_type"] is None and ds[4]["cell_type"] == str(a.obs["cell_type"].iloc[4])
