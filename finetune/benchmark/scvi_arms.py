"""scvi-tools and scib-metrics in the benchmark: scVI, scANVI and totalVI as comparators, scib-metrics as the
reference implementation of the integration scores. Both come with ``pip install 'express[bench]'``; without them
the arms are skipped and the report says so.

Every model is built with its documented defaults (``SCVI(adata)``: 10 latent dimensions, one 128-wide hidden
layer, ZINB likelihood; ``SCANVI.from_scvi_model``; ``TOTALVI(adata)``); the benchmark sets only ``max_epochs``
(the budget) and the seed, on the same 2,000 highly variable genes the express heads read
(:func:`finetune.data.select_genes`). Lightning runs on the CPU, one process, no progress bar.

- :func:`scvi_latent`: the scVI latent (posterior means) of the cells it was trained on (zero-shot, integration);
- :func:`scanvi_predict`: cell types of held-out cells with scANVI, trained semi-supervised on the training cells
  (labelled as the label fraction says) and the held-out cells unlabelled, its documented label-transfer use (one
  scVI shared by the label fractions);
- :func:`totalvi_proteins`: proteins of held-out cells from their RNA: totalVI trained on the training cells with
  proteins and the held-out cells with none (their batch's proteins are missing), its documented imputation;
- :func:`scvi_marginal_ll`: scVI trained on the training cells, the importance-sampled ``log p(x)`` of held-out
  cells (``get_marginal_ll``);
- :func:`scib_scores`: scib-metrics' ``Benchmarker`` (its default metrics, not min-max scaled) on embeddings.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

UNKNOWN = "Unknown"  # scANVI's unlabelled category


def missing() -> str | None:
    """None when scvi-tools can be imported, else what to install."""
    if importlib.util.find_spec("scvi") is None:
        return "scvi-tools is not installed (pip install 'express[bench]')"
    return None


def scib_missing() -> str | None:
    """None when scib-metrics can be imported, else what to install."""
    if importlib.util.find_spec("scib_metrics") is None:
        return "scib-metrics is not installed (pip install 'express[bench]')"
    return None


def _scvi(seed: int):
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.settings.verbosity = logging.ERROR
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="scvi")
    return scvi


TRAIN = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def _counts(adata: ad.AnnData, genes: list[str] | None) -> ad.AnnData:
    """A bare AnnData of raw counts (float32 CSR) on ``genes`` (var_names), with ``adata.obs``."""
    import scipy.sparse as sp

    from finetune.data import align_genes, counts_matrix, gene_names

    x = counts_matrix(adata)
    names = gene_names(adata)
    if genes is not None:
        x = align_genes(x, names, genes)
        names = np.asarray(genes)
    out = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=adata.obs.copy(),
                     var=pd.DataFrame(index=pd.Index(names).astype(str)))
    out.obs_names_make_unique()
    return out


def hvgs(adata: ad.AnnData) -> list[str]:
    """The 2,000 highly variable genes the express heads and baselines read (all genes when there are fewer)."""
    from finetune.data import select_genes

    return select_genes(adata, 2000)


def scvi_latent(adata: ad.AnnData, *, batch_key: str | None, epochs: int, seed: int) -> np.ndarray:
    """scVI's latent representation of ``adata``'s cells (trained on them, with ``batch_key`` as its batch)."""
    scvi = _scvi(seed)
    data = _counts(adata, hvgs(adata))
    scvi.model.SCVI.setup_anndata(data, batch_key=batch_key)
    model = scvi.model.SCVI(data)
    model.train(max_epochs=epochs, **TRAIN)
    return np.asarray(model.get_latent_representation())


def scanvi_predict(train: ad.AnnData, test: ad.AnnData, *, label_key: str, labelled: list[np.ndarray],
                   batch_key: str | None, scvi_epochs: int, scanvi_epochs: int, seed: int) -> list[np.ndarray]:
    """Predicted cell types of ``test``, one array per mask of ``labelled``: one scVI on the training and test
    cells, then for each mask a scANVI from it whose labelled cells are the training cells of that mask (the other
    training cells and the test cells unlabelled)."""
    scvi = _scvi(seed)
    genes = hvgs(train)
    joint = ad.concat({"train": _counts(train, genes), "test": _counts(test, genes)}, label="_split",
                      index_unique="-")
    truth = train.obs[label_key].astype(str).to_numpy()
    for i, mask in enumerate(labelled):
        joint.obs[f"_labels{i}"] = np.concatenate([np.where(mask, truth, UNKNOWN), np.full(test.n_obs, UNKNOWN)])
    batch = None
    if batch_key is not None:
        joint.obs["_batch"] = joint.obs[batch_key].astype(str).to_numpy()
        batch = "_batch"
    scvi.model.SCVI.setup_anndata(joint, batch_key=batch)
    vae = scvi.model.SCVI(joint)
    vae.train(max_epochs=scvi_epochs, **TRAIN)
    test_rows = np.flatnonzero(joint.obs["_split"].to_numpy() == "test")
    predictions = []
    for i in range(len(labelled)):
        model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN, labels_key=f"_labels{i}")
        model.train(max_epochs=scanvi_epochs, **TRAIN)
        predictions.append(np.asarray(model.predict(joint[test_rows])).astype(str))
    return predictions


def totalvi_proteins(train: ad.AnnData, test: ad.AnnData, *, protein_key: str, batch_key: str, epochs: int,
                     seed: int) -> tuple[np.ndarray, list[str]]:
    """Predicted protein levels (totalVI's denoised foreground, count scale) of ``test`` from its RNA, and the
    protein names."""
    from finetune.data import protein_counts

    scvi = _scvi(seed)
    genes = hvgs(train)
    raw, names = protein_counts(train, protein_key)
    joint = ad.concat({"train": _counts(train, genes), "test": _counts(test, genes)}, label="_split",
                      index_unique="-")
    joint.obsm["_proteins"] = pd.DataFrame(np.concatenate([raw, np.zeros((test.n_obs, len(names)))]).astype(np.float32),
                                           index=joint.obs_names, columns=names)
    # the held-out cells' batch(es) have no proteins: totalVI treats them as missing and imputes them
    joint.obs["_batch"] = np.concatenate([train.obs[batch_key].astype(str).to_numpy(),
                                          np.char.add("heldout_", test.obs[batch_key].astype(str).to_numpy())])
    scvi.model.TOTALVI.setup_anndata(joint, protein_expression_obsm_key="_proteins", batch_key="_batch")
    model = scvi.model.TOTALVI(joint)
    model.train(max_epochs=epochs, **TRAIN)
    test_rows = np.flatnonzero(joint.obs["_split"].to_numpy() == "test")
    train_batches = sorted(set(train.obs[batch_key].astype(str)))
    _, proteins = model.get_normalized_expression(joint, indices=test_rows, transform_batch=train_batches,
                                                  n_samples=25, return_mean=True)
    return np.asarray(proteins)[:, : len(names)], names


def scvi_marginal_ll(train: ad.AnnData, test: ad.AnnData, *, genes: list[str], epochs: int, n_samples: int,
                     seed: int) -> np.ndarray:
    """Per-cell importance-sampled ``log p(x)`` (nats) of ``test`` on ``genes`` under scVI trained on ``train``
    (no batch covariate: the held-out donors / batches are new)."""
    scvi = _scvi(seed)
    data = _counts(train, genes)
    scvi.model.SCVI.setup_anndata(data)
    model = scvi.model.SCVI(data)
    model.train(max_epochs=epochs, **TRAIN)
    held_out = _counts(test, genes)
    return np.asarray(model.get_marginal_ll(held_out, n_mc_samples=n_samples, return_mean=False), dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------------
# scib-metrics
# ---------------------------------------------------------------------------------------------------------------------
SCIB_AGGREGATES = {"Bio conservation": "bio_conservation", "Batch correction": "batch_correction", "Total": "total"}


def _metric_name(column: str) -> str:
    return SCIB_AGGREGATES.get(column, column.lower().replace(" ", "_"))


def exact_neighbors(x: np.ndarray, k: int):
    """scib-metrics' neighbour results from an exact k-NN search (self first, as its approximate search returns
    them): on a few thousand cells exact search is fast, and it spares pynndescent's JIT compilation."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=min(k, len(x))).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def scib_scores(embeddings: dict[str, np.ndarray], *, batches: np.ndarray, labels: np.ndarray | None,
                unintegrated: str = "pca") -> dict[str, dict[str, float]]:
    """scib-metrics' ``Benchmarker`` with its default metrics on each embedding (raw scores, not min-max scaled
    across methods; neighbours by exact search); ``unintegrated`` names the embedding PCR comparison measures
    against. Without labels only the batch-correction metrics that need none are computed (iLISI, kBET over all
    cells, PCR comparison)."""
    import gc

    from scib_metrics.benchmark import BatchCorrection, Benchmarker

    logging.getLogger("scib_metrics").setLevel(logging.WARNING)
    if len(batches) <= 90:
        raise ValueError(f"scib-metrics' neighbourhoods need more than 90 cells, got {len(batches)}")

    adata = ad.AnnData(X=np.zeros((len(batches), 1), dtype=np.float32))
    adata.obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    adata.obs["labels"] = pd.Categorical(np.asarray(labels).astype(str) if labels is not None
                                         else np.full(len(batches), "all"))
    for name, x in embeddings.items():
        adata.obsm[name] = np.asarray(x, dtype=np.float32)
    kwargs = {}
    if labels is None:
        kwargs = {"bio_conservation_metrics": None,
                  "batch_correction_metrics": BatchCorrection(bras=False, graph_connectivity=False)}
    bench = Benchmarker(adata, batch_key="batch", label_key="labels", embedding_obsm_keys=list(embeddings),
                        pre_integrated_embedding_obsm_key=unintegrated, progress_bar=False, **kwargs)
    # the Benchmarker collects garbage before every metric: frozen, the objects already here are not rescanned
    gc.collect()
    gc.freeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bench.prepare(neighbor_computer=exact_neighbors)
            bench.benchmark()
    finally:
        gc.unfreeze()
    table = bench.get_results(min_max_scale=False)
    table = table.drop(index="Metric Type", errors="ignore")
    return {name: {_metric_name(col): float(table.loc[name, col]) for col in table.columns}
            for name in embeddings}
