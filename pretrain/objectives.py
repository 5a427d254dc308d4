"""The pretraining objectives: what each asks of the collator, and how each is scored on held-out cells.

- ``mlm``: masked-gene modelling (Geneformer's objective): 15% of each cell's detected genes are chosen, the model
  predicts their identity (its vocabulary head runs only at those positions);
- ``mcv``: molecular cross-validation (Batson et al. 2019): each cell's counts are split binomially afresh at every
  visit, the input half re-tokenized, and the held-out half predicted with a negative binomial;
- ``count``: the raw count of each masked detected gene, zero-truncated negative binomial;
- ``contrastive``: the cell embeddings of two views of a cell (the two halves of a binomial split, or two noisy
  copies of its values) should be nearer each other than other cells' (InfoNCE over the batch).

The heads and losses are in :class:`modeling.ExpressForMaskedModeling`; the masking and splitting in
:class:`pretrain.data.ExpressCollator`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modeling.modeling_express import IGNORE_INDEX
from tokenizer import GeneVocab, TokenizationSpec

from .data import ExpressCollator

CELL_TYPE_COLUMN = "cell_type_labels"  # the integer labels the celltype objective reads (added by pretrain/run.py)

OBJECTIVES = ("mlm", "mcv", "count", "contrastive", "celltype")


def parse_objectives(text: str) -> list[str]:
    """``"mlm,mcv"`` -> ``["mlm", "mcv"]``, checked against :data:`OBJECTIVES`."""
    names = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in names if o not in OBJECTIVES]
    if unknown or not names:
        raise ValueError(f"--objectives must be a comma-separated subset of {OBJECTIVES}, got {text!r}")
    return names


def make_collator(vocab: GeneVocab, specs: Sequence[TokenizationSpec], objectives: Sequence[str], *,
                  mlm_probability: float = 0.15, mcv_input_fraction: float = 0.5, mcv_fraction_jitter: float = 0.0,
                  mcv_unsplit_fraction: float = 0.0, contrastive_view: str = "split", mcv_gene_mask: bool = False,
                  max_length: int | None = None, seed: int = 0, pass_columns: Sequence[str] = (),
                  truncate: bool = False, gene_selection: str = "top",
                  mcv_output_genes: np.ndarray | None = None) -> ExpressCollator:
    """The collator that makes the inputs and targets of ``objectives``: each visit's split fraction is drawn from
    ``mcv_input_fraction +- mcv_fraction_jitter``; ``mcv_unsplit_fraction`` of the visits read and target the whole
    cell."""
    masking = "mlm" in objectives or "count" in objectives
    split = "mcv" in objectives or ("contrastive" in objectives and contrastive_view == "split")
    fraction = None
    if split:
        fraction = mcv_input_fraction if not mcv_fraction_jitter else \
            (mcv_input_fraction - mcv_fraction_jitter, mcv_input_fraction + mcv_fraction_jitter)
    if "celltype" in objectives:
        pass_columns = (*pass_columns, CELL_TYPE_COLUMN)
    return ExpressCollator(
        vocab,
        mlm_probability=mlm_probability if masking else 0.0,
        mcv_input_fraction=fraction,
        mcv_targets="mcv" in objectives,
        mcv_unsplit_fraction=mcv_unsplit_fraction if "mcv" in objectives else 0.0,
        mcv_gene_mask=mcv_gene_mask and "mcv" in objectives,
        mcv_output_genes=mcv_output_genes if "mcv" in objectives else None,
        pair_view=contrastive_view if "contrastive" in objectives else None,
        count_targets="count" in objectives,
        specs=specs,
        pad_to_multiple_of=8,
        max_length=max_length,
        pass_columns=pass_columns,
        truncate=truncate,
        gene_selection=gene_selection,
        seed=seed,
    )


@torch.no_grad()
def evaluate(model, loader, accelerator, objectives: Sequence[str], *, mcv_profiles: torch.Tensor | None = None
             ) -> dict[str, float]:
    """Held-out metrics of the objectives, over every process's cells: ``eval/mlm_loss`` and ``eval/mlm_accuracy``
    (over masked genes), ``eval/mcv_nll`` (nats per held-out count over all cells) and ``eval/mcv_nll_cell`` (per
    held-out count of each cell, averaged over cells), ``eval/count_nll``, ``eval/contrastive_loss``,
    ``eval/celltype_loss`` and ``eval/celltype_accuracy`` (over labelled cells).

    With ``mcv_profiles`` (:func:`pretrain.data.mean_profiles`; the loader's batches then carry ``dataset_index``),
    also ``eval/mcv_nll_mean_profile``: the same held-out counts scored by the cell's dataset's mean profile over the
    genes the model scores, with the model's dispersions -- how much of the model's MCV is only knowing the dataset."""
    model.eval()
    # masked tokens, MLM loss sum, correct, held-out counts, MCV NLL sum, count targets, count NLL sum, cells with a
    # held-out count, their per-count NLL sum, contrastive batches, contrastive loss sum, labelled cells, their
    # cell-type loss sum, correct cell types
    sums = torch.zeros(15, dtype=torch.float64, device=accelerator.device)  # [14]: the mean profile's MCV NLL sum
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        dataset_index = batch.pop("dataset_index", None)
        if "mlm" not in objectives:
            batch.pop("labels", None)
        with accelerator.autocast():
            out = model(**batch)
        if out.mlm_loss is not None:
            labels = batch["labels"]
            n = (labels != IGNORE_INDEX).sum()
            sums[0] += n
            sums[1] += out.mlm_loss.double() * n
            sums[2] += (out.logits.argmax(-1) == labels[labels != IGNORE_INDEX]).sum()
        if out.mcv_loss is not None:
            nll, held = model.mcv_cell_nll(out.mcv_logits, out.mcv_theta, batch["mcv_counts"],
                                           batch.get("mcv_library_size"))
            sums[3] += held.double().sum()
            sums[4] += nll.double().sum()
            scored = held > 0
            sums[7] += scored.sum()
            sums[8] += (nll[scored] / held[scored]).double().sum()
            if mcv_profiles is not None:
                reference = mcv_profiles.to(out.mcv_logits.device)[dataset_index]
                reference = torch.where(torch.isfinite(out.mcv_logits), reference, -torch.inf)
                reference_nll, _ = model.mcv_cell_nll(reference, out.mcv_theta, batch["mcv_counts"],
                                                      batch.get("mcv_library_size"))
                sums[14] += reference_nll.double().sum()
        if out.count_loss is not None:
            k = (batch["count_targets"] != IGNORE_INDEX).sum()
            sums[5] += k
            sums[6] += out.count_loss.double() * k
        if out.contrastive_loss is not None:
            sums[9] += 1
            sums[10] += out.contrastive_loss.double()
        if out.celltype_loss is not None:
            labels = batch[CELL_TYPE_COLUMN]
            labelled = labels != IGNORE_INDEX
            sums[11] += labelled.sum()
            sums[12] += out.celltype_loss.double() * labelled.sum()
            sums[13] += (out.celltype_logits.argmax(-1)[labelled] == labels[labelled]).sum()
    total = accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0).tolist()
    metrics = {}
    if total[0] > 0:
        metrics["eval/mlm_loss"] = total[1] / total[0]
        metrics["eval/mlm_accuracy"] = total[2] / total[0]
    if total[3] > 0:
        metrics["eval/mcv_nll"] = total[4] / total[3]
        metrics["eval/mcv_nll_cell"] = total[8] / max(total[7], 1.0)
        if mcv_profiles is not None:
            metrics["eval/mcv_nll_mean_profile"] = total[14] / total[3]
    if total[5] > 0:
        metrics["eval/count_nll"] = total[6] / total[5]
    if total[9] > 0:
        metrics["eval/contrastive_loss"] = total[10] / total[9]
    if total[11] > 0:
        metrics["eval/celltype_loss"] = total[12] / total[11]
        metrics["eval/celltype_accuracy"] = total[13] / total[11]
    return metrics
