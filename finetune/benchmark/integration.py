"""Batch integration on the data with several batches, donors or chemistries (CellBench's five batches and two
protocols, the three 10x chemistries, Kang's donors, the two CITE-seq donors): bio-conservation and
batch-correction scores computed with scib-metrics' ``Benchmarker`` (its default metrics, raw scores, total =
0.6 bio + 0.4 batch), and UMAPs coloured by cell type, batch and donor (first seed).

Embeddings of the same cells (every cell, cut to the budget's ``integration_cells`` by one draw shared by the
seeds): unintegrated PCA of the
log-normalised HVGs (also the reference of scib's PCR comparison), express's frozen encoder pretrained and at random
weights (no batch information), express's VAE with the batch in its decoder (MLP encoder, trained on these cells),
and scVI with the same batch covariate. Without scib-metrics, express's own metrics (``finetune.metrics``) are
reported instead, with a note.
"""

from __future__ import annotations

import numpy as np

from .common import subsample, vae_budget
from .suite import Bench, note, register


def integration_datasets(bench: Bench) -> list[str]:
    """Datasets with a batch column (the stimulation file's ctrl/stim column is biology, not a batch: left out)."""
    return [n for n, d in bench.datasets.items() if d.batch_key is not None and n != "kang_stim"]


def batch_keys(data, obs) -> list[str]:
    """The columns scored as batches: the batch column, the donor column and any extra (e.g. protocol) that holds
    at least two values and splits the cells differently from the ones before it."""
    keys: list[str] = []
    for key in (data.batch_key, data.donor_key, *data.extra_keys.values()):
        if key is None or key not in obs or obs[key].astype(str).nunique() < 2:
            continue
        codes = obs[key].astype(str).to_numpy()
        if any(_same_partition(codes, obs[k].astype(str).to_numpy()) for k in keys):
            continue
        keys.append(key)
    return keys


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    import pandas as pd

    return int(pd.crosstab(a, b).astype(bool).sum().sum()) == len(set(a)) == len(set(b))


@register("integration", integration_datasets, primary="total",
          description="batch integration scored with scib-metrics (bio conservation, batch correction, total = "
                      "0.6 bio + 0.4 batch); UMAPs by cell type, batch and donor")
def integration(bench: Bench, name: str, seed: int) -> dict:
    from finetune import api
    from finetune import metrics as M
    from tokenizer import TokenizedCells

    from . import scvi_arms
    from .common import model_dir, read_dataset
    from .zeroshot import express_embedding, pca_features

    data = bench.datasets[name]
    adata = read_dataset(bench, name, labelled=data.label_key is not None)
    # the same cells for every seed: the seeds vary the methods, and the metrics' compiled kernels are reused
    adata = adata[subsample(adata.n_obs, bench.budget.integration_cells, 0)].copy()
    keys = batch_keys(data, adata.obs)
    if not keys:
        raise ValueError(f"{name}: no batch column with at least two values")
    labels = data.labels(adata.obs)
    cells = TokenizedCells.load(bench.corpus.complete[name])
    position = {c: i for i, c in enumerate(cells.dataset["cell_id"])}
    rows = np.asarray([position[c] for c in adata.obs_names], dtype=np.int64)
    embeddings = {"pca": pca_features(adata, seed=seed)}
    for arm, variant in (("express_pretrained", "default"), ("express_random_init", "random")):
        embeddings[arm], _ = express_embedding(model_dir(bench, seed, variant), cells, rows)
    vae = api.train_vae(adata, encoder="mlp", batch_key=keys[0], **vae_budget(bench, seed))
    embeddings["express_vae_mlp_encoder"] = api.embed(adata.copy(), vae, batch_key=keys[0])
    if scvi_arms.missing() is None:
        embeddings["scvi"] = scvi_arms.scvi_latent(adata, batch_key=keys[0], epochs=bench.budget.scvi_epochs,
                                                   seed=seed)
    else:
        note(f"scVI skipped: {scvi_arms.missing()}")
    out = {}
    for key in keys:
        batches = adata.obs[key].astype(str).to_numpy()
        if scvi_arms.scib_missing() is None:
            out[f"batch = {key}"] = scvi_arms.scib_scores(embeddings, batches=batches, labels=labels)
        else:
            note(f"scib-metrics missing ({scvi_arms.scib_missing()}): express's own metrics reported instead")
            out[f"batch = {key} (express metrics)"] = {
                arm: M.embedding_metrics(x, labels, batches, seed=seed) for arm, x in embeddings.items()}
    note(f"integration/{name}: {adata.n_obs} cells; batch-aware arms trained with batch = {keys[0]}")
    if seed == bench.seeds[0]:
        colours = {"cell type": labels} if labels is not None else {}
        for key in (data.batch_key, data.donor_key, *data.extra_keys.values()):
            if key is not None and key in adata.obs and key not in colours:
                colours[key] = adata.obs[key].astype(str).to_numpy()
        umap_grid(embeddings, colours, bench.figure(f"integration_{name}.png"), seed=seed, title=name)
    return out


def umap_grid(embeddings: dict[str, np.ndarray], colours: dict[str, np.ndarray], path, *, seed: int = 0,
              title: str = ""):
    """One row per embedding (its UMAP), one column per annotation."""
    from finetune.plots import _pyplot, _save, scatter_categories, umap_coordinates

    plt = _pyplot()
    n_rows, n_cols = len(embeddings), max(len(colours), 1)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols + 1.5, 3.0 * n_rows), squeeze=False)
    for r, (arm, x) in enumerate(embeddings.items()):
        coords = umap_coordinates(x, seed=seed)
        for c, (annotation, values) in enumerate(colours.items()):
            ax = axes[r, c]
            categories = scatter_categories(ax, coords, values, size=2)
            if r == 0:
                ax.set_title(annotation)
            if c == 0:
                ax.set_ylabel(arm, fontsize=8)
            if r == n_rows - 1 and len(categories) <= 20:
                ax.legend(fontsize=5, markerscale=3, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False,
                          ncol=3)
    fig.suptitle(title)
    return _save(fig, path)
