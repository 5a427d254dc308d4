"""Gene hierarchy: a group id per gene at one or more coarser levels.

Two sources:

- a user TSV (:func:`read_hierarchy_tsv`): a header row, then ``gene_id<TAB>level1<TAB>level2...``; group labels are
  any strings, numbered 1.. per level in sorted label order;
- the corpus itself (:func:`derive_hierarchy`): genes are clustered with seeded k-means on their projection sketch
  (unit vectors that approximate correlation profiles, see :mod:`tokenizer.sketch`, reduced to their top 32
  principal components); each coarser level clusters the previous level's centroids, so the levels nest (genes in
  one fine group share their coarse group).

Group ids start at 1 (0 is reserved for special tokens). Everything is deterministic for a given seed.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CorruptFileError, InputError

logger = logging.getLogger(__name__)


def parse_n_groups(spec: str | Sequence[int] | None, n_genes: int) -> list[int]:
    """Group counts per level: ``"64,8"``, ``[64, 8]``, ``"auto"`` (about sqrt(n) then n^(1/4)) or ``"0"``/``None``."""
    if spec is None or spec in ("0", "none", ""):
        return []
    if spec == "auto":
        if n_genes < 4:
            return []
        fine = max(2, round(math.sqrt(n_genes)))
        coarse = max(2, round(math.sqrt(fine)))
        return [fine, coarse] if coarse < fine else [fine]
    if isinstance(spec, str):
        try:
            sizes = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"n_groups must look like '64,8' or 'auto', got {spec!r}") from None
    else:
        sizes = [int(s) for s in spec]
    if any(s < 1 for s in sizes) or any(b > a for a, b in zip(sizes, sizes[1:])):
        raise InputError(f"n_groups must be positive and non-increasing from fine to coarse levels, got {sizes}")
    return sizes


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, weights: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means (scikit-learn's, k-means++ start, one initialisation); returns ``(labels, centroids)``.

    ``k`` is capped at the number of points. Labels are renumbered by first appearance, so the result does not depend
    on the order the clusters were found in.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)  # half the memory traffic of float64, ample precision for grouping genes
    k = min(k, x.shape[0])
    if k <= 0:
        return np.zeros(x.shape[0], dtype=np.int64), np.zeros((0, x.shape[1]), dtype=np.float32)
    fitted = KMeans(n_clusters=k, n_init=1, max_iter=30, random_state=seed).fit(x, sample_weight=weights)
    labels = fitted.labels_.astype(np.int64)
    used, first = np.unique(labels, return_index=True)
    used = used[np.argsort(first, kind="stable")]
    relabel = np.empty(k, dtype=np.int64)
    relabel[used] = np.arange(len(used))
    return relabel[labels], fitted.cluster_centers_[used]


def prefetch_hierarchy_imports() -> None:
    """Import scikit-learn's k-means and PCA in a background thread while the statistics accumulate: the import takes
    about a second, as long as fitting 50,000 cells, and the accumulation kernels release the GIL."""
    import threading

    def load() -> None:
        import sklearn.cluster  # noqa: F401
        import sklearn.decomposition  # noqa: F401

    threading.Thread(target=load, name="prefetch-sklearn", daemon=True).start()


def derive_hierarchy(vectors: np.ndarray, n_groups: Sequence[int], *, seed: int = 0) -> np.ndarray:
    """``(n_genes, n_levels)`` int32 group ids (from 1) by nested k-means on ``vectors`` (one row per gene)."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    n = vectors.shape[0]
    out = np.ones((n, len(n_groups)), dtype=np.int32)
    if n == 0 or not n_groups:
        return out
    # one thread: these problems are small, and threaded BLAS/OpenMP is many times slower on a busy machine
    with threadpool_limits(1):
        # the top 32 principal components: k-means then costs a quarter as much on 128-d sketches
        points = vectors if min(vectors.shape) <= 32 else PCA(32, random_state=seed).fit_transform(vectors)
        weights = np.ones(n)
        member = np.arange(n)  # which point each gene belongs to at the current level
        for level, k in enumerate(n_groups):
            labels, centroids = kmeans(points, k, seed=seed + level, weights=weights)
            member = labels[member]
            out[:, level] = member + 1
            weights = np.bincount(labels, weights=weights, minlength=len(centroids))
            points = centroids
    return out


def read_hierarchy_tsv(path: str | os.PathLike, gene_ids: Sequence[str]) -> tuple[np.ndarray, list[str], dict]:
    """Group ids of ``gene_ids`` from a TSV with a header row: ``gene_id``, then one column per level.

    Genes missing from the file go to an extra group per level (reported, with a warning).
    Returns ``(group_ids (n_genes, n_levels) int32, level names, report)``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"hierarchy file not found: {path}")
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise CorruptFileError(f"{path}: a hierarchy TSV needs a header row (gene_id, level names...) and at least "
                               "one gene row with one or more group columns")
    header = rows[0]
    n_levels = len(header) - 1
    table: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        if len(row) != n_levels + 1:
            raise CorruptFileError(f"{path}, line {line}: expected {n_levels + 1} tab-separated fields, got {len(row)}")
        table[row[0].strip()] = [c.strip() for c in row[1:]]
    group_ids = np.zeros((len(gene_ids), n_levels), dtype=np.int32)
    missing = [g for g in gene_ids if g not in table]
    for level in range(n_levels):
        labels = sorted({v[level] for v in table.values()})
        number = {label: i + 1 for i, label in enumerate(labels)}
        extra = len(labels) + 1
        group_ids[:, level] = [number[table[g][level]] if g in table else extra for g in gene_ids]
    if missing:
        logger.warning("%s: %d of %d vocabulary genes have no row (e.g. %s); they get their own group per level",
                       path, len(missing), len(gene_ids), ", ".join(missing[:5]))
    report = {"source": str(path), "levels": header[1:], "genes_missing": len(missing)}
    return group_ids, header[1:], report
