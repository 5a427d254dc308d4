"""Probabilistic heads: the importance-sampled marginal log-likelihood ``log p(x)`` of held-out cells (nats per
cell, higher is better), express's VAE head against scVI on the same genes (the VAE's 2,000 training HVGs) and the
same cells. Both are trained on the training cells without a batch covariate (the held-out donors / batches are new
to them) and without labels, each with its defaults and the budget's epochs; both condition on the observed library
size. ``log p(x)`` uses the budget's ``mll_samples`` importance samples for both.
"""

from __future__ import annotations

import numpy as np

from .celltypes import split_datasets
from .common import Timer, train_test, vae_budget
from .suite import Bench, note, register


def vae_mll(train, test, bench: Bench, seed: int, **kwargs) -> tuple[dict, object]:
    """Train express's VAE on ``train`` (MLP encoder, ``kwargs`` to ``train_vae``) and score ``test``: mean
    ``log p(x)`` and, with a mixture prior, the accuracy / macro-F1 of ``p(c|z)``."""
    from finetune import api

    from .common import cell_type_scores

    with Timer() as timer:
        vae = api.train_vae(train, encoder="mlp", **vae_budget(bench, seed), **kwargs)
        ll = api.marginal_log_likelihood(test, vae, n_samples=bench.budget.mll_samples, key_added=None, seed=seed)
    scores = {"marginal_log_likelihood": float(np.mean(ll)), "seconds": timer.seconds}
    label_key = kwargs.get("label_key")
    if label_key is not None and vae.config.prior == "mixture":
        truth = test.obs[label_key].astype(str).to_numpy()
        scores.update(cell_type_scores(truth, api.predict_cell_types(test.copy(), vae).astype(str).to_numpy()))
    return scores, vae


@register("probabilistic", split_datasets, primary="marginal_log_likelihood",
          description="importance-sampled marginal log-likelihood of held-out cells (nats per cell), express's VAE "
                      "against scVI on the same genes")
def probabilistic(bench: Bench, name: str, seed: int) -> dict:
    from . import scvi_arms

    train, test = train_test(bench, name, seed)
    arms = {}
    arms["express_vae_mlp_encoder"], vae = vae_mll(train, test, bench, seed)
    genes = list(vae.config.gene_panel)
    if scvi_arms.missing() is None:
        with Timer() as timer:
            ll = scvi_arms.scvi_marginal_ll(train, test, genes=genes, epochs=bench.budget.scvi_epochs,
                                            n_samples=bench.budget.mll_samples, seed=seed)
        arms["scvi"] = {"marginal_log_likelihood": float(np.mean(ll)), "seconds": timer.seconds}
    else:
        note(f"scVI skipped: {scvi_arms.missing()}")
    note(f"probabilistic/{name}: {len(genes)} genes, {train.n_obs} training and {test.n_obs} held-out cells")
    return {"marginal log-likelihood": arms}
