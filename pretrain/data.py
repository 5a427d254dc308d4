"""Tokenized datasets for training: loading and mixing, the held-out split, batching and the collator.

Shared by pretraining (``pretrain/run.py``) and fine-tuning (``finetune/``):

- :func:`load_corpus` opens one or more tokenized dataset folders (memory-mapped Arrow, as written by
  ``express-tokenize tokenize``), checks they share one vocabulary, and splits off held-out cells;
- :class:`CellDataset` is a map-style dataset over the rows of several folders (a row is one cell);
- :class:`LengthGroupedBatchSampler` orders cells into batches of similar length, mixes datasets with weights, and
  shards batches across processes, deterministically given ``(seed, epoch)``;
- :class:`ExpressCollator` turns a list of rows into model inputs: molecular cross-validation (MCV) split and
  re-tokenization, MLM masking, count targets, dynamic padding.

Randomness. Every cell visit carries its own ``sample_seed``, assigned by the sampler from ``(seed, epoch, position
in the epoch)``. The collator draws the MCV split, the re-tokenization's sampled zeros and the MLM mask for that
cell from a generator seeded by it, so a cell's inputs depend on nothing else: not on the batch it lands in, the
data-loader worker, the number of processes, or how often the run was interrupted and resumed. Rows without a
``sample_seed`` (e.g. a plain ``datasets.Dataset`` in fine-tuning) use the collator's own seeded generator.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer import GeneVocab, encode_count_rows, mix_seeds

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# Written beside a pretrained model: how its corpus was tokenized, so fine-tuning tokenizes new cells the same way
TOKENIZATION_FILE = "tokenization.json"
TOKEN_COLUMNS = ("input_ids", "values", "is_zero")  # is_zero is absent in Geneformer-mode datasets (no zeros)
REQUIRED_COLUMNS = ("input_ids", "values")
COUNT_COLUMNS = ("counts_ids", "counts")
# Cells scanned per source file to recover the genes that file measures (see TokenizedDataset.measured_genes)
MEASURED_SCAN_CELLS = 5000
IGNORE_INDEX = -100
# Keeps the sample-seed stream apart from the tokenizer's per-cell zero-sampling seeds made from the same user seed.
_SAMPLE_SEED_SALT = 0x5A3C_91E7_D24B_086F


class VocabularyMismatchError(ValueError):
    """Datasets (or a dataset and a model/checkpoint) were tokenized with different vocabularies."""


class DatasetFormatError(ValueError):
    """A folder is not a tokenized dataset, or lacks columns an objective needs."""


# ---------------------------------------------------------------------------------------------------------------------
# Tokenized dataset folders
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodingParams:
    """How a dataset's cells were encoded; the MCV re-tokenization must use the same (from ``manifest.json``)."""

    top_k: int = 256
    n_zeros: int = 50
    seed: int = 0
    target_sum: float = 10_000.0
    add_cls: bool = True
    add_eos: bool = False
    zero_candidates: np.ndarray | None = None  # token ids eligible as sampled zeros; None = every vocabulary gene
    # per source file (the ``source`` column): the vocabulary genes that file measures, which the tokenizer samples
    # zeros from; filled by :meth:`TokenizedDataset.measured_genes` for MCV
    zero_candidates_by_source: dict[str, np.ndarray] | None = None

    def candidates_for(self, source: str | None) -> np.ndarray | None:
        if self.zero_candidates_by_source is not None and source in self.zero_candidates_by_source:
            return self.zero_candidates_by_source[source]
        return self.zero_candidates

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> EncodingParams:
        params = manifest.get("params", {})
        defaults = cls()
        candidates = params.get("zero_candidates")
        return cls(
            top_k=int(params.get("top_k", defaults.top_k)),
            n_zeros=int(params.get("n_zeros", defaults.n_zeros)),
            seed=int(params.get("seed", defaults.seed)),
            target_sum=float(params.get("target_sum", defaults.target_sum)),
            add_cls=bool(params.get("add_cls", params.get("cls", defaults.add_cls))),
            add_eos=bool(params.get("add_eos", params.get("eos", defaults.add_eos))),
            zero_candidates=None if candidates is None else np.asarray(candidates, dtype=np.int64),
        )


@dataclass
class TokenizedDataset:
    """One tokenized dataset folder: its Arrow rows, vocabulary and manifest."""

    path: Path
    dataset: Any  # datasets.Dataset, memory-mapped
    vocab: GeneVocab
    manifest: dict
    encoding: EncodingParams

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_counts(self) -> bool:
        return all(c in self.dataset.column_names for c in COUNT_COLUMNS)

    @property
    def lengths(self) -> np.ndarray:
        """``(n_cells,)`` token count per cell (the ``length`` column, or the ``input_ids`` list lengths)."""
        if "length" in self.dataset.column_names:
            return np.asarray(self.dataset.with_format("arrow")["length"].to_numpy(), dtype=np.int64)
        ids = self.dataset.with_format("arrow")["input_ids"]
        return np.asarray(ids.combine_chunks().value_lengths().to_numpy(), dtype=np.int64)


    def measured_genes(self, max_cells: int = MEASURED_SCAN_CELLS) -> dict[str, np.ndarray]:
        """Per source file, the vocabulary genes it measures: the union of its detected genes and sampled zeros.

        The tokenizer samples zeros only among the genes a file measures, so the MCV re-tokenization must too. The
        manifest records how many such genes each input has, not which; they are recovered from the first
        ``max_cells`` cells of each source (each cell contributes its detected genes and ``n_zeros`` uniform draws
        from the measured set, so with 5000 cells x 50 zeros a measured gene is missed with probability ~e^-12 per
        20,000 genes, and a missed gene is one that was never detected).
        """
        table = self.dataset.with_format("arrow")
        names = [c for c in ("input_ids", "is_zero", "counts_ids") if c in self.dataset.column_names]
        sources = (table["source"].to_numpy(zero_copy_only=False) if "source" in self.dataset.column_names
                   else np.full(len(self.dataset), ""))
        found: dict[str, np.ndarray] = {}
        for source in dict.fromkeys(sources.tolist()):
            rows = np.flatnonzero(sources == source)[:max_cells]
            part = table.select_columns(names)[rows.tolist()]
            ids, _ = _ragged(part.column("input_ids"))
            genes = [ids[ids >= self.vocab.n_special]]
            if "counts_ids" in names:
                genes.append(_ragged(part.column("counts_ids"))[0])
            found[str(source)] = np.unique(np.concatenate(genes).astype(np.int64))
        expected = {Path(str(i.get("path", ""))).stem: i.get("genes_in_vocab")
                    for i in self.manifest.get("inputs", []) if isinstance(i, dict)}
        for source, genes in found.items():
            if expected.get(source) is not None and len(genes) < expected[source]:
                logger.info("%s: %s measures %d vocabulary genes, %d of them seen in its cells (the others are "
                            "never detected)", self.path, source, expected[source], len(genes))
        return found


def open_tokenized_dataset(path: str | os.PathLike) -> TokenizedDataset:
    """Open a tokenized dataset folder (Arrow data + vocabulary files + ``manifest.json``) with clear errors."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenized dataset {path} does not exist; make it with `express-tokenize tokenize`")
    try:
        vocab = GeneVocab.load(path)
    except FileNotFoundError as err:
        raise VocabularyMismatchError(
            f"dataset {path} has no vocabulary: {err}. Tokenize it with `express-tokenize tokenize`, which writes "
            "vocab.json, gene_stats.parquet and stats.json beside the data"
        ) from None
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise DatasetFormatError(f"dataset {path} has no {MANIFEST_FILE}; it was not written by express-tokenize")
    manifest = json.loads(manifest_path.read_text())
    recorded = manifest.get("vocab_fingerprint")
    if recorded is not None and recorded != vocab.fingerprint():
        raise VocabularyMismatchError(
            f"dataset {path}: its {MANIFEST_FILE} records vocabulary {recorded} but the vocabulary files beside it "
            f"are {vocab.fingerprint()}; the folder was modified after tokenization — tokenize it again"
        )
    if manifest.get("mode", "express") != "express" and manifest.get("mode") != "geneformer":
        raise DatasetFormatError(f"dataset {path}: unknown tokenization mode {manifest.get('mode')!r}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DatasetFormatError(f"dataset {path} holds no Arrow data readable by datasets.load_from_disk: {err}")
    if not isinstance(dataset, datasets.Dataset):
        raise DatasetFormatError(f"dataset {path} is a DatasetDict; point --dataset at one split's folder")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DatasetFormatError(f"dataset {path} lacks the columns {missing} of a tokenized dataset")
    return TokenizedDataset(path, dataset, vocab, manifest, EncodingParams.from_manifest(manifest))


def check_same_vocab(named_vocabs: Sequence[tuple[str, GeneVocab]], *, hint: str = "") -> GeneVocab:
    """Raise :class:`VocabularyMismatchError` unless every vocabulary has the same fingerprint; return the first."""
    if not named_vocabs:
        raise ValueError("no vocabularies to compare")
    fingerprints = {name: vocab.fingerprint() for name, vocab in named_vocabs}
    if len(set(fingerprints.values())) > 1:
        listing = "; ".join(f"{name}: {fp} ({v.n_genes} genes)" for (name, v), fp in
                            zip(named_vocabs, fingerprints.values()))
        raise VocabularyMismatchError(
            f"vocabularies differ ({listing}). Everything trained together must use one vocabulary: tokenize all "
            f"datasets with the same statistics folder (`express-tokenize tokenize --stats SAME_DIR`).{hint}"
        )
    return named_vocabs[0][1]


# ---------------------------------------------------------------------------------------------------------------------
# Cells from several datasets
# ---------------------------------------------------------------------------------------------------------------------


def _ragged(column) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and 0-based offsets of an Arrow list column."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


class CellDataset(torch.utils.data.Dataset):
    """Map-style dataset over chosen rows of several tokenized datasets; global index = position in the
    concatenation of the parts' row lists.

    Items are dicts of numpy arrays and scalars (``input_ids``, ``values``, ``is_zero``, ``total_counts``, optionally
    ``counts_ids``/``counts`` and extra columns) plus ``dataset_index`` (which part) and ``row`` (row in its folder).
    An index may also be ``(index, sample_seed)``, as :class:`LengthGroupedBatchSampler` yields; the seed is passed
    on to the collator.
    """

    def __init__(self, parts: Sequence[TokenizedDataset], rows: Sequence[np.ndarray], *,
                 columns: Sequence[str] = ()):
        if len(parts) != len(rows):
            raise ValueError("one row array per dataset part is needed")
        self.parts = list(parts)
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.offsets = np.zeros(len(self.rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in self.rows], out=self.offsets[1:])
        wanted = list(TOKEN_COLUMNS) + ["total_counts", "source", *COUNT_COLUMNS, *columns]
        self.columns = [[c for c in dict.fromkeys(wanted) if c in p.dataset.column_names] for p in self.parts]
        missing = [(p.name, c) for p in self.parts for c in columns if c not in p.dataset.column_names]
        if missing:
            raise DatasetFormatError(f"requested columns are missing: {missing}")
        self._arrow = [p.dataset.with_format("arrow") for p in self.parts]
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
                [p.lengths[r] for p, r in zip(self.parts, self.rows)] or [np.zeros(0, dtype=np.int64)]
            )
        return self._lengths

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset_index, row in that dataset's folder)`` of a global index."""
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


def split_held_out(n_cells: int, fraction: float, seed: int, *, max_cells: int | None = None,
                   salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / held-out row split: ``round(fraction * n)`` held-out rows (at least one when
    ``fraction > 0`` and ``n > 1``; at most ``max_cells``), chosen by a permutation seeded with ``(seed, salt)``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    n_eval = int(round(fraction * n_cells))
    if fraction > 0 and n_cells > 1:
        n_eval = max(n_eval, 1)
    if max_cells is not None:
        n_eval = min(n_eval, max_cells)
    order = np.random.default_rng([seed, salt]).permutation(n_cells)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


@dataclass
class Corpus:
    """The training and held-out cells of one or more tokenized datasets sharing a vocabulary."""

    datasets: list[TokenizedDataset]
    vocab: GeneVocab
    train: CellDataset
    eval: CellDataset

    @property
    def encodings(self) -> list[EncodingParams]:
        return [d.encoding for d in self.datasets]

    def shared_tokenization(self) -> dict[str, int] | None:
        """``{"top_k", "n_zeros"}`` when every dataset was tokenized with them (None when they differ, or for a
        Geneformer-mode corpus, which new cells cannot be encoded like without Geneformer's dictionaries)."""
        found = {(e.top_k, e.n_zeros, e.add_cls, e.add_eos) for e in self.encodings}
        if len(found) != 1:
            return None
        top_k, n_zeros, add_cls, add_eos = found.pop()
        return {"top_k": top_k, "n_zeros": n_zeros} if add_cls and not add_eos else None


def load_corpus(paths: Sequence[str | os.PathLike], *, eval_fraction: float = 0.05, seed: int = 0,
                max_eval_cells: int | None = None, require_counts: bool = False,
                columns: Sequence[str] = ()) -> Corpus:
    """Open tokenized dataset folders, check they share one vocabulary and split off held-out cells per dataset.

    Args:
        paths: tokenized dataset folders.
        eval_fraction: share of each dataset's cells held out (see :func:`split_held_out`).
        seed: seed of the split (the same seed always holds out the same cells).
        max_eval_cells: cap on held-out cells per dataset (evaluation cost).
        require_counts: fail unless every dataset kept its raw counts (``--keep_counts``; MCV needs them).
        columns: extra columns to pass to the collator (e.g. ``cell_type``); every dataset must have them.
    """
    if not paths:
        raise ValueError("no datasets given")
    opened = [open_tokenized_dataset(p) for p in paths]
    names = [str(d.path) for d in opened]
    if len(set(names)) != len(names):
        raise ValueError(f"a dataset is listed twice: {names}")
    vocab = check_same_vocab([(str(d.path), d.vocab) for d in opened])
    if require_counts:
        lacking = [str(d.path) for d in opened if not d.has_counts]
        if lacking:
            raise DatasetFormatError(
                f"MCV needs each cell's raw counts, but {lacking} lack the counts_ids/counts columns; "
                "tokenize with `express-tokenize tokenize --keep_counts`, or drop mcv from --objectives"
            )
    if require_counts:
        for d in opened:
            if d.encoding.zero_candidates is None and d.encoding.n_zeros > 0:
                d.encoding.zero_candidates_by_source = d.measured_genes()
    train_rows, eval_rows = [], []
    for i, d in enumerate(opened):
        tr, ev = split_held_out(len(d.dataset), eval_fraction, seed, max_cells=max_eval_cells, salt=i)
        train_rows.append(tr)
        eval_rows.append(ev)
        logger.info("%s: %d training and %d held-out cells", d.path, len(tr), len(ev))
    return Corpus(
        datasets=opened,
        vocab=vocab,
        train=CellDataset(opened, train_rows, columns=columns),
        eval=CellDataset(opened, eval_rows, columns=columns),
    )


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
    step as one process with accumulation ``P * A``.

    Each yielded item is ``(cell_index, sample_seed)``; the seed is unique to the cell's visit (epoch, position).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, part_sizes: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None, epoch_size: int | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True, group_by_length: bool = True,
                 megabatch_batches: int = 50, drop_last: bool = True):
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
        return batches

    def batches_per_replica(self, epoch: int) -> int:
        n_batches = len(self.epoch_batches(epoch))
        return n_batches // self.num_replicas if self.drop_last else -(-(n_batches - self.rank) // self.num_replicas)

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
    """Turn rows of a tokenized dataset into model keyword arguments (tensors padded to the batch's longest cell).

    Always: ``input_ids`` (B, T) long, ``values`` (B, T) float32, ``is_zero`` (B, T) long, ``attention_mask``
    (B, T) long. Optionally:

    - MCV (``mcv_input_fraction`` = p): each cell's kept counts are split ``x' ~ Binomial(x, p)``, ``x'' = x - x'``
      (the counts outside the vocabulary, ``total_counts - sum(x)``, are split the same way, so the input's library
      size is ``sum(x') + outside'``). ``x'`` is re-tokenized with the dataset's own encoding
      (:func:`tokenizer.encode_count_rows`) and becomes the input; ``mcv_counts`` (B, vocab_size) float32 holds
      ``x''`` and ``mcv_library_size`` (B,) its total over the vocabulary genes. Needs ``counts_ids``/``counts``.
    - MLM (``mlm_probability`` > 0): each maskable token (a detected gene; sampled zeros too when
      ``mask_sampled_zeros``) is chosen with that probability (at least one per cell); of those, 80% become
      ``<mask>`` (value set to 0, so neither the identity nor the level leaks), 10% a random gene token, 10% stay.
      ``labels`` (B, T) hold the original ids there and -100 elsewhere. ``<cls>``, ``<eos>`` and padding are never
      masked.
    - count targets (``count_targets``): ``count_targets`` (B, T) the raw count of each masked detected gene (-100
      elsewhere), recovered exactly from its normalised value, and ``library_size`` (B,) the input's library size.
    - ``label_columns``: extra row fields passed through as tensors (e.g. an integer ``label`` for fine-tuning).

    Args:
        vocab: the datasets' vocabulary (special token ids, medians, vocabulary size).
        encodings: encoding parameters per ``dataset_index`` (``Corpus.encodings``; rows without an index use the
            first). MCV needs them, to re-tokenize exactly as the dataset was tokenized.
        seed: seeds the fallback generator used for rows without a ``sample_seed``.
    """

    vocab: GeneVocab
    mlm_probability: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    mask_sampled_zeros: bool = False
    mcv_input_fraction: float | None = None
    count_targets: bool = False
    encodings: Sequence[EncodingParams] | None = None
    pad_to_multiple_of: int | None = 8
    max_length: int | None = None
    label_columns: Sequence[str] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}")
        if self.mask_token_fraction < 0 or self.random_token_fraction < 0 or \
                self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise ValueError("mask_token_fraction and random_token_fraction must be >= 0 and add up to at most 1")
        if self.mcv_input_fraction is not None and not 0.0 < self.mcv_input_fraction < 1.0:
            raise ValueError(f"mcv_input_fraction must be in (0, 1), got {self.mcv_input_fraction}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.mcv_input_fraction is not None and not self.encodings:
            raise ValueError("MCV re-tokenizes cells as their dataset was tokenized: pass encodings=corpus.encodings "
                             "(or EncodingParams.from_manifest(manifest) per dataset)")
        self.encodings = list(self.encodings or [EncodingParams()])
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

    def _mcv_split(self, rows, rngs) -> tuple[list[dict], np.ndarray, np.ndarray]:
        """Binomially split every row's counts; return re-tokenized rows, held-out counts and library sizes."""
        p = float(self.mcv_input_fraction)
        n = len(rows)
        held_out = np.zeros((n, self.vocab.vocab_size), dtype=np.float32)
        held_out_library = np.zeros(n, dtype=np.float64)
        kept_ids, kept_counts, kept_totals, zero_seeds = [], [], np.zeros(n), np.zeros(n, dtype=np.uint64)
        for i, (row, rng) in enumerate(zip(rows, rngs)):
            if "counts_ids" not in row or "counts" not in row:
                raise DatasetFormatError(
                    "MCV needs each cell's kept raw counts (columns counts_ids, counts): tokenize with "
                    "`express-tokenize tokenize --keep_counts`"
                )
            ids = np.asarray(row["counts_ids"], dtype=np.int64)
            x = np.asarray(row["counts"], dtype=np.int64)
            total = float(row["total_counts"])
            outside = max(int(round(total)) - int(x.sum()), 0)  # library size outside the vocabulary
            x_in = rng.binomial(x, p)
            outside_in = int(rng.binomial(outside, p))
            held_out[i, ids] = x - x_in
            # the model spreads this library over vocabulary genes only, so it excludes the held-out counts outside
            # the vocabulary (those still shape the input's library size below)
            held_out_library[i] = x.sum() - x_in.sum()
            keep = x_in > 0
            kept_ids.append(ids[keep])
            kept_counts.append(x_in[keep])
            kept_totals[i] = x_in.sum() + outside_in
            zero_seeds[i] = rng.integers(2**63, dtype=np.uint64)
        new_rows = [dict(r) for r in rows]
        groups: dict[tuple[int, str | None], list[int]] = {}  # one encoder call per dataset and source file
        for i, row in enumerate(rows):
            groups.setdefault((int(row.get("dataset_index", 0)), row.get("source")), []).append(i)
        for (dataset_index, source), members in groups.items():
            enc = self._encoding(dataset_index)
            candidates = enc.candidates_for(source)
            if candidates is None:
                candidates = self.vocab.gene_token_ids
            tokens = encode_count_rows(
                [kept_ids[i] for i in members], [kept_counts[i] for i in members],
                # a cell whose split kept nothing gets total 1 so it encodes as <cls> + sampled zeros
                np.maximum(kept_totals[members], 1.0), self._medians,
                top_k=enc.top_k, n_zeros=enc.n_zeros, zero_candidates=candidates,
                cell_seeds=zero_seeds[members], cls_id=self.vocab.cls_id if enc.add_cls else None,
                eos_id=self.vocab.eos_id if enc.add_eos else None, target_sum=enc.target_sum,
            )
            for j, i in enumerate(members):
                ids_j, values_j, zero_j = tokens.cell(j)
                new_rows[i].update(input_ids=ids_j, values=values_j, is_zero=zero_j,
                                   total_counts=float(kept_totals[i]))
        return new_rows, held_out, held_out_library

    def _encoding(self, dataset_index: int) -> EncodingParams:
        if dataset_index >= len(self.encodings):
            raise ValueError(f"row from dataset {dataset_index} but the collator knows {len(self.encodings)} encodings")
        return self.encodings[dataset_index]

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

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        rngs = self._row_generators(rows)
        batch: dict[str, torch.Tensor] = {}
        if self.mcv_input_fraction is not None:
            rows, held_out, held_out_library = self._mcv_split(rows, rngs)
            batch["mcv_counts"] = torch.from_numpy(held_out)
            batch["mcv_library_size"] = torch.from_numpy(held_out_library.astype(np.float32))

        cells = []
        for row, rng in zip(rows, rngs):
            ids = np.asarray(row["input_ids"], dtype=np.int64)
            values = np.asarray(row["values"], dtype=np.float32)
            is_zero = np.asarray(row["is_zero"], dtype=np.int64) if "is_zero" in row else np.zeros(len(ids), np.int64)
            if self.max_length is not None and len(ids) > self.max_length:
                ids, values, is_zero = ids[:self.max_length], values[:self.max_length], is_zero[:self.max_length]
            labels = counts = None
            if self.mlm_probability > 0:
                new_ids, labels, masked = self._mask(ids, is_zero, rng)
                if self.count_targets:
                    enc = self._encoding(int(row.get("dataset_index", 0)))
                    detected = (labels != IGNORE_INDEX) & (is_zero == 0)
                    # values are x / total * target_sum / median in float32 (relative error 6e-8), so this
                    # inversion is exact after rounding for any count below 2**20
                    raw = np.rint(values.astype(np.float64) * float(row["total_counts"]) *
                                  self._medians[ids] / enc.target_sum)
                    counts = np.where(detected, raw, IGNORE_INDEX).astype(np.float32)
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
        labels = np.full((n, longest), IGNORE_INDEX, dtype=np.int64) if self.mlm_probability > 0 else None
        counts = np.full((n, longest), IGNORE_INDEX, dtype=np.float32) if self.count_targets and labels is not None \
            else None
        for i, (c_ids, c_values, c_zero, c_labels, c_counts) in enumerate(cells):
            t = len(c_ids)
            input_ids[i, :t], values[i, :t], is_zero[i, :t], attention[i, :t] = c_ids, c_values, c_zero, 1
            if labels is not None:
                labels[i, :t] = c_labels
            if counts is not None:
                counts[i, :t] = c_counts
        batch.update(input_ids=torch.from_numpy(input_ids), values=torch.from_numpy(values),
                     is_zero=torch.from_numpy(is_zero), attention_mask=torch.from_numpy(attention))
        if labels is not None:
            batch["labels"] = torch.from_numpy(labels)
        if counts is not None:
            batch["count_targets"] = torch.from_numpy(counts)
            batch["library_size"] = torch.tensor([float(r["total_counts"]) for r in rows], dtype=torch.float32)
        for name in self.label_columns:
            batch[name] = torch.as_tensor(np.asarray([r[name] for r in rows]))
        return batch
