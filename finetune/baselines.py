"""Classical baselines the fine-tuned heads are measured against (the methods the field compares with).

Features: :func:`log_normalized_features` -- ``log1p(counts / library * 1e4)`` over the training cells' highly
variable genes (all genes when there are at most ``n_top_genes``), the same input the MLP encoder reads.

- cell types: :func:`l1_logistic_regression` (L1-regularised multinomial logistic regression, ``saga``),
  :func:`mlp_classifier` (scikit-learn MLP), :func:`majority_class`;
- proteins (targets on the normalised scale): :func:`mean_protein`, and on truncated-SVD features of the
  log-normalised genes (fitted on the training cells) :func:`knn_regression`, :func:`ridge_regression` and
  :func:`kernel_ridge_svd` (RBF kernel ridge on SVD features: the approach of the NeurIPS 2021 GEX->ADT winner).
  Their hyperparameters (number of leading SVD components, k, alpha, gamma) are chosen by 3-fold cross-validation
  on the training cells only;
- embeddings: :func:`pca_embedding`, PCA of the log-normalised highly variable genes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPClassifier

from .data import align_genes, counts_matrix, gene_names, log_normalize, select_genes

logger = logging.getLogger(__name__)


def log_normalized_features(
    train: ad.AnnData, test: ad.AnnData | None = None, *, n_top_genes: int | None = 2000,
    gene_id_key: str | None = None, layer: str | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix | None, list[str]]:
    """Log-normalised counts of the training cells' HVGs for train (and test, aligned to the same genes)."""
    genes = select_genes(train, n_top_genes, gene_id_key=gene_id_key, layer=layer)

    def features(adata: ad.AnnData) -> sp.csr_matrix:
        return align_genes(log_normalize(counts_matrix(adata, layer)), gene_names(adata, gene_id_key), genes)

    return features(train), features(test) if test is not None else None, genes


# ---------------------------------------------------------------------------------------------------------------------
# Cell types
# ---------------------------------------------------------------------------------------------------------------------
def majority_class(y_train: Sequence, n_test: int) -> np.ndarray:
    values, counts = np.unique(np.asarray(y_train).astype(str), return_counts=True)
    return np.full(n_test, values[np.argmax(counts)])


def l1_logistic_regression(x_train, y_train: Sequence, x_test, *, C: float = 1.0, max_iter: int = 200,
                           seed: int = 0) -> np.ndarray:
    """L1-regularised multinomial logistic regression on (log-normalised) features; predicted labels."""
    model = LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=max_iter, random_state=seed, tol=1e-3)
    model.fit(x_train, np.asarray(y_train).astype(str))
    return model.predict(x_test)


def mlp_classifier(x_train, y_train: Sequence, x_test, *, hidden: tuple[int, ...] = (256,), max_iter: int = 200,
                   seed: int = 0) -> np.ndarray:
    model = MLPClassifier(hidden_layer_sizes=hidden, alpha=1e-3, max_iter=max_iter, early_stopping=False,
                          random_state=seed)
    model.fit(x_train, np.asarray(y_train).astype(str))
    return model.predict(x_test)


# ---------------------------------------------------------------------------------------------------------------------
# Proteins
# ---------------------------------------------------------------------------------------------------------------------
def mean_protein(y_train: np.ndarray, n_test: int) -> np.ndarray:
    return np.tile(np.asarray(y_train, dtype=np.float64).mean(0), (n_test, 1))


def svd_features(x_train, x_test, *, n_components: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD coordinates of the log-normalised training genes (components in decreasing order of variance);
    test cells projected the same way. Not standardised: scaling every component to unit variance would give the
    noise components as much weight in distances as the leading ones."""
    n_components = int(min(n_components, x_train.shape[0] - 1, x_train.shape[1] - 1))
    svd = TruncatedSVD(n_components=n_components, random_state=seed).fit(x_train)
    return svd.transform(x_train), svd.transform(x_test)


def _select(make, grid: list[dict], f_train: np.ndarray, y_train: np.ndarray, seed: int):
    """3-fold CV (training cells only) over ``grid``; each point may set ``n_components`` (use the leading SVD
    components only) besides the estimator's own parameters. Returns the refitted best model and its settings."""
    folds = list(KFold(3, shuffle=True, random_state=seed).split(f_train))
    best, best_score = None, np.inf
    for point in grid:
        m = point.get("n_components", f_train.shape[1])
        params = {k: v for k, v in point.items() if k != "n_components"}
        score = 0.0
        for fit_idx, val_idx in folds:
            model = make(**params).fit(f_train[fit_idx, :m], y_train[fit_idx])
            score += np.mean((model.predict(f_train[val_idx, :m]) - y_train[val_idx]) ** 2)
        if score < best_score:
            best, best_score = point, score
    m = best.get("n_components", f_train.shape[1])
    logger.info("%s: chose %s", make.__name__, best)
    model = make(**{k: v for k, v in best.items() if k != "n_components"}).fit(f_train[:, :m], y_train)
    return model, m


def _components(f_train: np.ndarray) -> list[int]:
    return sorted({min(m, f_train.shape[1]) for m in (10, 20, 40, 64)})


def knn_regression(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, *, seed: int = 0) -> np.ndarray:
    grid = [{"n_components": m, "n_neighbors": k} for m in _components(f_train)
            for k in (5, 10, 20, 40) if k < 0.66 * len(f_train)]
    model, m = _select(KNeighborsRegressor, grid, f_train, y_train, seed)
    return model.predict(f_test[:, :m])


def ridge_regression(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, *, seed: int = 0) -> np.ndarray:
    grid = [{"n_components": m, "alpha": a} for m in _components(f_train) for a in (0.1, 1.0, 10.0, 100.0, 1000.0)]
    model, m = _select(Ridge, grid, f_train, y_train, seed)
    return model.predict(f_test[:, :m])


def kernel_ridge_svd(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """RBF kernel ridge on SVD coordinates; ``gamma`` relative to ``1 / (n_features * feature variance)``."""
    grid = []
    for m in _components(f_train):
        base = 1.0 / (m * f_train[:, :m].var())
        grid += [{"n_components": m, "kernel": "rbf", "alpha": a, "gamma": base * g}
                 for a in (0.03, 0.1, 1.0) for g in (0.25, 1.0, 4.0)]
    model, m = _select(KernelRidge, grid, f_train, y_train, seed)
    return model.predict(f_test[:, :m])


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------
def pca_embedding(x, *, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised HVGs (dense, centred) -- the "original data" reference for embedding metrics."""
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    n_components = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    return PCA(n_components=n_components, random_state=seed).fit_transform(x)
