"""Metrics on hand-made inputs with known answers."""

import os

import numpy as np
import pytest
from scipy import stats

from finetune import metrics as M


def test_accuracy_macro_f1_and_confusion_by_hand():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "b", "a"]
    assert M.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # per class: a: P=2/3 R=2/3 F=2/3; b: P=2/3 R=1 F=0.8; c: P=0 R=0 F=0
    assert M.macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    matrix, names = M.confusion(y_true, y_pred)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(matrix, [[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    # a predicted class absent from the truth counts too (F1 = 0 for it)
    assert M.macro_f1(["a", "a"], ["a", "z"]) == pytest.approx((2 / 3 + 0.0) / 2)
    with pytest.raises(ValueError):
        M.accuracy([1, 2], [1])


def test_protein_metrics_match_definitions():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(20, 6))
    pred = true + rng.normal(scale=0.5, size=true.shape)
    assert M.protein_rmse(pred, true) == pytest.approx(np.sqrt(((pred - true) ** 2).mean()))
    per_cell = np.mean([stats.pearsonr(pred[i], true[i])[0] for i in range(20)])
    per_protein = np.mean([stats.pearsonr(pred[:, j], true[:, j])[0] for j in range(6)])
    assert M.mean_pearson_per_cell(pred, true) == pytest.approx(per_cell)
    assert M.mean_pearson_per_protein(pred, true) == pytest.approx(per_protein)
    # a constant prediction (the mean-per-protein baseline) scores 0 per protein; a constant measurement is left out
    const = np.tile(true.mean(0), (20, 1))
    assert M.mean_pearson_per_protein(const, true) == 0.0
    flat = true.copy()
    flat[:, 0] = 1.5
    expect = np.mean([stats.pearsonr(pred[:, j], flat[:, j])[0] for j in range(1, 6)])
    assert M.mean_pearson_per_protein(pred, flat) == pytest.approx(expect)
    assert M.protein_rmse(true, true) == 0.0
    out = M.protein_metrics(pred, true)
    assert set(out) == {"rmse", "pearson_per_cell", "pearson_per_protein"}


def _two_blobs(separated: bool, mixed_batches: bool, n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["t0", "t1"], n // 2)
    centre = np.where(labels == "t0", 0.0, 10.0 if separated else 0.0)
    batches = np.tile(["b0", "b1"], n // 2)
    shift = 0.0 if mixed_batches else np.where(batches == "b0", 0.0, 5.0)
    x = np.stack([centre + rng.normal(size=n), shift + rng.normal(size=n)], axis=1)
    return x, labels, batches


def test_label_metrics_separate_good_from_bad_embeddings():
    good, labels, _ = _two_blobs(separated=True, mixed_batches=True)
    bad, _, _ = _two_blobs(separated=False, mixed_batches=True)
    assert M.label_silhouette(good, labels) > 0.8 > 0.6 > M.label_silhouette(bad, labels)
    assert M.knn_accuracy(good, labels) == 1.0
    assert M.knn_accuracy(bad, labels) < 0.75
    agree = M.cluster_agreement(good, labels)
    assert agree["nmi_kmeans"] == pytest.approx(1.0) and agree["ari_kmeans"] == pytest.approx(1.0)
    assert M.cluster_agreement(bad, labels)["ari_kmeans"] < 0.2
    assert M.graph_connectivity(good, labels) == 1.0


def test_graph_connectivity_by_hand():
    # type "a" split into two far-apart groups of 3; each cell points to itself and its 2 nearest cells, so each
    # group is one strongly connected piece and the two never meet: largest piece 3 of 6
    x = np.array([[0, 0], [0, 1], [1, 0], [100, 100], [100, 101], [101, 100], [50, 50], [50, 51], [51, 50]], float)
    labels = ["a"] * 6 + ["b"] * 3
    assert M.graph_connectivity(x, labels, k=3) == pytest.approx((3 / 6 + 1.0) / 2)
    # a chain 0 -> 1 -> 2 <- 3 pointing one way only: the directed graph's strong components are single cells,
    # except where two cells point at each other (1 and 2 here): largest piece 2 of 4
    chain = np.array([[0.0], [1.0], [1.5], [3.0]])
    assert M.graph_connectivity(chain, ["c"] * 4, k=2) == pytest.approx(2 / 4)


def test_batch_mixing_metrics():
    mixed, labels, batches = _two_blobs(separated=True, mixed_batches=True)
    split, _, _ = _two_blobs(separated=True, mixed_batches=False)
    assert M.ilisi(mixed, batches, perplexity=5) > 1.6  # towards 2 = two batches perfectly mixed
    assert M.ilisi(split, batches, perplexity=5) < 1.1
    assert M.batch_entropy(mixed, batches, k=10) > 0.8 > 0.2 > M.batch_entropy(split, batches, k=10)
    assert M.batch_silhouette(mixed, batches, labels) > M.batch_silhouette(split, batches, labels)
    # one batch: iLISI is exactly 1; scaled, 0 for separated batches and near 1 for mixed ones
    assert M.ilisi(mixed, ["b0"] * len(batches), perplexity=5) == pytest.approx(1.0)
    assert M.ilisi(mixed, batches, perplexity=5, scale=True) == pytest.approx(M.ilisi(mixed, batches, perplexity=5) - 1)


def test_perplexity_calibration_reaches_target_entropy():
    rng = np.random.default_rng(1)
    d = np.sort(rng.uniform(0.1, 3.0, size=(5, 30)), axis=1)
    p = M._perplexity_weights(d, 10.0)
    entropy = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(entropy, np.log(10.0), atol=1e-4)
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_embedding_metrics_uses_what_annotations_allow():
    x, labels, batches = _two_blobs(separated=True, mixed_batches=True)
    assert "ilisi" not in M.embedding_metrics(x, labels)
    assert {"label_silhouette", "knn_accuracy", "ilisi", "batch_silhouette"} <= set(M.embedding_metrics(x, labels, batches))


def _scib_metrics():
    """scib-metrics (the ``bench`` extra): required in CI, a skip with the reason elsewhere."""
    try:
        import scib_metrics
    except ImportError:
        message = "scib-metrics is not installed (pip install 'express[bench]')"
        if os.environ.get("EXPRESS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + "; CI installs it")
        pytest.skip(message)
    return scib_metrics


@pytest.mark.shared_data
def test_embedding_metrics_agree_with_scib_metrics_on_real_cells(shared):
    """express's silhouettes, iLISI, graph connectivity and k-means NMI/ARI against scib-metrics (the field's
    reference implementation) on the PCA of 600 real CITE-seq cells (41 types, 2 donors), with the same neighbours."""
    import anndata as ad

    from finetune import baselines as B
    from finetune.benchmark.scvi_arms import exact_neighbors

    scib_metrics = _scib_metrics()
    adata = ad.read_h5ad(shared("bmmc_cite_600.h5ad"))
    x, _, _ = B.log_normalized_features(adata)
    emb = B.pca_embedding(x, n_components=20)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    batches = adata.obs["batch"].astype(str).to_numpy()
    neighbours = exact_neighbors(emb, 90)  # the 90 nearest cells, itself first, as scib-metrics' Benchmarker uses
    assert M.label_silhouette(emb, labels) == pytest.approx(float(scib_metrics.silhouette_label(emb, labels)),
                                                           abs=1e-5)
    assert M.batch_silhouette(emb, batches, labels) == pytest.approx(
        float(scib_metrics.silhouette_batch(emb, labels, batches)), abs=1e-5)
    assert M.ilisi(emb, batches, scale=True) == pytest.approx(float(scib_metrics.ilisi_knn(neighbours, batches)),
                                                              abs=1e-4)
    assert M.graph_connectivity(emb, labels, k=15) == pytest.approx(
        float(scib_metrics.graph_connectivity(neighbours.subset_neighbors(15), labels)), abs=1e-12)
    # k-means differs in its initialisation (scikit-learn vs scib-metrics' own), so the clusters may differ a little
    ours, theirs = M.cluster_agreement(emb, labels), scib_metrics.nmi_ari_cluster_labels_kmeans(emb, labels)
    assert ours["nmi_kmeans"] == pytest.approx(float(theirs["nmi"]), abs=0.03)
    assert ours["ari_kmeans"] == pytest.approx(float(theirs["ari"]), abs=0.05)
    # the values are those of a real, partly batch-mixed embedding, not degenerate ones
    assert 0.3 < M.ilisi(emb, batches, scale=True) < 0.95 and 0.3 < M.graph_connectivity(emb, labels) < 1.0
