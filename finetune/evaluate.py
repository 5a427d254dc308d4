"""Held-out evaluation of a fine-tuned model, as ``finetune/run.py`` reports it: the task's metrics beside its trivial
baseline, the embedding's metrics, the predictions table and the plots."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from . import metrics as M
from .api import outputs
from .data import normalize_proteins, protein_counts


def held_out_metrics(model, train: ad.AnnData, test: ad.AnnData, *, label_key: str | None = None,
                     batch_key: str | None = None, protein_obsm_key: str | None = None,
                     unlabelled_category: str | None = None, gene_id_key: str | None = None,
                     layer: str | None = None, mll_samples: int = 0, seed: int = 0) -> tuple[dict, pd.DataFrame, dict]:
    """Metrics on the held-out cells, the per-cell predictions, and what the plots need (``"embedding"``,
    ``"confusion"``, ``"proteins"``).

    Cell types: accuracy and macro-F1 over labelled cells, and those of always predicting the training majority;
    proteins (on the model's normalised scale): RMSE and Pearson per cell and per protein, and those of the training
    mean; the VAE: the importance-sampled marginal log-likelihood (``mll_samples``); any model: the embedding's
    label / batch metrics.
    """
    config = model.config
    keys = dict(gene_id_key=gene_id_key, layer=layer, seed=seed)
    out = outputs(test, model, batch_key=batch_key, **keys)
    metrics: dict = {"n_train": train.n_obs, "n_test": test.n_obs}
    extra: dict = {"embedding": out["embedding"]}
    predictions = pd.DataFrame(index=test.obs_names)
    classifies = "logits" in out and config.problem_type != "regression"
    if classifies and label_key:
        names = [config.id2label[i] for i in range(out["logits"].shape[1])]
        probabilities = torch.softmax(torch.from_numpy(out["logits"]).double(), -1).numpy()
        predicted = np.asarray(names)[probabilities.argmax(1)]
        truth = test.obs[label_key].astype(str).to_numpy()
        known = truth != str(unlabelled_category) if unlabelled_category else np.ones(len(truth), bool)
        majority = pd.Series(train.obs[label_key].astype(str)).value_counts().index[0]
        constant = np.full(known.sum(), majority)
        metrics.update(accuracy=M.accuracy(truth[known], predicted[known]),
                       macro_f1=M.macro_f1(truth[known], predicted[known]),
                       majority_accuracy=M.accuracy(truth[known], constant),
                       majority_macro_f1=M.macro_f1(truth[known], constant),
                       unseen_test_types=sorted(set(truth[known]) - set(names)))
        extra["confusion"] = M.confusion(truth[known], predicted[known])
        predictions["predicted_cell_type"] = predicted
        predictions["probability"] = probabilities.max(1)
    levels = out.get("logits") if config.problem_type == "regression" else out.get("protein_predictions")
    if levels is not None and protein_obsm_key:
        names = [config.id2label[i] for i in sorted(config.id2label)] if config.problem_type == "regression" \
            else list(config.proteins)
        scale = (config.protein_norm, config.protein_reference or None)
        truth = normalize_proteins(protein_counts(test, protein_obsm_key, names)[0], *scale)
        train_levels = normalize_proteins(protein_counts(train, protein_obsm_key, names)[0], *scale)
        metrics.update(M.protein_metrics(levels, truth))
        mean = np.tile(train_levels.mean(0), (test.n_obs, 1))
        metrics.update({f"mean_protein_{k}": v for k, v in M.protein_metrics(mean, truth).items()})
        metrics["protein_norm"] = config.protein_norm
        extra["proteins"] = (levels, truth, names)
    if mll_samples and hasattr(model, "marginal_log_likelihood"):
        mll = outputs(test, model, batch_key=batch_key, method="marginal_log_likelihood", n_samples=mll_samples,
                      **keys)["marginal_log_likelihood"]
        metrics.update(marginal_log_likelihood=float(mll.mean()), mll_samples=mll_samples)
        predictions["marginal_log_likelihood"] = mll
    labels = test.obs[label_key].astype(str).to_numpy() if label_key in test.obs else None
    batches = test.obs[batch_key].astype(str).to_numpy() if batch_key in test.obs else None
    if test.n_obs >= 20:
        metrics["embedding"] = M.embedding_metrics(out["embedding"], labels, batches, seed=seed)
    return metrics, predictions, extra


def write_plots(out_dir: Path, model, train: ad.AnnData, test: ad.AnnData, extra: dict, *, task: str,
                label_key: str | None = None, batch_key: str | None = None, donor_key: str | None = None,
                gene_id_key: str | None = None, layer: str | None = None, seed: int = 0) -> list[str]:
    """``umap.png`` (training and held-out cells coloured by split, cell type, batch and donor),
    ``confusion_matrix.png`` and ``protein_scatter.png`` where they apply; returns the names of the files written."""
    from . import plots

    written = []
    train_embedding = outputs(train, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer,
                              seed=seed)["embedding"]
    cells = ad.concat({"train": train, "held-out": test}, label="express_split", join="inner")
    colours = {"split": cells.obs["express_split"].to_numpy()}
    for key in (label_key, batch_key, donor_key):
        if key and key in cells.obs and key not in colours:
            colours[key] = cells.obs[key].astype(str).to_numpy()
    if cells.n_obs >= 5:
        coords = plots.umap_coordinates(np.concatenate([train_embedding, extra["embedding"]]), seed=seed)
        written.append(plots.plot_umap(coords, colours, out_dir / "umap.png", title=f"{task}:").name)
    if "confusion" in extra:
        matrix, names = extra["confusion"]
        written.append(plots.plot_confusion(matrix, names, out_dir / "confusion_matrix.png",
                                            title=f"{task} (held-out cells)").name)
    if "proteins" in extra:
        pred, true, names = extra["proteins"]
        written.append(plots.plot_protein_scatter(pred, true, names, out_dir / "protein_scatter.png",
                                                  title=f"ADT ({model.config.protein_norm})").name)
    return written
