"""Tokenization (``express-tokenize tokenize``): h5ad (or loom) files in, a Hugging Face ``datasets`` folder out.

Every input is read in row chunks; each chunk is mapped to vocabulary token ids, checked, and encoded by
:func:`tokenizer.encode.rank_encode` (compiled, no per-cell Python), then turned into an Arrow record batch straight
from the flat token arrays and their offsets. Work is split into row blocks; with ``num_workers > 1`` worker threads
(the kernels, HDF5 reads and Arrow writes release the GIL; threads share one process's memory and need no start-up)
each write their blocks to their own Arrow files, and the dataset lists the files in block order, so rows keep the
input order (file by file, cell by cell) whatever the number of workers. Zero sampling is seeded per cell from the
global seed and a key made of the file name and the row, so it does not depend on chunking or workers either.

Output folder: ``data-*.arrow`` + ``state.json`` + ``dataset_info.json`` (readable with ``datasets.load_from_disk``),
``vocab.json``/``gene_stats.parquet``/``stats.json`` (``GeneVocab.load`` works on the folder), and ``manifest.json``:
the :class:`~tokenizer.spec.TokenizationSpec` (with the genes each input measures), the run's options, and counts of
cells and genes kept and dropped, and why. It is written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .arrow import list_array, numeric_array, repeated_string, string_array
from .dataset import TokenizedCells
from .encode import OutputBuffers, encode_chunk, mix_seeds
from .errors import InputError
from .geneformer import GeneformerDicts, geneformer_spec, load_geneformer_dicts
from .io import (
    Chunk,
    CountSource,
    SourcePlan,
    cell_keys,
    column_map,
    duplicated_targets,
    file_key,
    is_missing,
    iter_chunks,
    load_gene_map,
    open_source,
    read_gene_columns,
    read_obs_totals,
)
from .output import check_output, staged_dir, write_bytes
from .parallel import block_size, run_threads
from .spec import TokenizationSpec
from .vocab import GeneVocab

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CHUNK_SIZE = 2048  # cells read and encoded at a time by default
# Geneformer mode keeps every detected gene (V2: up to 4,094, ~1,600 in a typical 10x cell) where express mode keeps
# 256 + 50 zeros, so it reads fewer cells at a time. A worker's chunk in flight (two read buffers and the tokens, about
# 4 MB per 100 cells at 1,600 genes a cell) should stay in the shared L3 cache with two workers: on 50,000 such cells
# 384 took 2.3 s of CPU where 512 took 2.7 s and 1,024 3.0 s (256: as 384, with more per-chunk overhead)
GENEFORMER_CHUNK_SIZE = 384
RESERVED_COLUMNS = ("input_ids", "values", "is_zero", "length", "total_counts", "cell_id", "source", "counts_ids",
                    "counts")


@dataclass
class _Encoder:
    """What every worker needs to encode cells: the spec and the vocabulary's per-token medians."""

    spec: TokenizationSpec
    medians: np.ndarray  # (vocab_size,) per token id
    cls_id: int | None
    eos_id: int | None
    keep_counts: bool

    @property
    def express(self) -> bool:
        return self.spec.mode == "express"

    @property
    def rank_dtype(self) -> type:
        return np.float64 if self.spec.mode == "geneformer" else np.float32  # Geneformer ranks float64 values


@dataclass
class SourceInfo:
    """What planning learned about one input (sent to workers)."""

    index: int
    item: object  # path (str) or AnnData
    name: str
    stem: str
    n_obs: int
    col_map: np.ndarray  # (n_vars,) token id or -1
    labels: np.ndarray  # (n_vars,) var names, for messages
    merge: bool
    report: dict = field(default_factory=dict)


# --- schema -----------------------------------------------------------------------------------------------------------
# obs columns come as numpy arrays (an h5ad's plain encodings: object arrays of str with None where missing, numbers,
# booleans; read without pandas) or as pandas objects (anything else); both give the same Arrow column.
def _obs_arrow_type(values: np.ndarray | pd.Series) -> pa.DataType:
    if isinstance(values, np.ndarray):
        kind = values.dtype.kind
        return {"b": pa.bool_(), "i": pa.int64(), "u": pa.int64(), "f": pa.float64()}.get(kind, pa.string())
    import pandas as pd

    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype) or dtype == object or pd.api.types.is_string_dtype(dtype):
        return pa.string()
    if pd.api.types.is_bool_dtype(dtype):
        return pa.bool_()
    if pd.api.types.is_integer_dtype(dtype):
        return pa.int64()
    if pd.api.types.is_float_dtype(dtype):
        return pa.float64()
    return pa.string()


def _unify(types: list[pa.DataType]) -> pa.DataType:
    if all(t == types[0] for t in types):
        return types[0]
    if all(t in (pa.int64(), pa.float64()) for t in types):
        return pa.float64()
    return pa.string()


def _obs_to_arrow(values: np.ndarray | pd.Series, arrow_type: pa.DataType) -> pa.Array:
    if isinstance(values, np.ndarray) and values.dtype.kind in "biufO":
        if arrow_type != pa.string() and values.dtype.kind != "O":
            return numeric_array(values, arrow_type, nan_is_null=True)  # NaN -> null, as from a Series
        if values.dtype == object:
            return string_array([None if is_missing(v) else str(v) for v in values.tolist()])
    import pandas as pd

    values = pd.Series(values).reset_index(drop=True)
    if arrow_type == pa.string():
        obj = values.astype(object)
        mask = obj.isna().to_numpy()
        text = obj.astype(str).to_numpy()
        return pa.array(text, type=pa.string(), mask=mask)
    return pa.array(values.to_numpy(), type=arrow_type, from_pandas=True)


def dataset_schema(encoder: _Encoder, obs_types: dict[str, pa.DataType]) -> pa.Schema:
    """The Arrow schema of a tokenized dataset (the column table in the README)."""
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("values", pa.list_(pa.float32()))]
    if encoder.express:
        fields += [pa.field("is_zero", pa.list_(pa.int8()))]
    fields += [pa.field("length", pa.int32()), pa.field("total_counts", pa.float64()),
               pa.field("cell_id", pa.string()), pa.field("source", pa.string())]
    fields += [pa.field(k, t) for k, t in obs_types.items()]
    if encoder.keep_counts:
        fields += [pa.field("counts_ids", pa.list_(pa.int32())), pa.field("counts", pa.list_(pa.int32()))]
    return pa.schema(fields)


# --- encoding one chunk -----------------------------------------------------------------------------------------------
@dataclass
class _Context:
    """An opened source with everything needed to encode its chunks."""

    info: SourceInfo
    source: CountSource
    plan: SourcePlan
    candidates: np.ndarray
    key: int
    obs_names: pa.Array
    obs: dict[str, pa.Array]
    buffers: OutputBuffers | None = None  # reused by every chunk when each batch is written before the next is made


def _open_context(info: SourceInfo, cfg: dict, obs_types: dict[str, pa.DataType], encoder: _Encoder) -> _Context:
    source = open_source(info.item, layer=cfg["layer"])
    totals = read_obs_totals(source, cfg["total_counts_key"]) if cfg["total_counts_key"] else None
    plan = SourcePlan(info.col_map, info.merge, len(encoder.medians), totals, cfg["allow_non_integer"])
    candidates = np.unique(info.col_map[info.col_map >= 0])
    obs = {k: _obs_to_arrow(source.require_obs_values(k), t) for k, t in obs_types.items()}
    obs_names = string_array(source.obs_names().tolist())
    return _Context(info, source, plan, candidates, file_key(source.name), obs_names, obs)


def _subset_rows(keep: np.ndarray, rows, indptr, indices, data, totals) -> tuple:
    """The rows of a CSR block where ``keep`` is true."""
    stored = np.diff(indptr)
    entry_keep = np.repeat(keep, stored)
    new_indptr = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(stored[keep], out=new_indptr[1:])
    return rows[keep], new_indptr, indices[entry_keep], data[entry_keep], totals[keep]


def _encode_chunk(ctx: _Context, chunk: Chunk, encoder: _Encoder, schema: pa.Schema, counters: dict
                  ) -> pa.RecordBatch | None:
    block = (chunk.rows, chunk.indptr, chunk.indices, chunk.data, chunk.totals)
    has_counts = chunk.totals > 0
    counters["skipped_zero_counts"] += int((~has_counts).sum())
    if not has_counts.all():
        block = _subset_rows(has_counts, *block)

    spec = encoder.spec

    def encode(block):
        rows, indptr, indices, data, totals = block
        seeds = mix_seeds(spec.seed, cell_keys(ctx.key, rows)) if spec.n_zeros > 0 else None
        return encode_chunk(
            indptr, indices, data, totals, encoder.medians, top_k=spec.top_k, n_zeros=spec.n_zeros,
            zero_candidates=ctx.candidates if spec.n_zeros > 0 else None, cell_seeds=seeds,
            cls_id=encoder.cls_id, eos_id=encoder.eos_id, target_sum=spec.target_sum, rank_dtype=encoder.rank_dtype,
            col_map=chunk.col_map, indices_checked=True, positive=chunk.positive, buffers=ctx.buffers,
        )

    if len(block[0]) == 0:
        return None
    tokens, detected = encode(block)
    if not (detected > 0).all():  # cells with counts but no vocabulary gene are skipped too (rare: encode again)
        counters["skipped_no_vocabulary_genes"] += int((detected == 0).sum())
        block = _subset_rows(detected > 0, *block)
        if len(block[0]) == 0:
            return None
        tokens, _ = encode(block)
    rows, indptr, indices, data, totals = block
    lengths = tokens.lengths
    counters["written"] += len(rows)
    counters["tokens"] += int(tokens.offsets[-1])
    counters["length_hist"] = _add_hist(counters.get("length_hist"), np.bincount(lengths))
    columns: dict[str, pa.Array] = {
        "input_ids": list_array(tokens.offsets, tokens.input_ids),
        "values": list_array(tokens.offsets, tokens.values),
    }
    if encoder.express:
        columns["is_zero"] = list_array(tokens.offsets, tokens.is_zero)
    columns["length"] = numeric_array(lengths)
    columns["total_counts"] = numeric_array(totals)
    columns["cell_id"] = _pick(ctx.obs_names, rows)
    columns["source"] = repeated_string(ctx.info.stem, len(rows))
    for key, values in ctx.obs.items():
        columns[key] = _pick(values, rows)
    if encoder.keep_counts:  # the plan merged this chunk: token ids, ascending per row
        columns["counts_ids"] = list_array(indptr, indices.astype(np.int32))
        columns["counts"] = list_array(indptr, data.astype(np.int32))
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


def _pick(column: pa.Array, rows: np.ndarray) -> pa.Array:
    """``column[rows]`` (rows ascending): a slice when they are consecutive, as they are unless cells were left out
    (a take would import ``pyarrow.compute``, 0.05 s)."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return column.slice(int(rows[0]), len(rows))
    return column.take(numeric_array(rows))


def _add_hist(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    if a is None:
        return b
    if len(a) < len(b):
        a, b = b, a
    a = a.copy()
    a[: len(b)] += b
    return a


def _new_counters() -> dict:
    return {"written": 0, "skipped_zero_counts": 0, "skipped_no_vocabulary_genes": 0, "tokens": 0,
            "length_hist": None}


def iter_record_batches(ctx: _Context, start: int, stop: int, encoder: _Encoder, schema: pa.Schema,
                        chunk_size: int, counters: dict, report: Callable[[int], None] | None = None
                        ) -> Iterator[pa.RecordBatch]:
    # without duplicate genes to sum or counts to keep, the encoder reads the file's columns through col_map
    for chunk in iter_chunks(ctx.source, ctx.plan, start, stop, chunk_size, ctx.info.labels, remap=ctx.plan.merge):
        batch = _encode_chunk(ctx, chunk, encoder, schema, counters)
        if report is not None:
            report(chunk.n_rows)
        if batch is not None:
            yield batch


# --- workers ----------------------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    index: int
    source: SourceInfo
    start: int
    stop: int
    path: str  # Arrow file to write
    encoder: _Encoder
    obs_types: dict
    schema: pa.Schema
    cfg: dict


_CONTEXTS: dict[tuple, _Context] = {}  # opened sources by (thread, input), reused by a thread's units of one file
_CONTEXTS_LOCK = threading.Lock()


def _run_unit(unit: _Unit, report: Callable[[int], None]) -> dict:
    thread = threading.get_ident()
    key = (thread, unit.source.index, unit.source.name)
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        stale = [_CONTEXTS.pop(k) for k in list(_CONTEXTS) if k[0] == thread and k != key]  # one file per thread
    for old in stale:
        old.source.close()
    if ctx is None:
        ctx = _open_context(unit.source, unit.cfg, unit.obs_types, unit.encoder)
        ctx.buffers = OutputBuffers()  # each batch below is written out before the next is encoded
        with _CONTEXTS_LOCK:
            _CONTEXTS[key] = ctx
    counters = _new_counters()
    with pa.OSFile(unit.path, "wb") as sink, pa.ipc.new_stream(sink, unit.schema) as writer:
        for batch in iter_record_batches(ctx, unit.start, unit.stop, unit.encoder, unit.schema,
                                         unit.cfg["chunk_size"], counters, report):
            writer.write_batch(batch)
    counters["source"] = unit.source.index
    return counters


def _close_contexts() -> None:
    with _CONTEXTS_LOCK:
        contexts = [_CONTEXTS.pop(key) for key in list(_CONTEXTS)]
    for ctx in contexts:
        ctx.source.close()


# --- planning ---------------------------------------------------------------------------------------------------------
def _resolve(stats, geneformer_dicts, model_input_size, spec: TokenizationSpec | None
             ) -> tuple[GeneVocab, dict | None, TokenizationSpec, dict]:
    """The vocabulary, Geneformer's id-collapsing map (or None), the spec and the mode's extra parameters."""
    if geneformer_dicts is not None:
        if stats is not None:
            raise InputError("give either a statistics folder / vocabulary or Geneformer dictionaries, not both")
        if spec is not None:
            raise InputError("Geneformer mode takes its encoding from the dictionaries and --model_input_size; "
                             "do not pass a tokenization spec as well")
        dicts = geneformer_dicts if isinstance(geneformer_dicts, GeneformerDicts) else \
            load_geneformer_dicts(geneformer_dicts)
        spec = geneformer_spec(dicts, model_input_size)
        return dicts.vocab, dicts.mapping, spec, {"geneformer_dicts": str(dicts.directory),
                                                  "model_input_size": spec.max_length}
    if stats is None:
        raise InputError("tokenize needs a statistics folder (--stats, from `express-tokenize fit`) or Geneformer "
                         "dictionaries (--geneformer_dicts)")
    if model_input_size is not None:
        raise InputError("--model_input_size only applies with --geneformer_dicts")
    spec = spec if spec is not None else TokenizationSpec()
    if spec.mode != "express":
        raise InputError(f"a {spec.mode}-mode spec needs --geneformer_dicts; a statistics folder encodes in express mode")
    vocab = stats if isinstance(stats, GeneVocab) else GeneVocab.load(stats)
    return vocab, None, spec, {}


def _plan_sources(inputs, vocab: GeneVocab, collapse: dict | None, cfg: dict, obs_keys: Sequence[str],
                  gene_map: dict | None, keep_counts: bool, spec: TokenizationSpec) -> tuple[list[SourceInfo], dict]:
    infos, obs_series_types = [], {k: [] for k in obs_keys}
    target = vocab.gene_ids
    for index, item in enumerate(inputs):
        source = open_source(item, layer=cfg["layer"])
        try:
            genes = read_gene_columns(source, gene_id_key=cfg["gene_id_key"], gene_map=gene_map)
            ids = genes.ids
            n_uncollapsed = 0
            if collapse is not None:
                known = vocab.token_to_id  # ids the map sends outside the dictionary count as unmapped
                mapped = [collapse.get(i.upper(), "") for i in ids.tolist()]  # a lookup per gene: the map is large
                mapped = [m if m in known else "" for m in mapped]
                n_uncollapsed = sum(1 for i, m in zip(ids.tolist(), mapped) if i and not m)
                ids = np.array(mapped, dtype=str)
            col_map = column_map(ids, target)
            # token ids are gene positions shifted past the special tokens
            col_map = np.where(col_map >= 0, col_map + vocab.n_special, -1)
            named = ids != ""
            missing = np.unique(ids[named & (col_map < 0)])
            dup_targets = duplicated_targets(col_map)
            if len(dup_targets):
                examples = ", ".join(vocab.id_to_token(int(t)) for t in dup_targets[:5])
                logger.warning("%s: %d vocabulary genes occur in more than one column (e.g. %s); their counts are "
                               "summed", source.name, len(dup_targets), examples)
            for key in obs_keys:
                obs_series_types[key].append(_obs_arrow_type(source.require_obs_values(key)))
            if cfg["total_counts_key"]:
                source.check_obs_key(cfg["total_counts_key"])
            report = {
                "path": source.name, "cells": int(source.n_obs), "genes": int(source.n_vars),
                "genes_in_vocab": int(len(np.unique(col_map[col_map >= 0]))),
                "genes_missing_from_vocab": int(len(missing)),
                "genes_missing_examples": missing[:20].tolist(),
                "genes_empty_id": genes.n_empty, "genes_unmapped": genes.n_unmapped + n_uncollapsed,
                "duplicate_gene_ids": int(len(dup_targets)),
            }
            if report["genes_in_vocab"] == 0:
                raise InputError(f"{source.name}: none of its {source.n_vars} genes is in the vocabulary (check "
                                 "--gene_id_key / --gene_map; e.g. var['ensembl_id'] for Ensembl vocabularies)")
            if len(missing):
                logger.info("%s: %d of %d genes are not in the vocabulary and are left out", source.name,
                            len(missing), source.n_vars)
            if spec.input_genes is not None:  # a gene panel: the other columns still count in the library size
                col_map = np.where(spec.read_genes(col_map), col_map, -1)
                report["genes_in_panel"] = int(len(np.unique(col_map[col_map >= 0])))
                if report["genes_in_panel"] == 0:
                    raise InputError(f"{source.name}: none of its genes is in the spec's gene panel (input_genes, "
                                     f"{len(spec.input_genes)} genes)")
            infos.append(SourceInfo(
                index=index, item=str(item) if isinstance(item, os.PathLike) else item, name=source.name,
                stem=source.stem, n_obs=source.n_obs, col_map=col_map, labels=genes.labels,
                merge=bool(len(dup_targets)) or keep_counts, report=report,
            ))
        finally:
            source.close()
    obs_types = {k: _unify(v) for k, v in obs_series_types.items()}
    return infos, obs_types


def _check_obs_keys(obs_keys) -> list[str]:
    if obs_keys is None:
        return []
    if isinstance(obs_keys, str):
        obs_keys = [k for k in obs_keys.split(",") if k.strip()]
    keys = [k.strip() for k in obs_keys]
    clash = [k for k in keys if k in RESERVED_COLUMNS]
    if clash:
        raise InputError(f"obs column(s) {', '.join(clash)} would collide with dataset columns of the same name; "
                         "rename them in obs first")
    if len(set(keys)) != len(keys):
        raise InputError(f"obs keys are repeated: {keys}")
    return keys


def _summarise(counters: list[dict], infos: list[SourceInfo]) -> dict:
    per_source = {i.index: _new_counters() for i in infos}
    hist = None
    for c in counters:
        acc = per_source[c["source"]]
        for k in ("written", "skipped_zero_counts", "skipped_no_vocabulary_genes", "tokens"):
            acc[k] += c[k]
        if c["length_hist"] is not None:
            hist = _add_hist(hist, c["length_hist"])
    inputs = []
    for info in infos:
        acc = per_source[info.index]
        inputs.append({**info.report, "cells_written": acc["written"],
                       "cells_skipped_zero_counts": acc["skipped_zero_counts"],
                       "cells_skipped_no_vocabulary_genes": acc["skipped_no_vocabulary_genes"]})
    written = sum(i["cells_written"] for i in inputs)
    length = {}
    if hist is not None and written:
        values = np.arange(len(hist))
        cdf = np.cumsum(hist) / hist.sum()
        length = {"min": int(values[hist > 0][0]), "max": int(values[hist > 0][-1]),
                  "mean": float((values * hist).sum() / hist.sum()),
                  "median": int(values[np.searchsorted(cdf, 0.5)])}
    missing = sorted({g for i in inputs for g in i["genes_missing_examples"]})
    return {
        "inputs": inputs,
        "counts": {
            "cells_in": sum(i["cells"] for i in inputs),
            "cells_written": written,
            "cells_skipped": {
                "zero_counts": sum(i["cells_skipped_zero_counts"] for i in inputs),
                "no_vocabulary_genes": sum(i["cells_skipped_no_vocabulary_genes"] for i in inputs),
            },
            "tokens": sum(per_source[i.index]["tokens"] for i in infos),
            "length": length,
            "genes_missing_from_vocab": {
                "per_input": [i["genes_missing_from_vocab"] for i in inputs],
                "examples": missing[:20],
            },
        },
    }


def _config(layer, gene_id_key, total_counts_key, allow_non_integer, chunk_size, geneformer: bool) -> dict:
    if chunk_size is None:
        chunk_size = GENEFORMER_CHUNK_SIZE if geneformer else CHUNK_SIZE
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    return {"layer": layer, "gene_id_key": gene_id_key, "total_counts_key": total_counts_key,
            "allow_non_integer": bool(allow_non_integer), "chunk_size": int(chunk_size)}


def _prepare(inputs, stats, geneformer_dicts, model_input_size, spec, keep_counts, obs_keys, gene_map, cfg):
    if keep_counts and cfg["allow_non_integer"]:
        raise InputError("--keep_counts stores integer counts (for MCV splits); it cannot be combined with "
                         "--allow_non_integer")
    obs_keys = _check_obs_keys(obs_keys)
    vocab, collapse, spec, mode_params = _resolve(stats, geneformer_dicts, model_input_size, spec)
    gene_map_dict = load_gene_map(gene_map) if isinstance(gene_map, (str, os.PathLike)) else gene_map
    if spec.input_genes is not None and not ((spec.input_genes >= vocab.n_special) &
                                             (spec.input_genes < vocab.vocab_size)).all():
        raise InputError(f"the spec's gene panel (input_genes) holds ids outside the vocabulary's genes "
                         f"[{vocab.n_special}, {vocab.vocab_size}): it was made for another vocabulary")
    infos, obs_types = _plan_sources(inputs, vocab, collapse, cfg, obs_keys, gene_map_dict, keep_counts, spec)
    stems = [i.stem for i in infos]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise InputError(f"several inputs are named {repeated[0]!r}: the `source` column and the per-cell seeds tell "
                         "files apart by name, so rename one of them")
    # the genes each input measures: zeros are sampled among them, and every later re-tokenization must do the same
    spec = spec.replace(measured_genes={i.stem: i.col_map[i.col_map >= 0] for i in infos})
    encoder = _Encoder(
        spec=spec, medians=vocab.token_medians, keep_counts=bool(keep_counts),
        cls_id=vocab.cls_id if spec.add_cls else None, eos_id=vocab.eos_id if spec.add_eos else None,
    )
    params = {"keep_counts": encoder.keep_counts, "obs_keys": obs_keys,
              "gene_map": str(gene_map) if isinstance(gene_map, (str, os.PathLike)) else None,
              **{k: v for k, v in cfg.items() if k != "chunk_size"}, **mode_params}
    return vocab, encoder, infos, obs_types, params


# --- public API -------------------------------------------------------------------------------------------------------
def tokenize_files(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    stats: str | os.PathLike | GeneVocab | None,
    out_dir: str | os.PathLike,
    *,
    spec: TokenizationSpec | None = None,
    obs_keys: Sequence[str] | str | None = None,
    keep_counts: bool = False,
    gene_id_key: str | None = None,
    gene_map: str | os.PathLike | dict | None = None,
    layer: str | None = None,
    total_counts_key: str | None = None,
    allow_non_integer: bool = False,
    geneformer_dicts: str | os.PathLike | None = None,
    model_input_size: int | None = None,
    num_workers: int = 1,
    chunk_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize h5ad (or loom) files into a ``datasets`` folder at ``out_dir``; returns ``out_dir``.

    Args:
        inputs: h5ad files, tokenized in this order; ``.loom`` files are read as Geneformer reads them (genes in
            rows with their ids in row attribute ``ensembl_id``, cells in columns, column attributes as obs).
        stats: a statistics folder from ``fit`` (or any folder ``GeneVocab.load`` reads, or a ``GeneVocab``);
            ``None`` with ``geneformer_dicts``.
        out_dir: the dataset folder to create (refused if it exists, unless ``overwrite``).
        spec: how to encode cells (:class:`~tokenizer.spec.TokenizationSpec`: ``top_k``, ``n_zeros``, ``seed``,
            ...); default ``TokenizationSpec()``. The manifest records it with the genes each input measures.
        obs_keys: obs columns to carry (list or comma-separated string); categoricals become strings.
        keep_counts: also store every detected vocabulary gene's raw count (``counts_ids``, ``counts``).
        gene_id_key: var column holding gene ids (default: var_names); ``gene_map``: JSON file or dict mapping them
            to vocabulary ids (e.g. symbol -> Ensembl).
        layer: read ``layers[layer]`` (``"raw"`` for ``raw/X``) instead of ``X``.
        total_counts_key: obs column with library sizes (default: row sums over all genes of the matrix).
        allow_non_integer: accept non-integer values (negative and NaN values are always refused).
        geneformer_dicts, model_input_size: Geneformer mode (folder of its JSON dictionaries; 2048 = V1, 4096 = V2).
        num_workers: worker threads (the encoding runs outside the GIL); the output does not depend on it.
        chunk_size: cells read and encoded at a time (memory scales with it, not with the corpus); default 2048, 384
            in Geneformer mode (whose cells keep all their detected genes).
    """
    started = datetime.datetime.now(datetime.timezone.utc)  # the manifest's run time: the whole call
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise InputError("no input files given")
    if num_workers < 1:
        raise InputError(f"num_workers must be >= 1, got {num_workers}")
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    cfg = _config(layer, gene_id_key, total_counts_key, allow_non_integer, chunk_size, geneformer_dicts is not None)
    chunk_size = cfg["chunk_size"]
    vocab, encoder, infos, obs_types, params = _prepare(inputs, stats, geneformer_dicts, model_input_size, spec,
                                                        keep_counts, obs_keys, gene_map, cfg)
    schema = dataset_schema(encoder, obs_types)
    total = sum(i.n_obs for i in infos)
    block = block_size(total, num_workers, chunk_size)
    blocks = [(info, a, min(a + block, info.n_obs)) for info in infos for a in range(0, info.n_obs, block)]
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        names = [f"data-{k:05d}-of-{len(blocks):05d}.arrow" for k in range(len(blocks))]
        units = [_Unit(k, info, a, b, str(tmp / names[k]), encoder, obs_types, schema, cfg)
                 for k, (info, a, b) in enumerate(blocks)]
        try:
            counters = run_threads(_run_unit, units, num_workers=num_workers, total=total, desc="tokenize",
                                   progress=progress)
        finally:
            _close_contexts()
        summary = _summarise(counters, infos)
        if summary["counts"]["cells_written"] == 0:
            raise InputError("no cell was written: every cell has zero counts or no vocabulary gene")
        _write_dataset_files(tmp, names, schema, summary, params)
        vocab.save(tmp)
        manifest = {
            "format": "express tokenized dataset", "version": 2, "tokenization": encoder.spec.to_dict(),
            "params": params, "inputs": summary["inputs"], "counts": summary["counts"], "columns": schema.names,
            "vocab_fingerprint": vocab.fingerprint(), "vocab_size": vocab.vocab_size,
            "created": started.isoformat(timespec="seconds"),
            "run": {"num_workers": num_workers, "chunk_size": chunk_size,
                    "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 3)},
        }
        write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    counts = summary["counts"]
    logger.info("wrote %d cells (%d skipped: %d with zero counts, %d without vocabulary genes) to %s",
                counts["cells_written"], sum(counts["cells_skipped"].values()), counts["cells_skipped"]["zero_counts"],
                counts["cells_skipped"]["no_vocabulary_genes"], out_dir)
    return out_dir


def _feature(arrow_type: pa.DataType, list_name: str) -> dict:
    """The ``datasets`` feature description of an Arrow type (the few types tokenized datasets use)."""
    if pa.types.is_list(arrow_type):
        return {"feature": _feature(arrow_type.value_type, list_name), "_type": list_name}
    if arrow_type == pa.string():
        dtype = "string"
    else:  # numeric and bool: numpy's names (float64, int32, bool), as datasets uses
        dtype = np.dtype(arrow_type.to_pandas_dtype()).name
    return {"dtype": dtype, "_type": "Value"}


def _write_dataset_files(directory: Path, names: list[str], schema: pa.Schema, summary: dict, params: dict) -> None:
    """``state.json`` and ``dataset_info.json`` in ``datasets.save_to_disk``'s layout, over the Arrow files the
    workers wrote (``save_to_disk`` would write every row again).

    Written here rather than with ``datasets`` because importing it costs about 1.3 s of CPU, as much as tokenizing
    50,000 cells with two workers (``scripts/bench_tokenizer.py``); ``TokenizedCells.load`` checks that
    ``datasets.load_from_disk`` reads the folder.
    """
    from importlib.metadata import version

    list_name = "List" if int(version("datasets").split(".")[0]) >= 4 else "Sequence"  # datasets 4 renamed it
    fingerprint = hashlib.sha256(json.dumps([params, summary["inputs"]], sort_keys=True, default=str).encode())
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": fingerprint.hexdigest()[:16],
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": None,
    }
    write_bytes(directory / "state.json", json.dumps(state, indent=2).encode())
    info = {"description": "express rank-token dataset (see manifest.json)", "citation": "", "homepage": "",
            "license": "", "features": {f.name: _feature(f.type, list_name) for f in schema}}
    write_bytes(directory / "dataset_info.json", json.dumps(info).encode())


def tokenize_adata(
    adata,
    vocab: GeneVocab | str | os.PathLike | None = None,
    *,
    spec: TokenizationSpec | None = None,
    obs_keys: Sequence[str] | str | None = None,
    keep_counts: bool = False,
    gene_id_key: str | None = None,
    gene_map: str | os.PathLike | dict | None = None,
    layer: str | None = None,
    total_counts_key: str | None = None,
    allow_non_integer: bool = False,
    geneformer_dicts: str | os.PathLike | None = None,
    model_input_size: int | None = None,
    chunk_size: int | None = None,
    source_name: str = "adata",
) -> TokenizedCells:
    """Tokenize an in-memory AnnData (same columns and encoding as :func:`tokenize_files`); returns the cells with
    their vocabulary and spec. Cells with zero counts or no vocabulary gene are left out (``cell_id`` tells which
    remain). ``source_name`` fills the ``source`` column and keys the per-cell zero sampling."""
    import datasets

    from .io import AnnDataSource

    source = AnnDataSource(adata, layer=layer, name=source_name)
    cfg = _config(layer, gene_id_key, total_counts_key, allow_non_integer, chunk_size, geneformer_dicts is not None)
    vocab, encoder, infos, obs_types, _ = _prepare([source], vocab, geneformer_dicts, model_input_size, spec,
                                                   keep_counts, obs_keys, gene_map, cfg)
    schema = dataset_schema(encoder, obs_types)
    ctx = _open_context(infos[0], cfg, obs_types, encoder)
    counters = _new_counters()
    batches = list(iter_record_batches(ctx, 0, source.n_obs, encoder, schema, cfg["chunk_size"], counters))
    table = pa.Table.from_batches(batches, schema=schema)
    if counters["skipped_zero_counts"] or counters["skipped_no_vocabulary_genes"]:
        logger.info("%s: left out %d cells with zero counts and %d without vocabulary genes", source_name,
                    counters["skipped_zero_counts"], counters["skipped_no_vocabulary_genes"])
    return TokenizedCells(datasets.Dataset(table), vocab, encoder.spec, name=source_name)
