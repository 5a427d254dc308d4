"""What the benchmark's tasks share: reading a dataset's cells, its fine-tuning split, label subsets, and the express
arms (pretrained, the same architecture from random weights, the MLP encoder) trained with the library's defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np

from .corpus import GENE_ID_KEY
from .suite import Bench

logger = logging.getLogger(__name__)


def read_dataset(bench: Bench, name: str, *, labelled: bool = False) -> ad.AnnData:
    """The dataset's cells (the corpus's copy: cut to the budget's cells in quick runs); with ``labelled``, only
    cells with a real label."""
    adata = ad.read_h5ad(bench.corpus.files[name])
    if labelled:
        adata = adata[bench.datasets[name].labelled(adata.obs)].copy()
    return adata


def train_test(bench: Bench, name: str, *, labelled: bool = False) -> tuple[ad.AnnData, ad.AnnData]:
    """The fine-tuning split: training cells and the held-out test cells (whole donors / batches)."""
    adata = read_dataset(bench, name, labelled=labelled)
    test = bench.datasets[name].test_mask(adata.obs)
    if not test.any() or test.all():
        raise ValueError(f"{name}: the split {bench.datasets[name].test_key} leaves no training or no test cells")
    return adata[~test].copy(), adata[test].copy()


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of ``fraction`` of the cells, drawn per class (at least one cell of every class), seeded."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, max(1, int(round(fraction * len(members)))), replace=False))
    return np.sort(np.concatenate(keep))


def subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


def model_dir(bench: Bench, seed: int, variant: str = "default") -> Path:
    path = bench.model_dir(variant, seed)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no pretrained model at {path}: the pretraining unit {variant}/seed{seed} failed")
    return path


def express_arms(bench: Bench, seed: int) -> dict[str, dict]:
    """Keyword arguments of the transformer arms: pretrained (the library's defaults) and the same architecture,
    vocabulary and tokenization from random weights (its encoder at the heads' learning rate: a random encoder has
    nothing to keep)."""
    budget = bench.budget
    common = {"gene_id_key": GENE_ID_KEY, "epochs": budget.transformer_epochs, "min_steps": budget.min_steps,
              "seed": seed}
    return {"express_pretrained": {"model": str(model_dir(bench, seed)), **common},
            "express_random_init": {"model": str(model_dir(bench, seed, "random")), "encoder_lr": 1e-3, **common}}


def mlp_arm(bench: Bench, seed: int) -> dict:
    return {"encoder": "mlp", "epochs": bench.budget.mlp_epochs, "seed": seed}


def n_top_genes(adata: ad.AnnData) -> int | None:
    """2,000 highly variable genes, the field's usual input (all genes when the file has fewer)."""
    return 2000 if adata.n_vars > 2000 else None
