"""In-silico perturbation: how much a cell's embedding moves when a gene is deleted, overexpressed, inhibited or
activated in its rank encoding.

    express-perturb MODEL_DIR cells.h5ad --genes CD3E,GZMB --mode delete --out results/delete
    express-perturb MODEL_DIR cells.h5ad --scan --mode overexpress --max_cells 200 --out results/scan
    express-perturb GENEFORMER_DIR cells.h5ad --geneformer_dicts ../shared/data/geneformer/gc95M \\
        --genes ENSG00000167286 --mode inhibit --n_null 50 --device cuda --out results/gf

Python::

    from finetune.perturb import perturb_cells

    result = perturb_cells(adata, "runs/mine/final", genes=["CD3E"], mode="delete", n_null=20, seed=0)
    result.stats        # perturbation, n_cells, mean_shift, p_value, fdr, ...
    result.save("results/delete")

**Perturbations** act on each cell's tokens as the model reads them (:func:`perturb_tokens`): ``delete`` removes the
gene's token (a detected gene or a sampled zero-count gene alike); ``overexpress`` moves it to the front of the ranked
genes with a value above the cell's current maximum (a sampled zero leaves the zero set and becomes the top detected
gene); ``inhibit`` / ``activate`` move a detected gene down / up by ``quantile`` (0.25) of the cell's ranked genes,
its value set between its new neighbours'. Rank positions follow from the new order (the express encoder numbers the
detected genes in order; BERT's positions are the token order); Geneformer checkpoints read the ranks only. A cell
whose input a perturbation does not change (the gene is absent, already first, already last) is left out.

**Shifts and statistics.** Per cell, the cosine shift ``1 - cos(e, e')`` between the embeddings of the original and
the perturbed input (pooled as ``express-embed`` pools; ``gene_shifts`` adds the shifts of the other genes' token
states). Against each perturbation stand ``n_null`` null perturbations per cell: the same operation on random other
genes of the same cell at nearly the same expression rank (within ``null_window``, 20, ranks; for a sampled zero,
other sampled zeros). ``p_value`` is a stratified permutation test of the mean shift: under the null, in every cell the
perturbed gene is exchangeable with its null genes, so the mean is compared with the means of one shift drawn per
cell among the cell's own (exactly enumerated when there are few combinations, else 9,999 Monte Carlo draws; ``(1 +
#{null >= observed}) / (1 + draws)``); ``fdr`` is Benjamini-Hochberg over the perturbations
(``scipy.stats.false_discovery_control``). ``--scan`` perturbs every ranked gene of every cell; its nulls are the
other scanned genes of the same cells, so they cost no extra forward passes.

**Outputs** (written to a temporary folder and renamed when complete; an existing non-empty folder is replaced only
with ``--overwrite``): ``shifts.parquet`` (``cell_id``, ``perturbation``, ``cosine_shift``: one row per cell whose
input the perturbation changes), ``stats.csv`` (``perturbation``, ``n_cells``, ``mean_shift``, ``p_value``, ``fdr``,
``gene_symbol``, ``null_mean_shift``), ``null_shifts.parquet`` (the null perturbations' shifts), ``top_shifts.png``,
``manifest.json`` (the run's settings) and, with ``--gene_shifts``, ``gene_shifts.parquet`` (``perturbation``,
``gene``, ``n_cells``, ``mean_shift``). Deterministic given ``--seed``; the same code runs on a CPU or a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from finetune.embed import (
    AUTO,
    CellEncoder,
    cell_rows,
    load_encoder,
    parse_tool_args,
    read_h5ad,
)
from tokenizer import GeneVocab, InputError

logger = logging.getLogger(__name__)

MODES = ("delete", "overexpress", "inhibit", "activate")
OVEREXPRESS_FACTOR = 2.0  # an overexpressed gene's value: this times the cell's current maximum
EXACT_LIMIT = 20_000  # enumerate the permutation null exactly up to this many combinations
N_PERMUTATIONS = 9_999  # Monte Carlo draws of the permutation null beyond that
RESULT_FILES = ("shifts.parquet", "null_shifts.parquet", "stats.csv", "top_shifts.png", "manifest.json")


# ---------------------------------------------------------------------------------------------------------------------
# Perturbing one cell's tokens
# ---------------------------------------------------------------------------------------------------------------------
def _layout(ids: np.ndarray, zero: np.ndarray, n_special: int) -> tuple[np.ndarray, ...]:
    """Positions of the leading special tokens, the ranked (detected) genes, the sampled zeros and the trailing
    special tokens of a cell laid out as ``[<cls>] ranked... zeros... [<eos>]``."""
    gene = ids >= n_special
    genes = np.flatnonzero(gene)
    first = genes[0] if len(genes) else len(ids)
    special = np.flatnonzero(~gene)
    return (special[special < first], np.flatnonzero(gene & ~zero), np.flatnonzero(gene & zero),
            special[special > first])


def rank_shift(n_ranked: int, quantile: float) -> int:
    """Positions an inhibited / activated gene moves: ``quantile`` of the cell's ranked genes, rounded, at least 1."""
    return max(1, int(np.floor(quantile * n_ranked + 0.5)))


def perturb_tokens(input_ids, values, is_zero, token_id: int, mode: str, *, n_special: int,
                   quantile: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One cell's ``(input_ids, values, is_zero)`` with gene ``token_id`` perturbed, or None when the perturbation
    does not change the cell (the gene is not in its input, is already first / last, or is a sampled zero that
    ``inhibit`` / ``activate`` cannot move: a zero has no rank).

    ``delete`` removes the token; ``overexpress`` moves it to the front of the ranked genes with the value
    ``OVEREXPRESS_FACTOR`` x the cell's maximum (a sampled zero becomes a detected gene); ``inhibit`` / ``activate``
    move a detected gene :func:`rank_shift` positions down / up among the ranked genes, with the mean of its new
    neighbours' values (a neighbour's value at either end).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float32)
    zero = np.asarray(is_zero).astype(bool)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    found = np.flatnonzero(ids == token_id)
    if token_id < n_special or not len(found):
        return None
    i = int(found[0])
    if mode == "delete":
        keep = np.arange(len(ids)) != i
        return ids[keep], vals[keep], zero[keep].astype(np.int8)
    if zero[i] and mode != "overexpress":
        return None
    lead, ranked, zeros, trail = _layout(ids, zero, n_special)
    order = [int(p) for p in ranked]
    if zero[i]:
        order.insert(0, i)
        zeros = zeros[zeros != i]
        target = 0
    else:
        k = order.index(i)
        if mode == "overexpress":
            target = 0
        else:
            step = rank_shift(len(order), quantile)
            target = min(k + step, len(order) - 1) if mode == "inhibit" else max(k - step, 0)
        if target == k:
            return None
        order.insert(target, order.pop(k))
    if mode == "overexpress":
        value = OVEREXPRESS_FACTOR * float(vals[ranked].max()) if len(ranked) else 1.0
    else:
        neighbours = [vals[order[j]] for j in (target - 1, target + 1) if 0 <= j < len(order)]
        value = float(np.mean(neighbours))
    permutation = np.concatenate([lead, np.asarray(order, dtype=np.int64), zeros, trail]).astype(np.int64)
    new_ids, new_vals, new_zero = ids[permutation], vals[permutation].copy(), zero[permutation].copy()
    moved = len(lead) + target
    new_vals[moved], new_zero[moved] = value, False
    return new_ids, new_vals, new_zero.astype(np.int8)


def null_candidates(input_ids, is_zero, token_id: int, mode: str, *, n_special: int, window: int,
                    quantile: float = 0.25, exclude: Sequence[int] = ()) -> np.ndarray:
    """Token ids of the genes of the same cell that stand in for ``token_id`` in its null: detected genes within
    ``window`` ranks of it (sampled zeros for a sampled zero), not in ``exclude``, whose perturbation changes the
    cell."""
    ids = np.asarray(input_ids, dtype=np.int64)
    zero = np.asarray(is_zero).astype(bool)
    found = np.flatnonzero(ids == token_id)
    if not len(found):
        return np.zeros(0, dtype=np.int64)
    i = int(found[0])
    _, ranked, zeros, _ = _layout(ids, zero, n_special)
    if zero[i]:
        pool = ids[zeros]
    else:
        k = int(np.flatnonzero(ranked == i)[0])
        pool = ids[ranked[max(0, k - window):k + window + 1]]
    pool = pool[(pool != token_id) & ~np.isin(pool, np.asarray(list(exclude), dtype=np.int64))]
    if mode in ("overexpress", "inhibit", "activate"):  # some genes cannot move (already first / last)
        values = np.zeros(len(ids), dtype=np.float32)
        pool = np.array([t for t in pool if perturb_tokens(ids, values, zero, int(t), mode, n_special=n_special,
                                                           quantile=quantile) is not None], dtype=np.int64)
    return pool.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------
def permutation_p_value(observed: np.ndarray, strata: Sequence[np.ndarray], *, rng: np.random.Generator,
                        n_permutations: int = N_PERMUTATIONS, exact_limit: int = EXACT_LIMIT) -> float:
    """One-sided p-value of ``mean(observed)`` in a stratified permutation test: stratum ``c`` holds cell ``c``'s
    observed shift and its null shifts, any of which may stand in for the observed one under the null. Exact (the
    share of all combinations whose mean is at least the observed one) when there are at most ``exact_limit``
    combinations, else ``(1 + #{draws >= observed}) / (1 + n_permutations)``. NaN without any null shift."""
    observed = np.asarray(observed, dtype=np.float64)
    strata = [np.asarray(s, dtype=np.float64) for s in strata]
    n = len(observed)
    if n == 0 or all(len(s) <= 1 for s in strata):
        return float("nan")
    statistic = observed.sum()
    tolerance = 1e-9 * max(1.0, abs(statistic))
    sizes = np.array([len(s) for s in strata], dtype=np.float64)
    if np.prod(sizes) <= exact_limit:
        sums = np.zeros(1)
        for s in strata:
            sums = (sums[:, None] + s[None, :]).ravel()
        return float(np.mean(sums >= statistic - tolerance))
    flat = np.concatenate(strata)
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)
    exceed = 0
    for start in range(0, n_permutations, 1000):
        draws = (rng.random((min(1000, n_permutations - start), n)) * sizes).astype(np.int64)  # (B, n)
        exceed += int((flat[offsets + draws].sum(1) >= statistic - tolerance).sum())
    return (1.0 + exceed) / (1.0 + n_permutations)


def perturbation_statistics(shifts: pd.DataFrame, null_shifts: pd.DataFrame, *,
                            perturbations: Sequence[str] | None = None, seed: int = 0,
                            n_permutations: int = N_PERMUTATIONS, exact_limit: int = EXACT_LIMIT) -> pd.DataFrame:
    """Per perturbation: ``n_cells``, ``mean_shift`` (over the cells it changes), ``p_value``
    (:func:`permutation_p_value`), ``fdr`` (Benjamini-Hochberg over the perturbations with a p-value) and
    ``null_mean_shift``; sorted by ``mean_shift``, largest first.

    Args:
        shifts: ``perturbation``, ``cell_id``, ``cosine_shift`` (one row per changed cell).
        null_shifts: ``perturbation``, ``cell_id``, ``cosine_shift``: the null perturbations standing against each
            perturbation in each cell.
        perturbations: every perturbation to report, also those that changed no cell (default: those in
            ``shifts``).
    """
    from scipy.stats import false_discovery_control

    names = list(dict.fromkeys(perturbations if perturbations is not None else shifts["perturbation"].tolist()))
    null_groups = {key: group for key, group in null_shifts.groupby(["perturbation", "cell_id"], sort=False)}
    rows = []
    for name, group in shifts.groupby("perturbation", sort=False):
        observed = group["cosine_shift"].to_numpy(np.float64)
        strata = []
        nulls = []
        for cell, value in zip(group["cell_id"], observed):
            null = null_groups.get((name, cell))
            extra = null["cosine_shift"].to_numpy(np.float64) if null is not None else np.zeros(0)
            strata.append(np.concatenate([[value], extra]))
            nulls.append(extra)
        rng = np.random.default_rng([seed, zlib.crc32(str(name).encode())])
        null_all = np.concatenate(nulls)
        rows.append({"perturbation": name, "n_cells": len(observed), "mean_shift": float(observed.mean()),
                     "p_value": permutation_p_value(observed, strata, rng=rng, n_permutations=n_permutations,
                                                    exact_limit=exact_limit),
                     "null_mean_shift": float(null_all.mean()) if len(null_all) else float("nan")})
    found = {r["perturbation"] for r in rows}
    for name in names:
        if name not in found:
            rows.append({"perturbation": name, "n_cells": 0, "mean_shift": float("nan"), "p_value": float("nan"),
                         "null_mean_shift": float("nan")})
    stats = pd.DataFrame(rows, columns=["perturbation", "n_cells", "mean_shift", "p_value", "null_mean_shift"])
    stats["fdr"] = np.nan
    tested = stats["p_value"].notna().to_numpy()
    if tested.any():
        stats.loc[tested, "fdr"] = false_discovery_control(stats.loc[tested, "p_value"].to_numpy(), method="bh")
    stats = stats.sort_values(["mean_shift", "perturbation"], ascending=[False, True], na_position="last",
                              kind="stable").reset_index(drop=True)
    return stats[["perturbation", "n_cells", "mean_shift", "p_value", "fdr", "null_mean_shift"]]


# ---------------------------------------------------------------------------------------------------------------------
# Running perturbations through a model
# ---------------------------------------------------------------------------------------------------------------------
def _cosine_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def cosine_shifts(encoder: CellEncoder, originals: Sequence[dict], perturbed: Sequence[dict], *,
                  batch_size: int = 64) -> np.ndarray:
    """``1 - cos`` between the cell embeddings of ``originals[i]`` and ``perturbed[i]`` (dicts of ``input_ids``,
    ``values``, ``is_zero``)."""
    if len(originals) != len(perturbed):
        raise ValueError("one perturbed input per original is needed")
    rows = list(originals) + list(perturbed)
    embedded = np.zeros((len(rows), 0))
    for positions, batch in encoder.batches(rows, batch_size):
        cell, _ = encoder.forward(batch)
        if embedded.shape[1] == 0:
            embedded = np.zeros((len(rows), cell.shape[1]), dtype=np.float64)
        embedded[positions] = cell.double().cpu().numpy()
    n = len(originals)
    return _cosine_shift(torch.from_numpy(embedded[:n]), torch.from_numpy(embedded[n:])).numpy()


def resolve_genes(genes: Sequence[str], vocab: GeneVocab, *, mapping: dict | None = None,
                  where: str = "the model") -> list[int]:
    """Token ids of genes given as vocabulary ids or symbols (exact, then case-insensitive; Geneformer's Ensembl id
    mapping when given); a gene the vocabulary lacks is an :class:`~tokenizer.InputError` naming it."""
    by_symbol: dict[str, int] = {}
    by_upper: dict[str, int] = {}
    for position, symbol in enumerate(vocab.gene_symbols or []):
        if symbol:
            by_symbol.setdefault(symbol, vocab.n_special + position)
            by_upper.setdefault(symbol.upper(), vocab.n_special + position)
    lookup = vocab.token_to_id
    tokens = []
    for gene in genes:
        name = str(gene).strip()
        token = lookup.get(name, -1) if name not in vocab.special_tokens else -1
        if token < 0 and mapping is not None and name.upper() in mapping:
            token = lookup.get(mapping[name.upper()], -1)
        if token < 0:
            token = by_symbol.get(name, by_upper.get(name.upper(), -1))
        if token < 0:
            examples = ", ".join(vocab.gene_ids[:3])
            raise InputError(f"gene {name!r} is not in the vocabulary of {where} ({vocab.n_genes} genes, e.g. "
                             f"{examples}); give a gene id or symbol the model knows")
        tokens.append(int(token))
    return list(dict.fromkeys(tokens))


@dataclass
class PerturbationResult:
    """What :func:`perturb_cells` computed (the tables described in this module's docstring)."""

    shifts: pd.DataFrame
    null_shifts: pd.DataFrame
    stats: pd.DataFrame
    gene_shifts: pd.DataFrame | None = None
    settings: dict = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False, plot: bool = True) -> Path:
        """Write the result files into ``out_dir`` (staged, renamed when complete; an existing empty folder is
        taken, a non-empty one replaced only with ``overwrite``)."""
        from tokenizer.output import staged_dir, write_bytes

        out = Path(out_dir)
        with staged_dir(out, overwrite=overwrite or _is_empty_dir(out)) as tmp:
            self.shifts.to_parquet(tmp / "shifts.parquet", index=False)
            self.null_shifts.to_parquet(tmp / "null_shifts.parquet", index=False)
            self.stats.to_csv(tmp / "stats.csv", index=False)
            if self.gene_shifts is not None:
                self.gene_shifts.to_parquet(tmp / "gene_shifts.parquet", index=False)
            if plot:
                plot_top_shifts(self.stats, tmp / "top_shifts.png", title=f"{self.settings.get('mode', '')} "
                                "perturbations: mean cosine shift")
            write_bytes(tmp / "manifest.json", json.dumps({"format": "express perturbation results",
                                                           **self.settings}, indent=2, default=str).encode())
        return out


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_results_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early when the results folder exists, is not empty and may not be replaced."""
    from tokenizer.output import check_output

    path = Path(path)
    if not _is_empty_dir(path):
        check_output(path, overwrite)
    return path


def plot_top_shifts(stats: pd.DataFrame, path: str | os.PathLike, *, top: int = 20, title: str = "") -> Path:
    """Horizontal bars of the ``top`` largest mean shifts (labelled by symbol when known; dark: FDR < 0.05)."""
    from finetune.plots import _pyplot, _save

    plt = _pyplot()
    shown = stats.dropna(subset=["mean_shift"]).head(top).iloc[::-1]
    labels = [s if isinstance(s, str) and s else p for s, p in
              zip(shown.get("gene_symbol", shown["perturbation"]), shown["perturbation"])]
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * max(len(shown), 3) + 1.2))
    colours = ["#1f4e79" if f < 0.05 else "#9dc3e6" for f in shown["fdr"].fillna(1.0)]
    ax.barh(range(len(shown)), shown["mean_shift"], color=colours)
    if "null_mean_shift" in shown:
        ax.scatter(shown["null_mean_shift"], range(len(shown)), color="#c00000", marker="|", s=80, zorder=3,
                   label="null mean")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.set_xlabel("mean cosine shift of the cell embedding (dark: FDR < 0.05)")
    ax.set_title(title or "top perturbations", fontsize=10)
    return _save(fig, path)


@dataclass
class _Plan:
    """One cell's perturbations: the targets it holds, the null genes drawn for each, and every input to run."""

    cell: int
    targets: list[int]
    nulls: dict[int, list[int]]
    inputs: dict[int, dict]  # token -> perturbed input


def _plan_cell(cell: int, row: dict, targets: Sequence[int] | None, *, mode: str, quantile: float, n_null: int,
               window: int, n_special: int, seed: int) -> _Plan | None:
    ids, zero = row["input_ids"], np.asarray(row["is_zero"]).astype(bool)
    if targets is None:  # scan: every ranked gene
        present = [int(t) for t in ids[(ids >= n_special) & ~zero]]
    else:
        held = set(ids.tolist())
        present = [t for t in targets if t in held]
    inputs: dict[int, dict] = {}

    def perturbed(token: int) -> dict | None:
        if token not in inputs:
            out = perturb_tokens(ids, row["values"], zero, token, mode, n_special=n_special, quantile=quantile)
            if out is None:
                return None
            inputs[token] = dict(zip(("input_ids", "values", "is_zero"), out))
        return inputs[token]

    present = [t for t in present if perturbed(t) is not None]
    if not present:
        return None
    rng = np.random.default_rng([seed, cell])
    exclude = present if targets is not None else ()
    nulls: dict[int, list[int]] = {}
    for token in present:
        if targets is None:  # scan: the candidates that can move are the scanned genes themselves
            pool = null_candidates(ids, zero, token, "delete", n_special=n_special, window=window)
            pool = pool[np.isin(pool, np.fromiter(inputs, dtype=np.int64, count=len(inputs)))]
        else:
            pool = null_candidates(ids, zero, token, mode, n_special=n_special, window=window, quantile=quantile,
                                   exclude=exclude)
        chosen = rng.choice(pool, size=min(n_null, len(pool)), replace=False) if n_null and len(pool) else []
        nulls[token] = [int(t) for t in chosen]
        for t in nulls[token]:
            perturbed(t)
    return _Plan(cell, present, nulls, inputs)


def _gene_shift_rows(token: int, original: tuple[np.ndarray, torch.Tensor], changed: tuple[np.ndarray, torch.Tensor],
                     n_special: int) -> tuple[np.ndarray, np.ndarray]:
    """The other genes in both inputs and the cosine shift of their token states."""
    (ids_a, states_a), (ids_b, states_b) = original, changed
    genes_a = np.flatnonzero((ids_a >= n_special) & (ids_a != token))
    genes_b = np.flatnonzero((ids_b >= n_special) & (ids_b != token))
    common, ia, ib = np.intersect1d(ids_a[genes_a], ids_b[genes_b], return_indices=True)
    shift = _cosine_shift(states_a[torch.from_numpy(genes_a[ia])], states_b[torch.from_numpy(genes_b[ib])])
    return common, shift.cpu().numpy()


def perturb_cells(
    adata, model: str | os.PathLike | CellEncoder, *, genes: Sequence[str] | str | None = None, scan: bool = False,
    mode: str = "delete", quantile: float = 0.25, n_null: int = 20, null_window: int = 20, seed: int = 0,
    max_cells: int | None = None, batch_size: int = 64, device: str | None = None,
    geneformer_dicts: str | os.PathLike | None = None, pooling: str | None = None, hidden_layer: int | None = None,
    gene_shifts: bool = False, layer: str | None = None, gene_id_key: str | None = AUTO,
    total_counts_key: str | None = AUTO, allow_non_integer: bool = False, bf16: bool = True,
    n_permutations: int = N_PERMUTATIONS, progress: bool = True, where: str = "the AnnData",
) -> PerturbationResult:
    """Perturb ``genes`` (ids or symbols of the model's vocabulary; a list or comma-separated) -- or with ``scan``
    every ranked gene of each cell -- in the cells of a raw-count AnnData and measure the embedding shifts.

    Args:
        model: a model folder or a loaded :class:`~finetune.embed.CellEncoder` (see
            :func:`~finetune.embed.load_encoder` for ``geneformer_dicts``, ``pooling``, ``hidden_layer``, ``device``,
            ``bf16``).
        mode: ``delete``, ``overexpress``, ``inhibit`` or ``activate`` (:func:`perturb_tokens`); ``quantile``: the
            rank shift of inhibit / activate as a share of the cell's ranked genes.
        n_null: null perturbations per perturbation and cell (fewer where the window holds fewer genes);
            ``null_window``: their rank distance at most.
        seed: the null genes, the cells kept by ``max_cells`` and the Monte Carlo permutation draws.
        max_cells: perturb a seeded random subset of at most this many cells.
        gene_shifts: also aggregate the shifts of the other genes' token states (``gene_shifts`` table).
        layer, gene_id_key, total_counts_key, allow_non_integer, where: where the counts, gene ids and library
            sizes are (as in :func:`~finetune.embed.embed_cells`).
        n_permutations: Monte Carlo draws of the permutation test (when exact enumeration is too large).
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(genes, str):
        genes = [g for g in genes.split(",") if g.strip()]
    if bool(genes) == bool(scan):
        raise InputError("give either genes to perturb (--genes G1,G2) or --scan, not both or neither")
    if not 0.0 < quantile <= 1.0:
        raise InputError(f"quantile must lie in (0, 1], got {quantile}")
    if n_null < 0 or null_window < 1 or batch_size < 1 or (max_cells is not None and max_cells < 1):
        raise InputError("n_null must be >= 0, and null_window, batch_size and max_cells >= 1")
    started = time.perf_counter()
    encoder = load_encoder(model, geneformer_dicts=geneformer_dicts, pooling=pooling, layer=hidden_layer,
                           device=device, bf16=bf16)
    vocab, n_special = encoder.vocab, encoder.n_special
    targets = None if scan else resolve_genes(genes, vocab, mapping=encoder.dicts.mapping if encoder.dicts else None,
                                              where=str(encoder.path))
    cells = encoder.tokenize(adata, layer=layer, gene_id_key=gene_id_key, total_counts_key=total_counts_key,
                             allow_non_integer=allow_non_integer, where=where)
    rows = cell_rows(cells)
    cell_ids = np.asarray(cells.dataset["cell_id"]).astype(str)
    chosen = np.arange(len(rows))
    if max_cells is not None and max_cells < len(rows):
        chosen = np.sort(np.random.default_rng([seed, 0x5EED]).choice(len(rows), max_cells, replace=False))

    observed, null, gene_parts = [], [], []
    chunk = max(1, batch_size)
    for start in tqdm(range(0, len(chosen), chunk), desc="perturbing", disable=None if progress else True):
        plans = [p for c in chosen[start:start + chunk] if (p := _plan_cell(
            int(c), rows[c], targets, mode=mode, quantile=quantile, n_null=n_null, window=null_window,
            n_special=n_special, seed=seed)) is not None]
        if not plans:
            continue
        originals = [rows[p.cell] for p in plans]
        base = [None] * len(plans)
        for positions, batch in encoder.batches(originals, batch_size):
            cell, states = encoder.forward(batch)
            for j, position in enumerate(positions):
                length = int(batch["attention_mask"][j].sum())
                base[position] = (cell[j], (batch["input_ids"][j, :length].numpy(), states[j, :length]))
        jobs = [(k, token) for k, p in enumerate(plans) for token in p.inputs]
        inputs = [plans[k].inputs[token] for k, token in jobs]
        shift_of: dict[tuple[int, int], float] = {}
        for positions, batch in encoder.batches(inputs, batch_size):
            cell, states = encoder.forward(batch)
            reference = torch.stack([base[jobs[p][0]][0] for p in positions])  # (B, H) the originals
            batch_shifts = _cosine_shift(cell, reference).cpu().numpy()
            for j, position in enumerate(positions):
                k, token = jobs[position]
                shift_of[(k, token)] = float(batch_shifts[j])
                if gene_shifts and token in plans[k].targets:
                    length = int(batch["attention_mask"][j].sum())
                    common, shift = _gene_shift_rows(token, base[k][1], (batch["input_ids"][j, :length].numpy(),
                                                                          states[j, :length]), n_special)
                    gene_parts.append(pd.DataFrame({"perturbation": token, "gene": common, "shift": shift,
                                                    "n_cells": 1}))
        for k, plan in enumerate(plans):
            for token in plan.targets:
                observed.append((cell_ids[plan.cell], token, shift_of[(k, token)]))
                null.extend((cell_ids[plan.cell], token, t, shift_of[(k, t)]) for t in plan.nulls[token])
        if gene_parts and len(gene_parts) > 256:  # keep memory flat: aggregate as we go
            gene_parts = [_aggregate_gene_shifts(gene_parts)]

    name = vocab.id_to_token
    shifts = pd.DataFrame(observed, columns=["cell_id", "token", "cosine_shift"])
    shifts.insert(1, "perturbation", [name(int(t)) for t in shifts["token"]])
    shifts = shifts.drop(columns="token")
    null_shifts = pd.DataFrame(null, columns=["cell_id", "token", "null_token", "cosine_shift"])
    null_shifts.insert(1, "perturbation", [name(int(t)) for t in null_shifts["token"]])
    null_shifts.insert(2, "null_gene", [name(int(t)) for t in null_shifts["null_token"]])
    null_shifts = null_shifts.drop(columns=["token", "null_token"])
    listed = [name(t) for t in targets] if targets is not None else None
    stats = perturbation_statistics(shifts, null_shifts, perturbations=listed, seed=seed,
                                    n_permutations=n_permutations)
    symbols = dict(zip(vocab.gene_ids, vocab.gene_symbols or [""] * vocab.n_genes))
    stats["gene_symbol"] = [symbols.get(p, "") for p in stats["perturbation"]]
    gene_table = None
    if gene_shifts:
        gene_table = _aggregate_gene_shifts(gene_parts) if gene_parts else \
            pd.DataFrame({"perturbation": [], "gene": [], "n_cells": [], "shift": []})
        gene_table = gene_table.assign(mean_shift=gene_table["shift"] / gene_table["n_cells"].clip(lower=1))
        gene_table["perturbation"] = [name(int(t)) for t in gene_table["perturbation"]]
        gene_table["gene"] = [name(int(t)) for t in gene_table["gene"]]
        gene_table = gene_table.drop(columns="shift").astype({"n_cells": np.int64}).sort_values(
            ["perturbation", "mean_shift"], ascending=[True, False]).reset_index(drop=True)
    for gene in (listed or []):
        if not (shifts["perturbation"] == gene).any():
            logger.warning("%s: no cell's input changes when %s is %s (it is not among the genes read in any cell%s)",
                           where, gene, {"delete": "deleted", "overexpress": "overexpressed"}.get(mode, mode + "d"),
                           "" if mode in ("delete", "overexpress") else ", or cannot move further")
    settings = {"model": str(encoder.path), "kind": encoder.kind, "mode": mode, "quantile": quantile,
                "genes": listed, "scan": bool(scan), "n_null": n_null, "null_window": null_window, "seed": seed,
                "max_cells": max_cells, "pooling": encoder.pooling,
                "layer": "final" if encoder.layer is None else encoder.layer, "n_cells_tokenized": len(rows),
                "n_cells_perturbed": int(shifts["cell_id"].nunique()), "n_perturbations": len(stats),
                "seconds": round(time.perf_counter() - started, 3)}
    logger.info("%d perturbations over %d cells in %.1f s", len(stats), settings["n_cells_perturbed"],
                settings["seconds"])
    return PerturbationResult(shifts, null_shifts, stats, gene_table, settings)


def _aggregate_gene_shifts(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Sum of shifts and number of cells per (perturbation, gene)."""
    frame = pd.concat(parts, ignore_index=True)
    return frame.groupby(["perturbation", "gene"], as_index=False, sort=False)[["shift", "n_cells"]].sum()


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PerturbArgs:
    """express-perturb MODEL_DIR INPUT.h5ad (--genes G1,G2 | --scan) --mode MODE --out RESULTS_DIR: in-silico
perturbation of genes in the rank encoding, with the cosine shift of each cell's embedding and statistics against
rank-matched random genes.

examples:
  express-perturb runs/mine/final cells.h5ad --genes CD3E,GZMB --mode delete --out results/delete
  express-perturb runs/mine/final cells.h5ad --scan --mode overexpress --max_cells 200 --out results/scan
  express-perturb gf-12L-95M cells.h5ad --geneformer_dicts ../shared/data/geneformer/gc95M \\
      --genes ENSG00000167286 --mode inhibit --n_null 50 --device cuda --out results/gf
"""

    model_dir: str | None = field(default=None, metadata={
        "help": "express model folder, or a Geneformer-format (transformers BERT) checkpoint; required"})
    input: str | None = field(default=None, metadata={"help": "raw-count h5ad; required"})
    out: str | None = field(default=None, metadata={"help": "results folder (created); required"})
    genes: str | None = field(default=None, metadata={
        "help": "comma-separated genes to perturb, one at a time (ids or symbols of the model's vocabulary)"})
    scan: bool = field(default=False, metadata={"help": "perturb every ranked gene of each cell"})
    mode: Literal["delete", "overexpress", "inhibit", "activate"] | None = field(default=None, metadata={
        "help": "what happens to the gene; required"})
    quantile: float = field(default=0.25, metadata={
        "help": "inhibit/activate: rank shift as a share of the cell's ranked genes"})
    n_null: int = field(default=20, metadata={"help": "rank-matched null perturbations per perturbation and cell"})
    null_window: int = field(default=20, metadata={"help": "null genes lie within this many ranks of the gene"})
    seed: int = field(default=0, metadata={"help": "seed of the null genes, --max_cells and the permutation test"})
    max_cells: int | None = field(default=None, metadata={"help": "perturb a seeded random subset of cells"})
    batch_size: int = field(default=64, metadata={"help": "inputs per forward pass"})
    device: Literal["cpu", "cuda"] | None = field(default=None, metadata={"help": "default: cuda when available"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on a GPU (--no_bf16: float32)"})
    geneformer_dicts: str | None = field(default=None, metadata={
        "help": "folder of Geneformer's token/median dictionaries as JSON (Geneformer checkpoints)"})
    pooling: Literal["mean", "cls"] | None = field(default=None, metadata={
        "help": "cell embedding pooling (default as express-embed)"})
    layer: int | None = field(default=None, metadata={"help": "pool hidden_states[L] (default as express-embed)"})
    gene_shifts: bool = field(default=False, metadata={
        "help": "also write the shifts of the other genes' embeddings (gene_shifts.parquet)"})
    counts_layer: str | None = field(default=None, metadata={"help": "AnnData layer of raw counts (default X)"})
    gene_id_key: str | None = field(default=AUTO, metadata={
        "help": "var column of gene ids (auto: var['ensembl_id'] for Geneformer when present, else var_names)"})
    total_counts_key: str | None = field(default=AUTO, metadata={
        "help": "obs column of library sizes (auto: obs['n_counts'] for Geneformer when present, else row sums)"})
    allow_non_integer: bool = field(default=False, metadata={"help": "accept non-integer counts"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty results folder"})
    plots: bool = field(default=True, metadata={"help": "write top_shifts.png"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of an error"})

    def __post_init__(self) -> None:
        missing = [name.upper() for name in ("model_dir", "input") if not getattr(self, name)]
        missing += [f"--{name}" for name in ("out", "mode") if not getattr(self, name)]
        if missing:
            raise InputError(f"express-perturb needs {', '.join(missing)} (express-perturb MODEL_DIR INPUT.h5ad "
                             "--genes G1,G2 --mode delete --out RESULTS_DIR)")
        if bool(self.genes) == self.scan:
            raise InputError("give either --genes G1,G2 or --scan")


def main(args: PerturbArgs) -> dict[str, Any]:
    """Run the perturbations and write the results folder; returns the run's settings and counts."""
    out = check_results_dir(args.out, args.overwrite)  # before any work
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    adata = read_h5ad(args.input)
    result = perturb_cells(
        adata, args.model_dir, genes=args.genes, scan=args.scan, mode=args.mode, quantile=args.quantile,
        n_null=args.n_null, null_window=args.null_window, seed=args.seed, max_cells=args.max_cells,
        batch_size=args.batch_size, device=args.device, geneformer_dicts=args.geneformer_dicts, pooling=args.pooling,
        hidden_layer=args.layer, gene_shifts=args.gene_shifts, layer=args.counts_layer, gene_id_key=args.gene_id_key,
        total_counts_key=args.total_counts_key, allow_non_integer=args.allow_non_integer, bf16=args.bf16,
        progress=args.progress, where=str(args.input),
    )
    result.settings["input"] = str(args.input)
    result.save(out, overwrite=args.overwrite, plot=args.plots)
    logger.info("wrote %s", out)
    return {**result.settings, "out": str(out)}


def cli(argv: Sequence[str] | None = None) -> int:
    """``express-perturb``: exit code 0, 2 for bad input (one line), 1 otherwise (``--debug``: the traceback)."""
    from tokenizer.errors import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    return run_cli("express-perturb", lambda: main(parse_tool_args(PerturbArgs, argv, prog="express-perturb",
                                                                   positionals=("model_dir", "input"))),
                   debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(cli())
