"""Count likelihoods as small pure functions.

All functions take counts ``x``, means ``mu > 0`` and inverse dispersions ``theta > 0`` (variance
``mu + mu**2 / theta``), broadcast them, and return the elementwise log-probability. They compute in float64 and
return the promoted input dtype (at least float32): the lgamma differences of the negative binomial lose all
precision in float32 or bf16 once ``theta`` is large (``lgamma(theta + x) - lgamma(theta)`` subtracts two numbers
near ``theta * log(theta)``), and these are elementwise, memory-bound ops whose cost is negligible next to the
encoder. They are therefore safe to call inside a bf16 autocast region.

This file must stay importable on its own (only ``torch``): it travels with saved checkpoints for
``trust_remote_code`` loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG2 = math.log(2.0)


def _prepare(*tensors: torch.Tensor) -> tuple[torch.dtype, list[torch.Tensor]]:
    out_dtype = torch.promote_types(torch.float32, tensors[0].dtype)
    for t in tensors[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    if tensors[0].device.type == "mps":  # no float64 there
        work = torch.float32
    else:
        work = torch.float64
    return out_dtype, [t.to(work) for t in tensors]


def _log_nb64(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    # log NB(x; mu, theta) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    #                        + theta * log(theta / (theta + mu)) + x * log(mu / (theta + mu))
    # The two log-ratios are written with log1p so the Poisson limit (theta -> inf) and mu -> 0 stay accurate.
    mu = mu.clamp_min(eps)
    theta = theta.clamp_min(eps)
    log_theta_term = -theta * torch.log1p(mu / theta)
    log_mu_term = torch.where(x > 0, -x * torch.log1p(theta / mu), torch.zeros_like(x))
    return torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0) + log_theta_term + log_mu_term


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Negative-binomial log-probability with mean ``mu`` and inverse dispersion ``theta``."""
    out_dtype, (x, mu, theta) = _prepare(x, mu, theta)
    return _log_nb64(x, mu, theta, eps).to(out_dtype)


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor, eps: float = 1e-10
) -> torch.Tensor:
    """Zero-inflated NB log-probability; ``pi_logits`` are the logits of the zero-inflation probability ``pi``.

    ``p(0) = pi + (1 - pi) NB(0)`` and ``p(x) = (1 - pi) NB(x)`` for ``x > 0``. With ``pi = sigmoid(l)``,
    ``log pi = -softplus(-l)`` and ``log(1 - pi) = -softplus(l)``, which avoids forming ``pi`` itself.
    """
    out_dtype, (x, mu, theta, logits) = _prepare(x, mu, theta, pi_logits)
    log_nb_x = _log_nb64(x, mu, theta, eps)
    log_one_minus_pi = -F.softplus(logits)
    zero_case = torch.logaddexp(-F.softplus(-logits), log_one_minus_pi + log_nb_x)
    return torch.where(x > 0, log_one_minus_pi + log_nb_x, zero_case).to(out_dtype)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(a > -_LOG2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def log_ztnb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Zero-truncated NB log-probability for ``x >= 1``: ``log NB(x) - log(1 - NB(0))``.

    ``log NB(0) = -theta * log1p(mu / theta)``; as ``mu -> 0`` it tends to ``0-`` and ``1 - NB(0) ~ mu``, so the
    subtraction is done with :func:`log1mexp` rather than ``log(1 - exp(.))``. Entries with ``x < 1`` get ``-inf``.
    """
    out_dtype, (x, mu, theta) = _prepare(x, mu, theta)
    mu_c = mu.clamp_min(eps)
    theta_c = theta.clamp_min(eps)
    log_p0 = -theta_c * torch.log1p(mu_c / theta_c)
    out = _log_nb64(x, mu, theta, eps) - log1mexp(log_p0)
    return torch.where(x >= 1, out, torch.full_like(out, -math.inf)).to(out_dtype)


def log_poisson(x: torch.Tensor, rate: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Poisson log-probability (the ``theta -> inf`` limit of :func:`log_nb`)."""
    out_dtype, (x, rate) = _prepare(x, rate)
    rate = rate.clamp_min(eps)
    return (x * torch.log(rate) - rate - torch.lgamma(x + 1.0)).to(out_dtype)
