"""Pretrain an express encoder: masked-gene modelling (MLM), molecular cross-validation (MCV) decoded from the cell
embedding, and a contrastive agreement of two views of each cell (the default recipe; see ``PretrainArgs``).

One CPU, one GPU, many GPUs or many nodes, with the same script (the loop is :func:`pretrain.loop.train`).

With no arguments it pretrains a small model on the built-in default data (scanpy's pbmc68k_reduced as raw counts,
tokenized into ``runs/pretrain_default/default_data`` on first use) in a few minutes on a CPU::

    express-pretrain                            # or: python pretrain/run.py, or: accelerate launch pretrain/run.py

Your own corpus (tokenized with ``express-tokenize tokenize --keep_counts``, all with one statistics folder)::

    accelerate launch pretrain/run.py --dataset tokens/a --dataset tokens/b --output_dir runs/mine \\
        --max_steps 20000 --save_steps 1000 --seed 0 [--resume] [--config args.yaml]

CPU, two processes (real gloo DDP; ``accelerate launch --cpu --num_processes 2`` would start only one)::

    accelerate launch --multi_gpu --num_processes 2 pretrain/run.py --output_dir runs/ddp_cpu
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 pretrain/run.py --output_dir runs/ddp_cpu

GPUs on one machine (bf16 is the default on GPUs that support it)::

    accelerate launch --multi_gpu --num_processes 8 pretrain/run.py --dataset ... --per_device_batch_size 64

Several machines (run on every node with its own ``--machine_rank``; ``--num_processes`` counts all GPUs)::

    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 \\
        --main_process_port 29500 --num_processes 16 pretrain/run.py --dataset ... --output_dir /shared/runs/big

Interrupted runs continue exactly with ``--resume`` (same output dir, same number of processes and batch size).
Outputs: ``OUT/checkpoint-<step>/`` (resumable), ``OUT/final/`` (``from_pretrained`` folder with the vocabulary, the
tokenization spec and a model card), ``OUT/loss_curve.png``, ``OUT/logs/`` (TensorBoard).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pretrain.args import args_to_dict, parse_args
from pretrain.checkpoints import CheckpointError, verify_checkpoint
from pretrain.data import (
    LengthGroupedBatchSampler,
    counted_training_cells,
    highly_variable_tokens,
    load_corpus,
    mean_profiles,
)
from pretrain.loop import LoopSettings, NonFiniteLossError, train
from pretrain.objectives import CELL_TYPE_COLUMN, evaluate, make_collator, parse_objectives
from pretrain.pretraining import (
    build_model,
    check_output_dir,
    make_accelerator,
    model_overrides,
    parameter_checksum,
    prepare_default_data,
)
from pretrain.report import write_final_model

logger = logging.getLogger("pretrain")

DEFAULT_OUTPUT_DIR = "runs/pretrain_default"

__all__ = ["NonFiniteLossError", "PretrainArgs", "cli", "main"]


@dataclass
class PretrainArgs:
    """Pretrain an express encoder on tokenized datasets with accelerate (defaults: the measured recipe)."""

    # --- data ---
    dataset: list[str] = field(default_factory=list, metadata={"action": "extend",
        "help": "tokenized dataset folder(s) (express-tokenize tokenize --keep_counts), all with one vocabulary; "
                "repeat the flag for several. None given: the built-in default data (pbmc68k_reduced)"})
    dataset_weights: list[float] | None = field(default=None, metadata={"action": "extend",
        "help": "sampling weight per dataset (each epoch draws cells in these proportions); default: by "
                "--dataset_mixing"})
    dataset_mixing: Literal["size", "sqrt", "equal"] = field(default="size", metadata={
        "help": "without --dataset_weights: draw datasets in proportion to their cells (every cell once per epoch), "
                "to the square root of their cells (small datasets drawn more often), or equally"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of each dataset's cells held out"})
    max_eval_cells: int | None = field(default=2000, metadata={"help": "cap on held-out cells per dataset"})
    max_length: int | None = field(default=None, metadata={"help": "truncate cells to this many tokens"})
    top_k: int | None = field(default=128, metadata={
        "help": "train on at most each cell's first top_k ranked genes (cells tokenized with more are cut; the model "
                "then tokenizes new cells so); none: as tokenized"})
    n_zeros: int | None = field(default=25, metadata={
        "help": "keep at most this many sampled zero genes per cell (0: none); none: as tokenized"})
    gene_selection: Literal["top", "random", "hvg"] = field(default="top", metadata={
        "help": "the input genes: the top-ranked ones; top_k detected genes drawn at random on every visit; or the "
                "top-ranked ones within a fixed panel of the corpus's --panel_genes most variable genes, which the "
                "model records so new cells are read through the same panel (the last two are ablations and need "
                "kept counts)"})
    panel_genes: int = field(default=2000, metadata={
        "help": "with --gene_selection hvg: the panel's size (highly variable genes of the training cells, found "
                "per dataset as for --mcv_output_genes)"})
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "where checkpoints, logs and final/ go"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh even if output_dir already holds checkpoints or a final model"})
    # --- model ---
    init_from: str | None = field(default=None, metadata={
        "help": "start from this saved model folder (weights and config) instead of a new model"})
    hidden_size: int = field(default=64, metadata={"help": "encoder width"})
    num_hidden_layers: int = field(default=2, metadata={"help": "encoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=128, metadata={"help": "feed-forward width"})
    dropout: float = field(default=0.02, metadata={"help": "hidden dropout (embeddings and residual branches)"})
    attention_dropout: float = field(default=0.0, metadata={
        "help": "dropout on attention probabilities (any > 0 sends CPU SDPA to its slow, unfused path)"})
    pooling: Literal["cls", "mean", "cls_mean"] = field(default="mean", metadata={
        "help": "the cell embedding: <cls>, the mean over detected genes, or both concatenated"})
    value_gating: bool = field(default=False, metadata={"help": "each gene's vector is gated by its own value"})
    gene_embedding_norm: bool = field(default=True, metadata={
        "help": "LayerNorm the gene identity before the value, rank and marker embeddings are added"})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON file (or inline JSON) of further ExpressConfig fields, overriding the ones above"})
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(default="sdpa", metadata={
        "help": "attention kernel (flash_attention_2 needs the flash-attn extra and a GPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    # --- objectives ---
    objectives: str = field(default="mlm,mcv,contrastive", metadata={
        "help": "comma-separated subset of mlm, mcv, count, contrastive, celltype (celltype needs --label_column)"})
    mlm_weight: float = field(default=1.0, metadata={"help": "weight of the masked-gene loss"})
    mcv_weight: float = field(default=1.0, metadata={"help": "weight of the MCV loss"})
    count_weight: float = field(default=1.0, metadata={"help": "weight of the masked-count loss"})
    contrastive_weight: float = field(default=1.0, metadata={"help": "weight of the contrastive loss"})
    celltype_weight: float = field(default=1.0, metadata={"help": "weight of the supervised cell-type loss"})
    label_column: str | None = field(default=None, metadata={
        "help": "celltype objective: the obs column of cell types carried in the datasets (tokenize with --obs_keys); "
                "cells without a label (or in datasets without the column) are not scored"})
    mlm_probability: float = field(default=0.15, metadata={"help": "share of detected genes masked per cell"})
    mcv_input_fraction: float = field(default=0.5, metadata={
        "help": "MCV: each count is split x' ~ Binomial(x, p) with this p; x' is the input, x - x' the target"})
    mcv_fraction_jitter: float = field(default=0.3, metadata={
        "help": "each visit draws its own p uniformly from mcv_input_fraction +- this"})
    mcv_unsplit_fraction: float = field(default=0.0, metadata={
        "help": "share of visits that read the whole cell and target the whole cell (the depth evaluation sees)"})
    mcv_input: Literal["cls", "pooled"] = field(default="pooled", metadata={
        "help": "MCV decodes the held-out counts from the <cls> state or from the pooled cell embedding"})
    mcv_normalization: Literal["count", "cell"] = field(default="cell", metadata={
        "help": "MCV loss per held-out count of the batch, or per cell (each cell's NLL per count, averaged)"})
    mcv_output_genes: int | None = field(default=2000, metadata={
        "help": "MCV predicts the held-out counts of the corpus's N most variable genes only (found from the "
                "training cells' counts, per dataset); 0: every gene"})
    mcv_source_genes: bool = field(default=True, metadata={
        "help": "spread the held-out library over the genes the cell's source file measures only"})
    contrastive_view: Literal["split", "noise"] = field(default="split", metadata={
        "help": "the second view: the other half of the binomial split, or noisy values"})
    contrastive_temperature: float = field(default=0.1, metadata={"help": "softmax temperature of InfoNCE"})
    # --- optimisation ---
    per_device_batch_size: int = field(default=16, metadata={"help": "cells per process per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=150, metadata={"help": "optimizer steps (sets the learning-rate schedule)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = field(default=None, metadata={"help": "warmup steps (default: warmup_ratio)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warmup as a share of max_steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a share of the peak"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "auto: what `accelerate launch --mixed_precision` says, else bf16 on a GPU that supports it, else no"})
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a GPU is present"})
    seed: int = field(default=42, metadata={"help": "seeds the model, the held-out split, the data order and masks"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data-loading worker processes per rank"})
    # --- evaluation, logging, checkpoints ---
    eval_steps: int = field(default=50, metadata={"help": "evaluate on held-out cells every N steps (0: end only)"})
    logging_steps: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    save_steps: int = field(default=100, metadata={"help": "write a checkpoint every N steps (and at the end)"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest K checkpoints"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, both (comma) or none"})
    run_name: str | None = field(default=None, metadata={"help": "run name for the trackers"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest complete checkpoint in output_dir (start afresh if there is none)"})
    resume_from: str | None = field(default=None, metadata={"help": "continue from this checkpoint folder"})
    stop_at_step: int | None = field(default=None, metadata={
        "help": "leave after this step with a checkpoint, without finishing (for job time limits; then --resume)"})
    max_train_minutes: float | None = field(default=None, metadata={
        "help": "finish (final eval, checkpoint and final/) once the training steps (evaluation and checkpoints "
                "not counted) have taken this long"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of an error"})
    write_rank_report: bool = field(default=False, metadata={
        "help": "write OUT/rank_reports/rank<R>.json: world size, the cells this process trained on and a "
                "checksum of its parameters (to check data sharding and DDP consistency)"})

    def __post_init__(self) -> None:
        self.dataset = [str(d) for d in self.dataset]
        parse_objectives(self.objectives)
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.per_device_batch_size >= 1, "per_device_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (0.0 <= self.eval_fraction < 1.0, "eval_fraction must be in [0, 1)"),
            (self.save_steps >= 1 and self.logging_steps >= 1 and self.eval_steps >= 0, "step intervals must be >= 1"),
            (self.dataset_weights is None or len(self.dataset_weights) == len(self.dataset),
             "give one --dataset_weights value per --dataset"),
            (self.stop_at_step is None or self.stop_at_step >= 1, "stop_at_step must be >= 1"),
            (self.panel_genes >= 1, "panel_genes must be >= 1"),
            ("celltype" not in self.objective_list or self.label_column is not None,
             "the celltype objective needs --label_column (the obs column of cell types)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def objective_list(self) -> list[str]:
        return parse_objectives(self.objectives)


def mixing_weights(part_sizes: list[int], mixing: str) -> list[float] | None:
    """Sampling weight per dataset: ``None`` for ``"size"`` (every cell once per epoch), ``sqrt(n)`` or ``1`` per
    dataset of ``n`` cells for ``"sqrt"`` and ``"equal"`` (datasets without cells get 0)."""
    if mixing == "size" or len(part_sizes) < 2:
        return None
    return [float(np.sqrt(n)) if mixing == "sqrt" else float(n > 0) for n in part_sizes]


def narrow_specs(corpus, top_k: int | None, n_zeros: int | None) -> bool:
    """Give every part of ``corpus`` the spec with at most ``top_k`` genes and ``n_zeros`` zeros (what the collator
    cuts cells to and what the model records; a part tokenized with fewer keeps its own); True when that cuts
    anything."""
    cut = False
    for part in corpus.parts:
        spec = part.spec
        narrowed = spec.replace(top_k=spec.top_k if top_k is None else min(top_k, spec.top_k),
                                n_zeros=spec.n_zeros if n_zeros is None else min(n_zeros, spec.n_zeros))
        if (narrowed.top_k, narrowed.n_zeros) != (spec.top_k, spec.n_zeros):
            logger.info("%s: cells cut to %d genes and %d sampled zeros", part.name, narrowed.top_k, narrowed.n_zeros)
            part.spec, cut = narrowed, True
    return cut


def main(args: PretrainArgs | None = None) -> dict[str, Any]:
    """Run pretraining; return the final held-out metrics and paths (``{"final_dir", "metrics", "step", ...}``)."""
    args = args if args is not None else parse_args(PretrainArgs)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, report_to=args.report_to,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps, output_dir=output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    objectives = args.objective_list
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    resume_dir = check_output_dir(output_dir, resume=args.resume, resume_from=args.resume_from,
                                  overwrite=args.overwrite_output_dir)
    sharded = str(accelerator.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED")
    if sharded and resume_dir is not None:
        raise CheckpointError(
            "exact --resume is implemented for DDP (optimizer state saved whole by the main process); under "
            f"{accelerator.distributed_type} start a new run from the checkpoint's weights with "
            f"--init_from {resume_dir}"
        )
    if resume_dir is not None and accelerator.is_main_process:
        verify_checkpoint(resume_dir)  # before anything is written: a corrupt checkpoint stops the run here
    accelerator.wait_for_everyone()

    # data
    paths = args.dataset
    if not paths:
        with accelerator.main_process_first():
            paths = [str(prepare_default_data(output_dir / "default_data"))]
    corpus = load_corpus(paths, eval_fraction=args.eval_fraction, seed=args.seed, max_eval_cells=args.max_eval_cells,
                         require_counts="mcv" in objectives or "count" in objectives or
                         args.gene_selection != "top",
                         labels=(args.label_column, CELL_TYPE_COLUMN) if "celltype" in objectives else None)
    truncate = narrow_specs(corpus, args.top_k, args.n_zeros)
    output_genes = counted = None
    if "mcv" in objectives or args.gene_selection == "hvg":  # the HVGs and the mean profiles: one read
        counted = counted_training_cells(corpus, seed=args.seed, purpose="MCV or the gene panel")
    # the input panel and MCV's outputs are usually the same 2,000 genes: computed once per size
    most_variable = functools.cache(lambda n: highly_variable_tokens(corpus, n, items=counted))
    if args.gene_selection == "hvg":  # every part's spec (and so the saved model's) carries the panel
        with accelerator.main_process_first():
            panel = most_variable(args.panel_genes)
        for part in corpus.parts:
            part.spec = part.spec.replace(input_genes=panel)
        logger.info("the input is each cell's top-ranked genes among the corpus's %d most variable", len(panel))
    if args.mcv_output_genes and "mcv" in objectives:
        with accelerator.main_process_first():
            output_genes = most_variable(args.mcv_output_genes)
        logger.info("MCV scores the %d most variable genes of the corpus", len(output_genes))
    from accelerate.utils import set_seed

    set_seed(args.seed)
    model = build_model(
        corpus, objectives, resume_dir=resume_dir, init_from=args.init_from,
        attn_implementation=args.attn_implementation, gradient_checkpointing=args.gradient_checkpointing,
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.attention_dropout,
        classifier_pooling=args.pooling, value_gating=args.value_gating, gene_embedding_norm=args.gene_embedding_norm,
        mcv_input=args.mcv_input, mcv_normalization=args.mcv_normalization,
        use_contrastive_head="contrastive" in objectives, contrastive_temperature=args.contrastive_temperature,
        mlm_weight=args.mlm_weight, mcv_weight=args.mcv_weight, count_weight=args.count_weight,
        contrastive_weight=args.contrastive_weight, celltype_weight=args.celltype_weight,
        use_celltype_head="celltype" in objectives, cell_type_names=corpus.label_names,
        **model_overrides(args.model_config),
    )
    if "celltype" in objectives and model.config.cell_type_names != corpus.label_names:
        raise ValueError(f"the model's cell types {model.config.cell_type_names} are not the datasets' "
                         f"{corpus.label_names} (column {args.label_column!r})")
    n_params = sum(p.numel() for p in model.parameters())
    report = ("dataset_index", "row") if args.write_rank_report else ()
    collate = dict(mlm_probability=args.mlm_probability, mcv_input_fraction=args.mcv_input_fraction,
                   mcv_fraction_jitter=args.mcv_fraction_jitter, mcv_unsplit_fraction=args.mcv_unsplit_fraction,
                   contrastive_view=args.contrastive_view, mcv_gene_mask=args.mcv_source_genes,
                   max_length=args.max_length, truncate=truncate,
                   gene_selection="panel" if args.gene_selection == "hvg" else args.gene_selection,
                   mcv_output_genes=output_genes)
    collator = make_collator(corpus.vocab, corpus.specs, objectives, seed=args.seed, pass_columns=report, **collate)
    sampler = LengthGroupedBatchSampler(
        corpus.train.lengths, args.per_device_batch_size, part_sizes=corpus.train.part_sizes,
        weights=args.dataset_weights or mixing_weights(corpus.train.part_sizes, args.dataset_mixing), seed=args.seed, num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    # a private generator: creating a loader iterator must not draw from the global torch RNG (dropout masks)
    loader_kwargs = dict(num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
                         generator=torch.Generator())
    train_loader = torch.utils.data.DataLoader(corpus.train, batch_sampler=sampler, collate_fn=collator,
                                               **loader_kwargs)
    evaluate_fn = None
    if len(corpus.eval):
        eval_sampler = LengthGroupedBatchSampler(
            corpus.eval.lengths, args.per_device_batch_size * 2, seed=args.seed + 1, shuffle=False,
            drop_last=False, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        )
        profiles = None
        if "mcv" in objectives:  # the diagnostic reference: each dataset's mean profile
            profiles = torch.as_tensor(mean_profiles(corpus, items=counted), dtype=torch.float32)
        eval_loader = torch.utils.data.DataLoader(
            corpus.eval, batch_sampler=eval_sampler,
            collate_fn=make_collator(corpus.vocab, corpus.specs, objectives, seed=args.seed + 1,
                                     **{**collate, "pass_columns": ("dataset_index",) if profiles is not None else ()}),
            **loader_kwargs)

        def evaluate_fn(unwrapped):
            return evaluate(unwrapped, eval_loader, accelerator, objectives, mcv_profiles=profiles)

    seen_cells: list[tuple[int, int]] = []

    def batch_hook(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if report:
            seen_cells.extend(zip(batch.pop("dataset_index").tolist(), batch.pop("row").tolist()))
        if "mlm" not in objectives:  # masking only made count targets: no gene-identity loss
            batch.pop("labels", None)
        return batch

    run_config = {k: (",".join(map(str, v)) if isinstance(v, list) else ("none" if v is None else v))
                  for k, v in args_to_dict(args).items()}
    accelerator.init_trackers(args.run_name or output_dir.name, config=run_config)
    global_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(
        f"pretraining {n_params:,} parameters on {len(corpus.train)} cells ({len(corpus.eval)} held out) from "
        f"{len(corpus.parts)} dataset(s); objectives {objectives}; {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type}; global batch {global_batch} cells"
    )
    settings = LoopSettings(
        max_steps=args.max_steps, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm, lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * args.max_steps),
        min_lr_ratio=args.min_lr_ratio, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, stop_at_step=args.stop_at_step,
        max_train_minutes=args.max_train_minutes, torch_compile=args.torch_compile, progress_bar=args.progress_bar,
        description="pretraining",
    )
    result = train(model, train_loader, accelerator, settings, evaluate=evaluate_fn, output_dir=output_dir,
                   resume_from=resume_dir, batch_hook=batch_hook, save_extra=corpus.vocab.save, trackers=True,
                   state_extra={"vocab_fingerprint": corpus.vocab.fingerprint(), "args": args_to_dict(args)})

    summary: dict[str, Any] = {"step": result.step, "metrics": result.metrics, "output_dir": str(output_dir),
                               "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                               "train_seconds": result.train_seconds, "n_parameters": n_params}
    if args.write_rank_report:
        report_dir = output_dir / "rank_reports"
        report_dir.mkdir(parents=True, exist_ok=True)
        rank_report = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                       "backend": str(accelerator.distributed_type), "steps": result.step, "cells": seen_cells,
                       "param_sha256": parameter_checksum(accelerator.unwrap_model(model))}
        (report_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(rank_report))
    if result.finished:
        final_dir = output_dir / "final"
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            write_final_model(final_dir, accelerator.unwrap_model(model), corpus, args, result, n_params,
                              accelerator.num_processes, state_dict=state_dict)
            accelerator.print(f"saved the pretrained model to {final_dir}")
        accelerator.wait_for_everyone()
        summary["final_dir"] = str(final_dir)
    accelerator.end_training()
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """``express-pretrain`` / ``python pretrain/run.py``: exit code 0, 2 for bad input (one line), 1 otherwise."""
    from tokenizer.errors import InputError, run_cli

    argv = list(argv if argv is not None else sys.argv[1:])

    def body() -> None:
        try:
            args = parse_args(PretrainArgs, argv, prog="express-pretrain")
        except ValueError as err:  # inconsistent flags: say which
            raise InputError(str(err)) from None
        try:
            main(args)
        except (NonFiniteLossError, CheckpointError) as err:  # training failed: say why, no traceback
            if args.debug:
                raise
            print(f"express-pretrain: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    return run_cli("express-pretrain", body, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(cli())
