"""The core rank encoding against a straightforward per-cell reference."""

import numpy as np
import pytest
import scipy.sparse as sp

from tokenizer.encode import mix_seeds, rank_encode


def reference_cell(row_ids, row_counts, total, medians, top_k):
    """Plain per-cell reference: normalise, rank by float32 value descending, ties to the smaller token id."""
    keep = row_counts > 0
    ids, counts = row_ids[keep], row_counts[keep]
    v = (counts / total * 10_000.0 / medians[ids]).astype(np.float32)
    order = np.lexsort((ids, -v))[:top_k]
    return ids[order], v[order]


@pytest.fixture
def chunk():
    rng = np.random.default_rng(0)
    n_cells, n_genes, n_special = 300, 800, 4
    X = sp.random(n_cells, n_genes, density=0.3, format="csr", random_state=1,
                  data_rvs=lambda k: rng.negative_binomial(1, 0.4, k) + 1).astype(np.int32)
    X = X.tolil()
    X[5] = 0  # an empty cell
    X[7, :3] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    totals = np.asarray(X.sum(1)).ravel().astype(np.float64) + rng.integers(0, 50, n_cells)
    totals[totals == 0] = 1
    medians = np.ones(n_genes + n_special)
    medians[n_special:] = rng.choice([0.5, 1.0, 2.0, 3.7], n_genes)  # few distinct medians -> many value ties
    return X, totals, medians, n_special


def test_matches_per_cell_reference_with_ties(chunk):
    X, totals, medians, n_special = chunk
    tokens = rank_encode(X.indptr, X.indices + n_special, X.data, totals, medians, top_k=50,
                         n_zeros=20, zero_candidates=np.arange(n_special, medians.size),
                         cell_seeds=mix_seeds(7, np.arange(X.shape[0])), cls_id=2)
    assert len(tokens) == X.shape[0]
    for i in range(X.shape[0]):
        row = X[i]
        ref_ids, ref_v = reference_cell(row.indices + n_special, row.data, totals[i], medians, 50)
        ids, values, is_zero = tokens.cell(i)
        n_expr = len(ref_ids)
        assert ids[0] == 2 and values[0] == 0 and is_zero[0] == 0
        np.testing.assert_array_equal(ids[1:1 + n_expr], ref_ids)
        np.testing.assert_array_equal(values[1:1 + n_expr], ref_v)
        zeros = ids[1 + n_expr:]
        assert len(zeros) == 20
        assert len(set(zeros.tolist())) == 20
        assert not set(zeros.tolist()) & set((row.indices + n_special).tolist())
        assert np.all(is_zero[1 + n_expr:] == 1) and np.all(values[1 + n_expr:] == 0)
    assert tokens.lengths[5] == 1 + 20  # empty cell: <cls> + zeros only


def test_same_cell_same_tokens_whatever_the_chunking(chunk):
    X, totals, medians, n_special = chunk
    kw = dict(top_k=30, n_zeros=10, zero_candidates=np.arange(n_special, medians.size), cls_id=2, eos_id=3)
    seeds = mix_seeds(11, np.arange(X.shape[0]))
    whole = rank_encode(X.indptr, X.indices + n_special, X.data, totals, medians, cell_seeds=seeds, **kw)
    part = X[100:200]
    sub = rank_encode(part.indptr, part.indices + n_special, part.data, totals[100:200], medians,
                      cell_seeds=seeds[100:200], **kw)
    for i in range(100):
        for a, b in zip(whole.cell(100 + i), sub.cell(i)):
            np.testing.assert_array_equal(a, b)
    other = rank_encode(X.indptr, X.indices + n_special, X.data, totals, medians,
                        cell_seeds=mix_seeds(12, np.arange(X.shape[0])), **kw)
    assert not np.array_equal(whole.input_ids, other.input_ids)  # the seed does change the sampled zeros


def test_few_free_candidates_uses_all_of_them():
    X = sp.csr_matrix(np.array([[1, 0, 2, 0, 0, 3], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]]))
    tokens = rank_encode(X.indptr, X.indices, X.data, np.array([6.0, 1.0, 6.0]), np.ones(6), top_k=2, n_zeros=3,
                         zero_candidates=np.arange(6), cell_seeds=mix_seeds(1, np.arange(3)))
    ids0, v0, z0 = tokens.cell(0)
    assert ids0[:2].tolist() == [5, 2] and sorted(ids0[2:].tolist()) == [1, 3, 4]
    np.testing.assert_allclose(v0[:2], [5000.0, 10000.0 / 3], rtol=1e-6)
    ids1, _, _ = tokens.cell(1)
    assert ids1[0] == 5 and len(ids1) == 4 and 5 not in ids1[1:].tolist()
    ids2, _, z2 = tokens.cell(2)
    assert ids2.tolist() == [0, 1] and z2.tolist() == [0, 0]  # no free candidate left: no zeros


def test_rejects_bad_arguments():
    X = sp.csr_matrix(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="token ids"):
        rank_encode(X.indptr, X.indices + 5, X.data, np.array([3.0]), np.ones(2), top_k=5)
    with pytest.raises(ValueError, match="positive total"):
        rank_encode(X.indptr, X.indices, X.data, np.array([0.0]), np.ones(2), top_k=5)
    with pytest.raises(ValueError, match="zero_candidates"):
        rank_encode(X.indptr, X.indices, X.data, np.array([3.0]), np.ones(2), top_k=5, n_zeros=1)


def test_float64_ranking_orders_values_that_collide_in_float32():
    # v = count * 10_000 / total / median: genes 0 and 1 differ by 1e-9 relative, which float32 cannot tell apart
    X = sp.csr_matrix(np.array([[1, 1, 2]]))
    medians = np.array([1.0 + 2e-9, 1.0, 4.0])
    kw = dict(top_k=3, target_sum=10_000.0)
    float32 = rank_encode(X.indptr, X.indices, X.data, np.array([4.0]), medians, **kw)
    float64 = rank_encode(X.indptr, X.indices, X.data, np.array([4.0]), medians, rank_dtype=np.float64, **kw)
    assert float32.input_ids.tolist() == [0, 1, 2]  # a float32 tie: the smaller token id first
    assert float64.input_ids.tolist() == [1, 0, 2]  # float64: gene 1's value is larger
    np.testing.assert_array_equal(float32.values, float64.values[[1, 0, 2]])
    with pytest.raises(ValueError, match="rank_dtype"):
        rank_encode(X.indptr, X.indices, X.data, np.array([4.0]), medians, rank_dtype=np.int32, **kw)


def test_float64_ranking_matches_a_reference_on_random_cells(chunk):
    X, totals, medians, n_special = chunk
    tokens = rank_encode(X.indptr, X.indices + n_special, X.data, totals, medians, top_k=25, rank_dtype=np.float64)
    for i in range(X.shape[0]):
        row = X[i]
        ids = row.indices + n_special
        v = row.data / totals[i] * 10_000.0 / medians[ids]
        order = np.lexsort((ids, -v))[:25]
        np.testing.assert_array_equal(tokens.cell(i)[0], ids[order])
