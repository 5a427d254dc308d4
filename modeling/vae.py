"""The mathematics of the VAE head: Gaussian densities, the posterior, the priors, the count decoder, and
:class:`VAEHead`, which puts them together as ``inference -> generative -> loss``.

Read top to bottom:

1. pure Gaussian helpers (log-densities, KL) and the self-normalised importance weights;
2. building blocks: the Gaussian posterior ``q(z|x)`` (diagonal or full covariance), the priors (standard normal, or
   a Gaussian mixture whose components are cell types, with an optional hyperprior over a label hierarchy), and the
   count decoder ``p(x|z, batch)`` (NB or ZINB with mean ``library * softmax(f(z, batch))``);
3. :class:`VAEHead` and its :class:`VAELoss`;
4. :func:`normalize_protein_counts`, the scale protein levels are predicted and scored on.

Objectives (Kingma & Welling 2014; Burda et al. 2016; Tucker et al. 2019):

- ELBO (one sample): ``E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))``, ``beta`` warmed up from 0 to 1;
- IWAE (K samples): ``log (1/K) sum_k w_k`` with ``log w_k = log p(x, z_k) - log q(z_k|x)``. With ``dreg=True`` the
  encoder gradient is the doubly reparameterised one, ``sum_k w~_k^2 d log w_k / d z_k * d z_k / d phi`` with the
  variational parameters held fixed inside ``log q``; the decoder and prior get the ordinary IWAE gradient
  ``sum_k w~_k d log w_k / d theta`` (``w~`` = normalised weights).

This file imports only ``torch``, ``transformers`` and its sibling files (it travels with saved checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .likelihoods import log_nb, log_zinb
from .modeling_express import IGNORE_INDEX

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
def mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    """``n_layers`` x (Linear -> LayerNorm -> GELU [-> Dropout]), the hidden block of encoders and decoders."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.LayerNorm(n_hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


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
        self, n_latent: int, n_out: int, *, n_batch: int = 0, n_hidden: int = 128, n_layers: int = 1,
        likelihood: str = "nb", dispersion: str = "gene", dropout: float = 0.0, softmax_mean: bool = True,
    ):
        super().__init__()
        if likelihood not in ("nb", "zinb"):
            raise ValueError(f"likelihood must be 'nb' or 'zinb', got {likelihood!r}")
        if dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}")
        if dispersion == "gene-batch" and n_batch < 1:
            raise ValueError("dispersion='gene-batch' needs a batch key (n_batch >= 1)")
        self.n_batch, self.likelihood, self.dispersion = n_batch, likelihood, dispersion
        self.softmax_mean = softmax_mean
        self.net = mlp(n_latent + n_batch, n_hidden, n_layers, dropout)
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
        self, n_input: int, n_genes: int, *, n_latent: int = 16, n_batch: int = 0, n_hidden: int = 128,
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
        layers = dict(n_batch=n_batch, n_hidden=n_hidden, n_layers=n_layers, dispersion=dispersion, dropout=dropout)
        self.decoder = CountDecoder(n_latent, n_genes, likelihood=likelihood, **layers)
        self.protein_decoder = (
            CountDecoder(n_latent, n_proteins, likelihood="nb", softmax_mean=False, **layers) if n_proteins > 0
            else None
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
        self, embedding: torch.Tensor, counts: torch.Tensor, library: torch.Tensor, *,
        batch_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        proteins: torch.Tensor | None = None, n_samples: int = 1, objective: str = "elbo", dreg: bool = True,
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
                classification_loss = F.nll_loss(label_log_probs, labels, ignore_index=IGNORE_INDEX)
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
# 4. Protein levels
# ---------------------------------------------------------------------------------------------------------------------
def normalize_protein_counts(counts: torch.Tensor, method: str = "clr",
                             reference: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Protein (ADT) counts ``(..., cells, proteins)`` on the scale they are predicted and scored on.

    - ``"clr"``: centred log-ratio per protein across cells, ``log1p(x / g_p)`` with ``g_p = exp(reference_p)``, the
      mean of ``log1p(x_p)`` over the training cells (muon's ``prot.pp.clr`` default, the NeurIPS 2021 CITE-seq
      convention; the reference is fitted on training cells so held-out cells do not normalise each other);
    - ``"clr_cell"``: centred log-ratio per cell across proteins (Seurat ``margin = 2``);
    - ``"log1p_cpt"``: ``log1p(x / total * 1e3)`` (counts per thousand).
    """
    x = counts.double()
    if method == "clr":
        if reference is None or len(reference) != x.shape[-1]:
            raise ValueError("per-protein CLR needs the reference log geometric means fitted on the training cells")
        return torch.log1p(x / torch.exp(torch.as_tensor(reference, dtype=torch.float64, device=x.device)))
    if method == "clr_cell":
        return torch.log1p(x / torch.exp(torch.log1p(x).mean(-1, keepdim=True)))
    if method == "log1p_cpt":
        return torch.log1p(x / x.sum(-1, keepdim=True).clamp_min(1.0) * 1e3)
    raise ValueError(f"protein_norm must be 'clr', 'clr_cell' or 'log1p_cpt', got {method!r}")
