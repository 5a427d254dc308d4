"""Fine-tuning heads on a cell embedding: one classifier / regressor and the VAE.

Reading order: the MLP cell encoder (the scVI-like baseline encoder) -> :class:`ExpressHeadPreTrainedModel` (a head's
encoder: the pretrained transformer or the MLP, chosen by ``config.encoder``) -> :class:`ExpressForCellClassification`
(cell types; protein levels as multi-output regression) -> :class:`ExpressForVAE` (VAE/IWAE with count likelihoods,
the mixture prior over cell types, batch conditioning, and an optional protein decoder).

Every head is called the same way, ``model(**batch)``, and returns a ``ModelOutput`` with ``loss`` when the batch holds
its targets and ``embedding`` (the cell representation the head reads, or for the VAE the posterior mean) always:

- the transformer encoder reads ``input_ids``, ``values``, ``is_zero``, ``attention_mask`` (the tokenizer's columns,
  padded by the collator); the MLP encoder reads ``gene_counts`` (raw counts of ``config.gene_panel``) and
  ``total_counts`` (each cell's library size over all its genes);
- targets: ``labels`` (class ids, -100 = unlabelled; float protein levels for regression), and for the VAE
  ``gene_counts`` (the decoder's genes), ``batch_index`` and ``protein_counts``.

This file imports only ``torch``, ``transformers`` and its sibling files: it travels with saved checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_express import ExpressConfig, ExpressVAEConfig
from .modeling_express import IGNORE_INDEX, ExpressModel, ExpressPreTrainedModel
from .vae import CountDecoder, GaussianMixturePrior, GaussianPosterior, VAEHead, mlp, normalize_protein_counts


class MLPCellEncoder(nn.Module):
    """The scVI-like baseline encoder: an MLP on ``log1p(counts / library * 1e4)`` of a fixed gene panel.

    ``input_dropout`` zeroes each input gene with that probability during training (and rescales the rest), so the
    encoder cannot lean on a few genes -- a regulariser against donor- or batch-specific markers."""

    def __init__(self, n_genes: int, *, n_hidden: int = 256, n_layers: int = 2, dropout: float = 0.1,
                 input_dropout: float = 0.0):
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        self.net = mlp(n_genes, n_hidden, n_layers, dropout)

    def forward(self, gene_counts: torch.Tensor, total_counts: torch.Tensor) -> torch.Tensor:
        library = total_counts.float().clamp_min(1.0).unsqueeze(-1)  # (B, 1)
        return self.net(self.input_dropout(torch.log1p(gene_counts.float() / library * 1e4)))  # (B, H)


class ExpressHeadPreTrainedModel(ExpressPreTrainedModel):
    """Base of the fine-tuning heads: the cell encoder named by ``config.encoder``, under the ``express`` prefix (so
    ``from_pretrained`` on a pretraining checkpoint loads the transformer's weights), and the initialisation of the
    head parameters that are not plain layers."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        if config.encoder == "transformer":
            self.express: nn.Module = ExpressModel(config)
            self.embedding_size = config.pooled_size
        else:
            self.express = MLPCellEncoder(len(config.gene_panel), n_hidden=config.mlp_hidden_size,
                                          n_layers=config.mlp_layers, dropout=config.head_dropout,
                                          input_dropout=config.input_dropout)
            self.embedding_size = config.mlp_hidden_size

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GaussianMixturePrior):
            init.normal_(module.means, mean=0.0, std=1.0)  # spread, so components are distinguishable at once
            init.zeros_(module.log_scales)
            init.zeros_(module.logits)
            if module.parents is not None:
                init.zeros_(module.parent_means)
        elif isinstance(module, GaussianPosterior) and module.covariance == "full":
            init.zeros_(module.off_diagonal.weight)
            init.zeros_(module.off_diagonal.bias)
        elif isinstance(module, CountDecoder):
            init.zeros_(module.log_theta)

    def embed(
        self, input_ids: torch.Tensor | None = None, values: torch.Tensor | None = None,
        is_zero: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        gene_counts: torch.Tensor | None = None, total_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cell embedding (B, H): the transformer's pooled output, or the MLP encoder's output."""
        if self.config.encoder == "transformer":
            if input_ids is None:
                raise ValueError("the transformer encoder needs tokenized cells (input_ids, values, is_zero)")
            return self.express(input_ids, values=values, is_zero=is_zero, attention_mask=attention_mask).pooler_output
        if gene_counts is None or total_counts is None:
            raise ValueError("the MLP encoder needs gene_counts (raw counts of config.gene_panel) and total_counts")
        return self.express(gene_counts, total_counts)

    def freeze_encoder(self, layers: int | None = None) -> None:
        """Freeze the whole encoder (``layers=None``) or the transformer's embeddings and its lowest ``layers``."""
        if layers is None:
            self.express.requires_grad_(False)
            return
        if self.config.encoder != "transformer":
            raise ValueError("freezing the lower N layers applies to the transformer encoder only")
        if not 0 <= layers <= self.config.num_hidden_layers:
            raise ValueError(f"layers must lie in [0, {self.config.num_hidden_layers}], got {layers}")
        if layers > 0:
            self.express.embeddings.requires_grad_(False)
            for layer in self.express.layers[:layers]:
                layer.requires_grad_(False)


@dataclass
class CellClassifierOutput(ModelOutput):
    """Output of :class:`ExpressForCellClassification`.

    Args:
        loss: present when ``labels`` are given.
        logits: ``(B, num_labels)``: class logits, or predicted levels for regression.
        embedding: ``(B, H)`` the cell embedding the head read.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None


class ExpressForCellClassification(ExpressHeadPreTrainedModel):
    """Cell-level classifier or regressor on the cell embedding (either encoder), as ``transformers``' sequence
    classifiers (optionally with a linear "wide" path on the panel genes beside the encoder, ``config.wide_path``):
    ``problem_type`` single-label (cell types; ``config.class_weights`` and ``label_smoothing`` shape the
    cross-entropy, labels -100 are ignored), ``"regression"`` (e.g. protein levels, one output per protein; mean
    squared error) or multi-label."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        self.dropout = nn.Dropout(config.head_dropout)
        hidden = config.classifier_hidden_size
        self.hidden = nn.Identity() if hidden is None else \
            nn.Sequential(nn.Linear(self.embedding_size, hidden), nn.GELU())
        self.classifier = nn.Linear(hidden or self.embedding_size, config.num_labels)
        # the optional wide path: a linear model on the log-normalised panel counts, added to the encoder's output
        self.wide = nn.Linear(len(config.gene_panel), config.num_labels) if config.wide_path else None
        if config.class_weights is not None and len(config.class_weights) != config.num_labels:
            raise ValueError(f"class_weights has {len(config.class_weights)} entries for {config.num_labels} labels")
        self.post_init()

    def _problem_type(self, labels: torch.Tensor) -> str:
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.config.num_labels == 1:
            return "regression"
        return "single_label_classification" if labels.dtype in (torch.long, torch.int) else \
            "multi_label_classification"

    def forward(
        self, input_ids: torch.Tensor | None = None, values: torch.Tensor | None = None,
        is_zero: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        gene_counts: torch.Tensor | None = None, total_counts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, **kwargs,
    ) -> CellClassifierOutput:
        r"""
        Args (the encoder's inputs, see :meth:`embed`, and):
            labels (`(B,)` class ids, -100 = unlabelled; or `(B, num_labels)` float targets for regression and
                multi-label classification).
        """
        embedding = self.embed(input_ids, values, is_zero, attention_mask, gene_counts, total_counts)
        logits = self.classifier(self.hidden(self.dropout(embedding)))  # (B, num_labels)
        if self.wide is not None:
            if gene_counts is None or total_counts is None:
                raise ValueError("the wide path needs gene_counts (raw counts of config.gene_panel) and total_counts")
            library = total_counts.float().clamp_min(1.0).unsqueeze(-1)  # (B, 1)
            logits = logits + self.wide(self.dropout(torch.log1p(gene_counts.float() / library * 1e4)))
        loss = None
        if labels is not None:
            problem = self._problem_type(labels)
            if problem == "regression":
                loss = F.mse_loss(logits.float().view(labels.shape), labels.float())
            elif problem == "single_label_classification":
                weight = None if self.config.class_weights is None else \
                    torch.tensor(self.config.class_weights, device=logits.device, dtype=torch.float32)
                if bool((labels != IGNORE_INDEX).any()):
                    loss = F.cross_entropy(logits.float().view(-1, self.config.num_labels), labels.view(-1),
                                           weight=weight, ignore_index=IGNORE_INDEX,
                                           label_smoothing=self.config.label_smoothing)
                else:  # no labelled cell in this batch: a zero that still depends on the parameters (DDP-safe)
                    loss = logits.sum() * 0.0
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            if self.training and self.wide is not None and self.config.wide_l1 > 0:
                # shrink the wide path: most genes say nothing about a cell type, as in L1 logistic regression
                loss = loss + self.config.wide_l1 * self.wide.weight.abs().sum()
        return CellClassifierOutput(loss=loss, logits=logits, embedding=embedding)


@dataclass
class VAEOutput(ModelOutput):
    """Output of :class:`ExpressForVAE`; the loss terms are present when ``gene_counts`` are given.

    Args:
        loss: what to backpropagate: ``-bound`` in value (plus the weighted classification and hyperprior terms),
            with the gradient of the chosen estimator (ELBO, IWAE or DReG).
        bound: ``(B,)`` the ELBO (KL weight 1) or the IWAE bound per cell.
        reconstruction, kl: ``(B,)`` ``E_q log p(x|z)`` and the KL term.
        classification_loss: ``-log p(c|z)`` of the labelled cells (mixture prior).
        embedding: ``(B, n_latent)`` the posterior mean.
        logits: ``(B, C)`` ``log p(c | z = posterior mean)`` with the mixture prior (the cell-type classifier).
        protein_predictions: ``(B, P)`` posterior-predictive mean of the normalised protein levels (in evaluation
            mode, with a protein decoder).
    """

    loss: torch.Tensor | None = None
    bound: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    classification_loss: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    protein_predictions: torch.Tensor | None = None


class ExpressForVAE(ExpressHeadPreTrainedModel):
    """VAE/IWAE on the cell embedding (:class:`~modeling.vae.VAEHead`), decoding ``config.gene_panel``; with
    ``config.proteins`` also the multimodal VAE whose latent decodes protein counts. With the mixture prior the
    components are the cell types of ``config.id2label`` and ``logits`` classify cells."""

    config_class = ExpressVAEConfig

    def __init__(self, config: ExpressVAEConfig) -> None:
        super().__init__(config)
        mixture = config.prior == "mixture"
        if mixture and not config.id2label:
            raise ValueError("the mixture prior needs its components: pass id2label (cell types)")
        self.vae = VAEHead(
            self.embedding_size, len(config.gene_panel), n_latent=config.n_latent,
            n_batch=len(config.batch_categories), n_hidden=config.decoder_hidden_size,
            n_layers=config.decoder_layers, covariance=config.covariance, likelihood=config.likelihood,
            dispersion=config.dispersion, prior=config.prior, n_components=len(config.id2label) if mixture else 0,
            parents=config.label_parents, hyper_scale=config.hyper_scale, n_proteins=len(config.proteins),
            dropout=config.head_dropout,
        )
        # training batches seen, for the KL warm-up (not saved: a reloaded model trains at full KL weight)
        self.register_buffer("training_batches", torch.zeros((), dtype=torch.long), persistent=False)
        self.post_init()

    @torch.no_grad()
    def initialize_protein_means(self, mean_counts: torch.Tensor) -> None:
        """Start the protein decoder at the training cells' mean counts (its output bias = log mean), so early
        steps fit the latent rather than the overall scale of ~100 proteins."""
        if self.vae.protein_decoder is None:
            raise ValueError("this VAE has no protein decoder")
        self.vae.protein_decoder.mean.bias.copy_(torch.log(torch.as_tensor(mean_counts).clamp_min(1e-3)))

    def _kl_weight(self) -> float:
        """Rises linearly from 0 over the first ``kl_warmup_steps`` training batches of the ELBO, then stays 1."""
        if not (self.training and torch.is_grad_enabled()) or self.config.objective != "elbo" or \
                not self.config.kl_warmup_steps:
            return 1.0
        weight = min(1.0, (int(self.training_batches) + 1) / self.config.kl_warmup_steps)
        self.training_batches += 1
        return weight

    def forward(
        self, input_ids: torch.Tensor | None = None, values: torch.Tensor | None = None,
        is_zero: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        gene_counts: torch.Tensor | None = None, total_counts: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        protein_counts: torch.Tensor | None = None, **kwargs,
    ) -> VAEOutput:
        r"""
        Args (the encoder's inputs, see :meth:`embed`, and):
            gene_counts (`(B, G)`): raw counts of ``config.gene_panel``, the reconstruction target (the MLP encoder
                reads them too); their sum is the decoder's library size.
            batch_index (`(B,)`): index into ``config.batch_categories`` (-1: a batch unseen in training).
            labels (`(B,)`): cell-type ids for the mixture prior, -100 for unlabelled cells (whose labels never
                enter).
            protein_counts (`(B, P)`): raw protein counts (the protein decoder's target).
        """
        config = self.config
        embedding = self.embed(input_ids, values, is_zero, attention_mask, gene_counts, total_counts)
        batch_index = batch_index if self.vae.decoder.n_batch else None
        terms = None
        if gene_counts is not None:
            terms = self.vae.loss(
                embedding, gene_counts.float(), gene_counts.float().sum(-1).clamp_min(1.0), batch_index=batch_index,
                labels=labels, proteins=None if protein_counts is None else protein_counts.float(),
                n_samples=config.n_importance_samples, objective=config.objective, dreg=config.dreg,
                kl_weight=self._kl_weight(), classification_weight=config.classification_weight,
                n_obs=config.n_train_cells,
            )
            loc = terms.loc
        else:
            loc, _ = self.vae.posterior(embedding)
        proteins = None
        if self.vae.protein_decoder is not None and not self.training:
            proteins = self.protein_predictions(embedding, batch_index)
        return VAEOutput(
            loss=terms.loss if terms else None, bound=terms.bound if terms else None,
            reconstruction=terms.reconstruction if terms else None, kl=terms.kl if terms else None,
            classification_loss=terms.classification_loss if terms else None, embedding=loc,
            logits=self.vae.prior.classify(loc) if self.vae.is_mixture else None, protein_predictions=proteins,
        )

    def protein_predictions(self, embedding: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """Posterior-predictive mean of the normalised protein levels (B, P): ``z ~ q(z|x)``, counts ``~ NB(mu(z),
        theta)`` drawn as a Gamma-Poisson mixture, normalised (``config.protein_norm``), averaged over
        ``config.protein_samples`` draws. Uses the global random stream (seed it for reproducible predictions)."""
        with torch.no_grad():
            loc, scale_tril = self.vae.posterior(embedding)
            z = self.vae.posterior.rsample(loc, scale_tril, self.config.protein_samples)  # (S, B, D)
            params = self.vae.protein_decoder(z, batch_index)
            mu, theta = params["mu"].double(), params["theta"].double()
            counts = torch.poisson(torch.distributions.Gamma(theta, theta / mu.clamp_min(1e-10)).sample())
            levels = normalize_protein_counts(counts, self.config.protein_norm, self.config.protein_reference or None)
            return levels.mean(0).float()

    @torch.no_grad()
    def marginal_log_likelihood(
        self, gene_counts: torch.Tensor, *, n_samples: int = 100, batch_index: torch.Tensor | None = None,
        **inputs,
    ) -> torch.Tensor:
        """Importance-sampled ``log p(x)`` per cell (B,) over the decoder genes, with ``q(z|x)`` as the proposal
        (unlabelled; genes only). ``inputs``: the encoder's inputs."""
        embedding = self.embed(gene_counts=gene_counts, **inputs)
        return self.vae.marginal_log_likelihood(
            embedding, gene_counts.float(), gene_counts.float().sum(-1).clamp_min(1.0),
            batch_index if self.vae.decoder.n_batch else None, n_samples,
        )


__all__ = ["CellClassifierOutput", "ExpressForCellClassification", "ExpressForVAE", "ExpressHeadPreTrainedModel",
           "MLPCellEncoder", "VAEOutput"]
