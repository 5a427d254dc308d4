"""Corpus statistics (``express-tokenize fit`` / ``merge``): per-gene medians, detection, zero fractions, hierarchy.

Fitting streams every input in row chunks (:mod:`tokenizer.io`) and fills a :class:`FitState` of mergeable
accumulators (:mod:`tokenizer.sketch`): per gene a quantile sketch of ``counts / total * 10_000`` over the cells that
detect it, the number of such cells, the number of cells in files that measure the gene, a fixed-point projection
sketch for the hierarchy and, with a donor column, which donors detect and measure it. Worker processes each fill a
state over their share of row blocks; states add up exactly, so ``--num_workers``, ``--shard`` and ``merge`` of
separately fitted shards all give the one-pass result. The state is saved as ``sketch.npz`` (plain arrays, no
pickles) beside the vocabulary.

:func:`finalize_statistics` turns a state into a :class:`~tokenizer.vocab.GeneVocab`: genes detected in at least
``min_cells`` cells, in gene-id order, with their statistics and a hierarchy from a user TSV or derived from the corpus.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CorruptFileError, InputError
from .hierarchy import derive_hierarchy, parse_n_groups, prefetch_hierarchy_imports, read_hierarchy_tsv
from .io import (
    CountSource,
    SourcePlan,
    column_map,
    duplicated_targets,
    file_key,
    cell_keys,
    iter_chunks,
    load_gene_map,
    open_source,
    read_gene_columns,
    read_obs_totals,
)
from .output import staged_dir
from .parallel import block_size
from .sketch import (
    _LOG_TABLE,
    FIXED_POINT,
    QuantileSketch,
    _add_rows,
    _gene_segments,
    _projection_base,
    _scatter_segments,
    accumulate_rows,
    profile_table,
)
from .vocab import SPECIAL_TOKENS, GeneVocab

logger = logging.getLogger(__name__)

SKETCH_FILE = "sketch.npz"
STATE_VERSION = 1
# Parameters two states must share to be merged (they define what the accumulators mean).
_MERGE_KEYS = ("target_sum", "relative_accuracy", "min_value", "max_value", "sketch_dim", "seed", "donor_key")


@dataclass
class FitState:
    """Mergeable per-gene accumulators over a set of cells (see the module docstring)."""

    gene_ids: np.ndarray  # (n,) str, sorted
    gene_symbols: np.ndarray  # (n,) str, '' where unknown
    sketch: QuantileSketch
    n_measured: np.ndarray  # (n,) int64 cells in files whose matrix has the gene
    proj: np.ndarray  # (dim, n) int64 projection sums, fixed point (one row per coordinate: cache-friendly updates)
    proj_sum: np.ndarray  # (dim, n) int64 sum of the cells' signs per coordinate over measuring cells
    donors: np.ndarray  # (n_donors,) str
    donor_detected: np.ndarray  # (n_donors, n) bool
    donor_measured: np.ndarray  # (n_donors, n) bool
    config: dict
    inputs: list[dict] = field(default_factory=list)

    @classmethod
    def empty(cls, gene_ids: np.ndarray, config: dict, gene_symbols: np.ndarray | None = None) -> FitState:
        n, dim = len(gene_ids), int(config["sketch_dim"])
        sketch = QuantileSketch(n, config["relative_accuracy"], config["min_value"], config["max_value"])
        return cls(
            gene_ids=np.asarray(gene_ids, dtype=str),
            gene_symbols=np.asarray(gene_symbols if gene_symbols is not None else [""] * n, dtype=str),
            sketch=sketch,
            n_measured=np.zeros(n, dtype=np.int64),
            proj=np.zeros((dim, n), dtype=np.int64),
            proj_sum=np.zeros((dim, n), dtype=np.int64),
            donors=np.zeros(0, dtype=str),
            donor_detected=np.zeros((0, n), dtype=bool),
            donor_measured=np.zeros((0, n), dtype=bool),
            config=dict(config),
        )

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)

    @property
    def n_cells(self) -> np.ndarray:
        """``(n,)`` int64 cells detecting each gene (the histogram's row sums)."""
        return self.sketch.totals()

    @property
    def sum_log(self) -> np.ndarray:
        """``(n,)`` int64 sum of the profile values (fixed-point log1p) over the cells detecting each gene: each
        entry's profile value is a function of its bucket, so this follows from the histogram exactly."""
        return self.sketch.summary(profile_table(self.sketch))[1]

    @property
    def cells_used(self) -> int:
        return int(sum(i.get("cells_used", 0) for i in self.inputs))

    def add_donors(self, names: Sequence[str]) -> np.ndarray:
        """Register donor names; return their row in the donor tables."""
        known = {d: i for i, d in enumerate(self.donors.tolist())}
        new = [d for d in dict.fromkeys(names) if d not in known]
        if new:
            self.donors = np.concatenate([self.donors, np.asarray(new, dtype=str)])
            pad = np.zeros((len(new), self.n_genes), dtype=bool)
            self.donor_detected = np.vstack([self.donor_detected, pad])
            self.donor_measured = np.vstack([self.donor_measured, pad])
            known.update({d: len(known) + i for i, d in enumerate(new)})
        return np.array([known[d] for d in names], dtype=np.int64)

    # --- merging ---------------------------------------------------------------------------------------------------
    def merge(self, other: FitState) -> FitState:
        """The state of both sets of cells (genes and donors aligned by name). ``self`` is updated and returned."""
        for key in _MERGE_KEYS:
            if self.config.get(key) != other.config.get(key):
                raise InputError(f"cannot merge statistics fitted with different {key} "
                                 f"({self.config.get(key)!r} vs {other.config.get(key)!r})")
        if not np.array_equal(self.gene_ids, other.gene_ids):
            genes = np.union1d(self.gene_ids, other.gene_ids)
            self._reindex(genes)
            other = _copy_reindexed(other, genes)
        self.gene_symbols = _merge_symbols(self.gene_symbols, other.gene_symbols)
        self.sketch.merge(other.sketch)
        self.n_measured += other.n_measured
        self.proj += other.proj
        self.proj_sum += other.proj_sum
        rows = self.add_donors(other.donors.tolist())
        self.donor_detected[rows] |= other.donor_detected
        self.donor_measured[rows] |= other.donor_measured
        self.inputs = _merge_inputs(self.inputs, other.inputs)
        return self

    def _reindex(self, genes: np.ndarray) -> None:
        new = _copy_reindexed(self, genes)
        self.__dict__.update(new.__dict__)

    def canonical(self) -> FitState:
        """Donors in sorted order, so equal sets of cells give identical states whatever the merge order."""
        order = np.argsort(self.donors, kind="stable")
        self.donors = self.donors[order]
        self.donor_detected = self.donor_detected[order]
        self.donor_measured = self.donor_measured[order]
        return self

    # --- persistence -----------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``sketch.npz``: plain arrays (no pickles), each gene's histogram stored from its first to its last
        non-empty bucket in the narrowest unsigned type that holds its counters, zlib level 1 (fast)."""
        _, _, first, last = self.sketch.summary(np.zeros(self.sketch.n_buckets, dtype=np.int64))
        lengths = last - first + 1
        values = _gene_segments(self.sketch.counts, first, last)
        if values.size:
            top = int(values.max())
            values = values.astype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                                        if top <= np.iinfo(t).max), copy=False)
        meta = {"version": STATE_VERSION, "config": self.config, "inputs": self.inputs}
        _write_npz(
            Path(directory) / SKETCH_FILE,
            gene_ids=self.gene_ids, gene_symbols=self.gene_symbols,
            hist_first=first.astype(np.int32), hist_length=lengths.astype(np.int32), hist_values=values,
            n_measured=self.n_measured,
            proj=self.proj, proj_sum=_narrow(self.proj_sum), donors=self.donors,
            donor_detected=np.packbits(self.donor_detected, axis=1) if self.donor_detected.size else
            np.zeros((len(self.donors), 0), dtype=np.uint8),
            donor_measured=np.packbits(self.donor_measured, axis=1) if self.donor_measured.size else
            np.zeros((len(self.donors), 0), dtype=np.uint8),
            meta=np.array(json.dumps(meta)),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FitState:
        path = Path(directory) / SKETCH_FILE
        if not path.is_file():
            raise InputError(f"{directory} holds no {SKETCH_FILE}; merge needs folders written by "
                             "`express-tokenize fit`")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays["meta"]))
        except (OSError, ValueError, KeyError) as err:
            raise CorruptFileError(f"{path} is not a readable statistics sketch ({err})") from None
        if meta.get("version") != STATE_VERSION:
            raise CorruptFileError(f"{path} has sketch format version {meta.get('version')}, expected {STATE_VERSION}")
        n = len(arrays["gene_ids"])
        state = cls.empty(arrays["gene_ids"], meta["config"], arrays["gene_symbols"])
        values = arrays["hist_values"]
        wide = np.uint64 if values.dtype == np.uint64 else np.uint32
        first, lengths = arrays["hist_first"].astype(np.int64), arrays["hist_length"].astype(np.int64)
        if len(first) != n or len(lengths) != n or lengths.min(initial=0) < 0 or lengths.sum() != len(values) or \
                ((lengths > 0) & ((first < 0) | (first + lengths > state.sketch.n_buckets))).any():
            raise CorruptFileError(f"{path}: the histogram segments do not fit the sketch")
        counts = np.zeros((state.sketch.n_buckets, n), dtype=wide)  # bucket-major
        _scatter_segments(counts, values.astype(wide, copy=False), first, lengths)
        state.sketch.counts = counts
        for name in ("n_measured", "proj", "proj_sum"):
            setattr(state, name, arrays[name].astype(np.int64))
        state.donors = arrays["donors"].astype(str)
        for name in ("donor_detected", "donor_measured"):
            packed = arrays[name]
            setattr(state, name, np.unpackbits(packed, axis=1, count=n).astype(bool) if packed.size else
                    np.zeros((len(state.donors), n), dtype=bool))
        state.inputs = meta["inputs"]
        return state


def _narrow(a: np.ndarray) -> np.ndarray:
    """int64 -> int32 when the values fit (the signs' sums are small)."""
    if a.size == 0 or (a.min() >= -(2**31) and a.max() < 2**31):
        return a.astype(np.int32)
    return a


def _write_npz(path: Path, *, stored: tuple[str, ...] = ("proj",), **arrays: np.ndarray) -> None:
    """An ``.npz`` (``np.load`` reads it) with zlib level 1, several times faster than ``np.savez_compressed``'s
    level 6 and nearly as small; arrays named in ``stored`` (high-entropy ones) are not compressed at all."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            archive.compression = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _copy_reindexed(state: FitState, genes: np.ndarray) -> FitState:
    pos = pd.Index(genes).get_indexer(pd.Index(state.gene_ids))
    new = FitState.empty(genes, state.config)
    symbols = np.full(len(genes), "", dtype=object)
    symbols[pos] = state.gene_symbols
    new.gene_symbols = symbols.astype(str)
    new.sketch.counts = np.zeros((state.sketch.n_buckets, len(genes)), dtype=state.sketch.counts.dtype)
    new.sketch.counts[:, pos] = state.sketch.counts
    new.n_measured[pos] = state.n_measured
    new.proj[:, pos] = state.proj
    new.proj_sum[:, pos] = state.proj_sum
    new.donors = state.donors.copy()
    new.donor_detected = np.zeros((len(state.donors), len(genes)), dtype=bool)
    new.donor_detected[:, pos] = state.donor_detected
    new.donor_measured = np.zeros((len(state.donors), len(genes)), dtype=bool)
    new.donor_measured[:, pos] = state.donor_measured
    new.inputs = list(state.inputs)
    return new


def _merge_symbols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per gene the smallest non-empty symbol (an order-independent choice)."""
    a, b = a.astype(object), b.astype(object)
    pick_b = (a == "") | ((b != "") & (b < a))
    return np.where(pick_b, b, a).astype(str)


def _merge_inputs(a: list[dict], b: list[dict]) -> list[dict]:
    """Concatenate input summaries; different row shards of one file (``--shard``) add up into one entry."""
    out = [dict(i) for i in a]
    for item in b:
        same = [o for o in out if o["path"] == item["path"]]
        shards = [s for o in same for s in o.get("shards", [])]
        if same and item.get("shards") and shards and not set(shards) & set(item["shards"]):
            target = same[0]
            for k in ("cells_used", "cells_skipped_zero_counts"):
                target[k] = target.get(k, 0) + item.get(k, 0)
            target["shards"] = sorted(set(shards) | set(item["shards"]))
            continue
        if same:
            logger.warning("%s appears in more than one merged folder; its cells are counted more than once",
                           item["path"])
        out.append(dict(item))
    return out


# --- fitting ----------------------------------------------------------------------------------------------------------
@dataclass
class _FitJob:
    """Everything a worker needs (picklable)."""

    inputs: list  # paths (str) or in-memory AnnData objects
    units: list[tuple[int, int, int]]  # (input index, first row, end row)
    gene_ids: np.ndarray
    config: dict
    gene_map: dict | None
    chunk_size: int
    slot: int | None = None  # the worker's tables in _SHARED_TABLES (forked workers), or None: its own


class _Tables:
    """The big tables one worker fills: the low bytes and middle 16 bits of the histogram counters (see
    :func:`~tokenizer.sketch.accumulate_rows`) and the projection sums.

    Forked workers fill tables in memory shared with the parent (anonymous shared mappings made before the fork),
    so nothing big is pickled back; otherwise they are private arrays, returned with the results. Only the
    histogram rows a worker wrote to are read back (reading an untouched shared page would allocate it).
    """

    def __init__(self, n_buckets: int, n_genes: int, dim: int, shared: bool):
        self.low = _zeros((n_buckets, n_genes), np.uint8, shared)
        self.mid = _zeros((n_buckets, n_genes), np.uint16, shared)
        self.proj = _zeros((dim, n_genes), np.int64, shared)


def _zeros(shape: tuple[int, ...], dtype, shared: bool) -> np.ndarray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not shared or size == 0:
        return np.zeros(shape, dtype=dtype)
    import mmap

    buffer = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)  # zero-filled, pages made on first use
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


_SHARED_TABLES: list[_Tables] | None = None  # set by the parent just before forking workers


@dataclass
class _FitPart:
    """What one worker sends back: per-input summaries and the small tables (the big ones travel only when they are
    not shared)."""

    tables: _Tables | None  # None: in _SHARED_TABLES[slot]
    slot: int | None
    rows: tuple[int, int, int, int]  # first and last row written to in the low, then the middle table
    top: tuple[np.ndarray, np.ndarray]  # flat positions and values of the counters' non-zero top bytes
    measured: dict[int, np.ndarray]  # per input: the positions of the genes its matrix has
    pending: dict[int, list]  # per input: cells used and the per-coordinate sum of their projection signs
    per_input: dict[int, dict]  # per input: cells used and skipped
    donors: np.ndarray
    donor_detected: np.ndarray
    donor_measured: np.ndarray


def _fit_units(job: _FitJob, report: Callable[[int], None], warmup: bool = False) -> _FitPart | None:
    """Accumulate the job's row blocks into fresh tables. ``warmup`` only runs the kernels once on the job's cells
    (loading them before workers fork) without keeping anything."""
    cfg = job.config
    state = FitState.empty(job.gene_ids, {**cfg, "sketch_dim": 0})  # donors and sketch parameters; no big tables
    sketch = state.sketch
    target = pd.Index(job.gene_ids)
    proj_base = _projection_base(int(cfg["seed"]))
    dim = int(cfg["sketch_dim"])
    sign_sum = np.zeros(dim, dtype=np.int64)
    profile = profile_table(sketch)
    shared = job.slot is not None and _SHARED_TABLES is not None
    tables = _SHARED_TABLES[job.slot] if shared else _Tables(sketch.n_buckets, len(job.gene_ids), dim, False)
    # 32-bit counters in three parts: the hot low byte is a quarter of the memory traffic of uint32 (the rows a
    # cell touches stay in cache), the middle 16 bits are touched only where a counter passes 255, the top byte
    # practically never (memory stays flat as the corpus grows).
    low, mid, proj = tables.low, tables.mid, tables.proj
    top = np.zeros(low.shape, dtype=np.uint8)
    touched = np.array([sketch.n_buckets, -1, sketch.n_buckets, -1, 0], dtype=np.int64)
    opened: dict[int, tuple] = {}
    pending: dict[int, list] = {}
    per_input: dict[int, dict] = {}
    try:
        for index, start, stop in job.units:
            if index not in opened:
                source = open_source(job.inputs[index], layer=cfg["layer"])
                genes = read_gene_columns(source, gene_id_key=cfg["gene_id_key"], gene_map=job.gene_map)
                col_map = column_map(genes.ids, target)
                merge = len(duplicated_targets(col_map)) > 0
                totals = read_obs_totals(source, cfg["total_counts_key"]) if cfg["total_counts_key"] else None
                plan = SourcePlan(col_map, merge, len(target), totals, cfg["allow_non_integer"])
                measured = np.unique(col_map[col_map >= 0])
                if cfg["donor_key"]:
                    names = source.require_obs(cfg["donor_key"]).astype(object)
                    missing = names.isna().to_numpy()
                    names = names.astype(str).to_numpy()
                    codes = state.add_donors(names.tolist())
                    codes[missing] = -1
                else:
                    codes = np.full(source.n_obs, -1, dtype=np.int64)
                opened[index] = (source, plan, genes.labels, measured, codes, file_key(source.name))
                pending[index] = [0, np.zeros_like(sign_sum)]
            source, plan, labels, measured, codes, key = opened[index]
            summary = per_input.setdefault(index, {"cells_used": 0, "cells_skipped_zero_counts": 0})
            for chunk in iter_chunks(source, plan, start, stop, job.chunk_size, labels, remap=plan.merge):
                sign_sum[:] = 0
                chunk_codes = codes[chunk.start:chunk.start + chunk.n_rows]
                used, _ = accumulate_rows(
                    chunk.indptr, chunk.indices, chunk.data, chunk.col_map, chunk.totals, cell_keys(key, chunk.rows),
                    chunk_codes, float(cfg["target_sum"]), sketch.inv_log_gamma, sketch.offset,
                    low, mid, top, proj, proj_base, state.donor_detected, sign_sum, profile, _LOG_TABLE, touched,
                )
                if used:
                    pending[index][0] += used
                    pending[index][1] += sign_sum
                    present = np.unique(chunk_codes[(chunk.totals > 0) & (chunk_codes >= 0)])
                    if len(present):
                        state.donor_measured[np.ix_(present, measured)] = True
                summary["cells_used"] += int(used)
                summary["cells_skipped_zero_counts"] += chunk.n_rows - int(used)
                report(chunk.n_rows)
    finally:
        for source, *_ in opened.values():
            source.close()
    if warmup:
        return None
    flat = np.flatnonzero(top) if touched[4] else np.zeros(0, dtype=np.int64)
    return _FitPart(
        tables=None if shared else tables, slot=job.slot if shared else None, rows=tuple(int(t) for t in touched[:4]),
        top=(flat, top.reshape(-1)[flat]), measured={i: o[3] for i, o in opened.items()}, pending=pending,
        per_input=per_input, donors=state.donors, donor_detected=state.donor_detected,
        donor_measured=state.donor_measured,
    )


def _assemble(parts: list[_FitPart], gene_ids: np.ndarray, config: dict) -> FitState:
    """The state of all the workers' cells: their tables added up, per-file counts spread over the genes."""
    state = FitState.empty(gene_ids, config)
    cells = sum(used for part in parts for used, _ in part.pending.values())
    counts = np.zeros(state.sketch.counts.shape, dtype=np.uint32 if cells < 2**32 else np.uint64)
    tables = [part.tables if part.tables is not None else _SHARED_TABLES[part.slot] for part in parts]

    def add_genes(g0: int, g1: int) -> None:  # both tables, over a range of genes (compiled / numpy: no GIL)
        for part, table in zip(parts, tables):
            low_first, low_last, mid_first, mid_last = part.rows
            if low_first <= low_last:
                _add_rows(counts, table.low, low_first, low_last, g0, g1, 0)
            if mid_first <= mid_last:
                _add_rows(counts, table.mid, mid_first, mid_last, g0, g1, 8)
        if state.proj.size:
            np.copyto(state.proj[:, g0:g1], tables[0].proj[:, g0:g1])
            for table in tables[1:]:
                state.proj[:, g0:g1] += table.proj[:, g0:g1]

    _over_gene_ranges(add_genes, len(gene_ids), 2 if len(parts) > 1 else 1)
    for part in parts:
        flat, top = part.top
        counts.reshape(-1)[flat] += top.astype(counts.dtype) << 24
    state.sketch.counts = counts
    # every cell used from a file counts for all the genes the file measures: add those once per file
    per_file: dict[int, list] = {}
    for part in parts:
        for index, (used, signs) in part.pending.items():
            acc = per_file.setdefault(index, [part.measured[index], 0, np.zeros_like(signs)])
            acc[1] += used
            acc[2] += signs
    for measured, used, signs in per_file.values():
        if len(measured) == len(gene_ids):  # the file has every gene: no fancy indexing over the big table
            state.n_measured += used
            state.proj_sum += signs[:, None]
        else:
            state.n_measured[measured] += used
            state.proj_sum[:, measured] += signs[:, None]
    for part in parts:
        rows = state.add_donors(part.donors.tolist())
        state.donor_detected[rows] |= part.donor_detected
        state.donor_measured[rows] |= part.donor_measured
    return state


def _over_gene_ranges(fn: Callable[[int, int], None], n_genes: int, n_threads: int) -> None:
    """``fn(g0, g1)`` over ``n_threads`` contiguous ranges of genes at once (fn must release the GIL to gain)."""
    bounds = np.linspace(0, n_genes, n_threads + 1).astype(int)
    if n_threads <= 1:
        fn(0, n_genes)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for future in [pool.submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
            future.result()


def _describe_input(item, index: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"<AnnData #{index}>"


def _plan_units(n_obs: Sequence[int], block: int) -> list[tuple[int, int, int]]:
    return [(i, a, min(a + block, n)) for i, n in enumerate(n_obs) for a in range(0, n, block)]


_block_size = block_size  # kept under its old name (it lives in .parallel, which tokenize imports without pandas)


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            i, n = (int(s) for s in spec.split("/"))
        except ValueError:
            raise InputError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    else:
        i, n = spec
    if not 0 <= i < n:
        raise InputError(f"--shard I/N needs 0 <= I < N, got {i}/{n}")
    return i, n


def accumulate_statistics(
    inputs: Sequence,
    *,
    gene_id_key: str | None = None,
    gene_map: str | os.PathLike | dict | None = None,
    layer: str | None = None,
    total_counts_key: str | None = None,
    donor_key: str | None = None,
    allow_non_integer: bool = False,
    relative_accuracy: float = 0.005,
    min_value: float = 1e-3,
    max_value: float = 1e4,
    sketch_dim: int = 128,
    seed: int = 0,
    target_sum: float = 10_000.0,
    num_workers: int = 1,
    chunk_size: int = 2048,
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
    background: Callable[[], None] | None = None,
) -> FitState:
    """Stream the inputs once and return their mergeable :class:`FitState` (no vocabulary yet). ``background`` is
    called once the workers run (``fit`` imports the hierarchy's libraries meanwhile)."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "obs"):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise InputError("no input files given")
    if chunk_size < 1 or num_workers < 1:
        raise InputError("chunk_size and num_workers must be >= 1")
    shard = parse_shard(shard)
    gene_map_dict = load_gene_map(gene_map) if isinstance(gene_map, (str, os.PathLike)) else gene_map
    config = {
        "target_sum": float(target_sum), "relative_accuracy": float(relative_accuracy), "min_value": float(min_value),
        "max_value": float(max_value), "sketch_dim": int(sketch_dim), "seed": int(seed), "donor_key": donor_key,
        "gene_id_key": gene_id_key, "total_counts_key": total_counts_key, "layer": layer,
        "allow_non_integer": bool(allow_non_integer),
        "gene_map": str(gene_map) if isinstance(gene_map, (str, os.PathLike)) else None,
    }

    # 1. the corpus gene list: the union of every input's mapped gene ids (var tables are small)
    described, n_obs, all_ids, symbols = [], [], [], {}
    for index, item in enumerate(inputs):
        with _opened(item, layer) as source:
            genes = read_gene_columns(source, gene_id_key=gene_id_key, gene_map=gene_map_dict)
            for key in (total_counts_key, donor_key):
                if key:
                    source.require_obs(key)
            keep = genes.ids != ""
            ids = genes.ids[keep]
            uniq, counts = np.unique(ids, return_counts=True)
            dups = uniq[counts > 1]
            if len(dups):
                logger.warning("%s: %d gene ids occur more than once (e.g. %s); their counts are summed",
                               source.name, len(dups), ", ".join(dups[:5]))
            if genes.n_empty:
                logger.warning("%s: %d genes have an empty id and are left out", source.name, genes.n_empty)
            if genes.n_unmapped:
                logger.warning("%s: %d gene ids are not in the gene map and are left out", source.name,
                               genes.n_unmapped)
            for gid, sym in zip(ids, genes.symbols[keep]):
                if sym and (gid not in symbols or sym < symbols[gid]):
                    symbols[gid] = sym
            all_ids.append(uniq)
            n_obs.append(source.n_obs)
            described.append({
                "path": _describe_input(item, index), "cells": int(source.n_obs), "genes": int(len(uniq)),
                "genes_empty_id": genes.n_empty, "genes_unmapped": genes.n_unmapped,
                "duplicate_gene_ids": int(len(dups)),
            })
    gene_ids = np.unique(np.concatenate(all_ids)) if all_ids else np.zeros(0, dtype=str)
    if len(gene_ids) == 0:
        raise InputError("the inputs hold no usable gene ids (check --gene_id_key / --gene_map)")

    # 2. row blocks, optionally one shard of them, spread over the workers
    in_memory = any(not isinstance(item, (str, os.PathLike)) for item in inputs)
    if in_memory and num_workers > 1:
        logger.info("in-memory AnnData inputs are processed in this process (num_workers ignored)")
        num_workers = 1
    units = _plan_units(n_obs, _block_size(sum(n_obs), num_workers, chunk_size))
    if shard is not None:
        units = [u for k, u in enumerate(units) if k % shard[1] == shard[0]]
        config["shard"] = f"{shard[0]}/{shard[1]}"
    total = sum(b - a for _, a, b in units)
    n_jobs = max(1, min(num_workers, len(units)))
    jobs = [_FitJob([str(i) if isinstance(i, os.PathLike) else i for i in inputs], units[w::n_jobs], gene_ids,
                    config, gene_map_dict, chunk_size) for w in range(n_jobs)]
    from .parallel import run_tasks, start_method

    first = next(((i, a, min(a + 2, b)) for i, a, b in units), None)
    warmup = (lambda: _fit_units(_FitJob(jobs[0].inputs, [first], gene_ids, config, gene_map_dict, chunk_size),
                                 lambda n: None, warmup=True)) if first else None
    global _SHARED_TABLES
    if num_workers > 1 and n_jobs > 1 and start_method() == "fork":
        n_buckets = QuantileSketch(0, relative_accuracy, min_value, max_value).n_buckets
        _SHARED_TABLES = [_Tables(n_buckets, len(gene_ids), int(sketch_dim), True) for _ in jobs]
        for w, job in enumerate(jobs):
            job.slot = w
    try:
        parts = run_tasks(_fit_units, jobs, num_workers=num_workers, total=total, desc="fit", progress=progress,
                          warmup=warmup, after_start=background)
        # 3. add the workers' tables up, attach per-input summaries
        state = _assemble(parts, gene_ids, config)
    finally:
        _SHARED_TABLES = None
    state.gene_symbols = np.array([symbols.get(g, "") for g in gene_ids], dtype=object).astype(str)
    per_input: dict[int, dict] = {}
    for part in parts:
        for index, item in part.per_input.items():
            acc = per_input.setdefault(index, {"cells_used": 0, "cells_skipped_zero_counts": 0})
            acc["cells_used"] += item["cells_used"]
            acc["cells_skipped_zero_counts"] += item["cells_skipped_zero_counts"]
    state.inputs = []
    for index, desc in enumerate(described):
        if index in per_input:
            entry = {**desc, **per_input[index]}
            if shard is not None:
                entry["shards"] = [config["shard"]]
            state.inputs.append(entry)
    return state.canonical()


class _opened:
    """Context manager that opens an input and closes it only if we opened it."""

    def __init__(self, item, layer):
        self.item, self.layer = item, layer

    def __enter__(self) -> CountSource:
        self.source = open_source(self.item, layer=self.layer)
        return self.source

    def __exit__(self, *exc) -> None:
        self.source.close()


def finalize_statistics(
    state: FitState,
    *,
    min_cells: int = 1,
    n_groups: str | Sequence[int] | None = "auto",
    hierarchy: str | os.PathLike | None = None,
    hierarchy_seed: int = 0,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> GeneVocab:
    """The vocabulary with statistics from an accumulated (and possibly merged) :class:`FitState`."""
    if min_cells < 1:
        raise InputError(f"min_cells must be >= 1 (a gene needs detections for its median), got {min_cells}")
    all_cells, sum_log, _, _ = state.sketch.summary(profile_table(state.sketch))
    keep = all_cells >= min_cells
    if not keep.any():
        raise InputError(f"no gene is detected in >= {min_cells} cells; lower --min_cells")
    medians = state.sketch.medians(all_cells)[keep]
    n_cells = all_cells[keep]
    n_measured = state.n_measured[keep]
    zero_fraction = 1.0 - n_cells / np.maximum(n_measured, 1)
    donor_zero = None
    if state.config.get("donor_key"):
        measured = state.donor_measured[:, keep]
        never = measured & ~state.donor_detected[:, keep]
        n_donors = measured.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            donor_zero = np.where(n_donors > 0, never.sum(0) / n_donors, np.nan)
    gene_ids = state.gene_ids[keep].tolist()
    hierarchy_meta: dict
    if hierarchy is not None:
        group_ids, levels, hierarchy_meta = read_hierarchy_tsv(hierarchy, gene_ids)
    else:
        sizes = parse_n_groups(n_groups, len(gene_ids))
        vectors = profile_vectors(state, sum_log)[keep]
        group_ids = derive_hierarchy(vectors, sizes, seed=hierarchy_seed)
        hierarchy_meta = {"source": "derived", "method": "nested k-means on projection sketches",
                          "n_groups_requested": sizes, "seed": hierarchy_seed,
                          "sketch_dim": int(state.config["sketch_dim"])}
    alpha = state.config["relative_accuracy"]
    meta = {
        "kind": "express statistics",
        "inputs": state.inputs,
        "cells_used": state.cells_used,
        "cells_skipped_zero_counts": int(sum(i.get("cells_skipped_zero_counts", 0) for i in state.inputs)),
        "genes_in_corpus": state.n_genes,
        "genes_below_min_cells": int((~keep).sum()),
        "min_cells": int(min_cells),
        "median": {
            "of": "counts / total_counts * target_sum over the cells detecting the gene",
            "sketch": "per-gene log-bucket histogram (DDSketch layout)",
            "relative_error_bound": alpha,
            "exact_range": [state.config["min_value"], state.config["max_value"]],
        },
        "zero_fraction": "share of cells, in files whose matrix has the gene, with a zero count",
        "hierarchy": hierarchy_meta,
        "config": state.config,
        "n_donors": int(len(state.donors)),
    }
    return GeneVocab(
        gene_ids=gene_ids,
        medians=medians,
        n_cells=n_cells,
        zero_fraction=zero_fraction,
        group_ids=group_ids,
        donor_zero_fraction=donor_zero,
        gene_symbols=state.gene_symbols[keep].tolist(),
        meta=meta,
        special_tokens=tuple(special_tokens),
    )


def profile_vectors(state: FitState, sum_log: np.ndarray | None = None) -> np.ndarray:
    """Unit-length, centred projection sketches of each gene's log-normalised profile (``(n, dim)`` float64).
    ``sum_log`` (:attr:`FitState.sum_log`) saves a pass over the histogram."""
    sum_log = state.sum_log if sum_log is None else sum_log
    mean = sum_log.astype(np.float64) / FIXED_POINT / np.maximum(state.n_measured, 1)
    proj = state.proj.T.astype(np.float64) / FIXED_POINT
    centred = proj - mean[:, None] * state.proj_sum.T
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def _finalize_and_save(state: FitState, out_dir, overwrite: bool, finalize: Callable[[], GeneVocab]) -> GeneVocab:
    """``finalize()`` the vocabulary and, with an ``out_dir``, write it with the state. The state is written in a
    second thread while the vocabulary is worked out (both run mostly compiled code, zlib and BLAS, which release
    the GIL); the folder is staged and only renamed into place once both are complete."""
    if out_dir is None:
        return finalize()
    from concurrent.futures import ThreadPoolExecutor

    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        with ThreadPoolExecutor(max_workers=1) as pool:
            written = pool.submit(state.save, tmp)
            try:
                vocab = finalize()
            finally:
                written.result()
        vocab.save(tmp)
    logger.info("wrote %d genes (+%d special tokens) to %s", vocab.n_genes, vocab.n_special, out_dir)
    return vocab


def fit_statistics(
    inputs: Sequence,
    out_dir: str | os.PathLike | None = None,
    *,
    min_cells: int = 1,
    n_groups: str | Sequence[int] | None = "auto",
    hierarchy: str | os.PathLike | None = None,
    overwrite: bool = False,
    **kwargs,
) -> GeneVocab:
    """Fit corpus statistics and the vocabulary over h5ad files (or AnnData objects), streaming them in chunks.

    Args:
        inputs: h5ad paths (or in-memory AnnData objects).
        out_dir: folder to write ``vocab.json``, ``gene_stats.parquet``, ``stats.json`` and ``sketch.npz`` to
            (written to a temporary sibling, then renamed); ``None`` to only return the vocabulary.
        min_cells: genes detected in fewer cells are left out of the vocabulary.
        n_groups: groups per hierarchy level when derived from the corpus (``"64,8"``, ``"auto"``, ``None``).
        hierarchy: a TSV (header; ``gene_id``, one column per level) to take the groups from instead.
        overwrite: replace an existing ``out_dir``.
        **kwargs: passed to :func:`accumulate_statistics`: ``gene_id_key``, ``gene_map`` (JSON file or dict),
            ``layer``, ``total_counts_key``, ``donor_key``, ``allow_non_integer``, ``relative_accuracy``,
            ``sketch_dim``, ``seed``, ``num_workers``, ``chunk_size``, ``shard`` (``"i/n"``), ``progress``.

    Returns:
        The :class:`~tokenizer.vocab.GeneVocab` with medians, detection counts, zero fractions and group ids.
    """
    if out_dir is not None:
        from .output import check_output

        check_output(out_dir, overwrite)  # fail before the work, not after
    derive = hierarchy is None and n_groups not in (None, "0", "none", "")
    state = accumulate_statistics(inputs, background=prefetch_hierarchy_imports if derive else None, **kwargs)
    return _finalize_and_save(state, out_dir, overwrite, lambda: finalize_statistics(
        state, min_cells=min_cells, n_groups=n_groups, hierarchy=hierarchy, hierarchy_seed=state.config["seed"]))


def merge_statistics(
    stats_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    min_cells: int = 1,
    n_groups: str | Sequence[int] | None = "auto",
    hierarchy: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> GeneVocab:
    """Merge statistics folders fitted on separate shards into exactly the one-pass result.

    Each folder must come from ``fit`` (it holds ``sketch.npz``); the vocabulary is rebuilt from the summed state
    with ``min_cells``, ``n_groups`` and ``hierarchy`` as in :func:`fit_statistics`.
    """
    if isinstance(stats_dirs, (str, os.PathLike)):
        stats_dirs = [stats_dirs]
    if not stats_dirs:
        raise InputError("no statistics folders given to merge")
    if out_dir is not None:
        from .output import check_output

        check_output(out_dir, overwrite)
    state = FitState.load(stats_dirs[0])
    for directory in stats_dirs[1:]:
        state.merge(FitState.load(directory))
    state.config.pop("shard", None)
    state.canonical()

    def finalize() -> GeneVocab:
        vocab = finalize_statistics(state, min_cells=min_cells, n_groups=n_groups, hierarchy=hierarchy,
                                    hierarchy_seed=state.config["seed"])
        vocab.meta["merged_from"] = [str(d) for d in stats_dirs]
        return vocab

    return _finalize_and_save(state, out_dir, overwrite, finalize)
