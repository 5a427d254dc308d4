"""Ablations of the design, each against the default on the same budget.

- **Pretraining** (:data:`~finetune.benchmark.pretraining.VARIANTS`, one change each, all pretrained for the
  budget's ``ablation_steps`` like the default recipe they are compared with): MLM vs MCV vs the contrastive
  cell-level objective vs combinations; top-ranked vs random detected genes vs a fixed panel of the corpus's highly
  variable genes as input (a panel model reads the evaluation cells through its panel); without the sampled zeros;
  without hierarchical gene embeddings. Scored zero-shot on every labelled dataset (5-fold k-NN macro-F1 and
  accuracy of the frozen embedding, label silhouette); their held-out pretraining metrics are in the pretraining
  table.
- **VAE heads** (MLP encoder, the budget's epochs, on every fine-tuning split): ELBO (K=1) vs IWAE with K=8 and the
  DReG gradient; standard-normal vs cell-type mixture prior; diagonal vs full posterior covariance. Scored by the
  held-out marginal log-likelihood (and ``p(c|z)`` for mixture priors). Each setting that equals the library's
  default is the default arm itself and is not trained twice.
"""

from __future__ import annotations

import inspect

from .suite import Bench, note, register

# name -> train_vae keyword arguments (one axis each); the default arm is train_vae's own defaults
VAE_VARIANTS: dict[str, dict] = {
    "elbo_k1": {"head": {"objective": "elbo", "n_importance_samples": 1}},
    "iwae_k8_dreg": {"head": {"objective": "iwae", "n_importance_samples": 8, "dreg": True}},
    "prior_normal": {"prior": "normal", "label_key": None},  # a normal prior reads no labels
    "prior_mixture": {"prior": "mixture"},
    "covariance_diagonal": {"head": {"covariance": "diagonal"}},
    "covariance_full": {"head": {"covariance": "full"}},
}


def _vae_defaults() -> dict:
    from finetune import api
    from modeling import ExpressVAEConfig

    config = {k: p.default for k, p in inspect.signature(ExpressVAEConfig.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
    prior = inspect.signature(api.train_vae).parameters["prior"].default
    return {**config, "prior": "mixture" if prior == "auto" else prior}  # "auto" = mixture when labels are given


def vae_variant_is_default(name: str) -> bool:
    """Whether the VAE variant sets only what the defaults (with labels) already are."""
    defaults = _vae_defaults()
    change = VAE_VARIANTS[name]
    fields = {**change.get("head", {}), **({"prior": change["prior"]} if "prior" in change else {})}
    return all(defaults.get(k) == v for k, v in fields.items())


def ablation_datasets(bench: Bench) -> list[str]:
    from .zeroshot import labelled_datasets

    return labelled_datasets(bench)


@register("ablations", ablation_datasets,
          primary={"pretraining variants (zero-shot)": "macro_f1", "VAE heads": "marginal_log_likelihood"},
          description="one design change at a time against the default on the same budget: pretraining variants "
                      "(zero-shot k-NN), VAE heads (held-out log-likelihood)")
def ablations(bench: Bench, name: str, seed: int) -> dict:
    from . import pretraining
    from .common import model_dir
    from .zeroshot import _flat, eval_cells, express_embedding, score_embedding

    out = {}
    cells, rows, labels = eval_cells(bench, name, seed)
    reference = pretraining.ablation_reference(bench)
    arms = {}
    for variant in ["default", *pretraining.VARIANTS]:
        if variant != "default" and pretraining.is_default(variant):
            note(f"ablations: pretraining variant {variant} is the default recipe; its row is the default's")
            continue
        source = reference if variant == "default" else variant
        x, _ = express_embedding(model_dir(bench, seed, source), cells, rows)
        scores = score_embedding(x, labels, seed=seed)
        arms[variant] = {k: v for k, v in _flat(scores).items() if "_zscore" not in k and "_cosine" not in k}
    out["pretraining variants (zero-shot)"] = arms
    data = bench.datasets[name]
    if data.test_key is not None:
        out["VAE heads"] = vae_heads(bench, name, seed)
    return out


def vae_heads(bench: Bench, name: str, seed: int) -> dict:
    """The default VAE head and each variant that differs from it, on the split's training cells."""
    from .common import train_test
    from .probabilistic import vae_mll

    data = bench.datasets[name]
    train, test = train_test(bench, name, seed)
    arms = {"default": vae_mll(train, test, bench, seed, label_key=data.label_key)[0]}
    for variant, kwargs in VAE_VARIANTS.items():
        if vae_variant_is_default(variant):
            continue
        arms[variant] = vae_mll(train, test, bench, seed, **{"label_key": data.label_key, **kwargs})[0]
    return arms
