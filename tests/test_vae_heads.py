"""The VAE building blocks and objectives: densities against torch/manual references, IWAE and DReG properties.

The NB/ZINB/zero-truncated log-probabilities themselves are tested against scipy in tests/test_likelihoods.py.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from modeling.vae import (
    CountDecoder,
    GaussianMixturePrior,
    GaussianPosterior,
    VAEHead,
    kl_tril_normal_standard,
    tril_normal_log_prob,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_data(n_cells=6, n_genes=7, n_input=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_cells, n_input, generator=g)
    loadings = torch.randn(n_input, n_genes, generator=g)
    counts = torch.poisson(torch.exp(0.7 * emb @ loadings / math.sqrt(n_input) + 1.0), generator=g)
    return emb, counts, counts.sum(-1).clamp_min(1.0)


def test_full_covariance_posterior_matches_torch_multivariate_normal():
    torch.manual_seed(0)
    post = GaussianPosterior(5, 4, covariance="full").double()
    torch.nn.init.normal_(post.off_diagonal.weight)  # non-trivial off-diagonal entries
    h = torch.randn(3, 5, dtype=torch.float64)
    loc, L = post(h)
    assert torch.all(torch.diagonal(L, dim1=-2, dim2=-1) > 0)
    assert torch.count_nonzero(torch.triu(L, diagonal=1)) == 0
    assert torch.count_nonzero(torch.tril(L, diagonal=-1)) > 0
    ref = torch.distributions.MultivariateNormal(loc, scale_tril=L)
    z = post.rsample(loc, L, 11)  # (11, 3, 4)
    torch.testing.assert_close(post.log_prob(z, loc, L), ref.log_prob(z))
    torch.testing.assert_close(tril_normal_log_prob(z, loc, L), ref.log_prob(z))
    std = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(post.kl_standard_normal(loc, L), torch.distributions.kl_divergence(ref, std))
    torch.testing.assert_close(kl_tril_normal_standard(loc, L), torch.distributions.kl_divergence(ref, std))


def test_diagonal_posterior_matches_torch_normal():
    torch.manual_seed(1)
    post = GaussianPosterior(5, 3, covariance="diagonal").double()
    loc, L = post(torch.randn(4, 5, dtype=torch.float64))
    scale = torch.diagonal(L, dim1=-2, dim2=-1)
    ref = torch.distributions.Normal(loc, scale)
    z = post.rsample(loc, L, 6)
    torch.testing.assert_close(post.log_prob(z, loc, L), ref.log_prob(z).sum(-1))
    kl = torch.distributions.kl_divergence(ref, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(post.kl_standard_normal(loc, L), kl)


def test_mixture_prior_log_density_matches_manual_computation():
    torch.manual_seed(2)
    prior = GaussianMixturePrior(3, 2).double()
    with torch.no_grad():
        prior.log_scales.copy_(torch.randn(3, 2) * 0.3)
        prior.logits.copy_(torch.tensor([0.2, -1.0, 0.7], dtype=torch.float64))
    z = torch.randn(5, 2, dtype=torch.float64)
    means, scales = prior.means.detach().numpy(), np.exp(prior.log_scales.detach().numpy())
    pi = np.exp([0.2, -1.0, 0.7])
    pi /= pi.sum()
    manual = np.array([
        [np.log(pi[c]) + stats.multivariate_normal(means[c], np.diag(scales[c] ** 2)).logpdf(zi) for c in range(3)]
        for zi in z.numpy()
    ])  # (5, 3)
    np.testing.assert_allclose(prior.log_prob(z).detach().numpy(), np.logaddexp.reduce(manual, axis=1), rtol=1e-10)
    labels = torch.tensor([0, -100, 2, 1, -100])
    got = prior.log_prob(z, labels).detach().numpy()
    expect = [manual[0, 0], np.logaddexp.reduce(manual[1]), manual[2, 2], manual[3, 1], np.logaddexp.reduce(manual[4])]
    np.testing.assert_allclose(got, expect, rtol=1e-10)
    posterior = manual - np.logaddexp.reduce(manual, axis=1, keepdims=True)
    np.testing.assert_allclose(prior.classify(z).detach().numpy(), posterior, rtol=1e-9)


def test_hyperprior_pulls_sibling_means_together():
    torch.manual_seed(3)
    prior = GaussianMixturePrior(4, 2, parents=[0, 0, 1, 1], hyper_scale=0.5)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, -2.0], [0.0, 2.0]]))
        prior.parent_means.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    d2 = ((prior.means - prior.parent_means[prior.parents]) ** 2).sum()
    expect = -0.5 * d2 / 0.25 - 8 * math.log(0.5) - 4 * math.log(2 * math.pi)
    torch.testing.assert_close(prior.hyperprior_log_prob(), expect)
    # gradient ascent on the hyperprior alone moves siblings towards each other
    gap_before = (prior.means[0] - prior.means[1]).norm().item()
    opt = torch.optim.SGD([prior.means], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (-prior.hyperprior_log_prob()).backward()
        opt.step()
    assert (prior.means[0] - prior.means[1]).norm().item() < 0.5 * gap_before


def test_iwae_bound_is_above_elbo_and_non_decreasing_in_k():
    torch.manual_seed(4)
    head = VAEHead(5, 7, n_latent=3, n_hidden=16).double().eval()
    emb, counts, library = (t.double() for t in _tiny_data())
    repeats = 400
    emb_r, counts_r, library_r = emb.repeat(repeats, 1), counts.repeat(repeats, 1), library.repeat(repeats)
    means, ses = {}, {}
    with torch.no_grad():
        elbo = head.loss(emb_r, counts_r, library_r, objective="elbo").bound.view(repeats, -1).mean(1)
        for k in (1, 2, 5, 20, 60):
            b = head.loss(emb_r, counts_r, library_r, objective="iwae", n_samples=k).bound.view(repeats, -1).mean(1)
            means[k], ses[k] = b.mean().item(), b.std().item() / math.sqrt(repeats)
    # K=1 IWAE is the (sampled-KL) ELBO: equal in expectation to the analytic-KL ELBO
    assert abs(means[1] - elbo.mean().item()) < 4 * math.hypot(ses[1], elbo.std().item() / math.sqrt(repeats))
    ks = sorted(means)
    for a, b in zip(ks, ks[1:]):
        assert means[b] > means[a], (a, b, means)
        assert means[b] - means[a] > 3 * math.hypot(ses[a], ses[b]), (a, b, means, ses)
    assert means[60] > elbo.mean().item()


def test_marginal_log_likelihood_is_above_the_elbo():
    torch.manual_seed(5)
    head = VAEHead(5, 7, n_latent=3, n_hidden=16).double().eval()
    emb, counts, library = (t.double() for t in _tiny_data())
    with torch.no_grad():
        elbo = torch.stack([head.loss(emb, counts, library).bound for _ in range(200)]).mean(0)
    mll = head.marginal_log_likelihood(emb, counts, library, n_samples=500)
    assert mll.shape == (6,)
    assert torch.all(mll > elbo)


def _grads(head, loss):
    head.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in head.named_parameters() if p.grad is not None}


def test_dreg_and_plain_iwae_gradients_agree():
    """Decoder: identical gradients for the same samples. Encoder: both unbiased for the IWAE gradient, so their
    means over many samples agree within sampling error (while their values differ sample by sample)."""
    torch.manual_seed(6)
    head = VAEHead(5, 7, n_latent=2, n_hidden=8, prior="mixture", n_components=3).double()
    emb, counts, library = (t.double() for t in _tiny_data(n_cells=2))
    labels = torch.tensor([1, -100])
    n_chunks, copies = 30, 200
    emb_r, counts_r, library_r = emb.repeat(copies, 1), counts.repeat(copies, 1), library.repeat(copies)
    labels_r = labels.repeat(copies)
    dreg_chunks, iwae_chunks = [], []
    for chunk in range(n_chunks):
        out = {}
        for dreg in (True, False):
            torch.manual_seed(1000 + chunk)
            res = head.loss(emb_r, counts_r, library_r, labels=labels_r, objective="iwae", n_samples=8, dreg=dreg,
                            classification_weight=0.0)
            out[dreg] = (_grads(head, res.loss), res.loss.item())
        assert out[True][1] == pytest.approx(out[False][1], rel=1e-12)  # same value (-bound)
        for name, g in out[False][0].items():
            if not name.startswith("posterior."):
                torch.testing.assert_close(out[True][0][name], g, rtol=1e-9, atol=1e-12)
        dreg_chunks.append(out[True][0])
        iwae_chunks.append(out[False][0])
    name = "posterior.loc.weight"
    d = torch.stack([c[name] for c in dreg_chunks])
    p = torch.stack([c[name] for c in iwae_chunks])
    assert not torch.allclose(d[0], p[0])  # different estimators...
    se = torch.sqrt(d.var(0) / n_chunks + p.var(0) / n_chunks)
    assert torch.all((d.mean(0) - p.mean(0)).abs() < 4 * se + 1e-8), (d.mean(0), p.mean(0), se)  # ...same mean
    assert d.var(0).sum() < p.var(0).sum()  # and DReG is the less noisy one at K=8


def test_labelled_and_unlabelled_cells_use_component_and_mixture():
    torch.manual_seed(7)
    head = VAEHead(5, 7, n_latent=2, n_hidden=8, prior="mixture", n_components=3).double()
    emb, counts, library = (t.double() for t in _tiny_data(n_cells=4))
    z = torch.randn(1, 4, 2, dtype=torch.float64)
    labels = torch.tensor([2, -100, 0, -100])
    terms = head.log_joint(z, counts, library, None, labels)
    comp = head.prior.component_log_prob(z)
    torch.testing.assert_close(terms["prior"][0, 0], comp[0, 0, 2])
    torch.testing.assert_close(terms["prior"][0, 1], torch.logsumexp(comp[0, 1], -1))
    # an unlabelled cell's loss does not depend on anything but its data: any label it might carry is not an input
    torch.manual_seed(8)
    a = head.loss(emb, counts, library, labels=labels)
    torch.manual_seed(8)
    b = head.loss(emb, counts, library, labels=torch.tensor([2, -100, 1, -100]))
    assert a.bound[1] == b.bound[1] and a.bound[3] == b.bound[3]
    assert a.bound[2] != b.bound[2]


def test_batch_conditioning_changes_reconstruction_not_shapes():
    torch.manual_seed(9)
    dec = CountDecoder(3, 7, n_batch=2, n_hidden=8, likelihood="zinb", dispersion="gene-batch")
    torch.nn.init.normal_(dec.log_theta)
    z = torch.randn(4, 5, 3)  # (K, B, D)
    library = torch.full((5,), 100.0)
    outs = {b: dec(z, torch.full((5,), b), library) for b in (0, 1, -1)}
    for key in ("mu", "theta", "zi_logits"):
        assert outs[0][key].shape == outs[1][key].shape == outs[-1][key].shape == (4, 5, 7)
        assert not torch.allclose(outs[0][key], outs[1][key])
    torch.testing.assert_close(outs[0]["mu"].sum(-1), library.expand(4, 5))  # library * softmax
    torch.testing.assert_close(outs[-1]["theta"][0, 0], torch.exp(dec.log_theta.mean(0)))  # unseen: mean dispersion
    x = torch.poisson(outs[0]["mu"][0])
    assert dec.log_prob(x, outs[0]).shape == (4, 5)
    with pytest.raises(ValueError, match="batch_index"):
        dec(z, None, library)


def test_elbo_training_improves_the_bound_and_kl_warmup_changes_only_the_gradient():
    torch.manual_seed(10)
    emb, counts, library = _tiny_data(n_cells=32, n_genes=10)
    head = VAEHead(5, 10, n_latent=2, n_hidden=16)
    torch.manual_seed(0)
    full = head.loss(emb, counts, library, kl_weight=1.0)
    torch.manual_seed(0)
    warm = head.loss(emb, counts, library, kl_weight=0.0)
    torch.testing.assert_close(full.bound, warm.bound)
    assert full.loss.item() != warm.loss.item()
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    start = head.loss(emb, counts, library).bound.mean().item()
    for _ in range(300):
        opt.zero_grad()
        head.loss(emb, counts, library).loss.backward()
        opt.step()
    with torch.no_grad():
        end = torch.stack([head.loss(emb, counts, library).bound.mean() for _ in range(20)]).mean().item()
    # a model without a latent (Poisson with the pooled gene proportions) is the bar the bound must clear
    proportions = counts.sum(0) / counts.sum()
    null = torch.distributions.Poisson(library[:, None] * proportions).log_prob(counts).sum(-1).mean().item()
    assert start < null < end
