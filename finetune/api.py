"""scverse-style Python API: AnnData in, results written back under configurable keys.

    import anndata as ad
    from finetune import api

    adata = ad.read_h5ad("cite.h5ad")  # raw counts
    model = api.fit_cell_types(adata, model="none", encoder="mlp", label_key="cell_type", epochs=10)
    api.predict_cell_types(adata, model)        # obs['express_cell_type'], obsm['express_cell_type_probabilities']
    api.embed(adata, model)                     # obsm['X_express']
    vae = api.train_vae(adata, model="none", encoder="mlp", batch_key="batch", label_key="cell_type")
    adt = api.fit_proteins(adata, model="none", encoder="mlp", protein_obsm_key="protein_counts")
    api.predict_proteins(adata, adt)            # obsm['express_protein'] (DataFrame, normalised levels)
    api.save_model(vae, "my_vae")               # save_pretrained (+ the vocabulary and tokenization spec)
    vae = api.load_model("my_vae")

``model`` is a pretrained express folder (the transformer encoder starts from its weights and tokenizes new cells
with its vocabulary and ``tokenization.json``) or ``"none"``: the MLP encoder (``encoder="mlp"``), or a transformer
from random weights with a vocabulary fitted on ``adata`` ("express without pretraining"). Training options are the
fields of :class:`TrainSettings` (``epochs``, ``lr``, ``batch_size``, ...); the head's settings are declared fields of
its config (:class:`~modeling.ExpressConfig`, :class:`~modeling.ExpressVAEConfig`), given as ``head={...}``.

The returned models carry ``model.vocab`` and ``model.tokenization`` (the transformer's :class:`~tokenizer.GeneVocab`
and :class:`~tokenizer.TokenizationSpec`; ``None`` for the MLP encoder), which :func:`save_model` writes beside the
weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from modeling import ExpressConfig, ExpressVAEConfig
from modeling.modeling_heads import ExpressHeadPreTrainedModel
from pretrain.data import label_categories
from tokenizer import GeneVocab, TokenizationSpec

from .data import (
    FinetuneDataError,
    cells_for_model,
    collator_for,
    fit_protein_reference,
    measured_spec,
    protein_counts,
    require_obs,
    select_genes,
)

logger = logging.getLogger(__name__)

TASKS = ("cell-type", "vae", "adt")
CLASS_WEIGHTINGS = ("none", "balanced", "sqrt")  # "auto" tries each
# the default encoder_lr of a pretrained encoder: lr / 3 under a classifier or the VAE, lr / 10 under the protein
# regression head (see TrainSettings)
PRETRAINED_ENCODER_LR_DIVISOR = {"classification": 3, "regression": 10}
MIN_TRAINING_CELLS = 10  # fewer than this cannot be split, batched and trained in any meaningful way
MIN_CELLS_PER_CLASS = 3


@dataclass
class TrainSettings:
    """Optimisation settings of one fine-tuning run (the head's own settings are config fields).

    Args:
        epochs, max_steps: training length (``max_steps`` wins when given).
        batch_size: cells per step and process (at most the training cells per process).
        lr: learning rate of the heads (and of an encoder from random weights); encoder_lr: of the encoder alone
            (default for a pretrained encoder: ``lr / 3``, and ``lr / 10`` under the protein regression head;
            ``lr`` otherwise. Chosen on cells the benchmark never tests: held-out training donors of Kang 2018 and a
            held-out third of the CITE-seq training donor, with the default pretrained model. ``lr / 3`` beat ``lr``
            in 7 of 8 paired runs, by 0.014 macro-F1 and 0.045 per-protein Pearson on average; for proteins
            ``lr / 10`` beat ``lr / 3`` in 4 of 4 paired runs, by 0.062 per-protein Pearson, and for cell types it
            scored 0.026 macro-F1 lower on average, 1 of 2 paired runs lost).
        weight_decay, warmup_ratio, grad_clip: AdamW's decay, the warm-up share of the steps, gradient clipping.
        kl_warmup_ratio: share of the steps over which the VAE's KL weight rises to 1.
        min_steps: the fewest optimizer steps, whatever ``epochs`` gives (a 300-cell set is not trained for only
            a hundred steps); ``max_steps`` overrides both.
        validation_fraction: training cells held back to choose the best epoch (0: keep the last).
        validation_key: an obs column (donors, batches): whole groups of it are held back instead of random cells,
            so the epoch is chosen as it would score on new donors. ``"auto"`` (default): the first of
            :data:`VALIDATION_KEYS` that ``obs`` has with at least two groups, else random cells; ``None``: random
            cells.
        selection: what picks the epoch: ``"auto"`` -- macro-F1 for cell types, mean per-protein Pearson for
            protein levels, the loss for the VAE -- or ``"loss"``.
        class_weighting: per-class loss weights from the training labels (cell types): ``"balanced"``
            (``n / (C n_c)``: every class weighs as much as any other, as in macro-F1), ``"sqrt"`` (its square root),
            ``"none"``, or ``"auto"``: each of the three trained, the best on the validation cells kept; stored as
            ``config.class_weights``.
        thinning: augmentation: every training visit keeps each count with a probability drawn from
            ``[1 - thinning, 1]`` (binomial thinning, re-tokenized), so the model sees cells at many depths.
        seed: seeds the head's initialisation, the validation split and the batches.
    """

    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    encoder_lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    kl_warmup_ratio: float = 0.3
    min_steps: int = 500
    validation_fraction: float = 0.1
    validation_key: str | None = "auto"
    selection: Literal["auto", "loss"] = "auto"
    class_weighting: Literal["none", "balanced", "sqrt", "auto"] = "balanced"
    thinning: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.class_weighting not in (*CLASS_WEIGHTINGS, "auto"):
            raise FinetuneDataError(f"class_weighting must be one of {CLASS_WEIGHTINGS} or 'auto', got "
                             f"{self.class_weighting!r}")
        if not 0.0 <= self.thinning < 1.0:
            raise FinetuneDataError(f"thinning must be in [0, 1), got {self.thinning}")
        if self.epochs < 1 or self.batch_size < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise FinetuneDataError("epochs, batch_size and max_steps must be >= 1")


# the L1 penalty on a cell-type classifier's wide path (config.wide_l1); chosen on held-out training donors of Kang
# 2018, never the benchmark's test donors (see fit_cell_types)
WIDE_L1 = 3e-2
VALIDATION_KEYS = ("donor", "batch", "sample")  # what validation_key="auto" looks for, in this order


def validation_key(adata: ad.AnnData, key: str | None) -> str | None:
    """The obs column whose groups validation holds out: ``key`` itself, or for ``"auto"`` the first of
    :data:`VALIDATION_KEYS` with at least two groups among ``adata``'s cells (None: random cells)."""
    if key is None or key.lower() == "none":
        return None
    if key != "auto":
        return key
    for name in VALIDATION_KEYS:
        if name in adata.obs and adata.obs[name].astype(str).nunique() >= 2:
            logger.info("validating on whole groups of obs[%r] (held-out %ss)", name, name)
            return name
    return None


def class_weights(labels: np.ndarray, n_classes: int, method: str) -> list[float] | None:
    """Per-class loss weights from the training cells' labels (-100 = unlabelled, ignored): ``"balanced"`` gives
    class ``c`` the weight ``n / (C * n_c)`` (every class weighs as much in the loss as any other), ``"sqrt"`` its
    square root, ``"none"`` returns None. Classes without a training cell get weight 0 (they cannot occur)."""
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {method!r}")
    if method == "none":
        return None
    counts = np.bincount(labels[labels >= 0], minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return (np.sqrt(weights) if method == "sqrt" else weights).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Building a model for an AnnData
# ---------------------------------------------------------------------------------------------------------------------
def _encoder_fields(config: ExpressConfig) -> dict:
    """A pretrained config's fields, without what identifies its own class (so a head's config class takes them)."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "id2label", "label2id",
                "problem_type", "dtype"):
        fields.pop(key, None)
    return fields


def _labels(adata, label_key, labelled_key, unlabelled_category) -> tuple[list[str], np.ndarray | None]:
    if label_key is None:
        return [], None
    values = require_obs(adata, label_key).astype(object).to_numpy()
    mask = np.ones(adata.n_obs, dtype=bool)
    if labelled_key is not None:
        mask = require_obs(adata, labelled_key).to_numpy().astype(bool)
    unlabelled = [unlabelled_category] if unlabelled_category is not None else []
    names = label_categories(values[mask], unlabelled=unlabelled)  # only labelled cells define the classes
    if not names:
        raise FinetuneDataError(f"obs[{label_key!r}] has no labelled cells")
    return names, mask


def _parents(adata, label_key, hierarchy_key, names, mask) -> list[int] | None:
    if hierarchy_key is None:
        return None
    pairs = pd.DataFrame({"fine": adata.obs[label_key].astype(str).to_numpy()[mask],
                          "coarse": require_obs(adata, hierarchy_key).astype(str).to_numpy()[mask]}).drop_duplicates()
    clash = pairs[pairs["fine"].duplicated(keep=False)]
    if len(clash):
        raise FinetuneDataError(
            f"cell type {clash['fine'].iloc[0]!r} has several parents in obs[{hierarchy_key!r}]: "
            f"{sorted(clash[clash['fine'] == clash['fine'].iloc[0]]['coarse'])}"
        )
    coarse = sorted(pairs["coarse"].unique())
    lookup = dict(zip(pairs["fine"], pairs["coarse"]))
    return [coarse.index(lookup[n]) for n in names]


def _pretrained(model: str | os.PathLike) -> tuple[ExpressConfig, GeneVocab, TokenizationSpec]:
    """A pretrained model folder's config, vocabulary and tokenization, with one clear error when it is not one."""
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FinetuneDataError(f"{path} is not a model folder (no config.json); pass a folder written by "
                                "pretrain/run.py (its final/), or --model none")
    try:
        config = ExpressConfig.from_pretrained(path)
        vocab = GeneVocab.load(path)
    except (OSError, ValueError) as err:
        raise FinetuneDataError(f"{path} is not an express model with its vocabulary: {err}") from None
    try:
        spec = TokenizationSpec.load(path)
    except FileNotFoundError:
        logger.info("%s has no tokenization.json: new cells are tokenized with the tokenizer's defaults", path)
        spec = TokenizationSpec()
    return config, vocab, spec.replace(measured_genes={})


def prepare_model(
    task: str, adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    label_key: str | None = None, batch_key: str | None = None, protein_obsm_key: str | None = None,
    gene_id_key: str | None = None, layer: str | None = None, n_top_genes: int | None = 2000,
    unlabelled_category: str | None = None, labelled_key: str | None = None, hierarchy_key: str | None = None,
    prior: str = "auto", protein_head: str = "regression", protein_norm: str = "clr", freeze_layers: int = 0,
    head: dict | None = None, transformer: dict | None = None, tokenization: TokenizationSpec | dict | None = None,
) -> ExpressHeadPreTrainedModel:
    """The head model for ``task`` ("cell-type", "vae", "adt") sized to ``adata``.

    ``head``: further config fields of the head (``n_latent``, ``covariance``, ``head_dropout``, ...; see
    :class:`~modeling.ExpressConfig` and :class:`~modeling.ExpressVAEConfig`), where ``wide_path`` may also be
    ``"auto"`` (built with the path, :func:`fit` keeps it or not; cell types on the transformer have it by default,
    with ``wide_l1=WIDE_L1``);
    ``transformer``: ``ExpressConfig``
    fields of a transformer built from scratch; ``tokenization``: how the transformer tokenizes cells (a spec, or a
    dict of its fields overriding the pretrained model's own ``tokenization.json``, else the tokenizer's defaults).
    """
    from modeling import ExpressForCellClassification, ExpressForVAE

    if task not in TASKS:
        raise FinetuneDataError(f"task must be one of {TASKS}, got {task!r}")
    if encoder not in ("transformer", "mlp"):
        raise FinetuneDataError(f"encoder must be 'transformer' or 'mlp', got {encoder!r}")
    if task == "cell-type" and label_key is None:
        raise FinetuneDataError("the cell-type task needs label_key (the obs column of cell types)")
    if task == "adt" and protein_obsm_key is None:
        raise FinetuneDataError("the adt task needs protein_obsm_key (the obsm entry of raw protein counts)")
    pretrained = str(model) != "none"
    if pretrained and encoder == "mlp":
        raise FinetuneDataError("the MLP encoder has no pretrained weights: use model='none' with encoder='mlp'")
    vocab = spec = base = None
    if pretrained:
        base, vocab, spec = _pretrained(model)
    elif encoder == "transformer":
        from tokenizer.stats import fit_statistics

        logger.info("fitting a vocabulary on the %d training cells (transformer without pretraining)", adata.n_obs)
        vocab = fit_statistics([adata], None, gene_id_key=gene_id_key, layer=layer, progress=False)
        spec = TokenizationSpec()
    if isinstance(tokenization, TokenizationSpec):
        spec = tokenization
    elif tokenization and spec is not None:
        spec = spec.replace(**tokenization)

    names, mask = _labels(adata, label_key, labelled_key, unlabelled_category)
    if task == "cell-type" and len(names) < 2:
        raise FinetuneDataError(f"obs[{label_key!r}] has a single class ({names}): a classifier needs at least two")
    is_vae = task == "vae" or (task == "adt" and protein_head == "nb")
    fields: dict = {"encoder": encoder}
    if task == "cell-type" and encoder == "transformer":  # an L1-penalised wide path unless the head says
        head = {"wide_path": True, "wide_l1": WIDE_L1, **(head or {})}
    choose_wide = (head or {}).get("wide_path") == "auto"
    if choose_wide:  # built with the path; training keeps it or not (see fit)
        head = {**head, "wide_path": True}
    if encoder == "mlp" or is_vae or (head or {}).get("wide_path"):
        fields["gene_panel"] = select_genes(adata, n_top_genes, gene_id_key=gene_id_key, layer=layer)
    raw = None
    if task == "adt":
        raw, proteins = protein_counts(adata, protein_obsm_key)
        fields.update(protein_norm=protein_norm, protein_reference=fit_protein_reference(raw, protein_norm))
    if is_vae:
        if prior == "auto":
            prior = "mixture" if names and task == "vae" else "normal"
        if prior == "mixture" and not names:
            raise FinetuneDataError("the mixture prior ties components to cell types: pass label_key")
        fields.update(prior=prior, batch_categories=sorted(require_obs(adata, batch_key).astype(str).unique())
                      if batch_key else [])
        if prior == "mixture":
            fields.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                          label_parents=_parents(adata, label_key, hierarchy_key, names, mask))
        if task == "adt":
            fields["proteins"] = proteins
        config_class, model_class = ExpressVAEConfig, ExpressForVAE
    else:
        labels = proteins if task == "adt" else names
        fields.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        if task == "adt":  # protein levels: multi-output regression through a hidden layer
            fields.update(problem_type="regression", classifier_hidden_size=128)
        config_class, model_class = ExpressConfig, ExpressForCellClassification
    fields.update(head or {})

    try:  # the config validates every field, those given in head= and transformer= included
        if pretrained:
            config = config_class(**{**_encoder_fields(base), **fields})
        elif encoder == "transformer":
            sizes = {"vocab_size": vocab.vocab_size, "group_level_sizes": vocab.n_groups,
                     "max_position_embeddings": max(512, spec.max_length + 8)}
            config = config_class(**sizes, **(transformer or {}), **fields)
        else:
            config = config_class(**fields)
    except ValueError as err:
        raise FinetuneDataError(str(err)) from None
    if pretrained:
        net = model_class.from_pretrained(model, config=config)
    else:
        net = model_class(config)
        if encoder == "transformer":
            net.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    net.vocab, net.tokenization = vocab, spec
    net.pretrained_encoder = pretrained
    net.choose_wide_path = choose_wide and not is_vae
    if raw is not None and is_vae:
        net.initialize_protein_means(torch.from_numpy(raw.mean(0)).float())
    if freeze_layers:
        net.freeze_encoder(None if freeze_layers < 0 else freeze_layers)
    return net


def cells_for(adata: ad.AnnData, model: ExpressHeadPreTrainedModel, **keys):
    """:func:`~finetune.data.cells_for_model` for a model built here (its vocabulary and tokenization)."""
    return cells_for_model(adata, model.config, vocab=model.vocab, spec=model.tokenization, **keys)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def _validation_metric(model, val_cells, collator, seed: int) -> dict[str, float]:
    """The loss on the held-back cells, and the task's own score: macro-F1 of the labelled cells (classifiers),
    mean per-protein Pearson (protein regression)."""
    from finetune import metrics as M

    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(val_cells, batch_size=256, collate_fn=collator)
    total, count, logits, labels = 0.0, 0, [], []
    # a private, seeded random stream: every process draws the same VAE samples, so all pick the same state
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in loader:
            out = model(**{k: v.to(device) for k, v in batch.items()})
            n = next(iter(batch.values())).shape[0]
            total, count = total + float(out.loss) * n, count + n
            if out.get("logits") is not None and "labels" in batch:
                logits.append(out.logits.float().cpu().numpy())
                labels.append(batch["labels"].numpy())
    metrics = {"eval/loss": total / max(count, 1)}
    if logits and model.config.problem_type == "regression":
        metrics["eval/pearson_per_protein"] = M.mean_pearson_per_protein(np.concatenate(logits),
                                                                         np.concatenate(labels))
    elif logits and not isinstance(model.config, ExpressVAEConfig):
        y, pred = np.concatenate(labels), np.concatenate(logits).argmax(1)
        if (y >= 0).any():
            metrics["eval/macro_f1"] = M.macro_f1(y[y >= 0], pred[y >= 0])
    return metrics


def _best_score(history: list[dict]) -> float:
    """The validation score of the state a run kept (higher is better; -inf without validation cells)."""
    return next((h["score"] for h in reversed(history) if "best_step" in h), -np.inf)


def _keep_best(model: ExpressHeadPreTrainedModel, candidates: Sequence, train_one: Callable[[Any], list[dict]],
               use: Callable[[Any], None] = lambda candidate: None) -> tuple[Any, list[float], list[dict]]:
    """Train ``model`` once per candidate from the same start (``use(candidate)`` shapes the model, then
    ``train_one(candidate)`` trains it and returns its history) and leave it as the run whose validation cells scored
    best, the first on a tie. Returns that candidate, every candidate's score and the kept run's history."""
    start = copy.deepcopy(model.state_dict())
    trials = []
    for candidate in candidates:
        use(candidate)
        model.load_state_dict(start, strict=False)  # a candidate may leave a part out (the wide path)
        history = train_one(candidate)
        trials.append((_best_score(history), candidate, copy.deepcopy(model.state_dict()),
                       copy.deepcopy(model.config.class_weights), history))
    _, candidate, state, model.config.class_weights, history = max(trials, key=lambda t: t[0])
    use(candidate)
    model.load_state_dict(state)
    return candidate, [t[0] for t in trials], history


def fit(model: ExpressHeadPreTrainedModel, cells, settings: TrainSettings, *, validation_groups=None,
        cell_spec: TokenizationSpec | None = None, accelerator=None, progress: bool = True) -> list[dict]:
    """Train ``model`` on ``cells`` (:func:`cells_for`) with the shared loop (:func:`pretrain.loop.train`); returns
    the log history. With validation cells (whole groups of ``validation_groups`` when given), the state that
    scores best on them is kept (:attr:`TrainSettings.selection`; for the VAE from the end of the KL warm-up on).
    A model built with ``wide_path="auto"`` is trained with and without its wide path, and the better is kept.
    ``cell_spec``: how the cells were tokenized, with the genes they measure (thinning re-tokenizes with it)."""
    from pretrain.data import CellDataset, LengthGroupedBatchSampler, split_cells
    from pretrain.loop import LoopSettings, train
    from pretrain.pretraining import make_accelerator

    accelerator = accelerator or make_accelerator(cpu=False, mixed_precision="auto", gradient_accumulation_steps=1,
                                                  report_to="none", output_dir=Path("."))
    config = model.config
    is_vae = isinstance(config, ExpressVAEConfig)
    classifies = not is_vae and "labels" in cells.column_names and config.problem_type != "regression"
    again = functools.partial(fit, cells=cells, validation_groups=validation_groups, cell_spec=cell_spec,
                              accelerator=accelerator, progress=progress)
    if getattr(model, "choose_wide_path", False):
        from accelerate.utils import set_seed

        # with and without the wide path from the same start; the validation cells keep one (the path on a tie)
        model.choose_wide_path, wide = False, model.wide

        def use_path(on: bool) -> None:
            model.wide, config.wide_path = (wide if on else None), on

        def with_path(on: bool) -> list[dict]:
            set_seed(settings.seed)  # both runs draw the same random stream: they differ by the path alone
            return again(model, settings=settings)

        on, scores, history = _keep_best(model, (True, False), with_path, use_path)
        if not on and config.encoder == "transformer":  # the transformer alone reads no panel
            config.gene_panel = []
        logger.info("wide path %s chosen on the validation cells (scores %s)", "kept" if on else "left out", scores)
        return history + [{"wide_path": on, "candidates": {"with": scores[0], "without": scores[1]}}]
    if settings.class_weighting == "auto" and classifies:
        method, scores, history = _keep_best(
            model, CLASS_WEIGHTINGS,
            lambda method: again(model, settings=dataclasses.replace(settings, class_weighting=method)))
        logger.info("class weighting %s chosen on the validation cells (scores %s)", method, scores)
        return history + [{"class_weighting": method, "candidates": dict(zip(CLASS_WEIGHTINGS, scores))}]
    if validation_groups is not None and len(np.unique(np.asarray(validation_groups).astype(str))) < 2:
        logger.info("obs[%r] has a single group: validating on random cells instead", settings.validation_key)
        validation_groups = None
    train_idx, val_idx = split_cells(len(cells), settings.validation_fraction, settings.seed,
                                     groups=validation_groups)
    if len(val_idx) < 10 or len(train_idx) < 10:  # too few to tell epochs apart: keep the last
        train_idx, val_idx = np.arange(len(cells)), np.zeros(0, dtype=np.int64)
    if classifies:
        labels = np.asarray(cells.with_format("numpy")["labels"])[train_idx]
        config.class_weights = class_weights(labels, config.num_labels, settings.class_weighting)
    collator = collator_for(config, model.vocab, cells)
    augmented = collator_for(config, model.vocab, cells, spec=cell_spec, thinning=settings.thinning) \
        if settings.thinning else collator
    train_cells, val_cells = CellDataset([cells], [train_idx]), CellDataset([cells], [val_idx])
    processes = accelerator.num_processes
    batch_size = min(settings.batch_size, max(len(train_idx) // processes, 1))
    # shuffled batches of any length (length-sorted batches would group cells by depth, and so often by type),
    # keeping the last short batch: small sets lose no cells
    sampler = LengthGroupedBatchSampler(train_cells.lengths, batch_size, seed=settings.seed, num_replicas=processes,
                                        rank=accelerator.process_index, group_by_length=False, drop_last=False,
                                        even_shards=True)
    steps_per_epoch = sampler.batches_per_replica(0)
    total = settings.max_steps or max(settings.epochs * steps_per_epoch, settings.min_steps)
    if is_vae:
        config.kl_warmup_steps = max(int(settings.kl_warmup_ratio * total), 1)
        config.n_train_cells = len(train_idx)
    encoder_lr = settings.encoder_lr
    if encoder_lr is None:  # a pretrained encoder moves slower than the new head, so it keeps what it learned
        kind = "regression" if config.problem_type == "regression" else "classification"
        encoder_lr = settings.lr / PRETRAINED_ENCODER_LR_DIVISOR[kind] if getattr(model, "pretrained_encoder", False) \
            else settings.lr
    evaluations: list[dict] = []

    def validate(unwrapped) -> dict[str, float]:
        evaluations.append(_validation_metric(unwrapped, val_cells, collator, settings.seed + len(evaluations)))
        return evaluations[-1]

    metric = "eval/loss"
    if settings.selection == "auto" and len(val_idx):
        probe = _validation_metric(model, CellDataset([cells], [val_idx[:2]]), collator, settings.seed)
        metric = next((m for m in ("eval/macro_f1", "eval/pearson_per_protein") if m in probe), metric)
    eval_every = min(steps_per_epoch, max(total // 10, 1))  # at least every epoch and ten times in a run
    loop = LoopSettings(
        max_steps=total, learning_rate=settings.lr, encoder_learning_rate=encoder_lr,
        weight_decay=settings.weight_decay, max_grad_norm=settings.grad_clip,
        warmup_steps=int(settings.warmup_ratio * total), logging_steps=max(eval_every, 1),
        eval_steps=eval_every if len(val_idx) else 0, select_metric=metric if len(val_idx) else None,
        select_mode="min" if metric == "eval/loss" else "max", select_from_step=config.kl_warmup_steps if is_vae
        else 0, progress_bar=progress, description="fine-tuning",
    )
    loader = torch.utils.data.DataLoader(train_cells, batch_sampler=sampler, collate_fn=augmented,
                                         generator=torch.Generator())
    result = train(model, loader, accelerator, loop, evaluate=validate if len(val_idx) else None)
    history = list(result.log_history)
    if result.best:
        history.append({"best_step": result.best["step"], "metric": metric, "score": result.best[metric]
                        if metric != "eval/loss" else -result.best[metric]})
    return history


def check_training_cells(cells, config) -> None:
    """Refuse a training set too small to learn from, and warn about classes with very few cells."""
    if len(cells) < MIN_TRAINING_CELLS:
        raise FinetuneDataError(f"only {len(cells)} training cells: fine-tuning needs at least {MIN_TRAINING_CELLS}")
    if "labels" in cells.column_names and config.problem_type != "regression" and config.id2label:
        labels = np.asarray(cells.with_format("numpy")["labels"])
        if not (labels >= 0).any():
            raise FinetuneDataError("no training cell carries one of the label categories")
        counts = np.bincount(labels[labels >= 0], minlength=len(config.id2label))
        few = [config.id2label[i] for i in np.flatnonzero(counts < MIN_CELLS_PER_CLASS)]
        if few:
            logger.warning("%d classes have fewer than %d training cells (%s): expect them to be predicted poorly",
                           len(few), MIN_CELLS_PER_CLASS, ", ".join(map(str, few[:5])))


def train_model(task: str, adata: ad.AnnData, settings: TrainSettings, *, accelerator=None, progress: bool = True,
                **kwargs) -> ExpressHeadPreTrainedModel:
    """Build the head for ``task`` on ``adata`` (:func:`prepare_model`, which ``kwargs`` go to), check the training
    cells, and train it (:func:`fit`); the returned model carries ``model.history``."""
    net = prepare_model(task, adata, **kwargs)
    keys = {k: kwargs.get(k) for k in ("label_key", "batch_key", "protein_obsm_key", "gene_id_key", "layer",
                                       "labelled_key")}
    if isinstance(net.config, ExpressVAEConfig) and net.config.prior != "mixture":
        keys["label_key"] = keys["labelled_key"] = None  # a normal prior reads no labels
    unlabelled = [kwargs["unlabelled_category"]] if kwargs.get("unlabelled_category") is not None else []
    tokens = net.config.encoder == "transformer"
    cells = cells_for(adata, net, unlabelled=unlabelled, keep_counts=tokens and settings.thinning > 0, **keys)
    check_training_cells(cells, net.config)
    key = validation_key(adata, settings.validation_key)
    groups = require_obs(adata, key).to_numpy() if key else None
    spec = measured_spec(adata, net.vocab, net.tokenization, gene_id_key=keys["gene_id_key"]) if tokens else None
    net.history = fit(net, cells, settings, validation_groups=groups, cell_spec=spec, accelerator=accelerator,
                      progress=progress)
    return net


def _train(task: str, adata: ad.AnnData, training: dict, **kwargs) -> ExpressHeadPreTrainedModel:
    from accelerate.utils import set_seed

    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(training) - known)
    if unknown:
        import inspect

        heads = set(inspect.signature(ExpressConfig.__init__).parameters) | \
            set(inspect.signature(ExpressVAEConfig.__init__).parameters)
        hint = " (head settings go in head={...})" if set(unknown) & heads else ""
        raise TypeError(f"unknown training option(s) {unknown}{hint}; training options: {sorted(known)}")
    settings = TrainSettings(**training)
    set_seed(settings.seed)
    return train_model(task, adata, settings, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------------
def fit_cell_types(
    adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    label_key: str = "cell_type", gene_id_key: str | None = None, layer: str | None = None,
    n_top_genes: int | None = 2000, freeze_layers: int = 0, unlabelled_category: str | None = None,
    head: dict | None = None, transformer: dict | None = None, tokenization: dict | None = None, **training,
) -> ExpressHeadPreTrainedModel:
    """Fine-tune a cell-type classifier on ``adata`` (raw counts) and return it.

    With the transformer encoder the classifier may have a wide path: a linear model on the log-normalised
    ``n_top_genes`` HVGs added to the transformer's logits. By default (``head={"wide_path": True, "wide_l1":
    WIDE_L1}``) it has the path with an L1 penalty on its weights (0.03 per unit of ``sum |W|``); ``False`` is the
    transformer alone and ``"auto"`` trains with and without the path and keeps the one its validation cells score
    better. Chosen on held-out training donors of Kang 2018 (never the benchmark's test donors), 4 runs (2 donors x 2
    seeds) per setting, macro-F1 against the transformer alone: with 1,000 labelled cells the unpenalised path gained
    +0.056 and the L1 path (0.03) +0.070 (4 of 4); with 100, the unpenalised path lost -0.046 (won 1 of 4) and the L1
    path gained +0.051 (3 of 4). The penalty was scanned from 1e-4 to about 0.1 (the best summed gain near 0.03)."""
    return _train("cell-type", adata, training, model=model, encoder=encoder, label_key=label_key,
                  gene_id_key=gene_id_key, layer=layer, n_top_genes=n_top_genes, freeze_layers=freeze_layers,
                  unlabelled_category=unlabelled_category, head=head, transformer=transformer,
                  tokenization=tokenization)


def train_vae(
    adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    label_key: str | None = None, batch_key: str | None = None, hierarchy_key: str | None = None,
    labelled_key: str | None = None, unlabelled_category: str | None = None, prior: str = "auto",
    gene_id_key: str | None = None, layer: str | None = None, n_top_genes: int | None = 2000,
    freeze_layers: int = 0, head: dict | None = None, transformer: dict | None = None,
    tokenization: dict | None = None, **training,
) -> ExpressHeadPreTrainedModel:
    """Train the VAE/IWAE head (``head={"objective": "iwae", "n_importance_samples": K}`` for IWAE). With
    ``label_key`` the prior is a Gaussian mixture over cell types (semi-supervised: cells without a label, with
    ``unlabelled_category``, or with ``obs[labelled_key]`` False use the whole mixture, and their labels are never
    read)."""
    return _train("vae", adata, training, model=model, encoder=encoder, label_key=label_key, batch_key=batch_key,
                  hierarchy_key=hierarchy_key, labelled_key=labelled_key, unlabelled_category=unlabelled_category,
                  prior=prior, gene_id_key=gene_id_key, layer=layer, n_top_genes=n_top_genes,
                  freeze_layers=freeze_layers, head=head, transformer=transformer, tokenization=tokenization)


def fit_proteins(
    adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    protein_obsm_key: str = "protein_counts", protein_head: str = "regression", protein_norm: str = "clr",
    batch_key: str | None = None, gene_id_key: str | None = None, layer: str | None = None,
    n_top_genes: int | None = 2000, freeze_layers: int = 0, head: dict | None = None,
    transformer: dict | None = None, tokenization: dict | None = None, **training,
) -> ExpressHeadPreTrainedModel:
    """Fit surface-protein prediction from RNA: ``protein_head="regression"`` (normalised levels) or ``"nb"`` (the
    multimodal VAE with an NB protein decoder)."""
    return _train("adt", adata, training, model=model, encoder=encoder, protein_obsm_key=protein_obsm_key,
                  protein_head=protein_head, protein_norm=protein_norm, batch_key=batch_key,
                  gene_id_key=gene_id_key, layer=layer, n_top_genes=n_top_genes, freeze_layers=freeze_layers,
                  head=head, transformer=transformer, tokenization=tokenization)


def outputs(adata: ad.AnnData, model: ExpressHeadPreTrainedModel, *, batch_key: str | None = None,
            gene_id_key: str | None = None, layer: str | None = None, seed: int = 0, method: str | None = None,
            **method_kwargs) -> dict[str, np.ndarray]:
    """Every cell's outputs (``embedding``, ``logits``, ``protein_predictions``, ... as the head gives them), or
    ``method``'s (e.g. ``"marginal_log_likelihood"``), batched through the shared dataset and collator."""
    from pretrain.data import CellDataset
    from pretrain.loop import predict

    cells = cells_for(adata, model, batch_key=batch_key if getattr(model.config, "batch_categories", None) else None,
                      gene_id_key=gene_id_key, layer=layer)
    return predict(model, CellDataset([cells]), collator_for(model.config, model.vocab, cells), seed=seed,
                   method=method, **method_kwargs)


def embed(adata: ad.AnnData, model: ExpressHeadPreTrainedModel, *, key_added: str = "X_express",
          batch_key: str | None = None, gene_id_key: str | None = None, layer: str | None = None) -> np.ndarray:
    """Cell embeddings into ``obsm[key_added]``: the VAE's posterior mean, or the encoder's pooled output."""
    out = outputs(adata, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer)
    adata.obsm[key_added] = out["embedding"]
    return out["embedding"]


def predict_cell_types(adata: ad.AnnData, model: ExpressHeadPreTrainedModel, *, key_added: str = "express_cell_type",
                       gene_id_key: str | None = None, layer: str | None = None) -> pd.Series:
    """Predicted cell types into ``obs[key_added]`` (categorical), the winning probability into
    ``obs[key_added + '_probability']`` and all class probabilities into ``obsm[key_added + '_probabilities']``
    (a DataFrame with one column per cell type). Works for the classifier and the mixture-prior VAE."""
    out = outputs(adata, model, gene_id_key=gene_id_key, layer=layer)
    if "logits" not in out or model.config.problem_type == "regression":
        raise ValueError("this model does not classify cells (use a cell-type model or a VAE with a mixture prior)")
    probabilities = torch.softmax(torch.from_numpy(out["logits"]).double(), -1).numpy()
    names = [model.config.id2label[i] for i in range(probabilities.shape[1])]
    best = probabilities.argmax(1)
    adata.obs[key_added] = pd.Categorical([names[i] for i in best], categories=names)
    adata.obs[f"{key_added}_probability"] = probabilities.max(1)
    adata.obsm[f"{key_added}_probabilities"] = pd.DataFrame(probabilities, index=adata.obs_names, columns=names)
    return adata.obs[key_added]


def predict_proteins(adata: ad.AnnData, model: ExpressHeadPreTrainedModel, *, key_added: str = "express_protein",
                     batch_key: str | None = None, gene_id_key: str | None = None,
                     layer: str | None = None) -> pd.DataFrame:
    """Predicted normalised protein levels (``config.protein_norm`` scale) into ``obsm[key_added]`` (a DataFrame,
    one column per protein)."""
    regression = model.config.problem_type == "regression"
    proteins = [model.config.id2label[i] for i in sorted(model.config.id2label)] if regression else \
        list(getattr(model.config, "proteins", []))
    if not proteins:
        raise ValueError("this model does not predict proteins (fit one with fit_proteins)")
    out = outputs(adata, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer)
    frame = pd.DataFrame(out["logits" if regression else "protein_predictions"], index=adata.obs_names,
                         columns=proteins)
    adata.obsm[key_added] = frame
    return frame


def marginal_log_likelihood(adata: ad.AnnData, model: ExpressHeadPreTrainedModel, *, n_samples: int = 100,
                            batch_key: str | None = None, key_added: str | None = "express_marginal_ll",
                            gene_id_key: str | None = None, layer: str | None = None, seed: int = 0) -> np.ndarray:
    """Importance-sampled ``log p(x)`` per cell (nats) over the decoder genes, into ``obs[key_added]``."""
    if not hasattr(model, "marginal_log_likelihood"):
        raise ValueError("the marginal log-likelihood needs a VAE")
    out = outputs(adata, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer, seed=seed,
                  method="marginal_log_likelihood", n_samples=n_samples)["marginal_log_likelihood"]
    if key_added:
        adata.obs[key_added] = out
    return out


def save_model(model: ExpressHeadPreTrainedModel, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``save_pretrained`` into ``path`` (written to a temporary folder, then renamed), with the vocabulary and the
    tokenization spec beside the weights for the transformer encoder."""
    from tokenizer.output import staged_dir

    path = Path(path)
    with staged_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if getattr(model, "vocab", None) is not None:
            model.vocab.save(tmp)
            model.tokenization.save(tmp)
    return path


def load_model(path: str | os.PathLike) -> ExpressHeadPreTrainedModel:
    """Reload a model written by :func:`save_model` through the Auto classes: a VAE config answers to
    ``AutoModel``, a classifier or regressor to ``AutoModelForSequenceClassification``."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FinetuneDataError(f"{path} holds no saved model (no config.json)")
    config = AutoConfig.from_pretrained(path)
    auto = AutoModel if isinstance(config, ExpressVAEConfig) else AutoModelForSequenceClassification
    model = auto.from_pretrained(path)
    model.vocab = model.tokenization = None
    if config.encoder == "transformer":
        model.vocab = GeneVocab.load(path)
        model.tokenization = TokenizationSpec.load(path)
    model.eval()
    return model


__all__ = [
    "TrainSettings", "cells_for", "check_training_cells", "class_weights", "embed", "fit", "fit_cell_types",
    "fit_proteins", "load_model",
    "marginal_log_likelihood", "outputs", "predict_cell_types", "predict_proteins", "prepare_model", "save_model",
    "train_model", "train_vae",
]
