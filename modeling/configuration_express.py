"""Configuration of the express encoder.

This file must stay importable on its own (only ``transformers``): it travels with saved checkpoints for
``trust_remote_code`` loading.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

NORM_PLACEMENTS = ("pre", "post")
POOLINGS = ("cls", "mean", "cls_mean")
MCV_INPUTS = ("cls", "pooled")
MCV_NORMALIZATIONS = ("count", "cell")
HIERARCHY_COMBINES = ("concat", "sum")
POSITION_EMBEDDING_TYPES = ("rank", "none")
ENCODERS = ("transformer", "mlp")
PROTEIN_NORMS = ("clr", "clr_cell", "log1p_cpt")
COVARIANCES = ("diagonal", "full")
LIKELIHOODS = ("nb", "zinb")
DISPERSIONS = ("gene", "gene-batch")
PRIORS = ("normal", "mixture")
OBJECTIVES = ("elbo", "iwae")
# What PretrainedConfig itself reads or writes besides its declared fields (saved configs carry these keys).
_HF_KEYS = {"architectures", "auto_map", "transformers_version", "model_type", "name_or_path", "_name_or_path",
            "torch_dtype", "dtype", "num_labels", "attn_implementation", "output_attentions", "_commit_hash",
            "experts_implementation", "per_layer_config"}


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
        value_gating (`bool`, defaults to `False`):
            Each gene's vector is also multiplied elementwise by ``1 + g(log1p(value))`` (a small MLP), so a token's
            direction, which survives the LayerNorms, carries that gene's own expression level (the additive value
            embedding is the same for every gene).
        gene_embedding_norm (`bool`, defaults to `False`):
            LayerNorm the gene identity vector (gene and groups, projected) before the value, zero-fraction, rank and
            marker embeddings are added, so that identity, not rank, dominates a token at initialisation.
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
        mcv_input (`str`, defaults to `"cls"`):
            What the MCV head decodes the held-out counts from: the ``<cls>`` state or the pooled cell embedding
            (``classifier_pooling``).
        mcv_normalization (`str`, defaults to `"count"`):
            ``"count"``: the MCV loss is the batch's NLL per held-out count (deep cells weigh more); ``"cell"``: each
            cell's NLL per held-out count, averaged over cells.
        use_contrastive_head (`bool`, defaults to `False`):
            Build the projection head of the contrastive objective: the pooled embeddings of two views of a cell
            (``pair_*`` inputs) should be nearer each other than other cells' (InfoNCE over the batch).
        contrastive_dim (`int`, defaults to 64), contrastive_temperature (`float`, defaults to 0.1):
            Width of the projection and the softmax temperature of the contrastive loss.
        use_celltype_head (`bool`, defaults to `False`), cell_type_names (`list[str]`, defaults to `[]`):
            Build the supervised cell-type head of :class:`ExpressForMaskedModeling` (a linear classifier on the pooled
            cell embedding over ``cell_type_names``, for corpora with labels; cells without one are not scored).
        use_count_head (`bool`, defaults to `True`):
            Build the zero-truncated count head of :class:`ExpressForMaskedModeling`.
        mlm_weight, mcv_weight, count_weight, contrastive_weight, celltype_weight (`float`, defaults to 1.0):
            Weights of the masked-gene, MCV, count, contrastive and cell-type losses in the total loss (each only when
            its targets are given).
        tie_word_embeddings (`bool`, defaults to `True`):
            Share the MLM decoder's weight with the level-0 gene embedding table (as BERT ties its word embeddings).
        classifier_pooling (`str`, defaults to `"cls"`):
            The cell embedding (``pooler_output``): the ``<cls>`` state, the mean over the cell's detected genes
            (special tokens and sampled zeros left out), or both concatenated (``"cls_mean"``, width
            ``2 * hidden_size``).
        unpad_inputs (`bool`, *optional*):
            Run the encoder on the real tokens only (variable-length batches packed without padding). ``None``
            (default) does so when the batch has padding and the attention is FlashAttention, which then runs its
            variable-length kernel; other attention kernels pad around the attention call only.

    Fine-tuning heads (``modeling_heads``) read these as well:

    Args:
        encoder (`str`, defaults to `"transformer"`):
            The cell encoder under a head: ``"transformer"`` (:class:`ExpressModel`, its pooled output) or ``"mlp"``
            (an MLP on ``log1p(counts / library * 1e4)`` of ``gene_panel``, the scVI-like baseline).
        gene_panel (`list[str]`, defaults to `[]`):
            Gene ids, in order, of the counts a head reads (``gene_counts``): the MLP encoder's input and the VAE
            decoder's output.
        mlp_hidden_size, mlp_layers (`int`, defaults to 256 and 2):
            Width and depth of the MLP encoder.
        input_dropout (`float`, defaults to 0.0):
            Dropout on the MLP encoder's input genes during training (each gene zeroed with this probability).
        head_dropout (`float`, defaults to 0.1):
            Dropout in the MLP encoder and in each fine-tuning head (classifier, regressor, VAE decoder).
        wide_path (`bool`, defaults to `False`):
            :class:`ExpressForCellClassification` adds a linear model on ``log1p(counts / library * 1e4)`` of
            ``gene_panel`` to the head's output (a "wide" path beside the encoder; with the transformer encoder it
            needs ``gene_panel``). ``finetune.api`` gives it, with ``wide_l1``, to cell-type classifiers on the
            transformer.
        wide_l1 (`float`, defaults to 0.0):
            An L1 penalty on the wide path's weights, ``wide_l1 * sum |W|``, added to the training loss, as in the
            L1 logistic-regression baseline (0: none). Under AdamW it shrinks most weights to near zero, not to
            exactly zero.
        classifier_hidden_size (`int`, *optional*):
            A hidden layer (with GELU) in :class:`ExpressForCellClassification`; ``None``: one linear layer.
        class_weights (`list[float]`, *optional*):
            Per-class weights of the single-label cross-entropy (e.g. ``n / (C n_c)`` from the training labels).
        label_smoothing (`float`, defaults to 0.0):
            Label smoothing of the single-label cross-entropy.
        protein_norm (`str`, defaults to `"clr"`):
            The scale protein (ADT) levels are predicted and scored on: ``"clr"`` (per protein across cells, with
            ``protein_reference``), ``"clr_cell"`` (per cell across proteins) or ``"log1p_cpt"``.
        protein_reference (`list[float]`, defaults to `[]`):
            Per-protein ``log`` geometric means of the training cells (``"clr"``).
        num_labels (`int`, *optional*):
            Outputs of :class:`ExpressForCellClassification`: cell classes, or proteins for ``problem_type=
            "regression"`` (the standard ``transformers`` mechanism; ``id2label`` names them).
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
        value_gating: bool = False,
        gene_embedding_norm: bool = False,
        use_zero_fraction: bool = True,
        position_embedding_type: str = "rank",
        pad_token_id: int = 0,
        mask_token_id: int = 1,
        cls_token_id: int = 2,
        eos_token_id: int = 3,
        num_special_tokens: int = 4,
        use_mcv_head: bool = True,
        mcv_input: str = "cls",
        mcv_normalization: str = "count",
        use_count_head: bool = True,
        use_celltype_head: bool = False,
        cell_type_names: list[str] | None = None,
        use_contrastive_head: bool = False,
        contrastive_dim: int = 64,
        contrastive_temperature: float = 0.1,
        mlm_weight: float = 1.0,
        mcv_weight: float = 1.0,
        count_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        celltype_weight: float = 1.0,
        tie_word_embeddings: bool = True,
        classifier_pooling: str = "cls",
        unpad_inputs: bool | None = None,
        encoder: str = "transformer",
        gene_panel: list[str] | None = None,
        mlp_hidden_size: int = 256,
        mlp_layers: int = 2,
        input_dropout: float = 0.0,
        head_dropout: float = 0.1,
        classifier_hidden_size: int | None = None,
        wide_path: bool = False,
        wide_l1: float = 0.0,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        protein_norm: str = "clr",
        protein_reference: list[float] | None = None,
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
        self.value_gating = bool(value_gating)
        self.gene_embedding_norm = bool(gene_embedding_norm)
        self.use_zero_fraction = bool(use_zero_fraction)
        self.position_embedding_type = position_embedding_type
        self.mask_token_id = int(mask_token_id)
        self.cls_token_id = int(cls_token_id)
        self.num_special_tokens = int(num_special_tokens)
        self.use_mcv_head = bool(use_mcv_head)
        self.mcv_input = mcv_input
        self.mcv_normalization = mcv_normalization
        self.use_count_head = bool(use_count_head)
        self.use_celltype_head = bool(use_celltype_head)
        self.cell_type_names = [str(n) for n in (cell_type_names or [])]
        self.use_contrastive_head = bool(use_contrastive_head)
        self.contrastive_dim = int(contrastive_dim)
        self.contrastive_temperature = float(contrastive_temperature)
        self.mlm_weight = float(mlm_weight)
        self.mcv_weight = float(mcv_weight)
        self.count_weight = float(count_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.celltype_weight = float(celltype_weight)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.classifier_pooling = classifier_pooling
        self.unpad_inputs = unpad_inputs
        self.encoder = encoder
        self.gene_panel = [str(g) for g in (gene_panel or [])]
        self.mlp_hidden_size = int(mlp_hidden_size)
        self.mlp_layers = int(mlp_layers)
        self.input_dropout = float(input_dropout)
        self.head_dropout = float(head_dropout)
        self.classifier_hidden_size = None if classifier_hidden_size is None else int(classifier_hidden_size)
        self.wide_path = bool(wide_path)
        self.wide_l1 = float(wide_l1)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.label_smoothing = float(label_smoothing)
        self.protein_norm = protein_norm
        self.protein_reference = [float(r) for r in (protein_reference or [])]
        unknown = sorted(set(kwargs) - _HF_KEYS - {f.name for f in dataclasses.fields(PretrainedConfig)})
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown field(s) {unknown}; see the class docstring for the "
                             "fields there are")
        super().__init__(pad_token_id=int(pad_token_id), eos_token_id=int(eos_token_id), **kwargs)
        self._validate()

    @property
    def pooled_size(self) -> int:
        """Width of the cell embedding (``pooler_output``)."""
        return 2 * self.hidden_size if self.classifier_pooling == "cls_mean" else self.hidden_size

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
        for name in ("input_dropout", "head_dropout", "label_smoothing"):
            check(0.0 <= getattr(self, name) < 1.0, f"{name} must lie in [0, 1), got {getattr(self, name)}")
        check(self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        check(self.encoder != "mlp" or bool(self.gene_panel), "the MLP encoder needs its input genes (gene_panel)")
        check(self.mlp_hidden_size >= 1 and self.mlp_layers >= 1, "mlp_hidden_size and mlp_layers must be >= 1")
        check(not self.wide_path or bool(self.gene_panel), "the wide path reads gene_panel: give its genes")
        check(self.wide_l1 >= 0.0, f"wide_l1 must be >= 0, got {self.wide_l1}")
        check(self.classifier_hidden_size is None or self.classifier_hidden_size >= 1,
              f"classifier_hidden_size must be >= 1, got {self.classifier_hidden_size}")
        check(self.class_weights is None or all(w >= 0 for w in self.class_weights),
              "class_weights must be >= 0")
        check(self.protein_norm in PROTEIN_NORMS,
              f"protein_norm must be one of {PROTEIN_NORMS}, got {self.protein_norm!r}")
        check(self.mcv_input in MCV_INPUTS, f"mcv_input must be one of {MCV_INPUTS}, got {self.mcv_input!r}")
        check(self.mcv_normalization in MCV_NORMALIZATIONS,
              f"mcv_normalization must be one of {MCV_NORMALIZATIONS}, got {self.mcv_normalization!r}")
        check(self.contrastive_dim >= 1 and self.contrastive_temperature > 0,
              "contrastive_dim must be >= 1 and contrastive_temperature > 0")
        check(not self.value_gating or self.value_embedding_dim > 0,
              "value_gating needs the value embedding (value_embedding_dim > 0)")
        check(not self.use_celltype_head or len(self.cell_type_names) >= 2,
              "the cell-type head needs at least two cell_type_names")
        for name in ("mlm_weight", "mcv_weight", "count_weight", "contrastive_weight", "celltype_weight"):
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


class ExpressVAEConfig(ExpressConfig):
    r"""Configuration of :class:`~modeling.modeling_heads.ExpressForVAE`: an encoder (the fields of
    :class:`ExpressConfig`) under a VAE/IWAE head.

    Args (besides :class:`ExpressConfig`'s):
        n_latent (`int`, defaults to 16): latent dimension.
        decoder_hidden_size, decoder_layers (`int`, defaults to 128 and 1): the count decoder's MLP.
        covariance (`str`, defaults to `"diagonal"`): posterior covariance, ``"diagonal"`` or ``"full"``.
        likelihood (`str`, defaults to `"nb"`): gene count likelihood, ``"nb"`` or ``"zinb"``.
        dispersion (`str`, defaults to `"gene"`): inverse dispersion per gene, or per gene and batch
            (``"gene-batch"``).
        prior (`str`, defaults to `"normal"`): ``"normal"`` or ``"mixture"`` (a Gaussian mixture whose components are
            the cell types of ``id2label``).
        label_parents (`list[int]`, *optional*): coarse type per cell type: a hyperprior pulls sibling component
            means together.
        hyper_scale (`float`, defaults to 1.0): standard deviation of that hyperprior.
        batch_categories (`list[str]`, defaults to `[]`): the training batches, in one-hot order (the decoder
            reads them; empty: no batch conditioning).
        proteins (`list[str]`, defaults to `[]`): protein names: a negative-binomial protein decoder from the same
            latent (the multimodal VAE).
        objective (`str`, defaults to `"elbo"`): ``"elbo"`` or ``"iwae"``.
        n_importance_samples (`int`, defaults to 1): IWAE samples K.
        dreg (`bool`, defaults to `True`): the DReG encoder gradient for IWAE.
        kl_warmup_steps (`int`, defaults to 0): training batches over which the ELBO's KL weight rises to 1.
        classification_weight (`float`, defaults to 50.0): weight of the labelled cells' ``-log p(c|z)`` (mixture
            prior; scANVI's classification ratio).
        n_train_cells (`int`, *optional*): training-set size, which scales the hyperprior (a term over all cells) to
            one batch; defaults to the batch size.
        protein_samples (`int`, defaults to 64): posterior-predictive samples behind a protein prediction.
    """

    model_type = "express_vae"

    def __init__(
        self,
        n_latent: int = 16,
        decoder_hidden_size: int = 128,
        decoder_layers: int = 1,
        covariance: str = "diagonal",
        likelihood: str = "nb",
        dispersion: str = "gene",
        prior: str = "normal",
        label_parents: list[int] | None = None,
        hyper_scale: float = 1.0,
        batch_categories: list[str] | None = None,
        proteins: list[str] | None = None,
        objective: str = "elbo",
        n_importance_samples: int = 1,
        dreg: bool = True,
        kl_warmup_steps: int = 0,
        classification_weight: float = 50.0,
        n_train_cells: int | None = None,
        protein_samples: int = 64,
        **kwargs: Any,
    ) -> None:
        self.n_latent = int(n_latent)
        self.decoder_hidden_size = int(decoder_hidden_size)
        self.decoder_layers = int(decoder_layers)
        self.covariance = covariance
        self.likelihood = likelihood
        self.dispersion = dispersion
        self.prior = prior
        self.label_parents = None if label_parents is None else [int(p) for p in label_parents]
        self.hyper_scale = float(hyper_scale)
        self.batch_categories = [str(b) for b in (batch_categories or [])]
        self.proteins = [str(p) for p in (proteins or [])]
        self.objective = objective
        self.n_importance_samples = int(n_importance_samples)
        self.dreg = bool(dreg)
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.classification_weight = float(classification_weight)
        self.n_train_cells = None if n_train_cells is None else int(n_train_cells)
        self.protein_samples = int(protein_samples)
        super().__init__(**kwargs)

    def _validate(self) -> None:
        super()._validate()
        choices = {"covariance": COVARIANCES, "likelihood": LIKELIHOODS, "dispersion": DISPERSIONS, "prior": PRIORS,
                   "objective": OBJECTIVES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ExpressVAEConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        checks = [
            (self.n_latent >= 1, f"n_latent must be >= 1, got {self.n_latent}"),
            (self.decoder_hidden_size >= 1 and self.decoder_layers >= 1, "the decoder needs width and depth >= 1"),
            (bool(self.gene_panel), "the VAE needs the decoder's genes (gene_panel)"),
            (self.n_importance_samples >= 1, "n_importance_samples must be >= 1"),
            (self.objective != "iwae" or self.n_importance_samples >= 2,
             "objective='iwae' needs n_importance_samples >= 2"),
            (self.dispersion != "gene-batch" or bool(self.batch_categories),
             "dispersion='gene-batch' needs batch_categories"),
            (self.kl_warmup_steps >= 0 and self.protein_samples >= 1, "kl_warmup_steps >= 0, protein_samples >= 1"),
            (self.hyper_scale > 0, f"hyper_scale must be > 0, got {self.hyper_scale}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ExpressVAEConfig: {message}")
