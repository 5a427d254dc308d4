"""Pretrain an express encoder with masked-gene modelling (MLM) and molecular cross-validation (MCV).

A plain ``accelerate`` loop: one CPU, one GPU, many GPUs or many nodes, with the same script.

With no arguments it pretrains a small model on the built-in default data (scanpy's pbmc68k_reduced as raw counts,
tokenized into ``runs/pretrain_default/default_data`` on first use) in a few minutes on a CPU::

    python pretrain/run.py                      # or: accelerate launch pretrain/run.py

Your own corpus (tokenized with ``express-tokenize tokenize --keep_counts``, all with one statistics folder)::

    accelerate launch pretrain/run.py --dataset tokens/a --dataset tokens/b --output_dir runs/mine \\
        --max_steps 20000 --objectives mlm,mcv --save_steps 1000 --seed 0 [--resume] [--config args.yaml]

CPU, two processes (real gloo DDP; ``accelerate launch --cpu --num_processes 2`` would start only one)::

    accelerate launch --multi_gpu --num_processes 2 pretrain/run.py --output_dir runs/ddp_cpu
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 pretrain/run.py --output_dir runs/ddp_cpu

GPUs on one machine (bf16 is the default on GPUs that support it)::

    accelerate launch --multi_gpu --num_processes 8 pretrain/run.py --dataset ... --per_device_batch_size 64

Several machines (run on every node with its own ``--machine_rank``; ``--num_processes`` counts all GPUs)::

    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 \\
        --main_process_port 29500 --num_processes 16 pretrain/run.py --dataset ... --output_dir /shared/runs/big

Interrupted runs continue exactly with ``--resume`` (same output dir, same number of processes and batch size).
Outputs: ``OUT/checkpoint-<step>/`` (resumable), ``OUT/final/`` (``from_pretrained`` folder with the vocabulary and
a model card), ``OUT/loss_curve.png``, ``OUT/logs/`` (TensorBoard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pretrain.data import (
    TOKENIZATION_FILE,
    Corpus,
    ExpressCollator,
    LengthGroupedBatchSampler,
    VocabularyMismatchError,
    load_corpus,
)
from pretrain.training import (
    CheckpointError,
    args_to_dict,
    atomic_directory,
    build_optimizer,
    build_scheduler,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    parse_args,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    verify_checkpoint,
)

logger = logging.getLogger("pretrain")

OBJECTIVES = ("mlm", "mcv", "count")
DEFAULT_OUTPUT_DIR = "runs/pretrain_default"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class PretrainArgs:
    """Pretrain an express encoder (MLM + MCV) on tokenized datasets with accelerate."""

    # --- data ---
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "tokenized dataset folder(s) (express-tokenize tokenize --keep_counts), all with one vocabulary; "
                "repeat the flag for several. None given: the built-in default data (pbmc68k_reduced)"})
    dataset_weights: list[float] | None = field(default=None, metadata={
        "help": "sampling weight per dataset (each epoch draws cells in these proportions); default: every cell "
                "once per epoch"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of each dataset's cells held out"})
    max_eval_cells: int | None = field(default=2000, metadata={"help": "cap on held-out cells per dataset"})
    max_length: int | None = field(default=None, metadata={"help": "truncate cells to this many tokens"})
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "where checkpoints, logs and final/ go"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh even if output_dir already holds checkpoints or a final model"})
    # --- model ---
    init_from: str | None = field(default=None, metadata={
        "help": "start from this saved model folder (weights and config) instead of a new model"})
    hidden_size: int = field(default=128, metadata={"help": "encoder width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "encoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=256, metadata={"help": "feed-forward width"})
    dropout: float = field(default=0.02, metadata={"help": "hidden and attention dropout"})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON file (or inline JSON) of further ExpressConfig fields, overriding the ones above"})
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(default="sdpa", metadata={
        "help": "attention kernel (flash_attention_2 needs the flash-attn extra and a GPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    # --- objectives ---
    objectives: str = field(default="mlm,mcv", metadata={"help": "comma-separated subset of mlm, mcv, count"})
    mlm_weight: float = field(default=1.0, metadata={"help": "weight of the masked-gene loss"})
    mcv_weight: float = field(default=1.0, metadata={"help": "weight of the MCV loss"})
    count_weight: float = field(default=1.0, metadata={"help": "weight of the masked-count loss"})
    mlm_probability: float = field(default=0.15, metadata={"help": "share of detected genes masked per cell"})
    mcv_input_fraction: float = field(default=0.5, metadata={
        "help": "MCV: each count is split x' ~ Binomial(x, p) with this p; x' is the input, x - x' the target"})
    # --- optimisation ---
    per_device_batch_size: int = field(default=16, metadata={"help": "cells per process per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=150, metadata={"help": "optimizer steps (sets the learning-rate schedule)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
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
    write_rank_report: bool = field(default=False, metadata={
        "help": "write OUT/rank_reports/rank<R>.json: world size, the cells this process trained on and a "
                "checksum of its parameters (to check data sharding and DDP consistency)"})

    def __post_init__(self) -> None:
        self.dataset = [str(d) for d in self.dataset]
        names = self.objective_list
        unknown = [o for o in names if o not in OBJECTIVES]
        if unknown or not names:
            raise ValueError(f"--objectives must be a comma-separated subset of {OBJECTIVES}, got {self.objectives!r}")
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.per_device_batch_size >= 1, "per_device_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (0.0 <= self.eval_fraction < 1.0, "eval_fraction must be in [0, 1)"),
            (self.save_steps >= 1 and self.logging_steps >= 1 and self.eval_steps >= 0, "step intervals must be >= 1"),
            (self.dataset_weights is None or len(self.dataset_weights) == len(self.dataset),
             "give one --dataset_weights value per --dataset"),
            (self.stop_at_step is None or self.stop_at_step >= 1, "stop_at_step must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def objective_list(self) -> list[str]:
        return [o.strip() for o in self.objectives.split(",") if o.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------------


def prepare_default_data(cache_dir: Path) -> Path:
    """Tokenize the built-in default data (raw counts of pbmc68k_reduced) into ``cache_dir`` once, with kept counts
    for MCV, through the tokenizer's Python API; return the tokenized dataset folder."""
    import tokenizer
    from tokenizer.data import pbmc68k_counts

    tokens = cache_dir / "tokens"
    if (tokens / "manifest.json").is_file():
        return tokens
    cache_dir.mkdir(parents=True, exist_ok=True)
    h5ad = cache_dir / "pbmc68k_counts.h5ad"
    if not h5ad.is_file():
        adata = pbmc68k_counts()
        tmp = cache_dir / ".pbmc68k_counts.tmp.h5ad"
        adata.write_h5ad(tmp)
        os.replace(tmp, h5ad)
    logger.info("tokenizing the default data into %s", tokens)
    tokenizer.fit_statistics([h5ad], cache_dir / "stats", total_counts_key="n_counts", overwrite=True)
    tokenizer.tokenize_files([h5ad], cache_dir / "stats", tokens, total_counts_key="n_counts",
                             obs_keys=["cell_type"], keep_counts=True, overwrite=True)
    return tokens


def make_accelerator(args: PretrainArgs, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    use_cpu = args.cpu or not torch.cuda.is_available()
    precision: str | None = args.mixed_precision
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None  # as `accelerate launch --mixed_precision` / `accelerate config` set it
        else:
            precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "no"
    trackers = [t.strip() for t in args.report_to.split(",") if t.strip() and t.strip() != "none"]
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("--report_to wandb needs the wandb package: pip install 'express[wandb]'") from None
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )


def _model_overrides(args: PretrainArgs) -> dict[str, Any]:
    if not args.model_config:
        return {}
    text = args.model_config
    path = Path(text)
    data = json.loads(path.read_text() if path.is_file() else text)
    if not isinstance(data, dict):
        raise ValueError("--model_config must be a JSON object of ExpressConfig fields")
    return data


def build_model(args: PretrainArgs, corpus: Corpus, resume_dir: Path | None):
    """A new model sized for the corpus, the ``--init_from`` model, or the architecture of the resumed checkpoint."""
    from modeling import ExpressConfig, ExpressForMaskedModeling
    from tokenizer import GeneVocab

    vocab = corpus.vocab
    objectives = args.objective_list
    source = resume_dir or (Path(args.init_from) if args.init_from else None)
    if source is not None:
        try:
            source_vocab = GeneVocab.load(source)
        except FileNotFoundError:
            raise VocabularyMismatchError(
                f"{source} has no vocabulary files (vocab.json, gene_stats.parquet), so its genes cannot be matched "
                "to the datasets; use a folder written by pretrain/run.py"
            ) from None
        if source_vocab.fingerprint() != vocab.fingerprint():
            raise VocabularyMismatchError(
                f"{source} was trained with vocabulary {source_vocab.fingerprint()} ({source_vocab.n_genes} genes) "
                f"but the datasets use {vocab.fingerprint()} ({vocab.n_genes} genes); token ids would mean different "
                "genes. Tokenize the datasets with the statistics folder the model was trained on "
                f"(`express-tokenize tokenize --stats {source}`)"
            )
    weights = {"mlm_weight": args.mlm_weight, "mcv_weight": args.mcv_weight, "count_weight": args.count_weight}
    if resume_dir is not None:
        model = ExpressForMaskedModeling(ExpressConfig.from_pretrained(resume_dir, **weights))  # weights: later
    elif args.init_from:
        model = ExpressForMaskedModeling.from_pretrained(args.init_from, attn_implementation=args.attn_implementation,
                                                         **weights)
    else:
        longest = max(int(corpus.train.lengths.max(initial=0)), int(corpus.eval.lengths.max(initial=0)),
                      *[e.top_k + e.n_zeros + 2 for e in corpus.encodings])
        fields = dict(
            hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
            hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
            max_position_embeddings=max(512, -(-longest // 64) * 64),
            use_mcv_head="mcv" in objectives, use_count_head="count" in objectives, **weights,
        )
        fields.update(_model_overrides(args))
        model = ExpressForMaskedModeling(ExpressConfig.from_vocab(vocab, **fields))
        model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    if model.config._attn_implementation != args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    heads = {"mcv": model.mcv_head, "count": model.count_head}
    missing = [o for o, head in heads.items() if o in objectives and head is None]
    if missing:
        raise ValueError(f"the model has no head for {missing}; start a new model or drop them from --objectives")
    # heads of objectives not trained now get no gradient: freeze them so DDP does not wait for one
    for objective, head in (("mlm", model.mlm_head), ("mcv", model.mcv_head), ("count", model.count_head)):
        if head is not None and objective not in objectives:
            head.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_collator(args: PretrainArgs, corpus: Corpus, *, seed: int, extra_columns: tuple[str, ...] = ()):
    objectives = args.objective_list
    masking = "mlm" in objectives or "count" in objectives
    return ExpressCollator(
        corpus.vocab,
        mlm_probability=args.mlm_probability if masking else 0.0,
        mcv_input_fraction=args.mcv_input_fraction if "mcv" in objectives else None,
        count_targets="count" in objectives,
        encodings=corpus.encodings,
        pad_to_multiple_of=8,
        max_length=args.max_length,
        label_columns=extra_columns,
        seed=seed,
    )


def check_output_dir(args: PretrainArgs, output_dir: Path) -> Path | None:
    """Decide where to resume from; refuse to overwrite an earlier run unless asked."""
    if args.resume_from:
        return Path(args.resume_from)
    if args.resume:
        found = latest_checkpoint(output_dir)
        if found is None:
            logger.info("--resume: no complete checkpoint in %s, starting from scratch", output_dir)
        return found
    previous = list_checkpoints(output_dir) or (output_dir / "final").exists()
    if previous and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{output_dir} already holds a run (checkpoints or final/); pass --resume to continue it, "
            "--overwrite_output_dir to start afresh there, or another --output_dir"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation, logging and outputs
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, accelerator, objectives: list[str]) -> dict[str, float]:
    """Held-out MLM loss and accuracy (over masked genes), MCV NLL per held-out count, count NLL."""
    model.eval()
    # masked tokens, MLM loss sum, correct, held-out counts, MCV NLL sum, count targets, count NLL sum
    sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if "mlm" not in objectives:
            batch.pop("labels", None)
        with accelerator.autocast():
            out = model(**batch)
        if out.mlm_loss is not None:
            labels = batch["labels"]
            n = (labels != -100).sum()
            sums[0] += n
            sums[1] += out.mlm_loss.double() * n
            sums[2] += (out.logits.argmax(-1) == labels[labels != -100]).sum()
        if out.mcv_loss is not None:
            held = batch["mcv_counts"].double().sum()
            sums[3] += held
            sums[4] += out.mcv_loss.double() * held.clamp_min(1.0)
        if out.count_loss is not None:
            k = (batch["count_targets"] != -100).sum()
            sums[5] += k
            sums[6] += out.count_loss.double() * k
    total = accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0).tolist()
    model.train()
    metrics = {}
    if total[0] > 0:
        metrics["eval/mlm_loss"] = total[1] / total[0]
        metrics["eval/mlm_accuracy"] = total[2] / total[0]
    if total[3] > 0:
        metrics["eval/mcv_nll"] = total[4] / total[3]
    if total[5] > 0:
        metrics["eval/count_nll"] = total[6] / total[5]
    return metrics


def plot_loss_curve(history: list[dict], path: Path) -> None:
    """Training losses and held-out metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "train/loss" in h]
    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss", "-"), ("train/mlm_loss", "--"), ("train/mcv_loss", ":"),
                       ("train/count_loss", "-.")):
        points = [(h["step"], h[key]) for h in train if key in h]
        if points:
            axes[0].plot(*zip(*points), style, label=key.split("/")[1])
    for key in ("eval/mlm_loss", "eval/mcv_nll", "eval/count_nll"):
        points = [(h["step"], h[key]) for h in evals if key in h]
        if points:
            axes[0].plot(*zip(*points), "o-", label=key)
    axes[0].set(xlabel="optimizer step", ylabel="loss", title="losses")
    axes[0].legend(fontsize=8)
    points = [(h["step"], h["eval/mlm_accuracy"]) for h in evals if "eval/mlm_accuracy" in h]
    if points:
        axes[1].plot(*zip(*points), "o-")
    axes[1].set(xlabel="optimizer step", ylabel="accuracy", title="held-out masked-gene accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_card(args: PretrainArgs, corpus: Corpus, metrics: dict[str, float], state: dict, n_params: int) -> str:
    datasets_table = "\n".join(
        f"| `{d.path}` | {len(d.dataset)} | {d.encoding.top_k} | {d.encoding.n_zeros} |" for d in corpus.datasets
    )
    metrics_table = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    return f"""---
library_name: transformers
tags: [single-cell, express, pretraining]
---

# express encoder pretrained with {args.objectives.replace(",", " + ")}

An `ExpressForMaskedModeling` model ({n_params:,} parameters, {state["step"]} optimizer steps) pretrained with
`pretrain/run.py`. This folder also holds its gene vocabulary (`vocab.json`, `gene_stats.parquet`, `stats.json`):
tokenize new data with it (`express-tokenize tokenize --stats THIS_FOLDER`).

```python
import modeling  # registers the express classes with the transformers Auto classes
from transformers import AutoModel
model = AutoModel.from_pretrained("THIS_FOLDER")  # the encoder; AutoModelForMaskedLM for the pretraining heads
```

## Training data

Vocabulary fingerprint `{corpus.vocab.fingerprint()}` ({corpus.vocab.n_genes} genes).

| dataset | cells | top_k | sampled zeros |
|---|---|---|---|
{datasets_table}

## Held-out metrics (final)

{len(corpus.eval)} held-out cells. MLM accuracy counts masked detected genes
whose identity the model ranks first; MCV NLL is in nats per held-out count.

| metric | value |
|---|---|
{metrics_table}

## Training arguments

Processes: {state["world_size"]}; training time {state["train_seconds"] / 60:.1f} min.

```json
{json.dumps(args_to_dict(args), indent=2)}
```
"""


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def main(args: PretrainArgs | None = None) -> dict[str, Any]:
    """Run pretraining; return the final held-out metrics and paths (``{"final_dir", "metrics", "step", ...}``)."""
    args = args if args is not None else parse_args(PretrainArgs)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    objectives = args.objective_list
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    resume_dir = check_output_dir(args, output_dir)
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
    corpus = load_corpus(paths, eval_fraction=args.eval_fraction, seed=args.seed,
                         max_eval_cells=args.max_eval_cells, require_counts="mcv" in objectives)
    seed_everything(args.seed)
    model = build_model(args, corpus, resume_dir)
    n_params = sum(p.numel() for p in model.parameters())
    extra = ("dataset_index", "row") if args.write_rank_report else ()
    collator = make_collator(args, corpus, seed=args.seed, extra_columns=extra)
    sampler = LengthGroupedBatchSampler(
        corpus.train.lengths, args.per_device_batch_size, part_sizes=corpus.train.part_sizes,
        weights=args.dataset_weights, seed=args.seed, num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    # a private generator: creating a loader iterator must not draw from the global torch RNG (dropout masks)
    loader_kwargs = dict(num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
                         generator=torch.Generator())
    train_loader = torch.utils.data.DataLoader(corpus.train, batch_sampler=sampler, collate_fn=collator,
                                               **loader_kwargs)
    eval_loader = None
    if len(corpus.eval):
        eval_sampler = LengthGroupedBatchSampler(
            corpus.eval.lengths, args.per_device_batch_size * 2, seed=args.seed + 1, shuffle=False,
            drop_last=False, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        )
        eval_loader = torch.utils.data.DataLoader(
            corpus.eval, batch_sampler=eval_sampler, collate_fn=make_collator(args, corpus, seed=args.seed + 1),
            **loader_kwargs)

    optimizer = build_optimizer(model, lr=args.learning_rate, weight_decay=args.weight_decay,
                                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                fused=accelerator.device.type == "cuda")
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * args.max_steps)
    scheduler = build_scheduler(optimizer, total_steps=args.max_steps, warmup_steps=warmup,
                                kind=args.lr_scheduler, min_lr_ratio=args.min_lr_ratio)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "log_history": [],
                             "world_size": accelerator.num_processes,
                             "per_device_batch_size": args.per_device_batch_size,
                             "gradient_accumulation_steps": args.gradient_accumulation_steps,
                             "vocab_fingerprint": corpus.vocab.fingerprint()}
    if resume_dir is not None:
        loaded, rng = load_checkpoint(resume_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                      rank=accelerator.process_index)
        for key in ("world_size", "per_device_batch_size", "gradient_accumulation_steps"):
            if loaded.get(key) != state[key]:
                raise CheckpointError(
                    f"{resume_dir} was written with {key}={loaded.get(key)} but this run has {state[key]}; an exact "
                    "resume needs the same processes and batch sizes (or start a new run with --init_from "
                    f"{resume_dir})"
                )
        state.update({k: loaded[k] for k in ("step", "epoch", "batch_in_epoch", "train_seconds", "log_history")})
        collator.load_state_dict(loaded["collator"])
        if rng is None:
            raise CheckpointError(f"{resume_dir} lacks the random state of process {accelerator.process_index}")
        set_rng_state(rng)
        accelerator.print(f"resumed from {resume_dir} at step {state['step']}")
    if args.torch_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    run_config = {k: (",".join(map(str, v)) if isinstance(v, list) else ("none" if v is None else v))
                  for k, v in args_to_dict(args).items()}
    accelerator.init_trackers(args.run_name or output_dir.name, config=run_config)
    global_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(
        f"pretraining {n_params:,} parameters on {len(corpus.train)} cells ({len(corpus.eval)} held out) from "
        f"{len(corpus.datasets)} dataset(s); objectives {objectives}; {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type}; global batch {global_batch} cells"
    )

    def micro_batches():
        while True:
            sampler.set_epoch(state["epoch"], start_batch=state["batch_in_epoch"])
            for batch in train_loader:
                state["batch_in_epoch"] += 1
                yield batch
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    def save(step: int) -> Path:
        rngs = _gather_objects(accelerator, rng_state())
        model_state = accelerator.get_state_dict(model)
        path = checkpoint_path(output_dir, step)
        if accelerator.is_main_process:
            trainer_state = dict(state, collator=collator.state_dict(), args=args_to_dict(args))
            save_checkpoint(path, model=accelerator.unwrap_model(model), model_state_dict=model_state,
                            optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state, rng_states=rngs,
                            extra=corpus.vocab.save)
            rotate_checkpoints(output_dir, args.save_total_limit)
        accelerator.wait_for_everyone()
        return path

    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, initial=state["step"], desc="pretraining", dynamic_ncols=True,
               disable=not (args.progress_bar and accelerator.is_main_process))
    stream = micro_batches()
    seen_cells: list[tuple[int, int]] = []
    window = torch.zeros(7, dtype=torch.float64, device=accelerator.device)  # loss parts, tokens, cells, micro-batches
    window_start = time.perf_counter()
    last_saved = state["step"] if resume_dir is not None else None
    last_good = resume_dir
    metrics: dict[str, float] = {}
    model.train()
    finished_early = False
    while state["step"] < args.max_steps:
        step_start = time.perf_counter()  # training time counts steps only, not evaluation or checkpoints
        step_sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        for _ in range(args.gradient_accumulation_steps):
            batch = next(stream)
            if extra:
                seen_cells += list(zip(batch.pop("dataset_index").tolist(), batch.pop("row").tolist()))
            if "mlm" not in objectives:
                batch.pop("labels", None)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                parts = [out.loss] + [getattr(out, f"{o}_loss") for o in OBJECTIVES]
                step_sums += torch.stack([p.detach().double() if p is not None else torch.zeros((), dtype=torch.float64,
                                          device=accelerator.device) for p in parts])
                window[4] += batch["attention_mask"].sum()
                window[5] += batch["attention_mask"].shape[0]
                window[6] += 1
                if accelerator.sync_gradients:
                    # one collective decision, so that every process stops together
                    bad = torch.tensor([0.0 if torch.isfinite(step_sums[0]) else 1.0], device=accelerator.device)
                    if args.max_grad_norm > 0:
                        bad += 0.0 if torch.isfinite(torch.as_tensor(grad_norm)) else 1.0
                    if accelerator.reduce(bad, reduction="sum").item() > 0:
                        bar.close()
                        raise NonFiniteLossError(
                            f"the loss became {step_sums[0].item() / args.gradient_accumulation_steps} at step "
                            f"{state['step'] + 1}; training stopped before that update. The last good checkpoint is "
                            f"{last_good or 'none (no checkpoint was written yet)'}. Try a lower --learning_rate, "
                            "--max_grad_norm or mixed precision off, then --resume"
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        window[:4] += step_sums / args.gradient_accumulation_steps
        state["train_seconds"] += time.perf_counter() - step_start
        bar.update(1)
        step = state["step"]

        if step % args.logging_steps == 0 or step == args.max_steps:
            totals = accelerator.reduce(window.clone(), reduction="sum")
            seconds = time.perf_counter() - window_start
            n_steps = totals[6].item() / accelerator.num_processes / args.gradient_accumulation_steps
            record = {"step": step, "train/loss": totals[0].item() / accelerator.num_processes / n_steps,
                      "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": totals[4].item() / seconds,
                      "train/cells_per_s": totals[5].item() / seconds}
            for i, name in enumerate(OBJECTIVES, start=1):
                if name in objectives:
                    record[f"train/{name}_loss"] = totals[i].item() / accelerator.num_processes / n_steps
            if args.max_grad_norm > 0:
                record["train/grad_norm"] = float(grad_norm)
            state["log_history"].append(record)
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{record['train/loss']:.3f}", tok_s=f"{record['train/tokens_per_s']:.0f}",
                            cells_s=f"{record['train/cells_per_s']:.1f}")
            window.zero_()
            window_start = time.perf_counter()

        out_of_time = False
        if args.max_train_minutes is not None:  # decided together: every process must leave at the same step
            late = torch.tensor([float(state["train_seconds"] > 60 * args.max_train_minutes)],
                                device=accelerator.device)
            out_of_time = accelerator.reduce(late, reduction="sum").item() > 0
        at_end = step == args.max_steps or out_of_time
        if eval_loader is not None and ((args.eval_steps and step % args.eval_steps == 0) or at_end):
            # the bare module: a DDP forward may broadcast buffers, a collective that ranks without held-out
            # batches would never join
            metrics = evaluate(accelerator.unwrap_model(model), eval_loader, accelerator, objectives)
            state["log_history"].append({"step": step, **metrics})
            accelerator.log(metrics, step=step)
            accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if step % args.save_steps == 0 or at_end or step == args.stop_at_step:
            last_good = save(step)
            last_saved = step
            window_start = time.perf_counter()
        if step == args.stop_at_step and not at_end:
            finished_early = True
            break
        if out_of_time:
            accelerator.print(f"time budget of {args.max_train_minutes} min reached at step {step}")
            break
    bar.close()

    result: dict[str, Any] = {"step": state["step"], "metrics": metrics, "output_dir": str(output_dir),
                              "last_checkpoint": str(last_good) if last_good else None,
                              "train_seconds": state["train_seconds"], "n_parameters": n_params}
    if args.write_rank_report:
        report_dir = output_dir / "rank_reports"
        report_dir.mkdir(parents=True, exist_ok=True)
        report = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                  "backend": str(accelerator.distributed_type), "steps": state["step"],
                  "cells": seen_cells, "param_sha256": parameter_checksum(accelerator.unwrap_model(model))}
        (report_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    if not finished_early:
        if last_saved != state["step"]:
            save(state["step"])
        final_dir = output_dir / "final"
        model_state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            plot_loss_curve(state["log_history"], output_dir / "loss_curve.png")
            unwrapped = accelerator.unwrap_model(model)
            with atomic_directory(final_dir) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=model_state)
                corpus.vocab.save(tmp)
                tokenization = corpus.shared_tokenization()
                if tokenization is not None:
                    (tmp / TOKENIZATION_FILE).write_text(json.dumps(tokenization, indent=2))
                (tmp / "training_args.json").write_text(json.dumps(args_to_dict(args), indent=2))
                (tmp / "metrics.json").write_text(json.dumps({"step": state["step"], **metrics}, indent=2))
                (tmp / "README.md").write_text(model_card(args, corpus, metrics, state, n_params))
                (tmp / "loss_curve.png").write_bytes((output_dir / "loss_curve.png").read_bytes())
            accelerator.print(f"saved the pretrained model to {final_dir}")
        accelerator.wait_for_everyone()
        result["final_dir"] = str(final_dir)
    accelerator.end_training()
    return result


def _gather_objects(accelerator, obj) -> list:
    """Every process's ``obj`` on every process (a list ordered by rank)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


if __name__ == "__main__":
    try:
        cli_args = parse_args(PretrainArgs)
    except ValueError as err:  # inconsistent flags: say which, without a traceback
        sys.exit(f"pretrain/run.py: error: {err}")
    try:
        main(cli_args)
    except (NonFiniteLossError, CheckpointError, VocabularyMismatchError, FileExistsError) as err:
        logger.error("%s", err)
        sys.exit(1)
