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
    api.save_model(vae, "my_vae")               # save_pretrained (+ the vocabulary for the transformer)
    vae = api.load_model("my_vae")

``model`` is a pretrained express folder (the transformer encoder starts from its weights and tokenizes with its
vocabulary) or ``"none"``: the MLP encoder (``encoder="mlp"``), or a transformer from random weights with a
vocabulary fitted on ``adata`` ("express without pretraining"). Training options are the fields of
:class:`~finetune.trainer.TrainSettings` (``epochs``, ``lr``, ``batch_size``, ``objective``, ``n_samples``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from modeling import ExpressConfig
from modeling.modeling_vae import ExpressForCellTypes, ExpressForProteinRegression, ExpressForVAE, HeadSettings

from .data import (
    UNLABELLED,
    CellTable,
    FinetuneDataError,
    build_table,
    fit_protein_reference,
    label_categories,
    protein_counts,
    select_genes,
)
from .trainer import TrainSettings, fit, predict

logger = logging.getLogger(__name__)

HEAD_CLASSES = {cls.__name__: cls for cls in (ExpressForCellTypes, ExpressForVAE, ExpressForProteinRegression)}


# ---------------------------------------------------------------------------------------------------------------------
# Building a model for an AnnData
# ---------------------------------------------------------------------------------------------------------------------
def _vocab_for(model: str | os.PathLike, encoder: str, adata: ad.AnnData, gene_id_key, layer):
    if encoder != "transformer":
        return None
    from tokenizer import GeneVocab

    if str(model) != "none":
        return GeneVocab.load(model)
    from tokenizer.stats import fit_statistics

    logger.info("fitting a vocabulary on the %d training cells (transformer without pretraining)", adata.n_obs)
    return fit_statistics([adata], None, gene_id_key=gene_id_key, layer=layer, progress=False)


def _pretrained_tokenization(model: str | os.PathLike) -> dict:
    """How the pretrained model's corpus was tokenized (``tokenization.json`` beside its weights, written by
    ``pretrain/run.py``); empty (the tokenizer's defaults) for a folder without one."""
    from pretrain.data import TOKENIZATION_FILE

    path = Path(model) / TOKENIZATION_FILE
    if not path.is_file():
        logger.info("%s has no %s: new cells are tokenized with the tokenizer's defaults", model, TOKENIZATION_FILE)
        return {}
    return json.loads(path.read_text())


def _labels(adata, label_key, labelled_key, unlabelled_category) -> tuple[list[str], np.ndarray | None]:
    if label_key is None:
        return [], None
    if label_key not in adata.obs:
        raise FinetuneDataError(f"label key {label_key!r} is not an obs column; columns: {list(adata.obs.columns)}")
    values = adata.obs[label_key].astype(object).to_numpy()
    mask = np.ones(adata.n_obs, dtype=bool)
    if labelled_key is not None:
        if labelled_key not in adata.obs:
            raise FinetuneDataError(f"labelled key {labelled_key!r} is not an obs column")
        mask = adata.obs[labelled_key].to_numpy().astype(bool)
    unlabelled = [unlabelled_category] if unlabelled_category is not None else []
    names = label_categories(values[mask], unlabelled=unlabelled)  # only labelled cells define the classes
    if not names:
        raise FinetuneDataError(f"obs[{label_key!r}] has no labelled cells")
    return names, mask


def _parents(adata, label_key, hierarchy_key, names, mask) -> list[int] | None:
    if hierarchy_key is None:
        return None
    if hierarchy_key not in adata.obs:
        raise FinetuneDataError(f"hierarchy key {hierarchy_key!r} is not an obs column")
    pairs = pd.DataFrame({"fine": adata.obs[label_key].astype(str).to_numpy()[mask],
                          "coarse": adata.obs[hierarchy_key].astype(str).to_numpy()[mask]}).drop_duplicates()
    clash = pairs[pairs["fine"].duplicated(keep=False)]
    if len(clash):
        raise FinetuneDataError(
            f"cell type {clash['fine'].iloc[0]!r} has several parents in obs[{hierarchy_key!r}]: "
            f"{sorted(clash[clash['fine'] == clash['fine'].iloc[0]]['coarse'])}"
        )
    coarse = sorted(pairs["coarse"].unique())
    lookup = dict(zip(pairs["fine"], pairs["coarse"]))
    return [coarse.index(lookup[n]) for n in names]


def prepare_model(
    task: str, adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    label_key: str | None = None, batch_key: str | None = None, protein_obsm_key: str | None = None,
    gene_id_key: str | None = None, layer: str | None = None, n_top_genes: int | None = 2000,
    unlabelled_category: str | None = None, labelled_key: str | None = None, hierarchy_key: str | None = None,
    prior: str = "auto", protein_head: str = "regression", protein_norm: str = "clr", freeze_layers: int = 0,
    head: dict | None = None, transformer: dict | None = None, tokenize: dict | None = None,
) -> tuple[torch.nn.Module, CellTable]:
    """Build the head model for ``task`` ("cell-type", "vae", "adt") sized to ``adata`` and align ``adata`` to it.

    ``head``: further :class:`~modeling.modeling_vae.HeadSettings` fields (``n_latent``, ``covariance``, ...);
    ``transformer``: :class:`ExpressConfig` fields for a transformer built from scratch; ``tokenize``: arguments of
    ``tokenizer.tokenize_adata`` (``top_k``, ``n_zeros``) for the transformer encoder. For a pretrained model, those
    not given default to how its pretraining corpus was tokenized (its ``tokenization.json``), else to the
    tokenizer's defaults.
    """
    if task not in ("cell-type", "vae", "adt"):
        raise ValueError(f"task must be 'cell-type', 'vae' or 'adt', got {task!r}")
    if encoder not in ("transformer", "mlp"):
        raise ValueError(f"encoder must be 'transformer' or 'mlp', got {encoder!r}")
    if task == "cell-type" and label_key is None:
        raise ValueError("the cell-type task needs label_key (the obs column of cell types)")
    if task == "adt" and protein_obsm_key is None:
        raise ValueError("the adt task needs protein_obsm_key (the obsm entry of raw protein counts)")
    pretrained = str(model) != "none"
    if pretrained and encoder == "mlp":
        raise ValueError("the MLP encoder has no pretrained weights: use model='none' with encoder='mlp'")
    vocab = _vocab_for(model, encoder, adata, gene_id_key, layer)
    if pretrained:  # explicit arguments win over how the pretraining corpus was tokenized
        tokenize = {**_pretrained_tokenization(model), **(tokenize or {})}
    names, mask = _labels(adata, label_key, labelled_key, unlabelled_category)
    if prior == "auto":
        prior = "mixture" if names else "normal"
    if task == "vae" and prior == "mixture" and not names:
        raise ValueError("the mixture prior ties components to cell types: pass label_key")
    is_vae = task == "vae" or (task == "adt" and protein_head == "nb")
    genes = select_genes(adata, n_top_genes, gene_id_key=gene_id_key, layer=layer) \
        if (encoder == "mlp" or is_vae) else []
    proteins, reference = [], []
    if task == "adt":
        raw, proteins = protein_counts(adata, protein_obsm_key)
        reference = fit_protein_reference(raw, protein_norm)
    settings = HeadSettings(
        encoder=encoder, input_genes=genes if encoder == "mlp" else [], decoder_genes=genes if is_vae else [],
        prior=prior if task == "vae" else "normal",
        label_parents=_parents(adata, label_key, hierarchy_key, names, mask) if task == "vae" and names else None,
        batch_categories=sorted(adata.obs[batch_key].astype(str).unique()) if (batch_key and is_vae) else [],
        proteins=proteins, protein_head=protein_head, protein_norm=protein_norm, protein_reference=reference,
        tokenize=dict(tokenize or {}), **(head or {}),
    )
    cls = ExpressForCellTypes if task == "cell-type" else ExpressForVAE if is_vae else ExpressForProteinRegression
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
    if pretrained:
        config = ExpressConfig.from_pretrained(model)
        config.head = settings.to_dict()
        for key, value in labels.items():
            setattr(config, key, value)
        net = cls.from_pretrained(model, config=config)
    elif encoder == "transformer":
        config = ExpressConfig.from_vocab(vocab, head=settings.to_dict(), **labels, **(transformer or {}))
        net = cls(config)
        net.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    else:
        config = ExpressConfig(head=settings.to_dict(), **labels)
        net = cls(config)
    net.vocab = vocab
    net.pretrained_encoder = pretrained
    if task == "adt" and protein_head == "nb":
        net.initialize_protein_means(torch.from_numpy(raw.mean(0)).float())
    if freeze_layers:
        net.freeze_encoder(None if freeze_layers < 0 else freeze_layers)
    table = table_for(adata, net, label_key=label_key, batch_key=batch_key, protein_obsm_key=protein_obsm_key,
                      gene_id_key=gene_id_key, layer=layer, unlabelled_category=unlabelled_category,
                      labelled_key=labelled_key)
    return net, table


def table_for(
    adata: ad.AnnData, model: torch.nn.Module, *, label_key: str | None = None, batch_key: str | None = None,
    protein_obsm_key: str | None = None, gene_id_key: str | None = None, layer: str | None = None,
    unlabelled_category: str | None = None, labelled_key: str | None = None,
) -> CellTable:
    """``adata`` aligned to a (fine-tuned) model's genes, batches, classes and proteins."""
    settings = model.settings
    id2label = model.config.id2label if (label_key is not None) else {}
    names = [id2label[i] for i in sorted(id2label)] if id2label else []
    is_vae = isinstance(model, ExpressForVAE)
    return build_table(
        adata, settings, label_key=label_key, label_names=names, batch_key=batch_key,
        protein_key=protein_obsm_key if settings.proteins else None, gene_id_key=gene_id_key, layer=layer,
        vocab=getattr(model, "vocab", None), unlabelled=[unlabelled_category] if unlabelled_category else [],
        labelled_key=labelled_key, tokenize_kwargs=settings.tokenize, need_counts=is_vae,
    )


def token_collator_for(model: torch.nn.Module):
    """The shared padding collator (no masking) for a transformer encoder; None for the MLP encoder."""
    if model.settings.encoder != "transformer":
        return None
    from pretrain.data import ExpressCollator

    return ExpressCollator(model.vocab, mlm_probability=0.0)


def _train(task: str, adata: ad.AnnData, training: dict, **kwargs) -> torch.nn.Module:
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(training) - known)
    if unknown:
        heads = {f.name for f in dataclasses.fields(HeadSettings)}
        hint = " (head settings go in head={...})" if set(unknown) & heads else ""
        raise TypeError(f"unknown training option(s) {unknown}{hint}; training options: {sorted(known)}")
    settings = TrainSettings(**training)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    net, table = prepare_model(task, adata, **kwargs)
    if task == "cell-type" and not (table.labels >= 0).any():
        raise FinetuneDataError("no training cell carries one of the label categories")
    history = fit(net, table, settings, token_collator=token_collator_for(net))
    net.history = history
    return net


# ---------------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------------
def fit_cell_types(
    adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    label_key: str = "cell_type", gene_id_key: str | None = None, layer: str | None = None,
    n_top_genes: int | None = 2000, freeze_layers: int = 0, unlabelled_category: str | None = None,
    head: dict | None = None, transformer: dict | None = None, tokenize: dict | None = None, **training,
) -> ExpressForCellTypes:
    """Fine-tune a cell-type classifier on ``adata`` (raw counts) and return it."""
    return _train("cell-type", adata, training, model=model, encoder=encoder, label_key=label_key,
                  gene_id_key=gene_id_key, layer=layer, n_top_genes=n_top_genes, freeze_layers=freeze_layers,
                  unlabelled_category=unlabelled_category, head=head, transformer=transformer, tokenize=tokenize)


def train_vae(
    adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    label_key: str | None = None, batch_key: str | None = None, hierarchy_key: str | None = None,
    labelled_key: str | None = None, unlabelled_category: str | None = None, prior: str = "auto",
    gene_id_key: str | None = None, layer: str | None = None, n_top_genes: int | None = 2000,
    freeze_layers: int = 0, head: dict | None = None, transformer: dict | None = None, tokenize: dict | None = None,
    **training,
) -> ExpressForVAE:
    """Train the VAE/IWAE head (``objective="iwae", n_samples=K`` for IWAE). With ``label_key`` the prior is a
    Gaussian mixture over cell types (semi-supervised: cells without a label, with ``unlabelled_category``, or with
    ``obs[labelled_key]`` False use the whole mixture, and their labels are never read)."""
    return _train("vae", adata, training, model=model, encoder=encoder, label_key=label_key, batch_key=batch_key,
                  hierarchy_key=hierarchy_key, labelled_key=labelled_key, unlabelled_category=unlabelled_category,
                  prior=prior, gene_id_key=gene_id_key, layer=layer, n_top_genes=n_top_genes,
                  freeze_layers=freeze_layers, head=head, transformer=transformer, tokenize=tokenize)


def fit_proteins(
    adata: ad.AnnData, *, model: str | os.PathLike = "none", encoder: str = "transformer",
    protein_obsm_key: str = "protein_counts", protein_head: str = "regression", protein_norm: str = "clr",
    batch_key: str | None = None, gene_id_key: str | None = None, layer: str | None = None,
    n_top_genes: int | None = 2000, freeze_layers: int = 0, head: dict | None = None,
    transformer: dict | None = None, tokenize: dict | None = None, **training,
) -> torch.nn.Module:
    """Fit surface-protein prediction from RNA: ``protein_head="regression"`` (normalised levels) or ``"nb"`` (the
    multimodal VAE with an NB protein decoder)."""
    return _train("adt", adata, training, model=model, encoder=encoder, protein_obsm_key=protein_obsm_key,
                  protein_head=protein_head, protein_norm=protein_norm, batch_key=batch_key,
                  gene_id_key=gene_id_key, layer=layer, n_top_genes=n_top_genes, freeze_layers=freeze_layers,
                  head=head, transformer=transformer, tokenize=tokenize)


def _outputs(adata, model, *, batch_key=None, gene_id_key=None, layer=None, mll_samples=0, seed=0) -> dict:
    table = table_for(adata, model, batch_key=batch_key if model.settings.batch_categories else None,
                      gene_id_key=gene_id_key, layer=layer)
    return predict(model, table, token_collator=token_collator_for(model), mll_samples=mll_samples, seed=seed)


def embed(adata: ad.AnnData, model: torch.nn.Module, *, key_added: str = "X_express", batch_key: str | None = None,
          gene_id_key: str | None = None, layer: str | None = None) -> np.ndarray:
    """Cell embeddings into ``obsm[key_added]``: the VAE's posterior mean, or the encoder's pooled output."""
    out = _outputs(adata, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer)
    adata.obsm[key_added] = out["embedding"]
    return out["embedding"]


def predict_cell_types(adata: ad.AnnData, model: torch.nn.Module, *, key_added: str = "express_cell_type",
                       gene_id_key: str | None = None, layer: str | None = None) -> pd.Series:
    """Predicted cell types into ``obs[key_added]`` (categorical), the winning probability into
    ``obs[key_added + '_probability']`` and all class probabilities into ``obsm[key_added + '_probabilities']``
    (a DataFrame with one column per cell type). Works for the classifier and the mixture-prior VAE."""
    out = _outputs(adata, model, gene_id_key=gene_id_key, layer=layer)
    if "probabilities" not in out:
        raise ValueError("this model does not classify cells (use a cell-type model or a VAE with a mixture prior)")
    names = [model.config.id2label[i] for i in range(out["probabilities"].shape[1])]
    probs = pd.DataFrame(out["probabilities"], index=adata.obs_names, columns=names)
    best = out["probabilities"].argmax(1)
    adata.obs[key_added] = pd.Categorical([names[i] for i in best], categories=names)
    adata.obs[f"{key_added}_probability"] = out["probabilities"].max(1)
    adata.obsm[f"{key_added}_probabilities"] = probs
    return adata.obs[key_added]


def predict_proteins(adata: ad.AnnData, model: torch.nn.Module, *, key_added: str = "express_protein",
                     batch_key: str | None = None, gene_id_key: str | None = None,
                     layer: str | None = None) -> pd.DataFrame:
    """Predicted normalised protein levels (``model.settings.protein_norm`` scale) into ``obsm[key_added]`` (a
    DataFrame, one column per protein)."""
    if not model.settings.proteins:
        raise ValueError("this model does not predict proteins (fit one with fit_proteins)")
    out = _outputs(adata, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer)
    frame = pd.DataFrame(out["proteins"], index=adata.obs_names, columns=model.settings.proteins)
    adata.obsm[key_added] = frame
    return frame


def marginal_log_likelihood(adata: ad.AnnData, model: ExpressForVAE, *, n_samples: int = 100,
                            batch_key: str | None = None, key_added: str | None = "express_marginal_ll",
                            gene_id_key: str | None = None, layer: str | None = None, seed: int = 0) -> np.ndarray:
    """Importance-sampled ``log p(x)`` per cell (nats) over the decoder genes, into ``obs[key_added]``."""
    if not isinstance(model, ExpressForVAE):
        raise ValueError("the marginal log-likelihood needs a VAE")
    out = _outputs(adata, model, batch_key=batch_key, gene_id_key=gene_id_key, layer=layer, mll_samples=n_samples,
                   seed=seed)
    if key_added:
        adata.obs[key_added] = out["marginal_log_likelihood"]
    return out["marginal_log_likelihood"]


def save_model(model: torch.nn.Module, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``save_pretrained`` into ``path`` (written to a temporary folder, then renamed), with the vocabulary beside
    the weights for the transformer encoder."""
    from pretrain.training import atomic_directory

    path = Path(path)
    with atomic_directory(path, overwrite=overwrite, marker=False) as tmp:
        model.save_pretrained(tmp)
        if getattr(model, "vocab", None) is not None:
            model.vocab.save(tmp)
    return path


def load_model(path: str | os.PathLike) -> torch.nn.Module:
    """Reload a model written by :func:`save_model` (the head class is read from its ``config.json``)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} holds no saved model (no config.json)")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    cls = next((HEAD_CLASSES[a] for a in architectures if a in HEAD_CLASSES), None)
    if cls is None:
        raise ValueError(f"{path} holds {architectures}, not a fine-tuned express head ({sorted(HEAD_CLASSES)})")
    model = cls.from_pretrained(path)
    model.vocab = None
    if model.settings.encoder == "transformer":
        from tokenizer import GeneVocab

        model.vocab = GeneVocab.load(path)
    model.eval()
    return model


__all__ = [
    "UNLABELLED", "embed", "fit_cell_types", "fit_proteins", "load_model", "marginal_log_likelihood",
    "predict_cell_types", "predict_proteins", "prepare_model", "save_model", "table_for", "train_vae",
]
