"""Fine-tune express on a raw-count h5ad: cell types, a VAE/IWAE latent space, or surface proteins (ADT).

    python finetune/run.py --task cell-type --model PRETRAINED_DIR --data train.h5ad --eval_data test.h5ad \\
        --label_key cell_type --output_dir out/celltype

    # the scVI-like baseline with identical heads (no transformer), held-out donors from one file, on CPU:
    python finetune/run.py --task vae --model none --encoder mlp --data cite.h5ad --split_key batch \\
        --test_values s1d2 --label_key cell_type --batch_key batch --output_dir out/vae

    python finetune/run.py --task adt --model none --encoder mlp --data cite.h5ad --split_key batch \\
        --test_values s1d2 --protein_obsm_key protein_counts --output_dir out/adt

    # several processes / GPUs:
    accelerate launch finetune/run.py --task cell-type ...

``--model none`` with the transformer encoder fits a vocabulary on the training cells and starts from random
weights ("express without pretraining"). Writes ``OUTPUT_DIR/metrics.json`` (held-out metrics), ``predictions.csv``,
``history.json``, ``args.json``, PNG plots and the fine-tuned model in ``OUTPUT_DIR/model`` (``save_pretrained``,
with the vocabulary beside it when the encoder is the transformer).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # `python finetune/run.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.training import args_to_dict, parse_args  # noqa: E402

logger = logging.getLogger("finetune.run")


@dataclass
class FinetuneArgs:
    """Fine-tune express: cell types, VAE/IWAE, or ADT prediction."""

    task: Literal["cell-type", "vae", "adt"] = field(default="cell-type", metadata={"help": "what to fine-tune"})
    data: str | None = field(default=None, metadata={"help": "training h5ad (raw counts); required"})
    output_dir: str | None = field(default=None, metadata={"help": "where metrics, plots and the model go; required"})
    model: str = field(default="none", metadata={"help": "pretrained express folder, or 'none'"})
    encoder: Literal["transformer", "mlp"] = field(default="transformer", metadata={"help": "cell encoder"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out h5ad"})
    split_key: str | None = field(default=None, metadata={"help": "obs column splitting --data into train/test"})
    test_values: str | None = field(default=None, metadata={"help": "comma-separated held-out values of split_key"})
    label_key: str | None = field(default=None, metadata={"help": "obs column with cell types"})
    unlabelled_category: str | None = field(default=None, metadata={"help": "label value meaning 'unlabelled'"})
    batch_key: str | None = field(default=None, metadata={"help": "obs column with batches (VAE decoder input)"})
    donor_key: str | None = field(default="donor", metadata={"help": "obs column coloured in the UMAPs if present"})
    protein_obsm_key: str | None = field(default=None, metadata={"help": "obsm key of raw protein counts (adt)"})
    gene_id_key: str | None = field(default=None, metadata={"help": "var column of gene ids (default var_names)"})
    layer: str | None = field(default=None, metadata={"help": "layer holding raw counts (default X)"})
    n_top_genes: int | None = field(default=2000, metadata={"help": "HVGs for the MLP input and VAE decoder"})
    # heads
    protein_head: Literal["regression", "nb"] = field(default="regression", metadata={"help": "ADT head"})
    protein_norm: Literal["clr", "clr_cell", "log1p_cpt"] = field(default="clr", metadata={"help": "ADT scale"})
    n_latent: int = field(default=16, metadata={"help": "VAE latent dimension"})
    covariance: Literal["diagonal", "full"] = field(default="diagonal", metadata={"help": "posterior covariance"})
    likelihood: Literal["nb", "zinb"] = field(default="nb", metadata={"help": "gene count likelihood"})
    dispersion: Literal["gene", "gene-batch"] = field(default="gene", metadata={"help": "inverse dispersion"})
    prior: Literal["auto", "normal", "mixture"] = field(
        default="auto", metadata={"help": "VAE prior; auto = mixture over cell types when --label_key is given"})
    hierarchy_key: str | None = field(default=None, metadata={"help": "obs column of coarse types (hyperprior)"})
    objective: Literal["elbo", "iwae"] = field(default="elbo", metadata={"help": "VAE objective"})
    n_samples: int = field(default=1, metadata={"help": "importance samples K for IWAE"})
    dreg: bool = field(default=True, metadata={"help": "DReG encoder gradient for IWAE"})
    mll_samples: int = field(default=100, metadata={"help": "importance samples for held-out marginal LL"})
    mlp_hidden: int = field(default=256, metadata={"help": "MLP encoder width"})
    mlp_layers: int = field(default=2, metadata={"help": "MLP encoder depth"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the MLP encoder and heads"})
    input_dropout: float = field(default=0.0, metadata={"help": "dropout on the MLP encoder's input genes"})
    freeze_layers: int = field(default=0, metadata={"help": "freeze the lower N transformer layers; -1 = all"})
    # transformer built from scratch (--model none)
    hidden_size: int = field(default=128, metadata={"help": "transformer width when --model none"})
    num_hidden_layers: int = field(default=4, metadata={"help": "transformer depth when --model none"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads when --model none"})
    top_k: int | None = field(default=None, metadata={
        "help": "genes per cell when tokenizing (default: as the pretrained model's corpus, else 256)"})
    n_zeros: int | None = field(default=None, metadata={
        "help": "sampled zero genes per cell (default: as the pretrained model's corpus, else 50)"})
    # optimisation
    epochs: int = field(default=20, metadata={"help": "passes over the training cells"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    batch_size: int = field(default=64, metadata={"help": "cells per step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the heads (and MLP encoder)"})
    encoder_lr: float | None = field(default=None, metadata={"help": "encoder lr (default lr / 10 if pretrained)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    kl_warmup_ratio: float = field(default=0.3, metadata={"help": "share of steps over which KL weight rises to 1"})
    classification_weight: float = field(default=50.0, metadata={"help": "weight of p(c|z) cross-entropy (VAE)"})
    class_weighting: Literal["none", "balanced", "sqrt"] = field(default="none", metadata={
        "help": "cell-type loss weights per class from the training labels: balanced = n / (C * n_c), sqrt = its "
                "square root (small classes count more, as they do in macro-F1)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cell-type loss"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})
    overwrite: bool = field(default=True, metadata={"help": "replace an existing model folder"})

    def __post_init__(self) -> None:
        missing = [f"--{name}" for name in ("data", "output_dir") if not getattr(self, name)]
        if missing:
            raise ValueError(f"finetune/run.py needs {' and '.join(missing)}")
        if self.task == "adt" and not self.protein_obsm_key:
            raise ValueError("--task adt needs --protein_obsm_key (the obsm entry holding raw protein counts)")
        if self.task == "cell-type" and not self.label_key:
            raise ValueError("--task cell-type needs --label_key (the obs column of cell types)")
        if self.objective == "iwae" and self.n_samples < 2:
            raise ValueError("--objective iwae needs --n_samples K >= 2 importance samples")


def _load_split(args: FinetuneArgs):
    from finetune.data import load_h5ad, split_adata

    adata = load_h5ad(args.data)
    if args.eval_data is not None:
        if args.split_key is not None:
            raise ValueError("give either --eval_data or --split_key/--test_values, not both")
        return adata, load_h5ad(args.eval_data)
    if args.split_key is None or not args.test_values:
        raise ValueError("held-out cells are needed: pass --eval_data FILE or --split_key KEY --test_values v1,v2")
    return split_adata(adata, args.split_key, [v.strip() for v in args.test_values.split(",") if v.strip()])


def _plots(args: FinetuneArgs, out: Path, cells, embedding, metrics_extra: dict) -> list[str]:
    """UMAP of training + held-out cells (coloured by split, cell type, batch, donor), confusion matrix, protein
    scatter."""
    from finetune import plots

    written = []
    colours = {"split": cells.obs["express_split"].to_numpy()}
    for key in (args.label_key, args.batch_key, args.donor_key):
        if key and key in cells.obs and key not in colours:
            colours[key] = cells.obs[key].astype(str).to_numpy()
    if cells.n_obs >= 5:
        coords = plots.umap_coordinates(embedding, seed=args.seed)
        written.append(str(plots.plot_umap(coords, colours, out / "umap.png", title=f"{args.task}:")))
    if "confusion" in metrics_extra:
        matrix, names = metrics_extra["confusion"]
        written.append(str(plots.plot_confusion(matrix, names, out / "confusion_matrix.png",
                                                title=f"{args.task} (held-out cells)")))
    if "proteins" in metrics_extra:
        pred, true, names = metrics_extra["proteins"]
        written.append(str(plots.plot_protein_scatter(pred, true, names, out / "protein_scatter.png",
                                                      title=f"ADT ({args.protein_head} head, {args.protein_norm})")))
    return written


def main(args: FinetuneArgs) -> dict:
    """Run one fine-tuning job; returns the metrics written to ``OUTPUT_DIR/metrics.json``."""
    import anndata
    import numpy as np
    import pandas as pd
    import torch

    from accelerate import Accelerator

    from finetune import api
    from finetune import metrics as M
    from finetune.data import normalize_proteins, protein_counts
    from finetune.trainer import TrainSettings, fit, predict
    from pretrain.training import seed_everything
    from tokenizer.vocab import atomic_write_bytes

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = _load_split(args)
    logger.info("%d training cells, %d held-out cells", train.n_obs, test.n_obs)
    transformer = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
                   "num_attention_heads": args.num_attention_heads, "intermediate_size": 2 * args.hidden_size,
                   "max_position_embeddings": max(512, (args.top_k or 0) + (args.n_zeros or 0) + 8)}
    tokenize = {k: v for k, v in (("top_k", args.top_k), ("n_zeros", args.n_zeros)) if v is not None}
    head = {"n_latent": args.n_latent, "covariance": args.covariance, "likelihood": args.likelihood,
            "dispersion": args.dispersion, "mlp_hidden": args.mlp_hidden, "mlp_layers": args.mlp_layers,
            "dropout": args.dropout, "input_dropout": args.input_dropout}
    model, table = api.prepare_model(
        args.task, train, model=args.model, encoder=args.encoder, label_key=args.label_key,
        batch_key=args.batch_key, protein_obsm_key=args.protein_obsm_key, gene_id_key=args.gene_id_key,
        layer=args.layer, n_top_genes=args.n_top_genes, unlabelled_category=args.unlabelled_category,
        hierarchy_key=args.hierarchy_key, prior=args.prior, protein_head=args.protein_head,
        protein_norm=args.protein_norm, freeze_layers=args.freeze_layers, head=head,
        transformer=transformer if args.model == "none" else None,
        tokenize=tokenize,  # what is not given: as the pretrained model's corpus, else the tokenizer's defaults
    )
    settings = TrainSettings(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        encoder_lr=args.encoder_lr, weight_decay=args.weight_decay, objective=args.objective,
        n_samples=args.n_samples, dreg=args.dreg, kl_warmup_ratio=args.kl_warmup_ratio,
        classification_weight=args.classification_weight, class_weighting=args.class_weighting,
        label_smoothing=args.label_smoothing, seed=args.seed,
    )
    collator = api.token_collator_for(model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    history = fit(model, table, settings, token_collator=collator, accelerator=accelerator)
    model = accelerator.unwrap_model(model)
    if not accelerator.is_main_process:
        return {}  # evaluation and outputs happen once, on the main process

    test_table = api.table_for(test, model, label_key=args.label_key, batch_key=args.batch_key,
                               protein_obsm_key=args.protein_obsm_key, gene_id_key=args.gene_id_key,
                               layer=args.layer, unlabelled_category=args.unlabelled_category)
    is_vae = model.__class__.__name__ == "ExpressForVAE"
    outputs = predict(model, test_table, token_collator=collator, seed=args.seed,
                      mll_samples=args.mll_samples if is_vae else 0)
    metrics: dict = {"task": args.task, "encoder": args.encoder, "model": args.model, "n_train": train.n_obs,
                     "n_test": test.n_obs, "num_processes": accelerator.num_processes}
    extra: dict = {}
    predictions = pd.DataFrame(index=test.obs_names)
    if "probabilities" in outputs and args.label_key:
        names = [model.config.id2label[i] for i in range(outputs["probabilities"].shape[1])]
        predicted = np.asarray(names)[outputs["probabilities"].argmax(1)]
        truth = test.obs[args.label_key].astype(str).to_numpy()
        known = truth != str(args.unlabelled_category) if args.unlabelled_category else np.ones(len(truth), bool)
        metrics.update(accuracy=M.accuracy(truth[known], predicted[known]),
                       macro_f1=M.macro_f1(truth[known], predicted[known]))
        majority = pd.Series(train.obs[args.label_key].astype(str)).value_counts().index[0]
        metrics.update(majority_accuracy=M.accuracy(truth[known], np.full(known.sum(), majority)),
                       majority_macro_f1=M.macro_f1(truth[known], np.full(known.sum(), majority)))
        metrics["unseen_test_types"] = sorted(set(truth[known]) - set(names))
        extra["confusion"] = M.confusion(truth[known], predicted[known])
        predictions["predicted_cell_type"] = predicted
        predictions["probability"] = outputs["probabilities"].max(1)
    if "proteins" in outputs:
        raw, names = protein_counts(test, args.protein_obsm_key, model.settings.proteins)
        truth = normalize_proteins(raw, model.settings.protein_norm, model.settings.protein_reference or None)
        metrics.update(M.protein_metrics(outputs["proteins"], truth))
        train_raw, _ = protein_counts(train, args.protein_obsm_key, model.settings.proteins)
        train_norm = normalize_proteins(train_raw, model.settings.protein_norm, model.settings.protein_reference or None)
        mean = np.tile(train_norm.mean(0), (test.n_obs, 1))
        metrics.update({f"mean_protein_{k}": v for k, v in M.protein_metrics(mean, truth).items()})
        metrics["protein_norm"] = model.settings.protein_norm
        extra["proteins"] = (outputs["proteins"], truth, names)
    if "marginal_log_likelihood" in outputs:
        metrics["marginal_log_likelihood"] = float(outputs["marginal_log_likelihood"].mean())
        metrics["mll_samples"] = args.mll_samples
        predictions["marginal_log_likelihood"] = outputs["marginal_log_likelihood"]
    labels = test.obs[args.label_key].astype(str).to_numpy() if args.label_key in test.obs else None
    batches = test.obs[args.batch_key].astype(str).to_numpy() if args.batch_key in test.obs else None
    if test.n_obs >= 20:
        metrics["embedding"] = M.embedding_metrics(outputs["embedding"], labels, batches, seed=args.seed)
    metrics["plots"] = []
    if args.plots:
        train_emb = predict(model, api.table_for(train, model, batch_key=args.batch_key, gene_id_key=args.gene_id_key,
                                                 layer=args.layer), token_collator=collator, seed=args.seed,
                            protein_samples=1)["embedding"]
        cells = anndata.concat({"train": train, "held-out": test}, label="express_split", join="inner")
        metrics["plots"] = _plots(args, out, cells, np.concatenate([train_emb, outputs["embedding"]]), extra)

    api.save_model(model, out / "model", overwrite=args.overwrite)
    predictions.to_csv(out / "predictions.csv")
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=2).encode())
    atomic_write_bytes(out / "args.json", json.dumps(args_to_dict(args), indent=2).encode())
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2, default=float).encode())
    logger.info("held-out metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    return metrics


def cli(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(parse_args(FinetuneArgs, argv))


if __name__ == "__main__":
    cli()
