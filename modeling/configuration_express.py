"""Configuration of the express encoder.

This file must stay importable on its own (only ``transformers``): it travels with saved checkpoints for
``trust_remote_code`` loading.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

NORM_PLACEMENTS = ("pre", "post")
POOLINGS = ("cls", "mean")
HIERARCHY_COMBINES = ("concat", "sum")
POSITION_EMBEDDING_TYPES = ("rank", "none")


class ExpressConfig(PretrainedConfig):
    r"""Configuration of an express model (:class:`ExpressModel` and its heads).

    Defaults give a Geneformer-V1-sized encoder (6 layers, hidden 256, 4 heads, intermediate 512). Build one that
    matches a tokenized corpus with :meth:`from_vocab`.

    Args:
        vocab_size (`int`, defaults to 25426):
            Number of token ids: special tokens plus vocabulary genes (``GeneVocab.vocab_size``).
        hidden_size (`int`, defaults to 256):
            Width of the encoder.
        num_hidden_layers (`int`, defaults to 6):
            Number of encoder layers.
        num_attention_heads (`int`, defaults to 4):
            Attention heads per layer; must divide ``hidden_size``.
        intermediate_size (`int`, defaults to 512):
            Width of each layer's feed-forward block.
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the feed-forward blocks and heads (any key of ``transformers.activations.ACT2FN``).
        hidden_dropout_prob (`float`, defaults to 0.02):
            Dropout on embeddings and on each residual branch.
        attention_probs_dropout_prob (`float`, defaults to 0.0):
            Dropout on attention probabilities. Off by default: with any attention dropout, PyTorch's SDPA on CPU
            falls back to its unfused path that materialises the attention matrix.
        max_position_embeddings (`int`, defaults to 512):
            Size of the rank-position table; a batch may hold at most this many tokens per cell.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal weight initialisation.
        layer_norm_eps (`float`, defaults to 1e-12):
            Epsilon of every LayerNorm.
        norm_placement (`str`, defaults to `"pre"`):
            ``"pre"``: LayerNorm before attention and feed-forward, plus a final LayerNorm (stable at depth);
            ``"post"``: LayerNorm after each residual sum, as in BERT and Geneformer.
        gene_embedding_dim (`int`, *optional*):
            Width of the level-0 (per gene) embedding table; defaults to ``hidden_size``.
        group_level_sizes (`list[int]`, defaults to `[]`):
            Table size per coarser hierarchy level (``GeneVocab.n_groups``; group 0 is reserved for special tokens).
        group_embedding_dims (`list[int]`, *optional*):
            Embedding width per hierarchy level, same length as ``group_level_sizes``; defaults to 32 per level.
        hierarchy_combine (`str`, defaults to `"concat"`):
            How the gene and group embeddings are combined before the projection to ``hidden_size``:
            ``"concat"`` concatenates them; ``"sum"`` adds them (all widths must then equal ``gene_embedding_dim``).
        value_embedding_dim (`int`, defaults to 64):
            Hidden width of the small MLP embedding ``log1p(values)``; 0 leaves expression values out (rank only).
        use_zero_fraction (`bool`, defaults to `True`):
            Add a learned projection of each gene's corpus zero fraction (read from the ``gene_zero_fraction``
            buffer that :meth:`ExpressPreTrainedModel.set_gene_statistics` fills).
        position_embedding_type (`str`, defaults to `"rank"`):
            ``"rank"``: a learned embedding of each detected gene's expression rank (``<cls>`` is rank 0); sampled
            zero-expressed genes get none, since they form an unordered set. ``"none"``: no position information.
        pad_token_id, mask_token_id, cls_token_id, eos_token_id (`int`, defaults to 0, 1, 2, 3):
            Special token ids, as written by the express tokenizer.
        num_special_tokens (`int`, defaults to 4):
            Token ids below this are special tokens, not genes (the MCV head predicts genes only).
        use_mcv_head (`bool`, defaults to `True`):
            Build the molecular-cross-validation head of :class:`ExpressForMaskedModeling`.
        use_count_head (`bool`, defaults to `True`):
            Build the zero-truncated count head of :class:`ExpressForMaskedModeling`.
        mlm_weight, mcv_weight, count_weight (`float`, defaults to 1.0):
            Weights of the masked-gene, MCV and count losses in the total loss (each only when its targets are
            given).
        tie_word_embeddings (`bool`, defaults to `True`):
            Share the MLM decoder's weight with the level-0 gene embedding table (as BERT ties its word embeddings).
        classifier_pooling (`str`, defaults to `"cls"`):
            Cell embedding (``pooler_output``) used by :class:`ExpressForCellClassification`: the ``<cls>`` state or
            the mean over the cell's gene tokens.
        classifier_dropout (`float`, *optional*):
            Dropout before the classifier; defaults to ``hidden_dropout_prob``.
        unpad_inputs (`bool`, *optional*):
            Run the encoder on the real tokens only (variable-length batches packed without padding). ``None``
            (default) does so when the batch has padding and the attention is FlashAttention, which then runs its
            variable-length kernel; other attention kernels pad around the attention call only.
        num_labels (`int`, *optional*):
            Number of cell classes for :class:`ExpressForCellClassification` (the standard ``transformers``
            mechanism; ``id2label`` / ``label2id`` work as usual).
    """

    model_type = "express"

    def __init__(
        self,
        vocab_size: int = 25_426,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.02,
        attention_probs_dropout_prob: float = 0.0,
        max_position_embeddings: int = 512,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        norm_placement: str = "pre",
        gene_embedding_dim: int | None = None,
        group_level_sizes: list[int] | None = None,
        group_embedding_dims: list[int] | None = None,
        hierarchy_combine: str = "concat",
        value_embedding_dim: int = 64,
        use_zero_fraction: bool = True,
        position_embedding_type: str = "rank",
        pad_token_id: int = 0,
        mask_token_id: int = 1,
        cls_token_id: int = 2,
        eos_token_id: int = 3,
        num_special_tokens: int = 4,
        use_mcv_head: bool = True,
        use_count_head: bool = True,
        mlm_weight: float = 1.0,
        mcv_weight: float = 1.0,
        count_weight: float = 1.0,
        tie_word_embeddings: bool = True,
        classifier_pooling: str = "cls",
        classifier_dropout: float | None = None,
        unpad_inputs: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.max_position_embeddings = int(max_position_embeddings)
        self.initializer_range = float(initializer_range)
        self.layer_norm_eps = float(layer_norm_eps)
        self.norm_placement = norm_placement
        self.gene_embedding_dim = int(gene_embedding_dim) if gene_embedding_dim is not None else self.hidden_size
        self.group_level_sizes = [int(n) for n in (group_level_sizes or [])]
        if group_embedding_dims is None:
            group_embedding_dims = [32] * len(self.group_level_sizes)
        self.group_embedding_dims = [int(d) for d in group_embedding_dims]
        self.hierarchy_combine = hierarchy_combine
        self.value_embedding_dim = int(value_embedding_dim)
        self.use_zero_fraction = bool(use_zero_fraction)
        self.position_embedding_type = position_embedding_type
        self.mask_token_id = int(mask_token_id)
        self.cls_token_id = int(cls_token_id)
        self.num_special_tokens = int(num_special_tokens)
        self.use_mcv_head = bool(use_mcv_head)
        self.use_count_head = bool(use_count_head)
        self.mlm_weight = float(mlm_weight)
        self.mcv_weight = float(mcv_weight)
        self.count_weight = float(count_weight)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = None if classifier_dropout is None else float(classifier_dropout)
        self.unpad_inputs = unpad_inputs
        super().__init__(pad_token_id=int(pad_token_id), eos_token_id=int(eos_token_id), **kwargs)
        self._validate()

    @property
    def n_levels(self) -> int:
        """Number of coarser hierarchy levels (group tables) besides the per-gene table."""
        return len(self.group_level_sizes)

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"ExpressConfig: {message}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "gene_embedding_dim"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})",
        )
        check(
            len(self.group_embedding_dims) == len(self.group_level_sizes),
            f"group_embedding_dims {self.group_embedding_dims} needs one width per level of group_level_sizes "
            f"{self.group_level_sizes}",
        )
        check(all(n >= 1 for n in self.group_level_sizes),
              f"group_level_sizes must be >= 1, got {self.group_level_sizes}")
        check(all(d >= 1 for d in self.group_embedding_dims),
              f"group_embedding_dims must be >= 1, got {self.group_embedding_dims}")
        check(self.hierarchy_combine in HIERARCHY_COMBINES,
              f"hierarchy_combine must be one of {HIERARCHY_COMBINES}, got {self.hierarchy_combine!r}")
        if self.hierarchy_combine == "sum":
            check(
                all(d == self.gene_embedding_dim for d in self.group_embedding_dims),
                f"hierarchy_combine='sum' needs every group_embedding_dims entry equal to gene_embedding_dim "
                f"({self.gene_embedding_dim}), got {self.group_embedding_dims}",
            )
        check(self.norm_placement in NORM_PLACEMENTS,
              f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        check(self.classifier_pooling in POOLINGS,
              f"classifier_pooling must be one of {POOLINGS}, got {self.classifier_pooling!r}")
        check(self.position_embedding_type in POSITION_EMBEDDING_TYPES,
              f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, "
              f"got {self.position_embedding_type!r}")
        check(self.value_embedding_dim >= 0, f"value_embedding_dim must be >= 0, got {self.value_embedding_dim}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check(0.0 <= getattr(self, name) < 1.0, f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.classifier_dropout is not None:
            check(0.0 <= self.classifier_dropout < 1.0,
                  f"classifier_dropout must lie in [0, 1), got {self.classifier_dropout}")
        for name in ("mlm_weight", "mcv_weight", "count_weight"):
            check(getattr(self, name) >= 0.0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(0 < self.num_special_tokens < self.vocab_size,
              f"num_special_tokens ({self.num_special_tokens}) must lie in [1, vocab_size={self.vocab_size})")
        for name in ("pad_token_id", "mask_token_id", "cls_token_id", "eos_token_id"):
            value = getattr(self, name)
            check(0 <= value < self.num_special_tokens,
                  f"{name} ({value}) must be a special token id in [0, num_special_tokens={self.num_special_tokens})")
        check(self.unpad_inputs in (None, True, False),
              f"unpad_inputs must be None, True or False, got {self.unpad_inputs!r}")
        # `ACT2FN` is imported here, not at module level, so importing this file stays light.
        from transformers.activations import ACT2FN

        check(self.hidden_act in ACT2FN, f"hidden_act {self.hidden_act!r} is not one of {sorted(ACT2FN)}")

    @classmethod
    def from_vocab(cls, vocab: Any, **kwargs: Any) -> ExpressConfig:
        """A config sized for a vocabulary: ``vocab_size``, ``group_level_sizes`` and the special token ids.

        ``vocab`` is a ``tokenizer.GeneVocab`` or any object with ``vocab_size`` and ``n_groups`` attributes (and
        optionally ``pad_id``, ``mask_id``, ``cls_id``, ``eos_id``, ``n_special``). ``kwargs`` set any other field.
        """
        missing = [name for name in ("vocab_size", "n_groups") if not hasattr(vocab, name)]
        if missing:
            raise TypeError(
                f"ExpressConfig.from_vocab needs an object with vocab_size and n_groups (a GeneVocab); "
                f"{type(vocab).__name__} lacks {', '.join(missing)}"
            )
        derived: dict[str, Any] = {"vocab_size": int(vocab.vocab_size), "group_level_sizes": list(vocab.n_groups)}
        for attribute, field in (("pad_id", "pad_token_id"), ("mask_id", "mask_token_id"), ("cls_id", "cls_token_id"),
                                 ("eos_id", "eos_token_id"), ("n_special", "num_special_tokens")):
            if hasattr(vocab, attribute):
                derived[field] = int(getattr(vocab, attribute))
        return cls(**{**derived, **kwargs})
