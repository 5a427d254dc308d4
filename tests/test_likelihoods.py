"""Count likelihoods against scipy, at ordinary and extreme parameters, and under bf16 autocast."""

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import stats

from modeling.likelihoods import log1mexp, log_nb, log_poisson, log_zinb, log_ztnb

# (x, mu, theta) grids spanning tiny/huge means and near-Poisson / very overdispersed genes
X = np.array([0, 1, 2, 5, 17, 100, 1000, 25000], dtype=np.float64)
MU = np.array([1e-6, 1e-3, 0.1, 1.0, 7.5, 300.0, 1e4, 1e6])
THETA = np.array([1e-4, 0.05, 0.5, 1.0, 10.0, 1e3, 1e6, 1e9])


def grid():
    x, mu, theta = np.meshgrid(X, MU, THETA, indexing="ij")
    return x.ravel(), mu.ravel(), theta.ravel()


def scipy_log_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def mp_log_nb(x, mu, theta):
    """50-digit reference: scipy itself loses digits once theta is ~1e9."""
    with mp.workdps(50):
        x, mu, th = mp.mpf(float(x)), mp.mpf(float(mu)), mp.mpf(float(theta))
        val = mp.loggamma(x + th) - mp.loggamma(th) - mp.loggamma(x + 1) + th * mp.log(th / (th + mu))
        return float(val + x * mp.log(mu / (th + mu)))


def t(a):
    return torch.tensor(a, dtype=torch.float32)


def test_log_nb_matches_scipy_where_scipy_is_accurate():
    x, mu, theta = grid()
    keep = theta <= 1e6
    x, mu, theta = x[keep], np.float32(mu[keep]).astype(np.float64), np.float32(theta[keep]).astype(np.float64)
    got = log_nb(t(x), t(mu), t(theta)).numpy()
    np.testing.assert_allclose(got, scipy_log_nb(x, mu, theta), rtol=1e-5, atol=1e-5)


def test_log_nb_matches_high_precision_reference_at_extremes():
    x, mu, theta = grid()
    mu, theta = np.float32(mu).astype(np.float64), np.float32(theta).astype(np.float64)
    got = log_nb(t(x), t(mu), t(theta)).numpy()
    ref = np.array([mp_log_nb(*args) for args in zip(x, mu, theta)])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_log_nb_poisson_limit():
    x = torch.arange(0, 40, dtype=torch.float32)
    rate = torch.full_like(x, 12.3)
    np.testing.assert_allclose(
        log_nb(x, rate, torch.full_like(x, 1e10)).numpy(), log_poisson(x, rate).numpy(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(log_poisson(x, rate).numpy(), stats.poisson.logpmf(x.numpy(), 12.3), rtol=1e-5)


def test_log_zinb_matches_manual_mixture():
    x, mu, theta = grid()
    logits = np.linspace(-8, 8, len(x))
    pi = 1 / (1 + np.exp(-logits))
    nb = scipy_log_nb(x, mu, theta)
    ref = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb)
    got = log_zinb(t(x), t(mu), t(theta), torch.tensor(logits)).numpy()
    ok = np.isfinite(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(got))


def test_log_ztnb_matches_scipy_truncated():
    x, mu, theta = grid()
    keep = x >= 1
    x, mu, theta = x[keep], mu[keep], theta[keep]
    p = theta / (theta + mu)
    # scipy: log pmf(x) - log(1 - pmf(0)), with the survival function for accuracy at tiny mu
    ref = stats.nbinom.logpmf(x, theta, p) - stats.nbinom.logsf(0, theta, p)
    got = log_ztnb(t(x), t(mu), t(theta)).numpy()
    ok = np.isfinite(ref) & (np.abs(ref) < 1e7)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-3, atol=1e-3)
    assert np.all(np.isfinite(got))
    # a zero-truncated pmf sums to one over x >= 1
    xs = torch.arange(1, 5000, dtype=torch.float32)
    total = torch.logsumexp(log_ztnb(xs, torch.tensor(3.0), torch.tensor(0.7)).double(), 0).exp()
    assert total.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isneginf(log_ztnb(torch.tensor(0.0), torch.tensor(2.0), torch.tensor(1.0)))


def test_log1mexp_both_regimes():
    a = torch.tensor([-1e-12, -1e-3, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    with mp.workdps(50):
        ref = np.array([float(mp.log(1 - mp.exp(mp.mpf(float(v))))) for v in a])
    np.testing.assert_allclose(log1mexp(a).numpy(), ref, rtol=1e-12)


def test_gradients_finite_at_extremes():
    x, mu, theta = grid()
    mu_t = t(mu).requires_grad_()
    th_t = t(theta).requires_grad_()
    log_nb(t(x), mu_t, th_t).sum().backward()
    assert torch.isfinite(mu_t.grad).all() and torch.isfinite(th_t.grad).all()


def test_bf16_autocast_inputs_give_float32_and_match():
    x = torch.tensor([0.0, 3.0, 40.0])
    mu = torch.tensor([0.5, 2.0, 50.0], dtype=torch.bfloat16)
    theta = torch.tensor([1.0, 5.0, 1e5], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = log_nb(x, mu, theta)
        zt = log_ztnb(x[1:], mu[1:], theta[1:])
    assert out.dtype == torch.float32 and zt.dtype == torch.float32
    ref = [mp_log_nb(*args) for args in zip(x.tolist(), mu.float().tolist(), theta.float().tolist())]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
