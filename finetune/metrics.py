"""Evaluation metrics as pure functions on arrays.

Classification: :func:`accuracy`, :func:`macro_f1` (unweighted mean of per-class F1 over every class that occurs in
the truth or the predictions, so a held-out class the model never predicts counts as F1 = 0), :func:`confusion`.

Surface proteins, as scored in the NeurIPS 2021 multimodal competition (Luecken et al. 2021), on the normalised
scale: :func:`protein_rmse` (root mean squared error over all cells x proteins), :func:`mean_pearson_per_cell`
(Pearson correlation across proteins, averaged over cells) and :func:`mean_pearson_per_protein` (across cells,
averaged over proteins). A constant prediction carries no information and scores 0 (so the mean-per-protein baseline
has per-protein Pearson 0); cells or proteins whose measured values are constant are left out of the mean.

Embeddings (as in scIB, Luecken et al. 2022, with scib-metrics' definitions: ``tests/test_finetune_metrics.py``
checks the agreement on real cells): :func:`label_silhouette` ((ASW + 1) / 2 over cell types),
:func:`batch_silhouette` (1 - |ASW| over batches within each cell type, averaged), :func:`cluster_agreement` (NMI and
ARI of k-means clusters, k = number of cell types, and of Leiden clusters when ``leidenalg`` is installed),
:func:`knn_accuracy` (leave-one-out k-NN label accuracy), :func:`ilisi` (inverse Simpson's index of batches in
perplexity-weighted neighbourhoods, Korsunsky et al. 2019; 1 = one batch, n_batches = perfectly mixed),
:func:`batch_entropy` (entropy of batch labels among the k nearest neighbours, normalised to [0, 1]) and
:func:`graph_connectivity` (share of each cell type in the largest strongly connected component of its directed
kNN subgraph).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score, silhouette_samples
from sklearn.neighbors import NearestNeighbors

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------------
def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need two non-empty label arrays of one shape, got {y_true.shape} and {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need two non-empty label arrays of one shape, got {y_true.shape} and {y_pred.shape}")
    labels = np.union1d(y_true, y_pred)
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0.0))


def confusion(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> tuple[np.ndarray, list[str]]:
    """Counts matrix ``C[i, j]`` = cells of true class ``labels[i]`` predicted as ``labels[j]``."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    names = [str(x) for x in (labels if labels is not None else np.union1d(y_true, y_pred))]
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            matrix[index[t], index[p]] += 1
    return matrix, names


# ---------------------------------------------------------------------------------------------------------------------
# Proteins (NeurIPS 2021 definitions, on the normalised scale)
# ---------------------------------------------------------------------------------------------------------------------
def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"predictions {pred.shape} and measurements {true.shape} must be one (cells, proteins) shape")
    return pred, true


def protein_rmse(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = _check_pair(pred, true)
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def _is_constant(a: np.ndarray) -> np.ndarray:
    return np.ptp(a, axis=1) <= 1e-12 * np.maximum(np.abs(a).max(1), 1.0)


def _rowwise_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per row; 0 where the prediction is constant, NaN where the measurement is."""
    a = pred - pred.mean(1, keepdims=True)
    b = true - true.mean(1, keepdims=True)
    flat_pred, flat_true = _is_constant(pred), _is_constant(true)
    denom = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    r = (a * b).sum(1) / np.where(flat_pred | flat_true, 1.0, denom)
    return np.where(flat_true, np.nan, np.where(flat_pred, 0.0, r))


def mean_pearson_per_cell(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = _check_pair(pred, true)
    return float(np.nanmean(_rowwise_pearson(pred, true)))


def mean_pearson_per_protein(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = _check_pair(pred, true)
    return float(np.nanmean(_rowwise_pearson(pred.T, true.T)))


def protein_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {
        "rmse": protein_rmse(pred, true),
        "pearson_per_cell": mean_pearson_per_cell(pred, true),
        "pearson_per_protein": mean_pearson_per_protein(pred, true),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------
def label_silhouette(embedding: np.ndarray, labels: Sequence) -> float:
    """scIB's cell-type ASW: mean silhouette width over cells, rescaled to [0, 1] (higher = types separated)."""
    labels = np.asarray(labels).astype(str)
    if len(np.unique(labels)) < 2:
        raise ValueError("the label silhouette needs at least two cell types")
    return float((silhouette_samples(embedding, labels).mean() + 1.0) / 2.0)


def batch_silhouette(embedding: np.ndarray, batches: Sequence, labels: Sequence) -> float:
    """scIB's batch ASW: within each cell type, ``mean(1 - |silhouette by batch|)``; averaged over cell types.
    1 = batches fully mixed, 0 = separated. Types in a single batch, or with every cell in its own batch, are left
    out (no silhouette is defined there)."""
    batches, labels = np.asarray(batches).astype(str), np.asarray(labels).astype(str)
    scores = []
    for label in np.unique(labels):
        members = labels == label
        n_batches = len(np.unique(batches[members]))
        if n_batches == 1 or n_batches == members.sum():
            continue
        sil = silhouette_samples(embedding[members], batches[members])
        scores.append(np.mean(1.0 - np.abs(sil)))
    return float(np.mean(scores)) if scores else float("nan")


def cluster_agreement(embedding: np.ndarray, labels: Sequence, *, seed: int = 0) -> dict[str, float]:
    """NMI and ARI between clusters of the embedding and the labels: k-means with k = number of labels, and Leiden
    on a 15-NN graph (resolution 1) when ``leidenalg`` and ``igraph`` are installed."""
    labels = np.asarray(labels).astype(str)
    k = len(np.unique(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)
    out = {"nmi_kmeans": float(normalized_mutual_info_score(labels, clusters)),
           "ari_kmeans": float(adjusted_rand_score(labels, clusters))}
    leiden = _leiden(embedding, seed)
    if leiden is not None:
        out["nmi_leiden"] = float(normalized_mutual_info_score(labels, leiden))
        out["ari_leiden"] = float(adjusted_rand_score(labels, leiden))
    return out


def _leiden(embedding: np.ndarray, seed: int) -> np.ndarray | None:
    try:
        import igraph
        import leidenalg
    except ImportError:
        return None
    graph = knn_graph(embedding, 15)
    sources, targets = graph.nonzero()
    g = igraph.Graph(n=embedding.shape[0], edges=list(zip(sources.tolist(), targets.tolist())), directed=False)
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, resolution_parameter=1.0, seed=seed)
    return np.asarray(part.membership)


def knn_graph(embedding: np.ndarray, k: int) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency of the k-nearest-neighbour graph (Euclidean, self excluded)."""
    n = embedding.shape[0]
    k = min(k, n - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    rows = np.repeat(np.arange(n), k)
    graph = sp.csr_matrix((np.ones(n * k), (rows, idx[:, 1:].ravel())), shape=(n, n))
    return ((graph + graph.T) > 0).astype(np.float64).tocsr()


def knn_accuracy(embedding: np.ndarray, labels: Sequence, k: int = 15) -> float:
    """Leave-one-out k-NN majority-vote accuracy of the labels in the embedding."""
    labels = np.asarray(labels).astype(str)
    codes, y = np.unique(labels, return_inverse=True)
    k = min(k, len(y) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    votes = np.zeros((len(y), len(codes)))
    np.add.at(votes, (np.repeat(np.arange(len(y)), k), y[idx[:, 1:]].ravel()), 1.0)
    return float(np.mean(votes.argmax(1) == y))


def _perplexity_weights(distances: np.ndarray, perplexity: float, tol: float = 1e-5, iters: int = 50) -> np.ndarray:
    """Per row, weights ``exp(-beta * d)`` normalised to 1, with the precision ``beta`` chosen by bisection so the
    row's entropy is ``log(perplexity)`` (harmony's LISI kernel on plain distances)."""
    n = distances.shape[0]
    target = np.log(perplexity)
    beta = np.ones(n)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    for _ in range(iters):
        logits = -distances * beta[:, None]
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
        too_flat = entropy > target  # entropy too high -> increase beta
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
        if np.all(np.abs(entropy - target) < tol):
            break
    return p


def ilisi(embedding: np.ndarray, batches: Sequence, *, perplexity: float = 30.0, scale: bool = False) -> float:
    """Median integration LISI (harmony / scIB): per cell, ``1 / sum_b P(b)^2`` over its neighbours with
    perplexity-calibrated weights; the neighbourhood is the ``3 * perplexity`` nearest cells counting the cell itself
    (which gets no weight), as scib-metrics takes it. ``scale``: scIB's ``(iLISI - 1) / (n_batches - 1)`` in [0, 1]."""
    batches = np.asarray(batches).astype(str)
    _, b = np.unique(batches, return_inverse=True)
    k = int(min(3 * perplexity, len(b))) - 1  # neighbours besides the cell itself
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    weights = _perplexity_weights(dist[:, 1:], min(perplexity, (k + 1) / 3.0))
    n_batches = b.max() + 1
    share = np.zeros((len(b), n_batches))
    np.add.at(share, (np.repeat(np.arange(len(b)), k), b[idx[:, 1:]].ravel()), weights.ravel())
    median = float(np.median(1.0 / (share**2).sum(1)))
    if scale:
        return (median - 1.0) / (n_batches - 1) if n_batches > 1 else float("nan")
    return median


def batch_entropy(embedding: np.ndarray, batches: Sequence, k: int = 50) -> float:
    """Mean over cells of the entropy of batch labels among the k nearest neighbours, divided by log(n_batches)."""
    batches = np.asarray(batches).astype(str)
    _, b = np.unique(batches, return_inverse=True)
    n_batches = b.max() + 1
    if n_batches < 2:
        return float("nan")
    k = min(k, len(b) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    counts = np.zeros((len(b), n_batches))
    np.add.at(counts, (np.repeat(np.arange(len(b)), k), b[idx[:, 1:]].ravel()), 1.0)
    p = counts / k
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    return float(entropy.mean() / np.log(n_batches))


def graph_connectivity(embedding: np.ndarray, labels: Sequence, k: int = 15) -> float:
    """scIB graph connectivity as scib-metrics computes it: each cell points to its ``k`` nearest cells (itself
    included); per cell type, the largest strongly connected component of the type's cells in that directed graph
    over the type's cells; averaged over types. 1 = every type forms one connected piece."""
    labels = np.asarray(labels).astype(str)
    n = embedding.shape[0]
    k = min(k, n)
    _, idx = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(embedding)
    graph = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    scores = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        _, comp = connected_components(graph[members][:, members], directed=True, connection="strong")
        scores.append(np.bincount(comp).max() / len(members))
    return float(np.mean(scores))


def embedding_metrics(
    embedding: np.ndarray, labels: Sequence | None = None, batches: Sequence | None = None, *, seed: int = 0
) -> dict[str, float]:
    """All embedding metrics that the available annotations allow."""
    embedding = np.asarray(embedding, dtype=np.float64)
    out: dict[str, float] = {}
    if labels is not None and len(np.unique(np.asarray(labels).astype(str))) >= 2:
        out["label_silhouette"] = label_silhouette(embedding, labels)
        out.update(cluster_agreement(embedding, labels, seed=seed))
        out["knn_accuracy"] = knn_accuracy(embedding, labels)
        out["graph_connectivity"] = graph_connectivity(embedding, labels)
    if batches is not None and len(np.unique(np.asarray(batches).astype(str))) >= 2:
        out["ilisi"] = ilisi(embedding, batches)
        out["batch_entropy"] = batch_entropy(embedding, batches)
        if labels is not None:
            out["batch_silhouette"] = batch_silhouette(embedding, batches, labels)
    return out
