"""Pretraining and classification heads: each loss against a manual computation, sparse MLM, loss weighting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling import ExpressForCellClassification, ExpressForMaskedModeling
from modeling.likelihoods import log_nb, log_ztnb
from test_model_forward import CLS, EOS, MASK, N_SPECIAL, VOCAB, collate, make_cells, tiny_model


def masked_batch(seed: int = 0):
    batch = collate(make_cells([14, 9, 6], seed=seed))
    labels = torch.full_like(batch["input_ids"], -100)
    for i, j in [(0, 2), (0, 5), (0, 9), (1, 1), (1, 4), (2, 3)]:
        labels[i, j] = batch["input_ids"][i, j]
    batch["input_ids"] = torch.where(labels != -100, MASK, batch["input_ids"])
    return batch, labels


def held_out_counts(n_cells: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(n_cells, VOCAB, generator=g) * 3, generator=g)
    counts[:, :N_SPECIAL] = 0
    return counts


# --- MLM -------------------------------------------------------------------------------------------------------------


def test_mlm_loss_is_cross_entropy_over_masked_positions_only():
    batch, labels = masked_batch()
    model = tiny_model(ExpressForMaskedModeling)
    seen = []
    model.mlm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        out = model(**batch, labels=labels)
        masked = labels != -100
        assert seen == [(int(masked.sum()), 32)]  # the head saw the 6 masked states, nothing else
        full_logits = model.mlm_head(out.last_hidden_state)  # (B, T, V), computed here for the reference only
    manual = F.cross_entropy(full_logits[masked], labels[masked])
    torch.testing.assert_close(out.mlm_loss, manual)
    torch.testing.assert_close(out.loss, manual)  # only MLM targets given
    torch.testing.assert_close(out.logits, full_logits[masked])


def test_mlm_loss_independent_of_ignored_labels():
    """Whatever sits at -100 positions is ignored; only the masked positions' labels count."""
    batch, labels = masked_batch()
    model = tiny_model(ExpressForMaskedModeling)
    with torch.no_grad():
        base = model(**batch, labels=labels).mlm_loss
        fewer = labels.clone()
        fewer[0, 9] = -100
        assert not torch.allclose(model(**batch, labels=fewer).mlm_loss, base)
        relabelled = labels.clone()
        relabelled[0, 2] = (labels[0, 2] + 1 - N_SPECIAL) % (VOCAB - N_SPECIAL) + N_SPECIAL
        assert not torch.allclose(model(**batch, labels=relabelled).mlm_loss, base)


def test_no_masked_token_gives_zero_loss_and_zero_grads():
    batch, labels = masked_batch()
    model = tiny_model(ExpressForMaskedModeling).train()
    out = model(**batch, labels=torch.full_like(labels, -100))
    assert out.mlm_loss.item() == 0.0 and out.logits.shape == (0, VOCAB)
    out.loss.backward()
    assert all(torch.all(p.grad == 0) for p in model.parameters() if p.grad is not None)


# --- MCV -------------------------------------------------------------------------------------------------------------


def test_mcv_loss_equals_manual_negative_binomial():
    batch, _ = masked_batch()
    counts = held_out_counts()
    library = counts.sum(-1) * 1.5  # a held-out library that also covers genes outside the vocabulary
    model = tiny_model(ExpressForMaskedModeling)
    with torch.no_grad():
        model.mcv_head.log_theta.uniform_(-1, 2)
        out = model(**batch, mcv_counts=counts, mcv_library_size=library)
        logits = model.mcv_head.decoder(model.mcv_head.transform(out.last_hidden_state[:, 0]))
    share = torch.softmax(logits[:, N_SPECIAL:], dim=-1)
    mean = library[:, None] * share
    theta = model.mcv_head.log_theta.exp()[N_SPECIAL:]
    manual = -log_nb(counts[:, N_SPECIAL:], mean, theta.expand_as(mean)).sum() / counts.sum()
    torch.testing.assert_close(out.mcv_loss, manual)
    torch.testing.assert_close(out.loss, manual)
    assert out.mlm_loss is None and out.count_loss is None and out.logits is None  # only the MCV head ran
    torch.testing.assert_close(torch.softmax(out.mcv_logits, -1)[:, N_SPECIAL:], share)
    torch.testing.assert_close(out.mcv_theta[N_SPECIAL:], theta)
    # the library size defaults to the held-out counts' total
    with torch.no_grad():
        default = model(**batch, mcv_counts=counts).mcv_loss
    manual_default = -log_nb(counts[:, N_SPECIAL:], counts.sum(-1, keepdim=True) * share, theta.expand_as(share)).sum()
    torch.testing.assert_close(default, manual_default / counts.sum())


def test_cell_level_mcv_from_the_pooled_embedding_over_the_sources_genes_per_cell():
    """``mcv_input="pooled"``: the held-out counts are decoded from the pooled cell embedding; the softmax spreads
    each cell's library over the genes its source measures only (``mcv_gene_mask``); with
    ``mcv_normalization="cell"`` the loss is each cell's NLL per held-out count, averaged over cells."""
    batch, _ = masked_batch()
    counts = held_out_counts()
    measured = torch.ones_like(counts, dtype=torch.bool)
    measured[0, N_SPECIAL:N_SPECIAL + 20] = False  # cell 0's source does not measure 20 genes ...
    counts[0, N_SPECIAL:N_SPECIAL + 20] = 0  # ... so it holds no counts there
    counts[2] *= 5  # a deep cell: it must not dominate the per-cell loss
    model = tiny_model(ExpressForMaskedModeling, mcv_input="pooled", mcv_normalization="cell",
                       classifier_pooling="mean")
    with torch.no_grad():
        model.mcv_head.log_theta.uniform_(-1, 2)
        out = model(**batch, mcv_counts=counts, mcv_gene_mask=measured)
        logits = model.mcv_head.decoder(model.mcv_head.transform(out.pooler_output))
    theta = model.mcv_head.log_theta.exp()[N_SPECIAL:]
    per_cell = []
    for i in range(3):
        keep = measured[i, N_SPECIAL:]
        share = torch.softmax(logits[i, N_SPECIAL:][keep], -1)
        x = counts[i, N_SPECIAL:][keep]
        nll = -log_nb(x, x.sum() * share, theta[keep]).sum()
        per_cell.append(nll / x.sum())
        assert torch.all(torch.isinf(out.mcv_logits[i, N_SPECIAL:][~keep]))
    torch.testing.assert_close(out.mcv_loss, torch.stack(per_cell).mean())
    # normalised per held-out count of the batch instead, the deep cell weighs five times as much
    model.config.mcv_normalization = "count"
    with torch.no_grad():
        batch_level = model(**batch, mcv_counts=counts, mcv_gene_mask=measured).mcv_loss
    totals = counts[:, N_SPECIAL:].sum(-1)
    torch.testing.assert_close(batch_level, (torch.stack(per_cell) * totals).sum() / totals.sum())


def test_contrastive_loss_is_symmetric_info_nce_of_the_two_views():
    batch = collate(make_cells([14, 9, 6, 11]))
    pair = collate(make_cells([12, 10, 7, 9], seed=5))
    model = tiny_model(ExpressForMaskedModeling, use_contrastive_head=True, classifier_pooling="cls_mean",
                       contrastive_temperature=0.2, contrastive_weight=0.5)
    pair_inputs = {f"pair_{k}": v for k, v in pair.items()}
    with torch.no_grad():
        out = model(**batch, **pair_inputs)
        a = F.normalize(model.contrastive_head.projection(model.contrastive_head.transform(
            model.express(**batch).pooler_output)), dim=-1)
        b = F.normalize(model.contrastive_head.projection(model.contrastive_head.transform(
            model.express(**pair).pooler_output)), dim=-1)
    logits = a @ b.T / 0.2
    target = torch.arange(4)
    manual = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(out.contrastive_loss, manual)
    torch.testing.assert_close(out.loss, 0.5 * manual)  # only the contrastive loss, with its weight
    with pytest.raises(ValueError, match="no contrastive head"):
        tiny_model(ExpressForMaskedModeling)(**batch, **pair_inputs)


def test_celltype_loss_is_cross_entropy_of_the_pooled_embedding_over_labelled_cells():
    batch = collate(make_cells([14, 9, 6, 11]))
    model = tiny_model(ExpressForMaskedModeling, use_celltype_head=True, cell_type_names=["B", "NK", "T"],
                       classifier_pooling="mean", celltype_weight=0.25)
    labels = torch.tensor([2, -100, 0, 1])  # the second cell has no label
    with torch.no_grad():
        out = model(**batch, cell_type_labels=labels)
        pooled = model.express(**batch).pooler_output
    logits = pooled @ model.celltype_head.weight.T + model.celltype_head.bias
    manual = F.cross_entropy(logits[[0, 2, 3]], labels[[0, 2, 3]])
    torch.testing.assert_close(out.celltype_logits, logits)
    torch.testing.assert_close(out.celltype_loss, manual)
    torch.testing.assert_close(out.loss, 0.25 * manual)
    unlabelled = model(**batch, cell_type_labels=torch.full((4,), -100))
    assert unlabelled.celltype_loss.item() == 0.0 and unlabelled.celltype_loss.requires_grad
    with pytest.raises(ValueError, match="no cell-type head"):
        tiny_model(ExpressForMaskedModeling)(**batch, cell_type_labels=labels)
    with pytest.raises(ValueError, match="at least two cell_type_names"):
        tiny_model(ExpressForMaskedModeling, use_celltype_head=True, cell_type_names=["B"])


def test_value_gating_and_gene_norm_carry_levels_into_token_directions():
    """Without value gating, raising every gene's level moves every token by the same vector (the additive value
    embedding knows no gene); with it, each gene's token moves its own way. With the gene norm, identity, not rank,
    dominates a token at initialisation."""
    batch = collate(make_cells([10], n_zeros=0))
    raised = batch["values"].clone()
    raised[0, 1:] = 3.0  # every detected gene at the same, higher level
    lowered = raised.clone()
    lowered[0, 1:] = 0.5
    for gating in (False, True):
        embed = tiny_model(ExpressForMaskedModeling, value_gating=gating, value_embedding_dim=8).express.embeddings
        seen = []
        embed.layer_norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        positions = torch.arange(10).unsqueeze(0)
        with torch.no_grad():
            for values in (lowered, raised):
                embed(batch["input_ids"], values, batch["is_zero"].bool(), positions)
        moves = (seen[1] - seen[0])[0, 1:]  # (genes, H): each gene's move, before the LayerNorm
        same_for_all = torch.allclose(moves, moves[:1].expand_as(moves), atol=1e-6)
        assert same_for_all != gating, gating
    normed = tiny_model(ExpressForMaskedModeling, gene_embedding_norm=True).express.embeddings
    with torch.no_grad():
        gene = normed.gene_norm(normed.gene_projection(torch.cat(
            [normed.gene_embeddings.weight[4:]] + [t.weight[normed.gene_group_ids[4:, i]] for i, t in
                                                   enumerate(normed.group_embeddings)], -1)))
        rank = normed.position_embeddings.weight
    assert gene.norm(dim=-1).mean() > 5 * rank.norm(dim=-1).mean()  # identity, not rank, at initialisation


def test_mcv_shape_error_and_missing_head():
    batch, _ = masked_batch()
    model = tiny_model(ExpressForMaskedModeling)
    with pytest.raises(ValueError, match="mcv_counts must have shape"):
        model(**batch, mcv_counts=torch.zeros(3, VOCAB - 1))
    no_head = tiny_model(ExpressForMaskedModeling, use_mcv_head=False)
    assert no_head.mcv_head is None
    with pytest.raises(ValueError, match="no MCV head"):
        no_head(**batch, mcv_counts=held_out_counts())


# --- zero-truncated counts -----------------------------------------------------------------------------------------


def test_count_loss_equals_manual_zero_truncated_nb():
    batch, labels = masked_batch()
    raw = torch.randint(1, 40, labels.shape).float()
    count_targets = torch.where(labels != -100, raw, torch.full_like(raw, -100))
    library = torch.tensor([800.0, 1500.0, 300.0])
    model = tiny_model(ExpressForMaskedModeling)
    with torch.no_grad():
        out = model(**batch, count_targets=count_targets, library_size=library)
        selected = count_targets != -100
        head = model.count_head
        share_logit, theta_raw = head.decoder(head.transform(out.last_hidden_state[selected])).unbind(-1)
    mean = library[:, None].expand_as(raw)[selected] * torch.sigmoid(share_logit)
    theta = F.softplus(theta_raw) + 1e-4
    manual = -log_ztnb(count_targets[selected], mean, theta).mean()
    torch.testing.assert_close(out.count_loss, manual)
    torch.testing.assert_close(out.count_mean, mean)
    assert out.count_mean.shape == (int(selected.sum()),)


def test_count_targets_validation():
    batch, labels = masked_batch()
    targets = torch.where(labels != -100, 3.0, -100.0)
    model = tiny_model(ExpressForMaskedModeling)
    with pytest.raises(ValueError, match="library_size"):
        model(**batch, count_targets=targets)
    with pytest.raises(ValueError, match=">= 1"):
        model(**batch, count_targets=torch.where(labels != -100, 0.0, -100.0), library_size=torch.ones(3) * 100)


# --- combined --------------------------------------------------------------------------------------------------------


def test_total_loss_is_the_weighted_sum_and_trains_every_head():
    batch, labels = masked_batch()
    counts = held_out_counts()
    count_targets = torch.where(labels != -100, 5.0, -100.0)
    library = torch.tensor([800.0, 1500.0, 300.0])
    model = tiny_model(ExpressForMaskedModeling, mlm_weight=0.5, mcv_weight=2.0, count_weight=3.0).train()
    out = model(**batch, labels=labels, mcv_counts=counts, count_targets=count_targets, library_size=library)
    torch.testing.assert_close(out.loss, 0.5 * out.mlm_loss + 2.0 * out.mcv_loss + 3.0 * out.count_loss)
    out.loss.backward()
    for name in ("mlm_head.transform.dense.weight", "mcv_head.decoder.weight", "mcv_head.log_theta",
                 "count_head.decoder.weight", "express.layers.0.attention.qkv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    # the MLM decoder is the gene table (tied weights)
    assert model.mlm_head.decoder.weight is model.express.embeddings.gene_embeddings.weight


# --- classification ------------------------------------------------------------------------------------------------


def test_classification_loss_and_pooling():
    batch = collate(make_cells([14, 9, 6]))
    batch["input_ids"][0, 13] = EOS  # an <eos> is left out of mean pooling, like <cls>
    assert batch["is_zero"].sum() > 0  # and so are the sampled zeros
    labels = torch.tensor([0, 2, 1])
    for pooling in ("cls", "mean", "cls_mean"):
        model = tiny_model(ExpressForCellClassification, num_labels=3, classifier_pooling=pooling)
        with torch.no_grad():
            out = model(**batch, labels=labels)
            hidden = model.express(**batch).last_hidden_state
        keep = (batch["attention_mask"] == 1) & (batch["input_ids"] != CLS) & (batch["input_ids"] != EOS) & \
            (batch["is_zero"] == 0)
        mean = torch.stack([hidden[i][keep[i]].mean(0) for i in range(3)])
        pooled = {"cls": hidden[:, 0], "mean": mean, "cls_mean": torch.cat([hidden[:, 0], mean], -1)}[pooling]
        assert model.config.pooled_size == pooled.shape[-1]
        logits = model.classifier(pooled)
        torch.testing.assert_close(out.logits, logits)
        torch.testing.assert_close(out.embedding, pooled)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels))


def test_classification_regression_and_multilabel():
    batch = collate(make_cells([10, 6]))
    reg = tiny_model(ExpressForCellClassification, num_labels=1)
    out = reg(**batch, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))
    multi = tiny_model(ExpressForCellClassification, num_labels=3, problem_type="multi_label_classification")
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = multi(**batch, labels=targets)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))


def test_wide_path_adds_a_linear_model_of_the_log_normalised_panel():
    batch = collate(make_cells([14, 9, 6]))
    panel = ["g1", "g2", "g3", "g4", "g5"]
    model = tiny_model(ExpressForCellClassification, num_labels=3, wide_path=True, gene_panel=panel,
                       classifier_pooling="mean")
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0, 7.0], [0.0, 2.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    total = torch.tensor([100.0, 50.0, 20.0])
    with torch.no_grad():
        out = model(**batch, gene_counts=counts, total_counts=total)
        deep = model.classifier(model.express(**batch).pooler_output)
    wide = torch.log1p(counts / total[:, None] * 1e4) @ model.wide.weight.T + model.wide.bias
    torch.testing.assert_close(out.logits, deep + wide)
    with pytest.raises(ValueError, match="wide path needs gene_counts"):
        model(**batch)
    with pytest.raises(ValueError, match="wide path reads gene_panel"):
        tiny_model(ExpressForCellClassification, num_labels=3, wide_path=True)


def test_wide_l1_adds_the_l1_norm_of_the_wide_weights_to_the_training_loss_only():
    batch = collate(make_cells([14, 9, 6]))
    panel = ["g1", "g2", "g3", "g4", "g5"]
    model = tiny_model(ExpressForCellClassification, num_labels=3, wide_path=True, gene_panel=panel, wide_l1=0.02,
                       head_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0, 7.0], [0.0, 2.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    inputs = dict(batch, gene_counts=counts, total_counts=torch.tensor([100.0, 50.0, 20.0]),
                  labels=torch.tensor([0, 2, 1]))
    with torch.no_grad():
        model.wide.weight.copy_(torch.tensor([[0.5, -1.0, 0.0, 0.0, 0.25]] * 3))  # sum |W| = 3 * 1.75
        evaluated = model(**inputs)
        trained = model.train()(**inputs)
    torch.testing.assert_close(evaluated.loss, F.cross_entropy(evaluated.logits, inputs["labels"]))
    torch.testing.assert_close(trained.logits, evaluated.logits)  # no dropout: only the loss differs
    torch.testing.assert_close(trained.loss, evaluated.loss + 0.02 * 5.25)
    with pytest.raises(ValueError, match="wide_l1 must be >= 0"):
        tiny_model(ExpressForCellClassification, num_labels=3, wide_path=True, gene_panel=panel, wide_l1=-1.0)
