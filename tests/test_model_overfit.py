"""A tiny express model learns real cells: MLM and MCV losses fall on a handful of cells from ../shared/data,
tokenized with the tokenizer's own rank encoding straight from the h5ad."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import shared_path
from modeling import ExpressConfig, ExpressForMaskedModeling
from tokenizer import GeneVocab, mix_seeds, rank_encode

N_CELLS = 8
TOP_K = 48
N_ZEROS = 16


def vocab_from_counts(x, gene_ids: list[str]) -> GeneVocab:
    """Per-gene statistics as the tokenizer defines them (exact medians: the file is small), with two group levels
    made from zero-fraction quantiles so the hierarchy tables are exercised on real genes."""
    totals = np.asarray(x.sum(1)).ravel()
    norm = x.multiply(1e4 / totals[:, None]).tocsc()
    medians = np.array([np.median(norm.data[norm.indptr[j]:norm.indptr[j + 1]]) if norm.indptr[j + 1] > norm.indptr[j]
                        else 1.0 for j in range(x.shape[1])])
    n_cells = np.diff(norm.indptr)
    zero_fraction = 1 - n_cells / x.shape[0]
    ranks = np.argsort(np.argsort(zero_fraction))
    groups = np.stack([ranks * 8 // len(ranks) + 1, ranks * 3 // len(ranks) + 1], axis=1)
    return GeneVocab(gene_ids=gene_ids, medians=medians, n_cells=n_cells, zero_fraction=zero_fraction, group_ids=groups)


@pytest.mark.shared_data
def test_tiny_model_overfits_real_cells():
    adata = ad.read_h5ad(shared_path("bmmc_cite_600.h5ad"))
    x = adata.X.tocsr()
    vocab = vocab_from_counts(x, list(adata.var["ensembl_id"].where(adata.var["ensembl_id"] != "", adata.var_names)))

    # MCV: split each cell's counts binomially; the model sees one half and predicts the other.
    rng = np.random.default_rng(0)
    cells = x[:N_CELLS]
    kept = cells.copy()
    kept.data = rng.binomial(cells.data, 0.5).astype(np.int32)
    held_out = cells - kept
    tokens = rank_encode(
        kept.indptr, kept.indices + vocab.n_special, kept.data, np.asarray(kept.sum(1)).ravel(), vocab.token_medians,
        top_k=TOP_K, n_zeros=N_ZEROS, zero_candidates=vocab.gene_token_ids, cell_seeds=mix_seeds(0, np.arange(N_CELLS)),
        cls_id=vocab.cls_id,
    )
    lengths = tokens.lengths
    t = int(lengths.max())
    batch = {"input_ids": torch.zeros(N_CELLS, t, dtype=torch.long), "values": torch.zeros(N_CELLS, t),
             "is_zero": torch.zeros(N_CELLS, t, dtype=torch.long),
             "attention_mask": torch.zeros(N_CELLS, t, dtype=torch.long)}
    for i in range(N_CELLS):
        ids, values, is_zero = tokens.cell(i)
        n = len(ids)
        batch["input_ids"][i, :n] = torch.from_numpy(ids.astype(np.int64))
        batch["values"][i, :n] = torch.from_numpy(values)
        batch["is_zero"][i, :n] = torch.from_numpy(is_zero.astype(np.int64))
        batch["attention_mask"][i, :n] = 1
    assert lengths.min() > 20 and (batch["input_ids"][:, 0] == vocab.cls_id).all()

    # fixed MLM masks on ~15% of detected genes (values hidden too, so the value cannot give the gene away)
    g = torch.Generator().manual_seed(0)
    detected = (batch["attention_mask"] == 1) & (batch["is_zero"] == 0) & (batch["input_ids"] >= vocab.n_special)
    masked = detected & (torch.rand(detected.shape, generator=g) < 0.15)
    labels = torch.where(masked, batch["input_ids"], -100)
    batch["input_ids"] = torch.where(masked, vocab.mask_id, batch["input_ids"])
    batch["values"] = torch.where(masked, 0.0, batch["values"])
    mcv_counts = torch.zeros(N_CELLS, vocab.vocab_size)
    held = held_out.tocoo()
    mcv_counts[held.row, held.col + vocab.n_special] = torch.from_numpy(held.data.astype(np.float32))

    torch.manual_seed(0)
    config = ExpressConfig.from_vocab(vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, gene_embedding_dim=64, max_position_embeddings=128,
                                      hidden_dropout_prob=0.0, use_count_head=False)
    model = ExpressForMaskedModeling(config)
    model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        out = model(**batch, labels=labels, mcv_counts=mcv_counts)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((out.mlm_loss.item(), out.mcv_loss.item()))
    (mlm_start, mcv_start), (mlm_end, mcv_end) = history[0], history[-1]
    assert mlm_start > 0.8 * np.log(vocab.n_genes)  # starts near chance over ~1000 genes
    assert mlm_end < 0.2 * mlm_start, history[::10]  # memorises the masked genes
    assert mcv_end < 0.6 * mcv_start, history[::10]  # and each cell's expression profile
