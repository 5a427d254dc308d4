"""ExpressConfig: defaults, serialisation, construction from a vocabulary, and validation errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from modeling import ExpressConfig
from tokenizer import GeneVocab


def test_defaults_are_geneformer_v1_sized_and_round_trip(tmp_path):
    config = ExpressConfig()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        6, 256, 4, 512)
    assert config.gene_embedding_dim == config.hidden_size and config.group_level_sizes == []
    assert (config.pad_token_id, config.mask_token_id, config.cls_token_id, config.eos_token_id) == (0, 1, 2, 3)
    config = ExpressConfig(group_level_sizes=[10, 4], num_labels=7, classifier_pooling="mean", norm_placement="post")
    assert config.group_embedding_dims == [32, 32] and config.num_labels == 7
    config.save_pretrained(tmp_path)
    loaded = ExpressConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_from_vocab_takes_sizes_and_special_ids():
    vocab = GeneVocab(
        gene_ids=[f"ENSG{i:05d}" for i in range(10)],
        medians=np.linspace(1, 2, 10),
        n_cells=np.full(10, 5),
        zero_fraction=np.linspace(0.1, 0.9, 10),
        group_ids=np.stack([np.arange(10) % 3 + 1, np.arange(10) % 2 + 1], axis=1),
    )
    config = ExpressConfig.from_vocab(vocab, hidden_size=64, num_attention_heads=2)
    assert config.vocab_size == 14 and config.group_level_sizes == [4, 3] and config.num_special_tokens == 4
    assert config.hidden_size == 64 and config.cls_token_id == vocab.cls_id
    # any object with vocab_size and n_groups works (no tokenizer import needed)
    assert ExpressConfig.from_vocab(SimpleNamespace(vocab_size=50, n_groups=[5])).group_level_sizes == [5]
    with pytest.raises(TypeError, match="n_groups"):
        ExpressConfig.from_vocab(SimpleNamespace(vocab_size=50))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(group_level_sizes=[5, 3], group_embedding_dims=[8]), "one width per level"),
        (dict(group_level_sizes=[0]), "group_level_sizes must be >= 1"),
        (dict(group_level_sizes=[5], hierarchy_combine="sum", group_embedding_dims=[8]), "equal to gene_embedding_dim"),
        (dict(hierarchy_combine="product"), "hierarchy_combine must be one of"),
        (dict(classifier_pooling="max"), "classifier_pooling must be one of"),
        (dict(norm_placement="sandwich"), "norm_placement must be one of"),
        (dict(position_embedding_type="absolute"), "position_embedding_type must be one of"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob must lie in"),
        (dict(mcv_weight=-1.0), "mcv_weight must be >= 0"),
        (dict(mask_token_id=7), "mask_token_id"),
        (dict(num_special_tokens=0), "num_special_tokens"),
        (dict(hidden_act="not_an_activation"), "hidden_act"),
        (dict(value_embedding_dim=-1), "value_embedding_dim"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be >= 1"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpressConfig(**kwargs)
