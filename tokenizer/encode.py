"""Rank-token encoding of a chunk of cells.

This is the one implementation of the per-cell encoding. Tokenization, Geneformer mode and the on-the-fly
re-tokenization of binomially split counts in pretraining (MCV) all call :func:`rank_encode`.

For each cell (a row of a CSR matrix whose column indices are vocabulary token ids, or are mapped to them through
``col_map``):

1. normalise every detected gene: ``v_g = x_g / total * target_sum / median_g``;
2. rank detected genes by ``v_g`` (as float32, the precision it is stored in, or as float64 for Geneformer's
   ranking) descending; ties go to the smaller token id, so the order is deterministic;
3. keep the top ``top_k``;
4. sample ``n_zeros`` genes among ``zero_candidates`` that have no count in this cell, without replacement, from a
   random stream seeded by the cell's own seed (so a cell encodes identically whatever chunk or worker it is in);
5. optionally prepend ``cls_id`` and append ``eos_id``.

The per-cell loop is compiled with numba: there is no Python-level loop over cells on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_DOUBLE_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@numba.njit(cache=True, inline="always")
def _splitmix64(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    """One step of splitmix64: returns (new_state, output). All arithmetic is uint64 and wraps."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return state, z ^ (z >> _S31)


@numba.njit(cache=True, nogil=True)
def _mix_seeds(seed: np.uint64, keys: np.ndarray) -> np.ndarray:
    out = np.empty(keys.shape[0], dtype=np.uint64)
    _, base = _splitmix64(seed)
    for i in range(keys.shape[0]):
        _, h = _splitmix64(base ^ keys[i])
        _, h = _splitmix64(h)
        out[i] = h
    return out


def mix_seeds(seed: int, keys: np.ndarray) -> np.ndarray:
    """Per-cell seeds from a global seed and per-cell integer keys (e.g. a cell's row in its file).

    Deterministic and independent of how cells are chunked: the same (seed, key) always gives the same seed.
    """
    return _mix_seeds(np.uint64(seed & 0xFFFFFFFFFFFFFFFF), np.ascontiguousarray(keys, dtype=np.uint64))


@dataclass
class RankTokens:
    """Ragged token arrays for a chunk of cells: cell ``i`` owns ``[offsets[i], offsets[i + 1])``."""

    input_ids: np.ndarray  # (n_tokens,) int32 token ids
    values: np.ndarray  # (n_tokens,) float32 normalised expression; 0 for sampled zeros and special tokens
    is_zero: np.ndarray  # (n_tokens,) int8, 1 for sampled zero-expressed genes
    offsets: np.ndarray  # (n_cells + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], self.values[lo:hi], self.is_zero[lo:hi]

    def to_lists(self) -> dict[str, list[np.ndarray]]:
        """Split into one array per cell (what a datasets/Arrow writer or a collator consumes)."""
        cuts = self.offsets[1:-1]
        return {
            "input_ids": np.split(self.input_ids, cuts),
            "values": np.split(self.values, cuts),
            "is_zero": np.split(self.is_zero, cuts),
        }


_S53 = np.uint64(53)  # a key's top 11 bits (sign, exponent and two mantissa bits of the value): its radix bucket
_S45 = np.uint64(45)  # the next 8 bits: the second-level digit for long runs
_N_BUCKETS = 2048


@numba.njit(cache=True, inline="always")
def _insertion_descending(a, lo, hi):
    """Sort ``a[lo:hi]`` in descending order (cheap on short or nearly sorted runs)."""
    for r in range(lo + 1, hi):
        key = a[r]
        q = r - 1
        while q >= lo and a[q] < key:
            a[q + 1] = a[q]
            q -= 1
        a[q + 1] = key


@numba.njit(cache=True, nogil=True)
def _sort_run(a, lo, hi, scratch, digits):
    """Sort ``a[lo:hi]`` (keys sharing their radix bucket) in descending order: short runs by insertion; long ones
    first by a counting sort on the next 8 bits, which leaves only equal-digit neighbours for the insertion pass."""
    if hi - lo > 24:
        digits[:] = 0
        for r in range(lo, hi):
            digits[255 - np.int64((a[r] >> _S45) & np.uint64(255))] += 1
        start = 0
        for d in range(256):
            c = digits[d]
            digits[d] = start
            start += c
        for r in range(lo, hi):
            d = 255 - np.int64((a[r] >> _S45) & np.uint64(255))
            scratch[digits[d]] = a[r]
            digits[d] += 1
        for r in range(hi - lo):
            a[lo + r] = scratch[r]
    _insertion_descending(a, lo, hi)


@numba.njit(cache=True, nogil=True)
def _top_keys(keys, m, k, hist, low, high, out, candidates, scratch, digits):
    """The ``k`` largest of ``keys[:m]`` in descending order, written to ``out[:k]``; returns ``n >= k``, the number
    of keys written to ``out``, all in descending order (the rest of the cut bucket follows the first ``k``).

    ``hist[low:high + 1]`` holds the number of keys per radix bucket (their top 11 bits). The bucket of the k-th
    largest key (the cut) follows from the counts; the keys in it or above are copied out without branches, placed
    bucket by bucket (largest first), and each run is sorted (:func:`_sort_run`); the first ``k`` are the answer.
    ``hist`` is left zeroed.
    """
    n = 0
    if k > 0:
        seen = 0
        cut = high
        while seen + hist[cut] < k:
            seen += hist[cut]
            cut -= 1
        if cut == low:  # every key is a candidate (k close to m)
            candidates = keys
            n = m
        else:
            cut_key = np.uint64(cut) << _S53
            for r in range(m):
                key = keys[r]
                candidates[n] = key
                n += 1 if key >= cut_key else 0
        start = 0
        for b in range(high, cut - 1, -1):  # bucket counts -> write cursors, largest bucket first
            c = hist[b]
            hist[b] = start
            start += c
        for r in range(n):
            key = candidates[r]
            b = np.int64(key >> _S53)
            out[hist[b]] = key
            hist[b] += 1
        start = 0
        for b in range(high, cut - 1, -1):  # the cursors now mark the ends of the runs
            _sort_run(out, start, hist[b], scratch, digits)  # every run starts before k: the cut bucket's does
            start = hist[b]
    for b in range(low, high + 1):
        hist[b] = 0
    return n


@numba.njit(cache=True, nogil=True)
def _order_near_ties(top, k, n, exact):
    """Put ``top[:k]`` in float64 order: ``top[:n]`` holds keys sorted by float32 value descending, then token id
    ascending; runs of keys with the same float32 value (equal counts of genes with equal or nearly equal medians)
    are reordered by their float64 value ``exact[token id]`` descending, ties keeping the smaller token id first.

    Rounding to float32 never reverses the order of two values, so only those runs can be out of float64 order. A run
    that crosses position ``k`` is ordered over its whole length (its keys beyond ``k`` follow in ``top[k:n]``), so
    the first ``k`` are the float64 top ``k``.
    """
    r = 0
    while r < k:
        value = top[r] >> _S32
        e = r + 1
        while e < n and (top[e] >> _S32) == value:
            e += 1
        for a in range(r + 1, e):  # insertion sort, stable: equal float64 values keep ascending token ids
            key = top[a]
            v = exact[np.int64(_LOW32 - (key & _LOW32))]
            q = a - 1
            while q >= r and exact[np.int64(_LOW32 - (top[q] & _LOW32))] < v:
                top[q + 1] = top[q]
                q -= 1
            top[q + 1] = key
        r = e


@numba.njit(cache=True, nogil=True)
def _encode(
    indptr, indices, data, col_map, totals, medians, cell_seeds, candidates, candidate_mask,
    top_k, n_zeros, cls_id, eos_id, target_sum, offsets, out_ids, out_values, out_zero, rank64, detected, dense,
):
    """Encode every cell into the flat outputs (cell ``i`` ends up in ``[offsets[i], offsets[i + 1])``); ``detected[i]``
    gets the number of the cell's detected genes.

    Per cell, a first pass works out every detected gene's token id and float32 value ``v`` (``dense``: every stored
    value is positive; as long as every column met also maps to a token id, there is nothing to skip and the loops
    vectorise; after the first row with an unmapped column, entries are checked one by one); a second
    builds a uint64 key per gene (the float32 bits of ``v``, monotonic for ``v > 0``, in the high word; the
    complemented token id in the low word, so "key descending" means "v descending, then token id ascending") and
    counts the keys per radix bucket; with zero sampling, a third marks the genes and counts the detected
    zero-sampling candidates.
    :func:`_top_keys` then picks and sorts the winners. With ``rank64`` (Geneformer's ranking) ``v`` is computed in
    float64 as Geneformer does, its float32 rounding makes the key, and :func:`_order_near_ties` puts the genes whose
    float32 values are equal into their float64 order (the same result as sorting the float64 values, at the cost of
    the float32 sort).
    """
    n_cells = indptr.shape[0] - 1
    vocab_size = candidate_mask.shape[0]
    # taken[g] == stamp: gene g is detected in (or already sampled for) the current cell. Stamps change from cell to
    # cell, so the scratch needs no clearing between cells.
    taken = np.zeros(vocab_size, dtype=np.int64)
    n_cand = candidates.shape[0]
    max_nnz = 0
    for i in range(n_cells):
        max_nnz = max(max_nnz, indptr[i + 1] - indptr[i])
    keys = np.empty(max_nnz, dtype=np.uint64)
    top = np.empty(max_nnz, dtype=np.uint64)
    chosen = np.empty(max_nnz, dtype=np.uint64)
    scratch = np.empty(max_nnz, dtype=np.uint64)
    digits = np.zeros(256, dtype=np.int64)
    ids = np.empty(max_nnz, dtype=np.int64)
    values = np.empty(max_nnz, dtype=np.float32)
    value_bits = values.view(np.uint32)
    hist = np.zeros(_N_BUCKETS, dtype=np.int64)
    exact = np.zeros(vocab_size if rank64 else 0, dtype=np.float64)  # rank64: each detected gene's float64 value
    one = np.zeros(1, dtype=np.float32)
    one_bits = one.view(np.uint32)  # reinterpret float32 <-> uint32 through a one-element buffer
    pos = 0
    for i in range(n_cells):
        offsets[i] = pos
        if cls_id >= 0:
            out_ids[pos] = cls_id
            out_values[pos] = 0.0
            out_zero[pos] = 0
            pos += 1
        lo, hi = indptr[i], indptr[i + 1]
        start = pos
        stamp = i + 1
        n_free = n_cand
        total = totals[i]
        scale = target_sum / total if hi > lo else 0.0
        mapped = dense
        if dense:
            m = hi - lo
            for r in range(m):
                g = col_map[indices[lo + r]]
                ids[r] = g
                mapped &= g >= 0
            if mapped and rank64:
                for r in range(m):
                    g = ids[r]
                    v = data[lo + r] / total * target_sum / medians[g]  # Geneformer's order of operations
                    exact[g] = v
                    values[r] = np.float32(v)
            elif mapped:
                for r in range(m):
                    values[r] = np.float32(data[lo + r] * scale / medians[ids[r]])
            else:  # a column outside the vocabulary: skip entries from here on
                dense = False
        if not mapped:
            m = 0
            for j in range(lo, hi):
                g = col_map[indices[j]]
                if data[j] > 0 and g >= 0:
                    if rank64:
                        v = data[j] / total * target_sum / medians[g]
                        exact[g] = v
                        values[m] = np.float32(v)
                    else:
                        values[m] = np.float32(data[j] * scale / medians[g])
                    ids[m] = g
                    m += 1
        low, high = _N_BUCKETS, -1
        for r in range(m):
            key = (np.uint64(value_bits[r]) << _S32) | (_LOW32 - np.uint64(ids[r]))
            keys[r] = key
            b = np.int64(key >> _S53)
            hist[b] += 1
            low = min(low, b)
            high = max(high, b)
        if n_zeros > 0:  # the zero sampling draws around the detected genes
            for r in range(m):
                taken[ids[r]] = stamp
                n_free -= candidate_mask[ids[r]]
        k = min(top_k, m)
        n = _top_keys(keys, m, k, hist, low, high, top, chosen, scratch, digits)
        if rank64:
            _order_near_ties(top, k, n, exact)
        for r in range(k):
            key = top[r]
            out_ids[pos] = np.int64(_LOW32 - (key & _LOW32))
            one_bits[0] = np.uint32(key >> _S32)
            out_values[pos] = one[0]
            pos += 1
        detected[i] = m
        for p in range(start, pos):
            out_zero[p] = 0
        # sample zero-expressed candidates without replacement
        if n_zeros > 0:
            z = min(n_zeros, n_free)
            state = cell_seeds[i]
            if 2 * z <= n_free:
                # rejection sampling: cheap when most candidates are free
                got = 0
                while got < z:
                    state, u = _splitmix64(state)
                    c = candidates[np.int64((u >> _S11) * _DOUBLE_UNIT * n_cand)]
                    if taken[c] != stamp:
                        taken[c] = stamp
                        out_ids[pos] = c
                        out_values[pos] = 0.0
                        out_zero[pos] = 1
                        pos += 1
                        got += 1
            else:
                # few free candidates: partial Fisher-Yates over the free list
                free = np.empty(n_free, dtype=np.int64)
                f = 0
                for r in range(n_cand):
                    if taken[candidates[r]] != stamp:
                        free[f] = candidates[r]
                        f += 1
                for r in range(z):
                    state, u = _splitmix64(state)
                    s = r + np.int64((u >> _S11) * _DOUBLE_UNIT * (n_free - r))
                    tmp = free[r]
                    free[r] = free[s]
                    free[s] = tmp
                    out_ids[pos] = free[r]
                    out_values[pos] = 0.0
                    out_zero[pos] = 1
                    pos += 1
        if eos_id >= 0:
            out_ids[pos] = eos_id
            out_values[pos] = 0.0
            out_zero[pos] = 0
            pos += 1
    offsets[n_cells] = pos


class OutputBuffers:
    """The token arrays of :func:`encode_chunk`, kept from one call to the next: a chunk's tokens then land in memory
    already mapped and in the caches, instead of fresh pages the kernel has to fault in and zero for every chunk. The
    tokens a call returns are views into these arrays, valid until the next call with the same buffers."""

    def __init__(self) -> None:
        self._arrays = (np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int8))

    def take(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, values, is_zero)`` of ``size`` entries each (grown by a quarter more than asked when too small)."""
        if len(self._arrays[0]) < size:
            grown = int(size * 1.25)
            self._arrays = tuple(np.empty(grown, dtype=a.dtype) for a in self._arrays)
        return tuple(a[:size] for a in self._arrays)


def _native(array: np.ndarray, allowed: tuple, fallback) -> np.ndarray:
    """``array`` as a contiguous array of an allowed dtype (no copy when it already is one)."""
    array = np.asarray(array)
    dtype = array.dtype if array.dtype in allowed else fallback
    return np.ascontiguousarray(array, dtype=dtype)


_INDEX_TYPES = (np.dtype(np.int32), np.dtype(np.int64))
_DATA_TYPES = (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float64))


def rank_encode(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    totals: np.ndarray,
    medians: np.ndarray,
    *,
    top_k: int,
    n_zeros: int = 0,
    zero_candidates: np.ndarray | None = None,
    cell_seeds: np.ndarray | None = None,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = 10_000.0,
    rank_dtype: type = np.float32,
    col_map: np.ndarray | None = None,
) -> RankTokens:
    """Encode a CSR chunk of cells as rank tokens.

    Args:
        indptr, indices, data: the chunk in CSR form; ``indices`` are vocabulary token ids (genes outside the
            vocabulary already removed), ``data`` raw counts (entries <= 0 are ignored). int32 / float32 arrays are
            used as they are (no copy).
        totals: ``(n_cells,)`` library size of each cell over *all* its genes, in or out of the vocabulary.
        medians: ``(vocab_size,)`` normalisation factor per token id (the gene's non-zero median); must be > 0
            wherever a token id occurs in ``indices``.
        top_k: how many detected genes to keep per cell, highest normalised value first.
        n_zeros: how many zero-count genes to sample per cell (fewer if the cell has fewer free candidates).
        zero_candidates: token ids eligible as sampled zeros (e.g. all vocabulary genes measured in this file).
        cell_seeds: ``(n_cells,)`` uint64 seed per cell (see :func:`mix_seeds`); required when ``n_zeros > 0``.
        cls_id, eos_id: optional special tokens placed first / last.
        target_sum: the library size cells are scaled to before dividing by the median (10,000 as Geneformer).
        rank_dtype: the precision values are ranked in: ``np.float32`` (default; the precision ``values`` are stored
            in, so the stored values are non-increasing) or ``np.float64`` (Geneformer's own ranking: genes whose
            values differ only beyond float32 precision keep their float64 order).
        col_map: optional ``(n_columns,)`` map from ``indices`` (e.g. a file's own columns) to token ids, ``-1`` for
            columns to skip; lets a raw chunk be encoded without first copying it into token ids. Each row must then
            map to distinct token ids.

    Returns:
        :class:`RankTokens` holding ``<cls>``, the ranked detected genes, the sampled zeros and ``<eos>`` per cell.
    """
    return encode_chunk(indptr, indices, data, totals, medians, top_k=top_k, n_zeros=n_zeros,
                        zero_candidates=zero_candidates, cell_seeds=cell_seeds, cls_id=cls_id, eos_id=eos_id,
                        target_sum=target_sum, rank_dtype=rank_dtype, col_map=col_map)[0]


@numba.njit(cache=True, nogil=True)
def _all_positive(a):
    """Whether every value is > 0 (False for NaN)."""
    ok = True
    for v in a:
        ok &= v > 0
    return ok


@numba.njit(cache=True, nogil=True)
def _bounds(a):
    """``(min, max)`` of a non-empty integer array in one pass."""
    lo = a[0]
    hi = a[0]
    for v in a:
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


def encode_chunk(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    totals: np.ndarray,
    medians: np.ndarray,
    *,
    top_k: int,
    n_zeros: int = 0,
    zero_candidates: np.ndarray | None = None,
    cell_seeds: np.ndarray | None = None,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = 10_000.0,
    rank_dtype: type = np.float32,
    col_map: np.ndarray | None = None,
    indices_checked: bool = False,
    positive: bool | None = None,
    buffers: OutputBuffers | None = None,
) -> tuple[RankTokens, np.ndarray]:
    """:func:`rank_encode`, also returning each cell's number of detected genes (int64), so that a caller can drop
    cells without any (whose encoding holds only special tokens and sampled zeros). A caller that has already
    checked that every index lies within ``col_map`` (``indices_checked``) and whether every value is positive
    (``positive``) saves those passes over the chunk; one that is done with a chunk's tokens before it encodes the
    next can pass the same :class:`OutputBuffers` to every call."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = _native(indices, _INDEX_TYPES, np.int64)
    data = _native(data, _DATA_TYPES, np.float64)
    totals = np.ascontiguousarray(totals, dtype=np.float64)
    medians = np.ascontiguousarray(medians, dtype=np.float64)
    n_cells = len(indptr) - 1
    if totals.shape != (n_cells,):
        raise ValueError(f"totals has shape {totals.shape}, expected ({n_cells},)")
    if top_k < 0 or n_zeros < 0:
        raise ValueError(f"top_k and n_zeros must be >= 0, got {top_k} and {n_zeros}")
    if n_cells and np.any(totals[np.diff(indptr) > 0] <= 0):
        raise ValueError("every cell with detected genes needs a positive total count")
    vocab_size = len(medians)
    low, high = _bounds(indices) if len(indices) and not (indices_checked and col_map is not None) else (0, -1)
    if col_map is None:
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got range [{low}, {high}]")
        col_map = np.arange(max(vocab_size, 1), dtype=np.int64)
    else:
        col_map = np.ascontiguousarray(col_map, dtype=np.int64)
        if low < 0 or high >= len(col_map):
            raise ValueError(f"indices must lie in [0, {len(col_map)}) (the length of col_map)")
        if len(col_map) and (col_map.min() < -1 or col_map.max() >= vocab_size):
            raise ValueError(f"col_map values must lie in [-1, {vocab_size})")
    if n_zeros > 0:
        if zero_candidates is None or cell_seeds is None:
            raise ValueError("n_zeros > 0 needs zero_candidates and cell_seeds")
        candidates = np.asarray(zero_candidates, dtype=np.int64)
        if len(candidates) > 1 and not np.all(candidates[1:] > candidates[:-1]):  # usually sorted already
            candidates = np.unique(candidates)
        seeds = np.ascontiguousarray(cell_seeds, dtype=np.uint64)
        if seeds.shape != (n_cells,):
            raise ValueError(f"cell_seeds has shape {seeds.shape}, expected ({n_cells},)")
    else:
        candidates = np.zeros(0, dtype=np.int64)
        seeds = np.zeros(n_cells, dtype=np.uint64)
    candidate_mask = np.zeros(vocab_size, dtype=np.bool_)
    candidate_mask[candidates] = True

    if np.dtype(rank_dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"rank_dtype must be float32 or float64, got {rank_dtype}")
    # outputs sized for the longest possible encoding, then trimmed: no separate pass to count the lengths
    n_extra = int(cls_id is not None) + int(eos_id is not None)
    bound = int(np.minimum(np.diff(indptr), top_k).sum()) + n_cells * (min(n_zeros, len(candidates)) + n_extra)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    out_ids, out_values, out_zero = (buffers or OutputBuffers()).take(bound)
    detected = np.zeros(n_cells, dtype=np.int64)
    _encode(
        indptr, indices, data, col_map, totals, medians, seeds, candidates, candidate_mask, int(top_k), int(n_zeros),
        -1 if cls_id is None else int(cls_id), -1 if eos_id is None else int(eos_id), float(target_sum),
        offsets, out_ids, out_values, out_zero, np.dtype(rank_dtype) == np.dtype(np.float64), detected,
        bool(_all_positive(data)) if positive is None else bool(positive),
    )
    n_tokens = int(offsets[-1])
    out_ids, out_values, out_zero = out_ids[:n_tokens], out_values[:n_tokens], out_zero[:n_tokens]
    return RankTokens(out_ids, out_values, out_zero, offsets), detected


def encode_count_rows(
    counts_ids: list[np.ndarray],
    counts: list[np.ndarray],
    totals: np.ndarray,
    medians: np.ndarray,
    **kwargs,
) -> RankTokens:
    """:func:`rank_encode` for cells given as ragged rows (token ids and counts per cell), e.g. a dataset's kept
    counts after a binomial split (MCV). ``kwargs`` are those of :func:`rank_encode`."""
    lengths = np.fromiter((len(r) for r in counts_ids), dtype=np.int64, count=len(counts_ids))
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(counts_ids) if len(counts_ids) else np.zeros(0, dtype=np.int64)
    data = np.concatenate(counts) if len(counts) else np.zeros(0)
    return rank_encode(indptr, indices, data, np.asarray(totals, dtype=np.float64), medians, **kwargs)
