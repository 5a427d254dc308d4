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

    task: Literal["cell-type", "vae", "adt"] = field(metadata={"help": "what to fine-tune"})
    data: str = field(metadata={"help": "training h5ad (raw counts)"})
    output_dir: str = field(metadata={"help": "where metrics, plots and the model go"})
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
    freeze_layers: int = field(default=0, metadata={"help": "freeze the lower N transformer layers; -1 = all"})
    # transformer built from scratch (--model none)
    hidden_size: int = field(default=128, metadata={"help": "transformer width when --model none"})
    num_hidden_layers: int = field(default=4, metadata={"help": "transformer depth when --model none"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads when --model none"})
    top_k: int = field(default=256, metadata={"help": "genes per cell when --model none tokenizes"})
    n_zeros: int = field(default=50, metadata={"help": "sampled zero genes per cell when --model none"})
    # optimisation
    epochs: int = field(default=20, metadata={"help": "passes over the training cells"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    batch_size: int = field(default=64, metadata={"help": "cells per step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the heads (and MLP encoder)"})
    encoder_lr: float | None = field(default=None, metadata={"help": "transformer lr (default lr / 10)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    kl_warmup_ratio: float = field(default=0.3, metadata={"help": "share of steps over which KL weight rises to 1"})
    classification_weight: float = field(default=1.0, metadata={"help": "weight of p(c|z) cross-entropy (VAE)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})
    overwrite: bool = field(default=True, metadata={"help": "replace an existing model folder"})


def main(args: FinetuneArgs) -> dict:
    """Run one fine-tuning job; returns the metrics written to ``OUTPUT_DIR/metrics.json``."""
    from .api import finetune_job  # heavy imports only once a job runs

    return finetune_job(args)


def cli(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(parse_args(FinetuneArgs, argv))


if __name__ == "__main__":
    if __package__ in (None, ""):
        from finetune.run import cli as _cli  # run as a package module so relative imports resolve

        _cli()
    else:
        cli()
