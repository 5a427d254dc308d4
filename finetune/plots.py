"""PNG plots of fine-tuning results: UMAPs of an embedding, a confusion matrix, predicted vs measured proteins."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def umap_coordinates(embedding: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of an embedding (umap-learn)."""
    import umap

    n_neighbors = max(2, min(n_neighbors, embedding.shape[0] - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return reducer.fit_transform(np.asarray(embedding, dtype=np.float32))


def scatter_categories(ax, coords: np.ndarray, values: Sequence, *, size: float = 4) -> list[str]:
    """Points coloured by a categorical annotation, one colour per category (tab10, tab20 beyond ten), no ticks;
    returns the categories in colour order."""
    plt = _pyplot()
    values = np.asarray(values).astype(str)
    cats = sorted(set(values))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    for i, cat in enumerate(cats):
        m = values == cat
        ax.scatter(coords[m, 0], coords[m, 1], s=size, color=cmap(i % cmap.N), label=cat, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    return cats


def plot_umap(coords: np.ndarray, colours: dict[str, Sequence], path: str | Path, *, title: str = "") -> Path:
    """One panel per annotation (e.g. cell type, batch, donor), categorical colours, legend beside each panel."""
    plt = _pyplot()
    n = len(colours)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], colours.items()):
        cats = scatter_categories(ax, coords, values, size=4)
        ax.set_title(f"{title} {name}".strip())
        if len(cats) <= 50:
            ax.legend(fontsize=5 if len(cats) > 20 else 6, markerscale=2, loc="center left",
                      bbox_to_anchor=(1.0, 0.5), frameon=False, ncol=2 if len(cats) > 20 else 1)
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) with counts in the cells when small enough."""
    plt = _pyplot()
    rows = matrix.sum(1, keepdims=True)
    share = matrix / np.maximum(rows, 1)
    size = max(4.0, 0.3 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    ax.set_title(title)
    return _save(fig, path)


def plot_protein_scatter(pred: np.ndarray, true: np.ndarray, names: Sequence[str], path: str | Path, *,
                         n_proteins: int = 8, title: str = "") -> Path:
    """Predicted vs measured normalised levels: all values (hexbin) and the best-predicted proteins."""
    plt = _pyplot()
    from .metrics import _rowwise_pearson

    r = _rowwise_pearson(pred.T, true.T)
    order = [int(i) for i in np.argsort(-np.nan_to_num(r, nan=-2.0))[: n_proteins]]
    cols = 1 + len(order)
    ncols = min(cols, 5)
    nrows = int(np.ceil(cols / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    flat = axes.ravel()
    flat[0].hexbin(true.ravel(), pred.ravel(), gridsize=40, bins="log", cmap="viridis")
    flat[0].set_title("all proteins", fontsize=9)
    for ax, j in zip(flat[1:], order):
        ax.scatter(true[:, j], pred[:, j], s=3, alpha=0.6)
        ax.set_title(f"{names[j]} (r={r[j]:.2f})", fontsize=9)
    for ax in flat[: cols]:
        lo = float(min(true.min(), pred.min()))
        hi = float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("measured", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    for ax in flat[cols:]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)
