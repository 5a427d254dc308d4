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
import scipy.sparse as sp

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


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_iter: int = 30, tol: float = 1e-2,
           weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means (k-means++ start, Lloyd iterations until fewer than ``tol`` of the points change cluster, at
    most ``n_iter``). Returns ``(labels, centroids)``.

    Labels are renumbered by first appearance, so the result does not depend on the order clusters were found in.
    """
    x = np.asarray(x, dtype=np.float32)  # distances in float32: half the memory traffic, ample precision
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(n, dtype=np.int64), np.zeros((0, x.shape[1]))
    rng = np.random.default_rng(seed)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    x_sq = (x**2).sum(1)
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.choice(n, p=w / w.sum())]
    d2 = np.maximum(x_sq - 2.0 * x @ centroids[0] + centroids[0] @ centroids[0], 0.0)
    for c in range(1, k):
        p = d2 * w
        total = p.sum()
        idx = int(np.searchsorted(np.cumsum(p), rng.random() * total)) if total > 0 else int(rng.integers(n))
        centroids[c] = x[min(idx, n - 1)]
        d2 = np.minimum(d2, np.maximum(x_sq - 2.0 * x @ centroids[c] + centroids[c] @ centroids[c], 0.0))
    labels = np.full(n, -1, dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for _ in range(n_iter):
        # x_sq - 2 x.c + c_sq, in place (doubling is exact, so this equals evaluating the expression directly)
        np.matmul(x, centroids.T, out=dist)
        dist *= -2.0
        dist += x_sq[:, None]
        dist += (centroids**2).sum(1)[None, :]
        new = dist.argmin(1)
        changed = np.count_nonzero(new != labels)
        labels = new
        if changed <= tol * n:
            break
        assign = sp.csr_matrix((w, (labels, np.arange(n))), shape=(k, n))
        sums = assign @ x
        mass = np.bincount(labels, weights=w, minlength=k)
        empty = mass == 0
        centroids[~empty] = sums[~empty] / mass[~empty, None]
        if empty.any():  # re-seed empty clusters with the points farthest from their centroid
            far = np.argsort(-dist[np.arange(n), labels], kind="stable")[: int(empty.sum())]
            centroids[empty] = x[far]
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first, kind="stable")
    relabel = np.empty(k, dtype=np.int64)
    relabel[np.unique(labels)[order]] = np.arange(len(order))
    used = np.unique(labels)[order]
    return relabel[labels], centroids[used]


def _principal_components(x: np.ndarray, n_components: int) -> np.ndarray:
    """``x`` projected on its top principal components (k-means then costs a quarter as much on 128-d sketches)."""
    if x.shape[1] <= n_components:
        return x
    centred = x - x.mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: the last columns are the top ones
    return centred @ vectors[:, ::-1][:, :n_components]


def derive_hierarchy(vectors: np.ndarray, n_groups: Sequence[int], *, seed: int = 0) -> np.ndarray:
    """``(n_genes, n_levels)`` int32 group ids (from 1) by nested k-means on ``vectors`` (one row per gene)."""
    n = vectors.shape[0]
    out = np.ones((n, len(n_groups)), dtype=np.int32)
    if n == 0 or not n_groups:
        return out
    with _one_blas_thread():
        return _nested_kmeans(vectors, n_groups, seed, out)


def _one_blas_thread():
    """BLAS on one thread: these products are small, and threaded OpenBLAS is many times slower on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the default threading applies
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _nested_kmeans(vectors: np.ndarray, n_groups: Sequence[int], seed: int, out: np.ndarray) -> np.ndarray:
    n = vectors.shape[0]
    points = _principal_components(vectors, 32)
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
