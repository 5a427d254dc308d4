"""Fine-tune express on a raw-count h5ad: cell types, a VAE/IWAE latent space, or surface proteins (ADT).

    express-finetune --task cell-type --model PRETRAINED_DIR --data train.h5ad --eval_data test.h5ad \\
        --label_key cell_type --output_dir out/celltype

    # the scVI-like baseline with identical heads (no transformer), held-out donors from one file, on CPU:
    express-finetune --task vae --model none --encoder mlp --data cite.h5ad --split_key batch \\
        --test_values s1d2 --label_key cell_type --batch_key batch --output_dir out/vae

    express-finetune --task adt --model none --encoder mlp --data cite.h5ad --split_key batch \\
        --test_values s1d2 --protein_obsm_key protein_counts --output_dir out/adt

    # several processes / GPUs (the same as python finetune/run.py ...):
    accelerate launch finetune/run.py --task cell-type ...

``--model none`` with the transformer encoder fits a vocabulary on the training cells and starts from random
weights ("express without pretraining"). Writes ``OUTPUT_DIR/metrics.json`` (held-out metrics), ``predictions.csv``,
``history.json``, ``args.json``, PNG plots and the fine-tuned model in ``OUTPUT_DIR/model`` (``save_pretrained``,
with the vocabulary and tokenization beside it for the transformer encoder). The folder appears only when the run
succeeds; an existing one is replaced only with ``--overwrite``. Bad input exits with code 2 and a one-line message
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger("finetune.run")


@dataclass
class FinetuneArgs:
    """Fine-tune express: cell types, VAE/IWAE, or ADT prediction."""

    task: Literal["cell-type", "vae", "adt"] = field(default="cell-type", metadata={"help": "what to fine-tune"})
    data: str | None = field(default=None, metadata={"help": "training h5ad (raw counts); required"})
    output_dir: str | None = field(default=None, metadata={"help": "where metrics, plots and the model go; required"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
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
    # heads (config fields of ExpressConfig / ExpressVAEConfig)
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
    classification_weight: float = field(default=50.0, metadata={"help": "weight of p(c|z) cross-entropy (VAE)"})
    mll_samples: int = field(default=100, metadata={"help": "importance samples for held-out marginal LL"})
    mlp_hidden: int = field(default=256, metadata={"help": "MLP encoder width"})
    mlp_layers: int = field(default=2, metadata={"help": "MLP encoder depth"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the MLP encoder and heads"})
    input_dropout: float = field(default=0.0, metadata={"help": "dropout on the MLP encoder's input genes"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cell-type loss"})
    wide_path: Literal["true", "false", "auto"] | None = field(default=None, metadata={
        "nargs": "?", "const": "true",
        "help": "a linear model on the log-normalised HVGs (--n_top_genes) added to the head's output (a 'wide' path "
                "beside the encoder); auto: trained with and without, the better on the validation cells kept. "
                "Default: true (with --wide_l1) for cell types with the transformer encoder (false: the transformer "
                "alone), off for protein regression"})
    wide_l1: float | None = field(default=None, metadata={
        "help": "L1 penalty on the wide path's weights (wide_l1 * sum |W| added to the loss). Default: the library's "
                "for cell types on the transformer (finetune.api.WIDE_L1), else 0"})
    freeze_layers: int = field(default=0, metadata={"help": "freeze the lower N transformer layers; -1 = all"})
    # transformer built from scratch (--model none)
    hidden_size: int = field(default=128, metadata={"help": "transformer width when --model none"})
    num_hidden_layers: int = field(default=4, metadata={"help": "transformer depth when --model none"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads when --model none"})
    tokenization: str | None = field(default=None, metadata={
        "help": "JSON file or inline JSON of TokenizationSpec fields (e.g. '{\"top_k\": 128}') overriding how the "
                "transformer tokenizes cells (default: as the pretrained model's corpus, else the tokenizer's "
                "defaults)"})
    # optimisation (finetune.api.TrainSettings)
    epochs: int = field(default=20, metadata={"help": "passes over the training cells"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    batch_size: int = field(default=64, metadata={"help": "cells per step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the heads (and MLP encoder)"})
    encoder_lr: float | None = field(default=None, metadata={"help": "encoder lr (default for a pretrained "
                                                                          "encoder: --lr / 3, --lr / 10 for protein "
                                                                          "regression; else --lr)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    kl_warmup_ratio: float = field(default=0.3, metadata={"help": "share of steps over which KL weight rises to 1"})
    class_weighting: Literal["none", "balanced", "sqrt", "auto"] = field(default="balanced", metadata={
        "help": "cell-type loss weights per class from the training labels: balanced = n / (C * n_c), sqrt = its "
                "square root (small classes count more, as they do in macro-F1), auto = the best of the three on "
                "the validation cells"})
    min_steps: int = field(default=500, metadata={"help": "the fewest optimizer steps, whatever --epochs gives"})
    thinning: float = field(default=0.0, metadata={
        "help": "augmentation: each training visit keeps every count with a probability in [1 - thinning, 1)"})
    selection: Literal["auto", "loss"] = field(default="auto", metadata={
        "help": "what picks the epoch on the validation cells: auto = macro-F1 (cell types), per-protein Pearson "
                "(proteins), the loss (VAE)"})
    validation_key: str | None = field(default="auto", metadata={
        "help": "obs column whose groups (donors, batches) the validation cells are held out by, whole; auto: the "
                "first of donor, batch, sample with two or more groups in the training cells, else random cells"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of an error"})

    def __post_init__(self) -> None:
        from tokenizer import InputError

        missing = [f"--{name}" for name in ("data", "output_dir") if not getattr(self, name)]
        if missing:
            raise InputError(f"finetune/run.py needs {' and '.join(missing)}")
        if self.task == "adt" and not self.protein_obsm_key:
            raise InputError("--task adt needs --protein_obsm_key (the obsm entry holding raw protein counts)")
        if self.task == "cell-type" and not self.label_key:
            raise InputError("--task cell-type needs --label_key (the obs column of cell types)")
        if self.objective == "iwae" and self.n_samples < 2:
            raise InputError("--objective iwae needs --n_samples K >= 2 importance samples")

    def head(self) -> dict:
        """The head's config fields these arguments set."""
        fields = {"mlp_hidden_size": self.mlp_hidden, "mlp_layers": self.mlp_layers, "head_dropout": self.dropout,
                  "input_dropout": self.input_dropout}
        if self.task == "cell-type":
            fields["label_smoothing"] = self.label_smoothing
        is_vae = self.task == "vae" or (self.task == "adt" and self.protein_head == "nb")
        if self.wide_path is not None and not is_vae:
            fields["wide_path"] = {"true": True, "false": False}.get(self.wide_path, self.wide_path)
        if self.wide_l1 is not None and not is_vae:
            fields["wide_l1"] = self.wide_l1
        if is_vae:
            fields.update(n_latent=self.n_latent, covariance=self.covariance, likelihood=self.likelihood,
                          dispersion=self.dispersion, objective=self.objective, n_importance_samples=self.n_samples,
                          dreg=self.dreg, classification_weight=self.classification_weight)
        return fields


def _load_split(args: FinetuneArgs):
    from finetune.data import FinetuneDataError, load_h5ad, split_adata

    adata = load_h5ad(args.data)
    if args.eval_data is not None:
        if args.split_key is not None:
            raise FinetuneDataError("give either --eval_data or --split_key/--test_values, not both")
        return adata, load_h5ad(args.eval_data)
    if args.split_key is None or not args.test_values:
        raise FinetuneDataError("held-out cells are needed: pass --eval_data FILE or --split_key KEY --test_values "
                                "v1,v2")
    return split_adata(adata, args.split_key, [v.strip() for v in args.test_values.split(",") if v.strip()])


def _tokenization(text: str | None) -> dict | None:
    if not text:
        return None
    path = Path(text)
    data = json.loads(path.read_text() if path.is_file() else text)
    if not isinstance(data, dict):
        from tokenizer import InputError

        raise InputError("--tokenization must be a JSON object of TokenizationSpec fields")
    return data


def main(args: FinetuneArgs) -> dict:
    """Run one fine-tuning job; returns the metrics written to ``OUTPUT_DIR/metrics.json``."""
    import torch
    from accelerate.utils import set_seed

    from finetune import api
    from finetune.evaluate import held_out_metrics, write_plots
    from pretrain.args import args_to_dict
    from pretrain.pretraining import make_accelerator
    from tokenizer.output import check_output, staged_dir, write_bytes

    out = Path(args.output_dir)
    check_output(out, args.overwrite)  # before any work: an existing output is refused without --overwrite
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    set_seed(args.seed)
    accelerator = make_accelerator(cpu=False, mixed_precision="auto", gradient_accumulation_steps=1,
                                   report_to="none", output_dir=out)
    train, test = _load_split(args)
    logger.info("%d training cells, %d held-out cells", train.n_obs, test.n_obs)
    transformer = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
                   "num_attention_heads": args.num_attention_heads, "intermediate_size": 2 * args.hidden_size}
    keys = dict(label_key=args.label_key, batch_key=args.batch_key, protein_obsm_key=args.protein_obsm_key,
                gene_id_key=args.gene_id_key, layer=args.layer)
    settings = api.TrainSettings(
        epochs=args.epochs, max_steps=args.max_steps, min_steps=args.min_steps, batch_size=args.batch_size,
        lr=args.lr, encoder_lr=args.encoder_lr, weight_decay=args.weight_decay, kl_warmup_ratio=args.kl_warmup_ratio,
        class_weighting=args.class_weighting, thinning=args.thinning, selection=args.selection,
        validation_key=args.validation_key, seed=args.seed,
    )
    model = api.train_model(
        args.task, train, settings, accelerator=accelerator, model=args.model, encoder=args.encoder,
        n_top_genes=args.n_top_genes, unlabelled_category=args.unlabelled_category, hierarchy_key=args.hierarchy_key,
        prior=args.prior, protein_head=args.protein_head, protein_norm=args.protein_norm,
        freeze_layers=args.freeze_layers, head=args.head(), transformer=transformer if args.model == "none" else None,
        tokenization=_tokenization(args.tokenization), **keys,
    )
    history = model.history
    if not accelerator.is_main_process:
        return {}  # evaluation and outputs happen once, on the main process
    metrics, predictions, extra = held_out_metrics(
        model, train, test, unlabelled_category=args.unlabelled_category, seed=args.seed,
        mll_samples=args.mll_samples if args.task == "vae" else 0, **keys,
    )
    metrics = {"task": args.task, "encoder": args.encoder, "model": args.model,
               "num_processes": accelerator.num_processes, **metrics}
    with staged_dir(out, overwrite=args.overwrite) as tmp:
        metrics["plots"] = write_plots(tmp, model, train, test, extra, task=args.task, label_key=args.label_key,
                                       batch_key=args.batch_key, donor_key=args.donor_key,
                                       gene_id_key=args.gene_id_key, layer=args.layer, seed=args.seed) \
            if args.plots else []
        api.save_model(model, tmp / "model")
        predictions.to_csv(tmp / "predictions.csv")
        write_bytes(tmp / "history.json", json.dumps(history, indent=2).encode())
        write_bytes(tmp / "args.json", json.dumps(args_to_dict(args), indent=2).encode())
        write_bytes(tmp / "metrics.json", json.dumps(metrics, indent=2, default=float).encode())
    logger.info("held-out metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    return metrics


def cli(argv: Sequence[str] | None = None) -> int:
    """``express-finetune`` / ``python finetune/run.py``: exit code 0, 2 for bad input (one line), 1 otherwise."""
    from pretrain.args import parse_args
    from tokenizer.errors import run_cli

    argv = list(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    return run_cli("express-finetune", lambda: main(parse_args(FinetuneArgs, argv, prog="express-finetune")),
                   debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(cli())
