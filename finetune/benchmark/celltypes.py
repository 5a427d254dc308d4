"""Cell types on held-out donors / batches, with 10%, 25% and 100% of the training labels.

Every arm reads the same training and test cells (:func:`~finetune.benchmark.common.train_test`); with a label
fraction below 1, the labelled cells are a per-class share of the training cells drawn with the seed, and:

- the supervised arms (majority class, L1 logistic regression and a scikit-learn MLP on log-normalised HVGs, the
  express classifier on the MLP encoder and on the transformer, pretrained and from random weights) train on the
  labelled cells only. The transformer arms ``express_pretrained`` and ``express_random_init`` are the transformer
  alone (``wide_path`` off); ``express_pretrained_default`` is the library's default cell-type recipe, the pretrained
  transformer with its wide path (a linear model on the log-normalised HVGs added to its logits, L1-penalised);
- the semi-supervised arms see every training cell, the unlabelled ones without their label: express's VAE with a
  mixture prior (MLP encoder; its ``p(c|z)`` classifies) and scANVI (which also sees the held-out cells'
  RNA, unlabelled, as in its documented label-transfer use).
"""

from __future__ import annotations

import numpy as np

from .common import (
    Timer,
    cell_type_scores,
    express_arms,
    label_subset,
    mlp_arm,
    train_test,
    vae_budget,
)
from .suite import Bench, note, register


def split_datasets(bench: Bench) -> list[str]:
    """Datasets with labels and a fine-tuning split."""
    return [n for n, d in bench.datasets.items() if d.label_key is not None and d.test_key is not None]


def fraction_name(fraction: float) -> str:
    return f"{round(100 * fraction)}% labels"


@register("celltypes", split_datasets, primary="macro_f1",
          description="cell-type classification of held-out donors / batches; accuracy and macro-F1 with 10%, "
                      "25% and 100% of the training labels")
def celltypes(bench: Bench, name: str, seed: int) -> dict:
    from finetune import api
    from finetune import baselines as B
    from finetune.api import MIN_TRAINING_CELLS

    from . import scvi_arms

    data = bench.datasets[name]
    train, test = train_test(bench, name, seed)
    y_all = data.labels(train.obs)
    truth = data.labels(test.obs)
    library = express_arms(bench, seed, bench.budget.transformer_steps)
    transformer_arms = {arm: {**kwargs, "head": {"wide_path": False}} for arm, kwargs in library.items()}
    transformer_arms["express_pretrained_default"] = library["express_pretrained"]
    out, masks = {}, []
    for fraction in bench.budget.label_fractions:
        rows = label_subset(y_all, fraction, seed)
        if len(rows) < MIN_TRAINING_CELLS:
            note(f"celltypes/{name}: {fraction_name(fraction)} leaves {len(rows)} labelled cells, fewer than the "
                 f"{MIN_TRAINING_CELLS} fine-tuning needs: not run")
            continue
        labelled = train[rows].copy()
        y = y_all[rows]
        arms: dict[str, dict] = {"majority": cell_type_scores(truth, B.majority_class(y, test.n_obs))}
        with Timer() as t:
            x_train, x_test, _ = B.log_normalized_features(labelled, test)
        for arm, fit in (("l1_logistic_regression", B.l1_logistic_regression), ("mlp_sklearn", B.mlp_classifier)):
            with Timer() as t2:
                predicted = fit(x_train, y, x_test, seed=seed)
            arms[arm] = {**cell_type_scores(truth, predicted), "seconds": t.seconds + t2.seconds}

        def express(arm: str, **kwargs) -> None:
            with Timer() as timer:
                model = api.fit_cell_types(labelled, label_key=data.label_key, **kwargs)
                predicted = api.predict_cell_types(test.copy(), model, gene_id_key=kwargs.get("gene_id_key"))
            arms[arm] = {**cell_type_scores(truth, predicted.astype(str).to_numpy()), "seconds": timer.seconds}

        express("express_mlp_encoder", **mlp_arm(bench, seed))
        for arm, kwargs in transformer_arms.items():
            express(arm, **kwargs)
        # semi-supervised: every training cell, the labelled ones with their label
        mask = np.zeros(train.n_obs, dtype=bool)
        mask[rows] = True
        cells = train.copy()
        cells.obs["_labelled"] = mask
        with Timer() as timer:
            vae = api.train_vae(cells, encoder="mlp", label_key=data.label_key, labelled_key="_labelled",
                                **vae_budget(bench, seed))
            predicted = api.predict_cell_types(test.copy(), vae).astype(str).to_numpy()
        arms["express_vae_mlp_encoder"] = {**cell_type_scores(truth, predicted), "seconds": timer.seconds}
        masks.append(mask)
        out[fraction_name(fraction)] = arms
    if scvi_arms.missing() is None and masks:
        with Timer() as timer:
            predictions = scvi_arms.scanvi_predict(train, test, label_key=data.label_key, labelled=masks,
                                                   batch_key=data.batch_key, scvi_epochs=bench.budget.scvi_epochs,
                                                   scanvi_epochs=bench.budget.scanvi_epochs, seed=seed)
        for setting, predicted in zip(out, predictions):  # the shared scVI's time spread over the fractions
            out[setting]["scanvi"] = {**cell_type_scores(truth, predicted), "seconds": timer.seconds / len(masks)}
    elif scvi_arms.missing() is not None:
        note(f"scANVI skipped: {scvi_arms.missing()}")
    fractions = ", ".join(f"{fraction_name(f)}: {len(label_subset(y_all, f, seed))}"
                          for f in bench.budget.label_fractions)
    note(f"celltypes/{name}: {train.n_obs} training cells ({fractions} labelled), {test.n_obs} held-out cells "
         f"({data.test_key} in {list(data.test_values)})")
    return out
