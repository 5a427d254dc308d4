"""Corpus statistics: the median sketch against exact medians, exact counts, mergeability, hierarchy."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import shared_path

from tokenizer import GeneVocab
from tokenizer.errors import InputError
from tokenizer.hierarchy import derive_hierarchy, kmeans, parse_n_groups, read_hierarchy_tsv
from tokenizer.io import cell_keys, file_key
from tokenizer.sketch import QuantileSketch, cell_projection, profile_table
from tokenizer.stats import FitState, accumulate_statistics, fit_statistics, merge_statistics, profile_vectors
from tokenizer.synthetic import synthetic_adata


# --- the quantile sketch ----------------------------------------------------------------------------------------------
def test_sketch_quantiles_are_within_the_relative_bound():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 400, 80)
    genes = np.repeat(np.arange(80), sizes)
    values = rng.lognormal(rng.normal(0, 2, 80)[genes], 1.0)
    values = np.clip(values, 1e-3, 1e4)
    for alpha in (0.005, 0.02):
        sketch = QuantileSketch(80, relative_accuracy=alpha)
        sketch.add(genes, values)
        assert sketch.totals().tolist() == sizes.tolist()
        exact = np.array([np.median(values[genes == g]) for g in range(80)])
        assert np.max(np.abs(sketch.medians() / exact - 1)) <= alpha * (1 + 1e-9)
        q90 = np.array([np.sort(values[genes == g])[int(np.floor(0.9 * (n - 1)))] for g, n in enumerate(sizes)])
        assert np.max(np.abs(sketch.quantile(0.9) / q90 - 1)) <= alpha * (1 + 1e-9)


def test_sketch_merge_is_exact_and_memory_is_flat():
    rng = np.random.default_rng(1)
    genes = rng.integers(0, 10, 5000)
    values = rng.lognormal(0, 1, 5000)
    whole = QuantileSketch(10)
    whole.add(genes, values)
    a, b = QuantileSketch(10), QuantileSketch(10)
    a.add(genes[:1234], values[:1234])
    b.add(genes[1234:], values[1234:])
    a.merge(b)
    np.testing.assert_array_equal(a.counts, whole.counts)
    size = whole.counts.nbytes
    whole.add(genes, values)  # twice the observations, the same memory
    assert whole.counts.nbytes == size and whole.n_buckets == 1613
    with pytest.raises(ValueError, match="different parameters"):
        a.merge(QuantileSketch(10, relative_accuracy=0.01))
    assert np.isnan(QuantileSketch(2).medians()).all()
    from tokenizer.sketch import add_counters

    narrow = np.full((2, 3), 60_000, dtype=np.uint16)
    total = add_counters(narrow.copy(), narrow)  # uint16 tables add up in (at least) uint32
    assert total.dtype == np.uint32 and total.max() == 120_000 and narrow.max() == 60_000
    big = np.full((2, 3), 2**32 - 10, dtype=np.uint32)
    total = add_counters(big.copy(), np.full((2, 3), 20, dtype=np.uint32))  # widened before it could overflow
    assert total.dtype == np.uint64 and total.max() == 2**32 + 10


# --- fit on synthetic data --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    a = synthetic_adata(n_cells=400, n_genes=300, seed=1)
    b = synthetic_adata(n_cells=250, n_genes=300, seed=2)
    b = b[:, 40:].copy()  # the second file measures fewer genes
    X = b.X.tolil()
    X[:5] = 0  # five empty cells
    X = X.tocsr()
    X.eliminate_zeros()
    b.X = X
    paths = [root / "a.h5ad", root / "b.h5ad"]
    a.write_h5ad(paths[0])
    b.write_h5ad(paths[1])
    return paths, [a, b]


def _exact_stats(adatas, gene_ids, donor_key="donor"):
    """Per-gene exact detection counts, zero fractions, medians and donor zero fractions."""
    values = {g: [] for g in gene_ids}
    measured = dict.fromkeys(gene_ids, 0)
    donors_measured = {g: set() for g in gene_ids}
    donors_detected = {g: set() for g in gene_ids}
    for adata in adatas:
        X = adata.X.tocsr().astype(np.float64)
        totals = np.asarray(X.sum(1)).ravel()
        used = totals > 0
        donors = adata.obs[donor_key].astype(str).to_numpy()
        norm = sp.diags(np.where(used, 1e4 / np.maximum(totals, 1), 0)) @ X
        norm = norm.tocsc()
        for j, g in enumerate(adata.var_names):
            measured[g] += int(used.sum())
            donors_measured[g] |= set(donors[used])
            rows = norm.indices[norm.indptr[j]:norm.indptr[j + 1]]
            col = norm.data[norm.indptr[j]:norm.indptr[j + 1]]
            values[g].extend(col[col > 0])
            donors_detected[g] |= set(donors[rows[col > 0]])
    n_cells = np.array([len(values[g]) for g in gene_ids])
    zero = 1 - n_cells / np.array([measured[g] for g in gene_ids])
    medians = np.array([np.median(values[g]) if values[g] else np.nan for g in gene_ids])
    donor_zero = np.array([len(donors_measured[g] - donors_detected[g]) / len(donors_measured[g]) for g in gene_ids])
    return n_cells, zero, medians, donor_zero


def test_fit_statistics_match_exact_values(tmp_path, corpus):
    paths, adatas = corpus
    vocab = fit_statistics(paths, tmp_path / "stats", donor_key="donor", min_cells=3, n_groups="6,2", progress=False)
    all_genes = sorted(set(adatas[0].var_names) | set(adatas[1].var_names))
    n_cells, zero, medians, donor_zero = _exact_stats(adatas, all_genes)
    keep = n_cells >= 3
    assert vocab.gene_ids == [g for g, k in zip(all_genes, keep) if k]  # sorted gene ids, min_cells applied
    assert vocab.meta["genes_below_min_cells"] == int((~keep).sum())
    np.testing.assert_array_equal(vocab.n_cells, n_cells[keep])
    np.testing.assert_allclose(vocab.zero_fraction, zero[keep], rtol=0, atol=1e-12)
    np.testing.assert_allclose(vocab.donor_zero_fraction, donor_zero[keep], rtol=0, atol=1e-12)
    assert np.max(np.abs(vocab.medians / medians[keep] - 1)) <= 0.005 * (1 + 1e-9)
    assert vocab.meta["cells_used"] == 400 + 245 and vocab.meta["cells_skipped_zero_counts"] == 5
    assert vocab.n_groups == [7, 3] and vocab.special_tokens == ("<pad>", "<mask>", "<cls>", "<eos>")
    assert vocab.gene_symbols[0] == vocab.gene_ids[0]  # symbols from var['gene_symbol']
    # the folder round-trips, the sketch state is plain arrays
    loaded = GeneVocab.load(tmp_path / "stats")
    pd.testing.assert_frame_equal(loaded.to_frame(), vocab.to_frame())
    with np.load(tmp_path / "stats" / "sketch.npz", allow_pickle=False) as z:
        assert "hist_values" in z.files and z["gene_ids"].dtype.kind == "U"
    vocab_json = json.loads((tmp_path / "stats" / "vocab.json").read_text())
    assert vocab_json["<pad>"] == 0 and vocab_json[vocab.gene_ids[0]] == 4


def test_workers_shards_and_merge_give_the_one_pass_result(tmp_path, corpus):
    paths, _ = corpus
    kw = dict(donor_key="donor", progress=False, chunk_size=64)
    one = fit_statistics(paths, tmp_path / "one", **kw).to_frame()
    two = fit_statistics(paths, tmp_path / "two", num_workers=2, **kw).to_frame()
    pd.testing.assert_frame_equal(one, two)
    fit_statistics(paths[:1], tmp_path / "a", **kw)
    fit_statistics(paths[1:], tmp_path / "b", **kw)
    merged = merge_statistics([tmp_path / "b", tmp_path / "a"], tmp_path / "m").to_frame()
    pd.testing.assert_frame_equal(one, merged)
    for i in range(3):
        fit_statistics(paths, tmp_path / f"s{i}", shard=f"{i}/3", **kw)
    sharded = merge_statistics([tmp_path / f"s{i}" for i in (2, 0, 1)], tmp_path / "ms")
    pd.testing.assert_frame_equal(one, sharded.to_frame())
    assert sharded.meta["cells_used"] == 645
    state_one = FitState.load(tmp_path / "one")
    state_sharded = FitState.load(tmp_path / "ms")
    np.testing.assert_array_equal(state_one.sketch.counts, state_sharded.sketch.counts)
    np.testing.assert_array_equal(state_one.proj, state_sharded.proj)
    np.testing.assert_array_equal(state_one.donor_detected, state_sharded.donor_detected)
    fit_statistics(paths[:1], tmp_path / "coarse", relative_accuracy=0.01, **kw)
    with pytest.raises(InputError, match="different relative_accuracy"):
        merge_statistics([tmp_path / "a", tmp_path / "coarse"])
    with pytest.raises(InputError, match="holds no sketch.npz"):
        merge_statistics([tmp_path / "a", tmp_path])


def test_counters_carry_past_65535():
    """The fitting kernel keeps 32-bit counters as two uint16 halves; 70,000 identical entries must count 70,000."""
    from tokenizer.sketch import _LOG_TABLE, _accumulate, _projection_base, combine_halves

    n = 70_000
    sketch = QuantileSketch(3)
    low = np.zeros(sketch.counts.shape, dtype=np.uint16)
    high = np.zeros_like(low)
    indptr = np.arange(n + 1, dtype=np.int64)
    indices = np.full(n, 1, dtype=np.int32)  # every cell: column 1 (gene 2), count 2, library size 40
    args = (indptr, indices, np.full(n, 2, dtype=np.int32), np.array([-1, 2, 0]), np.full(n, 40.0),
            np.arange(n, dtype=np.uint64), np.full(n, -1), 1e4, sketch.inv_log_gamma, sketch.offset, low, high,
            np.zeros((4, 3), dtype=np.int64), _projection_base(0), np.zeros((0, 3), dtype=bool),
            np.zeros(4, dtype=np.int64), profile_table(sketch), _LOG_TABLE)
    used, wrapped = _accumulate(*args)
    assert used == n and wrapped == 1
    sketch.counts = combine_halves(low, high)
    assert sketch.totals().tolist() == [0, 0, n]
    np.testing.assert_allclose(sketch.medians()[2], 2 / 40 * 1e4, rtol=0.005)


def test_fitting_counters_carry_through_all_three_parts():
    """Fitting keeps each 32-bit counter as a uint8 low byte, uint16 middle and uint8 top byte; increments carry
    from one part into the next, and the rows the kernel reports cover every row it wrote to."""
    from tokenizer.sketch import _LOG_TABLE, accumulate_rows

    sketch = QuantileSketch(3)
    shape = sketch.counts.shape
    low, mid, top = np.zeros(shape, np.uint8), np.zeros(shape, np.uint16), np.zeros(shape, np.uint8)
    n = 1000  # every cell: gene 1 with count 2 and library size 40, so one bucket b
    b = int(sketch.bucket_index(np.array([2 / 40 * 1e4]))[0])
    low[b, 1], mid[b, 1] = 100, 65535  # 100 + 65535 * 256: 156 increments from a carry into the top byte
    touched = np.array([shape[0], -1, shape[0], -1, 0])
    used, carries = accumulate_rows(
        np.arange(n + 1), np.zeros(n, np.int32), np.full(n, 2, np.int32), np.array([1]), np.full(n, 40.0),
        np.arange(n, dtype=np.uint64), np.full(n, -1), 1e4, sketch.inv_log_gamma, sketch.offset, low, mid, top,
        np.zeros((4, 3), np.int64), np.uint64(0), np.zeros((0, 3), bool), np.zeros(4, np.int64),
        profile_table(sketch), _LOG_TABLE, touched)
    assert used == n and carries == 4  # 100 + 1000 = 1100 = 4 * 256 + 76
    value = int(low[b, 1]) + (int(mid[b, 1]) << 8) + (int(top[b, 1]) << 24)
    assert value == 100 + 65535 * 256 + n and top[b, 1] == 1 and mid[b, 1] == 3 and low[b, 1] == 76
    assert touched[0] <= b <= touched[1] and touched[2] == touched[3] == b and touched[4] == 1


def test_projection_sketch_equals_a_direct_reference(corpus):
    paths, adatas = corpus
    state = accumulate_statistics(paths[:1], sketch_dim=16, seed=5, progress=False)
    adata = adatas[0]
    X = adata.X.tocsr().astype(np.float64)
    totals = np.asarray(X.sum(1)).ravel()
    coord, negative = cell_projection(cell_keys(file_key(str(paths[0])), np.arange(adata.n_obs)), 5, 16)
    table = profile_table(state.sketch)
    proj = np.zeros((adata.n_vars, 16), dtype=np.int64)
    for i in range(adata.n_obs):
        row = X[i]
        buckets = state.sketch.bucket_index(row.data / totals[i] * 1e4)
        proj[row.indices, coord[i]] += np.where(negative[i], -1, 1) * table[buckets]
    order = pd.Index(adata.var_names).get_indexer(state.gene_ids)
    np.testing.assert_array_equal(state.proj.T, proj[order])  # state.proj is laid out (dim, n_genes)


def test_sketch_cosines_estimate_gene_correlations():
    """Cosines of the sketch vectors are unbiased estimates of the genes' Pearson correlations of log1p(normalised)
    expression, with an error that shrinks as 1/sqrt(dim)."""
    adata = synthetic_adata(n_cells=1500, n_genes=120, seed=4, depth=3000)
    X = adata.X.toarray().astype(float)
    logged = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    errors = {}
    for dim in (128, 512):
        state = accumulate_statistics([adata], sketch_dim=dim, progress=False)
        vectors = profile_vectors(state)
        order = pd.Index(adata.var_names).get_indexer(state.gene_ids)
        exact = np.corrcoef(logged.T)[np.ix_(order, order)]
        upper = np.triu_indices(len(exact), 1)
        diff = (vectors @ vectors.T)[upper] - exact[upper]
        assert abs(diff.mean()) < 0.01  # unbiased
        errors[dim] = np.abs(diff).mean()
        assert errors[dim] < 1.2 / np.sqrt(dim)
    assert errors[512] < 0.65 * errors[128]


# --- hierarchy --------------------------------------------------------------------------------------------------------
def test_derived_hierarchy_is_nested_and_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 5
    points = np.repeat(centres, 20, axis=0) + rng.normal(size=(120, 8))
    groups = derive_hierarchy(points, [6, 2], seed=0)
    np.testing.assert_array_equal(groups, derive_hierarchy(points, [6, 2], seed=0))
    fine, coarse = groups[:, 0], groups[:, 1]
    assert sorted(set(fine)) == [1, 2, 3, 4, 5, 6] and sorted(set(coarse)) == [1, 2]
    for g in set(fine):  # nested: every fine group lies inside one coarse group
        assert len(set(coarse[fine == g])) == 1
    for c in range(6):  # the well-separated clusters are found
        assert len(set(fine[c * 20:(c + 1) * 20])) == 1
    labels, centroids = kmeans(points, 200, seed=1)  # more clusters than points: each point alone
    assert len(set(labels)) == 120 and centroids.shape == (120, 8)
    assert parse_n_groups("auto", 20_000) == [141, 12] and parse_n_groups("0", 10) == []
    with pytest.raises(InputError, match="non-increasing"):
        parse_n_groups("8,64", 100)


def test_hierarchy_from_tsv(tmp_path, corpus):
    paths, _ = corpus
    tsv = tmp_path / "groups.tsv"
    rows = ["gene_id\tfamily\tclass"] + [f"SYN{i:05d}\tfam{i % 3}\t{'odd' if i % 2 else 'even'}" for i in range(250)]
    tsv.write_text("\n".join(rows) + "\n")
    groups, levels, report = read_hierarchy_tsv(tsv, ["SYN00000", "SYN00004", "SYN00299"])
    assert levels == ["family", "class"] and report["genes_missing"] == 1
    np.testing.assert_array_equal(groups, [[1, 1], [2, 1], [4, 3]])  # unlisted genes get their own group
    vocab = fit_statistics(paths[:1], hierarchy=tsv, progress=False)
    assert vocab.n_levels == 2 and vocab.meta["hierarchy"]["levels"] == ["family", "class"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("gene_id\tlevel\nSYN00000\n")
    with pytest.raises(InputError, match="line 2: expected 2 tab-separated fields"):
        read_hierarchy_tsv(bad, ["SYN00000"])


# --- real data --------------------------------------------------------------------------------------------------------
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["kang2018_pbmc_12261.h5ad", "pbmc_3chemistries_2860.h5ad"])
def test_medians_on_real_data_within_one_percent(name):
    path = shared_path(name)
    vocab = fit_statistics([path], progress=False)
    adata = ad.read_h5ad(path)
    X = adata.X.tocsr().astype(np.float64)
    totals = np.asarray(X.sum(1)).ravel()
    norm = (sp.diags(1e4 / np.maximum(totals, 1)) @ X).tocsc()
    position = pd.Index(adata.var_names)
    checked = 0
    worst = 0.0
    for gene, median, n in zip(vocab.gene_ids, vocab.medians, vocab.n_cells):
        j = position.get_loc(gene)
        col = norm.data[norm.indptr[j]:norm.indptr[j + 1]]
        col = col[col > 0]
        assert len(col) == n
        if n >= 20:
            worst = max(worst, abs(median / np.median(col) - 1))
            checked += 1
    assert checked > 1000
    assert worst <= 0.01  # the requirement; the sketch guarantees 0.005
    assert worst <= 0.005 * (1 + 1e-9)
