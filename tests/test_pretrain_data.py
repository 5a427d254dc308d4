"""Data pieces of pretraining: dataset loading and vocabulary checks, held-out split, length-grouped sharded batches,
and the collator (padding, MLM masking, MCV split and re-tokenization, count targets).

``make_tokenized_dataset`` writes a small synthetic tokenized dataset following the tokenizer's data contract; the
other pretraining tests import it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pretrain.data import (
    IGNORE_INDEX,
    CellDataset,
    DatasetFormatError,
    ExpressCollator,
    LengthGroupedBatchSampler,
    VocabularyMismatchError,
    load_corpus,
    split_cells,
)
from tokenizer import GeneVocab, TokenizationSpec, TokenizedCells, encode_count_rows, mix_seeds, rank_encode

CELL_TYPES = ("T", "B", "NK", "Mono")


def make_vocab(n_genes: int = 40, *, prefix: str = "G", seed: int = 0) -> GeneVocab:
    rng = np.random.default_rng(seed)
    return GeneVocab(
        gene_ids=[f"{prefix}{i}" for i in range(n_genes)],
        medians=rng.uniform(0.5, 4.0, n_genes) * 10_000 / 200,
        n_cells=rng.integers(5, 100, n_genes),
        zero_fraction=rng.uniform(0.1, 0.9, n_genes),
        group_ids=np.stack([1 + np.arange(n_genes) % 5, 1 + np.arange(n_genes) % 2], axis=1),
    )


def make_counts(n_cells: int, n_genes: int, seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts with a gene program per cell type (so there is something to learn) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CELL_TYPES), n_cells)
    rates = rng.gamma(0.6, 1.5, size=(len(CELL_TYPES), n_genes))
    for c in range(len(CELL_TYPES)):
        rates[c, c::len(CELL_TYPES)] *= 6.0
    depth = rng.uniform(0.5, 2.0, n_cells)[:, None]
    counts = rng.poisson(rates[labels] * depth)
    return sp.csr_matrix(counts.astype(np.int32)), labels


def make_tokenized_dataset(path: Path, *, n_cells: int = 48, vocab: GeneVocab | None = None, seed: int = 0,
                           top_k: int = 12, n_zeros: int = 4, keep_counts: bool = True,
                           measured: np.ndarray | None = None, source: str = "synthetic",
                           counts: sp.csr_matrix | None = None) -> Path:
    """A tokenized dataset folder as ``express-tokenize tokenize --keep_counts --obs_keys cell_type`` writes it.
    ``measured``: indices of the genes the (one) source file measures; zeros are sampled among them only.
    ``counts``: the cells' counts (default: :func:`make_counts`)."""
    vocab = vocab or make_vocab()
    X, labels = make_counts(n_cells, vocab.n_genes, seed)
    if counts is not None:
        X = sp.csr_matrix(counts, dtype=np.int32)
    candidates = vocab.gene_token_ids
    if measured is not None:
        keep = np.zeros(vocab.n_genes)
        keep[measured] = 1
        X = sp.csr_matrix(X.multiply(keep[None, :]).astype(np.int32))
        X.eliminate_zeros()
        candidates = vocab.n_special + np.asarray(measured)
    rng = np.random.default_rng(seed + 1)
    outside = rng.integers(0, 30, n_cells)  # counts of genes outside the vocabulary
    totals = np.asarray(X.sum(axis=1)).ravel() + outside + 1.0
    token_ids = X.indices + vocab.n_special
    tokens = rank_encode(X.indptr, token_ids, X.data, totals, vocab.token_medians, top_k=top_k, n_zeros=n_zeros,
                         zero_candidates=candidates, cell_seeds=mix_seeds(seed, np.arange(n_cells)),
                         cls_id=vocab.cls_id)
    lists = tokens.to_lists()
    columns = {
        "input_ids": lists["input_ids"],
        "values": lists["values"],
        "is_zero": lists["is_zero"],
        "length": tokens.lengths,
        "total_counts": totals.astype(np.float64),
        "cell_id": [f"cell{i}" for i in range(n_cells)],
        "source": [source] * n_cells,
        "cell_type": [CELL_TYPES[i] for i in labels],
        "label": labels.astype(np.int64),
    }
    features = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "values": datasets.List(datasets.Value("float32")),
        "is_zero": datasets.List(datasets.Value("int8")),
        "length": datasets.Value("int32"),
        "total_counts": datasets.Value("float64"),
        "cell_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "cell_type": datasets.Value("string"),
        "label": datasets.Value("int64"),
    }
    if keep_counts:
        columns["counts_ids"] = [token_ids[X.indptr[i]:X.indptr[i + 1]] for i in range(n_cells)]
        columns["counts"] = [X.data[X.indptr[i]:X.indptr[i + 1]] for i in range(n_cells)]
        features["counts_ids"] = datasets.List(datasets.Value("int32"))
        features["counts"] = datasets.List(datasets.Value("int32"))
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    ds.save_to_disk(str(path))
    vocab.save(path)
    spec = TokenizationSpec(top_k=top_k, n_zeros=n_zeros, seed=seed, measured_genes={source: candidates})
    manifest = {
        "tokenization": spec.to_dict(),
        "inputs": ["synthetic"],
        "counts": {"n_cells": n_cells},
        "vocab_fingerprint": vocab.fingerprint(),
    }
    (Path(path) / "manifest.json").write_text(json.dumps(manifest))
    return Path(path)


@pytest.fixture
def two_datasets(tmp_path):
    vocab = make_vocab()
    a = make_tokenized_dataset(tmp_path / "a", n_cells=60, vocab=vocab, seed=1)
    b = make_tokenized_dataset(tmp_path / "b", n_cells=30, vocab=vocab, seed=2, top_k=8, n_zeros=6)
    return a, b, vocab


# --- loading and vocabulary checks --------------------------------------------------------------------------------


def test_load_corpus_splits_each_dataset_deterministically(two_datasets):
    a, b, vocab = two_datasets
    corpus = load_corpus([a, b], eval_fraction=0.1, seed=3, require_counts=True)
    assert corpus.vocab.fingerprint() == vocab.fingerprint()
    assert corpus.train.part_sizes == [54, 27] and corpus.eval.part_sizes == [6, 3]
    for part in range(2):
        train, held = set(corpus.train.rows[part]), set(corpus.eval.rows[part])
        assert not train & held and len(train | held) == (60, 30)[part]
    again = load_corpus([a, b], eval_fraction=0.1, seed=3)
    other = load_corpus([a, b], eval_fraction=0.1, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(corpus.eval.rows, again.eval.rows))
    assert not all(np.array_equal(x, y) for x, y in zip(corpus.eval.rows, other.eval.rows))
    assert [s.top_k for s in corpus.specs] == [12, 8] and [s.n_zeros for s in corpus.specs] == [4, 6]
    assert corpus.shared_spec() is None  # encoded differently: a model cannot tokenize new cells like both


def test_split_cells_bounds_and_groups():
    train, held = split_cells(100, 0.05, 0)
    assert len(held) == 5 and len(train) == 95
    assert len(split_cells(10, 0.01, 0)[1]) == 1  # at least one held-out cell when asked for some
    assert len(split_cells(100, 0.5, 0, max_cells=7)[1]) == 7
    assert len(split_cells(100, 0.0, 0)[1]) == 0
    with pytest.raises(ValueError, match="fraction"):
        split_cells(10, 1.0, 0)
    # by group: whole donors are held out until they hold at least the fraction, and never every donor
    donors = np.repeat(["d0", "d1", "d2", "d3", "d4"], [30, 10, 20, 25, 15])
    train, held = split_cells(100, 0.2, 3, groups=donors)
    assert not set(donors[train]) & set(donors[held]) and len(held) >= 20
    assert len(np.unique(donors[held])) < 5 and len(train) + len(held) == 100
    again = split_cells(100, 0.2, 3, groups=donors)
    assert np.array_equal(again[1], held)
    _, everything = split_cells(100, 0.99, 3, groups=donors)
    assert len(np.unique(donors[everything])) == 4  # one donor always stays for training


def test_mismatched_vocabularies_are_refused(tmp_path):
    a = make_tokenized_dataset(tmp_path / "a", vocab=make_vocab(40))
    b = make_tokenized_dataset(tmp_path / "b", vocab=make_vocab(40, prefix="ENSG"))
    with pytest.raises(VocabularyMismatchError, match=r"vocabularies differ.*/a: .*/b: .*--stats SAME_DIR"):
        load_corpus([a, b])


def test_missing_vocabulary_or_manifest_is_a_clear_error(tmp_path):
    a = make_tokenized_dataset(tmp_path / "a")
    (a / "vocab.json").unlink()
    with pytest.raises(VocabularyMismatchError, match="has no vocabulary.*vocab.json"):
        TokenizedCells.load(a)
    b = make_tokenized_dataset(tmp_path / "b")
    (b / "manifest.json").unlink()
    with pytest.raises(DatasetFormatError, match="no manifest.json"):
        TokenizedCells.load(b)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        TokenizedCells.load(tmp_path / "nowhere")


def test_manifest_fingerprint_must_match_vocabulary_files(tmp_path):
    a = make_tokenized_dataset(tmp_path / "a")
    make_vocab(40, seed=0, prefix="X").save(a)  # vocabulary swapped after tokenization
    with pytest.raises(VocabularyMismatchError, match="modified after tokenization"):
        TokenizedCells.load(a)


def test_mcv_needs_kept_counts(tmp_path):
    a = make_tokenized_dataset(tmp_path / "a", keep_counts=False)
    with pytest.raises(DatasetFormatError, match="--keep_counts"):
        load_corpus([a], require_counts=True)


def test_cell_dataset_rows_match_the_arrow_rows(two_datasets):
    a, b, _ = two_datasets
    corpus = load_corpus([a, b], eval_fraction=0.1, seed=0)
    hf_b = datasets.load_from_disk(str(b))
    index = corpus.train.part_sizes[0] + 5  # sixth training cell of b
    part, row = corpus.train.locate(index)
    assert part == 1 and row == corpus.train.rows[1][5]
    item = corpus.train[(index, 1234)]
    reference = hf_b[row]
    assert item["input_ids"].tolist() == reference["input_ids"]
    np.testing.assert_array_equal(item["values"], np.asarray(reference["values"], dtype=np.float32))
    assert item["counts"].tolist() == reference["counts"] and item["label"] == reference["label"]
    assert item["total_counts"] == reference["total_counts"] and item["sample_seed"] == 1234
    assert item["dataset_index"] == 1
    assert corpus.train.lengths[index] == reference["length"]
    with pytest.raises(IndexError):
        corpus.train[len(corpus.train)]
    assert corpus.train.column("label").tolist() == [hf_a_or_b["label"] for hf_a_or_b in
                                                     (corpus.train[i] for i in range(len(corpus.train)))]
    only = CellDataset([hf_b], columns=["label", "length"])  # a plain datasets.Dataset part, two columns
    assert sorted(only[3]) == ["dataset_index", "label", "length", "row"] and only[3]["label"] == hf_b[3]["label"]
    with pytest.raises(DatasetFormatError, match="missing"):
        CellDataset([hf_b], columns=["nope"])


# --- batching ----------------------------------------------------------------------------------------------------


def _flatten(batches):
    return [i for b in batches for i, _ in b]


def test_sampler_is_deterministic_and_covers_every_cell_once():
    lengths = np.random.default_rng(0).integers(5, 300, 103)
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=1, drop_last=False)
    sampler.set_epoch(0)
    first = list(sampler)
    assert sorted(_flatten(first)) == list(range(103))
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert _flatten(list(sampler)) != _flatten(first)
    seeds = [s for b in first for _, s in b]
    assert len(set(seeds)) == 103  # one seed per visit
    # drop_last: only full batches
    full = LengthGroupedBatchSampler(lengths, 8, seed=1)
    assert all(len(b) == 8 for b in full) and len(full) == 12


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(0).integers(5, 300, 800)

    def padded(group):
        sampler = LengthGroupedBatchSampler(lengths, 16, seed=0, group_by_length=group)
        return sum(16 * max(lengths[i] for i, _ in b) for b in sampler)

    assert padded(True) < 0.6 * padded(False)


def test_sampler_shards_disjointly_and_matches_one_process():
    lengths = np.random.default_rng(0).integers(5, 300, 100)
    one = list(LengthGroupedBatchSampler(lengths, 4, seed=5))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12  # 25 batches cut to an even 24
    assert not set(_flatten(ranks[0])) & set(_flatten(ranks[1]))
    interleaved = [b for pair in zip(*ranks) for b in pair]
    assert interleaved == one[:24]  # same cells, same seeds, same order as one process


def test_sampler_resumes_mid_epoch():
    lengths = np.arange(64)
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5


def test_weighted_mixing_draws_datasets_in_proportion():
    sizes = [100, 20]
    lengths = np.full(sum(sizes), 10)
    sampler = LengthGroupedBatchSampler(lengths, 10, part_sizes=sizes, weights=[1.0, 1.0], seed=0)
    cells = _flatten(list(sampler))
    from_small = sum(i >= 100 for i in cells)
    assert from_small == 60  # half of the 120-cell epoch from the 20-cell dataset: each of its cells 3 times
    assert len(set(i for i in cells if i >= 100)) == 20
    with pytest.raises(ValueError, match="weights"):
        LengthGroupedBatchSampler(lengths, 10, part_sizes=sizes, weights=[1.0])


def test_sampler_refuses_too_little_data():
    with pytest.raises(ValueError, match="no full batch"):
        LengthGroupedBatchSampler(np.ones(5), 4, num_replicas=2)


# --- collator ----------------------------------------------------------------------------------------------------


def _rows(corpus, n, seed0=0):
    return [corpus.train[(i, seed0 + i)] for i in range(n)]


def test_collator_pads_dynamically(two_datasets):
    a, b, vocab = two_datasets
    corpus = load_corpus([b], eval_fraction=0.0)
    rows = _rows(corpus, 5)
    lengths = [len(r["input_ids"]) for r in rows]
    batch = ExpressCollator(vocab, mlm_probability=0.0, pad_to_multiple_of=8)(rows)
    T = batch["input_ids"].shape[1]
    assert T == -(-max(lengths) // 8) * 8
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"].dtype == torch.long and batch["values"].dtype == torch.float32
    for i, r in enumerate(rows):
        assert batch["input_ids"][i, :lengths[i]].tolist() == r["input_ids"].tolist()
        assert (batch["input_ids"][i, lengths[i]:] == vocab.pad_id).all()
        assert (batch["values"][i, lengths[i]:] == 0).all()
    assert "labels" not in batch
    unpadded = ExpressCollator(vocab, mlm_probability=0.0, pad_to_multiple_of=None)(rows)
    assert unpadded["input_ids"].shape[1] == max(lengths)
    short = ExpressCollator(vocab, mlm_probability=0.0, pad_to_multiple_of=None, max_length=5)(rows)
    assert short["input_ids"].shape[1] == 5 and (short["input_ids"][:, 0] == vocab.cls_id).all()


def test_mlm_masking_rates_and_rules(tmp_path):
    vocab = make_vocab(300)
    path = make_tokenized_dataset(tmp_path / "big", n_cells=400, vocab=vocab, top_k=120, n_zeros=20)
    corpus = load_corpus([path], eval_fraction=0.0)
    rows = _rows(corpus, 400)
    original = ExpressCollator(vocab, mlm_probability=0.0, pad_to_multiple_of=None)(rows)["input_ids"]
    batch = ExpressCollator(vocab, mlm_probability=0.15, pad_to_multiple_of=None)(rows)
    labels, ids = batch["labels"], batch["input_ids"]
    chosen = labels != IGNORE_INDEX
    detected = (original >= vocab.n_special) & (batch["is_zero"] == 0)
    assert not (chosen & ~detected).any()  # never <cls>, padding or sampled zeros
    assert torch.equal(labels[chosen], original[chosen])
    rate = chosen.sum().item() / detected.sum().item()
    assert 0.14 < rate < 0.165
    masked = chosen & (ids == vocab.mask_id)
    kept = chosen & (ids == original)
    replaced = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(replaced.sum().item() / n - 0.1) < 0.03  # (a random gene can equal the original: folded into kept)
    assert (ids[replaced] >= vocab.n_special).all() and (ids[replaced] < vocab.vocab_size).all()
    assert (batch["values"][masked] == 0).all()
    assert torch.equal(ids[~chosen], original[~chosen])
    heavier = ExpressCollator(vocab, mlm_probability=0.3, pad_to_multiple_of=None)(rows)["labels"]
    assert 0.28 < (heavier != IGNORE_INDEX).sum().item() / detected.sum().item() < 0.32
    with_zeros = ExpressCollator(vocab, mlm_probability=0.15, mask_sampled_zeros=True)(rows)
    assert ((with_zeros["labels"] != IGNORE_INDEX) & (with_zeros["is_zero"] == 1)).any()


def test_masking_depends_only_on_the_sample_seed(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    collator = ExpressCollator(vocab, mcv_input_fraction=0.5, specs=corpus.specs)
    rows = _rows(corpus, 6)
    whole = collator(rows)
    alone = collator(rows[3:4])  # same cell visit in another batch
    t = alone["attention_mask"].sum().item()
    for key in ("input_ids", "values", "labels"):
        assert torch.equal(whole[key][3, :t], alone[key][0, :t])
    assert torch.equal(whole["mcv_counts"][3], alone["mcv_counts"][0])
    revisit = collator(_rows(corpus, 6, seed0=100))
    assert not torch.equal(revisit["mcv_counts"], whole["mcv_counts"])


def test_fallback_generator_state_round_trips(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    rows = [{k: v for k, v in r.items() if k != "sample_seed"} for r in _rows(corpus, 8)]
    collator = ExpressCollator(vocab, seed=7)
    state = collator.state_dict()
    first = collator(rows)
    second = collator(rows)
    assert not torch.equal(first["labels"], second["labels"])
    collator.load_state_dict(state)
    assert torch.equal(collator(rows)["labels"], first["labels"])


def test_mcv_split_and_retokenization(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    rows = _rows(corpus, 20)
    collator = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.4, pad_to_multiple_of=None,
                               specs=corpus.specs)
    batch = collator(rows)
    held = batch["mcv_counts"]
    assert held.shape == (20, vocab.vocab_size) and held.dtype == torch.float32
    enc = corpus.specs[0]
    for i, row in enumerate(rows):
        x = np.zeros(vocab.vocab_size)
        x[row["counts_ids"]] = row["counts"]
        x_in = x - held[i].numpy()
        assert (held[i].numpy() >= 0).all() and (x_in >= 0).all()  # x'' <= x
        assert held[i][x == 0].sum() == 0
        assert batch["mcv_library_size"][i].item() == held[i].sum().item()
        # the input is the same encoder run on x' (one implementation of the encoding); its library size is
        # sum(x') plus a binomial share of the counts outside the vocabulary, recovered from the input's values
        ids = np.flatnonzero(x_in)
        t = batch["attention_mask"][i].sum().item()
        top = batch["input_ids"][i, 1].item()
        total_in = x_in[top] * 10_000 / vocab.token_medians[top] / batch["values"][i, 1].item()
        outside = round(row["total_counts"]) - x.sum()
        assert x_in.sum() - 1e-3 <= total_in <= x_in.sum() + outside + 1e-3
        expected = encode_count_rows([ids], [x_in[ids]], np.array([total_in]), vocab.token_medians,
                                     top_k=enc.top_k, n_zeros=0, cls_id=vocab.cls_id)
        got_ids = batch["input_ids"][i, :t].numpy()
        got_zero = batch["is_zero"][i, :t].numpy()
        detected = got_ids[got_zero == 0]
        assert detected.tolist() == expected.input_ids.tolist()
        np.testing.assert_allclose(batch["values"][i, :t].numpy()[got_zero == 0], expected.values, rtol=1e-6)
        assert (got_zero == 1).sum() == min(enc.n_zeros, vocab.n_genes - len(ids))
        assert not set(got_ids[got_zero == 1]) & set(ids)  # sampled zeros really are zero in x'


def test_gene_selection_random_and_panel_re_encode_the_kept_counts(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0, require_counts=True)
    rows = _rows(corpus, 30)
    spec = corpus.specs[0]

    def detected(batch, i):
        t = batch["attention_mask"][i].sum().item()
        ids, zero = batch["input_ids"][i, :t].numpy(), batch["is_zero"][i, :t].numpy()
        genes = ids >= vocab.n_special
        return ids[genes & (zero == 0)], batch["values"][i, :t].numpy()[genes & (zero == 0)], ids[genes & (zero == 1)]

    # random: top_k of the detected genes, a different draw than the top-ranked ones, ranked by value
    batch = ExpressCollator(vocab, mlm_probability=0.0, pad_to_multiple_of=None, specs=corpus.specs,
                            gene_selection="random")(rows)
    differs = 0
    for i, row in enumerate(rows):
        ids, values, _ = detected(batch, i)
        assert set(ids.tolist()) <= set(row["counts_ids"].tolist())
        assert len(ids) == min(spec.top_k, len(row["counts_ids"])) and (np.diff(values) <= 0).all()
        stored, stored_zero = np.asarray(row["input_ids"]), np.asarray(row["is_zero"])
        top = stored[(stored_zero == 0) & (stored >= vocab.n_special)]
        differs += ids.tolist() != top.tolist()
    assert differs >= 20
    # panel: the encoder on the panel's counts, with the whole library; zeros from the panel
    panel = vocab.gene_token_ids[::3]
    specs = [s.replace(input_genes=panel) for s in corpus.specs]
    batch = ExpressCollator(vocab, mlm_probability=0.0, pad_to_multiple_of=None, specs=specs,
                            gene_selection="panel")(rows)
    for i, row in enumerate(rows):
        keep = np.isin(row["counts_ids"], panel)
        expected = encode_count_rows([row["counts_ids"][keep]], [row["counts"][keep]],
                                     np.array([row["total_counts"]]), vocab.token_medians, top_k=spec.top_k,
                                     n_zeros=0, cls_id=vocab.cls_id)
        ids, values, zeros = detected(batch, i)
        assert ids.tolist() == expected.input_ids[1:].tolist()
        np.testing.assert_allclose(values, expected.values[1:], rtol=1e-6)
        assert set(zeros.tolist()) <= set(panel.tolist()) - set(row["counts_ids"].tolist())
        assert len(zeros) == spec.n_zeros
    with pytest.raises(ValueError, match="input_genes"):
        ExpressCollator(vocab, specs=corpus.specs, gene_selection="panel")


def test_mcv_split_is_binomial(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    row = corpus.train[0]
    collator = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.3, specs=corpus.specs)
    draws = torch.stack([collator([dict(row, sample_seed=s)])["mcv_counts"][0] for s in range(400)])
    x = torch.zeros(vocab.vocab_size)
    x[torch.tensor(row["counts_ids"], dtype=torch.long)] = torch.tensor(row["counts"], dtype=torch.float32)
    mean_held = draws.mean(0)
    # E[x''] = (1 - p) x, sd of the mean sqrt(p (1 - p) x / 400)
    tolerance = 4 * torch.sqrt(0.21 * x / 400) + 1e-6
    assert ((mean_held - 0.7 * x).abs() <= tolerance).all()
    assert draws.var(0)[x > 3].min() > 0  # fresh split on every visit


def test_count_targets_are_the_raw_counts_of_masked_detected_genes(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    rows = _rows(corpus, 30)
    batch = ExpressCollator(vocab, mlm_probability=0.3, count_targets=True)(rows)
    targets, labels = batch["count_targets"], batch["labels"]
    n_checked = 0
    for i, row in enumerate(rows):
        lookup = dict(zip(row["counts_ids"].tolist(), row["counts"].tolist()))
        for t in range(targets.shape[1]):
            if targets[i, t] != IGNORE_INDEX:
                assert targets[i, t].item() == lookup[labels[i, t].item()]
                n_checked += 1
            elif labels[i, t] != IGNORE_INDEX:
                assert batch["is_zero"][i, t] == 1
    assert n_checked > 30
    np.testing.assert_allclose(batch["library_size"].numpy(), [r["total_counts"] for r in rows], rtol=1e-6)
    # under MCV the targets are counts of the input x' and the library size is that of x'
    mcv = ExpressCollator(vocab, mlm_probability=0.3, count_targets=True, mcv_input_fraction=0.5,
                          specs=corpus.specs)(rows)
    totals = np.array([r["total_counts"] for r in rows])
    kept_in_vocab = np.array([r["counts"].sum() for r in rows]) - mcv["mcv_library_size"].numpy()
    assert (mcv["library_size"].numpy() >= kept_in_vocab).all()
    assert (mcv["library_size"].numpy() + mcv["mcv_library_size"].numpy() <= totals).all()
    scored = mcv["count_targets"] != IGNORE_INDEX
    assert scored.any() and (mcv["count_targets"][scored] >= 1).all()


def test_pass_columns_and_the_gene_panel(two_datasets):
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    rows = _rows(corpus, 4)
    batch = ExpressCollator(vocab, mlm_probability=0.0, pass_columns=["label", "total_counts"])(rows)
    assert batch["label"].tolist() == [r["label"] for r in rows]
    assert batch["total_counts"].tolist() == [r["total_counts"] for r in rows]
    # rows without tokens (the MLP encoder): the sparse panel columns become dense counts
    panel_rows = [{"panel_ids": np.array([0, 3]), "panel_counts": np.array([2, 5]), "labels": 1},
                  {"panel_ids": np.array([1]), "panel_counts": np.array([7]), "labels": 0}]
    dense = ExpressCollator(mlm_probability=0.0, panel_size=4, pass_columns=["labels"])(panel_rows)
    assert dense["gene_counts"].tolist() == [[2, 0, 0, 5], [0, 7, 0, 0]] and dense["labels"].tolist() == [1, 0]
    assert set(dense) == {"gene_counts", "labels"}


def test_collator_rejects_bad_settings(two_datasets):
    vocab = two_datasets[2]
    with pytest.raises(ValueError, match="mlm_probability"):
        ExpressCollator(vocab, mlm_probability=1.5)
    with pytest.raises(ValueError, match="mcv_input_fraction"):
        ExpressCollator(vocab, mcv_input_fraction=1.0)
    with pytest.raises(ValueError, match="specs="):
        ExpressCollator(vocab, mcv_input_fraction=0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        ExpressCollator(mlm_probability=0.15)
    row = {"input_ids": np.array([2, 5]), "values": np.ones(2), "is_zero": np.zeros(2), "total_counts": 3.0}
    with pytest.raises(DatasetFormatError, match="keep_counts"):
        ExpressCollator(vocab, mcv_input_fraction=0.5, specs=[TokenizationSpec()])([row])
    with pytest.raises(DatasetFormatError, match="keep_counts"):
        ExpressCollator(vocab, mlm_probability=0.5, count_targets=True)([row])


def test_mcv_samples_zeros_among_the_genes_the_source_file_measures(tmp_path):
    vocab = make_vocab(80)
    measured = np.arange(0, 80, 2)  # the file measures every other gene
    path = make_tokenized_dataset(tmp_path / "half", n_cells=200, vocab=vocab, measured=measured, source="half",
                                  n_zeros=10)
    corpus = load_corpus([path], eval_fraction=0.0, require_counts=True)
    # the manifest's spec says exactly which genes the file measures (the tokenizer wrote them)
    assert corpus.specs[0].zero_candidates("half").tolist() == (vocab.n_special + measured).tolist()
    batch = ExpressCollator(vocab, mcv_input_fraction=0.5, mlm_probability=0.0,
                            specs=corpus.specs)(_rows(corpus, 50))
    zeros = batch["input_ids"][batch["is_zero"] == 1]
    assert len(zeros) > 100 and set(zeros.tolist()) <= set((vocab.n_special + measured).tolist())


def test_split_views_unsplit_visits_jitter_and_source_genes(tmp_path):
    vocab = make_vocab(80)
    measured = np.arange(0, 80, 2)
    path = make_tokenized_dataset(tmp_path / "half", n_cells=60, vocab=vocab, measured=measured, source="half",
                                  n_zeros=5)
    corpus = load_corpus([path], eval_fraction=0.0, require_counts=True)
    rows = _rows(corpus, 60)
    collator = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=(0.2, 0.8), pair_view="split",
                               mcv_gene_mask=True, specs=corpus.specs, pad_to_multiple_of=None)
    batch = collator(rows)
    # the second view is the held-out half: both halves' counts add up to the cell's
    for i, row in enumerate(rows):
        t1, t2 = batch["attention_mask"][i].sum().item(), batch["pair_attention_mask"][i].sum().item()
        one = set(batch["input_ids"][i, :t1][batch["is_zero"][i, :t1] == 0].tolist()) - {vocab.cls_id}
        two = set(batch["pair_input_ids"][i, :t2][batch["pair_is_zero"][i, :t2] == 0].tolist()) - {vocab.cls_id}
        assert one | two <= set(row["counts_ids"].tolist())
        assert batch["mcv_counts"][i].sum() == sum(row["counts"]) - collator._split([row], [np.random.default_rng(
            row["sample_seed"])])[0][0]["counts"].sum()
    # the genes each cell's source measures, and nothing else
    assert batch["mcv_gene_mask"].sum(1).tolist() == [len(measured)] * 60
    assert batch["mcv_gene_mask"][:, vocab.n_special + measured].all()
    # each visit draws its own fraction: the kept share of counts varies across cells within the range
    kept = []
    for row in rows:
        inputs, *_ = collator._split([row], [np.random.default_rng(row["sample_seed"])])
        kept.append(inputs[0]["counts"].sum() / max(row["counts"].sum(), 1))
    assert 0.15 < min(kept) < 0.45 and 0.55 < max(kept) < 0.85
    # unsplit visits read the whole cell and target the whole cell
    whole = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.5, mcv_unsplit_fraction=0.99999,
                            specs=corpus.specs)(rows[:5])
    for i, row in enumerate(rows[:5]):
        assert whole["mcv_counts"][i].sum() == row["counts"].sum()
        assert whole["input_ids"][i, 1].item() == row["input_ids"][1]  # the same top gene as the full cell
    noisy = ExpressCollator(vocab, mlm_probability=0.0, pair_view="noise", noise_scale=0.5,
                            specs=corpus.specs)(rows[:5])
    clean = ExpressCollator(vocab, mlm_probability=0.0, specs=corpus.specs)(rows[:5])
    assert torch.equal(noisy["pair_input_ids"], noisy["input_ids"])
    assert torch.equal(noisy["input_ids"], clean["input_ids"])
    # two independent noisy views, neither the clean values
    assert not torch.allclose(noisy["pair_values"], noisy["values"])
    assert not torch.allclose(noisy["values"], clean["values"])
    assert torch.equal(noisy["pair_values"] == 0, clean["values"] == 0)  # zeros stay zero
    genes = clean["values"] > 0  # log-ratios of the noise: sd about noise_scale
    ratio = torch.log(noisy["values"][genes] / clean["values"][genes])
    assert 0.4 < ratio.std().item() < 0.6 and abs(ratio.mean().item()) < 0.1


def test_mcv_output_genes_score_only_those_genes(two_datasets):
    """With output genes, the held-out counts of other genes are dropped, the library is the output genes' held-out
    total, and the gene mask keeps only them (ANDed with the source's genes when both are asked for); the input
    split is the same as without them."""
    a, _, vocab = two_datasets
    corpus = load_corpus([a], eval_fraction=0.0)
    rows = _rows(corpus, 12)
    output = vocab.gene_token_ids[::3]
    plain = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.5, specs=corpus.specs)(rows)
    only = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.5, specs=corpus.specs,
                           mcv_output_genes=output)(rows)
    both = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.5, specs=corpus.specs,
                           mcv_output_genes=output, mcv_gene_mask=True)(rows)
    keep = np.zeros(vocab.vocab_size, dtype=bool)
    keep[output] = True
    assert torch.equal(only["input_ids"], plain["input_ids"]) and torch.equal(only["values"], plain["values"])
    torch.testing.assert_close(only["mcv_counts"], plain["mcv_counts"] * torch.from_numpy(keep))
    torch.testing.assert_close(only["mcv_library_size"], only["mcv_counts"].sum(-1))
    assert torch.equal(only["mcv_gene_mask"], torch.from_numpy(keep).expand(12, -1))
    source = ExpressCollator(vocab, mlm_probability=0.0, mcv_input_fraction=0.5, specs=corpus.specs,
                             mcv_gene_mask=True)(rows)["mcv_gene_mask"]
    assert torch.equal(both["mcv_gene_mask"], source & torch.from_numpy(keep))


def test_highly_variable_tokens_are_the_genes_that_vary(tmp_path):
    """Every gene is Poisson at its own rate (spread over two orders of magnitude), but nine genes, one in every
    eight by mean (Seurat compares a gene with the genes of its bin of means), switch between 0.05 and 1.95 times
    their rate from cell to cell: those nine are the top nine variable genes of two datasets, as sorted token ids."""
    from pretrain.data import highly_variable_tokens

    vocab = make_vocab(80)
    rng = np.random.default_rng(0)
    datasets_ = []
    for k, n in enumerate((300, 200)):
        rates = np.tile(np.geomspace(0.5, 50.0, vocab.n_genes), (n, 1))
        rates[:, 11::8] *= np.where(rng.integers(0, 2, size=(n, 1)) == 1, 1.95, 0.05)  # genes 11, 19, .., 75 vary
        x = rng.poisson(rates)
        datasets_.append(make_tokenized_dataset(tmp_path / f"d{k}", n_cells=n, vocab=vocab, seed=k, top_k=40,
                                                counts=sp.csr_matrix(x)))
    corpus = load_corpus(datasets_, eval_fraction=0.0)
    tokens = highly_variable_tokens(corpus, 9)
    assert tokens.tolist() == list(range(vocab.n_special + 11, vocab.n_special + 80, 8))
    assert len(highly_variable_tokens(corpus, 25)) == 25


def test_highly_variable_tokens_give_a_small_dataset_its_share(tmp_path):
    """A large dataset whose variable genes are 41, 81, 121, 161 and a four times smaller one whose variable genes
    are 61, 101, 141, 181 (each on in half the cells, off in the rest): the top eight are both sets (the datasets
    take turns), not the large dataset's choice alone."""
    from pretrain.data import highly_variable_tokens

    vocab = make_vocab(200)
    rng = np.random.default_rng(1)
    folders = []
    for k, (n, varying) in enumerate(((400, [41, 81, 121, 161]), (100, [61, 101, 141, 181]))):
        rates = np.tile(np.geomspace(0.5, 50.0, vocab.n_genes), (n, 1))
        rates[:, varying] *= np.where(rng.integers(0, 2, size=(n, 1)) == 1, 2.0, 0.0)
        folders.append(make_tokenized_dataset(tmp_path / f"d{k}", n_cells=n, vocab=vocab, seed=k, top_k=40,
                                              counts=sp.csr_matrix(rng.poisson(rates))))
    tokens = highly_variable_tokens(load_corpus(folders, eval_fraction=0.0), 8)
    assert (tokens - vocab.n_special).tolist() == [41, 61, 81, 101, 121, 141, 161, 181]


def test_mean_profiles_are_each_datasets_pooled_gene_shares(tmp_path):
    """The MCV reference profile of a dataset is log((pooled counts of each gene + 0.5) / total) over its training
    cells' kept counts; special tokens get -inf and the two datasets keep their own profiles."""
    from pretrain.data import mean_profiles

    vocab = make_vocab(30)
    counts = []
    folders = []
    for k in range(2):
        x, _ = make_counts(40, vocab.n_genes, seed=10 + k)
        counts.append(x)
        folders.append(make_tokenized_dataset(tmp_path / f"d{k}", n_cells=40, vocab=vocab, seed=k, counts=x))
    corpus = load_corpus(folders, eval_fraction=0.25, seed=2)
    profiles = mean_profiles(corpus)
    assert profiles.shape == (2, vocab.vocab_size)
    assert np.all(np.isneginf(profiles[:, : vocab.n_special]))
    for k in range(2):
        rows = corpus.train.rows[k]
        pooled = np.asarray(counts[k][rows].sum(axis=0)).ravel() + 0.5
        np.testing.assert_allclose(profiles[k, vocab.n_special:], np.log(pooled / pooled.sum()), rtol=1e-10)
