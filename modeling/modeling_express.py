"""The express encoder: a BERT-style transformer over rank-encoded cells, with pretraining and classification heads.

Reading order: embeddings -> attention -> feed-forward -> layer -> ``ExpressPreTrainedModel`` (weight init, gene
statistics) -> ``ExpressModel`` -> the pretraining heads (``ExpressForMaskedModeling``). The fine-tuning heads are in
``modeling_heads.py``.

A cell arrives as the express tokenizer writes it: ``<cls>``, its detected genes in descending order of normalised
expression, then sampled zero-expressed genes (an unordered set). Per token the model reads the gene id, its
normalised value and whether it is a sampled zero; the gene's hierarchy groups and corpus zero fraction are looked up
from buffers that :meth:`ExpressPreTrainedModel.set_gene_statistics` fills from the vocabulary.

Attention goes through the ``transformers`` attention interface, so ``attn_implementation`` may be ``"sdpa"``
(default), ``"eager"`` or ``"flash_attention_2"``. Batches with padding can run "unpadded": every token-wise operation
sees only real tokens, and FlashAttention runs its variable-length kernel on the packed tokens (see
``ExpressConfig.unpad_inputs``).

This file imports only ``torch``, ``transformers`` and its sibling files: it travels with saved checkpoints so that
``trust_remote_code=True`` loads them without the express package.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_express import ExpressConfig
from .likelihoods import log_nb, log_ztnb

if TYPE_CHECKING:
    import numpy as np

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # targets at this value are not scored (the convention of PyTorch's losses and transformers)
# The files that travel with a checkpoint (they import only torch, transformers and each other).
CODE_FILES = ("configuration_express.py", "modeling_express.py", "modeling_heads.py", "vae.py", "likelihoods.py")
# Every Auto class a saved checkpoint should answer with its own code, whichever of the classes was saved.
AUTO_MAPS = {
    "express": {
        "AutoConfig": "configuration_express.ExpressConfig",
        "AutoModel": "modeling_express.ExpressModel",
        "AutoModelForMaskedLM": "modeling_express.ExpressForMaskedModeling",
        "AutoModelForSequenceClassification": "modeling_heads.ExpressForCellClassification",
    },
    "express_vae": {
        "AutoConfig": "configuration_express.ExpressVAEConfig",
        "AutoModel": "modeling_heads.ExpressForVAE",
    },
}


def _is_flash_attention(attn_implementation: str | None) -> bool:
    """FlashAttention kernels take packed tokens with ``cu_seqlens`` (variable-length attention) directly."""
    return attn_implementation is not None and "flash" in attn_implementation


# --- embeddings ------------------------------------------------------------------------------------------------------


class ExpressScalarEmbedding(nn.Module):
    """A scalar feature -> hidden vector, through a one-hidden-layer MLP (so the model can bin it softly)."""

    def __init__(self, width: int, hidden_size: int, act: str) -> None:
        super().__init__()
        self.up = nn.Linear(1, width)
        self.act = ACT2FN[act]
        self.down = nn.Linear(width, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x.unsqueeze(-1))))  # (..., H)


class ExpressEmbeddings(nn.Module):
    """Token embedding = projection of the hierarchical gene embedding (optionally LayerNorm-ed, optionally gated by
    the gene's value) + value + zero fraction + rank position + sampled-zero marker, then LayerNorm and dropout.
    Works on any leading shape: ``(B, T)`` or packed ``(N,)``."""

    ZERO_FRACTION_WIDTH = 16  # hidden width of the zero-fraction MLP: one scalar in [0, 1] needs little

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__()
        self.config = config
        self.gene_embeddings = nn.Embedding(
            config.vocab_size, config.gene_embedding_dim, padding_idx=config.pad_token_id
        )
        # Group 0 is the "no group" of special tokens: a fixed zero vector.
        self.group_embeddings = nn.ModuleList(
            nn.Embedding(n, d, padding_idx=0) for n, d in zip(config.group_level_sizes, config.group_embedding_dims)
        )
        if config.hierarchy_combine == "concat":
            combined = config.gene_embedding_dim + sum(config.group_embedding_dims)
        else:
            combined = config.gene_embedding_dim
        self.gene_projection = nn.Linear(combined, config.hidden_size)
        self.gene_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) \
            if config.gene_embedding_norm else None
        self.value_gate = ExpressScalarEmbedding(config.value_embedding_dim, config.hidden_size, config.hidden_act) \
            if config.value_gating else None
        self.value_embedding = (
            ExpressScalarEmbedding(config.value_embedding_dim, config.hidden_size, config.hidden_act)
            if config.value_embedding_dim > 0
            else None
        )
        self.zero_fraction_embedding = (
            ExpressScalarEmbedding(self.ZERO_FRACTION_WIDTH, config.hidden_size, config.hidden_act)
            if config.use_zero_fraction
            else None
        )
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "rank"
            else None
        )
        self.zero_marker = nn.Parameter(torch.zeros(config.hidden_size))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Per-token gene statistics, filled from the vocabulary and saved with the weights.
        self.register_buffer("gene_zero_fraction", torch.zeros(config.vocab_size), persistent=True)
        self.register_buffer(
            "gene_group_ids", torch.zeros(config.vocab_size, config.n_levels, dtype=torch.long), persistent=True
        )
        self.register_buffer("gene_statistics_set", torch.zeros((), dtype=torch.bool), persistent=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None,
        is_zero: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        gene = self.gene_embeddings(input_ids)  # (..., Dg)
        if self.group_embeddings:
            group_ids = self.gene_group_ids[input_ids]  # (..., L): the vocabulary's groups, the one source of them
            groups = [table(group_ids[..., level]) for level, table in enumerate(self.group_embeddings)]
            if self.config.hierarchy_combine == "concat":
                gene = torch.cat([gene, *groups], dim=-1)  # (..., Dg + sum(Dl))
            else:
                gene = gene + sum(groups)
        x = self.gene_projection(gene)  # (..., H)
        if self.gene_norm is not None:
            x = self.gene_norm(x)
        dtype = x.dtype
        if values is not None and (self.value_embedding is not None or self.value_gate is not None):
            level = torch.log1p(values.float().clamp_min(0)).to(dtype)  # (...,)
            if self.value_gate is not None:  # the gene's own vector turns with its level (a direction survives LN)
                x = x * (1.0 + self.value_gate(level))
            if self.value_embedding is not None:
                x = x + self.value_embedding(level)
        if self.zero_fraction_embedding is not None:
            x = x + self.zero_fraction_embedding(self.gene_zero_fraction[input_ids].to(dtype))
        zero = is_zero.unsqueeze(-1)  # (..., 1) bool
        if self.position_embeddings is not None:
            # Sampled zeros are an unordered set: they get no rank position, only the marker below.
            x = x + self.position_embeddings(positions).masked_fill(zero, 0.0)
        x = x + zero.to(dtype) * self.zero_marker.to(dtype)
        return self.dropout(self.layer_norm(x))


# --- attention -------------------------------------------------------------------------------------------------------


@dataclass
class ExpressPacking:
    """Where the real tokens of a padded ``(B, T)`` batch sit once packed into one row of ``N`` tokens."""

    indices: torch.Tensor  # (N,) positions of real tokens in the flattened (B * T) batch
    cu_seqlens: torch.Tensor  # (B + 1,) int32 cumulative cell lengths
    max_seqlen: int
    batch_size: int
    seq_len: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> ExpressPacking:
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1, dtype=torch.int32)  # (B,)
        return cls(
            indices=mask.flatten().nonzero(as_tuple=True)[0],
            cu_seqlens=F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0)),
            max_seqlen=int(lengths.max()),
            batch_size=mask.shape[0],
            seq_len=mask.shape[1],
        )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, ...)`` -> ``(N, ...)``."""
        return x.reshape(self.batch_size * self.seq_len, *x.shape[2:]).index_select(0, self.indices)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` -> ``(B, T, ...)`` with zeros at padding."""
        out = x.new_zeros(self.batch_size * self.seq_len, *x.shape[1:])
        return out.index_put((self.indices,), x).view(self.batch_size, self.seq_len, *x.shape[1:])

    def flash_kwargs(self) -> dict:
        """The keyword arguments with which ``transformers``' FlashAttention runs its variable-length kernel."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention; ``attention_mask`` is additive (``transformers``' eager mask). Returns ``(B, T, h, d)``."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, h, T, T)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, h, d)
    return out, weights


class ExpressAttention(nn.Module):
    """Bidirectional multi-head self-attention with one fused QKV projection."""

    def __init__(self, config: ExpressConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packing: ExpressPacking | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (B, T), or (1, N) when packed
        qkv = self.qkv(hidden_states).view(*input_shape, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=-3)  # each (B, T, h, d)
        pad_around = packing is not None and not _is_flash_attention(self.config._attn_implementation)
        if pad_around:  # this kernel needs a padded batch: pad for the attention call only
            query, key, value = (packing.unpack(x[0]) for x in (query, key, value))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query.transpose(1, 2),  # (B, h, T, d)
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # out: (B, T, h, d)
        if pad_around:
            out = packing.pack(out).unsqueeze(0)  # (1, N, h, d)
        return self.out(out.reshape(*input_shape, -1)), weights


# --- feed-forward and layer ------------------------------------------------------------------------------------------


class ExpressMLP(nn.Module):
    def __init__(self, config: ExpressConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class ExpressLayer(GradientCheckpointingLayer):
    """Attention and feed-forward blocks, each with a residual connection; LayerNorm before (pre) or after (post)."""

    def __init__(self, config: ExpressConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.attention = ExpressAttention(config, layer_idx)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ExpressMLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            attn, weights = self.attention(self.attention_norm(hidden_states), attention_mask, **kwargs)
            hidden_states = hidden_states + self.dropout(attn)
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        else:
            attn, weights = self.attention(hidden_states, attention_mask, **kwargs)
            hidden_states = self.attention_norm(hidden_states + self.dropout(attn))
            hidden_states = self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states)))
        return hidden_states, weights


# --- pretrained model base -------------------------------------------------------------------------------------------


class ExpressPreTrainedModel(PreTrainedModel):
    """Owns weight initialisation, the gene-statistics buffers and the ``transformers`` capability flags."""

    config_class = ExpressConfig
    base_model_prefix = "express"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ExpressEmbeddings", "ExpressLayer"]
    # A checkpoint from one head loads into another (pretraining -> fine-tuning) without listing the other's weights.
    _keys_to_ignore_on_load_unexpected = [r"^(mlm|mcv|count|contrastive|celltype)_head\.", r"^(hidden|classifier)\.",
                                          r"^vae\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(0, initializer_range) Linear/Embedding, zero biases, unit LayerNorms
        std = self.config.initializer_range
        if isinstance(module, ExpressEmbeddings):
            init.normal_(module.zero_marker, mean=0.0, std=std)
            init.zeros_(module.gene_zero_fraction)
            init.zeros_(module.gene_group_ids)
            init.zeros_(module.gene_statistics_set)
        elif isinstance(module, (ExpressAttention, ExpressMLP)):
            # Residual-branch outputs scaled down with depth (GPT-2), so the residual stream's variance stays O(1).
            out = module.out if isinstance(module, ExpressAttention) else module.down
            init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2.0 * self.config.num_hidden_layers))
        elif isinstance(module, ExpressMCVHead):
            init.zeros_(module.log_theta)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``; when the code travels with the checkpoint (the classes are registered
        for the Auto classes, as importing ``modeling`` does), ``config.json`` maps every Auto class to it, so a
        checkpoint saved from any head loads with any Auto class and ``trust_remote_code=True``.

        Files get the permissions the user's umask gives any new file (``transformers`` writes the weights through a
        private temporary file, mode 0600), so others can read a model on a shared filesystem."""
        if self._auto_class is not None and self.config._auto_class is not None:
            own = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**AUTO_MAPS[self.config.model_type], **own}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None:  # every code file, so that any Auto class of the auto_map finds its class
            for name in CODE_FILES:
                if not (Path(save_directory) / name).exists():
                    shutil.copyfile(Path(__file__).with_name(name), Path(save_directory) / name)
        umask = os.umask(0)
        os.umask(umask)
        for path in Path(save_directory).iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        return result

    def _embeddings(self) -> ExpressEmbeddings:
        return self.base_model.embeddings

    def set_gene_statistics(
        self, zero_fraction: torch.Tensor | np.ndarray, group_ids: torch.Tensor | np.ndarray | None = None
    ) -> None:
        """Fill the per-token buffers from the vocabulary (saved with the weights by ``save_pretrained``).

        Args:
            zero_fraction: ``(vocab_size,)`` share of cells in which each token's gene is zero (``0`` for special
                tokens): ``GeneVocab.token_zero_fraction``.
            group_ids: ``(vocab_size, n_levels)`` hierarchy group of each token per level (``0`` for special
                tokens): ``GeneVocab.token_group_ids``. Required when the config has group levels.
        """
        embeddings = self._embeddings()
        config = self.config
        zero_fraction = torch.as_tensor(zero_fraction, dtype=torch.float32)
        if zero_fraction.shape != (config.vocab_size,):
            raise ValueError(
                f"zero_fraction has shape {tuple(zero_fraction.shape)}, expected ({config.vocab_size},) = vocab_size"
            )
        if not torch.all((zero_fraction >= 0) & (zero_fraction <= 1)):
            raise ValueError("zero_fraction values must lie in [0, 1]")
        if config.n_levels:
            if group_ids is None:
                raise ValueError(
                    f"the config has {config.n_levels} group levels: pass group_ids (vocab_size, n_levels)"
                )
            group_ids = torch.as_tensor(group_ids, dtype=torch.long)
            if group_ids.ndim == 1:
                group_ids = group_ids.unsqueeze(1)
            if group_ids.shape != (config.vocab_size, config.n_levels):
                raise ValueError(
                    f"group_ids has shape {tuple(group_ids.shape)}, expected ({config.vocab_size}, {config.n_levels})"
                )
            for level, size in enumerate(config.group_level_sizes):
                ids = group_ids[:, level]
                if ids.min() < 0 or ids.max() >= size:
                    raise ValueError(
                        f"group_ids of level {level + 1} span [{int(ids.min())}, {int(ids.max())}] but "
                        f"group_level_sizes[{level}] = {size}; build the config with ExpressConfig.from_vocab(vocab)"
                    )
            embeddings.gene_group_ids.copy_(group_ids)
        elif group_ids is not None and torch.as_tensor(group_ids).numel() > 0:
            logger.warning("group_ids ignored: the config has no group levels (group_level_sizes is empty)")
        embeddings.gene_zero_fraction.copy_(zero_fraction)
        embeddings.gene_statistics_set.fill_(True)


# --- encoder ---------------------------------------------------------------------------------------------------------


class ExpressModel(ExpressPreTrainedModel):
    """The express encoder. Returns ``last_hidden_state`` (B, T, H; zeros at padding) and ``pooler_output`` (B, H),
    the cell embedding chosen by ``config.classifier_pooling``."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        self.embeddings = ExpressEmbeddings(config)
        self.layers = nn.ModuleList(ExpressLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.norm_placement == "pre"
            else nn.Identity()
        )
        self.gradient_checkpointing = False
        self._checked_statistics = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene_embeddings = value

    def _should_unpad(self, attention_mask: torch.Tensor) -> bool:
        choice = self.config.unpad_inputs
        if choice is False or (choice is None and not _is_flash_attention(self.config._attn_implementation)):
            return False
        return not bool(attention_mask.all())

    def _check_statistics(self) -> None:
        """Warn once when the model reads gene statistics that were never filled."""
        self._checked_statistics = True
        uses_statistics = self.config.n_levels > 0 or self.config.use_zero_fraction
        if uses_statistics and not bool(self.embeddings.gene_statistics_set):
            logger.warning(
                "gene statistics were never set: every gene reads zero fraction 0 and hierarchy group 0. "
                "Call model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids) before training."
            )

    def pool(
        self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        is_zero: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell embedding: the ``<cls>`` state (B, H), the mean over the cell's detected genes (B, H; special tokens
        and sampled zeros left out), or both concatenated (B, 2H), as ``config.classifier_pooling`` says."""
        pooling = self.config.classifier_pooling
        if pooling == "cls":
            return last_hidden_state[:, 0]
        keep = attention_mask.bool() & (input_ids >= self.config.num_special_tokens)
        if is_zero is not None:
            keep &= ~is_zero.bool()
        keep = keep.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, T, 1)
        mean = (last_hidden_state * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, H)
        return mean if pooling == "mean" else torch.cat([last_hidden_state[:, 0], mean], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        is_zero: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (``<cls>`` first).
            values (`torch.FloatTensor` of shape `(B, T)`, *optional*): normalised expression (the tokenizer's
                ``values``); embedded as ``log1p(values)``. Omitted: rank-only input.
            is_zero (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for sampled zero-expressed genes.
            attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for real tokens, 0 for padding;
                defaults to ``input_ids != pad_token_id``.

        Each token's hierarchy groups and zero fraction are looked up from the model's buffers
        (:meth:`ExpressPreTrainedModel.set_gene_statistics`).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        batch_size, seq_len = input_ids.shape
        if self.embeddings.position_embeddings is not None and seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"the batch has {seq_len} tokens per cell but max_position_embeddings is "
                f"{self.config.max_position_embeddings}; tokenize with a smaller top_k or build the model with a "
                "larger max_position_embeddings"
            )
        if not self._checked_statistics:
            self._check_statistics()
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        attention_mask = attention_mask.bool()
        is_zero = torch.zeros_like(attention_mask) if is_zero is None else is_zero.bool()
        # Rank position: <cls> is 0, then each detected gene in order; sampled zeros do not advance it.
        ranked = attention_mask & ~is_zero
        positions = (torch.cumsum(ranked, dim=1) - 1).clamp_min(0)  # (B, T)

        packing = ExpressPacking.from_mask(attention_mask) if self._should_unpad(attention_mask) else None
        if packing is None:
            hidden_states = self.embeddings(input_ids, values, is_zero, positions)  # (B, T, H)
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
            layer_kwargs = {}
        else:
            hidden_states = self.embeddings(
                packing.pack(input_ids),
                None if values is None else packing.pack(values),
                packing.pack(is_zero),
                packing.pack(positions),
            ).unsqueeze(0)  # (1, N, H)
            if _is_flash_attention(self.config._attn_implementation):
                mask, layer_kwargs = None, {"packing": packing, **packing.flash_kwargs()}
            else:
                # Padded mask for the attention call (made from a zero-size stand-in with the padded batch's shape).
                stand_in = hidden_states.new_empty(batch_size, seq_len, 0)
                mask = create_bidirectional_mask(
                    config=self.config, inputs_embeds=stand_in, attention_mask=attention_mask
                )
                layer_kwargs = {"packing": packing}

        def to_padded(h: torch.Tensor) -> torch.Tensor:
            if packing is not None:
                return packing.unpack(h[0])  # (B, T, H), zeros at padding
            return h.masked_fill(~attention_mask.unsqueeze(-1), 0.0)

        all_hidden_states = (to_padded(hidden_states),) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, mask, **layer_kwargs, **kwargs)
            if output_hidden_states:
                all_hidden_states += (to_padded(hidden_states),)
            if output_attentions:
                all_attentions += (weights,)
        last_hidden_state = to_padded(self.final_norm(hidden_states))  # (B, T, H)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool(last_hidden_state, input_ids, attention_mask, is_zero),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


# --- heads -----------------------------------------------------------------------------------------------------------


class ExpressHeadTransform(nn.Module):
    """Dense -> activation -> LayerNorm, shared shape of the prediction heads' first step."""

    def __init__(self, config: ExpressConfig, width: int | None = None, in_size: int | None = None) -> None:
        super().__init__()
        width = width or config.hidden_size
        self.dense = nn.Linear(in_size or config.hidden_size, width)
        self.act = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.act(self.dense(x)))


class ExpressMLMHead(nn.Module):
    """Masked-gene prediction: hidden state -> gene-embedding space -> logits over the vocabulary. The decoder
    shares its weight with the level-0 gene table when ``config.tie_word_embeddings`` (the default)."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__()
        self.transform = ExpressHeadTransform(config, config.gene_embedding_dim)
        self.decoder = nn.Linear(config.gene_embedding_dim, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class ExpressMCVHead(nn.Module):
    """Held-out counts from the ``<cls>`` state or the pooled cell embedding (``config.mcv_input``): each gene's
    share of the held-out library (softmax over the genes the cell's source measures) and a learned per-gene inverse
    dispersion for the negative binomial."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__()
        self.num_special_tokens = config.num_special_tokens
        in_size = config.pooled_size if config.mcv_input == "pooled" else config.hidden_size
        self.transform = ExpressHeadTransform(config, in_size=in_size)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.log_theta = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, state: torch.Tensor, gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.decoder(self.transform(state))  # (B, V)
        # Special tokens are not genes, nor are genes the cell's source does not measure: no share of the counts.
        special = torch.arange(logits.shape[-1], device=logits.device) < self.num_special_tokens
        logits = logits.masked_fill(special, -math.inf)
        return logits if gene_mask is None else logits.masked_fill(~gene_mask.bool(), -math.inf)


class ExpressContrastiveHead(nn.Module):
    """Projection of the pooled cell embedding for the contrastive objective (SimCLR's projection head)."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__()
        self.transform = ExpressHeadTransform(config, in_size=config.pooled_size)
        self.projection = nn.Linear(config.hidden_size, config.contrastive_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.transform(pooled)).float(), dim=-1)  # (B, D) unit vectors


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of paired unit vectors ``a[i] <-> b[i]`` (B, D) against the other cells of the batch:
    ``(CE(a b^T / t, diag) + CE(b a^T / t, diag)) / 2``."""
    logits = a @ b.T / temperature  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class ExpressCountHead(nn.Module):
    """Count of a masked detected gene: its share of the library (sigmoid) and an inverse dispersion (softplus)."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__()
        self.transform = ExpressHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        share_logit, theta_raw = self.decoder(self.transform(hidden)).float().unbind(-1)
        return torch.sigmoid(share_logit), F.softplus(theta_raw) + 1e-4


@dataclass
class ExpressMaskedModelingOutput(ModelOutput):
    """Output of :class:`ExpressForMaskedModeling`; each loss is present only when its targets were given.

    Args:
        loss: the weighted sum (``mlm_weight * mlm_loss + mcv_weight * mcv_loss + ...``) over the given losses.
        mlm_loss: mean cross-entropy of the gene id over masked positions.
        mcv_loss: negative-binomial negative log-likelihood of the held-out counts in nats per held-out count: over
            the batch (``mcv_normalization="count"``), or per cell and then averaged over cells (``"cell"``).
        count_loss: mean zero-truncated NB negative log-likelihood of the masked detected genes' counts.
        contrastive_loss: InfoNCE of the two views' projected cell embeddings against the batch's other cells.
        celltype_loss: mean cross-entropy of the cell type over the labelled cells of the batch.
        logits: gene logits, ``(M, vocab_size)`` at the ``M`` masked positions (``labels != -100``, row-major order)
            when ``labels`` are given, else ``(B, T, vocab_size)`` at every position.
        mcv_logits: ``(B, vocab_size)``; ``softmax(mcv_logits)`` is each gene's predicted share of held-out counts
            (``-inf`` for special tokens).
        mcv_theta: ``(vocab_size,)`` per-gene inverse dispersion of the MCV likelihood.
        celltype_logits: ``(B, len(cell_type_names))`` logits of the cell-type head.
        count_mean, count_theta: NB mean and inverse dispersion of the count head, at the positions with count
            targets (``(K,)``), or ``(B, T)`` when no targets at all are given (``count_mean`` then needs
            ``library_size``; it is the share of the library otherwise).
    """

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mcv_loss: torch.Tensor | None = None
    count_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    celltype_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mcv_logits: torch.Tensor | None = None
    mcv_theta: torch.Tensor | None = None
    count_mean: torch.Tensor | None = None
    count_theta: torch.Tensor | None = None
    celltype_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ExpressForMaskedModeling(ExpressPreTrainedModel):
    """The encoder with its pretraining heads: masked-gene prediction (MLM), molecular cross-validation (MCV, from
    ``<cls>`` or the pooled cell embedding), zero-truncated counts of masked genes, and the contrastive agreement of
    two views of a cell, and (for corpora with labels) the cell type from the pooled embedding. Heads run when their
    targets are given; with no targets at all (inference) the token and MCV
    heads run and return their predictions."""

    _tied_weights_keys = {"mlm_head.decoder.weight": "express.embeddings.gene_embeddings.weight"}

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        self.express = ExpressModel(config)
        self.mlm_head = ExpressMLMHead(config)
        self.mcv_head = ExpressMCVHead(config) if config.use_mcv_head else None
        self.count_head = ExpressCountHead(config) if config.use_count_head else None
        self.contrastive_head = ExpressContrastiveHead(config) if config.use_contrastive_head else None
        self.celltype_head = nn.Linear(config.pooled_size, len(config.cell_type_names)) \
            if config.use_celltype_head else None
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        is_zero: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mcv_counts: torch.Tensor | None = None,
        mcv_library_size: torch.Tensor | None = None,
        mcv_gene_mask: torch.Tensor | None = None,
        count_targets: torch.Tensor | None = None,
        library_size: torch.Tensor | None = None,
        pair_input_ids: torch.Tensor | None = None,
        pair_values: torch.Tensor | None = None,
        pair_is_zero: torch.Tensor | None = None,
        pair_attention_mask: torch.Tensor | None = None,
        cell_type_labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ExpressMaskedModelingOutput | tuple:
        r"""
        Args (besides :meth:`ExpressModel.forward`'s):
            labels (`(B, T)`): true gene id at masked positions, -100 elsewhere -> ``mlm_loss``. The MLM head runs
                only at these positions.
            mcv_counts (`(B, vocab_size)`): held-out counts per token id -> ``mcv_loss``.
            mcv_library_size (`(B,)`): the held-out library size that scales the NB mean
                ``mcv_library_size * softmax(mcv_logits)``; defaults to ``mcv_counts.sum(-1)``.
            mcv_gene_mask (`(B, vocab_size)` bool): the genes each cell's source file measures; the held-out
                library is spread over them only. Default: every gene.
            count_targets (`(B, T)`): raw counts (>= 1) of masked detected genes, -100 elsewhere -> ``count_loss``.
            library_size (`(B,)`): each cell's library size, scaling the count head's mean; required with
                ``count_targets``.
            pair_input_ids, pair_values, pair_is_zero, pair_attention_mask (`(B, T')`): a second view of each cell
                -> ``contrastive_loss`` between the two views' cell embeddings.
            cell_type_labels (`(B,)`): index into ``config.cell_type_names``, -100 for cells without a label
                -> ``celltype_loss``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.express(
            input_ids, values=values, is_zero=is_zero, attention_mask=attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True, **kwargs,
        )
        sequence = outputs.last_hidden_state  # (B, T, H)
        inference = labels is None and mcv_counts is None and count_targets is None and pair_input_ids is None \
            and cell_type_labels is None
        losses: dict[str, torch.Tensor] = {}
        logits = mcv_logits = mcv_theta = count_mean = count_theta = celltype_logits = None

        if labels is not None:
            masked = labels != IGNORE_INDEX  # (B, T)
            logits = self.mlm_head(sequence[masked])  # (M, V): the vocabulary projection only where it is scored
            if logits.shape[0]:
                losses["mlm"] = F.cross_entropy(logits.float(), labels[masked])
            else:  # no masked token in this batch: a zero that still depends on the parameters (DDP-safe)
                losses["mlm"] = logits.sum() * 0.0
        elif inference:
            logits = self.mlm_head(sequence)  # (B, T, V)

        if mcv_counts is not None or (inference and self.mcv_head is not None):
            if self.mcv_head is None:
                raise ValueError("mcv_counts were given but the model has no MCV head (config.use_mcv_head=False)")
            state = outputs.pooler_output if self.config.mcv_input == "pooled" else sequence[:, 0]
            mcv_logits = self.mcv_head(state, mcv_gene_mask)  # (B, V)
            mcv_theta = self.mcv_head.log_theta.float().exp()  # (V,)
            if mcv_counts is not None:
                losses["mcv"] = self.mcv_loss(mcv_logits, mcv_theta, mcv_counts, mcv_library_size)

        if count_targets is not None or (inference and self.count_head is not None):
            if self.count_head is None:
                raise ValueError(
                    "count_targets were given but the model has no count head (config.use_count_head=False)"
                )
            if count_targets is not None:
                if library_size is None:
                    raise ValueError("count_targets need library_size (B,): each cell's total counts")
                selected = count_targets != IGNORE_INDEX  # (B, T)
                targets = count_targets[selected].float()
                if bool((targets < 1).any()):
                    raise ValueError(
                        "count_targets must be >= 1 at scored positions (a detected gene's count) and -100 elsewhere"
                    )
                share, count_theta = self.count_head(sequence[selected])  # (K,)
                lib = library_size.float().unsqueeze(1).expand_as(count_targets)[selected]
                count_mean = lib * share
                if targets.numel():
                    losses["count"] = -log_ztnb(targets, count_mean, count_theta).mean()
                else:
                    losses["count"] = count_mean.sum() * 0.0
            else:
                count_mean, count_theta = self.count_head(sequence)  # (B, T) shares of the library
                if library_size is not None:
                    count_mean = count_mean * library_size.float().unsqueeze(1)

        if pair_input_ids is not None:
            if self.contrastive_head is None:
                raise ValueError("a second view was given but the model has no contrastive head "
                                 "(config.use_contrastive_head=False)")
            pair = self.express(pair_input_ids, values=pair_values, is_zero=pair_is_zero,
                                attention_mask=pair_attention_mask, return_dict=True).pooler_output
            losses["contrastive"] = info_nce(self.contrastive_head(outputs.pooler_output), self.contrastive_head(pair),
                                             self.config.contrastive_temperature)

        if cell_type_labels is not None or (inference and self.celltype_head is not None):
            if self.celltype_head is None:
                raise ValueError("cell_type_labels were given but the model has no cell-type head "
                                 "(config.use_celltype_head=False)")
            celltype_logits = self.celltype_head(outputs.pooler_output)  # (B, C)
            if cell_type_labels is not None:
                labelled = cell_type_labels != IGNORE_INDEX
                # mean over the labelled cells; a batch without any still gives a parameter-dependent zero (DDP)
                losses["celltype"] = F.cross_entropy(celltype_logits.float()[labelled], cell_type_labels[labelled]) \
                    if bool(labelled.any()) else celltype_logits.sum() * 0.0

        weights = {"mlm": self.config.mlm_weight, "mcv": self.config.mcv_weight, "count": self.config.count_weight,
                   "contrastive": self.config.contrastive_weight, "celltype": self.config.celltype_weight}
        loss = sum(weights[name] * value for name, value in losses.items()) if losses else None
        output = ExpressMaskedModelingOutput(
            loss=loss,
            mlm_loss=losses.get("mlm"),
            mcv_loss=losses.get("mcv"),
            count_loss=losses.get("count"),
            contrastive_loss=losses.get("contrastive"),
            celltype_loss=losses.get("celltype"),
            logits=logits,
            mcv_logits=mcv_logits,
            mcv_theta=mcv_theta,
            count_mean=count_mean,
            count_theta=count_theta,
            celltype_logits=celltype_logits,
            last_hidden_state=sequence,
            pooler_output=outputs.pooler_output,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def mcv_loss(
        self,
        mcv_logits: torch.Tensor,
        mcv_theta: torch.Tensor,
        mcv_counts: torch.Tensor,
        mcv_library_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """NB negative log-likelihood of held-out counts, per held-out count (:class:`ExpressMaskedModelingOutput`):
        of the batch, or of each cell and then averaged over the cells that hold something out."""
        nll, held = self.mcv_cell_nll(mcv_logits, mcv_theta, mcv_counts, mcv_library_size)
        if self.config.mcv_normalization == "cell":
            scored = held > 0
            return (nll[scored] / held[scored]).sum() / scored.sum().clamp_min(1)
        return nll.sum() / held.sum().clamp_min(1.0)

    def mcv_cell_nll(
        self,
        mcv_logits: torch.Tensor,
        mcv_theta: torch.Tensor,
        mcv_counts: torch.Tensor,
        mcv_library_size: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's NB negative log-likelihood of its held-out counts (B,) and its held-out count (B,)."""
        if mcv_counts.shape != mcv_logits.shape:
            raise ValueError(
                f"mcv_counts must have shape (batch, vocab_size) = {tuple(mcv_logits.shape)}, "
                f"got {tuple(mcv_counts.shape)}"
            )
        n = self.config.num_special_tokens
        counts = mcv_counts[:, n:].float()  # (B, G) genes only
        library = counts.sum(-1) if mcv_library_size is None else mcv_library_size.float()  # (B,)
        mean = library.unsqueeze(-1) * torch.softmax(mcv_logits[:, n:].float(), dim=-1)  # (B, G)
        # genes outside a cell's source (share 0) hold no counts and are not scored
        scored_genes = torch.isfinite(mcv_logits[:, n:])
        nll = torch.where(scored_genes, -log_nb(counts, mean, mcv_theta[n:].unsqueeze(0)), 0.0).sum(-1)  # (B,)
        return nll, counts.sum(-1)

__all__ = [
    "ExpressForMaskedModeling",
    "ExpressMaskedModelingOutput",
    "ExpressModel",
    "ExpressPreTrainedModel",
]
