"""Cells for training: one dataset, one split helper, one sampler and one collator for pretraining and fine-tuning.

- :func:`load_corpus` / :func:`build_corpus`: tokenized cells (folders written by ``express-tokenize tokenize``, or
  :class:`~tokenizer.TokenizedCells` made in memory), checked to share one vocabulary, with held-out cells split off;
- :class:`CellDataset`: a map-style dataset over chosen rows of one or more ``datasets.Dataset`` parts (a row is one
  cell; fine-tuning adds its label, batch and protein columns to the tokenized rows);
- :func:`split_cells`: the seeded train / held-out split, by cell or by whole groups (donors, batches);
- :class:`LengthGroupedBatchSampler`: batches of cells of similar length, datasets mixed by weight, sharded across
  processes, deterministic given ``(seed, epoch)``;
- :class:`ExpressCollator`: rows -> model keyword arguments: padding, molecular cross-validation (MCV) split and
  re-tokenization with each dataset's :class:`~tokenizer.TokenizationSpec`, MLM masking, count targets, the dense
  counts of a model's gene panel, and pass-through columns.

Randomness. Every cell visit carries its own ``sample_seed``, assigned by the sampler from ``(seed, epoch, position
in the epoch)``. The collator draws the MCV split, the re-tokenization's sampled zeros and the MLM mask for that
cell from a generator seeded by it, so a cell's inputs depend on nothing else: not on the batch it lands in, the
data-loader worker, the number of processes, or how often the run was interrupted and resumed. Rows without a
``sample_seed`` use the collator's own seeded generator.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.modeling_express import IGNORE_INDEX
from tokenizer import (
    DatasetFormatError,
    GeneVocab,
    TokenizationSpec,
    TokenizedCells,
    VocabularyMismatchError,
    encode_count_rows,
    mix_seeds,
)
from tokenizer.dataset import COUNT_COLUMNS, check_same_vocab

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("input_ids", "values", "is_zero")  # is_zero is absent in Geneformer-mode datasets (no zeros)
PANEL_COLUMNS = ("panel_ids", "panel_counts")  # a model's gene panel, sparse: positions in the panel and raw counts
# Keeps the sample-seed stream apart from the tokenizer's per-cell zero-sampling seeds made from the same user seed.
_SAMPLE_SEED_SALT = 0x5A3C_91E7_D24B_086F

__all__ = [
    "COUNT_COLUMNS", "CellDataset", "Corpus", "DatasetFormatError", "ExpressCollator", "IGNORE_INDEX",
    "LengthGroupedBatchSampler", "MISSING_LABELS", "PANEL_COLUMNS", "VocabularyMismatchError", "add_label_column",
    "build_corpus", "encode_labels", "label_categories", "load_corpus", "split_cells",
]


# ---------------------------------------------------------------------------------------------------------------------
# Cells from several datasets
# ---------------------------------------------------------------------------------------------------------------------


def _ragged(column) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and 0-based offsets of an Arrow list column."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _row_lengths(dataset) -> np.ndarray:
    """Tokens per row (the ``length`` column, else the ``input_ids`` list lengths; 1 per row without tokens)."""
    table = dataset.with_format("arrow")
    if "length" in dataset.column_names:
        return np.asarray(table["length"].to_numpy(), dtype=np.int64)
    if "input_ids" in dataset.column_names:
        return np.asarray(table["input_ids"].combine_chunks().value_lengths().to_numpy(), dtype=np.int64)
    return np.ones(len(dataset), dtype=np.int64)


class CellDataset(torch.utils.data.Dataset):
    """Map-style dataset over chosen rows of several ``datasets.Dataset`` parts; global index = position in the
    concatenation of the parts' row lists.

    Items are dicts of numpy arrays and scalars (the parts' columns: ``input_ids``, ``values``, ``is_zero``,
    ``total_counts``, ``counts_ids``/``counts``, fine-tuning targets, ...) plus ``dataset_index`` (which part) and
    ``row`` (row in that part). An index may also be ``(index, sample_seed)``, as :class:`LengthGroupedBatchSampler`
    yields; the seed is passed on to the collator. ``columns`` limits the columns read (default: all).
    """

    def __init__(self, parts: Sequence[Any], rows: Sequence[np.ndarray] | None = None, *,
                 columns: Sequence[str] | None = None):
        self.parts = list(parts)
        rows = rows if rows is not None else [np.arange(len(p)) for p in self.parts]
        if len(self.parts) != len(rows):
            raise ValueError("one row array per dataset part is needed")
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.offsets = np.zeros(len(self.rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in self.rows], out=self.offsets[1:])
        if columns is None:
            self.columns = [list(p.column_names) for p in self.parts]
        else:
            missing = [(i, c) for i, p in enumerate(self.parts) for c in columns if c not in p.column_names]
            if missing:
                raise DatasetFormatError(f"requested columns are missing (part, column): {missing}")
            self.columns = [list(columns) for _ in self.parts]
        self._arrow = [p.with_format("arrow") for p in self.parts]
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def part_sizes(self) -> list[int]:
        return [len(r) for r in self.rows]

    @property
    def lengths(self) -> np.ndarray:
        """``(len(self),)`` token count per cell, for length grouping."""
        if self._lengths is None:
            self._lengths = np.concatenate(
                [_row_lengths(p)[r] for p, r in zip(self.parts, self.rows)] or [np.zeros(0, dtype=np.int64)]
            )
        return self._lengths

    def column(self, name: str) -> np.ndarray:
        """One scalar column over every cell of this dataset, in order (e.g. the labels, to weight classes)."""
        return np.concatenate([p.with_format("numpy")[name][r] for p, r in zip(self.parts, self.rows)])

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset_index, row in that part)`` of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"cell index {index} out of range for {len(self)} cells")
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return part, int(self.rows[part][index - self.offsets[part]])

    def __getitem__(self, key) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence) -> list[dict[str, Any]]:
        keyed = [(k[0], k[1]) if isinstance(k, (tuple, list)) else (k, None) for k in keys]
        located = [self.locate(int(index)) for index, _ in keyed]
        out: list[dict[str, Any] | None] = [None] * len(keys)
        for part in sorted({p for p, _ in located}):
            positions = [i for i, (p, _) in enumerate(located) if p == part]
            table = self._arrow[part].select_columns(self.columns[part])[[located[i][1] for i in positions]]
            columns: dict[str, Any] = {}
            for name in self.columns[part]:
                column = table.column(name)
                if str(column.type).startswith(("list", "large_list")):
                    columns[name] = _ragged(column)
                else:
                    columns[name] = column.to_numpy(zero_copy_only=False)
            for j, i in enumerate(positions):
                item: dict[str, Any] = {}
                for name, col in columns.items():
                    if isinstance(col, tuple):
                        flat, offs = col
                        item[name] = flat[offs[j]:offs[j + 1]]
                    else:
                        item[name] = col[j]
                item["dataset_index"] = part
                item["row"] = located[i][1]
                if keyed[i][1] is not None:
                    item["sample_seed"] = int(keyed[i][1])
                out[i] = item
        return out  # type: ignore[return-value]


def split_cells(n_cells: int, fraction: float, seed: int, *, groups: Sequence | None = None,
                max_cells: int | None = None, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / held-out split of ``n_cells`` rows; returns sorted ``(train, held_out)`` indices.

    Without ``groups``: ``round(fraction * n)`` held-out rows (at least one when ``fraction > 0`` and ``n > 1``; at
    most ``max_cells``), chosen by a permutation seeded with ``(seed, salt)``. With ``groups`` (one label per row,
    e.g. donors): whole groups are held out, in a seeded order, until they hold at least ``fraction`` of the cells,
    so held-out cells come from donors or batches the training cells do not (at least one group stays in training).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, salt])
    if groups is not None:
        labels = np.asarray(groups).astype(str)
        if len(labels) != n_cells:
            raise ValueError(f"{len(labels)} group labels for {n_cells} cells")
        names = np.unique(labels)
        held = np.zeros(n_cells, dtype=bool)
        for name in rng.permutation(names)[: max(len(names) - 1, 0)]:
            if fraction == 0 or held.sum() >= fraction * n_cells:
                break
            held |= labels == name
        return np.flatnonzero(~held), np.flatnonzero(held)
    n_eval = int(round(fraction * n_cells))
    if fraction > 0 and n_cells > 1:
        n_eval = max(n_eval, 1)
    if max_cells is not None:
        n_eval = min(n_eval, max_cells)
    order = rng.permutation(n_cells)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


@dataclass
class Corpus:
    """The training and held-out cells of one or more tokenized parts sharing a vocabulary."""

    parts: list[TokenizedCells]
    vocab: GeneVocab
    train: CellDataset
    eval: CellDataset
    label_names: list[str] = dataclasses.field(default_factory=list)  # cell types, when labels were added

    @property
    def specs(self) -> list[TokenizationSpec]:
        """Each part's tokenization spec, in ``dataset_index`` order (what the collator re-tokenizes with)."""
        return [p.spec for p in self.parts]

    def shared_spec(self) -> TokenizationSpec | None:
        """The spec a model trained on this corpus tokenizes new cells with: the parts' common encoding, with the
        genes every part's sources measure. None when the parts were encoded differently."""
        first = self.parts[0].spec
        if not all(p.spec.same_encoding(first) for p in self.parts):
            return None
        measured: dict[str, np.ndarray] = {}
        for part in self.parts:
            measured.update(part.spec.measured_genes)
        return first.replace(measured_genes=measured)


def build_corpus(parts: Sequence[TokenizedCells], *, eval_fraction: float = 0.05, seed: int = 0,
                 max_eval_cells: int | None = None, require_counts: bool = False,
                 columns: Sequence[str] | None = None) -> Corpus:
    """Check that ``parts`` share one vocabulary (and, with ``require_counts``, kept their raw counts) and split
    off held-out cells per part (:func:`split_cells`)."""
    if not parts:
        raise ValueError("no datasets given")
    vocab = check_same_vocab([(p.name, p.vocab) for p in parts])
    if require_counts:
        lacking = [p.name for p in parts if not p.has_counts]
        if lacking:
            raise DatasetFormatError(
                f"MCV and count targets need each cell's raw counts, but {lacking} lack the counts_ids/counts "
                "columns; tokenize with `express-tokenize tokenize --keep_counts`, or drop those objectives"
            )
    train_rows, eval_rows = [], []
    for i, part in enumerate(parts):
        tr, ev = split_cells(len(part), eval_fraction, seed, max_cells=max_eval_cells, salt=i)
        train_rows.append(tr)
        eval_rows.append(ev)
        logger.info("%s: %d training and %d held-out cells", part.name, len(tr), len(ev))
    datasets = [p.dataset for p in parts]
    return Corpus(list(parts), vocab, CellDataset(datasets, train_rows, columns=columns),
                  CellDataset(datasets, eval_rows, columns=columns))


def load_corpus(paths: Sequence[str | os.PathLike], *, labels: tuple[str, str] | None = None,
                **kwargs: Any) -> Corpus:
    """Open tokenized dataset folders (:meth:`TokenizedCells.load`) and :func:`build_corpus` them. ``labels``:
    ``(column, target)`` adds integer labels of the obs column ``column`` as ``target`` (:func:`add_label_column`;
    the names are then ``corpus.label_names``)."""
    if not paths:
        raise ValueError("no datasets given")
    parts = [TokenizedCells.load(p) for p in paths]
    names = [str(p.path) for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"a dataset is listed twice: {names}")
    for part, name in zip(parts, names):
        part.name = name
    label_names = add_label_column(parts, *labels) if labels else []
    corpus = build_corpus(parts, **kwargs)
    corpus.label_names = label_names
    return corpus


def counted_training_cells(corpus: Corpus, *, max_cells: int = 20_000, seed: int = 0, purpose: str = "this"
                           ) -> list[dict]:
    """The rows of (a seeded sample of up to ``max_cells``) training cells, each with its kept counts: what the
    corpus statistics of :func:`highly_variable_tokens` and :func:`mean_profiles` are computed from (read once and
    passed to both)."""
    train = corpus.train
    rows = np.arange(len(train))
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_cells, replace=False))
    items = train.__getitems__(rows.tolist())
    if not all("counts_ids" in item for item in items):
        raise DatasetFormatError(f"{purpose} is computed from the kept counts: tokenize with --keep_counts")
    return items


def highly_variable_tokens(corpus: Corpus, n_top_genes: int, *, items: list[dict] | None = None) -> np.ndarray:
    """Token ids of ``n_top_genes`` highly variable genes of the corpus, from the kept counts of the training cells
    (:func:`counted_training_cells`). Each dataset ranks its genes by Seurat's normalised dispersion of log-normalised
    counts (scanpy), and the datasets take turns adding their next-ranked gene, so a small dataset (another tissue,
    another protocol) gets as many genes as a large one rather than being outvoted. Returned sorted. ``items``: the
    cells to use (:func:`counted_training_cells`; read here when not given)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    if items is None:
        items = counted_training_cells(corpus, purpose="the highly variable genes")
    n_special = corpus.vocab.n_special
    rankings = []
    for part in sorted({int(item["dataset_index"]) for item in items}):
        members = [item for item in items if int(item["dataset_index"]) == part]
        if len(members) < 3:
            continue
        lengths = [len(item["counts_ids"]) for item in members]
        counts = sp.csr_matrix(
            (np.concatenate([item["counts"] for item in members]).astype(np.float32),
             np.concatenate([item["counts_ids"] for item in members]).astype(np.int64) - n_special,
             np.concatenate([[0], np.cumsum(lengths)])),
            shape=(len(members), corpus.vocab.n_genes))
        totals = np.asarray([float(item["total_counts"]) for item in members])
        genes = ad.AnnData(sp.diags(1e4 / np.maximum(totals, 1.0)) @ counts)  # per 10k of the whole library
        sc.pp.log1p(genes)
        sc.pp.highly_variable_genes(genes, n_top_genes=min(n_top_genes, corpus.vocab.n_genes))
        score = genes.var["dispersions_norm"].to_numpy(dtype=np.float64)
        detected = np.asarray((counts > 0).sum(axis=0)).ravel() >= 3  # too rare a gene has no stable dispersion
        order = np.argsort(-np.where(detected & np.isfinite(score), score, -np.inf), kind="stable")
        rankings.append(order[: int((detected & np.isfinite(score)).sum())])
    chosen: dict[int, None] = {}  # insertion-ordered set
    for depth in range(max((len(r) for r in rankings), default=0)):
        for ranking in rankings:
            if depth < len(ranking) and len(chosen) < n_top_genes:
                chosen.setdefault(int(ranking[depth]))
    return np.sort(np.fromiter(chosen, dtype=np.int64, count=len(chosen))) + n_special


def mean_profiles(corpus: Corpus, *, items: list[dict] | None = None) -> np.ndarray:
    """``(n_datasets, vocab_size)`` log share of each gene in the pooled kept counts of each dataset's training cells
    (:func:`counted_training_cells`) (+0.5 per gene; special tokens -inf): the MCV reference that knows a cell's dataset and
    nothing else about it. ``items``: the cells to use (:func:`counted_training_cells`; read here when not given)."""
    if items is None:
        items = counted_training_cells(corpus, purpose="the mean profile")
    totals = np.full((len(corpus.parts), corpus.vocab.vocab_size), 0.5)
    for item in items:
        np.add.at(totals[int(item["dataset_index"])], np.asarray(item["counts_ids"], dtype=np.int64),
                  np.asarray(item["counts"], dtype=np.float64))
    totals[:, : corpus.vocab.n_special] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(totals / totals.sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------------------------------------------------------
# Cell-type labels
# ---------------------------------------------------------------------------------------------------------------------
MISSING_LABELS = ("", "nan", "None", "unknown", "unlabelled", "unlabeled")  # values that mean "no label"


def encode_labels(values: Sequence, categories: Sequence[str], *, unlabelled: Sequence[str] = ()) -> np.ndarray:
    """Category index per cell; -100 for missing values, ``unlabelled`` markers and values that are
    not among ``categories`` (held-out cell types the model was not trained on)."""
    index = {c: i for i, c in enumerate(categories)}
    skip = {str(u) for u in unlabelled}
    out = np.full(len(values), IGNORE_INDEX, dtype=np.int64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) in skip:
            continue
        out[i] = index.get(str(v), IGNORE_INDEX)
    return out


def label_categories(values: Sequence, *, unlabelled: Sequence[str] = ()) -> list[str]:
    """Sorted distinct labels, leaving out missing values and ``unlabelled`` markers."""
    skip = {str(u) for u in unlabelled} | {"nan", "None"}
    return sorted({str(v) for v in pd.Series(values).dropna()} - skip)


def add_label_column(parts: Sequence[TokenizedCells], column: str, target: str) -> list[str]:
    """Give every part an integer column ``target``: the index of its cells' ``column`` value among the sorted labels
    of all parts (-100 where a cell has none of them, or its part lacks the column); returns the label names."""
    values = [np.asarray(p.dataset[column], dtype=object).astype(str) if column in p.dataset.column_names else None
              for p in parts]
    if all(v is None for v in values):
        raise DatasetFormatError(f"no dataset has the label column {column!r} (tokenize with --obs_keys {column})")
    names = label_categories(np.concatenate([v for v in values if v is not None]), unlabelled=MISSING_LABELS)
    for part, v in zip(parts, values):
        codes = np.full(len(part), IGNORE_INDEX, dtype=np.int64) if v is None else \
            encode_labels(v, names, unlabelled=MISSING_LABELS)
        if target in part.dataset.column_names:
            part.dataset = part.dataset.remove_columns(target)
        part.dataset = part.dataset.add_column(target, codes.tolist())
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of cells of similar length, deterministic given ``(seed, epoch)``, sharded across processes.

    Per epoch: cells are drawn (all of them, shuffled; or, with ``weights``, ``round(epoch_size * w_i / sum(w))``
    from dataset ``i``, cycling through its cells in a fresh random order), cut into mega-batches of
    ``batch_size * megabatch_batches`` cells, each sorted by length (longest first) and cut into batches. This
    global list of batches does not depend on the number of processes; process ``rank`` takes batches
    ``rank, rank + num_replicas, ...`` so concurrent batches have similar lengths (little padding, balanced
    ranks), and the list is cut to a multiple of ``num_replicas`` so every process runs the same number of steps.
    A run with ``P`` processes and gradient accumulation ``A`` therefore consumes the same batches per optimizer
    step as one process with accumulation ``P * A``. Without ``drop_last`` the last batch may be short and processes
    may get different numbers of batches (fine for evaluation); ``even_shards`` repeats the first batches instead,
    so that training processes step together.

    Each yielded item is ``(cell_index, sample_seed)``; the seed is unique to the cell's visit (epoch, position).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, part_sizes: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None, epoch_size: int | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True, group_by_length: bool = True,
                 megabatch_batches: int = 50, drop_last: bool = True, even_shards: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.part_sizes = list(part_sizes) if part_sizes is not None else [len(self.lengths)]
        if sum(self.part_sizes) != len(self.lengths):
            raise ValueError("part_sizes must add up to the number of cells")
        if weights is not None:
            if len(weights) != len(self.part_sizes):
                raise ValueError(f"{len(weights)} dataset weights for {len(self.part_sizes)} datasets")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"dataset weights must be >= 0 with a positive sum, got {list(weights)}")
            empty = [i for i, (w, n) in enumerate(zip(weights, self.part_sizes)) if w > 0 and n == 0]
            if empty:
                raise ValueError(f"datasets {empty} have a positive weight but no training cells")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.epoch_size = int(epoch_size) if epoch_size is not None else len(self.lengths)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.megabatch_batches = megabatch_batches
        self.drop_last = drop_last
        self.even_shards = even_shards
        self.epoch = 0
        self.start_batch = 0
        if drop_last and self.batches_per_replica(0) == 0:
            raise ValueError(
                f"{len(self.lengths)} cells make no full batch of {batch_size} per process for {num_replicas} "
                "processes; lower the batch size or add data"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate, skipping the first ``start_batch`` of this process's batches (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.lengths)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(n).astype(np.int64)
        total = sum(self.weights)
        starts = np.concatenate([[0], np.cumsum(self.part_sizes)])
        drawn = []
        for i, (w, size) in enumerate(zip(self.weights, self.part_sizes)):
            n_draw = int(round(self.epoch_size * w / total))
            if n_draw == 0 or size == 0:
                continue
            cycles = [rng.permutation(size) for _ in range(-(-n_draw // size))]
            drawn.append(starts[i] + np.concatenate(cycles)[:n_draw])
        order = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)
        return rng.permutation(order).astype(np.int64)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every process's batches of an epoch, in order, as arrays of positions into the epoch order."""
        order = self._epoch_order(epoch)
        positions = np.arange(len(order), dtype=np.int64)
        mega = self.batch_size * self.megabatch_batches
        batches: list[np.ndarray] = []
        for lo in range(0, len(order), mega):
            chunk = positions[lo:lo + mega]
            if self.group_by_length:
                chunk = chunk[np.argsort(-self.lengths[order[chunk]], kind="stable")]
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        elif self.even_shards:  # every process the same number of steps: the first batches fill the last round
            batches += batches[: -len(batches) % self.num_replicas]
        return batches

    def batches_per_replica(self, epoch: int) -> int:
        n_batches = len(self.epoch_batches(epoch))
        if self.drop_last or self.even_shards:
            return n_batches // self.num_replicas
        return -(-(n_batches - self.rank) // self.num_replicas)

    def __len__(self) -> int:
        return max(self.batches_per_replica(self.epoch) - self.start_batch, 0)

    def __iter__(self):
        order = self._epoch_order(self.epoch)
        keys = (np.uint64(self.epoch) << np.uint64(32)) + np.arange(len(order), dtype=np.uint64)
        seeds = mix_seeds(self.seed ^ _SAMPLE_SEED_SALT, keys)
        mine = self.epoch_batches(self.epoch)[self.rank::self.num_replicas]
        for batch in mine[self.start_batch:]:
            yield [(int(order[p]), int(seeds[p])) for p in batch]


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ExpressCollator:
    """Turn rows of :class:`CellDataset` into model keyword arguments (tensors padded to the batch's longest cell).

    With a vocabulary, the token columns become ``input_ids`` (B, T) long, ``values`` (B, T) float32, ``is_zero``
    (B, T) long and ``attention_mask`` (B, T) long. Optionally:

    - a binomial split (``mcv_input_fraction`` = p, or a ``(low, high)`` range from which each visit draws its own p):
      each cell's kept counts are split ``x' ~ Binomial(x, p)``, ``x'' = x - x'`` (the counts outside the
      vocabulary, ``total_counts - sum(x)``, are split the same way, so the input's library size is
      ``sum(x') + outside'``). ``x'`` is re-tokenized with its dataset's spec (:func:`tokenizer.encode_count_rows`,
      zeros sampled among the genes the cell's source measures) and becomes the input. With ``mcv_targets``,
      ``mcv_counts`` (B, vocab_size) float32 holds ``x''`` and ``mcv_library_size`` (B,) its total over the
      vocabulary. ``mcv_unsplit_fraction`` of the visits instead feed the whole cell and target the whole cell
      (so the model also sees full-depth inputs, as at evaluation). Needs ``counts_ids``/``counts``.
    - ``mcv_gene_mask``: ``mcv_gene_mask`` (B, vocab_size) bool, the genes each cell's source measures.
    - ``mcv_output_genes`` (token ids, e.g. the corpus's highly variable genes): MCV scores the held-out counts of
      these genes only; ``mcv_library_size`` is their total and ``mcv_gene_mask`` keeps only them.
    - a second view of each cell for the contrastive objective (``pair_view``): ``"split"`` tokenizes the held-out
      half ``x''`` (two independent halves of one cell), ``"noise"`` two copies of the cell's tokens, each with its
      values multiplied by independent ``exp(noise_scale * N(0, 1))`` (the input is then the first copy); as ``pair_input_ids``, ``pair_values``, ``pair_is_zero``,
      ``pair_attention_mask``.
    - MLM (``mlm_probability`` > 0): each maskable token (a detected gene; sampled zeros too when
      ``mask_sampled_zeros``) is chosen with that probability (at least one per cell); of those, 80% become
      ``<mask>`` (value set to 0, so neither the identity nor the level leaks), 10% a random gene token, 10% stay.
      ``labels`` (B, T) hold the original ids there and -100 elsewhere. ``<cls>``, ``<eos>`` and padding are never
      masked.
    - count targets (``count_targets``): ``count_targets`` (B, T), the raw count of each masked detected gene in the
      model's input (-100 elsewhere), read from the kept counts, and ``library_size`` (B,) the input's library size.
    - a gene panel (``panel_size``): the sparse ``panel_ids``/``panel_counts`` columns become ``gene_counts``
      (B, panel_size) float32, the raw counts of the model's panel genes (the MLP encoder's input, the VAE decoder's
      target); ``panel_thinning`` ``(low, high)`` thins them binomially with a p drawn per visit (augmentation; the
      cell's ``total_counts`` scales by p).
    - ``pass_columns``: further row fields (scalars or fixed-length lists) passed through as tensors under their own
      names (``labels``, ``batch_index``, ``protein_targets``, ``total_counts``, ...).
    - ``truncate``: cut every row to its spec's ``top_k`` detected genes and ``n_zeros`` sampled zeros (cells
      tokenized with more; the rank order makes the first ``top_k`` the same as tokenizing with ``top_k``).
    - ``gene_selection="random"``: the input genes are ``top_k`` genes drawn at random among the cell's detected
      ones on every visit (then ranked by value), instead of its top-ranked ones (an ablation; needs kept counts).
    - ``gene_selection="panel"``: every row is re-tokenized from its kept counts with its spec's gene panel
      (``TokenizationSpec.input_genes``), for rows tokenized before the panel was chosen. A split re-tokenizes
      within the panel whatever this setting.

    Args:
        vocab: the datasets' vocabulary; ``None`` for rows without tokens (the MLP encoder).
        specs: the tokenization spec per ``dataset_index`` (``Corpus.specs``); a split re-tokenizes with them.
        seed: seeds the fallback generator used for rows without a ``sample_seed``.
    """

    vocab: GeneVocab | None = None
    mlm_probability: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    mask_sampled_zeros: bool = False
    mcv_input_fraction: float | tuple[float, float] | None = None
    mcv_targets: bool = True
    mcv_unsplit_fraction: float = 0.0
    mcv_gene_mask: bool = False
    mcv_output_genes: np.ndarray | None = None
    pair_view: str | None = None
    noise_scale: float = 0.5
    count_targets: bool = False
    specs: Sequence[TokenizationSpec] | None = None
    pad_to_multiple_of: int | None = 8
    max_length: int | None = None
    panel_size: int | None = None
    panel_thinning: tuple[float, float] | None = None
    pass_columns: Sequence[str] = ()
    truncate: bool = False
    gene_selection: str = "top"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gene_selection not in ("top", "random", "panel"):
            raise ValueError(f"gene_selection must be 'top', 'random' or 'panel', got {self.gene_selection!r}")
        if self.gene_selection == "panel" and not (self.specs and all(s.input_genes is not None for s in self.specs)):
            raise ValueError("gene_selection='panel' re-tokenizes within each spec's gene panel: give specs with "
                             "input_genes")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}")
        if self.mask_token_fraction < 0 or self.random_token_fraction < 0 or \
                self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise ValueError("mask_token_fraction and random_token_fraction must be >= 0 and add up to at most 1")
        if self.mcv_input_fraction is not None:
            low, high = (self.mcv_input_fraction,) * 2 if np.isscalar(self.mcv_input_fraction) else \
                self.mcv_input_fraction
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"mcv_input_fraction must be in (0, 1) (or a range in it), got "
                                 f"{self.mcv_input_fraction}")
            self._fraction = (float(low), float(high))
        if not 0.0 <= self.mcv_unsplit_fraction < 1.0:
            raise ValueError(f"mcv_unsplit_fraction must be in [0, 1), got {self.mcv_unsplit_fraction}")
        if self.pair_view not in (None, "split", "noise"):
            raise ValueError(f"pair_view must be None, 'split' or 'noise', got {self.pair_view!r}")
        if self.pair_view == "split" and self.mcv_input_fraction is None:
            raise ValueError("pair_view='split' pairs the two halves of a binomial split: set mcv_input_fraction")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.mcv_input_fraction is not None and not self.specs:
            raise ValueError("MCV re-tokenizes cells as their dataset was tokenized: pass specs=corpus.specs")
        if self.vocab is None and (self.mlm_probability > 0 or self.mcv_input_fraction is not None or
                                   self.pair_view is not None):
            raise ValueError("MLM, MCV and second views work on tokens: pass the datasets' vocabulary")
        if self.count_targets and self.mlm_probability <= 0:
            raise ValueError("count targets are the counts of masked genes: they need mlm_probability > 0")
        self.specs = list(self.specs or [TokenizationSpec()])
        self._output = None
        if self.mcv_output_genes is not None:
            self._output = np.zeros(self.vocab.vocab_size, dtype=bool)
            self._output[np.asarray(self.mcv_output_genes, dtype=np.int64)] = True
        if self.vocab is not None:
            self._medians = self.vocab.token_medians.astype(np.float64)
            self._n_special = self.vocab.n_special
        self._rng = np.random.default_rng(self.seed)

    # --- the fallback generator is part of a training run's state ----------------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: Mapping) -> None:
        self._rng.bit_generator.state = state["rng"]

    # --- steps --------------------------------------------------------------------------------------------------------
    def _row_generators(self, rows: Sequence[Mapping]) -> list[np.random.Generator]:
        return [np.random.default_rng(int(r["sample_seed"]) if "sample_seed" in r
                                      else int(self._rng.integers(2**63))) for r in rows]

    def _spec(self, dataset_index: int) -> TokenizationSpec:
        if dataset_index >= len(self.specs):
            raise ValueError(f"row from dataset {dataset_index} but the collator knows {len(self.specs)} specs")
        return self.specs[dataset_index]

    def _candidates(self, row: Mapping) -> np.ndarray:
        found = self._spec(int(row.get("dataset_index", 0))).zero_candidates(row.get("source"))
        return self.vocab.gene_token_ids if found is None else found

    def _retokenize(self, rows: Sequence[Mapping], ids: list[np.ndarray], counts: list[np.ndarray],
                    totals: np.ndarray, seeds: np.ndarray) -> list[dict]:
        """``rows`` with their tokens re-encoded from the given counts (one encoder call per dataset and source)."""
        out = [dict(r) for r in rows]
        groups: dict[tuple[int, str | None], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((int(row.get("dataset_index", 0)), row.get("source")), []).append(i)
        for (dataset_index, _), members in groups.items():
            spec = self._spec(dataset_index)
            if spec.input_genes is not None:  # the panel's genes only (the library size keeps every gene)
                for i in members:
                    read = spec.read_genes(ids[i])
                    ids[i], counts[i] = ids[i][read], counts[i][read]
            if self.gene_selection == "random":
                for i in members:  # top_k of the detected genes at random (ranked by value below)
                    if len(ids[i]) > spec.top_k:
                        pick = np.sort(np.random.default_rng(int(seeds[i])).choice(len(ids[i]), spec.top_k,
                                                                                    replace=False))
                        ids[i], counts[i] = ids[i][pick], counts[i][pick]
            tokens = encode_count_rows(
                [ids[i] for i in members], [counts[i] for i in members],
                # a cell whose split kept nothing gets total 1 so it encodes as <cls> + sampled zeros
                np.maximum(totals[members], 1.0), self._medians, top_k=spec.top_k, n_zeros=spec.n_zeros,
                zero_candidates=self._candidates(rows[members[0]]), cell_seeds=seeds[members],
                cls_id=self.vocab.cls_id if spec.add_cls else None,
                eos_id=self.vocab.eos_id if spec.add_eos else None, target_sum=spec.target_sum,
            )
            for j, i in enumerate(members):
                ids_j, values_j, zero_j = tokens.cell(j)
                out[i].update(input_ids=ids_j, values=values_j, is_zero=zero_j, counts_ids=ids[i],
                              counts=counts[i], total_counts=float(totals[i]))
        return out

    def _split(self, rows, rngs) -> tuple[list[dict], list[dict] | None, np.ndarray, np.ndarray]:
        """Binomially split every row's counts; return the re-tokenized input rows, the re-tokenized held-out halves
        (for ``pair_view="split"``), the held-out counts (B, V) and their library sizes (B,)."""
        low, high = self._fraction
        n = len(rows)
        held_out = np.zeros((n, self.vocab.vocab_size), dtype=np.float32)
        held_out_library = np.zeros(n, dtype=np.float64)
        kept = {"ids": [], "counts": [], "totals": np.zeros(n), "seeds": np.zeros(n, dtype=np.uint64)}
        rest = {"ids": [], "counts": [], "totals": np.zeros(n), "seeds": np.zeros(n, dtype=np.uint64)}
        for i, (row, rng) in enumerate(zip(rows, rngs)):
            if "counts_ids" not in row or "counts" not in row:
                raise DatasetFormatError(
                    "MCV needs each cell's kept raw counts (columns counts_ids, counts): tokenize with "
                    "`express-tokenize tokenize --keep_counts`"
                )
            ids = np.asarray(row["counts_ids"], dtype=np.int64)
            x = np.asarray(row["counts"], dtype=np.int64)
            outside = max(int(round(float(row["total_counts"]))) - int(x.sum()), 0)  # library outside the vocabulary
            p = low if low == high else rng.uniform(low, high)
            x_in = rng.binomial(x, p)
            outside_in = int(rng.binomial(outside, p))
            unsplit = self.mcv_unsplit_fraction > 0 and rng.random() < self.mcv_unsplit_fraction
            target = x if unsplit else x - x_in  # an unsplit visit reads the whole cell and targets the whole cell
            if self._output is not None:  # only the output genes are scored, and their total is the library
                target = np.where(self._output[ids], target, 0)
            held_out[i, ids] = target
            # the model spreads this library over vocabulary genes only, so it excludes the held-out counts outside
            # the vocabulary (those still shape the input's library size below)
            held_out_library[i] = target.sum()
            x_input, outside_input = (x, outside) if unsplit else (x_in, outside_in)
            for part, counts, other in ((kept, x_input, outside_input), (rest, x - x_in, outside - outside_in)):
                keep = counts > 0
                part["ids"].append(ids[keep])
                part["counts"].append(counts[keep])
                part["totals"][i] = counts.sum() + other
                part["seeds"][i] = rng.integers(2**63, dtype=np.uint64)
        inputs = self._retokenize(rows, kept["ids"], kept["counts"], kept["totals"], kept["seeds"])
        halves = self._retokenize(rows, rest["ids"], rest["counts"], rest["totals"], rest["seeds"]) \
            if self.pair_view == "split" else None
        return inputs, halves, held_out, held_out_library

    def _reselect(self, rows, rngs) -> list[dict]:
        """Every row re-tokenized from its whole kept counts (``gene_selection`` "random" or "panel" without a
        split)."""
        n = len(rows)
        ids = [np.asarray(r["counts_ids"], dtype=np.int64) for r in rows]
        counts = [np.asarray(r["counts"], dtype=np.int64) for r in rows]
        totals = np.asarray([float(r["total_counts"]) for r in rows])
        seeds = np.asarray([rng.integers(2**63, dtype=np.uint64) for rng in rngs], dtype=np.uint64).reshape(n)
        return self._retokenize(rows, ids, counts, totals, seeds)

    def _fit_to_spec(self, row: Mapping, ids: np.ndarray, values: np.ndarray,
                     is_zero: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec = self._spec(int(row.get("dataset_index", 0)))
        genes = ids >= self._n_special
        detected = genes & (is_zero == 0)
        zeros = genes & (is_zero != 0)
        keep = ~genes | (detected & (np.cumsum(detected) <= spec.top_k)) | (zeros & (np.cumsum(zeros) <= spec.n_zeros))
        return ids[keep], values[keep], is_zero[keep]

    def _mask(self, ids: np.ndarray, is_zero: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Choose MLM positions of one cell; return the new ids, the labels and the ``<mask>``-ed positions."""
        maskable = ids >= self._n_special
        if not self.mask_sampled_zeros:
            maskable &= is_zero == 0
        chosen = maskable & (rng.random(len(ids)) < self.mlm_probability)
        if not chosen.any() and maskable.any():
            chosen[rng.choice(np.flatnonzero(maskable))] = True
        labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)
        action = rng.random(len(ids))
        to_mask = chosen & (action < self.mask_token_fraction)
        to_random = chosen & (action >= self.mask_token_fraction) & \
            (action < self.mask_token_fraction + self.random_token_fraction)
        new_ids = ids.astype(np.int64).copy()
        new_ids[to_mask] = self.vocab.mask_id
        new_ids[to_random] = rng.integers(self._n_special, self.vocab.vocab_size, size=int(to_random.sum()))
        return new_ids, labels, to_mask

    @staticmethod
    def _counts_of(row: Mapping, ids: np.ndarray, where: np.ndarray) -> np.ndarray:
        """The kept raw count of each token in ``ids`` at the positions ``where`` (-100 elsewhere)."""
        if "counts_ids" not in row:
            raise DatasetFormatError("count targets are read from each cell's kept raw counts: tokenize with "
                                     "`express-tokenize tokenize --keep_counts`")
        kept_ids = np.asarray(row["counts_ids"], dtype=np.int64)  # ascending token ids, as the tokenizer writes them
        kept = np.asarray(row["counts"], dtype=np.float32)
        position = np.clip(np.searchsorted(kept_ids, ids), 0, max(len(kept_ids) - 1, 0))
        found = where & (kept_ids[position] == ids) if len(kept_ids) else np.zeros_like(where)
        return np.where(found, kept[position] if len(kept) else 0, np.float32(IGNORE_INDEX)).astype(np.float32)

    def _tokens(self, rows, rngs, batch: dict[str, torch.Tensor], *, prefix: str = "", masking: bool = True) -> None:
        """Pad the rows' tokens into ``batch`` (MLM masking and count targets when ``masking``)."""
        mlm = masking and self.mlm_probability > 0
        cells = []
        for row, rng in zip(rows, rngs):
            ids = np.asarray(row["input_ids"], dtype=np.int64)
            values = np.asarray(row["values"], dtype=np.float32)
            is_zero = np.asarray(row["is_zero"], dtype=np.int64) if "is_zero" in row else np.zeros(len(ids), np.int64)
            if self.truncate:
                ids, values, is_zero = self._fit_to_spec(row, ids, values, is_zero)
            if self.max_length is not None and len(ids) > self.max_length:
                ids, values, is_zero = ids[:self.max_length], values[:self.max_length], is_zero[:self.max_length]
            labels = counts = None
            if mlm:
                new_ids, labels, masked = self._mask(ids, is_zero, rng)
                if self.count_targets:
                    counts = self._counts_of(row, ids, (labels != IGNORE_INDEX) & (is_zero == 0))
                values = np.where(masked, np.float32(0.0), values)
                ids = new_ids
            cells.append((ids, values, is_zero, labels, counts))

        longest = max(len(c[0]) for c in cells)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(cells)
        input_ids = np.full((n, longest), self.vocab.pad_id, dtype=np.int64)
        values = np.zeros((n, longest), dtype=np.float32)
        is_zero = np.zeros((n, longest), dtype=np.int64)
        attention = np.zeros((n, longest), dtype=np.int64)
        labels = np.full((n, longest), IGNORE_INDEX, dtype=np.int64) if mlm else None
        counts = np.full((n, longest), IGNORE_INDEX, dtype=np.float32) if mlm and self.count_targets else None
        for i, (c_ids, c_values, c_zero, c_labels, c_counts) in enumerate(cells):
            t = len(c_ids)
            input_ids[i, :t], values[i, :t], is_zero[i, :t], attention[i, :t] = c_ids, c_values, c_zero, 1
            if labels is not None:
                labels[i, :t] = c_labels
            if counts is not None:
                counts[i, :t] = c_counts
        batch.update({f"{prefix}input_ids": torch.from_numpy(input_ids), f"{prefix}values": torch.from_numpy(values),
                      f"{prefix}is_zero": torch.from_numpy(is_zero),
                      f"{prefix}attention_mask": torch.from_numpy(attention)})
        if labels is not None:
            batch["labels"] = torch.from_numpy(labels)
        if counts is not None:
            batch["count_targets"] = torch.from_numpy(counts)
            batch["library_size"] = torch.tensor([float(r["total_counts"]) for r in rows], dtype=torch.float32)

    def _noisy(self, rows, rngs) -> list[dict]:
        """``rows`` with every value multiplied by ``exp(noise_scale * N(0, 1))`` (Gaussian noise on the log scale;
        zeros stay zero)."""
        return [dict(r, values=np.asarray(r["values"], dtype=np.float32) *
                     np.exp(self.noise_scale * rng.standard_normal(len(r["values"]))).astype(np.float32))
                for r, rng in zip(rows, rngs)]

    def _gene_mask(self, rows) -> torch.Tensor:
        mask = np.zeros((len(rows), self.vocab.vocab_size), dtype=bool)
        for i, row in enumerate(rows):
            mask[i, self._candidates(row)] = True
            mask[i, np.asarray(row.get("counts_ids", []), dtype=np.int64)] = True  # (a detected gene is measured)
        return torch.from_numpy(mask)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        rngs = self._row_generators(rows)
        batch: dict[str, torch.Tensor] = {}
        if self.mcv_gene_mask:
            batch["mcv_gene_mask"] = self._gene_mask(rows)
        if self._output is not None and self.mcv_input_fraction is not None and self.mcv_targets:
            output = torch.from_numpy(self._output).expand(len(rows), -1)
            batch["mcv_gene_mask"] = batch["mcv_gene_mask"] & output if "mcv_gene_mask" in batch else output.clone()
        halves = None
        if self.gene_selection != "top" and self.mcv_input_fraction is None:
            rows = self._reselect(rows, rngs)
        if self.mcv_input_fraction is not None:
            rows, halves, held_out, held_out_library = self._split(rows, rngs)
            if self.mcv_targets:
                batch["mcv_counts"] = torch.from_numpy(held_out)
                batch["mcv_library_size"] = torch.from_numpy(held_out_library.astype(np.float32))
        pair = halves
        if self.pair_view == "noise":  # two independent noisy copies of the cell: the input and its pair
            clean = rows
            rows, pair = self._noisy(clean, rngs), self._noisy(clean, rngs)
        if self.vocab is not None:
            self._tokens(rows, rngs, batch)
        if self.pair_view is not None:
            self._tokens(pair, rngs, batch, prefix="pair_", masking=False)
        if self.panel_size is not None:
            dense = np.zeros((len(rows), self.panel_size), dtype=np.float32)
            rows = [dict(r) for r in rows]
            for i, (row, rng) in enumerate(zip(rows, rngs)):
                counts = np.asarray(row["panel_counts"], dtype=np.float32)
                if self.panel_thinning is not None:
                    p = rng.uniform(*self.panel_thinning)
                    counts = rng.binomial(np.rint(counts).astype(np.int64), p).astype(np.float32)
                    row["total_counts"] = float(row["total_counts"]) * p
                dense[i, np.asarray(row["panel_ids"], dtype=np.int64)] = counts
            batch["gene_counts"] = torch.from_numpy(dense)
        for name in self.pass_columns:
            batch[name] = torch.as_tensor(np.stack([np.asarray(r[name]) for r in rows]))
        return batch
