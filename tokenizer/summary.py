"""Human-readable views of tokenized datasets and statistics folders (``express-tokenize inspect``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .tokenize import MANIFEST_FILE
from .vocab import GeneVocab


def _percentiles(values: np.ndarray) -> str:
    if len(values) == 0:
        return "(none)"
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return (f"min {q[0]:.0f}, 5% {q[1]:.0f}, median {q[2]:.0f}, 95% {q[3]:.0f}, max {q[4]:.0f}, "
            f"mean {values.mean():.1f}")


def is_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def describe_dataset(path: str | os.PathLike, *, max_categories: int = 6) -> str:
    """Cells, columns, length distribution, carried obs columns and the manifest of a tokenized dataset."""
    import datasets

    path = Path(path)
    ds = datasets.load_from_disk(str(path))
    manifest = json.loads((path / MANIFEST_FILE).read_text()) if (path / MANIFEST_FILE).is_file() else {}
    lengths = np.asarray(ds.data.column("length").to_numpy()) if "length" in ds.column_names else np.zeros(0)
    lines = [f"dataset {path}", f"  cells: {ds.num_rows:,}", f"  columns: {', '.join(ds.column_names)}",
             f"  tokens per cell: {_percentiles(lengths)}"]
    if manifest:
        spec = manifest.get("tokenization", {})
        shown = {**{k: spec[k] for k in ("top_k", "n_zeros", "seed") if k in spec}, **manifest.get("params", {})}
        counts = manifest.get("counts", {})
        lines.append(f"  mode: {spec.get('mode')}; " + ", ".join(
            f"{k}={shown[k]}" for k in ("top_k", "n_zeros", "seed", "keep_counts", "model_input_size") if k in shown))
        skipped = counts.get("cells_skipped", {})
        lines.append(f"  cells in: {counts.get('cells_in', 0):,}, written: {counts.get('cells_written', 0):,}, "
                     f"skipped: {skipped.get('zero_counts', 0):,} with zero counts, "
                     f"{skipped.get('no_vocabulary_genes', 0):,} without vocabulary genes")
        for item in manifest.get("inputs", []):
            lines.append(f"  input {item['path']}: {item['cells']:,} cells, {item['genes']:,} genes -> "
                         f"{item['genes_in_vocab']:,} vocabulary genes ({item['genes_missing_from_vocab']:,} ids not "
                         f"in the vocabulary, {item.get('genes_unmapped', 0):,} unmapped, "
                         f"{item.get('genes_empty_id', 0):,} without an id)")
        lines.append(f"  vocabulary: {manifest.get('vocab_size')} tokens, fingerprint "
                     f"{manifest.get('vocab_fingerprint')}")
    obs_keys = manifest.get("params", {}).get("obs_keys", [])
    for key in obs_keys:
        if key not in ds.column_names:
            continue
        column = ds.data.column(key).to_pandas()
        if column.dtype == object or column.nunique() <= max_categories:
            top = column.value_counts(dropna=False).head(max_categories)
            more = column.nunique() - len(top)
            text = ", ".join(f"{k} ({v:,})" for k, v in top.items()) + (f", ... {more} more" if more > 0 else "")
        else:
            text = f"numeric, {_percentiles(column.to_numpy(dtype=float))}"
        lines.append(f"  obs {key}: {text}")
    return "\n".join(lines)


def describe_cell(path: str | os.PathLike, cell: int = 0, *, n_tokens: int = 20) -> str:
    """One cell's tokens as gene ids and symbols with values, flags and group ids."""
    import datasets

    path = Path(path)
    ds = datasets.load_from_disk(str(path))
    if not 0 <= cell < ds.num_rows:
        raise InputError(f"--cell {cell} is out of range: the dataset has {ds.num_rows:,} cells")
    vocab = GeneVocab.load(path)
    row = ds[cell]
    ids = np.asarray(row["input_ids"])
    values = np.asarray(row.get("values", np.zeros(len(ids))))
    is_zero = np.asarray(row.get("is_zero", np.zeros(len(ids), dtype=np.int8)))
    # hierarchy groups per token, from the vocabulary (the one place they are stored)
    groups = vocab.token_group_ids[ids].T if vocab.n_levels and "is_zero" in row else None  # (n_levels, T)
    extras = {k: v for k, v in row.items() if k not in ("input_ids", "values", "is_zero", "counts_ids", "counts")}
    lines = [f"cell {cell}: " + ", ".join(f"{k}={v}" for k, v in extras.items())]
    symbols = vocab.gene_symbols or [""] * vocab.n_genes
    header = f"{'pos':>4} {'token':>6}  {'gene id':<18} {'symbol':<12} {'value':>9}  flag"
    if groups is not None:
        header += "  groups"
    lines.append(header)
    n_expr = int(((is_zero == 0) & (ids >= vocab.n_special)).sum())
    show = list(range(min(n_tokens, len(ids))))
    zeros = np.flatnonzero(is_zero == 1)
    if len(zeros) and zeros[0] not in show:
        show += list(zeros[:3])
    if len(ids) - 1 not in show:
        show.append(len(ids) - 1)
    previous = -1
    for pos in show:
        if pos != previous + 1:
            lines.append("   ...")
        previous = pos
        tok = int(ids[pos])
        if tok < vocab.n_special:
            gene, symbol, flag = vocab.special_tokens[tok], "", "special"
        else:
            gene, symbol = vocab.gene_ids[tok - vocab.n_special], symbols[tok - vocab.n_special]
            flag = "zero" if is_zero[pos] else "expr"
        line = f"{pos:>4} {tok:>6}  {gene:<18} {symbol:<12} {values[pos]:>9.3f}  {flag:<7}"
        if groups is not None:
            line += " " + "/".join(str(int(g)) for g in groups[:, pos])
        lines.append(line.rstrip())
    lines.append(f"{len(ids)} tokens: {n_expr} expressed genes, {int(is_zero.sum())} sampled zeros, "
                 f"{len(ids) - n_expr - int(is_zero.sum())} special")
    if "counts_ids" in row:
        lines.append(f"kept counts: {len(row['counts_ids'])} detected vocabulary genes, "
                     f"{int(np.sum(row['counts'])):,} counts")
    return "\n".join(lines)


def describe_stats(path: str | os.PathLike, *, n_top: int = 10) -> str:
    """Vocabulary size, statistics and hierarchy of a statistics folder (from ``fit`` or ``merge``)."""
    vocab = GeneVocab.load(path)
    meta = vocab.meta
    lines = [f"statistics {path}",
             f"  vocabulary: {vocab.vocab_size:,} tokens ({vocab.n_special} special: "
             f"{', '.join(vocab.special_tokens)}; {vocab.n_genes:,} genes)",
             f"  cells used: {meta.get('cells_used', 'n/a')}, genes in corpus: {meta.get('genes_in_corpus', 'n/a')}, "
             f"below min_cells ({meta.get('min_cells', 'n/a')}): {meta.get('genes_below_min_cells', 'n/a')}",
             f"  medians: {_percentiles(vocab.medians)}",
             f"  zero fraction: {_percentiles(vocab.zero_fraction * 100)} (%)",
             f"  hierarchy: {vocab.n_levels} levels, table sizes {vocab.n_groups} "
             f"({meta.get('hierarchy', {}).get('source', 'n/a')})"]
    median_meta = meta.get("median", {})
    if median_meta:
        lines.append(f"  median sketch: relative error <= {median_meta.get('relative_error_bound')}")
    order = np.argsort(-vocab.n_cells, kind="stable")[:n_top]
    symbols = vocab.gene_symbols or [""] * vocab.n_genes
    lines.append("  most detected genes: " + ", ".join(
        f"{symbols[i] or vocab.gene_ids[i]} ({vocab.n_cells[i]:,})" for i in order))
    for item in meta.get("inputs", []):
        lines.append(f"  input {item['path']}: {item.get('cells_used', 0):,} cells used, "
                     f"{item.get('genes', 0):,} genes")
    return "\n".join(lines)
