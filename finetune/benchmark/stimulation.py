"""Stimulation response of a cell type never seen stimulated (Kang et al. 2018, PBMCs with and without IFN-beta).

One fold per cell type T: T's stimulated cells are held out; the methods learn from every control cell and the
stimulated cells of the other types, and predict T's stimulated mean expression from T's control cells.

    python -m finetune.benchmark.stimulation --out stim_results --seeds 0 1 2 --jobs 2   # the reported run
    python -m finetune.benchmark.stimulation --out stim_quick --quick                       # about a minute
    python -m finetune.benchmark.stimulation --out stim_pre --pretrained runs/mine/final --gene_id_key gene_symbol

**Labels of the stimulated cells.** The file labels 954 control cells only (8 types; its other 46 control cells and
all 1,000 stimulated cells are 'unlabelled'). :func:`assign_cell_types` labels the stimulated cells with an
L1-regularised logistic regression (:func:`finetune.baselines.l1_logistic_regression`) trained on the labelled control
cells' log-normalised highly variable genes, leaving out the ``exclude_shifted`` (200; at most a tenth of the genes)
genes whose pooled mean differs most between all stimulated and all control cells (the shared interferon response:
with them, stimulated CD14+ monocytes drift to FCGR3A+: 184 and 81 stimulated cells against 206 and 56 control cells,
214 and 46 without them). It reports the cross-validated accuracy and macro-F1 on the control cells and the type
proportions it predicts among stimulated cells beside the control proportions (both aliquots come from the same
donors, so they should agree). The 46 unlabelled control cells are left out. The labels are fixed for the whole run
(the seeds change the trained models only).

**Methods** (every prediction is a mean log-normalised profile, ``log1p(counts / library * 10,000)`` with the
library over all genes, over the fold's genes: the 2,000 highly variable genes of its training cells):

- ``no_change``: T's control mean;
- ``additive_shift``: T's control mean plus the mean stimulated-minus-control difference of the other types,
  balanced by type (each type with at least ``min_shift_cells`` cells in both conditions weighs the same; scGen
  balances its latent shift the same way);
- ``express_vae_mlp``: latent arithmetic (scGen's idea) with express's VAE head (``finetune.api``, MLP encoder,
  library defaults, a normal prior, no batch covariate) trained on the training cells; the type-balanced mean
  latent difference stimulated - control of the other types is added to the posterior means of T's control cells,
  and the shifted latents are decoded by the negative-binomial decoder at each cell's own library size, in one of
  two ways: ``sample`` draws counts from the decoder (mean ``library * softmax(f(z))``, its dispersion) and
  log-normalises them like the data (what the truth is a mean of); ``mean`` log-normalises the decoder's mean itself
  (no sampling noise, but the log of a mean is not the mean of the logs: low counts come out too high). Which one a
  fold uses is chosen by validation on its training types (:func:`latent_arithmetic`); both are recorded;
- ``express_vae_transformer``: the same arithmetic on the VAE head with the transformer encoder, which reads each
  cell's rank tokens (a small transformer from random weights with a vocabulary fitted on the training cells, or
  the ``--pretrained`` model's encoder). The decoder and the arithmetic are identical, so the two express arms
  differ only in the encoder that maps a cell to its latent.

The VAE settings are the library's (``n_latent`` 16, KL warm-up over 30% of the steps); the training state kept is
the one with the lowest loss on a random 10% of the training cells (``finetune.api.TrainSettings``), and the
decoding is chosen on the training types. No setting was chosen by looking at stimulated cells of a held-out type.

**Metrics** per held-out type (:func:`response_metrics`): ``r2_all`` and ``r2_top100``, the coefficient of
determination ``1 - SS_res / SS_tot`` of the predicted mean expression against T's true stimulated mean over the
fold's genes and over T's 100 response genes (the genes with the largest ``|true stim mean - control mean|`` of T:
defined from the held-out cells, which is fine for evaluation only); ``r2_pearson_all`` and ``r2_pearson_top100``,
the squared Pearson correlation that scGen reports as R^2; ``pearson_delta`` (and ``pearson_delta_top100``), the
Pearson correlation of the predicted change ``pred - control mean`` with the true change ``stim mean - control
mean`` (undefined, NaN, for ``no_change``). Held-out types need ``min_stim_cells`` (20) assigned stimulated cells.

Outputs in ``--out``: ``results.json`` (every fold's metrics, the mean and sd over seeds, the labelling report, the
settings), ``table.md`` (what is printed), ``stimulation.png`` and ``manifest.json``. Every finished fold is kept in
``.DIR.partial`` beside it until the run completes, so an interrupted run, started again with the same arguments,
reuses them. The benchmark suite runs the same folds as its ``stimulation`` task on the ``kang_stim`` dataset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .suite import Bench, note, register

logger = logging.getLogger(__name__)

DATA_FILE = "kang2018_ctrlstim_2000.h5ad"
TYPE_KEY = "stim_cell_type"  # obs column the prepared data carries: the label of a control cell, the assigned type
# of a stimulated cell
TARGET_SUM = 1e4
ARMS = ("no_change", "additive_shift", "express_vae_mlp", "express_vae_transformer")
DECODES = ("sample", "mean")
METRICS = ("r2_all", "r2_top100", "pearson_delta", "r2_pearson_all", "r2_pearson_top100", "pearson_delta_top100")


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (pure functions)
# ---------------------------------------------------------------------------------------------------------------------
def r2_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Coefficient of determination ``1 - sum((truth - predicted)^2) / sum((truth - mean(truth))^2)``; NaN when
    ``truth`` is constant."""
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    total = float(((truth - truth.mean()) ** 2).sum())
    if total == 0.0:
        return float("nan")
    return 1.0 - float(((truth - predicted) ** 2).sum()) / total


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either vector is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / norm if norm > 0 else float("nan")


def response_genes(control_mean: np.ndarray, stim_mean: np.ndarray, n: int = 100) -> np.ndarray:
    """Indices of the ``n`` genes with the largest ``|stim_mean - control_mean|`` (ties: the lower index first)."""
    change = np.abs(np.asarray(stim_mean, dtype=np.float64) - np.asarray(control_mean, dtype=np.float64))
    return np.argsort(-change, kind="stable")[: min(n, len(change))]


def response_metrics(predicted: np.ndarray, control_mean: np.ndarray, stim_mean: np.ndarray,
                     top: np.ndarray) -> dict[str, float]:
    """The metrics of one prediction of the stimulated mean (see the module docstring); ``top``: the indices of the
    response genes."""
    predicted = np.asarray(predicted, dtype=np.float64)
    control_mean, stim_mean = np.asarray(control_mean, dtype=np.float64), np.asarray(stim_mean, dtype=np.float64)
    change, true_change = predicted - control_mean, stim_mean - control_mean
    return {
        "r2_all": r2_score(predicted, stim_mean),
        "r2_top100": r2_score(predicted[top], stim_mean[top]),
        "pearson_delta": pearson(change, true_change),
        "r2_pearson_all": pearson(predicted, stim_mean) ** 2,
        "r2_pearson_top100": pearson(predicted[top], stim_mean[top]) ** 2,
        "pearson_delta_top100": pearson(change[top], true_change[top]),
    }


def balanced_shift(values: np.ndarray, types: np.ndarray, stimulated: np.ndarray, *, min_cells: int = 10
                   ) -> tuple[np.ndarray, list[str]]:
    """The type-balanced mean difference stimulated - control of ``values`` (cells x features): the mean over types
    of ``mean(values[stimulated cells of t]) - mean(values[control cells of t])``, over the types with at least
    ``min_cells`` cells in both conditions (returned as the second value)."""
    values, types, stimulated = np.asarray(values, dtype=np.float64), np.asarray(types), np.asarray(stimulated, bool)
    shifts, used = [], []
    for t in sorted(set(types.tolist())):
        stim, ctrl = (types == t) & stimulated, (types == t) & ~stimulated
        if stim.sum() >= min_cells and ctrl.sum() >= min_cells:
            shifts.append(values[stim].mean(0) - values[ctrl].mean(0))
            used.append(str(t))
    if not shifts:
        raise ValueError(f"no type has {min_cells} cells in both conditions to learn the stimulation shift from")
    return np.mean(shifts, axis=0), used


def mean_log_normalized(counts: np.ndarray, library: np.ndarray, target_sum: float = TARGET_SUM) -> np.ndarray:
    """Mean over cells (rows) of ``log1p(counts / library * target_sum)``; ``counts`` may carry a leading samples
    dimension (averaged too)."""
    counts = np.asarray(counts, dtype=np.float64)
    scaled = counts / np.asarray(library, dtype=np.float64)[:, None] * target_sum
    return np.log1p(scaled).reshape(-1, counts.shape[-1]).mean(0)


# ---------------------------------------------------------------------------------------------------------------------
# Data: labels for the stimulated cells, folds
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Assignment:
    """Cell types of the stimulated cells predicted by a classifier of the control cells, and how good it is."""

    labels: np.ndarray  # (n_obs,) str: the control label, the predicted type of a stimulated cell, "" otherwise
    report: dict


def assign_cell_types(adata: ad.AnnData, *, label_key: str = "cell_type", condition_key: str = "condition",
                      control: str = "ctrl", stimulated: str = "stim", n_top_genes: int = 2000,
                      exclude_shifted: int = 200, folds: int = 5, seed: int = 0,
                      not_labels: Sequence[str] = ("unlabelled",)) -> Assignment:
    """Label the stimulated cells with L1 logistic regression trained on the labelled control cells (see the module
    docstring); the report holds the cross-validated accuracy and macro-F1 on the control cells, the type
    proportions among control cells and predicted among stimulated cells, and their total variation distance."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    from finetune import baselines as B
    from finetune import metrics as M
    from finetune.data import align_genes, counts_matrix, log_normalize, select_genes

    condition = adata.obs[condition_key].astype(str).to_numpy()
    labels = adata.obs[label_key].astype(str).to_numpy()
    is_stim = condition == stimulated
    labelled = (condition == control) & ~np.isin(labels, list(not_labels))
    if not is_stim.any() or not labelled.any():
        raise ValueError(f"need labelled {control!r} cells and {stimulated!r} cells in obs[{condition_key!r}]")
    logged = log_normalize(counts_matrix(adata))
    shift = np.abs(np.asarray(logged[is_stim].mean(0)).ravel() - np.asarray(logged[labelled].mean(0)).ravel())
    exclude_shifted = min(exclude_shifted, adata.n_vars // 10)  # a small file keeps most of its genes
    shifted = set(adata.var_names[np.argsort(-shift, kind="stable")[:exclude_shifted]]) if exclude_shifted else set()
    genes = [g for g in select_genes(adata[labelled], n_top_genes) if g not in shifted]
    x = align_genes(logged, adata.var_names.to_numpy().astype(str), genes)
    x_ctrl, y = x[labelled], labels[labelled]
    predicted_cv = np.empty(len(y), dtype=object)
    with warnings.catch_warnings():  # the baseline's saga stops at its max_iter, as it does in every benchmark task
        warnings.simplefilter("ignore", ConvergenceWarning)
        for fit_rows, test_rows in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x_ctrl, y):
            predicted_cv[test_rows] = B.l1_logistic_regression(x_ctrl[fit_rows], y[fit_rows], x_ctrl[test_rows],
                                                               seed=seed)
        predicted = B.l1_logistic_regression(x_ctrl, y, x[is_stim], seed=seed)
    out = np.full(adata.n_obs, "", dtype=object)
    out[labelled], out[is_stim] = y, predicted
    ctrl_share = pd.Series(y).value_counts(normalize=True)
    stim_share = pd.Series(predicted).value_counts(normalize=True)
    types = sorted(set(ctrl_share.index) | set(stim_share.index))
    report = {
        "classifier": "L1 logistic regression (finetune.baselines.l1_logistic_regression) on log-normalised "
                      f"HVGs of the labelled control cells without the {exclude_shifted} most condition-shifted genes",
        "n_genes": len(genes), "exclude_shifted": exclude_shifted, "cv_folds": folds,
        "cv_accuracy": M.accuracy(y, predicted_cv.astype(str)), "cv_macro_f1": M.macro_f1(y, predicted_cv.astype(str)),
        "n_control_labelled": int(labelled.sum()), "n_stimulated": int(is_stim.sum()),
        "proportions": {t: {"control": float(ctrl_share.get(t, 0.0)), "stimulated": float(stim_share.get(t, 0.0)),
                            "n_control": int((y == t).sum()), "n_stimulated": int((predicted == t).sum())}
                        for t in types},
        "total_variation": 0.5 * float(sum(abs(ctrl_share.get(t, 0.0) - stim_share.get(t, 0.0)) for t in types)),
    }
    logger.info("stimulated cells labelled: CV accuracy %.3f, macro-F1 %.3f on control cells; proportions' total "
                "variation %.3f", report["cv_accuracy"], report["cv_macro_f1"], report["total_variation"])
    return Assignment(out.astype(str), report)


def prepare(adata: ad.AnnData, assignment: Assignment, *, condition_key: str = "condition",
            stimulated: str = "stim") -> ad.AnnData:
    """The cells with a type (labelled controls, every stimulated cell), with ``obs[TYPE_KEY]`` and
    ``obs['stimulated']`` (bool)."""
    keep = assignment.labels != ""
    cells = adata[keep].copy()
    cells.obs[TYPE_KEY] = assignment.labels[keep]
    cells.obs["stimulated"] = cells.obs[condition_key].astype(str).to_numpy() == stimulated
    return cells


def eligible_types(cells: ad.AnnData, min_stim_cells: int) -> list[str]:
    """Types with at least ``min_stim_cells`` stimulated cells (and a control cell), largest first (then by name)."""
    stim = cells.obs.loc[cells.obs["stimulated"], TYPE_KEY].value_counts()
    ctrl = set(cells.obs.loc[~cells.obs["stimulated"], TYPE_KEY])
    return sorted((t for t, n in stim.items() if n >= min_stim_cells and t in ctrl), key=lambda t: (-stim[t], t))


@dataclass
class Fold:
    """One held-out type: the training cells, its control and stimulated cells, the genes scored, the truth."""

    held_out: str
    train: ad.AnnData
    control: ad.AnnData
    stimulated: ad.AnnData
    genes: list[str]
    control_mean: np.ndarray
    stim_mean: np.ndarray
    top: np.ndarray

    def gene_ids(self, gene_id_key: str | None = None) -> list[str]:
        """:attr:`genes` (var_names) as the ids of ``var[gene_id_key]`` (a pretrained model's vocabulary)."""
        if gene_id_key is None:
            return list(self.genes)
        from tokenizer import InputError

        ids = self.train.var[gene_id_key].astype(str).reindex(self.genes).fillna("").tolist()
        if "" in ids or len(set(ids)) < len(ids):
            raise InputError(f"var[{gene_id_key!r}] does not give every one of the fold's genes its own id: pass "
                             "the gene_id_key the pretrained vocabulary uses and that maps each gene")
        return ids

    def log_normalized(self, cells: ad.AnnData) -> np.ndarray:
        """``log1p(counts / library * 1e4)`` over :attr:`genes` (library: all the cell's genes), dense."""
        from finetune.data import align_genes, counts_matrix, log_normalize

        x = align_genes(log_normalize(counts_matrix(cells)), cells.var_names.to_numpy().astype(str), self.genes)
        return x.toarray()


def make_fold(cells: ad.AnnData, held_out: str, *, n_top_genes: int = 2000, n_response_genes: int = 100) -> Fold:
    """Hold out ``held_out``'s stimulated cells; the genes are the training cells' HVGs."""
    from finetune.data import select_genes

    types, stim = cells.obs[TYPE_KEY].to_numpy(), cells.obs["stimulated"].to_numpy()
    target = types == held_out
    train = cells[~(target & stim)].copy()
    control, stimulated = cells[target & ~stim].copy(), cells[target & stim].copy()
    if not control.n_obs or not stimulated.n_obs:
        raise ValueError(f"{held_out!r} needs control and stimulated cells to be held out")
    genes = select_genes(train, n_top_genes)
    fold = Fold(held_out, train, control, stimulated, genes, np.zeros(0), np.zeros(0), np.zeros(0, dtype=int))
    fold.control_mean = fold.log_normalized(control).mean(0)
    fold.stim_mean = fold.log_normalized(stimulated).mean(0)
    fold.top = response_genes(fold.control_mean, fold.stim_mean, n_response_genes)
    return fold


# ---------------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------------
def predict_no_change(fold: Fold) -> np.ndarray:
    return fold.control_mean.copy()


def predict_additive_shift(fold: Fold, *, min_cells: int = 10) -> np.ndarray:
    """The held-out type's control mean plus the type-balanced log-expression shift of the other types."""
    shift, _ = balanced_shift(fold.log_normalized(fold.train), fold.train.obs[TYPE_KEY].to_numpy(),
                              fold.train.obs["stimulated"].to_numpy(), min_cells=min_cells)
    return fold.control_mean + shift


def decode_log_normalized(vae, z: np.ndarray, panel_library: np.ndarray, library: np.ndarray, *,
                          mode: str = "sample", n_samples: int = 10, seed: int = 0) -> np.ndarray:
    """Mean log-normalised expression over the decoder's genes of cells with latents ``z`` (cells x n_latent).

    The decoder gives each cell's negative-binomial mean ``panel_library * softmax(f(z))`` and dispersion; a cell's
    counts are normalised by its whole ``library`` (all genes; the decoder genes keep their share of it).
    ``mode="sample"``: ``n_samples`` count draws per cell (Gamma-Poisson, seeded), log-normalised and averaged;
    ``"mean"``: the decoder's mean itself, log-normalised."""
    import torch

    if mode not in ("sample", "mean"):
        raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
    decoder = vae.vae.decoder
    vae.eval()
    with torch.no_grad():
        params = decoder(torch.as_tensor(z, dtype=torch.float32), None,
                         torch.as_tensor(panel_library, dtype=torch.float32))
    mu, theta = params["mu"].double().numpy(), params["theta"].double().numpy()
    if mode == "mean":
        return mean_log_normalized(mu, library)
    rng = np.random.default_rng(seed)
    theta = np.broadcast_to(theta, mu.shape)
    rates = rng.gamma(shape=theta, scale=mu / theta, size=(n_samples, *mu.shape))  # (S, cells, genes)
    return mean_log_normalized(rng.poisson(rates), library)


@dataclass
class VAEArm:
    """How one express VAE arm is trained: ``encoder`` "mlp" or "transformer"; ``model`` a pretrained folder or
    "none"; ``transformer`` / ``tokenization``: the scratch transformer's shape and rank encoding."""

    encoder: str = "mlp"
    epochs: int = 40
    model: str = "none"
    transformer: dict | None = None
    tokenization: dict | None = None
    gene_id_key: str | None = None


def train_fold_vae(fold: Fold, arm: VAEArm, *, seed: int):
    """express's VAE head on the fold's training cells, decoding the fold's genes (normal prior, no batches)."""
    from accelerate.utils import set_seed

    from finetune import api

    set_seed(seed)
    # the length is the arm's epochs exactly and the kept state the best on a random 10% of the training cells (what
    # the reported table measured), whatever TrainSettings' step floor and group validation default to
    settings = api.TrainSettings(epochs=arm.epochs, min_steps=0, validation_key=None, seed=seed)
    kwargs: dict[str, Any] = {"model": arm.model, "encoder": arm.encoder, "n_top_genes": None,
                              "gene_id_key": arm.gene_id_key, "head": {"gene_panel": fold.gene_ids(arm.gene_id_key)},
                              "prior": "normal"}
    if arm.encoder == "transformer" and arm.model == "none":
        kwargs.update(transformer=arm.transformer, tokenization=arm.tokenization)
    elif arm.tokenization:
        kwargs["tokenization"] = arm.tokenization
    return api.train_model("vae", fold.train, settings, progress=False, **kwargs)


def _decoder_libraries(cells: ad.AnnData, genes: Sequence[str], gene_id_key: str | None) -> tuple[np.ndarray, ...]:
    """Each cell's counts over the decoder genes (at least 1) and over all its genes."""
    from finetune.data import align_genes, counts_matrix, gene_names

    counts = counts_matrix(cells)
    panel = np.asarray(align_genes(counts, gene_names(cells, gene_id_key), list(genes)).sum(1)).ravel()
    return np.maximum(panel, 1.0), np.asarray(counts.sum(1)).ravel()


def latent_arithmetic(fold: Fold, vae, *, min_cells: int = 10, gene_id_key: str | None = None,
                      decodes: Sequence[str] = DECODES, n_samples: int = 10,
                      seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """scGen's prediction with a trained express VAE: the posterior means of the held-out type's control cells plus
    the type-balanced latent shift of the training types, decoded (:func:`decode_log_normalized`) in each of
    ``decodes``.

    Returns the predictions per decoding and the validation that chooses between them on the training types only:
    each training type V that enters the shift is predicted in turn from its control cells with the shift of the
    other training types, and scored (``r2_top100`` against V's own stimulated cells, which the VAE trained on: the
    scores are optimistic, but alike for every decoding). ``"chosen"`` is the decoding with the best mean score."""
    from finetune import api

    if list(vae.config.gene_panel) != fold.gene_ids(gene_id_key):
        raise ValueError("the VAE's decoder genes are not the fold's genes")
    z_train = api.outputs(fold.train, vae, gene_id_key=gene_id_key, seed=seed)["embedding"]
    types, stim = fold.train.obs[TYPE_KEY].to_numpy(), fold.train.obs["stimulated"].to_numpy()
    shift, used = balanced_shift(z_train, types, stim, min_cells=min_cells)

    def decode(cells: ad.AnnData, z: np.ndarray) -> dict[str, np.ndarray]:
        panel, library = _decoder_libraries(cells, fold.gene_ids(gene_id_key), gene_id_key)
        return {mode: decode_log_normalized(vae, z, panel, library, mode=mode, n_samples=n_samples, seed=seed)
                for mode in decodes}

    z = api.outputs(fold.control, vae, gene_id_key=gene_id_key, seed=seed)["embedding"] + shift
    predictions = decode(fold.control, z)
    scores: dict[str, list[float]] = {mode: [] for mode in decodes}
    if len(used) > 1:
        logged = fold.log_normalized(fold.train)
        for held in used:
            others = np.isin(types, [t for t in used if t != held])
            inner, _ = balanced_shift(z_train[others], types[others], stim[others], min_cells=min_cells)
            control, stimulated = (types == held) & ~stim, (types == held) & stim
            control_mean, stim_mean = logged[control].mean(0), logged[stimulated].mean(0)
            top = response_genes(control_mean, stim_mean, len(fold.top))
            for mode, predicted in decode(fold.train[control], z_train[control] + inner).items():
                scores[mode].append(response_metrics(predicted, control_mean, stim_mean, top)["r2_top100"])
    mean_scores = {mode: float(np.mean(v)) if v else float("nan") for mode, v in scores.items()}
    chosen = max(decodes, key=lambda m: (-np.inf if np.isnan(mean_scores[m]) else mean_scores[m],
                                         -list(decodes).index(m)))
    return predictions, {"chosen": chosen, "validation_r2_top100": mean_scores, "shift_types": used}


# ---------------------------------------------------------------------------------------------------------------------
# One fold, one seed
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StimulationSettings:
    """What a run does.

    Args:
        mlp_epochs, transformer_epochs: training epochs of the VAE with the MLP / the transformer encoder.
        transformer, tokenization: shape and rank encoding of the transformer trained from random weights.
        n_top_genes: genes per fold (HVGs of its training cells). n_response_genes: the top response genes scored.
        min_stim_cells: stimulated cells a type needs to be held out; min_shift_cells: cells per condition a
            training type needs to enter a shift. types: held-out types (default: every eligible one);
            max_types: at most this many, the largest first.
        decode_samples: count draws per cell of the sampled decoding.
        exclude_shifted, classifier_folds: the labelling classifier (:func:`assign_cell_types`).
        arms: the methods run.
    """

    mlp_epochs: int = 40
    transformer_epochs: int = 8
    transformer: dict = field(default_factory=lambda: {"hidden_size": 64, "num_hidden_layers": 2,
                                                           "num_attention_heads": 4, "intermediate_size": 128})
    tokenization: dict = field(default_factory=lambda: {"top_k": 128, "n_zeros": 16})
    n_top_genes: int = 2000
    n_response_genes: int = 100
    min_stim_cells: int = 20
    min_shift_cells: int = 10
    types: tuple[str, ...] | None = None
    max_types: int | None = None
    decode_samples: int = 10
    exclude_shifted: int = 200
    classifier_folds: int = 5
    arms: tuple[str, ...] = ARMS


QUICK = StimulationSettings(mlp_epochs=3, transformer_epochs=1,
                            transformer={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 64},
                            tokenization={"top_k": 32, "n_zeros": 4}, n_top_genes=500, max_types=1, decode_samples=3,
                            classifier_folds=3, min_stim_cells=10, min_shift_cells=5)


def run_fold(cells: ad.AnnData, held_out: str, seed: int, settings: StimulationSettings, *,
             pretrained: str | None = None, gene_id_key: str | None = None) -> dict[str, dict[str, float]]:
    """Every arm's metrics (and seconds) on one held-out type with one seed."""
    started = time.perf_counter()
    fold = make_fold(cells, held_out, n_top_genes=settings.n_top_genes, n_response_genes=settings.n_response_genes)
    setup = time.perf_counter() - started
    predictions: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    def timed(arm: str, fn):
        start = time.perf_counter()
        out = fn()
        seconds[arm] = time.perf_counter() - start + setup
        return out

    if "no_change" in settings.arms:
        predictions["no_change"] = timed("no_change", lambda: predict_no_change(fold))
    if "additive_shift" in settings.arms:
        predictions["additive_shift"] = timed("additive_shift", lambda: predict_additive_shift(
            fold, min_cells=settings.min_shift_cells))
    vae_arms = []
    if "express_vae_mlp" in settings.arms:
        vae_arms.append(("express_vae_mlp", VAEArm("mlp", settings.mlp_epochs)))
    if "express_vae_transformer" in settings.arms:
        vae_arms.append(("express_vae_transformer", VAEArm(
            "transformer", settings.transformer_epochs, model=pretrained or "none", transformer=settings.transformer,
            tokenization=None if pretrained else settings.tokenization, gene_id_key=gene_id_key)))
    decoding: dict[str, dict] = {}
    for name, arm in vae_arms:
        def run(arm=arm):
            vae = train_fold_vae(fold, arm, seed=seed)
            return latent_arithmetic(fold, vae, min_cells=settings.min_shift_cells, gene_id_key=arm.gene_id_key,
                                     n_samples=settings.decode_samples, seed=seed)
        decoded, decoding[name] = timed(name, run)
        predictions[name] = decoded[decoding[name]["chosen"]]
        decoding[name]["test"] = {mode: response_metrics(p, fold.control_mean, fold.stim_mean, fold.top)
                                  for mode, p in decoded.items()}  # each decoding's scores, for the record
    results = {}
    for arm, predicted in predictions.items():
        results[arm] = {**response_metrics(predicted, fold.control_mean, fold.stim_mean, fold.top),
                        "seconds": seconds[arm]}
    results["_fold"] = {"n_train": int(fold.train.n_obs), "n_control": int(fold.control.n_obs),
                        "n_stimulated": int(fold.stimulated.n_obs), "n_genes": len(fold.genes),
                        "top_response_genes": [fold.genes[i] for i in fold.top[:10]], "decoding": decoding}
    logger.info("%s seed %d: %s", held_out, seed, {a: round(m["r2_top100"], 3) for a, m in results.items()
                                                   if a != "_fold"})
    return results


def _run_fold_from_file(path: str, held_out: str, seed: int, settings: StimulationSettings,
                        pretrained: str | None, gene_id_key: str | None) -> tuple[str, int, dict]:
    """A worker process's fold: one torch thread, the prepared cells read from ``path``."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    return held_out, seed, run_fold(ad.read_h5ad(path), held_out, seed, settings, pretrained=pretrained,
                                    gene_id_key=gene_id_key)


def summarize(folds: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{type: {arm: {metric: {"mean", "sd", "n"}}}}`` over seeds (sd with ddof=1; 0 for one seed), plus the
    ``"mean over types"`` row (the mean over types of each seed's value, then mean and sd over seeds)."""
    out: dict = {}
    per_seed: dict = {}
    for held_out, by_seed in folds.items():
        out[held_out] = {}
        for seed, arms in by_seed.items():
            for arm, metrics in arms.items():
                if arm.startswith("_"):
                    continue
                for metric, value in metrics.items():
                    out[held_out].setdefault(arm, {}).setdefault(metric, []).append(value)
                    per_seed.setdefault((arm, metric, seed), []).append(value)
    overall: dict = {}
    for (arm, metric, _seed), values in sorted(per_seed.items(), key=lambda kv: kv[0][2]):
        overall.setdefault(arm, {}).setdefault(metric, []).append(float(np.mean(values)))
    out["mean over types"] = overall

    def stats(values: list[float]) -> dict[str, float]:
        v = np.asarray(values, dtype=np.float64)
        if np.isnan(v).all():
            return {"mean": float("nan"), "sd": float("nan"), "n": len(v)}
        return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}

    return {row: {arm: {m: stats(v) for m, v in metrics.items()} for arm, metrics in arms.items()}
            for row, arms in out.items()}


def format_tables(summary: dict, *, metrics: Sequence[str] = ("r2_all", "r2_top100", "pearson_delta"),
                  arms: Sequence[str] = ARMS) -> str:
    """Markdown tables, one per metric: held-out types x arms, ``mean ± sd`` over seeds."""
    lines = []
    shown = [a for a in arms if any(a in row for row in summary.values())]
    for metric in metrics:
        lines += [f"**{metric}** (mean ± sd over seeds)", "", "| held-out type | " + " | ".join(shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for row, by_arm in summary.items():
            cells = []
            for arm in shown:
                s = by_arm.get(arm, {}).get(metric)
                cells.append("—" if s is None or math.isnan(s["mean"]) else f"{s['mean']:.3f} ± {s['sd']:.3f}")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_summary(summary: dict, path: str | Path, *, metrics: Sequence[str] = ("r2_all", "r2_top100",
                                                                                "pearson_delta")) -> Path:
    """Bars per held-out type and arm (mean ± sd over seeds), one panel per metric."""
    from finetune.plots import _pyplot, _save

    plt = _pyplot()
    rows = list(summary)
    arms = [a for a in ARMS if any(a in summary[r] for r in rows)]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7.0, 1.3 * len(rows) + 2), 2.8 * len(metrics)))
    axes = np.atleast_1d(axes)
    width = 0.8 / max(len(arms), 1)
    for ax, metric in zip(axes, metrics):
        for k, arm in enumerate(arms):
            means = [summary[r].get(arm, {}).get(metric, {}).get("mean", np.nan) for r in rows]
            sds = [summary[r].get(arm, {}).get(metric, {}).get("sd", np.nan) for r in rows]
            ax.bar(np.arange(len(rows)) + (k - (len(arms) - 1) / 2) * width, means, width, yerr=sds, label=arm,
                   capsize=2)
        ax.set_ylabel(metric)
        ax.set_xticks(np.arange(len(rows)), rows, fontsize=8, rotation=20)
        ax.axhline(0.0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=8, ncol=len(arms), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle("stimulation response of a held-out cell type (Kang 2018 IFN-beta), mean ± sd over seeds",
                 fontsize=10)
    return _save(fig, path)


def _fold_file(cache: Path, held_out: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in held_out)
    return cache / f"{safe}__seed{seed}.json"


def _cached_fold(cache: Path | None, key: dict, held_out: str, seed: int) -> dict | None:
    """A fold result written by an earlier, interrupted run with the same settings, or None."""
    if cache is None or not _fold_file(cache, held_out, seed).is_file():
        return None
    record = json.loads(_fold_file(cache, held_out, seed).read_text())
    return record["result"] if record.get("key") == key else None


def _write_fold(cache: Path | None, key: dict, held_out: str, seed: int, result: dict) -> None:
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = _fold_file(cache, held_out, seed)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, default=_jsonable))
        tmp.replace(path)


def run(data: str | Path, *, seeds: Sequence[int] = (0,), settings: StimulationSettings = StimulationSettings(),
        jobs: int = 1, pretrained: str | None = None, gene_id_key: str | None = None,
        cache: str | Path | None = None) -> dict:
    """Label the stimulated cells, run every (held-out type, seed) fold (``jobs`` worker processes), summarise.

    ``cache``: a folder where every fold's result is written as soon as it is done; a rerun with the same data,
    settings and model reuses them (so an interrupted run resumes)."""
    started = time.perf_counter()
    adata = ad.read_h5ad(data)
    assignment = assign_cell_types(adata, exclude_shifted=settings.exclude_shifted, folds=settings.classifier_folds,
                                   n_top_genes=settings.n_top_genes)
    cells = prepare(adata, assignment)
    types = list(settings.types) if settings.types else eligible_types(cells, settings.min_stim_cells)
    if settings.max_types is not None:
        types = types[: settings.max_types]
    if not types:
        raise ValueError(f"no cell type has {settings.min_stim_cells} assigned stimulated cells")
    cache = Path(cache) if cache is not None else None
    key = json.loads(json.dumps({"data": str(data), "settings": dataclasses.asdict(settings),
                                 "pretrained": pretrained, "gene_id_key": gene_id_key}))
    folds: dict[str, dict[int, dict]] = {t: {} for t in types}
    todo = []
    for seed in seeds:
        for held_out in types:
            cached = _cached_fold(cache, key, held_out, seed)
            if cached is None:
                todo.append((held_out, seed))
            else:
                folds[held_out][seed] = cached
    if len(todo) < len(seeds) * len(types):
        logger.info("%d folds reused from %s", len(seeds) * len(types) - len(todo), cache)
    labelling_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="express_stim_") as tmp:
        if jobs <= 1 or len(todo) <= 1:
            for held_out, seed in todo:
                folds[held_out][seed] = run_fold(cells, held_out, seed, settings, pretrained=pretrained,
                                                 gene_id_key=gene_id_key)
                _write_fold(cache, key, held_out, seed, folds[held_out][seed])
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            path = str(Path(tmp) / "cells.h5ad")
            cells.write_h5ad(path)
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_run_fold_from_file, path, t, s, settings, pretrained, gene_id_key)
                           for t, s in todo]
                for future in as_completed(futures):
                    held_out, seed, result = future.result()
                    folds[held_out][seed] = result
                    _write_fold(cache, key, held_out, seed, result)
    folds = {t: dict(sorted(by_seed.items())) for t, by_seed in folds.items()}
    return {"labelling": assignment.report, "types": types, "seeds": list(seeds),
            "folds": {t: {str(s): r for s, r in by_seed.items()} for t, by_seed in folds.items()},
            "summary": summarize(folds), "settings": dataclasses.asdict(settings), "pretrained": pretrained,
            "seconds": {"labelling": labelling_seconds, "total": time.perf_counter() - started,
                        "folds_reused": len(seeds) * len(types) - len(todo)}}


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark suite's task
# ---------------------------------------------------------------------------------------------------------------------
def _suite_settings(bench: Bench) -> StimulationSettings:
    return QUICK if bench.budget.name == "quick" else StimulationSettings(max_types=bench.budget.stimulation_types)


@register("stimulation", lambda bench: [n for n in ("kang_stim",) if n in bench.datasets], primary="r2_top100",
          needs_models=False,
          description="IFN-beta response of a cell type whose stimulated cells were never seen (Kang 2018): R^2 of "
                      "the predicted stimulated mean over all fold genes and the top-100 response genes, Pearson of "
                      "the predicted change; express's VAE latent arithmetic (MLP and transformer encoders) against "
                      "no change and the additive shift")
def stimulation_task(bench: Bench, name: str, seed: int) -> dict:
    """One seed of every held-out type: ``{"held out: TYPE": {arm: metrics}, "mean over types": ...,
    "labelling": {"l1_logistic_regression": {...}}}``."""
    from .common import read_dataset

    settings = _suite_settings(bench)
    adata = read_dataset(bench, name)
    assignment = assign_cell_types(adata, exclude_shifted=settings.exclude_shifted, folds=settings.classifier_folds,
                                   n_top_genes=settings.n_top_genes)
    cells = prepare(adata, assignment)
    types = eligible_types(cells, settings.min_stim_cells)[: settings.max_types]
    if not types:
        raise ValueError(f"{name}: no cell type has {settings.min_stim_cells} assigned stimulated cells")
    out: dict[str, dict] = {}
    folds = {}
    for held_out in types:
        folds[held_out] = {seed: run_fold(cells, held_out, seed, settings)}
        out[f"held out: {held_out}"] = {a: m for a, m in folds[held_out][seed].items() if not a.startswith("_")}
    out["mean over types"] = {arm: {m: s["mean"] for m, s in metrics.items()}
                              for arm, metrics in summarize(folds)["mean over types"].items()}
    report = assignment.report
    out["labelling"] = {"l1_logistic_regression": {"cv_accuracy": report["cv_accuracy"],
                                                   "cv_macro_f1": report["cv_macro_f1"],
                                                   "total_variation": report["total_variation"]}}
    note(f"stimulation/{name}: held-out types {types}; stimulated cells labelled by L1 logistic regression on control "
         f"cells (CV macro-F1 {report['cv_macro_f1']:.3f})")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StimulationArgs:
    """python -m finetune.benchmark.stimulation --out DIR [--seeds 0 1 2] [--quick]: predict the IFN-beta response
of each held-out cell type (Kang 2018) with express's VAE latent arithmetic and the baselines.

examples:
  python -m finetune.benchmark.stimulation --out stim_results --seeds 0 1 2 --jobs 2
  python -m finetune.benchmark.stimulation --out stim_quick --quick
"""

    out: str | None = field(default=None, metadata={"help": "output folder (created); required"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds"})
    quick: bool = field(default=False, metadata={"help": "a one-minute run: tiny models, one held-out type"})
    data: str | None = field(default=None, metadata={
        "help": f"the Kang ctrl/stim h5ad (default: {DATA_FILE} in the shared data folder)"})
    types: list[str] | None = field(default=None, metadata={"help": "held-out types (default: every eligible one)"})
    mlp_epochs: int | None = field(default=None, metadata={"help": "override the MLP-encoder VAE's epochs"})
    transformer_epochs: int | None = field(default=None, metadata={"help": "override the transformer VAE's epochs"})
    pretrained: str | None = field(default=None, metadata={
        "help": "a pretrained express folder for the transformer arm (default: a small transformer from scratch)"})
    gene_id_key: str | None = field(default=None, metadata={
        "help": "var column of the ids the pretrained vocabulary uses (e.g. gene_symbol, ensembl_id)"})
    jobs: int = field(default=1, metadata={"help": "worker processes (one torch thread each)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of an error"})

    def __post_init__(self) -> None:
        from tokenizer import InputError

        if not self.out:
            raise InputError("--out DIR is required")
        if self.jobs < 1 or not self.seeds:
            raise InputError("--jobs must be >= 1 and --seeds non-empty")


def settings_for(args: StimulationArgs) -> StimulationSettings:
    settings = QUICK if args.quick else StimulationSettings()
    changes: dict[str, Any] = {}
    if args.types:
        changes.update(types=tuple(args.types), max_types=None)
    if args.mlp_epochs is not None:
        changes["mlp_epochs"] = args.mlp_epochs
    if args.transformer_epochs is not None:
        changes["transformer_epochs"] = args.transformer_epochs
    return dataclasses.replace(settings, **changes)


def main(args: StimulationArgs) -> dict:
    """Run, print the tables, write the outputs; returns the results."""
    from tokenizer.output import check_output, staged_dir

    from .splits import shared_data_dir

    out = check_output(args.out, args.overwrite)
    data = Path(args.data) if args.data else shared_data_dir() / DATA_FILE
    if not data.is_file():
        raise FileNotFoundError(f"no such h5ad file: {data}")
    settings = settings_for(args)
    partial = out.parent / f".{out.name}.partial"  # finished folds, so an interrupted run resumes
    results = run(data, seeds=args.seeds, settings=settings, jobs=args.jobs, pretrained=args.pretrained,
                  gene_id_key=args.gene_id_key, cache=partial)
    label = results["labelling"]
    header = (f"Stimulated cells labelled by {label['classifier']}: {label['cv_folds']}-fold CV accuracy "
              f"{label['cv_accuracy']:.3f}, macro-F1 {label['cv_macro_f1']:.3f} on {label['n_control_labelled']} "
              f"control cells; total variation between control and predicted stimulated proportions "
              f"{label['total_variation']:.3f}.\n\n"
              + "| type | control | stimulated (predicted) |\n|---|---|---|\n"
              + "".join(f"| {t} | {p['n_control']} ({p['control']:.3f}) | {p['n_stimulated']} ({p['stimulated']:.3f}) "
                        "|\n" for t, p in label["proportions"].items())
              + f"\nSeeds {args.seeds}; {results['seconds']['total']:.0f} s"
              + (f" ({results['seconds']['folds_reused']} folds reused from an interrupted run)"
                 if results["seconds"]["folds_reused"] else "") + ".\n\n")
    tables = header + format_tables(results["summary"])
    print(tables)
    with staged_dir(out, overwrite=args.overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
        (tmp / "table.md").write_text(tables)
        plot_summary(results["summary"], tmp / "stimulation.png")
        (tmp / "manifest.json").write_text(json.dumps({"format": "express stimulation benchmark",
                                                       "args": dataclasses.asdict(args), "data": str(data)},
                                                      indent=1))
    shutil.rmtree(partial, ignore_errors=True)
    return results


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def cli(argv: Sequence[str] | None = None) -> int:
    from pretrain.args import parse_args
    from tokenizer.errors import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    return run_cli("stimulation", lambda: main(parse_args(StimulationArgs, argv,
                                                         prog="python -m finetune.benchmark.stimulation")),
                   debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(cli())
