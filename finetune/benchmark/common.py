"""What the benchmark's tasks share: reading a dataset's cells, its fine-tuning split (cut to the budget), label
subsets, the express arms (pretrained, the same architecture from random weights, the MLP encoder) trained with the
library's defaults, and scoring helpers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np

from .corpus import GENE_ID_KEY
from .suite import Bench

logger = logging.getLogger(__name__)

# arms that are express itself (the rest are baselines / other tools); the report's verdicts compare the two groups
EXPRESS_PREFIX = "express"


def read_dataset(bench: Bench, name: str, *, labelled: bool = False) -> ad.AnnData:
    """The dataset's cells (the corpus's copy: cut to the budget's cells in quick runs, with
    ``var['gene_symbol']``); with ``labelled``, only cells with a real label."""
    adata = ad.read_h5ad(bench.corpus.files[name])
    if labelled:
        adata = adata[bench.datasets[name].labelled(adata.obs)].copy()
    return adata


def stratified_subsample(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of about ``n`` cells drawn per class in proportion (at least one of every class), seeded, sorted;
    every cell when ``n`` is None or at least their number."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    return label_subset(labels, n / len(labels), seed)


def train_test(bench: Bench, name: str, seed: int, *, labelled: bool = True) -> tuple[ad.AnnData, ad.AnnData]:
    """The fine-tuning split: training cells and held-out test cells (whole donors / batches), each cut to the
    budget's ``train_cells`` / ``test_cells`` by a stratified subsample drawn with ``seed`` (every arm of a unit
    reads the same cells)."""
    data = bench.datasets[name]
    adata = read_dataset(bench, name, labelled=labelled and data.label_key is not None)
    test = data.test_mask(adata.obs)
    if not test.any() or test.all():
        raise ValueError(f"{name}: the split {data.test_key} leaves no training or no test cells")
    train, held_out = adata[~test], adata[test]
    strata = (lambda a: data.labels(a.obs)) if data.label_key else (lambda a: np.zeros(a.n_obs, dtype=int))
    train = train[stratified_subsample(strata(train), bench.budget.train_cells, seed)].copy()
    held_out = held_out[stratified_subsample(strata(held_out), bench.budget.test_cells, seed + 1000)].copy()
    return train, held_out


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of ``fraction`` of the cells, drawn per class (at least one cell of every class), seeded, sorted."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, max(1, int(round(fraction * len(members)))), replace=False))
    return np.sort(np.concatenate(keep))


def subsample(n: int, max_cells: int | None, seed: int) -> np.ndarray:
    """``max_cells`` of ``n`` rows at random (seeded, sorted), or all of them."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


def model_dir(bench: Bench, seed: int, variant: str = "default") -> Path:
    path = bench.model_dir(variant, seed)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no pretrained model at {path}: the pretraining unit {variant}/seed{seed} failed")
    return path


def express_arms(bench: Bench, seed: int, steps: int | None) -> dict[str, dict]:
    """Keyword arguments of the two transformer arms for ``finetune.api``: pretrained (the default recipe) and the
    same architecture, vocabulary and tokenization from random weights. Only the step budget (``steps``; None: the
    library's length) and the seed are set; the random-weight encoder trains at the heads' learning rate, which is
    what the library does for an encoder that was not pretrained (``model="none"``)."""
    from finetune.api import TrainSettings

    common = {"gene_id_key": GENE_ID_KEY, "seed": seed, **({} if steps is None else {"max_steps": steps}),
              **_length(bench, None)}
    return {"express_pretrained": {"model": str(model_dir(bench, seed)), **common},
            "express_random_init": {"model": str(model_dir(bench, seed, "random")),
                                    "encoder_lr": TrainSettings().lr, **common}}


def mlp_arm(bench: Bench, seed: int) -> dict:
    """The express MLP encoder (the scVI-like encoder under identical heads): the library's defaults, the budget's
    epochs."""
    return {"encoder": "mlp", "seed": seed, **_length(bench, bench.budget.mlp_epochs)}


def vae_budget(bench: Bench, seed: int) -> dict:
    return {"seed": seed, **_length(bench, bench.budget.vae_epochs)}


def _length(bench: Bench, epochs: int | None) -> dict:
    """The budget's training length for an express head: its epochs and step floor where the budget sets them."""
    floor = bench.budget.min_steps
    return {**({} if epochs is None else {"epochs": epochs}), **({} if floor is None else {"min_steps": floor})}


def n_top_genes(adata: ad.AnnData) -> int | None:
    """2,000 highly variable genes, the field's usual input (all genes when the file has fewer)."""
    return 2000 if adata.n_vars > 2000 else None


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def cell_type_scores(truth, predicted) -> dict[str, float]:
    from finetune import metrics as M

    return {"accuracy": M.accuracy(truth, predicted), "macro_f1": M.macro_f1(truth, predicted)}
