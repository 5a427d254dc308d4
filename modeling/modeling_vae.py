"""Fine-tuning heads on a cell embedding: cell types, a VAE/IWAE with count likelihoods, and surface proteins.

Read top to bottom:

1. pure Gaussian helpers (log-densities, KL) and the gradient-rescaling step of the DReG estimator;
2. the building blocks: an MLP encoder on log-normalised counts (the scVI-like baseline), the Gaussian posterior
   ``q(z|x)`` (diagonal or full covariance), the priors (standard normal or a Gaussian mixture whose components are
   cell types), and the count decoder ``p(x|z, batch)`` (NB or ZINB with mean ``library * softmax(f(z, batch))``);
3. :class:`VAEHead`, which puts them together as ``inference -> generative -> loss`` and returns a :class:`VAELoss`;
4. the Hugging Face models (``save_pretrained`` / ``from_pretrained``): :class:`ExpressForCellTypes`,
   :class:`ExpressForVAE` and :class:`ExpressForProteinRegression`. Each reads a cell embedding either from the
   pretrained transformer (``ExpressModel``, pooled output) or from the MLP encoder, chosen by
   ``config.head["encoder"]``. Head settings ride on :class:`ExpressConfig` as one extra ``head`` dict (see
   :class:`HeadSettings`).

Objectives (Kingma & Welling 2014; Burda et al. 2016; Tucker et al. 2019):

- ELBO (one sample): ``E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))``, ``beta`` warmed up from 0 to 1;
- IWAE (K samples): ``log (1/K) sum_k w_k`` with ``log w_k = log p(x, z_k) - log q(z_k|x)``. With ``dreg=True`` the
  encoder gradient is the doubly reparameterised one, ``sum_k w~_k^2 d log w_k / d z_k * d z_k / d phi`` with the
  variational parameters held fixed inside ``log q``; the decoder and prior get the ordinary IWAE gradient
  ``sum_k w~_k d log w_k / d theta`` (``w~`` = normalised weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

from .configuration_express import ExpressConfig
from .likelihoods import log_nb, log_zinb
from .modeling_express import ExpressModel, ExpressPreTrainedModel

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Pure Gaussian helpers
# ---------------------------------------------------------------------------------------------------------------------
def diag_normal_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log N(z; loc, diag(scale**2))`` summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * _LOG_2PI).sum(-1)


def tril_normal_log_prob(z: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """``log N(z; loc, L L^T)`` for a lower-triangular ``L`` with positive diagonal; ``z`` may carry extra leading
    sample dimensions, ``loc`` is ``(..., D)`` and ``scale_tril`` ``(..., D, D)``."""
    diff = (z - loc).unsqueeze(-1)  # (..., D, 1)
    L = scale_tril.expand(*diff.shape[:-2], *scale_tril.shape[-2:])
    white = torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)  # (..., D)
    half_log_det = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (white**2).sum(-1) - half_log_det - 0.5 * z.shape[-1] * _LOG_2PI


def kl_diag_normal_standard(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, diag(scale**2)) || N(0, I))`` per cell."""
    return 0.5 * (scale**2 + loc**2 - 1.0 - 2.0 * torch.log(scale)).sum(-1)


def kl_tril_normal_standard(loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, L L^T) || N(0, I)) = (tr(L L^T) + |loc|^2 - D - log det(L L^T)) / 2`` per cell."""
    trace = (scale_tril**2).sum((-2, -1))
    log_det = 2.0 * torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * (trace + (loc**2).sum(-1) - loc.shape[-1] - log_det)


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance weights over the sample dimension 0."""
    return torch.softmax(log_w, dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Building blocks
# ---------------------------------------------------------------------------------------------------------------------
def _mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.LayerNorm(n_hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPCellEncoder(nn.Module):
    """The scVI-like baseline encoder: an MLP on ``log1p(counts / library * 1e4)`` of a fixed gene list.

    ``input_dropout`` zeroes each input gene with that probability during training (and rescales the rest), so the
    encoder cannot lean on a few genes -- a regulariser against donor- or batch-specific markers."""

    def __init__(self, n_genes: int, n_hidden: int = 256, n_layers: int = 2, dropout: float = 0.1,
                 input_dropout: float = 0.0):
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        self.net = _mlp(n_genes, n_hidden, n_layers, dropout)

    def forward(self, log_counts: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_dropout(log_counts))  # (B, H)


class GaussianPosterior(nn.Module):
    """``q(z|x) = N(loc, Sigma)`` from a cell embedding; ``Sigma`` diagonal or full (``L L^T``, Cholesky factor).

    The diagonal of the scale (or of ``L``) goes through softplus plus a floor so it stays positive; the strictly
    lower triangle of ``L`` is unconstrained.
    """

    def __init__(self, n_in: int, n_latent: int, covariance: str = "diagonal", min_scale: float = 1e-4):
        super().__init__()
        if covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance must be 'diagonal' or 'full', got {covariance!r}")
        self.n_latent, self.covariance, self.min_scale = n_latent, covariance, min_scale
        self.loc = nn.Linear(n_in, n_latent)
        self.raw_scale = nn.Linear(n_in, n_latent)
        if covariance == "full":
            self.off_diagonal = nn.Linear(n_in, n_latent * (n_latent - 1) // 2)
            nn.init.zeros_(self.off_diagonal.weight)
            nn.init.zeros_(self.off_diagonal.bias)
            self.register_buffer("_tril_index", torch.tril_indices(n_latent, n_latent, offset=-1), persistent=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``loc`` (B, D) and ``scale_tril`` (B, D, D) (diagonal matrices for a diagonal posterior)."""
        loc = self.loc(h)
        diag = F.softplus(self.raw_scale(h)) + self.min_scale  # (B, D)
        scale_tril = torch.diag_embed(diag)  # (B, D, D)
        if self.covariance == "full":
            rows, cols = self._tril_index
            lower = h.new_zeros(scale_tril.shape)
            lower[:, rows, cols] = self.off_diagonal(h)  # strictly lower triangle, unconstrained
            scale_tril = scale_tril + lower
        return loc, scale_tril

    def log_prob(self, z: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
        if self.covariance == "diagonal":
            return diag_normal_log_prob(z, loc, torch.diagonal(scale_tril, dim1=-2, dim2=-1))
        return tril_normal_log_prob(z, loc, scale_tril)

    def kl_standard_normal(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
        if self.covariance == "diagonal":
            return kl_diag_normal_standard(loc, torch.diagonal(scale_tril, dim1=-2, dim2=-1))
        return kl_tril_normal_standard(loc, scale_tril)

    @staticmethod
    def rsample(loc: torch.Tensor, scale_tril: torch.Tensor, n_samples: int) -> torch.Tensor:
        eps = torch.randn(n_samples, *loc.shape, device=loc.device, dtype=loc.dtype)  # (K, B, D)
        return loc + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1)


class StandardNormalPrior(nn.Module):
    """``p(z) = N(0, I)``."""

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(-1)


class GaussianMixturePrior(nn.Module):
    """``p(z) = sum_c pi_c N(mu_c, diag(sigma_c**2))`` with learnable means, scales and weights.

    With labels, component ``c`` is cell type ``c``: a labelled cell contributes ``log p(z, y) = log pi_y +
    log N(z; mu_y, sigma_y)``, an unlabelled one (label ``-100``) the mixture ``log p(z)``; ``p(c|z)`` is the
    classifier. An optional one-level hierarchy (``parents[c]`` = coarse type of component ``c``) adds the hyperprior
    ``mu_c ~ N(m_parent(c), hyper_scale**2 I)`` with learnable parent means, which pulls sibling means together.
    """

    def __init__(self, n_components: int, n_latent: int, parents: list[int] | None = None, hyper_scale: float = 1.0):
        super().__init__()
        if n_components < 1:
            raise ValueError("a mixture prior needs at least one component")
        # spread the initial means so components are distinguishable from the first step
        self.means = nn.Parameter(torch.randn(n_components, n_latent))
        self.log_scales = nn.Parameter(torch.zeros(n_components, n_latent))
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.hyper_scale = hyper_scale
        if parents is not None:
            parents_t = torch.as_tensor(parents, dtype=torch.long)
            if parents_t.shape != (n_components,) or parents_t.min() < 0:
                raise ValueError(f"parents needs one non-negative parent id per component ({n_components})")
            self.register_buffer("parents", parents_t)
            self.parent_means = nn.Parameter(torch.zeros(int(parents_t.max()) + 1, n_latent))
        else:
            self.parents = None

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log pi_c + log N(z; mu_c, sigma_c)`` for every component: (..., C)."""
        log_pi = torch.log_softmax(self.logits, dim=0)
        return log_pi + diag_normal_log_prob(z.unsqueeze(-2), self.means, torch.exp(self.log_scales))

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z)`` for unlabelled cells and ``log p(z, y)`` for labelled ones (labels ``(B,)``, -100 = none)."""
        joint = self.component_log_prob(z)  # (..., B, C)
        marginal = torch.logsumexp(joint, dim=-1)
        if labels is None:
            return marginal
        labelled = labels >= 0
        picked = joint.gather(-1, labels.clamp_min(0).expand(*joint.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return torch.where(labelled, picked, marginal)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(c|z)`` (..., C)."""
        return torch.log_softmax(self.component_log_prob(z), dim=-1)

    def hyperprior_log_prob(self) -> torch.Tensor:
        if self.parents is None:
            return self.means.new_zeros(())
        scale = torch.full_like(self.means, self.hyper_scale)
        return diag_normal_log_prob(self.means, self.parent_means[self.parents], scale).sum()


class CountDecoder(nn.Module):
    """``p(x|z, batch)``: NB or ZINB over ``n_out`` features.

    With ``library`` given (genes), the mean is ``library * softmax(f(z, batch))``; without it (proteins) the mean is
    ``exp(f(z, batch))``. Inverse dispersion is per feature, or per feature and batch (``dispersion="gene-batch"``).
    Batch index ``-1`` marks a batch unseen in training: its one-hot is all zeros and its dispersion the mean over
    the training batches.
    """

    def __init__(
        self, n_latent: int, n_out: int, n_batch: int = 0, n_hidden: int = 128, n_layers: int = 1,
        likelihood: str = "nb", dispersion: str = "gene", dropout: float = 0.0, softmax_mean: bool = True,
    ):
        super().__init__()
        if likelihood not in ("nb", "zinb"):
            raise ValueError(f"likelihood must be 'nb' or 'zinb', got {likelihood!r}")
        if dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}")
        if dispersion == "gene-batch" and n_batch < 1:
            raise ValueError("dispersion='gene-batch' needs a batch key (n_batch >= 1)")
        self.n_batch, self.likelihood, self.dispersion, self.softmax_mean = n_batch, likelihood, dispersion, softmax_mean
        self.net = _mlp(n_latent + n_batch, n_hidden, n_layers, dropout)
        self.mean = nn.Linear(n_hidden, n_out)
        self.zi_logits = nn.Linear(n_hidden, n_out) if likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.zeros(n_batch if dispersion == "gene-batch" else 1, n_out))

    def batch_one_hot(self, batch_index: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        if self.n_batch == 0:
            return torch.zeros(batch_size, 0, device=device)
        if batch_index is None:
            raise ValueError("this decoder was built with a batch key: pass batch_index")
        return F.one_hot(batch_index.clamp_min(0), self.n_batch).float() * (batch_index >= 0).unsqueeze(-1)

    def forward(
        self, z: torch.Tensor, batch_index: torch.Tensor | None = None, library: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        one_hot = self.batch_one_hot(batch_index, z.shape[-2], z.device)  # (B, n_batch)
        h = self.net(torch.cat([z, one_hot.expand(*z.shape[:-1], one_hot.shape[-1])], dim=-1))  # (K, B, H)
        raw = self.mean(h)  # (K, B, G)
        if self.softmax_mean:
            if library is None:
                raise ValueError("a softmax-mean decoder needs the library size")
            scale = torch.softmax(raw, dim=-1)
            mu = library.unsqueeze(-1) * scale
        else:
            scale = None
            mu = torch.exp(raw.clamp(max=20.0))
        if self.dispersion == "gene-batch":
            mean_theta = self.log_theta.mean(0, keepdim=True)
            per_cell = one_hot @ self.log_theta + (batch_index < 0).unsqueeze(-1) * mean_theta  # (B, G)
            log_theta = per_cell
        else:
            log_theta = self.log_theta[0]
        out = {"mu": mu, "theta": torch.exp(log_theta).expand_as(mu)}
        if scale is not None:
            out["scale"] = scale
        if self.zi_logits is not None:
            out["zi_logits"] = self.zi_logits(h)
        return out

    def log_prob(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed over features: (K, B)."""
        if self.likelihood == "zinb":
            return log_zinb(x, params["mu"], params["theta"], params["zi_logits"]).sum(-1)
        return log_nb(x, params["mu"], params["theta"]).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# 3. The VAE head: inference -> generative -> loss
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class VAELoss(ModelOutput):
    """Per-batch means unless noted. ``loss`` is what to backpropagate; its value is ``-bound`` (plus the weighted
    classification and hyperprior terms) while its gradient is the chosen estimator's (ELBO, IWAE or DReG)."""

    loss: torch.Tensor | None = None
    bound: torch.Tensor | None = None  # ELBO (K=1, beta=1) or IWAE bound, per cell (B,)
    reconstruction: torch.Tensor | None = None  # E_q log p(x|z) (B,)
    kl: torch.Tensor | None = None  # KL(q||p) (analytic for the normal prior, one-sample estimate otherwise) (B,)
    protein_log_likelihood: torch.Tensor | None = None  # E_q log p(proteins|z) (B,)
    classification_loss: torch.Tensor | None = None
    label_log_probs: torch.Tensor | None = None  # log p(c|z at the posterior mean) (B, C)
    loc: torch.Tensor | None = None
    scale_tril: torch.Tensor | None = None


class VAEHead(nn.Module):
    """Posterior, prior, count decoder (and optionally a protein NB decoder) on top of a cell embedding.

    Args:
        n_input: size of the cell embedding.
        n_genes: genes reconstructed by the decoder.
        n_latent: latent dimension.
        n_batch: number of training batches (0 = no batch conditioning).
        covariance: ``"diagonal"`` or ``"full"`` posterior.
        likelihood, dispersion: see :class:`CountDecoder`.
        prior: ``"normal"`` or ``"mixture"``.
        n_components: mixture components (= cell types when labels are given).
        parents: optional coarse type per component for the hyperprior.
        n_proteins: > 0 adds the NB protein decoder (the multimodal VAE).
    """

    def __init__(
        self, n_input: int, n_genes: int, n_latent: int = 16, n_batch: int = 0, n_hidden: int = 128,
        n_layers: int = 1, covariance: str = "diagonal", likelihood: str = "nb", dispersion: str = "gene",
        prior: str = "normal", n_components: int = 0, parents: list[int] | None = None, hyper_scale: float = 1.0,
        n_proteins: int = 0, dropout: float = 0.0,
    ):
        super().__init__()
        self.posterior = GaussianPosterior(n_input, n_latent, covariance)
        if prior == "normal":
            self.prior: nn.Module = StandardNormalPrior()
        elif prior == "mixture":
            self.prior = GaussianMixturePrior(n_components, n_latent, parents, hyper_scale)
        else:
            raise ValueError(f"prior must be 'normal' or 'mixture', got {prior!r}")
        self.decoder = CountDecoder(n_latent, n_genes, n_batch, n_hidden, n_layers, likelihood, dispersion, dropout)
        self.protein_decoder = (
            CountDecoder(n_latent, n_proteins, n_batch, n_hidden, n_layers, "nb", dispersion, dropout,
                         softmax_mean=False)
            if n_proteins > 0 else None
        )

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.prior, GaussianMixturePrior)

    def inference(self, embedding: torch.Tensor, n_samples: int = 1) -> dict[str, torch.Tensor]:
        loc, scale_tril = self.posterior(embedding)
        z = self.posterior.rsample(loc, scale_tril, n_samples)  # (K, B, D)
        return {"loc": loc, "scale_tril": scale_tril, "z": z}

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        out = {"genes": self.decoder(z, batch_index, library)}
        if self.protein_decoder is not None:
            out["proteins"] = self.protein_decoder(z, batch_index)
        return out

    def log_joint(
        self, z: torch.Tensor, counts: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None,
        labels: torch.Tensor | None = None, proteins: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``log p(x|z)``, ``log p(proteins|z)`` and ``log p(z[, y])`` for samples ``z`` (K, B, D), each (K, B)."""
        gen = self.generative(z, library, batch_index)
        out = {"reconstruction": self.decoder.log_prob(counts, gen["genes"]), "prior": self.prior.log_prob(z, labels)}
        out["proteins"] = (
            self.protein_decoder.log_prob(proteins, gen["proteins"])
            if proteins is not None and self.protein_decoder is not None
            else torch.zeros_like(out["reconstruction"])
        )
        return out

    def loss(
        self, embedding: torch.Tensor, counts: torch.Tensor, library: torch.Tensor,
        batch_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        proteins: torch.Tensor | None = None, *, n_samples: int = 1, objective: str = "elbo", dreg: bool = True,
        kl_weight: float = 1.0, classification_weight: float = 1.0, n_obs: int | None = None,
    ) -> VAELoss:
        """One call of ``inference -> generative -> loss``.

        Args:
            embedding: (B, H) cell embedding; counts: (B, G) raw counts of the decoder genes; library: (B,) their
                sum; batch_index: (B,) training batch ids (-1 = unseen); labels: (B,) component ids, -100 for
                unlabelled cells (mixture prior only; unlabelled cells' true labels never enter); proteins: (B, P).
            objective: ``"elbo"`` (uses ``n_samples=1`` and ``kl_weight``) or ``"iwae"``.
            dreg: use the DReG encoder gradient for IWAE.
            n_obs: training-set size, to scale the hyperprior (a MAP term over all cells) to one minibatch.
        """
        if objective not in ("elbo", "iwae"):
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")
        if labels is not None and not self.is_mixture:
            labels = None  # labels only shape the mixture prior; the normal prior ignores them
        inf = self.inference(embedding, 1 if objective == "elbo" else n_samples)
        loc, scale_tril, z = inf["loc"], inf["scale_tril"], inf["z"]
        # DReG: the decoder and prior see z through their own node, whose incoming gradient is multiplied by the
        # normalised weights once they are known (hook below); log q sees z directly. Together: w~^2 d log w / dz.
        use_dreg = objective == "iwae" and dreg
        z_model = z.clone() if use_dreg else z
        terms = self.log_joint(z_model, counts, library, batch_index, labels, proteins)
        lp = terms["reconstruction"] + terms["proteins"] + terms["prior"]  # (K, B)

        if objective == "elbo":
            if self.is_mixture:
                kl = (self.posterior.log_prob(z, loc, scale_tril) - terms["prior"]).mean(0)
            else:
                kl = self.posterior.kl_standard_normal(loc, scale_tril)
            recon = terms["reconstruction"].mean(0) + terms["proteins"].mean(0)
            bound = recon - kl
            surrogate = recon - kl_weight * kl
        else:
            if use_dreg:
                log_q = self.posterior.log_prob(z, loc.detach(), scale_tril.detach())
            else:
                log_q = self.posterior.log_prob(z, loc, scale_tril)
            log_w = lp - log_q  # (K, B)
            bound = torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
            if use_dreg:
                w = normalized_weights(log_w).detach()
                if z_model.requires_grad:
                    z_model.register_hook(lambda grad: grad * w.unsqueeze(-1))
                surrogate = (w * lp).sum(0) - (w**2 * log_q).sum(0)
                surrogate = bound.detach() + (surrogate - surrogate.detach())  # value = bound, gradient = DReG
            else:
                surrogate = bound
            kl = (log_q - terms["prior"]).mean(0).detach()
        loss = -surrogate.mean()

        label_log_probs = classification_loss = None
        if self.is_mixture:
            label_log_probs = self.prior.classify(loc)
            if labels is not None and bool((labels >= 0).any()):
                classification_loss = F.nll_loss(label_log_probs, labels, ignore_index=-100)
                loss = loss + classification_weight * classification_loss
            if self.prior.parents is not None:
                loss = loss - self.prior.hyperprior_log_prob() / float(n_obs or embedding.shape[0])
        return VAELoss(
            loss=loss, bound=bound.detach(), reconstruction=terms["reconstruction"].mean(0).detach(), kl=kl.detach(),
            protein_log_likelihood=terms["proteins"].mean(0).detach(), classification_loss=classification_loss,
            label_log_probs=label_log_probs, loc=loc, scale_tril=scale_tril,
        )

    @torch.no_grad()
    def marginal_log_likelihood(
        self, embedding: torch.Tensor, counts: torch.Tensor, library: torch.Tensor,
        batch_index: torch.Tensor | None = None, n_samples: int = 100, chunk: int = 50,
    ) -> torch.Tensor:
        """Importance-sampled ``log p(x)`` per cell with ``q(z|x)`` as the proposal (B,); unlabelled, genes only."""
        loc, scale_tril = self.posterior(embedding)
        log_ws = []
        for start in range(0, n_samples, chunk):
            k = min(chunk, n_samples - start)
            z = self.posterior.rsample(loc, scale_tril, k)
            terms = self.log_joint(z, counts, library, batch_index)
            log_ws.append(terms["reconstruction"] + terms["prior"] - self.posterior.log_prob(z, loc, scale_tril))
        log_w = torch.cat(log_ws, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(n_samples)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Hugging Face models
# ---------------------------------------------------------------------------------------------------------------------
ENCODERS = ("transformer", "mlp")
PROTEIN_HEADS = ("regression", "nb")


@dataclass
class HeadSettings:
    """Settings of the fine-tuning heads, stored on :class:`ExpressConfig` as the extra dict ``config.head``.

    Cell-type names live in the standard ``config.id2label``.

    Args:
        encoder: ``"transformer"`` (the pretrained ``ExpressModel``; its pooled output is the cell embedding) or
            ``"mlp"`` (an MLP on ``log1p(counts / library * 1e4)`` of ``input_genes``).
        input_genes: the MLP encoder's genes, in input order.
        mlp_hidden, mlp_layers, dropout: the MLP encoder (and the dropout before every head).
        input_dropout: dropout on the MLP encoder's input genes (0: off).
        decoder_genes: genes the VAE decoder reconstructs.
        n_latent, decoder_hidden, decoder_layers, covariance, likelihood, dispersion, prior: see :class:`VAEHead`.
        label_parents: coarse type per cell type (hyperprior over the mixture means), or ``None``.
        hyper_scale: standard deviation of the hyperprior.
        batch_categories: the training batches, in one-hot order (empty: no batch conditioning).
        proteins: protein names (ADT), in output order.
        protein_head: ``"regression"`` (MLP on the embedding, squared error on normalised levels) or ``"nb"`` (NB
            decoder from the VAE latent over protein counts).
        protein_norm: normalisation of protein levels (see ``finetune.data.normalize_proteins``).
        protein_reference: per-protein reference of that normalisation, fitted on the training cells.
        tokenize: tokenization arguments (``top_k``, ``n_zeros``) for new cells; empty = the tokenizer's defaults.
    """

    encoder: str = "mlp"
    input_genes: list[str] = field(default_factory=list)
    mlp_hidden: int = 256
    mlp_layers: int = 2
    dropout: float = 0.1
    input_dropout: float = 0.0
    decoder_genes: list[str] = field(default_factory=list)
    n_latent: int = 16
    decoder_hidden: int = 128
    decoder_layers: int = 1
    covariance: str = "diagonal"
    likelihood: str = "nb"
    dispersion: str = "gene"
    prior: str = "normal"
    label_parents: list[int] | None = None
    hyper_scale: float = 1.0
    batch_categories: list[str] = field(default_factory=list)
    proteins: list[str] = field(default_factory=list)
    protein_head: str = "regression"
    protein_norm: str = "clr"
    protein_reference: list[float] = field(default_factory=list)
    tokenize: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "mlp" and not self.input_genes:
            raise ValueError("the MLP encoder needs its input gene list (HeadSettings.input_genes)")
        if self.protein_head not in PROTEIN_HEADS:
            raise ValueError(f"protein_head must be one of {PROTEIN_HEADS}, got {self.protein_head!r}")

    @classmethod
    def from_config(cls, config: ExpressConfig) -> HeadSettings:
        stored = getattr(config, "head", None)
        if not isinstance(stored, dict):
            raise ValueError(
                "this config has no fine-tuning head settings (config.head); build one with "
                "ExpressConfig(..., head=asdict(HeadSettings(...))) or fine-tune with finetune/run.py"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProteinRegressionOutput(ModelOutput):
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None  # (B, P) normalised protein levels


class ExpressFinetunePreTrainedModel(ExpressPreTrainedModel):
    """Base of the fine-tuning heads: builds the cell encoder named by ``config.head["encoder"]`` under the
    ``express`` prefix (so ``from_pretrained`` on a pretraining checkpoint loads the transformer's weights) and
    initialises the head parameters that are not plain layers."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        self.settings = HeadSettings.from_config(config)
        if self.settings.encoder == "transformer":
            self.express: nn.Module = ExpressModel(config)
            self.embedding_size = config.hidden_size
        else:
            s = self.settings
            self.express = MLPCellEncoder(len(s.input_genes), s.mlp_hidden, s.mlp_layers, s.dropout, s.input_dropout)
            self.embedding_size = s.mlp_hidden

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GaussianMixturePrior):
            init.normal_(module.means, mean=0.0, std=1.0)
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
        log_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cell embedding (B, H): the transformer's pooled output, or the MLP encoder's output."""
        if self.settings.encoder == "transformer":
            if input_ids is None:
                raise ValueError("the transformer encoder needs tokenized cells (input_ids, values, is_zero)")
            out = self.express(input_ids, values=values, is_zero=is_zero, attention_mask=attention_mask)
            return out.pooler_output
        if log_counts is None:
            raise ValueError("the MLP encoder needs log_counts (log1p(counts / library * 1e4) of its input genes)")
        return self.express(log_counts)

    def freeze_encoder(self, layers: int | None = None) -> None:
        """Freeze the whole encoder (``layers=None``) or the transformer's embeddings and its lowest ``layers``."""
        if layers is None:
            self.express.requires_grad_(False)
            return
        if self.settings.encoder != "transformer":
            raise ValueError("freezing the lower N layers applies to the transformer encoder only")
        if not 0 <= layers <= self.config.num_hidden_layers:
            raise ValueError(f"layers must lie in [0, {self.config.num_hidden_layers}], got {layers}")
        if layers > 0:
            self.express.embeddings.requires_grad_(False)
            for layer in self.express.layers[:layers]:
                layer.requires_grad_(False)


class ExpressForCellTypes(ExpressFinetunePreTrainedModel):
    """Cell-type classifier: dropout and a linear layer on the cell embedding (either encoder)."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        if config.num_labels < 2:
            raise ValueError(f"a cell-type classifier needs at least 2 classes, got num_labels={config.num_labels}")
        self.dropout = nn.Dropout(self.settings.dropout)
        self.classifier = nn.Linear(self.embedding_size, config.num_labels)
        self.post_init()

    def forward(
        self, labels: torch.Tensor | None = None, *, class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0, **inputs,
    ) -> SequenceClassifierOutput:
        """``inputs``: those of :meth:`embed`; ``labels`` (B,) class ids, -100 = unlabelled (ignored).

        ``class_weights`` (C,): per-class weights of the cross-entropy (the loss is the weighted mean over labelled
        cells, as ``F.cross_entropy`` computes it); ``label_smoothing``: the target puts this mass uniformly on all
        classes. Both are training choices passed by the trainer, not stored with the model."""
        logits = self.classifier(self.dropout(self.embed(**inputs)))  # (B, C)
        loss = None
        if labels is not None and bool((labels >= 0).any()):
            weight = class_weights.to(logits.device, torch.float32) if class_weights is not None else None
            loss = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=-100,
                                   label_smoothing=label_smoothing)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class ExpressForProteinRegression(ExpressFinetunePreTrainedModel):
    """Surface-protein levels (normalised, see ``HeadSettings.protein_norm``) regressed on the cell embedding."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        n_proteins = len(self.settings.proteins)
        if n_proteins < 1:
            raise ValueError("protein regression needs the protein names (HeadSettings.proteins)")
        hidden = self.settings.decoder_hidden
        self.regressor = nn.Sequential(
            nn.Dropout(self.settings.dropout), nn.Linear(self.embedding_size, hidden), nn.GELU(),
            nn.Linear(hidden, n_proteins),
        )
        self.post_init()

    def forward(self, protein_targets: torch.Tensor | None = None, **inputs) -> ProteinRegressionOutput:
        predictions = self.regressor(self.embed(**inputs))  # (B, P)
        loss = F.mse_loss(predictions.float(), protein_targets.float()) if protein_targets is not None else None
        return ProteinRegressionOutput(loss=loss, predictions=predictions)


class ExpressForVAE(ExpressFinetunePreTrainedModel):
    """VAE/IWAE on the cell embedding (:class:`VAEHead`); with ``HeadSettings.proteins`` and ``protein_head="nb"``
    also the multimodal VAE whose latent decodes protein counts. With the mixture prior and ``config.id2label`` the
    components are the cell types and ``label_log_probs`` classify cells."""

    def __init__(self, config: ExpressConfig) -> None:
        super().__init__(config)
        s = self.settings
        if not s.decoder_genes:
            raise ValueError("the VAE needs the decoder's gene list (HeadSettings.decoder_genes)")
        n_labels = len(config.id2label) if s.prior == "mixture" else 0
        if s.prior == "mixture" and n_labels < 1:
            raise ValueError("the mixture prior needs its components: pass id2label (cell types) or num_labels")
        self.vae = VAEHead(
            self.embedding_size, len(s.decoder_genes), s.n_latent, len(s.batch_categories), s.decoder_hidden,
            s.decoder_layers, s.covariance, s.likelihood, s.dispersion, s.prior, n_labels, s.label_parents,
            s.hyper_scale, len(s.proteins) if s.protein_head == "nb" else 0, s.dropout,
        )
        self.post_init()

    @torch.no_grad()
    def initialize_protein_means(self, mean_counts: torch.Tensor) -> None:
        """Start the protein decoder at the training cells' mean counts (its output bias = log mean), so early
        steps fit the latent rather than the overall scale of ~100 proteins."""
        if self.vae.protein_decoder is None:
            raise ValueError("this VAE has no protein decoder")
        self.vae.protein_decoder.mean.bias.copy_(torch.log(torch.as_tensor(mean_counts).clamp_min(1e-3)))

    def forward(
        self, counts: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, proteins: torch.Tensor | None = None, *, objective: str = "elbo",
        n_samples: int = 1, dreg: bool = True, kl_weight: float = 1.0, classification_weight: float = 1.0,
        n_obs: int | None = None, **inputs,
    ) -> VAELoss:
        """``inputs``: those of :meth:`embed`; the rest: see :meth:`VAEHead.loss`."""
        return self.vae.loss(
            self.embed(**inputs), counts, library, batch_index if self.vae.decoder.n_batch else None, labels,
            proteins, n_samples=n_samples, objective=objective, dreg=dreg, kl_weight=kl_weight,
            classification_weight=classification_weight, n_obs=n_obs,
        )

    @torch.no_grad()
    def latent(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean (B, D) and, with the mixture prior, ``log p(c | z = mean)`` (B, C) (else None)."""
        loc, _ = self.vae.posterior(self.embed(**inputs))
        return loc, self.vae.prior.classify(loc) if self.vae.is_mixture else None

    @torch.no_grad()
    def sample_proteins(self, batch_index: torch.Tensor | None = None, n_samples: int = 64, **inputs) -> torch.Tensor:
        """Posterior-predictive protein counts (S, B, P): ``z ~ q(z|x)``, then ``NB(mu(z), theta)`` drawn as a
        Gamma-Poisson mixture. Uses the global random stream (seed it, or fork it, for reproducible draws)."""
        if self.vae.protein_decoder is None:
            raise ValueError("this VAE has no protein decoder (fine-tune with --task adt --protein_head nb)")
        loc, scale_tril = self.vae.posterior(self.embed(**inputs))
        z = self.vae.posterior.rsample(loc, scale_tril, n_samples)  # (S, B, D)
        params = self.vae.protein_decoder(z, batch_index if self.vae.decoder.n_batch else None)
        mu, theta = params["mu"].double(), params["theta"].double()
        rate = torch.distributions.Gamma(theta, theta / mu.clamp_min(1e-10)).sample()
        return torch.poisson(rate).float()

    @torch.no_grad()
    def marginal_log_likelihood(
        self, counts: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None = None,
        n_samples: int = 100, **inputs,
    ) -> torch.Tensor:
        return self.vae.marginal_log_likelihood(
            self.embed(**inputs), counts, library, batch_index if self.vae.decoder.n_batch else None, n_samples
        )
