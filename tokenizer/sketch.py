"""Mergeable, bounded-memory sketches of per-gene expression, filled one chunk of cells at a time.

**Quantile sketch** (:class:`QuantileSketch`): for every gene, a histogram of the normalised expression
``v = x / total * 10_000`` of the cells that detect it, over logarithmic buckets ``(gamma^(k-1), gamma^k]`` with
``gamma = (1 + alpha) / (1 - alpha)`` (the bucket layout of DDSketch, Masson et al. 2019). A bucket is reported as
``2 gamma^k / (gamma + 1)``, which is within a factor ``1 +- alpha`` of every value in it, so

    every quantile, and the median, is returned with relative error at most ``alpha``

(for values inside ``[min_value, max_value]``; values outside are clamped into the end buckets). The median of an
even number of values is the mean of the two middle ones, as ``numpy.median``; both are estimated within ``alpha``,
so their mean is too. Memory is ``n_buckets x n_genes`` counters whatever the number of cells
(``n_buckets = log(max_value / min_value) / log(gamma)``, 1,613 for the defaults ``alpha = 0.005`` and
``[1e-3, 1e4]``: 6.4 kB per gene). Two sketches merge by adding their counters, so statistics of shards merge into
exactly the one-pass result.

**Projection sketch** (for the gene hierarchy): every gene's log-normalised expression profile over cells,
``p_g,cell = log1p(v)``, is compressed to ``dim`` numbers with a CountSketch (Charikar et al. 2002; a sparse
Johnson-Lindenstrauss map): each cell adds ``+-p_g,cell`` to one coordinate of each of its genes' sketch, where the
coordinate and the sign come from a hash of the cell's identity (file name and row), never from its position in a
chunk or a worker. Inner products, hence correlations after centring, are preserved in expectation with a relative
spread of about ``sqrt(2 / dim)``. ``log1p(v)`` is taken at the entry's histogram bucket (so within ``alpha`` of ``v``)
and kept in fixed point (units of ``2^-20``) in int64: the sums are exact and merge by addition in any order.
Per stored entry fitting costs two table lookups (a cell's bucket of each small integer count is worked out once
per cell) and two increments, whatever ``dim`` is, in tables laid out so that one cell touches only a few rows (see
:func:`_accumulate`).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .encode import _splitmix64

FIXED_POINT = float(2**20)  # log1p values are accumulated as int64 multiples of 2^-20


class QuantileSketch:
    """Per-gene log-bucket histograms with relative accuracy ``alpha`` (see the module docstring).

    Args:
        n_genes: number of genes (rows of the counter table).
        relative_accuracy: ``alpha``; every quantile is returned within a factor ``1 +- alpha``.
        min_value, max_value: the range covered with that accuracy.
        counts: optional existing ``(n_buckets, n_genes)`` counters.

    The counters are laid out bucket-major, ``counts[bucket, gene]``: a cell's entries with the same count (and
    most counts are 1, 2 or 3) fall in the same bucket, so filling the table walks a few rows in gene order instead
    of jumping across a table of hundreds of MB.
    """

    def __init__(self, n_genes: int, relative_accuracy: float = 0.005, min_value: float = 1e-3,
                 max_value: float = 1e4, counts: np.ndarray | None = None):
        if not 0 < relative_accuracy < 1:
            raise ValueError(f"relative_accuracy must lie in (0, 1), got {relative_accuracy}")
        if not 0 < min_value < max_value:
            raise ValueError(f"need 0 < min_value < max_value, got {min_value}, {max_value}")
        self.relative_accuracy = float(relative_accuracy)
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.gamma = (1 + self.relative_accuracy) / (1 - self.relative_accuracy)
        self.inv_log_gamma = 1.0 / math.log(self.gamma)
        self.offset = math.ceil(math.log(self.min_value) * self.inv_log_gamma)
        self.n_buckets = math.ceil(math.log(self.max_value) * self.inv_log_gamma) - self.offset + 1
        if counts is None:
            counts = np.zeros((self.n_buckets, n_genes), dtype=np.uint32)
        if counts.shape != (self.n_buckets, n_genes):
            raise ValueError(f"counts has shape {counts.shape}, expected {(self.n_buckets, n_genes)}")
        self.counts = counts

    @property
    def params(self) -> dict:
        return {"relative_accuracy": self.relative_accuracy, "min_value": self.min_value,
                "max_value": self.max_value}

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    def bucket_index(self, values: np.ndarray) -> np.ndarray:
        """Bucket of each (positive) value, clamped to the table."""
        k = np.ceil(np.log(np.asarray(values, dtype=np.float64)) * self.inv_log_gamma).astype(np.int64)
        return np.clip(k - self.offset, 0, self.n_buckets - 1)

    def bucket_values(self) -> np.ndarray:
        """``(n_buckets,)`` the value each bucket reports (within ``alpha`` of everything in it)."""
        k = np.arange(self.n_buckets, dtype=np.float64) + self.offset
        return 2.0 * self.gamma**k / (self.gamma + 1.0)

    def add(self, genes: np.ndarray, values: np.ndarray) -> None:
        """Add observations ``values[i]`` of gene ``genes[i]`` (a plain numpy path; fitting uses a fused kernel)."""
        np.add.at(self.counts, (self.bucket_index(values), np.asarray(genes)), 1)

    def merge(self, other: QuantileSketch) -> None:
        """Add another sketch of the same genes and parameters into this one."""
        if other.params != self.params or other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge sketches with different parameters ({self.params} vs {other.params})")
        self.counts = add_counters(self.counts, other.counts)

    def totals(self) -> np.ndarray:
        """``(n_genes,)`` number of observations of each gene."""
        return self.summary(np.zeros(self.n_buckets, dtype=np.int64))[0]

    def summary(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One pass over the counters: per gene the number of observations, the sum of ``weights[bucket]`` over them
        (int64, exact), and the first and last non-empty bucket (``0, -1`` for genes never observed)."""
        return _column_summary(self.counts, np.ascontiguousarray(weights, dtype=np.int64))

    def quantile_at_rank(self, ranks: np.ndarray) -> np.ndarray:
        """Value of the ``ranks[g]``-th smallest observation (0-based) of each gene; NaN where the rank is missing."""
        return _values_at_rank(self.counts, np.asarray(ranks, dtype=np.int64), self.bucket_values())

    def quantile(self, q: float) -> np.ndarray:
        """Per-gene quantile ``q`` (lower value at rank ``floor(q * (n - 1))``); NaN for genes never observed."""
        n = self.totals()
        return self.quantile_at_rank(np.where(n > 0, np.floor(q * (n - 1)).astype(np.int64), -1))

    def medians(self, totals: np.ndarray | None = None) -> np.ndarray:
        """Per-gene median, as ``numpy.median`` (mean of the two middle values); NaN for genes never observed.
        ``totals`` (from :meth:`totals`) saves a pass over the counters."""
        n = self.totals() if totals is None else np.asarray(totals, dtype=np.int64)
        lower, upper = _values_at_ranks(self.counts, np.where(n > 0, (n - 1) // 2, -1),
                                        np.where(n > 0, n // 2, -1), self.bucket_values())
        return (lower + upper) / 2.0


def add_counters(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` for counter tables (uint16/32/64): at least uint32, widened to uint64 only when the sum could
    overflow. May reuse ``a``."""
    wide = np.uint64 if int(a.max(initial=0)) + int(b.max(initial=0)) >= 2**32 else np.uint32
    dtype = np.result_type(a.dtype, b.dtype, wide)
    if a.dtype != dtype:
        a = a.astype(dtype)
    if b.dtype == np.uint16 and a.dtype == np.uint32:
        _add_into(a, b.copy())  # numba add (numpy's mixed-type add is slow); the copy is zeroed, not b
    else:
        a += b
    return a


@numba.njit(cache=True, nogil=True)
def _values_at_rank(counts, ranks, bucket_values):
    """Per gene (column), the reported value of the bucket holding its ``ranks[g]``-th smallest observation."""
    n_buckets, n_genes = counts.shape
    out = np.full(n_genes, np.nan)
    seen = np.zeros(n_genes, dtype=np.int64)
    for b in range(n_buckets):  # row by row: the table is bucket-major
        for g in range(n_genes):
            r = ranks[g]
            if r >= 0 and seen[g] <= r:
                seen[g] += counts[b, g]
                if seen[g] > r:
                    out[g] = bucket_values[b]
    return out


@numba.njit(cache=True, nogil=True)
def _values_at_ranks(counts, lower, upper, bucket_values):
    """:func:`_values_at_rank` for two ranks per gene in one pass (``lower <= upper``)."""
    n_buckets, n_genes = counts.shape
    low_out = np.full(n_genes, np.nan)
    up_out = np.full(n_genes, np.nan)
    seen = np.zeros(n_genes, dtype=np.int64)
    for b in range(n_buckets):
        for g in range(n_genes):
            r = upper[g]
            if r >= 0 and seen[g] <= r:
                before = seen[g]
                seen[g] += counts[b, g]
                if seen[g] > r:
                    up_out[g] = bucket_values[b]
                if before <= lower[g] < seen[g]:
                    low_out[g] = bucket_values[b]
    return low_out, up_out


@numba.njit(cache=True, nogil=True)
def _column_summary(counts, weights):
    n_buckets, n_genes = counts.shape
    totals = np.zeros(n_genes, dtype=np.int64)
    weighted = np.zeros(n_genes, dtype=np.int64)
    first = np.zeros(n_genes, dtype=np.int64)
    last = np.full(n_genes, -1, dtype=np.int64)
    for b in range(n_buckets):
        w = weights[b]
        for g in range(n_genes):
            c = np.int64(counts[b, g])
            if c != 0:
                if totals[g] == 0:
                    first[g] = b
                last[g] = b
                totals[g] += c
                weighted[g] += c * w
    return totals, weighted, first, last


@numba.njit(cache=True, nogil=True)
def _gene_segments(counts, first, last):
    """Every gene's counters from its first to its last non-empty bucket, one gene after the other (a tiled
    transpose of the bucket-major table: the genes' runs are contiguous in the result)."""
    n_buckets, n_genes = counts.shape
    starts = np.zeros(n_genes + 1, dtype=np.int64)
    for g in range(n_genes):
        starts[g + 1] = starts[g] + max(last[g] - first[g] + 1, 0)
    out = np.empty(starts[n_genes], dtype=counts.dtype)
    tile = 16
    for g0 in range(0, n_genes, tile):
        g1 = min(g0 + tile, n_genes)
        lo, hi = n_buckets, -1
        for g in range(g0, g1):
            if last[g] >= first[g]:
                lo = min(lo, first[g])
                hi = max(hi, last[g])
        for b in range(lo, hi + 1):
            for g in range(g0, g1):
                if first[g] <= b <= last[g]:
                    out[starts[g] + b - first[g]] = counts[b, g]
    return out


@numba.njit(cache=True, nogil=True)
def _scatter_segments(counts, values, first, lengths):
    """The inverse of :func:`_gene_segments`: ``lengths[g]`` values per gene into ``counts[first[g]:, g]``."""
    pos = 0
    for g in range(counts.shape[1]):
        for r in range(lengths[g]):
            counts[first[g] + r, g] = values[pos + r]
        pos += lengths[g]


def _projection_base(seed: int) -> np.uint64:
    """One splitmix64 step of the seed (in plain Python: no compiled code needed for one number)."""
    mask = 0xFFFFFFFFFFFFFFFF
    z = ((seed ^ 0x5EED0F5EED) + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return np.uint64(z ^ (z >> 31))


@numba.njit(cache=True, inline="always")
def _cell_hash(key, base):
    """A cell's projection coordinate and sign (CountSketch): both from the hash of its key."""
    _, u = _splitmix64(base ^ key)
    return u >> np.uint64(1), (u & np.uint64(1)) == 1


@numba.njit(cache=True, nogil=True)
def _cell_hashes(keys, base, dim):
    coord = np.empty(keys.shape[0], dtype=np.int64)
    negative = np.empty(keys.shape[0], dtype=np.bool_)
    for i in range(keys.shape[0]):
        h, neg = _cell_hash(keys[i], base)
        coord[i] = np.int64(h % np.uint64(dim))
        negative[i] = neg
    return coord, negative


def cell_projection(keys: np.ndarray, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's CountSketch coordinate in ``[0, dim)`` and sign (True = -1), from its key (for references)."""
    return _cell_hashes(np.asarray(keys, dtype=np.uint64), _projection_base(seed), dim)


def profile_table(sketch: QuantileSketch) -> np.ndarray:
    """``(n_buckets,)`` int64 fixed-point ``log1p`` of each bucket's value: the profile value of an entry."""
    return np.rint(np.log1p(sketch.bucket_values()) * FIXED_POINT).astype(np.int64)


_LOG_TABLE = np.log(np.maximum(np.arange(4096, dtype=np.float64), 1.0))  # log of small integer counts
_SMALL_COUNTS = 32  # per cell, the bucket of every integer count below this is worked out once


@numba.njit(cache=True, nogil=True)
def _accumulate(indptr, indices, data, col_map, totals, keys, donor_codes, target_sum, inv_log_gamma, offset,
                low, high, proj, proj_base, donor_detected, sign_sum, profile, log_table):
    """Add a chunk of cells to 32-bit counters kept as two uint16 halves ``low`` and ``high`` (see
    :func:`combine_halves`); returns the number of cells used (``totals > 0``) and the number of counters that
    wrapped past 65,535. The layout :func:`accumulate_rows` fills, with the top byte of a 48-bit counter unused."""
    top = np.zeros(low.shape, dtype=np.uint8)
    touched = np.array([low.shape[0], -1, low.shape[0], -1, 0], dtype=np.int64)
    return accumulate_rows(indptr, indices, data, col_map, totals, keys, donor_codes, target_sum, inv_log_gamma,
                           offset, low, high, top, proj, proj_base, donor_detected, sign_sum, profile, log_table,
                           touched)


@numba.njit(cache=True, nogil=True)
def accumulate_rows(indptr, indices, data, col_map, totals, keys, donor_codes, target_sum, inv_log_gamma, offset,
                    low, mid, top, proj, proj_base, donor_detected, sign_sum, profile, log_table, touched):
    """Add a chunk of cells to the accumulators; returns the number of cells used (``totals > 0``) and the number of
    carries out of ``low``.

    Each histogram counter is split over three tables of the same shape: ``low`` (uint8 in fitting; its bytes are
    the only ones touched on most increments), ``mid`` (uint16, one increment per wrap of ``low``) and ``top``
    (uint8, one per wrap of ``mid``; may be empty when it cannot be reached). The counter is
    ``low + mid << bits(low) + top << (bits(low) + 16)``. A one-byte hot table is half the memory traffic of a
    two-byte one, which is what the increments cost (the rows a cell touches stay in cache); the pages of ``mid``
    are touched only where a counter passes 255 and those of ``top`` practically never, so memory stays flat as the
    corpus grows. ``touched`` is widened to ``[first, last]`` row written in ``low``, then in ``mid``, and counts the
    increments of ``top`` (``touched[4]``).

    ``indices`` are file columns mapped to genes through ``col_map`` (-1: not a corpus gene). The tables are laid
    out so that one cell touches few rows, in gene order: ``low[bucket, gene]`` (a cell's entries with the same count
    share a bucket) and ``proj[coordinate, gene]`` (a cell has one coordinate). A cell's bucket and signed profile
    value of every integer count below ``_SMALL_COUNTS`` (almost all entries of UMI data) are worked out once per
    cell with the same arithmetic as for any other value, so an entry costs two table lookups and two increments.
    Detection counts and profile sums are not accumulated: they follow from the histogram.
    """
    n_rows = indptr.shape[0] - 1
    n_buckets = low.shape[0]
    dim = proj.shape[0]
    low_mask = (1 << (8 * low.itemsize)) - 1
    used = 0
    carries = 0
    first, last = touched[0], touched[1]
    small_bucket = np.empty(_SMALL_COUNTS, dtype=np.int64)
    small_profile = np.empty(_SMALL_COUNTS, dtype=np.int64)
    # Cells are visited grouped by projection coordinate, then by library size: the row of ``proj`` a group adds to
    # stays in cache (in chunk order every cell would fetch a different row of a table of tens of MB, which costs
    # more than the histogram), and cells of similar size share histogram rows. Sums do not depend on the order.
    coords = np.zeros(n_rows, dtype=np.int64)
    negatives = np.zeros(n_rows, dtype=np.bool_)
    order_keys = np.zeros(n_rows, dtype=np.float64)
    for i in range(n_rows):
        if dim > 0:
            h, negatives[i] = _cell_hash(keys[i], proj_base)
            coords[i] = np.int64(h % np.uint64(dim))
        order_keys[i] = coords[i] * 1e12 + totals[i]
    for i in np.argsort(order_keys):
        total = totals[i]
        if total <= 0:
            continue
        used += 1
        log_scale = math.log(target_sum / total)
        coord = coords[i]
        negative = negatives[i]
        if dim > 0:
            sign_sum[coord] += -1 if negative else 1
        for x in range(1, _SMALL_COUNTS):
            b = min(max(np.int64(math.ceil((log_table[x] + log_scale) * inv_log_gamma)) - offset, 0), n_buckets - 1)
            small_bucket[x] = b
            small_profile[x] = -profile[b] if negative else profile[b]
        if indptr[i + 1] > indptr[i]:  # the buckets grow with the count: these bound every small count's bucket
            first = min(first, small_bucket[1])
            last = max(last, small_bucket[_SMALL_COUNTS - 1])
        donor = donor_codes[i]
        for j in range(indptr[i], indptr[i + 1]):
            x = data[j]
            g = col_map[indices[j]]
            if x <= 0 or g < 0:
                continue
            xi = np.int64(x)
            if xi < _SMALL_COUNTS and xi == x:
                b = small_bucket[xi]
                p = small_profile[xi]
            else:
                log_x = log_table[xi] if xi < log_table.shape[0] and xi == x else math.log(x)
                b = min(max(np.int64(math.ceil((log_x + log_scale) * inv_log_gamma)) - offset, 0), n_buckets - 1)
                p = -profile[b] if negative else profile[b]
                first = min(first, b)
                last = max(last, b)
            c = (np.int64(low[b, g]) + 1) & low_mask
            low[b, g] = c
            if c == 0:  # low wrapped: carry
                carries += 1
                touched[2] = min(touched[2], b)
                touched[3] = max(touched[3], b)
                c = (np.int64(mid[b, g]) + 1) & 0xFFFF
                mid[b, g] = c
                if c == 0:
                    top[b, g] += 1
                    touched[4] += 1
            if dim > 0:
                proj[coord, g] += p
            if donor >= 0:
                donor_detected[donor, g] = True
    touched[0], touched[1] = first, last
    return used, carries


@numba.njit(cache=True, nogil=True)
def _add_rows(out, part, first, last, g0, g1, shift):
    """``out[first:last + 1, g0:g1] += part[first:last + 1, g0:g1] << shift`` (counter tables)."""
    for b in range(first, last + 1):
        for g in range(g0, g1):
            out[b, g] += np.uint64(part[b, g]) << np.uint64(shift)


def combine_halves(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """uint32 counters from their uint16 low and high halves."""
    return low.astype(np.uint32) | (high.astype(np.uint32) << np.uint32(16))


@numba.njit(cache=True, nogil=True)
def _add_into(wide, narrow):
    """``wide += narrow; narrow[:] = 0`` for counter tables of the same shape (numpy's mixed-type add is slow)."""
    w = wide.reshape(-1)
    n = narrow.reshape(-1)
    for i in range(w.shape[0]):
        w[i] += n[i]
        n[i] = 0
