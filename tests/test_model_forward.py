"""ExpressModel forward behaviour: shapes, padding, unpadded/varlen paths, attention kernels, checkpointing, bf16.

Also holds the tiny-model helpers the other ``test_model_*`` files import.
"""

from __future__ import annotations

import inspect

import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from modeling import ExpressConfig, ExpressForCellClassification, ExpressForMaskedModeling, ExpressModel

VOCAB = 64
N_SPECIAL = 4
PAD, MASK, CLS, EOS = 0, 1, 2, 3


def tiny_config(**overrides) -> ExpressConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, gene_embedding_dim=16, group_level_sizes=[6, 3], group_embedding_dims=[8, 4],
        value_embedding_dim=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ExpressConfig(**{**base, **overrides})


def gene_statistics(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zero_fraction = torch.rand(VOCAB, generator=g)
    zero_fraction[:N_SPECIAL] = 0
    groups = torch.stack([torch.randint(1, 6, (VOCAB,), generator=g), torch.randint(1, 3, (VOCAB,), generator=g)], 1)
    groups[:N_SPECIAL] = 0
    return zero_fraction, groups


def tiny_model(cls=ExpressForMaskedModeling, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides))
    model.set_gene_statistics(*gene_statistics())
    return model.eval()


def make_cells(lengths: list[int], n_zeros: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Cells as the tokenizer writes them: <cls>, detected genes (values descending), then sampled zeros."""
    g = torch.Generator().manual_seed(seed)
    cells = []
    for n in lengths:
        genes = torch.randperm(VOCAB - N_SPECIAL, generator=g)[: n - 1] + N_SPECIAL
        n_detected = n - 1 - n_zeros
        values = torch.zeros(n)
        values[1 : 1 + n_detected] = torch.sort(torch.rand(n_detected, generator=g) * 10 + 0.1, descending=True)[0]
        is_zero = torch.zeros(n, dtype=torch.long)
        is_zero[1 + n_detected :] = 1
        cells.append({"input_ids": torch.cat([torch.tensor([CLS]), genes]), "values": values, "is_zero": is_zero})
    return cells


def collate(cells: list[dict[str, torch.Tensor]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    t = pad_to or max(len(c["input_ids"]) for c in cells)
    batch = {
        "input_ids": torch.full((len(cells), t), PAD),
        "values": torch.zeros(len(cells), t),
        "is_zero": torch.zeros(len(cells), t, dtype=torch.long),
        "attention_mask": torch.zeros(len(cells), t, dtype=torch.long),
    }
    for i, c in enumerate(cells):
        n = len(c["input_ids"])
        batch["input_ids"][i, :n] = c["input_ids"]
        batch["values"][i, :n] = c["values"]
        batch["is_zero"][i, :n] = c["is_zero"]
        batch["attention_mask"][i, :n] = 1
    return batch


def encode(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).last_hidden_state


# --- shapes and dtypes ------------------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    batch = collate(make_cells([12, 9, 6]))
    model = tiny_model(ExpressModel)
    out = model(**batch)
    assert out.last_hidden_state.shape == (3, 12, 32) and out.last_hidden_state.dtype == torch.float32
    assert out.pooler_output.shape == (3, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])  # cls pooling
    # padding positions are exactly zero
    assert torch.all(out.last_hidden_state[1, 9:] == 0) and torch.all(out.last_hidden_state[2, 6:] == 0)

    mlm = tiny_model(ExpressForMaskedModeling)
    pred = mlm(**batch)  # no targets: every head predicts
    assert pred.loss is None
    assert pred.logits.shape == (3, 12, VOCAB)
    assert pred.mcv_logits.shape == (3, VOCAB) and torch.all(torch.isinf(pred.mcv_logits[:, :N_SPECIAL]))
    assert pred.mcv_theta.shape == (VOCAB,) and torch.all(pred.mcv_theta > 0)
    assert pred.count_mean.shape == (3, 12) and torch.all((pred.count_mean > 0) & (pred.count_mean < 1))

    clf = tiny_model(ExpressForCellClassification, num_labels=5)
    assert clf(**batch).logits.shape == (3, 5)


def test_defaults_for_optional_inputs():
    """Only input_ids is required: no values means rank-only input, the mask comes from the pad id."""
    batch = collate(make_cells([10, 7]))
    model = tiny_model(ExpressModel)
    out = encode(model, {"input_ids": batch["input_ids"]})
    no_values = {**batch, "values": torch.zeros_like(batch["values"]), "is_zero": torch.zeros_like(batch["is_zero"])}
    full = encode(model, no_values)
    torch.testing.assert_close(out, full)
    assert not torch.allclose(out, encode(model, batch))  # values and the zero marker do reach the model


def test_hierarchy_groups_come_from_the_vocabulary_buffer():
    """The groups of each token are looked up from the model's gene_group_ids buffer (the one copy of them, filled
    from the vocabulary): changing the buffer changes the output, and only through the tokens it regroups."""
    batch = collate(make_cells([10, 7]))
    model = tiny_model(ExpressModel)
    before = encode(model, batch)
    buffer = model.embeddings.gene_group_ids
    regrouped = buffer.clone()
    regrouped[:, 0] = torch.where(regrouped[:, 0] > 0, 6 - regrouped[:, 0], 0)
    with torch.no_grad():
        buffer.copy_(regrouped)
    assert not torch.allclose(before, encode(model, batch))
    assert "group_ids" not in inspect.signature(ExpressModel.forward).parameters


def test_too_many_tokens_is_a_clear_error():
    model = tiny_model(ExpressModel)
    batch = collate(make_cells([40], n_zeros=5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**batch)


def test_warns_once_when_gene_statistics_never_set(caplog):
    model = ExpressModel(tiny_config()).eval()
    batch = collate(make_cells([8]))
    with caplog.at_level(logging.WARNING):
        model(**batch)
        model(**batch)
    assert sum("gene statistics were never set" in r.message for r in caplog.records) == 1


def test_set_gene_statistics_validates():
    model = ExpressModel(tiny_config())
    zero_fraction, groups = gene_statistics()
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        model.set_gene_statistics(zero_fraction[:10], groups)
    with pytest.raises(ValueError, match="must lie in"):
        model.set_gene_statistics(zero_fraction + 2, groups)
    with pytest.raises(ValueError, match="pass group_ids"):
        model.set_gene_statistics(zero_fraction)
    bad = groups.clone()
    bad[10, 0] = 6  # level-1 table has 6 rows: ids 0..5
    with pytest.raises(ValueError, match="level 1"):
        model.set_gene_statistics(zero_fraction, bad)
    model.set_gene_statistics(zero_fraction.numpy(), groups.numpy())  # numpy works too
    flat = ExpressModel(tiny_config(group_level_sizes=[], group_embedding_dims=[]))
    flat.set_gene_statistics(zero_fraction, torch.zeros(VOCAB, 0, dtype=torch.long))  # a vocabulary without levels
    torch.testing.assert_close(model.embeddings.gene_group_ids, groups)
    assert bool(model.embeddings.gene_statistics_set)


# --- padding, unpadding and attention kernels ------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("unpad", [False, True])
def test_padding_never_changes_a_cell(attn, unpad):
    cells = make_cells([14, 8, 5])
    model = tiny_model(ExpressModel, attn_implementation=attn, unpad_inputs=unpad)
    together = encode(model, collate(cells, pad_to=16))
    for i, cell in enumerate(cells):
        alone = encode(model, collate([cell]))
        n = len(cell["input_ids"])
        torch.testing.assert_close(together[i, :n], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpadded_equals_padded(attn):
    batch = collate(make_cells([14, 8, 5, 11]))
    padded = encode(tiny_model(ExpressModel, attn_implementation=attn, unpad_inputs=False), batch)
    unpadded = encode(tiny_model(ExpressModel, attn_implementation=attn, unpad_inputs=True), batch)
    torch.testing.assert_close(unpadded, padded, rtol=1e-5, atol=1e-5)


def test_eager_equals_sdpa():
    batch = collate(make_cells([14, 8, 5]))
    eager = tiny_model(ExpressForMaskedModeling, attn_implementation="eager")
    sdpa = tiny_model(ExpressForMaskedModeling, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a, b = eager(**batch), sdpa(**batch)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def reference_varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, cu_seq_lens_q=None,
                               cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """A CPU stand-in for FlashAttention's variable-length call: packed (1, h, N, d) tokens, one cell per segment."""
    assert attention_mask is None and query.shape[0] == 1
    assert cu_seq_lens_q is cu_seq_lens_k and cu_seq_lens_q.dtype == torch.int32
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    assert max_length_q == max_length_k == max(lengths)
    outs = [
        F.scaled_dot_product_attention(q, k, v, scale=scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None  # (1, N, h, d)


def test_flash_style_varlen_path_matches_sdpa():
    """With a FlashAttention-type kernel the model packs the batch and passes cu_seqlens (no padding anywhere)."""
    AttentionInterface.register("flash_reference_varlen", reference_varlen_attention)
    batch = collate(make_cells([14, 8, 5, 11]))
    expected = encode(tiny_model(ExpressModel), batch)
    model = tiny_model(ExpressModel)
    model.config._attn_implementation = "flash_reference_varlen"
    assert model._should_unpad(batch["attention_mask"].bool())
    torch.testing.assert_close(encode(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_sampled_zeros_are_an_unordered_set():
    cell = make_cells([12], n_zeros=4)[0]
    model = tiny_model(ExpressModel)
    out = encode(model, collate([cell]))[0]
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 10, 8, 11, 9])  # shuffle the four sampled zeros (positions 8..11)
    shuffled = {k: v[perm] for k, v in cell.items()}
    out_shuffled = encode(model, collate([shuffled]))[0]
    torch.testing.assert_close(out_shuffled, out[perm], rtol=1e-5, atol=1e-5)
    # ...whereas a detected gene's place is its rank: moved, the same gene with the same value reads differently
    swap = torch.tensor([0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    swapped = {k: v[swap] for k, v in cell.items()}
    out_swapped = encode(model, collate([swapped]))[0]
    assert (out_swapped[1] - out[2]).abs().max() > 1e-2


# --- training features -----------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_same_gradients():
    cells = make_cells([14, 8, 5])
    batch = collate(cells)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, j in [(0, 3), (1, 2), (2, 4)]:
        labels[i, j] = batch["input_ids"][i, j]
    batch["input_ids"] = torch.where(labels != -100, MASK, batch["input_ids"])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(ExpressForMaskedModeling).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # the transformers 5 name of gradient_checkpointing_enable
            assert all(layer.gradient_checkpointing for layer in model.express.layers)
        model(**batch, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_runs_on_cpu():
    batch = collate(make_cells([14, 8, 5]))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2] = batch["input_ids"][:, 2]
    mcv = torch.poisson(torch.full((3, VOCAB), 0.5))
    mcv[:, :N_SPECIAL] = 0
    model = tiny_model(ExpressForMaskedModeling)
    with torch.no_grad():
        reference = model(**batch, labels=labels, mcv_counts=mcv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, labels=labels, mcv_counts=mcv)
    assert out.logits.dtype == torch.bfloat16  # matmuls ran in bf16
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.mlm_loss, reference.mlm_loss, rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.mcv_loss, reference.mcv_loss, rtol=0.05, atol=0.05)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=labels, mcv_counts=mcv).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_architecture_variants_run(norm, combine):
    overrides = dict(norm_placement=norm, hierarchy_combine=combine)
    if combine == "sum":
        overrides["group_embedding_dims"] = [16, 16]
    model = tiny_model(ExpressModel, **overrides)
    out = encode(model, collate(make_cells([10, 6])))
    assert out.shape == (2, 10, 32) and torch.isfinite(out).all()
    assert isinstance(model.final_norm, torch.nn.LayerNorm) == (norm == "pre")


def test_rank_only_config_without_statistics_features():
    model = tiny_model(ExpressModel, value_embedding_dim=0, use_zero_fraction=False, position_embedding_type="none",
                       group_level_sizes=[], group_embedding_dims=[])
    assert model.embeddings.value_embedding is None and model.embeddings.position_embeddings is None
    out = encode(model, collate(make_cells([40], n_zeros=5)))  # no position table: no length limit
    assert out.shape == (1, 40, 32)


def test_output_hidden_states_and_attentions():
    batch = collate(make_cells([10, 6]))
    model = tiny_model(ExpressModel, attn_implementation="eager")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 10, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 10))
    assert torch.all(out.attentions[0][1, :, :, 6:] == 0)  # nobody attends to padding
    as_tuple = model(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)


# --- GPU (skipped without one) -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_gpu_bf16_matches_cpu_fp32(attn):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs flash-attn (pip install express[flash])")
    batch = collate(make_cells([14, 8, 5, 11]))
    reference = encode(tiny_model(ExpressModel), batch)
    model = tiny_model(ExpressModel, attn_implementation=attn).to("cuda", torch.bfloat16)
    assert model._should_unpad(batch["attention_mask"].bool().cuda()) == (attn == "flash_attention_2")
    out = encode(model, {k: v.cuda() for k, v in batch.items()}).float().cpu()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], reference[real], rtol=0.05, atol=0.05)
